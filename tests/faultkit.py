"""Helpers for fault-injection tests: read the journal file directly and check that every job has
exactly one recorded outcome; find and kill process trees; network namespaces for partitions."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import pytest

from tests.cluster import Cluster

FINAL = ("done", "failed", "timeout", "cancelled", "lost")


def journal_outcomes(db: Path, ids: Iterable[int], states: Iterable[str] | None = ("done",),
                     exact: bool = True) -> dict[int, str]:
    """Assert, by querying the journal file with sqlite3, that every job of `ids` has exactly one
    row in a final state (in `states`, when given), that no job has more than one counted attempt,
    and that no job's recorded outcome shows up again in its history as a result that did not
    count (a report recorded twice). With `exact`, the journal holds no other jobs. {id: state}."""
    wanted = sorted(set(ids))
    db_conn = sqlite3.connect(str(db), timeout=30)
    try:
        rows = db_conn.execute("SELECT id, state, agent, ended FROM jobs").fetchall()
        per_id = dict(db_conn.execute("SELECT id, COUNT(*) FROM jobs GROUP BY id").fetchall())
        counted = db_conn.execute(
            "SELECT job_id, COUNT(*) FROM attempts WHERE counted=1 GROUP BY job_id HAVING COUNT(*) > 1").fetchall()
        # A result that did not count but is identical (agent, state, end time) to the job's outcome:
        # the same report applied twice (e.g. re-sent after its reply was lost).
        echoes = db_conn.execute(
            "SELECT a.job_id, a.attempt, a.agent FROM attempts a JOIN jobs j ON j.id = a.job_id"
            " WHERE a.counted = 0 AND a.agent = j.agent AND a.state = j.state AND a.ended = j.ended").fetchall()
        counted_states = db_conn.execute(
            "SELECT a.job_id, a.state, j.state FROM attempts a JOIN jobs j ON j.id = a.job_id"
            " WHERE a.counted = 1 AND j.retries = 0 AND a.state != j.state").fetchall()
    finally:
        db_conn.close()
    outcome = {job_id: state for job_id, state, _, _ in rows}
    missing = [j for j in wanted if per_id.get(j) != 1]
    assert not missing, f"{len(missing)} jobs without exactly one journal row, e.g. {missing[:10]}"
    if exact:
        extra = sorted(set(outcome) - set(wanted))
        assert not extra, f"{len(extra)} jobs in the journal nobody submitted, e.g. {extra[:10]}"
    not_final = {j: outcome[j] for j in wanted if outcome[j] not in FINAL}
    assert not not_final, f"{len(not_final)} jobs not in a final state: {dict(list(not_final.items())[:10])}"
    if states is not None:
        allowed = set(states)
        odd = {j: outcome[j] for j in wanted if outcome[j] not in allowed}
        assert not odd, f"{len(odd)} jobs ended outside {sorted(allowed)}: {dict(list(odd.items())[:10])}"
    assert not counted, f"jobs with more than one counted attempt: {counted[:10]}"
    assert not echoes, f"outcomes recorded a second time as results that did not count: {echoes[:10]}"
    assert not counted_states, f"counted attempts that disagree with the job's outcome: {counted_states[:10]}"
    return {j: outcome[j] for j in wanted}


def attempt_rows(db: Path, job_id: int) -> list[tuple]:
    """(attempt, agent, state, counted) of every attempts row of a job, straight from the journal."""
    db_conn = sqlite3.connect(str(db), timeout=30)
    try:
        return db_conn.execute("SELECT attempt, agent, state, counted FROM attempts WHERE job_id=? ORDER BY attempt",
                               (job_id,)).fetchall()
    finally:
        db_conn.close()


# ---- processes ------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every live descendant of pid, from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def processes_of(home: Path) -> list[int]:
    """Every process (but this one) whose environment names this cluster's state directory: its
    master, agents, pool workers and jobs, even those orphaned by a killed agent."""
    needle = f"CORRAL_HOME={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


@contextmanager
def running_cluster(home: Path, *master_args: str) -> Iterator[Cluster]:
    """A master (with these arguments) in `home`; on the way out every process of the cluster is
    killed, including what killed agents left behind."""
    cluster = Cluster(home)
    cluster.start_master(*master_args)
    try:
        yield cluster
    finally:
        cluster.stop()
        kill_pids(processes_of(home))


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


def rss_peak_kb(pid: int) -> int:
    """VmHWM (the peak resident set size, in kB) of a live process; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- network namespaces ------------------------------------------------------------------------

REQUIRE_NETNS_ENV = "CORRAL_REQUIRE_NETNS"


def netns_missing() -> str:
    """Why a real network namespace cannot be made here ("" when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "`ip` is missing (apt-get install iproute2)"
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return ""


def require_netns() -> None:
    """Skip where namespaces cannot be made; with CORRAL_REQUIRE_NETNS=1 (CI) that is a failure."""
    why = netns_missing()
    if not why:
        return
    if os.environ.get(REQUIRE_NETNS_ENV) == "1":
        pytest.fail(f"{why}, and {REQUIRE_NETNS_ENV}=1 says the partition test must run")
    pytest.skip(f"{why}; CI sets {REQUIRE_NETNS_ENV}=1 to make this a failure")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def free_subnet() -> str:
    """A private /24 (10.231.N.0) no interface or route of this machine uses yet: "10.231.N"."""
    used = ip("-4", "route", "show", "table", "all").stdout + ip("-4", "addr").stdout
    for n in [os.getpid() % 200 + 20, *range(20, 250)]:
        prefix = f"10.231.{n}"
        if f"{prefix}." not in used:
            return prefix
    raise AssertionError("no free 10.231.N.0/24 subnet for the test namespace")


class Namespace:
    """A network namespace joined to this host by a veth pair: host side PREFIX.1, inside PREFIX.2."""

    def __init__(self, tag: str) -> None:
        self.name = f"corral-{tag}-{os.getpid()}"
        self.veth = f"vcr{os.getpid() % 1000000}"[:15]
        self.prefix = free_subnet()
        self.host_addr = f"{self.prefix}.1"
        self.inside_addr = f"{self.prefix}.2"

    def create(self) -> None:
        ip("netns", "add", self.name)
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        ip("addr", "add", f"{self.host_addr}/24", "dev", self.veth)
        ip("link", "set", self.veth, "up")
        ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.inside_addr}/24", "dev", "eth0")
        ip("netns", "exec", self.name, "ip", "link", "set", "eth0", "up")
        ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def link(self, up: bool) -> None:
        ip("link", "set", self.veth, "up" if up else "down")

    def pids(self) -> list[int]:
        result = ip("netns", "pids", self.name, check=False)
        return [int(p) for p in result.stdout.split() if p.isdigit()]

    def destroy(self) -> None:
        """Kill everything inside, then delete the namespace (and with it the veth pair)."""
        kill_pids(self.pids())
        ip("netns", "del", self.name, check=False)
        ip("link", "del", self.veth, check=False)


# ---- attempts: how many times each job really ran, and nothing left running ------------------------

def record_run(runs: Path) -> str:
    """A shell prefix that appends "job-id attempt" to `runs` when the job's process really starts."""
    return f'echo "$CORRAL_JOB_ID $CORRAL_ATTEMPT" >> {runs}; '


def runs_of(runs: Path) -> Counter[tuple[int, int]]:
    """How many times each (job id, attempt) really ran, from the file record_run() appends to."""
    if not runs.exists():
        return Counter()
    return Counter((int(job), int(attempt)) for job, attempt in
                   (line.split() for line in runs.read_text().splitlines() if line.strip()))


def times_run(runs: Path) -> Counter[int]:
    """How many times each job ran, whatever the attempt."""
    per_job: Counter[int] = Counter()
    for (job_id, _), n in runs_of(runs).items():
        per_job[job_id] += n
    return per_job


def journal_rows(db: Path, sql: str, *args: object) -> list[tuple]:
    db_conn = sqlite3.connect(str(db), timeout=30)
    try:
        return db_conn.execute(sql, args).fetchall()
    finally:
        db_conn.close()


def assert_nothing_running(db: Path) -> None:
    """No job of the journal is left `running` (or taken by an agent and never settled)."""
    left = journal_rows(db, "SELECT id, state, agent FROM jobs WHERE state NOT IN (%s)" % ",".join("?" * len(FINAL)),
                        *FINAL)
    assert not left, f"jobs left in the journal unfinished: {left[:10]}"


# ---- cutting an agent's connections --------------------------------------------------------------

class CutProxy:
    """A TCP relay between agents and the master, whose connections the test can cut all at once: the
    agent sees its sockets reset mid-call, the master sees nothing until it writes (as with a NAT or
    firewall dropping state)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.cuts = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.target, timeout=10)
                far.settimeout(None)
            except OSError:
                near.close()
                continue
            with self.lock:
                self.pairs.append((near, far))
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut_agent_side(self) -> int:
        """Cut every relayed connection, from the agent's side; returns how many were cut. The master is
        not told beyond a FIN it reads only when it next reads: a take parked there goes on waiting, its
        thread blocked in the scheduler, for a peer that has gone."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for near, _far in pairs:
            try:
                near.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
                near.shutdown(socket.SHUT_RDWR)  # wakes the relay thread reading it
            except OSError:
                pass
            near.close()
        self.cuts += 1
        return len(pairs)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        with self.lock:
            for near, far in self.pairs:
                near.close()
                far.close()
