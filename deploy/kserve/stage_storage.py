"""Lay out the storage an InferenceService's ``storageUri`` points at, for KServe's TorchServe runtime.

    python deploy/kserve/stage_storage.py OUT/ [--protocol v1|v2] [--mar model_store/efficientnet_lite0.mar]

writes ``OUT/config/config.properties`` (this folder's, with ``service_envelope`` for the protocol),
``OUT/config/metrics.yaml`` (TorchServe's metrics plus those the archive declares: TorchServe only
exposes declared metrics) and ``OUT/model-store/<name>.mar`` (copied, or built when not given).
Upload OUT/ to the bucket named in inferenceservice.yaml.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}


def stage(out: Path, protocol: str = "v1", mar: Path | None = None) -> Path:
    sys.path.insert(0, str(HERE.parents[1]))
    from handler.serving.metrics import write_server_metrics_config

    config_dir, store = out / "config", out / "model-store"
    config_dir.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    if mar is None:
        from handler.models import get_spec
        from handler.serving.archive import build_archive

        mar = build_archive(get_spec("efficientnet_lite0"), store)
    else:
        mar = Path(shutil.copyfile(mar, store / Path(mar).name))
    text = (HERE / "config.properties").read_text()
    text = re.sub(r"(?m)^service_envelope=.*$", f"service_envelope={ENVELOPES[protocol]}", text)
    (config_dir / "config.properties").write_text(text)
    write_server_metrics_config(config_dir / "metrics.yaml", [mar])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--protocol", choices=sorted(ENVELOPES), default="v1")
    p.add_argument("--mar", type=Path, help="an archive built by pathway-archive (default: build efficientnet_lite0)")
    args = p.parse_args()
    print(stage(args.out, args.protocol, args.mar))


if __name__ == "__main__":
    main()
