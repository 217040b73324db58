"""``pathway-archive``: package a model spec, its weights, class names and this handler into a TorchServe ``.mar``.

The archive is self-contained: the engine's source travels inside it (TorchServe
puts the archive's folder on the worker's ``sys.path``), the class names are
written out, and the spec inside points at files inside the archive. What the
worker's Python must provide: torch, torchvision, timm, numpy, Pillow (listed in
the archive's ``requirements.txt`` for runtimes that install per-model
dependencies).
"""

from __future__ import annotations

import argparse
import json
import shutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..models import ModelLoadError, ModelSpec, Weights, get_spec, load_labels, published_preprocessing, \
    spec_for_architecture, weights_path
from ..errors import ExplainError
from ..provenance import REVISION_FILE, source_revision
from .handler import SPEC_FILE
from .metrics import ARCHIVE_NAME as METRICS_FILE
from .metrics import SPEC_FILE as METRICS_SPEC

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).resolve().parent / "ts_entry" / "pathway_handler.py"
DEFAULT_STORE = PACKAGE_DIR.parent / "model_store"

#: Worker/batching defaults written into model-config.yaml (overridable by flags). Two workers, each with its
#: share of the cores (``pathway.torch_threads: auto``): one decodes and encodes while the other computes, and
#: under load they serve more than one worker with every core (benchmarks/speed/README.md, "Workers and
#: threads"); a lone request takes about as long either way. ``maxBatchDelay``: TorchServe holds a request
#: that finds the queue empty for the whole delay, waiting for company, while queued ones join a batch at once.
#: 20 ms lets requests that arrive together share a batch (on a GPU a batched pass costs little more than one);
#: on the CPU, where a batch saves little compute, ``pathway-archive --max-batch-delay 5`` takes that wait off
#: every lone request (benchmarks/speed/README.md, "Batch delay").
DEFAULT_WORKER_CONFIG = {
    "minWorkers": 2,
    "maxWorkers": 2,
    "batchSize": 4,
    "maxBatchDelay": 20,
    "responseTimeout": 600,
}


def declared_caps() -> dict:
    """The server caps the registered methods and selections declare (``OptionSpec.server_cap``), by option
    name; where two declare one name, the lower cap holds."""
    from ..engine import METHODS, SELECTIONS

    caps: dict = {}
    for registry in (METHODS, SELECTIONS):
        for name in registry.names():
            for option, spec in registry.get(name).options.items():
                if spec.server_cap is not None:
                    caps[option] = min(spec.server_cap, caps.get(option, spec.server_cap))
    return caps


#: The handler's own section of model-config.yaml: explanation defaults and server-side caps.
DEFAULT_PATHWAY_CONFIG = {
    "device": "auto",
    # Torch threads per worker (handler.serving.worker.worker_threads): "auto" shares the cores out among
    # maxWorkers workers, with one inter-op thread; a number fixes it.
    "torch_threads": "auto",
    "torch_interop_threads": "auto",
    "max_instances_per_request": 16,
    "limits": {
        "default_top_k": 5,
        "max_top_k": 20,
        "max_image_pixels": 40_000_000,
        "default_outputs": ["heatmap", "pathway"],
        "method_caps": declared_caps(),
        # Passes weighted by each option's declared cost (OptionSpec.passes): 1000 allow one image at the
        # default 100 pruning-gate iterations, or 16 images of 60 integrated-gradient steps, and keep a batch
        # of such requests inside responseTimeout (benchmarks/speed/README.md has the measurement); past it
        # TorchServe kills the worker. Scale both with the machine and the model.
        "max_passes_per_request": 1000,
        # Classes one image may ask to explain (targets / explain_top_k); each counts in the pass budget too.
        "max_targets_per_request": 10,
    },
}
#: What the worker's Python must provide for the code the archive carries: the project's own runtime dependencies
#: (pyproject.toml's ``dependencies``, checked by a test), less the weights package (the archive carries the weights).
REQUIREMENTS = ["torch", "torchvision", "timm", "numpy", "pillow", "cmap"]


def stage_archive(spec: ModelSpec, stage: Path, worker_config: dict, pathway_config: dict) -> dict:
    """Lay out the archive's files in ``stage``; returns the torch-model-archiver arguments."""
    (stage / "extra").mkdir(parents=True)
    shutil.copytree(PACKAGE_DIR, stage / "extra" / "handler",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # The archive has no .git: its explanations' provenance reads the revision it was built from here.
    (stage / "extra" / "handler" / REVISION_FILE).write_text(source_revision() + "\n")
    labels = load_labels(spec)
    files = []
    if labels is not None:
        (stage / "labels.json").write_text(json.dumps(labels))
        files.append(stage / "labels.json")
    serialized = None
    source = weights_path(spec)
    if source is not None:
        if not source.is_file():
            raise ModelLoadError(f"weights file not found: {source}")
        serialized = stage / "weights.pth"
        shutil.copyfile(source, serialized)
    archived = spec.replace(
        weights=Weights(file="weights.pth", match=spec.weights.match) if serialized else spec.weights,
        labels={"file": "labels.json"} if labels is not None else None,
        num_classes=spec.num_classes or (len(labels) if labels else None),
        base_dir=None,
    )
    (stage / SPEC_FILE).write_text(json.dumps(archived.to_dict(), indent=2) + "\n")
    files.append(stage / SPEC_FILE)
    (stage / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
    files.append(stage / "requirements.txt")
    # The handler's Prometheus metrics; pathway-serve registers them with the server (see metrics.py).
    shutil.copyfile(METRICS_SPEC, stage / METRICS_FILE)
    files.append(stage / METRICS_FILE)
    config = dict(worker_config)
    config["pathway"] = pathway_config
    import yaml

    (stage / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copyfile(ENTRY, stage / ENTRY.name)
    return {"handler": stage / ENTRY.name, "serialized": serialized, "extra": [stage / "extra", *files],
            "config": stage / "model-config.yaml"}


#: TorchServe's model names (the archive's file name and the URL path segment of /predictions/<name>).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MODEL_NAME_RULE = "a model name is letters, digits, '_', '-' and '.', starting with a letter or digit"


def build_archive(
    spec: ModelSpec,
    out_dir: Path = DEFAULT_STORE,
    *,
    worker_config: Optional[dict] = None,
    pathway_config: Optional[dict] = None,
    version: str = "1.0",
) -> Path:
    """Write ``<out_dir>/<spec.name>.mar`` and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archiver = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent)) or \
        shutil.which("torch-model-archiver")
    if archiver is None:
        raise RuntimeError("torch-model-archiver is not installed (pip install torch-model-archiver==0.12.0)")
    with tempfile.TemporaryDirectory(prefix="pathway-mar-") as tmp:
        parts = stage_archive(spec, Path(tmp), worker_config or DEFAULT_WORKER_CONFIG,
                              pathway_config or DEFAULT_PATHWAY_CONFIG)
        cmd = [archiver, "--model-name", spec.name, "--version", version, "--handler", str(parts["handler"]),
               "--extra-files", ",".join(str(p) for p in parts["extra"]), "--config-file", str(parts["config"]),
               "--export-path", str(out_dir), "--force"]
        if parts["serialized"] is not None:
            cmd += ["--serialized-file", str(parts["serialized"])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return out_dir / f"{spec.name}.mar"


def archive_is_stale(mar: Path) -> bool:
    """True when the archive is missing or older than any source file it packs."""
    if not mar.is_file():
        return True
    built = mar.stat().st_mtime
    return any(p.stat().st_mtime > built for p in PACKAGE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="pathway-archive", description="Build a TorchServe model archive (.mar) "
                                "that serves predictions and pathway explanations.")
    p.add_argument("--model", default=None, help="built-in model name or model spec .json (default efficientnet_lite0)")
    p.add_argument("--arch", help="torchvision/timm architecture for your own classifier (with --weights, --labels)")
    p.add_argument("--weights", help="state dict of your classifier (loaded with weights_only=True)")
    p.add_argument("--labels", help="class names: one per line, a JSON list or index_to_name.json")
    p.add_argument("--name", help="model name (default: the spec's or the architecture's)")
    p.add_argument("--out", type=Path, default=DEFAULT_STORE, help="model store directory (default model_store/)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_WORKER_CONFIG["batchSize"])
    p.add_argument("--max-batch-delay", type=int, default=DEFAULT_WORKER_CONFIG["maxBatchDelay"], help="ms")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKER_CONFIG["minWorkers"])
    p.add_argument("--response-timeout", type=int, default=DEFAULT_WORKER_CONFIG["responseTimeout"], help="s")
    p.add_argument("--sparsity", type=float, help="default sparsity for this model's explanations")
    args = p.parse_args(argv)
    def fail(message: str) -> None:
        print(f"pathway-archive: error: {message}", file=sys.stderr)
        sys.exit(2)

    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 1),
                               ("--max-batch-delay", args.max_batch_delay, 0),
                               ("--response-timeout", args.response_timeout, 1)):
        if value < least:
            fail(f"{flag} must be at least {least}, not {value}")
    if args.name is not None and not MODEL_NAME.fullmatch(args.name):
        fail(f"--name {args.name!r}: {MODEL_NAME_RULE}")
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out} is a file; give the model store's directory")
    try:
        if args.arch:
            if args.model:
                fail("give either --model or --arch")
            if args.weights and not Path(args.weights).is_file():
                fail(f"weights file not found: {args.weights}")
            spec = spec_for_architecture(args.arch, weights=args.weights, labels=args.labels or "imagenet",
                                         name=args.name, sparsity=args.sparsity)
            prep = spec.preprocessing
            origin = (f"as {args.arch}'s published weights were evaluated" if published_preprocessing(args.arch)
                      else f"the defaults: {args.arch} publishes none")
            print(f"pathway-archive: preprocessing {origin}: resize {prep.resize}, crop {prep.crop}, "
                  f"{prep.interpolation}, mean {list(prep.mean)}, std {list(prep.std)} (a model spec .json, --model, "
                  "sets others)", file=sys.stderr, flush=True)
        else:
            spec = get_spec(args.model or "efficientnet_lite0")
            if args.name:
                spec = spec.replace(name=args.name)
            if args.sparsity is not None:
                spec = spec.replace(defaults=dict(spec.defaults, sparsity=args.sparsity))
        # the archive's spec is checked as a worker will read it (a --sparsity of 1 would fail every load)
        spec = ModelSpec.from_dict(spec.to_dict(), base_dir=spec.base_dir)
        if not MODEL_NAME.fullmatch(spec.name):
            raise ModelLoadError(f"the model spec's name {spec.name!r}: {MODEL_NAME_RULE}")
        worker = {"minWorkers": args.workers, "maxWorkers": args.workers, "batchSize": args.batch_size,
                  "maxBatchDelay": args.max_batch_delay, "responseTimeout": args.response_timeout}
        # Load once here, so a broken spec fails now rather than in a worker.
        from ..models import load_model

        load_model(spec)
        mar = build_archive(spec, args.out, worker_config=worker)
    except (ModelLoadError, RuntimeError, ValueError, ExplainError) as err:
        fail(str(err))
    except OSError as err:
        print(f"pathway-archive: error: cannot write the archive to {args.out}: {err.strerror or err}",
              file=sys.stderr)
        sys.exit(1)
    print(mar)


if __name__ == "__main__":
    main()
