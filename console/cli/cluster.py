"""The cluster commands: run a master or an agent in the foreground; the status and agents views."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from corral.agent.errors import CorralError
from corral.agent.statedir import parse_address

from ..client import Client
from ..state import StateDir
from . import render


def cmd_master(args: argparse.Namespace) -> int:
    # Imported here: the other commands need neither the scheduler nor paramiko.
    from ..deploy import DEPLOY_TYPEID
    from ..deploy.service import EXPOSED, DeployService
    from ..master.records import Retention
    from ..master.server import is_loopback, register_service, serve

    register_service(DEPLOY_TYPEID, EXPOSED)

    host, port = parse_address(args.listen, allow_any_port=True)
    if not is_loopback(host):
        if not args.allow_remote:
            raise CorralError(f"refusing to listen on {host}: the master listens on loopback only",
                              "remote agents reach it through SSH tunnels; add --allow-remote to open the port anyway")
        print(f"corral master: WARNING: listening on {host}:{port}; anyone who can reach it and holds the authkey can run jobs",
              file=sys.stderr)
    state = StateDir(args.home_path)
    retention = Retention(days=args.keep_finished, count=args.keep_finished_count)
    return serve(state, host, port, verbose=args.verbose, lease=args.lease, max_lost=args.max_lost, fsync=args.fsync,
                 retention=retention, services={DEPLOY_TYPEID: functools.partial(DeployService, state)})


def cmd_agent(args: argparse.Namespace) -> int:
    from corral.agent.__main__ import run_agent

    if args.home_path is not None:
        os.environ["CORRAL_HOME"] = str(args.home_path)
    return run_agent(args)


def cmd_status(args: argparse.Namespace) -> int:
    with Client(home=args.home_path) as client:
        status = client.status()
    print(render.to_json(status) if args.json else render.status_text(status))
    return 0


def cmd_agents(args: argparse.Namespace) -> int:
    with Client(home=args.home_path) as client:
        agents = client.agents()
    print(render.to_json(agents) if args.json else render.agents_table(agents))
    return 0
