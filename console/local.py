"""The embedded cluster: attach to this state directory's master or start one and a local agent, and stop them again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from corral.agent.errors import CorralError

from .client import Client
from .errors import AuthFailed
from .state import StateDir

LOCAL_AGENT = "local"
# An argument of each child's command line: a pid read back from console.json must still have it to be stopped.
MASTER_COMMAND = "master"  # python -m corral --home DIR master
AGENT_MODULE = "corral.agent"  # python -m corral.agent --name local ...
START_SECONDS = 30.0  # a master or an agent that is not up by then is not coming up
STOP_SECONDS = 10.0

# Processes this process started, so waiting for them reaps them (no zombie that looks alive).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Attachment:
    """Which master the console talks to, and whether a console owns it."""

    home: Path
    address: tuple[str, int]
    master_pid: int
    started: bool  # this call started the master
    embedded: bool  # a console started this master (now or earlier): quitting may stop it
    agent_pid: int | None
    agent_slots: int | None

    def greeting(self) -> str:
        where = f"{self.address[0]}:{self.address[1]}"
        agent = f" and a local agent ({self.agent_slots} slots)" if self.agent_slots else ""
        if self.started:
            return f"started a master at {where}{agent}; logs in {StateDir(self.home).log_dir}"
        return f"attached to the master at {where}" + (f"; started a local agent ({self.agent_slots} slots)" if agent else "")


# ---- start-up -----------------------------------------------------------------------------

def attach_or_start(state: StateDir, local_agent: bool = True, slots: int | None = None,
                    timeout: float = START_SECONDS) -> Attachment:
    """The running master of this state directory, or a new one (and a local agent) started as our children."""
    state.ensure()
    state.log_dir.mkdir(exist_ok=True)
    # One console at a time decides whether to start a master, so two never start two.
    with state.start_lock():
        record = state.console_record()
        started = False
        try:
            with Client(home=state.home) as client:
                client.hello()
                address = client.address
        except AuthFailed:
            raise
        except CorralError:
            _start_master(state, timeout)
            started = True
            record = {}
            with Client(home=state.home) as client:
                address = client.address
        master_pid = int(state.master_record().get("pid", 0))
        embedded = started or record.get("master_pid") == master_pid
        agent_pid, agent_slots = record.get("agent_pid"), None
        if local_agent and embedded and not (agent_pid and _alive(agent_pid)):
            agent_slots = slots or os.cpu_count() or 1
            agent_pid = _start_agent(state, agent_slots, timeout)
        if embedded:
            state.write_console({"master_pid": master_pid, "agent_pid": agent_pid})
    return Attachment(state.home, address, master_pid, started, embedded, agent_pid, agent_slots)


def _spawn(state: StateDir, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
    """A child in its own session (a closed terminal does not take it down), output to a log."""
    env = dict(os.environ, CORRAL_HOME=str(state.home))
    with open(state.log_dir / log_name, "ab") as log:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _children[proc.pid] = proc
    return proc


def _start_master(state: StateDir, timeout: float) -> None:
    proc = _spawn(state, ["-m", "corral", "--home", str(state.home), MASTER_COMMAND], "master.log")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise CorralError(f"the master exited at start-up (code {proc.returncode}): {_tail(state, 'master.log')}",
                              f"see {state.log_dir / 'master.log'}")
        if state.master_record().get("pid") == proc.pid:
            try:
                with Client(home=state.home) as client:
                    client.hello()
                return
            except CorralError:
                pass  # listening any moment now
        if time.monotonic() > deadline:
            _terminate(proc.pid, STOP_SECONDS)
            raise CorralError(f"the master did not come up within {timeout:g}s", f"see {state.log_dir / 'master.log'}")
        time.sleep(0.02)


def _start_agent(state: StateDir, slots: int, timeout: float) -> int:
    log_name = f"agent-{LOCAL_AGENT}.log"
    proc = _spawn(state, ["-m", AGENT_MODULE, "--slots", str(slots), "--name", LOCAL_AGENT, "--started-by", "console"],
                  log_name)
    deadline = time.monotonic() + timeout
    with Client(home=state.home) as client:
        while not any(a["name"] == LOCAL_AGENT and a["pid"] == proc.pid and a["state"] == "up"
                      for a in client.agents()):
            if proc.poll() is not None:
                raise CorralError(f"the local agent exited at start-up (code {proc.returncode}): {_tail(state, log_name)}",
                                  f"see {state.log_dir / log_name}, or run with --no-local-agent")
            if time.monotonic() > deadline:
                _terminate(proc.pid, STOP_SECONDS)
                raise CorralError(f"the local agent did not register within {timeout:g}s",
                                  f"see {state.log_dir / log_name}")
            time.sleep(0.02)
    return proc.pid


def _tail(state: StateDir, log_name: str, lines: int = 3) -> str:
    try:
        text = (state.log_dir / log_name).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


# ---- stopping ---------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie child does not count: reap it)."""
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _ours(pid: int, word: str) -> bool:
    """Whether `pid` still is the corral process we started (pids get reused): `word` is one of its arguments."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return word.encode() in f.read().split(b"\0")
    except OSError:
        return False


def _terminate(pid: int, timeout: float, signals: tuple[int, ...] = (signal.SIGTERM,)) -> bool:
    """Send each signal in turn, giving each `timeout` to work; SIGKILL last. True if it is gone."""
    for sig in (*signals, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                _children.pop(pid, None)
                return True
            time.sleep(0.05)
    return not _alive(pid)


def stop_embedded(state: StateDir, timeout: float = STOP_SECONDS) -> list[str]:
    """Stop the local agent (drain, then hard stop) and the master a console started; what was done, as lines."""
    record = state.console_record()
    done = []
    agent_pid = record.get("agent_pid")
    if agent_pid and _alive(agent_pid) and _ours(agent_pid, AGENT_MODULE):
        # First SIGTERM drains (unstarted jobs go back to the queue); the second kills running jobs,
        # which the journal still holds as running, so they run again next time.
        _terminate(agent_pid, timeout / 2, (signal.SIGTERM, signal.SIGTERM))
        done.append(f"stopped the local agent (pid {agent_pid})")
    master_pid = record.get("master_pid")
    if master_pid and _alive(master_pid) and _ours(master_pid, MASTER_COMMAND):
        _terminate(master_pid, timeout)
        done.append(f"stopped the master (pid {master_pid})")
    state.clear_console()
    return done
