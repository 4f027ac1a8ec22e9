"""The host commands: hosts (list, add, remove), deploy and stop; the master does the SSH, this follows its progress."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

from corral.agent.errors import CorralError

from ..client import Client
from ..errors import AuthFailed
from ..state import StateDir
from . import render
from .render import EXIT_ERROR

if TYPE_CHECKING:
    from ..deploy.inventory import Inventory

# console/deploy is imported inside the commands: it brings paramiko, which no other command needs.


def _inventory(args: argparse.Namespace) -> Inventory:
    from ..deploy.inventory import Inventory

    return Inventory(StateDir(args.home_path).trusted_home())


def _deployments(args: argparse.Namespace) -> dict[str, Any]:
    from ..deploy.records import Deployments

    return {alias: record.to_json() for alias, record in Deployments(StateDir(args.home_path).trusted_home()).all().items()}


def cmd_hosts(args: argparse.Namespace) -> int:
    if args.hosts_cmd == "add":
        return _hosts_add(args)
    if args.hosts_cmd == "remove":
        return _hosts_remove(args)
    inventory = _inventory(args)
    hosts = inventory.hosts()
    deployed = _deployments(args)
    if args.json:
        print(render.to_json([dict(h.to_wire(), deployed=deployed.get(h.alias)) for h in hosts]))
        return 0
    print(render.hosts_table(hosts, deployed))
    if not hosts:
        print(f"(no hosts: add one with `corral hosts add ALIAS --hostname ...`, or to {inventory.config_path})")
    return 0


def _hosts_add(args: argparse.Namespace) -> int:
    StateDir(args.home_path).ensure()
    values = {"hostname": args.hostname, "port": args.port, "user": args.user,
              "identity": os.path.abspath(os.path.expanduser(args.identity)) if args.identity else None,
              "slots": args.slots, "tags": args.tags, "python": args.python, "remote_dir": args.remote_dir,
              "direct": args.direct, "proxy_jump": args.proxy_jump}
    inventory = _inventory(args)
    host = inventory.add(args.alias, values, replace_existing=args.replace)
    print(f"added {host.alias}: {host.target} (in {inventory.hosts_path})")
    return 0


def _hosts_remove(args: argparse.Namespace) -> int:
    try:
        client: Client | None = Client(home=args.home_path)
    except AuthFailed:
        raise
    except CorralError:  # no master recorded, or none answering: only the hosts file can change
        client = None
    if client is None:
        record = _deployments(args).get(args.alias)
        if record and not args.force:
            what = "has its agent's bundle" if record.get("stopped") else "has an agent deployed"
            raise CorralError(f"{args.alias} {what}, and no master is running to remove it",
                              "start the master (`corral master`) and run this again, or add --force to forget the host anyway")
        _inventory(args).remove(args.alias)
        if record:
            from ..deploy.records import Deployments

            Deployments(StateDir(args.home_path).home).drop(args.alias)
            print(f"corral hosts: {args.alias}'s files stay in {record.get('dir', '?')} on the host (--force)", file=sys.stderr)
        print(f"removed {args.alias}")
        return 0
    with client:
        return _follow(client, client.remove_hosts([args.alias], force=args.force), "removed", [args.alias])


_STATUS_WORDS = {"ok": "ok", "skip": "skip", "fail": "FAILED", "wait": "WAIT", "info": "-"}


def _follow(client: Client, op_id: str, verb: str, aliases: Sequence[str]) -> int:
    """Print one line per host per step as the master reports them; a summary; exit 1 if a host failed."""
    width = max(len(a) for a in aliases)

    def show(event: dict[str, Any]) -> None:
        if event["status"] == "start":
            return
        word = _STATUS_WORDS.get(event["status"], event["status"])
        print(f"{event['host']:<{width}}  {event['step']:<8} {word:<6} {event['message']}", flush=True)

    try:
        final = client.follow_operation(op_id, show)
    except KeyboardInterrupt:
        print(f"corral: interrupted; operation {op_id} carries on in the master", file=sys.stderr)
        raise
    hosts = final["hosts"]
    ok, failed = final["ok"], final["failed"]
    for alias in failed:
        h = hosts[alias]
        hint = f" — {h['hint']}" if h["hint"] else ""
        print(f"corral {final['kind']}: {h['error']}{hint}", file=sys.stderr)
        if h["log_tail"].strip():
            print(f"  last lines of {alias}'s agent log:", file=sys.stderr)
            for line in h["log_tail"].rstrip("\n").splitlines():
                print(f"  | {line}", file=sys.stderr)
    summary = f"{verb} {len(ok)} of {len(hosts)} host{'s' if len(hosts) != 1 else ''}"
    print(summary + (f" ({', '.join(failed)} failed)" if failed else ""), flush=True)
    return EXIT_ERROR if failed else 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from ..deploy.inventory import parse_tags

    tags = list(parse_tags(args.tags, "--tags")) if args.tags is not None else None
    with Client(home=args.home_path) as client:
        op_id = client.deploy(args.aliases, slots=args.slots, tags=tags, accept_new=args.accept_new,
                              direct=args.direct, ready_timeout=args.ready_timeout, reconnect=args.reconnect)
        return _follow(client, op_id, "deployed", args.aliases)


def cmd_stop(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.drain:
        raise CorralError("--timeout only applies with --drain", "a stop without --drain is immediate")
    with Client(home=args.home_path) as client:
        op_id = client.stop_agents(args.aliases, drain=args.drain, drain_timeout=args.timeout)
        return _follow(client, op_id, "stopped", args.aliases)
