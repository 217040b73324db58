"""The TorchServe handler: decode each request of a batch, call the service, encode each answer.

Explain-or-predict is decided per request (its ``explain`` header), never for the
whole batch from request 0; all explain instances of a batch go through the
engine together, each with its own target and options; a request that is wrong
on its own gets its own 4xx and the rest of the batch is answered normally.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ExplainError
from ..models import ModelSpec, load_model
from ..schema import Limits, parse_options
from ..service import ExplanationService, ExplainResult
from .requests import ParsedRequest, parse_request

logger = logging.getLogger(__name__)

SPEC_FILE = "model_spec.json"
JSON = "application/json"


class InternalError(ExplainError):
    status = 500
    type = "internal_error"


class PathwayHandler:
    """One instance per TorchServe worker."""

    def __init__(self):
        self.service: Optional[ExplanationService] = None
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
        self.service = ExplanationService(load_model(spec, device=device), device=device, limits=limits)
        self.model_name = context.model_name
        self.initialized = True
        logger.info("pathway handler ready: model %s on %s (engine from %s)", spec.name, device,
                    Path(__file__).resolve().parents[1])

    # -- requests ---------------------------------------------------------------

    def handle(self, data, context) -> list:
        started = time.perf_counter()
        parsed = [parse_request(row, context.get_all_request_header(i) or {}, max_instances=self.max_instances)
                  for i, row in enumerate(data)]
        plans = [self._prepare(p) for p in parsed]
        self._run(plans)
        out = [self._encode(i, plan, context) for i, plan in enumerate(plans)]
        explain = sum(1 for p in parsed if p.explain)
        logger.info("pathway batch: %d requests (%d explain, %d predict, %d failed) in %.1f ms", len(data), explain,
                    len(data) - explain, sum(1 for p in plans if p["error"] is not None),
                    1000 * (time.perf_counter() - started))
        return out

    def _prepare(self, request: ParsedRequest) -> dict:
        """Decode images and parse options; a failure marks the whole request."""
        plan = {"request": request, "error": request.error, "images": [], "options": [], "results": []}
        if plan["error"] is not None:
            return plan
        try:
            for instance in request.instances:
                options = parse_options(instance.options, self.service.limits)
                if request.wants_png and "overlay" not in options.outputs:
                    options = _with_outputs(options, options.outputs + ("overlay",))
                plan["options"].append(options)
                plan["images"].append(self.service.decode(instance.image))
        except ExplainError as err:
            plan["error"] = err
        return plan

    def _run(self, plans: list) -> None:
        """Predict instances in one batch, explain instances in one batch; retry alone on an unexpected failure."""
        for explain in (False, True):
            members = [p for p in plans if p["error"] is None and p["request"].explain is explain]
            if not members:
                continue
            try:
                self._run_group(members, explain)
            except Exception:  # an unexpected engine failure: find out which request causes it
                logger.exception("batch of %d %s requests failed; retrying them one by one", len(members),
                                 "explain" if explain else "predict")
                for plan in members:
                    try:
                        self._run_group([plan], explain)
                    except ExplainError as err:  # a request error the engine found only while running
                        plan["error"] = err
                    except Exception as err:  # noqa: BLE001 - isolated to this request
                        logger.exception("request failed on its own")
                        plan["error"] = InternalError(f"the explanation failed: {type(err).__name__}: {err}")

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

    def _kserve_v2(self, request: ParsedRequest, documents: list, context, index: int) -> dict:
        outputs = [{"name": "predictions", "datatype": "BYTES", "shape": [len(documents)],
                    "data": [json.dumps(d["predictions"], separators=(",", ":")) for d in documents]}]
        if request.explain:
            outputs.append({"name": "explanations", "datatype": "BYTES", "shape": [len(documents)],
                            "data": [json.dumps(d, separators=(",", ":")) for d in documents]})
        return {"model_name": self.model_name, "id": request.request_id or context.get_request_id(index),
                "outputs": outputs}


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
    """TorchServe's function entry point: called once with ``data=None`` to initialise, then per batch."""
    if not _HANDLER.initialized:
        _HANDLER.initialize(context)
    if data is None:
        return None
    return _HANDLER.handle(data, context)

