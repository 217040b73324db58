"""One evaluation run: a model, a set of images, method variants and protocols in; one JSON-ready record out.

This is what ``pathway-eval`` and the report script call. Maps are computed once
per method and shared by every protocol of the run; every protocol uses the
same explained class per image (the predicted class, the ground-truth label,
or a fixed index).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..engine import SELECTIONS, Explainer
from ..errors import ExplainError, InvalidOption
from ..imaging import Preprocessor, open_image
from ..models import LoadedModel, explainer_for
from .localisation import localisation, tolerance_for
from .maps import Maps, explain_maps, option_pairs
from .pathway_overlap import compare_selections
from .perturbation import FRACTIONS, RISE_STEP, curve_length, insertion_deletion, pixel_perturbation
from .progress import Progress
from .randomisation import cascade_stages, cascading_randomisation

#: Protocol name -> what it measures (the order in which a run performs them).
PROTOCOLS = {
    "lerf_morf": "pixel perturbation: |p - p'|/p after removing the 1-10 % least / most relevant pixels",
    "insertion_deletion": "RISE insertion and deletion AUC of the class probability",
    "randomisation": "cascading randomisation sanity check: similarity to the original maps, stage by stage",
    "pointing_game": "pointing game and energy inside the ground-truth box (needs boxes: --synthetic)",
    "pathway_overlap": "dead neurons kept and Jaccard overlap of pathways from each selection strategy",
}
#: Protocols that need maps from the method variants.
MAP_PROTOCOLS = ("lerf_morf", "insertion_deletion", "randomisation", "pointing_game")


@dataclass
class ImageSet:
    """Normalised images with their names, what the model saw (for pictures), and ground truth where known."""

    names: list
    x: torch.Tensor  # [B, C, H, W] normalised
    display: np.ndarray  # [B, H, W, 3] uint8: the model's input window, unnormalised
    boxes: Optional[list] = None  # Box per image
    labels: Optional[list] = None  # ground-truth class per image
    source: str = "images"

    def __len__(self) -> int:
        return len(self.names)


def photo_set(paths: Sequence[Union[str, Path]], preprocessor: Preprocessor) -> ImageSet:
    """Image files, decoded with the server's checks and preprocessed as the model spec says."""
    images = []
    for path in paths:
        try:
            images.append(open_image(path, least_side=preprocessor.least_decoded_side))
        except ExplainError as err:  # which of the files, as the CLI says it
            err.args = (f"{path}: {err}",)
            raise
    x = preprocessor.batch(images)
    return ImageSet([Path(p).stem for p in paths], x, _display(x, preprocessor.prep), source="images")


def synthetic_set(count: int, preprocessor: Preprocessor, *, seed: int = 0) -> ImageSet:
    """The first ``count`` images of the synthetic test split, at the model's input size."""
    from .synthetic import SyntheticDigits

    prep = preprocessor.prep
    if prep.resize != prep.crop:
        raise InvalidOption(f"the synthetic set needs a model whose input is a square it is not cropped from "
                            f"(resize == crop); this model resizes to {prep.resize} and crops {prep.crop}")
    data = SyntheticDigits("test", count, size=prep.crop, seed=seed)
    x, labels, boxes = data.batch(range(count), prep.mean, prep.std)
    return ImageSet([f"synthetic-{i:04d}" for i in range(count)], x, _display(x, prep), boxes=list(boxes),
                    labels=labels.tolist(), source=f"synthetic test split, seed {seed}")


def _display(x: torch.Tensor, prep) -> np.ndarray:
    mean = torch.tensor(prep.mean)[None, :, None, None]
    std = torch.tensor(prep.std)[None, :, None, None]
    pixels = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


@dataclass
class EvaluationConfig:
    methods: list  # MethodVariant
    protocols: list
    target: Union[str, int] = "auto"  # "auto" (predicted), "label" (ground truth), or a class index
    sparsity: Optional[float] = None  # None: the model spec's default
    reduce: Optional[str] = None
    fractions: tuple = FRACTIONS
    step: int = RISE_STEP
    tolerance: Optional[float] = None  # pixels; None: 15 px at 224, scaled to the image size
    value: float = 0.0  # what removed pixels become, in normalised space
    stages: Optional[int] = None  # randomisation: stop after this many stages (None: all)
    overlap_selections: list = field(default_factory=list)  # (name, options); first is the reference
    batch_size: int = 32
    seed: int = 0


def resolve_targets(explainer: Explainer, images: ImageSet, target) -> list:
    """The class each image is explained for, as indices."""
    if target == "label":
        if images.labels is None:
            raise InvalidOption("--target label needs ground-truth labels (the synthetic set has them)")
        return [int(t) for t in images.labels]
    if target in (None, "auto"):
        return explainer.predict(images.x).argmax(1).cpu().tolist()
    return [explainer.resolve_target(target)] * len(images)


def evaluate(
    loaded: LoadedModel,
    images: ImageSet,
    config: EvaluationConfig,
    *,
    device: Union[str, torch.device] = "cpu",
    show_progress: bool = True,
    keep_maps: bool = False,
) -> tuple:
    """Run ``config`` on ``images``; returns ``(record, maps)`` (``maps``: label -> :class:`Maps`, if kept)."""
    unknown = [p for p in config.protocols if p not in PROTOCOLS]
    if unknown:
        raise InvalidOption(f"unknown protocol {unknown[0]!r}; choose from: {', '.join(PROTOCOLS)}")
    if "pointing_game" in config.protocols and images.boxes is None:
        raise InvalidOption("the pointing game needs ground-truth boxes: evaluate on --synthetic N")

    def make_explainer(module) -> Explainer:
        """An explainer configured exactly as the server's (:class:`~handler.service.ExplanationService`)."""
        return explainer_for(loaded, module, device=device)

    explainer = make_explainer(loaded.module)
    variants = [v.validated(explainer) for v in config.methods]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise InvalidOption("a method variant is listed twice: " + ", ".join(sorted({l for l in labels
                                                                                      if labels.count(l) > 1})))
    sparsity = config.sparsity if config.sparsity is not None else float(explainer.defaults.sparsity)
    reduce = config.reduce or explainer.defaults.reduce
    x = images.x.to(explainer.device)
    targets = resolve_targets(explainer, images, config.target)
    height, width = x.shape[2], x.shape[3]
    tolerance = config.tolerance if config.tolerance is not None else tolerance_for(max(height, width))
    probabilities = explainer.predict(x).cpu().numpy()
    record = {
        "model": loaded.spec.name,
        "images": {"source": images.source, "names": images.names, "count": len(images),
                   "size": [height, width],
                   "targets": targets, "labels": images.labels,
                   "predicted": probabilities.argmax(1).tolist(),
                   "target_probability": [float(probabilities[i, t]) for i, t in enumerate(targets)],
                   "boxes": [b.to_list() for b in images.boxes] if images.boxes is not None else None},
        "settings": {"protocols": list(config.protocols), "target": config.target, "sparsity": sparsity,
                     "reduce": reduce, "fractions": list(config.fractions), "step": config.step,
                     "tolerance_px": tolerance, "removed_value": config.value, "seed": config.seed,
                     "batch_size": config.batch_size},
        "methods": {},
    }
    if images.labels is not None:
        record["images"]["accuracy"] = float(np.mean(probabilities.argmax(1) == np.array(images.labels)))

    needs_maps = any(p in MAP_PROTOCOLS for p in config.protocols)
    maps: dict = {}
    if needs_maps:
        for variant in variants:
            progress = Progress(f"maps {variant.label}", len(images), enabled=show_progress)
            maps[variant.label] = explain_maps(explainer, x, variant, targets=targets, sparsity=sparsity,
                                               reduce=reduce, batch_size=config.batch_size, progress=progress)
            entry = record["methods"].setdefault(variant.label, {})
            entry.update(_map_facts(maps[variant.label]))

    for variant in variants:
        label = variant.label
        m = maps.get(label)
        entry = record["methods"].setdefault(label, {})
        if "lerf_morf" in config.protocols:
            progress = Progress(f"lerf_morf {label}", len(images) * (1 + 2 * len(config.fractions)),
                                enabled=show_progress)
            entry["lerf_morf"] = pixel_perturbation(
                explainer, x, m.relevance, targets, fractions=config.fractions, value=config.value,
                batch_size=config.batch_size, seed=config.seed, progress=progress).summary()
        if "insertion_deletion" in config.protocols:
            progress = Progress(f"insertion_deletion {label}", len(images) * 2 * curve_length(height, width,
                                                                                                config.step),
                                enabled=show_progress)
            entry["insertion_deletion"] = insertion_deletion(
                explainer, x, m.relevance, targets, step=config.step, value=config.value,
                batch_size=config.batch_size, seed=config.seed, progress=progress).summary()
        if "pointing_game" in config.protocols:
            entry["pointing_game"] = localisation(m.relevance, images.boxes, tolerance).summary()

    if "randomisation" in config.protocols and variants:
        stages = cascade_stages(loaded.module, x)
        cascade_length = len(stages)
        if config.stages is not None:
            stages = stages[:config.stages]
        progress = Progress("randomisation (stage x method)", len(stages) * len(variants), enabled=show_progress)
        cascades = cascading_randomisation(
            loaded.module, x, [maps[v.label] for v in variants], make_explainer=make_explainer, stages=stages,
            sparsity=sparsity, reduce=reduce, batch_size=config.batch_size, seed=config.seed, progress=progress)
        for label, cascade in cascades.items():
            # how many stages the whole cascade has: a run stopped early (--stages) is not "fully randomised"
            record["methods"][label]["randomisation"] = dict(cascade.summary(), cascade_stages=cascade_length)

    if "pathway_overlap" in config.protocols:
        selections = config.overlap_selections or default_overlap_selections()
        for name, _ in selections:
            SELECTIONS.get(name)
        progress = Progress("pathway_overlap", len(images) * len(selections), enabled=show_progress)
        overlap = compare_selections(loaded.module, x, targets, selections, sparsity=sparsity,
                                     batch_size=config.batch_size, progress=progress)
        record["pathway_overlap"] = overlap.summary()
    return record, (maps if keep_maps else {})


def default_overlap_selections() -> list:
    """Every registered selection strategy, ``contribution`` (the paper's) first as the reference."""
    names = SELECTIONS.names()
    ordered = (["contribution"] if "contribution" in names else []) + [n for n in names if n != "contribution"]
    return [(name, {}) for name in ordered]


def _map_facts(maps: Maps) -> dict:
    facts = {"seconds_per_image": maps.seconds / max(1, len(maps.targets)),
             "zero_maps": int((np.abs(maps.attribution).reshape(len(maps.targets), -1).max(1) == 0).sum())}
    pathways = [p for p in maps.pathways if p]
    if pathways:
        facts["realised_sparsity"] = float(np.mean([p["realised_sparsity"] for p in pathways]))
    return facts


def parse_overlap_selection(text: str) -> tuple:
    """``NAME[:OPTION=VALUE,...]`` -> ``(name, options)``; options are coerced by the strategy's declared types."""
    head, _, tail = text.strip().partition(":")
    name = head.strip()
    try:
        strategy = SELECTIONS.get(name)
    except Exception as err:
        raise InvalidOption(str(err)) from None
    options = {}
    for key, value in option_pairs(text, tail):
        spec = strategy.options.get(key)
        if spec is None:
            raise InvalidOption(f"{text!r}: selection {name!r} has no option {key!r} "
                                f"(it accepts: {', '.join(sorted(strategy.options)) or 'none'})")
        options[key] = spec.coerce(key, value)
    return name, options
