"""What the engine tells its caller about work it had to reshape: a small, stable interface.

The engine never imports metrics or serving code. Whoever owns an
:class:`~handler.engine.Explainer` may set ``explainer.on_batch_split`` to a
callable taking one :class:`BatchSplit`; the engine calls it (through
:func:`report_split`) each time it retries a batch as smaller parts, e.g. after
an out-of-memory error. The serving layer counts these as
``pathway_oom_splits_total{source="engine"}``; the CLI leaves the hook unset.

Contract for the engine (the automatic OOM splitting lives there):

- call ``report_split(self.on_batch_split, BatchSplit(size=8, parts=(4, 4)))`` once per split,
  after deciding to split and before retrying the parts;
- ``parts`` are the sizes retried (a part that fails again and is split further is a new report);
- never let a listener's failure reach the caller: :func:`report_split` swallows and logs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSplit:
    """One batch retried as smaller parts."""

    size: int  # samples in the batch that failed
    parts: tuple  # sizes of the parts it is retried as
    reason: str = "out_of_memory"
    source: str = "engine"  # "engine" (automatic splitting) or "handler" (the server's retry-alone path)


BatchSplitListener = Callable[[BatchSplit], None]


def report_split(listener: Optional[BatchSplitListener], split: BatchSplit) -> None:
    """Tell ``listener`` (if any) about ``split``; its own failures are logged, never raised."""
    if listener is None:
        return
    try:
        listener(split)
    except Exception:  # noqa: BLE001 - observers must not break explanations
        logger.exception("batch-split listener failed")
