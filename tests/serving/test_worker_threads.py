"""Torch threads per TorchServe worker, from the archive's model-config.yaml."""

import os

import pytest
import yaml

from handler.models import get_spec
from handler.serving.archive import DEFAULT_PATHWAY_CONFIG, DEFAULT_WORKER_CONFIG, stage_archive
from handler.serving.worker import worker_threads

CORES = len(os.sched_getaffinity(0))


def test_auto_shares_the_cores_out_among_the_workers_with_one_interop_thread():
    assert worker_threads({}, {"maxWorkers": 1}) == (CORES, 1)
    assert worker_threads({"torch_threads": "auto"}, {"minWorkers": 2, "maxWorkers": 2}) == (max(1, CORES // 2), 1)
    assert worker_threads({}, {"maxWorkers": 4 * CORES}) == (1, 1)


def test_configured_threads_are_used_and_nonsense_is_refused():
    assert worker_threads({"torch_threads": 3, "torch_interop_threads": 2}, {"maxWorkers": 8}) == (3, 2)
    with pytest.raises(ValueError, match="at least 1"):
        worker_threads({"torch_threads": 0}, {})


def test_the_archive_writes_the_thread_settings_into_model_config(tmp_path):
    stage_archive(get_spec("synthetic_digits_cnn"), tmp_path / "stage", DEFAULT_WORKER_CONFIG, DEFAULT_PATHWAY_CONFIG)
    config = yaml.safe_load((tmp_path / "stage" / "model-config.yaml").read_text())
    assert config["pathway"]["torch_threads"] == "auto"
    assert config["pathway"]["torch_interop_threads"] == "auto"
    assert config["minWorkers"] == config["maxWorkers"] == 2
    assert worker_threads(config["pathway"], config) == (max(1, CORES // 2), 1)
