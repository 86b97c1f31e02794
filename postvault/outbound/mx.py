"""Which hosts receive mail for a domain (RFC 5321 §5.1), when no
smarthost is configured.

``mail_hosts`` is the selection logic over a small ``Resolver`` protocol;
``DnsResolver`` implements that protocol with dnspython. Tests give a stub
resolver: it is our own seam, there is no DNS to reach offline.

The rules:
- MX records sorted by preference, lowest first; equal preferences in
  random order (RFC 5321 §5.1: "SHOULD" spread the load).
- No MX records but the domain exists: the domain itself is the one mail
  host ("implicit MX"; its A/AAAA records are looked up on connect).
- A "null MX" (a single MX of "."; RFC 7505): the domain accepts no mail,
  a permanent failure. So is a domain that does not exist (NXDOMAIN).
- A DNS failure that may pass (SERVFAIL, timeout): a temporary failure.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class NoSuchDomain(Exception):
    """NXDOMAIN: the domain does not exist."""


class NoMxRecords(Exception):
    """The domain exists but has no MX records."""


class DnsTemporaryError(Exception):
    """The lookup failed in a way that may pass (SERVFAIL, timeout)."""


class MailHostError(Exception):
    """No host can take mail for the domain; ``permanent`` says whether
    trying later can help."""

    def __init__(self, text: str, permanent: bool) -> None:
        super().__init__(text)
        self.permanent = permanent


class Resolver(Protocol):
    def mx(self, domain: str) -> Sequence[tuple[int, str]]:
        """(preference, exchange host) pairs, exchange without the trailing dot
        ("" for the root, i.e. a null MX). Raises ``NoSuchDomain``,
        ``NoMxRecords`` or ``DnsTemporaryError``."""
        ...


def mail_hosts(domain: str, resolver: Resolver, rng: random.Random | None = None) -> list[str]:
    """The hosts to try for ``domain``, in order; raises ``MailHostError``."""
    rng = rng or random.Random()
    try:
        records = list(resolver.mx(domain))
    except NoSuchDomain:
        raise MailHostError(f"the domain {domain} does not exist", permanent=True) from None
    except NoMxRecords:
        return [domain]  # RFC 5321 §5.1: the implicit MX, via A/AAAA
    except DnsTemporaryError as exc:
        raise MailHostError(f"DNS lookup for {domain} failed: {exc}", permanent=False) from None
    if not records:
        return [domain]
    if any(host in ("", ".") for _, host in records):
        # RFC 7505 §3: a null MX is the only record; if others are there too
        # the domain is misconfigured, and refusing is the safe reading.
        raise MailHostError(f"the domain {domain} accepts no mail (null MX)", permanent=True)
    by_pref: dict[int, list[str]] = {}
    for pref, host in records:
        by_pref.setdefault(pref, []).append(host.rstrip(".").lower())
    hosts: list[str] = []
    for pref in sorted(by_pref):
        group = by_pref[pref]
        rng.shuffle(group)
        hosts += [h for h in group if h not in hosts]
    return hosts


class DnsResolver:
    """``Resolver`` over dnspython (the system's resolver configuration,
    or ``nameservers`` on ``port``).

    Answers are cached for their TTL, and a domain that does not exist or
    has no MX for its SOA's negative TTL (RFC 2308), as any caching
    resolver does: the outbound worker sends a notification per delivered
    message, and asking DNS again for each one cost about 1 ms of CPU per
    message (dnspython's query, even against a local cache) for the same
    answer. A temporary failure (SERVFAIL, timeout) is not cached.
    """

    def __init__(self, lifetime: float = 20.0, *, nameservers: Sequence[str] | None = None,
                 port: int = 53) -> None:
        import dns.resolver

        self._resolver = dns.resolver.Resolver(configure=nameservers is None)
        if nameservers is not None:
            self._resolver.nameservers = list(nameservers)
            self._resolver.port = port
        self._resolver.lifetime = lifetime
        self._resolver.cache = dns.resolver.Cache()

    def mx(self, domain: str) -> list[tuple[int, str]]:
        import dns.exception
        import dns.resolver

        try:
            answer = self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(domain) from None
        except dns.resolver.NoAnswer:
            raise NoMxRecords(domain) from None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DnsTemporaryError(type(exc).__name__) from None
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(type(exc).__name__) from None
        import dns.name

        return [
            (int(r.preference), "" if r.exchange == dns.name.root else r.exchange.to_text(omit_final_dot=True))
            for r in answer
        ]
