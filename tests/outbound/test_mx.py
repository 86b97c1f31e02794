"""MX selection (RFC 5321 §5.1, RFC 7505) over a stub of our Resolver protocol."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from postvault.outbound.mx import DnsTemporaryError, MailHostError, NoMxRecords, NoSuchDomain, mail_hosts


class StubResolver:
    def __init__(self, answers: dict[str, Sequence[tuple[int, str]] | Exception]) -> None:
        self.answers = answers

    def mx(self, domain: str) -> Sequence[tuple[int, str]]:
        answer = self.answers[domain]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_by_preference_lowest_first() -> None:
    resolver = StubResolver({"ortho.test": [(20, "backup.ortho.test."), (10, "MX1.ortho.test."), (30, "last.test")]})
    assert mail_hosts("ortho.test", resolver) == ["mx1.ortho.test", "backup.ortho.test", "last.test"]


def test_equal_preferences_are_shuffled() -> None:
    resolver = StubResolver({"ortho.test": [(10, "a.test"), (10, "b.test"), (10, "c.test"), (5, "first.test")]})
    orders = {tuple(mail_hosts("ortho.test", resolver, random.Random(seed))) for seed in range(30)}
    assert all(order[0] == "first.test" and sorted(order[1:]) == ["a.test", "b.test", "c.test"] for order in orders)
    assert len(orders) > 1


def test_no_mx_falls_back_to_the_domain_itself() -> None:
    assert mail_hosts("ortho.test", StubResolver({"ortho.test": NoMxRecords("ortho.test")})) == ["ortho.test"]
    assert mail_hosts("ortho.test", StubResolver({"ortho.test": []})) == ["ortho.test"]


@pytest.mark.parametrize("answer", [[(0, "")], [(0, ".")], NoSuchDomain("ortho.test")])
def test_null_mx_and_nxdomain_are_permanent(answer: object) -> None:
    with pytest.raises(MailHostError) as err:
        mail_hosts("ortho.test", StubResolver({"ortho.test": answer}))  # type: ignore[dict-item]
    assert err.value.permanent


def test_dns_trouble_is_temporary() -> None:
    with pytest.raises(MailHostError) as err:
        mail_hosts("ortho.test", StubResolver({"ortho.test": DnsTemporaryError("SERVFAIL")}))
    assert not err.value.permanent


def test_mx_route_tries_the_next_host_after_a_temporary_failure(config, certs) -> None:  # type: ignore[no-untyped-def]
    """Sender over MX: nothing answers at the first host, the second takes it."""
    from postvault.outbound.sender import Sender, verifying_context
    from tests.outbound.sink import sink

    with sink(certs) as (handler, port):
        resolver = StubResolver({"ortho.test": [(5, "127.0.0.2"), (10, "localhost")]})
        sender = Sender(config.notify, "mail.example.test", timeout=5, mx_port=port, resolver=resolver,
                        mx_context=verifying_context(certs.ca))
        outcome = sender.send("no-reply@mail.example.test", "dr@ortho.test", b"Subject: x\r\n\r\nhi\r\n")
    assert outcome.status == "sent", outcome
    assert len(handler.received) == 1 and handler.received[0].tls


def test_mx_route_permanent_for_null_mx(config) -> None:  # type: ignore[no-untyped-def]
    from postvault.outbound.sender import Sender

    sender = Sender(config.notify, "mail.example.test", resolver=StubResolver({"ortho.test": [(0, ".")]}))
    outcome = sender.send("no-reply@mail.example.test", "dr@ortho.test", b"Subject: x\r\n\r\nhi\r\n")
    assert outcome.status == "permanent" and "null MX" in outcome.text
