"""Inference preparation of a loaded model: exact in eval mode, every activation call site kept.

A served model runs in eval mode, where a BatchNorm is an affine map per
channel; folded into the convolution it directly follows, it costs nothing.
The activation after it stays exactly where it was: the BatchNorm module is
replaced in place (by an identity, or, for timm's ``BatchNormAct2d``, by a
module that keeps its ``drop`` and ``act`` children under the same names), so
the engine's activation sites (:mod:`handler.engine.sites`, named by module path
and call order) are the same before and after. The arithmetic is torch's own
(:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`).

TensorFlow's "same" padding of a strided convolution is asymmetric (one more
zero after than before), which ``conv2d`` cannot express, so timm's
``Conv2dSame`` copies its input into a padded tensor first: a fill and a copy
forward, a slice copied backward. Each such convolution is replaced by a
:class:`SamePaddedConv2d` that lets the convolution pad: the kernel gets one zero
tap in front where the padding is asymmetric, and the padding becomes symmetric
(:func:`fold_same_padding`). Each output sums the same products plus one zero:
EfficientNet-Lite0's logits are the same bits; gradients may differ in their
last bits (the backward sums in another order).

Pairs are found by a :mod:`torch.fx` symbolic trace (convolutions and
BatchNorms as leaves) of the largest subtrees that trace; a pair is folded only
when the BatchNorm's one input is the convolution's output, that output has no
other user, and each module is called once and owned once. What cannot be
proven is left alone. After preparing, the model is checked against the
unprepared one (logits to float tolerance, identical site layout) on a random
input; a model that fails the check is served unprepared, with a warning.

The memory format is the one the spec names, or by default (``"auto"``,
:func:`memory_format_for`) channels-last on the CPU for a model with 2-D
convolutions (oneDNN's fast path), contiguous elsewhere. The engine follows each
activation's memory layout (:attr:`handler.engine.sites.Site.channels_last`), so a
channels-last model costs it no strided passes.

Explanations run the prepared model by default (``explain_prepared``): on the
sample photos its maps agree with the trained model's to Pearson >= 0.99 with the
same predicted classes (``benchmarks/speed/preparation.py`` measures it, and
``tests/models/test_preparation.py`` holds it). The provenance record names the
preparation, since it changes an explanation's bits (as a thread count or a pass
shape does).

Predictions run the same prepared eager model, except a lone image on the CPU,
which a frozen TorchScript copy (:func:`torch.jit.optimize_for_inference`,
:class:`FrozenPredictor`) predicts faster; explanations always run the eager model,
whose activation calls the engine intercepts.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
PREDICTORS = ("auto", "eager", "frozen")

#: Relative tolerance of the load-time check: max |prepared - unprepared| over the logits' range.
CHECK_TOLERANCE = 1e-3


class PreparationError(ValueError):
    """The spec's ``prepare`` entry is malformed; the message names the field."""


@dataclass(frozen=True)
class Preparation:
    """A model spec's ``prepare`` entry (``true``/absent: these defaults; ``false``: :data:`UNPREPARED`).

    ``fold_batchnorm``: fold each BatchNorm into the convolution it directly follows.
    ``memory_format``: ``"auto"`` (:func:`memory_format_for`), ``"channels_last"`` or
    ``"contiguous"`` (the explained model and the predictions' copy alike).
    ``predict``: what serves ``/predictions``: ``"eager"`` (the prepared model),
    ``"frozen"`` (a frozen TorchScript copy, checked against the eager model at load, for every batch) or
    ``"auto"``: on the CPU the frozen copy for a batch of one and the eager model for larger batches, on a GPU
    the eager model. Chosen by measurement (benchmarks/speed/results/predict-cpu.md): at a batch of one the
    frozen copy is the fastest (the eager model pays for its Python module calls), at a batch of four the
    eager channels-last model is, by far. The eager model is the one explanations run, so only the frozen
    copy costs memory. On a GPU, not measured.
    ``fold_padding``: TF-"same" zero padding (timm's ``Conv2dSame``) done by the convolution itself instead
    of a padded copy of its input (:func:`fold_same_padding`): ``true``, ``false`` or ``"auto"`` (on the CPU,
    where it was measured; off on a GPU, whose depthwise kernels are tuned for odd sizes and where it was
    not measured).
    ``explain_prepared``: explanations run the prepared model too (the default). An explanation's neuron
    threshold is sensitive to float rounding: folding and the memory format move a few near-tie neurons across
    it, as a change of thread count or pass shape does; on the sample photos the maps agree with the trained
    model's to Pearson >= 0.99 (``benchmarks/speed/results/preparation-cpu.md``). ``false`` explains the model
    as trained (predictions still use the prepared copy).
    """

    fold_batchnorm: bool = True
    memory_format: str = "auto"
    predict: str = "auto"
    explain_prepared: bool = True
    fold_padding: Union[bool, str] = "auto"

    @classmethod
    def from_value(cls, value) -> "Preparation":
        if value is None or value is True:
            return cls()
        if value is False:
            return UNPREPARED
        if not isinstance(value, dict):
            raise PreparationError(f"prepare must be true, false or an object, not {value!r}")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise PreparationError(f"prepare has unknown fields: {', '.join(sorted(unknown))}")
        prep = cls(**value)
        for flag in ("fold_batchnorm", "explain_prepared"):
            if not isinstance(getattr(prep, flag), bool):
                raise PreparationError(f"prepare.{flag} must be true or false, not {getattr(prep, flag)!r}")
        if not isinstance(prep.fold_padding, bool) and prep.fold_padding != "auto":
            raise PreparationError(f"prepare.fold_padding must be true, false or \"auto\", not {prep.fold_padding!r}")
        if prep.memory_format not in MEMORY_FORMATS:
            raise PreparationError(f"prepare.memory_format must be one of {', '.join(MEMORY_FORMATS)}, "
                                   f"not {prep.memory_format!r}")
        if prep.predict not in PREDICTORS:
            raise PreparationError(f"prepare.predict must be one of {', '.join(PREDICTORS)}, not {prep.predict!r}")
        return prep

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_memory_format(self, model: nn.Module, device: torch.device) -> str:
        """The memory format the prepared model (and the predictions' frozen copy) gets on ``device``."""
        if self.memory_format == "auto":
            return memory_format_for(model, device)
        return self.memory_format

    @property
    def changes_model(self) -> bool:
        """Whether preparing may change the model (``auto`` may choose channels-last)."""
        return self.fold_batchnorm or self.fold_padding is not False or self.memory_format != "contiguous"

    def resolved_fold_padding(self, device: torch.device) -> bool:
        """Whether the padding fold applies on ``device`` (``"auto"``: on the CPU only)."""
        if self.fold_padding == "auto":
            return torch.device(device).type == "cpu"
        return bool(self.fold_padding)


#: No preparation: the model as built and loaded.
UNPREPARED = Preparation(fold_batchnorm=False, memory_format="contiguous", predict="eager", explain_prepared=False,
                         fold_padding=False)


@dataclass
class PreparationReport:
    """What preparation did to one model (logged at load, kept on the :class:`~handler.models.LoadedModel`)."""

    folded: list = field(default_factory=list)  # (convolution path, BatchNorm path)
    padded: list = field(default_factory=list)  # paths of the convolutions that now pad themselves
    memory_format: str = "contiguous"
    reverted: Optional[str] = None  # why the prepared model was discarded, if it was

    @property
    def changed(self) -> bool:
        return bool(self.folded) or bool(self.padded) or self.memory_format != "contiguous"

    def summary(self) -> str:
        if self.reverted:
            return f"unprepared ({self.reverted})"
        padded = f", {len(self.padded)} same padding(s) folded" if self.padded else ""
        return f"{len(self.folded)} BatchNorm(s) folded{padded}, {self.memory_format}"


# ---------------------------------------------------------------------------
# Folding BatchNorm into the convolution before it
# ---------------------------------------------------------------------------


def _timm_conv2d_same() -> Optional[type]:
    """timm's ``Conv2dSame`` (TF-"same" padding: pads a copy of its input, then ``F.conv2d`` with its own weight
    and bias), or None without timm."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return Conv2dSame


def _foldable_convolutions() -> tuple:
    same = _timm_conv2d_same()
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d) + ((same,) if same is not None else ())


def _batchnorm_act() -> Optional[type]:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover
        return None
    return BatchNormAct2d


_BATCHNORMS = {nn.BatchNorm1d: nn.Conv1d, nn.BatchNorm2d: nn.Conv2d, nn.BatchNorm3d: nn.Conv3d}


class FoldedBatchNormAct(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation is folded into the convolution
    before it: its ``drop`` and ``act`` children, under the same names, called in the same order (so the
    activation site keeps its name and place)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.drop = original.drop
        self.act = original.act

    def forward(self, x):
        return self.act(self.drop(x))


def _folded_replacement(bn: nn.Module) -> Optional[nn.Module]:
    """The module that takes ``bn``'s place once folded, or None when ``bn`` is not one we can prove."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return None
    if bn.training or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return None
    if bn._forward_hooks or bn._forward_pre_hooks:
        return None
    if type(bn) in _BATCHNORMS:
        return nn.Identity()
    act_kind = _batchnorm_act()
    if act_kind is not None and type(bn) is act_kind:
        return FoldedBatchNormAct(bn)
    return None


def _runs_as_its_class(module: nn.Module) -> bool:
    """No forward hooks and no parametrization: its forward is its class's, so a replacement computing the same
    is safe."""
    return not (module._forward_hooks or module._forward_pre_hooks
                or torch.nn.utils.parametrize.is_parametrized(module))


def _owner_counts(model: nn.Module) -> Counter:
    """How many places of ``model`` hold each module (by ``id``): a module held twice cannot be replaced in one."""
    return Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def _conv_matches(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(conv, _foldable_convolutions()) or conv.training:
        return False
    if type(conv) not in _foldable_convolutions():  # a subclass may use its weight in its own way
        return False
    if not _runs_as_its_class(conv):
        return False
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
    conv_dims = next(d for kind, d in dims.items() if isinstance(conv, kind))
    bn_dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(bn), 2)
    return conv_dims == bn_dims and conv.out_channels == bn.num_features


class _PairTracer(fx.Tracer):
    """Convolutions and BatchNorms (of any class) stay single calls in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def _pairs_in(module: nn.Module, prefix: str) -> list:
    """``(conv path, bn path)`` pairs inside ``module`` (paths relative to the root), by fx trace where it
    works, else in its children."""
    try:
        graph = _PairTracer().trace(module)
    except Exception:  # noqa: BLE001 - untraceable Python: look one level down
        pairs = []
        for name, child in module.named_children():
            pairs += _pairs_in(child, f"{prefix}{name}.")
        return pairs
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[node.target] != 1 or calls[source.target] != 1:
            continue
        pairs.append((prefix + source.target, prefix + node.target))
    return pairs


def fold_batchnorms(model: nn.Module) -> list:
    """Fold, in place, each eval-mode BatchNorm into the convolution it directly follows; returns the
    ``(conv path, bn path)`` pairs folded. The BatchNorm's place is kept by a module without parameters
    (see :func:`_folded_replacement`), so the forward calls the same activations in the same order."""
    owners = _owner_counts(model)
    folded = []
    for conv_path, bn_path in _pairs_in(model, ""):
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        if owners[id(conv)] != 1 or owners[id(bn)] != 1:
            continue
        replacement = _folded_replacement(bn)
        if replacement is None or not _conv_matches(conv, bn):
            continue
        fused = _fused_in_double(conv, bn)
        _set_submodule(model, conv_path, fused)
        _set_submodule(model, bn_path, replacement)
        folded.append((conv_path, bn_path))
    return folded


def _fused_in_double(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """torch's fold, computed in float64 and stored in the convolution's dtype: the folded weights are the
    exact ones rounded once, so the only difference left is the convolution's own summation order."""
    dtype = conv.weight.dtype
    fused = fuse_conv_bn_eval(copy.deepcopy(conv).double(), copy.deepcopy(bn).double()).to(dtype)
    return fused.requires_grad_(conv.weight.requires_grad)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


# ---------------------------------------------------------------------------
# TF-"same" padding done by the convolution
# ---------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple:
    """``(before, after)``: TensorFlow's "same" zero padding of one spatial dimension, the total as timm's own
    ``get_same_padding`` gives it (the output has ``ceil(size / stride)`` positions) and the odd zero after."""
    from timm.layers import get_same_padding

    total = get_same_padding(size, kernel, stride, dilation)
    return total // 2, total - total // 2


class SamePaddedConv2d(nn.Conv2d):
    """A 2-D convolution with TF-"same" padding that pads inside the convolution, not in a copy of its input.

    Where a dimension's padding is symmetric the convolution pads it as it is. Where it has one zero more
    after than before (a strided convolution of an even size), a zero tap in front of the kernel and one
    more zero before make it symmetric: output ``i`` then reads the same inputs with the same weights plus
    one zero product, as the padded input gave it. Dilated kernels with asymmetric padding keep the explicit
    pad (a zero tap there would shift by the dilation). The weight is the module's own, so a change to it
    (the evaluation suite re-initialises weights) is seen at the next call.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "SamePaddedConv2d":
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                     conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        module.weight, module.bias = conv.weight, conv.bias
        return module.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # int(): under torch.jit.trace a size is a tensor, and the padding must be Python ints
        pads = [same_padding(int(n), k, s, d) for n, k, s, d in
                zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)]
        shifts = [after - before for before, after in pads]
        if any(shifts) and self.dilation != (1, 1):
            (top, bottom), (left, right) = pads
            return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0,
                            self.dilation, self.groups)
        weight = F.pad(self.weight, (shifts[1], 0, shifts[0], 0)) if any(shifts) else self.weight
        return F.conv2d(x, weight, self.bias, self.stride, (pads[0][1], pads[1][1]), self.dilation, self.groups)


def fold_same_padding(model: nn.Module) -> list:
    """Replace, in place, each of timm's ``Conv2dSame`` (its exact class, owned once, without hooks) by a
    :class:`SamePaddedConv2d` with the same weight and bias; returns the paths replaced."""
    same = _timm_conv2d_same()
    if same is None:  # pragma: no cover - timm is a dependency
        return []
    owners = _owner_counts(model)
    replaced = []
    for path, conv in list(model.named_modules()):
        if type(conv) is not same or owners[id(conv)] != 1 or not _runs_as_its_class(conv):
            continue
        if conv.padding_mode != "zeros":
            continue
        _set_submodule(model, path, SamePaddedConv2d.from_conv(conv))
        replaced.append(path)
    return replaced


# ---------------------------------------------------------------------------
# Memory format
# ---------------------------------------------------------------------------


def _has_convolution(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def memory_format_for(model: nn.Module, device: torch.device) -> str:
    """``"auto"``'s choice: channels-last on the CPU for a model with 2-D convolutions (oneDNN's fast path:
    ``benchmarks/speed/predict.py`` and the engine suite measure it), contiguous otherwise. On a GPU,
    contiguous: channels-last pays there with reduced precision, which serving does not use (not measured).
    Decided by rule rather than timed at load: a worker on a busy machine measures noise, and one spec on one
    kind of device should compute alike everywhere."""
    return "channels_last" if device.type == "cpu" and _has_convolution(model) else "contiguous"


def set_memory_format(model: nn.Module, name: str) -> None:
    model.to(memory_format=torch.channels_last if name == "channels_last" else torch.contiguous_format)


# ---------------------------------------------------------------------------
# The whole preparation, checked
# ---------------------------------------------------------------------------


def example_input(size: int, device: Union[str, torch.device], batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def prepare_model(model: nn.Module, settings: Preparation, x: torch.Tensor) -> tuple:
    """``(model, report)``: ``model`` (eval mode, on its device) prepared as ``settings`` say, checked on ``x``
    against the unprepared model: logits within :data:`CHECK_TOLERANCE` of their range and the same
    activation-site layout. A model that fails the check comes back unprepared (``report.reverted``)."""
    report = PreparationReport()
    if not settings.changes_model:
        return model, report
    from ..engine.sites import trace_sites  # the one place that instruments a model

    try:
        with torch.no_grad():
            reference = model(x).float()
        layout = trace_sites(model, x)  # a model the engine cannot instrument is served as it is: its
        prepared = copy.deepcopy(model)  # explanations then say why, per image
        if settings.fold_batchnorm:
            report.folded = fold_batchnorms(prepared)
        if settings.resolved_fold_padding(x.device):
            report.padded = fold_same_padding(prepared)
        fmt = settings.resolved_memory_format(prepared, x.device)
        set_memory_format(prepared, fmt)
        report.memory_format = fmt
        with torch.no_grad():
            logits = prepared(x).float()
        error = (logits - reference).abs().max().item() / max(reference.abs().max().item(), 1e-6)
        if error > CHECK_TOLERANCE:
            raise AssertionError(f"prepared logits differ by {error:.2g} of their range")
        if trace_sites(prepared, x) != layout:
            raise AssertionError("the prepared model's activation sites differ")
    except Exception as err:  # noqa: BLE001 - an unprovable preparation is not served
        reason = str(err).strip() or type(err).__name__  # a bare ``assert`` in the model has no message
        logger.warning("model preparation discarded, serving the model unprepared: %s", reason)
        return model, PreparationReport(reverted=reason)
    return prepared, report


class FrozenPredictor(nn.Module):
    """A frozen TorchScript copy of a prepared model, for predictions only (its activation calls cannot be
    intercepted, so explanations never use it), traced in ``memory_format`` (channels-last: the input is laid
    out so too). Inputs of another shape than the one it was traced with, and batches above ``largest_batch``
    (None: no limit), go to the eager model."""

    def __init__(self, eager: nn.Module, x: torch.Tensor, memory_format: str = "contiguous",
                 largest_batch: Optional[int] = None):
        super().__init__()
        self.shape = tuple(x.shape[1:])
        self.largest_batch = largest_batch
        self.channels_last = memory_format == "channels_last"
        copied = copy.deepcopy(eager)
        set_memory_format(copied, memory_format)
        with torch.no_grad(), warnings.catch_warnings():
            # shape-dependent Python (a SamePaddedConv2d's padding) is fixed at the traced shape, which is the only
            # shape this copy is given (forward sends any other to the eager model)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(copied, self._layout(x), check_trace=False)
            self.frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        self.eager = [eager]  # not a submodule: its parameters are not this module's

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape or (self.largest_batch is not None and x.shape[0] > self.largest_batch):
            return self.eager[0](x)
        return self.frozen(self._layout(x))


def frozen_predictor(eager: nn.Module, x: torch.Tensor, memory_format: str = "contiguous",
                     largest_batch: Optional[int] = None) -> Optional[FrozenPredictor]:
    """A :class:`FrozenPredictor`, checked against the eager model at batch 1 and 3; None when it cannot be
    built or does not agree (predictions then use the eager model)."""
    try:
        predictor = FrozenPredictor(eager, x[:1], memory_format, largest_batch)
        with torch.no_grad():
            for batch in (1, 3):
                probe = x[:1].expand(batch, *x.shape[1:]).clone() + 0.1 * torch.arange(
                    batch, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
                expected, got = eager(probe).float(), predictor(probe).float()
                error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-6)
                if got.shape != expected.shape or error > CHECK_TOLERANCE:
                    raise AssertionError(f"frozen predictions differ by {error:.2g} of the logits' range at batch "
                                         f"{batch}")
    except Exception as err:  # noqa: BLE001 - predictions fall back to the eager model
        logger.warning("no frozen predictor, predictions use the eager model: %s", err)
        return None
    return predictor
