"""The one set of job-spec rules: the master, the Client, the CLI's argument types and the submit form check here."""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

from corral.agent.codecache import is_digest
from corral.agent.errors import BadCall, BadJobSpec
from corral.agent.protocol import MAX_PAYLOAD_BYTES, JobSpec

# ---- the limits (README, "Bounded") ---------------------------------------------------------

MAX_JOBS = 100_000  # jobs in one submit()/submit_map() call, and copies from one --count or form
MAX_JOB_BYTES = MAX_PAYLOAD_BYTES  # a job's command plus its pickled arguments
MAX_NAME = 200  # characters of a job's name
MAX_RETRIES = 100
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1  # a 32-bit signed integer
MAX_TIMEOUT = 30 * 24 * 3600  # seconds: 30 days
MAX_POLL = 30.0  # seconds one long poll (wait, wait_outcomes, submit_map's wait) holds a call, at most
MAX_LIST = 10**9  # jobs one listing may ask for; a view's offset is at most that too
FUNC_HINT = "e.g. mypkg.tasks:resize"
_SUBJECTS = {"command": "the command", "job": "the job"}  # how a message names these fields


class Invalid(BadJobSpec):
    """One field's value breaks its rule. `problem` reads after the field's name ("must be ...");
    the CLI shows it after argparse's "argument --x:", the form beside the field."""

    def __init__(self, field: str, problem: str, hint: str = "") -> None:
        super().__init__(f"{_SUBJECTS.get(field, field)} {problem}", hint)
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.problem, self.hint))


class Checked(NamedTuple):
    """A spec that passed every rule, in JobSpec's field order (`JobSpec(*checked)`): what the master
    queues and journals without building a JobSpec per job. Tags are sorted and unique."""

    command: str | None
    func: str | None
    payload: bytes | None
    name: str
    env: dict[str, str]
    cwd: str | None
    priority: int
    timeout: float | None
    retries: int
    tags: tuple[str, ...]
    code: str | None


def is_whole(value: Any) -> bool:
    """An int that is not a bool (True is an int to Python, not a job id or a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """A short, bounded picture of a value someone sent: never the repr of unbounded input."""
    kind = type(value)
    if kind is str:
        return repr(value[:60]) + ("…" if len(value) > 60 else "")
    if kind is int:
        return repr(value) if -(10**30) < value < 10**30 else f"a {value.bit_length()}-bit number"
    if kind in (float, bool) or value is None:
        return repr(value)
    return f"a {kind.__name__}"


def _text_fault(text: str) -> str:
    """Why SQLite, the agent's exec or the console could not carry this text as it is, or ''."""
    if text.isascii() and "\x00" not in text:  # nearly always: one pass, no encoding
        return ""
    if "\x00" in text:
        return "holds a NUL character"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid UTF-8 text (it holds a lone surrogate)"
    return ""


# ---- one rule per field: the value as given (or the operator's text, `said`) -> the value kept ----

def command_rule(value: Any) -> str:
    if type(value) is not str or not value.strip():
        raise Invalid("command", "is empty", "give the command after --, e.g. corral submit -- echo hi")
    fault = _text_fault(value)
    if fault:
        raise Invalid("command", fault)
    return value


def command_word_rule(value: str) -> str:
    """One word of a command line (`corral submit -- WORD...`): text the command can carry, any word
    (an empty one too, `echo ""`); the command they make is checked whole by command_rule."""
    fault = _text_fault(value)
    if fault:
        raise Invalid("command", f"word {shown(value)} {fault}")
    return value


_valid_funcs: set[str] = set()  # module:function names already checked (submissions repeat them)


def func_rule(value: Any) -> str:
    if type(value) is not str:
        raise Invalid("func", "must be a 'module:function' string", f"{FUNC_HINT}, not {shown(value)}")
    if value in _valid_funcs:
        return value
    module, _, attr = value.partition(":")
    if not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        raise Invalid("func", f"{shown(value)} is not a module:function name", FUNC_HINT)
    if len(_valid_funcs) < 10_000:
        _valid_funcs.add(value)
    return value


def payload_rule(value: Any) -> bytes | None:
    if value is not None and type(value) is not bytes:
        raise Invalid("payload", f"must hold the arguments pickled, as bytes, not {shown(value)}")
    return value


def name_rule(value: Any) -> str:
    if value is None:
        return ""
    if type(value) is not str or len(value) > MAX_NAME:
        raise Invalid("name", f"must be text of at most {MAX_NAME} characters")
    fault = _text_fault(value)
    if fault:
        raise Invalid("name", fault)
    return value


def env_rule(value: Any) -> dict[str, str]:
    if not value:
        return {}
    if type(value) is not dict:
        raise Invalid("env", f"must map names to strings, not {shown(value)}")
    for key, text in value.items():
        if not (type(key) is str and type(text) is str and key.isascii() and text.isascii()
                and "=" not in key and "\x00" not in key and "\x00" not in text and key):
            env_entry_rule(key, text)  # only what plain ASCII names and values cannot vouch for
    return value


def env_entry_rule(key: Any, value: Any) -> None:
    if type(key) is not str or type(value) is not str:
        raise Invalid("env", f"must map names to strings, not {shown(key)} to {shown(value)}")
    if not key or "=" in key or _text_fault(key):
        raise Invalid("env", f"names must be non-empty UTF-8 text without '=' or NUL, not {shown(key)}")
    fault = _text_fault(value)
    if fault:
        raise Invalid("env", f"value of {shown(key)} {fault}")


def cwd_rule(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not str or not value or _text_fault(value):
        raise Invalid("cwd", f"must be a path (UTF-8 text without NUL), not {shown(value)}")
    return value


def priority_rule(value: Any, said: str | None = None) -> int:
    if type(value) is not int:
        raise Invalid("priority", f"must be a whole number, not {said or shown(value)}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise Invalid("priority", f"must be a whole number from {MIN_PRIORITY:,} to {MAX_PRIORITY:,},"
                                  f" not {said or shown(value)}")
    return value


def timeout_rule(value: Any, said: str | None = None) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise Invalid("timeout", f"must be a positive number of seconds, not {said or shown(value)}")
    if value > MAX_TIMEOUT:
        raise Invalid("timeout", f"must be at most {MAX_TIMEOUT:,} seconds (30 days), not {said or shown(value)}")
    return float(value)


def retries_rule(value: Any, said: str | None = None) -> int:
    if type(value) is not int or not 0 <= value <= MAX_RETRIES:
        raise Invalid("retries", f"must be a whole number from 0 to {MAX_RETRIES}, not {said or shown(value)}")
    return value


def tag_rule(value: Any) -> str:
    if type(value) is not str or not value:
        raise Invalid("tags", f"must be a list of non-empty strings, not one that holds {shown(value)}")
    # isprintable() is False for every whitespace but " " (and for control characters).
    if "," in value or " " in value or not value.isprintable() or _text_fault(value):
        raise Invalid("tags", f"must be single words without commas or whitespace, not {shown(value)}")
    return value


def tags_rule(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if type(value) not in (list, tuple):
        raise Invalid("tags", f"must be a list of non-empty strings, not {shown(value)}")
    for tag in value:
        tag_rule(tag)
    return tuple(sorted(set(value)))


def code_rule(value: Any) -> str:
    """A shipped code bundle's name: the sha256 hex digest of its files (console/ship.py makes it)."""
    if not isinstance(value, str) or not is_digest(value):
        raise Invalid("code", f"must name a shipped code bundle (a sha256 hex digest), not {shown(value)}")
    return value


MAX_TOKEN = 64  # characters of a submission token


def token_rule(value: Any) -> str:
    """A submission token: the client's name for one submission, so that sending it again (its reply was
    lost) gives the same jobs instead of new ones. Printable ASCII without blanks, at most MAX_TOKEN."""
    if type(value) is not str or not 0 < len(value) <= MAX_TOKEN or not value.isascii() or not value.isprintable() \
            or " " in value:
        raise Invalid("token", f"must be 1 to {MAX_TOKEN} printable ASCII characters without blanks, not {shown(value)}")
    return value


def count_rule(value: Any, said: str | None = None) -> int:
    if type(value) is not int or not 1 <= value <= MAX_JOBS:
        raise Invalid("count", f"must be a whole number from 1 to {MAX_JOBS:,}, not {said or shown(value)}")
    return value


def batch_rule(value: Any, count: int) -> tuple[int, int | None]:
    """A submission's place in its batch (a Pool's, an Executor's): [first index, total or None],
    covering its `count` jobs; the master names them "NAME [i/total]" from it."""
    first: Any = value[0] if type(value) in (list, tuple) and len(value) == 2 else None
    total: Any = value[1] if first is not None else None
    if (not is_whole(first) or not 1 <= first <= 10**12 or not (total is None or is_whole(total))
            or (total is not None and not first + count - 1 <= total <= 10**12)):
        raise Invalid("batch", f"must be [first index, total or None] covering {count} jobs, not {shown(value)}")
    return first, total


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def carried_bytes(name: str, env: dict[str, str], cwd: str | None, tags: Any) -> int:
    """What a job carries beside its command and arguments, in UTF-8 bytes (checked fields only): the
    journal stores all of it once per job, so the job's limit counts all of it."""
    size = _utf8_len(name) if name else 0
    if cwd:
        size += _utf8_len(cwd)
    for key, value in env.items():
        size += _utf8_len(key) + _utf8_len(value) + 2
    for tag in tags:
        size += _utf8_len(tag) + 1
    return size


def size_rule(command: str | None, payload: bytes | None, carried: int = 0) -> None:
    """A job's command and arguments, and what else it carries (carried_bytes), within MAX_JOB_BYTES."""
    size = len(payload or b"") + carried
    if command is not None:
        size += _utf8_len(command)
    if size > MAX_JOB_BYTES:
        what = "command and arguments" + (" with its name, env, cwd and tags" if carried else "")
        raise Invalid("job", f"is {size} bytes of {what}; the limit is {MAX_JOB_BYTES}",
                      "pass large data by path, not by value")


# ---- the other arguments of the master's calls (not job fields): BadCall, one line each ------------

def poll_rule(value: Any, what: str = "timeout") -> float | None:
    """How long a long poll may wait: None (the cap), or 0 or more seconds, held to MAX_POLL."""
    if value is None:
        return None
    if type(value) not in (int, float) or math.isnan(value) or value < 0:
        raise BadCall(f"{what} must be a number of seconds (0 or more), not {shown(value)}")
    return min(float(value), MAX_POLL)


def limit_rule(value: Any, what: str = "limit") -> int:
    """How many rows a listing may return, or where a view's window starts: a whole number 0..MAX_LIST
    (SQLite's own integers end at 2**63: past that it would fail with OverflowError, not a message)."""
    if not is_whole(value) or not 0 <= value <= MAX_LIST:
        raise BadCall(f"{what} must be a whole number from 0 to {MAX_LIST:,}, not {shown(value)}")
    return int(value)


# ---- whole specs --------------------------------------------------------------------------------

_new_tuple = tuple.__new__


def check(spec: Any, where: str = "job") -> Checked:
    """Every rule over one spec (a JobSpec, or the plain dict anyone holding the authkey sends):
    the Checked spec, or BadJobSpec naming `where` and the field. Fields at their defaults skip
    their rule: this runs once per job of every submission, on the master and in the Client."""
    if isinstance(spec, JobSpec):
        spec = spec.__dict__
    elif type(spec) is not dict:
        raise BadJobSpec(f"{where}: a job spec must be a dict, not {shown(spec)}")
    get = spec.get
    command, func, payload = get("command"), get("func"), get("payload")
    name, env, cwd = get("name") or "", get("env") or {}, get("cwd")
    priority, timeout, retries, tags = get("priority", 0), get("timeout"), get("retries", 0), get("tags") or ()
    code = get("code")
    try:
        if (command is None) == (func is None):
            raise Invalid("job", "must give exactly one of a shell command or a module:function")
        if command is not None:
            command_rule(command)
        else:
            func_rule(func)
        if payload is not None:
            payload_rule(payload)
        if name:
            name_rule(name)
        if env:
            env_rule(env)
        if cwd is not None:
            cwd_rule(cwd)
        if priority != 0 or type(priority) is not int:
            priority_rule(priority)
        if timeout is not None:
            timeout = timeout_rule(timeout)
        if retries != 0 or type(retries) is not int:
            retries_rule(retries)
        if tags:
            tags = tags_rule(tags)
        if code is not None:
            code_rule(code)
        # Last, on checked fields: every byte the job carries counts (a 1 MiB env is a 1 MiB job).
        size_rule(command, payload, carried_bytes(name, env, cwd, tags) if (name or env or cwd or tags) else 0)
    except Invalid as exc:
        raise BadJobSpec(f"{where}: {exc.message}", exc.hint) from None
    # tuple.__new__: Checked(...) costs twice as much, per job of every submission.
    return _new_tuple(Checked, (command, func, payload, name, env, cwd, priority, timeout, retries, tags, code))


def validate(spec: JobSpec | Mapping[str, Any], where: str = "job") -> JobSpec:
    """The JobSpec that `spec` describes, checked by every rule, or BadJobSpec naming the field."""
    if not isinstance(spec, JobSpec) and isinstance(spec, Mapping):
        spec = dict(spec)
    return JobSpec(*check(spec, where))


# ---- the operator's text (CLI arguments, form fields) -> values, by the same rules ---------------

def _whole(field: str, text: str) -> int:
    text = text.strip()
    digits = text[1:] if text[:1] in "+-" else text
    if not digits or not digits.isascii() or not digits.isdigit():
        raise Invalid(field, f"must be a whole number, not {shown(text)}")
    if len(digits) > 30:
        # Out of every range here: a stand-in as far out, for the rule to refuse (int() of
        # thousands of digits would itself be refused, with a message about something else).
        return -(10**31) if text[:1] == "-" else 10**31
    return int(text)


def parse_priority(text: str) -> int:
    return priority_rule(_whole("priority", text), said=shown(text))


def parse_retries(text: str) -> int:
    return retries_rule(_whole("retries", text), said=shown(text))


def parse_count(text: str) -> int:
    return count_rule(_whole("count", text), said=shown(text))


def parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise Invalid("timeout", f"must be a number of seconds, not {shown(text)}") from None
    checked = timeout_rule(value, said=shown(text))
    assert checked is not None
    return checked


def parse_env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise Invalid("env", f"must be NAME=VALUE, not {shown(text)}")
    env_entry_rule(key, value)
    return key, value


def parse_tags(text: str) -> tuple[str, ...]:
    """Comma-separated tags (the form's field); blanks around them are dropped."""
    return tags_rule([tag.strip() for tag in text.split(",") if tag.strip()])
