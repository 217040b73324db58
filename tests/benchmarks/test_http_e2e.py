"""benchmarks/speed/http_e2e.py: the worker settings both deployments get, and how it reads TorchServe's batching."""

from __future__ import annotations

from benchmarks.speed.http_e2e import WORKER, batched_requests, worker_config

EXPOSITION = """\
# HELP pathway_batch_requests requests per TorchServe batch
# TYPE pathway_batch_requests histogram
pathway_batch_requests_bucket{ModelName="efficientnet_lite0",Level="Model",Hostname="vm",le="1.0",} 3.0
pathway_batch_requests_count{ModelName="efficientnet_lite0",Level="Model",Hostname="vm",} 5.0
pathway_batch_requests_sum{ModelName="efficientnet_lite0",Level="Model",Hostname="vm",} 14.0
pathway_batch_requests_count{ModelName="other_model",Level="Model",Hostname="vm",} 7.0
pathway_batch_requests_sum{ModelName="other_model",Level="Model",Hostname="vm",} 9.0
pathway_stage_seconds_sum{ModelName="efficientnet_lite0",Level="Model",stage="engine",kind="explain",Hostname="vm",} 2.5
"""


class _Server:
    def __init__(self, text: str):
        self.text = text

    def metrics(self) -> str:
        return self.text


def test_batched_requests_reads_one_models_histogram_sum_and_count():
    assert batched_requests(_Server(EXPOSITION), "efficientnet_lite0") == (14.0, 5.0)
    assert batched_requests(_Server(EXPOSITION), "other_model") == (9.0, 7.0)


def test_a_model_without_the_metric_counts_nothing():
    assert batched_requests(_Server(EXPOSITION), "stock_lite0") == (0.0, 0.0)


def test_worker_config_overrides_only_what_is_given():
    assert worker_config(2) == dict(WORKER, minWorkers=2, maxWorkers=2)
    config = worker_config(1, batch_size=8, max_batch_delay=5)
    assert (config["batchSize"], config["maxBatchDelay"], config["minWorkers"]) == (8, 5, 1)
    assert config["responseTimeout"] == WORKER["responseTimeout"]
