"""The console's deploy modal, per-host progress, host-key modal, and stop/drain keys, against real sshd hosts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Label, ProgressBar, SelectionList

from corral.console.deploy import STEPS
from corral.console.tui.app import CorralApp
from corral.console.tui.screens.confirm import ConfirmScreen
from corral.console.tui.screens.deploy import DeployScreen
from corral.console.tui.screens.hostkey import HostKeyScreen
from corral.console.tui.screens.main import MainScreen
from corral.console.tui.screens.progress import DeployProgressScreen
from scripts.sshlab import SshLab
from tests.cluster import Cluster, wait_until
from tests.test_deploy import add_hosts, agent, alive, deploy, remote_pid
from tests.test_tui_app import errors, until

pytestmark = pytest.mark.sshd

SIZE = (120, 36)
DEPLOY_TIMEOUT = 90.0


def fingerprint(host_root: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(host_root / "hostkey.pub")], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def workers_row(app: CorralApp, name: str) -> tuple | None:
    return next((r for r in app.main.workers_pane.rows if r[0] == name), None)


async def open_deploy(pilot: Pilot, app: CorralApp) -> DeployScreen:
    await until(pilot, lambda: app.main.workers_pane.loaded, "the first snapshot")
    await pilot.press("d")
    return await until(pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen, "the deploy modal")


def progress_of(app: CorralApp) -> DeployProgressScreen:
    return next(s for s in app.screen_stack if isinstance(s, DeployProgressScreen))


def bar(screen: DeployProgressScreen, alias: str) -> ProgressBar:
    return screen.query_one(f"#bar-{screen.aliases.index(alias)}", ProgressBar)


def status(screen: DeployProgressScreen, alias: str) -> str:
    return str(screen.query_one(f"#status-{screen.aliases.index(alias)}", Label).render())


async def test_deploy_modal_deploys_to_two_hosts_with_per_host_progress(ssh_cluster: Cluster, lab: SshLab,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"), ("h2", "127.0.0.3", "blue"))
    # Every snapshot the progress screen is shown, as its bars and lines showed it (the real show() runs).
    shown: dict[str, list[tuple[float, str]]] = {"h1": [], "h2": []}
    real_show = DeployProgressScreen.show

    def recording(screen: DeployProgressScreen, snapshot: dict) -> None:
        real_show(screen, snapshot)
        for alias in shown:
            shown[alias].append((bar(screen, alias).progress, status(screen, alias)))

    monkeypatch.setattr(DeployProgressScreen, "show", recording)
    app = CorralApp(home=ssh_cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        modal = await open_deploy(pilot, app)
        listed = modal.query_one("#hosts", SelectionList)
        assert [listed.get_option_at_index(i).value for i in range(listed.option_count)] == ["h1", "h2"]
        # Nothing picked: enter says so, inline, and sends nothing.
        await pilot.press("enter")
        assert isinstance(app.screen, DeployScreen)
        assert "pick one or more hosts" in str(modal.query_one("#hosts-error", Label).render())
        await pilot.press("space", "down", "space", "tab")
        assert modal.picked() == ["h1", "h2"]
        await pilot.press("3", "enter")
        screen = await until(pilot, lambda: isinstance(app.screen, DeployProgressScreen) and app.screen, "progress")
        assert screen.aliases == ["h1", "h2"]
        await until(pilot, lambda: screen.done, "the deploy to finish", DEPLOY_TIMEOUT)
        for alias in ("h1", "h2"):
            # Each bar stepped forward through the deploy, never back, and each line named the steps.
            values = [p for p, _ in shown[alias]]
            assert values == sorted(values), (alias, values)
            assert len({p for p in values if 0 < p < 1}) >= 3, (alias, values)
            steps = [line.split(":")[0] for _, line in shown[alias] if line.split(":")[0] in STEPS]
            assert len(set(steps)) >= 3 and steps == sorted(steps, key=STEPS.index), (alias, shown[alias])
            assert bar(screen, alias).progress == 1.0, (alias, status(screen, alias))
            assert screen.hosts[alias]["state"] == "ok"
            assert "registered" in status(screen, alias) or "up" in status(screen, alias)
        assert "2 of 2 ready" in str(screen.query_one("#progress-summary", Label).render())
        assert not errors(app)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        # The Workers pane: host, state, and how each was started.
        for alias, address in (("h1", "127.0.0.2"), ("h2", "127.0.0.3")):
            row = await until(pilot, lambda alias=alias: workers_row(app, alias), f"{alias} in Workers")
            assert row[2] == "up" and row[4] == 3 and row[9] == "ssh:tunnel", row
    for alias in ("h1", "h2"):
        record = agent(ssh_cluster, alias)
        assert record is not None and record["state"] == "up" and record["slots"] == 3


async def test_unknown_host_keys_are_asked_accept_deploys_reject_fails(ssh_cluster: Cluster, lab: SshLab) -> None:
    for alias, address in (("k1", "127.0.0.2"), ("k2", "127.0.0.3")):
        host = lab.add_host(alias, address, trust=False)
        assert ssh_cluster.corral(*lab.host_args(host)).returncode == 0
    expected = {alias: fingerprint(h.root) for alias, h in lab.hosts.items()}
    app = CorralApp(home=ssh_cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await open_deploy(pilot, app)
        await pilot.press("space", "down", "space", "enter")
        answered: list[str] = []
        for _ in range(2):
            question = await until(pilot, lambda: (isinstance(app.screen, HostKeyScreen) and app.screen.alias not in answered
                                                   and app.screen) or progress_of(app).done, "a host-key modal", DEPLOY_TIMEOUT)
            assert isinstance(question, HostKeyScreen), (answered, progress_of(app).hosts, errors(app))
            # The modal names the host, the key type and its SHA256 fingerprint, as ssh-keygen -lf does.
            assert question.fingerprint == expected[question.alias]
            shown = str(question.query_one("#fingerprint", Label).render())
            assert expected[question.alias] in shown and shown.split()[-1].startswith("SHA256:")
            assert "ed25519" in str(question.query_one("#key-type", Label).render()).lower()
            assert lab.hosts[question.alias].address in str(question.query_one("#host", Label).render())
            answered.append(question.alias)
            # A key pressed before a just-pushed modal has mounted may reach the screen below: wait for it.
            await until(pilot, lambda: any(b.has_focus for b in question.query("#reject")), "the modal ready for keys")
            await pilot.press("a" if question.alias == "k1" else "r")
            await until(pilot, lambda: app.screen is not question, "the modal to close")
        screen = progress_of(app)
        await until(pilot, lambda: screen.done, "the deploy to finish", DEPLOY_TIMEOUT)
        assert screen.hosts["k1"]["state"] == "ok" and bar(screen, "k1").progress == 1.0
        assert screen.hosts["k2"]["state"] == "failed"
        assert status(screen, "k2").startswith("failed at hostkey:") and "rejected" in status(screen, "k2")
        assert any(e.startswith("k2: hostkey:") and "rejected" in e for e in errors(app)), errors(app)
    corral_known = (ssh_cluster.home / "known_hosts").read_text()
    assert lab.hosts["k1"].known_hosts_line().split()[0] in corral_known
    assert lab.hosts["k2"].known_hosts_line().split()[0] not in corral_known
    assert agent(ssh_cluster, "k1")["state"] == "up"
    assert agent(ssh_cluster, "k2") is None


async def test_a_changed_host_key_is_refused_never_offered(ssh_cluster: Cluster, lab: SshLab, tmp_path: Path) -> None:
    host = lab.add_host("x1", "127.0.0.2", trust=False)
    assert ssh_cluster.corral(*lab.host_args(host)).returncode == 0
    from scripts.sshlab import keygen

    other = keygen(tmp_path / "impostor")  # the user's known_hosts holds another key for this address
    lab.known_hosts.write_text(f"[{host.address}]:{host.port} {' '.join(other.split()[:2])}\n")
    app = CorralApp(home=ssh_cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await open_deploy(pilot, app)
        await pilot.press("space", "enter")
        screen = await until(pilot, lambda: isinstance(app.screen, DeployProgressScreen) and app.screen, "progress")
        await until(pilot, lambda: screen.done, "the deploy to finish", DEPLOY_TIMEOUT)
        assert not any(isinstance(s, HostKeyScreen) for s in app.screen_stack), "a changed key is never offered"
        assert screen.hosts["x1"]["state"] == "failed"
        assert status(screen, "x1").startswith("failed at hostkey:") and "changed" in status(screen, "x1").lower()
        assert any("x1: hostkey:" in e and "changed" in e.lower() for e in errors(app)), errors(app)
    assert agent(ssh_cluster, "x1") is None


async def select_worker(pilot: Pilot, app: CorralApp, name: str) -> None:
    workers = app.main.workers_pane
    await until(pilot, lambda: workers_row(app, name), f"{name} in Workers")
    workers.focus()
    workers.cursor = next(i for i, r in enumerate(workers.rows) if r[0] == name)
    await pilot.pause()
    assert workers.selected()[0] == name


async def test_k_stops_the_selected_agent_after_a_confirm_and_requeues_its_job(ssh_cluster: Cluster, lab: SshLab,
                                                                              tmp_path: Path) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"))
    deploy(ssh_cluster, "h1", "--slots", "1")
    pid = remote_pid(hosts["h1"])
    marker, job_pid = tmp_path / "marker", tmp_path / "job.pid"
    command = f"if [ -f {marker} ]; then echo second run; else touch {marker}; echo $$ > {job_pid}; exec sleep 120; fi"
    with ssh_cluster.client() as c:
        (job,) = c.submit([{"command": command, "tags": ["red"]}])
    wait_until(lambda: job_pid.exists() and job_pid.read_text().strip(), timeout=30, what="the job to start")
    app = CorralApp(home=ssh_cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await select_worker(pilot, app, "h1")
        await pilot.press("k")
        confirm = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, "the confirm")
        assert "Stop agent h1" in confirm.question
        await pilot.press("n")  # declined: nothing happens
        assert isinstance(app.screen, MainScreen) and alive(pid)
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm again")
        await pilot.press("y")
        await until(pilot, lambda: (workers_row(app, "h1") or ())[2:3] == ("stopped",), "h1 stopped in Workers", 60)
        assert not errors(app)
    assert not alive(pid)
    with ssh_cluster.client() as c:
        assert c.job(job)["state"] == "queued", "the killed job went back to the queue"
    assert agent(ssh_cluster, "h1")["state"] == "stopped"


async def test_D_drains_the_selected_agent_its_running_job_finishes(ssh_cluster: Cluster, lab: SshLab,
                                                                    tmp_path: Path) -> None:
    hosts = add_hosts(ssh_cluster, lab, ("h1", "127.0.0.2", "red"))
    deploy(ssh_cluster, "h1", "--slots", "1")
    pid = remote_pid(hosts["h1"])
    started, release = tmp_path / "started", tmp_path / "release"
    with ssh_cluster.client() as c:
        first, second = c.submit([
            {"command": f"touch {started}; while [ ! -f {release} ]; do sleep 0.05; done; echo finished", "tags": ["red"]},
            {"command": "echo second", "tags": ["red"]}])
    wait_until(lambda: started.exists(), timeout=30, what="the first job to start")
    app = CorralApp(home=ssh_cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await select_worker(pilot, app, "h1")
        await pilot.press("D")
        await until(pilot, lambda: (workers_row(app, "h1") or ())[2:3] == ("draining",), "h1 draining in Workers", 60)
        await pilot.pause(1.0)
        assert alive(pid), "a draining agent waits for its running job"
        release.touch()
        await until(pilot, lambda: (workers_row(app, "h1") or ())[2:3] == ("stopped",), "h1 stopped in Workers", 60)
        assert not errors(app)
    assert not alive(pid)
    with ssh_cluster.client() as c:
        record = c.job(first)
        assert record["state"] == "done" and record["attempt_list"][-1]["stdout"] == b"finished\n"
        assert c.job(second)["state"] == "queued", "a draining agent starts nothing new"


async def test_k_on_an_agent_not_deployed_over_ssh_says_so(cluster: Cluster) -> None:
    cluster.start_agent("plain", slots=1)
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await select_worker(pilot, app, "plain")
        await pilot.press("k")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen), "no confirm for an agent corral cannot stop over SSH"
        assert any("not deployed over SSH" in n.message for n in app._notifications)
    assert cluster.agents["plain"].poll() is None
