"""The `corral` command: one subcommand over Client, or the console; an error is one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from corral.agent.errors import CorralError

from ..escape import guard_terminal
from ..state import StateDir
from . import cluster, hosts, jobs
from .args import build_parser
from .render import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PIPE, error_line, os_error_text

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "master": cluster.cmd_master, "agent": cluster.cmd_agent, "submit": jobs.cmd_submit, "call": jobs.cmd_call,
    "jobs": jobs.cmd_jobs, "show": jobs.cmd_show, "cancel": jobs.cmd_cancel, "requeue": jobs.cmd_requeue,
    "wait": jobs.cmd_wait, "status": cluster.cmd_status, "agents": cluster.cmd_agents, "hosts": hosts.cmd_hosts,
    "deploy": hosts.cmd_deploy, "stop": hosts.cmd_stop,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and return the exit status (a bad command line exits 2 from argparse, after its one line)."""
    try:
        try:
            return _run(build_parser().parse_args(argv))
        finally:
            sys.stdout.flush()  # here, not at exit: a reader that has gone shows as BrokenPipeError below
    except BrokenPipeError:
        return _reader_gone()


def _run(args: argparse.Namespace) -> int:
    prog = f"corral {args.cmd}" if args.cmd else "corral"
    try:
        if args.cmd is None:
            from ..tui.launch import run_console  # Textual loads only for the console

            return run_console(StateDir(args.home_path), not args.no_local_agent, args.console_slots)
        guard_terminal()  # whatever a command prints from jobs and agents reaches a terminal escaped
        return COMMANDS[args.cmd](args)
    except CorralError as exc:
        print(error_line(prog, exc), file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        raise  # stdout's reader has gone: main's to handle
    except OSError as exc:  # the machine said no where no CorralError did (a port in use, a full disk): one line too
        print(f"{prog}: {os_error_text(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _reader_gone() -> int:
    """stdout's reader went away (`corral jobs | head -1`): stop quietly, with the status a shell gives a tool
    that SIGPIPE ended. Python ignores SIGPIPE (so a dead socket to the master raises instead of killing us),
    hence the write raised; what is still buffered goes to /dev/null, so the interpreter's last flush is quiet too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE
