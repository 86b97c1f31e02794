"""The outbound worker as ``postvault serve`` runs it: the queue with the
``[notify]`` timings, a sender for the configured route, and the sweep of
held notifications as its periodic job."""

from __future__ import annotations

from ..runtime import Runtime
from .queue import OutboundQueue
from .sender import Sender
from .worker import OutboundWorker


def outbound_service(runtime: Runtime) -> OutboundWorker:
    from ..notices.hooks import sweep_held  # notices builds on outbound, not the reverse

    config = runtime.config
    queue = OutboundQueue.for_config(runtime.store.engine, config.notify)
    sender = Sender(config.notify, config.hostname)
    return OutboundWorker(queue, sender, jobs=(lambda: sweep_held(runtime.store, runtime.config),))
