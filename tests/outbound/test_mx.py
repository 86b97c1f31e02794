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


class _LoopbackDns:
    """A DNS server on 127.0.0.1 (UDP) that answers from a table and counts
    the questions it gets: the real dnspython resolver against real packets."""

    def __init__(self) -> None:
        import socket
        import threading
        from collections import Counter

        self.asked: Counter[str] = Counter()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rrset

        soa = "ns.test. admin.test. 1 3600 600 86400 300"
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text(omit_final_dot=True)
            self.asked[name] += 1
            reply = dns.message.make_response(query)
            if name == "nx.test":
                reply.set_rcode(dns.rcode.NXDOMAIN)
                reply.authority.append(dns.rrset.from_text("test.", 300, "IN", "SOA", soa))
            elif name == "nomx.test":
                reply.authority.append(dns.rrset.from_text("test.", 300, "IN", "SOA", soa))
            elif name == "fail.test":
                reply.set_rcode(dns.rcode.SERVFAIL)
            else:  # mx.test for 300 s, zero.test for no time at all
                ttl = 0 if name == "zero.test" else 300
                reply.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "MX", f"10 mail.{name}."))
            self._sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def test_dns_answers_are_cached_for_their_ttl_failures_are_not() -> None:
    """The outbound worker asks for the same domain once per notification:
    positive answers and NXDOMAIN / no-MX (RFC 2308, the SOA's negative
    TTL) come from the cache while they last; SERVFAIL and a TTL of 0 are
    asked again each time."""
    from postvault.outbound.mx import DnsResolver

    server = _LoopbackDns()
    try:
        resolver = DnsResolver(lifetime=2.0, nameservers=["127.0.0.1"], port=server.port)
        for _ in range(3):
            assert resolver.mx("mx.test") == [(10, "mail.mx.test")]
            assert resolver.mx("zero.test") == [(10, "mail.zero.test")]
            with pytest.raises(NoSuchDomain):
                resolver.mx("nx.test")
            with pytest.raises(NoMxRecords):
                resolver.mx("nomx.test")
            with pytest.raises(DnsTemporaryError):
                resolver.mx("fail.test")
        assert server.asked["mx.test"] == 1 and server.asked["nx.test"] == 1 and server.asked["nomx.test"] == 1
        assert server.asked["zero.test"] == 3 and server.asked["fail.test"] == 3
        # Through the selection logic, the cached NXDOMAIN is still permanent.
        with pytest.raises(MailHostError) as err:
            mail_hosts("nx.test", resolver)
        assert err.value.permanent and server.asked["nx.test"] == 1
    finally:
        server.close()
