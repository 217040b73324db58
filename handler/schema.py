"""The request options and the response document, defined once for the CLI and the server.

Options arrive as JSON fields, multipart fields, ``X-Explain-*`` headers or CLI
flags; all of them go through :func:`parse_options`, so a value means the same
thing everywhere and a bad one gets the same message everywhere.

Response (``/explanations`` and ``pathway-explain``'s ``STEM.json``)::

    {
      "model": "efficientnet_lite0",
      "predictions": [{"index": 967, "label": "espresso", "probability": 0.957}, ...],
      "explanation": {
        "method": "pathway_gradient",
        "target": {"index": 967, "label": "espresso", "probability": 0.957, "pathway_probability": 0.953},
        "reduce": "max_abs",
        "attribution_scale": 0.0123,
        "notes": [],
        "pathway": {"selection": "contribution", "requested_sparsity": 0.7, "realised_sparsity": 0.7001,
                    "kept_neurons": ..., "total_neurons": ..., "locally_linear": true,
                    "nonlinear_activations": [], "removed_sites": [],
                    "sites": [{"name", "kind", "call", "shape", "kept", "total", "top_channels"}, ...]},
        "heatmap": {"media_type": "image/png", "encoding": "base64", "data": "..."},   # server
        "heatmap": {"media_type": "image/png", "path": "coffee.heatmap.png"}           # CLI
      },
      "preprocessing": {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": [...], "std": [...],
                        "image_size": [w, h], "crop_box": [left, top, right, bottom]}
    }

With several targets (``targets`` or ``explain_top_k``) the document carries ``"explanations"``, a list
of bodies shaped like ``"explanation"`` above, in the order the targets were asked (``explain_top_k``:
most probable first), instead of ``"explanation"``; one target keeps the shape above.

``/predictions`` answers ``{"model", "predictions"}``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .engine import METHODS, SELECTIONS, check_sparsity
from .errors import InvalidOption, shown
from .imaging import (DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, VISUALIZATION_OPTIONS, ImageLimits,
                      VisualizationSettings)

OUTPUTS = ("heatmap", "overlay", "attribution", "pathway")
DEFAULT_OUTPUTS = ("heatmap", "pathway")
MEDIA_TYPES = {"heatmap": "image/png", "overlay": "image/png", "attribution": "application/x-npy"}
OPTION_NAMES = ("method", "target", "targets", "explain_top_k", "top_k", "sparsity", "reduce", "outputs",
                "selection") + tuple(VISUALIZATION_OPTIONS)


@dataclass(frozen=True)
class Limits:
    """Server-side defaults and caps (from the model's ``model-config.yaml``); the CLI uses the defaults."""

    default_top_k: int = 5
    max_top_k: int = 100
    allowed_methods: Optional[tuple] = None  # None: every registered method
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    min_image_side: int = DEFAULT_MIN_SIDE
    image_formats: tuple = DEFAULT_FORMATS
    default_outputs: tuple = DEFAULT_OUTPUTS
    default_colormap: Optional[str] = None  # None: inferno, or pink_green with polarity both
    #: Larger photos get an overlay scaled down to this many pixels. A photo's overlay PNG takes up to ~3.5 bytes
    #: per pixel inline in JSON (base64 of a PNG of grain or noise), so 8 MP stays under the response limit below.
    max_overlay_pixels: int = 8_000_000
    #: Largest body one request may answer, in bytes: at most TorchServe's ``max_response_size``
    #: (config.properties), past which TorchServe drops the worker's connection and restarts it. A larger answer
    #: (several overlays, many instances) is refused as ``response_too_large`` instead.
    max_response_bytes: int = 32 * 2**20
    method_caps: dict = field(default_factory=dict)  # e.g. {"steps": 64}: maxima of numeric method options
    #: Forward + backward passes one request may cost, summed over its images (None: no limit). With
    #: ``method_caps`` alone, 16 KServe instances at 128 integrated-gradient steps would buy 2,000 passes.
    max_passes_per_request: Optional[int] = None
    #: Classes one image may ask to explain (``targets`` or ``explain_top_k``); each costs a full explanation.
    max_targets_per_request: int = 10

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]]) -> "Limits":
        config = dict(config or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown explanation limits in model config: {', '.join(sorted(unknown))}")
        for key in ("allowed_methods", "image_formats", "default_outputs"):
            if key in config and config[key] is not None:
                config[key] = tuple(config[key])
        return cls(**config)

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(self.max_image_pixels, self.min_image_side, self.image_formats)


@dataclass(frozen=True)
class RequestOptions:
    method: Optional[str] = None
    target: Any = None
    #: Several classes to explain (indices or labels, in the order asked); empty: ``target`` alone.
    targets: tuple = ()
    #: Explain the K most probable classes (None: not asked).
    explain_top_k: Optional[int] = None
    top_k: int = 5
    sparsity: Optional[float] = None
    reduce: Optional[str] = None
    outputs: tuple = DEFAULT_OUTPUTS
    visualization: VisualizationSettings = VisualizationSettings()
    selection: Optional[str] = None
    method_options: tuple = ()  # (name, raw value) pairs; typed and checked against the chosen method later

    @property
    def several_targets(self) -> bool:
        """The request asked for a list of explanations (``targets`` or ``explain_top_k``), even of one."""
        return bool(self.targets) or self.explain_top_k is not None


def declared_option_names() -> set:
    """Options that some registered method or selection strategy declares (``steps``, ``signed``, ...)."""
    names = set()
    for registry in (METHODS, SELECTIONS):
        for name in registry.names():
            names.update(registry.get(name).options)
    return names


def option_name(key: str) -> str:
    """The option a field, header or flag names: case-insensitive, ``-`` = ``_``, without ``X-Explain-``."""
    key = key.strip().lower().replace("-", "_")
    return key[len("x_explain_"):] if key.startswith("x_explain_") else key


def combine_options(*sources: tuple) -> dict:
    """The options of one request gathered from several places (``(where, mapping)`` pairs: its headers, its
    body's fields, KServe ``parameters``) as one mapping.

    An option given twice (in two places, or spelled two ways in one: ``top_k`` and ``Top-K``) with different
    values is refused, naming both: no place silently wins over another. The same value twice is fine.
    """
    combined: dict = {}
    seen: dict = {}
    for where, options in sources:
        for key, value in options.items():
            name = option_name(str(key))
            if name in seen:
                first_where, first_key, first_value = seen[name]
                if _same_value(first_value, value):
                    continue
                raise InvalidOption(
                    f"{name} is given twice with different values: {first_key} = {shown(first_value)} ({first_where}) "
                    f"and {key} = {shown(value)} ({where}); give it once", code="conflicting_options")
            seen[name] = (where, key, value)
            combined[key] = value
    return combined


def _same_value(a: Any, b: Any) -> bool:
    """Equal as sent, whatever the place's spelling: ``281`` in JSON and ``"281"`` in a header, ``true`` and
    ``"TRUE"``, ``0.5`` and ``".50"``, a JSON list and the same items separated by commas."""
    return _canonical(a) == _canonical(b)


def _canonical(value: Any) -> Any:
    """One spelling of an option value for :func:`_same_value`: booleans as bool, numbers as float, lists (JSON,
    or text separated by commas) as tuples of such values, one item as itself; other text as it is."""
    value = _text(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                return text
        elif "," in text:
            value = text.split(",")
        elif text.lower() in ("true", "false"):
            return text.lower() == "true"
        else:
            try:
                return float(text)
            except ValueError:
                return text
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        items = tuple(_canonical(item) for item in value)
        return items[0] if len(items) == 1 else items
    return value


def _text(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidOption("option values must be UTF-8 text") from None
    return value.strip() if isinstance(value, str) else value


#: An integer as text: ASCII digits with at most one sign ("²" and "٣" pass ``str.isdigit`` but not ``int``), and
#: few enough digits that ``int`` accepts them (it refuses above 4300) and no count can overflow downstream.
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,18}")


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidOption(f"{name} must be an integer, not {shown(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        return int(value)
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        return int(value)
    raise InvalidOption(f"{name} must be an integer, not {shown(value)}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidOption(f"{name} must be a number, not {shown(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidOption(f"{name} must be a number, not {shown(value)}") from None
    if not math.isfinite(number):
        raise InvalidOption(f"{name} must be a finite number, not {shown(value)}")
    return number


def parse_options(raw: Mapping[str, Any], limits: Limits = Limits()) -> RequestOptions:
    """Validated options from loosely typed fields (text from multipart or headers, JSON values, CLI flags)."""
    raw = combine_options(("the request", raw))  # one option spelled two ways with two values is refused
    values: dict = {}
    method_options: dict = {}
    declared = None
    for key, value in raw.items():
        name = option_name(str(key))
        if name not in OPTION_NAMES:
            declared = declared if declared is not None else declared_option_names()
            if name not in declared:
                raise InvalidOption(f"unknown option {shown(key)}; options are: "
                                    f"{', '.join(list(OPTION_NAMES) + sorted(declared))}", code="unknown_option")
            value = _text(value)
            if value is not None and value != "":
                method_options[name] = value
            continue
        value = _text(value)
        if value is None or value == "":
            continue
        values[name] = value

    method = values.get("method")
    if method is not None:
        if not isinstance(method, str):
            raise InvalidOption(f"method must be a string, not {shown(method)}")
        if method not in METHODS:
            raise InvalidOption(f"unknown method {shown(method)}; choose one of: "
                                f"{', '.join(limits.allowed_methods or METHODS.names())}", code="unknown_method")
        if limits.allowed_methods is not None and method not in limits.allowed_methods:
            raise InvalidOption(f"method {shown(method)} is not enabled on this server; enabled: "
                                f"{', '.join(limits.allowed_methods)}", code="method_not_allowed")

    top_k = _integer("top_k", values.get("top_k", limits.default_top_k))
    if not 1 <= top_k <= limits.max_top_k:
        raise InvalidOption(f"top_k must be between 1 and {limits.max_top_k}, got {top_k}", code="invalid_top_k")

    sparsity = values.get("sparsity")
    if sparsity is not None:
        sparsity = check_sparsity(_number("sparsity", sparsity))

    outputs = values.get("outputs", limits.default_outputs)
    if isinstance(outputs, str):
        outputs = [o for o in (part.strip() for part in outputs.split(",")) if o]
    if not isinstance(outputs, (list, tuple)) or not all(isinstance(o, str) for o in outputs):
        raise InvalidOption(f"outputs must be a list of names (or a comma-separated string), not {shown(outputs)}")
    for o in outputs:
        if o not in OUTPUTS:
            raise InvalidOption(f"unknown output {o!r}; outputs are: {', '.join(OUTPUTS)}", code="unknown_output")

    visualization = VisualizationSettings.from_options(
        {"colormap": limits.default_colormap,
         **{name: values[name] for name in VISUALIZATION_OPTIONS if name in values}})

    target = values.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (str, int, float))):
        raise InvalidOption(f"target must be a class index or a label name, not {shown(target)}", code="invalid_target")
    targets = _targets(values.get("targets"), limits)
    explain_top_k = values.get("explain_top_k")
    if explain_top_k is not None:
        explain_top_k = _integer("explain_top_k", explain_top_k)
        if explain_top_k < 1:
            raise InvalidOption(f"explain_top_k must be at least 1, got {explain_top_k}")
        if explain_top_k > limits.max_targets_per_request:
            raise InvalidOption(f"explain_top_k = {explain_top_k} asks for more classes than this server explains "
                                f"per image ({limits.max_targets_per_request})", code="too_many_targets")
    given = [name for name, value in (("target", target), ("targets", targets), ("explain_top_k", explain_top_k))
             if value not in (None, ())]
    if len(given) > 1:
        raise InvalidOption(f"give one of target, targets and explain_top_k, not {' and '.join(given)}",
                            code="conflicting_targets")

    for name in ("reduce", "selection"):
        if name in values and not isinstance(values[name], str):
            raise InvalidOption(f"{name} must be a string, not {shown(values[name])}")

    return RequestOptions(
        method=method, target=target, top_k=top_k, sparsity=sparsity, reduce=values.get("reduce"),
        outputs=tuple(dict.fromkeys(outputs)), visualization=visualization, targets=targets,
        explain_top_k=explain_top_k, selection=values.get("selection"),
        method_options=tuple(sorted(method_options.items())))


def _targets(value: Any, limits: Limits) -> tuple:
    """``targets`` as a tuple of indices or labels: a JSON list, or comma-separated text (multipart, headers,
    the CLI). Duplicates and unknown labels are found once the model resolves them (the service)."""
    if value is None:
        return ()
    if isinstance(value, str) and value.strip().startswith("["):  # a JSON list sent as text (a header, a form field)
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidOption(f"targets {shown(value)} is not a JSON list; give indices and labels as [967, "
                                "\"cup\"] or separated by commas", code="invalid_target") from None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
        if any(not part for part in value):
            raise InvalidOption("targets must be class indices or labels separated by commas, with none empty",
                                code="invalid_target")
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidOption(f"targets must be a non-empty list of class indices or labels, not {shown(value)}",
                            code="invalid_target")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise InvalidOption(f"each of targets must be a class index or a label name, not {shown(item)}",
                                code="invalid_target")
    if len(value) > limits.max_targets_per_request:
        raise InvalidOption(f"{len(value)} targets for one image; this server explains at most "
                            f"{limits.max_targets_per_request} per image", code="too_many_targets")
    return tuple(value)


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------


def top_predictions(probabilities: np.ndarray, labels: Optional[Sequence[str]], k: int) -> list:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = min(k, probabilities.shape[0])
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"index": int(i), "label": labels[i] if labels else str(int(i)),
             "probability": round(float(probabilities[i]), 6)} for i in order]


def prediction_document(model: str, probabilities: np.ndarray, labels, top_k: int) -> dict:
    return {"model": model, "predictions": top_predictions(probabilities, labels, top_k)}


def explanation_document(model: str, explanation, labels, options: RequestOptions, preprocessing: dict) -> dict:
    """The JSON document for one explanation, without the binary outputs (see :func:`inline_outputs` and
    :func:`path_outputs`)."""
    target = {
        "index": explanation.target,
        "label": explanation.target_label,
        "probability": round(explanation.target_probability, 6),
    }
    if explanation.pathway_probability is not None:
        target["pathway_probability"] = round(explanation.pathway_probability, 6)
    body = {
        "method": explanation.method,
        "target": target,
        "reduce": explanation.reduce,
        "attribution_scale": explanation.attribution_scale,
        "notes": list(explanation.notes),
    }
    if explanation.pathway is not None and "pathway" in options.outputs:
        body["pathway"] = explanation.pathway
    return {
        "model": model,
        "predictions": top_predictions(explanation.probabilities, labels, options.top_k),
        "explanation": body,
        "preprocessing": preprocessing,
    }


def several_targets_document(documents: Sequence[dict]) -> dict:
    """One image's document for several targets: the single-target documents' bodies as ``explanations``."""
    first = documents[0]
    combined = {key: value for key, value in first.items() if key != "explanation"}
    combined["explanations"] = [d["explanation"] for d in documents]
    # keep the single document's key order: explanations where explanation was
    order = [("explanations" if key == "explanation" else key) for key in first]
    return {key: combined[key] for key in order}


def inline_outputs(body: dict, artifacts: Mapping[str, bytes]) -> dict:
    """Server form: each binary output base64-encoded inside an explanation body (a new dict)."""
    body = dict(body)
    for name, data in artifacts.items():
        body[name] = {"media_type": MEDIA_TYPES[name], "encoding": "base64",
                      "data": base64.b64encode(data).decode("ascii")}
    return body


def path_outputs(body: dict, paths: Mapping[str, str]) -> dict:
    """CLI form: each binary output written to a file beside the document (a new dict)."""
    body = dict(body)
    for name, path in paths.items():
        body[name] = {"media_type": MEDIA_TYPES[name], "path": path}
    return body
