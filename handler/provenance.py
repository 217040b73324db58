"""What produced an explanation, recorded in its document so it can be checked later (``--verify``).

Every explanation document carries a ``provenance`` object::

    "provenance": {
      "model": "efficientnet_lite0",
      "weights_sha256": "...",        # of the weights file as read (see LoadedModel.weights_sha256)
      "package": "pathway-explainer 0.1.0", "revision": "1a2b3c4d5e6f",   # git describe, or "unknown"
      "options": {...},               # the validated request: every default filled in
      "preprocessing": {...},         # resize, crop, interpolation, mean, std
      "image_sha256": "...",          # of the image bytes received (before decoding)
      "device": "cpu", "torch": "2.14.1+cu130",
      "preparation": "49 BatchNorm(s) folded, 5 same padding(s) folded, channels_last",
                                      # what was done to the explained model, or "none"
      "torch_threads": 2,             # CPU intra-op threads (None on a GPU): the bits depend on them
      "pass_batch": 1,                # the pass shape (padded)
      "attribution_sha256": "..."     # see attribution_sha256()
    }

:meth:`ExplanationService.verify <handler.service.ExplanationService.verify>` recomputes the
explanation a document describes and compares these fields.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch

from .errors import shown

PACKAGE = "pathway-explainer"
PACKAGE_DIR = Path(__file__).resolve().parent
#: Written beside the package's code in a model archive (which has no ``.git``) by ``pathway-archive``.
REVISION_FILE = "REVISION"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def attribution_sha256(attribution: np.ndarray) -> str:
    """SHA-256 of the attribution exactly as the engine returned it: the float32 ``[H, W]`` map at the model's
    input resolution (signed, divided by its max ``|·|``), little-endian, C order, before any float16
    conversion or rendering. The ``attribution`` output (``.npy``, float32 in the CLI) holds these bytes."""
    return sha256_hex(np.ascontiguousarray(attribution, dtype="<f4").tobytes())


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (each name, dtype, shape and C-order bytes, in order): the weights'
    identity when they come from no file (a seeded random initialisation)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-d too
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    """The installed package's name and version, read once: ``importlib.metadata`` parses the package's
    metadata file on every call, which every response and verification would otherwise pay."""
    try:
        return f"{PACKAGE} {importlib.metadata.version(PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{PACKAGE} unknown"


@functools.lru_cache(maxsize=1)
def source_revision() -> str:
    """The code's revision: the archive's ``REVISION`` file, else ``git describe --always --dirty`` of the
    checkout the package runs from, else ``"unknown"``."""
    written = PACKAGE_DIR / REVISION_FILE
    if written.is_file():
        return written.read_text().strip() or "unknown"
    try:
        proc = subprocess.run(["git", "-C", str(PACKAGE_DIR), "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def device_kind(device: torch.device) -> str:
    """``cpu``, or ``cuda (<GPU name>)``, with ``deterministic`` when deterministic algorithms are on."""
    kind = device.type if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})"
    return kind + (", deterministic" if device.type == "cuda" and torch.are_deterministic_algorithms_enabled()
                   else "")


def resolved_options(options, request, specs: dict) -> dict:
    """The request as the one validation step resolved it: every option of ``RequestOptions`` with the
    engine's defaults filled in (method, sparsity, reduction, selection, each declared method option)."""
    record = {f.name: _plain(getattr(options, f.name)) for f in fields(options)
              if f.name not in ("method_options", "visualization")}
    # the visualisation settings under the request option names that set them (``visualization`` is one)
    record.update({f.name: getattr(options.visualization, f.name) for f in fields(options.visualization)})
    # a method without a pathway uses no sparsity or selection (None): what was sent is kept, so that recomputing
    # from the record gives the same request, and the same note saying they were not used
    record.update(method=request.method, reduce=request.reduce,
                  sparsity=request.sparsity if request.sparsity is not None else options.sparsity,
                  selection=request.selection if request.selection is not None else options.selection)
    given = dict(request.options)
    record["method_options"] = {name: _plain(given.get(name, spec.default)) for name, spec in sorted(specs.items())}
    return record


def raw_options(record: dict) -> dict:
    """The fields :func:`~handler.schema.parse_options` takes back from :func:`resolved_options`'s record."""
    # unset options (None, an empty ``targets``) are left out: the parser fills in the same defaults
    raw = {k: v for k, v in record.items() if k != "method_options" and v is not None and v != []}
    raw.update(record.get("method_options") or {})
    return raw


#: Top-level fields of a document that record how or from where rather than what: the record itself (checked
#: field by field above the content), and the CLI's path of the image it read.
_NOT_CONTENT = ("provenance", "source")


def document_differences(given, recomputed, path: str = "") -> list:
    """Where a document differs from the one recomputed for it (``explanation.pathway.kept_neurons``, ...),
    as paths with what each holds; [] when its content is what the recomputation produces.

    Inline binary outputs (``{"encoding": "base64", "data": ...}``) are compared by content: PNGs by their
    pixels, ``.npy`` arrays by their values at the array's own dtype (the server sends float16, the CLI
    float32). Outputs written to files (``{"path": ...}``) are not read.
    """
    if isinstance(given, Mapping) and isinstance(recomputed, Mapping):
        if "path" in given and "encoding" in recomputed:  # written to a file beside the document: not read
            return []
        if "encoding" in given or "encoding" in recomputed:
            return [] if _same_output(given, recomputed) else [f"{path} (its {given.get('media_type', 'data')})"]
        out = []
        for key in dict.fromkeys(list(given) + list(recomputed)):
            if path == "" and key in _NOT_CONTENT:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in given or key not in recomputed:
                out.append(f"{where} ({'missing' if key not in given else 'not produced'})")
            else:
                out.extend(document_differences(given[key], recomputed[key], where))
        return out
    if isinstance(given, list) and isinstance(recomputed, list) and len(given) == len(recomputed):
        return [difference for i, (a, b) in enumerate(zip(given, recomputed))
                for difference in document_differences(a, b, f"{path}[{i}]")]
    return [] if given == recomputed else [f"{path} ({shown(given, 40)} instead of {shown(recomputed, 40)})"]


def _same_output(given: Mapping, recomputed: Mapping) -> bool:
    import base64
    import io

    from PIL import Image

    try:
        data = base64.b64decode(str(given.get("data", "")), validate=True)
        expected = base64.b64decode(str(recomputed.get("data", "")))
        if given.get("media_type") != recomputed.get("media_type"):
            return False
        if recomputed.get("media_type") == "image/png":
            return np.array_equal(np.asarray(Image.open(io.BytesIO(data))),
                                  np.asarray(Image.open(io.BytesIO(expected))))
        sent, produced = np.load(io.BytesIO(data)), np.load(io.BytesIO(expected))
        return sent.shape == produced.shape and np.array_equal(sent, produced.astype(sent.dtype))
    except Exception:  # noqa: BLE001 - an unreadable payload is a difference, whatever the decoder says
        return False


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Verification:
    """What :meth:`ExplanationService.verify` found: ``ok``, and one line saying what matched or differs."""

    ok: bool
    message: str
    differences: tuple = ()  # ("weights", "image", ...) in the order checked
    #: recomputed (None when the check stopped before computing); a list, in order, for several targets
    attribution_sha256: Union[str, list, None] = None
