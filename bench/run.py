"""Benchmark submitd against Postfix, side by side, on this machine.

    python bench/run.py --servers submitd,postfix --scenarios a,b,c --duration 20

Starts the sink, then each server (a server that cannot start is skipped with the
reason), and runs every scenario with the servers taking turns (A B A B ...), so slow
drifts of the machine hit both alike. Scenarios (each with --clients connections):

    a  1 message per connection, 4 KiB   (connection + TLS + AUTH cost dominates)
    b  50 messages per connection, 4 KiB (per-message cost: envelope, commit, queue)
    c  50 messages per connection, 1 MiB, 8 clients (bulk data path and disk)

Per run it measures accepted msgs/s and latency (from the load generator), the server's
CPU seconds per accepted message over its whole process tree, including the time it
takes to relay everything it accepted to the sink (the queue must drain, so a server
cannot look cheap by deferring work), peak memory of the tree, and the sink's
exactly-once check. It prints a markdown table with submitd/postfix ratios; with
--append FILE the table is appended to FILE with the date, versions and machine.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any

import postfix_peer
from postfix_instance import PostfixError, wait_for_port
from proctree import (
    Memory,
    Sampler,
    cpu_seconds,
    machine_busy_seconds,
    tree_memory,
    tree_pids,
)
from sink import check, read_pairs
from tlscert import KEY_TYPES, make_self_signed

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
USER = "bench@example.test"
PASSWORD = "bench-password-0123"
TLS_NAME = "bench.example.test"
NOISE_LIMIT = 0.25  # cores used by other processes above which a run is flagged


@dataclass(frozen=True)
class Scenario:
    name: str
    per_connection: int
    size: int
    clients: int | None  # None: --clients
    about: str


SCENARIOS = {
    "a": Scenario("a", 1, 4096, None, "1 msg/connection, 4 KiB"),
    "b": Scenario("b", 50, 4096, None, "50 msgs/connection, 4 KiB"),
    "c": Scenario("c", 50, 1024 * 1024, 8, "50 msgs/connection, 1 MiB, 8 clients"),
}


class ServerUnavailable(Exception):
    """A server could not be started; the harness skips it and says why."""


@dataclass
class ServerHandle:
    """What the harness needs from a running server, whatever it is."""

    name: str
    port: int
    root_pid: Callable[[], int | None]
    stop: Callable[[], None]
    version: str
    cafile: str | None = None  # None: the load generator runs with --insecure
    relays_to_sink: bool = True


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------
# submitd: EDIT HERE as the server's command line and configuration grow.
# ---------------------------------------------------------------------------------------
# The [tls] section gives submitd the same certificate (same key type) as Postfix: in
# scenario a the handshake is a large part of the CPU per message. These first lines
# (one STARTTLS listener on loopback, that certificate) are soak.py's too.
SUBMITD_LISTENER_CONFIG = """\
hostname = "{hostname}"
data_dir = "{data_dir}"
[listen]
submission = ["127.0.0.1:{port}"]
submissions = []
[tls]
cert = "{cert}"
key = "{key}"
"""
SUBMITD_CONFIG = (
    SUBMITD_LISTENER_CONFIG
    + """\
[policy.users."bench@example.test"]
messages_per_hour = 0
recipients_per_day = 0
[abuse]
max_connects_per_minute = 0
max_sessions_per_group = 0
[delivery]
default_route = "sink"
retry_first = 5.0
poll_interval = 0.2
[delivery.routes.sink]
type = "smarthost"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
"""
)
# Connection limits per address are lifted as well: the load comes from one address,
# and Postfix's anvil limits are off by default (smtpd_client_connection_rate_limit = 0).
# Both servers relay to the same sink in cleartext, as Postfix's relayhost does here.
# The per-user rate limits (on by default, RFC 6409 6.3) are lifted for the benchmark
# user, as a site would for a trusted application: Postfix has none by default.
# The configuration has no relay/smarthost key yet, so submitd cannot forward to the
# sink: when it gets one, add it above (pointing at 127.0.0.1:{sink_port}) and set this
# to True; the harness then waits for submitd's queue to drain and checks exactly-once.
SUBMITD_RELAYS_TO_SINK = True


def submitd_command() -> tuple[list[str], dict[str, str]]:
    """The installed `submitd`, else the source tree's CLI through this Python."""
    env = dict(os.environ)
    found = shutil.which("submitd")
    if found:
        return [found], env
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_DIR / "src"), env.get("PYTHONPATH")])
    )
    return [sys.executable, "-c", "from submitd.cli import main; main()"], env


def add_user(
    command: list[str],
    config: Path,
    user: str,
    password: str,
    env: dict[str, str] | None = None,
) -> str | None:
    """`submitd user add USER --password-stdin --config CONFIG` (`command` is how to run
    submitd); None if it worked, else what it wrote to stderr. soak.py uses it too."""
    added = subprocess.run(
        [*command, "user", "add", user, "--password-stdin", "--config", str(config)],
        input=password,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return None if added.returncode == 0 else added.stderr


def start_submitd(tmpdir: Path, sink_port: int) -> ServerHandle:
    """Write submitd's config, add the bench user, start `submitd serve`; raise
    ServerUnavailable (with submitd's own words) if any step fails."""
    port = free_port()
    config = tmpdir / "submitd.toml"
    config.write_text(
        SUBMITD_CONFIG.format(
            hostname=TLS_NAME,
            data_dir=tmpdir / "submitd-data",
            port=port,
            sink_port=sink_port,
            cert=tmpdir / "cert.pem",
            key=tmpdir / "key.pem",
        )
    )
    command, env = submitd_command()
    failed = add_user(command, config, USER, PASSWORD, env)
    if failed is not None:
        raise ServerUnavailable(f"`submitd user add` failed: {_tail(failed)}")
    log = tmpdir / "submitd.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [*command, "serve", "--config", str(config)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    if not _wait_listening(process, port):
        _stop_process(process)
        raise ServerUnavailable(f"`submitd serve` did not listen: {_tail(log.read_text())}")
    return ServerHandle(
        name="submitd",
        port=port,
        version=_submitd_version(command, env),
        root_pid=lambda: process.pid if process.poll() is None else None,
        stop=lambda: _stop_process(process),
        cafile=str(tmpdir / "cert.pem"),
        relays_to_sink=SUBMITD_RELAYS_TO_SINK,
    )


# ---------------------------------------------------------------------------------------


def _submitd_version(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, env=env)
    return result.stdout.strip().split()[-1] if result.returncode == 0 else "unknown"


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _wait_listening(process: subprocess.Popen[Any], port: int, timeout: float = 20) -> bool:
    """True once `port` accepts connections; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if wait_for_port(port, 0.2):
            return True
    return False


def _stop_process(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL to the process group the process leads (its own tree)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):  # workers it left behind, if any
        os.killpg(process.pid, signal.SIGKILL)


def start_postfix(tmpdir: Path, sink_port: int) -> ServerHandle:
    """A private Postfix (see postfix_peer.py) with the shared certificate."""
    peer = postfix_peer.setup(
        tmpdir / "postfix",
        free_port(),
        sink_port,
        USER,
        PASSWORD,
        cert_pair=(tmpdir / "cert.pem", tmpdir / "key.pem"),
    )
    try:
        postfix_peer.start(peer)
    except PostfixError as error:
        peer.stop()
        raise ServerUnavailable(str(error)) from None
    return ServerHandle(
        name="postfix",
        port=peer.port,
        version=postfix_peer.version(),
        root_pid=peer.master_pid,
        stop=peer.stop,
        cafile=str(peer.cert_file),
    )


STARTERS: dict[str, Callable[[Path, int], ServerHandle]] = {
    "submitd": start_submitd,
    "postfix": start_postfix,
}


@dataclass
class Sink:
    """The sink process and a reader that follows its records file."""

    process: subprocess.Popen[Any]
    port: int
    records: Path
    offset: int = 0
    partial: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def received(self, prefix: str) -> int:
        """Records with `prefix` so far; reads only what was appended since last call."""
        with self.records.open(encoding="ascii") as handle:
            handle.seek(self.offset)
            data = self.partial + handle.read()
            self.offset = handle.tell()
        lines = data.split("\n")
        self.partial = lines.pop()
        for line in lines:
            key = line.split("-", 1)[0]
            self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts.get(prefix.rstrip("-"), 0)

    def cpu(self) -> float:
        return cpu_seconds([self.process.pid])


def start_sink(tmpdir: Path) -> Sink:
    port = free_port()
    records = tmpdir / "sink.records"
    records.touch()
    process = subprocess.Popen(
        [
            sys.executable,
            str(BENCH_DIR / "sink.py"),
            "serve",
            "--port",
            str(port),
            "--records",
            str(records),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    if not _wait_listening(process, port):
        _stop_process(process)
        raise SystemExit("the sink did not start")
    return Sink(process=process, port=port, records=records)


class PeakMemory(Sampler):
    """Samples the memory of a process tree in a thread and keeps the peak; the
    samples are sparse (0.5 s) so the sampler costs next to nothing."""

    def __init__(self, root_pid: int | None, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.root_pid = root_pid
        self.peak = Memory(0, 0, 0)  # the maximum of each field over the samples

    def sample(self) -> None:
        if not self.root_pid:  # no server process: nothing to sample
            return
        now, peak = tree_memory(self.root_pid), self.peak
        self.peak = Memory(
            max(now.rss, peak.rss), max(now.pss, peak.pss), max(now.processes, peak.processes)
        )


@dataclass
class RunResult:
    """One server in one scenario, one repetition."""

    scenario: str
    server: str
    repetition: int
    loadgen: dict[str, Any]
    server_cpu_s: float
    server_cpu_ms_per_msg: float | None
    sink_cpu_ms_per_msg: float | None
    drain_s: float | None
    drained: bool
    peak_rss_mb: float
    peak_pss_mb: float
    processes: int
    exactly_once: str
    busy_cores: float
    other_cores: float


def run_loadgen(
    server: ServerHandle, scenario: Scenario, args: argparse.Namespace, run_id: str, out: Path
) -> dict[str, Any]:
    """The load generator in a process of its own, so its CPU is not the harness's."""
    tls = ["--cafile", server.cafile, "--tls-name", TLS_NAME] if server.cafile else ["--insecure"]
    command = [
        sys.executable,
        str(BENCH_DIR / "loadgen.py"),
        "--json",
        "--port",
        str(server.port),
        "--user",
        USER,
        "--password",
        PASSWORD,
        *tls,
        "--clients",
        str(scenario.clients or args.clients),
        "--messages-per-connection",
        str(scenario.per_connection),
        "--size",
        str(scenario.size),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--processes",
        str(args.loadgen_processes),
        "--run-id",
        run_id,
        "--accepted-file",
        str(out),
    ]
    limit = args.warmup + args.duration + 180
    result = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    if not result.stdout.strip():
        raise RuntimeError(f"loadgen failed: {_tail(result.stderr)}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def wait_drained(sink: Sink, run_id: str, expected: int, timeout: float) -> float | None:
    """Seconds until the sink holds `expected` messages of this run; None on timeout."""
    started = time.monotonic()
    while sink.received(run_id) < expected:
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass(frozen=True)
class Counters:
    """Cumulative CPU counters read at one instant; runs are measured as differences."""

    server: float
    sink: float
    machine_busy: float
    wall: float

    @classmethod
    def read(cls, root: int | None, sink: Sink) -> Counters:
        return cls(_tree_cpu(root), sink.cpu(), machine_busy_seconds(), time.monotonic())


def run_one(
    server: ServerHandle, scenario: Scenario, rep: int, sink: Sink, args: argparse.Namespace
) -> RunResult:
    """Load one server with one scenario, wait for its queue to drain, account."""
    run_id = f"{scenario.name}{rep}{server.name[:2]}{os.urandom(3).hex()}"
    accepted_file = args.workdir / f"{run_id}.accepted"
    root = server.root_pid()
    before = Counters.read(root, sink)
    with PeakMemory(root) as memory:
        report = run_loadgen(server, scenario, args, run_id, accepted_file)
        accepted = report["accepted_total"]
        drain = None
        if server.relays_to_sink:
            drain = wait_drained(sink, run_id, accepted, args.drain_timeout)
        after = Counters.read(root, sink)
        _wait_quiet(root)
    server_cpu = _tree_cpu(root) - before.server
    verdict = "n/a (no relay)"
    if server.relays_to_sink:
        result = check(read_pairs(sink.records, run_id + "-"), read_pairs(accepted_file))
        verdict = result.summary()
    busy, other = _machine_load(before, after, report["loadgen_cpu_s"])
    return RunResult(
        scenario=scenario.name,
        server=server.name,
        repetition=rep,
        loadgen=report,
        server_cpu_s=round(server_cpu, 3),
        server_cpu_ms_per_msg=_per_msg(server_cpu, accepted),
        sink_cpu_ms_per_msg=_per_msg(after.sink - before.sink, accepted),
        drain_s=None if drain is None else round(drain, 2),
        drained=drain is not None,
        peak_rss_mb=round(memory.peak.rss / 2**20, 1),
        peak_pss_mb=round(memory.peak.pss / 2**20, 1),
        processes=memory.peak.processes,
        exactly_once=verdict,
        busy_cores=round(busy, 2),
        other_cores=round(other, 2),
    )


def _machine_load(before: Counters, after: Counters, loadgen_cpu: float) -> tuple[float, float]:
    """(cores busy, cores used by anything but server, sink and load generator) over
    load plus drain. The second exposes a noisy machine: msgs/s then means little,
    while CPU per message, counted per process, stays roughly valid."""
    wall = after.wall - before.wall
    busy = after.machine_busy - before.machine_busy
    ours = (after.server - before.server) + (after.sink - before.sink) + loadgen_cpu
    return busy / wall, max(0.0, busy - ours) / wall


def _wait_quiet(root: int | None, interval: float = 0.3, timeout: float = 5.0) -> None:
    """Wait until the tree stops using CPU: after the sink has the last message the
    server still finishes up (Postfix's qmgr removes the queue file, postlogd logs),
    and that work belongs to the messages just measured."""
    deadline = time.monotonic() + timeout
    last = _tree_cpu(root)
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = _tree_cpu(root)
        if now - last < 0.011:  # less than about one clock tick
            return
        last = now


def _tree_cpu(root: int | None) -> float:
    return cpu_seconds(tree_pids(root)) if root else 0.0


def _per_msg(cpu: float, accepted: int) -> float | None:
    return round(1000 * cpu / accepted, 3) if accepted else None


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_all(servers: list[ServerHandle], sink: Sink, args: argparse.Namespace) -> list[RunResult]:
    """Every scenario, repetitions outermost so that the servers alternate."""
    results = []
    for name in args.scenarios:
        scenario = SCENARIOS[name]
        for rep in range(args.repeat):
            for server in servers:
                log(f"scenario {name} ({scenario.about}), {server.name}, repetition {rep + 1}")
                result = run_one(server, scenario, rep, sink, args)
                log("  " + _one_line(result))
                results.append(result)
                time.sleep(args.settle)
    return results


def _one_line(r: RunResult) -> str:
    lg = r.loadgen
    return (
        f"{lg['msgs_per_s']} msg/s, p50 {lg['latency_ms']['p50']} ms, "
        f"server {r.server_cpu_ms_per_msg} ms CPU/msg, drain {r.drain_s} s, "
        f"loadgen {lg['loadgen_cpu_utilization']:.0%} CPU, errors {lg['errors_total']}, "
        f"{r.exactly_once}, cores busy {r.busy_cores} (others {r.other_cores})"
        + (" NOISY MACHINE" if r.other_cores > NOISE_LIMIT else "")
    )


# --- the table ---------------------------------------------------------------------------

COLUMNS: list[tuple[str, Callable[[RunResult], Any]]] = [
    ("msgs/s", lambda r: r.loadgen["msgs_per_s"]),
    ("p50 ms", lambda r: r.loadgen["latency_ms"]["p50"]),
    ("p90 ms", lambda r: r.loadgen["latency_ms"]["p90"]),
    ("p99 ms", lambda r: r.loadgen["latency_ms"]["p99"]),
    ("setup p50 ms", lambda r: r.loadgen["session_setup_ms"]["p50"]),
    ("server CPU ms/msg", lambda r: r.server_cpu_ms_per_msg),
    ("peak PSS MB", lambda r: r.peak_pss_mb),
    ("peak RSS MB", lambda r: r.peak_rss_mb),
    ("drain s", lambda r: r.drain_s),
    ("loadgen CPU", lambda r: r.loadgen["loadgen_cpu_utilization"]),
    ("busy cores", lambda r: r.busy_cores),
    ("other cores", lambda r: r.other_cores),
]
RATIO_COLUMNS = {
    "msgs/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "setup p50 ms",
    "server CPU ms/msg",
    "peak PSS MB",
    "peak RSS MB",
}


def _mean(values: list[Any]) -> float | None:
    numbers = [v for v in values if v is not None]
    return mean(numbers) if numbers else None


def _fmt(value: float | None, column: str = "") -> str:
    if value is None:
        return "–"
    if column == "loadgen CPU":
        return f"{value:.0%}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"


def _aggregate(runs: list[RunResult]) -> dict[str, float | None]:
    return {name: _mean([getter(r) for r in runs]) for name, getter in COLUMNS}


def _row(label: str, server: str, values: dict[str, float | None], runs: list[RunResult]) -> str:
    cells = [_fmt(values[name], name) for name, _ in COLUMNS]
    rates = [r.loadgen["msgs_per_s"] for r in runs]
    if len(rates) > 1:
        cells[0] += f" ({min(rates):.0f}–{max(rates):.0f})"
    errors = sum(r.loadgen["errors_total"] for r in runs)
    verdicts = sorted({r.exactly_once.split(" (")[0] for r in runs})
    return "| " + " | ".join([label, server, *cells, str(errors), ", ".join(verdicts)]) + " |"


def _ratio(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, _ in COLUMNS:
        x, y = a[name], b[name]
        out[name] = x / y if name in RATIO_COLUMNS and x is not None and y else None
    return out


def render_table(results: list[RunResult], handles: list[ServerHandle]) -> str:
    """Mean over repetitions per scenario and server, then submitd/postfix ratios,
    then a note for every server whose CPU figure leaves out delivery."""
    servers = [h.name for h in handles]
    header = ["scenario", "server", *(name for name, _ in COLUMNS), "errors", "exactly-once"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(r.scenario for r in results):
        aggregates = {}
        for server in servers:
            runs = [r for r in results if r.scenario == name and r.server == server]
            if runs:
                aggregates[server] = _aggregate(runs)
                lines.append(
                    _row(f"{name}: {SCENARIOS[name].about}", server, aggregates[server], runs)
                )
        if "submitd" in aggregates and "postfix" in aggregates:
            ratio = _ratio(aggregates["submitd"], aggregates["postfix"])
            cells = ["" if ratio[n] is None else f"{ratio[n]:.2f}×" for n, _ in COLUMNS]
            lines.append("| " + " | ".join([name, "submitd/postfix", *cells, "", ""]) + " |")
    noisy = sum(r.other_cores > NOISE_LIMIT for r in results)
    if noisy:
        lines.append(
            f"\nWarning: in {noisy} of {len(results)} runs other processes used more than "
            f"{NOISE_LIMIT} cores (column 'other cores'): msgs/s and latency are not "
            "reliable; CPU per message, counted per process, is less affected."
        )
    for handle in handles:
        if not handle.relays_to_sink:
            lines.append(
                f"\nNote: {handle.name} was not configured to relay to the sink, so its CPU "
                "per message leaves out delivery and exactly-once could not be checked."
            )
    return "\n".join(lines)


# --- the record --------------------------------------------------------------------------


def machine_facts(handles: list[ServerHandle]) -> list[str]:
    """Where and with what the figures were measured, for the appended record."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    versions = [f"{h.name} {h.version}" for h in handles]
    versions += [f"Python {platform.python_version()}", f"Python's {ssl.OPENSSL_VERSION}"]
    system_ssl = subprocess.run(["openssl", "version"], capture_output=True, text=True)
    if system_ssl.returncode == 0:
        versions.append(f"system {system_ssl.stdout.strip()}")
    return [
        f"Machine: {os.cpu_count()} × {cpu} (nproc {len(os.sched_getaffinity(0))}), "
        f"{memory_kb / 2**20:.1f} GiB RAM, Linux {platform.release()}",
        "Versions: " + ", ".join(versions),
    ]


def append_record(
    path: Path, table: str, handles: list[ServerHandle], args: argparse.Namespace
) -> None:
    """Append the table with date, command, settings, versions and machine."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python bench/run.py " + " ".join(sys.argv[1:])
    settings = (
        f"Settings: {args.duration:g} s measured after {args.warmup:g} s warm-up, "
        f"{args.clients} clients (c: 8), {args.repeat} repetition(s), servers alternating, "
        f"{args.key_type} certificate, load generator in {args.loadgen_processes} process(es)"
    )
    text = "\n".join(
        [f"\n## {when}\n", f"`{command}`\n", *machine_facts(handles), settings, "", table, ""]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(text)


# --- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark submitd against Postfix (see bench/README.md)."
    )
    add = parser.add_argument
    add("--servers", default="submitd,postfix", help="comma-separated: submitd,postfix")
    add("--scenarios", default="a,b", help="comma-separated from a,b,c")
    add("--duration", type=float, default=20.0, help="measured seconds per run")
    add("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    add("--repeat", type=int, default=2, help="repetitions per scenario (A B A B)")
    add("--clients", type=int, default=8, help="connections in scenarios a and b")
    add("--loadgen-processes", type=int, default=1, help="load generator processes")
    add("--key-type", choices=KEY_TYPES, default="ec", help="certificate key: P-256 or RSA-2048")
    add("--drain-timeout", type=float, default=180.0, help="seconds to wait for the queue")
    add("--settle", type=float, default=1.0, help="pause between runs, seconds")
    add("--append", type=Path, help="append the table to this markdown file")
    add("--json-out", type=Path, help="write every run's raw figures as JSON")
    add("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.servers = _choices(parser, args.servers, list(STARTERS), "--servers")
    args.scenarios = _choices(parser, args.scenarios, list(SCENARIOS), "--scenarios")
    return args


def _choices(
    parser: argparse.ArgumentParser, text: str, allowed: list[str], flag: str
) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        parser.error(f"{flag}: choose from {','.join(allowed)} (got {text!r})")
    return chosen


def start_servers(tmpdir: Path, sink: Sink, names: list[str], handles: list[ServerHandle]) -> None:
    """Start each requested server into `handles` (filled as they start, so that an
    interruption still stops those already running); skip, loudly, any that fails."""
    for name in names:
        log(f"starting {name}")
        try:
            handles.append(STARTERS[name](tmpdir, sink.port))
        except (ServerUnavailable, OSError, subprocess.SubprocessError) as error:
            log(f"SKIPPING {name}: it did not start: {error}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the servers
    tmpdir = Path(tempfile.mkdtemp(prefix="submitd-bench-"))
    tmpdir.chmod(0o755)  # Postfix's unprivileged daemons must reach their files
    args.workdir = tmpdir
    handles: list[ServerHandle] = []
    sink: Sink | None = None
    try:
        make_self_signed(tmpdir / "cert.pem", tmpdir / "key.pem", TLS_NAME, args.key_type)
        sink = start_sink(tmpdir)
        start_servers(tmpdir, sink, args.servers, handles)
        if not handles:
            log("no server could be started; nothing to measure")
            return 1
        results = run_all(handles, sink, args)
    finally:
        clean_up(handles, sink, tmpdir, args.keep)
    return report(results, handles, args)


def clean_up(handles: list[ServerHandle], sink: Sink | None, tmpdir: Path, keep: bool) -> None:
    """Stop everything this run started and remove its directory (unless --keep)."""
    for handle in handles:
        handle.stop()
    if sink is not None:
        _stop_process(sink.process)
    if keep:
        log(f"kept {tmpdir}")
    else:
        shutil.rmtree(tmpdir, ignore_errors=True)


def report(results: list[RunResult], handles: list[ServerHandle], args: argparse.Namespace) -> int:
    """Print the table (and append / dump it if asked); non-zero if any check failed."""
    table = render_table(results, handles)
    print(table)
    if args.append:
        append_record(args.append, table, handles, args)
        log(f"appended to {args.append}")
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    failed = [
        r for r in results if r.exactly_once.startswith("FAIL") or not r.loadgen["accepted_total"]
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
