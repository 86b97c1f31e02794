"""The change notices between ``postvault serve`` nodes, as a service.

With the store on PostgreSQL, ``Store.bus`` is a ``pgnotify.PgChangeBus``:
this service starts its sender and listener threads when the server starts
(before "postvault ready", so a node that says it is ready already hears
the others) and stops them when it stops. It stops last (``stops_last``),
after the sessions drained: changes made while draining still reach the
other nodes, and this node's sessions still hear theirs. On SQLite there is
nothing to do: one node serves (its submission workers, if any, relay
their changes to the main process themselves: ``smtpd/workers.py``), and
IDLE's poll catches what postvault commands change.
"""

from __future__ import annotations

import asyncio
import logging

from .runtime import Runtime
from .store.pgnotify import PgChangeBus

log = logging.getLogger("postvault.nodes")
# How long start waits for the first LISTEN; after that the listener keeps
# trying in the background and the server starts anyway (IDLE's poll is the
# fallback), since one slow connection should not stop mail.
LISTEN_WAIT_SECONDS = 15.0


class NodeLink:
    """A ``serve`` service with no listener (see the module docstring)."""

    name = "nodes"
    stops_last = True

    def __init__(self, runtime: Runtime) -> None:
        bus = runtime.store.bus
        self.bus = bus if isinstance(bus, PgChangeBus) else None

    async def start(self) -> list[str]:
        if self.bus is not None:
            if await asyncio.to_thread(self.bus.start, LISTEN_WAIT_SECONDS):
                log.info("hearing other nodes' changes (node %s)", self.bus.node)
            else:
                log.warning("not yet hearing other nodes' changes; still trying")
        return []

    async def stop(self, drain_seconds: float) -> None:
        if self.bus is not None:
            await asyncio.to_thread(self.bus.stop)
