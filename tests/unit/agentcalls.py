"""The calls an agent makes on the scheduler, as agent/runner.py makes them: for tests of the master in-process."""

from __future__ import annotations

from typing import Any

from corral.agent.protocol import PROTOCOL_VERSION, RELEASED, AgentInfo, JobResult, Task
from corral.console.master.scheduler import Scheduler


def register(s: Scheduler, name: str = "alpha", slots: int = 4, tags: tuple[str, ...] = (),
             running: list[tuple[int, int]] | None = None, instance: str = "") -> str:
    """An agent joins, as agent/runner.py registers: its session."""
    info = AgentInfo(name=name, host="host-" + name, pid=100, slots=slots, tags=tags, python="3.11",
                     started_by="test", protocol=PROTOCOL_VERSION, instance=instance or name + "-1")
    return str(s.register(info.to_wire(), list(running or []))["session"])


def take(s: Scheduler, session: str, want: int = 100) -> list[Task]:
    """What an agent takes, named as the agent names it."""
    tasks, _cancel = s.take(session, want, 0)
    return [Task._make(t) for t in tasks]


def result(task: Task, state: str = "done", exit_code: int | None = 0, **fields: Any) -> tuple[Any, ...]:
    """A JobResult for a task, as the plain tuple an agent sends (a release, as agent.pool.released()
    makes it: unstarted unless `started` says otherwise)."""
    unstarted = state == RELEASED
    fields.setdefault("started", 0.0 if unstarted else 100.0)
    fields.setdefault("ended", 0.0 if unstarted else 101.0)
    for label in ("stdout", "stderr"):  # output crosses as bytes, with how much the stream held in all
        if isinstance(fields.get(label), str):
            fields[label] = fields[label].encode()
        fields.setdefault(f"{label}_total", len(fields.get(label, b"")))
    return tuple(JobResult(task.job_id, task.attempt, state, exit_code, **fields))


def start(s: Scheduler, session: str, tasks: list[Task], when: float = 100.0) -> None:
    """The agent says these tasks started (a heartbeat's `began`): assigned until then, running from now."""
    s.report(session, [], [], 0, began=[(t.job_id, t.attempt, when) for t in tasks])
