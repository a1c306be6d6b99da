"""Configurations, phases, the benchmark registry and the issue's targets.

Both sides receive the same parameter dict for a benchmark, so they do the
same work; only the RPC library differs.  The registry is data: the
measurement code lives in :mod:`bench.torch_side` and :mod:`bench.ours_side`
under the same benchmark name.  This module imports nothing heavy: the
launcher and every worker load it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
class Phase:
    """A part of a run with its own rounds of launches.

    Each round launches every configuration of ``pairs`` once per world size
    of its benchmarks (in rotated order), so that torch and ours alternate.

    Attributes:
        name: the phase's name.
        launches: rounds in a full run.
        quick_launches: rounds with ``--quick``.
        pairs: the configuration pairs it runs.
    """

    name: str
    launches: int
    quick_launches: int
    pairs: tuple[str, ...] = ("unpinned", "pinned")


#: Phases in the order they run.  "scale" comes first: its launches are the
#: longest, and the later phase's rounds then fill what is left of
#: ``--max-minutes``.
PHASES: dict[str, Phase] = {
    phase.name: phase
    for phase in (
        # 32 workers on a couple of cores: pinning means little there, so only
        # the default configurations.
        Phase("scale", launches=2, quick_launches=1, pairs=("unpinned",)),
        Phase("main", launches=4, quick_launches=2),
    )
}


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
    """One panel of a benchmark's PNG: one series per configuration.

    Attributes:
        xs: x-axis category labels.
        keys: the metric key plotted at each x (same length as ``xs``).
        xlabel: x-axis title.
        ylabel: y-axis title.
        kind: ``"lines"`` (a trend over a parameter) or ``"bars"``.
        logy: logarithmic y axis.
        title: the panel's title (the benchmark's when empty).
    """

    xs: tuple[str, ...]
    keys: tuple[str, ...]
    xlabel: str
    ylabel: str
    kind: Literal["lines", "bars"] = "lines"
    logy: bool = False
    title: str = ""


def fixed(seconds: float) -> Callable[[Params], float]:
    """A timeout that does not depend on the parameters."""
    return lambda _params: seconds


@dataclass(frozen=True)
class BenchSpec:
    """A registered benchmark.

    Attributes:
        name: the name used by ``--only`` and by the side modules' tables.
        title: one line for the report.
        params: parameters for a run, given ``quick``.  A ``world_sizes``
            list runs the benchmark in one launch per size; otherwise it
            runs at ``world_size``.
        metrics: headline metrics.
        timeout_s: upper bound of the measurement time on rank 0, given the
            parameters; a launch's timeout is the sum over its benchmarks
            plus start-up.
        world_size: number of worker processes it needs.
        default: part of a run without ``--only``.
        plots: the panels of its PNG (none: no plot).
        phase: the :data:`PHASES` entry it runs in.
        all_ranks: every rank runs it, not only rank 0; each numeric metric
            is then the maximum over ranks (the slowest one).
        options: library options added to the configuration's for its launches.
        method: how it measures, beyond the title, for the report.
    """

    name: str
    title: str
    params: Callable[[bool], Params]
    metrics: tuple[Metric, ...]
    timeout_s: Callable[[Params], float]
    world_size: int = 2
    default: bool = True
    plots: tuple[PlotSpec, ...] = ()
    phase: str = "main"
    all_ranks: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    method: str = ""

    def world_sizes(self, params: Params) -> list[int]:
        """The world sizes it launches at, given its parameters."""
        return list(params.get("world_sizes", [self.world_size]))


@dataclass(frozen=True)
class Target:
    """A goal of the benchmark issue, checked against one pair's medians.

    Attributes:
        text: the goal as the report states it.
        bench: the benchmark.
        key: the metric.
        pair: the configuration pair compared.
        kind: ``"max_ratio"`` (ours/torch <= bound), ``"min_ratio"``
            (ours/torch >= bound), ``"no_worse"`` (ours <= torch + bound, in
            the metric's unit) or ``"completes"`` (every launch of ours
            reported the metric).
        unit: the metric's unit, for display.
        bound: the bound ``kind`` uses.
        world_size: for ``"completes"``, the world size whose launches count.
    """

    text: str
    bench: str
    key: str
    pair: str
    kind: Literal["max_ratio", "min_ratio", "no_worse", "completes"]
    unit: str
    bound: float = 0.0
    world_size: int = 2


def size_label(nbytes: int) -> str:
    """Format a byte count as ``4KiB``, ``16MiB``, ..."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


INFLIGHT = (1, 16, 64, 256)
ECHO_SIZES = (4 << 10, 1 << 20, 16 << 20, 64 << 20)
SCALE_SIZES = (2, 4, 8, 16, 32)
#: ``--quick`` stops the world-size scan here.
SCALE_QUICK_MAX = 8
CODEC_TENSORS = (0, 1, 16)
#: RSS noise allowed by the "no worse than torch" target (MiB).
RSS_NOISE_MB = 1.0


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
    # The step: a 64x512 batch on the caller, a 512x512 weight on the worker.
    return {
        "batch": 64,
        "dim": 512,
        "lr": 1e-3,
        "steps": 300 if quick else 2000,  # timed, and the RSS window
        "fused_steps": 300 if quick else 1000,  # timed, optimizer in the backward pass
        "warmup": 50 if quick else 200,
        "local_steps": 200 if quick else 500,
        "check_steps": 3,
    }


def _autograd_timeout(params: Params) -> float:
    # 20 ms a step is ~6x the usual step on a 2-core machine.
    steps = float(params["steps"] + params["warmup"] + params["local_steps"])
    return 60.0 + 0.02 * steps


SCALING_DEPTHS = (1, 8, 32, 64)
SCALING_MICROBATCHES = (1, 8, 32)


def _scaling_params(quick: bool) -> Params:
    # A small model (64-wide layers, a batch of 32 rows: 1 row per call at 32
    # micro-batches), so that the overhead, not the compute, grows.
    return {
        "depths": list(SCALING_DEPTHS),
        "microbatches": list(SCALING_MICROBATCHES),
        "dim": 64,
        "batch": 32,
        "lr": 1e-3,
        "steps": 20 if quick else 300,
        "warmup": 5 if quick else 30,
    }


def _scaling_timeout(params: Params) -> float:
    cases = len(params["depths"]) + len(params["microbatches"])
    return 60.0 + cases * float(params["steps"] + params["warmup"]) * 0.1


def _scale_params(quick: bool) -> Params:
    sizes = [n for n in SCALE_SIZES if not quick or n <= SCALE_QUICK_MAX]
    return {"world_sizes": sizes}


def _scale_timeout(params: Params) -> float:
    # Start-up of n interpreters importing torch on a few cores, then the round.
    return 60.0 + 10.0 * float(max(params["world_sizes"]))


def _codec_params(quick: bool) -> Params:
    return {
        "tensors": list(CODEC_TENSORS),
        "numel": 64,
        "repeat": 3 if quick else 5,
        "number": 200 if quick else 1000,
    }


def _lines_over(xs: Sequence[object], template: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(labels, keys)`` of a panel with one point per ``x``."""
    return tuple(str(x) for x in xs), tuple(template.format(x) for x in xs)


def _series(
    xs: Sequence[object],
    key: str,
    label: str,
    unit: str,
    higher_is_better: bool,
    **plot: Any,
) -> tuple[tuple[Metric, ...], tuple[PlotSpec, ...]]:
    """``(metrics, plots)`` of a benchmark with one figure per ``x``.

    ``key`` and ``label`` are templates filled with each ``x``; ``plot``
    holds the :class:`PlotSpec` fields other than ``xs`` and ``keys``.
    """
    labels, keys = _lines_over(xs, key)
    metrics = tuple(
        Metric(k, label.format(x), unit, higher_is_better)
        for k, x in zip(keys, labels, strict=True)
    )
    return metrics, (PlotSpec(labels, keys, **plot),)


def _scale_panel(template: str, ylabel: str, title: str) -> PlotSpec:
    xs, keys = _lines_over(SCALE_SIZES, template)
    return PlotSpec(xs, keys, "world size", ylabel, logy=True, title=title)


_THROUGHPUT = _series(
    INFLIGHT,
    "inflight_{}_calls_per_s",
    "{} in flight",
    "calls/s",
    True,
    xlabel="calls in flight",
    ylabel="calls/s",
)
_ECHO = _series(
    [size_label(s) for s in ECHO_SIZES],
    "{}_GBps",
    "{}",
    "GB/s",
    True,
    xlabel="tensor size",
    ylabel="GB/s",
    logy=True,
)
_CODEC = _series(
    CODEC_TENSORS,
    "tensors_{}_us",
    "{} tensors",
    "µs",
    False,
    xlabel="tensors in the call",
    ylabel="µs per encode + decode",
    kind="bars",
    logy=True,
)
_AUTOGRAD_TIMES = (
    ("step_p50_ms", "step p50", "distributed step"),
    ("local_step_ms", "local step", "local step"),
    ("overhead_ms", "overhead", "overhead"),
    ("fused_step_p50_ms", "step p50, step in backward", "step in backward"),
    ("fused_overhead_ms", "overhead, step in backward", "overhead, in backward"),
)
_AUTOGRAD_RSS = (
    ("rss_growth_caller_mb", "caller growth"),
    ("rss_growth_worker_mb", "worker growth"),
    ("rss_retained_caller_mb", "caller after trim"),
    ("rss_retained_worker_mb", "worker after trim"),
)
_SCALE_METRICS = (
    ("w{}_ready_s", "world {}: launch to ready"),
    ("w{}_init_rpc_s", "world {}: slowest init_rpc"),
    ("w{}_all_pairs_s", "world {}: all-pairs round"),
)

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
            timeout_s=fixed(120.0),
            plots=(
                PlotSpec(
                    xs=("p50", "p90", "p99"),
                    keys=("p50_us", "p90_us", "p99_us"),
                    xlabel="percentile",
                    ylabel="latency (µs)",
                    kind="bars",
                    logy=True,
                ),
            ),
        ),
        BenchSpec(
            name="throughput",
            title="no-op calls/s with N calls in flight",
            params=_throughput_params,
            metrics=_THROUGHPUT[0],
            timeout_s=fixed(90.0),
            plots=_THROUGHPUT[1],
        ),
        BenchSpec(
            name="echo",
            title="float32 tensor echo, GB/s = 2*size/round trip (median)",
            params=_echo_params,
            metrics=_ECHO[0],
            timeout_s=fixed(120.0),
            plots=_ECHO[1],
        ),
        BenchSpec(
            name="autograd",
            title=(
                "distributed autograd step: caller's 64x512 batch, remote relu(x @ w) on the "
                "worker's 512x512 weight, loss on the caller, dist backward, "
                "DistributedOptimizer(SGD).step"
            ),
            params=_autograd_params,
            metrics=(
                *(
                    Metric(key, label, "ms", higher_is_better=False)
                    for key, label, _ in _AUTOGRAD_TIMES
                ),
                Metric("step_p99_ms", "step p99", "ms", higher_is_better=False),
                Metric(
                    "local_step_rpc_up_ms",
                    "local step, agents up",
                    "ms",
                    higher_is_better=False,
                ),
                *(
                    Metric(key, f"RSS {label} over the steps", "MiB", higher_is_better=False)
                    for key, label in _AUTOGRAD_RSS
                ),
            ),
            timeout_s=_autograd_timeout,
            method=(
                "Step times are the median of the timed steps after warm-up. Local step: "
                "the same step in rank 0 alone, before init_rpc, once every rank of the "
                "launch has imported its libraries (no RPC thread anywhere), timed in 5 "
                "blocks, the quietest block's median; overhead = step p50 - local. "
                "'Local step, agents up' repeats it after the timed "
                "steps with both agents still up (what background threads cost the "
                "caller's compute). RSS: both processes are trimmed (malloc_trim) and "
                "read before the timed steps; growth = RSS after them minus that, "
                "'after trim' = the same after another malloc_trim; the targets add "
                "caller and worker, each floored at 0. Weights after 3 distributed steps "
                "are checked against 3 local steps (weights_match). 'Step in backward': "
                "ours with dist_autograd.backward(..., optimizer=opt) (no separate step "
                "round), timed after the RSS window; torch has no such mode: its row is "
                "its backward-then-step step timed again there."
            ),
            plots=(
                PlotSpec(
                    xs=tuple(x for _, _, x in _AUTOGRAD_TIMES),
                    keys=tuple(key for key, _, _ in _AUTOGRAD_TIMES),
                    xlabel="",
                    ylabel="ms",
                    kind="bars",
                    title="step time (median)",
                ),
                PlotSpec(
                    xs=tuple(label for _, label in _AUTOGRAD_RSS),
                    keys=tuple(key for key, _ in _AUTOGRAD_RSS),
                    xlabel="",
                    ylabel="MiB",
                    kind="bars",
                    title="RSS growth over the timed steps (from a trimmed start)",
                ),
            ),
        ),
        BenchSpec(
            name="autograd_scaling",
            title=(
                "autograd step overhead as the remote model deepens (an MLP of 1-64 layers, "
                "one call per step) and as the calls per step grow (1-32 micro-batches "
                "gathered into one loss, depth 1)"
            ),
            params=_scaling_params,
            metrics=(
                *(
                    Metric(f"depth{d}_overhead_ms", f"overhead, depth {d}", "ms", False)
                    for d in SCALING_DEPTHS
                ),
                *(
                    Metric(f"mb{m}_overhead_ms", f"overhead, {m} calls", "ms", False)
                    for m in SCALING_MICROBATCHES
                    if m != 1
                ),
                Metric("depth_growth", "overhead depth 64 / depth 1", "x", False),
                Metric("mb_growth", "overhead 32 calls / 1 call", "x", False),
            ),
            timeout_s=_scaling_timeout,
            method=(
                "For each case: a fresh remote MLP (Linear(64, 64) + ReLU per layer) held "
                "in an RRef on the worker, a DistributedOptimizer(SGD) over its parameters; "
                "a step = the forward RPCs of every micro-batch (gathered), the summed loss "
                "on the caller, dist backward, optimizer step. Median of the timed steps "
                "after warm-up; local = the same step in rank 0 alone, before init_rpc (as in "
                "'autograd'); "
                "overhead = step - local. Growth = largest case's overhead / smallest's: "
                "ours growing no faster than torch's is growth ratio <= 1."
            ),
            plots=(
                PlotSpec(
                    xs=tuple(str(d) for d in SCALING_DEPTHS),
                    keys=tuple(f"depth{d}_overhead_ms" for d in SCALING_DEPTHS),
                    xlabel="layers of the remote MLP",
                    ylabel="overhead (ms)",
                    title="overhead vs depth (1 call per step)",
                ),
                PlotSpec(
                    xs=tuple(str(m) for m in SCALING_MICROBATCHES),
                    keys=tuple(
                        "depth1_overhead_ms" if m == 1 else f"mb{m}_overhead_ms"
                        for m in SCALING_MICROBATCHES
                    ),
                    xlabel="calls per step (micro-batches)",
                    ylabel="overhead (ms)",
                    title="overhead vs calls per step (depth 1)",
                ),
            ),
        ),
        BenchSpec(
            name="codec",
            title=(
                "codec round trip (encode + decode, one process, no RPC) of a call "
                "(torch.add, N float32[64] tensors); ours vs torch's RPC pickler"
            ),
            params=_codec_params,
            metrics=_CODEC[0],
            timeout_s=fixed(120.0),
            plots=_CODEC[1],
            method=(
                "Ours: PythonCall message encode, frame encode, FrameReader, decode, "
                "payload load. Torch: _internal_rpc_pickler serialize + deserialize. "
                "Median of `repeat` timeit runs of `number` round trips (gc off), in "
                "rank 0 of each launch; the first result is checked against the call."
            ),
        ),
        BenchSpec(
            name="scale",
            title=(
                "world size: launch to the last worker ready (interpreter, import and "
                "init_rpc), and every worker calling every other once, all in flight"
            ),
            params=_scale_params,
            metrics=tuple(
                Metric(key.format(n), label.format(n), "s", higher_is_better=False)
                for n in SCALE_SIZES
                for key, label in _SCALE_METRICS
            ),
            timeout_s=_scale_timeout,
            method=(
                "One launch per world size; all workers spawned at once on this machine. "
                "Launch to ready: from the first spawn to the last worker out of "
                "init_rpc (interpreter start and imports included, the same for both). "
                "All-pairs round: on every worker, from its own ready to the replies of "
                "one no-op call to every other worker, all in flight; the slowest worker "
                "counts. Options: rpc_timeout=300 on both sides."
            ),
            plots=(
                _scale_panel("w{}_ready_s", "seconds", "launch to the last worker ready"),
                _scale_panel("w{}_all_pairs_s", "seconds", "all-pairs round (slowest worker)"),
            ),
            phase="scale",
            all_ranks=True,
            options={"rpc_timeout": 300.0},
        ),
    )
}

#: The benchmark issues' goals (the training-step issue's first), in the
#: order the report lists them.
TARGETS: tuple[Target, ...] = (
    Target(
        "step overhead, step in backward ≤ 0.5x torch default's",
        "autograd",
        "fused_overhead_ms",
        "unpinned",
        "max_ratio",
        "ms",
        0.5,
    ),
    Target(
        "step overhead, step in backward ≤ 1.0x torch tuned's",
        "autograd",
        "fused_overhead_ms",
        "pinned",
        "max_ratio",
        "ms",
        1.0,
    ),
    Target(
        "step overhead, backward then step ≤ 1.0x torch default's",
        "autograd",
        "overhead_ms",
        "unpinned",
        "max_ratio",
        "ms",
        1.0,
    ),
    *(
        Target(
            f"{size_label(size)} echo GB/s ≥ {bound:g}x torch",
            "echo",
            f"{size_label(size)}_GBps",
            pair,
            "min_ratio",
            "GB/s",
            bound,
        )
        for size in ECHO_SIZES
        for bound in ((1.0, 2.0) if size == ECHO_SIZES[-1] else (1.0,))
        for pair in ("unpinned", "pinned")
    ),
    *(
        Target(
            f"calls/s with 256 in flight ≥ {bound:g}x torch {torch_config}",
            "throughput",
            "inflight_256_calls_per_s",
            pair,
            "min_ratio",
            "calls/s",
            bound,
        )
        for pair, torch_config, bound in (("unpinned", "default", 2.0), ("pinned", "tuned", 1.2))
    ),
    Target("no-op p50 ≤ 0.5x torch default", "noop", "p50_us", "unpinned", "max_ratio", "µs", 0.5),
    Target("no-op p50 ≤ 1.0x torch tuned", "noop", "p50_us", "pinned", "max_ratio", "µs", 1.0),
    *(
        Target(
            f"autograd RSS growth {when} (caller + worker) no worse than torch's",
            "autograd",
            key,
            pair,
            "no_worse",
            "MiB",
            RSS_NOISE_MB,
        )
        for key, when in (
            ("rss_growth_mb", "over the steps"),
            ("rss_retained_mb", "after malloc_trim"),
        )
        for pair in ("unpinned", "pinned")
    ),
    *(
        Target(
            f"autograd overhead grows with {what} no faster than torch's (growth ratio ≤ 1)",
            "autograd_scaling",
            key,
            pair,
            "max_ratio",
            "x",
            1.0,
        )
        for key, what in (("depth_growth", "depth"), ("mb_growth", "calls per step"))
        for pair in ("unpinned", "pinned")
    ),
    Target(
        "world size 32 completes the all-pairs round",
        "scale",
        "w32_all_pairs_s",
        "unpinned",
        "completes",
        "s",
        world_size=32,
    ),
)
