"""Containment of a job's processes: a cgroup v2 per job where the agent can make one, else child subreapers that kill the job's whole descendant tree."""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Set, TypeVar

from .errors import CorralError

log = logging.getLogger(__name__)

# What an agent uses, strongest first (AgentInfo.containment, `corral agents`, README "Guarantees"):
#   cgroup     each shell job runs in a cgroup v2 of its own (<agent's cgroup>/corral-<pid>/w-<worker>/
#              job-<id>-<attempt>), each callable in its pool worker's cgroup (w-<worker>, which holds
#              nothing else while it runs); whatever is in it when the job ends is killed, wherever it
#              went (new sessions, new process groups, reparented daemons): the kernel keeps the count.
#   subreaper  the agent and each pool worker are child subreapers (prctl PR_SET_CHILD_SUBREAPER): an
#              orphan of the job is reparented to its worker, not to init, so the job's processes stay
#              the worker's descendants and all of them are killed when the job ends. A process that
#              escapes both (a worker that died without killing them: their orphans go to the agent)
#              is killed by the agent's own sweep.
#   group      neither could be set up: only the job's process group is killed (the README says so).
CGROUP, SUBREAPER, GROUP = "cgroup", "subreaper", "group"
KINDS = (CGROUP, SUBREAPER, GROUP)
WANTS = ("auto",) + KINDS

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # linux/prctl.h
KILL_ROUNDS = 200  # rounds of "list what is left, kill it": a fork bomb loses a few per round, never wins
REAP_SECONDS = 5.0  # how long a job's end waits for what it killed to be gone (a process in D state may linger)
_AGENT_DIR = re.compile(r"corral-(\d+)$")

T = TypeVar("T")
_worker_reaps = False  # this pool worker is a child subreaper: every process its job left is its descendant
_worker_cgroup = ""  # the cgroup this pool worker moved into (w-<pid>), once it did


@dataclass(frozen=True)
class Containment:
    """How this agent contains its jobs' processes (chosen once, in the agent; its workers get a copy)."""

    kind: str
    root: str = ""  # the agent's own cgroup directory (kind cgroup): a w-<pid> per worker under it
    why: str = ""  # why nothing stronger is used (shown with the kind)
    # The agent's process is its own (python -m corral.agent): it is a subreaper, and any child of it
    # that multiprocessing did not start is a job's orphan, to kill. False for a pool embedded elsewhere.
    reaper: bool = False

    def describe(self) -> str:
        """One line for `corral agents` and the agent's log: the kind and, for a weaker one, why."""
        return f"{self.kind} ({self.why})" if self.why else self.kind


class Killed(NamedTuple):
    """One process killed because its job ended while it still ran."""

    pid: int
    name: str  # its /proc comm (15 bytes at most, the job's own choice)


# ---- choosing, in the agent ---------------------------------------------------------------------

def choose(want: str = "auto", owns_process: bool = True) -> Containment:
    """The strongest containment this process can set up (want="auto"), or the one asked for;
    CorralError when the one asked for cannot be. An agent that owns its process becomes a child
    subreaper too: orphans of a job whose worker died come to it, to be killed and reaped."""
    if want not in WANTS:
        raise CorralError(f"--containment must be one of {', '.join(WANTS)}, not {want!r}")
    if want == GROUP:
        return Containment(GROUP, why="asked for")
    reaper = owns_process and set_subreaper()
    cgroup_why = ""
    if want in ("auto", CGROUP):
        root, cgroup_why = _make_agent_cgroup()
        if root:
            return Containment(CGROUP, root=root, reaper=reaper)
        if want == CGROUP:
            raise CorralError(f"cannot contain jobs in a cgroup here: {cgroup_why}")
        log.info("no cgroup for jobs: %s", cgroup_why)
    if not _can_subreap():
        if want == SUBREAPER:
            raise CorralError("cannot make processes child subreapers here (prctl PR_SET_CHILD_SUBREAPER failed)")
        return Containment(GROUP, why=f"{cgroup_why}; no PR_SET_CHILD_SUBREAPER")
    return Containment(SUBREAPER, why="asked for" if want == SUBREAPER else cgroup_why, reaper=reaper)


def _can_subreap() -> bool:
    """Whether prctl(PR_SET_CHILD_SUBREAPER) works here, asked without changing this process (PR_GET)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        value = ctypes.c_int(0)
        return int(libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def set_subreaper() -> bool:
    """Make this process a child subreaper (Linux 3.4+), through libc's prctl; False where it cannot be."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # no libc symbols (not glibc/musl), no prctl (not Linux)
        return False


def _own_cgroup() -> str:
    """This process's cgroup v2 directory ("" when there is none): its path in the unified
    hierarchy (/proc/self/cgroup, the "0::" line) under where that hierarchy is mounted."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line[3:].strip() for line in f if line.startswith("0::")), "")
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return ""
    if not path:
        return ""
    for fields in mounts:
        # mountinfo: id parent dev root mountpoint options [optional...] - fstype source superoptions
        dash = fields.index("-") if "-" in fields else -1
        if dash > 0 and fields[dash + 1] == "cgroup2":
            mount_root, mount_point = fields[3], fields[4]
            if mount_root != "/" and path.startswith(mount_root):
                path = path[len(mount_root):] or "/"
            return os.path.normpath(mount_point + "/" + path.lstrip("/"))
    return ""


def _make_agent_cgroup() -> "tuple[str, str]":
    """Make <own cgroup>/corral-<pid> and prove a process can be moved into a cgroup under it:
    (its path, "") or ("", why not)."""
    base = _own_cgroup()
    if not base:
        return "", "no cgroup v2 hierarchy is mounted"
    _remove_stale_agents(base)
    root = os.path.join(base, f"corral-{os.getpid()}")
    try:
        _rmtree_cgroup(root)  # a dead agent that had our pid
        os.mkdir(root)
    except OSError as exc:
        return "", f"{exc.strerror}: {exc.filename}"
    probe = os.path.join(root, "probe")
    child: Optional["subprocess.Popen[bytes]"] = None
    try:
        os.mkdir(probe)
        child = subprocess.Popen(["/bin/sh", "-c", "read _"], stdin=subprocess.PIPE)
        _write(os.path.join(probe, "cgroup.procs"), str(child.pid))
        if _cgroup_pids(probe) != [child.pid]:
            raise OSError(errno.EIO, "a process moved into it is not there", probe)
    except OSError as exc:
        why = f"{exc.strerror or exc}: {exc.filename or root}"
        if child is not None:
            child.kill()
            child.wait()
        _rmtree_cgroup(root)
        return "", why
    assert child is not None
    child.kill()
    child.wait()
    _rmtree_cgroup(root)
    os.mkdir(root)
    return root, ""


def _remove_stale_agents(base: str) -> None:
    """Kill and remove what agents killed with -9 left: corral-<pid> directories whose agent is gone."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        match = _AGENT_DIR.match(name)
        if match and int(match.group(1)) != os.getpid() and not _exists(int(match.group(1))):
            kill_cgroup(os.path.join(base, name))
            _rmtree_cgroup(os.path.join(base, name))


# ---- in a pool worker ---------------------------------------------------------------------------

def enter_worker(c: Containment) -> None:
    """Pool initializer's part: this worker becomes a subreaper (a job's orphans come back to it) and,
    with cgroups, moves into w-<pid> (what a callable starts is born there)."""
    global _worker_reaps, _worker_cgroup
    if c.kind == GROUP:
        return
    _worker_reaps = set_subreaper()
    if c.kind == CGROUP:
        here = worker_cgroup(c, os.getpid())
        try:
            os.makedirs(here, exist_ok=True)
            _write(os.path.join(here, "cgroup.procs"), str(os.getpid()))
            _worker_cgroup = here
        except OSError as exc:  # the agent's cgroup was removed under it: the tree still works
            log.warning("pool worker %d cannot enter %s: %s", os.getpid(), here, exc)


def worker_cgroup(c: Containment, pid: int) -> str:
    return os.path.join(c.root, f"w-{pid}")


class JobBox:
    """One job's processes, seen from the pool worker that runs it (one job at a time per worker).

    spawn() starts the shell inside the job's own cgroup (the worker steps into it for the fork and
    back out); kill() kills everything of the job now; end() kills what is left, reaps it and
    removes the cgroup. `killed` lists what was still running when kill() or end() came."""

    def __init__(self, c: Containment, job_id: int, attempt: int, shell: bool) -> None:
        self.c = c
        self.me = os.getpid()
        self.killed: List[Killed] = []
        self.here = _worker_cgroup if c.kind == CGROUP else ""  # "" if it could not enter one: the tree, then
        # A callable runs in the worker itself: its processes are born in the worker's cgroup.
        self.cgroup = os.path.join(self.here, f"job-{job_id}-{attempt}") if self.here and shell else ""

    def spawn(self, start: Callable[[], T]) -> T:
        """start() (which forks the job's shell) with this worker inside the job's cgroup, so the
        shell is born in it: no instant in which it could fork outside."""
        if not self.cgroup:
            return start()
        try:
            os.mkdir(self.cgroup)
            _write(os.path.join(self.cgroup, "cgroup.procs"), str(self.me))
        except OSError as exc:
            log.warning("job cgroup %s: %s; its worker's cgroup holds it instead", self.cgroup, exc)
            self.cgroup = ""
            return start()
        try:
            return start()
        finally:
            self._step_out()

    def _step_out(self) -> None:
        """Back to the worker's own cgroup (else the agent's): the job's cgroup must hold only the job."""
        for home in (self.here, os.path.dirname(self.c.root)):
            try:
                _write(os.path.join(home, "cgroup.procs"), str(self.me))
                return
            except OSError as exc:
                log.warning("pool worker %d cannot leave %s for %s: %s", self.me, self.cgroup, home, exc)

    def kill(self) -> None:
        """SIGKILL every process of the job (not the worker), wherever it went; repeats until none is
        left, so what forks while being killed is killed too."""
        for _ in range(KILL_ROUNDS):
            alive = self._members()
            if not alive:
                return
            seen = {k.pid for k in self.killed}
            self.killed.extend(Killed(pid, _comm(pid)) for pid in alive if pid not in seen)
            if self.cgroup and self.me not in _cgroup_pids(self.cgroup) and _kill_file(self.cgroup):
                # all of it at once, what forks meanwhile too (never with the worker still inside)
                _await_empty(self.cgroup)
            for pid in alive:
                _kill(pid)
            # No reaping here: the shell is the worker's child too, and its exit status is Popen's to collect.
        log.warning("job processes still alive after %d kill rounds: %s", KILL_ROUNDS, self._members())

    def end(self) -> List[Killed]:
        """The job has ended: kill what it left, reap it, remove its cgroup; what was killed."""
        if _worker_reaps and not self.cgroup and not self.killed and not _has_children():
            # The usual end of a callable: a subreaper with no child at all has no descendant left
            # anywhere (its job's orphans would have come to it), so one system call says it.
            return self.killed
        self.kill()
        self._reap(wait=True)
        if self.cgroup:
            _rmdir(self.cgroup)
        return self.killed

    def _members(self) -> List[int]:
        """The job's processes still alive (zombies excluded): in its cgroup(s), or the worker's descendants."""
        if self.c.kind == GROUP:
            return []
        if self.here:
            pids = _cgroup_pids(self.cgroup) if self.cgroup else []
            pids += _cgroup_pids(self.here)
            return [pid for pid in pids if pid != self.me and not _zombie(pid)]
        if not _has_children():
            return []  # the usual end: one wait call says the tree is empty, no /proc walk
        return [pid for pid in descendants(self.me) if not _zombie(pid)]

    def _reap(self, wait: bool) -> None:
        """Collect the exit of every child the worker has left (the job's orphans came to it);
        with `wait`, until none is left or REAP_SECONDS pass."""
        if self.c.kind == GROUP:
            return
        deadline = time.monotonic() + REAP_SECONDS
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                continue
            if not wait or time.monotonic() > deadline:
                return
            time.sleep(0.005)


# ---- in the agent: workers that died, and the end ------------------------------------------------

def worker_gone(c: Containment, pid: int) -> None:
    """A pool worker died (or was killed): kill what its job left and remove its cgroups."""
    if c.kind == CGROUP:
        here = worker_cgroup(c, pid)
        kill_cgroup(here)
        _rmtree_cgroup(here)
    if c.reaper:
        sweep_orphans()


def kill_worker(c: Containment, pid: int) -> None:
    """Kill a pool worker and everything its job started (a callable past its timeout), before the
    job's outcome is reported: at once with a cgroup, else the worker first (it forks no more), then
    its tree, then whatever of it was reparented to the agent meanwhile."""
    if c.kind == CGROUP and kill_cgroup(worker_cgroup(c, pid)):
        return
    tree = descendants(pid) if c.kind == SUBREAPER else []
    _kill(pid)
    for victim in tree:
        _kill(victim)
    if c.reaper:
        sweep_orphans()


def release(c: Containment) -> None:
    """The pool is gone: kill anything of any job still alive, then remove the agent's cgroup."""
    if c.kind == CGROUP:
        kill_cgroup(c.root)
        _rmtree_cgroup(c.root)
    if c.reaper:
        sweep_orphans()


def sweep_orphans() -> List[int]:
    """Kill and reap this agent's children that are not its own multiprocessing helpers: orphans of
    a job whose worker died, reparented here because the agent is a subreaper; returns once all of
    them are dead (REAP_SECONDS at most), so a job's outcome is reported after its processes ended."""
    legit = _helpers()
    tree = _children_map()
    victims: List[int] = []
    for orphan in tree.get(os.getpid(), []):
        if orphan not in legit:
            victims.append(orphan)
            victims.extend(_below(tree, orphan))
    if not victims:
        return []
    running = [pid for pid in victims if not _zombie(pid)]  # the rest were dead already (a cgroup killed them)
    for pid in running:
        _kill(pid)
    deadline = time.monotonic() + REAP_SECONDS
    while not all(_zombie(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.002)
    # All dead now: each one's parent is dead or is this agent, so every zombie among them is ours.
    for pid in victims:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if running:
        log.info("killed %d processes left by jobs whose pool worker died: %s", len(running), running[:20])
    return running


def _helpers() -> Set[int]:
    """This process's children that multiprocessing started and relies on: the pool's workers (under
    spawn), the forkserver and the resource tracker. Anything else here is a job's orphan."""
    pids = {child.pid for child in multiprocessing.active_children() if child.pid}
    from multiprocessing import forkserver, resource_tracker

    known = [getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None),
             getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)]
    pids.update(int(pid) for pid in known if pid)
    if None in known:
        # A Python whose private names differ: know them by how multiprocessing starts them
        # (`python -c 'from multiprocessing.forkserver import main; ...'`), never kill them by mistake.
        for pid in _children_map().get(os.getpid(), []):
            if b"from multiprocessing." in _cmdline(pid):
                pids.add(pid)
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


# ---- cgroup files -------------------------------------------------------------------------------

def kill_cgroup(path: str) -> bool:
    """SIGKILL everything in a cgroup and below it; False when there is no such cgroup."""
    if not os.path.isdir(path):
        return False
    if not _kill_file(path):
        for _ in range(KILL_ROUNDS):  # before Linux 5.14 (no cgroup.kill): list and kill until empty
            pids = _tree_pids(path)
            if not pids:
                break
            for pid in pids:
                _kill(pid)
    _await_empty(path)
    return True


def _kill_file(path: str) -> bool:
    try:
        _write(os.path.join(path, "cgroup.kill"), "1")
        return True
    except OSError:
        return False


def _await_empty(path: str, seconds: float = REAP_SECONDS) -> None:
    """Until the kernel says nothing of the cgroup (or below) is alive: `populated 0` in cgroup.events."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(path, "cgroup.events")) as f:
                if "populated 0" in f.read():
                    return
        except OSError:
            return
        time.sleep(0.002)


def _cgroup_pids(path: str) -> List[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _tree_pids(path: str) -> List[int]:
    pids: List[int] = []
    for here, _, _ in os.walk(path):
        pids.extend(_cgroup_pids(here))
    return pids


def _rmtree_cgroup(path: str) -> None:
    """Remove a cgroup and the ones below it (deepest first); an emptied one may take a moment."""
    if not os.path.isdir(path):
        return
    for here, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
        _rmdir(here)


def _rmdir(path: str) -> None:
    deadline = time.monotonic() + 1.0
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                return
            time.sleep(0.005)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# ---- processes ----------------------------------------------------------------------------------

def descendants(pid: int) -> List[int]:
    """Every process below pid (children first), from one walk of /proc."""
    return _below(_children_map(), pid)


def _below(tree: Dict[int, List[int]], pid: int) -> List[int]:
    out: List[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(tree.get(child, []))
    return out


def _children_map() -> Dict[int, List[int]]:
    """parent pid -> child pids, for every process in /proc (no /proc/PID/task/TID/children on many kernels)."""
    tree: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat:
            tree.setdefault(int(stat[1]), []).append(int(entry))
    return tree


def _stat(pid: int) -> List[str]:
    """/proc/PID/stat's fields after the command name: [state, ppid, ...]; [] when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return []
    return data[data.rfind(b")") + 2:].decode("ascii", "replace").split()


def _zombie(pid: int) -> bool:
    stat = _stat(pid)
    return not stat or stat[0] in ("Z", "X")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode("utf-8", "replace")
    except OSError:
        return "?"


def _has_children() -> bool:
    """Whether this process has any child at all (exited or not), without reaping one."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # None while none has exited yet
    except ChildProcessError:
        return False
    return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_killed(killed: Iterable[Killed], limit: int = 8) -> str:
    """`3 processes left running at its end were killed: sleep (pid 12), sh (pid 13), ...`"""
    items = list(killed)
    if not items:
        return ""
    shown = ", ".join(f"{k.name} (pid {k.pid})" for k in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    noun = "process" if len(items) == 1 else "processes"
    return f"{len(items)} {noun} left running at its end {'was' if len(items) == 1 else 'were'} killed: {shown}{more}"
