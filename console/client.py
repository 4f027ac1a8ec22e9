"""Client: the one way to talk to a master, for the console, the CLI and Python users."""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing import AuthenticationError
from multiprocessing.managers import RemoteError
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, cast

from corral.agent.connection import Backoff, call, drop, open_proxy
from corral.agent.errors import CorralError
from corral.agent.protocol import CODE_TYPEID, SCHEDULER_TYPEID, JobSpec, JobState, pack_specs

from . import ship as shipping
from .batches import batch_name, in_batch
from .callables import Call, describe
from .deploy import DEPLOY_TYPEID
from .errors import AuthFailed, JobFailed, MapTimeout, MasterUnreachable
from .master.validate import Checked, check, poll_rule
from . import values as values_
from .state import StateDir

SUBMIT_BATCH = 10_000  # jobs per submit() round trip
SUBMIT_BYTES = 16 * 1024 * 1024  # ... or about this many bytes of commands and arguments
WAIT_POLL_SECONDS = 1.0  # each wait() call on the master is a long poll this long
SHIPPED_SECONDS = 60.0  # how long a bundle the master said it holds is taken as still there (it may evict)
# Deadlines (corral/agent/connection.py): a call the master has not answered by then is abandoned and its
# connection dropped; the next call makes a new one. A call's deadline is its own long poll plus the margin.
CALL_MARGIN_SECONDS = 15.0
SUBMIT_SECONDS = 60.0  # a submission of SUBMIT_BATCH jobs, journaled (fsync'd, maybe) before the answer
# A waiting call (wait(), map()) outlives a master that stops answering or restarts for this long:
# it reconnects with back-off and asks again (asking again is harmless: they only look).
RECOVER_SECONDS = 120.0


Record = dict[str, Any]  # a job, agent, status or operation as the master sends it (see the README's JSON section)
Outcome = tuple[int, str, int | None, bytes | None, str | None]  # (id, state, exit_code, value, error)


def _last_words(text: str, limit: int = 200) -> str:
    """The last line of an error's text that says something (not a rule of dashes), bounded: it may be
    the master's, or a peer's, of any size."""
    said = [line.strip() for line in text[-10_000:].splitlines() if line.strip(" -\t")]
    last = said[-1] if said else "(no message)"
    return last if len(last) <= limit else last[: limit - 1] + "…"


class Client:
    """A connection to one master. Use one Client per thread (a proxy is not shared across threads).

    >>> with Client() as c:
    ...     ids = c.submit([JobSpec(command="echo hi")])
    ...     c.wait(ids)
    """

    def __init__(self, home: Path | None = None, address: tuple[str, int] | None = None,
                 authkey: bytes | None = None, values: values_.Policy = values_.TRUST) -> None:
        """`values`: how callables' return values (pickled by agents) are read: "trust" (pickle.loads: whoever
        runs an agent can run code here, as a multiprocessing worker could), "plain" (plain data only), or
        a list of the classes also allowed ("module.Name", or the classes themselves)."""
        self._values = values_.Reader(values)
        self.state = StateDir(home)
        self._shipped: dict[str, float] = {}  # code bundles the master said it holds -> when it said so
        self._code_proxy: Any = None
        self._fixed_address = address  # else the state directory's master.json, read again to reconnect
        self.address = address or self.state.master_address()
        self._authkey = authkey or self.state.authkey()
        self._deploy: Any = None  # the deploy service's proxy, made on first use (most clients never deploy)
        self._connect()

    def _connect(self) -> None:
        """A scheduler proxy (one connection to make it, within CONNECT_SECONDS; then one kept per thread)."""
        self._deploy = self._code_proxy = None
        where = f"{self.address[0]}:{self.address[1]}"
        try:
            # Making it is a round trip: a master that does not answer is said here, at once.
            self._scheduler: Any = open_proxy(self.address, self._authkey, SCHEDULER_TYPEID)
        except AuthenticationError:
            raise AuthFailed(f"the master at {where} refused our authkey ({self.state.authkey_path})",
                             "use the authkey file of that master's state directory") from None
        except TimeoutError as exc:  # connected, but the handshake went unanswered (agent/connection.py)
            raise MasterUnreachable(str(exc), "is that master paused or overloaded? try again, or restart it") from None
        except (ConnectionError, OSError, EOFError) as exc:
            raise MasterUnreachable(f"no master answers at {where} ({exc})",
                                    "start one with `corral master` (or just `corral`)") from None

    def _reconnect(self) -> None:
        """After a lost connection: the master again (it may have restarted on another port), new proxies."""
        self.close()
        if self._fixed_address is None:
            self.address = self.state.master_address()
        self._connect()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Proxies to one address share a per-thread connection (BaseProxy._address_to_local), the
        # scheduler's and the deploy service's alike: close it and forget it, so another Client in this
        # thread reconnects instead of failing. multiprocessing has no public way to do this.
        drop(self._scheduler)

    def _lost(self, exc: BaseException) -> MasterUnreachable:
        return MasterUnreachable(f"lost the master at {self.address[0]}:{self.address[1]} ({exc})",
                                 "is it still running? `corral status`")

    def _call(self, method: str, *args: Any, seconds: float = CALL_MARGIN_SECONDS) -> Any:
        return self._invoke(self._scheduler, method, args, seconds)

    def _invoke(self, proxy: Any, method: str, args: tuple[Any, ...], seconds: float = CALL_MARGIN_SECONDS) -> Any:
        """One call on a master proxy, answered within `seconds` (else its connection is dropped and the next
        call makes a new one); its failures become the client's errors (one line each)."""
        try:
            return call(proxy, method, seconds, *args)
        except CorralError:
            raise
        except RemoteError as exc:  # the master's own traceback, framed by rules of dashes: its last words
            raise CorralError(f"the master failed on {method}(): {_last_words(str(exc))}",
                              "see the master's log (logs/master.log)") from None
        except (ConnectionError, OSError, EOFError) as exc:
            raise self._lost(exc) from None
        except Exception as exc:  # noqa: BLE001 - an argument that does not pickle here, a builtin error the
            # master raised (managers sends those back as they are): one line too, never a traceback
            raise CorralError(f"{method}() failed: {type(exc).__name__}: {_last_words(str(exc))}",
                              "a bad argument to the call, or a bug: see the master's log") from None

    def _patiently(self, method: str, *args: Any, seconds: float) -> Any:
        """A call that only looks (a wait): a master that stops answering, or goes away, for less than
        RECOVER_SECONDS is waited for, reconnecting with back-off, and the call is made again."""
        backoff = Backoff()
        give_up = time.monotonic() + RECOVER_SECONDS
        while True:
            try:
                return self._call(method, *args, seconds=seconds)
            except MasterUnreachable:
                if time.monotonic() > give_up:
                    raise
            while True:
                time.sleep(backoff.next())
                try:
                    self._reconnect()
                    break
                except AuthFailed:
                    raise  # another master now, not ours: waiting will not bring ours back
                except CorralError:  # refused, not answering, no master.json yet (a restart under way)
                    if time.monotonic() > give_up:
                        raise

    # ---- submitting ---------------------------------------------------------------------

    def submit(self, specs: Iterable[JobSpec | Record]) -> list[int]:
        """Queue jobs; returns their ids once the master has journaled them. Each spec is checked here
        by the master's own rules (BadJobSpec naming the job and the field), before anything is sent:
        one far over a limit would not even reach the master whole (it drops a message over
        MAX_MESSAGE_BYTES)."""
        ids: list[int] = []
        batch: list[Checked] = []
        size = 0
        for spec in specs:
            checked = check(spec, f"job {len(ids) + len(batch) + 1}")
            batch.append(checked)
            # Keep each message well under the master's cap on what it reads (MAX_MESSAGE_BYTES).
            size += len(checked.payload or b"") + len(checked.command or "") + 256
            if len(batch) >= SUBMIT_BATCH or size >= SUBMIT_BYTES:
                ids += self._call("submit", pack_specs(batch), seconds=SUBMIT_SECONDS)
                batch, size = [], 0
        if batch or not ids:
            # Packed (agent.protocol.pack_specs): a few opcodes per job for the master's bounded decoder.
            ids += self._call("submit", pack_specs(batch) if batch else [], seconds=SUBMIT_SECONDS)
        return ids

    def submit_command(self, command: str, **options: Any) -> int:
        return self.submit([JobSpec(command=command, **options)])[0]

    def submit_call(self, func: str | Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                    ship: Sequence[Any] | None = None, **options: Any) -> int:
        """Queue one call of `func` (a function object or a "module:function" name); its code is shipped
        when agents cannot import it (see prepare_call)."""
        call, options = self.prepare_call(func, ship, options)
        payload = pickle.dumps(call.args(tuple(args), dict(kwargs or {})))
        return self.submit([JobSpec(func=call.name, payload=payload, **options)])[0]

    def map(self, func: str | Callable[..., Any], iterable: Iterable[Any], timeout: float | None = None,
            ship: Sequence[Any] | None = None, **options: Any) -> list[Any]:
        """Like Pool.map over the cluster: func(x) for each x, results in order.

        One spec travels with the payloads; a small map is submitted, run and answered in a single
        round trip. Its jobs are one batch and share one name ("map-N" unless `name` is given; no index
        per job, which would cost the master per job: Pool.map has those).
        JobFailed if a job does not end done; MapTimeout if `timeout` passes first."""
        call, options = self.prepare_call(func, ship, options)
        template = JobSpec(func=call.name, **options).to_wire()
        check(template, "map()")  # the master checks it too; a bad one is said here, before any pickling
        if call.bound or call.keywords:
            payloads = [pickle.dumps(call.args((x,))) for x in iterable]
        else:
            payloads = [pickle.dumps(((x,), {})) for x in iterable]
        if not payloads:
            return []
        template["name"] = template.get("name") or batch_name("map", self.state.home)
        deadline = None if timeout is None else time.monotonic() + timeout
        ids: list[int] = []
        outcomes: dict[int, Outcome] = {}
        for start in range(0, len(payloads), SUBMIT_BATCH):
            last = start + SUBMIT_BATCH >= len(payloads)
            new_ids, finished = self._call("submit_map", template, payloads[start : start + SUBMIT_BATCH],
                                           WAIT_POLL_SECONDS if last else 0.0, seconds=SUBMIT_SECONDS + WAIT_POLL_SECONDS)
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
            outcomes.update((row[0], row) for row in
                            self._patiently("wait_outcomes", pending, poll, seconds=poll + CALL_MARGIN_SECONDS))
        return self._unpack([outcomes[j] for j in ids])

    def submit_batch(self, template: dict[str, Any], payloads: list[bytes], wait: float = 0.0,
                     token: str | None = None) -> tuple[list[int], list[tuple[Any, ...]]]:
        """Queue one callable over pickled (args, kwargs) payloads (at most SUBMIT_BATCH): the template is a
        JobSpec's wire form, with "batch": [first index, total or None] to name the jobs "NAME [i/total]".
        `token` names this submission: sent again with the same token (its reply was lost), the master
        answers with the same ids and queues nothing. Returns (ids, outcomes of those final within `wait` seconds)."""
        check(dict(template, payload=None), "template")  # here as at the master: a function object, a bad field
        seconds = SUBMIT_SECONDS + (poll_rule(wait, "wait") or 0.0)
        if token is None:
            ids, finished = self._call("submit_map", template, payloads, wait, seconds=seconds)
        else:
            ids, finished = self._call("submit_map", template, payloads, wait, token, seconds=seconds)
        return list(ids), list(finished)

    # ---- functions as objects, and their code ---------------------------------------------

    def prepare_call(self, func: str | Callable[..., Any], ship: Sequence[Any] | None = None,
                     options: dict[str, Any] | None = None) -> tuple[Call, dict[str, Any]]:
        """The Call of `func`, and job options naming the code it needs shipped (`code`): the module of a
        function object that agents cannot import (and `ship`'s modules and folders), sent to the master once."""
        call = describe(func)
        options = dict(options or {})
        bundle = shipping.bundle_for(call, ship)
        if bundle is not None:
            self.ship(bundle)
            options["code"] = bundle.digest
        return call, options

    def ship(self, bundle: shipping.Bundle) -> None:
        """Make sure the master holds a code bundle (its answer is remembered for SHIPPED_SECONDS)."""
        said = self._shipped.get(bundle.digest)
        if said is not None and time.monotonic() - said < SHIPPED_SECONDS:
            return
        store = self._code_store()
        if self._invoke(store, "missing", ([bundle.digest],)):
            self._invoke(store, "put", (bundle.digest, bundle.data), SUBMIT_SECONDS)
        self._shipped[bundle.digest] = time.monotonic()

    def _code_store(self) -> Any:
        """A proxy for the master's code store, on this Client's manager (made on first use)."""
        if self._code_proxy is None:
            try:
                self._code_proxy = open_proxy(self.address, self._authkey, CODE_TYPEID)
            except (ConnectionError, OSError, EOFError) as exc:
                raise self._lost(exc) from None
        return self._code_proxy

    # ---- waiting and results --------------------------------------------------------------

    def wait(self, ids: Sequence[int], timeout: float | None = None) -> dict[int, str]:
        """Block until every job is final (or `timeout` passes); returns {id: state} of the final ones."""
        poll_rule(timeout)  # a number of seconds, or None (BadCall, one line); a total, so not held to MAX_POLL
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(ids)
        states: dict[int, str] = {}
        while pending:
            poll = WAIT_POLL_SECONDS
            if deadline is not None:
                poll = min(poll, deadline - time.monotonic())
                if poll <= 0:
                    break
            states.update(self._patiently("wait", pending, poll, seconds=poll + CALL_MARGIN_SECONDS))
            pending = [j for j in pending if j not in states]
        return states

    def wait_outcomes(self, ids: Sequence[int], timeout: float = WAIT_POLL_SECONDS) -> list[Outcome]:
        """Long poll: the outcomes (as outcomes() gives them) of those of `ids` final within `timeout`
        (it returns early once all of them are)."""
        poll = poll_rule(timeout)  # the master's own rule, said here before anything is sent
        return list(self._call("wait_outcomes", list(ids), timeout, seconds=(poll or 0.0) + CALL_MARGIN_SECONDS))

    def outcomes(self, ids: Sequence[int]) -> list[Outcome]:
        """(id, state, exit_code, value bytes, error) per job, in order."""
        return cast("list[Outcome]", self._call("outcomes", list(ids)))

    def values(self, ids: Sequence[int]) -> list[Any]:
        """The return values of finished callables, in order; JobFailed if one did not end done."""
        return self._unpack(self.outcomes(ids))

    def _unpack(self, outcomes: Sequence[Outcome]) -> list[Any]:
        out = []
        for job_id, state, _exit, value, error in outcomes:
            if state != JobState.DONE.value:
                raise JobFailed(f"job {job_id} ended {state}: {error}", f"see `corral show {job_id}`")
            out.append(self._values.load(value, job_id) if value is not None else None)
        return out

    # ---- looking and acting ---------------------------------------------------------------

    def job(self, job_id: int) -> Record:
        return cast(Record, self._call("job", job_id))

    def jobs(self, states: Sequence[str] | None = None, limit: int = 1000, before: int | None = None) -> list[Record]:
        """Jobs newest first; `before` an id: the page after one that ended with that id."""
        args: tuple[Any, ...] = (list(states) if states else None, limit)
        if before is not None:  # a master of before paging takes two arguments
            args += (before,)
        return cast("list[Record]", self._call("list_jobs", *args))

    def status(self) -> Record:
        return cast(Record, self._call("status"))

    def agents(self) -> list[Record]:
        return cast("list[Record]", self._call("agent_list"))

    def cancel(self, ids: Sequence[int], queued_only: bool = False) -> dict[int, str]:
        """Cancel jobs: {id: "cancelled" | "cancelling" | "already final"}. queued_only: leave running
        jobs be (their outcome is "running")."""
        outcome = self._call("cancel", list(ids), True) if queued_only else self._call("cancel", list(ids))
        return cast("dict[int, str]", outcome)

    def cancel_batch(self, name: str) -> dict[int, str]:
        """Cancel the queued and running jobs of one batch (a Pool's "pool-3": its jobs are "pool-3 [i/n]")."""
        active = self.jobs([JobState.QUEUED.value, JobState.ASSIGNED.value, JobState.RUNNING.value, JobState.HELD.value], limit=10**7)
        ids = [job["id"] for job in active if in_batch(job["name"], name)]
        return self.cancel(ids) if ids else {}

    def requeue(self, ids: Sequence[int]) -> list[int]:
        return cast("list[int]", self._call("requeue", list(ids)))

    def hello(self) -> Record:
        return cast(Record, self._call("hello"))

    # ---- the console ------------------------------------------------------------------------

    def snapshot(self, since: int = 0, views: Record | None = None) -> Record:
        """Counts, agents, rates, and the rows of the windows in `views` if anything changed since `since`
        (see Scheduler.snapshot)."""
        return cast(Record, self._call("snapshot", since, views or {}))

    # ---- SSH deployment (the master's deploy service; see console/deploy/service.py) ---------------

    def _deploy_call(self, method: str, *args: Any, seconds: float = CALL_MARGIN_SECONDS) -> Any:
        if self._deploy is None:
            try:
                self._deploy = open_proxy(self.address, self._authkey, DEPLOY_TYPEID)
            except (ConnectionError, OSError, EOFError) as exc:
                raise self._lost(exc) from None
        return self._invoke(self._deploy, method, args, seconds)

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
        return cast(str, self._deploy_call("deploy", list(aliases), opts))

    def stop_agents(self, aliases: Sequence[str], drain: bool = False, **options: Any) -> str:
        """Ask the master to stop these hosts' agents over SSH (drain: let running jobs finish first;
        otherwise they are killed and re-queued); returns an operation id."""
        options.setdefault("agent_socket", os.environ.get("SSH_AUTH_SOCK", ""))
        return cast(str, self._deploy_call("stop", list(aliases), drain, options))

    def remove_hosts(self, aliases: Sequence[str], force: bool = False) -> str:
        """Stop the hosts' agents, remove their bundles and files, drop them from corral's hosts file."""
        return cast(str, self._deploy_call("remove", list(aliases),
                                           {"force": force, "agent_socket": os.environ.get("SSH_AUTH_SOCK", "")}))

    def deploy_progress(self, op_id: str, since: int = 0, wait: float = 0.0) -> Record:
        """An operation's events after sequence `since` (long-polling up to `wait` s), each host's state
        ({alias: {state, step, message, progress 0..1, error, hint, log_tail}}), open host-key questions,
        `next` (pass it as `since`), `done`, `ok` and `failed`."""
        return cast(Record, self._deploy_call("progress", op_id, since, float(wait),
                                              seconds=max(0.0, float(wait)) + CALL_MARGIN_SECONDS))

    def answer_host_key(self, op_id: str, alias: str, fingerprint: str, accept: bool) -> bool:
        """Accept (into corral's known_hosts) or reject the unknown host key a deploy is waiting on."""
        return bool(self._deploy_call("answer_host_key", op_id, alias, fingerprint, bool(accept)))

    def follow_operation(self, op_id: str, on_event: Callable[[Record], None] | None = None,
                         poll: float = 1.0) -> Record:
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

    def ssh_links(self) -> list[Record]:
        """The SSH connections the master holds: alias, target, state, since, remote_port, reconnects, error."""
        return cast("list[Record]", self._deploy_call("links"))

    def deploy_hosts(self) -> list[Record]:
        """The inventory as the master sees it, with each host's deployment record and link state."""
        return cast("list[Record]", self._deploy_call("hosts"))
