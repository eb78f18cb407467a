"""Crash loop: SIGKILL submitd under load, again and again; no acknowledged message may
be lost (issue 6, "Proof").

    python bench/crashloop.py --kills 100

One data directory, one configuration (delivery off, per-user limits lifted, as in
soak.py). Each round: start submitd, run --clients (8) good clients (STARTTLS, AUTH,
1-20 pipelined messages per session; 2 KiB, 8 KiB and some 300 KiB bodies that spill
to spool files) for a random 0.5-2 s, SIGKILL the server wherever it is (handshake,
AUTH, DATA, group commit), restart it on the same data, and check that every message
acknowledged so far, in this round or any earlier one, is in the queue intact
(read_message_bytes; body SHA-256 and X-Bench-Id as sent) and that the database
passes `PRAGMA quick_check`. After the last round the server is stopped with SIGTERM
and everything is checked once more.

Reported: rounds, messages acknowledged, lost (acknowledged but missing or corrupt:
must be 0), duplicates (one bench id stored twice: our clients never resend, so must be
0), messages queued without the client having read the 250 (the kill came between the
commit and the reply reaching the client: allowed, a real client would resend and get
a duplicate), spool files without a queue row (a kill during a spilled message leaves
its temporary file: disk garbage, not a loss), start times and the wall time.
Exit status 1 if anything was lost, duplicated, or the database is damaged.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from soak import (
    GOOD_IPS,
    Mix,
    QueueCheck,
    Submitd,
    Tally,
    Target,
    add_driver_options,
    check_queue,
    good_client,
    log,
    main_on_submitd,
    print_outcomes,
)


@dataclass
class Round:
    number: int
    life_s: float
    start_s: float
    acked: int
    acked_total: int
    rows: int
    check_s: float
    problems: str


@dataclass
class CrashLoopResult:
    rounds: int
    acknowledged: int
    lost: int
    duplicates: int
    unacknowledged_queued: int
    orphan_spool_files: dict[str, int]
    integrity: str
    wall_s: float
    mean_start_s: float
    client_outcomes: dict[str, int]
    final_check: str
    history: list[Round] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


async def load_then_kill(
    server: Submitd,
    mix: Mix,
    tally: Tally,
    rng: random.Random,
    clients: int,
    number: int,
    life: float,
) -> None:
    """Good clients for `life` seconds, then SIGKILL; wait for the clients to notice."""
    target = Target(server.port, str(server.cafile))
    killed = False

    def running() -> bool:
        return not killed

    tasks = [
        asyncio.create_task(
            good_client(
                target,
                f"r{number}c{i}",
                GOOD_IPS,
                mix,
                running,
                tally,
                per_session=(1, 20),
                seed=rng.randrange(2**32),
                timeout=30,
            )
        )
        for i in range(clients)
    ]
    await asyncio.sleep(life)
    server.kill()
    killed = True
    _, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def problems(check: QueueCheck) -> str:
    parts = []
    if check.missing:
        parts.append(f"missing {check.missing[:3]}")
    if check.corrupt:
        parts.append(f"corrupt {check.corrupt[:3]}")
    if check.duplicates:
        parts.append(f"duplicated {check.duplicates[:3]}")
    if check.integrity != "ok":
        parts.append(f"quick_check {check.integrity}")
    return "; ".join(parts)


async def crash_loop(args: argparse.Namespace, server: Submitd) -> CrashLoopResult:
    rng = random.Random(args.seed)
    tally = Tally()
    mix = Mix(
        Target(server.port, str(server.cafile)),
        [(2048, 0.5), (8192, 0.45), (300 * 1024, 0.05)],
        run_id="crash",
    )
    history: list[Round] = []
    log(f"data in {server.root}")
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    server.start()
    for number in range(1, args.kills + 1):
        if time.monotonic() > deadline:
            log(f"--max-minutes reached after {number - 1} rounds")
            break
        before = len(tally.acks)
        life = rng.uniform(args.min_life, args.max_life)
        await load_then_kill(server, mix, tally, rng, args.clients, number, life)
        restart_s = server.start()
        t = time.monotonic()
        check = check_queue(server.db_path, server.spool_dir, tally.acks, integrity=True)
        entry = Round(
            number,
            round(life, 2),
            round(restart_s, 2),
            len(tally.acks) - before,
            len(tally.acks),
            check.rows,
            round(time.monotonic() - t, 2),
            problems(check),
        )
        history.append(entry)
        log(
            f"round {number:3d}: {entry.life_s:4.2f} s of load, +{entry.acked:4d} acked "
            f"(total {entry.acked_total}), {check.rows} queued, restart {entry.start_s} s, "
            f"check {entry.check_s} s {entry.problems or 'ok'}"
        )
        if entry.problems and args.stop_on_failure:
            break
    server.stop()  # a clean SIGTERM shutdown at the end, then the last check
    final = check_queue(server.db_path, server.spool_dir, tally.acks, integrity=True)
    result = CrashLoopResult(
        rounds=len(history),
        acknowledged=len(tally.acks),
        lost=final.lost_or_corrupt(),
        duplicates=len(final.duplicates),
        unacknowledged_queued=len(final.unacknowledged),
        orphan_spool_files=dict(Counter(Path(n).suffix for n in final.orphan_files)),
        integrity=final.integrity,
        wall_s=round(time.monotonic() - started, 1),
        mean_start_s=round(mean(r.start_s for r in history), 2) if history else 0.0,
        client_outcomes=dict(tally.outcomes.most_common(12)),
        final_check=final.summary(),
        history=history,
    )
    if any(r.problems for r in history):
        result.violations += [f"round {r.number}: {r.problems}" for r in history if r.problems]
    if result.lost:
        result.violations.append(f"{result.lost} acknowledged messages lost or corrupt")
    if result.duplicates:
        result.violations.append(f"{result.duplicates} messages stored twice")
    if final.integrity != "ok":
        result.violations.append(f"database quick_check: {final.integrity}")
    if not tally.acks:
        result.violations.append("no message was acknowledged")
    return result


def print_report(result: CrashLoopResult, kills_asked: int) -> None:
    print(f"crash loop: {result.rounds} SIGKILLs of {kills_asked} asked, {result.wall_s} s")
    print(
        f"  acknowledged {result.acknowledged}, lost {result.lost}, duplicates {result.duplicates}"
    )
    print(
        f"  queued without the client reading its 250: {result.unacknowledged_queued}; "
        f"spool files without a queue row (by suffix): {result.orphan_spool_files}; "
        f"quick_check: {result.integrity}; mean restart {result.mean_start_s} s"
    )
    print(f"  final check: {result.final_check}")
    print_outcomes(
        "  client outcomes (errors after each kill are expected):",
        result.client_outcomes,
        result.violations,
        "OK: nothing acknowledged was lost",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SIGKILL submitd under load, check the queue.")
    add = parser.add_argument
    add("--kills", type=int, default=100, help="rounds (one SIGKILL each)")
    add("--clients", type=int, default=8, help="concurrent good clients")
    add("--min-life", type=float, default=0.5, help="shortest load before a kill, s")
    add("--max-life", type=float, default=2.0, help="longest load before a kill, s")
    add("--max-minutes", type=float, default=30.0, help="stop starting rounds after this")
    add("--seed", type=int, default=1, help="random seed (kill times, sizes)")
    add("--stop-on-failure", action="store_true", help="stop at the first failed check")
    add_driver_options(parser, "with every round")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return main_on_submitd(
        args,
        "crashloop",
        Submitd,
        crash_loop,
        lambda result: print_report(result, args.kills),
    )


if __name__ == "__main__":
    sys.exit(main())
