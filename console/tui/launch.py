"""`corral` with no subcommand: run the console on the embedded cluster, then act on the operator's quit choice."""

from __future__ import annotations

from ..local import attach_or_start, stop_embedded
from ..state import StateDir
from .app import CorralApp
from .screens.quit import STOP


def run_console(state: StateDir, local_agent: bool = True, slots: int | None = None) -> int:
    """Attach or start (console/local.py), run the app, then stop what a console started or leave it running.

    A CorralError from start-up propagates: the command line prints it as its one line."""
    attachment = attach_or_start(state, local_agent, slots)
    app = CorralApp(home=state.home, embedded=attachment.embedded, greeting=attachment.greeting())
    choice = app.run()
    if choice == STOP and attachment.embedded:
        for line in stop_embedded(state):
            print(f"corral: {line}")
    elif attachment.embedded:
        print(f"corral: left the master (pid {attachment.master_pid}) running; `corral` re-attaches")
    return app.return_code or 0
