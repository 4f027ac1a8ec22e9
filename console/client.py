"""Client: the one way to talk to a master, for the console, the CLI and Python users."""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing import AuthenticationError
from multiprocessing.managers import BaseManager, RemoteError
from pathlib import Path
from typing import Any, Iterable, Sequence

from corral.agent.connection import SERIALIZER
from corral.agent.errors import BadJobSpec, CorralError
from corral.agent.protocol import MAX_PAYLOAD_BYTES, SCHEDULER_TYPEID, JobSpec, JobState

from .errors import AuthFailed, JobFailed, MapTimeout, MasterUnreachable
from .state import StateDir

SUBMIT_BATCH = 10_000  # jobs per submit() round trip
SUBMIT_BYTES = 16 * 1024 * 1024  # ... or about this many bytes of commands and arguments
WAIT_POLL_SECONDS = 1.0  # each wait() call on the master is a long poll this long


class _ClientManager(BaseManager):
    pass


_ClientManager.register(SCHEDULER_TYPEID)


def _spec_wire(spec: JobSpec | dict) -> dict:
    return spec.to_wire() if isinstance(spec, JobSpec) else spec


class Client:
    """A connection to one master. Use one Client per thread (a proxy is not shared across threads).

    >>> with Client() as c:
    ...     ids = c.submit([JobSpec(command="echo hi")])
    ...     c.wait(ids)
    """

    def __init__(self, home: Path | None = None, address: tuple[str, int] | None = None,
                 authkey: bytes | None = None) -> None:
        self.state = StateDir(home)
        self.address = address or self.state.master_address()
        key = authkey or self.state.authkey()
        manager = _ClientManager(address=self.address, authkey=key, serializer=SERIALIZER)
        where = f"{self.address[0]}:{self.address[1]}"
        try:
            manager.connect()
            self._scheduler = getattr(manager, SCHEDULER_TYPEID)()
        except AuthenticationError:
            raise AuthFailed(f"the master at {where} refused our authkey ({self.state.authkey_path})",
                             "use the authkey file of that master's state directory") from None
        except (ConnectionError, OSError, EOFError) as exc:
            raise MasterUnreachable(f"no master answers at {where} ({exc})",
                                    "start one with `corral master` (or just `corral`)") from None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Proxies to one address share a per-thread connection (BaseProxy._address_to_local):
        # close it and forget it, so another Client in this thread reconnects instead of failing.
        tls = getattr(self._scheduler, "_tls", None)
        conn = getattr(tls, "connection", None)
        if conn is not None:
            conn.close()
            del tls.connection

    def _call(self, method: str, *args: Any) -> Any:
        return self._invoke(self._scheduler, method, args)

    def _invoke(self, proxy: Any, method: str, args: tuple) -> Any:
        """One call on a master proxy; its failures become the client's errors (one line each)."""
        try:
            return getattr(proxy, method)(*args)
        except CorralError:
            raise
        except RemoteError as exc:
            raise CorralError(f"the master failed on {method}(): {str(exc).strip().splitlines()[-1]}") from None
        except (ConnectionError, OSError, EOFError) as exc:
            raise MasterUnreachable(f"lost the master at {self.address[0]}:{self.address[1]} ({exc})",
                                    "is it still running? `corral status`") from None

    # ---- submitting ---------------------------------------------------------------------

    def submit(self, specs: Iterable[JobSpec | dict]) -> list[int]:
        """Queue jobs; returns their ids once the master has journaled them."""
        ids: list[int] = []
        batch: list[dict] = []
        size = 0
        for spec in specs:
            wire = _spec_wire(spec)
            batch.append(wire)
            # Keep each message well under the master's cap on what it reads (MAX_MESSAGE_BYTES).
            if isinstance(wire, dict):
                job_bytes = len(wire.get("payload") or b"") + len(wire.get("command") or "")
                if job_bytes > MAX_PAYLOAD_BYTES:
                    # The master refuses it too, but one far over its limit would not even reach it
                    # whole (it drops a message over MAX_MESSAGE_BYTES): say so here, send nothing more.
                    raise BadJobSpec(f"job {len(ids) + len(batch)}: the job is {job_bytes} bytes;"
                                     f" the limit is {MAX_PAYLOAD_BYTES}", "pass large data by path, not by value")
                size += job_bytes + 256
            if len(batch) >= SUBMIT_BATCH or size >= SUBMIT_BYTES:
                ids += self._call("submit", batch)
                batch, size = [], 0
        if batch or not ids:
            ids += self._call("submit", batch)
        return ids

    def submit_command(self, command: str, **options: Any) -> int:
        return self.submit([JobSpec(command=command, **options)])[0]

    def submit_call(self, func: str, args: Sequence[Any] = (), kwargs: dict | None = None, **options: Any) -> int:
        payload = pickle.dumps((tuple(args), dict(kwargs or {})))
        return self.submit([JobSpec(func=func, payload=payload, **options)])[0]

    def map(self, func: str, iterable: Iterable[Any], timeout: float | None = None, **options: Any) -> list[Any]:
        """Like Pool.map over the cluster: func(x) for each x, results in order.

        One spec travels with the payloads; a small map is submitted, run and answered in a single
        round trip. JobFailed if a job does not end done; MapTimeout if `timeout` passes first."""
        template = JobSpec(func=func, **options).to_wire()
        payloads = [pickle.dumps(((x,), {})) for x in iterable]
        if not payloads:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        ids: list[int] = []
        outcomes: dict[int, tuple] = {}
        for start in range(0, len(payloads), SUBMIT_BATCH):
            last = start + SUBMIT_BATCH >= len(payloads)
            new_ids, finished = self._call("submit_map", template, payloads[start : start + SUBMIT_BATCH],
                                           WAIT_POLL_SECONDS if last else 0.0)
            ids += new_ids
            outcomes.update((row[0], row) for row in finished)
        while len(outcomes) < len(ids):
            poll = WAIT_POLL_SECONDS
            if deadline is not None:
                poll = min(poll, deadline - time.monotonic())
                if poll <= 0:
                    raise MapTimeout(f"{len(ids) - len(outcomes)} of {len(ids)} jobs still not final after {timeout:g}s",
                                     "they keep running; see `corral jobs`")
            pending = [j for j in ids if j not in outcomes]
            outcomes.update((row[0], row) for row in self._call("wait_outcomes", pending, poll))
        return self._unpack([outcomes[j] for j in ids])

    # ---- waiting and results --------------------------------------------------------------

    def wait(self, ids: Sequence[int], timeout: float | None = None) -> dict[int, str]:
        """Block until every job is final (or `timeout` passes); returns {id: state} of the final ones."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(ids)
        states: dict[int, str] = {}
        while pending:
            poll = WAIT_POLL_SECONDS
            if deadline is not None:
                poll = min(poll, deadline - time.monotonic())
                if poll <= 0:
                    break
            states.update(self._call("wait", pending, poll))
            pending = [j for j in pending if j not in states]
        return states

    def outcomes(self, ids: Sequence[int]) -> list[tuple]:
        """(id, state, exit_code, value bytes, error) per job, in order."""
        return self._call("outcomes", list(ids))

    def values(self, ids: Sequence[int]) -> list[Any]:
        """The return values of finished callables, in order; JobFailed if one did not end done."""
        return self._unpack(self.outcomes(ids))

    @staticmethod
    def _unpack(outcomes: Sequence[tuple]) -> list[Any]:
        out = []
        for job_id, state, _exit, value, error in outcomes:
            if state != JobState.DONE.value:
                raise JobFailed(f"job {job_id} ended {state}: {error}", f"see `corral show {job_id}`")
            out.append(pickle.loads(value) if value is not None else None)
        return out

    # ---- looking and acting ---------------------------------------------------------------

    def job(self, job_id: int) -> dict:
        return self._call("job", job_id)

    def jobs(self, states: Sequence[str] | None = None, limit: int = 1000) -> list[dict]:
        return self._call("list_jobs", list(states) if states else None, limit)

    def status(self) -> dict:
        return self._call("status")

    def agents(self) -> list[dict]:
        return self._call("agent_list")

    def cancel(self, ids: Sequence[int]) -> dict[int, str]:
        return self._call("cancel", list(ids))

    def requeue(self, ids: Sequence[int]) -> list[int]:
        return self._call("requeue", list(ids))

    def hello(self) -> dict:
        return self._call("hello")

    # ---- the console ------------------------------------------------------------------------

    def snapshot(self, since: int = 0, views: dict | None = None) -> dict:
        """Counts, agents, rates, and the rows of the windows in `views` if anything changed since `since`
        (see Scheduler.snapshot)."""
        return self._call("snapshot", since, views or {})

    # ---- SSH deployment (the master's deploy service; see console/deploy/service.py) ---------------

    def _deployer(self) -> Any:
        """A proxy for the master's deploy service, on this Client's manager (made on first use)."""
        proxy = getattr(self, "_deploy_proxy", None)
        if proxy is None:
            from .deploy import DEPLOY_TYPEID

            manager = getattr(self._scheduler, "_manager", None)
            if manager is None or not hasattr(manager, DEPLOY_TYPEID):
                manager = _DeployClientManager(address=self.address, authkey=bytes(self._scheduler._authkey),
                                               serializer=SERIALIZER)
                manager.connect()
            try:
                proxy = getattr(manager, DEPLOY_TYPEID)()
            except (ConnectionError, OSError, EOFError) as exc:
                raise MasterUnreachable(f"lost the master at {self.address[0]}:{self.address[1]} ({exc})",
                                        "is it still running? `corral status`") from None
            self._deploy_proxy = proxy
        return proxy

    def _deploy_call(self, method: str, *args: Any) -> Any:
        return self._invoke(self._deployer(), method, args)

    def deploy(self, aliases: Sequence[str], slots: int | None = None, tags: Sequence[str] | None = None,
               accept_new: bool = False, direct: bool | None = None, interactive: bool = False,
               **options: Any) -> str:
        """Ask the master to deploy agents to these hosts; returns an operation id (follow it with
        deploy_progress or follow_operation). interactive=True: an unknown host key becomes a question
        (answer_host_key) instead of a failure. Other options: ready_timeout, connect_timeout,
        hostkey_timeout, drain_timeout (seconds)."""
        opts = dict(options, slots=slots, tags=list(tags) if tags is not None else None, accept_new=accept_new,
                    direct=direct, interactive=interactive)
        opts.setdefault("agent_socket", os.environ.get("SSH_AUTH_SOCK", ""))  # our agent's keys, not the master's
        return self._deploy_call("deploy", list(aliases), opts)

    def stop_agents(self, aliases: Sequence[str], drain: bool = False, **options: Any) -> str:
        """Ask the master to stop these hosts' agents over SSH (drain: let running jobs finish first;
        otherwise they are killed and re-queued); returns an operation id."""
        options.setdefault("agent_socket", os.environ.get("SSH_AUTH_SOCK", ""))
        return self._deploy_call("stop", list(aliases), drain, options)

    def remove_hosts(self, aliases: Sequence[str], force: bool = False) -> str:
        """Stop the hosts' agents, remove their bundles and files, drop them from corral's hosts file."""
        return self._deploy_call("remove", list(aliases), {"force": force, "agent_socket": os.environ.get("SSH_AUTH_SOCK", "")})

    def deploy_progress(self, op_id: str, since: int = 0, wait: float = 0.0) -> dict:
        """An operation's events after sequence `since` (long-polling up to `wait` s), each host's state
        ({alias: {state, step, message, progress 0..1, error, hint, log_tail}}), open host-key questions,
        `next` (pass it as `since`), `done`, `ok` and `failed`."""
        return self._deploy_call("progress", op_id, since, float(wait))

    def answer_host_key(self, op_id: str, alias: str, fingerprint: str, accept: bool) -> bool:
        """Accept (into corral's known_hosts) or reject the unknown host key a deploy is waiting on."""
        return self._deploy_call("answer_host_key", op_id, alias, fingerprint, bool(accept))

    def follow_operation(self, op_id: str, on_event: Any = None, poll: float = 1.0) -> dict:
        """Call on_event(event) for each event of an operation as it happens; return its final snapshot."""
        since = 0
        while True:
            snap = self.deploy_progress(op_id, since, poll)
            if on_event is not None:
                for event in snap["events"]:
                    on_event(event)
            since = snap["next"]
            if snap["done"]:
                return snap

    def ssh_links(self) -> list[dict]:
        """The SSH connections the master holds: alias, target, state, since, remote_port, reconnects, error."""
        return self._deploy_call("links")

    def deploy_hosts(self) -> list[dict]:
        """The inventory as the master sees it, with each host's deployment record and link state."""
        return self._deploy_call("hosts")

    def deploy_operations(self) -> list[dict]:
        """The master's recent deploy/stop/remove operations."""
        return self._deploy_call("operations")


class _DeployClientManager(BaseManager):
    pass


def _register_deploy() -> None:
    from .deploy import DEPLOY_TYPEID

    _ClientManager.register(DEPLOY_TYPEID)
    _DeployClientManager.register(DEPLOY_TYPEID)


_register_deploy()
