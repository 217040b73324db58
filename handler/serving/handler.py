"""The TorchServe handler: decode each request of a batch, call the service, encode each answer.

Explain-or-predict is decided per request (its ``explain`` header), never for the
whole batch from request 0; all explain instances of a batch go through the
engine together, each with its own target and options; a request that is wrong
on its own gets its own 4xx and the rest of the batch is answered normally.

One request's way: :mod:`.requests` types the transport's text (no rules), the
service validates it once and decodes its images (:meth:`ExplanationService.prepare
<handler.service.ExplanationService.prepare>`), serves the batch's jobs and
isolates a failing one (:meth:`~handler.service.ExplanationService.run`), and
:mod:`.responses` encodes the answer for the request's protocol, with the HTTP
status of an error's code.

Behind a stock KServe envelope (``service_envelope=kserve|kservev2``) the rows are
the instances of request 0 (see :mod:`.requests`); each instance's document still
carries its predictions next to its explanation. Metrics go through
:class:`~.metrics.HandlerMetrics`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


from ..errors import BadRequest, ExplainError, InternalError, ResponseTooLarge
from ..models import ModelSpec, load_model
from ..schema import Limits
from ..service import ExplanationService, Job
from . import responses
from .metrics import HandlerMetrics
from .worker import apply_worker_threads, choose_device, worker_threads
from .requests import ENVELOPE_V1, ParsedRequest, Protocol, envelope_of, parse_envelope, parse_request

logger = logging.getLogger(__name__)

SPEC_FILE = "model_spec.json"


@dataclass
class Plan:
    """One HTTP request on its way: what the transport parsed, and the service's job for it."""

    request: ParsedRequest
    job: Job

    @property
    def error(self) -> Optional[ExplainError]:
        return self.job.error

    def answer(self, model_name: str, request_id: Optional[str]) -> responses.Answer:
        documents = [r.inline() for r in self.job.results] if self.job.explain else self.job.results
        return responses.Answer(documents, self.job.explain, model_name, request_id)


class PathwayHandler:
    """One instance per TorchServe worker."""

    def __init__(self):
        self.service: Optional[ExplanationService] = None
        self.metrics: HandlerMetrics = HandlerMetrics(None, "unknown")
        self.initialized = False
        self.max_instances = 16

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = Path(props.get("model_dir") or ".")
        config = dict(getattr(context, "model_yaml_config", None) or {})
        section = dict(config.get("pathway") or {})
        limits = Limits.from_config(section.get("limits"))
        self.max_instances = int(section.get("max_instances_per_request", 16))
        device = choose_device(props.get("gpu_id"), section.get("device", "auto"))
        apply_worker_threads(*worker_threads(section, config))
        spec = ModelSpec.from_file(model_dir / SPEC_FILE)
        self.model_name = context.model_name
        self.metrics = HandlerMetrics(getattr(context, "metrics", None), self.model_name)
        # pass_batch: samples per engine pass, padded, so an explanation does not depend on what TorchServe
        # batched it with; null: the batch's own size. Absent: the model spec's (see README "Reproducible").
        self.service = ExplanationService(load_model(spec, device=device, predictor=True), device=device,
                                          limits=limits, observer=self.metrics,
                                          pass_batch=section.get("pass_batch", "default"))
        self.initialized = True
        logger.info("pathway handler ready: model %s on %s (engine from %s)", spec.name, device,
                    Path(__file__).resolve().parents[1])

    def handle(self, data, context) -> list:
        started = time.perf_counter()
        if not data:  # only an envelope does this: a body without instances
            return self._envelope_error(BadRequest("the request has no instances", code="missing_image"), context)
        envelope = envelope_of(data, context)
        if envelope is not None:
            return self._handle_envelope(envelope, data, context, started)
        self.metrics.batch(len(data))
        stages: dict = defaultdict(float)
        plans = []
        for i, row in enumerate(data):
            t = time.perf_counter()
            plans.append(self._plan_row(row, request_headers(context, i)))
            stages["decode", plans[-1].job.kind] += time.perf_counter() - t
        self.service.run([plan.job for plan in plans])
        out = []
        for i, plan in enumerate(plans):
            t = time.perf_counter()
            out.append(self._encode_checked(i, plan, context))
            stages["encode", plan.job.kind] += time.perf_counter() - t
            self._record(plan, out[-1], started)
        for (stage, kind), seconds in stages.items():
            self.metrics.stage(stage, kind, seconds)
        explain = sum(1 for p in plans if p.job.explain)
        logger.info("pathway batch: %d requests (%d explain, %d predict, %d failed) in %.1f ms", len(data), explain,
                    len(data) - explain, sum(1 for p in plans if p.error is not None),
                    1000 * (time.perf_counter() - started))
        return out

    def _handle_envelope(self, kind: str, rows: list, context, started: float) -> list:
        """One request's instances, parsed by a stock envelope; per-instance documents for it to wrap."""
        requests = len(getattr(context, "request_ids", None) or {}) or 1
        if requests > 1:
            # The stock envelopes read request 0 and return one response for the whole batch, which
            # TorchServe then fails as a size mismatch: say why instead of computing a lost answer.
            from ts.utils.util import PredictionException

            raise PredictionException(
                f"service_envelope={kind} answers only the first request of a batch ({requests} were batched): "
                "set batchSize: 1 for this model, or serve without an envelope (the handler reads KServe "
                "v1/v2 bodies itself and batches them)", 500)
        self.metrics.batch(1)
        t = time.perf_counter()
        plan = self._plan(parse_envelope(kind, rows, request_headers(context, 0), max_instances=self.max_instances))
        self.metrics.stage("decode", plan.job.kind, time.perf_counter() - t)
        self.service.run([plan.job])
        t = time.perf_counter()
        if plan.error is not None:
            out = self._envelope_error(plan.error, context)
        else:
            context.set_response_content_type(0, responses.JSON)
            answer = plan.answer(self.model_name, None)
            if kind == ENVELOPE_V1:
                out = responses.encode_envelope_v1(answer)
            else:  # kservev2 names each returned item after context.input_names (read after we return)
                context.input_names, out = responses.encode_envelope_v2(answer)
            size, limit = len(responses.compact(out)), self.service.limits.max_response_bytes
            if size > limit:
                plan.job.error = too_large(size, limit, plan)
                out = self._envelope_error(plan.error, context)
        self.metrics.stage("encode", plan.job.kind, time.perf_counter() - t)
        self._record(plan, responses.compact(out), started)
        logger.info("pathway batch: 1 request through the %s envelope (%d instances, %s, %s) in %.1f ms", kind,
                    len(plan.job.images), plan.job.kind, "failed" if plan.error is not None else "ok",
                    1000 * (time.perf_counter() - started))
        return out

    def _plan_row(self, row, headers: dict) -> Plan:
        """One request of the batch read and prepared; a bug met while reading it fails it alone."""
        try:
            return self._plan(parse_request(row, headers, max_instances=self.max_instances))
        except Exception as err:  # noqa: BLE001 - isolated to this request
            logger.error("reading a request failed", exc_info=True)
            failed = ParsedRequest(Protocol.PLAIN, explain=False, error=InternalError(
                f"reading the request failed: {type(err).__name__}: {err}"))
            return Plan(failed, Job(failed.explain, error=failed.error))

    def _encode_checked(self, index: int, plan: Plan, context) -> Any:
        """:meth:`_encode`, or the request's own error when its answer cannot be sent.

        TorchServe drops the worker's connection (and restarts the worker, failing its other requests) when
        one answer exceeds ``max_response_size``; so an answer above ``max_response_bytes`` becomes
        ``response_too_large``, and a bug while encoding one answer fails that answer alone.
        """
        try:
            body = self._encode(index, plan, context)
        except Exception as err:  # noqa: BLE001 - isolated to this request
            logger.error("encoding a %s answer failed", plan.job.kind, exc_info=True)
            plan.job.error = InternalError(f"encoding the answer failed: {type(err).__name__}: {err}")
            return self._encode(index, plan, context)
        limit = self.service.limits.max_response_bytes
        if plan.error is None and len(body) > limit:
            plan.job.error = too_large(len(body), limit, plan)
            return self._encode(index, plan, context)
        return body

    def _plan(self, request: ParsedRequest) -> Plan:
        """The service validates the request once and decodes its images; a transport error stands as it is."""
        if request.error is not None:
            return Plan(request, Job(request.explain, error=request.error))
        job = self.service.prepare([i.image for i in request.instances], [i.options for i in request.instances],
                                   explain=request.explain, extra_outputs=("overlay",) if request.wants_png else ())
        return Plan(request, job)

    def _encode(self, index: int, plan: Plan, context) -> Any:
        if plan.error is not None:
            status = responses.http_status(plan.error)
            context.set_response_status(status, responses.reason_phrase(status), index)
            context.set_response_content_type(index, responses.JSON)
            return json.dumps(responses.error_body(plan.error))
        if plan.request.wants_png:
            # several targets: one strip of labelled overlays, and each header a comma-separated list in order
            parts = plan.job.results[0].targets
            targets = [p.document["explanation"]["target"] for p in parts]
            context.set_response_content_type(index, "image/png")
            context.set_response_header(index, "X-Explain-Target-Index", ",".join(str(t["index"]) for t in targets))
            context.set_response_header(index, "X-Explain-Target-Label",
                                        ",".join(_ascii(t["label"]).replace(",", " ") for t in targets))
            context.set_response_header(index, "X-Explain-Target-Probability",
                                        ",".join(f"{t['probability']:.6f}" for t in targets))
            return plan.job.results[0].overlay_png()
        context.set_response_content_type(index, responses.JSON)
        request_id = (plan.request.request_id or context.get_request_id(index)) \
            if plan.request.protocol is Protocol.KSERVE_V2 else None
        answer = plan.answer(self.model_name, request_id)
        return responses.compact(responses.ENCODERS[plan.request.protocol](answer))

    @staticmethod
    def _envelope_error(error: ExplainError, context) -> list:
        status = responses.http_status(error)
        context.set_response_status(status, responses.reason_phrase(status), 0)
        context.set_response_content_type(0, responses.JSON)
        if getattr(context, "input_names", None) is not None:  # kservev2: one BYTES output named "error"
            context.input_names = ["error"]
            return [[json.dumps(responses.error_body(error))]]
        return [responses.error_body(error)]

    def _record(self, plan: Plan, body: Any, started: float) -> None:
        """Metrics of one answered request."""
        kind, error = plan.job.kind, plan.error
        self.metrics.request(kind, "rejected" if error is not None else "ok")
        self.metrics.response_size(kind, len(body) if isinstance(body, (bytes, str)) else 0)
        if error is not None:
            self.metrics.rejected(error.code, responses.http_status(error))
            return
        if plan.job.explain:
            # the latency once per request (all its images and targets share one method); the sparsity per
            # explanation, each target's pathway having its own
            parts = [part for r in plan.job.results for part in r.targets]
            self.metrics.explain_latency(parts[0].document["explanation"]["method"], time.perf_counter() - started)
            for result in parts:
                if result.realised_sparsity is not None:
                    self.metrics.realised_sparsity(result.document["explanation"]["method"], result.realised_sparsity)


def too_large(size: int, limit: int, plan: Plan) -> ResponseTooLarge:
    """What to ask for instead of an answer larger than the server sends."""
    asked = []
    if plan.job.explain:
        outputs = {o for v in plan.job.options for o in v.options.outputs}
        if "overlay" in outputs and not plan.request.wants_png:
            asked.append("no overlay in JSON (Accept: image/png returns the overlay alone, as a PNG)")
        if "attribution" in outputs:
            asked.append("no attribution")
        if any(v.explanations > 1 for v in plan.job.options):
            asked.append("fewer targets")
    if len(plan.job.images) > 1:
        asked.append("fewer images per request")
    return ResponseTooLarge(
        f"the answer would be {size / 2**20:.1f} MiB, more than this server sends ({limit / 2**20:.1f} MiB, "
        f"max_response_bytes); ask for {' or '.join(asked or ['a smaller photo'])}")


def request_headers(context, index: int) -> dict:
    """Request ``index``'s headers; empty where TorchServe has none (an envelope's instances beyond request 0)."""
    try:
        return context.get_all_request_header(index) or {}
    except (IndexError, KeyError, TypeError, AttributeError):
        return {}


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


_HANDLER = PathwayHandler()


def handle(data, context):
    """TorchServe's function entry point: called once with ``data=None`` to initialise, then per batch.

    After that, ``data`` is ``None`` or empty only behind an envelope, for a body without instances.
    """
    if not _HANDLER.initialized:
        _HANDLER.initialize(context)
        if data is None:
            return None
    return _HANDLER.handle(data, context)

