"""The `corral` command: argparse subcommands over Client; errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pickle
import shlex
import sys
import time
from typing import Any, Callable, Sequence

from corral.agent.errors import CorralError

from corral.agent.protocol import JobSpec, JobState
from corral.agent.statedir import parse_address

from .client import Client
from .state import StateDir

EXIT_ERROR = 1  # an operation failed (no master, unknown job, refused submission)
EXIT_USAGE = 2  # the command line itself is wrong
EXIT_TIMEOUT = 124  # like timeout(1): a job or a wait ran out of time


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, with the subcommand's name."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ---- argument types with messages an operator understands --------------------------------

def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def _retries(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, not {text!r}")
    return int(text)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE, not {text!r}")
    return key, value


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


# ---- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="corral", description="A cluster operations console: run jobs on the machines you can SSH into.")
    parser.add_argument("--home", help="state directory (default: $CORRAL_HOME or ~/.local/state/corral)")
    parser.add_argument("--no-local-agent", action="store_true",
                        help="console only: when it starts the master, do not also start a local agent")
    parser.add_argument("--slots", dest="console_slots", type=_count, metavar="N",
                        help="console only: slots of the local agent it starts (default: CPU count)")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("master", help="run the job master (foreground)")
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:0", help="address (default: loopback, port chosen by the OS)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --listen")
    p.add_argument("--lease", type=_seconds, default=10.0, help="seconds an agent may stay silent before it is lost (default 10)")
    p.add_argument("--max-lost", type=_retries, default=3, help="a job whose agent is lost more than N times ends `lost` (default 3)")
    p.add_argument("--fsync", action="store_true", help="fsync every journal commit (survives power loss; slower)")
    p.add_argument("-v", "--verbose", action="store_true", help="print one line per event")

    from corral.agent.__main__ import build_parser as agent_parser

    p = sub.add_parser("agent", help="run an agent on this machine (foreground)", parents=[agent_parser(add_help=False)])

    def job_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default="", help="a name for the job")
        p.add_argument("--priority", type=_whole, default=0, help="higher runs first (default 0)")
        p.add_argument("--timeout", type=_seconds, help="seconds before the job's process group is killed")
        p.add_argument("--retries", type=_retries, default=0, help="re-run a failed job up to N times")
        p.add_argument("--tag", action="append", default=[], help="run only on agents with this tag (repeatable)")
        p.add_argument("--env", action="append", type=_env_pair, default=[], metavar="K=V", help="environment variable (repeatable)")
        p.add_argument("--cwd", help="working directory on the agent")
        p.add_argument("--count", type=_count, default=1, help="submit N copies, with CORRAL_INDEX=0..N-1")
        p.add_argument("--wait", action="store_true", help="wait, print the output, exit with the job's exit code")

    p = sub.add_parser("submit", help="submit a shell command: corral submit [OPTIONS] -- COMMAND...")
    job_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command; one argument is shell text, several are quoted")

    p = sub.add_parser("call", help="submit a Python callable: corral call module:function [JSON ARGS...]")
    job_options(p)
    p.add_argument("func", metavar="module:function")
    p.add_argument("args", nargs="*", metavar="ARG", help="arguments, each as JSON (e.g. 3 '\"text\"' '[1,2]')")

    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--state", type=_state, action="append", help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=_count, default=50, help="at most N jobs (default 50)")
    p.add_argument("--json", action="store_true", help="JSON output (see README)")

    p = sub.add_parser("show", help="one job, with every attempt's output")
    p.add_argument("id", type=_job_id)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cancel", help="cancel jobs (running ones are killed within a second)")
    p.add_argument("ids", type=_job_id, nargs="+", metavar="ID")

    p = sub.add_parser("requeue", help="submit finished jobs again (new ids)")
    p.add_argument("ids", type=_job_id, nargs="+", metavar="ID")

    p = sub.add_parser("wait", help="wait for jobs to finish; exit code as with submit --wait")
    p.add_argument("ids", type=_job_id, nargs="+", metavar="ID")
    p.add_argument("--timeout", type=_seconds, help="give up after this many seconds (exit 124)")

    p = sub.add_parser("status", help="counts by state, agents and slots")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("agents", help="the agents and what they are doing")
    p.add_argument("--json", action="store_true")

    # ---- SSH deployment: hosts, deploy, stop (console/deploy) ----
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
    return parser


# ---- commands -------------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> Client:
    return Client(home=args.home_path)


def cmd_master(args: argparse.Namespace) -> int:
    from .deploy import DEPLOY_TYPEID
    from .deploy.service import EXPOSED, DeployService
    from .master.server import is_loopback, register_service, serve

    register_service(DEPLOY_TYPEID, EXPOSED)

    host, port = parse_address(args.listen, allow_any_port=True)
    if not is_loopback(host):
        if not args.allow_remote:
            raise CorralError(f"refusing to listen on {host}: the master listens on loopback only",
                              "remote agents reach it through SSH tunnels; add --allow-remote to open the port anyway")
        print(f"corral master: WARNING: listening on {host}:{port}; anyone who can reach it and holds the authkey can run jobs",
              file=sys.stderr)
    state = StateDir(args.home_path)
    return serve(state, host, port, verbose=args.verbose, lease=args.lease, max_lost=args.max_lost, fsync=args.fsync,
                 services={DEPLOY_TYPEID: functools.partial(DeployService, state)})


def cmd_agent(args: argparse.Namespace) -> int:
    from corral.agent.__main__ import run_agent

    if args.home_path is not None:
        os.environ["CORRAL_HOME"] = str(args.home_path)
    return run_agent(args)


def _specs(args: argparse.Namespace, base: dict[str, Any]) -> list[JobSpec]:
    env = dict(args.env)
    specs = []
    for index in range(args.count):
        job_env = dict(env, CORRAL_INDEX=str(index)) if args.count > 1 else env
        specs.append(JobSpec(name=args.name, env=job_env, cwd=args.cwd, priority=args.priority,
                             timeout=args.timeout, retries=args.retries, tags=tuple(args.tag), **base))
    return specs


def cmd_submit(args: argparse.Namespace) -> int:
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not words or not " ".join(words).strip():
        raise CorralError("no command given", "put it after --, e.g. corral submit -- echo hello")
    command = words[0] if len(words) == 1 else shlex.join(words)
    with _client(args) as client:
        ids = client.submit(_specs(args, {"command": command}))
        if not args.wait:
            print("\n".join(map(str, ids)))
            return 0
        return _wait_and_print(client, ids, None)


def cmd_call(args: argparse.Namespace) -> int:
    values = []
    for text in args.args:
        try:
            values.append(json.loads(text))
        except ValueError:
            raise CorralError(f"argument {text!r} is not JSON", "quote strings as JSON: '\"text\"'") from None
    base = {"func": args.func, "payload": pickle.dumps((tuple(values), {}))}
    with _client(args) as client:
        ids = client.submit(_specs(args, base))
        if not args.wait:
            print("\n".join(map(str, ids)))
            return 0
        return _wait_and_print(client, ids, None)


def _exit_code(record: dict) -> int:
    state, code = record["state"], record["exit_code"]
    if state == JobState.DONE.value:
        return 0
    if state == JobState.TIMEOUT.value:
        return EXIT_TIMEOUT
    if isinstance(code, int) and code != 0:
        return code if code > 0 else 128 - code
    return 1


def _wait_and_print(client: Client, ids: Sequence[int], timeout: float | None) -> int:
    states = client.wait(ids, timeout)
    worst = 0
    for job_id in ids:
        if job_id not in states:
            print(f"corral: job {job_id} still not finished after {timeout:g}s", file=sys.stderr)
            worst = max(worst, EXIT_TIMEOUT)
            continue
        record = client.job(job_id)
        counted = [a for a in record["attempt_list"] if a["counted"]]
        last = counted[-1] if counted else None
        if last is not None:
            sys.stdout.write(last["stdout"])
            sys.stderr.write(last["stderr"])
        if record["func"] and record["state"] == JobState.DONE.value and record["value"] is not None:
            print(repr(pickle.loads(record["value"])))
        if record["state"] != JobState.DONE.value:
            print(f"corral: job {job_id} {record['state']}: {record['error']}", file=sys.stderr)
        worst = max(worst, _exit_code(record))
    sys.stdout.flush()
    return worst


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _wait_and_print(client, args.ids, args.timeout)


def _ago(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def _duration(record: dict) -> str:
    if record.get("started") and record.get("ended"):
        return f"{record['ended'] - record['started']:.2f}s"
    return "-"


def _what(record: dict) -> str:
    text = record["command"] if record["command"] is not None else f"{record['func']}(…)"
    return text if len(text) <= 48 else text[:47] + "…"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _jsonable(record: dict) -> dict:
    """A job record as stable JSON: bytes fields become a decoded value (or its repr), payload is dropped."""
    out = {k: v for k, v in record.items() if k not in ("payload", "value", "attempt_list")}
    if "value" in record:
        value = pickle.loads(record["value"]) if record["value"] is not None else None
        try:
            json.dumps(value)
            out["value"] = value
        except (TypeError, ValueError):
            out["value"] = repr(value)
    if "attempt_list" in record:
        out["attempts_detail"] = [dict(a, counted=bool(a["counted"])) for a in record["attempt_list"]]
    return out


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        records = client.jobs(args.state, args.limit)
    if args.json:
        print(json.dumps([_jsonable(r) for r in records], indent=2))
        return 0
    rows = [[str(r["id"]), r["state"], str(r["priority"]), r["agent"] or "-", str(r["attempts"]),
             "-" if r["exit_code"] is None else str(r["exit_code"]), _duration(r), r["name"] or _what(r)]
            for r in records]
    _table(rows, ["ID", "STATE", "PRI", "AGENT", "TRY", "EXIT", "TIME", "NAME/COMMAND"])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = client.job(args.id)
    if args.json:
        print(json.dumps(_jsonable(record), indent=2))
        return 0
    what = record["command"] if record["command"] is not None else record["func"]
    print(f"job {record['id']}  {record['name'] or ''}".rstrip())
    print(f"  state     {record['state']}" + (f"  ({record['error']})" if record["error"] else ""))
    print(f"  {'command' if record['command'] is not None else 'callable'}   {what}")
    print(f"  priority  {record['priority']}   timeout {record['timeout'] or '-'}   retries {record['retries']}"
          f"   tags {','.join(record['tags']) or '-'}")
    if record["cwd"] or record["env"]:
        print(f"  cwd       {record['cwd'] or '-'}   env {' '.join(f'{k}={v}' for k, v in record['env'].items()) or '-'}")
    print(f"  submitted {_ago(record['submitted'])}   exit {record['exit_code'] if record['exit_code'] is not None else '-'}")
    if record["func"] and record["value"] is not None:
        print(f"  value     {pickle.loads(record['value'])!r}")
    for a in record["attempt_list"]:
        took = f"{a['ended'] - a['started']:.2f}s" if a["started"] and a["ended"] else "-"
        note = "" if a["counted"] else "  (not counted: superseded)"
        print(f"\n  attempt {a['attempt']} on {a['agent']}: {a['state']}, exit {a['exit_code']}, {took},"
              f" {_ago(a['started'])} → {_ago(a['ended'])}{note}")
        if a["error"]:
            print(f"    error: {a['error']}")
        for label in ("stdout", "stderr", "traceback"):
            if a[label]:
                print(f"    --- {label} ---")
                print("    " + a[label].rstrip("\n").replace("\n", "\n    "))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        outcome = client.cancel(args.ids)
    for job_id in args.ids:
        print(f"{job_id}: {outcome[job_id]}")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    with _client(args) as client:
        new_ids = client.requeue(args.ids)
    for old, new in zip(args.ids, new_ids):
        print(f"{old} → {new}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    counts = status["counts"]
    print("  ".join(f"{state} {counts.get(state, 0)}" for state in [s.value for s in JobState]))
    up = [a for a in status["agents"] if a["state"] != "lost"]
    print(f"agents {len(up)} up / {len(status['agents'])}   slots {status['busy']} busy / {status['slots']}"
          f"   {status['rate']:.1f} jobs/s")
    for a in status["agents"]:
        print(f"  {a['name']:<16} {a['state']:<8} {a['busy']}/{a['slots']} busy   done {a['done']}")
    return 0


def cmd_agents(args: argparse.Namespace) -> int:
    with _client(args) as client:
        agents = client.agents()
    if args.json:
        print(json.dumps(agents, indent=2))
        return 0
    rows = [[a["name"], a["host"], a["state"], f"{a['busy']}/{a['slots']}", str(a["done"]), str(a["failed"]),
             f"{a['heartbeat_age']:.1f}s", ",".join(a["tags"]) or "-", a["started_by"]] for a in agents]
    _table(rows, ["NAME", "HOST", "STATE", "BUSY", "DONE", "FAILED", "SEEN", "TAGS", "STARTED BY"])
    return 0


# ---- SSH deployment: hosts, deploy, stop ------------------------------------------------------

def _inventory(args: argparse.Namespace) -> Any:
    from .deploy.inventory import Inventory

    return Inventory(StateDir(args.home_path).home)


def _deployments(args: argparse.Namespace) -> dict[str, Any]:
    from .deploy.records import Deployments

    return {alias: record.to_json() for alias, record in Deployments(StateDir(args.home_path).home).all().items()}


def cmd_hosts(args: argparse.Namespace) -> int:
    if args.hosts_cmd == "add":
        return _hosts_add(args)
    if args.hosts_cmd == "remove":
        return _hosts_remove(args)
    inventory = _inventory(args)
    hosts = inventory.hosts()
    deployed = _deployments(args)
    if args.json:
        print(json.dumps([dict(h.to_wire(), deployed=deployed.get(h.alias)) for h in hosts], indent=2))
        return 0
    rows = []
    for h in hosts:
        record = deployed.get(h.alias)
        state = "-" if not record else "stopped" if record.get("stopped") else f"pid {record['pid']} ({record['mode']})"
        rows.append([h.alias, h.target, str(h.slots or "cpus"), ",".join(h.tags) or "-", h.python or "auto",
                     h.remote_dir, "direct" if h.direct else "tunnel", state, h.source])
    _table(rows, ["ALIAS", "TARGET", "SLOTS", "TAGS", "PYTHON", "REMOTE DIR", "MODE", "DEPLOYED", "SOURCE"])
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
    from .errors import AuthFailed

    try:
        client: Client | None = _client(args)
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
            from .deploy.records import Deployments

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

    def show(event: dict) -> None:
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
    from .deploy.inventory import parse_tags

    tags = list(parse_tags(args.tags, "--tags")) if args.tags is not None else None
    with _client(args) as client:
        op_id = client.deploy(args.aliases, slots=args.slots, tags=tags, accept_new=args.accept_new,
                              direct=args.direct, ready_timeout=args.ready_timeout, reconnect=args.reconnect)
        return _follow(client, op_id, "deployed", args.aliases)


def cmd_stop(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.drain:
        raise CorralError("--timeout only applies with --drain", "a stop without --drain is immediate")
    with _client(args) as client:
        op_id = client.stop_agents(args.aliases, drain=args.drain, drain_timeout=args.timeout)
        return _follow(client, op_id, "stopped", args.aliases)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "master": cmd_master, "agent": cmd_agent, "submit": cmd_submit, "call": cmd_call, "jobs": cmd_jobs,
    "show": cmd_show, "cancel": cmd_cancel, "requeue": cmd_requeue, "wait": cmd_wait, "status": cmd_status,
    "agents": cmd_agents, "hosts": cmd_hosts, "deploy": cmd_deploy, "stop": cmd_stop,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.home_path = None
    if args.home:
        from pathlib import Path

        args.home_path = Path(args.home).expanduser()
    if args.cmd is None:
        from .tui.launch import run_console

        return run_console(args)
    try:
        return COMMANDS[args.cmd](args)
    except CorralError as exc:
        hint = f" — {exc.hint}" if exc.hint else ""
        print(f"corral {args.cmd}: {exc.message}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
