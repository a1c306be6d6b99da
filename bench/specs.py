"""Configurations and the benchmark registry.

Both sides receive the same parameter dict for a benchmark, so they do the
same work; only the RPC library differs.  The registry is data: the
measurement code lives in :mod:`bench.torch_side` and :mod:`bench.ours_side`
under the same benchmark name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Impl = Literal["torch", "ours"]
Params = dict[str, Any]


@dataclass(frozen=True)
class Config:
    """One way of running a benchmark.

    Attributes:
        name: label used in results, e.g. ``"torch-default"``.
        impl: which RPC library the workers use.
        pinned: pin rank ``r`` to the ``r``-th allowed core
            (``os.sched_setaffinity``) before anything else is imported.
        options: keyword arguments for the library's options object
            (``TensorPipeRpcBackendOptions`` / ``RpcOptions``).
        pair: configurations with the same ``pair`` are compared in the
            report (ours over torch).
    """

    name: str
    impl: Impl
    pinned: bool
    options: Mapping[str, Any] = field(default_factory=dict)
    pair: str = ""


#: Launch order within one round; rounds rotate it so that no configuration
#: always goes first, and torch and ours alternate throughout.
CONFIGS: tuple[Config, ...] = (
    Config("torch-default", "torch", pinned=False, pair="unpinned"),
    Config("ours-unpinned", "ours", pinned=False, pair="unpinned"),
    Config(
        "torch-tuned",
        "torch",
        pinned=True,
        options={"num_worker_threads": 1},
        pair="pinned",
    ),
    Config("ours-pinned", "ours", pinned=True, pair="pinned"),
)


@dataclass(frozen=True)
class Metric:
    """A headline figure of a benchmark, shown in the markdown table.

    Attributes:
        key: key in the metrics dict rank 0 reports.
        label: human-readable name.
        unit: unit for display.
        higher_is_better: direction, shown next to the ratio.
    """

    key: str
    label: str
    unit: str
    higher_is_better: bool


@dataclass(frozen=True)
class PlotSpec:
    """How to plot a benchmark: one series per configuration.

    Attributes:
        xs: x-axis category labels.
        keys: the metric key plotted at each x (same length as ``xs``).
        xlabel: x-axis title.
        ylabel: y-axis title.
        kind: ``"lines"`` (a trend over a parameter) or ``"bars"``.
        logy: logarithmic y axis.
    """

    xs: tuple[str, ...]
    keys: tuple[str, ...]
    xlabel: str
    ylabel: str
    kind: Literal["lines", "bars"] = "lines"
    logy: bool = False


@dataclass(frozen=True)
class BenchSpec:
    """A registered benchmark.

    Attributes:
        name: the name used by ``--only`` and by the side modules' tables.
        title: one line for the report.
        params: parameters for a run, given ``quick``.
        metrics: headline metrics.
        timeout_s: upper bound of the measurement time on rank 0; a launch's
            timeout is the sum over its benchmarks plus start-up.
        world_size: number of worker processes it needs.
        default: part of a run without ``--only``.
        plot: plot layout, or None for no plot.
    """

    name: str
    title: str
    params: Callable[[bool], Params]
    metrics: tuple[Metric, ...]
    timeout_s: float
    world_size: int = 2
    default: bool = True
    plot: PlotSpec | None = None


def size_label(nbytes: int) -> str:
    """Format a byte count as ``4KiB``, ``16MiB``, ..."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


INFLIGHT = (1, 16, 64, 256)
ECHO_SIZES = (4 << 10, 1 << 20, 16 << 20, 64 << 20)


def _noop_params(quick: bool) -> Params:
    return {"calls": 1000 if quick else 5000, "warmup": 100 if quick else 500}


def _throughput_params(quick: bool) -> Params:
    return {
        "inflight": list(INFLIGHT),
        "seconds": 0.3 if quick else 1.0,
        "warmup_seconds": 0.1 if quick else 0.2,
    }


def _echo_params(quick: bool) -> Params:
    return {
        "sizes": list(ECHO_SIZES),
        # Iterations per size: roughly equal time per size.
        "iters": [200, 20, 5, 3] if quick else [1000, 100, 30, 10],
        "warmup": 1 if quick else 3,
    }


def _autograd_params(quick: bool) -> Params:
    return {"batch": 32, "dim": 256, "steps": 200 if quick else 500, "warmup": 20 if quick else 50}


BENCHMARKS: dict[str, BenchSpec] = {
    spec.name: spec
    for spec in (
        BenchSpec(
            name="noop",
            title="no-op call latency (sequential calls, after warmup)",
            params=_noop_params,
            metrics=(
                Metric("p50_us", "p50", "µs", higher_is_better=False),
                Metric("p99_us", "p99", "µs", higher_is_better=False),
            ),
            timeout_s=120.0,
            plot=PlotSpec(
                xs=("p50", "p90", "p99"),
                keys=("p50_us", "p90_us", "p99_us"),
                xlabel="percentile",
                ylabel="latency (µs)",
                kind="bars",
                logy=True,
            ),
        ),
        BenchSpec(
            name="throughput",
            title="no-op calls/s with N calls in flight",
            params=_throughput_params,
            metrics=tuple(
                Metric(
                    f"inflight_{n}_calls_per_s",
                    f"{n} in flight",
                    "calls/s",
                    higher_is_better=True,
                )
                for n in INFLIGHT
            ),
            timeout_s=90.0,
            plot=PlotSpec(
                xs=tuple(str(n) for n in INFLIGHT),
                keys=tuple(f"inflight_{n}_calls_per_s" for n in INFLIGHT),
                xlabel="calls in flight",
                ylabel="calls/s",
            ),
        ),
        BenchSpec(
            name="echo",
            title="float32 tensor echo, GB/s = 2*size/round trip (median)",
            params=_echo_params,
            metrics=tuple(
                Metric(
                    f"{size_label(s)}_GBps",
                    size_label(s),
                    "GB/s",
                    higher_is_better=True,
                )
                for s in ECHO_SIZES
            ),
            timeout_s=120.0,
            plot=PlotSpec(
                xs=tuple(size_label(s) for s in ECHO_SIZES),
                keys=tuple(f"{size_label(s)}_GBps" for s in ECHO_SIZES),
                xlabel="tensor size",
                ylabel="GB/s",
                logy=True,
            ),
        ),
        BenchSpec(
            name="autograd",
            title="distributed autograd step: remote tanh(x @ w), backward, gradients",
            params=_autograd_params,
            metrics=(
                Metric("p50_us", "step p50", "µs", higher_is_better=False),
                Metric("p99_us", "step p99", "µs", higher_is_better=False),
            ),
            timeout_s=120.0,
            plot=PlotSpec(
                xs=("p50", "p90", "p99"),
                keys=("p50_us", "p90_us", "p99_us"),
                xlabel="percentile",
                ylabel="step time (µs)",
                kind="bars",
                logy=True,
            ),
        ),
        # Extension points, not yet registered:
        #   "scale" — "throughput" at world sizes 2..8 (one spec per size, or a
        #             world_size param; launches are grouped by world_size);
        #   "codec" — encode/decode microbenchmark (world_size=1, no peer).
    )
}
