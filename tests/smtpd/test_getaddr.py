"""The fast path of SubmissionProtocol._getaddr (MAIL FROM / RCPT TO
arguments) returns exactly what aiosmtpd's own parser returns."""

from __future__ import annotations

import random

from aiosmtpd.smtp import SMTP

from postvault.smtpd.protocol import _PLAIN_PATH, SubmissionProtocol


class _Bare(SubmissionProtocol):
    """Only the attributes _getaddr reads (no connection is needed)."""

    def __init__(self, local_part_limit: int = 0) -> None:  # noqa: D107 - test double of our own parser seam
        self.local_part_limit = local_part_limit


def _outcome(fn, arg: str) -> object:  # type: ignore[no-untyped-def]
    try:
        return fn(arg)
    except Exception as exc:  # noqa: BLE001 - aiosmtpd raises on some inputs; both must agree
        return repr(exc)


def _compare(cases: list[str], limit: int = 0) -> int:
    proto = _Bare(limit)
    fast = 0
    for arg in cases:
        assert _outcome(proto._getaddr, arg) == _outcome(lambda a: SMTP._getaddr(proto, a), arg), repr(arg)
        fast += _PLAIN_PATH.match(arg) is not None
    return fast


def test_listed_arguments_parse_as_aiosmtpd_parses_them() -> None:
    cases = ["<a@b>", "<a@b> SIZE=10", "<a.b@c.d>", "<a..b@c.d>", "<.a@c.d>", "<a.@c.d>", "<a@b.>", "<a@.b>",
             "<a@b-c.d>x", "<a@b>\t BODY=8BITMIME", '<"q"@b>', "<a@[1.2.3.4]>", "< a@b>", "<a@b >", "<a@b>>",
             "<a b@c>", "<a@b@c>", "<ä@b>", "<a@bä>", "<>", "<a@b", "a@b", "<a+tag@b.c> SMTPUTF8", "<A@B.C>",
             "<a@b.c>(comment)", "<a@b>  ", "<a@b> (x) S", "<a@b>\r\n S", ""]
    assert _compare(cases) >= 5
    assert _compare(["<" + "x" * 65 + "@b.c>", "<" + "x" * 64 + "@b.c>"], limit=64) == 2


def test_generated_arguments_parse_as_aiosmtpd_parses_them() -> None:
    rnd = random.Random(20261126)
    local, domain, tail = "abZ09.!#$%&'*+/=?^_`{|}~-", "ab09-.", " \t()<>=Sa\r\n,;\"@"
    cases = []
    for _ in range(20000):
        lp = "".join(rnd.choice(local) for _ in range(rnd.randint(1, 6)))
        dp = "".join(rnd.choice(domain) for _ in range(rnd.randint(1, 6)))
        rest = "".join(rnd.choice(tail) for _ in range(rnd.randint(0, 5)))
        cases.append(f"<{lp}@{dp}>{rest}")
    assert _compare(cases) > 5000  # the fast path was taken, and agreed, thousands of times
