"""The job-spec rules (master/validate.py): every rule and its message, at every edge that uses them —
the master's check of what peers send, validate() for the Python API, the CLI's job options, the form."""

from __future__ import annotations

import pickle
import re
from typing import Any

import pytest

from corral.agent.errors import BadCall, BadJobSpec
from corral.agent.protocol import JobSpec
from corral.console.cli import build_parser
from corral.console.master import validate as v
from corral.console.tui.screens.submit import parse_submission


def refused(spec: Any, where: str = "job") -> str:
    with pytest.raises(BadJobSpec) as caught:
        v.check(spec, where)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300, message
    return message


# ---- the master's check of plain data, field by field --------------------------------------------

FUNC = "mypkg.tasks:resize"


def a_function() -> None:
    pass


@pytest.mark.parametrize("spec, message", [
    ("not a dict", "job: a job spec must be a dict, not 'not a dict'"),
    ([{"command": "x"}], "job: a job spec must be a dict, not a list"),
    ({}, "job: the job must give exactly one of a shell command or a module:function"),
    ({"command": "true", "func": FUNC}, "job: the job must give exactly one of a shell command or a module:function"),
    # the command
    ({"command": ""}, "job: the command is empty"),
    ({"command": "   "}, "job: the command is empty"),
    ({"command": 42}, "job: the command is empty"),
    ({"command": "echo \x00"}, "job: the command holds a NUL character"),
    ({"command": "echo \udcff"}, "job: the command is not valid UTF-8 text (it holds a lone surrogate)"),
    ({"command": "echo " + "x" * v.MAX_JOB_BYTES}, f"job: the job is {v.MAX_JOB_BYTES + 5} bytes of command and"
                                                   f" arguments; the limit is {v.MAX_JOB_BYTES}"),
    ({"command": "é" * (v.MAX_JOB_BYTES // 2 + 1)}, "the limit is 1048576"),  # bytes, not characters
    # the function and its arguments
    ({"func": a_function}, "job: func must be a 'module:function' string (e.g. mypkg.tasks:resize, not a function)"),
    ({"func": b"m:f"}, "job: func must be a 'module:function' string"),
    ({"func": "not a function"}, "job: func 'not a function' is not a module:function name (e.g. mypkg.tasks:resize)"),
    ({"func": "mod:"}, "is not a module:function name"),
    ({"func": ":f"}, "is not a module:function name"),
    ({"func": "a-b:c"}, "is not a module:function name"),
    ({"func": FUNC, "payload": "not bytes"}, "job: payload must hold the arguments pickled, as bytes, not 'not bytes'"),
    ({"func": FUNC, "payload": b"x" * (v.MAX_JOB_BYTES + 1)}, "the limit is 1048576"),
    # name, env, cwd
    ({"command": "true", "name": "n" * (v.MAX_NAME + 1)}, "job: name must be text of at most 200 characters"),
    ({"command": "true", "name": 7}, "job: name must be text of at most 200 characters"),
    ({"command": "true", "name": "a\x00"}, "job: name holds a NUL character"),
    ({"command": "true", "env": ["A=1"]}, "job: env must map names to strings, not a list"),
    ({"command": "true", "env": {"A": 1}}, "job: env must map names to strings, not 'A' to 1"),
    ({"command": "true", "env": {1: "a"}}, "job: env must map names to strings, not 1 to 'a'"),
    ({"command": "true", "env": {"A=B": "1"}}, "job: env names must be non-empty UTF-8 text without '=' or NUL,"
                                               " not 'A=B'"),
    ({"command": "true", "env": {"": "1"}}, "env names must be non-empty"),
    ({"command": "true", "env": {"A\x00": "1"}}, "env names must be non-empty UTF-8 text without '=' or NUL"),
    ({"command": "true", "env": {"A": "1\x00"}}, "job: env value of 'A' holds a NUL character"),
    ({"command": "true", "env": {"A": "\ud800"}}, "job: env value of 'A' is not valid UTF-8 text"),
    ({"command": "true", "cwd": 3}, "job: cwd must be a path (UTF-8 text without NUL), not 3"),
    ({"command": "true", "cwd": ""}, "job: cwd must be a path"),
    ({"command": "true", "cwd": "/tmp\x00"}, "job: cwd must be a path"),
    # priority: a 32-bit signed integer
    ({"command": "true", "priority": "high"}, "job: priority must be a whole number, not 'high'"),
    ({"command": "true", "priority": 1.0}, "job: priority must be a whole number, not 1.0"),
    ({"command": "true", "priority": True}, "job: priority must be a whole number, not True"),
    ({"command": "true", "priority": 2**31}, "job: priority must be a whole number from -2,147,483,648 to"
                                             " 2,147,483,647, not 2147483648"),
    ({"command": "true", "priority": -(2**31) - 1}, "from -2,147,483,648 to 2,147,483,647"),
    ({"command": "true", "priority": 10**100}, "not a 333-bit number"),
    # timeout: positive, at most 30 days
    ({"command": "true", "timeout": -1}, "job: timeout must be a positive number of seconds, not -1"),
    ({"command": "true", "timeout": 0}, "job: timeout must be a positive number of seconds, not 0"),
    ({"command": "true", "timeout": "soon"}, "job: timeout must be a positive number of seconds, not 'soon'"),
    ({"command": "true", "timeout": float("nan")}, "timeout must be a positive number of seconds, not nan"),
    ({"command": "true", "timeout": float("inf")}, "timeout must be a positive number of seconds, not inf"),
    ({"command": "true", "timeout": True}, "timeout must be a positive number of seconds, not True"),
    ({"command": "true", "timeout": v.MAX_TIMEOUT + 1}, "job: timeout must be at most 2,592,000 seconds (30 days),"
                                                        " not 2592001"),
    # retries
    ({"command": "true", "retries": -1}, "job: retries must be a whole number from 0 to 100, not -1"),
    ({"command": "true", "retries": 101}, "job: retries must be a whole number from 0 to 100, not 101"),
    ({"command": "true", "retries": "3"}, "job: retries must be a whole number from 0 to 100, not '3'"),
    # tags: non-empty single words
    ({"command": "true", "tags": "gpu"}, "job: tags must be a list of non-empty strings, not 'gpu'"),
    ({"command": "true", "tags": ["gpu", ""]}, "job: tags must be a list of non-empty strings, not one that holds ''"),
    ({"command": "true", "tags": ["gpu", 3]}, "tags must be a list of non-empty strings, not one that holds 3"),
    ({"command": "true", "tags": ["a,b"]}, "job: tags must be single words without commas or whitespace, not 'a,b'"),
    ({"command": "true", "tags": ["a b"]}, "tags must be single words without commas or whitespace, not 'a b'"),
    ({"command": "true", "tags": ["a\tb"]}, "tags must be single words without commas or whitespace"),
    ({"command": "true", "tags": ["a\u00a0b"]}, "tags must be single words without commas or whitespace"),
    ({"command": "true", "tags": ["\x1b[2J"]}, "tags must be single words without commas or whitespace"),
])
def test_each_rule_refuses_with_one_line_naming_the_field(spec: Any, message: str) -> None:
    assert message in refused(spec)


def test_where_names_the_job() -> None:
    assert refused({"command": ""}, "job 3 of 10") == (
        "job 3 of 10: the command is empty (give the command after --, e.g. corral submit -- echo hi)")


def test_what_is_refused_is_never_shown_whole() -> None:
    """Untrusted input is pictured in a bounded way: no repr() of a megabyte, no str() of a huge int."""
    assert len(refused({"command": "true", "priority": "x" * 10**6})) < 200
    assert "a 3322-bit number" in refused({"command": "true", "priority": 10**1000})
    assert len(refused([list(range(10**5))])) < 200


def test_good_specs_pass_normalised() -> None:
    checked = v.check({"command": "make", "tags": ["b", "a", "b"], "timeout": 5, "priority": v.MIN_PRIORITY,
                       "retries": v.MAX_RETRIES, "env": {"PATH": "/bin", "UNI": "é"}, "cwd": "/tmp", "name": "n"})
    assert checked.tags == ("a", "b") and checked.timeout == 5.0 and type(checked.timeout) is float
    assert checked.priority == v.MIN_PRIORITY and checked.retries == v.MAX_RETRIES and checked.name == "n"
    assert v.check({"command": "true", "priority": v.MAX_PRIORITY, "timeout": v.MAX_TIMEOUT}).timeout == v.MAX_TIMEOUT
    plain = v.check({"command": "true"})
    assert (plain.name, plain.env, plain.cwd, plain.priority, plain.timeout, plain.retries, plain.tags) == (
        "", {}, None, 0, None, 0, ())
    assert v.check({"func": FUNC, "payload": b"x" * v.MAX_JOB_BYTES}).func == FUNC  # exactly the limit
    assert v.check({"command": "x" * v.MAX_JOB_BYTES}).command  # exactly the limit


def test_validate_returns_a_jobspec_from_a_jobspec_or_a_mapping() -> None:
    spec = JobSpec(command="true", tags=("z", "a"), timeout=3)
    assert v.validate(spec) == JobSpec(command="true", tags=("a", "z"), timeout=3.0)
    assert v.validate({"func": FUNC, "payload": b"p"}) == JobSpec(func=FUNC, payload=b"p")
    assert tuple(v.check(spec)) == tuple(v.validate(spec).__dict__.values())  # Checked is JobSpec's order
    with pytest.raises(BadJobSpec, match="job: func must be a 'module:function' string"):
        v.validate(JobSpec(func=a_function))  # type: ignore[arg-type]


def test_invalid_crosses_processes_whole() -> None:
    error = v.Invalid("priority", "must be a whole number, not 'x'", "a hint")
    again = pickle.loads(pickle.dumps(error))
    assert (again.field, again.problem, again.hint, str(again)) == (
        "priority", "must be a whole number, not 'x'", "a hint", "priority must be a whole number, not 'x' (a hint)")
    assert isinstance(again, BadJobSpec)


# ---- the operator's text: the same rules, the text quoted as typed ---------------------------------

@pytest.mark.parametrize("parse, text, problem", ids=lambda x: getattr(x, "__name__", repr(x)[:20]), argvalues=[
    (v.parse_count, "ten", "must be a whole number, not 'ten'"),
    (v.parse_count, "", "must be a whole number, not ''"),
    (v.parse_count, "0", "must be a whole number from 1 to 100,000, not '0'"),
    (v.parse_count, "100001", "must be a whole number from 1 to 100,000, not '100001'"),
    (v.parse_count, "1.5", "must be a whole number, not '1.5'"),
    (v.parse_count, "٣", "must be a whole number, not '٣'"),  # digits, but not ASCII ones
    (v.parse_priority, "1e3", "must be a whole number, not '1e3'"),
    (v.parse_priority, "2147483648", "must be a whole number from -2,147,483,648 to 2,147,483,647, not '2147483648'"),
    (v.parse_priority, "9" * 5000, "must be a whole number from -2,147,483,648 to 2,147,483,647"),
    (v.parse_priority, "-" + "9" * 40, "must be a whole number from -2,147,483,648"),
    (v.parse_retries, "-2", "must be a whole number from 0 to 100, not '-2'"),
    (v.parse_retries, "many", "must be a whole number, not 'many'"),
    (v.parse_timeout, "abc", "must be a number of seconds, not 'abc'"),
    (v.parse_timeout, "0", "must be a positive number of seconds, not '0'"),
    (v.parse_timeout, "-1", "must be a positive number of seconds, not '-1'"),
    (v.parse_timeout, "nan", "must be a positive number of seconds, not 'nan'"),
    (v.parse_timeout, "1e9", "must be at most 2,592,000 seconds (30 days), not '1e9'"),
    (v.parse_env_pair, "NOEQUALS", "must be NAME=VALUE, not 'NOEQUALS'"),
    (v.parse_env_pair, "=x", "must be NAME=VALUE, not '=x'"),
    (v.parse_env_pair, "A=\x00", "value of 'A' holds a NUL character"),
    (v.parse_tags, "gpu, a b", "must be single words without commas or whitespace, not 'a b'"),
    (v.tag_rule, "a,b", "must be single words without commas or whitespace, not 'a,b'"),
])
def test_text_rules_quote_what_was_typed(parse: Any, text: str, problem: str) -> None:
    with pytest.raises(v.Invalid) as caught:
        parse(text)
    assert caught.value.problem.startswith(problem) and len(caught.value.problem) < 200


def test_text_rules_accept_what_they_should() -> None:
    assert (v.parse_count("100000"), v.parse_count(" 3 "), v.parse_priority("+5"), v.parse_priority("-2147483648")) == (
        100_000, 3, 5, -(2**31))
    assert (v.parse_timeout("2592000"), v.parse_timeout("0.5"), v.parse_retries("100")) == (2_592_000.0, 0.5, 100)
    assert v.parse_env_pair("A=b=c") == ("A", "b=c") and v.parse_env_pair("A=") == ("A", "")
    assert v.parse_tags(" gpu,linux , gpu,, ") == ("gpu", "linux")


# ---- the CLI's job options: argparse types over the same rules -------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--priority", "3000000000"], "argument --priority: must be a whole number from -2,147,483,648 to 2,147,483,647"),
    (["--priority", "high"], "argument --priority: must be a whole number, not 'high'"),
    (["--timeout", "-1"], "argument --timeout: must be a positive number of seconds, not '-1'"),
    (["--timeout", "1e9"], "argument --timeout: must be at most 2,592,000 seconds (30 days)"),
    (["--count", "100001"], "argument --count: must be a whole number from 1 to 100,000, not '100001'"),
    (["--count", "0"], "argument --count: must be a whole number from 1 to 100,000, not '0'"),
    (["--retries", "101"], "argument --retries: must be a whole number from 0 to 100, not '101'"),
    (["--tag", "a,b"], "argument --tag: must be single words without commas or whitespace, not 'a,b'"),
    (["--tag", "a b"], "argument --tag: must be single words without commas or whitespace, not 'a b'"),
    (["--env", "NOEQUALS"], "argument --env: must be NAME=VALUE, not 'NOEQUALS'"),
    (["--env", "A=\x00"], "argument --env: value of 'A' holds a NUL character"),
    (["--cwd", ""], "argument --cwd: must be a path"),
    (["--name", "n" * 201], "argument --name: must be text of at most 200 characters"),
])
def test_cli_job_options_refuse_in_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["submit", *argv, "--", "true"], ["call", *argv, FUNC]):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(command)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
        assert err.startswith(f"corral {command[0]}: ")


def test_cli_job_options_parse_good_values() -> None:
    args = build_parser().parse_args(["submit", "--priority", "-5", "--timeout", "2.5", "--count", "100000",
                                      "--retries", "3", "--tag", "gpu", "--env", "A=1", "--cwd", "/tmp", "--", "true"])
    assert (args.priority, args.timeout, args.count, args.retries, args.tag, args.env, args.cwd) == (
        -5, 2.5, 100_000, 3, ["gpu"], [("A", "1")], "/tmp")
    master = build_parser().parse_args(["master", "--max-lost", "1000"])  # not a job option: not capped at 100
    assert master.max_lost == 1000


# ---- the submit form: the same rules, errors by field -----------------------------------------------

def form(**values: str) -> tuple[list[JobSpec], dict[str, str]]:
    return parse_submission({"command": "echo hi", "count": "1", "priority": "0", "timeout": "", "retries": "0",
                             "tags": "", **values})


def test_form_shows_each_fields_problem() -> None:
    assert form(count="ten", timeout="0")[1] == {"count": "must be a whole number, not 'ten'",
                                                 "timeout": "must be a positive number of seconds, not '0'"}
    specs, errors = form(command="  ", count="100001", priority="2147483648", retries="101", tags="a b",
                         timeout="1e9")
    assert specs == [] and set(errors) == {"command", "count", "priority", "retries", "tags", "timeout"}
    assert errors["count"] == "must be a whole number from 1 to 100,000, not '100001'"
    assert errors["priority"] == "must be a whole number from -2,147,483,648 to 2,147,483,647, not '2147483648'"
    assert errors["command"] == "give a command, e.g. echo hello"
    assert form(command="echo \x00")[1] == {"command": "holds a NUL character"}
    assert form(command="echo \udcff")[1] == {"command": "is not valid UTF-8 text (it holds a lone surrogate)"}
    assert form(timeout="2592001")[1] == {"timeout": "must be at most 2,592,000 seconds (30 days), not '2592001'"}


def test_form_builds_checked_specs() -> None:
    specs, errors = form(count="3", priority="7", timeout="5", retries="2", tags="gpu, linux,gpu")
    assert errors == {} and len(specs) == 3
    assert [s.env for s in specs] == [{"CORRAL_INDEX": str(i)} for i in range(3)]
    assert {(s.command, s.priority, s.timeout, s.retries, s.tags) for s in specs} == {
        ("echo hi", 7, 5.0, 2, ("gpu", "linux"))}
    assert all(v.validate(s) == s for s in specs)
    one, _ = form(priority="", retries="", timeout="")  # blank optional fields: their defaults
    assert one == [JobSpec(command="echo hi")]


def test_the_limits_are_documented_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    bounded = re.search(r"\*\*Bounded\.\*\*(.*?)\n\n", readme, re.S)
    assert bounded is not None
    text = " ".join(bounded.group(1).split())
    for figure in ("100,000 jobs", "1 MiB", "200 characters", "100 retries", "-2,147,483,648", "2,147,483,647",
                   "30 days"):
        assert figure in text, figure


# ---- the other arguments of the master's calls --------------------------------------------------

@pytest.mark.parametrize("value, kept", [(None, None), (0, 0.0), (2.5, 2.5), (10**6, v.MAX_POLL),
                                         (float("inf"), v.MAX_POLL)])
def test_a_long_poll_waits_at_most_max_poll(value: Any, kept: float | None) -> None:
    assert v.poll_rule(value) == kept


@pytest.mark.parametrize("value", ["soon", -1, float("nan"), True, [1], b"1"])
def test_a_long_poll_of_anything_else_is_refused_in_one_line(value: Any) -> None:
    with pytest.raises(BadCall) as caught:
        v.poll_rule(value, "wait")
    assert str(caught.value).startswith("wait must be a number of seconds (0 or more), not ")


@pytest.mark.parametrize("value", [-1, 10**100, v.MAX_LIST + 1, 1.0, "5", True, None])
def test_limits_are_whole_numbers_sqlite_can_hold(value: Any) -> None:
    with pytest.raises(BadCall, match="limit must be a whole number from 0 to 1,000,000,000, not"):
        v.limit_rule(value)
    assert v.limit_rule(0) == 0 and v.limit_rule(v.MAX_LIST) == v.MAX_LIST


def test_command_words_are_any_text_the_command_can_carry() -> None:
    assert v.command_word_rule("") == "" and v.command_word_rule("café") == "café"
    with pytest.raises(v.Invalid, match="word 'caf\\\\udce9' is not valid UTF-8 text"):
        v.command_word_rule("caf\udce9")  # how Python hands over argv bytes that are not UTF-8
    with pytest.raises(v.Invalid, match="holds a NUL character"):
        v.command_word_rule("a\x00")


def test_the_cli_refuses_a_bad_command_or_function_name_as_a_malformed_command_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    for argv, said in [(["submit", "--", "echo", "caf\udce9"], "corral submit: argument command: word 'caf\\udce9'"
                        " is not valid UTF-8 text"),
                       (["call", "not a function"], "corral call: argument module:function: 'not a function' is not"
                        " a module:function name")]:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(said) and err.count("\n") == 1, err
    assert build_parser().parse_args(["submit", "--", "echo", ""]).command == ["--", "echo", ""]
    assert build_parser().parse_args(["call", FUNC]).func == FUNC
