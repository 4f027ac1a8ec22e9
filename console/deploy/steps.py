"""One host's deploy, one function per step: connect → hostkey → auth → python → upload → tunnel → authkey →
start → ready. Each reports its progress and raises a DeployError naming itself when it fails."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import DeployError, HostKeyUnknown
from .bundle import Bundle
from .fleet import Report
from .link import MAX_HOPS, Link
from .records import Deployment
from .registry import AgentRegistry, registered
from .remote import FoundPython, Launch, Layout, Probe, alive, choose_python, log_tail, probe, quick_look, start_agent, stop_remote

log = logging.getLogger(__name__)

# The steps an agent already running as asked makes unnecessary.
_NOTHING_TO_DO = ("upload", "tunnel", "authkey", "start")


@dataclass(frozen=True)
class DeployPlan:
    """What one deploy asks of every host (plain values, from the caller's options)."""

    authkey: bytes
    master: tuple[str, int]
    cluster: str = ""  # the cluster's name on its hosts (service.cluster_id): its files are apart from others'
    ready_timeout: float = 30.0
    upgrade_drain_timeout: float = 120.0


@dataclass(frozen=True)
class Deployed:
    """What a deploy left running on the host (or found running there, `noop`)."""

    pid: int
    port: int | None  # the tunnel's port on the host (None in direct mode)
    mode: str  # "tunnel" or "direct"
    bundle: str  # the bundle's short hash
    dir: str
    python: str
    noop: bool

    def to_wire(self) -> dict[str, Any]:
        return {"pid": self.pid, "port": self.port, "mode": self.mode, "bundle": self.bundle, "dir": self.dir,
                "python": self.python, "noop": self.noop}


@dataclass
class HostDeploy:
    """Everything one host's deploy works with; the steps below take it."""

    link: Link
    bundle: Bundle
    plan: DeployPlan
    report: Report
    registry: AgentRegistry
    reconnect: bool = False  # replace the held connection with a new one

    @property
    def alias(self) -> str:
        return self.link.host.alias

    @property
    def layout(self) -> Layout:
        return Layout.of(self.link.host, self.plan.cluster)

    @property
    def mode(self) -> str:
        return "direct" if self.link.host.direct else "tunnel"

    def launch(self, python: str, connect: str = "") -> Launch:
        host = self.link.host
        return Launch(python=python, bundle=self.bundle.name, name=host.alias, slots=host.slots, tags=host.tags,
                      started_by=f"ssh:{self.mode}", connect=connect)

    def deployed(self, pid: int, directory: str, python: str, noop: bool) -> Deployed:
        return Deployed(pid=pid, port=self.link.remote_port if self.mode == "tunnel" else None, mode=self.mode,
                        bundle=self.bundle.short, dir=directory, python=python, noop=noop)


def deploy_host(job: HostDeploy, ask_host_key: Callable[[HostKeyUnknown], bool],
                previous: Deployment | None = None) -> Deployed:
    """connect → hostkey → auth → python → upload → tunnel → authkey → start → ready, reporting each step.

    `previous` is what the master recorded of its last deploy there (dir, python): with it, an agent
    already running as asked is recognised over SFTP alone, and the Python chosen then is tried first.
    An agent running there with another bundle or settings is drained (the registry told first) and
    replaced. Raises DeployError naming the failing step.
    """
    connect(job, ask_host_key)
    if previous is not None:
        unchanged = already_running(job, previous)
        if unchanged is not None:
            return unchanged
    found, python = find_python(job, previous)
    directory = found.dir
    adopted = adopt_running(job, found, python)
    if adopted is not None:
        return adopted
    replace_running(job, found)
    upload(job, found, directory)
    dial = tunnel(job)
    authkey(job, directory)
    pid = start(job, directory, job.launch(python.executable, dial), found.bundle_dir)
    ready(job, pid, directory, kill_on_fail=True)
    tidy(job, found, directory)
    return job.deployed(pid, directory, python.executable, noop=False)


def connect(job: HostDeploy, ask_host_key: Callable[[HostKeyUnknown], bool]) -> None:
    """connect, hostkey, auth: the held link if it still answers (and no reconnect was asked); else a new
    connection (through the jump hosts, if any), asking about each unknown host key on the way."""
    link, host = job.link, job.link.host
    fresh = job.reconnect
    if link.active() and not fresh:
        if link.healthy():
            for step in ("connect", "hostkey", "auth"):
                job.report(step, "skip", f"the master already holds a connection to {host.target}")
            return
        job.report("connect", "info", "the held connection no longer answers: connecting afresh")
        fresh = True
    route = f" via {host.proxy_jump}" if host.proxy_jump else (f" via `{host.proxy_command}`" if host.proxy_command else "")
    job.report("connect", "start", f"{host.target}{route}")
    for _ in range(MAX_HOPS + 1):  # at most one question per host on the way: the jump hosts, then this one
        try:
            opened = link.open if fresh else link.ensure  # open() replaces a held connection under the link's lock
            opened(on_tcp=lambda: job.report("connect", "ok", f"{host.hostname}:{host.port} answers"),
                   note=lambda text: job.report("auth", "info", text))
            break
        except HostKeyUnknown as exc:
            if not ask_host_key(exc):
                raise
            link.known.add(exc.host_id, exc.key_type, exc.key_base64)
    job.report("hostkey", "ok", f"known: {link.known.holder(host)}")
    job.report("auth", "ok", f"as {host.user}")


def already_running(job: HostDeploy, previous: Deployment) -> Deployed | None:
    """The quick path: the agent deployed last time still runs exactly as asked (read over SFTP alone)."""
    host = job.link.host
    if not (previous.dir and previous.python and previous.python_setting == host.python):
        return None
    pid, argv = quick_look(job.link, previous.dir, "python")
    running = Launch.parse(argv) if pid else None
    if running is None or not job.launch(previous.python).same_agent(running) or not dials_us(job, running):
        return None
    job.report("python", "skip", f"agent pid {pid} runs on {running.python}")
    for step in _NOTHING_TO_DO:
        job.report(step, "skip", f"agent pid {pid} already runs {job.bundle.name}")
    ready(job, pid, previous.dir, kill_on_fail=False)
    return job.deployed(pid, previous.dir, previous.python, noop=True)


def find_python(job: HostDeploy, previous: Deployment | None) -> tuple[Probe, FoundPython]:
    """python: one round trip finds the interpreters, and tells of the remote dir, its bundles and any agent."""
    host = job.link.host
    job.report("python", "start", host.python or "looking for python3 (3.8+)")
    found = probe(job.link, job.layout, host.python, hint="" if host.python or previous is None else previous.python)
    python = choose_python(host, found)
    job.report("python", "ok", f"Python {python.version} at {python.executable}")
    if found.dir_error or not found.dir:
        raise DeployError.at(host.alias, "upload",
                             f"cannot use the remote directory {host.remote_dir} ({found.dir_error or 'no answer'})",
                             "set the host's remote_dir to a writable directory")
    if found.owner and job.plan.cluster and found.owner != job.plan.cluster:
        raise DeployError.at(host.alias, "upload", f"the remote directory {found.dir} belongs to another corral "
                             f"cluster ({found.owner})", "give this host a remote_dir of its own "
                             f"(`corral hosts add {host.alias} --remote-dir ... --replace`), or the default one")
    return found, python


def adopt_running(job: HostDeploy, found: Probe, python: FoundPython) -> Deployed | None:
    """An agent found running as asked (no record of it: a master that lost its records) is kept."""
    running = Launch.parse(found.argv) if found.pid else None
    pythons = tuple(p.executable for p in found.pythons)
    if running is None or not job.launch(python.executable).same_agent(running, pythons) or not dials_us(job, running):
        return None
    for step in _NOTHING_TO_DO:
        job.report(step, "skip", f"agent pid {found.pid} already runs {job.bundle.name}")
    ready(job, found.pid, found.dir, kill_on_fail=False)
    return job.deployed(found.pid, found.dir, python.executable, noop=True)


def replace_running(job: HostDeploy, found: Probe) -> None:
    """An agent of another bundle or other settings runs there: drain it (the registry gives it no more work)."""
    if not found.pid:
        return
    running = Launch.parse(found.argv)
    why = "a new bundle" if running is None or running.bundle != job.bundle.name else "new settings"
    job.report("upload", "info", f"upgrading agent pid {found.pid} ({why}): draining it first")
    job.registry.drain_agent(job.alias)
    stop_remote(job.link, found.pid, True, job.report, job.plan.upgrade_drain_timeout)
    job.registry.retire_agent(job.alias, f"replaced by a new deploy ({why})")  # frees its name for the new one


def upload(job: HostDeploy, found: Probe, directory: str) -> None:
    """upload: the bundle, unless that very one (by its hash) is there already."""
    if job.bundle.name in found.bundles:
        job.report("upload", "skip", f"{job.bundle.name} is already there")
        return
    where = found.bundle_dir or directory
    job.report("upload", "start", f"{job.bundle.name} ({len(job.bundle.data) // 1024} KiB) to {where}")
    job.link.put(job.bundle.data, f"{where}/{job.bundle.name}", "upload")
    job.report("upload", "ok", f"{where}/{job.bundle.name}")


def tunnel(job: HostDeploy) -> str:
    """tunnel: the address the agent is to dial, the reverse tunnel's end on the host (or, --direct, the master)."""
    link, master = job.link, job.plan.master
    if job.mode == "direct":
        address = direct_address(link, job.plan)
        job.report("tunnel", "skip", f"--direct: the agent dials the master at {address}")
        return address
    if link.remote_port is None:
        link.forward(0)
    job.report("tunnel", "ok", f"{job.alias}'s 127.0.0.1:{link.remote_port} → master {master[0]}:{master[1]}")
    return f"127.0.0.1:{link.remote_port}"


def authkey(job: HostDeploy, directory: str) -> None:
    """authkey: a 0600 file in the cluster's directory, never on a command line (and the marker of whose it is)."""
    if job.plan.cluster:
        job.link.put(job.plan.cluster.encode() + b"\n", f"{directory}/cluster", "authkey", mode=0o600)
    job.link.put(job.plan.authkey + b"\n", f"{directory}/authkey", "authkey", mode=0o600)
    job.report("authkey", "ok", f"{directory}/authkey (0600)")


def start(job: HostDeploy, directory: str, launch: Launch, bundle_dir: str) -> int:
    """start: the agent, detached from the SSH session; its pid."""
    pid = start_agent(job.link, directory, launch, bundle_dir)
    job.report("start", "ok", f"pid {pid}")
    return pid


def ready(job: HostDeploy, pid: int, directory: str, kill_on_fail: bool) -> None:
    """ready, the handshake: the agent has registered with the master. It dying, or the timeout, is a failure."""
    link, alias, timeout = job.link, job.alias, job.plan.ready_timeout
    job.report("ready", "start", f"waiting up to {timeout:g}s for agent pid {pid} to register")
    started = time.monotonic()
    next_check = started + 0.5
    while not registered(job.registry, alias, pid):
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.5
            if not alive(link, pid, "ready"):
                raise DeployError.at(alias, "ready", f"the agent (pid {pid}) exited before it said ready",
                                     f"see its log, {directory}/agent.log", log_tail=log_tail(link, directory))
        if now - started > timeout:
            tail = log_tail(link, directory)
            if kill_on_fail:
                link.sh(f"kill -KILL {pid} 2>/dev/null; true", "ready", timeout=10)
            raise DeployError.at(alias, "ready", f"the agent (pid {pid}) never said ready within {timeout:g}s",
                                 f"see its log, {directory}/agent.log", log_tail=tail)
        time.sleep(0.05)
    job.report("ready", "ok", f"agent {alias} (pid {pid}) registered in {time.monotonic() - started:.2f}s")


def tidy(job: HostDeploy, found: Probe, directory: str) -> None:
    """The new agent is up: the bundles of earlier versions go (shared ones stay: another cluster may run them)."""
    if job.layout.shared:
        return
    stale = [b for b in found.bundles if b != job.bundle.name]
    if stale:
        job.link.remove([f"{directory}/{b}" for b in stale], "ready")


# ---- where the agent dials ------------------------------------------------------------------------

def dials_us(job: HostDeploy, running: Launch) -> bool:
    """Whether the running agent dials where it should (re-opening its tunnel port if we lost it)."""
    link = job.link
    if job.mode == "direct":
        return running.connect == direct_address(link, job.plan)
    host, _, port = running.connect.rpartition(":")
    if host != "127.0.0.1" or not port.isdigit():
        return False
    if link.remote_port == int(port):
        return True
    if link.remote_port is None:
        try:
            link.forward(int(port))
            return True
        except DeployError as exc:
            log.info("%s: cannot re-open tunnel port %s: %s", job.alias, port, exc)
    return False


def _is_loopback(name: str) -> bool:
    return name == "localhost" or name.startswith("127.") or name == "::1"


def direct_address(link: Link, plan: DeployPlan) -> str:
    """With --direct: the master's address as the host is to dial it."""
    host, port = plan.master
    if host in ("0.0.0.0", "::", ""):
        transport = link.transport
        sock = transport.sock if transport is not None else None
        if not isinstance(sock, socket.socket):  # through a jump host: our own address means nothing there
            raise DeployError.at(link.host.alias, "tunnel", f"--direct cannot tell the host how to reach a master "
                                 f"listening on {host or 'every address'} (the host is reached through a jump host)",
                                 "start the master with --listen on an address the host can reach, or deploy without --direct")
        host = sock.getsockname()[0]  # our address on the route to that host
    elif _is_loopback(host) and not _is_loopback(link.host.hostname):
        raise DeployError.at(link.host.alias, "tunnel",
                             f"--direct needs a master the host can reach, but it listens on {host} only",
                             "start it with `corral master --listen 0.0.0.0:PORT --allow-remote`, or deploy without --direct")
    return f"{host}:{port}"
