"""The TorchServe handler: decode each request of a batch, call the service, encode each answer.

Explain-or-predict is decided per request (its ``explain`` header), never for the
whole batch from request 0; all explain instances of a batch go through the
engine together, each with its own target and options; a request that is wrong
on its own gets its own 4xx and the rest of the batch is answered normally.
A batch that fails as a whole (out of memory, say) is retried one request at a
time, so only the request that cannot be served fails.

Behind a stock KServe envelope (``service_envelope=kserve|kservev2``) the rows are
the instances of request 0 (see :mod:`.requests`); each instance's document still
carries its predictions next to its explanation. Metrics go through
:class:`~.metrics.HandlerMetrics`.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch

from ..engine import BatchSplit
from ..errors import ExplainError
from ..models import ModelSpec, load_model
from ..schema import Limits, parse_options
from ..service import ExplanationService, ExplainResult
from .metrics import HandlerMetrics
from .requests import ENVELOPE_V1, BadRequest, ParsedRequest, envelope_of, parse_envelope, parse_request

logger = logging.getLogger(__name__)

SPEC_FILE = "model_spec.json"
JSON = "application/json"


class InternalError(ExplainError):
    status = 500
    type = "internal_error"


class OutOfMemory(ExplainError):
    status = 507
    type = "out_of_memory"


class PathwayHandler:
    """One instance per TorchServe worker."""

    def __init__(self):
        self.service: Optional[ExplanationService] = None
        self.metrics: HandlerMetrics = HandlerMetrics(None, "unknown")
        self.initialized = False
        self.max_instances = 16

    # -- start-up -------------------------------------------------------------

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = Path(props.get("model_dir") or ".")
        config = dict(getattr(context, "model_yaml_config", None) or {})
        section = dict(config.get("pathway") or {})
        limits = Limits.from_config(section.get("limits"))
        self.max_instances = int(section.get("max_instances_per_request", 16))
        device = choose_device(props.get("gpu_id"), section.get("device", "auto"))
        threads = section.get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        spec = ModelSpec.from_file(model_dir / SPEC_FILE)
        self.model_name = context.model_name
        self.metrics = HandlerMetrics(getattr(context, "metrics", None), self.model_name)
        self.service = ExplanationService(load_model(spec, device=device), device=device, limits=limits,
                                          observer=self.metrics)
        self.initialized = True
        logger.info("pathway handler ready: model %s on %s (engine from %s)", spec.name, device,
                    Path(__file__).resolve().parents[1])

    # -- requests ---------------------------------------------------------------

    def handle(self, data, context) -> list:
        started = time.perf_counter()
        if not data:  # only an envelope does this: a body without instances
            return self._envelope_error(BadRequest("the request has no instances", type="missing_image"), context)
        envelope = envelope_of(data, context)
        if envelope is not None:
            return self._handle_envelope(envelope, data, context, started)
        self.metrics.batch(len(data))
        stages: dict = defaultdict(float)
        plans = []
        for i, row in enumerate(data):
            t = time.perf_counter()
            plans.append(self._prepare(parse_request(row, request_headers(context, i),
                                                     max_instances=self.max_instances)))
            stages["decode", _kind(plans[-1])] += time.perf_counter() - t
        self._run(plans)
        out = []
        for i, plan in enumerate(plans):
            t = time.perf_counter()
            out.append(self._encode(i, plan, context))
            stages["encode", _kind(plan)] += time.perf_counter() - t
            self._record(plan, out[-1], started)
        for (stage, kind), seconds in stages.items():
            self.metrics.stage(stage, kind, seconds)
        explain = sum(1 for p in plans if p["request"].explain)
        logger.info("pathway batch: %d requests (%d explain, %d predict, %d failed) in %.1f ms", len(data), explain,
                    len(data) - explain, sum(1 for p in plans if p["error"] is not None),
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
        plan = self._prepare(parse_envelope(kind, rows, request_headers(context, 0), max_instances=self.max_instances))
        self.metrics.stage("decode", _kind(plan), time.perf_counter() - t)
        self._run([plan])
        t = time.perf_counter()
        out = self._encode_envelope(kind, plan, context)
        self.metrics.stage("encode", _kind(plan), time.perf_counter() - t)
        self._record(plan, json.dumps(out, separators=(",", ":")), started)
        logger.info("pathway batch: 1 request through the %s envelope (%d instances, %s, %s) in %.1f ms", kind,
                    len(plan["images"]), _kind(plan), "failed" if plan["error"] is not None else "ok",
                    1000 * (time.perf_counter() - started))
        return out

    def _prepare(self, request: ParsedRequest) -> dict:
        """Parse options, check the request's cost, decode images; a failure marks the whole request."""
        plan = {"request": request, "error": request.error, "images": [], "options": [], "results": []}
        if plan["error"] is not None:
            return plan
        try:
            for instance in request.instances:
                options = parse_options(instance.options, self.service.limits)
                if request.wants_png and "overlay" not in options.outputs:
                    options = _with_outputs(options, options.outputs + ("overlay",))
                plan["options"].append(options)
            if request.explain:
                self.service.check_request_cost(plan["options"])
            plan["images"] = [self.service.decode(instance.image) for instance in request.instances]
        except ExplainError as err:
            plan["error"] = err
        except MemoryError:
            plan["error"] = OutOfMemory("out of memory while decoding the image; send a smaller one")
        return plan

    def _run(self, plans: list) -> None:
        """Predict instances in one batch, explain instances in one batch; on a failure, each request alone."""
        for explain in (False, True):
            members = [p for p in plans if p["error"] is None and p["request"].explain is explain]
            if not members:
                continue
            try:
                self._run_group(members, explain)
            except Exception as err:  # an engine failure, or a request error found only while running
                request_error = isinstance(err, ExplainError)
                oom = is_out_of_memory(err)
                if not request_error:
                    release_memory()
                if len(members) == 1:
                    if not request_error:
                        logger.exception("a %s request failed", "explain" if explain else "predict")
                    members[0]["error"] = _failure(err)
                    continue
                if oom:
                    self.service.observer.batch_split(BatchSplit(
                        size=sum(len(p["images"]) for p in members), parts=tuple(len(p["images"]) for p in members),
                        source="handler"))
                log = logger.warning if request_error else logger.exception
                log("batch of %d %s requests failed%s; retrying them one by one: %s", len(members),
                    "explain" if explain else "predict", " (out of memory)" if oom else "", err)
                for plan in members:
                    try:
                        self._run_group([plan], explain)
                    except Exception as alone:  # noqa: BLE001 - isolated to this request
                        if not isinstance(alone, ExplainError):
                            release_memory()
                            logger.exception("request failed on its own")
                        plan["error"] = _failure(alone)

    def _run_group(self, plans: list, explain: bool) -> None:
        images = [image for p in plans for image in p["images"]]
        options = [o for p in plans for o in p["options"]]
        results = self.service.explain(images, options) if explain else self.service.predict(images, options)
        start = 0
        for plan in plans:
            count = len(plan["images"])
            plan["results"] = results[start:start + count]
            start += count
            failed = next((r for r in plan["results"] if isinstance(r, ExplainError)), None)
            if failed is not None:
                plan["error"] = failed

    # -- responses --------------------------------------------------------------

    def _encode(self, index: int, plan: dict, context) -> Any:
        request: ParsedRequest = plan["request"]
        if plan["error"] is not None:
            error = plan["error"]
            context.set_response_status(error.status, _phrase(error.status), index)
            context.set_response_content_type(index, JSON)
            return json.dumps(error.to_dict())
        results = plan["results"]
        if request.wants_png:
            result: ExplainResult = results[0]
            target = result.document["explanation"]["target"]
            context.set_response_content_type(index, "image/png")
            context.set_response_header(index, "X-Explain-Target-Index", str(target["index"]))
            context.set_response_header(index, "X-Explain-Target-Label", _ascii(target["label"]))
            context.set_response_header(index, "X-Explain-Target-Probability", f"{target['probability']:.6f}")
            return result.artifacts["overlay"]
        context.set_response_content_type(index, JSON)
        documents = [r.inline() for r in results] if request.explain else results
        if request.protocol == "plain":
            body = documents[0]
        elif request.protocol == "kserve_v1":
            body = {"predictions": [d["predictions"] for d in documents]}
            if request.explain:
                body["explanations"] = documents
        else:
            body = self._kserve_v2(request, documents, context, index)
        return json.dumps(body, separators=(",", ":"))

    def _encode_envelope(self, kind: str, plan: dict, context) -> list:
        """The list the envelope wraps: v1 ``{"predictions"|"explanations": list}``, v2 named ``outputs``."""
        request: ParsedRequest = plan["request"]
        if plan["error"] is not None:
            return self._envelope_error(plan["error"], context)
        context.set_response_content_type(0, JSON)
        documents = [r.inline() for r in plan["results"]] if request.explain else plan["results"]
        if kind == ENVELOPE_V1:  # explanations: whole documents, each with its predictions beside the explanation
            return documents if request.explain else [d["predictions"] for d in documents]
        # kservev2 names each returned item after context.input_names (read after the handler returns)
        context.input_names = ["predictions"] + (["explanations"] if request.explain else [])
        out = [[json.dumps(d["predictions"], separators=(",", ":")) for d in documents]]
        if request.explain:
            out.append([json.dumps(d, separators=(",", ":")) for d in documents])
        return out

    @staticmethod
    def _envelope_error(error: ExplainError, context) -> list:
        context.set_response_status(error.status, _phrase(error.status), 0)
        context.set_response_content_type(0, JSON)
        if getattr(context, "input_names", None) is not None:  # kservev2: one BYTES output named "error"
            context.input_names = ["error"]
            return [[json.dumps(error.to_dict())]]
        return [error.to_dict()]

    def _record(self, plan: dict, body: Any, started: float) -> None:
        """Metrics of one answered request."""
        kind, error = _kind(plan), plan["error"]
        self.metrics.request(kind, "rejected" if error is not None else "ok")
        self.metrics.response_size(kind, len(body) if isinstance(body, (bytes, str)) else 0)
        if error is not None:
            self.metrics.rejected(error.type, error.status)
            return
        if plan["request"].explain:
            seconds = time.perf_counter() - started
            for result in plan["results"]:
                method = result.document["explanation"]["method"]
                self.metrics.explain_latency(method, seconds)
                if result.realised_sparsity is not None:
                    self.metrics.realised_sparsity(method, result.realised_sparsity)

    def _kserve_v2(self, request: ParsedRequest, documents: list, context, index: int) -> dict:
        outputs = [{"name": "predictions", "datatype": "BYTES", "shape": [len(documents)],
                    "data": [json.dumps(d["predictions"], separators=(",", ":")) for d in documents]}]
        if request.explain:
            outputs.append({"name": "explanations", "datatype": "BYTES", "shape": [len(documents)],
                            "data": [json.dumps(d, separators=(",", ":")) for d in documents]})
        return {"model_name": self.model_name, "id": request.request_id or context.get_request_id(index),
                "outputs": outputs}


def request_headers(context, index: int) -> dict:
    """Request ``index``'s headers; empty where TorchServe has none (an envelope's instances beyond request 0)."""
    try:
        return context.get_all_request_header(index) or {}
    except (IndexError, KeyError, TypeError, AttributeError):
        return {}


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA or host allocation failures (torch raises RuntimeError for the latter)."""
    if isinstance(err, MemoryError):
        return True
    cuda_oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if cuda_oom is not None and isinstance(err, cuda_oom):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _failure(err: BaseException) -> ExplainError:
    """The error document for a request that failed on its own (never raised: TorchServe would fail the batch)."""
    if isinstance(err, ExplainError):  # a request error the engine found only while running (e.g. a layer name)
        return err
    if is_out_of_memory(err):
        return OutOfMemory("out of memory while serving this request; retry later, or with fewer images or "
                           "smaller outputs")
    return InternalError(f"the explanation failed: {type(err).__name__}: {err}")


def _kind(plan: dict) -> str:
    return "explain" if plan["request"].explain else "predict"


def choose_device(gpu_id, preference: str = "auto") -> torch.device:
    """The worker's GPU when TorchServe assigned one and CUDA works, else the CPU."""
    if preference == "cpu" or gpu_id is None or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(gpu_id)}")


def _with_outputs(options, outputs: tuple):
    from dataclasses import replace

    return replace(options, outputs=outputs)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _phrase(status: int) -> str:
    return {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 406: "Not Acceptable",
            413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Entity",
            500: "Internal Server Error", 507: "Insufficient Storage"}.get(status, "Error")


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

