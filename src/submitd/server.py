"""Starting and stopping the server: storage, TLS, listeners, signals.

`run` builds every part from the validated configuration, opens the listeners (587-style
STARTTLS and 465-style implicit TLS, RFC 8314), and serves until SIGTERM or SIGINT.
On shutdown it stops listening, tells idle sessions 421 4.3.2, gives sessions in the
middle of a commit a moment to finish, and closes the queue so every acknowledged
message is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

from submitd.auth.passwords import CredentialVerifier
from submitd.config import Config, load_config, split_host_port
from submitd.delivery.worker import DeliveryWorker
from submitd.policy.abuse import AbuseSettings, AuthThrottle, ConnectionLimiter
from submitd.policy.limits import RateLimiter
from submitd.smtp.session import AUTH_LINE_MAX, SessionSettings
from submitd.smtp.transport import ListenerContext, SubmissionProtocol
from submitd.store.database import connect
from submitd.store.queue import Queue, collect_orphans
from submitd.submission import Submission
from submitd.tls import server_context

log = logging.getLogger("submitd.server")


def session_settings(config: Config) -> SessionSettings:
    limits = config.limits
    assert limits.line_length <= AUTH_LINE_MAX
    return SessionSettings(
        hostname=config.hostname,
        max_line=limits.line_length,
        max_recipients=limits.recipients,
        max_message_size=limits.message_size,
        max_errors=limits.bad_commands,
        max_auth_failures=limits.auth_failures,
    )


def abuse_settings(config: Config) -> AbuseSettings:
    return AbuseSettings(**config.abuse.model_dump(exclude={"enabled"}))


async def _open_listeners(
    config: Config, context: ListenerContext
) -> list[asyncio.base_events.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    plans: list[tuple[str, bool]] = [(a, False) for a in config.listen.submission]
    plans += [(a, True) for a in config.listen.submissions]
    for address, implicit in plans:
        host, port = split_host_port(address)

        def factory(implicit: bool = implicit) -> SubmissionProtocol:
            return SubmissionProtocol(context, implicit_tls=implicit)

        server = await loop.create_server(
            factory,
            host,
            port,
            reuse_address=True,
            backlog=1024,
        )
        kind = "submissions (implicit TLS)" if implicit else "submission (STARTTLS)"
        log.info("listening on %s for %s", address, kind)
        servers.append(server)
    return servers


async def serve(
    config: Config,
    *,
    config_path: Path | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    connect(config.database_path).close()  # create or migrate the schema first
    config.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    orphans = collect_orphans(config.database_path, config.spool_dir, older_than=time.time() - 60)
    if orphans:
        log.info("removed %d spool files no queued message refers to (a crash)", orphans)
    queue = Queue(config.database_path, config.spool_dir, config.queue)
    verifier = CredentialVerifier(config.database_path, config.auth)
    limiter = RateLimiter(
        config.database_path, config.policy, postmaster=f"postmaster@{config.hostname}"
    )
    delivery = DeliveryWorker(config) if config.delivery.enabled else None
    submission = Submission(config, verifier, queue, limiter)
    if delivery is not None:
        delivery.start()
        submission.on_commit = delivery.wake
    defended = config.abuse.enabled
    throttle = AuthThrottle(config.database_path, abuse_settings(config)) if defended else None
    context = ListenerContext(
        settings=session_settings(config),
        ssl_context=server_context(config),
        submission=submission,
        limits=config.limits,
        throttle=throttle,
        connections=ConnectionLimiter(abuse_settings(config)) if defended else None,
        proxy_networks=_networks(config),
    )
    servers = await _open_listeners(config, context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, config, config_path, context)
    if ready is not None:
        ready()
    await stop.wait()
    log.info("shutting down")
    if delivery is not None:
        delivery.begin_stop()
    await _shut_down(servers, context, config.limits.shutdown_grace)
    if throttle is not None:
        await throttle.close()
    if delivery is not None:
        await delivery.stop()
    await asyncio.to_thread(verifier.close)
    await limiter.close()
    await queue.close()
    log.info("stopped")


def _networks(config: Config) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n, strict=False) for n in config.listen.proxy_protocol_from]


def reload(running: Config, path: Path | None, context: ListenerContext) -> None:
    """SIGHUP: validate the file and certificates first; on any error keep what runs.

    What a reload changes: the TLS certificate and settings, protocol limits, timeouts,
    the PROXY networks, and cleanup and DKIM settings; they apply to sessions that start
    after it (open sessions are not disturbed). Listen addresses, the data directory and
    delivery routes need a restart, and a change to them is reported as ignored.
    """
    if path is None:
        log.warning("SIGHUP: no configuration file to reload (started without --config)")
        return
    try:
        config = load_config(path)
        ssl_context = server_context(config)
        context.submission.reload(config)
    except Exception as error:  # any problem keeps the running configuration
        log.error("SIGHUP: reload failed, keeping the running configuration: %s", error)
        return
    context.ssl_context = ssl_context
    context.settings = session_settings(config)
    context.limits = config.limits
    context.proxy_networks = _networks(config)
    for section in ("listen", "data_dir", "delivery", "queue", "auth", "abuse"):
        if getattr(config, section) != getattr(running, section):
            log.warning("SIGHUP: [%s] changed; it takes effect at the next restart", section)
    log.info("SIGHUP: configuration and certificate reloaded from %s", path)


async def _shut_down(
    servers: list[asyncio.base_events.Server], context: ListenerContext, grace: float
) -> None:
    """Stop listening, say 421 to every session as soon as it is idle, then wait.

    A session in the middle of a commit is left to finish it (its 250 must not be lost);
    a closed TLS session may wait for the client's close_notify, which we do not.
    """
    for server in servers:
        server.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        open_sessions = [p for p in context.sessions if not p.session.closed]
        if not open_sessions:
            break
        for protocol in open_sessions:
            protocol.shut_down()
        await asyncio.sleep(0.05)
    for protocol in list(context.sessions):
        protocol.shut_down(force=True)
    await asyncio.sleep(0.05)  # let the last replies reach the sockets
    for protocol in list(context.sessions):
        if protocol.transport is not None:
            protocol.transport.abort()
    for server in servers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
