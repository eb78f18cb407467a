"""The configuration: one TOML file, validated in full before anything starts.

Every key has a documented default, so a missing file (or a missing section) is a
valid configuration. Unknown keys are errors, not warnings: a typo in a limit must
not silently leave the limit at its default. `load_config` raises `ConfigError` with
the dotted name of the offending key, which `submitd check-config` and `serve` print.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_DATA_DIR = Path("./submitd-data")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Section):
    """Where to listen. `submission` speaks STARTTLS (RFC 3207, port 587); `submissions`
    is implicit TLS (RFC 8314, port 465). Each entry is `host:port` (`[v6]:port`)."""

    submission: list[str] = Field(default_factory=lambda: ["0.0.0.0:587"])
    submissions: list[str] = Field(default_factory=lambda: ["0.0.0.0:465"])
    # PROXY protocol v1/v2 (HAProxy): required from these networks, never accepted from
    # others; the client address it carries is used for limits, logs and Received.
    proxy_protocol_from: list[str] = Field(default_factory=list)

    @field_validator("proxy_protocol_from")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)
        return value

    @field_validator("submission", "submissions")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            split_host_port(entry)
        return value


class TLSConfig(_Section):
    """Certificate and key (PEM). Both empty: a self-signed pair is made in data_dir."""

    cert: Path | None = None
    key: Path | None = None
    min_version: str = Field(default="1.2", pattern=r"^1\.[23]$")


class LimitsConfig(_Section):
    """Protocol limits; each has a reply code of its own (see smtp/replies.py)."""

    # RFC 5321 4.5.3.1.4 makes 512 a floor; ORCPT and AUTH= make real lines longer.
    # 2048 is Postfix's default (line_length_limit).
    line_length: int = Field(default=2048, ge=512, le=12288)
    recipients: int = Field(default=100, ge=1, le=100000)  # RFC 5321 4.5.3.1.8 floor
    message_size: int = Field(default=50 * 1024 * 1024, ge=1024)
    bad_commands: int = Field(default=20, ge=1)
    idle_timeout: float = Field(default=300.0, gt=0)  # seconds between commands
    command_timeout: float = Field(default=120.0, gt=0)  # RFC 6409 5.3: answer within 2 min
    line_timeout: float = Field(default=300.0, gt=0)  # to receive a whole command line
    tls_handshake_timeout: float = Field(default=30.0, gt=0)
    data_min_rate: float = Field(default=500.0, ge=0)  # octets/s for DATA and BDAT ...
    data_rate_grace: float = Field(default=30.0, ge=0)  # ... after this many seconds
    session_timeout: float = Field(default=3600.0, gt=0)  # a whole session
    busy_timeout: float = Field(default=10.0, gt=0)  # pre-AUTH idle timeout when busy
    error_delay_after: int = Field(default=10, ge=1)  # errors; then each reply waits 1 s
    auth_failures: int = Field(default=3, ge=1)  # in one session; then 421 4.7.0
    shutdown_grace: float = Field(default=30.0, ge=0)  # SIGTERM: time to finish a message


class AuthConfig(_Section):
    """Password verification. argon2id costs are chosen so one verification is about
    10-20 ms of one core; the cache spares a client that logs in per message."""

    argon2_time_cost: int = Field(default=2, ge=1)
    argon2_memory_kib: int = Field(default=19456, ge=8192)  # OWASP's 19 MiB, t=2, p=1
    argon2_parallelism: int = Field(default=1, ge=1)
    cache_seconds: float = Field(default=300.0, ge=0)
    cache_entries: int = Field(default=10000, ge=0)


class QueueConfig(_Section):
    """The durable queue. Bodies up to inline_max are stored in the database and share
    one durable commit; larger bodies are spooled to files and fsynced one by one.

    A message leaves the queue once every recipient is settled: its content at once,
    its row with the per-recipient outcomes (`queue list --all`) after keep_finished
    seconds, or at once when that is 0."""

    inline_max: int = Field(default=256 * 1024, ge=0)
    group_commit_max: int = Field(default=256, ge=1)
    keep_finished: float = Field(default=86400.0, ge=0)  # seconds; 0: delete at once


class CleanupConfig(_Section):
    """Header checks and fix-ups of RFC 6409 section 8, applied before the commit."""

    remove_bcc: bool = True
    keep_original_date: bool = False  # keep a replaced Date: as X-Original-Date:
    max_header_fields: int = Field(default=500, ge=10)
    max_header_size: int = Field(default=256 * 1024, ge=1024)
    forbidden_fields: list[str] = Field(default_factory=list)  # present: 554 5.7.1
    strip_fields: list[str] = Field(default_factory=list)  # removed silently
    rewrite: list[tuple[str, str]] = Field(default_factory=list)  # RFC 6409 8.8 maps
    single_label_domain: str | None = None  # RFC 6409 4.2: expand bob@sales, if verified
    received_privacy: bool = False  # leave client IP and EHLO name out of Received
    repair_8bit: bool = False  # RFC 6409 8.4: encode 8-bit parts declared 7BIT, not reject

    @field_validator("rewrite")
    @classmethod
    def _check_rewrite(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        from submitd.message.addresses import check_rewrite_rules

        check_rewrite_rules(tuple(value))  # ValueError names the rule
        return value


class DkimKeyConfig(_Section):
    domain: str
    selector: str
    key: Path  # PEM PKCS#8 private key (rsa or ed25519), from `submitd dkim keygen`


class DkimConfig(_Section):
    """Signing keys per From: domain; several per domain (rsa and ed25519) allowed."""

    keys: list[DkimKeyConfig] = Field(default_factory=list)


class UserPolicy(_Section):
    """Per-user limits (RFC 6409 6.2, 6.3); None inherits the site default."""

    messages_per_hour: int | None = Field(default=None, ge=0)
    recipients_per_message: int | None = Field(default=None, ge=1)
    recipients_per_day: int | None = Field(default=None, ge=0)
    max_message_size: int | None = Field(default=None, ge=1024)
    recipient_domains: list[str] | None = None  # only these domains (550 5.7.1)


class PolicyConfig(_Section):
    """Site defaults for every user, and overrides by login under [policy.users]."""

    messages_per_hour: int = Field(default=1000, ge=0)  # 0: no limit
    recipients_per_message: int = Field(default=100, ge=1)
    recipients_per_day: int = Field(default=5000, ge=0)  # 0: no limit
    max_message_size: int = Field(default=50 * 1024 * 1024, ge=1024)
    recipient_domains: list[str] | None = None
    rejection_log_per_minute: int = Field(default=30, ge=1)  # RFC 6409 5.2, bounded
    users: dict[str, UserPolicy] = Field(default_factory=dict)


class RouteConfig(_Section):
    """One way to the next hop. `smarthost`: a fixed relay (most sites: the provider);
    `mx`: the recipient domain's MX hosts found in DNS (RFC 5321 5.1); `lmtp`: a local
    mailbox server (RFC 2033) over a Unix socket or TCP."""

    type: str = Field(pattern=r"^(smarthost|mx|lmtp)$")
    host: str | None = None  # smarthost, lmtp over TCP
    port: int | None = Field(default=None, ge=1, le=65535)
    socket: Path | None = None  # lmtp over a Unix socket
    # smarthost: "starttls" (required), "opportunistic", "implicit" (RFC 8314), "none";
    # mx always uses opportunistic STARTTLS.
    tls: str = Field(default="starttls", pattern=r"^(starttls|opportunistic|implicit|none)$")
    verify: bool = True  # certificate verification (smarthost)
    ca_file: Path | None = None  # extra trust anchors for verification
    tls_name: str | None = None  # the name to verify, when it is not `host`
    username: str | None = None  # AUTH to the smarthost
    password: str | None = None
    password_file: Path | None = None
    port_override: int | None = Field(default=None, ge=1, le=65535)  # mx: test setups only


class DeliveryConfig(_Section):
    """The delivery loop: routes per recipient domain, retries, notifications."""

    enabled: bool = True
    default_route: str = "mx"
    domain_routes: dict[str, str] = Field(default_factory=dict)  # "example.org" -> route
    routes: dict[str, RouteConfig] = Field(default_factory=lambda: {"mx": RouteConfig(type="mx")})
    # Attempts in flight, in all (Postfix: default_process_limit = 100). An attempt holds
    # its slot while it waits for a connection and for its outcome to be recorded: 20
    # kept one smarthost route at ~1,200 msg/s while acceptance ran at ~1,800.
    concurrency: int = Field(default=100, ge=1)
    per_destination: int = Field(default=4, ge=1)  # connections to one next hop
    retry_first: float = Field(default=60.0, gt=0)  # seconds; doubles each time
    retry_max: float = Field(default=3600.0, gt=0)
    lifetime: float = Field(default=5 * 86400.0, gt=0)  # then failed and bounced
    delay_notice: float = Field(default=4 * 3600.0, gt=0)  # one "delayed" DSN after this
    resolver: list[str] = Field(default_factory=list)  # "127.0.0.1:5353"; empty: system
    dns_timeout: float = Field(default=10.0, gt=0)
    connect_timeout: float = Field(default=30.0, gt=0)
    poll_interval: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _check_routes(self) -> DeliveryConfig:
        for name in [self.default_route, *self.domain_routes.values()]:
            if name not in self.routes:
                raise ValueError(f"route {name!r} is not defined under [delivery.routes]")
        for name, route in self.routes.items():
            if route.type == "smarthost" and not route.host:
                raise ValueError(f"routes.{name}: a smarthost needs host")
            if route.type == "lmtp" and not (route.socket or (route.host and route.port)):
                raise ValueError(f"routes.{name}: lmtp needs socket, or host and port")
        return self


class AbuseConfig(_Section):
    """Defences against password guessing and connection floods (see policy/abuse.py).
    Address groups: IPv4 /32, /26, /21 and IPv6 /64, /48, /32; 0 disables a check."""

    enabled: bool = True  # false: no AUTH throttle and no connection limits at all
    fail_per_minute: tuple[int, int, int] = (10, 30, 90)
    fail_per_day: tuple[int, int, int] = (50, 150, 450)
    account_fail_per_hour: int = Field(default=20, ge=0)
    max_sessions_per_group: int = Field(default=20, ge=0)
    max_connects_per_minute: int = Field(default=300, ge=0)
    max_sessions: int = Field(default=1000, ge=0)
    busy_fraction: float = Field(default=0.8, gt=0, le=1)


class LogConfig(_Section):
    level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")
    per_client_lines_per_minute: int = Field(default=60, ge=1)  # RFC 6409 5.2


class Config(_Section):
    hostname: str = Field(default_factory=socket.getfqdn)
    data_dir: Path = DEFAULT_DATA_DIR
    listen: ListenConfig = Field(default_factory=ListenConfig)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    cleanup: CleanupConfig = Field(default_factory=CleanupConfig)
    dkim: DkimConfig = Field(default_factory=DkimConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    abuse: AbuseConfig = Field(default_factory=AbuseConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a host name without spaces")
        return value

    @property
    def database_path(self) -> Path:
        return self.data_dir / "submitd.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


class ConfigError(Exception):
    """A configuration that must not be started; the message names the key."""


def split_host_port(entry: str) -> tuple[str, int]:
    """`host:port` or `[v6addr]:port` to (host, port); ValueError if malformed."""
    host, sep, port_text = entry.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"{entry!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{entry!r}: port out of range")
    return host, port


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def config_from_mapping(data: dict[str, Any], *, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None


def load_config(path: Path | None) -> Config:
    """The configuration in `path`, or the defaults when path is None."""
    if path is None:
        return Config()
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return config_from_mapping(data, source=str(path))


def dev_config() -> Config:
    """`serve --dev`: everything on loopback, data in ./submitd-data."""
    return Config(
        hostname="localhost.localdomain",
        data_dir=DEFAULT_DATA_DIR,
        listen=ListenConfig(submission=["127.0.0.1:2587"], submissions=["127.0.0.1:2465"]),
        # A developer's messages stay queued to be looked at; nothing leaves the machine.
        delivery=DeliveryConfig(enabled=False),
    )
