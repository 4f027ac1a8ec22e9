"""The master's deploy service: holds the SSH links, runs deploys and stops as followable operations."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

from ..errors import DeployError
from .fleet import Operation, Report, start
from .records import Deployment, Deployments
from .registry import AgentRegistry

if TYPE_CHECKING:  # paramiko is imported only once something is deployed: the master starts fast
    from ..state import StateDir
    from .hostkeys import HostKeyQuestions, KnownHosts
    from .inventory import Host, Inventory
    from .link import Link
    from .remote import Layout

log = logging.getLogger(__name__)

KEEP_OPERATIONS = 50

# One host's part of an operation: (the operation, alias, report) -> (result, closing message), or a DeployError.
OpWork = Callable[[Operation, str, Report], tuple[dict[str, Any], str]]

# The methods clients may call through the manager; every argument and result is plain data.
EXPOSED = ("deploy", "stop", "remove", "progress", "answer_host_key", "links", "hosts")

DEPLOY_DEFAULTS: dict[str, Any] = {
    "slots": None,  # int: overrides the host's slots
    "tags": None,  # list of str: overrides the host's tags
    "direct": None,  # bool: overrides the host's direct setting
    "accept_new": False,  # accept an unknown host key (and record it in corral's known_hosts)
    "interactive": False,  # ask about an unknown host key (answer_host_key) instead of failing at once
    "ready_timeout": 30.0,
    "connect_timeout": 10.0,
    "hostkey_timeout": 300.0,  # how long an interactive question waits for its answer
    "drain_timeout": 120.0,  # an upgrade drains the old agent this long at most
    "agent_socket": "",  # the caller's SSH_AUTH_SOCK: its agent's keys are offered (the master may have none)
    "reconnect": False,  # drop the held SSH connection and connect afresh
}
STOP_DEFAULTS: dict[str, Any] = {
    "drain_timeout": None,  # None: a drain waits as long as the running jobs take
    "connect_timeout": 10.0,
    "force": False,  # remove(): forget the host even if its agent and files cannot be removed
    "agent_socket": "",
}


def _check_options(options: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise DeployError("options must be a dict")
    unknown = set(options) - set(defaults)
    if unknown:
        raise DeployError(f"unknown option(s): {', '.join(sorted(map(str, unknown)))}", f"known: {', '.join(defaults)}")
    merged = {**defaults, **{k: v for k, v in options.items() if v is not None}}
    if not isinstance(merged.get("agent_socket", ""), str):
        raise DeployError(f"agent_socket must be a path, not {merged['agent_socket']!r}")
    for key in ("accept_new", "interactive", "force", "reconnect"):
        if key in merged and not isinstance(merged[key], bool):
            raise DeployError(f"option {key} must be true or false, not {merged[key]!r}")
    for key in ("ready_timeout", "connect_timeout", "hostkey_timeout", "drain_timeout"):
        value = merged.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400):
            raise DeployError(f"option {key} must be a number of seconds, not {value!r}")
    slots = merged.get("slots")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or not 0 < slots <= 4096):
        raise DeployError(f"slots must be a whole number from 1 to 4096, not {slots!r}")
    if merged.get("direct") is not None and not isinstance(merged["direct"], bool):
        raise DeployError(f"direct must be true or false, not {merged['direct']!r}")
    if merged.get("tags") is not None:
        from .inventory import parse_tags

        if not isinstance(merged["tags"], (list, tuple)):
            raise DeployError(f"tags must be a list of text, not {merged['tags']!r}")
        merged["tags"] = parse_tags(list(merged["tags"]), "--tags")
    return merged


def _check_aliases(aliases: Any) -> list[str]:
    if not isinstance(aliases, (list, tuple)) or not aliases or not all(isinstance(a, str) for a in aliases):
        raise DeployError("give one or more host aliases", "list them with `corral hosts`")
    return list(dict.fromkeys(aliases))


def cluster_id(authkey: bytes) -> str:
    """A cluster's name on its hosts, from its authkey (which it does not reveal): two masters, two names."""
    return hashlib.sha256(b"corral cluster\0" + authkey).hexdigest()[:12]


def _connection(host: Host) -> tuple[Any, ...]:
    """The settings of a host that make its SSH connection: a change in one of them needs a new one."""
    return (host.hostname, host.port, host.user, host.identity, host.proxy_jump, host.proxy_command,
            host.identities_only, host.identity_agent, host.known_hosts, host.global_known_hosts, host.host_key_alias)


class DeployService:
    """Registered on the master's manager beside the scheduler. The SSH connections (and so the agents'
    tunnels) live here, in the long-lived master; the CLI and the console only ask and follow."""

    def __init__(self, state: StateDir, registry: AgentRegistry, master: tuple[str, int], authkey: bytes) -> None:
        self.state = state
        self.registry = registry
        self.master = master
        self.authkey = authkey
        self.lock = threading.Lock()
        self.records = Deployments(state.home)
        self.cluster = cluster_id(authkey)
        self._links: dict[str, Link] = {}
        self._jumps: dict[str, Link] = {}
        self._ops: OrderedDict[str, Operation] = OrderedDict()
        self._busy: dict[str, str] = {}  # alias -> id of the operation working on it
        self._questions: HostKeyQuestions | None = None  # made by the first deploy (it needs paramiko)
        self._seen: dict[str, Deployment] = {}  # alias -> dir and Python of its last deploy (outlives a stop)
        self._closed = threading.Event()

    # ---- the pieces, made on first use -------------------------------------------------------

    def _inventory(self) -> Inventory:
        from .inventory import Inventory

        return Inventory(self.state.home)

    def _known(self) -> KnownHosts:
        from .hostkeys import KnownHosts
        from .inventory import KNOWN_HOSTS_NAME

        return KnownHosts(self.state.home / KNOWN_HOSTS_NAME)

    def _host(self, alias: str) -> Host:
        from .inventory import Host

        try:
            return self._inventory().get(alias)
        except DeployError:
            record = self.records.get(alias)
            if record is None or not record.host:
                raise
            return Host.from_wire(record.host)  # removed from the inventory while deployed

    def _link(self, host: Host, timeout: float) -> Link:
        """The held link to this host, or a new one if there is none or its connection settings changed."""
        from .link import Link

        with self.lock:
            link = self._links.get(host.alias)
            same = link is not None and _connection(link.host) == _connection(host)
            if link is not None and same and not link.closed.is_set():
                link.host = host  # slots, tags... may have changed; the connection has not
                return link
            if link is not None:
                link.close()
            link = Link(host, self._known(), self.master, jump=self._jump_link, on_state=self._on_link_state,
                        timeout=timeout)
            self._links[host.alias] = link
            return link

    def _jump_link(self, spec: str, via: str, depth: int) -> Link:
        """The held connection to a ProxyJump hop, `[user@]host[:port]` (resolved by ssh), reached through `via`."""
        from .link import Link

        key = f"{via}>{spec}"
        with self.lock:
            link = self._jumps.get(key)
            if link is not None and not link.closed.is_set():
                return link
        host = self._inventory().hop(spec, via)
        link = Link(host, self._known(), self.master, jump=self._jump_link, depth=depth)
        with self.lock:
            self._jumps[key] = link
        return link

    def _on_link_state(self, link: Link, state: str, message: str) -> None:
        if state == "down":
            log.warning("%s: SSH link down: %s", link.host.alias, message or "connection lost")
        elif state == "up" and message:
            log.warning("%s: SSH link %s", link.host.alias, message)

    def resume(self) -> None:
        """In the background: re-open the links (and tunnel ports) of agents deployed by an earlier master."""
        if not any(r.stopped is None for r in self.records.all().values()):
            return
        threading.Thread(target=self._resume, name="deploy-resume", daemon=True).start()

    def _resume(self) -> None:
        for alias, record in self.records.all().items():
            if self._closed.is_set():
                return
            if record.stopped is not None:
                continue
            try:
                host = self._host(alias)
                link = self._link(host, 10.0)
                if record.mode == "tunnel" and record.remote_port:
                    link.remote_port = int(record.remote_port)
                link.open(message=f"re-opened after a master restart (tunnel port {link.remote_port})"
                          if link.remote_port else "re-opened after a master restart")
            except DeployError as exc:
                log.warning("%s: cannot re-open the SSH link yet: %s", alias, exc)
            except Exception:  # keep resuming the other hosts; the trace goes to the master's log
                log.exception("%s: re-opening the SSH link failed", alias)
                continue
            link.supervise()  # keeps retrying until the host is back

    def shutdown(self) -> None:
        """The master is stopping: close every SSH connection (the agents keep running and wait)."""
        self._closed.set()
        with self.lock:
            links = list(self._links.values()) + list(self._jumps.values())
            questions = self._questions
        if questions is not None:
            questions.release_all()
        for link in links:
            link.close()

    # ---- operations -----------------------------------------------------------------------------

    def _begin(self, kind: str, aliases: list[str], work: OpWork) -> str:
        op = Operation(kind, aliases)
        with self.lock:
            self._ops[op.id] = op
            while len(self._ops) > KEEP_OPERATIONS:
                old_id, old = next(iter(self._ops.items()))
                if not old.done:
                    break
                self._ops.pop(old_id)

        def guarded(alias: str, report: Report) -> tuple[dict[str, Any], str]:
            with self.lock:
                other = self._busy.get(alias)
                if other is None:
                    self._busy[alias] = op.id
            if other is not None:
                raise DeployError(f"{alias}: busy: operation {other} is still working on it",
                                  "wait for it to finish, then try again", host=alias, step="connect")
            try:
                return work(op, alias, report)
            finally:
                with self.lock:
                    self._busy.pop(alias, None)

        start(op, guarded)
        return op.id

    def _op(self, op_id: Any) -> Operation:
        with self.lock:
            op = self._ops.get(op_id) if isinstance(op_id, str) else None
        if op is None:
            raise DeployError(f"no operation {op_id!r}", "it finished long ago, or the master restarted")
        return op

    # ---- the API (plain data in, plain data out) ----------------------------------------------

    def deploy(self, aliases: list[Any], options: dict[str, Any] | None = None) -> str:
        """Deploy agents to these hosts in parallel; returns an operation id to follow with progress()."""
        aliases = _check_aliases(aliases)
        opts = _check_options(options, DEPLOY_DEFAULTS)
        for alias in aliases:
            self._host(alias)  # an unknown alias fails the whole call, before anything starts
        from .bundle import build
        from .hostkeys import AskPolicy
        from .inventory import with_overrides
        from .steps import DeployPlan, HostDeploy, deploy_host

        bundle = build()
        plan = DeployPlan(authkey=self.authkey, master=self.master, cluster=self.cluster, ready_timeout=float(opts["ready_timeout"]),
                          upgrade_drain_timeout=float(opts["drain_timeout"]))
        asking = AskPolicy(accept_new=opts["accept_new"], interactive=opts["interactive"],
                           timeout=float(opts["hostkey_timeout"]))
        questions = self._host_key_questions()

        def work(op: Operation, alias: str, report: Report) -> tuple[dict[str, Any], str]:
            host = with_overrides(self._host(alias), slots=opts["slots"],
                                  tags=tuple(opts["tags"]) if opts["tags"] is not None else None, direct=opts["direct"])
            link = self._link(host, float(opts["connect_timeout"]))
            link.agent_socket = opts["agent_socket"]
            previous = self.records.get(alias) or self._seen.get(alias)
            job = HostDeploy(link, bundle, plan, report, self.registry, reconnect=opts["reconnect"])
            result = deploy_host(job, questions.asker(op, alias, asking, report), previous)
            link.supervise()
            with self.lock:
                self._seen[alias] = Deployment(dir=result.dir, python=result.python, python_setting=host.python)
            self.records.put(alias, Deployment(host=host.to_wire(), mode=result.mode, remote_port=result.port,
                                               pid=result.pid, bundle=result.bundle, dir=result.dir,
                                               python=result.python, python_setting=host.python, deployed=time.time()))
            if result.noop:
                return result.to_wire(), f"already running (pid {result.pid}, {bundle.name}): nothing to do"
            return result.to_wire(), f"agent pid {result.pid} up ({result.mode}, {bundle.name})"

        return self._begin("deploy", aliases, work)

    def _host_key_questions(self) -> HostKeyQuestions:
        from .hostkeys import HostKeyQuestions

        with self.lock:
            if self._questions is None:
                self._questions = HostKeyQuestions()
            return self._questions

    def answer_host_key(self, op_id: str, alias: str, fingerprint: str, accept: bool) -> bool:
        """Answer an open host-key question; the fingerprint must be the one asked about."""
        op = self._op(op_id)
        if not isinstance(accept, bool):
            raise DeployError("accept must be true or false")
        return self._host_key_questions().answer(op, alias, fingerprint, accept)

    def stop(self, aliases: list[Any], drain: bool = False, options: dict[str, Any] | None = None) -> str:
        """Stop the agents on these hosts over SSH: drained (running jobs finish) or at once (killed, re-queued)."""
        aliases = _check_aliases(aliases)
        if not isinstance(drain, bool):
            raise DeployError("drain must be true or false")
        opts = _check_options(options, STOP_DEFAULTS)
        for alias in aliases:
            self._host(alias)

        def work(op: Operation, alias: str, report: Report) -> tuple[dict[str, Any], str]:
            pid = self._stop_agent(alias, drain, opts, report)
            self._drop(alias)
            return {"pid": pid, "drained": drain}, (f"agent pid {pid} {'drained and ' if drain else ''}stopped"
                                                    if pid else "no agent was running")

        return self._begin("stop", aliases, work)

    def remove(self, aliases: list[Any], options: dict[str, Any] | None = None) -> str:
        """Stop the agent, remove its bundle and files, and drop the host from corral's hosts file."""
        aliases = _check_aliases(aliases)
        opts = _check_options(options, STOP_DEFAULTS)
        for alias in aliases:
            self._host(alias)

        def work(op: Operation, alias: str, report: Report) -> tuple[dict[str, Any], str]:
            from .remote import remove_files

            deployed = self.records.get(alias) is not None or alias in self._links  # running, or stopped: files remain
            pid = 0
            if deployed:
                try:
                    pid = self._stop_agent(alias, False, opts, report)
                    link = self._links[alias]
                    directory, _ = self._running(link)
                    if directory:
                        remove_files(link, directory, self._layout(link).bundles if self._layout(link).shared else "")
                    report("remove", "ok", f"removed the bundle and files from {directory or link.host.remote_dir}")
                except DeployError as exc:
                    if not opts["force"]:
                        raise DeployError(exc.message, f"{exc.hint}; or forget the host anyway with --force".lstrip("; "),
                                          host=alias, step=exc.step) from None
                    report("remove", "info", f"ignored (--force): {exc.message}")
            else:
                report("remove", "skip", "nothing deployed there")
            self._drop(alias, forget=True)
            self._forget(alias, report)
            return {"pid": pid}, "removed"

        return self._begin("remove", aliases, work)

    def _layout(self, link: Link) -> Layout:
        from .remote import Layout

        return Layout.of(link.host, self.cluster)

    def _running(self, link: Link) -> tuple[str, int]:
        from .remote import running_agent

        return running_agent(link, self._layout(link), "stop")

    def _stop_agent(self, alias: str, drain: bool, opts: dict[str, Any], report: Report) -> int:
        from .remote import stop_remote

        host = self._host(alias)
        link = self._link(host, float(opts["connect_timeout"]))
        link.agent_socket = opts["agent_socket"]
        if link.ensure(note=lambda text: report("auth", "info", text)):
            report("connect", "ok", host.target)
        directory, pid = self._running(link)
        if not pid:
            report("stop", "skip", "no agent is running there")
            self.registry.retire_agent(alias, "stopped (it was not running)")
            return 0
        if drain:
            self.registry.drain_agent(alias)
        last = [0.0]

        def tick() -> None:
            now = time.monotonic()
            if drain and now - last[0] >= 2.0:
                last[0] = now
                busy = next((a["busy"] for a in self.registry.agent_list() if a["name"] == alias), 0)
                report("stop", "info", f"draining: {busy} job(s) still running")

        stop_remote(link, pid, drain, report, opts["drain_timeout"], tick)
        if directory:
            link.remove([f"{directory}/agent.pid"], "stop")
        self.registry.retire_agent(alias, "drained and stopped by the operator" if drain else "stopped by the operator")
        report("stop", "ok", f"agent pid {pid} is gone" + ("" if drain else "; its jobs went back to the queue"))
        return pid

    def _drop(self, alias: str, forget: bool = False) -> None:
        """No agent there any more: close the link (and its tunnel). The record stays, marked stopped (what
        is left on the host, for remove(), and the Python to try first next time), unless `forget`."""
        with self.lock:
            link = self._links.pop(alias, None)
        if link is not None:
            link.close()
        if forget:
            self.records.drop(alias)
        else:
            self.records.mark_stopped(alias, time.time())

    def _forget(self, alias: str, report: Report) -> None:
        inventory = self._inventory()
        if any(e.alias == alias for e in inventory.entries()):
            inventory.remove(alias)
            report("remove", "ok", f"dropped from {inventory.hosts_path}")
        else:
            report("remove", "skip", f"{alias} is not in corral's hosts file (it comes from {inventory.config_path})")

    def progress(self, op_id: str, since: int = 0, wait: float = 0.0) -> dict[str, Any]:
        """Events of an operation after `since`, long-polling up to `wait` seconds; hosts' states; questions."""
        if isinstance(since, bool) or not isinstance(since, int) or isinstance(wait, bool) or not isinstance(wait, (int, float)):
            raise DeployError("progress() takes an operation id, a sequence number and seconds to wait")
        return self._op(op_id).snapshot(since, wait)

    def links(self) -> list[dict[str, Any]]:
        """The SSH connections the master holds: alias, target, state, tunnel port, reconnects, last error."""
        with self.lock:
            links = list(self._links.values())
        return sorted((link.wire() for link in links), key=lambda w: w["alias"])

    def hosts(self) -> list[dict[str, Any]]:
        """The inventory, each host with what the master knows of it (deployed, link state)."""
        deployed = {alias: record.to_json() for alias, record in self.records.all().items()}
        with self.lock:
            states = {alias: link.state for alias, link in self._links.items()}
        out = []
        for host in self._inventory().hosts():
            wire = host.to_wire()
            wire["deployed"] = deployed.get(host.alias)  # with "stopped" (a time) once its agent was stopped
            wire["link"] = states.get(host.alias, "")
            out.append(wire)
        return out
