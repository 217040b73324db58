"""The README cannot drift from the code: its shell and Python blocks run as written, its error-type table is
the set the code can emit, and every relative link in it and in docs/ resolves.

Shell blocks run in order, each in a fresh ``bash -euo pipefail`` in one scratch folder (so files one block
writes are there for the next), against the session's real TorchServe. The only substitution: the set-up
block's ``PATHWAY_URL=`` and ``TOKEN=`` lines, which the README defines for ``make run`` on 8080, get the
test server's address and token; its other lines (``PHOTO=...``) run verbatim and are prepended to every
later block. ``curl`` fails on an HTTP error (``--fail-with-body``). A block the test must not run carries
``<!-- readme-test: skip REASON -->`` on the line above it, with a REASON from :data:`SKIP_REASONS`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from error_types import emitted_error_types

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Why a block is not run. A block marked with any other reason fails the test.
SKIP_REASONS = {
    "starts-server": "starts a TorchServe in the foreground (make run, pathway-serve); the tests start their own",
    "runs-the-tests": "is the test command itself",
    "renews-the-token": "would replace the inference key that the test server's other clients use",
    "needs-docker": "needs a Docker engine, which the test machines do not have",
    "long-running": "benchmarks and full evaluations take tens of minutes",
}

FENCE = re.compile(r"^( *)```(\w*)\s*$")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(\S+)\s*-->")


def readme_blocks(text: str) -> list:
    """Every fenced block: (line, language, code, skip reason or None)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group(2):
            i += 1
            continue
        indent, language, start = len(match.group(1)), match.group(2), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(previous)
        blocks.append((start + 1, language, "\n".join(body) + "\n", skip.group(1) if skip else None))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
SHELL = [b for b in BLOCKS if b[1] == "sh"]
PYTHON = [b for b in BLOCKS if b[1] == "python"]
SETUP = next(b for b in SHELL if b[3] is None and re.search(r"^PATHWAY_URL=", b[2], re.M))
SHELL_RUN = [b for b in SHELL if b[3] is None and b is not SETUP]
PYTHON_RUN = [b for b in PYTHON if b[3] is None]


def block_id(block) -> str:
    first = next(line for line in block[2].splitlines() if line.strip() and not line.startswith("#"))
    return f"line{block[0]}:{first[:40]}"


def test_every_skipped_block_says_why_with_a_known_reason():
    skipped = [(line, reason) for line, language, _, reason in BLOCKS if reason is not None]
    assert skipped, "the README has blocks that start servers; they must be marked"
    for line, reason in skipped:
        assert reason in SKIP_REASONS, f"README line {line}: unknown skip reason {reason!r}"
    # what is skipped, for the record (pytest -rA shows it)
    print("\n".join(f"README line {line}: skipped, {SKIP_REASONS[reason]}" for line, reason in skipped))


def test_only_shell_python_and_output_blocks():
    assert {language for _, language, _, _ in BLOCKS} <= {"sh", "python", "json", "text"}
    # an unmarked server start would hang the test; fail early instead
    for line, language, code, reason in SHELL_RUN + PYTHON_RUN:
        assert not re.search(r"\bmake (run|serve|test)\b|pathway-serve\b(?!.*--healthcheck)|docker run", code), \
            f"README line {line} starts a server or the tests but is not marked skip"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder that looks like the repository's root to the commands: ``.venv`` is this checkout's."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(ROOT / ".venv")
    return folder


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def setup_script(server) -> str:
    code = SETUP[2]
    assert re.search(r"^PATHWAY_URL=http://127\.0\.0\.1:8080$", code, re.M), "the README defines PATHWAY_URL"
    assert re.search(r"^TOKEN=\$\(.*var/key_file\.json.*\)$", code, re.M), "the README defines TOKEN from var/"
    code = re.sub(r"^PATHWAY_URL=.*$", f"PATHWAY_URL={server.url}", code, flags=re.M)
    code = re.sub(r"^TOKEN=.*$", f"TOKEN={server.token}", code, flags=re.M)
    return code


def run_shell(code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = 'curl() { command curl --fail-with-body --silent --show-error "$@"; }\n' + code
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=900)


@pytest.mark.server
@pytest.mark.slow
def test_readme_shell_blocks_run_as_written_in_order(server, workdir):
    setup = setup_script(server)
    proc = run_shell(setup + 'test -f "$PHOTO"\n', workdir)
    assert proc.returncode == 0, proc.stderr
    for block in SHELL_RUN:
        proc = run_shell(setup + block[2], workdir)
        assert proc.returncode == 0, f"README {block_id(block)} failed:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
    # what the blocks left behind is what they promise
    assert (workdir / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "X-Explain-Target-Label" in (workdir / "overlay-headers.txt").read_text()
    # the CLI block's last run of the photo (no --save-attribution) left no attribution of the earlier one
    assert sorted(p.name for p in (workdir / "out").glob("coffee.*")) == [
        "coffee.heatmap.png", "coffee.json", "coffee.overlay.png"]
    assert (workdir / "model_store" / "my_resnet.mar").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON_RUN, ids=block_id)
def test_readme_python_blocks_run_offline(block, workdir):
    # No network: the examples must not download anything (a torchvision weights URL would fail here).
    env = environment()
    env.update({"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
                "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "",
                "TORCH_HOME": str(workdir / "torch-home"), "HF_HUB_OFFLINE": "1"})
    proc = subprocess.run([sys.executable, "-c", block[2]], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README {block_id(block)} failed:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip()


def test_readme_error_types_are_exactly_what_the_code_can_emit():
    text = README.read_text()
    table = text.split("<!-- error-types: begin -->", 1)[1].split("<!-- error-types: end -->", 1)[0]
    documented = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `(\w+)` \| (\d{3}) \|", table, re.M)}
    emitted = emitted_error_types()
    assert set(documented) - set(emitted) == set(), "documented but never emitted"
    assert set(emitted) - set(documented) == set(), "emitted but not in the README's table"
    assert documented == emitted, "statuses differ"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.*)$", markdown, re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("document", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_resolves(document):
    text = document.read_text()
    # links inside code blocks are code, not links
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    checked = 0
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        assert resolved.exists(), f"{document.name} links to {target}, which does not exist"
        if fragment and resolved.suffix == ".md":
            assert fragment in anchors(resolved.read_text()), f"{document.name}: no heading for #{fragment} in {path or document.name}"
        checked += 1
    assert checked or document != README


MENTION = re.compile(r"(?<![\w/.\-])((?:[\w\-]+/)*[\w\-]+\.md)\b")
#: Markdown files the tools write (outputs, not documents of the repository).
WRITTEN = {"summary.md"}


@pytest.mark.parametrize("document", [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "handler").rglob("*.py")),
                                      *sorted((ROOT / "benchmarks").rglob("*.py"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_markdown_file_mentioned_exists(document):
    """Plain mentions (``see docs/methods.md``) too: the README and docstrings once pointed at a METHOD.md that
    was never in the repository."""
    for name in set(MENTION.findall(document.read_text())) - WRITTEN:
        candidates = [document.parent / name, ROOT / name, ROOT / "docs" / name]
        assert any(c.exists() for c in candidates), f"{document.relative_to(ROOT)} mentions {name}, which does not exist"
