"""Results: the day's JSON (raw figures, merged per benchmark), markdown, plots.

The JSON document of one day, ``results/<date>.json``::

    {"date", "updated_at", "environment", "configs",
     "benchmarks": {name: {"title", "run_at", "quick", "launches", "params",
                           "runs": [{"config", "launch", "world_size", "ok",
                                     "metrics" | "error", "seconds", "wall_s",
                                     "foreign_cpu_s", "steal_s", "ranks", ...}],
                           "summary": {config: {metric: {"median", "min", "max",
                                                         "q1", "q3", "n"}}},
                           "checks": {config: {metric: bool}},
                           "skipped": {config: reason},
                           "environment": {...}}},
     "targets": [{"text", "bench", "key", "pair", "kind", "bound",
                  "ours", "torch", "ratio", "verdict"}]}

A later run the same day replaces the benchmarks it ran and keeps the rest,
so ``--only echo`` does not throw away the morning's ``noop``; the targets
are evaluated again over the merged document.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.launcher import ROOT
from bench.specs import BENCHMARKS, CONFIGS, TARGETS, Config, Metric, Target
from bench.stats import spread

Doc = dict[str, Any]


def source_digest(package_dir: Path) -> str | None:
    """SHA-256 over a package's ``*.py`` files (names and contents), or None.

    Ties a result to the exact code measured while it is uncommitted.
    """
    files = sorted(package_dir.rglob("*.py"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package_dir)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _git_head(root: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Facts about the machine, the libraries and the code, for the record."""

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
        "git_head": _git_head(ROOT),
        "aiorpc_autograd_source_sha256": source_digest(ROOT / "aiorpc_autograd"),
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


def merge(results_dir: Path, date: str, new: Doc) -> Doc:
    """The day's document with ``new``'s benchmarks replacing those it ran."""
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
    return doc


def write_json(results_dir: Path, doc: Doc) -> Path:
    """Write the day's document; return its path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{doc['date']}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


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


def _cell(entry: Mapping[str, Any], config: str | None, key: str) -> str:
    """``median (min-max)`` of one metric, or why there is none."""
    stats = entry["summary"].get(config, {}).get(key)
    if stats is not None:
        return f"{_fmt(stats['median'])} ({_fmt(stats['min'])}-{_fmt(stats['max'])})"
    if config in entry.get("skipped", {}):
        return "skipped"
    if any(run["config"] == config and not run.get("ok") for run in entry["runs"]):
        return "failed"
    return "—"


def _pairs(configs: Iterable[Config]) -> dict[str, dict[str, str]]:
    """``{pair: {"ours": config name, "torch": config name}}``."""
    pairs: dict[str, dict[str, str]] = {}
    for config in configs:
        pairs.setdefault(config.pair, {})[config.impl] = config.name
    return pairs


def _medians(
    entry: Mapping[str, Any] | None, pair: str, key: str
) -> tuple[float | None, float | None]:
    """``(ours median, torch median)`` of one metric in one pair (None: not measured)."""
    members = _pairs(CONFIGS).get(pair, {})
    summary = (entry or {}).get("summary", {})

    def median(impl: str) -> float | None:
        stats = summary.get(members.get(impl), {}).get(key)
        return float(stats["median"]) if stats else None

    return median("ours"), median("torch")


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours/torch, when both are positive."""
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return None
    return ours / theirs


def _completed(entry: Mapping[str, Any] | None, config: str, target: Target) -> tuple[int, int]:
    """``(launches that reported the metric, launches)`` of ``config`` at the world size."""
    runs = [
        run
        for run in (entry or {}).get("runs", [])
        if run["config"] == config and run.get("world_size") == target.world_size
    ]
    done = sum(1 for run in runs if run.get("ok") and target.key in run.get("metrics", {}))
    return done, len(runs)


def evaluate_targets(doc: Doc) -> list[dict[str, Any]]:
    """Each issue target with the measured figures and a verdict.

    Returns:
        One dict per :data:`bench.specs.TARGETS` entry: ``text``, ``bench``,
        ``key``, ``pair``, ``kind``, ``bound``, ``ours``, ``torch``,
        ``ratio`` and ``verdict``: ``"met"``, ``"not met"``, ``"not
        measured"`` (the benchmark ran, but without figures for this: failed
        launches, a world size it did not reach, a ratio of non-positive
        numbers) or ``"not run"``; ``"completes"`` targets add ``launches``.
    """
    out = []
    for target in TARGETS:
        entry = doc["benchmarks"].get(target.bench)
        ours, theirs = _medians(entry, target.pair, target.key)
        ratio = _ratio(ours, theirs)
        row: dict[str, Any] = {**asdict(target), "ours": ours, "torch": theirs, "ratio": ratio}
        met: bool | None = None
        if target.kind == "completes":
            members = _pairs(CONFIGS)[target.pair]
            row["launches"] = {impl: _completed(entry, members[impl], target) for impl in members}
            done, total = row["launches"]["ours"]
            met = done == total if total else None
        elif target.kind == "no_worse":
            met = None if ours is None or theirs is None else ours <= theirs + target.bound
        elif ratio is not None:
            met = ratio <= target.bound if target.kind == "max_ratio" else ratio >= target.bound
        if met is not None:
            row["verdict"] = "met" if met else "not met"
        else:
            row["verdict"] = "not measured" if entry else "not run"
        out.append(row)
    return out


def _target_line(row: Mapping[str, Any]) -> str:
    """One row of the targets table."""

    def value(v: float | None) -> str:
        return "—" if v is None else _fmt(v)

    unit = row["unit"]
    ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
    if row["kind"] == "completes":

        def launches(impl: str) -> str:
            done, total = row["launches"][impl]
            if not total:
                return f"no launch at world {row['world_size']}"
            return f"{done}/{total} launches; {value(row[impl])} {unit}"

        ours, theirs = launches("ours"), launches("torch")
        need = f"every launch at world {row['world_size']} completes"
    else:
        ours, theirs = f"{value(row['ours'])} {unit}", f"{value(row['torch'])} {unit}"
        need = {
            "max_ratio": f"ours/torch ≤ {row['bound']:g}",
            "min_ratio": f"ours/torch ≥ {row['bound']:g}",
            "no_worse": f"ours ≤ torch + {row['bound']:g} {unit}",
        }[row["kind"]]
    return (
        f"| {row['text']} | {row['pair']} | {ours} | {theirs} | {ratio} | {need} "
        f"| **{row['verdict']}** |"
    )


def _metric_label(metric: Metric) -> str:
    arrow = "↑" if metric.higher_is_better else "↓"
    return f"{metric.label} [{metric.unit}] {arrow}"


def _section(name: str, entry: Mapping[str, Any]) -> list[str]:
    """The table of one benchmark: its headline metrics, per pair it ran."""
    spec = BENCHMARKS[name]
    pairs = {
        pair: members
        for pair, members in _pairs(CONFIGS).items()
        if any(c in entry["summary"] or c in entry.get("skipped", {}) for c in members.values())
        or any(run["config"] in members.values() for run in entry["runs"])
    }
    lines = [
        f"### {name}",
        "",
        f"{entry['title']}.",
        "",
        *([spec.method, ""] if spec.method else []),
        "| metric | pair | ours | torch | ours/torch |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for metric in spec.metrics:
        for pair, members in pairs.items():
            ours, theirs = members.get("ours"), members.get("torch")
            ratio = _ratio(*_medians(entry, pair, metric.key))
            if all(_cell(entry, c, metric.key) == "—" for c in (ours, theirs)):
                continue  # e.g. a world size this run did not reach
            lines.append(
                f"| {_metric_label(metric)} | {pair} | {_cell(entry, ours, metric.key)} "
                f"| {_cell(entry, theirs, metric.key)} "
                f"| {'—' if ratio is None else f'{ratio:.2f}'} |"
            )
    return [*lines, ""]


def markdown(doc: Doc) -> str:
    """The targets, one table per benchmark in ``doc``, and notes."""
    env = doc.get("environment", {})
    lines = [
        f"# aiorpc_autograd vs torch.distributed.rpc — {doc['date']}",
        "",
        (
            f"torch {env.get('torch')}, Python {env.get('python')}, {env.get('cpu_count')} cores; "
            f"aiorpc_autograd sources sha256 {env.get('aiorpc_autograd_source_sha256')} "
            f"(git HEAD {env.get('git_head')}); last updated {doc.get('updated_at')}."
        ),
        "",
        (
            "Cells: median over launches (min-max across launches). "
            "ours/torch is the ratio of medians; ↑ higher is better, ↓ lower is better."
        ),
        "",
        (
            "Pairs: *unpinned* = ours-unpinned vs torch-default (default options); "
            "*pinned* = ours-pinned vs torch-tuned (num_worker_threads=1); pinned "
            "configurations put rank r on core r."
        ),
        "",
        *(
            [
                f"**Quick run** of {', '.join(quick)} (`--quick`): a smoke test with fewer "
                "calls, steps and launches, not a measurement.",
                "",
            ]
            if (quick := [n for n, e in doc["benchmarks"].items() if e.get("quick")])
            else []
        ),
        "## Targets of the benchmark issue",
        "",
        "| target | pair | ours | torch | ours/torch | needs | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
        *(_target_line(row) for row in doc.get("targets", evaluate_targets(doc))),
        "",
        "## Results",
        "",
    ]
    notes: list[str] = []
    for name, entry in doc["benchmarks"].items():
        if name in BENCHMARKS:
            lines.extend(_section(name, entry))
            notes.extend(_notes(name, entry))
    return "\n".join([*lines, "## Notes", "", *notes, ""])


def _notes(name: str, entry: Mapping[str, Any]) -> list[str]:
    mode = "quick" if entry["quick"] else "full"
    sources = entry.get("environment", {}).get("aiorpc_autograd_source_sha256")
    out = [
        (
            f"- **{name}**: {entry['title']}; run {entry['run_at']} ({mode}, "
            f"{entry['launches']} launch(es) per config); params `{json.dumps(entry['params'])}`; "
            f"aiorpc_autograd sources {sources}."
        )
    ]
    for config, reason in entry.get("skipped", {}).items():
        out.append(f"  - {config}: skipped — {reason.splitlines()[-1] if reason else ''}")
    for config, checks in entry.get("checks", {}).items():
        failed = [k for k, ok in checks.items() if not ok]
        verdict = f"FAILED {', '.join(failed)}" if failed else "all passed"
        out.append(f"  - {config}: checks ({', '.join(checks)}): {verdict}")
    busy = [r["foreign_cpu_s"] / r["wall_s"] for r in entry["runs"] if "foreign_cpu_s" in r]
    if busy:
        out.append(
            f"  - other processes kept {min(busy):.2f}-{max(busy):.2f} cores busy "
            "during the launches (noise)"
        )
    chatty: dict[str, list[str]] = {}
    for run in entry["runs"]:
        texts = [t.strip() for t in run.get("output") or [] if t.strip()]
        if texts:
            chatty.setdefault(run["config"], []).append(texts[0].splitlines()[-1].strip())
    for config, last_lines in chatty.items():
        out.append(
            f"  - {config}: workers wrote output in {len(last_lines)} launch(es), e.g. "
            f"`{last_lines[0][:160]}` (all of it under `output` in the JSON)"
        )
    for run in entry["runs"]:
        if not run.get("ok"):
            error = (run.get("error") or "").strip().splitlines()
            why = [f"`{error[-1] if error else 'unknown error'}`"]
            for rank, text in enumerate(run.get("output") or []):
                if text.strip():
                    why.append(f"rank {rank} said `{text.strip().splitlines()[-1].strip()[:160]}`")
            out.append(f"  - {run['config']} launch {run['launch']}: failed — {'; '.join(why)}")
    return out


def plot(doc: Doc, results_dir: Path) -> list[Path]:
    """One PNG per benchmark with plot panels; medians with min-max bars.

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

    impl_of = {c.name: c.impl for c in CONFIGS}
    written: list[Path] = []
    for name, entry in doc["benchmarks"].items():
        spec = BENCHMARKS.get(name)
        configs = [c.name for c in CONFIGS if c.name in entry["summary"]]
        if spec is None or not spec.plots or not configs:
            continue
        fig, axes = plt.subplots(
            1, len(spec.plots), figsize=(7 * len(spec.plots), 4.5), squeeze=False
        )
        for ax, layout in zip(axes[0], spec.plots, strict=True):
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
                    style = "--" if impl_of.get(config) == "torch" else "-"
                    ax.errorbar(xs, med, yerr=err, marker="o", ls=style, capsize=3, label=config)
            ax.set_xticks(range(len(layout.xs)), layout.xs)
            ax.set_xlabel(layout.xlabel)
            ax.set_ylabel(layout.ylabel)
            if layout.logy:
                ax.set_yscale("log")
            ax.set_title(layout.title or f"{name}: {entry['title']}", fontsize=9, wrap=True)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        if len(spec.plots) > 1:
            fig.suptitle(f"{name}: {entry['title']}", fontsize=9, wrap=True)
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
