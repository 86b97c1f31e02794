"""Read flow control of the asyncio bridge (imapd/transport.py): a paused
protocol holds the socket only once bytes arrive while it is paused, so a
client that sends one command at a time costs no selector changes, and a
pipelining client is still held after one read. And the write side's cork:
a command's writes gathered into one socket write."""

from __future__ import annotations

import asyncio
from typing import Any

from twisted.internet.protocol import Protocol

from postvault.imapd.transport import Bridge


class LoopTransport(asyncio.Transport):
    """Stands in for asyncio's socket transport: records what the bridge
    asks of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.written = b""
        self.writes = 0
        self.closing = False

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def write(self, data: Any) -> None:
        self.written += bytes(data)
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default


class Recorder(Protocol):
    def __init__(self) -> None:
        self.got = b""

    def dataReceived(self, data: bytes) -> None:
        self.got += data


def test_a_pause_holds_the_socket_only_when_bytes_arrive_meanwhile() -> None:
    proto = Recorder()
    bridge = Bridge(lambda: proto, secure=True)
    sock = LoopTransport()
    bridge.connection_made(sock)
    transport = bridge.transport
    assert transport is not None

    # A command at a time: pause and resume touch nothing.
    for _ in range(3):
        transport.pauseProducing()
        transport.resumeProducing()
    assert sock.calls == []

    # Bytes while paused: delivered (the protocol buffers them), and the
    # socket is held until the protocol resumes; then read again.
    transport.pauseProducing()
    bridge.data_received(b"a NOOP\r\n")
    bridge.data_received(b"b NOOP\r\n")  # already in flight: no second pause
    assert proto.got == b"a NOOP\r\nb NOOP\r\n"
    assert sock.calls == ["pause"]
    transport.resumeProducing()
    assert sock.calls == ["pause", "resume"]
    transport.resumeProducing()
    assert sock.calls == ["pause", "resume"]

    # Not paused: bytes pass without any selector change.
    bridge.data_received(b"c NOOP\r\n")
    assert sock.calls == ["pause", "resume"] and proto.got.endswith(b"c NOOP\r\n")

    # A closing connection is never paused or resumed.
    transport.pauseProducing()
    sock.closing = True
    bridge.data_received(b"d NOOP\r\n")
    transport.resumeProducing()
    assert sock.calls == ["pause", "resume"]


def test_a_cork_gathers_writes_into_one_and_never_holds_bytes_back_from_a_wait() -> None:
    bridge = Bridge(Recorder, secure=True)
    sock = LoopTransport()
    bridge.connection_made(sock)
    transport = bridge.transport
    assert transport is not None

    transport.cork()
    transport.write(b"* 1 FETCH (UID 1)\r\n")
    transport.writeSequence([b"* 2 FETCH ", b"(UID 2)\r\n"])
    assert sock.written == b"" and sock.writes == 0
    transport.write(b"a OK done\r\n")
    transport.uncork()
    assert sock.written == b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 2)\r\na OK done\r\n"
    assert sock.writes == 1
    transport.uncork()  # nothing gathered: nothing written
    assert sock.writes == 1

    # Waiting for the client to take what was written sends what was
    # gathered first (and keeps gathering).
    transport.cork()
    transport.write(b"x")
    transport.drained()
    assert sock.written.endswith(b"x") and sock.writes == 2
    transport.write(b"y")
    assert sock.writes == 2
    # Closing sends it too, before the close.
    transport.loseConnection()
    assert sock.written.endswith(b"xy") and sock.writes == 3 and sock.closing
