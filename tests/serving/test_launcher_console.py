"""What ``make run`` shows a person: a banner once the model is loaded, one line per request, no key, a clean stop.

A real TorchServe through ``pathway-serve`` (the harness captures its stdout and stderr together, as a
terminal would show them); the banner's paste-ready lines are run as printed.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
from server_harness import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def console(tmp_path_factory, coffee):
    """The whole console of one server's life: start, the banner's commands, 20 requests in all, Ctrl-C."""
    from server_harness import build_test_archive

    store = tmp_path_factory.mktemp("store")
    build_test_archive(store)
    run_dir = tmp_path_factory.mktemp("run")
    server = Server(run_dir, store).start()
    keys = dict(server.keys)
    banner = (run_dir / "pathway-serve.out").read_text()
    paste = banner.split("Paste into a shell:\n", 1)[1].split("Ctrl-C stops", 1)[0]
    scratch = tmp_path_factory.mktemp("paste")
    pasted = subprocess.run(["bash", "-euo", "pipefail", "-c", paste.replace(" curl ", " curl --fail-with-body -sS ")],
                            cwd=scratch, capture_output=True, text=True, timeout=600)
    statuses = []
    for i in range(17):  # 3 from the banner's commands + 17 = 20 requests
        path = f"/predictions/{MODEL}" if i % 4 else f"/explanations/{MODEL}"
        body = coffee if i != 5 else b"not an image"
        statuses.append(server.post(path, data=body, headers={"Content-Type": "application/octet-stream"}).status_code)
    server.proc.send_signal(signal.SIGINT)  # Ctrl-C
    code = server.stop()
    return {"banner": banner, "pasted": pasted, "scratch": scratch, "statuses": statuses, "code": code, "keys": keys,
            "text": (run_dir / "pathway-serve.out").read_text(), "run_dir": run_dir}


def test_banner_comes_once_the_model_is_loaded_and_names_model_device_address_keys_and_logs(console):
    first, *rest = console["banner"].splitlines()
    # "cpu"/"cuda:N" come only from the handler's own "ready" line, written once it has loaded the model
    # (without that line the banner would say "the CPU")
    assert re.fullmatch(rf"pathway-serve: ready on http://127\.0\.0\.1:\d+: {MODEL} on (cpu|cuda:\d+)", first)
    assert any(line.strip().startswith("keys: ") and "key_file.json" in line for line in rest)
    assert any(line.strip().startswith("logs: ") and "console.log" in line for line in rest)
    assert "TorchServe" not in first and len(console["banner"].splitlines()) <= 12


def test_banner_commands_run_as_printed(console):
    assert console["pasted"].returncode == 0, console["pasted"].stderr
    assert '"predictions"' in console["pasted"].stdout
    assert (console["scratch"] / "overlay.png").read_bytes()[:4] == b"\x89PNG"


def test_console_after_20_requests_is_short_one_line_per_request_and_holds_no_key(console):
    lines = console["text"].splitlines()
    requests = [line for line in lines if re.fullmatch(r"\d\d:\d\d:\d\d (POST|PUT) /\S+ -> \d{3} in \d+ ms", line)]
    assert len(requests) == 20
    assert sum(" -> 400 " in line for line in requests) == 1  # the bad request is shown with its status
    assert len(lines) < 40
    for kind in ("inference", "management", "API"):
        assert console["keys"][kind]["key"] not in console["text"], f"the {kind} key was printed"
    for noise in ("nvidia-smi", "[METRICS]", "WARNING", "Torchserve version", "ACCESS_LOG"):
        assert noise not in console["text"]
    # ... while TorchServe's full output is in the run directory's log files
    assert "Torchserve version" in (console["run_dir"] / "logs" / "console.log").read_text()


def test_ctrl_c_stops_torchserve_with_one_stopped_line(console):
    assert console["code"] == 0
    assert console["text"].splitlines()[-1].startswith("pathway-serve: stopped")
