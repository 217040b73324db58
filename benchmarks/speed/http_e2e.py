"""End to end through a real TorchServe on loopback: /explanations vs /predictions, and the stock anchor.

One TorchServe (started by ``pathway-serve``, the entry point users run) serves two archives of the
same network, EfficientNet-Lite0 with the same weights:

- ``efficientnet_lite0``: this project's handler (pathway gradient, PNG heatmap + pathway summary);
- ``stock_lite0``: TorchServe's stock ``image_classifier`` handler on a TorchScript trace of the same
  model, whose ``/explanations`` path is Captum integrated gradients with 15 steps, returned as
  nested JSON lists (what a stock deployment gives).

For each model, route and client count (1 and 8 concurrent clients), it sends the same photo and
records per-request latency (p50, p95), throughput, response bytes and, for this handler, how many
requests TorchServe put in each batch (the handler's ``pathway_batch_requests`` metric). One more row,
``explanations (gradient)``, is this handler's ``/explanations`` with ``X-Explain-Method: gradient``:
one forward and one backward with the same decoding, rendering and response as the pathway gradient,
measured in the same rounds. It is the method-independent part of an explanation over HTTP, so the run
itself shows how much of the 2x budget against a stock prediction is left for the pathway's second
pass. Both archives use the same worker settings (1 worker and the default archive's batchSize and maxBatchDelay;
``--workers 2`` for two per model, each with the threads ``model-config.yaml``'s ``auto`` gives it;
``--batch-size`` and ``--max-batch-delay`` change the batching of both). Run:
``.venv/bin/python benchmarks/speed/http_e2e.py`` (about 10 minutes on 2 CPU cores); writes
``benchmarks/speed/results/http-<device>.{json,md}`` (``--name`` changes the stem). ``--no-stock-explanations``
leaves out the stock IG explanations (minutes at 8 clients), which the acceptance ratios do not need.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.common import git_revision, machine, write_results  # noqa: E402
from handler.models import get_spec, load_model  # noqa: E402
from handler.samples import sample_photo  # noqa: E402
from handler.serving.archive import DEFAULT_PATHWAY_CONFIG, DEFAULT_WORKER_CONFIG, build_archive  # noqa: E402
from server_harness import Server  # noqa: E402

WORKER = dict(DEFAULT_WORKER_CONFIG)


def worker_config(workers: int, batch_size: Optional[int] = None, max_batch_delay: Optional[int] = None) -> dict:
    """Both deployments' model-config.yaml worker settings: the default archive's, with these overrides."""
    config = dict(WORKER, minWorkers=workers, maxWorkers=workers)
    if batch_size is not None:
        config["batchSize"] = batch_size
    if max_batch_delay is not None:
        config["maxBatchDelay"] = max_batch_delay
    return config


def build_stock_archive(store: Path, work: Path, worker: dict) -> None:
    """TorchServe's stock image_classifier on a TorchScript trace of the same EfficientNet-Lite0 as trained (what
    a stock deployment serves: no preparation)."""
    import yaml

    model = load_model("efficientnet_lite0", prepare=False).module
    traced = torch.jit.trace(model, torch.randn(1, 3, 224, 224))
    traced.save(str(work / "stock_lite0.pt"))
    (work / "model-config.yaml").write_text(yaml.safe_dump(worker))
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run([str(archiver), "--model-name", "stock_lite0", "--version", "1.0", "--serialized-file",
                    str(work / "stock_lite0.pt"), "--handler", "image_classifier", "--config-file",
                    str(work / "model-config.yaml"), "--export-path", str(store), "--force"], check=True)


def _size(n: float) -> str:
    return f"{n:.0f} B" if n < 1000 else f"{n / 1000:.0f} kB"


#: Rows beyond a route's default request: ``(model, route label) -> (route, extra headers)``.
VARIANTS = {("efficientnet_lite0", "explanations (gradient)"): ("explanations", {"X-Explain-Method": "gradient"})}


def request_of(model: str, label: str) -> tuple:
    """``(path, headers)`` of one row's request."""
    route, extra = VARIANTS.get((model, label), (label, {}))
    return f"/{route}/{model}", {"Content-Type": "application/octet-stream", **extra}


def measure(server: Server, model: str, route: str, photo: bytes, clients: int, requests_per_client: int) -> tuple:
    """``(latencies in s, wall s, response sizes)`` of ``clients`` concurrent clients sending
    ``requests_per_client`` requests each (``route``: a route, or a label of :data:`VARIANTS`)."""
    path, headers = request_of(model, route)

    def one(_):
        start = time.perf_counter()
        reply = server.post(path, data=photo, headers=headers, timeout=600)
        elapsed = time.perf_counter() - start
        if reply.status_code != 200:
            raise RuntimeError(f"{model} {route}: {reply.status_code} {reply.text[:300]}")
        return elapsed, len(reply.content)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * requests_per_client)))
    return [r[0] for r in results], time.perf_counter() - start, [r[1] for r in results]


def batched_requests(server: Server, model: str) -> tuple:
    """``(requests, batches)`` the handler of ``model`` has counted so far (its ``pathway_batch_requests``
    histogram): how TorchServe grouped the requests. ``(0, 0)`` for a model without that metric (stock)."""
    totals = {"sum": 0.0, "count": 0.0}
    for line in server.metrics().splitlines():
        for kind in totals:
            if line.startswith(f"pathway_batch_requests_{kind}{{") and f'ModelName="{model}"' in line:
                totals[kind] += float(line.rsplit(" ", 1)[1])
    return totals["sum"], totals["count"]


def summarise(model: str, route: str, clients: int, latencies: list, wall: float, sizes: list) -> dict:
    latencies = sorted(latencies)
    return {
        "model": model, "route": route, "clients": clients, "requests": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
        "throughput_rps": len(latencies) / wall,
        "response_bytes": statistics.mean(sizes),
    }


def _round_range(ours: dict, stock: dict, key: str) -> str:
    """``"a–b×"``: the lowest and highest ratio ``ours[key] / stock[key]`` over the rounds."""
    ratios = [o[key] / s[key] for o, s in zip(ours["rounds"], stock["rounds"])]
    return f"{min(ratios):.2f}–{max(ratios):.2f}× per round"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=20,
                        help="requests per client with 1 client; half as many each with 8 clients")
    parser.add_argument("--photo", default=str(sample_photo("coffee")))
    parser.add_argument("--phone-sized", action="store_true",
                        help="send the coffee photo enlarged to 4032x2688 as a JPEG (quality 92, "
                             "benchmarks/speed/decode.py), the size class of a phone upload, instead of --photo")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speed" / "results")
    parser.add_argument("--name", help="results file stem (default http-<device>)")
    parser.add_argument("--workers", type=int, default=1, help="workers per model (default 1)")
    parser.add_argument("--torch-threads", type=int,
                        help="torch threads per worker, both deployments (default: model-config.yaml's auto)")
    parser.add_argument("--batch-size", type=int,
                        help=f"TorchServe batchSize, both deployments (default: the archive's, {WORKER['batchSize']})")
    parser.add_argument("--max-batch-delay", type=int,
                        help="TorchServe maxBatchDelay in ms, both deployments (default: the archive's, "
                             f"{WORKER['maxBatchDelay']})")
    parser.add_argument("--rounds", type=int, default=4,
                        help="the requests of each row are sent in this many rounds, interleaved with the other "
                             "rows' (a drifting machine then moves every row alike)")
    parser.add_argument("--no-stock-explanations", action="store_true",
                        help="leave out the stock handler's IG explanations (minutes at 8 clients)")
    args = parser.parse_args()
    worker = worker_config(args.workers, args.batch_size, args.max_batch_delay)
    routes = [("efficientnet_lite0", "predictions"), ("efficientnet_lite0", "explanations"),
              ("efficientnet_lite0", "explanations (gradient)"), ("stock_lite0", "predictions")]
    if not args.no_stock_explanations:
        routes.append(("stock_lite0", "explanations"))
    if args.phone_sized:
        from benchmarks.speed.decode import phone_sized

        photo = phone_sized("coffee", 92)
        photo_note = f"the coffee photo enlarged to 4032×2688, as a JPEG of {len(photo) / 1e6:.1f} MB (quality 92)"
    else:
        photo = Path(args.photo).read_bytes()
        photo_note = f"`{Path(args.photo).name}`"
        try:
            from PIL import Image

            with Image.open(args.photo) as image:
                photo_note += f" ({image.width}×{image.height} {image.format})"
        except OSError:
            pass
    rows = []
    with tempfile.TemporaryDirectory(prefix="pathway-http-") as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        store.mkdir()
        pathway = dict(DEFAULT_PATHWAY_CONFIG)
        if args.torch_threads is not None:
            pathway["torch_threads"] = args.torch_threads
        build_archive(get_spec("efficientnet_lite0"), store, worker_config=worker, pathway_config=pathway)
        build_stock_archive(store, tmp, worker)
        env = {} if args.torch_threads is None else {"OMP_NUM_THREADS": str(args.torch_threads)}
        server = Server(tmp / "run", store, models=("efficientnet_lite0", "stock_lite0=stock_lite0.mar"),
                        env=env).start()
        try:
            # /ping is healthy before every worker has loaded: warm every path first, so no measurement
            # shares the CPU with a model still loading (and one-off first-call work is excluded)
            for model, route in routes:
                path, headers = request_of(model, route)
                for _ in range(2 * args.workers):
                    reply = server.post(path, data=photo, headers=headers, timeout=600)
                    reply.raise_for_status()
            for clients in (1, 8):
                per_client = args.requests_per_client if clients == 1 else max(2, args.requests_per_client // 2)
                per_round = max(1, per_client // args.rounds)
                gathered = {key: ([], 0.0, []) for key in routes}
                rounds = {key: [] for key in routes}
                batching = {key: [0.0, 0.0] for key in routes}
                for _ in range(args.rounds):
                    for key in routes:
                        counts = key[0] != "stock_lite0"  # only this handler reports its batches
                        before = batched_requests(server, key[0]) if counts else None
                        latencies, wall, sizes = measure(server, *key, photo, clients, per_round)
                        if counts:
                            time.sleep(0.2)  # the frontend reads a worker's metric lines shortly after its reply
                            after = batched_requests(server, key[0])
                            batching[key] = [total + a - b for total, a, b in zip(batching[key], after, before)]
                        kept = gathered[key]
                        gathered[key] = (kept[0] + latencies, kept[1] + wall, kept[2] + sizes)
                        rounds[key].append(summarise(*key, clients, latencies, wall, sizes))
                for (model, route), (latencies, wall, sizes) in gathered.items():
                    row = summarise(model, route, clients, latencies, wall, sizes)
                    row["rounds"] = [{"p50_ms": r["p50_ms"], "throughput_rps": r["throughput_rps"]}
                                     for r in rounds[(model, route)]]
                    requests_counted, batches = batching[(model, route)]
                    row["requests_per_batch"] = requests_counted / batches if batches else None
                    rows.append(row)
                    print(f"{model:18s} {route:12s} clients={clients}: p50 {row['p50_ms']:.0f} ms, p95 "
                          f"{row['p95_ms']:.0f} ms, {row['throughput_rps']:.2f} req/s, "
                          f"{_size(row['response_bytes'])}", flush=True)
        finally:
            server.stop()
    info = machine()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def find(model, route, clients):
        return next(r for r in rows if (r["model"], r["route"], r["clients"]) == (model, route, clients))

    from handler.serving.launcher import RETAINED_HEAP, server_environment

    retained = all(server_environment(dict(os.environ), Path("var")).get(k) == v for k, v in RETAINED_HEAP.items())
    allocator = "retained heap (PATHWAY_RETAIN_HEAP=1)" if retained else "glibc defaults"
    from handler.serving.worker import worker_threads

    threads = worker_threads({} if args.torch_threads is None else {"torch_threads": args.torch_threads}, worker)
    threads_note = "model-config.yaml's `auto`" if args.torch_threads is None else "set for both deployments"
    lines = [
        f"# End to end over HTTP: TorchServe on loopback ({device})",
        "",
        f"Machine: {info.get('gpu', info['cpu'])}; {info['cpu_count']} CPU cores, torch {info['torch']}; "
        f"revision {git_revision()}. {args.workers} worker(s) per model ({threads[0]} torch thread(s) each: "
        f"{threads_note}), "
        f"requests in {args.rounds} interleaved rounds, batchSize {worker['batchSize']}, maxBatchDelay "
        f"{worker['maxBatchDelay']} ms, {photo_note} as raw "
        "bytes. `stock_lite0` is TorchServe's stock `image_classifier` handler on a "
        "TorchScript trace of the same network (explanations: Captum IG, 15 steps, nested JSON lists). "
        f"Server allocator: {allocator}.",
        "",
        "| model | route | clients | requests | p50 (ms) | p95 (ms) | throughput (req/s) | response "
        "| requests per batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_batch = r.get("requests_per_batch")
        lines.append(f"| {r['model']} | {r['route']} | {r['clients']} | {r['requests']} | {r['p50_ms']:.0f} | "
                     f"{r['p95_ms']:.0f} | {r['throughput_rps']:.2f} | {_size(r['response_bytes'])} | "
                     f"{'—' if per_batch is None else f'{per_batch:.2f}'} |")
    stock_p1 = find("stock_lite0", "predictions", 1)
    lines += ["", "Acceptance ratios of issue 12 (same run; in brackets the range of the same ratio over the "
              f"{args.rounds} rounds, each measured on that round's requests alone: how far this machine drifted):", ""]
    for clients in (1, 8):
        ours, stock = find("efficientnet_lite0", "predictions", clients), find("stock_lite0", "predictions", clients)
        lines.append(f"- {clients} client(s): /predictions throughput = "
                     f"{ours['throughput_rps'] / stock['throughput_rps']:.2f}× the stock deployment's "
                     f"({_round_range(ours, stock, 'throughput_rps')}; goal ≥ 1.0×)")
    explanations = find("efficientnet_lite0", "explanations", 1)
    lines.append(f"- 1 client: /explanations p50 = {explanations['p50_ms'] / stock_p1['p50_ms']:.2f}× the stock "
                 f"/predictions p50 ({_round_range(explanations, stock_p1, 'p50_ms')}; goal ≤ 2.0×)")
    gradient = find("efficientnet_lite0", "explanations (gradient)", 1)
    lines.append(f"- for reference, 1 client: a one-pass gradient explanation through the same handler (same "
                 f"decoding, rendering and response) = {gradient['p50_ms'] / stock_p1['p50_ms']:.2f}× the stock "
                 f"/predictions p50 ({_round_range(gradient, stock_p1, 'p50_ms')}); the pathway gradient = "
                 f"{explanations['p50_ms'] / gradient['p50_ms']:.2f}× it "
                 f"({_round_range(explanations, gradient, 'p50_ms')}): "
                 f"the 2× goal leaves {2 * stock_p1['p50_ms'] - gradient['p50_ms']:.0f} ms beyond the one-pass "
                 f"explanation, and the pathway's second pass and per-neuron work take "
                 f"{explanations['p50_ms'] - gradient['p50_ms']:.0f} ms")
    lines.append(f"- load average at the end: {os.getloadavg()[0]:.1f} on {info['cpu_count']} cores (a shared "
                 "machine: compare only ratios of one run)")
    if not args.no_stock_explanations:
        lines += ["", "Ratios (same run):", ""]
    for clients in (1, 8) if not args.no_stock_explanations else ():
        ours_e = find("efficientnet_lite0", "explanations", clients)
        ours_p = find("efficientnet_lite0", "predictions", clients)
        stock_e = find("stock_lite0", "explanations", clients)
        lines.append(f"- {clients} client(s): /explanations p50 = {ours_e['p50_ms'] / ours_p['p50_ms']:.2f}× "
                     f"/predictions p50 (goal ≤ 3×); stock IG-15 /explanations p50 = "
                     f"{stock_e['p50_ms'] / ours_e['p50_ms']:.1f}× ours (goal ≥ 6×); throughput "
                     f"{ours_e['throughput_rps'] / stock_e['throughput_rps']:.1f}× the stock path's; response "
                     f"{_size(ours_e['response_bytes'])} vs {stock_e['response_bytes'] / 1e6:.1f} MB")
    write_results(args.out, args.name or f"http-{device}", {"machine": info, "revision": git_revision(),
                                                            "worker": worker, "torch_threads": threads[0],
                                               "allocator": allocator, "results": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
