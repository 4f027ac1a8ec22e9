"""The `corral` command line: argument types with messages an operator understands, and the parser of every subcommand."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, NoReturn

from corral.agent.protocol import JobState

from ..master import validate
from .render import EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, with the subcommand's name."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ---- argument types with messages an operator understands --------------------------------

def _positive(unit: str) -> Callable[[str], float]:
    """An argument type: a positive, finite number of `unit` (seconds, days)."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of {unit}, not {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number of {unit}, not {text!r}")
        return value

    return convert


_seconds = _positive("seconds")
_days = _positive("days")


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _retries(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, not {text!r}")
    return int(text)


def _job(rule: Callable[[str], Any]) -> Callable[[str], Any]:
    """A job option's type: one of the job-spec rules the master and the form use (master/validate.py),
    its problem ("must be ...") as argparse's message."""
    def convert(text: str) -> Any:
        try:
            return rule(text)
        except validate.Invalid as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None

    return convert


def _job_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a job id is a whole number, not {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {text!r}")
    return int(text)


def _state(text: str) -> str:
    names = [s.value for s in JobState]
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown state {text!r}; one of {', '.join(names)}")
    return text


def _home(text: str) -> Path | None:
    """--home DIR, with ~ expanded; an empty one means the default, as no --home does."""
    return Path(text).expanduser() if text else None


# ---- the parser ---------------------------------------------------------------------------
# Subcommands are added in the order `corral --help` lists them: the cluster's processes, the job
# commands, the cluster's views, then SSH deployment.

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="corral", description="A cluster operations console: run jobs on the machines you can SSH into.")
    parser.add_argument("--home", dest="home_path", type=_home, metavar="HOME",
                        help="state directory (default: $CORRAL_HOME or ~/.local/state/corral)")
    parser.add_argument("--no-local-agent", action="store_true",
                        help="console only: when it starts the master, do not also start a local agent")
    parser.add_argument("--slots", dest="console_slots", type=_count, metavar="N",
                        help="console only: slots of the local agent it starts (default: CPU count)")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    _add_processes(sub)
    _add_job_commands(sub)
    _add_views(sub)
    _add_host_commands(sub)
    return parser


def _add_processes(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("master", help="run the job master (foreground)")
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:0", help="address (default: loopback, port chosen by the OS)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --listen")
    p.add_argument("--lease", type=_seconds, default=10.0, help="seconds an agent may stay silent before it is lost (default 10)")
    p.add_argument("--max-lost", type=_retries, default=3, help="a job whose agent is lost more than N times ends `lost` (default 3)")
    p.add_argument("--fsync", action="store_true", help="fsync every journal commit (survives power loss; slower)")
    p.add_argument("--keep-finished", type=_days, metavar="DAYS",
                   help="delete finished jobs (and their attempts) DAYS after they ended (default: keep all)")
    p.add_argument("--keep-finished-count", type=_count, metavar="N",
                   help="keep at most the N most recently finished jobs (default: keep all)")
    p.add_argument("-v", "--verbose", action="store_true", help="print one line per event")

    from corral.agent.__main__ import build_parser as agent_parser

    # argparse copies only a parent's arguments, so its class does not matter (typeshed wants ours).
    sub.add_parser("agent", help="run an agent on this machine (foreground)",
                   parents=[agent_parser(add_help=False)])  # type: ignore[list-item]


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", type=_job(validate.name_rule), default="", help="a name for the job")
    p.add_argument("--priority", type=_job(validate.parse_priority), default=0,
                   help="higher runs first (default 0; a 32-bit signed integer)")
    p.add_argument("--timeout", type=_job(validate.parse_timeout),
                   help="seconds before the job's process group is killed (at most 30 days)")
    p.add_argument("--retries", type=_job(validate.parse_retries), default=0,
                   help=f"re-run a failed job up to N times (at most {validate.MAX_RETRIES})")
    p.add_argument("--tag", action="append", type=_job(validate.tag_rule), default=[],
                   help="run only on agents with this tag (repeatable)")
    p.add_argument("--env", action="append", type=_job(validate.parse_env_pair), default=[], metavar="K=V",
                   help="environment variable (repeatable)")
    p.add_argument("--cwd", type=_job(validate.cwd_rule),
                   help="working directory on the agent (a callable's cwd is on its sys.path)")
    p.add_argument("--ship", action="append", default=[], metavar="DIR",
                   help="send this folder's code with the job, ahead of the rest of its sys.path (PYTHONPATH for a"
                   " command); see README 'Shipping code' (repeatable)")
    p.add_argument("--count", type=_job(validate.parse_count), default=1,
                   help=f"submit N copies (at most {validate.MAX_JOBS:,}), with CORRAL_INDEX=0..N-1")
    p.add_argument("--wait", action="store_true", help="wait, print the output, exit with the job's exit code")


def _add_job_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("submit", help="submit a shell command: corral submit [OPTIONS] -- COMMAND...")
    _job_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, type=_job(validate.command_word_rule),
                   help="the command; one argument is shell text, several are quoted")

    p = sub.add_parser("call", help="submit a Python callable: corral call module:function [JSON ARGS...]")
    _job_options(p)
    p.add_argument("func", metavar="module:function", type=_job(validate.func_rule))
    p.add_argument("args", nargs="*", metavar="ARG", help="arguments, each as JSON (e.g. 3 '\"text\"' '[1,2]')")

    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--state", type=_state, action="append", help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=_count, default=50, help="at most N jobs (default 50)")
    p.add_argument("--before", type=_job_id, metavar="ID", help="only jobs older than job ID: the next page")
    p.add_argument("--json", action="store_true", help="JSON output (see README)")

    p = sub.add_parser("show", help="one job, with every attempt's output")
    p.add_argument("id", type=_job_id)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true")
    how.add_argument("--raw", action="store_true",
                     help="only the output of the job's last attempt, its bytes as the job wrote them"
                          " (stdout to stdout, stderr to stderr)")

    p = sub.add_parser("cancel", help="cancel jobs (running ones are killed within a second)")
    p.add_argument("ids", type=_job_id, nargs="*", metavar="ID")
    p.add_argument("--batch", metavar="NAME", help="every queued or running job of a batch (e.g. pool-3)")

    p = sub.add_parser("requeue", help="submit finished jobs again (new ids)")
    p.add_argument("ids", type=_job_id, nargs="+", metavar="ID")

    p = sub.add_parser("wait", help="wait for jobs to finish; exit code as with submit --wait")
    p.add_argument("ids", type=_job_id, nargs="+", metavar="ID")
    p.add_argument("--timeout", type=_seconds, help="give up after this many seconds (exit 124)")


def _add_views(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("status", help="counts by state, agents and slots")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("agents", help="the agents and what they are doing")
    p.add_argument("--json", action="store_true")


def _add_host_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("hosts", help="the hosts agents can be deployed to (~/.ssh/config + corral's hosts file)")
    p.add_argument("--json", action="store_true")
    hosts = p.add_subparsers(dest="hosts_cmd", metavar="ACTION", parser_class=_Parser)
    h = hosts.add_parser("add", help="add a host to corral's hosts file")
    h.add_argument("alias", metavar="ALIAS")
    h.add_argument("--hostname", help="address or DNS name (needed unless ALIAS is in ~/.ssh/config)")
    h.add_argument("--port", type=_port, help="SSH port (default 22, or ~/.ssh/config's)")
    h.add_argument("--user", help="remote user (default: ~/.ssh/config's, else yours)")
    h.add_argument("--identity", metavar="FILE", help="private key file (default: ~/.ssh/config's IdentityFile, else ~/.ssh/id_*)")
    h.add_argument("--slots", type=_count, help="jobs the agent runs at once (default: the host's CPU count)")
    h.add_argument("--tags", help="comma-separated tags of the host's agent")
    h.add_argument("--python", metavar="PATH", help="the Python to run the agent with (default: find python3 >= 3.8)")
    h.add_argument("--remote-dir", metavar="DIR", help="where the bundle, authkey and log go (default ~/.cache/corral)")
    h.add_argument("--direct", action="store_true", default=None,
                   help="the agent dials the master's --listen address instead of an SSH tunnel")
    h.add_argument("--proxy-jump", metavar="HOST", help="reach the host through this SSH host")
    h.add_argument("--replace", action="store_true", help="replace an entry of the same alias")
    h = hosts.add_parser("remove", help="stop the host's agent, remove its bundle, drop it from corral's hosts file")
    h.add_argument("alias", metavar="ALIAS")
    h.add_argument("--force", action="store_true", help="forget the host even if its agent or files cannot be removed")

    p = sub.add_parser("deploy", help="deploy agents over SSH (the master holds the connections and tunnels)")
    p.add_argument("aliases", nargs="+", metavar="ALIAS")
    p.add_argument("--slots", type=_count, help="jobs each agent runs at once (default: the host's setting)")
    p.add_argument("--tags", help="comma-separated tags for the agents (instead of the hosts' own)")
    p.add_argument("--accept-new", action="store_true",
                   help="accept an unknown host key (recorded in corral's known_hosts); a changed key is still refused")
    p.add_argument("--direct", action="store_true", default=None,
                   help="agents dial the master's --listen address instead of an SSH tunnel")
    p.add_argument("--ready-timeout", type=_seconds, default=30.0, help="seconds to wait for each agent to register (default 30)")
    p.add_argument("--reconnect", action="store_true", help="drop the master's SSH connection to the hosts and connect afresh")

    p = sub.add_parser("stop", help="stop deployed agents over SSH (running jobs are killed and re-queued)")
    p.add_argument("aliases", nargs="+", metavar="ALIAS")
    p.add_argument("--drain", action="store_true", help="let running jobs finish first (no new ones start)")
    p.add_argument("--timeout", type=_seconds, help="with --drain: give up after this many seconds")
