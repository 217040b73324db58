"""What goes back over HTTP: the one table from error codes to statuses, and one encoder per protocol.

Nothing below the serving layer knows HTTP: errors carry a code (:mod:`handler.errors`), and this table
gives each code its status and reason phrase. A code not in the table is a client error, 400.
Encoders turn a request's documents into the body its protocol expects (plain JSON, KServe v1, KServe v2,
or what a stock TorchServe envelope wraps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ExplainError
from .requests import Protocol

JSON = "application/json"

#: Error code -> HTTP status, for the codes that are not a plain 400.
STATUS = {
    "method_not_allowed": 403,
    "unknown_model": 404,
    "image_too_large": 413,
    "too_many_instances": 413,
    "unsupported_image_format": 415,
    "unsupported_media_type": 415,
    "response_too_large": 422,
    "internal_error": 500,
    "unsupported_model": 501,
    "out_of_memory": 507,
}
PHRASES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 406: "Not Acceptable",
           413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Entity",
           500: "Internal Server Error", 501: "Not Implemented", 507: "Insufficient Storage"}


def http_status(error: ExplainError) -> int:
    return STATUS.get(error.code, 400)


def reason_phrase(status: int) -> str:
    return PHRASES.get(status, "Error")


def error_body(error: ExplainError) -> dict:
    """``{"code": HTTP status, "type": error code, "message"}``: the document of every failed request."""
    return {"code": http_status(error), "type": error.code, "message": error.message}


def compact(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"))


@dataclass(frozen=True)
class Answer:
    """What one request's documents become: documents (``inline()``'d explanations, or predictions)."""

    documents: list
    explain: bool
    model_name: str
    request_id: Optional[str] = None


def encode_plain(answer: Answer) -> dict:
    return answer.documents[0]


def encode_kserve_v1(answer: Answer) -> dict:
    body = {"predictions": [d["predictions"] for d in answer.documents]}
    if answer.explain:
        body["explanations"] = answer.documents
    return body


def encode_kserve_v2(answer: Answer) -> dict:
    outputs = [_bytes_tensor("predictions", [compact(d["predictions"]) for d in answer.documents])]
    if answer.explain:
        outputs.append(_bytes_tensor("explanations", [compact(d) for d in answer.documents]))
    return {"model_name": answer.model_name, "id": answer.request_id, "outputs": outputs}


def _bytes_tensor(name: str, data: list) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [len(data)], "data": data}


#: Protocol of a parsed request (:attr:`~.requests.ParsedRequest.protocol`) -> its body's encoder.
ENCODERS = {Protocol.PLAIN: encode_plain, Protocol.KSERVE_V1: encode_kserve_v1, Protocol.KSERVE_V2: encode_kserve_v2}


def encode_envelope_v1(answer: Answer) -> list:
    """The list the stock ``kserve`` envelope wraps: whole documents for explanations (each with its
    predictions beside the explanation), the predictions alone otherwise."""
    return answer.documents if answer.explain else [d["predictions"] for d in answer.documents]


def encode_envelope_v2(answer: Answer) -> tuple:
    """``(output names, items)`` for the stock ``kservev2`` envelope, which names each returned item after
    ``context.input_names``."""
    names = ["predictions"] + (["explanations"] if answer.explain else [])
    items = [[compact(d["predictions"]) for d in answer.documents]]
    if answer.explain:
        items.append([compact(d) for d in answer.documents])
    return names, items
