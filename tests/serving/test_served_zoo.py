"""Served archives of the architectures whose activation calls are not all per sample (issue: "every classifier
explains"): torchvision's EfficientNetV2 (the model adds in place to an activation's output) and Swin-V2 (its
continuous position-bias MLP runs on a table shared by the batch). Concurrent explanation requests are batched
by TorchServe and answered 200 from one engine pass, with no one-by-one fallback in the worker's log.

Random weights (the architecture is what is tested) and a small input keep it fast on the CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

ARCHITECTURES = {"effnetv2": "torchvision:efficientnet_v2_s", "swinv2": "torchvision:swin_v2_t"}
CLIENTS = 4


@pytest.fixture(scope="module")
def zoo_server(tmp_path_factory):
    from server_harness import Server

    from handler.models import Preprocessing, spec_for_architecture
    from handler.serving.archive import DEFAULT_WORKER_CONFIG, build_archive

    store = tmp_path_factory.mktemp("zoo_store")
    worker = dict(DEFAULT_WORKER_CONFIG, batchSize=CLIENTS, maxBatchDelay=1000, minWorkers=1, maxWorkers=1)
    for name, architecture in ARCHITECTURES.items():
        spec = spec_for_architecture(architecture, name=name, preprocessing=Preprocessing(resize=160, crop=160))
        build_archive(spec, store, worker_config=worker)
    srv = Server(tmp_path_factory.mktemp("zoo_run"), store, models=tuple(ARCHITECTURES)).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("model", sorted(ARCHITECTURES))
def test_concurrent_explanations_are_answered_from_one_batch_without_a_fallback(zoo_server, photos, model):
    images = [photos[name].read_bytes() for name in ("coffee", "chelsea", "astronaut", "rocket")][:CLIENTS]
    earlier = zoo_server.logged_batches()
    before = zoo_server.model_log()

    def explain(image: bytes):
        return zoo_server.post(f"/explanations/{model}", data=image,
                               headers={"Content-Type": "application/octet-stream"})

    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = list(pool.map(explain, images))
    for reply in replies:
        assert reply.status_code == 200, reply.text
        explanation = reply.json()["explanation"]
        assert explanation["method"] == "pathway_gradient"
        assert explanation["pathway"]["realised_sparsity"] >= explanation["pathway"]["requested_sparsity"]
    sizes = zoo_server.batch_sizes(skip=earlier, requests=CLIENTS)  # waits for the log to catch up
    log = zoo_server.model_log()[len(before):]
    assert "one by one" not in log, log[-3000:]
    assert sizes and max(sizes) > 1, "the concurrent requests were never batched together"
