"""Images and options in, response documents and rendered outputs out.

The layer both front ends share: the TorchServe handler only turns HTTP into
``(image bytes, raw options)`` pairs and documents back into HTTP; the CLI does
the same with files. A request that is wrong on its own (bad option, target out
of range) fails alone: :meth:`ExplanationService.explain` returns its error in
its slot and explains the rest of the batch together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .engine import BatchSplit, Explainer, ExplainRequest, InputNormalisation
from .errors import ExplainError, InvalidOption
from .imaging import (Preprocessor, VisualizationSettings, decode_image, npy_bytes, png_bytes, render_heatmap,
                      render_overlay)
from .models import LoadedModel, ModelSpec, load_model
from .schema import Limits, RequestOptions, attach_inline, explanation_document, prediction_document


def request_of(options: RequestOptions) -> ExplainRequest:
    """The engine's request for one set of parsed options."""
    return ExplainRequest(target=options.target, method=options.method, sparsity=options.sparsity,
                          reduce=options.reduce, selection=options.selection, options=options.method_options)


#: Method and selection options that cost passes per unit, on top of the two of a pathway gradient, and how
#: many: an integrated-gradient step, a SmoothGrad sample or a resampled copy is about one forward + backward;
#: a pruning-gate iteration measured ~8 (EfficientNet-Lite0 on 2 CPU cores: 0.3 s against 39 ms per IG step).
PASS_OPTIONS = {"steps": 1, "samples": 1, "copies": 1, "iterations": 8}


class ServiceObserver:
    """What the service reports about its work, for a front end's metrics; this default ignores it.

    The TorchServe handler passes one that records Prometheus metrics
    (``handler/serving/metrics.py``); the CLI passes none.
    """

    def stage(self, stage: str, kind: str, seconds: float, images: int) -> None:
        """``stage`` ("engine": the model's passes, "render": PNG/.npy outputs) took ``seconds`` for ``images``."""

    def batch_split(self, split: BatchSplit) -> None:
        """The engine retried a batch in smaller parts (see :mod:`handler.engine.events`)."""


@dataclass
class ExplainResult:
    document: dict  # the response document, without binary outputs
    artifacts: dict = field(default_factory=dict)  # output name -> bytes (PNG / .npy)
    attribution: Optional[np.ndarray] = None  # [H, W] float32, signed, max |·| = 1
    realised_sparsity: Optional[float] = None  # of the pathway followed (also when the summary is not returned)

    def inline(self) -> dict:
        """The document with its binary outputs base64-encoded, as the server returns it."""
        return attach_inline(dict(self.document, explanation=dict(self.document["explanation"])), self.artifacts)


class ExplanationService:
    def __init__(self, loaded: LoadedModel, device: Union[str, torch.device] = "cpu", limits: Limits = Limits(),
                 observer: Optional[ServiceObserver] = None, *, memory_budget=None,
                 max_batch_size: Optional[int] = None):
        """``memory_budget`` (bytes, ``"4GiB"``, ``"60%"``; default: from the device's free memory) and
        ``max_batch_size`` bound one engine pass; larger batches are split (see :class:`~handler.engine.Explainer`)."""
        self.spec: ModelSpec = loaded.spec
        self.name = loaded.spec.name
        self.labels = loaded.labels
        self.limits = limits
        self.preprocessor = Preprocessor(loaded.spec.preprocessing)
        defaults = loaded.spec.defaults
        self.explainer = Explainer(
            loaded.module,
            labels=loaded.labels,
            label_aliases=loaded.label_aliases,
            device=device,
            default_method=defaults.get("method", "pathway_gradient"),
            default_sparsity=defaults.get("sparsity", 0.7),
            default_reduce=defaults.get("reduce", "max_abs"),
            normalisation=InputNormalisation(loaded.spec.preprocessing.mean, loaded.spec.preprocessing.std),
            memory_budget=memory_budget,
            max_batch_size=max_batch_size,
        )
        self.observer = observer or ServiceObserver()
        self.explainer.on_batch_split = self.observer.batch_split

    @classmethod
    def from_spec(cls, spec, device="cpu", limits: Limits = Limits(), *, memory_budget=None,
                  max_batch_size: Optional[int] = None) -> "ExplanationService":
        return cls(load_model(spec, device=device), device=device, limits=limits, memory_budget=memory_budget,
                   max_batch_size=max_batch_size)

    @property
    def device(self) -> torch.device:
        return self.explainer.device

    def decode(self, data: bytes) -> Image.Image:
        return decode_image(data, self.limits.image)

    def predict(self, images: Sequence[Image.Image], options: Sequence[RequestOptions]) -> list:
        """One prediction document per image, or the :class:`ExplainError` that request alone caused.

        Explanation options sent with a prediction are checked like an explanation's (a bad target or
        method is a 400 here too, not silently ignored); valid ones have nothing to change.
        """
        results, _, valid = self._validated(options)
        if not valid:
            return results
        started = time.perf_counter()
        probabilities = self.explainer.predict(self.preprocessor.batch([images[i] for i in valid])).cpu().numpy()
        self.observer.stage("engine", "predict", time.perf_counter() - started, len(valid))
        for i, p in zip(valid, probabilities):
            results[i] = prediction_document(self.name, p, self.labels, options[i].top_k)
        return results

    def _validated(self, options: Sequence[RequestOptions]) -> tuple:
        """``(results, requests, valid)``: each request checked against the engine and the caps; errors in place."""
        results: list = [None] * len(options)
        requests, valid = [], []
        for i, o in enumerate(options):
            try:
                request = self.explainer.validate(request_of(o))
                self.explainer.resolve_target(request.target)
                self._check_caps(request)
            except ExplainError as err:
                results[i] = err
                continue
            requests.append(request)
            valid.append(i)
        return results, requests, valid

    def explain(
        self,
        images: Sequence[Image.Image],
        options: Sequence[RequestOptions],
        *,
        attribution_dtype=np.float16,
        visualization: Optional[VisualizationSettings] = None,
    ) -> list:
        """One :class:`ExplainResult` per image, or the :class:`ExplainError` that request alone caused.

        ``visualization`` draws every image's heatmap and overlay (the CLI's flags); None: each request's
        ``colormap`` and ``polarity`` with the default settings.
        """
        results, requests, valid = self._validated(options)
        if not valid:
            return results
        started = time.perf_counter()
        batch = self.preprocessor.batch([images[i] for i in valid])
        explanations = self.explainer.explain_requests(batch, requests)
        rendering = time.perf_counter()
        self.observer.stage("engine", "explain", rendering - started, len(valid))
        for i, explanation in zip(valid, explanations):
            results[i] = self._render(images[i], options[i], explanation, attribution_dtype, visualization)
        self.observer.stage("render", "explain", time.perf_counter() - rendering, len(valid))
        return results

    def explanation_passes(self, options: RequestOptions) -> int:
        """About how many forward + backward passes explaining one image with these options costs."""
        request = self.explainer.validate(request_of(options))
        specs = self.explainer.option_specs(request.method, request.selection)
        given = dict(request.options)
        return 2 + sum(weight * int(given.get(name, specs[name].default))
                       for name, weight in PASS_OPTIONS.items() if name in specs)

    def check_request_cost(self, options: Sequence[RequestOptions]) -> None:
        """Refuse one request (all its images) whose explanation passes exceed ``max_passes_per_request``.

        Bounds the work a batch can hold a worker for (TorchServe kills a worker past ``responseTimeout``).
        """
        limit = self.limits.max_passes_per_request
        if limit is None:
            return
        passes = sum(self.explanation_passes(o) for o in options)
        if passes > limit:
            raise InvalidOption(
                f"this request costs about {passes} forward/backward passes ({len(options)} image(s)); this "
                f"server allows {limit} per request: send fewer images per request, or fewer steps, samples, "
                "iterations or copies", type="over_limit")

    def _check_caps(self, request: ExplainRequest) -> None:
        for name, value in request.options:
            cap = self.limits.method_caps.get(name)
            if cap is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
                raise InvalidOption(f"{name} = {value} exceeds this server's limit of {cap}", type="over_limit")

    def explain_images(self, images: Sequence, **options) -> list:
        """Notebook convenience: paths, bytes or PIL images, and options as keywords (the server's names).

        Raises the first request error instead of returning it.
        """
        from .schema import parse_options

        opts = parse_options(options, self.limits)
        decoded = [open_image(source, self.limits.image) for source in images]
        results = self.explain(decoded, [opts] * len(decoded), attribution_dtype=np.float32)
        for result in results:
            if isinstance(result, ExplainError):
                raise result
        return results

    def _render(self, image: Image.Image, options: RequestOptions, explanation, attribution_dtype,
                visualization: Optional[VisualizationSettings] = None) -> ExplainResult:
        settings = visualization or VisualizationSettings(colormap=options.colormap, polarity=options.polarity)
        document = explanation_document(
            self.name, explanation, self.labels, options, self.preprocessor.describe(image.size))
        artifacts = {}
        if "heatmap" in options.outputs:
            artifacts["heatmap"] = png_bytes(
                render_heatmap(explanation.attribution, settings))
        if "overlay" in options.outputs:
            photo, box = image, self.preprocessor.crop_box(image.size)
            scale = (self.limits.max_overlay_pixels / (image.width * image.height)) ** 0.5
            if scale < 1:  # keep responses bounded for very large photos
                photo = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
                box = type(box)(box.left * scale, box.top * scale, box.right * scale, box.bottom * scale)
                document["explanation"]["overlay_size"] = list(photo.size)
            artifacts["overlay"] = png_bytes(render_overlay(photo, explanation.attribution, box, settings))
        if "attribution" in options.outputs:
            artifacts["attribution"] = npy_bytes(explanation.attribution.astype(attribution_dtype))
        realised = explanation.pathway.get("realised_sparsity") if explanation.pathway else None
        return ExplainResult(document, artifacts, explanation.attribution, realised)


def open_image(source, limits=None) -> Image.Image:
    """A path, bytes or PIL image as a decoded RGB image (same checks as the server)."""
    from .imaging import ImageLimits

    limits = limits or ImageLimits()
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), limits)
    from pathlib import Path

    return decode_image(Path(source).read_bytes(), limits)
