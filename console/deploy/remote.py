"""What corral does on one host, over its link: probe it, choose its Python, start, signal and stop the agent,
read its log, remove its files; and the agent's command line, written and read back."""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import DeployError
from .fleet import Report
from .inventory import DEFAULT_REMOTE_DIR, Host
from .link import Link

MIN_PYTHON = (3, 8)
PYTHON_CANDIDATES = ("python3", "python3.13", "python3.12", "python3.11", "python3.10", "python3.9", "python3.8", "python")
STOP_GRACE_SECONDS = 10.0  # a hard stop waits this long for the agent's own cleanup, then SIGKILLs its group
LOG_TAIL_LINES = 20


def remote_dir_expr(path: str) -> str:
    """A shell expression for the remote directory: ~ expands to $HOME, the rest is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


@dataclass(frozen=True)
class Layout:
    """Where one cluster's files go on a host. With the default remote directory, each cluster has a directory
    of its own in it and the bundles (content-addressed) are shared; a remote_dir set for the host is that
    cluster's alone, bundles included (a marker file says whose it is)."""

    files: str  # the cluster's directory, as configured (~ allowed): authkey, agent.pid, agent.log, cluster
    bundles: str  # where agent-<hash>.pyz files go

    @classmethod
    def of(cls, host: Host, cluster: str) -> Layout:
        if host.remote_dir == DEFAULT_REMOTE_DIR and cluster:
            return cls(f"{DEFAULT_REMOTE_DIR}/{cluster}", DEFAULT_REMOTE_DIR)
        return cls(host.remote_dir, host.remote_dir)

    @property
    def shared(self) -> bool:
        return self.files != self.bundles


# Prints "VERSION EXECUTABLE" and succeeds only for 3.8+; must itself run on any Python, 2.7 included.
_PY_VERSION = ("import sys; print('%d.%d.%d %s' % (tuple(sys.version_info[:3]) + (sys.executable,))); "
               "sys.exit(0 if sys.version_info >= (3, 8) else 1)")


@dataclass(frozen=True)
class FoundPython:
    """One interpreter the probe found: the path on PATH, its version ("?" if it did not run), and its
    sys.executable (the interpreter itself, past any shim in front of it)."""

    path: str
    version: str
    executable: str

    def new_enough(self) -> bool:
        return _version(self.version) >= MIN_PYTHON


@dataclass
class Probe:
    """One round trip's worth of facts about the host."""

    dir: str = ""  # the cluster's directory, resolved
    dir_error: str = ""
    bundle_dir: str = ""  # where the bundles are, resolved
    owner: str = ""  # the cluster the directory's marker names ("" if none)
    bundles: list[str] = field(default_factory=list)
    pid: int = 0  # the agent recorded in agent.pid, if that process is alive
    argv: list[str] = field(default_factory=list)  # its command line
    pythons: list[FoundPython] = field(default_factory=list)  # in the order tried


def probe(link: Link, layout: Layout, python: str, step: str = "python", hint: str = "") -> Probe:
    """Create the remote directories (0700) if needed; list bundles, the running agent and the Pythons
    (the configured one; else `hint`, the interpreter chosen last time, then the usual names)."""
    candidates = [python] if python else list(dict.fromkeys([hint, *PYTHON_CANDIDATES] if hint else PYTHON_CANDIDATES))
    script = f"""
B={remote_dir_expr(layout.bundles)}
D={remote_dir_expr(layout.files)}
if [ ! -d "$D" ]; then mkdir -p -m 700 "$B" "$D" 2>/dev/null; fi
if cd "$B" 2>/dev/null && [ -w . ]; then
  echo "bundledir $(pwd -P)"
  for f in agent-*.pyz; do [ -f "$f" ] && echo "bundle $f"; done
fi
if cd "$D" 2>/dev/null && [ -w . ]; then
  echo "dir $(pwd -P)"
  if [ -f cluster ]; then echo "owner $(head -c 64 cluster)"; fi
  if [ -f agent.pid ]; then
    p=$(cat agent.pid)
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "pid $p"; echo "argv $(tr '\\000' '\\037' < /proc/$p/cmdline)"; fi
  fi
else
  echo "direrror $D"
fi
for p in {' '.join(shlex.quote(c) for c in candidates)}; do
  if path=$(command -v "$p" 2>/dev/null) && [ -n "$path" ]; then
    if v=$("$path" -c {shlex.quote(_PY_VERSION)} 2>/dev/null); then good=1; else good=; fi
    v=$(echo "$v" | head -n 1)
    echo "python $path ${{v:-?}}"
    [ -n "$good" ] && break
  fi
done
exit 0
"""
    status, out = link.sh(script, step)
    if status != 0:
        raise DeployError.at(link.host.alias, step, f"probing the host failed (exit {status}): {out.strip()[-300:]}")
    return parse_probe(out)


def parse_probe(out: str) -> Probe:
    """The probe script's output, one fact a line ("dir PATH", "bundle NAME", "python PATH VERSION EXE"...)."""
    found = Probe()
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "dir":
            found.dir = rest
        elif kind == "direrror":
            found.dir_error = rest
        elif kind == "bundledir":
            found.bundle_dir = rest
        elif kind == "owner":
            found.owner = rest.strip()
        elif kind == "bundle":
            found.bundles.append(rest)
        elif kind == "pid" and rest.isdigit():
            found.pid = int(rest)
        elif kind == "argv":
            found.argv = [a for a in rest.split("\x1f") if a]
        elif kind == "python":
            path, _, rest = rest.partition(" ")
            version, _, executable = rest.partition(" ")
            found.pythons.append(FoundPython(path, version, executable or path))
    return found


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(".")[:3])
    except ValueError:
        return ()


def choose_python(host: Host, found: Probe) -> FoundPython:
    """The Python to run the agent with, or a DeployError saying why none will do."""
    if host.python:
        if not found.pythons:
            raise DeployError.at(host.alias, "python", f"no Python at {host.python} (not found on the host)",
                                 "fix the host's python setting, or clear it to let corral find one")
        python = found.pythons[0]
        if not python.new_enough():
            shown = python.version if python.version != "?" else "unknown (it did not run)"
            raise DeployError.at(host.alias, "python",
                                 f"Python {shown} at {python.path} is too old: the agent needs 3.8 or newer",
                                 "install Python 3.8+ there, or point the host's python setting at one")
        return FoundPython(python.path, python.version, python.path)  # as configured, shim or not
    good = next((p for p in found.pythons if p.new_enough()), None)
    if good is not None:
        return good
    if found.pythons:
        seen = ", ".join(f"{p.path} is {p.version}" for p in found.pythons)
        raise DeployError.at(host.alias, "python", f"no Python 3.8 or newer on the host ({seen})",
                             "install Python 3.8+ there, or set the host's python to one")
    raise DeployError.at(host.alias, "python", f"no Python on the host (tried {', '.join(PYTHON_CANDIDATES)} on its PATH)",
                         "install python3 (3.8+) there, or set the host's python to its path")


def log_tail(link: Link, directory: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the agent's log on the host ("" if there is none or the host is gone)."""
    try:
        data = link.read(f"{directory}/agent.log", "log", limit=64 * 1024)
    except DeployError:
        return ""
    if not data:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:]) + "\n"


def running_agent(link: Link, layout: Layout, step: str) -> tuple[str, int]:
    """(the cluster's remote directory, the pid of the agent running from it or 0); ("", 0) if it is absent."""
    script = f"""
D={remote_dir_expr(layout.files)}
cd "$D" 2>/dev/null || exit 0
echo "dir $(pwd -P)"
if [ -f agent.pid ]; then p=$(cat agent.pid); if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "pid $p"; fi; fi
exit 0
"""
    _, out = link.sh(script, step)
    directory, pid = "", 0
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "dir":
            directory = rest
        elif kind == "pid" and rest.isdigit():
            pid = int(rest)
    return directory, pid


def quick_look(link: Link, directory: str, step: str) -> tuple[int, list[str]]:
    """The agent recorded in `directory` and its command line, read over SFTP alone (no shell): (0, []) if none runs."""
    raw = link.read(f"{directory}/agent.pid", step, limit=64)
    pid = int(raw) if raw and raw.strip().isdigit() else 0
    if not pid or not alive(link, pid, step):
        return 0, []
    data = link.read(f"/proc/{pid}/cmdline", step, limit=64 * 1024) or b""
    return pid, [a for a in data.decode("utf-8", "replace").split("\0") if a]


def alive(link: Link, pid: int, step: str) -> bool:
    """Whether the process runs (a zombie does not count), read from the host's /proc over SFTP."""
    try:
        stat = link.read(f"/proc/{pid}/stat", step, limit=4096)
    except DeployError:
        status, _ = link.sh(f"kill -0 {pid} 2>/dev/null", step, timeout=10)  # no /proc to read
        return status == 0
    if stat is None:
        return False
    state = stat.rsplit(b")", 1)[-1].split()[:1]
    return state != [b"Z"]


# ---- the agent's command line: what we start, and how to read back what runs ------------------------

@dataclass(frozen=True)
class Launch:
    """How the agent is to be started: compared with the running one to decide no-op or upgrade."""

    python: str
    bundle: str
    name: str
    slots: int | None
    tags: tuple[str, ...]
    started_by: str
    connect: str = ""  # HOST:PORT the agent dials (the tunnel's end on the host, or the master)

    def argv(self, directory: str, bundle_dir: str = "") -> list[str]:
        args = [self.python, f"{bundle_dir or directory}/{self.bundle}", "--connect", self.connect,
                "--authkey-file", f"{directory}/authkey", "--name", self.name]
        if self.slots:
            args += ["--slots", str(self.slots)]
        if self.tags:
            args += ["--tags", ",".join(self.tags)]
        return args + ["--started-by", self.started_by]

    @classmethod
    def parse(cls, argv: list[str]) -> "Launch | None":
        """The Launch of a running agent's command line (None if it is not one of ours)."""
        if len(argv) < 2 or not argv[1].endswith(".pyz"):
            return None
        opts: dict[str, str] = {}
        rest = argv[2:]
        for flag, value in zip(rest[::2], rest[1::2]):
            opts[flag] = value
        slots = opts.get("--slots")
        return cls(python=argv[0], bundle=os.path.basename(argv[1]), name=opts.get("--name", ""),
                   slots=int(slots) if slots and slots.isdigit() else None,
                   tags=tuple(t for t in opts.get("--tags", "").split(",") if t),
                   started_by=opts.get("--started-by", ""), connect=opts.get("--connect", ""))

    def same_agent(self, other: "Launch | None", pythons: tuple[str, ...] = ()) -> bool:
        """Same bundle, Python (this one, or any of `pythons`: what it execs into) and settings; the
        address it dials is checked apart."""
        return other is not None and other.python in (self.python, *pythons) and \
            (self.bundle, self.name, self.slots, self.tags, self.started_by) == \
            (other.bundle, other.name, other.slots, other.tags, other.started_by)


def start_agent(link: Link, directory: str, launch: Launch, bundle_dir: str = "") -> int:
    """Start the agent detached from the SSH session (its own session, stdio on its log); its pid."""
    args = " ".join(shlex.quote(a) for a in launch.argv(directory, bundle_dir))
    script = f"""
cd {shlex.quote(directory)} || exit 3
if [ -f agent.log ]; then mv -f agent.log agent.log.1; fi
S=""; if command -v setsid >/dev/null 2>&1; then S=setsid; fi
$S {args} </dev/null >agent.log 2>&1 &
echo $! > agent.pid
echo "pid $!"
"""
    status, out = link.sh(script, "start")
    pid = next((int(line.split()[1]) for line in out.splitlines() if line.startswith("pid ") and line.split()[1].isdigit()), 0)
    if status != 0 or not pid:
        raise DeployError.at(link.host.alias, "start", f"could not start the agent (exit {status}): {out.strip()[-300:]}")
    return pid


def kill_agent(link: Link, pid: int, drain: bool, step: str) -> None:
    """Signal the agent: SIGTERM drains it; SIGINT then SIGTERM (two distinct signals, so neither is
    coalesced) make it kill its jobs and leave."""
    command = f"kill -TERM {pid}" if drain else f"kill -INT {pid}; kill -TERM {pid}"
    link.sh(command + " 2>/dev/null; true", step, timeout=10)


def wait_gone(link: Link, pid: int, timeout: float | None, step: str, tick: Callable[[], None] | None = None) -> bool:
    """Poll until the process is gone (True) or `timeout` passes (False)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while alive(link, pid, step):
        if deadline is not None and time.monotonic() > deadline:
            return False
        if tick is not None:
            tick()
        time.sleep(0.2)
    return True


def stop_remote(link: Link, pid: int, drain: bool, report: Report, drain_timeout: float | None,
                tick: Callable[[], None] | None = None) -> None:
    """Stop a running agent: drained (its jobs finish first) or at once (its jobs are killed); SIGKILL last."""
    step = "stop"
    kill_agent(link, pid, drain, step)
    report(step, "info", f"draining agent pid {pid}: running jobs finish first" if drain else
           f"stopping agent pid {pid}: its running jobs are killed")
    if wait_gone(link, pid, drain_timeout if drain else STOP_GRACE_SECONDS, step, tick):
        return
    if drain:
        raise DeployError.at(link.host.alias, step, f"the agent (pid {pid}) is still draining after {drain_timeout:g}s",
                   f"wait, or stop it at once with `corral stop {link.host.alias}`")
    link.sh(f"kill -KILL -{pid} 2>/dev/null; kill -KILL {pid} 2>/dev/null; true", step, timeout=10)
    if not wait_gone(link, pid, 5.0, step):
        raise DeployError.at(link.host.alias, step, f"the agent (pid {pid}) survived SIGKILL", "look at the host")


def remove_files(link: Link, directory: str, bundle_dir: str = "") -> None:
    """Remove what corral put in the cluster's remote directory, and the directory if that leaves it empty;
    the shared bundles too once no other cluster's directory is left beside them."""
    d = shlex.quote(directory)
    script = (f"cd {d} 2>/dev/null || exit 0\n"
              "rm -f agent-*.pyz agent-*.pyz.tmp* agent.log agent.log.1 authkey authkey.tmp* agent.pid cluster cluster.tmp*\n"
              f"cd / && rmdir {d} 2>/dev/null; true\n")
    if bundle_dir and bundle_dir != directory:
        b = remote_dir_expr(bundle_dir)
        script += (f"cd {b} 2>/dev/null || exit 0\n"
                   "for x in */; do [ -d \"$x\" ] && exit 0; done\n"  # another cluster still uses them
                   f"rm -f agent-*.pyz agent-*.pyz.tmp*; cd / && rmdir {b} 2>/dev/null; true\n")
    status, err = link.sh(script, "remove")
    if status != 0:
        raise DeployError.at(link.host.alias, "remove", f"could not remove the agent's files from {directory}: {err.strip()[-200:]}")
