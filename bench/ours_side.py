"""The benchmarks on aiorpc_autograd, written against shared/API.md.

Each benchmark is ``async fn(rpc, peer, params) -> metrics`` and runs on
rank 0's event loop with the agent already up; :func:`run_worker` does the
lifecycle (``rpc.run`` → ``init_rpc`` → plan → ``shutdown``).  Remote
functions are the plain (non-async) ones of :mod:`bench.workloads`, so the
callee runs them in its thread pool, as torch does.

One step beyond the API: ``init_method`` uses :mod:`bench.loopback`'s scheme,
which works because our rendezvous passes it to torch's.
"""

from __future__ import annotations

import asyncio
import time
from types import ModuleType
from typing import Any

import torch

from bench import loopback, workloads
from bench.measure import (
    autograd_inputs,
    bit_exact,
    echo_metrics,
    echo_tensor,
    grads_match,
    throughput_metrics,
)
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


async def autograd_step(rpc: ModuleType, peer: str, params: dict[str, Any]) -> dict[str, Any]:
    """Distributed autograd steps: context, remote ``tanh(x @ w)``, backward, gradients."""
    from aiorpc_autograd import dist_autograd

    x, w = autograd_inputs(params["batch"], params["dim"])

    async def step() -> dict[torch.Tensor, torch.Tensor]:
        async with dist_autograd.context() as context_id:
            out = await rpc.rpc_async(peer, workloads.linear_tanh, args=(x, w))
            await dist_autograd.backward(context_id, [out.sum()])
            grads: dict[torch.Tensor, torch.Tensor] = dist_autograd.get_gradients(context_id)
            return grads

    for _ in range(params["warmup"]):
        await step()
    match = grads_match(x, w, await step())
    clock = time.perf_counter_ns
    samples: list[int] = []
    for _ in range(params["steps"]):
        t0 = clock()
        await step()
        samples.append(clock() - t0)
    return {**latency_summary_us(samples), "grads_match": match}


BENCHES: dict[str, BenchFn] = {
    "noop": noop_latency,
    "throughput": throughput,
    "echo": tensor_echo,
    "autograd": autograd_step,
}


async def _main(rpc: ModuleType, ctx: WorkerContext) -> None:
    loop = asyncio.get_running_loop()
    ctx.info["loop"] = f"{type(loop).__module__}.{type(loop).__qualname__}"
    options = rpc.RpcOptions(**ctx.options)
    await rpc.init_rpc(
        ctx.name_of(ctx.rank),
        rank=ctx.rank,
        world_size=ctx.world_size,
        init_method=loopback.init_method(ctx.port),
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

    ctx.info["torch"] = torch.__version__
    ctx.info["aiorpc_autograd"] = getattr(rpc, "__version__", None)
    loopback.register()
    rpc.run(_main(rpc, ctx))
