"""Which explanation to evaluate, and computing its maps through the engine's :class:`Explainer`.

An evaluation names a *method variant*: a registered method, for pathway
methods a registered selection strategy, and options, written
``METHOD[@SELECTION][:NAME=VALUE,...]`` (``gradient``,
``pathway_gradient@random``, ``integrated_gradients:steps=50``). The maps come
from the same :class:`~handler.engine.Explainer` the server and the CLI use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..engine import METHODS, SELECTIONS, Explainer
from ..errors import InvalidOption, UnknownNameError
from .progress import Progress


@dataclass(frozen=True)
class MethodVariant:
    """A method, the selection strategy its pathway uses (pathway methods only), and its options.

    ``sparsity`` (pathway methods only) overrides the run's sparsity for this
    variant, so one run can compare several sparsities side by side.
    """

    method: str
    selection: Optional[str] = None
    options: tuple = ()  # sorted (name, value) pairs
    sparsity: Optional[float] = None

    @property
    def label(self) -> str:
        text = self.method + (f"@{self.selection}" if self.selection else "")
        shown = list(self.options) + ([("sparsity", self.sparsity)] if self.sparsity is not None else [])
        if shown:
            text += ":" + ",".join(f"{k}={_show(v)}" for k, v in shown)
        return text

    @classmethod
    def parse(cls, text: str) -> "MethodVariant":
        """``METHOD[@SELECTION][:NAME=VALUE,...]``; names are checked against the registries."""
        head, _, tail = text.strip().partition(":")
        method, _, selection = head.partition("@")
        method, selection = method.strip(), selection.strip() or None
        try:
            chosen = METHODS.get(method)
            if selection is not None:
                SELECTIONS.get(selection)
        except UnknownNameError as err:
            raise InvalidOption(f"{text!r}: {err}") from None
        if selection is not None and not chosen.uses_pathway:
            raise InvalidOption(f"{text!r}: method {method!r} does not follow a pathway, so it takes no selection")
        options, sparsity = {}, None
        for name, value in option_pairs(text, tail):
            if name == "sparsity":
                if not chosen.uses_pathway:
                    raise InvalidOption(f"{text!r}: method {method!r} does not follow a pathway, so it has no "
                                        "sparsity")
                try:
                    sparsity = float(value)
                except ValueError:
                    raise InvalidOption(f"{text!r}: sparsity must be a number, not {value.strip()!r}") from None
                continue
            options[name] = value.strip()
        return cls(method, selection, tuple(sorted(options.items())), sparsity)

    def validated(self, explainer: Explainer) -> "MethodVariant":
        """The variant with its options coerced to their declared types (raises :class:`InvalidOption`)."""
        from ..engine import ExplainRequest

        request = explainer.validate(ExplainRequest(method=self.method, selection=self.selection,
                                                    sparsity=self.sparsity, options=self.options))
        return MethodVariant(self.method, self.selection if METHODS.get(self.method).uses_pathway else None,
                             request.options, None if self.sparsity is None else request.sparsity)


def option_pairs(text: str, tail: str) -> list:
    """``(name, value)`` pairs of the ``NAME=VALUE,...`` part (``tail``) of a command-line spec ``text``."""
    pairs = []
    for item in filter(None, (part.strip() for part in tail.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidOption(f"{text!r}: options are NAME=VALUE, not {item!r}")
        pairs.append((name, value))
    return pairs


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def all_variants() -> list:
    """Every registered method; a pathway method once per registered selection strategy."""
    out = []
    for name in METHODS.names():
        if METHODS.get(name).uses_pathway:
            out.extend(MethodVariant(name, selection) for selection in SELECTIONS.names())
        else:
            out.append(MethodVariant(name))
    return out


@dataclass
class Maps:
    """One method's maps for a batch of images, with what the evaluations need beside them."""

    variant: MethodVariant
    attribution: np.ndarray  # [B, H, W] float32, signed, max |·| = 1 per map (all zero when the map is)
    targets: np.ndarray  # [B] the explained classes
    probabilities: np.ndarray  # [B] the full network's softmax probability of each target
    pathways: list = field(default_factory=list)  # per sample: the pathway summary (pathway methods), else None
    seconds: float = 0.0

    @property
    def relevance(self) -> np.ndarray:
        """``|attribution|``: the ordering the perturbation protocols and the pointing game use."""
        return np.abs(self.attribution)


def explain_maps(
    explainer: Explainer,
    x: torch.Tensor,
    variant: MethodVariant,
    *,
    targets: Optional[Sequence[int]] = None,
    sparsity: Optional[float] = None,
    reduce: Optional[str] = None,
    batch_size: int = 16,
    progress: Optional[Progress] = None,
) -> Maps:
    """``variant``'s maps for every image of ``x`` (normalised ``[B, C, H, W]``), in batches.

    ``targets``: one class per image; ``None`` explains each image's predicted class.
    """
    import time

    started = time.perf_counter()
    chunks = []
    total = x.shape[0]
    options = dict(variant.options)
    if variant.sparsity is not None:
        sparsity = variant.sparsity
    for start in range(0, total, batch_size):
        stop = min(total, start + batch_size)
        chunk_targets = None if targets is None else [int(t) for t in targets[start:stop]]
        chunks.extend(explainer.explain(
            x[start:stop], chunk_targets, method=variant.method, sparsity=sparsity, reduce=reduce,
            selection=variant.selection, **options))
        if progress is not None:
            progress.advance(stop - start)
    return Maps(
        variant=variant,
        attribution=np.stack([e.attribution for e in chunks]).astype(np.float32),
        targets=np.array([e.target for e in chunks], dtype=np.int64),
        probabilities=np.array([e.target_probability for e in chunks], dtype=np.float64),
        pathways=[e.pathway for e in chunks],
        seconds=time.perf_counter() - started,
    )


def target_probabilities(
    explainer: Explainer,
    images,
    targets: Sequence[int],
    *,
    batch_size: int = 32,
    progress: Optional[Progress] = None,
) -> np.ndarray:
    """Softmax probability of ``targets[i]`` for each image of the iterable ``images`` (``[C, H, W]`` tensors).

    Images are produced lazily and sent through the network ``batch_size`` at a
    time: a perturbation curve of hundreds of steps never sits in memory whole.
    """
    out = np.empty(len(targets), dtype=np.float64)
    pending, index = [], 0

    def flush():
        nonlocal pending, index
        if not pending:
            return
        batch = torch.stack(pending)
        probs = explainer.predict(batch)
        idx = torch.as_tensor(targets[index:index + len(pending)], device=probs.device)
        out[index:index + len(pending)] = probs.gather(1, idx[:, None]).squeeze(1).double().cpu().numpy()
        if progress is not None:
            progress.advance(len(pending))
        index += len(pending)
        pending = []

    for image in images:
        pending.append(image)
        if len(pending) == batch_size:
            flush()
    flush()
    if index != len(targets):
        raise ValueError(f"{index} images for {len(targets)} targets")
    return out
