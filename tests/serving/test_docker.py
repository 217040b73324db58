"""The Docker image, checked without a Docker engine: the Dockerfile parsed by Docker's own parser (the
``dockerfile`` package wraps moby/buildkit's Go parser), what its install step puts in the package, and
its entry point and health check run here against a real TorchServe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATHWAY_SERVE = Path(sys.executable).with_name("pathway-serve")

dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (the test extra)")


@pytest.fixture(scope="module")
def instructions():
    return dockerfile.parse_file(str(ROOT / "Dockerfile"))


def final_stage(instructions) -> list:
    starts = [i for i, c in enumerate(instructions) if c.cmd == "FROM"]
    return list(instructions[starts[-1]:])


def args_of(instructions) -> dict:
    """Build arguments and their defaults (a later bare ``ARG NAME`` only re-imports one into a stage)."""
    out = {}
    for c in instructions:
        if c.cmd == "ARG":
            name, _, default = c.value[0].partition("=")
            if default or name not in out:
                out[name] = default
    return out


def env_of(commands) -> dict:
    env = {}
    for c in commands:
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2])))
    return env


def test_gpu_image_by_default_and_a_build_argument_for_cpu(instructions):
    args = args_of(instructions)
    assert args["VARIANT"] == "gpu"
    assert args["CUDA_BASE"].startswith("nvidia/cuda:") and "-runtime-" in args["CUDA_BASE"]
    assert "cuda" not in args["CPU_BASE"]
    froms = [c.value for c in instructions if c.cmd == "FROM"]
    assert ("${CUDA_BASE}", "AS", "base-gpu") in froms and ("${CPU_BASE}", "AS", "base-cpu") in froms
    assert froms[-1] == ("base-${VARIANT}", "AS", "runtime")
    stage_env = {}
    current = None
    for c in instructions:
        if c.cmd == "FROM":
            current = c.value[-1]
        elif c.cmd == "ENV":
            stage_env.setdefault(current, {}).update(dict(zip(c.value[::2], c.value[1::2])))
    assert "download.pytorch.org/whl/cpu" in stage_env["base-cpu"]["TORCH_INDEX_URL"]
    assert stage_env["base-gpu"]["TORCH_INDEX_URL"] == '""'


def test_java_17_and_pinned_python_dependencies(instructions):
    runs = " ".join(c.value[0] for c in final_stage(instructions) if c.cmd == "RUN")
    assert "openjdk-17-jre-headless" in runs and "python3.11" in runs
    assert "PIP_CONSTRAINT=/opt/pathway/constraints.txt" in runs and '".[serve]"' in runs
    copied = [c.value for c in instructions if c.cmd == "COPY"]
    assert ("pyproject.toml", "constraints.txt", "README.md", "./") in copied
    constraints = (ROOT / "constraints.txt").read_text()
    for package in ("torch==", "torchvision==", "torchserve==", "pyyaml==", "numpy==", "pillow=="):
        assert package in constraints


def test_runs_as_a_non_root_user(instructions):
    users = [c.value[0] for c in final_stage(instructions) if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = next(i for i, c in enumerate(final_stage(instructions)) if c.cmd == "ENTRYPOINT")
    last_user = max(i for i, c in enumerate(final_stage(instructions)) if c.cmd == "USER")
    assert last_user < entry


def test_entrypoint_is_pathway_serve_with_the_model_store_built_in(instructions):
    stage = final_stage(instructions)
    entry = next(c for c in stage if c.cmd == "ENTRYPOINT")
    assert entry.json and entry.value[0] == "pathway-serve"  # exec form: SIGTERM reaches the launcher
    runs = [c.value[0] for c in stage if c.cmd == "RUN"]
    assert any(r.startswith("pathway-archive --out /opt/pathway/model_store") for r in runs)
    env = env_of(stage)
    assert env["PATHWAY_MODEL_STORE"] == "/opt/pathway/model_store"
    assert env["PATHWAY_CONFIG"] == "/opt/pathway/config.properties"
    assert env["PATHWAY_RUN_DIR"].startswith("/home/model-server/")


def test_healthcheck_runs_the_tested_healthcheck_command(instructions):
    check = next(c for c in final_stage(instructions) if c.cmd == "HEALTHCHECK")
    assert check.value[:3] == ("CMD", "pathway-serve", "--healthcheck")
    flags = dict(f.lstrip("-").split("=", 1) for f in check.flags)
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)


def test_binds_all_interfaces_through_the_environment_and_keeps_tokens_on(instructions):
    env = env_of(final_stage(instructions))
    for name in ("INFERENCE", "MANAGEMENT", "METRICS"):
        assert env[f"TS_{name}_ADDRESS"].startswith("http://0.0.0.0:")
    props = dict(line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert props["enable_envvars_config"] == "true"  # what makes TS_* work
    assert props["inference_address"].startswith("http://127.0.0.1:")  # bare metal stays on loopback
    text = (ROOT / "Dockerfile").read_text().lower()
    assert "disable_token" not in text and "disable-token" not in text and "enable-model-api" not in text
    assert "enable_model_api" not in env and "TS_ENABLE_MODEL_API" not in env


def test_ports_are_documented_and_exposed(instructions):
    exposed = {p for c in final_stage(instructions) if c.cmd == "EXPOSE" for p in c.value}
    assert exposed == {"8080", "8081", "8082"}
    head = (ROOT / "Dockerfile").read_text().split("FROM", 1)[0]
    assert "--gpus all" in head and "8080 inference" in head and "key_file.json" in head


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", "model_store", ".git"} <= set(ignored)


def test_the_package_the_image_installs_carries_its_data_files(tmp_path):
    """The image installs the project as a wheel (not editable): the archive's entry module and the
    metrics declarations must be in it, or pathway-archive and the metrics fail inside the image."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    [wheel] = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"handler/serving/metrics.yaml", "handler/serving/ts_entry/pathway_handler.py",
            "handler/models/efficientnet_lite0.json"} <= names


# ---------------------------------------------------------------------------
# The health check, against the real server and a stand-in for an expired key
# ---------------------------------------------------------------------------


def healthcheck(run_dir: Path, env: dict, config: Path = ROOT / "config.properties") -> subprocess.CompletedProcess:
    env = dict(env, PYTHONPATH=str(ROOT), PATHWAY_RUN_DIR=str(run_dir), PATHWAY_CONFIG=str(config))
    return subprocess.run([str(PATHWAY_SERVE), "--healthcheck"], capture_output=True, text=True, env=env, timeout=60)


def test_healthcheck_passes_against_the_running_server(server):
    result = healthcheck(server.run_dir, server.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("healthy")


def test_healthcheck_reaches_a_server_bound_to_all_interfaces_through_loopback(server):
    env = dict(server.env, TS_INFERENCE_ADDRESS=server.url.replace("127.0.0.1", "0.0.0.0"))
    result = healthcheck(server.run_dir, env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_healthcheck_fails_without_a_key_file_or_a_server(server, tmp_path):
    missing = healthcheck(tmp_path, server.env)
    assert missing.returncode == 1 and "no TorchServe key file" in missing.stdout
    (tmp_path / "key_file.json").write_text((server.run_dir / "key_file.json").read_text())
    from server_harness import free_port

    nobody = healthcheck(tmp_path, dict(server.env, TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{free_port()}"))
    assert nobody.returncode == 1 and "did not answer Healthy" in nobody.stdout


class FakeTorchServe(BaseHTTPRequestHandler):
    """TorchServe's token rules in miniature: /ping wants the current inference key, /token the API key."""

    keys: dict = {}
    key_file: Path = None

    def _bearer(self) -> str:
        return self.headers.get("Authorization", "").removeprefix("Bearer ")

    def do_GET(self):
        ok = self.path == "/ping" and self._bearer() == self.keys["inference"]["key"] \
            and self.keys["inference"]["expiration time"] > "2100"
        self._answer(200 if ok else 400, {"status": "Healthy"} if ok else {"code": 400, "message": "Token failed"})

    def do_POST(self):
        if self.path == "/token?type=inference" and self._bearer() == self.keys["API"]["key"]:
            self.keys["inference"] = {"key": "renewed", "expiration time": "2999-01-01T00:00:00.000000001Z"}
            self.key_file.write_text(json.dumps(self.keys))
            return self._answer(200, self.keys)
        self._answer(400, {"code": 400})

    def _answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_healthcheck_renews_an_inference_key_that_has_already_expired(tmp_path):
    keys = {"management": {"key": "m", "expiration time": "2000-01-01T00:00:00Z"},
            "inference": {"key": "old", "expiration time": "2000-01-01T00:00:00.123456789Z"},
            "API": {"key": "api-key"}}
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps(keys))
    FakeTorchServe.keys, FakeTorchServe.key_file = keys, key_file
    httpd = HTTPServer(("127.0.0.1", 0), FakeTorchServe)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{httpd.server_port}"
        env = dict(os.environ, TS_INFERENCE_ADDRESS=address, TS_MANAGEMENT_ADDRESS=address)
        result = healthcheck(tmp_path, env)
    finally:
        httpd.shutdown()
    assert result.returncode == 0, result.stdout
    assert "renewed the expired inference key" in result.stdout
    assert json.loads(key_file.read_text())["inference"]["key"] == "renewed"


def test_healthcheck_does_not_touch_a_key_that_is_still_valid(server):
    before = (server.run_dir / "key_file.json").read_text()
    assert healthcheck(server.run_dir, server.env).returncode == 0
    assert (server.run_dir / "key_file.json").read_text() == before


def test_documented_run_command_matches_the_image(instructions):
    """docs/production.md's docker run lines use the ports and paths the Dockerfile defines."""
    doc = (ROOT / "docs" / "production.md").read_text()
    assert "docker build -t pathway-serve ." in doc and "--build-arg VARIANT=cpu" in doc
    assert "--gpus all" in doc and "/home/model-server/var/key_file.json" in doc
    runs = [line for line in doc.replace("\\\n", " ").splitlines() if line.strip().startswith("docker run")]
    assert runs and all("8080:8080" in line or "..." in line for line in runs)
