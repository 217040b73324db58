"""What TorchServe hands a handler, turned into images and raw options per instance.

One HTTP request becomes a :class:`ParsedRequest` holding one or more
:class:`Instance` (KServe bodies may carry several). Shapes seen by ``handle``
(TorchServe 0.12):

- raw body (``curl -T img.jpg``, ``--data-binary`` with an image or octet-stream type): ``{"body": bytearray}``;
- JSON (``Content-Type: application/json``): ``{"body": dict}``, or bytes if it was malformed;
- ``text/*``: ``{"body": str}``;
- multipart form: one key per field, ``{"data": bytearray, "target": bytearray(b"281")}``.

Options come from the JSON body, multipart fields and ``X-Explain-*`` headers
(URL query parameters never reach a handler). Nothing here touches the model.

With a stock ``service_envelope`` (KServe's TorchServe runtime sets ``kserve`` or
``kservev2``) the handler sees what the envelope parsed out of **request 0 only**:
v1, the ``instances`` list (one row per instance dict or base64 string); v2, the
``inputs`` list with each BYTES tensor's ``data`` replaced by its first element.
:func:`envelope_of` recognises such rows (rows TorchServe delivers itself always
carry bytes: a ``body`` or a file field) and :func:`parse_envelope` turns them
into one :class:`ParsedRequest`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional

from ..errors import BadRequest, ExplainError, InvalidImage, InvalidOption, UnsupportedMediaType, shown
from ..schema import combine_options, option_name

IMAGE_FIELDS = ("image", "data", "file", "b64", "bytes")
logger = logging.getLogger(__name__)
HEADER_PREFIX = "x-explain-"
#: KServe v2 option tensors that may carry one row per image (shape [images, K]) instead of one value for all.
PER_IMAGE_TENSORS = ("targets",)


class Protocol(str, Enum):
    """How a request was sent, and so how its answer is encoded (:data:`.responses.ENCODERS`)."""

    PLAIN = "plain"  # raw image bytes, a multipart form, or JSON {"image": ...}
    KSERVE_V1 = "kserve_v1"  # JSON {"instances": [...]}
    KSERVE_V2 = "kserve_v2"  # JSON {"inputs": [...]} (open inference protocol)
    ENVELOPE_V1 = "envelope_v1"  # rows a stock ``kserve`` envelope parsed out of request 0
    ENVELOPE_V2 = "envelope_v2"  # rows a stock ``kservev2`` envelope parsed out of request 0


@dataclass
class Instance:
    image: bytes
    options: dict = field(default_factory=dict)  # raw (untyped) options, request-level merged with instance-level


@dataclass
class ParsedRequest:
    protocol: Protocol
    explain: bool
    instances: list = field(default_factory=list)
    wants_png: bool = False
    request_id: Optional[str] = None
    error: Optional[ExplainError] = None


def lower_headers(headers: Mapping[str, Any]) -> dict:
    """HTTP headers with lower-case names (TorchServe keeps the client's spelling)."""
    return {str(k).lower(): v for k, v in (headers or {}).items()}


def header_options(headers: Mapping[str, Any]) -> dict:
    return {k[len(HEADER_PREFIX):]: v for k, v in headers.items()
            if k.startswith(HEADER_PREFIX) and isinstance(v, str)}


def parse_request(row: Mapping[str, Any], headers: Mapping[str, Any], *, max_instances: int = 16) -> ParsedRequest:
    """Parse one request of a batch; failures are returned in ``error``, never raised."""
    headers = lower_headers(headers)
    explain = str(headers.get("explain", "")).lower() == "true"
    accept = str(headers.get("accept", "")).lower()
    request = ParsedRequest(protocol=Protocol.PLAIN, explain=explain)
    try:
        _parse_into(request, dict(row), headers, max_instances)
        request.wants_png = explain and request.protocol is Protocol.PLAIN and "image/png" in accept \
            and "application/json" not in accept
    except ExplainError as err:
        request.error = err
    except Exception as err:  # noqa: BLE001 - a body this parser did not foresee is still the request's fault
        request.error = _unreadable(err)
    return request


def _unreadable(err: Exception) -> ExplainError:
    logger.warning("unreadable request: %s: %s", type(err).__name__, err)
    return BadRequest(f"the request could not be read: {type(err).__name__}: {str(err)[:200]}",
                      code="unreadable_request")


def _parse_into(request: ParsedRequest, row: dict, headers: dict, max_instances: int) -> None:
    from_headers = header_options(headers)
    if "body" in row and len(row) == 1:
        body = row["body"]
        content_type = _param_content_type(headers, "body")
        if isinstance(body, dict):
            _parse_json(request, body, from_headers, max_instances)
        elif isinstance(body, list):
            raise BadRequest("a JSON body must be an object such as {\"image\": \"<base64>\"}, not a list")
        elif isinstance(body, str):
            raise UnsupportedMediaType(
                f"cannot read a {content_type or 'text'} body: send the image bytes (Content-Type "
                "application/octet-stream or image/*, e.g. curl -T photo.jpg), JSON {\"image\": \"<base64>\"} "
                "or a multipart form with a 'data' field")
        elif isinstance(body, (bytes, bytearray)):
            if "json" in content_type:
                raise BadRequest(f"malformed JSON body: {_json_error(body)}", code="malformed_json")
            if "x-www-form-urlencoded" in content_type:
                raise UnsupportedMediaType(
                    "the body was sent as a URL-encoded form (curl --data-binary without a content type); "
                    "use curl -T photo.jpg or -H 'Content-Type: application/octet-stream'")
            request.instances = [Instance(bytes(body), from_headers)]
        else:  # TorchServe decoded a JSON body that is a bare number, true/false or null
            raise BadRequest("a JSON body must be an object such as {\"image\": \"<base64>\"}, not "
                             + ("null" if body is None else shown(body)))
        return
    _parse_multipart(request, row, from_headers)


def _parse_multipart(request: ParsedRequest, fields: dict, from_headers: dict) -> None:
    image_key = next((k for k in IMAGE_FIELDS if k in fields), None)
    if image_key is None:
        names = ", ".join(sorted(fields)) or "none"
        raise BadRequest(f"multipart request has no image field: name it 'data' (or 'image'); got fields: {names}",
                         code="missing_image")
    image = fields.pop(image_key)
    if isinstance(image, dict):
        raise BadRequest(f"multipart field {image_key!r} holds JSON, not image bytes")
    if isinstance(image, str):
        image = image.encode("latin-1", "replace")
    options = {}
    for name, value in fields.items():
        if name in IMAGE_FIELDS:
            raise BadRequest(f"send one image per multipart request (found both {image_key!r} and {name!r})")
        options[name] = _option_value(name, value)
    request.instances = [Instance(bytes(image), combine_options(("headers", from_headers), ("form fields", options)))]


def _parse_json(request: ParsedRequest, body: dict, from_headers: dict, max_instances: int) -> None:
    if "instances" in body:
        request.protocol = Protocol.KSERVE_V1
        instances = body["instances"]
        shared = combine_options(("headers", from_headers), ("parameters", _parameters(body.get("parameters"))))
        if not isinstance(instances, list) or not instances:
            raise BadRequest("'instances' must be a non-empty list")
        _check_count(len(instances), max_instances)
        request.instances = [_json_instance(item, shared, f"instances[{i}]", overrides=True)
                             for i, item in enumerate(instances)]
        return
    if "inputs" in body:
        request.protocol = Protocol.KSERVE_V2
        _parse_v2(request, body, from_headers, max_instances)
        return
    request.instances = [_json_instance(body, from_headers, "body", overrides=False)]


def _json_instance(item: Any, shared: dict, where: str, *, overrides: bool) -> Instance:
    """One image and its options. ``overrides``: a KServe instance's own fields override the request's
    ``parameters`` and headers for that instance; elsewhere (a plain JSON body) an option given both in a
    header and in the body with different values is refused."""
    if isinstance(item, str):
        return Instance(decode_base64(item, where), dict(shared))
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object with an 'image' field or a base64 string")
    item = dict(item)
    key = next((k for k in IMAGE_FIELDS if k in item), None)
    if key is None:
        raise BadRequest(f"{where} has no image: add \"image\": \"<base64>\" (or {{\"b64\": \"<base64>\"}})",
                         code="missing_image")
    image = decode_base64(item.pop(key), f"{where}.{key}")
    own = combine_options((f"{where}.parameters", _parameters(item.pop("parameters", None))), (where, item))
    if not overrides:
        return Instance(image, combine_options(("headers", shared), ("the JSON body", own)))
    names = {option_name(str(k)) for k in own}
    return Instance(image, {**{k: v for k, v in shared.items() if option_name(str(k)) not in names}, **own})


def _parse_v2(request: ParsedRequest, body: dict, from_headers: dict, max_instances: int) -> None:
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    request_id = body.get("id")
    request.request_id = str(request_id) if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) \
        else None
    shared = combine_options(("headers", from_headers), ("parameters", _parameters(body.get("parameters"))))
    images = None
    rows = {}  # option tensors of shape [images, K]: one row per image (several targets per instance)
    for tensor in inputs:
        if not isinstance(tensor, dict) or "data" not in tensor:
            raise BadRequest("each of 'inputs' must be an object with 'name', 'datatype', 'shape' and 'data'")
        name = str(tensor.get("name", ""))
        data = tensor["data"]
        if not isinstance(data, list):
            data = [data]
        shape = tensor.get("shape")
        if isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape) \
                and _product(shape) != len(data):
            raise BadRequest(f"input {name!r} declares shape {shape} ({_product(shape)} values) but holds "
                             f"{len(data)}: make them agree")
        if not data:
            raise BadRequest(f"input {name!r} has no data")
        if tensor.get("datatype") == "BYTES" and images is None and (name in IMAGE_FIELDS or name.startswith("image")
                                                                     or name.startswith("input")):
            images = data
            shared = combine_options(("request", shared), (f"input {name!r}'s parameters",
                                                           _parameters(tensor.get("parameters"))))
        elif name in PER_IMAGE_TENSORS and isinstance(tensor.get("shape"), list) and len(tensor["shape"]) == 2:
            rows[name] = (tensor["shape"], data)
        elif data:
            shared = combine_options(("request", shared), (f"input {name!r}", {name: data[0] if len(data) == 1
                                                                                else data}))
    if images is None:
        raise BadRequest("no image among 'inputs': send a BYTES tensor named 'image' whose data are base64 strings",
                         code="missing_image")
    if not images:
        raise BadRequest("the image tensor has no data")
    _check_count(len(images), max_instances)
    per_image = [{} for _ in images]
    for name, (shape, data) in rows.items():
        count, width = shape
        if count != len(images) or not isinstance(width, int) or len(data) != count * width:
            raise BadRequest(f"input {name!r} of shape {shape} with {len(data)} values: give one row per image, "
                             f"shape [{len(images)}, K] with {len(images)} x K values")
        for i in range(count):
            per_image[i][name] = data[i * width:(i + 1) * width]
    request.instances = [Instance(decode_base64(item, f"inputs.image[{i}]"), {**shared, **per_image[i]})
                         for i, item in enumerate(images)]


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise BadRequest(f"{count} images in one request; this server takes at most {limit}", code="too_many_instances")


def _parameters(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("'parameters' must be an object of options")
    return dict(value)


def _option_value(name: str, value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidOption(f"multipart field {name!r} is not UTF-8 text") from None
    return value


def decode_base64(value: Any, where: str) -> bytes:
    """Standard or URL-safe base64, with or without a ``data:image/...;base64,`` prefix."""
    if isinstance(value, dict):
        if "b64" not in value:
            raise BadRequest(f"{where} must be a base64 string or {{\"b64\": \"<base64>\"}}")
        value = value["b64"]
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string, not {type(value).__name__}", code="bad_base64")
    text = value.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    if not text:
        raise InvalidImage(f"{where} is empty", code="empty_image")
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"{where} is not valid base64: {err}", code="bad_base64") from None


def _param_content_type(headers: dict, param: str) -> str:
    value = headers.get(param)
    if isinstance(value, dict):
        return str(value.get("content-type", "")).lower()
    return str(headers.get("content-type", "")).lower()


def _json_error(body: bytes) -> str:
    """Why TorchServe could not decode a JSON body (it forwards the raw bytes when ``json.loads`` fails)."""
    try:
        json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError:
        return "the body is not UTF-8 text"
    except json.JSONDecodeError as err:
        return str(err)
    except RecursionError:
        return "nested too deeply"
    except ValueError as err:  # e.g. an integer literal of thousands of digits
        return str(err).split(";")[0]
    return "not readable as JSON"


# ---------------------------------------------------------------------------
# Rows parsed by a stock TorchServe envelope
# ---------------------------------------------------------------------------

ENVELOPE_V1 = "kserve"
ENVELOPE_V2 = "kservev2"


def envelope_of(rows: list, context=None) -> Optional[str]:
    """``"kserve"``/``"kservev2"`` when a stock envelope parsed these rows, ``None`` for TorchServe's own rows.

    TorchServe's own rows always hold bytes (``{"body": ...}`` or a multipart file field); an envelope's
    rows are JSON values: v2 input tensors (``name``/``datatype``/``data``, and the envelope sets
    ``context.input_names``) or v1 instances (objects or base64 strings). A multipart form made only of
    text fields also looks like an instance; it is read as one (its ``image`` field as base64).
    """
    if not rows:
        return None
    if all(_is_v2_input(row) for row in rows) and getattr(context, "input_names", None) is not None:
        return ENVELOPE_V2
    if all(_is_instance(row) for row in rows):
        return ENVELOPE_V1
    return None


def _is_v2_input(row: Any) -> bool:
    return isinstance(row, dict) and {"name", "datatype", "data"} <= set(row) and "body" not in row


def _is_instance(row: Any) -> bool:
    if isinstance(row, str):
        return True
    return isinstance(row, dict) and "body" not in row and \
        not any(isinstance(v, (bytes, bytearray)) for v in row.values())


def parse_envelope(kind: str, rows: list, headers: Mapping[str, Any], *, max_instances: int = 16) -> ParsedRequest:
    """One request from an envelope's rows and request 0's headers; failures in ``error``, never raised."""
    headers = lower_headers(headers)
    explain = str(headers.get("explain", "")).lower() == "true"
    request = ParsedRequest(protocol=Protocol.ENVELOPE_V1 if kind == ENVELOPE_V1 else Protocol.ENVELOPE_V2,
                            explain=explain)
    from_headers = header_options(headers)
    try:
        if kind == ENVELOPE_V1:
            _check_count(len(rows), max_instances)
            request.instances = [_json_instance(item, from_headers, f"instances[{i}]", overrides=True)
                                 for i, item in enumerate(rows)]
        else:
            for tensor in rows:
                shape = tensor.get("shape")
                if tensor.get("datatype") == "BYTES" and isinstance(shape, list) and shape and _product(shape) > 1:
                    raise BadRequest(
                        f"input {tensor.get('name')!r} has shape {shape}, but the kservev2 envelope passes only the "
                        "first element of a BYTES tensor: send one image per request (or serve without "
                        "service_envelope, where several images per request work)", code="unsupported_by_envelope")
            _parse_v2(request, {"inputs": rows}, from_headers, max_instances)
    except ExplainError as err:
        request.error = err
    except Exception as err:  # noqa: BLE001 - as in parse_request
        request.error = _unreadable(err)
    return request


def _product(shape: list) -> int:
    total = 1
    for n in shape:
        total *= int(n) if isinstance(n, (int, float)) else 1
    return total
