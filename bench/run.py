"""Run the benchmarks: ``python -m bench.run [--quick] [--only NAME] [--launches N]``.

For each round ``i`` of ``--launches`` rounds, every configuration is
launched once, in :data:`bench.specs.CONFIGS` order rotated by ``i`` (torch
and ours alternate; none always goes first).  A launch runs all selected
benchmarks that share a world size in one fresh group of workers.  Progress
goes to stderr; the markdown table goes to stdout and, with the raw figures
and plots, to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import launcher, report
from bench.specs import BENCHMARKS, CONFIGS, BenchSpec, Config

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
        help="launches per configuration (3; 2 with --quick)",
    )
    parser.add_argument(
        "--configs",
        default=",".join(c.name for c in CONFIGS),
        help="comma-separated configurations (default: all four)",
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
    return f"{', '.join(parts)} (wall {result.wall_s:.1f}s{status})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks and write the report."""
    args = parse_args(argv)
    specs = select_benchmarks(args.only)
    configs = select_configs(args.configs)
    launches = args.launches or (2 if args.quick else 3)
    started = time.monotonic()

    skipped: dict[str, str] = {}
    if any(c.impl == "ours" for c in configs):
        reason = launcher.probe_ours()
        if reason is not None:
            _log(
                f"aiorpc_autograd is not usable yet; skipping its configurations:\n  {reason.replace(chr(10), chr(10) + '  ')}"
            )
            for c in configs:
                if c.impl == "ours":
                    skipped[c.name] = reason
            configs = [c for c in configs if c.impl != "ours"]

    params = {s.name: s.params(args.quick) for s in specs}
    groups = [
        list(group)
        for _, group in itertools.groupby(
            sorted(specs, key=lambda s: s.world_size), key=lambda s: s.world_size
        )
    ]
    cores = sorted(os.sched_getaffinity(0))
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
    total = launches * len(configs) * len(groups)
    done = 0
    for round_ in range(launches):
        shift = round_ % len(configs) if configs else 0
        for config in configs[shift:] + configs[:shift]:
            for group in groups:
                done += 1
                plan = [(s.name, params[s.name]) for s in group]
                timeout = launcher.STARTUP_S + sum(s.timeout_s for s in group)
                result = launcher.launch(
                    config,
                    plan,
                    world_size=group[0].world_size,
                    timeout_s=timeout,
                    cores=cores,
                )
                _log(f"[{done}/{total}] {config.name} launch {round_ + 1}: {_describe(result)}")
                if not result.ok:
                    for rank, tail in enumerate(result.logs):
                        if tail.strip():
                            _log(f"  --- rank {rank} output (tail) ---\n{tail.rstrip()}")
                for record in result.records.values():
                    runs[record["bench"]].append(
                        {
                            "config": config.name,
                            "launch": round_ + 1,
                            "wall_s": result.wall_s,
                            "returncodes": result.returncodes,
                            "timed_out": result.timed_out,
                            "loadavg_before": result.loadavg,
                            "ranks": result.ranks,
                            **record,
                        }
                    )

    run_at = report.now()
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
        }
    date = report.today()
    doc = report.write_json(
        args.results_dir,
        date,
        {
            "date": date,
            "updated_at": run_at,
            "environment": report.environment(),
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
