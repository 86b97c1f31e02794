"""The event loop that ``postvault serve`` and its SMTP worker processes
run on (``[server] event_loop``).

uvloop (libuv under the asyncio API) spends less CPU than the standard
library's selector loop on each socket read, write, TLS record and
cross-thread callback, which is a large share of an SMTP submission's cost
(docs/benchmarks.md, "Round 6: uvloop"). Twisted's asyncio reactor runs on
it unchanged. Where uvloop is not installed the server falls back to the
standard loop with a warning rather than refusing to start: the choice is
about speed, never about correctness.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(name: str) -> LoopFactory:
    """The factory of new event loops for ``[server] event_loop`` = ``name``."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("event loop: uvloop is not installed; running on asyncio's own loop")
        else:
            return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": what ``loop`` is, for the start-up log line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
