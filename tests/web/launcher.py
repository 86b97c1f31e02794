"""``postvault serve`` for the web tests, with the web pages' clock moved
by a file: the test writes an offset in seconds to the file named by
``PV_TEST_WEB_CLOCK_FILE`` and the idle and absolute session limits see
that much time pass, without the test waiting. Everything else (TLS, mail
services, queue) runs on real time.

Run as ``python -m tests.web.launcher serve --home DIR`` (the CLI's own
arguments).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import postvault.web.service as web_service
from postvault.cli.main import main


def file_clock(path: Path) -> web_service.Clock:
    def clock() -> float:
        try:
            offset = float(path.read_text() or 0)
        except (OSError, ValueError):
            offset = 0.0
        return time.time() + offset

    return clock


if __name__ == "__main__":
    clock_file = os.environ.get("PV_TEST_WEB_CLOCK_FILE")
    if clock_file:
        web_service.CLOCK = file_clock(Path(clock_file))
    sys.exit(main(sys.argv[1:]))
