"""Real clusters for tests: a master and agents as subprocesses on loopback, in a temporary state directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from corral.console.client import Client

from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent


class Cluster:
    """A master process plus any number of agent processes sharing one state directory."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.master: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, CORRAL_HOME=str(home), PYTHONPATH=str(REPO))
        self.logs = home / "test-logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def corral(self, *args: str, timeout: float = 60, check: bool = False, input: str | None = None) -> subprocess.CompletedProcess:
        """Run the real `corral` CLI (as `python -m corral`) against this cluster."""
        return subprocess.run([sys.executable, "-m", "corral", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, check=check, input=input)

    def start_master(self, *args: str) -> subprocess.Popen:
        master_json = self.home / "master.json"
        if master_json.exists():
            master_json.unlink()
        log = open(self.logs / "master.log", "ab")
        self.master = subprocess.Popen([sys.executable, "-m", "corral", "master", *args], env=self.env,
                                       cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: master_json.exists() or self.master.poll() is not None, what="master.json")
        assert self.master.poll() is None, (self.logs / "master.log").read_text()
        return self.master

    def address(self) -> tuple[str, int]:
        record = json.loads((self.home / "master.json").read_text())
        return record["host"], record["port"]

    def start_agent(self, name: str, slots: int = 2, tags: str = "", *extra: str, wait: bool = True,
                    verbose: bool = True) -> subprocess.Popen:
        log = open(self.logs / f"agent-{name}.log", "ab")
        args = [sys.executable, "-m", "corral.agent", *(["-v"] if verbose else []), "--name", name, "--slots", str(slots), *extra]
        if tags:
            args += ["--tags", tags]
        proc = subprocess.Popen(args, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.agents[name] = proc
        if wait:
            with self.client() as c:
                wait_until(lambda: any(a["name"] == name and a["state"] == "up" and a["pid"] == proc.pid
                                     for a in c.agents()), what=f"agent {name} to register")
        return proc

    def client(self) -> Client:
        return Client(home=self.home)

    def agent_log(self, name: str) -> str:
        return (self.logs / f"agent-{name}.log").read_text(errors="replace")

    def agent_exit(self, name: str, timeout: float) -> int:
        """The agent's exit status once it exits; if it is still there after `timeout`, AssertionError with
        its log and every thread's stack (SIGUSR2: agent/runner.py) to say where it is stuck."""
        proc = self.agents[name]
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR2)
            time.sleep(1)
            raise AssertionError(f"agent {name} still runs after {timeout:g}s; its log and stacks:\n"
                                 + self.agent_log(name)[-20000:]) from None

    def stop(self) -> None:
        procs = list(self.agents.values()) + ([self.master] if self.master else [])
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if proc is not self.master else signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
