"""Header objects of ``email.policy.default``, shared between messages.

The submission checks build the default policy's header objects for a few
fields of every message: the attachment check the Content-Type of each
part (the parser asks for it to find the structure), the From check the
From and Sender fields. Building one is a run of the email package's
header-value parser, about 0.1-0.2 ms of CPU each, and most messages
repeat the values of the previous ones: one account's From line is the
same on all its mail, a mail program writes the same Content-Type on every
plain-text message. Header objects are immutable (``str`` subclasses whose
parse tree and defects are fixed when they are made), so the object made
for one (name, value) pair serves every later message with that pair,
exactly as ``HeaderRegistry()(name, value)`` would make it again.

Only values that name no file are kept (a Content-Type or Content-Disposition
may carry a file name, which is PHI: it must not outlive its message in a
cache), and at most ``MAX_ENTRIES`` of them, least recently used out first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from email.headerregistry import BaseHeader, HeaderRegistry
from email.policy import linesep_splitter  # type: ignore[attr-defined]

MAX_ENTRIES = 256
# Fields whose values are worth keeping: they repeat from message to message.
SHARED_FIELDS = frozenset({"from", "sender", "content-type", "content-transfer-encoding"})

_registry = HeaderRegistry()
_made: OrderedDict[tuple[str, str], BaseHeader] = OrderedDict()
_lock = threading.Lock()  # the checks run on several worker threads


def header(name: str, value: str) -> BaseHeader:
    """``HeaderRegistry()(name, value)``: the default policy's header object
    for a field, made once for a value seen before (see the module
    docstring) and anew for any other field or for a value that could
    carry a file name."""
    if name.lower() not in SHARED_FIELDS or "name" in value.lower():
        return _registry(name, value)  # type: ignore[no-any-return]
    key = (name, value)
    with _lock:
        found = _made.get(key)
        if found is not None:
            _made.move_to_end(key)
            return found
    made: BaseHeader = _registry(name, value)
    with _lock:
        _made[key] = made
        while len(_made) > MAX_ENTRIES:
            _made.popitem(last=False)
    return made


def cached() -> list[tuple[str, str]]:
    """The (name, value) pairs held now, oldest first (for tests)."""
    with _lock:
        return list(_made)


def fetched(name: str, value: str) -> BaseHeader:
    """``email.policy.default.header_fetch_parse(name, value)`` for a raw
    value as the parser stores it: line breaks taken out, then ``header``."""
    return header(name, "".join(linesep_splitter.split(value)))
