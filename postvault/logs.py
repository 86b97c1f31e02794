"""Logging set-up for ``postvault serve``, from ``[log]`` in postvault.toml.

Our own records never carry message content. Libraries are another matter:
aiosmtpd's ``mail.log`` logs every DATA line at DEBUG and every reply at
DEBUG (our replies name refused files), so it is held at WARNING whatever
level the admin picks.
"""

from __future__ import annotations

import logging
import sys
import traceback
from types import TracebackType

from .conf.schema import LogConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party loggers that would log message content below these levels.
CLAMPED = {"mail.log": logging.WARNING}


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class ContentFreeFormatter(logging.Formatter):
    """Tracebacks with their frames and exception types, without exception
    messages: the frames say where a bug is, while a message may quote the
    data being processed (a header, a file name: PHI). Ours never do, but
    the email package's, Twisted's or a database driver's may."""

    def formatException(self, ei: ExcInfo) -> str:  # noqa: N802 (logging's name)
        if ei[0] is None:
            return ""
        te: traceback.TracebackException | None = traceback.TracebackException(*ei)
        parts = []
        while te is not None:
            kind = f"{te.exc_type.__module__}.{te.exc_type.__qualname__}" if te.exc_type else "?"
            parts.append("Traceback (most recent call last):\n" + "".join(te.stack.format())
                         + f"{kind} (message withheld: it may quote message data)")
            te = te.__cause__ or (None if te.__suppress_context__ else te.__context__)
        return "\nDuring or because of:\n".join(reversed(parts))


def configure_logging(config: LogConfig, tag: str | None = None) -> None:
    """Send log records where ``[log]`` says. ``tag``: put in every line
    after the level (with several submission processes, which process
    wrote it, e.g. "[smtp 1 pid 4242]"); None: the plain format."""
    handler: logging.Handler
    if config.file is not None:
        config.file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(config.file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ContentFreeFormatter(FORMAT if tag is None else FORMAT.replace(
        "%(levelname)s ", "%(levelname)s " + tag.replace("%", "%%") + " ")))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    for name, floor in CLAMPED.items():
        logging.getLogger(name).setLevel(max(floor, root.level))
