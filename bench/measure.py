"""Inputs, measurement procedures and metric names both sides share.

A procedure that needs RPC in the middle (the autograd step) is written once,
as a generator: it yields the name of an action (``"step"``, ...), the side
performs it with its library and sends the result back (:func:`drive` for
torch's blocking calls, :func:`drive_async` for ours).  Timing happens in the
generator, around the ``yield``, so both sides are timed by the same lines.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from typing import Any

import torch

from bench import workloads
from bench.specs import Params, size_label
from bench.stats import latency_summary_us

#: A shared procedure: yields action names, receives their results, returns metrics.
Procedure = Generator[str, Any, dict[str, Any]]


def drive(procedure: Procedure, actions: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run ``procedure``, performing each action it yields with a blocking call."""
    try:
        action = next(procedure)
        while True:
            action = procedure.send(actions[action]())
    except StopIteration as stop:
        result: dict[str, Any] = stop.value
        return result


async def drive_async(
    procedure: Procedure, actions: Mapping[str, Callable[[], Awaitable[Any]]]
) -> dict[str, Any]:
    """Run ``procedure``, awaiting each action it yields."""
    try:
        action = next(procedure)
        while True:
            action = procedure.send(await actions[action]())
    except StopIteration as stop:
        result: dict[str, Any] = stop.value
        return result


def echo_tensor(nbytes: int, seed: int = 0) -> torch.Tensor:
    """A contiguous float32 tensor of ``nbytes`` bytes with random values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(nbytes // 4, generator=gen, dtype=torch.float32)


def bit_exact(sent: torch.Tensor, got: object) -> bool:
    """True when ``got`` is a tensor with ``sent``'s dtype, shape and values."""
    return isinstance(got, torch.Tensor) and got.dtype == sent.dtype and torch.equal(got, sent)


def echo_metrics(nbytes: int, samples_ns: Sequence[int], equal: bool) -> dict[str, float | bool]:
    """Metrics of one echo size: GB/s from the median and best round trip.

    GB/s counts the bytes both ways: ``2 * nbytes / round trip``, GB = 1e9.
    """
    label = size_label(nbytes)
    lat = latency_summary_us(samples_ns)
    return {
        f"{label}_GBps": 2 * nbytes / (lat["p50_us"] * 1e3),
        f"{label}_GBps_best": 2 * nbytes / (lat["min_us"] * 1e3),
        f"{label}_rtt_p50_us": lat["p50_us"],
        f"{label}_rtt_max_us": lat["max_us"],
        f"{label}_iters": lat["n"],
        f"{label}_equal": equal,
    }


def throughput_metrics(inflight: int, calls: int, seconds: float) -> dict[str, float]:
    """Metrics of one throughput level."""
    return {
        f"inflight_{inflight}_calls_per_s": calls / seconds,
        f"inflight_{inflight}_calls": float(calls),
    }


# --- the distributed autograd step -------------------------------------------------------


def autograd_batch(params: Params) -> torch.Tensor:
    """The caller's ``batch x dim`` input, seeded."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(params["batch"], params["dim"], generator=gen)


def _local_steps(params: Params, steps: int) -> tuple[torch.Tensor, list[float]]:
    """Run the step in this process alone: ``(final weight, seconds per step)``."""
    w = workloads.make_weight(params["dim"])
    opt = torch.optim.SGD([w], lr=params["lr"])
    x = autograd_batch(params)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.relu(x @ w).sum().backward()  # type: ignore[no-untyped-call]
        opt.step()
        times.append(time.perf_counter() - t0)
    return w.detach(), times


#: Blocks the local steps are timed in; the quietest block's median counts.
LOCAL_BLOCKS = 5


def local_step_baseline(params: Params) -> dict[str, float]:
    """The step in this process alone, in ms: ``local_steps`` steps in blocks.

    Rank 0 runs it before ``init_rpc``, once every rank of the launch has
    imported its libraries (:meth:`bench.worker.WorkerContext.before_init`),
    so that no RPC thread runs anywhere: it is the reference the overhead is
    measured against, under the launch's pinning.  The steps run in
    :data:`LOCAL_BLOCKS` blocks and the lowest block median counts: with two
    intra-op threads on two cores, another process taking a core for a moment
    slows a block many times over.  A lower local time adds the same to both
    libraries' overheads, which pushes their ratio towards 1 and so cannot
    make a "ratio <= 0.5" target met.
    """
    per_block = max(1, params["local_steps"] // LOCAL_BLOCKS)
    medians = []
    for _ in range(LOCAL_BLOCKS):
        _, times = _local_steps(params, per_block)
        medians.append(statistics.median(times[len(times) // 10 :]) * 1e3)
    return {"local_step_ms": min(medians), "local_step_worst_block_ms": max(medians)}


def autograd_procedure(params: Params, baseline: Mapping[str, float]) -> Procedure:
    """The issue's training step, timed, with RSS marks; yields to the side.

    Actions: ``"step"`` (one distributed step: remote ``relu(x @ w)``,
    ``loss = y.sum()`` here, distributed backward, ``DistributedOptimizer``
    step), ``"weight"`` (a copy of the remote weight), ``"worker_rss"`` and
    ``"worker_trimmed_rss"`` (the worker's :func:`bench.workloads.rss_mb` /
    :func:`bench.workloads.trimmed_rss_mb`), ``"fused_step"`` (the step with
    the optimizer stepped inside the backward pass where the side has that
    mode; else its ``"step"``).

    Order: ``check_steps`` distributed steps whose resulting weight must
    match the same steps run locally; ``warmup`` steps; an RSS mark of both
    processes after ``malloc_trim``; ``steps`` timed steps; RSS of both; RSS
    of both after ``malloc_trim``; ``warmup`` + ``fused_steps`` timed
    ``"fused_step"`` steps; the local steps again, with the agents
    still up (``local_step_rpc_up_ms``: what the library's background threads
    cost the caller's own compute, for the record).

    Overhead is the distributed median minus ``baseline["local_step_ms"]``
    (:func:`local_step_baseline`).  Growth figures are end minus the trimmed
    start: ``rss_growth_*`` before the final trim (what the process holds),
    ``rss_retained_*`` after it (what it cannot give back); the ``*_mb``
    totals add caller and worker, each floored at 0.
    """
    for _ in range(params["check_steps"]):
        yield "step"
    remote_w = yield "weight"
    expected, _ = _local_steps(params, params["check_steps"])
    weights_match = bool(torch.allclose(remote_w, expected, rtol=1e-4, atol=1e-6))

    for _ in range(params["warmup"]):
        yield "step"
    caller_start = workloads.trimmed_rss_mb()
    worker_start = yield "worker_trimmed_rss"
    clock = time.perf_counter_ns
    samples: list[int] = []
    for _ in range(params["steps"]):
        t0 = clock()
        yield "step"
        samples.append(clock() - t0)
    caller_end = workloads.rss_mb()
    worker_end = yield "worker_rss"
    caller_trim = workloads.trimmed_rss_mb()
    worker_trim = yield "worker_trimmed_rss"
    # The optimizer stepped inside the backward pass (ours); torch has no
    # such mode, its side runs its step (backward, then step) again here.
    for _ in range(params["warmup"]):
        yield "fused_step"
    fused: list[int] = []
    for _ in range(params["fused_steps"]):
        t0 = clock()
        yield "fused_step"
        fused.append(clock() - t0)
    rpc_up = local_step_baseline(params)

    lat = latency_summary_us(samples)
    fused_lat = latency_summary_us(fused)
    local_ms = baseline["local_step_ms"]
    growth = {
        "rss_growth_caller_mb": caller_end - caller_start,
        "rss_growth_worker_mb": worker_end - worker_start,
        "rss_retained_caller_mb": caller_trim - caller_start,
        "rss_retained_worker_mb": worker_trim - worker_start,
    }
    return {
        "step_p50_ms": lat["p50_us"] / 1e3,
        "step_p90_ms": lat["p90_us"] / 1e3,
        "step_p99_ms": lat["p99_us"] / 1e3,
        "step_mean_ms": lat["mean_us"] / 1e3,
        "local_step_ms": local_ms,
        "local_step_worst_block_ms": baseline["local_step_worst_block_ms"],
        "local_step_rpc_up_ms": rpc_up["local_step_ms"],
        "overhead_ms": lat["p50_us"] / 1e3 - local_ms,
        "fused_step_p50_ms": fused_lat["p50_us"] / 1e3,
        "fused_overhead_ms": fused_lat["p50_us"] / 1e3 - local_ms,
        **growth,
        "rss_growth_mb": sum(max(0.0, growth[f"rss_growth_{p}_mb"]) for p in ("caller", "worker")),
        "rss_retained_mb": sum(
            max(0.0, growth[f"rss_retained_{p}_mb"]) for p in ("caller", "worker")
        ),
        "rss_start_caller_mb": caller_start,
        "rss_start_worker_mb": worker_start,
        "weights_match": weights_match,
    }


# --- codec microbenchmark ----------------------------------------------------------------

Call = tuple[Any, tuple[torch.Tensor, ...], dict[str, Any]]


def codec_call(tensors: int, numel: int) -> Call:
    """``(torch.add, args, {})`` with ``tensors`` float32 tensors of ``numel`` elements."""
    gen = torch.Generator().manual_seed(2)
    return (torch.add, tuple(torch.randn(numel, generator=gen) for _ in range(tensors)), {})


def _same_call(sent: Call, got: object) -> bool:
    return (
        isinstance(got, tuple)
        and len(got) == 3
        and got[0] is sent[0]
        and len(got[1]) == len(sent[1])
        and all(bit_exact(a, b) for a, b in zip(sent[1], got[1], strict=True))
        and got[2] == sent[2]
    )


def codec_metrics(
    roundtrip: Callable[[Call], Callable[[], object]], params: Params
) -> dict[str, Any]:
    """Microseconds per encode + decode of a call with 0, 1, 16 tensors.

    ``roundtrip(call)`` returns a function doing one full round trip and
    returning the decoded call; its first result is checked against ``call``.
    Per tensor count: ``repeat`` timings of ``number`` round trips (``timeit``,
    so the garbage collector is off), the median reported.
    """
    metrics: dict[str, Any] = {}
    for n in params["tensors"]:
        call = codec_call(n, params["numel"])
        run = roundtrip(call)
        metrics[f"tensors_{n}_roundtrip_ok"] = _same_call(call, run())
        times = [
            timeit.timeit(run, number=params["number"]) / params["number"] * 1e6
            for _ in range(params["repeat"])
        ]
        metrics[f"tensors_{n}_us"] = statistics.median(times)
        metrics[f"tensors_{n}_min_us"] = min(times)
    return metrics


# --- world-size scale --------------------------------------------------------------------


def scale_metrics(world_size: int, info: Mapping[str, Any], all_pairs_s: float) -> dict[str, float]:
    """One rank's scale figures; the launcher keeps the maximum over ranks."""
    return {
        f"w{world_size}_ready_s": info["ready_s"],
        f"w{world_size}_init_rpc_s": info["init_rpc_s"],
        f"w{world_size}_all_pairs_s": all_pairs_s,
    }


# --------------------------------------------------------------------------- autograd scaling


def scaling_cases(params: Params) -> list[tuple[str, int, int]]:
    """``(metric prefix, depth, micro-batches)`` of the scaling benchmark: the
    remote MLP deepening at one call per step, then the calls per step growing
    at depth 1."""
    cases = [(f"depth{d}", d, 1) for d in params["depths"]]
    cases += [(f"mb{m}", 1, m) for m in params["microbatches"] if m != 1]
    return cases


def scaling_batch(params: Params) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(params["batch"], params["dim"], generator=gen)


def local_scaling_step_ms(params: Params, depth: int, microbatches: int) -> float:
    """The same step in this process alone (median ms): forward of every
    micro-batch, the summed loss, backward, SGD step."""
    model = workloads.make_mlp(depth, params["dim"])
    opt = torch.optim.SGD(model.parameters(), lr=params["lr"])
    chunks = scaling_batch(params).chunk(microbatches)
    times = []
    for _ in range(params["warmup"] + params["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = sum(model(x).sum() for x in chunks)
        loss.backward()  # type: ignore[union-attr, unused-ignore]
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[params["warmup"] :]) * 1e3


def local_scaling_baseline(params: Params) -> dict[str, float]:
    """:func:`local_scaling_step_ms` of every case (``<prefix>_local_ms``).

    Rank 0 runs it before ``init_rpc``, as :func:`local_step_baseline`: with
    an agent up, its background threads take the cores the local compute
    needs (TensorPipe's shared-memory reactor polls without sleeping: with
    torch's two intra-op threads on two cores the local steps ran many times
    slower, the 'autograd' benchmark's agents-up local step ~30x, and the
    seven cases outlasted the launch's timeout).
    """
    return {
        f"{prefix}_local_ms": local_scaling_step_ms(params, depth, mb)
        for prefix, depth, mb in scaling_cases(params)
    }


def scaling_metrics(
    params: Params, step_ms: Mapping[str, float], baseline: Mapping[str, float]
) -> dict[str, Any]:
    """Overheads (step - local, ms) per case, and how they grow: the largest
    depth's (call count's) overhead over the smallest's.  ``baseline`` is
    :func:`local_scaling_baseline`'s."""
    out: dict[str, Any] = {}
    for prefix, _, _ in scaling_cases(params):
        local = baseline[f"{prefix}_local_ms"]
        out[f"{prefix}_step_ms"] = step_ms[prefix]
        out[f"{prefix}_local_ms"] = local
        out[f"{prefix}_overhead_ms"] = max(step_ms[prefix] - local, 1e-3)
    d, m = params["depths"], params["microbatches"]
    out["depth_growth"] = out[f"depth{max(d)}_overhead_ms"] / out[f"depth{min(d)}_overhead_ms"]
    first = f"mb{min(m)}" if min(m) != 1 else f"depth{min(d)}"
    out["mb_growth"] = out[f"mb{max(m)}_overhead_ms"] / out[f"{first}_overhead_ms"]
    return out


#: Figures rank 0 measures before ``init_rpc`` for a benchmark, by name.
BASELINES: dict[str, Callable[[Params], dict[str, float]]] = {
    "autograd": local_step_baseline,
    "autograd_scaling": local_scaling_baseline,
}
