"""The framework-neutral explanation engine: no HTTP, no TorchServe, no files.

What a user of the engine imports is here; everything else is an internal of its module.

Explaining (the front door, :mod:`.explainer`):
    :class:`Explainer` (``validate`` a request once, ``explain_requests`` / ``explain`` / ``predict``),
    :class:`ExplainRequest` (what one sample asks for), :class:`ValidRequest` (a request ``validate``
    accepted, run without another check), :class:`Explanation` (one sample's result), :data:`DEFAULTS`
    (method, sparsity, reduction and selection a request gets when it names none), :data:`DEFAULT_PASS_BATCH`
    (a model spec's fixed pass shape), :func:`explaining`
    (the model state an explanation needs, restored after), :class:`InputNormalisation`.

Extending (registries: new strategies are registered, not special-cased):
    :data:`METHODS` / :func:`register_method` with :class:`Attribution`, :data:`SELECTIONS` /
    :func:`register_selection` with :class:`Pathway`, :data:`REDUCTIONS`, :class:`OptionSpec` (an option's
    type, bounds and cost in passes), :func:`check_sparsity` (the one sparsity rule), :class:`Registry`.

Activation sites (:mod:`.sites`, the one place that instruments a model):
    :func:`instrument`, :class:`Site`, :class:`SiteLayout`, :class:`SiteCall`, :class:`SiteMismatchError`,
    :func:`observe_network` (logits, layout and which neurons are alive), and :func:`run_along` (a forward
    pass along a pathway).

Memory (:mod:`.batching`, :mod:`.events`):
    :class:`MemoryBudget`, :class:`BatchSplit` (reported through ``Explainer.on_batch_split``),
    :func:`is_out_of_memory`, :func:`release_cached_memory`.
"""

from . import baselines, contribution, selections  # noqa: F401  (registers methods and selection strategies)
from .batching import MemoryBudget, is_out_of_memory, release_cached_memory
from .events import BatchSplit
from .explainer import DEFAULT_PASS_BATCH, DEFAULTS, Explainer, ExplainRequest, Explanation, ValidRequest, explaining, \
    resolve_pass_batch
from .methods import METHODS, Attribution, register_method
from .normalisation import InputNormalisation
from .options import OptionSpec, check_sparsity, is_positive_int
from .pathways import SELECTIONS, Pathway, register_selection, run_along
from .reduce import REDUCTIONS
from .registry import Registry
from .selections import observe_network
from .sites import Site, SiteCall, SiteLayout, SiteMismatchError, instrument

__all__ = [
    "Attribution", "BatchSplit", "DEFAULT_PASS_BATCH", "DEFAULTS", "ExplainRequest", "Explainer", "Explanation", "InputNormalisation",
    "METHODS", "MemoryBudget", "OptionSpec", "Pathway", "REDUCTIONS", "Registry", "SELECTIONS", "Site", "SiteCall",
    "SiteLayout", "SiteMismatchError", "ValidRequest", "resolve_pass_batch", "check_sparsity", "explaining",
    "instrument", "is_out_of_memory", "is_positive_int",
    "observe_network", "register_method", "register_selection", "release_cached_memory", "run_along",
]
