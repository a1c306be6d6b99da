"""The benchmarks on aiorpc_autograd, written against shared/API.md only.

Each benchmark is ``async fn(rpc, peer, params) -> metrics`` and runs on
rank 0's event loop with the agent already up; :func:`run_worker` does the
lifecycle (``rpc.run`` → ``init_rpc`` → plan → ``shutdown``).  Remote
functions are the plain (non-async) ones of :mod:`bench.workloads`, so the
callee runs them in its thread pool, as torch does.
"""

from __future__ import annotations

import asyncio
import time
from types import ModuleType
from typing import Any

from bench import workloads
from bench.measure import bit_exact, echo_metrics, echo_tensor, throughput_metrics
from bench.stats import latency_summary_us
from bench.worker import BenchFn, WorkerContext


async def noop_latency(rpc: ModuleType, peer: str, params: dict[str, Any]) -> dict[str, Any]:
    """Sequential awaited no-op calls: per-call latency percentiles."""
    for _ in range(params["warmup"]):
        await rpc.rpc_async(peer, workloads.noop)
    clock = time.perf_counter_ns
    samples: list[int] = []
    for _ in range(params["calls"]):
        t0 = clock()
        await rpc.rpc_async(peer, workloads.noop)
        samples.append(clock() - t0)
    return latency_summary_us(samples)


async def _pump(rpc: ModuleType, peer: str, inflight: int, seconds: float) -> tuple[int, float]:
    """Keep ``inflight`` no-op calls in flight for ``seconds``, then drain.

    ``inflight`` tasks each await one call at a time and send the next as
    soon as the reply is in, until the deadline.

    Returns:
        (calls completed, seconds from first send to last reply).
    """
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def lane() -> None:
        nonlocal calls
        while time.perf_counter() < deadline:
            await rpc.rpc_async(peer, workloads.noop)
            calls += 1

    await asyncio.gather(*(lane() for _ in range(inflight)))
    return calls, time.perf_counter() - start


async def throughput(rpc: ModuleType, peer: str, params: dict[str, Any]) -> dict[str, Any]:
    """No-op calls/s with 1, 16, 64, 256 calls kept in flight by tasks."""
    metrics: dict[str, Any] = {}
    for inflight in params["inflight"]:
        await _pump(rpc, peer, inflight, params["warmup_seconds"])
        calls, elapsed = await _pump(rpc, peer, inflight, params["seconds"])
        metrics.update(throughput_metrics(inflight, calls, elapsed))
    return metrics


async def tensor_echo(rpc: ModuleType, peer: str, params: dict[str, Any]) -> dict[str, Any]:
    """Round trips of float32 tensors; the first reply per size is checked bit-exact."""
    metrics: dict[str, Any] = {}
    clock = time.perf_counter_ns
    for nbytes, iters in zip(params["sizes"], params["iters"], strict=True):
        tensor = echo_tensor(nbytes)
        for _ in range(params["warmup"]):
            await rpc.rpc_async(peer, workloads.echo, args=(tensor,))
        samples: list[int] = []
        equal = False
        for i in range(iters):
            t0 = clock()
            out = await rpc.rpc_async(peer, workloads.echo, args=(tensor,))
            samples.append(clock() - t0)
            if i == 0:
                equal = bit_exact(tensor, out)
            del out
        metrics.update(echo_metrics(nbytes, samples, equal))
    return metrics


BENCHES: dict[str, BenchFn] = {
    "noop": noop_latency,
    "throughput": throughput,
    "echo": tensor_echo,
}


async def _main(rpc: ModuleType, ctx: WorkerContext) -> None:
    loop = asyncio.get_running_loop()
    ctx.info["loop"] = f"{type(loop).__module__}.{type(loop).__qualname__}"
    options = rpc.RpcOptions(**ctx.options)
    await rpc.init_rpc(
        ctx.name_of(ctx.rank),
        rank=ctx.rank,
        world_size=ctx.world_size,
        init_method=ctx.init_method,
        options=options,
    )
    try:
        ctx.ready()
        if ctx.rank == 0:
            peer = ctx.name_of(1)
            for name, params, fn in ctx.steps(BENCHES):
                with ctx.measuring(name) as metrics:
                    metrics.update(await fn(rpc, peer, params))
    finally:
        await rpc.shutdown()


def run_worker(ctx: WorkerContext) -> None:
    """Run this worker's part of the launch on the package's own runner."""
    import aiorpc_autograd as rpc

    rpc.run(_main(rpc, ctx))
