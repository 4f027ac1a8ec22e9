"""`corral` in a real terminal: an 80x24 tmux pane, keys sent with send-keys, the screen read with capture-pane."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable


from corral.console.state import StateDir
from corral.console.local import stop_embedded

TIMEOUT = 60.0  # a cold start of master, agent and Textual on a busy two-core machine


def _corral() -> list[str]:
    """The `corral` entry point of this environment, else the module."""
    script = Path(sys.executable).with_name("corral")
    return [str(script)] if script.exists() else [sys.executable, "-m", "corral"]


def _wait_screen(tmux: Callable[..., str], predicate: Callable[[str], bool], what: str, history: bool = False) -> str:
    """The pane's text once predicate() holds; with `history`, lines scrolled off the top too."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        screen = tmux("capture-pane", "-p", "-t", "corral", *(["-S", "-100"] if history else []))
        if predicate(screen):
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")
        time.sleep(0.1)


def test_submit_and_see_it_finish_in_80x24(tmp_path: Path, tmux: Callable[..., str]) -> None:
    home = tmp_path / "home"
    # A shell runs corral and says when it has exited: tmux 3.3 here sometimes never reaps a pane's
    # exited process (so "Pane is dead" never shows), while the shell always reaps its own child.
    corral = " ".join(["env", f"CORRAL_HOME={home}", "LANG=C.UTF-8", *_corral(), "--slots", "2"])
    command = f"sh -c '{corral}; echo corral exited $?'"
    try:
        tmux("new-session", "-d", "-s", "corral", "-x", "80", "-y", "24", command)
        tmux("set-option", "-t", "corral", "remain-on-exit", "on")  # keep what corral prints after the app
        screen = _wait_screen(tmux, lambda s: "Dispatched" in s and "local" in s and "up" in s,
                              "the console with the local agent up")
        lines = screen.splitlines()
        assert len(lines) == 24 and max(len(line) for line in lines) <= 80
        tmux("send-keys", "-t", "corral", "n")
        _wait_screen(tmux, lambda s: "Submit a job" in s, "the submit form")
        tmux("send-keys", "-t", "corral", "-l", "echo hello")
        tmux("send-keys", "-t", "corral", "Enter")
        screen = _wait_screen(tmux, lambda s: any("echo hello" in line and " done " in line for line in s.splitlines()),
                              "echo hello done in Finished")
        finished = next(line for line in screen.splitlines() if "echo hello" in line and " done " in line)
        assert " local " in finished and " 0 " in finished
        record = json.loads((home / "console.json").read_text())
        tmux("send-keys", "-t", "corral", "q")  # nothing in flight: corral stops what it started
        # What corral prints after the app has the pane's last lines, then the shell's word that it exited.
        screen = _wait_screen(tmux, lambda s: "stopped the master" in s and "corral exited 0" in s,
                              "corral to stop the master and exit", history=True)
        assert "stopped the local agent" in screen
        for pid in (record["master_pid"], record["agent_pid"]):
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    finally:
        stop_embedded(StateDir(home))  # whatever is left if the test failed half-way
