"""Prometheus metrics from the handler: declared once in ``metrics.yaml``, emitted through ``context.metrics``.

How TorchServe 0.12 moves them (read from ``ts/metrics`` and the frontend, confirmed by the scrape test):
the worker prints one ``[METRICS]name.unit:value|#dims|#type:...`` line per observation; the frontend
parses it and updates the Prometheus metric of that name **only if the server's ``metrics_config``
declares it** (or ``model_metrics_auto_detect=true``). A ``metrics.yaml`` inside an archive is not read by
the frontend, so :func:`server_metrics_config` merges the archives' declarations into TorchServe's
default configuration and ``pathway-serve`` points ``metrics_config`` at the result.

The worker's metric cache is built from that same file and checks the number of dimension values, and
the frontend matches them by position: :class:`HandlerMetrics` always emits the declared dimensions in
the declared order.
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import yaml

from ..engine import BatchSplit
from ..service import ServiceObserver

logger = logging.getLogger(__name__)

SPEC_FILE = Path(__file__).with_name("metrics.yaml")
ARCHIVE_NAME = "metrics.yaml"  # where pathway-archive puts the declarations inside a .mar
LEVEL = "Model"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/ ]")  # the frontend splits dimensions on ',', ':' and '|'


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: str  # "counter", "gauge" or "histogram"
    unit: str
    dimensions: tuple


def load_specs(path: Path = SPEC_FILE) -> dict:
    """The ``model_metrics`` of a metrics.yaml, by name."""
    return specs_from(yaml.safe_load(Path(path).read_text()))


def specs_from(config: Mapping) -> dict:
    specs = {}
    for kind, entries in (config.get("model_metrics") or {}).items():
        for entry in entries or ():
            specs[entry["name"]] = MetricSpec(entry["name"], kind, str(entry["unit"]), tuple(entry["dimensions"]))
    return specs


class HandlerMetrics(ServiceObserver):
    """Named recorders for what the handler sees; silent without TorchServe's metrics object.

    A metrics failure never fails a request: it is logged and dropped.
    """

    def __init__(self, sink, model_name: str, specs: Optional[Mapping[str, MetricSpec]] = None):
        self.sink = sink  # TorchServe's context.metrics (a MetricCacheAbstract), or a test double
        self.model_name = model_name
        self.specs = dict(specs if specs is not None else load_specs())

    # -- recorders (one per declared metric) -------------------------------------

    def request(self, kind: str, outcome: str) -> None:
        self._emit("pathway_requests_total", 1, kind=kind, outcome=outcome)

    def rejected(self, reason: str, code: int) -> None:
        self._emit("pathway_rejected_requests_total", 1, reason=reason, code=str(code))

    def oom_split(self, source: str) -> None:
        self._emit("pathway_oom_splits_total", 1, source=source)

    def explain_latency(self, method: str, seconds: float) -> None:
        self._emit("pathway_explain_latency_seconds", seconds, method=method)

    def stage(self, stage: str, kind: str, seconds: float, images: int = 0) -> None:
        self._emit("pathway_stage_seconds", seconds, stage=stage, kind=kind)
        if stage == "engine":
            self._emit("pathway_engine_batch_images", images, kind=kind)

    def response_size(self, kind: str, size: int) -> None:
        self._emit("pathway_response_megabytes", size / 1e6, kind=kind)

    def realised_sparsity(self, method: str, value: float) -> None:
        self._emit("pathway_realised_sparsity", value, method=method)

    def batch(self, requests: int) -> None:
        self._emit("pathway_batch_requests", requests)

    def batch_split(self, split: BatchSplit) -> None:
        """ServiceObserver hook: the engine (or the handler) retried a batch in parts."""
        if split.reason == "out_of_memory":
            self.oom_split(split.source)

    # -- plumbing -----------------------------------------------------------------

    def _emit(self, name: str, value: float, **labels) -> None:
        spec = self.specs[name]  # KeyError: an undeclared metric is a bug, caught by the tests
        values = {"ModelName": self.model_name, "Level": LEVEL, **labels}
        missing = set(spec.dimensions) - set(values)
        if missing or set(labels) - set(spec.dimensions):
            raise ValueError(f"metric {name} has dimensions {spec.dimensions}, got {sorted(values)}")
        if self.sink is None:
            return
        try:
            from ts.metrics.dimension import Dimension
            from ts.metrics.metric_type_enum import MetricTypes

            dimensions = [Dimension(d, _clean(values[d])) for d in spec.dimensions]
            self.sink.add_metric(name, value, spec.unit, None, dimensions, MetricTypes(spec.type))
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            logger.exception("could not record metric %s", name)


def _clean(value) -> str:
    return _UNSAFE.sub("_", str(value)) or "_"


# ---------------------------------------------------------------------------
# The server's metrics configuration
# ---------------------------------------------------------------------------


def torchserve_default_config() -> dict:
    """TorchServe's own metrics.yaml (frontend metrics and its default model metrics)."""
    import ts

    return yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())


def archive_declarations(mar: Path) -> Optional[dict]:
    """The ``metrics.yaml`` packed in a model archive, if it has one."""
    try:
        with zipfile.ZipFile(mar) as archive:
            if ARCHIVE_NAME in archive.namelist():
                return yaml.safe_load(archive.read(ARCHIVE_NAME))
    except (OSError, zipfile.BadZipFile, yaml.YAMLError) as err:
        logger.warning("cannot read %s from %s: %s", ARCHIVE_NAME, mar, err)
    return None


def server_metrics_config(declarations: Iterable[Mapping], base: Optional[Mapping] = None) -> dict:
    """TorchServe's default configuration plus every declared model metric (first declaration of a name wins)."""
    config = dict(base if base is not None else torchserve_default_config())
    merged = {kind: list(entries or ()) for kind, entries in (config.get("model_metrics") or {}).items()}
    seen = {entry["name"] for entries in merged.values() for entry in entries}
    for declaration in declarations:
        for kind, entries in ((declaration or {}).get("model_metrics") or {}).items():
            for entry in entries or ():
                if entry["name"] not in seen:
                    merged.setdefault(kind, []).append(dict(entry, dimensions=list(entry["dimensions"])))
                    seen.add(entry["name"])
    config["model_metrics"] = merged
    return config


def write_server_metrics_config(path: Path, archives: Iterable[Path]) -> Path:
    """Write the merged configuration for ``archives`` (the packaged declarations when none carries any)."""
    declarations = [d for d in (archive_declarations(Path(m)) for m in archives) if d]
    if not declarations:
        declarations = [yaml.safe_load(SPEC_FILE.read_text())]
    path = Path(path)
    path.write_text("# Written by pathway-serve: TorchServe's default metrics plus the archives' model metrics.\n"
                    + yaml.safe_dump(server_metrics_config(declarations), sort_keys=False))
    return path
