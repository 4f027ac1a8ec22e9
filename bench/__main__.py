"""`python -m bench`: run every workload on Pool, the seed design and corral, print one table."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import Params, machine_info

SYSTEMS = ("pool", "seed", "corral")
TITLES = {"pool": "Pool", "seed": "seed", "corral": "corral"}
WORKLOADS = ("W1", "W2", "W3", "M")

# Targets for corral: (metric, bound, "min" = at least / "max" = at most).
TARGETS: Dict[str, Tuple[float, str]] = {
    "w1_jobs_per_s": (50_000.0, "min"),
    "w2_p50_ms": (1.0, "max"),
    "w2_p99_ms": (5.0, "max"),
    "w3_wall_s": (1.10, "max"),
    "m_rss_mb": (200.0, "max"),
}
W1_MIN_RATIO_TO_SEED = 20.0


def _runner(system: str) -> Callable[..., None]:
    if system == "pool":
        from .pool_baseline import run
    elif system == "seed":
        from .seed_design import run
    else:
        from .corral_runs import run
    return run


def run_all(params: Params, systems: List[str]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, str]]]:
    """Run the chosen systems one after another: figures per system, and errors per system and workload."""
    results: Dict[str, Dict[str, Any]] = {s: {} for s in systems}
    errors: Dict[str, Dict[str, str]] = {s: {} for s in systems}
    began = time.monotonic()

    def step(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", file=sys.stderr, flush=True)

    for system in systems:
        def record(workload: str, fn: Callable[[], dict], system: str = system) -> None:
            step(f"{TITLES[system]}: {workload}")
            try:
                results[system].update(fn())
            except Exception as exc:  # noqa: BLE001 - reported in the table, the next workload still runs
                errors[system][workload] = _describe(exc)
                step(f"{TITLES[system]}: {workload} failed: {errors[system][workload]}")
                traceback.print_exc(file=sys.stderr)

        try:
            _runner(system)(params, step, record)
        except Exception as exc:  # noqa: BLE001 - the system could not run at all (start-up, import)
            text = _describe(exc)
            done = _done(results[system])
            for workload in WORKLOADS:
                if workload not in done:
                    errors[system].setdefault(workload, text)
            step(f"{TITLES[system]} failed: {text}")
            traceback.print_exc(file=sys.stderr)
    step("done")
    return results, errors


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _done(figures: Dict[str, Any]) -> List[str]:
    keys = {"W1": "w1_jobs_per_s", "W2": "w2_p50_ms", "W3": "w3_wall_s", "M": "m_rss_mb"}
    return [w for w, k in keys.items() if k in figures]


# --- the table --------------------------------------------------------------------------

ROWS = [
    # label, key, format, workload
    ("W1 throughput (jobs/s)", "w1_jobs_per_s", "{:,.0f}", "W1"),
    ("W2 latency p50 (ms)", "w2_p50_ms", "{:.2f}", "W2"),
    ("W2 latency p99 (ms)", "w2_p99_ms", "{:.2f}", "W2"),
    ("W3 wall time (s)", "w3_wall_s", "{:.3f}", "W3"),
    ("M master RSS, idle (MB)", "m_idle_rss_mb", "{:.1f}", "M"),
    ("M master RSS, queued (MB)", "m_rss_mb", "{:.1f}", "M"),
]


def _cell(figures: Dict[str, Any], errors: Dict[str, str], key: str, fmt: str, workload: str) -> str:
    if key in figures:
        value = figures[key]
        return "n/a" if value is None else fmt.format(value)
    return "error" if workload in errors else "-"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def target_text(key: str, params: Params) -> str:
    if key == "w1_jobs_per_s":
        return f">= 50,000 and >= {W1_MIN_RATIO_TO_SEED:.0f}x seed"
    if key == "w3_wall_s":
        return f"<= 1.10 (ideal {params.w3_ideal:.2f})"
    if key in TARGETS:
        bound, _ = TARGETS[key]
        return f"<= {bound:g}"
    return ""


def target_met(key: str, results: Dict[str, Dict[str, Any]]) -> Optional[bool]:
    """Whether corral meets its target on `key`; None when there is no target or no figure."""
    corral = results.get("corral", {})
    if key not in TARGETS or corral.get(key) is None:
        return None
    bound, kind = TARGETS[key]
    value = corral[key]
    met = value >= bound if kind == "min" else value <= bound
    if key == "w1_jobs_per_s":
        seed = results.get("seed", {}).get(key)
        if seed is None:
            return None if met else False
        met = met and value >= W1_MIN_RATIO_TO_SEED * seed
    return met


def render(results: Dict[str, Dict[str, Any]], errors: Dict[str, Dict[str, str]], params: Params) -> str:
    systems = [s for s in SYSTEMS if s in results]
    header = ["workload", *[TITLES[s] for s in systems]]
    if "corral" in systems:
        header += [f"corral/{TITLES[s]}" for s in ("seed", "pool") if s in systems]
        header += ["corral target", "met"]
    rows = [header]
    for label, key, fmt, workload in ROWS:
        row = [label]
        for s in systems:
            row.append(_cell(results[s], errors[s], key, fmt, workload))
        if "corral" in systems:
            for other in ("seed", "pool"):
                if other in systems:
                    row.append(_ratio(results["corral"].get(key), results[other].get(key)))
            met = target_met(key, results)
            row += [target_text(key, params), {True: "yes", False: "NO", None: ""}[met]]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [
        f"W1 {params.w1_jobs:,} x inc(x), sum checked; W2 {params.w2_jobs} jobs one at a time after "
        f"{params.w2_warmup} warm-up; W3 {params.w3_jobs} x `{params.w3_command}` on "
        f"{params.workers} workers x {params.slots} slots; M {params.m_jobs:,} queued `true` jobs, no worker.",
        "Ratios are corral's figure divided by the other's (W1: higher is better; W2, W3, M: lower is better).",
    ]
    for s in systems:
        for workload, text in errors[s].items():
            notes.append(f"{TITLES[s]} {workload} error: {text}")
    return "\n".join(lines + [""] + notes)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke test in well under 30 s")
    parser.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated systems: pool,seed,corral")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    chosen = [s.strip().lower() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown or not chosen:
        parser.error(f"--only takes some of {','.join(SYSTEMS)}; got {args.only!r}")
    systems = [s for s in SYSTEMS if s in chosen]
    params = Params.quick() if args.quick else Params()

    machine = machine_info()
    results, errors = run_all(params, systems)
    table = render(results, errors, params)
    print(
        f"corral bench{' (--quick)' if args.quick else ''}: {machine['nproc']} CPUs ({machine['cpu']}), "
        f"{machine['ram_gb']} GB RAM, {machine['os']}, Python {machine['python']}, commit {machine['commit']}"
    )
    print()
    print(table)
    if args.json:
        report = {
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick,
            "machine": machine,
            "params": params.to_dict(),
            "results": results,
            "errors": errors,
            "targets_met": {key: target_met(key, results) for key in TARGETS} if "corral" in systems else {},
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
