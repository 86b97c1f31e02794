"""Progress of long admin work (backup, restore, fsck, audit verify).

On a terminal: a tqdm bar with counts and rate. Elsewhere (cron, a pipe, a
log file): one plain line every ``interval`` seconds and one at the end, so a
log shows the job is alive without a wall of carriage returns. Counts only:
never a name, subject or anything else from a message.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Counts ``advance`` calls toward ``total`` (None if unknown)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "items",
        stream: TextIO | None = None,
        interval: float = 5.0,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.count = 0
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._started = time.monotonic()
        self._last_line = self._started
        isatty = getattr(self._stream, "isatty", None)
        self._bar: tqdm | None = None
        if isatty is not None and isatty():
            self._bar = tqdm(total=total, desc=label, unit=f" {unit}", file=self._stream, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        at = time.monotonic()
        if at - self._last_line >= self._interval:
            self._last_line = at
            self._line(at)

    def _line(self, at: float, done: str = "") -> None:
        elapsed = max(at - self._started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.label}: {self.count}{of} {self.unit} ({self.count / elapsed:.0f}/s){done}",
              file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._line(time.monotonic(), ", done")

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif exc is None:
            self._line(time.monotonic(), ", done")
