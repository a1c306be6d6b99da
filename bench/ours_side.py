"""The benchmarks on aiorpc_autograd, written against shared/API.md.

Each benchmark is ``async fn(rpc, ctx, params) -> metrics`` and runs on
rank 0's event loop (every rank's for ``all_ranks`` benchmarks) with the
agent already up; :func:`run_worker` does the lifecycle (``rpc.run`` →
``init_rpc`` → plan → ``shutdown``).  Remote
functions are the plain (non-async) ones of :mod:`bench.workloads`, so the
callee runs them in its thread pool, as torch does.

One step beyond the API: ``init_method`` uses :mod:`bench.loopback`'s scheme,
which works because our rendezvous passes it to torch's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from bench import loopback, workloads
from bench.measure import (
    Call,
    autograd_batch,
    autograd_procedure,
    bit_exact,
    codec_metrics,
    drive_async,
    echo_metrics,
    echo_tensor,
    scale_metrics,
    scaling_batch,
    scaling_cases,
    scaling_metrics,
    throughput_metrics,
)
from bench.stats import latency_summary_us
from bench.worker import BenchFn, WorkerContext


async def noop_latency(
    rpc: ModuleType, ctx: WorkerContext, params: dict[str, Any]
) -> dict[str, Any]:
    """Sequential awaited no-op calls: per-call latency percentiles."""
    peer = ctx.peer
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


async def throughput(rpc: ModuleType, ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """No-op calls/s with 1, 16, 64, 256 calls kept in flight by tasks."""
    metrics: dict[str, Any] = {}
    for inflight in params["inflight"]:
        await _pump(rpc, ctx.peer, inflight, params["warmup_seconds"])
        calls, elapsed = await _pump(rpc, ctx.peer, inflight, params["seconds"])
        metrics.update(throughput_metrics(inflight, calls, elapsed))
    return metrics


async def tensor_echo(
    rpc: ModuleType, ctx: WorkerContext, params: dict[str, Any]
) -> dict[str, Any]:
    """Round trips of float32 tensors; the first reply per size is checked bit-exact."""
    peer = ctx.peer
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


async def autograd_step(
    rpc: ModuleType, ctx: WorkerContext, params: dict[str, Any]
) -> dict[str, Any]:
    """The issue's training step (:func:`bench.measure.autograd_procedure`) on ours."""
    from aiorpc_autograd import dist_autograd
    from aiorpc_autograd.optim import DistributedOptimizer

    peer = ctx.peer
    w = rpc.remote(peer, workloads.make_weight, args=(params["dim"],))
    await w.to_here()  # setup: the remote layer reads local_value()
    opt = DistributedOptimizer(torch.optim.SGD, [w], lr=params["lr"])
    x = autograd_batch(params)

    async def step() -> None:
        async with dist_autograd.context() as context_id:
            y = await rpc.rpc_async(peer, workloads.linear_relu, args=(x, w))
            await dist_autograd.backward(context_id, [y.sum()])
            await opt.step(context_id)

    async def fused_step() -> None:
        async with dist_autograd.context() as context_id:
            y = await rpc.rpc_async(peer, workloads.linear_relu, args=(x, w))
            await dist_autograd.backward(context_id, [y.sum()], optimizer=opt)

    return await drive_async(
        autograd_procedure(params, ctx.baselines["autograd"]),
        {
            "step": step,
            "fused_step": fused_step,
            "weight": w.to_here,
            "worker_rss": lambda: rpc.rpc_async(peer, workloads.rss_mb),
            "worker_trimmed_rss": lambda: rpc.rpc_async(peer, workloads.trimmed_rss_mb),
        },
    )


async def autograd_scaling(
    rpc: ModuleType, ctx: WorkerContext, params: dict[str, Any]
) -> dict[str, Any]:
    """Step overhead as the remote MLP deepens and as the calls per step grow."""
    from aiorpc_autograd import dist_autograd
    from aiorpc_autograd.optim import DistributedOptimizer

    peer = ctx.peer
    x = scaling_batch(params)
    step_ms: dict[str, float] = {}
    for prefix, depth, mb in scaling_cases(params):
        model = rpc.remote(peer, workloads.make_mlp, args=(depth, params["dim"]))
        await model.to_here()  # setup: the remote functions read local_value()
        param_rrefs = await rpc.rpc_async(peer, workloads.mlp_param_rrefs, args=(model,))
        opt = DistributedOptimizer(torch.optim.SGD, param_rrefs, lr=params["lr"])
        chunks = x.chunk(mb)
        times = []
        for _ in range(params["warmup"] + params["steps"]):
            t0 = time.perf_counter()
            async with dist_autograd.context() as context_id:
                ys = await asyncio.gather(
                    *(rpc.rpc_async(peer, workloads.mlp_forward, args=(c, model)) for c in chunks)
                )
                await dist_autograd.backward(context_id, [sum(y.sum() for y in ys)])
                await opt.step(context_id)
            times.append(time.perf_counter() - t0)
        step_ms[prefix] = statistics.median(times[params["warmup"] :]) * 1e3
        del model, param_rrefs, opt
    return scaling_metrics(params, step_ms, ctx.baselines["autograd_scaling"])


async def codec(rpc: ModuleType, ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """Our codec: message encode, framing, frame reader, decode, payload load."""
    from aiorpc_autograd import codec as wire_codec
    from aiorpc_autograd.wire import FrameReader, encode_frame

    def roundtrip(call: Call) -> Callable[[], object]:
        reader = FrameReader()

        def run() -> object:
            message = wire_codec.PythonCall(None, wire_codec.dump_payload(call))
            header, buffers = wire_codec.encode(message, 1)
            data = b"".join(bytes(c) for c in encode_frame(header, buffers))
            (frame,) = reader.feed(data)
            _, decoded = wire_codec.decode(frame)
            payload = decoded.payload()
            assert payload is not None
            return wire_codec.load_payload(payload)

        return run

    return codec_metrics(roundtrip, params)


async def scale(rpc: ModuleType, ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """On every rank: one no-op call to every other worker, all in flight."""
    t0 = time.perf_counter()
    await asyncio.gather(*(rpc.rpc_async(name, workloads.noop) for name in ctx.others))
    return scale_metrics(ctx.world_size, ctx.info, time.perf_counter() - t0)


BENCHES: dict[str, BenchFn] = {
    "noop": noop_latency,
    "throughput": throughput,
    "echo": tensor_echo,
    "autograd": autograd_step,
    "autograd_scaling": autograd_scaling,
    "codec": codec,
    "scale": scale,
}


async def _main(rpc: ModuleType, ctx: WorkerContext) -> None:
    loop = asyncio.get_running_loop()
    ctx.info["loop"] = f"{type(loop).__module__}.{type(loop).__qualname__}"
    options = rpc.RpcOptions(**ctx.options)
    t0 = time.perf_counter()
    await rpc.init_rpc(
        ctx.name,
        rank=ctx.rank,
        world_size=ctx.world_size,
        init_method=loopback.init_method(ctx.port),
        options=options,
    )
    try:
        ctx.ready(time.perf_counter() - t0)
        for name, params, fn in ctx.steps(BENCHES):
            with ctx.measuring(name) as metrics:
                metrics.update(await fn(rpc, ctx, params))
    finally:
        await rpc.shutdown()


def run_worker(ctx: WorkerContext) -> None:
    """Run this worker's part of the launch on the package's own runner."""
    import aiorpc_autograd as rpc

    ctx.info["torch"] = torch.__version__
    ctx.info["aiorpc_autograd"] = getattr(rpc, "__version__", None)
    loopback.register()
    ctx.before_init()
    rpc.run(_main(rpc, ctx))
