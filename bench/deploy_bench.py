"""Deploy time to 1 and 8 loopback sshd hosts: fresh, bundle already uploaded, and an unchanged re-deploy."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.cluster import Cluster
from scripts.sshlab import SshHost, SshLab, descendants, kill_remote_agents, processes_in, sshd_missing

TARGETS = {("fresh", 8): 3.0, ("unchanged", 8): 1.0}  # seconds, from issue 4


def _cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of a process (and of its reaped children), from /proc; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _cpu_split(cluster: Cluster, hosts: list[SshHost]) -> dict[str, float]:
    """CPU seconds so far of the master, of the hosts' sshd (sessions, shells, probes) and of their agents."""
    assert cluster.master is not None
    sshd = sum(_cpu(h.proc.pid, True) + sum(_cpu(p, True) for p in descendants(h.proc.pid)) for h in hosts if h.proc)
    agents = sum(_cpu(p, True) for h in hosts if h.remote_dir.exists() for p in processes_in(h.remote_dir))
    return {"master": _cpu(cluster.master.pid), "sshd": sshd, "agents": agents}


def _deploy(cluster: Cluster, aliases: list[str]) -> float:
    """Seconds from asking the master to deploy to every host's agent registered (via the Client API)."""
    with cluster.client() as c:
        began = time.perf_counter()
        final = c.follow_operation(c.deploy(aliases), poll=0.5)
        took = time.perf_counter() - began
    if final["failed"]:
        raise SystemExit(f"deploy failed: {[final['hosts'][a]['error'] for a in final['failed']]}")
    return took


def _cli_deploy(cluster: Cluster, aliases: list[str]) -> float:
    """The same through `corral deploy` (a new Python process: interpreter start and imports included)."""
    began = time.perf_counter()
    done = cluster.corral("deploy", *aliases)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"corral deploy failed: {done.stderr}")
    return took


def _stop(cluster: Cluster, aliases: list[str]) -> None:
    with cluster.client() as c:
        final = c.follow_operation(c.stop_agents(aliases), poll=0.5)
    if final["failed"]:
        raise SystemExit(f"stop failed: {final['failed']}")


def run(counts: list[int], runs: int, python: str = "") -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="corral-deploy-bench-"))
    lab = SshLab(root / "lab")
    cluster = Cluster(root / "home")
    results: dict[str, Any] = {"runs": runs, "python": python or "auto", "load_before": os.getloadavg()[0],
                               "figures": []}
    try:
        hosts = [lab.add_host(f"b{i}", f"127.0.0.{2 + i}") for i in range(max(counts))]
        cluster.env.update(lab.env())
        cluster.env.pop("SSH_AUTH_SOCK", None)
        cluster.start_master()
        for host in hosts:
            done = cluster.corral(*lab.host_args(host, "--slots", "2", *(["--python", python] if python else [])))
            assert done.returncode == 0, done.stderr
        for count in counts:
            aliases = [h.alias for h in hosts[:count]]
            timings: dict[str, list[float]] = {"fresh": [], "uploaded": [], "unchanged": [], "unchanged (CLI)": []}
            cpu: dict[str, list[float]] = {}
            for _ in range(runs):
                for host in hosts[:count]:
                    shutil.rmtree(host.remote_dir, ignore_errors=True)
                before = _cpu_split(cluster, hosts[:count])
                timings["fresh"].append(_deploy(cluster, aliases))
                after = _cpu_split(cluster, hosts[:count])
                for part in before:
                    cpu.setdefault(part, []).append(after[part] - before[part])
                timings["unchanged"].append(_deploy(cluster, aliases))
                timings["unchanged (CLI)"].append(_cli_deploy(cluster, aliases))
                _stop(cluster, aliases)  # agents gone and links closed; the bundles stay
                timings["uploaded"].append(_deploy(cluster, aliases))
                _stop(cluster, aliases)
            for kind, values in timings.items():
                target = TARGETS.get((kind, count))
                results["figures"].append({"hosts": count, "kind": kind, "median_s": statistics.median(values),
                                           "min_s": min(values), "max_s": max(values), "target_s": target})
            results.setdefault("fresh_cpu_s", {})[count] = {part: statistics.median(v) for part, v in cpu.items()}
    finally:
        for host in lab.hosts.values():
            kill_remote_agents(host)
        cluster.stop()
        lab.stop()
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy_bench", description=__doc__)
    parser.add_argument("--hosts", default="1,8", help="host counts to measure (default 1,8)")
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each measurement (default 5)")
    parser.add_argument("--python", default="", help="the hosts' python setting (default: found on the host)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    missing = sshd_missing()
    if missing:
        print(f"deploy bench: {missing}", file=sys.stderr)
        return 2
    results = run([int(n) for n in args.hosts.split(",")], args.runs, args.python)
    print(f"python: {results['python']}; 1-minute load average before: {results['load_before']:.2f}")
    print(f"{'hosts':>5}  {'deploy':<16} {'median s':>9} {'min s':>7} {'max s':>7}  target")
    worst = 0
    for f in results["figures"]:
        verdict = ""
        if f["target_s"] is not None:
            ok = f["median_s"] < f["target_s"]
            verdict = f"< {f['target_s']:g} s {'ok' if ok else 'MISSED'}"
            worst = worst if ok else 1
        print(f"{f['hosts']:>5}  {f['kind']:<16} {f['median_s']:>9.3f} {f['min_s']:>7.3f} {f['max_s']:>7.3f}  {verdict}")
    for count, split in results["fresh_cpu_s"].items():
        parts = ", ".join(f"{part} {seconds:.2f}" for part, seconds in split.items())
        print(f"CPU of a fresh deploy to {count} host(s), median: {sum(split.values()):.2f} s ({parts})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return worst


if __name__ == "__main__":
    sys.exit(main())
