"""What the `corral` command prints: exit codes, error lines, plain tables, the job detail and stable JSON."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from corral.agent.errors import CorralError
from corral.agent.protocol import JobState, output_text

from .. import values
from ..escape import TerminalStream, one_line

if TYPE_CHECKING:
    from ..deploy.inventory import Host

# Attempt states of attempts that ended without a result (console/master/records.py UNFINISHED).
UNFINISHED = frozenset({"lost", "interrupted"})

EXIT_ERROR = 1  # an operation failed (no master, unknown job, refused submission)
EXIT_USAGE = 2  # the command line itself is wrong
EXIT_TIMEOUT = 124  # like timeout(1): a job or a wait ran out of time
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped with ^C
EXIT_PIPE = 141  # 128 + SIGPIPE, as a shell reports `seq 1000000 | head -1`'s seq

Record = dict[str, Any]  # a job, agent or host as the master sends it (see the README's JSON section)


def error_line(prog: str, exc: CorralError) -> str:
    """An error as its one line: `corral submit: what went wrong — what to do` (its text may be a job's or an
    agent's: escaped, newlines included, so it stays one line and cannot act on the terminal)."""
    hint = f" — {exc.hint}" if exc.hint else ""
    return one_line(f"{prog}: {exc.message}{hint}")


def os_error_text(exc: OSError) -> str:
    """An OSError as words: `Permission denied: /path`, `Address already in use` (no errno, no traceback)."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text}: {exc.filename}" if exc.filename else text


def job_exit_code(record: Record) -> int:
    """A final job as an exit status: 0 done, 124 timed out, the job's own code, 128+N for signal N, else 1."""
    state, code = record["state"], record["exit_code"]
    if state == JobState.DONE.value:
        return 0
    if state == JobState.TIMEOUT.value:
        return EXIT_TIMEOUT
    if isinstance(code, int) and code != 0:
        return code if code > 0 else 128 - code
    return EXIT_ERROR


def value_repr(value: bytes) -> str:
    """A callable's return value as an agent handed it in: the plain data it holds, else its class and size
    (console/values.py: never unpickled in full, so a forged value runs nothing here)."""
    return values.shown(value)


# ---- plain text ---------------------------------------------------------------------------------

def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks. Each cell is one line,
    its control characters escaped (a job's or an agent's name holds what they chose), so rows stay rows."""
    rows = [[one_line(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def _took(item: Record) -> str:
    return f"{item['ended'] - item['started']:.2f}s" if item.get("started") and item.get("ended") else "-"


def _what(record: Record) -> str:
    text = record["command"] if record["command"] is not None else f"{record['func']}(…)"
    return text if len(text) <= 48 else text[:47] + "…"


def jobs_table(records: Sequence[Record]) -> str:
    rows = [[str(r["id"]), r["state"], str(r["priority"]), r["agent"] or "-", str(r["attempts"]),
             "-" if r["exit_code"] is None else str(r["exit_code"]), _took(r), r["name"] or _what(r)]
            for r in records]
    return table(rows, ["ID", "STATE", "PRI", "AGENT", "TRY", "EXIT", "TIME", "NAME/COMMAND"])


def job_detail(record: Record) -> str:
    """`corral show`: the job's fields, then each attempt with its output, indented."""
    what = record["command"] if record["command"] is not None else record["func"]
    lines = [
        f"job {record['id']}  {record['name'] or ''}".rstrip(),
        f"  state     {record['state']}" + (f"  ({record['error']})" if record["error"] else ""),
        f"  {'command' if record['command'] is not None else 'callable'}   {what}",
        f"  priority  {record['priority']}   timeout {record['timeout'] or '-'}   retries {record['retries']}"
        f"   tags {','.join(record['tags']) or '-'}",
    ]
    if record["cwd"] or record["env"]:
        env = " ".join(f"{k}={v}" for k, v in record["env"].items())
        lines.append(f"  cwd       {record['cwd'] or '-'}   env {env or '-'}")
    if record.get("code"):
        lines.append(f"  code      {record['code']} (shipped)")
    lines.append(f"  submitted {clock(record['submitted'])}"
                 f"   exit {record['exit_code'] if record['exit_code'] is not None else '-'}")
    if record["func"] and record["value"] is not None:
        lines.append(f"  value     {value_repr(record['value'])}")
    for a in record["attempt_list"]:
        unfinished = a["state"] in UNFINISHED  # ended without a result: the error says why
        note = "" if a["counted"] or unfinished else "  (not counted: superseded)"
        lines.append(f"\n  attempt {a['attempt']} on {a['agent']}: {a['state']}, exit {a['exit_code']}, {_took(a)},"
                     f" {clock(a['started'])} → {clock(a['ended'])}{note}")
        if a["error"]:
            lines.append(f"    {'why' if unfinished else 'error'}: {a['error']}")
        if a.get("note"):
            lines.append(f"    note: {a['note']}")
        for label in ("stdout", "stderr", "traceback"):
            if a[label]:
                text = a[label] if label == "traceback" else output_text(a[label])
                lines.append(f"    --- {label}{tail_note(a, label)} ---")
                lines.append("    " + text.rstrip("\n").replace("\n", "\n    "))
    return "\n".join(lines)


def size_text(n: int) -> str:
    """A byte count as the README writes sizes: 512 bytes, 64 KiB, 1.2 MiB."""
    if n < 1024:
        return f"{n} bytes"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def truncated(attempt: Record, label: str) -> bool:
    """Whether an attempt's stdout or stderr is only the tail of what the job wrote."""
    return attempt.get(f"{label}_total", 0) > len(attempt[label])


def tail_note(attempt: Record, label: str) -> str:
    """" (last 64 KiB of 1.2 MiB)" for a stream kept as a tail, else ''."""
    if label == "traceback" or not truncated(attempt, label):
        return ""
    return f" (last {size_text(len(attempt[label]))} of {size_text(attempt[label + '_total'])})"


def truncation_notes(job_id: int, attempt: Record) -> list[str]:
    """The lines `--wait` and `show` print on stderr when the output shown is a truncated tail."""
    return [f"corral: job {job_id} attempt {attempt['attempt']}: {label} shown is the last"
            f" {size_text(len(attempt[label]))} of {size_text(attempt[label + '_total'])} it wrote"
            for label in ("stdout", "stderr") if truncated(attempt, label)]


def write_output(stream: TextIO, data: bytes, raw: bool = False) -> None:
    """A job's output onto one of our streams: its bytes as they are into a pipe or a file (or with
    `raw`, `show --raw`, anywhere); decoded and escaped on a terminal (escape.TerminalStream), so the
    job's bytes never act on the operator's terminal."""
    if not data:
        return
    if isinstance(stream, TerminalStream) and not raw:
        stream.write(output_text(data))
        return
    stream.flush()  # the text written before goes first
    stream.buffer.write(data)
    stream.buffer.flush()


def status_text(status: Record) -> str:
    counts = status["counts"]
    up = [a for a in status["agents"] if a["state"] != "lost"]
    lines = [
        "  ".join(f"{state} {counts.get(state, 0)}" for state in [s.value for s in JobState]),
        f"agents {len(up)} up / {len(status['agents'])}   slots {status['busy']} busy / {status['slots']}"
        + (f" (+{status['assigned']} assigned, not started)" if status.get("assigned") else "")
        + f"   {status['rate']:.1f} jobs/s",
    ]
    lines += [f"  {one_line(a['name']):<16} {a['state']:<8} {a['busy']}/{a['slots']} busy   done {a['done']}"
              for a in status["agents"]]
    journal = status.get("journal") or {}
    if journal and not journal.get("ok", True):
        since = time.strftime("%H:%M:%S", time.localtime(journal.get("since") or 0))
        lines.insert(0, f"JOURNAL FAILING since {since} ({journal.get('refused', 0)} writes refused):"
                        f" {journal.get('error')}")
    return "\n".join(lines)


def agents_table(agents: Sequence[Record]) -> str:
    rows = [[a["name"], a["host"], a["state"], f"{a['busy']}/{a['slots']}", str(a["done"]), str(a["failed"]),
             str(a.get("times_lost", 0)),  # leases it let run out: a flaky link or host shows here
             f"{a['heartbeat_age']:.1f}s", ",".join(a["tags"]) or "-", a["started_by"],
             # the kind only (cgroup, subreaper, group); --json has the reason a weaker one is used
             str(a.get("containment") or "unknown").split(" ", 1)[0]] for a in agents]
    return table(rows, ["NAME", "HOST", "STATE", "BUSY", "DONE", "FAILED", "LOST", "SEEN", "TAGS", "STARTED BY", "CONTAINMENT"])


def hosts_table(hosts: Sequence[Host], deployed: dict[str, Record]) -> str:
    """The inventory, with what is deployed on each host (deployed: the master's records, by alias)."""
    rows = []
    for h in hosts:
        record = deployed.get(h.alias)
        state = "-" if not record else "stopped" if record.get("stopped") else f"pid {record['pid']} ({record['mode']})"
        rows.append([h.alias, h.target, str(h.slots or "cpus"), ",".join(h.tags) or "-", h.python or "auto",
                     h.remote_dir, "direct" if h.direct else "tunnel", state, h.source])
    return table(rows, ["ALIAS", "TARGET", "SLOTS", "TAGS", "PYTHON", "REMOTE DIR", "MODE", "DEPLOYED", "SOURCE"])


# ---- JSON ---------------------------------------------------------------------------------------

def to_json(value: Any) -> str:
    return json.dumps(value, indent=2)


def jsonable(record: Record) -> Record:
    """A job record as stable JSON: bytes fields become a decoded value (or its repr), payload is dropped."""
    out = {k: v for k, v in record.items() if k not in ("payload", "value", "attempt_list")}
    if "value" in record:
        # Only a done job's value is its return value (a failed callable's is how to re-raise it, for Pool).
        ended_otherwise = record.get("state", JobState.DONE.value) != JobState.DONE.value
        out["value"] = None if ended_otherwise else _json_value(record["value"])
    if "attempt_list" in record:
        # Output as text, decoded with replacement (`corral show --raw` gives the bytes); *_total says
        # how many bytes the stream produced in all (more than the text's: a tail).
        out["attempts_detail"] = [dict(a, counted=bool(a["counted"]), stdout=output_text(a["stdout"]),
                                       stderr=output_text(a["stderr"])) for a in record["attempt_list"]]
    for label in ("live_stdout", "live_stderr"):
        if label in record:
            out[label] = output_text(record[label])
    return out


def _json_value(value: bytes | None) -> Any:
    """The value itself if it is plain data JSON can hold, else its repr or its class and size (values.as_json)."""
    return None if value is None else values.as_json(value)
