"""What the two command-line tools (``pathway-explain``, ``pathway-eval``) share: ``--device`` and the exit."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional, Sequence

import torch

from .errors import UsageError


def parse_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a usage error names what is wrong."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but CUDA is not available on this machine")
    return device


def run_main(run: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None, *,
             prog: str) -> None:
    """Exit with ``run``'s status; Ctrl-C is 130, as a shell reports it, not a traceback.

    Anything ``run`` did not turn into a message is a bug, not bad input: still one line on stderr and exit 3,
    with the traceback only when ``PATHWAY_DEBUG=1`` asks for it.
    """
    try:
        code = run(argv)
    except KeyboardInterrupt:
        code = 130
    except Exception as err:  # noqa: BLE001 - one line, never a traceback, unless asked for
        if os.environ.get("PATHWAY_DEBUG") == "1":
            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{prog}: internal error: {type(err).__name__}: {first} (PATHWAY_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        code = 3
    sys.exit(code)
