"""Textual messages: past tense for facts that arrived (JobsSubmitted), imperative for requests (SubmitJobs)."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from corral.agent.protocol import JobSpec

# ---- facts: from the worker threads, to the app ---------------------------------------


class SnapshotArrived(Message):
    """The master's latest snapshot, and the views it answered."""

    def __init__(self, snapshot: dict[str, Any], views: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.views = views


class MasterLost(Message):
    """The master stopped answering (or none answers at all); the poller keeps trying."""

    def __init__(self, message: str, address: tuple[str, int] | None = None, since: float = 0.0) -> None:
        super().__init__()
        self.message = message
        self.address = address  # the master last answered there (None: it never did)
        self.since = since  # when the poller found it gone (time.time())


class MasterFound(Message):
    """The master answers (again)."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__()
        self.address = address


class JobsSubmitted(Message):
    def __init__(self, ids: list[int]) -> None:
        super().__init__()
        self.ids = ids


class JobsCancelled(Message):
    def __init__(self, outcome: dict[int, str]) -> None:
        super().__init__()
        self.outcome = outcome


class JobsRequeued(Message):
    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        super().__init__()
        self.pairs = pairs


class JobLoaded(Message):
    """One job's full record (spec, attempts, output), for its detail screen."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__()
        self.record = record


class DeployHostsLoaded(Message):
    """The inventory as the master sees it (Client.deploy_hosts()), for the deploy modal."""

    def __init__(self, hosts: list[dict[str, Any]]) -> None:
        super().__init__()
        self.hosts = hosts


class OperationProgressed(Message):
    """A deploy or stop operation's latest progress (Client.deploy_progress(): events, hosts, questions, done)."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        super().__init__()
        self.snapshot = snapshot


# ---- requests: from screens and widgets, handled by the app or the main screen ---------


class LoadDeployHosts(Message):
    """Fetch the inventory, then open the deploy modal."""


class DeployAgents(Message):
    def __init__(self, aliases: list[str], slots: int | None, tags: list[str] | None) -> None:
        super().__init__()
        self.aliases = aliases
        self.slots = slots
        self.tags = tags


class StopAgents(Message):
    """Stop these hosts' agents over SSH; `drain`: let their running jobs finish first."""

    def __init__(self, aliases: list[str], drain: bool) -> None:
        super().__init__()
        self.aliases = aliases
        self.drain = drain


class AnswerHostKey(Message):
    def __init__(self, op_id: str, alias: str, fingerprint: str, accept: bool) -> None:
        super().__init__()
        self.op_id = op_id
        self.alias = alias
        self.fingerprint = fingerprint
        self.accept = accept


class SubmitJobs(Message):
    def __init__(self, specs: list[JobSpec]) -> None:
        super().__init__()
        self.specs = specs


class CancelJobs(Message):
    def __init__(self, ids: list[int]) -> None:
        super().__init__()
        self.ids = ids


class RequeueJobs(Message):
    def __init__(self, ids: list[int]) -> None:
        super().__init__()
        self.ids = ids


class LoadJob(Message):
    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id


class WatchViews(Message):
    """The windows the tables show changed: ask the master for these from now on."""

    def __init__(self, views: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.views = views


class WindowMoved(Message):
    """A table scrolled, resized or changed its filter: its window on the master's view moved."""
