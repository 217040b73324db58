"""Start a real TorchServe on free loopback ports through ``pathway-serve`` (the entry point users and Docker run)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A TorchServe started by ``pathway-serve`` in its own run directory, stopped with SIGTERM."""

    def __init__(self, run_dir: Path, model_store: Path, models=("efficientnet_lite0",), env=None,
                 config: Path = ROOT / "config.properties"):
        self.run_dir = run_dir
        self.ports = {name: free_port() for name in ("inference", "management", "metrics")}
        self.url = f"http://127.0.0.1:{self.ports['inference']}"
        self.management_url = f"http://127.0.0.1:{self.ports['management']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['metrics']}"
        self.env = dict(os.environ)
        # pathway-serve is the venv's console script, whose package may be installed from another checkout:
        # put this checkout first so the launcher (and the archive builder it imports) are the ones under test.
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env.update({f"TS_{name.upper()}_ADDRESS": f"http://127.0.0.1:{port}" for name, port in self.ports.items()})
        # gRPC listens too (7070/7071 by default, loopback): give it free ports so servers can run side by side.
        self.grpc_ports = {name: free_port() for name in ("inference", "management")}
        self.env.update({f"TS_GRPC_{name.upper()}_PORT": str(port) for name, port in self.grpc_ports.items()})
        self.env.update(env or {})
        exe = Path(sys.executable).with_name("pathway-serve")
        self.cmd = [str(exe), "--config", str(config), "--model-store", str(model_store), "--run-dir", str(run_dir),
                    "--no-build", "--models", *models]
        self.proc = None
        self.keys = None

    def start(self, timeout: float = 300) -> "Server":
        self.log = open(self.run_dir / "pathway-serve.out", "w") if self.run_dir.exists() else None
        if self.log is None:
            self.run_dir.mkdir(parents=True)
            self.log = open(self.run_dir / "pathway-serve.out", "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        out = self.run_dir / "pathway-serve.out"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pathway-serve exited with {self.proc.returncode}:\n{out.read_text()[-4000:]}")
            if "pathway-serve: ready" in out.read_text(errors="replace"):
                self.keys = json.loads((self.run_dir / "key_file.json").read_text())
                return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"pathway-serve not ready in {timeout} s:\n{out.read_text()[-4000:]}")

    @property
    def token(self) -> str:
        return self.keys["inference"]["key"]

    def headers(self, **extra) -> dict:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def post(self, path: str, **kwargs) -> requests.Response:
        headers = self.headers(**kwargs.pop("headers", {}))
        return requests.post(f"{self.url}{path}", headers=headers, timeout=kwargs.pop("timeout", 300), **kwargs)

    @property
    def management_token(self) -> str:
        return self.keys["management"]["key"]

    def management(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.management_token}", **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.management_url}{path}", headers=headers,
                                timeout=kwargs.pop("timeout", 60), **kwargs)

    def metrics(self) -> str:
        """The Prometheus exposition of the metrics address."""
        reply = requests.get(f"{self.metrics_url}/metrics", timeout=60)
        reply.raise_for_status()
        return reply.text

    def engine_source(self, timeout: float = 30) -> str:
        """Where the worker's handler code comes from (its "pathway handler ready" log line, which TorchServe's
        logger may write a little after the server answers /ping). TorchServe appends the archive's folder to
        the worker's PYTHONPATH, so with this harness's PYTHONPATH the worker imports this checkout."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.model_log().splitlines():
                if "pathway handler ready" in line and "engine from " in line:
                    return line.split("engine from ", 1)[1].strip().rstrip(")")
            if time.monotonic() > deadline:
                return ""
            time.sleep(0.5)

    def model_log(self) -> str:
        path = self.run_dir / "logs" / "model_log.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logged_batches(self, quiet: float = 0.5, timeout: float = 30) -> int:
        """How many batches the handler has logged, once no new line has come for ``quiet`` seconds (the lines of
        requests already answered may still be on their way to the log)."""
        deadline = time.monotonic() + timeout
        count = len(self.batch_sizes())
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = len(self.batch_sizes())
            if now == count:
                break
            count = now
        return count

    def batch_sizes(self, skip: int = 0, requests: int = 0, timeout: float = 30) -> list:
        """The request counts of the batches the handler logged ("pathway batch: N requests ..."), after the
        first ``skip`` batches, once they account for at least ``requests`` requests (or ``timeout`` seconds
        have passed): TorchServe's logger may write a batch's line a little after its replies were sent."""
        deadline = time.monotonic() + timeout
        while True:
            sizes = [int(line.split("pathway batch: ")[1].split()[0])
                     for line in self.model_log().splitlines() if "pathway batch:" in line][skip:]
            if sum(sizes) >= requests or time.monotonic() > deadline:
                return sizes
            time.sleep(0.2)

    def stop(self, timeout: float = 120) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
        return self.proc.returncode if self.proc else 0


def build_test_archive(store: Path, *, batch_size: int = 4, max_batch_delay: int = 300, workers: int = 1,
                       **worker) -> Path:
    """The default model's archive with a batching window wide enough for concurrent test clients to share, and
    one worker (so concurrent requests meet in its batches, which the tests observe)."""
    from handler.models import get_spec
    from handler.serving.archive import DEFAULT_WORKER_CONFIG, build_archive

    worker = dict(DEFAULT_WORKER_CONFIG, batchSize=batch_size, maxBatchDelay=max_batch_delay, minWorkers=workers,
                  maxWorkers=workers, **worker)
    return build_archive(get_spec("efficientnet_lite0"), store, worker_config=worker)
