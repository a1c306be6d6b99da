"""Run the benchmarks: ``python -m bench.run [--quick] [--only NAME] [--launches N]``.

For each round ``i`` of ``--launches`` rounds, every configuration is
launched once, in :data:`bench.specs.CONFIGS` order rotated by ``i`` (torch
and ours alternate; none always goes first).  A launch runs all selected
benchmarks that share a world size in one fresh group of workers.  No round
starts that would end past ``--max-minutes``: a busy machine costs launches,
not an unbounded wait.  Progress goes to stderr; the markdown table goes to
stdout and, with the raw figures and plots, to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import launcher, report
from bench.specs import BENCHMARKS, CONFIGS, BenchSpec, Config, Params

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Above this 1-min load average the run warns that other work competes.
BUSY_LOAD = 0.5


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="aiorpc_autograd vs torch.distributed.rpc, side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls and launches")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"benchmark(s) to run, repeatable or comma-separated: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--launches",
        type=int,
        default=None,
        help="launches per configuration (5; 3 with --quick)",
    )
    parser.add_argument(
        "--configs",
        default=",".join(c.name for c in CONFIGS),
        help="comma-separated configurations (default: all four)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=9.0,
        help="start no further round once another would end past this (default 9)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.launches is not None and args.launches < 1:
        parser.error("--launches must be at least 1")
    return args


def select_benchmarks(only: Sequence[str]) -> list[BenchSpec]:
    """The registered benchmarks named by ``--only`` (all defaults when empty)."""
    names = [n.strip() for arg in only for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    if not names:
        return [s for s in BENCHMARKS.values() if s.default]
    return [BENCHMARKS[n] for n in names]


def select_configs(spec: str) -> list[Config]:
    """The configurations named by ``--configs``, in registry order."""
    names = {n.strip() for n in spec.split(",") if n.strip()}
    unknown = names - {c.name for c in CONFIGS}
    if unknown:
        raise SystemExit(f"unknown config(s) {sorted(unknown)}; known: {[c.name for c in CONFIGS]}")
    return [c for c in CONFIGS if c.name in names]


def _describe(result: launcher.LaunchResult) -> str:
    parts = []
    for name, record in result.records.items():
        seconds = record.get("seconds")
        parts.append(
            f"{name} {'ok' if record['ok'] else 'FAILED'}" + (f" {seconds:.1f}s" if seconds else "")
        )
    status = " TIMED OUT" if result.timed_out else ""
    others = result.cpu["foreign_cpu_s"]
    return f"{', '.join(parts)} (wall {result.wall_s:.1f}s{status}, others used {others:.1f} cpu-s)"


def usable_configs(configs: list[Config]) -> tuple[list[Config], dict[str, str]]:
    """Drop our configurations when aiorpc_autograd is not usable yet.

    Returns:
        ``(configurations to run, {skipped configuration: reason})``.
    """
    if not any(c.impl == "ours" for c in configs):
        return configs, {}
    reason = launcher.probe_ours()
    if reason is None:
        return configs, {}
    _log("aiorpc_autograd is not usable yet; skipping its configurations:")
    _log(textwrap.indent(reason, "  "))
    return [c for c in configs if c.impl != "ours"], {
        c.name: reason for c in configs if c.impl == "ours"
    }


def run_rounds(
    specs: Sequence[BenchSpec],
    params: dict[str, Params],
    configs: Sequence[Config],
    launches: int,
    budget_s: float,
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Launch every configuration ``launches`` times, rotating the order per round.

    A round starts only if, at the pace of the rounds so far, it would end
    within ``budget_s`` (the first round always runs).

    Returns:
        ``(runs, rounds completed)``; ``runs`` holds, per benchmark, one record
        per launch: rank 0's record plus the launch's facts (configuration,
        round, wall time, exit codes, CPU noise).
    """
    by_size = sorted(specs, key=lambda s: s.world_size)
    groups = [list(g) for _, g in itertools.groupby(by_size, key=lambda s: s.world_size)]
    cores = sorted(os.sched_getaffinity(0))
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
    total = launches * len(configs) * len(groups)
    done = 0
    started = time.monotonic()
    for round_ in range(1, launches + 1):
        elapsed = time.monotonic() - started
        if round_ > 1 and elapsed * round_ / (round_ - 1) > budget_s:
            _log(f"stopping after {round_ - 1} round(s): another would pass {budget_s:.0f} s")
            return runs, round_ - 1
        shift = (round_ - 1) % len(configs)
        for config in [*configs[shift:], *configs[:shift]]:
            for group in groups:
                done += 1
                result = launcher.launch(
                    config,
                    [(s.name, params[s.name]) for s in group],
                    world_size=group[0].world_size,
                    timeout_s=launcher.STARTUP_S + sum(s.timeout_s for s in group),
                    cores=cores,
                )
                _log(f"[{done}/{total}] {config.name} launch {round_}: {_describe(result)}")
                if not result.ok:
                    for rank, tail in enumerate(result.logs):
                        if tail.strip():
                            _log(f"  --- rank {rank} output (tail) ---\n{tail.rstrip()}")
                for record in result.records.values():
                    runs[record["bench"]].append(
                        {
                            "config": config.name,
                            "launch": round_,
                            "wall_s": result.wall_s,
                            "returncodes": result.returncodes,
                            "timed_out": result.timed_out,
                            **result.cpu,
                            "ranks": result.ranks,
                            "output": result.logs if any(result.logs) else None,
                            **record,
                        }
                    )
    return runs, launches


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks and write the report."""
    args = parse_args(argv)
    specs = select_benchmarks(args.only)
    launches = args.launches or (3 if args.quick else 5)
    started = time.monotonic()
    load1 = os.getloadavg()[0]
    if load1 > BUSY_LOAD:
        _log(f"note: 1-min load average is {load1:.2f} on {os.cpu_count()} cores; expect noise")

    configs, skipped = usable_configs(select_configs(args.configs))
    if not configs:
        _log("nothing to run")
        return 1
    params = {s.name: s.params(args.quick) for s in specs}
    runs, launches = run_rounds(specs, params, configs, launches, args.max_minutes * 60)

    run_at = report.now()
    env = report.environment()
    benchmarks: dict[str, Any] = {}
    for spec in specs:
        summary, checks = report.summarize(runs[spec.name])
        benchmarks[spec.name] = {
            "title": spec.title,
            "run_at": run_at,
            "quick": args.quick,
            "launches": launches,
            "params": params[spec.name],
            "runs": runs[spec.name],
            "summary": summary,
            "checks": checks,
            "skipped": skipped,
            "environment": env,  # per benchmark too: a day's file merges runs
        }
    date = report.today()
    doc = report.write_json(
        args.results_dir,
        date,
        {
            "date": date,
            "updated_at": run_at,
            "environment": env,
            "configs": {
                c.name: {
                    "impl": c.impl,
                    "pinned": c.pinned,
                    "options": dict(c.options),
                    "pair": c.pair,
                }
                for c in CONFIGS
            },
            "benchmarks": benchmarks,
        },
    )
    table = report.markdown(doc)
    (args.results_dir / f"{date}.md").write_text(table, encoding="utf-8")
    plots = report.plot(doc, args.results_dir)
    _log(
        f"wrote {args.results_dir / f'{date}.json'}, {date}.md and {len(plots)} plot(s) "
        f"in {time.monotonic() - started:.0f} s"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
