"""Images and options in, response documents and rendered outputs out.

The layer both front ends share: the TorchServe handler only turns HTTP into
``(image bytes, raw options)`` pairs and documents back into HTTP; the CLI does
the same with files. A request that is wrong on its own (bad option, target out
of range) fails alone: :meth:`ExplanationService.explain` returns its error in
its slot and explains the rest of the batch together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .engine import Explainer, ExplainRequest, InputNormalisation
from .errors import ExplainError, InvalidOption
from .imaging import Preprocessor, decode_image, npy_bytes, png_bytes, render_heatmap, render_overlay
from .models import LoadedModel, ModelSpec, load_model
from .schema import Limits, RequestOptions, attach_inline, explanation_document, prediction_document


def request_of(options: RequestOptions) -> ExplainRequest:
    """The engine's request for one set of parsed options."""
    return ExplainRequest(target=options.target, method=options.method, sparsity=options.sparsity,
                          reduce=options.reduce, selection=options.selection, options=options.method_options)


@dataclass
class ExplainResult:
    document: dict  # the response document, without binary outputs
    artifacts: dict = field(default_factory=dict)  # output name -> bytes (PNG / .npy)
    attribution: Optional[np.ndarray] = None  # [H, W] float32, signed, max |·| = 1

    def inline(self) -> dict:
        """The document with its binary outputs base64-encoded, as the server returns it."""
        return attach_inline(dict(self.document, explanation=dict(self.document["explanation"])), self.artifacts)


class ExplanationService:
    def __init__(self, loaded: LoadedModel, device: Union[str, torch.device] = "cpu", limits: Limits = Limits()):
        self.spec: ModelSpec = loaded.spec
        self.name = loaded.spec.name
        self.labels = loaded.labels
        self.limits = limits
        self.preprocessor = Preprocessor(loaded.spec.preprocessing)
        defaults = loaded.spec.defaults
        self.explainer = Explainer(
            loaded.module,
            labels=loaded.labels,
            device=device,
            default_method=defaults.get("method", "pathway_gradient"),
            default_sparsity=defaults.get("sparsity", 0.7),
            default_reduce=defaults.get("reduce", "max_abs"),
            normalisation=InputNormalisation(loaded.spec.preprocessing.mean, loaded.spec.preprocessing.std),
        )

    @classmethod
    def from_spec(cls, spec, device="cpu", limits: Limits = Limits()) -> "ExplanationService":
        return cls(load_model(spec, device=device), device=device, limits=limits)

    @property
    def device(self) -> torch.device:
        return self.explainer.device

    def decode(self, data: bytes) -> Image.Image:
        return decode_image(data, self.limits.image)

    def predict(self, images: Sequence[Image.Image], options: Sequence[RequestOptions]) -> list:
        probabilities = self.explainer.predict(self.preprocessor.batch(images)).cpu().numpy()
        return [prediction_document(self.name, p, self.labels, o.top_k) for p, o in zip(probabilities, options)]

    def explain(
        self,
        images: Sequence[Image.Image],
        options: Sequence[RequestOptions],
        *,
        attribution_dtype=np.float16,
    ) -> list:
        """One :class:`ExplainResult` per image, or the :class:`ExplainError` that request alone caused."""
        results: list = [None] * len(images)
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
        if not valid:
            return results
        batch = self.preprocessor.batch([images[i] for i in valid])
        explanations = self.explainer.explain_requests(batch, requests)
        for i, explanation in zip(valid, explanations):
            results[i] = self._render(images[i], options[i], explanation, attribution_dtype)
        return results

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

    def _render(self, image: Image.Image, options: RequestOptions, explanation, attribution_dtype) -> ExplainResult:
        document = explanation_document(
            self.name, explanation, self.labels, options, self.preprocessor.describe(image.size))
        artifacts = {}
        if "heatmap" in options.outputs:
            artifacts["heatmap"] = png_bytes(
                render_heatmap(explanation.attribution, options.colormap, options.polarity))
        if "overlay" in options.outputs:
            artifacts["overlay"] = png_bytes(render_overlay(
                image, explanation.attribution, self.preprocessor.crop_box(image.size),
                options.colormap, options.polarity))
        if "attribution" in options.outputs:
            artifacts["attribution"] = npy_bytes(explanation.attribution.astype(attribution_dtype))
        return ExplainResult(document, artifacts, explanation.attribution)


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
