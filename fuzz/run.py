"""Run the atheris fuzz targets for a fixed time each; crashes go to fuzz/findings/.

    python fuzz/run.py --target all --minutes 3
    python fuzz/run.py --target session --minutes 10 --jobs 1

Each target runs as its own process (libFuzzer ``-max_total_time``), reading the seeds in
fuzz/corpus/<target>/ and growing a working corpus in fuzz/.work/corpus/<target>/ (not
committed). A crash (an exception or a broken invariant) is written to
fuzz/findings/<target>-crash-<sha1>; the target is then restarted for the time left, at
most --restarts times. The log of each run is fuzz/.work/logs/<target>.log; a summary
(executions, executions per second, coverage) is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
WORK = FUZZ / ".work"
FINDINGS = FUZZ / "findings"
TARGETS = ("session", "sasl", "body", "syntax", "cleanup")
DICTS = {"session": "smtp.dict", "body": "smtp.dict", "syntax": "smtp.dict"}
DICTS["cleanup"] = "header.dict"

_STATUS = re.compile(rb"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?exec/s: (\d+)")
_CRASH = re.compile(rb"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    seconds: float = 0.0
    executions: int = 0
    coverage: int = 0
    features: int = 0
    corpus: int = 0
    crashes: list[str] = field(default_factory=list)
    runs: int = 0

    @property
    def rate(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0


def command(target: str, seconds: int) -> list[str]:
    corpus = WORK / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        str(FUZZ / f"fuzz_{target}.py"),
        str(corpus),
        str(FUZZ / "corpus" / target),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={FINDINGS}/{target}-",
        "-max_len=4096",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]
    if target in DICTS:
        args.append(f"-dict={FUZZ / 'dicts' / DICTS[target]}")
    return args


def environment(strict: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["SUBMITD_FUZZ_STRICT"] = "1" if strict else "0"
    src = str(FUZZ.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def read_log(log: bytes, result: Result) -> None:
    """Add one run's executions and keep its last coverage figures."""
    statuses = _STATUS.findall(log)
    if statuses:
        runs, cov, ft, corp, _ = statuses[-1]
        result.executions += int(runs)
        result.coverage = max(result.coverage, int(cov))
        result.features = max(result.features, int(ft))
        result.corpus = max(result.corpus, int(corp))
    result.crashes += [path.decode() for path in _CRASH.findall(log)]


def fuzz(target: str, minutes: float, strict: bool, restarts: int) -> Result:
    """Run one target for ``minutes``, restarting after a crash while time is left."""
    result = Result(target)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    FINDINGS.mkdir(exist_ok=True)
    deadline = time.monotonic() + minutes * 60
    with open(logs / f"{target}.log", "wb") as log_file:
        while result.runs <= restarts:
            left = int(deadline - time.monotonic())
            if left < 5:
                break
            started = time.monotonic()
            done = subprocess.run(
                command(target, left),
                env=environment(strict),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # atheris prints the traceback on stdout
                check=False,
            )
            result.seconds += time.monotonic() - started
            result.runs += 1
            log_file.write(done.stdout)
            before = len(result.crashes)
            read_log(done.stdout, result)
            if done.returncode == 0 or len(result.crashes) == before:
                break  # the time is up, or it stopped for a reason that is not a crash
    return result


def report(results: list[Result]) -> None:
    print(f"{'target':<9} {'seconds':>8} {'execs':>10} {'exec/s':>8} {'cov':>6} {'ft':>7} crashes")
    for r in results:
        print(
            f"{r.target:<9} {r.seconds:8.0f} {r.executions:10d} {r.rate:8.0f} "
            f"{r.coverage:6d} {r.features:7d} {len(r.crashes)}"
        )
        for crash in r.crashes:
            print(f"    {crash}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the submitd atheris fuzz targets.")
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--minutes", type=float, default=3.0, help="per target")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=1, help="targets at once")
    parser.add_argument(
        "--lenient",
        dest="strict",
        action="store_false",
        help="skip the RFC 5321 reply line checks (on by default)",
    )
    parser.add_argument("--restarts", type=int, default=3, help="after crashes, per target")
    args = parser.parse_args()
    targets = list(TARGETS) if args.target == "all" else [args.target]
    results: list[Result] = []
    if args.jobs == 1:
        for target in targets:
            print(f"fuzzing {target} for {args.minutes:g} min", flush=True)
            results.append(fuzz(target, args.minutes, args.strict, args.restarts))
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(fuzz, target, args.minutes, args.strict, args.restarts)
                for target in targets
            ]
            results = [future.result() for future in futures]
    report(results)
    sys.exit(1 if any(r.crashes for r in results) else 0)


if __name__ == "__main__":
    main()
