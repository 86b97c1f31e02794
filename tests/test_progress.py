"""Progress lines for long admin work: plain lines off a terminal, a bar on one."""

from __future__ import annotations

import io

from postvault.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progress("fsck", 3, unit="blobs", stream=out, interval=0.0) as p:
        for _ in range(3):
            p.advance()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fsck: 1/3 blobs (")
    assert lines[-1].startswith("fsck: 3/3 blobs (") and lines[-1].endswith(", done")
    assert "\r" not in out.getvalue()


def test_interval_limits_the_lines() -> None:
    out = io.StringIO()
    with Progress("backup", None, stream=out, interval=3600) as p:
        for _ in range(1000):
            p.advance()
    assert out.getvalue().splitlines() == [line for line in out.getvalue().splitlines() if "done" in line]
    assert "backup: 1000 items" in out.getvalue()


def test_a_bar_on_a_terminal() -> None:
    out = FakeTTY()
    with Progress("verify", 10, unit="events", stream=out) as p:
        p.advance(10)
    text = out.getvalue()
    assert "verify" in text and "10/10" in text and "\r" in text
