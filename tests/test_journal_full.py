"""A full disk under the master, for real: the state directory on a small tmpfs of the test's own, filled
up while jobs run, then freed. The master never exits and keeps its master.json; a submission is refused
in one line and queues nothing; results that cannot be journaled stay with the agent and are handed in
again; `corral status` says the journal is failing; once there is room, everything heals by itself.
Asserted from the journal file: every job one final outcome, nothing running, each ran exactly once."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from corral.agent.protocol import JobSpec
from tests.cluster import Cluster, wait_until
from tests.faultkit import alive, journal_outcomes, kill_pids, processes_of

BIG = 64 * 1024  # what one job prints on each stream: the tail an attempt keeps, so its result is large


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted for this test (root only; CI runs as root and forbids the skip)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs as root with CORRAL_NO_SKIPS=1")
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        kill_pids(processes_of(mount / "home"))
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(path: Path) -> int:
    """Write zeros into `path` until the file system says ENOSPC; how many bytes went in."""
    written = 0
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = bytes(chunk)
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return written


def test_full_disk_under_the_master_heals_by_itself(tmp_path: Path, small_fs: Path) -> None:
    home, runs, ended = small_fs / "home", tmp_path / "runs", tmp_path / "ended"
    cluster = Cluster(home)
    cluster.logs = tmp_path / "logs"  # the test's own logs stay off the full disk
    cluster.logs.mkdir()
    db = home / "corral.db"
    try:
        master = cluster.start_master("--lease", "3")
        record = (home / "master.json").read_text()
        cluster.start_agent("a", slots=4)
        with cluster.client() as c:
            # Four jobs, one per slot, that end while the disk is full, each with a large result.
            job = (f'echo "$CORRAL_JOB_ID $CORRAL_ATTEMPT" >> {runs}; sleep 4; head -c {BIG} /dev/zero | tr "\\0" o;'
                   f' head -c {BIG} /dev/zero | tr "\\0" e >&2; echo $CORRAL_JOB_ID >> {ended}')
            first = c.submit([JobSpec(command=job) for _ in range(4)])
            wait_until(lambda: runs.exists() and len(runs.read_text().splitlines()) == 4, timeout=60,
                     what="the four jobs to start")
            # ... and the master to have journaled their starts (a taken job is assigned until then).
            wait_until(lambda: all(c.job(j)["state"] == "running" for j in first), timeout=60,
                     what="the master to know the four jobs running")
            wal = Path(f"{db}-wal")
            # SQLite reuses its WAL file's own pages: each result alone must be larger, or it might go in.
            assert wal.stat().st_size < 2 * BIG, "the WAL has room for a result: it might not be refused"

            filled = fill(small_fs / "filler")
            assert filled > 0

            # A submission is refused in one line, with the journal's path, and queues nothing.
            refused = cluster.corral("submit", "--count", "200", "--", "echo after " + "x" * 2000)
            assert refused.returncode == 1, refused
            assert refused.stderr.splitlines() == [refused.stderr.strip()], refused.stderr
            assert refused.stderr.startswith(f"corral submit: journal write failed: database or disk is full ({db})")
            status = cluster.corral("status")
            assert status.returncode == 0 and "JOURNAL FAILING" in status.stdout, status
            journal = json.loads(cluster.corral("status", "--json").stdout)["journal"]
            assert journal["ok"] is False and "database or disk is full" in journal["error"], journal

            # The jobs end; their results cannot be journaled: the agent keeps them and asks again.
            wait_until(lambda: "could not journal our" in cluster.agent_log("a"), timeout=60,
                     what="the agent to be refused its results")
            wait_until(lambda: ended.exists() and len(ended.read_text().split()) == 4, timeout=60,
                     what="all four jobs to end on the agent")
            time.sleep(4)  # longer than the lease, every report refused meanwhile
            assert all(c.job(j)["state"] == "running" for j in first)  # memory as the journal: not ended
            assert master.poll() is None and (home / "master.json").read_text() == record
            assert {a["name"]: a["state"] for a in c.agents()} == {"a": "up"}  # its heartbeats still count

            # Room again: the results go in, the journal heals, and a submission goes through.
            (small_fs / "filler").unlink()
            assert c.wait(first, timeout=60) == {j: "done" for j in first}
            wait_until(lambda: c.status()["journal"]["ok"], timeout=30, what="the journal to be reported healthy")
            later = c.submit([JobSpec(command=f'echo "$CORRAL_JOB_ID $CORRAL_ATTEMPT" >> {runs}') for _ in range(20)])
            assert later[0] == first[-1] + 1  # the refused submission used no ids
            assert c.wait(later, timeout=60) == {j: "done" for j in later}
            shown = c.job(first[0])["attempt_list"]
            assert [len(a["stdout"]) for a in shown] == [BIG], "the result handed in late is the whole result"
        listed = json.loads(cluster.corral("jobs", "--json").stdout)
        assert {j["id"]: j["state"] for j in listed} == {j: "done" for j in first + later}
        assert master.poll() is None and (home / "master.json").read_text() == record
        assert "journal write failed: database or disk is full" in (cluster.logs / "master.log").read_text()
    finally:
        cluster.stop()
    journal_outcomes(db, first + later, states=("done",))
    ran = runs.read_text().split()
    assert sorted(zip(map(int, ran[::2]), ran[1::2])) == [(j, "1") for j in first + later], "a job ran twice"
    assert not alive(master.pid)


async def test_console_says_the_journal_is_failing_and_when_it_heals(tmp_path: Path, small_fs: Path) -> None:
    """The console on a master whose disk is full: its header says so, a submission from its form is
    refused in one line and the console carries on; freed, the header is clear again."""
    from corral.console.tui.app import CorralApp
    from corral.console.tui.screens.main import MainScreen
    from corral.console.tui.widgets.stats import StatsHeader
    from textual.widgets import Input

    from tests.test_tui_app import SIZE, errors, loaded, until

    cluster = Cluster(small_fs / "home")
    cluster.logs = tmp_path / "logs"
    cluster.logs.mkdir()
    try:
        master = cluster.start_master()
        app = CorralApp(home=cluster.home)
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            header = app.main.query_one(StatsHeader)
            assert "journal failing" not in header.status_text().plain
            fill(small_fs / "filler")
            await pilot.press("n")
            # Two MB of jobs: more than any room SQLite's WAL file may still have (it reuses its own pages).
            app.screen.query_one("#count", Input).value = "1000"
            app.screen.query_one("#command", Input).value = "echo " + "x" * 2000
            await pilot.press("enter")
            await until(pilot, lambda: any("journal write failed: database or disk is full" in e for e in errors(app)),
                        "the refused submission's line")
            await until(pilot, lambda: "journal failing" in header.status_text().plain, "the header to say so")
            assert app.is_running and isinstance(app.screen, MainScreen) and master.poll() is None
            (small_fs / "filler").unlink()
            await until(pilot, lambda: "journal failing" not in header.status_text().plain, "the header to clear")
            assert "master up" in header.status_text().plain
    finally:
        cluster.stop()


def test_pool_waits_out_a_full_disk_and_queues_each_task_once(tmp_path: Path, small_fs: Path) -> None:
    """A Pool.map submitted while the master's disk is full is refused, sent again under its token while
    the disk stays full, and queued once when there is room: the map returns every value, no task twice."""
    import threading

    from corral import Pool

    home = small_fs / "home"
    cluster = Cluster(home)
    cluster.logs = tmp_path / "logs"
    cluster.logs.mkdir()
    db = home / "corral.db"
    try:
        cluster.start_master()
        cluster.start_agent("a", slots=4)
        # 200 jobs of 2 kB: far more than the room SQLite's WAL file may still have. The function is the
        # standard library's (len), so no code is shipped: the submission itself meets the full disk.
        items = ["p" * (2000 + i) for i in range(200)]
        assert Path(f"{db}-wal").stat().st_size < 200 * 1000
        fill(small_fs / "filler")
        got: dict[str, object] = {}

        def run_map() -> None:
            try:
                with Pool(home=home) as pool:
                    got["values"] = pool.map(len, items, chunksize=1)
            except Exception as exc:  # noqa: BLE001 - the test reports it
                got["error"] = exc

        mapper = threading.Thread(target=run_map, daemon=True)
        mapper.start()
        log = cluster.logs / "master.log"
        wait_until(lambda: "journal write failed: database or disk is full" in log.read_text(), timeout=60,
                 what="the map's submission to be refused")
        time.sleep(3)  # refused and sent again a few times
        with cluster.client() as c:
            assert c.status()["counts"]["queued"] == 0 and not c.status()["journal"]["ok"], got
        (small_fs / "filler").unlink()
        mapper.join(timeout=120)
        assert not mapper.is_alive(), "the map did not end"
        assert "error" not in got, got.get("error")
        assert got["values"] == [2000 + i for i in range(200)]
    finally:
        cluster.stop()
    journal_outcomes(db, range(1, 201), states=("done",))


def test_a_call_the_masters_host_refuses_is_one_line_not_a_lost_master(tmp_path: Path, cluster: Cluster) -> None:
    """An OSError inside a served call (here the code store's directory is gone, a file in its place) is
    the caller's one CorralError line: never mistaken for a broken connection, and the master serves on."""
    from corral.agent.errors import CorralError
    from corral.console import ship
    from corral.console.callables import describe
    from corral.console.errors import MasterUnreachable
    from tests.shipkit import import_from, write_module

    write_module(tmp_path, "refused_mod", "def f():\n    return 1\n")
    bundle = ship.bundle_for(describe(import_from(tmp_path, "refused_mod").f))
    assert bundle is not None
    shipped = cluster.home / "shipped"
    shipped.rmdir()
    shipped.write_text("not a directory")
    with cluster.client() as c:
        with pytest.raises(CorralError) as caught:
            c.ship(bundle)
        assert not isinstance(caught.value, MasterUnreachable), caught.value
        assert str(caught.value.message).startswith("the master could not do it: Not a directory"), caught.value
        assert "\n" not in str(caught.value)
        assert c.status()["journal"]["ok"]  # the same connection serves on
    assert cluster.master is not None and cluster.master.poll() is None
