"""MxResolver against a real dnsmasq on loopback (RFC 5321 5.1, RFC 7505).

Every resolver here is given our dnsmasq (or a silent loopback port) as its only server,
so MxResolver builds it with configure=False: no query leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from submitd.delivery.mx import DnsPermanent, DnsTemporary, MxHost, MxResolver, NullMx, _nameserver
from tests.delivery.dns_fixture import (
    Dnsmasq,
    cname,
    delivery_dns,  # noqa: F401  (the session fixture, used by name below)
    host,
    loopback_mx,
    mx,
    null_mx,
    rr,
    silent_udp_port,
    txt,
)

D = "mx.test"  # every domain of this module lives under it (see delivery_dns)

RECORDS = [
    # two MX of different preference, listed worst first: order must come from preference
    mx(f"ordered.{D}", f"mx2.ordered.{D}", 20),
    mx(f"ordered.{D}", f"mx1.ordered.{D}", 10),
    host(f"mx1.ordered.{D}", "127.0.0.2"),
    host(f"mx2.ordered.{D}", "127.0.0.3"),
    # two MX of equal preference
    *loopback_mx(f"equal.{D}", 2, first=4, preference_step=0)[0],
    # an MX host with both A and AAAA
    mx(f"dual.{D}", f"mx.dual.{D}", 5),
    host(f"mx.dual.{D}", "127.0.0.6", "::1"),
    # no MX, only an address: the implicit MX
    host(f"only-a.{D}", "127.0.0.7"),
    # null MX, as dnsmasq's mx-host and as raw RDATA (preference 0, root label)
    null_mx(f"null.{D}"),
    rr(f"null-rr.{D}", 15, "000000"),
    # "." among real MX records: the "." is ignored
    null_mx(f"mixed-null.{D}"),
    mx(f"mixed-null.{D}", f"mx1.ordered.{D}", 10),
    # an MX host without addresses next to a good one, and alone
    mx(f"dangling.{D}", f"nothing.{D}", 5),
    mx(f"dangling.{D}", f"mx1.ordered.{D}", 10),
    mx(f"all-dangling.{D}", f"nothing.{D}", 5),
    # an IP address written as the exchange
    mx(f"ip-exchange.{D}", "127.0.0.9", 5),
    mx(f"ip-exchange.{D}", f"mx1.ordered.{D}", 10),
    # an MX host our server refuses to answer for (a server failure) next to a good one
    mx(f"partly-temporary.{D}", "mx.refused.zz", 5),
    mx(f"partly-temporary.{D}", f"mx1.ordered.{D}", 10),
    mx(f"all-temporary.{D}", "mx.refused.zz", 5),
    # a name with records, but neither MX nor address
    txt(f"txt-only.{D}", "v=spf1 -all"),
    # CNAME at the domain
    cname(f"alias.{D}", f"ordered.{D}"),
    # IDN: published as A-labels, asked for as U-labels
    mx(f"xn--bcher-kva.{D}", f"mx1.ordered.{D}", 10),
    # the same host named twice
    mx(f"twice.{D}", f"mx1.ordered.{D}", 10),
    mx(f"twice.{D}", f"MX1.ordered.{D}", 30),
]


@pytest.fixture(scope="module")
def dns_server(delivery_dns: Dnsmasq) -> Dnsmasq:  # noqa: F811
    delivery_dns.add(*RECORDS)
    return delivery_dns


@pytest.fixture
def resolver(dns_server: Dnsmasq) -> MxResolver:
    return MxResolver([dns_server.nameserver], timeout=5.0)


def hosts_for(resolver: MxResolver, domain: str) -> list[MxHost]:
    return asyncio.run(resolver.hosts_for(domain))


def test_dnsmasq_serves_a_null_mx_both_ways(dns_server: Dnsmasq) -> None:
    """The fixture's null MX really is `0 .` on the wire, however it was written."""
    for name in (f"null.{D}", f"null-rr.{D}"):
        answer = dns_server.resolver().resolve(name, "MX", search=False)
        assert [rdata.to_text() for rdata in answer] == ["0 ."]


def test_mx_sorted_by_preference(resolver: MxResolver) -> None:
    assert hosts_for(resolver, f"ordered.{D}") == [
        MxHost(f"mx1.ordered.{D}", 10, ("127.0.0.2",)),
        MxHost(f"mx2.ordered.{D}", 20, ("127.0.0.3",)),
    ]


def test_equal_preference_is_shuffled(resolver: MxResolver) -> None:
    async def many() -> set[tuple[str, ...]]:
        orders = set()
        for _ in range(40):
            hosts = await resolver.hosts_for(f"equal.{D}")
            assert {h.preference for h in hosts} == {10}
            orders.add(tuple(h.name for h in hosts))
        return orders

    assert asyncio.run(many()) == {
        (f"mx1.equal.{D}", f"mx2.equal.{D}"),
        (f"mx2.equal.{D}", f"mx1.equal.{D}"),
    }


def test_host_with_a_and_aaaa_has_both_ipv4_first(resolver: MxResolver) -> None:
    assert hosts_for(resolver, f"dual.{D}") == [MxHost(f"mx.dual.{D}", 5, ("127.0.0.6", "::1"))]


def test_implicit_mx_is_the_domain_itself(resolver: MxResolver) -> None:
    assert hosts_for(resolver, f"only-a.{D}") == [MxHost(f"only-a.{D}", 0, ("127.0.0.7",))]


@pytest.mark.parametrize("domain", [f"null.{D}", f"null-rr.{D}"])
def test_null_mx(resolver: MxResolver, domain: str) -> None:
    with pytest.raises(NullMx) as raised:
        hosts_for(resolver, domain)
    assert raised.value.enhanced == "5.1.10"


def test_null_mx_among_other_records_is_ignored(resolver: MxResolver) -> None:
    assert hosts_for(resolver, f"mixed-null.{D}") == [
        MxHost(f"mx1.ordered.{D}", 10, ("127.0.0.2",))
    ]


def test_nxdomain_is_permanent(resolver: MxResolver) -> None:
    with pytest.raises(DnsPermanent) as raised:
        hosts_for(resolver, f"no-such-domain.{D}")
    assert raised.value.enhanced == "5.1.2"


def test_no_mx_and_no_address_is_permanent(resolver: MxResolver) -> None:
    with pytest.raises(DnsPermanent) as raised:
        hosts_for(resolver, f"txt-only.{D}")
    assert raised.value.enhanced == "5.1.2"


def test_mx_host_without_address_is_skipped(
    resolver: MxResolver, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="submitd.delivery.mx"):
        assert hosts_for(resolver, f"dangling.{D}") == [
            MxHost(f"mx1.ordered.{D}", 10, ("127.0.0.2",))
        ]
    assert f"mx nothing.{D} of dangling.{D} skipped" in caplog.text


def test_no_usable_mx_host_is_permanent(resolver: MxResolver) -> None:
    with pytest.raises(DnsPermanent) as raised:
        hosts_for(resolver, f"all-dangling.{D}")
    assert raised.value.enhanced == "5.4.4"


def test_ip_address_as_exchange_is_skipped(
    resolver: MxResolver, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="submitd.delivery.mx"):
        assert hosts_for(resolver, f"ip-exchange.{D}") == [
            MxHost(f"mx1.ordered.{D}", 10, ("127.0.0.2",))
        ]
    assert "mx 127.0.0.9 of ip-exchange.mx.test skipped" in caplog.text


def test_temporary_failure_of_one_host_leaves_the_others(resolver: MxResolver) -> None:
    assert hosts_for(resolver, f"partly-temporary.{D}") == [
        MxHost(f"mx1.ordered.{D}", 10, ("127.0.0.2",))
    ]


def test_temporary_failure_of_every_host_is_temporary(resolver: MxResolver) -> None:
    with pytest.raises(DnsTemporary) as raised:
        hosts_for(resolver, f"all-temporary.{D}")
    assert raised.value.enhanced == "4.4.3"


def test_server_failure_for_the_domain_is_temporary(resolver: MxResolver) -> None:
    """dnsmasq REFUSEs names outside its local zones; a resolver sees no usable server."""
    with pytest.raises(DnsTemporary):
        hosts_for(resolver, "somewhere.zz")


def test_cname_at_the_domain_is_followed(resolver: MxResolver) -> None:
    assert [h.name for h in hosts_for(resolver, f"alias.{D}")] == [
        f"mx1.ordered.{D}",
        f"mx2.ordered.{D}",
    ]


def test_idn_domain_is_asked_as_a_labels(resolver: MxResolver) -> None:
    assert hosts_for(resolver, f"bücher.{D}") == [MxHost(f"mx1.ordered.{D}", 10, ("127.0.0.2",))]


def test_same_host_twice_is_tried_once_at_its_best_preference(resolver: MxResolver) -> None:
    assert hosts_for(resolver, f"twice.{D}") == [MxHost(f"mx1.ordered.{D}", 10, ("127.0.0.2",))]


def test_domain_names_are_not_searched_or_guessed(resolver: MxResolver) -> None:
    """A trailing dot and letter case change nothing; an empty name is not a domain."""
    assert hosts_for(resolver, f"ORDERED.{D}.")[0].name == f"mx1.ordered.{D}"
    with pytest.raises(DnsPermanent):
        hosts_for(resolver, "")
    with pytest.raises(DnsPermanent):
        hosts_for(resolver, "a" * 64 + ".test")
    with pytest.raises(ValueError):
        hosts_for(resolver, "[127.0.0.1]")


def test_silent_server_is_temporary_within_the_timeout() -> None:
    with silent_udp_port() as port:
        resolver = MxResolver([f"127.0.0.1:{port}"], timeout=1.0)
        start = time.monotonic()
        with pytest.raises(DnsTemporary):
            hosts_for(resolver, f"ordered.{D}")
        elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 1.5


def test_nameserver_forms() -> None:
    assert (_nameserver("127.0.0.1").address, _nameserver("127.0.0.1").port) == ("127.0.0.1", 53)
    server = _nameserver("127.0.0.1:5353")
    assert (server.address, server.port) == ("127.0.0.1", 5353)
    server = _nameserver("::1")
    assert (server.address, server.port) == ("::1", 53)
    server = _nameserver("[::1]:5353")
    assert (server.address, server.port) == ("::1", 5353)
    for bad in ("localhost", "127.0.0.1:0", "[::1", "127.0.0.1:x"):
        with pytest.raises(ValueError):
            _nameserver(bad)
