"""Activation call sites: the one place in the project that instruments a model.

A *site* is one call of an activation function during a forward pass, and a
*neuron* is one element of that call's output. Sites are numbered by call order,
never keyed by module: a module called three times (torchvision's
``Bottleneck.relu``) is three sites, and a functional ``F.relu`` inside a
``forward`` (torchvision's GoogLeNet) is a site like any other.

Calls are intercepted with a :class:`~torch.overrides.TorchFunctionMode`, which
sees module activations (``nn.ReLU`` calls ``F.relu``), functional ones, tensor
methods (``x.relu_()``) and in-place variants alike. Each call is handed to a
transform as a :class:`SiteCall`; the transform runs it (as the model asked:
in place or not) and returns what the rest of the network sees. Nothing is
patched on the model and no hook is registered: the mode lives exactly as long
as the ``with`` block, and sites are named by looking up the call stack.

A call's leading dimension need not be the batch. Before instrumenting a model
on an input shape for the first time, :func:`survey_sites` runs it (no gradients)
on one sample and on two copies of it and compares each call's leading
dimension: ``B`` (a *per-sample* call), ``k·B`` (a *batch-folded* call: patches
folded into the batch, MobileViT), or the same at both sizes (a *batch-shared*
call: a table computed from parameters, Swin-V2's position-bias MLP). Transforms
see folded calls regrouped as ``[B, k, ...]`` (neuron = sample, fold, element) and
never see shared calls, which run as the model asked and are not selectable
(docs/methods.md says why). The survey also records which outputs the model
overwrites in place after the activation returned (EfficientNetV2's
``result += input``), so a transform can give those, and only those, a copy.

One layer's output can also be kept from inside a forward (Grad-CAM's layer):
an activation site's through a transform (:func:`capture_site_output`), any
other module's through a forward hook that lives as long as its ``with`` block
(:func:`capture_module_output`).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModel


class SiteMismatchError(UnsupportedModel, RuntimeError):
    """A pass met different activation sites than the pass its pathway came from."""


class NoActivationSitesError(UnsupportedModel):
    """The model has no activation call this module can instrument."""


class _LastCall(threading.local):
    where: Optional[str] = None


_LAST_CALL = _LastCall()


def last_activation_call() -> Optional[str]:
    """The last activation call this thread's instrumentation handed out (``"name (op)"``), for error messages."""
    return _LAST_CALL.where


def forget_last_activation_call() -> None:
    """Start a new block of passes: :func:`last_activation_call` then names only calls made from here on (a
    failure before any is not blamed on a site of an earlier pass)."""
    _LAST_CALL.where = None


#: How a call's leading dimension relates to the batch (see :func:`survey_sites`).
PER_SAMPLE, BATCH_FOLDED, BATCH_SHARED = "per_sample", "batch_folded", "batch_shared"


# ---------------------------------------------------------------------------
# Which calls are activations, and whether each call asked to work in place.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Activation:
    kind: str
    inplace_position: Optional[int]  # where ``inplace`` sits positionally; None: no such argument
    always_inplace: bool = False  # relu_, hardtanh_, ...

    def kind_of(self, args, kwargs) -> str:
        if self.kind == "hardtanh":
            return "relu6" if self.clamp_bounds(args, kwargs) == (0.0, 6.0) else "hardtanh"
        return self.kind

    def clamp_bounds(self, args, kwargs) -> Optional[tuple]:
        """``(min, max)`` of a call that clamps its input (ReLU6, Hardtanh); None for other activations."""
        if self.kind == "relu6":
            return 0.0, 6.0
        if self.kind == "hardtanh":
            return float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0))
        return None

    def inplace(self, args, kwargs) -> bool:
        if self.always_inplace:
            return True
        if self.inplace_position is None:
            return False
        return bool(_arg(args, kwargs, self.inplace_position, "inplace", False))


def _arg(args, kwargs, position, name, default):
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def _build_registry() -> dict:
    A = _Activation
    entries = [
        (F.relu, A("relu", 1)), (torch.relu, A("relu", None)), (torch.Tensor.relu, A("relu", None)),
        (torch.relu_, A("relu", None, True)), (torch.Tensor.relu_, A("relu", None, True)),
        (F.relu6, A("relu6", 1)), (torch._C._nn.relu6, A("relu6", None)),
        (F.hardtanh, A("hardtanh", 3)), (torch._C._nn.hardtanh, A("hardtanh", None)),
        (F.hardtanh_, A("hardtanh", None, True)),
        (F.leaky_relu, A("leaky_relu", 2)), (F.leaky_relu_, A("leaky_relu", None, True)),
        (F.prelu, A("prelu", None)), (torch.prelu, A("prelu", None)),
        (F.silu, A("silu", 1)), (F.gelu, A("gelu", None)), (F.hardswish, A("hardswish", 1)),
        (F.mish, A("mish", 1)), (F.elu, A("elu", 2)), (F.elu_, A("elu", None, True)),
        (F.selu, A("selu", 1)), (F.celu, A("celu", 2)),
    ]
    registry: dict = {}
    for func, activation in entries:
        registry.setdefault(func, activation)
    return registry


_ACTIVATIONS = _build_registry()

#: Activation kinds whose output is piecewise linear in their input: the
#: pathway's local-linearity guarantee holds only when every site is one of these.
PIECEWISE_LINEAR_KINDS = frozenset({"relu", "relu6", "hardtanh", "leaky_relu", "prelu"})

# Modules whose forward *is* an activation: a site inside one is named after the
# module itself rather than "<parent>:<kind>".
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU,
    nn.Hardswish, nn.Mish, nn.ELU, nn.SELU, nn.CELU,
)


# ---------------------------------------------------------------------------
# Layout: where each site's neurons live on the flat [B, N] neuron axis.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One activation call: its name, kind and where its neurons sit on the flat axis."""

    index: int
    name: str
    kind: str
    piecewise_linear: bool
    shape: tuple  # per sample (no batch dimension; a folded call's fold first); a shared call's whole shape
    offset: int
    batch: str = PER_SAMPLE  # PER_SAMPLE, BATCH_FOLDED or BATCH_SHARED
    overwritten: bool = False  # the model modifies the output in place after the activation returned
    #: The activation's ``[B, C, H, W]`` output is laid out channels-last (NHWC), so the site's neurons sit on
    #: the flat axis in that order and :meth:`view` hands out NHWC-strided views: every elementwise pass of the
    #: engine over the activation (scores, masks) walks memory in order. Not part of a site's identity: a model
    #: prepared in another memory format has the same sites.
    channels_last: bool = field(default=False, compare=False)

    @property
    def selectable(self) -> bool:
        """Whether the site's neurons are on the ``[B, N]`` axis (a batch-shared table's are not)."""
        return self.batch != BATCH_SHARED

    @property
    def numel(self) -> int:
        """Neurons per sample on the flat axis (0 for a batch-shared site)."""
        if not self.selectable:
            return 0
        return self.table_numel

    @property
    def table_numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This site's slice of a ``[B, N]`` tensor, shaped like the activation (per sample) and laid out like it
        (a channels-last site's slice holds its neurons in NHWC order: the view is ``[B, C, H, W]`` with NHWC
        strides)."""
        part = flat[:, self.offset : self.offset + self.numel]
        if self.channels_last:
            c, h, w = self.shape
            return part.view(flat.shape[0], h, w, c).permute(0, 3, 1, 2)
        return part.view(flat.shape[0], *self.shape)

    def flat(self, activation: torch.Tensor) -> torch.Tensor:
        """``[B, numel]``: an activation's neurons in this site's order on the flat axis (what :meth:`view` of
        the result gives back as ``activation``); a copy only where the activation is laid out otherwise."""
        if self.channels_last:
            return activation.permute(0, 2, 3, 1).reshape(activation.shape[0], self.numel)
        return activation.reshape(activation.shape[0], self.numel)


@dataclass(frozen=True)
class SiteLayout:
    """All sites of one forward pass, in call order.

    ``sites`` holds every call; iterating the layout (and ``len``) covers the
    selectable ones, whose neurons are on the ``[B, N]`` axis. Batch-shared
    sites do not depend on the input, so they neither count for the local
    linearity around it nor hold neurons of a pathway.
    """

    sites: tuple

    @functools.cached_property
    def selectable(self) -> tuple:
        return tuple(s for s in self.sites if s.selectable)

    @functools.cached_property
    def shared(self) -> tuple:
        return tuple(s for s in self.sites if not s.selectable)

    @property
    def total(self) -> int:
        last = self.sites[-1]
        return last.offset + last.numel

    @property
    def locally_linear(self) -> bool:
        return all(s.piecewise_linear for s in self.selectable)

    @property
    def nonlinear_kinds(self) -> list:
        return sorted({s.kind for s in self.selectable if not s.piecewise_linear})

    def __len__(self) -> int:
        return len(self.selectable)

    def __iter__(self):
        return iter(self.selectable)


class SiteCall:
    """One intercepted activation call, handed to a transform to run (and alter) as it sees fit.

    Every registered activation is elementwise with ``f(0) = 0``, so zeroing an
    input neuron zeroes the output neuron: a transform may mask either side.

    A batch-folded call (leading dimension ``k·B``) is shown regrouped per
    sample: :attr:`input`, :meth:`run` and :meth:`run_on` work on ``[B, k, ...]``
    tensors, and the interceptor hands the network the original shape back.
    """

    __slots__ = ("site", "input", "inplace", "_func", "_args", "_kwargs", "_regroup", "_input_is_view", "_clamp")

    def __init__(self, site: Site, func, args, kwargs, inplace: bool, regroup: Optional[tuple] = None,
                 clamp: Optional[tuple] = None):
        self.site = site
        self.inplace = inplace
        self._func, self._args, self._kwargs = func, args, kwargs
        self._regroup = regroup  # (B, *per-sample shape) of a folded call
        # (min, max) of an in-place clamp (ReLU6, Hardtanh) whose output the model never modifies later: it may
        # run as :class:`_InPlaceClamp` (see :meth:`run`)
        self._clamp = clamp if inplace else None
        self._input_is_view = True
        if regroup is None:
            self.input: torch.Tensor = args[0]
        else:
            self.input = self._per_sample(args[0])
            self._input_is_view = self.input._base is not None or self.input is args[0]

    def _per_sample(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            return tensor.view(self._regroup)
        except RuntimeError:  # not viewable (strided): a copy
            return tensor.reshape(self._regroup)

    @property
    def may_modify_input(self) -> bool:
        """The model asked for an in-place call, so overwriting the input is what it expects anyway."""
        original = self._args[0]
        return self.inplace and self._input_is_view and not (original.is_leaf and original.requires_grad)

    def run(self, *, out_of_place: bool = False) -> torch.Tensor:
        """The activation as the model called it (in place if it asked for that, unless ``out_of_place``)."""
        if self.inplace and (out_of_place or not self.may_modify_input):
            out = self._func(self._args[0].clone(), *self._args[1:], **self._kwargs)
        elif self._clamp is not None and self._args[0].requires_grad and torch.is_grad_enabled():
            out = _InPlaceClamp.apply(self._args[0], *self._clamp)
        else:
            out = self._func(*self._args, **self._kwargs)
        return out if self._regroup is None else self._per_sample(out)

    def run_on(self, tensor: torch.Tensor) -> torch.Tensor:
        """The same activation (same arguments) applied out of place to ``tensor`` instead of the call's input.

        For transforms that put something of their own between the network and
        the activation (guided backprop's gradient rectifier).
        """
        if self.inplace:
            tensor = tensor.clone()
        if self._regroup is None:
            return self._func(tensor, *self._args[1:], **self._kwargs)
        out = self._func(tensor.reshape(self._args[0].shape), *self._args[1:], **self._kwargs)
        return self._per_sample(out)


class _InPlaceClamp(torch.autograd.Function):
    """An in-place clamp to ``[min, max]`` (ReLU6, Hardtanh) recorded by autograd without a copy of its input.

    torch's own ``hardtanh_`` keeps a copy of its input for the backward (a full
    pass and the activation's size in memory at every site, per pass); the
    gradient needs only which outputs lie strictly inside ``(min, max)``, and
    for a clamp that is the same set as for its input. So this keeps the output
    and calls torch's own ``hardtanh_backward`` with it: the same kernel on a
    tensor whose comparisons come out the same, hence the same gradient bits.
    Only for outputs the model never modifies later (:attr:`Site.overwritten`
    is false): a later in-place change would invalidate the kept output.
    """

    @staticmethod
    def forward(ctx, x, low, high):
        torch._C._nn.hardtanh_(x, low, high)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.bounds = (low, high)
        return x

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, out, *ctx.bounds), None, None


#: A site transform runs one call (``call.run()``) and returns the tensor the rest of the network continues with.
SiteTransform = Callable[[SiteCall], torch.Tensor]


class _SiteInterceptor(TorchFunctionMode):
    def __init__(self, transform: SiteTransform, names: Optional["_SiteNamer"], expected: Optional[SiteLayout],
                 batch: Optional[int] = None, survey: Optional[tuple] = None):
        super().__init__()
        self.transform = transform
        self.names = names
        self.expected = expected
        self.batch = batch  # None: every call's leading dimension is taken as the batch
        self.survey = survey
        self._outputs_known = survey is not None or expected is not None
        self.sites: list = []
        self._offset = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        activation = _ACTIVATIONS.get(func)
        if activation is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 1:
            return func(*args, **kwargs)
        kind = activation.kind_of(args, kwargs)
        index = len(self.sites)
        batch_kind, fold, overwritten = self._batch_kind(index, func, kind, args[0])
        full = tuple(args[0].shape)
        if batch_kind == BATCH_SHARED:
            shape = full
        elif batch_kind == BATCH_FOLDED:
            shape = (fold, *full[1:])
        else:
            shape = full[1:]
        if self.expected is not None:
            if index >= len(self.expected.sites):
                raise SiteMismatchError(
                    f"this pass met more activation sites than the pathway has ({len(self.expected.sites)})")
            want = self.expected.sites[index]
            if want.shape != shape or want.batch != batch_kind:
                raise SiteMismatchError(
                    f"activation site {index} ({want.name}) has shape {shape} ({batch_kind}) in this pass "
                    f"but {want.shape} ({want.batch}) in the pathway")
            site = want
        else:
            name = self.names.name_for(kind) if self.names is not None else f"site{index}"
            site = Site(index, name, kind, kind in PIECEWISE_LINEAR_KINDS, shape, self._offset, batch_kind,
                        overwritten, batch_kind == PER_SAMPLE and _is_channels_last(args[0]))
        self._offset += site.numel
        self.sites.append(site)
        _LAST_CALL.where = f"activation site {site.name!r} ({_op_name(func)}, {batch_kind}, shape {list(full)})"
        if batch_kind == BATCH_SHARED:  # not selectable: runs as the model asked, no transform sees it
            return func(*args, **kwargs)
        # Whether the model overwrites the output later is known only from a survey or an expected layout.
        clamp = activation.clamp_bounds(args, kwargs) if self._outputs_known and not site.overwritten else None
        if batch_kind == BATCH_FOLDED:
            call = SiteCall(site, func, args, kwargs, activation.inplace(args, kwargs), (self.batch, *shape), clamp)
            return self.transform(call).reshape(full)
        return self.transform(SiteCall(site, func, args, kwargs, activation.inplace(args, kwargs), clamp=clamp))

    def _batch_kind(self, index: int, func, kind: str, tensor: torch.Tensor) -> tuple:
        """``(batch kind, fold, overwritten)`` of call ``index``, checked against this pass's batch."""
        if self.expected is not None and index < len(self.expected.sites):
            want = self.expected.sites[index]
            survey = (want.batch, want.shape[0] if want.batch == BATCH_FOLDED else 1, want.overwritten)
        elif self.survey is not None:
            if index >= len(self.survey):
                raise UnsupportedModel(
                    f"activation call {index} ({_op_name(func)}) was not met when the model was surveyed: "
                    "its activation calls depend on the input, which pathways cannot follow")
            survey = self.survey[index]
        else:
            return PER_SAMPLE, 1, False
        batch_kind, fold, _ = survey
        lead = tensor.shape[0]
        if self.batch is not None and batch_kind != BATCH_SHARED and lead != fold * self.batch:
            raise UnsupportedModel(
                f"activation call {index} ({_op_name(func)}, {kind}) has leading dimension {lead} for a batch of "
                f"{self.batch}; the survey expected {fold} x batch")
        return survey

    def layout(self) -> SiteLayout:
        if not self.sites:
            raise NoActivationSitesError(
                "the model made no activation call that can be instrumented "
                "(ReLU, ReLU6, Hardtanh, LeakyReLU, PReLU, SiLU, GELU, Hardswish, Mish, ELU, SELU, CELU); "
                "TorchScript modules are opaque to instrumentation")
        if self.expected is not None and len(self.sites) != len(self.expected.sites):
            raise SiteMismatchError(
                f"this pass met {len(self.sites)} activation sites, the pathway has {len(self.expected.sites)}")
        layout = SiteLayout(tuple(self.sites))
        if not layout.selectable:
            raise NoActivationSitesError(
                "every activation call of the model works on a table shared by the whole batch (computed from "
                "parameters, not from the input): there are no neurons of the input to select")
        return layout


def _is_channels_last(tensor: torch.Tensor) -> bool:
    """A ``[B, C, H, W]`` tensor laid out NHWC and not also NCHW (with ``C = 1`` or ``H = W = 1`` both hold)."""
    return (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last))


def alias(tensor: torch.Tensor) -> torch.Tensor:
    """A view of ``tensor`` with exactly its strides: what an identity :class:`torch.autograd.Function` returns.

    ``view_as`` recomputes the strides, and for a batch of one gives a channels-last activation a batch
    stride (``C``) that no longer reads as channels-last; torch's padding then lays its output out NCHW, so the
    convolution after it copies its input back to channels-last, in the forward and again in the backward.
    """
    return tensor.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset())


def _op_name(func) -> str:
    return getattr(func, "__name__", str(func))


class _SiteNamer:
    """Gives each site a readable name: the path of the innermost module of ``model`` whose code is running.

    Found by walking the Python call stack from the intercepted call up to the first frame whose
    ``self`` is a submodule of ``model`` (only at activation calls, a few per block), instead of hooks
    on every module that would run on every module call of every pass.
    """

    def __init__(self, model: nn.Module):
        self.paths = {id(module): (path or "<model>", module) for path, module in model.named_modules()}
        self.calls: dict = {}

    def _innermost(self):
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                entry = self.paths.get(id(frame.f_locals.get("self")))
                if entry is not None:
                    return entry
            frame = frame.f_back
        return "<model>", None

    def name_for(self, kind: str) -> str:
        path, module = self._innermost()
        base = path if isinstance(module, _ACTIVATION_MODULES) else f"{path}:{kind}"
        count = self.calls.get(base, 0) + 1
        self.calls[base] = count
        return base if count == 1 else f"{base}#{count}"


class SiteRecorder:
    """Handle returned by :func:`instrument`; its :attr:`layout` is ready after the forward."""

    def __init__(self, interceptor: _SiteInterceptor):
        self._interceptor = interceptor

    @property
    def layout(self) -> SiteLayout:
        return self._interceptor.layout()


def identity_transform(call: SiteCall) -> torch.Tensor:
    return call.run()


def out_of_place_transform(call: SiteCall) -> torch.Tensor:
    """Leaves every activation's input untouched: a model that ignores an in-place call's return value
    and relies on its side effect behaves differently under this transform, which is how such models are
    detected (the transforms that select and follow pathways hand the network their return value)."""
    return call.run(out_of_place=True)


@contextlib.contextmanager
def instrument(
    model: nn.Module,
    transform: SiteTransform = identity_transform,
    *,
    expected: Optional[SiteLayout] = None,
    name_sites: bool = True,
    inputs: Optional[torch.Tensor] = None,
) -> Iterator[SiteRecorder]:
    """Run forwards of ``model`` inside this block with every activation call routed through ``transform``.

    ``inputs``: the batch the block will forward. With it, every call is
    classified (per-sample, batch-folded, batch-shared: :func:`survey_sites`,
    run once per model and input shape, before the block); without it, every
    call's leading dimension is taken as the batch.
    With ``expected``, each call must match that layout (same count, order,
    shapes and kinds) or :class:`SiteMismatchError` is raised: a pathway is never
    applied to a different set of sites. The model is left exactly as it was,
    also when the block raises.
    """
    names = _SiteNamer(model) if (name_sites and expected is None) else None
    survey = None
    if inputs is not None and expected is None:
        survey = survey_sites(model, inputs)
    batch = None if inputs is None else int(inputs.shape[0])
    interceptor = _SiteInterceptor(transform, names, expected, batch, survey)
    _LAST_CALL.where = None
    with interceptor:
        yield SiteRecorder(interceptor)


# ---------------------------------------------------------------------------
# Survey: how each call's leading dimension relates to the batch.
# ---------------------------------------------------------------------------


class _Surveyor(TorchFunctionMode):
    """Records each activation call's leading dimension and output (run as the model asked)."""

    def __init__(self):
        super().__init__()
        self.calls: list = []  # (leading dimension, output, output version after the call, op name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func in _ACTIVATIONS and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1
                and isinstance(out, torch.Tensor)):
            self.calls.append((int(args[0].shape[0]), out, out._version, _op_name(func)))
        return out


_SURVEYS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def survey_sites(model: nn.Module, inputs: torch.Tensor) -> tuple:
    """Per activation call, ``(batch kind, fold, overwritten)`` for ``model`` on inputs shaped like ``inputs``.

    Two forwards without gradients (eval mode, restored after), on the first
    sample and on two copies of it, once per model, per-sample shape, dtype
    and device (cached). A call whose leading dimension doubles with the batch
    is per-sample (``fold`` = its leading dimension at batch 1: 1, or ``k`` for a
    batch-folded call, whose ``[k·B, ...]`` input is taken as batch-major
    ``[B, k, ...]``, as a reshape of ``[B, k, ...]`` lays it out); one whose
    leading dimension stays the same is batch-shared; any other is refused with
    :class:`~handler.errors.UnsupportedModel`. ``overwritten``: the model
    modified the output in place after the activation returned.
    """
    key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
    per_model = _SURVEYS.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    one = inputs[:1].detach()
    training = [m for m in model.modules() if m.training]
    try:
        for m in training:
            m.training = False
        with torch.no_grad():
            single = _Surveyor()
            with single:
                model(one)
            ones = [(lead, out._version != version, op) for lead, out, version, op in single.calls]
            del single
            double = _Surveyor()
            try:
                with double:
                    model(torch.cat([one, one]))
                twos = [lead for lead, _, _, _ in double.calls]
            except Exception:  # noqa: BLE001 - a model that takes one sample at a time: no batch to fold or share
                twos = None
            del double
    finally:
        for m in training:
            m.training = True
    if twos is not None and len(twos) != len(ones):
        raise UnsupportedModel(
            f"the model makes {len(ones)} activation calls for one sample and {len(twos)} for two: its calls "
            "depend on the batch, which pathways cannot follow")
    survey = []
    for index, (lead1, overwritten, op) in enumerate(ones):
        lead2 = 2 * lead1 if twos is None else twos[index]
        if lead2 == 2 * lead1:
            survey.append((PER_SAMPLE if lead1 == 1 else BATCH_FOLDED, lead1, overwritten))
        elif lead2 == lead1:
            survey.append((BATCH_SHARED, 1, overwritten))
        else:
            raise UnsupportedModel(
                f"activation call {index} ({op}) has leading dimension {lead1} for one sample and {lead2} for "
                "two: neither per sample, nor samples folded into the batch, nor shared by the batch")
    per_model[key] = tuple(survey)
    return per_model[key]


# ---------------------------------------------------------------------------
# Capturing one intermediate tensor (Grad-CAM's layer) from inside a forward.
# ---------------------------------------------------------------------------


class UncapturableOutputError(ValueError):
    """A layer's output cannot be captured: its module is called other than once per forward, it returns no
    tensor, or the network overwrote it in place after it was produced."""


class CapturedOutput:
    """One tensor kept from inside a forward pass, with a guard against later in-place overwrites.

    The rest of the forward depends on the kept tensor, so gradients with respect
    to it are gradients with respect to that layer's output. If a later operation
    overwrote it in place, what it holds is no longer that output, and reading
    :attr:`tensor` raises :class:`UncapturableOutputError` instead of returning it.
    """

    def __init__(self):
        self.source: Optional[str] = None  # the site or module it came from
        self._tensor: Optional[torch.Tensor] = None
        self._version = 0

    def keep(self, tensor: torch.Tensor, source: str) -> None:
        self._tensor, self._version, self.source = tensor, tensor._version, source

    @property
    def captured(self) -> bool:
        return self._tensor is not None

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise LookupError("nothing was captured in this forward pass")
        if self._tensor._version != self._version:
            raise UncapturableOutputError(
                f"the output of {self.source} is overwritten in place later in the forward pass, so it is no "
                "longer that layer's output")
        return self._tensor


def capture_site_output(choose: Callable[[Site], bool], into: CapturedOutput) -> SiteTransform:
    """A site transform that keeps, in ``into``, the output of the last call for which ``choose(site)`` holds.

    Only a reference is kept (no copy), so the choice can be made on the fly
    (the last site of some shape); :class:`CapturedOutput` refuses it later if the
    network overwrote it in place.
    """

    def transform(call: SiteCall) -> torch.Tensor:
        out = call.run()
        if choose(call.site):
            into.keep(out, f"activation site {call.site.name!r}")
        return out

    return transform


@contextlib.contextmanager
def capture_module_output(model: nn.Module, name: str) -> Iterator[CapturedOutput]:
    """Within this block, keep the output of the module called ``name`` (a ``named_modules()`` path).

    The rest of the network gets a copy of the output, so a later in-place
    operation (the in-place ReLU after a BatchNorm) cannot overwrite the captured
    tensor. A module is not a call: one called several times per forward
    (torchvision's ``Bottleneck.relu``) has no single output, which is refused with
    :class:`UncapturableOutputError` when the block ends (name one of its activation
    sites instead), as is a module that returns something other than a tensor.
    The hook is removed when the block ends, also on error.
    """
    modules = dict(model.named_modules())
    if name not in modules:
        raise KeyError(name)
    captured = CapturedOutput()
    calls = [0]

    def hook(_module, _args, output):
        calls[0] += 1
        if not isinstance(output, torch.Tensor):
            raise UncapturableOutputError(f"module {name!r} returns {type(output).__name__}, not a tensor")
        if calls[0] > 1:
            return None
        captured.keep(output, f"module {name!r}")
        return output.clone()

    handle = modules[name].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
    if calls[0] != 1:
        raise UncapturableOutputError(f"module {name!r} was called {calls[0]} times in one forward pass; "
                                      "its output is ambiguous (name one of its activation sites instead)")


def trace_sites(model: nn.Module, x: torch.Tensor) -> SiteLayout:
    """The site layout of ``model`` on input ``x`` (one forward, no gradients)."""
    with torch.no_grad(), instrument(model, inputs=x) as recorder:
        model(x)
    return recorder.layout
