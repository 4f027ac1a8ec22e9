"""One job in full: its spec, every attempt with agent, times and exit code, and their stdout/stderr."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static

from corral.agent.protocol import output_text

from ... import values
from ...cli.render import tail_note
from ..format import duration, one_line, output, stamp
from ..messages import CancelJobs, LoadJob, RequeueJobs
from ..widgets.keybar import KeyBar
from .confirm import ConfirmScreen

FINAL = {"done", "failed", "timeout", "cancelled", "lost"}
STATE_STYLES = {"done": "green", "failed": "red", "timeout": "red", "lost": "red", "cancelled": "yellow",
                "running": "bold", "queued": "dim", "interrupted": "yellow"}
UNFINISHED = {"lost", "interrupted"}  # attempts that ended without a result (console/master/records.py)


def _value_text(value: bytes | None) -> str:
    """A callable's return value: its plain data, else its class and size (never unpickled in full here)."""
    return "None" if value is None else values.shown(value)


# One piece (~90 lines): the detail top to bottom, fields then attempts, appending to one Text through two
# local helpers; it reads in the order the operator sees it.
def render_record(record: dict[str, Any], now: float) -> Text:
    """The whole detail as one Text: the job's fields, then each attempt and its output (never parsed as markup)."""
    out = Text()
    state = record["state"]

    def field(label: str, value: str, style: str = "") -> None:
        out.append(f"{label:<10}", style="dim")
        out.append_text(output(value, style))  # the job's and the agents' words, escaped (console/escape.py)
        out.append("\n")

    what = record["command"] if record["command"] is not None else f"{record['func']}(…)"
    field("command" if record["command"] is not None else "callable", what, "bold")
    if record["name"]:
        field("name", record["name"])
    summary = state + (f" · exit {record['exit_code']}" if record["exit_code"] is not None else "")
    summary += f" · attempt {record['attempts']}" + (f" on {record['agent']}" if record["agent"] else "")
    field("state", summary, STATE_STYLES.get(state, ""))
    field("priority", f"{record['priority']}    timeout {duration(record['timeout']) if record['timeout'] else '-'}"
          f"    retries {record['retries']}    tags {','.join(record['tags']) or '-'}")
    took = duration(record["ended"] - record["started"]) if record["started"] and record["ended"] else (
        duration(now - record["started"]) + " so far" if state == "running" and record["started"] else "-")
    field("submitted", stamp(record["submitted"]))
    field("started", f"{stamp(record['started'])}    ended {stamp(record['ended'])}    took {took}")
    if record["cwd"] or record["env"]:
        env = " ".join(f"{k}={v}" for k, v in record["env"].items()) or "-"
        field("cwd", f"{record['cwd'] or '-'}    env {env}")
    if record["error"]:
        field("error", record["error"], "red")
    if record["func"] and state == "done":
        field("value", _value_text(record["value"]))
    attempts = list(record["attempt_list"])
    if not attempts and record["attempts"] and state in FINAL:
        # A clean first run leaves no attempt row (the master keeps only what has something to say).
        attempts = [{"attempt": record["attempts"], "agent": record["agent"], "state": state,
                     "started": record["started"], "ended": record["ended"], "exit_code": record["exit_code"],
                     "stdout": b"", "stderr": b"", "error": "", "traceback": "", "counted": 1}]
    recorded = {a["attempt"] for a in attempts}
    if state == "running" and record["attempts"] not in recorded:
        attempts.append({"attempt": record["attempts"], "agent": record["agent"], "state": "running",
                         "started": record["started"], "ended": None, "exit_code": None, "stdout": b"",
                         "stderr": b"", "error": "", "traceback": "", "counted": 1})
    if state == "assigned":  # taken by an agent that has not started it: no attempt has run yet
        out.append("\n")
        out.append_text(output(f"attempt {record['attempts']} assigned to {record['agent']}: not started yet"
                               " (waiting there for a free slot)\n", "dim"))
    elif not attempts:
        out.append("\nnot started yet: waiting for a free slot on an agent with its tags\n", style="dim")
    for a in attempts:
        out.append("\n")
        a_state = a["state"]
        if a_state == "running":
            head = f"attempt {a['attempt']} on {a['agent']}: running for {duration(now - (a['started'] or now))}"
        else:
            took = duration(a["ended"] - a["started"]) if a["started"] and a["ended"] else "-"
            head = (f"attempt {a['attempt']} on {a['agent']}: {a_state}, exit "
                    f"{'-' if a['exit_code'] is None else a['exit_code']}, {took}")
        out.append("── " + one_line(head), style=f"bold {STATE_STYLES.get(a_state, '')}".strip())
        unfinished = a_state in UNFINISHED  # ended without a result of its own: the error says why
        if not a["counted"] and not unfinished:
            out.append("  (superseded: not counted)", style="dim")
        out.append("\n")
        if a["error"]:
            out.append_text(output(f"{'why' if unfinished else 'error'}: {a['error']}\n", "red"))
        if a.get("note"):
            out.append_text(output(f"note: {a['note']}\n", "yellow"))
        if unfinished and not (a["stdout"] or a["stderr"]):
            continue  # no output came back from it: nothing more to show
        if a_state == "running":
            live = [(label, output_text(record.get(f"live_{label}") or b"")) for label in ("stdout", "stderr")]
            if not any(text for _, text in live):
                out.append("no output yet (a running shell job's output follows here live)\n", style="dim")
                continue
            for label, text in live:
                out.append(f"{label} (live, last 64 KiB)\n", style="dim underline")
                if text:
                    out.append_text(output(text if text.endswith("\n") else text + "\n"))
                else:
                    out.append("(empty)\n", style="dim")
            continue
        for label in ("stdout", "stderr", "traceback"):
            text = a[label] if label == "traceback" else output_text(a[label])
            if label == "traceback" and not text:
                continue
            out.append(f"{label}{tail_note(a, label)}\n", style="dim underline")
            if text:
                out.append_text(output(text if text.endswith("\n") else text + "\n"))
            else:
                out.append("(empty)\n", style="dim")
    return out


class JobDetailScreen(Screen[None]):
    """Follows its job: reloaded whenever a snapshot says it changed, until it is final."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "cancel", "Cancel job"),
        Binding("r", "requeue", "Requeue"),
        Binding("question_mark", "app.help", "Help"),
    ]

    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id
        self.record: dict[str, Any] | None = None
        self.now = 0.0

    def compose(self) -> ComposeResult:
        yield Static(f"Job {self.job_id}", id="detail-title", markup=False)
        with VerticalScroll(id="detail-body"):
            yield Static("loading…", id="detail-text", markup=False)
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#detail-body").focus()
        self.post_message(LoadJob(self.job_id))

    def show(self, record: dict[str, Any], now: float) -> None:
        self.record, self.now = record, now or self.now
        state = record["state"]
        title = Text(f"Job {record['id']}", style="bold")
        title.append(f"  {state}", style=STATE_STYLES.get(state, ""))
        if record["name"]:
            title.append(f"  {one_line(record['name'])}")
        self.query_one("#detail-title", Static).update(title)
        self.query_one("#detail-text", Static).update(render_record(record, self.now))

    def snapshot_arrived(self, snapshot: dict[str, Any]) -> None:
        """Reload while the job can still change and the master says it did (or cannot say)."""
        self.now = snapshot["now"]
        if self.record is None or self.record["state"] in FINAL:
            return
        changed = snapshot.get("changed")
        if changed is None or self.job_id in changed:
            self.post_message(LoadJob(self.job_id))
        elif self.record["state"] == "running":
            self.show(self.record, self.now)  # only the clock moved: elapsed

    def action_cancel(self) -> None:
        if self.record is not None and self.record["state"] in FINAL:
            self.notify(f"job {self.job_id} already ended {self.record['state']}; r requeues it", severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.post_message(CancelJobs([self.job_id]))

        self.app.push_screen(ConfirmScreen(f"Cancel job {self.job_id}?", "A running job is killed."), confirmed)

    def action_requeue(self) -> None:
        if self.record is not None and self.record["state"] not in FINAL:
            self.notify(f"job {self.job_id} is still {self.record['state']}; only finished jobs are requeued",
                        severity="warning")
            return
        self.post_message(RequeueJobs([self.job_id]))
