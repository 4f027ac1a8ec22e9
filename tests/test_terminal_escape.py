"""The operator's terminal is never the job's: a job printing a clear-screen, an OSC title, cursor moves,
a charset switch and 1000 random bytes (tests/hostile_output.py), shown by the console (pilot and a real
tmux pane) and by `corral show`/`corral wait` on a real pty, acts on nothing; its colour may show as colour."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from textual.app import App

from corral.agent.protocol import AgentInfo
from corral.agent.runner import connect as agent_connect
from corral.console.tui.app import CorralApp
from corral.console.tui.screens.detail import JobDetailScreen
from corral.console.tui.screens.main import MainScreen
from corral.console.tui.widgets.stats import StatsHeader
from tests.cluster import REPO, Cluster, wait_until
from tests.faultkit import running_cluster
from tests.hostile_output import TITLE
from tests.test_tmux import _corral, _wait_screen
from tests.test_tui_app import SIZE, loaded, main, select, until

HOSTILE = f"{sys.executable} {REPO / 'tests' / 'hostile_output.py'}"
NAME = "evil\x1b]0;NAMED\x07\x1b[2Jname"
# What the job's bytes would do if they reached a terminal as they are.
FORBIDDEN = {"OSC": "\x1b]", "clear": "\x1b[2J", "BEL": "\x07", "alt screen off": "\x1b[?1049l", "charset": "\x1b(0",
             "cursor up": "\x1b[A", "bidi override": "\u202e"}


def submit_hostile(cluster: Cluster) -> int:
    cluster.start_agent("alpha", slots=1)
    with cluster.client() as c:
        job = c.submit([{"command": HOSTILE, "name": NAME}])[0]
        assert c.wait([job], timeout=60) == {job: "done"}
    return job


def terminal_output(app: App) -> str:
    """Everything Textual would write to the terminal to draw the whole screen now."""
    update = app.screen._compositor.render_update(full=True)
    with app.console.capture() as captured:
        app.console.print(update, end="")
    return captured.get()


def assert_harmless(drawn: str) -> None:
    for what, sequence in FORBIDDEN.items():
        assert sequence not in drawn, f"the job's {what} reached the terminal"


async def test_console_detail_escapes_the_job_and_keeps_its_frame(cluster: Cluster) -> None:
    job = submit_hostile(cluster)
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        header = main(app).query_one(StatsHeader)
        await select(pilot, main(app).finished_pane, job)
        assert_harmless(terminal_output(app))  # the row with the job's name, escaped
        row = next(r for r in main(app).finished_pane.rows if r[0] == job)
        await pilot.press("enter")
        detail = app.screen
        assert isinstance(detail, JobDetailScreen)
        await until(pilot, lambda: detail.record and detail.record["state"] == "done", "the job's record")
        await pilot.pause(0.2)
        rendered = detail.query_one("#detail-text").render()
        text = str(rendered)
        assert "\\x1b[2J\\x1b[H\\x1b]0;PWNED-BY-JOB\\x07" in text and "\\u202eevil" in text
        assert "end-of-hostile-output" in text and "\x1b" not in text and "\x07" not in text
        red = [span for span in rendered.spans if "red" in str(span.style) and text[span.start:span.end] == "red-text"]
        assert red, "the job's SGR colour renders as colour"
        assert "\\x1b]0;NAMED\\x07" in str(detail.query_one("#detail-title").render())
        drawn = terminal_output(app)
        assert_harmless(drawn)
        assert detail.query_one("#detail-title").region.y == 0  # the frame: title on top, key bar at the bottom
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen) and header.region.y == 0 and header.region.height >= 1
        assert row[0] == job
        # Notices carry the master's, agents' and hosts' words: escaped, never markup.
        app.notify(f"[bold]{NAME}[/bold]", title="t\x1b]0;x\x07")
        await pilot.pause()
        note = app._notifications[-1] if hasattr(app._notifications, "__getitem__") else list(app._notifications)[-1]
        assert note.message == "[bold]evil\\x1b]0;NAMED\\x07\\x1b[2Jname[/bold]" and not note.markup
        assert_harmless(terminal_output(app))


def test_console_in_tmux_keeps_title_header_and_frame(cluster: Cluster, tmux: Callable[..., str]) -> None:
    job = submit_hostile(cluster)
    console = " ".join(["env", f"CORRAL_HOME={cluster.home}", "LANG=C.UTF-8", *_corral(), "--no-local-agent"])
    tmux("new-session", "-d", "-s", "corral", "-x", "100", "-y", "30", f"sh -c '{console}; sleep 30'")

    def pane(field: str) -> str:
        return tmux("display-message", "-p", "-t", "corral", f"#{{{field}}}").strip()

    screen = _wait_screen(tmux, lambda s: "Finished" in s and "evil" in s, "the console with the job in Finished")
    title, header = pane("pane_title"), screen.splitlines()[0]
    assert TITLE not in title and "NAMED" not in title
    assert "\\x1b]0;NAMED\\x07" in screen  # the name, escaped in its row
    tmux("send-keys", "-t", "corral", "Tab")
    time.sleep(0.5)
    tmux("send-keys", "-t", "corral", "Enter")
    screen = _wait_screen(tmux, lambda s: f"Job {job}" in s and "\\x1b[2J" in s, "the job's detail, escaped")
    lines = screen.splitlines()
    assert len(lines) == 30 and lines[0].strip().startswith(f"Job {job}"), screen  # not cleared, not moved
    assert "MOVED" not in lines[4][:10] and pane("alternate_on") == "1"
    assert pane("pane_title") == title  # OSC 0 and OSC 2 did not retitle the terminal
    tmux("send-keys", "-t", "corral", "Escape")
    screen = _wait_screen(tmux, lambda s: "Finished" in s and "Dispatched" in s, "the main screen again")
    assert screen.splitlines()[0].split()[:1] == header.split()[:1] and pane("pane_title") == title
    tmux("send-keys", "-t", "corral", "q")


def on_a_tty(cluster: Cluster, *args: str) -> bytes:
    """`corral ARGS` with stdout and stderr on a real pseudo-terminal; everything it wrote there."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "corral", *args], env=cluster.env, cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    return out


def test_corral_show_and_wait_escape_on_a_tty_and_pass_bytes_to_a_pipe(cluster: Cluster) -> None:
    job = submit_hostile(cluster)
    for args in (["show", str(job)], ["wait", str(job)], ["jobs"]):
        seen = on_a_tty(cluster, *args)
        assert b"\x1b" not in seen and b"\x07" not in seen and "\u202e".encode() not in seen, args
        assert b"\\x1b]0;" in seen, args
    shown = on_a_tty(cluster, "show", str(job)).decode()
    assert "\\x1b[2J\\x1b[H\\x1b]0;PWNED-BY-JOB\\x07" in shown and "end-of-hostile-output" in shown
    table = cluster.corral("jobs")  # a table is for people, piped or not: each cell one line, escaped
    rows = [line for line in table.stdout.splitlines() if line.startswith(f"{job} ")]
    assert table.returncode == 0 and "\x1b" not in table.stdout and len(rows) == 1 and "\\x1b]0;NAMED" in rows[0]
    piped = cluster.corral("show", str(job))
    assert piped.returncode == 0 and "\x1b]0;PWNED-BY-JOB\x07" in piped.stdout  # a pipe gets what the job printed
    as_json = cluster.corral("show", str(job), "--json")
    assert as_json.returncode == 0 and "\x1b" not in as_json.stdout and "\\u001b]0;PWNED" in as_json.stdout


def test_the_masters_log_lines_escape_what_agents_chose(tmp_path: Path) -> None:
    """An agent names itself: the master's -v lines (its log file, a terminal) say that name escaped, one line."""
    name = "evil\x1b]0;PWNED\x07\nforged: a line of the master's own"
    with running_cluster(tmp_path / "home", "-v") as cluster:
        authkey = (cluster.home / "authkey").read_bytes().strip()
        fake = agent_connect(cluster.address(), authkey)
        fake.register(AgentInfo(name=name, host="h\x1b[2J", pid=1, slots=1).to_wire(), [])
        log = cluster.logs / "master.log"
        line = wait_until(lambda: next((x for x in log.read_text().splitlines() if x.startswith("agent evil")), None),
                        timeout=30, what="the master's line about the agent")
        text = log.read_text()
        assert "\x1b" not in text and "\x07" not in text
        assert "\\x1b]0;PWNED\\x07\\nforged" in line and not any(x.startswith("forged") for x in text.splitlines())
