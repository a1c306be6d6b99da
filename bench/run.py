"""Run the benchmarks: ``python -m bench.run [--quick] [--only NAME[,NAME]] ...``.

The run is made of phases (:data:`bench.specs.PHASES`), in order: "scale"
(world sizes 2..32, the default configurations only) and "main" (every other
benchmark, world size 2, all four configurations).  For each round ``i`` of a
phase, every configuration is launched once per world size, in
:data:`bench.specs.CONFIGS` order rotated by ``i`` (torch and ours
alternate; none always goes first).  A launch runs all selected benchmarks of
its phase that share its world size, in one fresh group of workers.  No round
starts that would end past ``--max-minutes`` from the start (the first round of
each phase always runs): a busy machine costs launches, not an unbounded wait.
Progress goes to stderr; the markdown goes to stdout and, with the raw figures
and plots, to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from bench import launcher, report
from bench.specs import (
    BENCHMARKS,
    CONFIGS,
    PHASES,
    SCALE_QUICK_MAX,
    SCALE_SIZES,
    BenchSpec,
    Config,
    Params,
    Phase,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Above this 1-min load average the run warns that other work competes.
BUSY_LOAD = 0.5


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    main, scale = PHASES["main"], PHASES["scale"]
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="aiorpc_autograd vs torch.distributed.rpc, side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls, steps and launches")
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
        metavar="N",
        help=(
            f"launches per configuration of the world-size-2 benchmarks "
            f"({main.launches}; {main.quick_launches} with --quick)"
        ),
    )
    parser.add_argument(
        "--scale-launches",
        type=int,
        default=None,
        metavar="N",
        help=(
            f"launches per configuration and world size of 'scale' "
            f"({scale.launches}; {scale.quick_launches} with --quick)"
        ),
    )
    parser.add_argument(
        "--scale-sizes",
        default=None,
        metavar="N,N,...",
        help=(
            f"world sizes of 'scale' ({','.join(map(str, SCALE_SIZES))}; "
            f"up to {SCALE_QUICK_MAX} with --quick)"
        ),
    )
    parser.add_argument(
        "--autograd-steps",
        type=int,
        default=None,
        metavar="N",
        help=(
            "timed steps of 'autograd', the window of its RSS growth "
            "(2000; 300 with --quick; the issue's long run: 10000)"
        ),
    )
    parser.add_argument(
        "--configs",
        default=",".join(c.name for c in CONFIGS),
        help="comma-separated configurations (default: all four)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=15.0,
        help="start no further round once another would end past this (default 15)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for flag in ("launches", "scale_launches", "autograd_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.scale_sizes is not None:
        try:
            args.scale_sizes = sorted({int(n) for n in args.scale_sizes.split(",") if n.strip()})
        except ValueError:
            parser.error("--scale-sizes takes comma-separated integers")
        if not args.scale_sizes or args.scale_sizes[0] < 2:
            parser.error("--scale-sizes must be world sizes of at least 2")
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


def _groups(
    specs: Sequence[BenchSpec], params: dict[str, Params]
) -> list[tuple[int, list[BenchSpec]]]:
    """``(world size, its benchmarks)`` for each launch of a round, ascending."""
    sizes = sorted({n for s in specs for n in s.world_sizes(params[s.name])})
    return [(n, [s for s in specs if n in s.world_sizes(params[s.name])]) for n in sizes]


def run_rounds(
    specs: Sequence[BenchSpec],
    params: dict[str, Params],
    configs: Sequence[Config],
    launches: int,
    deadline: float,
    runs: dict[str, list[dict[str, Any]]],
) -> int:
    """Launch every configuration ``launches`` times per world size, rotating the order.

    Within a round, world sizes go in ascending order and, for each, the
    configurations in rotated order.  A round starts only if, at the pace of
    the rounds so far, it would end by ``deadline`` (``time.monotonic()``;
    the first round always runs).

    Args:
        runs: per benchmark, the list that gets one record per launch: rank
            0's record plus the launch's facts (configuration, round, world
            size, wall time, exit codes, CPU noise).

    Returns:
        The number of rounds completed.
    """
    groups = _groups(specs, params)
    cores = sorted(os.sched_getaffinity(0))
    total = launches * len(configs) * len(groups)
    done = 0
    started = time.monotonic()
    for round_ in range(1, launches + 1):
        now = time.monotonic()
        if round_ > 1 and now + (now - started) / (round_ - 1) > deadline:
            _log(f"stopping after {round_ - 1} round(s): another would pass --max-minutes")
            return round_ - 1
        shift = (round_ - 1) % len(configs)
        for world_size, group in groups:
            for config in [*configs[shift:], *configs[:shift]]:
                done += 1
                options = {k: v for s in group for k, v in s.options.items()}
                result = launcher.launch(
                    replace(config, options={**config.options, **options}),
                    [(s.name, params[s.name]) for s in group],
                    world_size=world_size,
                    timeout_s=launcher.STARTUP_S + sum(s.timeout_s(params[s.name]) for s in group),
                    cores=cores,
                )
                _log(
                    f"[{done}/{total}] {config.name} world {world_size} launch {round_}: "
                    f"{_describe(result)}"
                )
                if not result.ok:
                    for rank, tail in enumerate(result.logs):
                        if tail.strip():
                            _log(f"  --- rank {rank} output (tail) ---\n{tail.rstrip()}")
                for record in result.records.values():
                    runs[record["bench"]].append(
                        {
                            "config": config.name,
                            "launch": round_,
                            "world_size": world_size,
                            "wall_s": result.wall_s,
                            "returncodes": result.returncodes,
                            "timed_out": result.timed_out,
                            **result.cpu,
                            "ranks": result.ranks,
                            "output": result.logs if any(result.logs) else None,
                            **record,
                        }
                    )
    return launches


def _phase_launches(args: argparse.Namespace, phase: Phase) -> int:
    override = args.scale_launches if phase.name == "scale" else args.launches
    return int(override or (phase.quick_launches if args.quick else phase.launches))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks and write the report."""
    args = parse_args(argv)
    specs = select_benchmarks(args.only)
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    load1 = os.getloadavg()[0]
    if load1 > BUSY_LOAD:
        _log(f"note: 1-min load average is {load1:.2f} on {os.cpu_count()} cores; expect noise")

    configs, skipped = usable_configs(select_configs(args.configs))
    if not configs:
        _log("nothing to run")
        return 1
    params = {s.name: s.params(args.quick) for s in specs}
    if args.autograd_steps is not None and "autograd" in params:
        params["autograd"]["steps"] = args.autograd_steps
    if args.scale_sizes is not None and "scale" in params:
        params["scale"]["world_sizes"] = args.scale_sizes
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
    rounds: dict[str, int] = {}
    ran: dict[str, list[str]] = {}
    for phase in PHASES.values():
        phase_specs = [s for s in specs if s.phase == phase.name]
        phase_configs = [c for c in configs if c.pair in phase.pairs]
        if not phase_specs:
            continue
        if not phase_configs:
            _log(f"phase {phase.name}: none of its pairs {phase.pairs} among the configurations")
            continue
        launches = _phase_launches(args, phase)
        _log(
            f"phase {phase.name}: {', '.join(s.name for s in phase_specs)}; "
            f"{launches} launch(es) of {', '.join(c.name for c in phase_configs)}"
        )
        done = run_rounds(phase_specs, params, phase_configs, launches, deadline, runs)
        for spec in phase_specs:
            rounds[spec.name] = done
            ran[spec.name] = [c.name for c in phase_configs]

    if not ran:
        _log("nothing ran")
        return 1
    run_at = report.now()
    env = report.environment()
    pair_of = {c.name: c.pair for c in CONFIGS}
    benchmarks: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in ran:
            continue
        summary, checks = report.summarize(runs[spec.name])
        benchmarks[spec.name] = {
            "title": spec.title,
            "run_at": run_at,
            "quick": args.quick,
            "launches": rounds[spec.name],
            "configs": ran[spec.name],
            "params": params[spec.name],
            "runs": runs[spec.name],
            "summary": summary,
            "checks": checks,
            "skipped": {
                c: why for c, why in skipped.items() if pair_of[c] in PHASES[spec.phase].pairs
            },
            "environment": env,  # per benchmark too: a day's file merges runs
        }
    date = report.today()
    doc = report.merge(
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
    doc["targets"] = report.evaluate_targets(doc)
    path = report.write_json(args.results_dir, doc)
    table = report.markdown(doc)
    (args.results_dir / f"{date}.md").write_text(table, encoding="utf-8")
    plots = report.plot(doc, args.results_dir)
    _log(f"wrote {path}, {date}.md and {len(plots)} plot(s) in {time.monotonic() - started:.0f} s")
    print(table)
    return 0


def only(name: str) -> NoReturn:
    """``python -m bench.run --only NAME`` plus this command line's arguments."""
    sys.exit(main(["--only", name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
