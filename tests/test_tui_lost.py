"""The console shows what faults did: a lost agent in Workers, a lost job in Finished, and why in its detail."""

from __future__ import annotations

import signal
from pathlib import Path

from corral.console.tui.app import CorralApp
from corral.console.tui.screens.detail import JobDetailScreen
from tests.cluster import Cluster
from tests.test_tui_app import SIZE, loaded, main, row_of, select, until


async def test_lost_agent_and_lost_job_with_the_reason(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "home")
    # A short lease so the agent is declared lost quickly; --max-lost 0: the first loss ends the job.
    cluster.start_master("--lease", "1.5", "--max-lost", "0")
    try:
        agent = cluster.start_agent("doomed", slots=1)
        with cluster.client() as c:
            job = c.submit([{"command": "sleep 60", "name": "victim"}])[0]
        app = CorralApp(home=cluster.home)
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            dispatched, finished, workers = main(app).dispatched_pane, main(app).finished_pane, main(app).workers_pane
            await until(pilot, lambda: (r := row_of(dispatched, job)) and r[2] == "running", "the job running")
            agent.send_signal(signal.SIGKILL)
            await until(pilot, lambda: any(r[0] == "doomed" and r[2] == "lost" for r in workers.rows),
                        "the agent shown lost in Workers")
            await until(pilot, lambda: (r := row_of(finished, job)) and r[2] == "lost", "the job shown lost in Finished")
            await select(pilot, finished, job)
            await pilot.press("enter")
            detail = app.screen
            assert isinstance(detail, JobDetailScreen)
            await until(pilot, lambda: detail.record and detail.record["state"] == "lost", "the detail's record")
            text = str(detail.query_one("#detail-text").render())
            assert "its agent was lost 1 time" in text and "agent doomed lost" in text
    finally:
        cluster.stop()


async def test_the_detail_lists_the_lost_attempt_and_the_one_that_ran_after(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "home")
    cluster.start_master("--lease", "1.5")
    try:
        agent = cluster.start_agent("doomed", slots=1, tags="x")
        with cluster.client() as c:
            job = c.submit([{"command": "sleep 2; echo second", "name": "survivor", "tags": ["x"]}])[0]
        app = CorralApp(home=cluster.home)
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            dispatched, finished = main(app).dispatched_pane, main(app).finished_pane
            await until(pilot, lambda: (r := row_of(dispatched, job)) and r[2] == "running" and r[4] == "doomed",
                        "the job running on doomed")
            agent.send_signal(signal.SIGKILL)
            agent.wait(timeout=30)
            cluster.start_agent("rescuer", slots=1, tags="x")
            await until(pilot, lambda: (r := row_of(finished, job)) and r[2] == "done", "the job done on rescuer",
                        timeout=60)
            await select(pilot, finished, job)
            await pilot.press("enter")
            detail = app.screen
            assert isinstance(detail, JobDetailScreen)
            await until(pilot, lambda: detail.record and detail.record["state"] == "done", "the detail's record")
            text = str(detail.query_one("#detail-text").render())
            assert "attempt 1 on doomed: lost" in text and "why: agent doomed lost: silent for" in text
            assert "attempt 2 on rescuer: done" in text and "second" in text
            assert "superseded" not in text
        shown = cluster.corral("show", str(job))
        assert shown.returncode == 0 and "attempt 1 on doomed: lost" in shown.stdout, shown
        assert "attempt 2 on rescuer: done" in shown.stdout
    finally:
        cluster.stop()
