"""The thread index: which messages belong to one conversation, and who
takes part in it, without storing a Message-ID or any other header.

Message-IDs are kept only as HMAC-SHA256 under a server key (RFC 5322
§3.6.4 identifiers). The reply-only policy (issue 3) asks "does this
In-Reply-To/References name a message this colleague holds?" by hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy.orm import Session

from . import serverkeys


_MSGID = re.compile(rb"<[^<>\s]{1,998}>")
# Bounded so a hostile References header can't make us hash forever.
MAX_REFERENCES = 100


@dataclass(frozen=True)
class ThreadHeaders:
    message_id: bytes | None
    references: tuple[bytes, ...]  # In-Reply-To first, then References, newest first


def parse_thread_headers(raw_head: bytes) -> ThreadHeaders:
    """Message-ID, In-Reply-To and References from a message's header block."""
    # compat32 never raises on malformed headers; we only need the ids.
    msg = BytesHeaderParser(policy=compat32).parsebytes(raw_head)

    def ids(name: str) -> list[bytes]:
        found: list[bytes] = []
        for value in msg.get_all(name) or []:
            found.extend(_MSGID.findall(str(value).encode("utf-8", "surrogateescape")))
        return found

    own = ids("Message-ID")
    refs = ids("In-Reply-To") + list(reversed(ids("References")))
    seen: list[bytes] = []
    for ref in refs:
        if ref not in seen:
            seen.append(ref)
    return ThreadHeaders(own[0] if own else None, tuple(seen[:MAX_REFERENCES]))


def thread_key(session: Session) -> bytes:
    """The server's HMAC key for the thread index."""
    return serverkeys.server_key(session, serverkeys.THREAD_INDEX)


def mid_hash(key: bytes, message_id: bytes) -> bytes:
    # Message-IDs compare case-sensitively except for the domain; keep exact.
    return serverkeys.keyed_hash(key, message_id.strip())
