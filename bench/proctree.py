"""CPU and memory of a whole process tree, read from /proc.

Servers under test are multi-process (Postfix: master plus smtpd, cleanup, qmgr, smtp...;
submitd may fork workers), so "the server's CPU" is the sum over its tree. A process that
has already exited is counted through its parent's cumulative cutime/cstime, which the
kernel adds when the parent reaps it: summing utime+stime+cutime+cstime over every live
process of the tree therefore counts each CPU second once, exited children included
(unless a child was re-parented outside the tree, which Postfix and submitd don't do).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat the harness needs (times in seconds)."""

    pid: int
    ppid: int
    self_cpu: float
    children_cpu: float


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/PID/stat; None when the process has gone (a normal race)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        self_cpu=(utime + stime) / CLOCK_TICKS,
        children_cpu=(cutime + cstime) / CLOCK_TICKS,
    )


def _all_parents() -> dict[int, int]:
    """Map pid -> ppid for every process now alive."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                parents[stat.pid] = stat.ppid
    return parents


def tree_pids(root: int) -> list[int]:
    """The root and all its live descendants, root first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _all_parents().items():
        children.setdefault(ppid, []).append(pid)
    result, todo = [], [root]
    while todo:
        pid = todo.pop()
        result.append(pid)
        todo.extend(children.get(pid, []))
    return result


def cpu_seconds(pids: Iterable[int]) -> float:
    """user+sys of the given processes plus that of the children they have reaped."""
    total = 0.0
    for pid in pids:
        stat = read_stat(pid)
        if stat is not None:
            total += stat.self_cpu + stat.children_cpu
    return total


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by the whole tree under `root` (see module docstring)."""
    return cpu_seconds(tree_pids(root))


@dataclass(frozen=True)
class Memory:
    """Resident memory of a tree in bytes: RSS counts shared pages once per process,
    PSS splits them among sharers, so PSS sums to what the tree really costs."""

    rss: int
    pss: int
    processes: int


def _rollup(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in bytes from /proc/PID/smaps_rollup; zeros if the process is gone."""
    rss = pss = 0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0, 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def tree_memory(root: int) -> Memory:
    """Summed RSS and PSS over the tree under `root`, as of now."""
    pids = tree_pids(root)
    rss = pss = 0
    for pid in pids:
        r, p = _rollup(pid)
        rss += r
        pss += p
    return Memory(rss=rss, pss=pss, processes=len(pids))


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (from /proc/stat), so the
    harness can tell a run that saturated the machine from one bound by latency."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    ticks = [int(x) for x in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


class Sampler:
    """Calls sample() every `interval` seconds in a daemon thread, from entering the
    `with` block until leaving it (which waits for the thread). Subclasses keep what
    they sample (a peak, a timeline)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError
