"""Logging set-up for ``postvault serve``, from ``[log]`` in postvault.toml.

Our own records never carry message content. Libraries are another matter:
aiosmtpd's ``mail.log`` logs every DATA line at DEBUG and every reply at
DEBUG (our replies name refused files), so it is held at WARNING whatever
level the admin picks.
"""

from __future__ import annotations

import logging
import sys

from .conf.schema import LogConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party loggers that would log message content below these levels.
CLAMPED = {"mail.log": logging.WARNING}


def configure_logging(config: LogConfig) -> None:
    handler: logging.Handler
    if config.file is not None:
        config.file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(config.file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    for name, floor in CLAMPED.items():
        logging.getLogger(name).setLevel(max(floor, root.level))
