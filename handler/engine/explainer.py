"""The engine's front door: a batch of normalised images in, one :class:`Explanation` per sample out.

Knows nothing of HTTP, TorchServe or files. It owns the model's state while it
works (eval mode, frozen parameters, gradients enabled even under
``torch.inference_mode``) and restores it afterwards, also when a call fails.
Batches are split to fit a memory budget, and a batch that runs out of memory
is retried in halves (see :mod:`.batching`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import ExplainError, InvalidOption, UnsupportedModel
from .batching import BatchPlanner, MemoryBudget, PeakMemory, release_cached_memory
from .events import BatchSplit, BatchSplitListener, report_split
from .methods import METHODS, Attribution
from .normalisation import InputNormalisation
from .options import check_sparsity, is_positive_int
from .pathways import SELECTIONS, pathway_notes, pathway_zero_note
from .reduce import REDUCTIONS, ZERO_MAP_EPS, normalise
from .sites import NoActivationSitesError, forget_last_activation_call, instrument, last_activation_call, \
    out_of_place_transform
from .targets import ClassNames, Target



class EngineFailure(UnsupportedModel, RuntimeError):
    """The model raised under the engine's instrumented passes: which method, at which activation call, and why."""

    def __init__(self, method: str, cause: BaseException, inputs: Optional[torch.Tensor] = None):
        where = last_activation_call()
        text = str(cause).strip().splitlines()
        if where is not None:
            place = f" after {where}"
        elif inputs is not None:  # the model refused its input before any activation: most often the input's fault
            place = (f" before its first activation call, on the input of shape {list(inputs.shape)} and dtype "
                     f"{str(inputs.dtype).replace('torch.', '')}")
        else:
            place = ""
        super().__init__(f"{method} cannot explain this model: {type(cause).__name__}{place}"
                         + (f": {text[0]}" if text else ""))


class InPlaceSideEffect(UnsupportedModel, RuntimeError):
    """The model uses an in-place activation's side effect and ignores its return value."""


class NotAClassifier(UnsupportedModel, ValueError):
    """The model's output is not one ``[batch, classes]`` tensor of logits: an encoder's tokens or features map,
    a tuple or a dict. Every method differentiates one logit per sample, so there is no target to explain."""


def classifier_logits(output, batch: int) -> torch.Tensor:
    """``output`` if it is a classifier's ``[batch, classes]`` logits, else :class:`NotAClassifier` saying what it is."""
    if isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[0] == batch and output.shape[1] >= 1:
        return output
    raise NotAClassifier(
        f"the model returns {_describe_output(output)}; the engine explains classifiers, "
        f"whose output is one [batch, classes] tensor of logits (an encoder needs a classification head)")


def _describe_output(output) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {list(output.shape)}"
    if isinstance(output, (tuple, list)):
        parts = ", ".join(_describe_output(o) for o in output[:3]) + (", ..." if len(output) > 3 else "")
        return f"a {type(output).__name__} of {len(output)} ({parts})"
    if isinstance(output, dict):
        return f"a {type(output).__name__} with keys {sorted(map(str, output))[:5]}"
    return f"a {type(output).__name__}"


#: ``explain_requests(pass_batch=CONFIGURED)``: the explainer's own pass shape.
CONFIGURED = object()


@dataclass(frozen=True)
class ExplainRequest:
    """What one sample asks for; ``None`` fields fall back to the explainer's defaults."""

    target: Target = None
    method: Optional[str] = None
    sparsity: Optional[float] = None
    reduce: Optional[str] = None
    selection: Optional[str] = None
    options: tuple = ()  # extra method options as sorted (name, value) pairs


@dataclass(frozen=True)
class ValidRequest(ExplainRequest):
    """A request :meth:`Explainer.validate` accepted: defaults filled in, options typed and within their
    bounds, the target resolved to ``class_index`` (``-1``: the predicted class); ``sparsity`` and
    ``selection`` are None for a method that follows no pathway. The engine runs it without checking it
    again."""

    class_index: int = -1


#: Samples per pass for a model spec that names no ``pass_batch``: ``"auto"`` (:func:`resolve_pass_batch`).
#: Every pass is padded to its shape, so an explanation is the same bits however it was batched.
#: ``Explainer`` itself defaults to no fixed shape.
DEFAULT_PASS_BATCH = "auto"

#: ``"auto"``'s pass shape per device kind. On the CPU one sample per pass: a lone request then pays no
#: padding, which costs it far more than a full batch loses by running one sample at a time
#: (benchmarks/speed/results/reproducibility-cpu.md). On a GPU a pass of 4 costs about what a pass of 1
#: does, so full batches share the device (not measured here).
AUTO_PASS_BATCH = {"cpu": 1}
AUTO_PASS_BATCH_ELSEWHERE = 4


def resolve_pass_batch(value, device) -> Optional[int]:
    """A configured pass shape as the engine takes it: a positive integer, None (the batch's own size), or
    ``"auto"`` (:data:`AUTO_PASS_BATCH` for ``device``'s kind). Raises ``ValueError`` naming the value."""
    if value == "auto":
        return AUTO_PASS_BATCH.get(torch.device(device).type, AUTO_PASS_BATCH_ELSEWHERE)
    if value is None:
        return None
    if not is_positive_int(value):
        raise ValueError(f"pass_batch must be a positive integer, null or \"auto\", not {value!r}")
    return value


#: What a request that names no method, sparsity, reduction or selection gets; a model spec may set its own.
DEFAULTS = ExplainRequest(method="pathway_gradient", sparsity=0.7, reduce="max_abs", selection="contribution")


@dataclass
class Explanation:
    """One sample's explanation, with the full network's class probabilities beside it."""

    method: str
    reduce: str
    attribution: np.ndarray  # [H, W] float32, signed, divided by max |·| (all zero if the map is zero)
    attribution_scale: float  # max |·| of the reduced map before normalisation
    target: int
    target_label: str
    probabilities: np.ndarray  # [K] softmax of the full network
    pathway_probability: Optional[float] = None  # target's softmax probability along the pathway
    pathway: Optional[dict] = None
    notes: list = field(default_factory=list)
    pass_batch: Optional[int] = None  # samples in the pass that computed it, padding included (see Explainer)

    @property
    def target_probability(self) -> float:
        return float(self.probabilities[self.target])


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; the modules that were training train again after."""
    # Only what needs changing is changed (and restored): model.eval()/train() walk every module through
    # nn.Module.__setattr__, a visible share of a small model's gradient (benchmarks/speed/README.md).
    training = [m for m in model.modules() if m.training]
    try:
        for m in training:
            m.training = False
        yield
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters and autograd on, for the duration; the model's own state comes back after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with evaluating(model):
        try:
            for p in trainable:
                p.requires_grad_(False)
            with torch.inference_mode(False), torch.enable_grad():
                yield
        finally:
            for p in trainable:
                p.requires_grad_(True)


class Explainer:
    """Explains a classifier's predictions; batch in, one explanation per sample out.

    ``memory_budget`` bounds what one pass may use (a :class:`MemoryBudget`,
    bytes, ``"4GiB"`` or ``"60%"``; default: 80 % of the free GPU memory, 25 % of
    the available RAM on the CPU) and ``max_batch_size`` caps the samples per
    pass; larger batches are split, and a pass that runs out of memory is retried
    in halves (down to one sample) instead of failing its requests.

    ``pass_batch`` fixes the shape of every pass: batches are cut into passes of
    that many samples and the last one is padded with zero images (target 0),
    because a sample's attribution is bit-identical whatever its neighbours in a
    pass of the same shape, but not across batch sizes (float reductions are
    blocked by the batch size). With it, an image's explanation does not depend
    on what it was batched with; ``None`` runs passes at whatever size the batch
    and the memory budget give (no padding). A pass of the fixed shape that runs
    out of memory is retried at half the shape, and every later pass keeps the
    smaller shape: each :class:`Explanation` records its ``pass_batch``, so a
    verification reruns it at the same shape.
    """

    #: Called with a :class:`~handler.engine.events.BatchSplit` whenever a batch is retried in parts
    #: (see :mod:`handler.engine.events`); ``None``: nobody listens.
    on_batch_split: Optional[BatchSplitListener] = None

    def __init__(
        self,
        model: nn.Module,
        *,
        labels: Optional[Sequence[str]] = None,
        label_aliases: Optional[dict] = None,
        device: Union[str, torch.device, None] = None,
        default_method: str = DEFAULTS.method,
        default_sparsity: float = DEFAULTS.sparsity,
        default_reduce: str = DEFAULTS.reduce,
        default_selection: str = DEFAULTS.selection,
        normalisation: Optional[InputNormalisation] = None,
        memory_budget: Union[MemoryBudget, int, str, None] = None,
        max_batch_size: Optional[int] = None,
        pass_batch: Optional[int] = None,
    ):
        """``normalisation``: how the model's inputs were made from pixels (default: ImageNet statistics);
        methods that need pixel-space meaning (integrated gradients' black baseline) get it."""
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device)
        self.planner = BatchPlanner(MemoryBudget.parse(memory_budget, max_batch_size), self.device)
        if pass_batch is not None and (isinstance(pass_batch, bool) or int(pass_batch) != pass_batch or pass_batch < 1):
            raise ValueError(f"pass_batch must be a positive integer or None, not {pass_batch!r}")
        self.pass_batch = None if pass_batch is None else int(pass_batch)
        self._neurons: dict = {}  # input shape (no batch) -> neurons per sample
        self.classes = ClassNames(labels, label_aliases)
        self.normalisation = normalisation if normalisation is not None else InputNormalisation()
        self.defaults = ExplainRequest(
            target=None, method=default_method, sparsity=default_sparsity,
            reduce=default_reduce, selection=default_selection)
        self.validate(self.defaults)
        self._checked = False

    # -- validation ---------------------------------------------------------

    @property
    def labels(self) -> Optional[list]:
        return self.classes.labels

    @property
    def num_classes(self) -> Optional[int]:
        return self.classes.num_classes

    def label(self, index: int) -> str:
        return self.classes.label(index)

    def resolve_target(self, target: Target) -> int:
        """A class index (or ``-1`` for "the predicted class") from an index or a label name."""
        return self.classes.resolve(target)

    def validate(self, request: ExplainRequest) -> ValidRequest:
        """The request with defaults filled in and its target resolved; raises :class:`InvalidOption` or
        :class:`InvalidTarget` naming what is wrong. Every rule of a request is checked here, once."""
        method = request.method or self.defaults.method
        reduce = request.reduce or self.defaults.reduce
        selection = request.selection or self.defaults.selection
        sparsity = self.defaults.sparsity if request.sparsity is None else request.sparsity
        for registry, name in ((METHODS, method), (REDUCTIONS, reduce), (SELECTIONS, selection)):
            registry.get(name)  # raises UnknownNameError, coded after the registry
        sparsity = check_sparsity(sparsity)
        if not METHODS.get(method).uses_pathway:  # checked above (a typo is still an error), then not used
            sparsity, selection = None, None
        options = self._validate_options(method, selection, dict(request.options))
        return ValidRequest(request.target, method, sparsity, reduce, selection, options,
                            class_index=self.resolve_target(request.target))

    def option_specs(self, method: str, selection: str) -> dict:
        """The options a request may set for this method (and, if it follows a pathway, this selection)."""
        chosen = METHODS.get(method)
        specs = dict(chosen.options)
        if chosen.uses_pathway:
            specs.update(SELECTIONS.get(selection).options)
        return specs

    def _validate_options(self, method: str, selection: str, options: dict) -> tuple:
        specs = self.option_specs(method, selection)
        out = {}
        for name, value in options.items():
            spec = specs.get(name)
            if spec is None:
                accepted = ", ".join(sorted(specs)) or "none"
                raise InvalidOption(f"option {name!r} does not apply to method {method!r}"
                                    + (f" with selection {selection!r}" if METHODS.get(method).uses_pathway else "")
                                    + f" (it accepts: {accepted})", code="unknown_option")
            out[name] = spec.coerce(name, value)
        return tuple(sorted(out.items()))

    # -- inference ----------------------------------------------------------

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``[B, K]`` of the full network (no gradients), in eval mode; in float64, so that
        logits that differ keep different probabilities and the most probable class is the logits' argmax (the
        class an explanation of the predicted class explains)."""
        with evaluating(self.model), torch.inference_mode():
            return classifier_logits(self.model(x.to(self.device)), x.shape[0]).double().softmax(dim=1)

    def explain(
        self,
        x: torch.Tensor,
        targets: Union[Target, Sequence[Target]] = None,
        *,
        method: Optional[str] = None,
        sparsity: Union[float, Sequence[float], None] = None,
        reduce: Optional[str] = None,
        selection: Optional[str] = None,
        **options,
    ) -> list:
        """Explain each sample of ``x`` ``[B, C, H, W]`` (normalised) for its target.

        ``targets``: one per sample, or one for all; ``None``/``"auto"`` means the
        predicted class. ``sparsity`` may be one value or one per sample.
        """
        batch = x.shape[0]
        targets = _per_sample(targets, batch, "targets")
        sparsities = _per_sample(sparsity, batch, "sparsity")
        opts = tuple(sorted(options.items()))
        requests = [
            ExplainRequest(t, method, s, reduce, selection, opts) for t, s in zip(targets, sparsities)]
        return self.explain_requests(x, requests)

    def explain_requests(self, x: torch.Tensor, requests: Sequence[ExplainRequest], *,
                         pass_batch: Union[int, None, object] = CONFIGURED) -> list:
        """One explanation per request; requests that share a method and options run as one batch.

        A :class:`ValidRequest` (from :meth:`validate`) is trusted as it is; any other request is validated
        first. ``pass_batch``: the pass shape for this call (a verification reruns an explanation at the
        shape it recorded); by default the explainer's own."""
        if pass_batch is CONFIGURED:
            pass_batch = self.pass_batch
        if x.dim() != 4 or x.shape[0] != len(requests):
            raise ValueError(f"expected a [B, C, H, W] batch with one request per sample, got {tuple(x.shape)} "
                             f"and {len(requests)} requests")
        if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            raise ValueError(f"expected a batch of finite floating-point values, got {str(x.dtype)[6:]}"
                             + ("" if not x.is_floating_point() else " with NaN or infinite values"))
        requests = [r if isinstance(r, ValidRequest) else self.validate(r) for r in requests]
        resolved = [r.class_index for r in requests]
        groups: dict = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.method, r.selection, r.options), []).append(i)
        results: list = [None] * len(requests)
        x = x.to(self.device)
        for (method, selection, options), index in groups.items():
            sub = [requests[i] for i in index]
            explanations = self._run_in_batches(
                x[index], torch.tensor([resolved[i] for i in index], device=self.device),
                method, selection, dict(options), sub, pass_batch)
            for i, e in zip(index, explanations):
                results[i] = e
        return results

    def _run_in_batches(self, x, targets, method_name, selection, options, requests, pass_batch=None) -> list:
        """Run in batches that fit the memory budget; a batch that runs out of memory is retried in halves.

        With ``pass_batch``, every pass has that shape (padded with zero images), smaller only after a pass
        of it ran out of memory (the planner's ceiling)."""
        with _typed_model_failures(method_name, x):
            if not self._checked:
                with explaining(self.model):
                    self._check_instrumentation(x[:1])
            neurons = self._neurons_per_sample(x[:1])
        key = (method_name, selection, tuple(x.shape[1:]), x.dtype)
        out: list = []
        start, total = 0, len(requests)
        while start < total:
            if pass_batch is None:
                size = self.planner.batch_size(key, neurons, total - start)
                shape = size
            else:
                ceiling = self.planner.ceiling(key)
                size = shape = pass_batch if ceiling is None else min(pass_batch, ceiling)
            stop = min(start + size, total)
            failed = False
            try:
                with PeakMemory(self.device) as peak:
                    part = self._run(*_padded(x[start:stop], targets[start:stop], requests[start:stop], shape),
                                     method_name, selection, options)[:stop - start]
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                failed = True  # leave the except block first: its traceback holds the failed pass's tensors
            if failed:
                release_cached_memory(self.device)
                smaller = self.planner.out_of_memory(key, size)
                report_split(self.on_batch_split, BatchSplit(size=size, parts=(smaller, size - smaller)))
                continue
            self.planner.observe(key, size, peak.peak)
            out.extend(part)
            start = stop
        return out

    def _neurons_per_sample(self, x: torch.Tensor) -> int:
        shape = tuple(x.shape[1:])
        if shape not in self._neurons:
            with explaining(self.model), torch.no_grad(), instrument(self.model, name_sites=False, inputs=x) as recorder:
                self.model(x)
            self._neurons[shape] = _neurons_in(recorder)
        return self._neurons[shape]

    def _run(self, x, targets, requests, method_name, selection, options) -> list:
        method = METHODS.get(method_name)
        kwargs = {k: v for k, v in options.items() if k in method.options}
        if method.uses_normalisation:
            kwargs["normalisation"] = self.normalisation
        if method.uses_pathway:
            selection_options = {k: v for k, v in options.items() if k not in method.options}
            kwargs.update(sparsity=[r.sparsity for r in requests], selection=selection,
                          selection_options=selection_options)
        with _typed_model_failures(method_name, x), explaining(self.model):
            attribution: Attribution = method(self.model, x.detach().clone(), targets, **kwargs)
        return self._package(attribution, method_name, requests)

    def _package(self, attribution: Attribution, method: str, requests) -> list:
        probs = attribution.logits.double().softmax(dim=1)
        pathway_probs = None
        if attribution.pathway_logits is not None:
            pathway_probs = attribution.pathway_logits.double().softmax(dim=1).gather(
                1, attribution.targets[:, None]).squeeze(1).cpu().tolist()
        maps, scales = {}, {}
        for name in {r.reduce for r in requests}:
            reduced, scale = normalise(REDUCTIONS.get(name)(attribution.maps.detach()).float())
            maps[name], scales[name] = reduced.cpu().numpy(), scale.cpu().tolist()
        summaries = attribution.pathway.summaries() if attribution.pathway is not None else None
        probs = probs.cpu().numpy()
        targets = attribution.targets.cpu().tolist()
        zero_note = METHODS.get(method).zero_note
        out = []
        shape = len(requests)
        for b, request in enumerate(requests):
            notes = [] if summaries is None else pathway_notes(summaries[b])
            if scales[request.reduce][b] <= ZERO_MAP_EPS:
                notes.append(pathway_zero_note(summaries[b]) if summaries is not None else zero_note)
            out.append(Explanation(
                method=method,
                reduce=request.reduce,
                attribution=maps[request.reduce][b].astype(np.float32),
                attribution_scale=float(scales[request.reduce][b]),
                target=int(targets[b]),
                target_label=self.label(int(targets[b])),
                probabilities=probs[b],
                pathway_probability=None if pathway_probs is None else float(pathway_probs[b]),
                pathway=None if summaries is None else summaries[b],
                notes=notes,
                pass_batch=shape,
            ))
        return out

    def _check_instrumentation(self, x: torch.Tensor) -> None:
        """Once per explainer: an instrumented forward must reproduce the plain one exactly.

        Catches models that rely on an activation modifying its input in place
        without using its return value, which out-of-place sites cannot reproduce.
        """
        with torch.no_grad():
            plain = classifier_logits(self.model(x), x.shape[0])
            with instrument(self.model, out_of_place_transform, inputs=x) as recorder:
                traced = self.model(x)
            self._neurons.setdefault(tuple(x.shape[1:]), _neurons_in(recorder))
        # NaN in, NaN out is no sign of an in-place side effect
        if not torch.allclose(plain, traced, rtol=1e-5, atol=1e-5, equal_nan=True):
            raise InPlaceSideEffect(
                "instrumenting this model's activations changes its output; it probably relies on an "
                "in-place activation's side effect without using the activation's return value")
        self._checked = True


@contextlib.contextmanager
def _typed_model_failures(method: str, inputs: Optional[torch.Tensor] = None) -> Iterator[None]:
    """The model raising under the engine's passes (its checks included) is :class:`EngineFailure`, which names
    where (the activation call, or the input when it failed before any); request errors and running out of
    memory pass as they are."""
    forget_last_activation_call()
    try:
        yield
    except (ExplainError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - the model failed under the engine's passes: say where, typed
        raise EngineFailure(method, err, inputs) from err


def _neurons_in(recorder) -> int:
    """Neurons per sample the recorded pass met (0 for a model without activation sites)."""
    try:
        return recorder.layout.total
    except NoActivationSitesError:
        return 0


def _padded(x: torch.Tensor, targets: torch.Tensor, requests: list, shape: int) -> tuple:
    """The pass's inputs with zero images (target 0, the first request's options) appended up to ``shape``."""
    missing = shape - x.shape[0]
    if missing <= 0:
        return x, targets, requests
    return (torch.cat([x, x.new_zeros((missing, *x.shape[1:]))]),
            torch.cat([targets, targets.new_zeros(missing)]),
            list(requests) + [requests[0]] * missing)


def _per_sample(value, batch: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{what}: got {len(value)} values for a batch of {batch}")  # the caller's bug
        return list(value)
    return [value] * batch


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
