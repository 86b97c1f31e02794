"""Server-side TLS over memory buffers (``ssl.MemoryBIO`` + ``SSLObject``).

Why not asyncio's own TLS (``create_server(ssl=...)``, ``loop.start_tls``):
Python 3.11's ``asyncio.sslproto.SSLProtocol`` gives every connection a
256 KiB read buffer (its class attribute ``max_size``), allocated zeroed and
so resident for the life of the connection. An IMAP client keeps several
connections open and idle for hours; that buffer was 90 % of the memory of
an idle session (docs/benchmarks.md, IMAP: 281 KiB per connection).
``max_size`` is not a documented setting, and ``SSLProtocol`` is not a
public class to subclass or construct. ``SSLObject`` over ``MemoryBIO`` is
the stdlib's documented way to run TLS over any byte stream: OpenSSL does
all of the protocol (same ``SSLContext``, so the same BCP 195 settings and
the SNI reload hook), and this class only moves bytes between the socket
and the BIOs. Received bytes are handed over as asyncio read them (no
per-connection buffer of ours); decrypted data is read out in
``READ_CHUNK`` pieces, which live only while they are delivered.

Everything here is synchronous and knows nothing of asyncio or Twisted:
``transport.StreamTransport`` calls it on the loop thread.
"""

from __future__ import annotations

import ssl

# Largest plaintext taken out of OpenSSL at a time. A TLS record carries at
# most 16 KiB; reading a few records per call keeps large APPEND uploads to
# a handful of calls per socket read.
READ_CHUNK = 64 * 1024


class TLSLayer:
    """One server-side TLS connection's state: feed it what the client
    sent, send the client what it returns."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.handshaken = False
        # The client sent close_notify (RFC 8446 §6.1): no more data will come.
        self.peer_closed = False

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Take ciphertext from the client; returns (plaintext for the
        application, ciphertext to send back: handshake messages, session
        tickets, alerts). Raises ``ssl.SSLError`` if the client's TLS is
        broken or refused; ``pending()`` then holds any alert to send."""
        self._incoming.write(data)
        if not self.handshaken:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return b"", self._outgoing.read()
            self.handshaken = True
        chunks = []
        while True:
            try:
                chunk = self._obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks), self._outgoing.read()

    def send(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt application data (after the handshake); returns the records."""
        view = memoryview(data)
        while view:
            # A memory BIO never refuses output, so this writes everything;
            # the loop is for SSL_MODE_ENABLE_PARTIAL_WRITE semantics.
            n = self._obj.write(view)
            view = view[n:]
        return self._outgoing.read()

    def close(self) -> bytes:
        """Our close_notify, to send before closing the socket. We don't wait
        for the client's: the connection ends either way (RFC 8446 §6.1
        allows closing without it once we are done writing)."""
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # expected: the client's close_notify has not come yet
        except ssl.SSLError:
            pass  # a connection already broken has nothing cleaner to say
        return self._outgoing.read()

    def pending(self) -> bytes:
        """Whatever OpenSSL has queued to send (an alert after a failure)."""
        return self._outgoing.read()
