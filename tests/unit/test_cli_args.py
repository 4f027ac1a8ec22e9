"""The `corral` command line in-process: argument types, the parser's one-line errors, and main's exit codes."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest

from corral.console.cli import main
from corral.console.cli.args import _count, _home, _job, _job_id, _port, _retries, _seconds, _state, build_parser
from corral.console.master import validate
from corral.console.cli.render import (EXIT_TIMEOUT, EXIT_USAGE, job_exit_code, jsonable, os_error_text, table,
                                       value_repr)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Parse argv, which must be refused: exit 2 and exactly one line on stderr, naming the subcommand's help."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(list(argv))
    assert exited.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
    return err.rstrip("\n")


# ---- argument types ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("1", 1.0), ("0.25", 0.25), ("1e3", 1000.0)])
def test_seconds_takes_positive_finite_numbers(text: str, value: float) -> None:
    assert _seconds(text) == value


@pytest.mark.parametrize("text, message", [
    ("abc", "must be a number of seconds, not 'abc'"),
    ("0", "must be a positive number of seconds, not '0'"),
    ("-1", "must be a positive number of seconds, not '-1'"),
    ("inf", "must be a positive number of seconds, not 'inf'"),
    ("nan", "must be a positive number of seconds, not 'nan'"),
])
def test_seconds_refuses_the_rest(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$"):
        _seconds(text)


def test_whole_numbers_counts_and_retries() -> None:
    assert _count("3") == 3 and _job(validate.parse_priority)("-5") == -5 and _retries("0") == 0
    for bad in ("0", "-1", "x", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
            _count(bad)
    for bad in ("-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 0"):
            _retries(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="must be a whole number"):
        _job(validate.parse_priority)("1.5")


def test_env_pairs_split_at_the_first_equals_sign() -> None:
    env_pair = _job(validate.parse_env_pair)
    assert env_pair("A=1") == ("A", "1")
    assert env_pair("A=") == ("A", "")
    assert env_pair("URL=a=b") == ("URL", "a=b")
    for bad in ("A", "=1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="must be NAME=VALUE"):
            env_pair(bad)


def test_job_ids_ports_and_states() -> None:
    assert _job_id("12") == 12 and _port("22") == 22 and _port("65535") == 65535
    with pytest.raises(argparse.ArgumentTypeError, match="a job id is a whole number, not '-3'"):
        _job_id("-3")
    for bad in ("0", "65536", "ssh"):
        with pytest.raises(argparse.ArgumentTypeError, match="from 1 to 65535"):
            _port(bad)
    assert _state("queued") == "queued"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown state 'finished'; one of queued, running, done"):
        _state("finished")


def test_home_expands_the_tilde_and_empty_means_the_default() -> None:
    assert _home("~/x") == Path.home() / "x"
    assert _home("") is None


# ---- the parser -------------------------------------------------------------------------------

def test_a_bad_value_names_the_subcommand_and_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error(capsys, "submit", "--count", "0", "--", "true") == (
        "corral submit: argument --count: must be a whole number from 1 to 100,000, not '0' (see corral submit --help)")
    assert usage_error(capsys, "hosts", "add", "h", "--port", "0") == (
        "corral hosts add: argument --port: must be a port number from 1 to 65535, not '0'"
        " (see corral hosts add --help)")
    assert usage_error(capsys, "--slots", "0") == (
        "corral: argument --slots: must be a whole number of at least 1, not '0' (see corral --help)")


def test_unknown_commands_missing_and_unrecognized_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error(capsys, "bogus").startswith("corral: argument COMMAND: invalid choice: 'bogus'")
    assert usage_error(capsys, "show") == "corral show: the following arguments are required: id (see corral show --help)"
    assert usage_error(capsys, "cancel", "1", "x") == (
        "corral cancel: argument ID: a job id is a whole number, not 'x' (see corral cancel --help)")
    assert usage_error(capsys, "jobs", "--bogus") == "corral: unrecognized arguments: --bogus (see corral --help)"


def test_what_the_commands_receive() -> None:
    parser = build_parser()
    args = parser.parse_args(["--home", "/tmp/h", "submit", "--env", "A=1", "--tag", "gpu", "--tag", "x",
                              "--timeout", "2", "--", "echo", "hi"])
    assert args.cmd == "submit" and args.home_path == Path("/tmp/h")
    assert args.env == [("A", "1")] and args.tag == ["gpu", "x"] and args.timeout == 2.0
    assert args.command == ["--", "echo", "hi"] and args.count == 1 and not args.wait
    args = parser.parse_args(["master"])
    assert (args.listen, args.lease, args.max_lost, args.home_path) == ("127.0.0.1:0", 10.0, 3, None)
    args = parser.parse_args(["agent", "--name", "a", "--slots", "2"])  # the agent's own options, as a parent parser
    assert (args.name, args.slots, args.started_by) == ("a", 2, "manual")
    args = parser.parse_args([])
    assert args.cmd is None and not args.no_local_agent and args.console_slots is None


# ---- main: errors become one line and an exit status ---------------------------------------------

def test_main_turns_a_corral_error_into_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    assert main(["status"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (f"corral status: no master is recorded in {tmp_path}"
                                 " — start one with `corral master` (or just `corral`)\n")
    assert main(["submit", "--", " "]) == 1
    assert capsys.readouterr().err == "corral submit: no command given — put it after --, e.g. corral submit -- echo hello\n"
    assert main(["call", "m:f", "not-json"]) == 1
    assert capsys.readouterr().err == "corral call: argument 'not-json' is not JSON — quote strings as JSON: '\"text\"'\n"


def test_os_errors_read_as_words() -> None:
    assert os_error_text(PermissionError(13, "Permission denied", "/srv/h/hosts")) == "Permission denied: /srv/h/hosts"
    assert os_error_text(OSError(98, "Address already in use")) == "Address already in use"
    assert os_error_text(OSError()) == "OSError"


# ---- what the commands print ------------------------------------------------------------------

def test_exit_codes_of_finished_jobs() -> None:
    def code(state: str, exit_code: int | None) -> int:
        return job_exit_code({"state": state, "exit_code": exit_code})

    assert code("done", 0) == 0
    assert code("timeout", None) == EXIT_TIMEOUT
    assert code("failed", 3) == 3
    assert code("failed", -9) == 137  # killed by SIGKILL, as a shell reports it
    assert code("failed", None) == code("cancelled", None) == code("lost", None) == 1


def test_tables_pad_columns_and_trim_the_last() -> None:
    assert table([["1", "done", ""], ["22", "queued", "x"]], ["ID", "STATE", "NAME"]) == (
        "ID  STATE   NAME\n1   done\n22  queued  x")
    assert table([], ["ID", "STATE"]) == "ID  STATE"


class Shipped:
    """A return value's class; its pickle is made to name a module only the agent's host has."""


def test_a_value_this_machine_cannot_unpickle_is_described_not_raised() -> None:
    readable = pickle.dumps({"a": 1})
    # Protocol 0 names the class as text (`c<module>\n<name>\n`), so the module's name can be swapped.
    unreadable = pickle.dumps(Shipped(), protocol=0).replace(__name__.encode(), b"only_on_the_agent")
    assert b"only_on_the_agent" in unreadable
    assert value_repr(readable) == "{'a': 1}"
    # Not plain data: described by the class it names and its size, never unpickled in full (values.py).
    assert value_repr(unreadable) == f"<pickled only_on_the_agent.Shipped, {len(unreadable)} bytes>"
    record = {"id": 1, "payload": b"...", "value": unreadable}
    assert jsonable(record) == {"id": 1, "value": value_repr(unreadable)}
    assert jsonable({"id": 2, "value": pickle.dumps(3)}) == {"id": 2, "value": 3}
    assert jsonable({"id": 3, "value": pickle.dumps({1, 2})}) == {"id": 3, "value": "{1, 2}"}
