"""What agents hand in is data: a fake agent reports forged values (a pickle that runs a command, one whose
class does not import here, plain data) to a real master; show, wait, show --json, the console detail and a
restricted Client never run them, and say what they are in one line."""

from __future__ import annotations

import datetime
import os
import pickle
import time
from pathlib import Path
from typing import Iterator

import pytest

from corral.agent.protocol import AgentInfo, JobResult, JobSpec
from corral.agent.runner import connect as agent_connect
from corral.console.client import Client
from corral.console.errors import JobFailed
from corral.console.executor import Executor
from corral.console.pool import Pool
from corral.console.tui.app import CorralApp
from corral.console.tui.screens.detail import JobDetailScreen
from corral.console.values import ValueRefused, ValueUnreadable
from tests.cluster import Cluster
from tests.test_tui_app import SIZE, loaded, main, select, until

# A class whose module exists nowhere: what an agent with other code on its path could hand in.
UNIMPORTABLE = b"\x80\x04\x8c\x12no_such_module_xyz\x94\x8c\x05Thing\x94\x93\x94)\x81\x94."


class RunsCode:
    """Unpickling this runs a shell command: what a compromised agent host hands in as a value."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


@pytest.fixture
def forged(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Cluster, Path, dict[str, int]]]:
    """(cluster, marker, {kind: job id}): callables done by a fake agent with forged values; marker is the
    file the code in the forged one would create."""
    marker = tmp_path / "ran"
    values = {"evil": pickle.dumps(RunsCode(f"touch {marker}")), "evil0": pickle.dumps(RunsCode(f"touch {marker}"), 0),
              "unimportable": UNIMPORTABLE, "plain": pickle.dumps({"answer": 42, "tags": ("a", "b")})}
    authkey = (cluster.home / "authkey").read_bytes().strip()
    fake = agent_connect(cluster.address(), authkey)
    info = AgentInfo(name="fake", host="compromised", pid=1, slots=len(values), tags=("fake",))
    session = fake.register(info.to_wire(), [])["session"]
    with cluster.client() as c:
        ids = dict(zip(values, c.submit([JobSpec(func="tests.jobs:inc", payload=pickle.dumps(((1,), {})),
                                                 tags=("fake",)) for _ in values])))
        tasks, _ = fake.take(session, len(values), 10.0)
        assert sorted(t[0] for t in tasks) == sorted(ids.values())
        now = time.time()
        rows = [tuple(JobResult(job_id=ids[kind], attempt=1, state="done", exit_code=0, value=value,
                                started=now, ended=now + 0.1)) for kind, value in values.items()]
        fake.report(session, rows, [], 0)
        assert set(c.wait(list(ids.values()), timeout=30).values()) == {"done"}
    yield cluster, marker, ids
    assert not marker.exists(), "a forged value ran"


def test_show_wait_and_json_never_run_a_forged_value(forged: tuple[Cluster, Path, dict[str, int]]) -> None:
    cluster, marker, ids = forged
    for kind in ("evil", "evil0"):
        shown = cluster.corral("show", str(ids[kind]))
        assert shown.returncode == 0 and "value     <pickled posix.system, " in shown.stdout, shown
        waited = cluster.corral("wait", str(ids[kind]))
        assert waited.returncode == 0 and waited.stdout.startswith("<pickled posix.system, "), waited
        as_json = cluster.corral("show", str(ids[kind]), "--json")
        assert as_json.returncode == 0 and '"value": "<pickled posix.system, ' in as_json.stdout, as_json
    assert "<pickled no_such_module_xyz.Thing, 37 bytes>" in cluster.corral("show", str(ids["unimportable"])).stdout
    assert "value     {'answer': 42, 'tags': ('a', 'b')}" in cluster.corral("show", str(ids["plain"])).stdout
    # A tuple inside: not JSON, so its repr (plain data, read by the master's unpickler).
    assert "\"value\": \"{'answer': 42, 'tags': ('a', 'b')}\"" in cluster.corral("show", str(ids["plain"]), "--json").stdout
    assert not marker.exists()


def test_a_restricted_client_refuses_in_one_line(forged: tuple[Cluster, Path, dict[str, int]]) -> None:
    cluster, marker, ids = forged
    with Client(home=cluster.home, values="plain") as plain:
        assert plain.values([ids["plain"]]) == [{"answer": 42, "tags": ("a", "b")}]
        for kind in ("evil", "evil0"):
            with pytest.raises(ValueRefused, match=f"job {ids[kind]}'s value is a pickled posix.system, ") as refused:
                plain.values([ids[kind]])
            assert "\n" not in str(refused.value) and "values='plain'" in str(refused.value)
    with Client(home=cluster.home, values=["datetime.date"]) as allowing:
        with pytest.raises(ValueRefused, match="plain data and the classes it lists only"):
            allowing.values([ids["evil"]])
    # Trusting the agents (the default, as multiprocessing trusts its workers) still makes a class that
    # does not import here one line, not a traceback.
    with Client(home=cluster.home) as trusting:
        with pytest.raises(ValueUnreadable, match="pickled no_such_module_xyz.Thing, 37 bytes that does not import"):
            trusting.values([ids["unimportable"]])
    with pytest.raises(Exception, match="values must be 'trust', 'plain' or a list of classes"):
        Client(home=cluster.home, values="everything")
    assert not marker.exists()


async def test_console_detail_never_runs_a_forged_value(forged: tuple[Cluster, Path, dict[str, int]]) -> None:
    cluster, marker, ids = forged
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        for kind, expected in (("evil", "<pickled posix.system, "), ("unimportable", "<pickled no_such_module_xyz.Thing"),
                               ("plain", "{'answer': 42")):
            await select(pilot, main(app).finished_pane, ids[kind])
            await pilot.press("enter")
            detail = app.screen
            assert isinstance(detail, JobDetailScreen)
            await until(pilot, lambda: detail.record and detail.record["id"] == ids[kind], "the record")
            await pilot.pause(0.1)
            assert f"value     {expected}" in str(detail.query_one("#detail-text").render()), kind
            await pilot.press("escape")
    assert not marker.exists()


def test_pool_and_executor_take_the_same_policy(cluster: Cluster) -> None:
    """Values of real jobs: a date (not plain data) and a raised ValueError, under each policy."""
    cluster.start_agent("a", slots=2)
    with Pool(home=cluster.home) as trusting:
        assert trusting.apply("tests.jobs:a_date", (2020,)) == datetime.date(2020, 1, 2)
        with pytest.raises(ValueError, match="kaboom"):
            trusting.apply("tests.jobs:boom", ("kaboom",))
    with Pool(home=cluster.home, values="plain") as plain:
        assert plain.apply("tests.jobs:inc", (41,)) == 42
        with pytest.raises(ValueRefused, match="pickled datetime.date, .*values='plain'"):
            plain.apply("tests.jobs:a_date", (2020,))
        # The exception's class is refused too: it is raised as JobFailed, with its message.
        with pytest.raises(JobFailed, match="kaboom"):
            plain.apply("tests.jobs:boom", ("kaboom",))
    with Executor(home=cluster.home, values=["datetime.date"]) as allowing:
        assert allowing.submit("tests.jobs:a_date", 1999).result(timeout=60) == datetime.date(1999, 1, 2)
