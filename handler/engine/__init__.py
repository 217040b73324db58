"""The framework-neutral explanation engine: no HTTP, no TorchServe, no files.

- :mod:`.sites` instruments activation call sites (the only module that touches a model's forward);
- :mod:`.pathways` selects pathways (registered strategies) and runs a network along one;
- :mod:`.methods` turns a model and a batch into attribution maps (registered methods), with the
  baselines (integrated gradients, SmoothGrad, Grad-CAM, guided backprop, ...) in :mod:`.baselines`;
- :mod:`.selections` holds the other pathway selections (random, pruning gates, input resampling);
- :mod:`.reduce` reduces channels; :mod:`.explainer` ties them together per batch.
"""

from . import baselines, selections  # noqa: F401  (registers the baseline methods and selection strategies)
from .explainer import Explainer, ExplainRequest, Explanation, explaining
from .methods import METHODS, Attribution, register_method
from .normalisation import InputNormalisation
from .pathways import SELECTIONS, Pathway, keep_above_quantile, run_along
from .reduce import REDUCTIONS
from .sites import Site, SiteLayout, SiteMismatchError, instrument, trace_sites

__all__ = [
    "Attribution", "ExplainRequest", "Explainer", "Explanation", "InputNormalisation", "METHODS", "Pathway",
    "REDUCTIONS", "SELECTIONS", "Site", "SiteLayout", "SiteMismatchError", "explaining", "instrument",
    "keep_above_quantile", "register_method", "run_along", "trace_sites",
]
