"""The request boundary: image bytes and raw options in, response documents and rendered outputs out.

Both front ends go through here. The TorchServe handler turns HTTP into
``(image bytes, raw options)`` per request and documents back into HTTP; the
CLI does the same with files. One request's way through:

1. :meth:`ExplanationService.prepare` validates it once (the options typed by
   :func:`~handler.schema.parse_options`, the model's rules and its target by
   :meth:`Explainer.validate <handler.engine.Explainer.validate>`, the
   operator's caps and pass budget here), decodes its images, and returns a
   :class:`Job` (or a job carrying the request's error);
2. :meth:`ExplanationService.run` serves jobs together (predictions in one
   engine call, explanations in another) and is the one place a failing request
   is isolated: when a group fails, each job is retried alone, so only the job
   that cannot be served gets an error;
3. each result is a prediction document or an :class:`ExplainResult`.

Several targets per image (``targets``, ``explain_top_k``) are expanded here, never in a loop of passes:
the image's row is repeated once per target in the one batch given to
:meth:`Explainer.explain_requests <handler.engine.Explainer.explain_requests>`, beside the other
requests' rows, and the explanations are packaged back into one document per image.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .engine import BatchSplit, ExplainRequest, ValidRequest, is_out_of_memory, is_positive_int, \
    release_cached_memory, resolve_pass_batch
from .errors import ExplainError, InternalError, InvalidOption, InvalidTarget, OutOfMemory
from .imaging import (IMAGE_SHA256, Preprocessor, decode_image, full_photo, npy_bytes, open_image, png_bytes,
                      render_heatmap, render_overlay, render_strip)
from .models import LoadedModel, ModelSpec, explainer_for, load_model
from .provenance import (Verification, attribution_sha256, device_kind, document_differences, package_version,
                         raw_options, resolved_options, sha256_hex, source_revision)
from .schema import (Limits, RequestOptions, explanation_document, inline_outputs, parse_options,
                     prediction_document, several_targets_document)

logger = logging.getLogger(__name__)

#: The passes of an explanation before any costly option: a pathway gradient's forward and backward.
BASE_PASSES = 2


def request_of(options: RequestOptions) -> ExplainRequest:
    """The engine's request for one set of parsed options."""
    return ExplainRequest(target=options.target, method=options.method, sparsity=options.sparsity,
                          reduce=options.reduce, selection=options.selection, options=options.method_options)


@contextlib.contextmanager
def cpu_threads(count: Optional[int]):
    """torch's intra-op threads at ``count`` for the block (None: unchanged). A CPU kernel splits its
    reductions by thread, so an explanation's bits depend on the thread count as on the pass shape: a
    verification recomputes with the count the document records."""
    if count is None or count == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _short(digest) -> str:
    return f"{digest[:12]}…" if isinstance(digest, str) else repr(digest)


class ServiceObserver:
    """What the service reports about its work, for a front end's metrics; this default ignores it.

    The TorchServe handler passes one that records Prometheus metrics
    (``handler/serving/metrics.py``); the CLI passes none.
    """

    def stage(self, stage: str, kind: str, seconds: float, images: int) -> None:
        """``stage`` ("engine": the model's passes, "render": PNG/.npy outputs) took ``seconds`` for ``images``."""

    def batch_split(self, split: BatchSplit) -> None:
        """A batch was retried in smaller parts (see :mod:`handler.engine.events`)."""


@dataclass(frozen=True)
class Validated:
    """One image's options after the single validation step; the engine trusts ``request`` as it is."""

    options: RequestOptions  # what the response documents need (top_k, outputs, visualization, ...)
    request: ValidRequest
    #: With ``targets``: one request per class asked, in order (resolved, no two the same); else empty.
    targets: tuple = ()

    @property
    def explanations(self) -> int:
        """How many explanations the image costs: one per target."""
        return len(self.targets) or self.options.explain_top_k or 1


@dataclass
class Job:
    """One request's images, validated; :meth:`ExplanationService.run` fills ``results`` or ``error``."""

    explain: bool
    options: list = field(default_factory=list)  # Validated, one per image
    images: list = field(default_factory=list)  # decoded PIL images
    results: list = field(default_factory=list)  # ExplainResult (explain) or prediction document, per image
    error: Optional[ExplainError] = None

    @property
    def kind(self) -> str:
        return "explain" if self.explain else "predict"


@dataclass
class ExplainResult:
    """One image's explanation; with several targets, ``parts`` holds one single-target result per target
    (in the order of the document's ``explanations``) and the fields below describe the first."""

    document: dict  # the response document, without binary outputs
    artifacts: dict = field(default_factory=dict)  # output name -> bytes (PNG / .npy)
    attribution: Optional[np.ndarray] = None  # [H, W] float32, signed, max |·| = 1
    realised_sparsity: Optional[float] = None  # of the pathway followed (also when the summary is not returned)
    parts: list = field(default_factory=list)

    @classmethod
    def several(cls, parts: Sequence["ExplainResult"]) -> "ExplainResult":
        first = parts[0]
        document = several_targets_document([p.document for p in parts])
        if "provenance" in document:  # one record for the image; the attribution digest of each target, in order
            document["provenance"] = dict(document["provenance"], attribution_sha256=[
                p.document["provenance"]["attribution_sha256"] for p in parts])
        return cls(document, first.artifacts, first.attribution, first.realised_sparsity, list(parts))

    @property
    def targets(self) -> list:
        """The single-target results: ``parts``, or this result itself."""
        return self.parts or [self]

    def overlay_png(self) -> bytes:
        """What ``Accept: image/png`` returns: the overlay, or with several targets one strip of the overlays
        side by side in the order asked, each under a caption with its class index, label and probability."""
        if not self.parts:
            return self.artifacts["overlay"]
        captions = []
        for part in self.parts:
            target = part.document["explanation"]["target"]
            captions.append(f"{target['index']} {target['label']} ({target['probability']:.3f})")
        return png_bytes(render_strip([Image.open(io.BytesIO(p.artifacts["overlay"])) for p in self.parts], captions))

    def inline(self) -> dict:
        """The document with its binary outputs base64-encoded, as the server returns it."""
        if not self.parts:
            return dict(self.document, explanation=inline_outputs(self.document["explanation"], self.artifacts))
        return dict(self.document, explanations=[inline_outputs(body, p.artifacts) for body, p in
                                                 zip(self.document["explanations"], self.parts)])


def _naming_image(index: int, count: int, step, *args):
    """``step(*args)`` for image ``index`` of a request of ``count``; an error it raises names that image when
    the request has several (a KServe request's instances), so the caller knows which one to fix."""
    try:
        return step(*args)
    except ExplainError as err:
        if count > 1:
            err.args = (f"image {index + 1} of {count} (instances[{index}]): {err}",)
        raise


class ExplanationService:
    def __init__(self, loaded: LoadedModel, device: Union[str, torch.device] = "cpu", limits: Limits = Limits(),
                 observer: Optional[ServiceObserver] = None, *, memory_budget=None,
                 max_batch_size: Optional[int] = None, pass_batch: Union[int, None, str] = "default"):
        """``memory_budget`` (bytes, ``"4GiB"``, ``"60%"``; default: from the device's free memory) and
        ``max_batch_size`` bound one engine pass; larger batches are split (see :class:`~handler.engine.Explainer`).
        ``pass_batch``: samples per pass, padded, so an explanation is the same bits however it was batched
        (``None``: the batch's own size; ``"auto"``: by device, :func:`~handler.engine.explainer.resolve_pass_batch`;
        default: the model spec's)."""
        self.spec: ModelSpec = loaded.spec
        self.weights_sha256 = loaded.weights_sha256
        self.preparation = loaded.explained_preparation
        self.name = loaded.spec.name
        self.labels = loaded.labels
        self.limits = limits
        self.preprocessor = Preprocessor(loaded.spec.preprocessing)
        self.explainer = explainer_for(loaded, device=device, memory_budget=memory_budget,
                                       max_batch_size=max_batch_size,
                                       pass_batch=resolve_pass_batch(
                                           loaded.spec.pass_batch if pass_batch == "default" else pass_batch, device))
        self.predictor = loaded.predictor  # a frozen copy for predictions only, or None: the explainer's model
        self.observer = observer or ServiceObserver()
        self.explainer.on_batch_split = self.observer.batch_split

    @classmethod
    def from_spec(cls, spec, device="cpu", limits: Limits = Limits(), *, memory_budget=None,
                  max_batch_size: Optional[int] = None, pass_batch: Union[int, None, str] = "default"
                  ) -> "ExplanationService":
        return cls(load_model(spec, device=device), device=device, limits=limits, memory_budget=memory_budget,
                   max_batch_size=max_batch_size, pass_batch=pass_batch)

    @property
    def device(self) -> torch.device:
        return self.explainer.device

    def decode(self, data: bytes) -> Image.Image:
        """The request's bytes as the model's image: a large JPEG at a reduced scale where the spec allows it
        (:attr:`~handler.imaging.Preprocessor.least_decoded_side`), the same for the server, the CLI and
        ``verify``."""
        return decode_image(data, self.limits.image, self.preprocessor.least_decoded_side)

    # -- the one validation step ------------------------------------------------

    def validate(self, raw: Sequence[Mapping], *, explain: bool, extra_outputs: tuple = ()) -> list:
        """One :class:`Validated` per image of a request, or the :class:`ExplainError` of the whole request.

        The options are typed (:func:`~handler.schema.parse_options`), checked against the model
        (:meth:`~handler.engine.Explainer.validate`, target included), the request's passes against the
        operator's budget (explanations only), and each costly option against the operator's caps.
        Explanation options sent with a prediction are checked too: a bad target is an error there as well.
        """
        parsed = [_naming_image(i, len(raw), parse_options, options, self.limits) for i, options in enumerate(raw)]
        if extra_outputs:
            parsed = [replace(o, outputs=o.outputs + tuple(x for x in extra_outputs if x not in o.outputs))
                      for o in parsed]
        validated = [_naming_image(i, len(parsed), self._validate_one, o) for i, o in enumerate(parsed)]
        if explain:
            self._check_budget(validated)
        return validated

    def _validate_one(self, options: RequestOptions) -> Validated:
        """The model's rules and the operator's caps for one image's options, its targets resolved."""
        request = self.explainer.validate(request_of(options))
        self._check_caps(request)
        targets = []
        for target in options.targets:
            index = self.explainer.resolve_target(target)
            if index < 0:
                raise InvalidTarget(f"targets must name classes, not {target!r} (use explain_top_k for the most "
                                    "probable ones)")
            for earlier in targets:
                if earlier.class_index == index:
                    raise InvalidTarget(f"targets {earlier.target!r} and {target!r} both name class {index} "
                                        f"({self.explainer.label(index)!r}); name each class once",
                                        code="duplicate_target")
            targets.append(replace(request, target=target, class_index=index))
        if options.explain_top_k is not None and self.explainer.num_classes is not None \
                and options.explain_top_k > self.explainer.num_classes:
            raise InvalidOption(f"explain_top_k = {options.explain_top_k}, but this model has only "
                                f"{self.explainer.num_classes} classes", code="too_many_targets")
        return Validated(options, request, tuple(targets))

    def prepare(self, images: Sequence[bytes], raw: Sequence[Mapping], *, explain: bool,
                extra_outputs: tuple = ()) -> Job:
        """A validated, decoded :class:`Job`; what is wrong with the request is in its ``error``, never raised."""
        job = Job(explain)
        try:
            job.options = self.validate(raw, explain=explain, extra_outputs=extra_outputs)
            job.images = [_naming_image(i, len(images), self.decode, data) for i, data in enumerate(images)]
        except ExplainError as err:
            job.error = err
        except MemoryError:
            job.error = OutOfMemory("out of memory while decoding the image; send a smaller one")
        except Exception as err:  # noqa: BLE001 - a bug met by this request alone: the batch goes on without it
            logger.error("preparing a %s request failed", job.kind, exc_info=True)
            job.error = InternalError(f"reading the request failed: {type(err).__name__}: {err}")
        return job

    def explanation_passes(self, options: Union[RequestOptions, ValidRequest]) -> int:
        """About how many forward + backward passes explaining one image costs, from the options' declared costs."""
        request = options if isinstance(options, ValidRequest) else self.explainer.validate(request_of(options))
        given = dict(request.options)
        specs = self.explainer.option_specs(request.method, request.selection)
        return BASE_PASSES + sum(spec.passes * int(given.get(name, spec.default))
                                 for name, spec in specs.items() if spec.passes)

    def _check_budget(self, validated: Sequence[Validated]) -> None:
        """Refuse one request (all its images) whose explanation passes exceed ``max_passes_per_request``.

        Every target counts (an image with three targets costs three explanations), and ``explain_top_k``
        adds the one forward that finds the classes. Bounds the work a batch can hold a worker for
        (TorchServe kills a worker past ``responseTimeout``).
        """
        limit = self.limits.max_passes_per_request
        if limit is None:
            return
        passes = sum(self.explanation_passes(v.request) * v.explanations + (v.options.explain_top_k is not None)
                     for v in validated)
        if passes > limit:
            targets = sum(v.explanations for v in validated)
            raise InvalidOption(
                f"this request costs about {passes} forward/backward passes ({len(validated)} image(s), "
                f"{targets} target(s)); this server allows {limit} per request: send fewer images or targets "
                "per request, or fewer steps, samples, "
                "iterations or copies", code="over_limit")

    def _check_caps(self, request: ValidRequest) -> None:
        for name, value in request.options:
            cap = self.limits.method_caps.get(name)
            if cap is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
                raise InvalidOption(f"{name} = {value} exceeds this server's limit of {cap}", code="over_limit")

    def _checked(self, options: Sequence[RequestOptions]) -> tuple:
        """``(results, validated, valid)``: each image's options validated alone, its error in its slot."""
        results: list = [None] * len(options)
        checked, valid = [], []
        for i, o in enumerate(options):
            try:
                checked.append(self._validate_one(o))
            except ExplainError as err:
                results[i] = err
                continue
            valid.append(i)
        return results, checked, valid

    # -- serving ----------------------------------------------------------------

    def run(self, jobs: Sequence[Job]) -> None:
        """Serve every job without an error: predictions in one engine call, explanations in another.

        The one place a failing request is isolated: when a group fails (out of memory, or a request error
        the engine finds only while running, such as a Grad-CAM layer name), each of its jobs is retried
        alone, and a job that fails alone gets its own error: its request error, ``out_of_memory``, or
        ``internal_error`` for a bug (logged with its traceback). The engine itself retries a pass that ran
        out of memory in smaller batches; what reaches this point failed even so.
        """
        for explain in (False, True):
            members = [job for job in jobs if job.error is None and job.explain is explain]
            if not members:
                continue
            try:
                self._run_group(members, explain)
            except Exception as err:  # noqa: BLE001 - isolated below, request by request
                if len(members) == 1:
                    members[0].error = self._failure(err, members[0].kind)
                    continue
                if not isinstance(err, ExplainError):
                    release_cached_memory(self.device)
                oom = is_out_of_memory(err)
                if oom:
                    self.observer.batch_split(BatchSplit(size=sum(len(j.images) for j in members),
                                                         parts=tuple(len(j.images) for j in members),
                                                         source="handler"))
                log = logger.warning if isinstance(err, ExplainError) else logger.error
                log("batch of %d %s requests failed%s; retrying them one by one: %s", len(members),
                    members[0].kind, " (out of memory)" if oom else "", err, exc_info=not isinstance(err, ExplainError))
                for job in members:
                    try:
                        self._run_group([job], explain)
                    except Exception as alone:  # noqa: BLE001 - isolated to this request
                        job.error = self._failure(alone, job.kind)

    def _failure(self, err: BaseException, kind: str) -> ExplainError:
        """The error of a job that failed on its own (called inside its ``except`` block, for the traceback)."""
        if isinstance(err, ExplainError):
            return err
        release_cached_memory(self.device)
        logger.error("a %s request failed on its own", kind, exc_info=True)
        if is_out_of_memory(err):
            return OutOfMemory("out of memory while serving this request; retry later, or with fewer images or "
                               "smaller outputs")
        what = "explanation" if kind == "explain" else "prediction"
        return InternalError(f"the {what} failed: {type(err).__name__}: {err}")

    def _run_group(self, jobs: Sequence[Job], explain: bool) -> None:
        images = [image for job in jobs for image in job.images]
        options = [o for job in jobs for o in job.options]
        results = self._explain(images, options, np.float16) if explain else self._predict(images, options)
        start = 0
        for job in jobs:
            job.results = results[start:start + len(job.images)]
            start += len(job.images)

    def _predict(self, images: Sequence[Image.Image], options: Sequence[Validated]) -> list:
        started = time.perf_counter()
        probabilities = self.probabilities(self.preprocessor.batch(images)).cpu().numpy()
        self.observer.stage("engine", "predict", time.perf_counter() - started, len(images))
        return [prediction_document(self.name, p, self.labels, o.options.top_k) for p, o in zip(probabilities, options)]

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``[B, K]``: from the frozen predictor where the model has one (built and checked
        against the eager model at load, :func:`~handler.models.load_model`), else from the explainer's model."""
        if self.predictor is None:
            return self.explainer.predict(x)
        with torch.inference_mode():
            return self.predictor(x.to(self.device)).double().softmax(dim=1)

    def _explain(self, images: Sequence[Image.Image], options: Sequence[Validated], attribution_dtype) -> list:
        started = time.perf_counter()
        x = self.preprocessor.batch(images)
        per_image = self._target_requests(x, options)
        rows = [i for i, requests in enumerate(per_image) for _ in requests]
        explanations = iter(self.explainer.explain_requests(x[rows], [r for rs in per_image for r in rs]))
        rendering = time.perf_counter()
        self.observer.stage("engine", "explain", rendering - started, len(images))
        results = []
        for image, o, requests in zip(images, options, per_image):
            parts = [self._render(image, o, next(explanations), attribution_dtype) for _ in requests]
            results.append(ExplainResult.several(parts) if o.options.several_targets else parts[0])
        self.observer.stage("render", "explain", time.perf_counter() - rendering, len(images))
        return results

    def _target_requests(self, x, options: Sequence[Validated]) -> list:
        """Each image's engine requests, one per target, in the order asked.

        ``explain_top_k`` needs the predicted classes before the explanation batch is formed: one forward
        (no gradients) over just those images finds them, ordered as the document's ``predictions``. The
        engine keeps one target per sample, so its batching, memory planning and out-of-memory splits
        apply to targets exactly as to images.
        """
        ranked = [i for i, o in enumerate(options) if o.options.explain_top_k is not None]
        top: dict = {}
        if ranked:
            probabilities = self.explainer.predict(x[ranked]).cpu().numpy()
            for i, p in zip(ranked, probabilities):
                top[i] = np.argsort(-p.astype(np.float64), kind="stable")[:options[i].options.explain_top_k]
        per_image = []
        for i, o in enumerate(options):
            if i in top:
                per_image.append([replace(o.request, target=int(c), class_index=int(c)) for c in top[i]])
            else:
                per_image.append(list(o.targets) or [o.request])
        return per_image

    # -- one batch of images, each with its own options (CLI, notebooks, tests) ---

    def predict(self, images: Sequence[Image.Image], options: Sequence[RequestOptions]) -> list:
        """One prediction document per image, or the :class:`ExplainError` that image's options alone caused.

        Explanation options sent with a prediction are checked like an explanation's (a bad target or
        method is an error here too, not silently ignored); valid ones have nothing to change.
        """
        results, checked, valid = self._checked(options)
        if valid:
            for i, document in zip(valid, self._predict([images[i] for i in valid], checked)):
                results[i] = document
        return results

    def explain(self, images: Sequence[Image.Image], options: Sequence[RequestOptions], *,
                attribution_dtype=np.float16) -> list:
        """One :class:`ExplainResult` per image, or the :class:`ExplainError` that image's options alone caused."""
        results, checked, valid = self._checked(options)
        if valid:
            explained = self._explain([images[i] for i in valid], checked, attribution_dtype)
            for i, result in zip(valid, explained):
                results[i] = result
        return results

    def explain_images(self, images: Sequence, **options) -> list:
        """Notebook convenience: paths, bytes or PIL images, and options as keywords (the server's names).

        Raises the first request error instead of returning it.
        """
        opts = parse_options(options, self.limits)
        decoded = [open_image(source, self.limits.image, self.preprocessor.least_decoded_side) for source in images]
        results = self.explain(decoded, [opts] * len(decoded), attribution_dtype=np.float32)
        for result in results:
            if isinstance(result, ExplainError):
                raise result
        return results

    def _render(self, image: Image.Image, validated: Validated, explanation, attribution_dtype) -> ExplainResult:
        options = validated.options
        settings = options.visualization
        document = explanation_document(
            self.name, explanation, self.labels, options, self.preprocessor.describe(image))
        unused = [name for name in ("sparsity", "selection") if getattr(options, name) is not None
                  and getattr(validated.request, name) is None]
        if unused:  # accepted (a client may keep them while switching methods), never silently
            document["explanation"]["notes"].append(
                f"{' and '.join(unused)} apply to methods that follow a pathway; {explanation.method} follows none, "
                "so they were not used")
        artifacts = {}
        if "heatmap" in options.outputs:
            artifacts["heatmap"] = png_bytes(
                render_heatmap(explanation.attribution, settings))
        if "overlay" in options.outputs:
            photo, box = full_photo(image, self.limits.image), self.preprocessor.window(image)
            scale = (self.limits.max_overlay_pixels / (photo.width * photo.height)) ** 0.5
            if scale < 1:  # keep responses bounded for very large photos
                photo = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))))
                box = type(box)(box.left * scale, box.top * scale, box.right * scale, box.bottom * scale)
                document["explanation"]["overlay_size"] = list(photo.size)
            artifacts["overlay"] = png_bytes(render_overlay(photo, explanation.attribution, box, settings))
        if "attribution" in options.outputs:
            artifacts["attribution"] = npy_bytes(explanation.attribution.astype(attribution_dtype))
        document["provenance"] = self.provenance(image, validated, explanation)
        realised = explanation.pathway.get("realised_sparsity") if explanation.pathway else None
        return ExplainResult(document, artifacts, explanation.attribution, realised)

    # -- provenance and verification ---------------------------------------------

    def provenance(self, image: Image.Image, validated: Validated, explanation) -> dict:
        """What produced ``explanation`` (see :mod:`handler.provenance`): enough to recompute and compare it."""
        request = validated.request
        return {
            "model": self.name,
            "weights_sha256": self.weights_sha256,
            "package": package_version(),
            "revision": source_revision(),
            "options": resolved_options(validated.options, request,
                                        self.explainer.option_specs(request.method, request.selection)),
            "preprocessing": self.spec.preprocessing.to_dict(),
            "image_sha256": image.info.get(IMAGE_SHA256),
            "device": device_kind(self.device),
            "torch": torch.__version__,
            "preparation": self.preparation,
            "torch_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "pass_batch": explanation.pass_batch,
            "attribution_sha256": attribution_sha256(explanation.attribution),
        }

    def verify(self, document: Mapping, image: bytes) -> Verification:
        """Recompute the explanation ``document`` describes from ``image`` (the bytes it was made from) and
        compare: the model, its weights, the code's version, the image, the options, and the attribution's
        digest (recomputed at the recorded pass shape and thread count); for a document with several targets,
        every target's class and digest, in order. Never raises for a bad document or image: the
        :class:`~handler.provenance.Verification` says what differs."""
        record = document.get("provenance") if isinstance(document, Mapping) else None
        if not isinstance(record, Mapping) or not isinstance(record.get("options"), Mapping):
            return Verification(False, "the document has no provenance record (made by an older version?)",
                                ("document",))
        several = "explanations" in document
        shown_bodies = document.get("explanations") if several else [document.get("explanation")]
        recorded = record.get("attribution_sha256")
        recorded = recorded if several else [recorded]
        if (not isinstance(shown_bodies, list) or not isinstance(recorded, list)
                or len(shown_bodies) != len(recorded) or not shown_bodies):
            return Verification(False, "the document's explanations and its provenance's attribution digests do "
                                       "not pair up one to one", ("document",))
        shown_bodies = [body if isinstance(body, Mapping) else {} for body in shown_bodies]
        found: list = []  # (what, detail)
        if record.get("model") != self.name:
            found.append(("model", f"model: the document's is {record.get('model')!r}, this check uses {self.name!r}"))
        if record.get("weights_sha256") != self.weights_sha256:
            found.append(("weights", f"weights: the document's have sha256 {_short(record.get('weights_sha256'))}, "
                                     f"these {_short(self.weights_sha256)}"))
        version = (package_version(), source_revision())
        if (record.get("package"), record.get("revision")) != version:
            found.append(("version", f"version: the document was made by {record.get('package')} at revision "
                                     f"{record.get('revision')}, this is {version[0]} at revision {version[1]}"))
        image_sha256 = sha256_hex(bytes(image))
        if record.get("image_sha256") != image_sha256:
            found.append(("image", f"image: the document was made from sha256 {_short(record.get('image_sha256'))}, "
                                   f"this image is {_short(image_sha256)}"))
        if record.get("preparation", "none") != self.preparation:
            found.append(("preparation", f"preparation: the document's model was {record.get('preparation', 'none')}"
                                         f", this one is {self.preparation}"))
        if record.get("preprocessing") != self.spec.preprocessing.to_dict():
            found.append(("preprocessing", "preprocessing: the document's differs from this model's"))
        options = record["options"]
        for shown in shown_bodies:
            # the pathway's selection is shown as the strategy ran it ("contribution_signed" for contribution with
            # signed=true), not as the option: the content comparison below checks it against the recomputation
            pathway = shown.get("pathway") if isinstance(shown.get("pathway"), Mapping) else {}
            for name, value in (("method", shown.get("method")), ("reduce", shown.get("reduce")),
                                ("sparsity", pathway.get("requested_sparsity"))):
                if value is not None and value != options.get(name):
                    found.append(("options", f"options: the explanation shows {name} {value!r}, its provenance "
                                             f"records {options.get(name)!r}"))
        recomputed = None
        pass_batch, threads = record.get("pass_batch"), record.get("torch_threads")
        try:
            for name, value in (("pass_batch", pass_batch), ("torch_threads", threads)):
                if value is not None and not is_positive_int(value):
                    raise InvalidOption(f"the recorded {name} {value!r} is not a positive integer")
            [validated] = self.validate([raw_options(options)], explain=True)
            decoded = self.decode(image)
        except ExplainError as err:
            found.append(("options" if isinstance(err, InvalidOption) else "image", f"cannot recompute: {err}"))
        else:
            with cpu_threads(threads if self.device.type == "cpu" else None):
                x = self.preprocessor.batch([decoded])
                [requests] = self._target_requests(x, [validated])
                explanations = self.explainer.explain_requests(x[[0] * len(requests)], requests,
                                                               pass_batch=pass_batch)
            request = validated.request
            resolved = resolved_options(validated.options, request,
                                        self.explainer.option_specs(request.method, request.selection))
            if resolved != dict(options):
                changed = sorted(k for k in set(resolved) | set(options) if resolved.get(k) != options.get(k))
                found.append(("options", f"options: {', '.join(changed)} resolve differently here"))
            digests = [attribution_sha256(e.attribution) for e in explanations]
            recomputed = digests if several else digests[0]
            if validated.options.several_targets != several:
                held, asked = ("a list of explanations", "one") if several else ("one explanation", "a list")
                found.append(("target", f"targets: the document holds {held}, its recorded options ask for {asked}"))
            elif len(explanations) != len(shown_bodies):
                found.append(("target", f"targets: the document explains {len(shown_bodies)} class(es), its recorded "
                                        f"options ask for {len(explanations)}"))
            for i, (shown, explanation, digest, kept) in enumerate(zip(shown_bodies, explanations, digests,
                                                                       recorded)):
                which = f" {i + 1} of {len(shown_bodies)}" if several else ""
                target = shown.get("target") if isinstance(shown.get("target"), Mapping) else {}
                if target.get("index") is not None and target.get("index") != explanation.target:
                    found.append(("target", f"target{which}: the document explains class {target.get('index')}, "
                                            f"the recomputation class {explanation.target}"))
                if digest != kept:
                    device = device_kind(self.device)
                    where = "" if record.get("device") == device else \
                        f" (made on {record.get('device')}, recomputed on {device})"
                    found.append(("attribution", f"attribution{which}: the document's has sha256 {_short(kept)}, "
                                                 f"the recomputed one {_short(digest)}{where}"))
            if not found:  # the record holds: is the rest of the document what that explanation shows?
                parts = [self._render(decoded, validated, e, np.float32) for e in explanations]
                remade = ExplainResult.several(parts) if several else parts[0]
                differences = document_differences(document, remade.inline())
                if differences:
                    more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
                    found.append(("content", "content: the document's " + ", ".join(differences[:4]) + more
                                  + " differ from what the recorded explanation shows"))
        if not found:
            what = (f"{len(recomputed)} attributions (sha256 {', '.join(_short(d) for d in recomputed)})" if several
                    else f"attribution sha256 {_short(recomputed)}")
            return Verification(True, f"verified: {what} recomputed from this image with the recorded weights, "
                                      f"version, options and pass shape {pass_batch}"
                                      + (f" on {threads} thread(s)" if threads else ""), (), recomputed)
        whats = tuple(dict.fromkeys(what for what, _ in found))
        return Verification(False, f"differs ({', '.join(whats)}): " + "; ".join(detail for _, detail in found),
                            whats, recomputed)

