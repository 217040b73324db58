"""``pathway-serve``: check the prerequisites, build the archive, run TorchServe in the foreground.

The same entry point is what ``make run`` calls, what the Docker image runs and
what the tests start, so the path a user takes is the path that is tested.
TorchServe's own files (``key_file.json``, logs, its pid file) go to a run
directory so several servers can live side by side. SIGTERM/SIGINT stop
TorchServe (the Java frontend and its workers) before this process exits, which
then prints one "stopped" line.

The console is for a person: TorchServe's own output (a Java warning, the GPU
probe, its start-up report, ~18 lines per request) goes to
``<run-dir>/logs/console.log`` unless ``--verbose``. What is printed is a banner
once every model is *loaded* (TorchServe answers ``/ping`` seconds before a
worker has loaded the model, so the management API is polled for a READY
worker), with paste-ready commands, then one line per inference request, read
from TorchServe's access log. The keys are never printed, not even the
inference key: scrollback and captured container logs outlive a token.

Unless the configuration names its own ``metrics_config``, TorchServe is started
with a copy of the configuration that points it at ``<run-dir>/metrics.yaml``:
TorchServe's default metrics plus those the archives declare (TorchServe only
exposes declared metrics; see :mod:`.metrics`).

With ``PATHWAY_RETAIN_HEAP=1`` TorchServe and its workers run with glibc keeping
freed memory for reuse (:data:`RETAINED_HEAP`, unless those variables are already
set). Measured with ``benchmarks/speed/http_e2e.py`` it makes predictions faster
under concurrency and the stock Captum path much faster, but not this handler's
explanations (their score buffer is already reused), so it is off by default
(benchmarks/speed/README.md, "Memory allocator (CPU)").

``pathway-serve --healthcheck`` is the container's health probe: it pings
``/ping`` with the inference key from the run directory's key file (TorchServe
0.12 wants it even there), renewing that key with the API key first if it has
already expired, and exits 0 when the server answers Healthy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from .archive import DEFAULT_STORE, archive_is_stale, build_archive
from .metrics import write_server_metrics_config

ROOT = Path(__file__).resolve().parents[2]
JAVA_HELP = ("TorchServe 0.12 needs Java 17 or newer. On Debian/Ubuntu: apt-get update && apt-get install -y "
             "openjdk-17-jre-headless (or set JAVA_HOME to a JDK 17).")


#: glibc settings that keep freed memory for reuse (what jemalloc and tcmalloc do by default).
RETAINED_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def server_environment(base: dict, run_dir: Path) -> dict:
    """The environment TorchServe (and so each worker) starts with."""
    env = dict(base, TMPDIR=str(run_dir / "tmp"), TEMP=str(run_dir / "tmp"),
               LOG_LOCATION=str(run_dir / "logs"), METRICS_LOCATION=str(run_dir / "logs"))
    if env.get("PATHWAY_RETAIN_HEAP", "0") == "1":
        for key, value in RETAINED_HEAP.items():
            env.setdefault(key, value)
    # A worker's cores belong to torch's threads (serving.worker); NumPy's OpenBLAS would start as many of its
    # own, which keep spinning after a product and slow the next pass (benchmarks/speed/README.md).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


class LaunchError(RuntimeError):
    pass


def java_version() -> int:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java:
        raise LaunchError(f"java was not found. {JAVA_HELP}")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LaunchError(f"cannot run {java}: {err}. {JAVA_HELP}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise LaunchError(f"cannot read the Java version from: {(out.stderr or out.stdout).strip()[:200]}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0" style
        major = int(match.group(2))
    if major < 17:
        raise LaunchError(f"Java {major} found at {java}. {JAVA_HELP}")
    return major


def check_prerequisites() -> None:
    java_version()
    try:
        import yaml  # noqa: F401  TorchServe's worker dies without it; its wheel does not declare it
        import ts  # noqa: F401
    except ImportError as err:
        raise LaunchError(f"{err.name} is not installed: pip install 'torchserve==0.12.0' pyyaml "
                          "(or run scripts/setup.sh)") from None


def read_properties(path: Path) -> dict:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def effective(props: dict, key: str, default: str) -> str:
    """A TorchServe property as the server will see it: ``TS_<KEY>`` in the environment wins."""
    if props.get("enable_envvars_config", "false").lower() == "true":
        env = os.environ.get("TS_" + key.upper())
        if env:
            return env
    return props.get(key, default)


def ping(address: str, token: Optional[str] = None, timeout: float = 5) -> bool:
    """True when ``/ping`` answers Healthy (TorchServe 0.12 wants the inference token even there)."""
    request = urllib.request.Request(f"{address}/ping")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read().decode()).get("status") == "Healthy"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def read_keys(key_file: Path) -> Optional[dict]:
    try:
        return json.loads(key_file.read_text())
    except (OSError, ValueError):
        return None


def wait_ready(address: str, proc: subprocess.Popen, key_file: Optional[Path], timeout: float,
               cancelled=lambda: False) -> Optional[dict]:
    """Poll ``/ping`` until healthy (with token authorisation, using the key file's inference key); the keys."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cancelled():
        if proc.poll() is not None:
            raise LaunchError(f"TorchServe exited with status {proc.returncode} during start-up; see the logs")
        keys = read_keys(key_file) if key_file is not None else None
        if key_file is None or keys is not None:
            token = keys["inference"]["key"] if keys else None
            if ping(address, token):
                return keys
        time.sleep(1.0)
    if cancelled():
        return None
    raise LaunchError(f"TorchServe was not healthy at {address}/ping within {timeout:.0f} s")


def loopback(address: str) -> str:
    """An address to reach a server bound to all interfaces (``0.0.0.0``/``[::]``) from inside its host."""
    return re.sub(r"//(0\.0\.0\.0|\[::\])(?=[:/]|$)", "//127.0.0.1", address.rstrip("/"))


def key_expired(entry: dict, now: Optional[float] = None) -> bool:
    """Whether a key-file entry's ``expiration time`` (ISO 8601, UTC) has passed."""
    from datetime import datetime

    stamp = str(entry.get("expiration time", "")).replace("Z", "+00:00")
    try:
        expires = datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return False  # unknown format: let the ping decide
    return (time.time() if now is None else now) >= expires


def renew_key(management: str, keys: dict, kind: str = "inference", timeout: float = 5) -> bool:
    """Ask TorchServe for a new ``kind`` key (with the API key, which does not expire); it rewrites the key file."""
    request = urllib.request.Request(f"{management}/token?type={kind}", method="POST")
    request.add_header("Authorization", f"Bearer {keys['API']['key']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, KeyError):
        return False


def healthcheck(config: Path, run_dir: Path, timeout: float = 5) -> int:
    """0 when TorchServe answers ``/ping`` Healthy; 1 (and why, on stdout) otherwise."""
    props = read_properties(config) if config.is_file() else {}
    address = loopback(effective(props, "inference_address", "http://127.0.0.1:8080"))
    token = None
    if effective(props, "disable_token_authorization", "false").lower() != "true":
        key_file = run_dir / "key_file.json"
        keys = read_keys(key_file)
        if not keys or "inference" not in keys:
            print(f"unhealthy: no TorchServe key file at {key_file} (not started yet?)")
            return 1
        if key_expired(keys["inference"]):
            # Nobody holds a working inference key any more: renewing one cuts no client off.
            management = loopback(effective(props, "management_address", "http://127.0.0.1:8081"))
            if not renew_key(management, keys):
                print(f"unhealthy: the inference key expired at {keys['inference'].get('expiration time')} "
                      f"and could not be renewed at {management}")
                return 1
            keys = read_keys(key_file) or keys
            print(f"renewed the expired inference key (new one in {key_file})")
        token = keys["inference"]["key"]
    if ping(address, token, timeout=timeout):
        print(f"healthy: {address}/ping")
        return 0
    print(f"unhealthy: {address}/ping did not answer Healthy")
    return 1


def serving_config(config: Path, props: dict, run_dir: Path, archives: Sequence[Path]) -> Path:
    """The configuration TorchServe is started with: ``config`` itself when it names a ``metrics_config``;
    otherwise a copy in ``run_dir`` that points at the merged metrics declarations (written there)."""
    if "metrics_config" in props or os.environ.get("TS_METRICS_CONFIG"):
        return config
    metrics = write_server_metrics_config(run_dir / "metrics.yaml", archives)
    copy = run_dir / "ts-config.properties"
    copy.write_text(f"# Written by pathway-serve from {config}; edit that file, not this one.\n"
                    + config.read_text().rstrip("\n") + f"\n\n# Added by pathway-serve:\nmetrics_config={metrics}\n")
    return copy


def describe_model(management: str, name: str, token: Optional[str], timeout: float = 5) -> Optional[dict]:
    """The management API's description of ``name`` (its first version), or None when it does not answer."""
    request = urllib.request.Request(f"{management}/models/{name}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            data = json.loads(reply.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data[0] if isinstance(data, list) and data else None


def model_loaded(description: Optional[dict]) -> bool:
    """Whether a worker has loaded the model: TorchServe lists a worker as READY only once its handler's
    ``initialize`` returned (before that ``/ping`` already answers Healthy)."""
    return bool(description) and any(w.get("status") == "READY" for w in description.get("workers", []))


def wait_loaded(management: str, names: Sequence[str], proc: subprocess.Popen, keys: Optional[dict],
                timeout: float, cancelled=lambda: False) -> dict:
    """Poll the management API until every model has a READY worker; their descriptions by name."""
    token = keys["management"]["key"] if keys and "management" in keys else None
    deadline = time.monotonic() + timeout
    loaded: dict = {}
    while time.monotonic() < deadline and not cancelled():
        if proc.poll() is not None:
            raise LaunchError(f"TorchServe exited with status {proc.returncode} while loading the models")
        for name in names:
            if name not in loaded:
                description = describe_model(management, name, token)
                if model_loaded(description):
                    loaded[name] = description
        if len(loaded) == len(names):
            return loaded
        time.sleep(0.5)
    if cancelled():
        return loaded
    missing = ", ".join(n for n in names if n not in loaded)
    raise LaunchError(f"no worker had loaded {missing} within {timeout:.0f} s (a failing model is retried "
                      "by TorchServe; its error is in model_log.log)")


_HANDLER_READY = re.compile(r"pathway handler ready: model (\S+) on (\S+)")


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def worker_devices(model_log: Path, names: Sequence[str], since: int = 0, wait: float = 5.0) -> dict:
    """Model name -> device, from the handler's "pathway handler ready" lines written after byte ``since``
    (the log is appended to across runs; TorchServe's logger may write the line a little after the worker
    reports READY); a model whose line does not come is left out."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(model_log, "rb") as f:
                f.seek(since)
                found = dict(_HANDLER_READY.findall(f.read().decode(errors="replace")))
        except OSError:
            found = {}
        if set(names) <= set(found) or time.monotonic() >= deadline:
            return found
        time.sleep(0.25)


#: The shell command that prints the inference token of a key file (what the banner and the README show).
TOKEN_COMMAND = "python3 -c \"import json;print(json.load(open('{key_file}'))['inference']['key'])\""


def banner(address: str, models: dict, run_dir: Path, key_file: Optional[Path], photo: str) -> str:
    """What ``pathway-serve`` prints once the models are loaded: where things are and paste-ready commands.
    The keys themselves are never printed (they would stay in scrollback and in captured logs)."""
    first = next(iter(models))
    loaded = ", ".join(f"{name} on {device}" for name, device in models.items())
    logs = run_dir / "logs"
    auth = ' -H "Authorization: Bearer $TOKEN"' if key_file is not None else ""
    lines = [f"pathway-serve: ready on {address}: {loaded}"]
    if key_file is not None:
        lines.append(f"  keys: {key_file} (inference, management and API keys; never printed)")
    lines += [f"  logs: {logs}/ (ts_log.log, model_log.log, access_log.log; TorchServe's console: {CONSOLE_LOG})",
              "Paste into a shell:"]
    if key_file is not None:
        lines.append(f"  TOKEN=$({TOKEN_COMMAND.format(key_file=key_file)})")
    lines += [f"  PHOTO={shlex.quote(photo)}",
              f'  curl{auth} -T "$PHOTO" {address}/predictions/{first}',
              f'  curl{auth} -T "$PHOTO" {address}/explanations/{first}',
              f"  curl{auth} -H 'Accept: image/png' -T \"$PHOTO\" {address}/explanations/{first} -o overlay.png",
              "Ctrl-C stops the server. Requests:"]
    return "\n".join(lines)


#: TorchServe's own stdout/stderr (Java warnings, its start-up report, every log line), under <run-dir>/logs/.
CONSOLE_LOG = "console.log"
_ACCESS = re.compile(r'^(\S+?)(?:,\d+)? - \S+ "(\S+) (\S+) [^"]*" (\d{3}) (\d+)')
_REQUEST_PATHS = ("/predictions/", "/explanations/", "/v1/models/", "/v2/models/")


class AccessLogTail:
    """Turns new lines of TorchServe's ``access_log.log`` into one short console line per inference request
    (``/ping``, metrics and management calls are left out)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = ""

    def skip(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.partial = ""

    def lines(self) -> list:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        text = self.partial + data.decode(errors="replace")
        *complete, self.partial = text.split("\n")
        out = []
        for line in complete:
            match = _ACCESS.match(line.strip())
            if match and match.group(3).startswith(_REQUEST_PATHS):
                stamp, method, path, status, ms = match.groups()
                out.append(f"{stamp[11:19]} {method} {path} -> {status} in {ms} ms")
        return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pathway-serve", description="Serve predictions and pathway explanations "
                                "with TorchServe (foreground; Ctrl-C stops it).")
    p.add_argument("--config", type=Path, default=Path(os.environ.get("PATHWAY_CONFIG", ROOT / "config.properties")),
                   help="TorchServe config.properties (default $PATHWAY_CONFIG or config.properties)")
    p.add_argument("--model-store", type=Path, default=Path(os.environ.get("PATHWAY_MODEL_STORE", DEFAULT_STORE)),
                   help="where the .mar files are (default $PATHWAY_MODEL_STORE or model_store/)")
    p.add_argument("--models", nargs="*", default=["efficientnet_lite0"],
                   help="model names to load (NAME or NAME=FILE.mar from the model store)")
    p.add_argument("--run-dir", type=Path, default=Path(os.environ.get("PATHWAY_RUN_DIR", ROOT / "var")),
                   help="where key_file.json, logs and TorchServe's pid file go (default var/)")
    p.add_argument("--no-build", action="store_true", help="never (re)build the built-in archives")
    p.add_argument("--startup-timeout", type=float, default=300,
                   help="seconds to wait for TorchServe to answer and every model to be loaded")
    p.add_argument("--verbose", action="store_true",
                   help=f"TorchServe's own output on the console (by default it goes to <run-dir>/logs/{CONSOLE_LOG})")
    p.add_argument("--healthcheck", action="store_true",
                   help="do not start anything: exit 0 when the server of this config and run directory is healthy")
    args = p.parse_args(argv)
    if args.healthcheck:
        return healthcheck(args.config, args.run_dir.resolve())

    try:
        check_prerequisites()
        if not args.config.is_file():
            raise LaunchError(f"config file not found: {args.config}")
        props = read_properties(args.config)
        store = args.model_store.resolve()
        store.mkdir(parents=True, exist_ok=True)
        models = []
        for item in args.models:
            name, _, file = item.partition("=")
            file = file or f"{name}.mar"
            mar = store / file
            if not args.no_build and "=" not in item and archive_is_stale(mar):
                from ..models import get_spec

                print(f"pathway-serve: building {mar}", file=sys.stderr, flush=True)
                build_archive(get_spec(name), store)
            if not mar.is_file():
                raise LaunchError(f"no archive {mar}; build it with pathway-archive")
            models.append(f"{name}={file}")
    except (LaunchError, RuntimeError, ValueError) as err:
        print(f"pathway-serve: error: {err}", file=sys.stderr)
        return 3

    run_dir = args.run_dir.resolve()
    for sub in ("tmp", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    key_file = run_dir / "key_file.json"
    key_file.unlink(missing_ok=True)
    ts_config = serving_config(args.config.resolve(), props, run_dir, [store / m.split("=", 1)[1] for m in models])
    env = server_environment(os.environ, run_dir)
    cmd = [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs",
           "--ts-config", str(ts_config), "--model-store", str(store), "--models", *models]
    console = None if args.verbose else open(run_dir / "logs" / CONSOLE_LOG, "ab")
    # Its own session: Ctrl-C reaches this process only, which stops TorchServe in order (and says so).
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=console, stderr=subprocess.STDOUT if console else None,
                            start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            subprocess.run([sys.executable, "-m", "ts.model_server", "--stop"], cwd=run_dir, env=env,
                           capture_output=True, timeout=90)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if console is not None:
            console.close()

    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))

    def stopped() -> int:
        stop()
        for line in access.lines():  # requests answered just before the signal
            print(line, flush=True)
        print(f"pathway-serve: stopped (TorchServe shut down; logs in {run_dir / 'logs'})", flush=True)
        return 0

    access = AccessLogTail(run_dir / "logs" / "access_log.log")
    model_log = run_dir / "logs" / "model_log.log"
    model_log_start = log_size(model_log)
    address = loopback(effective(props, "inference_address", "http://127.0.0.1:8080"))
    management = loopback(effective(props, "management_address", "http://127.0.0.1:8081"))
    token_off = effective(props, "disable_token_authorization", "false").lower() == "true"
    names = [m.split("=")[0] for m in models]
    started = time.monotonic()
    try:
        keys = wait_ready(address, proc, None if token_off else key_file, args.startup_timeout,
                          lambda: bool(stopping))
        if not stopping:
            loaded = wait_loaded(management, names, proc, keys,
                                 max(1.0, args.startup_timeout - (time.monotonic() - started)), lambda: bool(stopping))
    except LaunchError as err:
        print(f"pathway-serve: error: {err} (logs: {run_dir / 'logs'})", file=sys.stderr)
        stop()
        return 4
    if stopping:
        return stopped()
    devices = worker_devices(model_log, names, model_log_start)
    gpu = {name: any(w.get("gpu") for w in loaded[name].get("workers", [])) for name in names}
    shown = {name: devices.get(name) or ("the GPU" if gpu[name] else "the CPU") for name in names}
    access.skip()  # the start-up pings
    print(banner(address, shown, run_dir, None if token_off else key_file, sample_photo()), flush=True)
    while proc.poll() is None:
        if stopping:
            return stopped()
        for line in access.lines():
            print(line, flush=True)
        time.sleep(0.2)
    print(f"pathway-serve: TorchServe exited with status {proc.returncode}; see {run_dir / 'logs' / CONSOLE_LOG}",
          file=sys.stderr)
    return proc.returncode


def sample_photo() -> str:
    try:
        from ..samples import sample_photo as find

        return str(find("coffee"))
    except (RuntimeError, KeyError):
        return "photo.jpg"


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
