"""`python -m scripts.screenshots`: the README's SVG screenshots from one scripted session at a fixed size.

A throw-away state directory gets the demo history (scripts/demo.py), then the real start-up path starts a
master and a local agent, a second agent with a `gpu` tag joins, and a feeder submits the same sequence of
real shell jobs at a steady pace. The console runs headless at 120x34 and saves:
main.svg (jobs flowing), submit.svg (the submit form), detail.svg (a finished job with output), help.svg,
and deploy.svg: `d` deploys to real OpenSSH servers on 127.0.0.x (scripts/sshlab.py, as the deploy tests and
bench do; needs /usr/sbin/sshd), two that come up and one whose `python` setting names a missing binary.
Run it from the repository's root (scripts/ is the repository's, not the installed package's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from corral.agent.protocol import JobSpec
from corral.console.client import Client
from corral.console.local import attach_or_start, stop_embedded
from corral.console.state import StateDir
from corral.console.tui.app import CorralApp
from corral.console.tui.screens.deploy import DeployScreen
from corral.console.tui.screens.detail import JobDetailScreen
from corral.console.tui.screens.progress import DeployProgressScreen
from corral.console.tui.screens.submit import SubmitScreen

from .demo import write_demo_journal
from .sshlab import SshLab, kill_remote_agents, sshd_missing

REPO = Path(__file__).resolve().parents[1]

SIZE = (120, 34)
FLOW_SECONDS = 6.0  # long enough for the sparkline and both tables to fill

# The feeder's jobs, in order: real commands, a few that fail, a few tagged for the gpu agent.
FEED = (
    ("render", "sleep 1.2; echo 'frame {i} rendered (1920x1080)'", ()),
    ("", "python3 -c 'import hashlib; print(hashlib.sha256(b\"{i}\" * 100000).hexdigest())'", ()),
    ("thumbs", "sleep 0.6; echo 'thumbnail {i}.jpg'; echo 'warning: low contrast in {i}.jpg' >&2", ()),
    ("", "sleep 2.5; echo 'shard {i} indexed'", ()),
    ("train", "sleep 3; echo 'epoch {i}: loss 0.{i:03d}'", ("gpu",)),
    ("", "test -f /data/shard-{i}.parquet", ()),
    ("", "sleep 0.3; echo 'checked {i}'", ()),
)


def feed(home: Path, stop: threading.Event, per_second: float = 5.0) -> None:
    """Submit FEED in order, round and round, until stopped (its own Client: its own thread)."""
    with Client(home=home) as client:
        i = 0
        while not stop.wait(1.0 / per_second):
            name, command, tags = FEED[i % len(FEED)]
            client.submit([JobSpec(command=command.format(i=i), name=name, tags=tags)])
            i += 1


async def _until(pilot: Any, predicate: Callable[[], Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the scripted session did not reach its next step")
        await pilot.pause(0.05)


# The deploy screenshot's hosts: (alias, loopback address, extra `corral hosts add` arguments).
DEPLOY_HOSTS = (
    ("edge-1", "127.0.0.2", ("--slots", "4", "--tags", "edge")),
    ("edge-2", "127.0.0.3", ("--slots", "4", "--tags", "edge")),
    ("legacy", "127.0.0.4", ("--slots", "2", "--python", "/opt/python2.7/bin/python")),
)


def start_ssh_hosts(root: Path, home: Path) -> SshLab | None:
    """Real sshd hosts in corral's hosts file; the master to be started sees only their ssh config and
    known_hosts. None, with a note, if sshd is missing."""
    why = sshd_missing()
    if why:
        print(f"no deploy.svg: {why}", file=sys.stderr)
        return None
    lab = SshLab(root)
    os.environ.update(lab.env())
    os.environ.pop("SSH_AUTH_SOCK", None)
    for alias, address, extra in DEPLOY_HOSTS:
        host = lab.add_host(alias, address)
        subprocess.run([sys.executable, "-m", "corral", *lab.host_args(host, *extra)], check=True,
                       env=dict(os.environ, CORRAL_HOME=str(home)), stdout=subprocess.DEVNULL)
    return lab


def stop_ssh_hosts(lab: SshLab) -> None:
    for host in lab.hosts.values():
        kill_remote_agents(host)
    lab.stop()


async def session(home: Path, out: Path, deploy: bool = False) -> list[Path]:
    app = CorralApp(home=home, embedded=True)
    saved: list[Path] = []

    def save(name: str) -> None:
        app.clear_notifications()
        app.save_screenshot(name, str(out))
        saved.append(out / name)

    async with app.run_test(size=SIZE) as pilot:
        main = app.main
        await _until(pilot, lambda: main.finished_pane.loaded and main.dispatched_pane.total > 3)
        await pilot.pause(FLOW_SECONDS)
        await pilot.pause()
        save("main.svg")

        await pilot.press("n")
        await _until(pilot, lambda: isinstance(app.screen, SubmitScreen))
        await pilot.press(*"./render.sh --scene forest", "tab", "backspace", *"24", "tab", "backspace", *"5",
                          "tab", *"600", "tab", "backspace", *"2", "tab", *"gpu")
        for field in app.screen.query("Input"):
            field.cursor_blink = False  # type: ignore[attr-defined]
        await pilot.pause()
        save("submit.svg")
        await pilot.press("escape")

        finished = main.finished_pane
        finished.focus()
        await _until(pilot, lambda: any(r[1] == "thumbs" and r[2] == "done" for r in finished.rows))
        finished.cursor = finished.start + next(i for i, r in enumerate(finished.rows) if r[1] == "thumbs")
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, JobDetailScreen) and app.screen.record is not None)
        await pilot.pause()
        save("detail.svg")
        await pilot.press("escape")

        await pilot.press("question_mark")
        await pilot.pause()
        save("help.svg")
        await pilot.press("escape")

        if deploy:
            main.dispatched_pane.focus()
            await pilot.press("d")
            await _until(pilot, lambda: isinstance(app.screen, DeployScreen))
            await pilot.press("space", "down", "space", "down", "space", "enter")
            await _until(pilot, lambda: isinstance(app.screen, DeployProgressScreen) and app.screen.done, timeout=120)
            await pilot.pause()
            save("deploy.svg")
            await pilot.press("escape")
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "screenshots",
                        help="where the SVGs go (default: the repository's screenshots/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["TZ"] = "UTC"
    time.tzset()
    with tempfile.TemporaryDirectory(prefix="corral-shots-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir(mode=0o700)
        lab = start_ssh_hosts(Path(tmp) / "lab", home)
        # The history ends two hours ago, so the live jobs are the newest.
        state = StateDir(home)
        write_demo_journal(state.journal_path, finished=60, queued=0, epoch=float(int(time.time()) - 7200))
        attach_or_start(state, local_agent=True, slots=4)
        gpu = subprocess.Popen([sys.executable, "-m", "corral.agent", "--name", "gpu-1", "--slots", "2", "--tags", "gpu"],
                               env=dict(os.environ, CORRAL_HOME=str(home)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
        stop = threading.Event()
        feeder = threading.Thread(target=feed, args=(home, stop), name="feeder", daemon=True)
        try:
            feeder.start()
            saved = asyncio.run(session(home, args.out, deploy=lab is not None))
        finally:
            stop.set()
            feeder.join(timeout=10)
            gpu.send_signal(signal.SIGTERM)
            gpu.send_signal(signal.SIGTERM)  # a second one: do not wait for its running jobs
            gpu.wait(timeout=30)
            stop_embedded(state)
            if lab is not None:
                stop_ssh_hosts(lab)
    for path in saved:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
