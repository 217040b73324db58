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
patched on the model: the mode and the naming hooks live exactly as long as the
``with`` block.

One layer's output can also be kept from inside a forward (Grad-CAM's layer):
an activation site's through a transform (:func:`capture_site_output`), any
other module's through a forward hook that lives as long as its ``with`` block
(:func:`capture_module_output`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class SiteMismatchError(RuntimeError):
    """A pass met different activation sites than the pass its pathway came from."""


class NoActivationSitesError(ValueError):
    """The model has no activation call this module can instrument."""


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
            lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
            hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
            return "relu6" if (lo, hi) == (0.0, 6.0) else "hardtanh"
        return self.kind

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
    shape: tuple  # per sample (no batch dimension)
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This site's slice of a ``[B, N]`` tensor, shaped like the activation."""
        return flat[:, self.offset : self.offset + self.numel].view(flat.shape[0], *self.shape)


@dataclass(frozen=True)
class SiteLayout:
    """All sites of one forward pass, in call order."""

    sites: tuple

    @property
    def total(self) -> int:
        last = self.sites[-1]
        return last.offset + last.numel

    @property
    def locally_linear(self) -> bool:
        return all(s.piecewise_linear for s in self.sites)

    @property
    def nonlinear_kinds(self) -> list:
        return sorted({s.kind for s in self.sites if not s.piecewise_linear})

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)


class SiteCall:
    """One intercepted activation call, handed to a transform to run (and alter) as it sees fit.

    Every registered activation is elementwise with ``f(0) = 0``, so zeroing an
    input neuron zeroes the output neuron: a transform may mask either side.
    """

    __slots__ = ("site", "input", "inplace", "_func", "_args", "_kwargs")

    def __init__(self, site: Site, func, args, kwargs, inplace: bool):
        self.site = site
        self.input: torch.Tensor = args[0]
        self.inplace = inplace
        self._func, self._args, self._kwargs = func, args, kwargs

    @property
    def may_modify_input(self) -> bool:
        """The model asked for an in-place call, so overwriting the input is what it expects anyway."""
        return self.inplace and not (self.input.is_leaf and self.input.requires_grad)

    def run(self, *, out_of_place: bool = False) -> torch.Tensor:
        """The activation as the model called it (in place if it asked for that, unless ``out_of_place``)."""
        if self.inplace and (out_of_place or not self.may_modify_input):
            return self._func(self.input.clone(), *self._args[1:], **self._kwargs)
        return self._func(*self._args, **self._kwargs)

    def run_on(self, tensor: torch.Tensor) -> torch.Tensor:
        """The same activation (same arguments) applied out of place to ``tensor`` instead of the call's input.

        For transforms that put something of their own between the network and
        the activation (guided backprop's gradient rectifier).
        """
        if self.inplace:
            tensor = tensor.clone()
        return self._func(tensor, *self._args[1:], **self._kwargs)


#: A site transform runs one call (``call.run()``) and returns the tensor the rest of the network continues with.
SiteTransform = Callable[[SiteCall], torch.Tensor]


class _SiteInterceptor(TorchFunctionMode):
    def __init__(self, transform: SiteTransform, names: Optional["_ModuleStack"], expected: Optional[SiteLayout]):
        super().__init__()
        self.transform = transform
        self.names = names
        self.expected = expected
        self.sites: list = []
        self._offset = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        activation = _ACTIVATIONS.get(func)
        if activation is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 1:
            return func(*args, **kwargs)
        kind = activation.kind_of(args, kwargs)
        index = len(self.sites)
        shape = tuple(args[0].shape[1:])
        if self.expected is not None:
            if index >= len(self.expected):
                raise SiteMismatchError(
                    f"this pass met more activation sites than the pathway has ({len(self.expected)})")
            want = self.expected.sites[index]
            if want.shape != shape:
                raise SiteMismatchError(
                    f"activation site {index} ({want.name}) has shape {shape} in this pass "
                    f"but {want.shape} in the pathway")
            site = want
        else:
            name = self.names.name_for(kind) if self.names is not None else f"site{index}"
            site = Site(index, name, kind, kind in PIECEWISE_LINEAR_KINDS, shape, self._offset)
        self._offset += site.numel
        self.sites.append(site)
        return self.transform(SiteCall(site, func, args, kwargs, activation.inplace(args, kwargs)))

    def layout(self) -> SiteLayout:
        if not self.sites:
            raise NoActivationSitesError(
                "the model made no activation call that can be instrumented "
                "(ReLU, ReLU6, Hardtanh, LeakyReLU, PReLU, SiLU, GELU, Hardswish, Mish, ELU, SELU, CELU); "
                "TorchScript modules are opaque to instrumentation")
        if self.expected is not None and len(self.sites) != len(self.expected):
            raise SiteMismatchError(
                f"this pass met {len(self.sites)} activation sites, the pathway has {len(self.expected)}")
        return SiteLayout(tuple(self.sites))


class _ModuleStack:
    """Tracks which module is running, to give each site a readable name."""

    def __init__(self, model: nn.Module):
        self.stack: list = []
        self.calls: dict = {}
        self.handles = []
        for path, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(path or "<model>", module)))
            self.handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, path, module):
        def hook(_module, _args):
            self.stack.append((path, module))
        return hook

    def _leave(self, _module, _args, _output):
        if self.stack:
            self.stack.pop()

    def name_for(self, kind: str) -> str:
        path, module = self.stack[-1] if self.stack else ("<model>", None)
        base = path if isinstance(module, _ACTIVATION_MODULES) else f"{path}:{kind}"
        count = self.calls.get(base, 0) + 1
        self.calls[base] = count
        return base if count == 1 else f"{base}#{count}"

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


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
) -> Iterator[SiteRecorder]:
    """Run forwards of ``model`` inside this block with every activation call routed through ``transform``.

    With ``expected``, each call must match that layout (same count, order and
    shapes) or :class:`SiteMismatchError` is raised: a pathway is never applied
    to a different set of sites. The model is left exactly as it was, also when
    the block raises.
    """
    names = _ModuleStack(model) if (name_sites and expected is None) else None
    interceptor = _SiteInterceptor(transform, names, expected)
    try:
        with interceptor:
            yield SiteRecorder(interceptor)
    finally:
        if names is not None:
            names.remove()


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
    with torch.no_grad(), instrument(model) as recorder:
        model(x)
    return recorder.layout
