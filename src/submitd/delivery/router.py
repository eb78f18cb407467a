"""Which way each recipient goes: a route per recipient domain, with a default.

Three kinds of route (config `[delivery.routes.NAME]`): `smarthost` relays everything
to one fixed host (most sites: their provider); `mx` looks up the recipient domain's
MX hosts (RFC 5321 5.1) and tries every address of each host before the next host;
`lmtp` hands mail to a local mailbox server (RFC 2033).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from submitd.config import DeliveryConfig, RouteConfig
from submitd.delivery.lmtp import LmtpRoute, LmtpSettings
from submitd.delivery.mx import DnsPermanent, DnsTemporary, MxResolver, NullMx
from submitd.delivery.smtp_client import HopPool, HopSettings
from submitd.delivery.state import PendingRecipient
from submitd.delivery.types import Job, Outcome, Route, Status

SMTP_PORT = 25
SUBMISSION_PORT = 587


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _every(job: Job, status: Status, reply: str, enhanced: str) -> list[Outcome]:
    return [Outcome(r, status, reply, enhanced) for r in job.recipients]


class SmarthostRoute:
    def __init__(self, pool: HopPool, hop: HopSettings) -> None:
        self.pool = pool
        self.hop = hop

    async def deliver(self, job: Job) -> list[Outcome]:
        return await self.pool.send(self.hop, None, job)

    async def close(self) -> None:
        return None


class MxRoute:
    """Direct delivery. Opportunistic STARTTLS without verification: without MTA-STS or
    DANE (not built yet) a sender cannot know which certificate to expect."""

    def __init__(self, pool: HopPool, resolver: MxResolver, helo_name: str, port: int) -> None:
        self.pool = pool
        self.resolver = resolver
        self.helo_name = helo_name
        self.port = port

    async def deliver(self, job: Job) -> list[Outcome]:
        domain = domain_of(job.recipients[0].address)
        try:
            hosts = await self.resolver.hosts_for(domain)
        except NullMx:
            return _every(job, Status.FAILED, f"{domain} accepts no mail (null MX)", "5.1.10")
        except DnsPermanent as error:
            return _every(job, Status.FAILED, f"cannot route to {domain}: {error}", "5.1.2")
        except DnsTemporary as error:
            return _every(job, Status.DEFERRED, f"DNS lookup for {domain}: {error}", "4.4.3")
        outcomes = _every(job, Status.DEFERRED, f"no MX host of {domain} answered", "4.4.1")
        for host in hosts:
            for address in host.addresses:
                hop = HopSettings(
                    host=host.name,
                    port=self.port,
                    tls="opportunistic",
                    verify=False,
                    helo_name=self.helo_name,
                )
                outcomes = await self.pool.send(hop, address, job)
                if not _unreachable(outcomes):
                    return outcomes  # RFC 5321 5.1: next host only if this one can't be reached
        return outcomes

    async def close(self) -> None:
        return None


def _unreachable(outcomes: Sequence[Outcome]) -> bool:
    return all(o.status is Status.DEFERRED and o.enhanced.startswith("4.4.") for o in outcomes)


class Router:
    def __init__(self, config: DeliveryConfig, hostname: str) -> None:
        self.config = config
        self.pool = HopPool(per_destination=config.per_destination, total=config.concurrency)
        self.resolver = MxResolver(config.resolver, timeout=config.dns_timeout)
        self.routes: dict[str, Route] = {
            name: self._build(route, hostname) for name, route in config.routes.items()
        }
        self._domains = {
            domain.lower().rstrip("."): name for domain, name in config.domain_routes.items()
        }

    def route_name(self, domain: str) -> str:
        return self._domains.get(domain, self.config.default_route)

    def group(
        self, pending: Sequence[PendingRecipient]
    ) -> dict[tuple[str, str], list[PendingRecipient]]:
        """Recipients that can share one transaction: same route, and for MX the same domain."""
        groups: dict[tuple[str, str], list[PendingRecipient]] = defaultdict(list)
        for item in pending:
            domain = domain_of(item.recipient.address)
            name = self.route_name(domain)
            key = domain if self.config.routes[name].type == "mx" else ""
            groups[(name, key)].append(item)
        return groups

    async def close(self) -> None:
        for route in self.routes.values():
            await route.close()
        await self.pool.close()

    def _build(self, route: RouteConfig, hostname: str) -> Route:
        if route.type == "smarthost":
            return SmarthostRoute(self.pool, _smarthost_hop(route, hostname))
        if route.type == "lmtp":
            return LmtpRoute(
                LmtpSettings(
                    socket=route.socket, host=route.host, port=route.port, lhlo_name=hostname
                )
            )
        return MxRoute(self.pool, self.resolver, hostname, route.port_override or SMTP_PORT)


def _smarthost_hop(route: RouteConfig, hostname: str) -> HopSettings:
    password = route.password
    if route.password_file is not None:
        password = route.password_file.read_text().strip()
    assert route.host is not None
    return HopSettings(
        host=route.host,
        port=route.port or SUBMISSION_PORT,
        tls=route.tls,
        verify=route.verify,
        ca_file=route.ca_file,
        tls_name=route.tls_name,
        username=route.username,
        password=password,
        helo_name=hostname,
    )
