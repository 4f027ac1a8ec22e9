"""Benchmark corral against plain multiprocessing.Pool and the seed's design: shared parameters and measuring helpers."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Params:
    """Sizes of the workloads and the time budget of each; `quick()` is the smoke-test variant."""

    w1_jobs: int = 20_000
    w1_warmup: int = 200
    w2_jobs: int = 300
    w2_warmup: int = 30
    w3_jobs: int = 160
    w3_command: str = "sleep 0.05"
    w3_sleep: float = 0.05
    workers: int = 2  # processes / slaves / agents
    slots: int = 4  # per worker in W3 (and per corral agent throughout)
    m_jobs: int = 100_000
    # Wall-clock budgets (seconds): every wait in the bench is bounded by one of these.
    start_budget: float = 60.0
    w1_budget: float = 180.0
    w2_budget: float = 60.0
    w3_budget: float = 30.0
    m_budget: float = 300.0
    stop_budget: float = 10.0

    @property
    def w3_ideal(self) -> float:
        """Wall time with perfect packing: jobs / (workers × slots) × sleep."""
        return math.ceil(self.w3_jobs / (self.workers * self.slots)) * self.w3_sleep

    @classmethod
    def quick(cls) -> "Params":
        return cls(w1_jobs=2_000, w1_warmup=50, w2_jobs=60, w2_warmup=10, m_jobs=10_000,
                   w1_budget=30.0, m_budget=60.0)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["w3_ideal"] = self.w3_ideal
        return d


class BenchTimeout(RuntimeError):
    """A bounded wait ran out: the system under test is stuck or far slower than expected."""


class Deadline:
    """A point in time that bounds a loop: `remaining()` for timeouts, `check()` to stop."""

    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    def remaining(self, floor: float = 0.0) -> float:
        return max(floor, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self) -> None:
        if self.expired():
            raise BenchTimeout(f"{self.what}: no end after {self.seconds:g}s")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(seconds: List[float]) -> Dict[str, float]:
    """p50 / p99 / max in milliseconds, and the sample count."""
    return {
        "w2_p50_ms": percentile(seconds, 50) * 1000.0,
        "w2_p99_ms": percentile(seconds, 99) * 1000.0,
        "w2_max_ms": max(seconds) * 1000.0,
        "w2_samples": len(seconds),
    }


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (10^6 bytes), from VmRSS in /proc/PID/status (which is in KiB)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as release:
            for line in release:
                if line.startswith("PRETTY_NAME="):
                    return f"{line.split('=', 1)[1].strip().strip(chr(34))}, Linux {platform.release()}"
    except OSError:
        pass
    return platform.platform()


PACKAGES = ("corral", "textual", "rich", "paramiko", "pytest")


def _git_commit() -> str:
    """The repo's commit, and whether corral's code (not bench/) differs from it: figures need a version."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no",
                                "--", ".", ":!bench"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes outside bench/' if dirty else ''}"


def machine_info() -> Dict[str, Any]:
    """What the figures were measured on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "ram_gb": round(_ram_gb(), 1),
        "os": _os_name(),
        "python": sys.version.split()[0],
        "packages": versions,
        "commit": _git_commit(),
    }
