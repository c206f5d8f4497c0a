"""Progress of a run: a tqdm bar on a terminal, a log line every ``log_every`` seconds otherwise (cron)."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

from .items import EMPTY, OK

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, kind: str, *, total: int | None = None, bar: bool | None = None, quiet: bool = False,
                 log_every: float = 30.0):
        self.kind = kind
        self.total = total
        self.quiet = quiet
        self.log_every = log_every
        self.counts: Counter = Counter()
        self.skipped = 0
        self.started = self.last_log = time.monotonic()
        show_bar = bar if bar is not None else sys.stderr.isatty()
        self.bar = None
        if show_bar and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(desc=kind, total=total, unit=" items", dynamic_ncols=True, file=sys.stderr)

    def update(self, status: str | None = None, skipped: bool = False) -> None:
        if skipped:
            self.skipped += 1
        else:
            self.counts[status] += 1
        if self.bar is not None:
            self.bar.update(1)
            failed = self.failed()
            if failed or self.skipped:
                self.bar.set_postfix(failed=failed, skipped=self.skipped, refresh=False)
        elif not self.quiet and time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            self.log()

    def failed(self) -> int:
        """Rows that failed so far: not ok and not empty (silence is an answer, not a failure)."""
        return sum(n for s, n in self.counts.items() if s not in (OK, EMPTY))

    def log(self) -> None:
        done = sum(self.counts.values())
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        failed = self.failed()
        of = f" of ~{self.total}" if self.total else ""
        log.info("%s: %d processed (%d failed), %d already done%s, %.2f items/s", self.kind, done, failed,
                 self.skipped, of, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
