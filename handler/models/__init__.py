"""Models described as data: architecture, weights, preprocessing, class names and explanation defaults.

Serving another classifier means writing a spec (a JSON file, or the CLI's
``--arch/--weights/--labels``), not code. Built-in specs live beside this file
as ``<name>.json``.

Architectures are ``"timm:<name>"``, ``"torchvision:<name>"`` or ``"handler:<name>"``
(this project's own, :mod:`.architectures`); a bare name is looked up in
torchvision, then timm. Weights come from a state-dict file
(always loaded with ``weights_only=True``), a file shipped inside an installed
Python package, or nowhere (random initialisation, for speed benchmarks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..engine import DEFAULT_PASS_BATCH, DEFAULTS, METHODS, REDUCTIONS, Explainer, InputNormalisation, check_sparsity, \
    resolve_pass_batch
from ..engine.explainer import NotAClassifier, classifier_logits
from ..errors import ExplainError, UnknownModel
from ..provenance import state_dict_sha256
from .preparation import UNPREPARED, FrozenPredictor, Preparation, PreparationError, PreparationReport, \
    example_input, frozen_predictor, prepare_model

SPEC_DIR = Path(__file__).parent
logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The spec names something that cannot be built or loaded; the message says what."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise per channel.

    ``jpeg_draft``: decode a large JPEG at the smallest of libjpeg's scales (1/2, 1/4, 1/8) that keeps its
    shorter side at least four times ``resize``, then resize as usual (:func:`handler.imaging.decode_image`).
    A phone photo (11-16 megapixels) decodes and preprocesses 1.6-2.6 times faster, and its predictions move
    no more than saving the photo at another JPEG quality moves them (benchmarks/speed/results/decode-cpu.md).
    ``false``: every image is decoded at full size, as torchvision's reference pipeline does.
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    jpeg_draft: bool = True

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std), "jpeg_draft": self.jpeg_draft}

    def check(self) -> None:
        """:class:`ModelLoadError` naming the first field that no image could be preprocessed with."""
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelLoadError(f"preprocessing.{name} must be a positive whole number of pixels, "
                                     f"not {value!r}")
        if self.crop > self.resize:
            raise ModelLoadError(f"preprocessing.crop ({self.crop}) must be at most preprocessing.resize "
                                 f"({self.resize}): the crop is taken from the resized image")
        if self.interpolation not in INTERPOLATIONS:
            raise ModelLoadError(f"preprocessing.interpolation must be one of {', '.join(INTERPOLATIONS)}, not "
                                 f"{self.interpolation!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise ModelLoadError(f"preprocessing.{name} must be a list of 3 numbers (red, green, blue), not "
                                     f"{list(value) if isinstance(value, tuple) else value!r}")
        if any(v <= 0 for v in self.std):
            raise ModelLoadError(f"preprocessing.std must be positive, not {list(self.std)}")
        if not isinstance(self.jpeg_draft, bool):
            raise ModelLoadError(f"preprocessing.jpeg_draft must be true or false, not {self.jpeg_draft!r}")


#: The resampling filters a spec's ``preprocessing.interpolation`` may name (torchvision's).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Weights:
    """Where a state dict comes from and how its keys meet the architecture's."""

    file: Optional[str] = None  # a path (relative paths resolve against the spec's folder)
    package: Optional[str] = None  # with ``file``: a path inside this installed package
    match: str = "name"  # "name": keys must agree; "order": same tensors in the same order, names differ
    seed: int = 0  # random initialisation seed when no file is given

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


#: What a spec's ``defaults`` may set (what :func:`explainer_for` reads).
DEFAULT_FIELDS = ("method", "sparsity", "reduce")


def default_settings(sparsity: Optional[float] = None) -> dict:
    """A spec's explanation defaults when it names none: the engine's (:data:`handler.engine.DEFAULTS`)."""
    return {"method": DEFAULTS.method, "sparsity": DEFAULTS.sparsity if sparsity is None else sparsity,
            "reduce": DEFAULTS.reduce}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    weights: Weights = field(default_factory=Weights)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: Any = "imagenet"  # "imagenet", a list of names, or {"file": path}
    num_classes: Optional[int] = None
    defaults: dict = field(default_factory=lambda: default_settings())
    description: str = ""
    #: Samples per engine pass, padded (reproducible explanations); ``"auto"``: by device
    #: (:func:`~handler.engine.resolve_pass_batch`); None: the batch's own size.
    pass_batch: Union[int, str, None] = DEFAULT_PASS_BATCH
    prepare: Preparation = field(default_factory=Preparation)  # inference preparation (handler.models.preparation)
    base_dir: Optional[str] = None  # where relative paths resolve; not serialised

    @classmethod
    def from_dict(cls, data: dict, base_dir: Union[str, Path, None] = None) -> "ModelSpec":
        """A spec from its JSON form; :class:`ModelLoadError` names the first field that is wrong, so a spec
        no image could be served with fails here, before anything is built from it."""
        if not isinstance(data, dict):
            raise ModelLoadError(f"a model spec is a JSON object of fields, not {type(data).__name__}")
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)} - {"$schema"}
        if unknown:
            raise ModelLoadError(f"model spec has unknown fields: {', '.join(sorted(unknown))}")
        for required in ("name", "architecture"):
            if not data.get(required):
                raise ModelLoadError(f"model spec needs a {required!r}")
            if not isinstance(data[required], str):
                raise ModelLoadError(f"model spec: {required} must be a string, not {data[required]!r}")
        num_classes = data.get("num_classes")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ModelLoadError(f"model spec: num_classes must be a positive whole number, not {num_classes!r}")
        data.pop("$schema", None)
        weights = data.pop("weights", None) or {}
        prep = data.pop("preprocessing", None) or {}
        for name, value in (("weights", weights), ("preprocessing", prep), ("defaults", data.get("defaults") or {})):
            if not isinstance(value, dict):
                raise ModelLoadError(f"model spec: {name} must be an object of fields, not {value!r}")
        base = published_preprocessing(data["architecture"]) or Preprocessing()
        try:
            weights = Weights(**weights)
            prep = dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in prep.items()})
        except TypeError as err:
            raise ModelLoadError(f"model spec: {err}") from None
        prep.check()
        if weights.match not in ("name", "order"):
            raise ModelLoadError(f"weights.match must be 'name' or 'order', not {weights.match!r}")
        defaults = default_settings()
        given_defaults = data.pop("defaults", None) or {}
        unknown = set(given_defaults) - set(DEFAULT_FIELDS)
        if unknown:
            raise ModelLoadError(f"model spec: unknown defaults {', '.join(sorted(unknown))}; defaults are "
                                 f"{', '.join(DEFAULT_FIELDS)}")
        defaults.update(given_defaults)
        try:
            check_sparsity(defaults["sparsity"])
            METHODS.get(defaults["method"])
            REDUCTIONS.get(defaults["reduce"])
        except ExplainError as err:
            raise ModelLoadError(f"model spec: defaults: {err}") from None
        try:
            preparation = Preparation.from_value(data.pop("prepare", None))
        except (PreparationError, TypeError) as err:
            raise ModelLoadError(f"model spec: {err}") from None
        try:
            resolve_pass_batch(data.get("pass_batch", DEFAULT_PASS_BATCH), "cpu")
        except ValueError as err:
            raise ModelLoadError(f"model spec: {err}") from None
        return cls(weights=weights, preprocessing=prep, defaults=defaults, prepare=preparation,
                   base_dir=str(base_dir) if base_dir is not None else None, **data)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ModelSpec":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"model spec file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"model spec {path} is not valid JSON: {err}") from None
        return cls.from_dict(data, base_dir=path.parent)

    def to_dict(self) -> dict:
        out = {
            "name": self.name,
            "architecture": self.architecture,
            "weights": self.weights.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "labels": self.labels,
            "defaults": dict(self.defaults),
        }
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        if self.description:
            out["description"] = self.description
        if self.pass_batch != DEFAULT_PASS_BATCH:
            out["pass_batch"] = self.pass_batch
        if self.prepare != Preparation():
            out["prepare"] = False if self.prepare == UNPREPARED else self.prepare.to_dict()
        return out

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def resolve(self, relative: str) -> Path:
        path = Path(relative)
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        return path


def builtin_names() -> list:
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


def get_spec(name_or_path: Union[str, Path, ModelSpec]) -> ModelSpec:
    """A built-in spec by name, or a spec file by path."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    text = str(name_or_path)
    builtin = SPEC_DIR / f"{text}.json"
    if "/" not in text and builtin.is_file():
        return ModelSpec.from_file(builtin)
    if text.endswith(".json") or Path(text).is_file():
        return ModelSpec.from_file(text)
    raise UnknownModel(
        f"unknown model {text!r}: built-in models are {', '.join(builtin_names())}; "
        "or give a model spec .json file, or --arch with --weights")


def spec_for_architecture(
    architecture: str,
    *,
    weights: Optional[str] = None,
    labels: Any = "imagenet",
    name: Optional[str] = None,
    preprocessing: Optional[Preprocessing] = None,
    sparsity: Optional[float] = None,
) -> ModelSpec:
    """A spec for a torchvision or timm architecture with a user's state dict (or random weights)."""
    labels_value: Any = labels
    if isinstance(labels, (str, Path)) and str(labels) != "imagenet":
        labels_value = {"file": str(Path(labels).resolve())}
    return ModelSpec(
        name=name or architecture.split(":")[-1],
        architecture=architecture,
        weights=Weights(file=str(Path(weights).resolve())) if weights else Weights(),
        preprocessing=preprocessing or published_preprocessing(architecture) or Preprocessing(),
        labels=labels_value,
        defaults=default_settings(sparsity=sparsity),
    )


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def imagenet_labels() -> list:
    """torchvision's ImageNet class names (each synset's first name, made unique: see :data:`IMAGENET_RENAMED`)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


#: ImageNet names that two classes share; torchvision renamed one of each pair to tell them apart
#: (134 "crane" -> "crane bird", 639 "maillot" -> "maillot tank suit"). The shared name stays a label of
#: the other class, so on its own it is ambiguous: a target "crane" is refused with both matches named.
IMAGENET_RENAMED = {"crane": (134, 517), "maillot": (638, 639)}


def label_aliases(labels: Optional[Sequence[str]]) -> dict:
    """Names that stand for more than one of the model's classes (lower case -> class indices).

    Decided by the class names themselves, not by how the spec refers to them: an archive's spec names the
    ImageNet classes through its own ``labels.json``, and ``--labels`` may give them as a file.
    """
    if labels is None or len(labels) != 1000 or list(labels) != imagenet_labels():
        return {}
    return {name: list(indices) for name, indices in IMAGENET_RENAMED.items()}


def load_labels(spec: ModelSpec) -> Optional[list]:
    labels = spec.labels
    if labels is None:
        return None
    if labels == "imagenet":
        return imagenet_labels()
    if isinstance(labels, list):
        return [str(x) for x in labels]
    if isinstance(labels, dict) and "file" in labels:
        return read_labels_file(spec.resolve(labels["file"]))
    raise ModelLoadError(f"labels must be 'imagenet', a list of names or {{'file': path}}, not {labels!r}")


def read_labels_file(path: Union[str, Path]) -> list:
    """Class names from a text file (one per line) or JSON (a list, or TorchServe's ``index_to_name.json``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"labels file not found: {path}") from None
    except IsADirectoryError:
        raise ModelLoadError(f"labels file {path} is a directory; give the file of class names") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"labels file {path} is not UTF-8 text (one class name per line, or JSON)") from None
    except OSError as err:
        raise ModelLoadError(f"cannot read labels file {path}: {err.strerror or err}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ModelLoadError(f"labels file {path} is not valid JSON: {err}") from None
        if isinstance(data, list):
            return [str(x) for x in data]
        if isinstance(data, dict):
            try:
                items = sorted(((int(k), v) for k, v in data.items()), key=lambda kv: kv[0])
            except ValueError:
                raise ModelLoadError(f"{path}: keys of a labels mapping must be class indices") from None
            if [k for k, _ in items] != list(range(len(items))):
                raise ModelLoadError(f"{path}: class indices must run 0..{len(items) - 1} without gaps")
            return [str(v[-1] if isinstance(v, list) else v) for _, v in items]
        raise ModelLoadError(f"{path}: labels JSON must be a list or an index-to-name mapping")
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_architecture(architecture: str) -> tuple:
    """``(source, name)``: where ``architecture`` comes from, ``"torchvision"``, ``"timm"`` or ``"handler"`` (a bare
    name is torchvision's if torchvision has it, else timm's); :class:`ModelLoadError` if nobody has it."""
    source, _, name = architecture.rpartition(":")
    if source == "handler":
        from .architectures import ARCHITECTURES

        if name not in ARCHITECTURES:
            raise ModelLoadError(f"this project defines no architecture {name!r}; it defines: "
                                 f"{', '.join(ARCHITECTURES.names())}")
        return source, name
    if source in ("", "torchvision"):
        import torchvision

        if name in torchvision.models.list_models():
            return "torchvision", name
        if source == "torchvision":
            raise ModelLoadError(f"torchvision has no model {name!r}")
    if source in ("", "timm"):
        import timm

        if timm.is_model(name):
            return "timm", name
        raise ModelLoadError(f"no torchvision or timm architecture is called {name!r}")
    raise ModelLoadError(f"architecture must be 'torchvision:<name>', 'timm:<name>', 'handler:<name>' or a bare name, "
                         f"not {architecture!r}")


def build_architecture(architecture: str, num_classes: Optional[int]) -> nn.Module:
    source, name = resolve_architecture(architecture)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if source == "handler":
        from .architectures import ARCHITECTURES

        return ARCHITECTURES.get(name)(num_classes)
    if source == "torchvision":
        import torchvision

        extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, **extra, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def published_preprocessing(architecture: str) -> Optional[Preprocessing]:
    """The preprocessing ``architecture``'s published ImageNet weights were evaluated with: torchvision's default
    weights' transforms, or timm's pretrained configuration (the tag named after a ``.``, else the default one;
    resize = ``floor(crop / crop_pct)``, as timm's own eval transform; its ``squash`` and ``border`` crop modes,
    7 % of its tags, get the centre crop, the only one this preprocessing does). None for this project's
    architectures or where neither library says. What a spec without ``preprocessing`` gets: a fine-tuned ViT needs its
    ``mean = std = 0.5`` and an Inception its 299-pixel crop, not the ImageNet-ResNet defaults."""
    try:
        source, name = resolve_architecture(architecture)
    except ModelLoadError:
        return None
    if source == "torchvision":
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, AttributeError):
            return None
        t = weights.transforms()  # a transform object: nothing is downloaded
        return Preprocessing(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]),
                             interpolation=_interpolation_name(t.interpolation.value),
                             mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std))
    if source == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(name)
        if cfg is None or not cfg.input_size:
            return None
        crop = int(cfg.input_size[-1])
        crop_pct = float(cfg.crop_pct or 1.0)
        return Preprocessing(resize=int(math.floor(crop / crop_pct)), crop=crop,
                             interpolation=_interpolation_name(cfg.interpolation),
                             mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std))
    return None


def _interpolation_name(name: Optional[str]) -> str:
    """One of the preprocessing's interpolations (``bilinear`` for what it does not offer, e.g. timm's ``random``)."""
    return name if name in INTERPOLATIONS else "bilinear"


def weights_path(spec: ModelSpec) -> Optional[Path]:
    w = spec.weights
    if w.file is None:
        return None
    if w.package is not None:
        try:
            root = importlib.resources.files(w.package)
        except ModuleNotFoundError:
            raise ModelLoadError(f"the weights package {w.package!r} is not installed") from None
        return Path(str(root.joinpath(w.file)))
    return spec.resolve(w.file)


def read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"weights file not found: {path}") from None
    except IsADirectoryError:
        raise ModelLoadError(f"weights file {path} is a directory; give the state dict's file") from None
    except Exception as err:  # noqa: BLE001 - unpickling refused, corrupt file, ...: torch's text is many lines
        raise ModelLoadError(f"cannot read {path} as a state dict of tensors (it is loaded with weights_only=True; "
                             f"save model.state_dict(), not the model): {_first_line(err)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors")
    return state


def _first_line(err: BaseException) -> str:
    """What a failed ``torch.load`` found, in one line: the unpickler's own finding (``Unsupported global: GLOBAL
    torch.nn.modules.linear.Linear``) without the paragraphs of advice around it, some of it unsafe."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
        text = text.split(" was not an allowed global")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 160 else text[:159] + "…"


def apply_state_dict(model: nn.Module, state: dict, match: str, labels: Optional[list] = None) -> None:
    """Load ``state`` into ``model``; a state dict that does not fit raises :class:`ModelLoadError` with a
    one-line message (``load_state_dict``'s own error is a multi-line ``RuntimeError``). With ``labels``
    (the class names the head was sized for), a head that does not fit says so in those terms."""
    own = model.state_dict()
    if match == "order":
        if len(own) != len(state):
            raise ModelLoadError(f"weights list {len(state)} tensors, the architecture {len(own)}")
        mapped = {}
        for (key, target), (src_key, value) in zip(own.items(), state.items()):
            if target.shape != value.shape:
                raise ModelLoadError(f"weights tensor {src_key} {tuple(value.shape)} does not fit "
                                     f"{key} {tuple(target.shape)}")
            mapped[key] = value
        state = mapped
    wrong = [(key, tuple(state[key].shape), tuple(own[key].shape)) for key in state
             if key in own and state[key].shape != own[key].shape]
    if wrong:
        if labels is not None:
            for key, theirs, ours in wrong:
                if ours and ours[0] == len(labels) and theirs and theirs[0] != len(labels):
                    raise ModelLoadError(f"the class names list {len(labels)} classes but the weights' classifier "
                                         f"{key} has {theirs[0]} outputs: give {theirs[0]} class names")
        key, theirs, ours = wrong[0]
        raise ModelLoadError(f"weights do not fit the architecture: {len(wrong)} tensor(s) differ in shape "
                             f"(e.g. {key}: {theirs} in the weights, {ours} in the architecture)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            "weights do not match the architecture: "
            + (f"missing {len(missing)} (e.g. {missing[0]}) " if missing else "")
            + (f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else ""))


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: nn.Module
    labels: Optional[list]
    label_aliases: dict = field(default_factory=dict)  # see label_aliases()
    #: SHA-256 of the weights as loaded: of the weights file's bytes, or (no file: a seeded random
    #: initialisation) of the state dict (:func:`~handler.provenance.state_dict_sha256`). Taken at load,
    #: before any preparation of the model for speed, so it names the weights, not a derived network.
    weights_sha256: Optional[str] = None
    preparation: PreparationReport = field(default_factory=PreparationReport)
    #: What serves predictions when it is not the explained ``module``: the prepared model, or its frozen
    #: TorchScript copy; see :func:`load_model`'s ``predictor``.
    predictor: Optional[nn.Module] = None
    #: Whether ``module`` (what explanations run) is the prepared model.
    explains_prepared: bool = False

    @property
    def explained_preparation(self) -> str:
        """What was done to the explained model, for the provenance record: ``"none"`` or the report's summary
        (the preparation changes an explanation's bits, as a thread count or a pass shape does)."""
        if not self.explains_prepared or not self.preparation.changed:
            return "none"
        return self.preparation.summary()


def load_model(spec: Union[str, Path, ModelSpec], device: Union[str, torch.device] = "cpu", *,
               prepare: Optional[bool] = None, predictor: bool = False) -> LoadedModel:
    """Build the architecture, load its weights, freeze it and put it in eval mode on ``device``, and prepare
    it for inference as the spec's ``prepare`` entry says (:mod:`.preparation`: BatchNorm folded into its
    convolution, the faster memory format, a frozen copy; exact in eval mode, every activation site kept).

    ``predictor=True`` (the server) builds what serves predictions (``LoadedModel.predictor``); explanations
    run the trained model unless the spec's ``prepare.explain_prepared`` says otherwise. ``prepare=False``
    loads the model as trained whatever the spec says (the evaluation suite re-initialises layers, BatchNorms
    included); None follows the spec.
    The weights file is read as it is; preparation changes the module in memory only.
    """
    spec = get_spec(spec)
    labels = load_labels(spec)
    num_classes = spec.num_classes or (len(labels) if labels else None)
    if spec.weights.file is None:
        torch.manual_seed(spec.weights.seed)
    try:
        model = build_architecture(spec.architecture, num_classes)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"cannot build {spec.architecture!r}: {err}") from None
    path = weights_path(spec)
    if path is not None:
        apply_state_dict(model, read_state_dict(path), spec.weights.match,
                         labels if spec.num_classes is None else None)
        weights_sha256 = file_sha256(path)
    else:
        weights_sha256 = state_dict_sha256(model)
    model.eval().requires_grad_(False).to(device)
    settings = UNPREPARED if prepare is False else spec.prepare
    device = torch.device(device)
    check_serves(model, spec, device)
    report, serving = PreparationReport(), None
    explains_prepared = False
    if settings != UNPREPARED and (predictor or settings.explain_prepared):
        x = example_input(spec.preprocessing.crop, device)
        prepared, report = prepare_model(model, settings, x)  # ``model`` itself when nothing is to change
        prepared.requires_grad_(False)
        if predictor and (settings.predict == "frozen" or (settings.predict == "auto" and device.type == "cpu")):
            serving = frozen_predictor(prepared, x, settings.resolved_memory_format(prepared, device),
                                       largest_batch=1 if settings.predict == "auto" else None)
        if predictor and serving is None and prepared is not model and not settings.explain_prepared:
            serving = prepared
        if settings.explain_prepared:
            explains_prepared, model = prepared is not model, prepared
        logger.info("model %s prepared for inference: %s; predictions: %s; explanations: %s model", spec.name,
                    report.summary(), _describe_predictor(serving),
                    "the prepared" if settings.explain_prepared and not report.reverted else "the trained")
    return LoadedModel(spec, model, labels, label_aliases(labels), weights_sha256, report, serving, explains_prepared)


def check_serves(model: nn.Module, spec: ModelSpec, device: Union[str, torch.device]) -> None:
    """:class:`ModelLoadError` unless ``model`` runs on the input its preprocessing makes (one ``crop`` x ``crop``
    image) and returns a classifier's logits: such a model would fail every request, so it fails at load (in
    ``pathway-archive``, when the archive is built), naming the cause."""
    crop = spec.preprocessing.crop
    try:
        with torch.no_grad():
            output = model(example_input(crop, device))
    except Exception as err:  # noqa: BLE001 - any failure here is the spec's, reported as such
        text = str(err).strip().splitlines()
        raise ModelLoadError(f"{spec.architecture!r} fails on a {crop}x{crop} image, the size its preprocessing "
                             f"makes (preprocessing.crop): {type(err).__name__}"
                             + (f": {text[0]}" if text else "")) from None
    try:
        classifier_logits(output, 1)
    except NotAClassifier as err:
        raise ModelLoadError(f"{spec.architecture!r} is not a classifier: {err}") from None


def _describe_predictor(serving: Optional[nn.Module]) -> str:
    if serving is None:
        return "the explained model"
    if isinstance(serving, FrozenPredictor):
        if serving.largest_batch is None:
            return "a frozen TorchScript copy"
        return f"a frozen TorchScript copy up to {serving.largest_batch} image(s), the eager prepared model above"
    return "a prepared copy"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def explainer_for(loaded: LoadedModel, module: Optional[nn.Module] = None, *, device=None, memory_budget=None,
                  max_batch_size: Optional[int] = None, pass_batch: Optional[int] = None) -> Explainer:
    """The explainer a model spec describes (its defaults, class names and input normalisation); the server,
    the CLI and the evaluation suite all build theirs here. ``module``: another network of the same spec
    (the evaluation's randomised copies); default, the loaded one. ``pass_batch``: the fixed pass shape
    (see :class:`~handler.engine.Explainer`); the service passes the spec's ``pass_batch``, the evaluation
    none (its batches are its own)."""
    defaults, prep = loaded.spec.defaults, loaded.spec.preprocessing
    return Explainer(
        loaded.module if module is None else module,
        labels=loaded.labels,
        label_aliases=loaded.label_aliases,
        device=device,
        default_method=defaults.get("method", DEFAULTS.method),
        default_sparsity=defaults.get("sparsity", DEFAULTS.sparsity),
        default_reduce=defaults.get("reduce", DEFAULTS.reduce),
        normalisation=InputNormalisation(prep.mean, prep.std),
        memory_budget=memory_budget,
        max_batch_size=max_batch_size,
        pass_batch=pass_batch,
    )
