"""Results: the day's JSON (raw figures, merged per benchmark), markdown, plots.

The JSON document of one day, ``results/<date>.json``::

    {"date", "updated_at", "environment", "configs",
     "benchmarks": {name: {"title", "run_at", "quick", "launches", "params",
                           "runs": [{"config", "launch", "ok", "metrics" | "error",
                                     "seconds", "wall_s", "info", ...}],
                           "summary": {config: {metric: {"median", "min", "max",
                                                         "q1", "q3", "n"}}},
                           "checks": {config: {metric: bool}},
                           "skipped": {config: reason}}}}

A later run the same day replaces the benchmarks it ran and keeps the rest,
so ``--only echo`` does not throw away the morning's ``noop``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.specs import BENCHMARKS, CONFIGS, Config, Metric
from bench.stats import spread

Doc = dict[str, Any]


def environment() -> dict[str, Any]:
    """Facts about the machine and the libraries, for the record."""

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "loadavg": list(os.getloadavg()),
        "torch": version("torch"),
        "uvloop": version("uvloop"),
        "msgpack": version("msgpack"),
    }


def summarize(
    runs: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, bool]]]:
    """Spread of every numeric metric across launches, per configuration.

    Returns:
        ``(summary, checks)``: ``summary[config][metric]`` is a
        :func:`bench.stats.spread` dict; boolean metrics (such as the echo's
        bit-exact check) go to ``checks[config][metric]``, True only when
        every launch passed.
    """
    values: dict[str, dict[str, list[float]]] = {}
    checks: dict[str, dict[str, bool]] = {}
    for run in runs:
        if not run.get("ok"):
            continue
        for key, value in run["metrics"].items():
            if isinstance(value, bool):
                per = checks.setdefault(run["config"], {})
                per[key] = per.get(key, True) and value
            elif isinstance(value, int | float):
                values.setdefault(run["config"], {}).setdefault(key, []).append(float(value))
    summary = {
        config: {key: spread(vals) for key, vals in metrics.items()}
        for config, metrics in values.items()
    }
    return summary, checks


def write_json(results_dir: Path, date: str, new: Doc) -> Doc:
    """Merge ``new`` into the day's document, write it, and return it."""
    path = results_dir / f"{date}.json"
    doc: Doc = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            doc = {}
    benchmarks = {**doc.get("benchmarks", {}), **new["benchmarks"]}
    doc.update(new)
    doc["benchmarks"] = benchmarks
    results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return doc


def _fmt(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 10_000:
        return f"{value / 1000:.1f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(stats: Mapping[str, float] | None) -> str:
    if stats is None:
        return "—"
    return f"{_fmt(stats['median'])} ({_fmt(stats['min'])}–{_fmt(stats['max'])})"


def _pairs(configs: Iterable[Config]) -> dict[str, dict[str, str]]:
    """``{pair: {"ours": config name, "torch": config name}}``."""
    pairs: dict[str, dict[str, str]] = {}
    for config in configs:
        pairs.setdefault(config.pair, {})[config.impl] = config.name
    return pairs


def _metric_label(metric: Metric) -> str:
    arrow = "↑" if metric.higher_is_better else "↓"
    return f"{metric.label} [{metric.unit}] {arrow}"


def markdown(doc: Doc) -> str:
    """The comparison table and notes for every benchmark in ``doc``."""
    pairs = _pairs(CONFIGS)
    lines = [
        f"# aiorpc_autograd vs torch.distributed.rpc — {doc['date']}",
        "",
        (
            "Cells: median over launches (min–max across launches). "
            "ours/torch is the ratio of medians; ↑ higher is better, ↓ lower is better."
        ),
        (
            "Pairs: *unpinned* = ours-unpinned vs torch-default (default options); "
            "*pinned* = ours-pinned vs torch-tuned (num_worker_threads=1); pinned "
            "configurations put rank r on core r."
        ),
        "",
        "| benchmark | metric | config | ours | torch | ours/torch |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    notes: list[str] = []
    for name, entry in doc["benchmarks"].items():
        spec = BENCHMARKS.get(name)
        if spec is None:
            continue
        summary = entry["summary"]
        for metric in spec.metrics:
            for pair, members in pairs.items():
                ours = summary.get(members.get("ours", ""), {}).get(metric.key)
                theirs = summary.get(members.get("torch", ""), {}).get(metric.key)
                ratio = (
                    f"{ours['median'] / theirs['median']:.2f}"
                    if ours and theirs and theirs["median"]
                    else "—"
                )
                lines.append(
                    f"| {name} | {_metric_label(metric)} | {pair} "
                    f"| {_cell(ours)} | {_cell(theirs)} | {ratio} |"
                )
        notes.extend(_notes(name, entry))
    return "\n".join([*lines, "", "## Notes", "", *notes, ""])


def _notes(name: str, entry: Mapping[str, Any]) -> list[str]:
    mode = "quick" if entry["quick"] else "full"
    out = [
        (
            f"- **{name}**: {entry['title']}; run {entry['run_at']} ({mode}, "
            f"{entry['launches']} launches per config); params `{json.dumps(entry['params'])}`."
        )
    ]
    for config, reason in entry.get("skipped", {}).items():
        out.append(f"  - {config}: skipped — {reason.splitlines()[-1] if reason else ''}")
    for config, checks in entry.get("checks", {}).items():
        failed = [k for k, ok in checks.items() if not ok]
        verdict = f"FAILED {', '.join(failed)}" if failed else "all passed"
        out.append(f"  - {config}: checks ({', '.join(checks)}): {verdict}")
    for run in entry["runs"]:
        if not run.get("ok"):
            error = (run.get("error") or "").strip().splitlines()
            last = error[-1] if error else "unknown error"
            out.append(f"  - {run['config']} launch {run['launch']}: failed — `{last}`")
    return out


def plot(doc: Doc, results_dir: Path) -> list[Path]:
    """One PNG per benchmark with a plot layout; medians with min–max bars.

    Returns:
        The files written; empty (with a message on stderr) when matplotlib
        is not importable.
    """
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no plots (pip install matplotlib)",
            file=sys.stderr,
        )
        return []

    written: list[Path] = []
    for name, entry in doc["benchmarks"].items():
        spec = BENCHMARKS.get(name)
        if spec is None or spec.plot is None:
            continue
        layout = spec.plot
        configs = [c.name for c in CONFIGS if c.name in entry["summary"]]
        if not configs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            stats = [entry["summary"][config].get(key) for key in layout.keys]
            xs = [j for j, s in enumerate(stats) if s]
            med = [s["median"] for s in stats if s]
            err = [
                [s["median"] - s["min"] for s in stats if s],
                [s["max"] - s["median"] for s in stats if s],
            ]
            if layout.kind == "bars":
                offsets = [x - 0.4 + width * (i + 0.5) for x in xs]
                ax.bar(offsets, med, width, yerr=err, capsize=3, label=config)
            else:
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=config)
        ax.set_xticks(range(len(layout.xs)), layout.xs)
        ax.set_xlabel(layout.xlabel)
        ax.set_ylabel(layout.ylabel)
        if layout.logy:
            ax.set_yscale("log")
        ax.set_title(f"{name}: {entry['title']}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = results_dir / f"{doc['date']}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def today() -> str:
    """The local date as ``YYYY-MM-DD``."""
    return dt.date.today().isoformat()


def now() -> str:
    """The local time, ISO 8601 to the second."""
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")
