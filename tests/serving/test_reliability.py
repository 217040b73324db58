"""Reliability against a real TorchServe on loopback: a bad-input corpus, mixed load from concurrent
clients, and a worker killed under load. Bounded in request count and wall time; measurements (duration,
throughput, worker memory, failed in-flight requests) are reported in the run's summary, not asserted
against a speed. Run alone with ``pytest -m reliability``."""

from __future__ import annotations

import base64
import io
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests

from bad_inputs import FRONTEND_REFUSED, RAW, corpus

pytestmark = [pytest.mark.server, pytest.mark.reliability]
MODEL = "efficientnet_lite0"
MAX_REQUEST_SIZE = 26214400  # config.properties
LOAD_REQUESTS = 520
LOAD_CLIENTS = 16
LOAD_TIME_CAP_S = 900  # a guard so the test always stops by itself, not a speed requirement


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def photo_bytes(photos):
    return {name: photos[name].read_bytes() for name in ("coffee", "chelsea", "astronaut")}


# ---------------------------------------------------------------------------
# Bad-input corpus (on the session's server)
# ---------------------------------------------------------------------------

CASES = corpus(b"PHOTO", MAX_REQUEST_SIZE)  # ids only; the real photo is put in per test


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_gets_a_json_4xx_and_the_next_request_succeeds(server, photo_bytes, index):
    name, request, status, error_type = corpus(photo_bytes["coffee"], MAX_REQUEST_SIZE)[index]
    route = "predictions" if status == 200 else "explanations"
    reply = server.post(f"/{route}/{MODEL}", **request)
    assert reply.status_code == status, f"{name}: {reply.status_code} {reply.text[:300]}"
    if name in FRONTEND_REFUSED:  # TorchServe's own 413, before the handler: no JSON body to check
        assert not reply.content or reply.content.lstrip()[:1] in (b"{", b"<")
    elif status == 200:
        body = reply.json()
        assert body["predictions"] and body["model"] == MODEL
    else:
        body = reply.json()  # the handler's errors are always JSON
        assert body["code"] == status and body["message"], body
        if error_type:
            assert body["type"] == error_type, body
    after = server.post(f"/predictions/{MODEL}", data=photo_bytes["coffee"], headers=RAW)
    assert after.status_code == 200 and after.json()["predictions"][0]["label"] == "espresso"


def test_unusual_but_valid_images_are_also_explained(server):
    """The converted forms go through the explanation path too (cheap method: this is about decoding)."""
    valid = [c for c in corpus(b"", MAX_REQUEST_SIZE) if c[2] == 200]
    assert len(valid) >= 4
    for name, request, _, _ in valid:
        request = dict(request, headers={**request["headers"], "X-Explain-Method": "gradient"})
        reply = server.post(f"/explanations/{MODEL}", **request)
        assert reply.status_code == 200, f"{name}: {reply.text[:300]}"
        assert reply.json()["explanation"]["heatmap"]["media_type"] == "image/png"


def test_corpus_is_large_enough():
    malformed = [c for c in CASES if c[2] != 200]
    assert len(malformed) >= 30 and len(CASES) - len(malformed) >= 4


# ---------------------------------------------------------------------------
# A server of its own for load and faults
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    from server_harness import Server, build_test_archive

    store = tmp_path_factory.mktemp("reliability_store")
    build_test_archive(store, batch_size=4, max_batch_delay=50)
    srv = Server(tmp_path_factory.mktemp("reliability_run"), store).start()
    yield srv
    srv.stop()


def worker_pid(server) -> int | None:
    reply = server.management("GET", f"/models/{MODEL}")
    reply.raise_for_status()
    workers = [w for w in reply.json()[0]["workers"] if w.get("status") == "READY" and w.get("pid")]
    return int(workers[0]["pid"]) if workers else None


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2 ** 20


def attribution(document: dict) -> np.ndarray:
    raw = base64.b64decode(document["explanation"]["attribution"]["data"])
    return np.load(io.BytesIO(raw)).astype(np.float32)


def load_plan(seed: int = 0) -> list:
    """520 requests: mostly predictions, explanations with the cheap gradient and a few pathway gradients
    (about 1.5 s each on a 2-core CPU)."""
    rng = random.Random(seed)
    photos = ("coffee", "chelsea", "astronaut")
    plan = [("predict", rng.choice(photos), {"top_k": rng.choice((1, 3, 5, 10))}) for _ in range(436)]
    explain_cases = [(p, {"method": "gradient", "target": t}) for p in photos for t in (None, 281)]
    plan += [("explain", *explain_cases[i % len(explain_cases)]) for i in range(75)]
    plan += [("explain", photos[i % 3], {"method": "pathway_gradient"}) for i in range(9)]
    rng.shuffle(plan)
    assert len(plan) == LOAD_REQUESTS
    return plan


def call(server, photo_bytes, kind, photo, options) -> requests.Response:
    body = {"image": b64(photo_bytes[photo]), **{k: v for k, v in options.items() if v is not None}}
    if kind == "explain":
        body["outputs"] = ["attribution", "pathway"]
        return server.post(f"/explanations/{MODEL}", json=body, timeout=600)
    return server.post(f"/predictions/{MODEL}", json=body, timeout=600)


def reference_key(kind, photo, options):
    return kind, photo, tuple(sorted((k, v) for k, v in options.items() if k != "top_k"))


def test_mixed_load_from_16_clients_matches_sequential_answers(load_server, photo_bytes, measurements):
    plan = load_plan()
    # Sequential references, which also warm the worker up before its memory is read.
    references = {}
    for kind, photo, options in plan:
        key = reference_key(kind, photo, options)
        if key not in references:
            reply = call(load_server, photo_bytes, kind, photo, dict(options, top_k=10) if kind == "predict" else options)
            assert reply.status_code == 200, reply.text
            references[key] = reply.json()
    pid = worker_pid(load_server)
    rss_before = rss_mb(pid)

    deadline = time.monotonic() + LOAD_TIME_CAP_S
    lock = threading.Lock()
    outcomes = []

    def run(item):
        if time.monotonic() > deadline:
            return item, None
        reply = call(load_server, photo_bytes, *item)
        with lock:
            outcomes.append(reply.status_code)
        return item, reply

    started = time.monotonic()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        answered = list(pool.map(run, plan))
    duration = time.monotonic() - started
    rss_after = rss_mb(pid)

    skipped = sum(1 for _, reply in answered if reply is None)
    assert skipped == 0, f"the {LOAD_TIME_CAP_S} s guard stopped the load after {len(outcomes)} requests"
    statuses = [reply.status_code for _, reply in answered]
    assert not [s for s in statuses if s >= 500], f"5xx under load: {sorted(set(statuses))}"
    assert statuses.count(200) == LOAD_REQUESTS
    correlations = []
    for (kind, photo, options), reply in answered:
        doc, ref = reply.json(), references[reference_key(kind, photo, options)]
        assert [p["index"] for p in doc["predictions"]] == [p["index"] for p in ref["predictions"]][:len(doc["predictions"])]
        assert doc["predictions"][0]["probability"] == pytest.approx(ref["predictions"][0]["probability"], abs=1e-4)
        if kind == "explain":
            assert doc["explanation"]["target"]["index"] == ref["explanation"]["target"]["index"]
            r = float(np.corrcoef(attribution(doc).ravel(), attribution(ref).ravel())[0, 1])
            correlations.append(r)
            assert r > 0.999, f"{photo} {options}: correlation {r:.5f} with its sequential answer"
    assert worker_pid(load_server) == pid, "the worker was restarted during the load"
    growth = rss_after - rss_before
    measurements["load"] = {
        "requests": len(answered), "clients": LOAD_CLIENTS,
        "predictions": sum(1 for k, _, _ in plan if k == "predict"),
        "explanations": sum(1 for k, _, _ in plan if k == "explain"),
        "duration_s": round(duration, 1), "requests_per_s": round(len(answered) / duration, 2),
        "worker_rss_before_mb": round(rss_before, 1), "worker_rss_after_mb": round(rss_after, 1),
        "worker_rss_growth_mb": round(growth, 1), "min_explanation_correlation": round(min(correlations), 6),
    }
    # Bounded: a leak of even one 224x224 float map per request would add far more over 520 requests
    # plus the allocator's caching; steady state stays well under this.
    assert growth < 512, f"worker RSS grew {growth:.0f} MB over {len(answered)} requests"


def test_killed_worker_is_restarted_and_only_in_flight_requests_fail(load_server, photo_bytes, measurements):
    old_pid = worker_pid(load_server)
    assert old_pid is not None
    total, kill_after = 160, 32
    lock = threading.Lock()
    done = []
    killed_at = []

    def run(i):
        photo = ("coffee", "chelsea", "astronaut")[i % 3]
        t = time.monotonic()
        try:
            reply = load_server.post(f"/predictions/{MODEL}", data=photo_bytes[photo], headers=RAW, timeout=300)
            status = reply.status_code
        except requests.RequestException:
            status = -1
        with lock:
            done.append((t, time.monotonic(), status))
            if len(done) == kill_after and not killed_at:
                os.kill(old_pid, signal.SIGKILL)
                killed_at.append(time.monotonic())
        return status

    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        statuses = list(pool.map(run, range(total)))
    assert killed_at, "the worker was never killed"
    failed = [s for s in statuses if s != 200]
    # Wait (bounded) for TorchServe to report a new worker, then every request must succeed again.
    new_pid, deadline = None, time.monotonic() + 240
    while time.monotonic() < deadline:
        new_pid = worker_pid(load_server)
        if new_pid and new_pid != old_pid:
            break
        time.sleep(1)
    assert new_pid and new_pid != old_pid, "TorchServe did not restart the killed worker"
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    after = [load_server.post(f"/predictions/{MODEL}", data=photo_bytes["coffee"], headers=RAW).status_code
             for _ in range(10)]
    assert after == [200] * 10
    explained = load_server.post(f"/explanations/{MODEL}", data=photo_bytes["chelsea"], headers=RAW)
    assert explained.status_code == 200 and explained.json()["explanation"]["target"]["index"] in (281, 282, 285)
    first_ok_after_kill = min((end for start, end, s in done if s == 200 and start >= killed_at[0]), default=None)
    measurements["worker_kill"] = {
        "requests": total, "clients": LOAD_CLIENTS, "killed_after": kill_after,
        "failed_requests": len(failed), "failed_statuses": sorted(set(failed)),
        "recovery_s": None if first_ok_after_kill is None else round(first_ok_after_kill - killed_at[0], 1),
        "old_pid": old_pid, "new_pid": new_pid,
    }
    # Only what was inside the worker when it died may fail: at most one batch per worker, never the queue.
    assert len(failed) <= LOAD_CLIENTS, f"{len(failed)} requests failed: {sorted(set(failed))}"
