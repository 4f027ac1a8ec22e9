"""`python -m bench.pool_api`: W1 and W2 through corral.Pool and corral.Executor, beside multiprocessing.Pool and
the raw Client.map in one run, and what shipping code costs a Pool's first call."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import Deadline, Params, latency_summary, machine_info
from .corral_runs import INC, CorralCluster, Watchdog, _wait_for_agents
from .jobs import inc
from .pool_baseline import CTX, _stop
from .pool_baseline import w1_throughput as pool_w1
from .pool_baseline import w2_latency as pool_w2

SYSTEMS = ("multiprocessing.Pool", "Client.map", "corral.Pool", "corral.Pool chunksize=1", "corral.Executor")


def _w1(params: Params, run: Callable[[List[int]], List[int]]) -> Dict[str, float]:
    run(list(range(params.w1_warmup)))
    t0 = time.perf_counter()
    values = run(list(range(params.w1_jobs)))
    elapsed = time.perf_counter() - t0
    if sum(values) != sum(i + 1 for i in range(params.w1_jobs)):
        raise RuntimeError(f"W1: wrong values (sum {sum(values)})")
    return {"w1_jobs_per_s": params.w1_jobs / elapsed, "w1_seconds": elapsed}


def _w2(params: Params, one: Callable[[int], int]) -> Dict[str, float]:
    deadline = Deadline(params.w2_budget, "W2")
    samples = []
    for i in range(params.w2_warmup + params.w2_jobs):
        deadline.check()
        t0 = time.perf_counter()
        value = one(i)
        t1 = time.perf_counter()
        if value != i + 1:
            raise RuntimeError(f"W2: job {i} returned {value!r}")
        if i >= params.w2_warmup:
            samples.append(t1 - t0)
    return latency_summary(samples)


def _module(folder: Path, files: int, kib: int) -> Any:
    """A fresh module (new content: a new bundle) with `inc`, and `files` siblings of `kib` KiB in a package."""
    name = f"shipbench_{uuid.uuid4().hex[:10]}"
    package = folder / f"{name}_data"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    filler = ("# " + "x" * 78 + "\n") * (kib * 1024 // 81)
    for i in range(files):
        (package / f"part{i}.py").write_text(f"PART = {i}\n{filler}")
    (folder / f"{name}.py").write_text(f"import {name}_data\n\nTOKEN = {uuid.uuid4().int}\n\n\ndef inc(x):\n    return x + 1\n")
    sys.path.insert(0, str(folder))
    try:
        __import__(name)
    finally:
        sys.path.remove(str(folder))
    return sys.modules[name]


def shipping_cost(home: Path, rounds: int, files: int, kib: int) -> Dict[str, float]:
    """Per round, a new Pool: its first call (code to ship: built, sent to the master, fetched and unpacked by an
    agent, imported) against its second; and the same with the code already shipped (a Pool's own first-call cost)."""
    from corral import Pool

    fresh: List[float] = []
    known: List[float] = []
    with tempfile.TemporaryDirectory(prefix="corral-shipbench-") as tmp:
        for r in range(rounds):
            module = _module(Path(tmp) / f"r{r}", files, kib)
            for extra in (fresh, known):
                with Pool(home=home) as pool:
                    t0 = time.perf_counter()
                    assert pool.apply(module.inc, (1,)) == 2
                    t1 = time.perf_counter()
                    assert pool.apply(module.inc, (2,)) == 3
                    t2 = time.perf_counter()
                extra.append((t1 - t0) - (t2 - t1))
    return {"ship_first_extra_s": statistics.median(fresh), "ship_first_extra_max_s": max(fresh),
            "known_first_extra_s": statistics.median(known), "ship_files": files + 2, "ship_kib": files * kib}


def run(params: Params, rounds: int, step: Callable[[str], None]) -> Dict[str, Dict[str, Any]]:
    from corral import Executor, Pool

    results: Dict[str, Dict[str, Any]] = {s: {} for s in SYSTEMS}
    step(f"multiprocessing.Pool: {params.workers} processes")
    pool = CTX.Pool(params.workers)
    try:
        results["multiprocessing.Pool"].update(pool_w1(pool, params))
        results["multiprocessing.Pool"].update(pool_w2(pool, params))
    finally:
        _stop(pool)
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp) / "w"
        home.mkdir()
        step(f"corral: master + {params.workers} agents x {params.slots} slots")
        cluster = CorralCluster(params, home)
        try:
            with Watchdog(cluster, params.start_budget, "corral start-up"):
                cluster.start_master()
                cluster.start_agents(params.workers, params.slots)
                client = cluster.client()
                _wait_for_agents(client, cluster, params.workers, params.slots)
            budget = params.w1_budget + params.w2_budget
            with Watchdog(cluster, budget, "Client.map"):
                step("Client.map: W1, W2")
                results["Client.map"].update(_w1(params, lambda xs: client.map(INC, xs)))
                results["Client.map"].update(_w2(params, lambda i: client.map(INC, [i])[0]))
            with Watchdog(cluster, budget, "corral.Pool"), Pool(home=home) as p:
                step("corral.Pool: W1 (map), W2 (apply)")
                results["corral.Pool"].update(_w1(params, lambda xs: p.map(inc, xs)))
                results["corral.Pool"].update(_w2(params, lambda i: p.apply(inc, (i,))))
                step("corral.Pool: W1 with chunksize=1 (one job per item, as Client.map)")
                results["corral.Pool chunksize=1"].update(_w1(params, lambda xs: p.map(inc, xs, chunksize=1)))
            with Watchdog(cluster, budget, "corral.Executor"), Executor(home=home) as ex:
                step("corral.Executor: W1 (submit all, then result() each), W2 (submit().result())")
                results["corral.Executor"].update(
                    _w1(params, lambda xs: [f.result() for f in [ex.submit(inc, x) for x in xs]]))
                results["corral.Executor"].update(_w2(params, lambda i: ex.submit(inc, i).result()))
            with Watchdog(cluster, 300, "shipping"):
                step(f"shipping: {rounds} rounds, a small module, then a 2 MiB package")
                results["corral.Pool"].update(shipping_cost(home, rounds, 0, 0))
                big = shipping_cost(home, rounds, 64, 32)
                results["corral.Pool"].update({f"{k}_2mib": v for k, v in big.items()})
            client.close()
        finally:
            cluster.close()
    return results


def render(results: Dict[str, Dict[str, Any]], params: Params) -> str:
    def cell(system: str, key: str, fmt: str) -> str:
        value = results[system].get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    lines = [f"{'':26}{'W1 jobs/s':>12}{'W2 p50 ms':>12}{'W2 p99 ms':>12}",
             *(f"{s:26}{cell(s, 'w1_jobs_per_s', ',.0f'):>12}{cell(s, 'w2_p50_ms', '.2f'):>12}{cell(s, 'w2_p99_ms', '.2f'):>12}"
               for s in SYSTEMS)]
    raw = results["Client.map"].get("w1_jobs_per_s") or 0.0
    pool = results["corral.Pool"].get("w1_jobs_per_s") or 0.0
    lines.append("")
    lines.append(f"Pool.map / Client.map, {params.w1_jobs:,} items: {pool / raw:.1f}x "
                 f"({'not slower' if pool >= raw else 'SLOWER'}; target: not slower)" if raw else "Client.map: no figure")
    ship = results["corral.Pool"]
    for suffix, what in (("", "a small module"), ("_2mib", "a 2 MiB package of 66 files")):
        first = ship.get(f"ship_first_extra_s{suffix}")
        if first is not None:
            lines.append(f"first call shipping {what}: +{first * 1000:.0f} ms median, +{ship[f'ship_first_extra_max_s{suffix}'] * 1000:.0f}"
                         f" ms max over later calls (code already shipped: +{ship[f'known_first_extra_s{suffix}'] * 1000:.0f} ms;"
                         f" target < 500 ms: {'met' if ship[f'ship_first_extra_max_s{suffix}'] < 0.5 else 'MISSED'})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool_api", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke test")
    parser.add_argument("--rounds", type=int, default=5, help="shipping rounds (a new module each), default 5")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    params = Params.quick() if args.quick else Params()
    began = time.monotonic()

    def step(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    machine = machine_info()
    results = run(params, 2 if args.quick else args.rounds, step)
    print(f"corral bench.pool_api{' (--quick)' if args.quick else ''}: {machine['nproc']} CPUs ({machine['cpu']}), "
          f"Python {machine['python']}, commit {machine['commit']}\n")
    print(render(results, params))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"machine": machine, "params": params.to_dict(), "results": results}, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
