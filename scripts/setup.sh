#!/usr/bin/env bash
# Create .venv in the checkout and install the project with its pinned dependencies.
# Idempotent: does nothing when pyproject.toml and constraints.txt are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: Python 3.10 or newer is needed (found: $("$PYTHON" --version 2>&1 || echo none))." >&2
    echo "setup: set PYTHON=/path/to/python3.11 or install one (Debian: apt-get install python3 python3-venv)." >&2
    exit 1
fi

stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ -x .venv/bin/python ]; then
    exit 0
fi

echo "setup: creating .venv and installing dependencies (torch is large: a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Our constraints replace any machine-wide pip constraint (which may cap torchvision below the pinned 0.29.2).
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install --quiet -e ".[serve,test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
.venv/bin/python -c 'import torch, torchvision, timm, ts, yaml' \
    || { echo "setup: the installed packages do not import; see the errors above" >&2; exit 1; }
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))" >&2
