"""Where mail for a domain goes: its MX hosts and their addresses (RFC 5321 section 5.1).

The MX route asks `MxResolver.hosts_for(domain)` and tries the hosts in the order it gets,
each host's addresses in their order. Everything that decides *which* hosts and *in what
order* lives here, so the route only connects; and every DNS outcome is sorted into one
of three exceptions the route can turn into an outcome without looking at DNS itself:

* `NullMx`: the domain says it accepts no mail (RFC 7505): fail now, 5.1.10.
* `DnsTemporary`: we could not learn the answer (timeout, SERVFAIL, REFUSED, ...): defer,
  4.4.3. RFC 5321 5.1: "If a temporary error is returned, the message MUST be queued and
  retried later."
* `DnsPermanent`: DNS answered, and the answer is that there is nowhere to deliver:
  NXDOMAIN (5.1.2), no MX and no address (5.1.2), or MX records none of which is usable
  (5.4.4). RFC 5321 5.1 says each of these "MUST be reported as an error".

Decisions worth knowing (each is repeated where it is made):

* A single MX `0 .` is a null MX. A "." among other MX records violates RFC 7505 section 3
  ("A domain that advertises a null MX MUST NOT advertise any other MX RR"); we skip the
  "." record and deliver to the others, since the domain evidently still names hosts
  that take mail. A lone "." with a preference other than 0 is not a null MX by the
  definition; it is an unusable MX, so the answer is `DnsPermanent` (5.4.4).
* Both A and AAAA are asked for every host, at the same time; a host's IPv4 addresses
  come before its IPv6 ones. RFC 5321 5.2 leaves the families' order to local
  circumstances, and many hosts that have AAAA records cannot route IPv6 at all; IPv4
  first is what fails least today.
* An MX host whose address lookup fails temporarily is left out if another host resolved;
  only if *no* host resolved is the answer temporary. Delivering to the hosts we know is
  better than waiting for one we cannot see; the next attempt asks again anyway.
* An MX exchange that is an IP address written as a name ("192.0.2.1") is skipped: RFC
  5321 5.1 says the data field "MUST contain a domain name", and following such records
  would let a misconfigured zone send mail to an address it never looked up.
* The same host named twice in an MX set is tried once, at its best preference.
* Names are made absolute and never searched: RFC 5321 5.1 says relays "MUST NOT" infer
  fully qualified names from partial ones, so resolv.conf's `search` list is not used.
* Domain literals ("[192.0.2.1]") are not DNS names; the caller handles them and
  `hosts_for` rejects them with `ValueError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

log = logging.getLogger("submitd.delivery.mx")

_DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class MxHost:
    """One host to try: its name, its MX preference, and its addresses in order."""

    name: str  # host name ("mx1.example.net"), or the domain itself for the implicit MX
    preference: int
    addresses: tuple[str, ...]  # IPv4 then IPv6, each family in the order DNS gave


class NullMx(Exception):
    """RFC 7505: the domain publishes a null MX and accepts no mail. Fail at once."""

    enhanced = "5.1.10"  # registered by RFC 7505: "Recipient address has null MX"


class DnsTemporary(Exception):
    """DNS did not give an answer we can rely on now; try again later (RFC 5321 5.1)."""

    enhanced = "4.4.3"  # RFC 3463: directory server failure


class DnsPermanent(Exception):
    """DNS answered that there is nowhere to deliver: bounce (RFC 5321 5.1)."""

    def __init__(self, message: str, enhanced: str = "5.1.2") -> None:
        super().__init__(message)
        # 5.1.2 "bad destination system address": the domain does not exist or names no
        # mail host; 5.4.4 "unable to route": it has MX records, none of them usable.
        self.enhanced = enhanced


@dataclass(frozen=True, slots=True)
class _Addresses:
    """What the A and AAAA lookups for one name gave."""

    addresses: tuple[str, ...]
    temporary: str | None  # why one of the lookups failed temporarily, if one did


class MxResolver:
    """Looks up the MX hosts of a domain and their addresses, over dnspython's resolver.

    One instance is meant to be shared: it holds no per-domain state (no cache of its own;
    a caching resolver in front of it, or the system's, is the place for that).
    """

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = 10.0) -> None:
        """`nameservers`: "127.0.0.1", "127.0.0.1:5353", "::1" or "[::1]:5353"; empty
        means the system's (/etc/resolv.conf). `timeout`: seconds for one `hosts_for`
        call as a whole, every query in it included, so a dead resolver costs at most
        that long per attempt."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._timeout = timeout
        if nameservers:
            # configure=False: nothing is read from /etc/resolv.conf, so these servers are
            # the only ones ever asked (tests depend on this to stay on loopback).
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [_nameserver(text) for text in nameservers]
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=True)
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(self._resolver.timeout, timeout)
        self._random = random.Random()

    async def hosts_for(self, domain: str) -> list[MxHost]:
        """The hosts to try for `domain`, best first, each with at least one address.

        Raises `NullMx`, `DnsTemporary` or `DnsPermanent` (see the module docstring);
        never returns an empty list.
        """
        name = _domain_name(domain)
        deadline = time.monotonic() + self._timeout
        try:
            answer = await self._resolve(name, dns.rdatatype.MX, deadline)
        except dns.resolver.NXDOMAIN:
            # RFC 5321 5.1: "If a non-existent domain error is returned, this situation
            # MUST be reported as an error."
            raise DnsPermanent(f"{_text(name)}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            # NOERROR with no MX: "the address is treated as if it was associated with an
            # implicit MX RR, with a preference of 0, pointing to that host" (RFC 5321 5.1).
            # The resolver followed any CNAME at the domain; the A/AAAA lookups follow it
            # again, so asking for the domain's own name gives the canonical host's
            # addresses, as 5.1 wants ("processed as if it were the initial name").
            return await self._implicit_mx(name, deadline)
        records = [rdata for rdata in answer if isinstance(rdata, MX)]
        if not records:  # an answer with only other types; dnspython raises NoAnswer first
            return await self._implicit_mx(name, deadline)
        return await self._explicit_mx(name, records, deadline)

    async def _implicit_mx(self, name: dns.name.Name, deadline: float) -> list[MxHost]:
        found = await self._addresses(name, deadline)
        if found.addresses:
            return [MxHost(_text(name), 0, found.addresses)]
        if found.temporary is not None:
            raise DnsTemporary(f"{_text(name)}: no MX; address lookup: {found.temporary}")
        # RFC 5321 5.1: "... or the implicit MX is unusable, this situation MUST be
        # reported as an error."
        raise DnsPermanent(f"{_text(name)}: no MX and no A/AAAA record")

    async def _explicit_mx(
        self, name: dns.name.Name, records: list[MX], deadline: float
    ) -> list[MxHost]:
        if (
            len(records) == 1
            and records[0].preference == 0
            and records[0].exchange.labels == (b"",)
        ):
            # RFC 7505 section 3: "a single MX RR with an RDATA section consisting of
            # preference number 0 and a zero-length label" means no mail is accepted.
            raise NullMx(f"{_text(name)} publishes a null MX (RFC 7505): it accepts no mail")
        candidates = self._order(name, records)
        if not candidates:
            raise DnsPermanent(f"{_text(name)}: none of its MX records is usable", "5.4.4")
        found = await asyncio.gather(
            *(self._addresses(exchange, deadline) for exchange, _preference in candidates)
        )
        hosts: list[MxHost] = []
        temporary: list[str] = []
        for (exchange, preference), result in zip(candidates, found, strict=True):
            if result.addresses:
                if result.temporary is not None:
                    log.info("mx %s of %s: %s", _text(exchange), _text(name), result.temporary)
                hosts.append(MxHost(_text(exchange), preference, result.addresses))
            elif result.temporary is not None:
                log.warning(
                    "mx %s of %s skipped for now: %s",
                    _text(exchange),
                    _text(name),
                    result.temporary,
                )
                temporary.append(f"{_text(exchange)}: {result.temporary}")
            else:
                log.warning(
                    "mx %s of %s skipped: it has no A/AAAA record", _text(exchange), _text(name)
                )
        if hosts:
            # Some host may be missing because of a temporary failure; the others are
            # still the right place to try now (see the module docstring).
            return hosts
        if temporary:
            raise DnsTemporary(f"{_text(name)}: no MX host resolved ({'; '.join(temporary)})")
        # RFC 5321 5.1: "If MX records are present, but none of them are usable, this
        # situation MUST be reported as an error."
        raise DnsPermanent(f"{_text(name)}: none of its MX hosts has an address", "5.4.4")

    def _order(self, name: dns.name.Name, records: list[MX]) -> list[tuple[dns.name.Name, int]]:
        """Usable exchanges by preference; equal preferences in random order.

        RFC 5321 5.1: lower preference first, and for equal preferences "the sender-SMTP
        MUST randomize them to spread the load". The random key is drawn per record per
        call, so every lookup gives a fresh order.
        """
        keyed: list[tuple[int, float, dns.name.Name]] = []
        for record in records:
            exchange = record.exchange
            if exchange.labels == (b"",):
                # A "." among other MX records breaks RFC 7505 section 3; the other
                # records still name hosts that take mail, so use them and skip this one.
                log.warning("%s: null MX among other MX records; ignoring the null MX", _text(name))
                continue
            if _is_ip_literal(exchange):
                log.warning(
                    "mx %s of %s skipped: an MX must name a host, not an address (RFC 5321 5.1)",
                    _text(exchange),
                    _text(name),
                )
                continue
            keyed.append((record.preference, self._random.random(), exchange))
        keyed.sort(key=lambda item: (item[0], item[1]))
        ordered: list[tuple[dns.name.Name, int]] = []
        seen: set[dns.name.Name] = set()
        for preference, _key, exchange in keyed:
            if exchange not in seen:  # dns.name.Name compares case-insensitively
                seen.add(exchange)
                ordered.append((exchange, preference))
        return ordered

    async def _addresses(self, name: dns.name.Name, deadline: float) -> _Addresses:
        """A and AAAA for `name`, asked together; IPv4 first (see the module docstring)."""
        results = await asyncio.gather(
            self._address_family(name, dns.rdatatype.A, deadline),
            self._address_family(name, dns.rdatatype.AAAA, deadline),
        )
        addresses: list[str] = []
        problems: list[str] = []
        for family_addresses, problem in results:
            addresses.extend(a for a in family_addresses if a not in addresses)
            if problem is not None:
                problems.append(problem)
        return _Addresses(tuple(addresses), "; ".join(problems) if problems else None)

    async def _address_family(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> tuple[list[str], str | None]:
        """(addresses, None), ([], None) when there are none, ([], why) when unknown now."""
        try:
            answer = await self._resolve(name, rdtype, deadline)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], None
        except DnsTemporary as error:
            return [], f"{dns.rdatatype.to_text(rdtype)}: {error}"
        return [rdata.to_text() for rdata in answer], None

    async def _resolve(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> dns.resolver.Answer:
        """One query within what is left of the call's time. NXDOMAIN and NoAnswer pass
        through (they are answers); every other failure becomes `DnsTemporary`."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DnsTemporary(f"{_text(name)} {dns.rdatatype.to_text(rdtype)}: timed out")
        try:
            return await self._resolver.resolve(
                name, rdtype, search=False, lifetime=remaining, raise_on_no_answer=True
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise
        except dns.exception.Timeout:
            raise DnsTemporary(
                f"{_text(name)} {dns.rdatatype.to_text(rdtype)}: timed out"
            ) from None
        except dns.resolver.NoNameservers as error:
            # Every server answered SERVFAIL or REFUSED (or could not be reached).
            raise DnsTemporary(f"{_text(name)} {dns.rdatatype.to_text(rdtype)}: {error}") from None
        except dns.exception.DNSException as error:
            # YXDOMAIN, a malformed reply, a CNAME loop...: nothing we can call final.
            raise DnsTemporary(
                f"{_text(name)} {dns.rdatatype.to_text(rdtype)}: {type(error).__name__}: {error}"
            ) from None


def _domain_name(domain: str) -> dns.name.Name:
    """The domain as an absolute DNS name, a U-label domain converted to A-labels.

    dns.name.from_text does the IDNA conversion (RFC 5890 A-labels, "bücher.example" ->
    "xn--bcher-kva.example") and makes the name absolute, so no search list applies.
    A name DNS cannot carry (an empty label, a label over 63 octets) is a bad address.
    """
    text = domain.strip()
    if text.startswith("["):
        raise ValueError(f"{domain!r} is a domain literal, not a domain name to look up")
    if not text or text == ".":
        raise DnsPermanent(f"{domain!r}: empty domain")
    try:
        return dns.name.from_text(text)
    except (dns.exception.DNSException, UnicodeError, ValueError) as error:
        raise DnsPermanent(f"{domain!r}: not a valid domain name ({error})") from None


def _is_ip_literal(name: dns.name.Name) -> bool:
    text = name.to_text(omit_final_dot=True).strip("[]")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    """ "127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:5353" -> a plain-DNS server.

    Each server keeps its own port (dnspython's resolver has one global `port`, which
    could not express two servers on different ports).
    """
    host, port = text, _DNS_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad nameserver {text!r}")
        if rest:
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _sep, port_text = text.partition(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # raises ValueError: nameservers must be addresses
    if not 0 < port < 65536:
        raise ValueError(f"bad port in nameserver {text!r}")
    return dns.nameserver.Do53Nameserver(host, port)


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)
