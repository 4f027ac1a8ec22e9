"""`python -m corral.agent` and the zipapp's entry point: parse arguments, then run the agent until stopped."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import uuid
from multiprocessing import AuthenticationError
from pathlib import Path
from typing import List, Optional

from . import contain
from .errors import CorralError, NameTaken
from .protocol import AgentInfo
from .runner import Agent, default_name, install_signal_handlers, python_version
from .statedir import authkey_path, check_trusted, default_home, parse_address, read_authkey, read_master_address


def build_parser(prog: str = "python -m corral.agent", add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, add_help=add_help,
                                     description="Run a corral agent: take jobs from a master and run them.")
    parser.add_argument("--connect", metavar="HOST:PORT", help="the master's address (default: the one in the state directory)")
    parser.add_argument("--authkey-file", metavar="PATH", help="file holding the cluster's authkey (or $CORRAL_AUTHKEY_FILE)")
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="jobs run at once (default: CPU count)")
    parser.add_argument("--name", default=None, help="this agent's name (default: the host name)")
    parser.add_argument("--tags", default="", help="comma-separated tags; a tagged job runs only on agents with all its tags")
    parser.add_argument("--spool", metavar="DIR", help="directory where unreported results wait while the master"
                        " is away (default: <state dir>/spool)")
    parser.add_argument("--containment", choices=contain.WANTS, default="auto",
                        help="how a job's processes are kept together to be killed at its end: a cgroup v2 per"
                        " job, child subreapers and the descendant tree, or the process group only"
                        " (default auto: the strongest this host allows)")
    parser.add_argument("--started-by", default="manual", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="print a line per job started and finished")
    return parser


def run_agent(args: argparse.Namespace) -> int:
    """Resolve the master and the authkey, then run; CorralError becomes one line and exit 2."""
    try:
        if args.slots < 1:
            raise CorralError(f"--slots must be at least 1, not {args.slots}")
        home = default_home()
        address = parse_address(args.connect) if args.connect else read_master_address(home)
        key_file = authkey_path(home, args.authkey_file)
        authkey = read_authkey(key_file)
        spool = Path(args.spool) if args.spool else home / "spool"
        # Results are loaded back from the spool: it is held to the state directory's rule.
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_trusted(spool, "spool directory", directory=True)
        containment = contain.choose(args.containment)
    except OSError as exc:
        print(f"corral agent: cannot use the spool directory: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    except CorralError as exc:
        print(f"corral agent: {exc}", file=sys.stderr)
        return 2
    tags = tuple(t.strip() for t in args.tags.split(",") if t.strip())
    info = AgentInfo(
        name=args.name or default_name(),
        host=default_name(),
        pid=os.getpid(),
        slots=args.slots,
        tags=tags,
        python=python_version(),
        started_by=args.started_by,
        instance=uuid.uuid4().hex,
        containment=containment.describe(),
    )
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s agent %(levelname)s %(message)s")
    locate = None if args.connect else functools.partial(read_master_address, home)
    agent = Agent(address, authkey, info, verbose=args.verbose, locate=locate,
                  spool=spool, name_is_default=args.name is None, containment=containment)
    install_signal_handlers(agent)
    if args.verbose:
        print(f"Connect to server {address[0]}:{address[1]}...", flush=True)
    try:
        return agent.run()
    except NameTaken as exc:
        print(f"corral agent: {exc}", file=sys.stderr, flush=True)
        return 2
    except AuthenticationError:  # either side's challenge failed: the two keys differ
        print(f"corral agent: the master at {agent.address[0]}:{agent.address[1]} holds another authkey than"
              f" {key_file} (use that master's state directory's authkey: --authkey-file)", file=sys.stderr, flush=True)
        return 1


def main(argv: Optional[List[str]] = None) -> int:
    return run_agent(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
