"""The same workloads through corral: a real `corral master`, real agents, the Python Client, all on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from . import REPO_ROOT, BenchTimeout, Deadline, Params, latency_summary, rss_mb

INC = "bench.jobs:inc"


def _children_map() -> Dict[int, List[int]]:
    """ppid → pids, from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(pids: Iterable[int]) -> Set[int]:
    children = _children_map()
    found: Set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _pgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class CorralCluster:
    """One master and its agents, each started in a session of its own under a private CORRAL_HOME."""

    def __init__(self, params: Params, home: Path) -> None:
        self.params = params
        self.home = home
        self.env = dict(os.environ)
        self.env["CORRAL_HOME"] = str(home)
        # Agents' pool workers import bench.jobs by name: the repo root goes on their path.
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.master: Optional[subprocess.Popen] = None
        self.master_pid: Optional[int] = None
        self.agents: List[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False

    def _spawn(self, args: List[str], log_name: str) -> subprocess.Popen:
        log = open(self.home / log_name, "wb")  # noqa: SIM115 - closed by the child's exit; we only read the file
        try:
            return subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: whatever it leaves behind can be found and stopped
            )
        finally:
            log.close()

    def log_tail(self, log_name: str, lines: int = 15) -> str:
        try:
            text = (self.home / log_name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start_master(self) -> None:
        self.master = self._spawn(["-m", "corral", "master"], "bench-master.log")
        deadline = Deadline(self.params.start_budget, "corral master to write master.json")
        info_path = self.home / "master.json"
        while True:
            if self.master.poll() is not None:
                raise RuntimeError(
                    f"corral master exited with {self.master.returncode}:\n{self.log_tail('bench-master.log')}"
                )
            if info_path.exists():
                try:
                    info = json.loads(info_path.read_text())
                    self.master_pid = int(info["pid"])
                    return
                except (ValueError, KeyError):
                    pass  # written but not complete yet
            deadline.check()
            time.sleep(0.02)

    def start_agents(self, count: int, slots: int) -> None:
        for i in range(count):
            name = f"a{i + 1}"
            self.agents.append(
                self._spawn(["-m", "corral.agent", "--slots", str(slots), "--name", name], f"bench-agent-{name}.log")
            )

    def check_alive(self) -> None:
        for i, agent in enumerate(self.agents):
            if agent.poll() is not None:
                name = f"a{i + 1}"
                raise RuntimeError(
                    f"corral agent {name} exited with {agent.returncode}:\n{self.log_tail(f'bench-agent-{name}.log')}"
                )
        if self.master is not None and self.master.poll() is not None:
            raise RuntimeError(f"corral master exited with {self.master.returncode}")

    def client(self) -> Any:
        from corral.console.client import Client  # imported late: --only pool,seed must not need corral

        deadline = Deadline(self.params.start_budget, "corral Client to connect")
        while True:
            try:
                return Client(home=self.home)
            except Exception:  # noqa: BLE001 - retried until the deadline, then re-raised
                if deadline.expired():
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        """Agents first (SIGTERM, graceful), then the master; SIGKILL for anything of ours left over.

        Idempotent and serialised: a second caller (the watchdog's timer, or the normal path)
        waits until the first has finished stopping everything.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_all()

    def _stop_all(self) -> None:
        ours = [p for p in [*self.agents, self.master] if p is not None]
        groups = {p.pid for p in ours}
        leftovers = _descendants(p.pid for p in ours)
        for batch in (self.agents, [self.master] if self.master is not None else []):
            for proc in batch:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = Deadline(self.params.stop_budget, "corral processes to stop")
            for proc in batch:
                try:
                    proc.wait(deadline.remaining())
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5.0)
        # Pool workers and shell jobs started by our agents and master, if any outlived them:
        # only pids seen as their descendants and still in one of their process groups.
        for pid in leftovers:
            if _pgid(pid) in groups:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Watchdog:
    """Bounds a block that calls into corral: past the deadline, the cluster is stopped, which
    makes any blocked client call fail; the block then raises BenchTimeout."""

    def __init__(self, cluster: CorralCluster, seconds: float, what: str) -> None:
        self.cluster = cluster
        self.seconds = seconds
        self.what = what
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self.cluster.close()

    def __enter__(self) -> "Watchdog":
        self._timer.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._timer.cancel()
        if self.fired:
            raise BenchTimeout(f"{self.what}: no end after {self.seconds:g}s; corral stopped") from exc


def _job_spec() -> Any:
    from corral.agent.protocol import JobSpec

    return JobSpec


def _wait_for_agents(client: Any, cluster: CorralCluster, count: int, slots: int) -> None:
    """Return once `count` agents are registered and up, then warm their pools (imports bench.jobs)."""
    deadline = Deadline(cluster.params.start_budget, f"{count} corral agents to register")
    while True:
        cluster.check_alive()
        up = [a for a in client.agents() if a.get("state") == "up"]
        if len(up) >= count:
            break
        deadline.check()
        time.sleep(0.05)
    n = count * slots * 4
    if client.map(INC, range(n)) != [i + 1 for i in range(n)]:
        raise RuntimeError("corral warm-up: wrong values")


def w1_throughput(client: Any, params: Params) -> dict:
    client.map(INC, range(params.w1_warmup))
    t0 = time.perf_counter()
    values = client.map(INC, range(params.w1_jobs))
    elapsed = time.perf_counter() - t0
    expected = sum(i + 1 for i in range(params.w1_jobs))
    if len(values) != params.w1_jobs or sum(values) != expected:
        raise RuntimeError(f"corral W1: {len(values)} values summing to {sum(values)}, expected {expected}")
    return {"w1_jobs_per_s": params.w1_jobs / elapsed, "w1_seconds": elapsed, "w1_jobs": params.w1_jobs}


def w2_latency(client: Any, params: Params) -> dict:
    deadline = Deadline(params.w2_budget, "corral W2")
    samples: List[float] = []
    for i in range(params.w2_warmup + params.w2_jobs):
        deadline.check()
        t0 = time.perf_counter()
        values = client.map(INC, [i])
        t1 = time.perf_counter()
        if list(values) != [i + 1]:
            raise RuntimeError(f"corral W2: job {i} returned {values!r}")
        if i >= params.w2_warmup:
            samples.append(t1 - t0)
    return latency_summary(samples)


def w3_parallel_sleep(client: Any, params: Params) -> dict:
    JobSpec = _job_spec()
    specs = [JobSpec(command=params.w3_command) for _ in range(params.w3_jobs)]
    t0 = time.perf_counter()
    ids = client.submit(specs)
    states = client.wait(ids, timeout=params.w3_budget)
    elapsed = time.perf_counter() - t0
    if len(states) != params.w3_jobs:
        raise BenchTimeout(f"corral W3: {len(states)} of {params.w3_jobs} jobs final after {params.w3_budget:g}s")
    bad = sum(1 for state in states.values() if state != "done")
    if bad:
        raise RuntimeError(f"corral W3: {bad} jobs did not end done")
    return {"w3_wall_s": elapsed}


def m_memory(params: Params, home: Path) -> dict:
    """A fresh master with no agent: submit m_jobs `true` jobs, read the master's RSS."""
    JobSpec = _job_spec()
    cluster = CorralCluster(params, home)
    try:
        with Watchdog(cluster, params.m_budget, "corral M"):
            cluster.start_master()
            client = cluster.client()
            try:
                assert cluster.master_pid is not None
                idle = rss_mb(cluster.master_pid)
                batch = 10_000
                submitted = 0
                for start in range(0, params.m_jobs, batch):
                    n = min(batch, params.m_jobs - start)
                    ids = client.submit([JobSpec(command="true") for _ in range(n)])
                    submitted += len(ids)
                if submitted != params.m_jobs:
                    raise RuntimeError(f"corral M: {submitted} ids for {params.m_jobs} jobs")
                time.sleep(0.5)  # let the master flush its journal before reading
                return {"m_rss_mb": rss_mb(cluster.master_pid), "m_idle_rss_mb": idle, "m_jobs": params.m_jobs}
            finally:
                client.close()
    finally:
        cluster.close()


def run(params: Params, step: Callable[[str], None], record: Callable[[str, Callable[[], dict]], None]) -> None:
    """All workloads on corral; `record(name, fn)` runs one, keeping its figures or its error.

    Each workload runs under a watchdog of its own budget: past it, the cluster is stopped (so a
    blocked client call fails) and that workload, and those after it, report an error.
    """
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp) / "w"
        home.mkdir()
        step(f"corral: master + {params.workers} agents × {params.slots} slots")
        cluster = CorralCluster(params, home)
        try:
            with Watchdog(cluster, params.start_budget, "corral start-up"):
                cluster.start_master()
                cluster.start_agents(params.workers, params.slots)
                client = cluster.client()
            try:
                with Watchdog(cluster, params.start_budget, "corral agents to register"):
                    _wait_for_agents(client, cluster, params.workers, params.slots)

                def bounded(fn: Callable[[], dict], budget: float, what: str) -> Callable[[], dict]:
                    def call() -> dict:
                        with Watchdog(cluster, budget, what):
                            return fn()
                    return call

                record("W1", bounded(lambda: w1_throughput(client, params), params.w1_budget, "corral W1"))
                record("W2", bounded(lambda: w2_latency(client, params), params.w2_budget, "corral W2"))
                record("W3", bounded(lambda: w3_parallel_sleep(client, params), params.w3_budget + 10, "corral W3"))
            finally:
                client.close()
        finally:
            cluster.close()
        step("corral: fresh master, no agent, for M")
        m_home = Path(tmp) / "m"
        m_home.mkdir()
        record("M", lambda: m_memory(params, m_home))
