"""The benchmarks on torch.distributed.rpc (TensorPipe backend).

Each benchmark is ``fn(ctx, params) -> metrics`` and runs on rank 0 (on
every rank for ``all_ranks`` benchmarks) with the agent already up;
:func:`run_worker` does the lifecycle.
"""

from __future__ import annotations

import statistics
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed import rpc

from bench import loopback, workloads
from bench.measure import (
    Call,
    autograd_batch,
    autograd_procedure,
    bit_exact,
    codec_metrics,
    drive,
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


def noop_latency(ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """Sequential ``rpc_sync`` no-op calls: per-call latency percentiles."""
    peer = ctx.peer
    for _ in range(params["warmup"]):
        rpc.rpc_sync(peer, workloads.noop)
    clock = time.perf_counter_ns
    samples: list[int] = []
    for _ in range(params["calls"]):
        t0 = clock()
        rpc.rpc_sync(peer, workloads.noop)
        samples.append(clock() - t0)
    return latency_summary_us(samples)


def _pump(peer: str, inflight: int, seconds: float) -> tuple[int, float]:
    """Keep ``inflight`` no-op calls in flight for ``seconds``, then drain.

    A semaphore holds one permit per call in flight; each future's done
    callback (run on a TensorPipe thread) gives its permit back, and the
    main thread immediately spends it on the next call.

    Returns:
        (calls completed, seconds from first send to last reply).
    """
    permits = threading.Semaphore(inflight)
    errors: list[Exception] = []

    def done(fut: torch.futures.Future[None]) -> None:
        try:
            fut.wait()
        except Exception as exc:
            errors.append(exc)
        permits.release()

    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        permits.acquire()
        rpc.rpc_async(peer, workloads.noop).add_done_callback(done)
        calls += 1
    for _ in range(inflight):  # holding every permit means every call returned
        permits.acquire()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {calls} calls failed, first: {errors[0]!r}")
    return calls, elapsed


def throughput(ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """No-op calls/s with 1, 16, 64, 256 ``rpc_async`` futures kept in flight."""
    metrics: dict[str, Any] = {}
    for inflight in params["inflight"]:
        _pump(ctx.peer, inflight, params["warmup_seconds"])
        calls, elapsed = _pump(ctx.peer, inflight, params["seconds"])
        metrics.update(throughput_metrics(inflight, calls, elapsed))
    return metrics


def tensor_echo(ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """Round trips of float32 tensors; the first reply per size is checked bit-exact."""
    peer = ctx.peer
    metrics: dict[str, Any] = {}
    clock = time.perf_counter_ns
    for nbytes, iters in zip(params["sizes"], params["iters"], strict=True):
        tensor = echo_tensor(nbytes)
        for _ in range(params["warmup"]):
            rpc.rpc_sync(peer, workloads.echo, args=(tensor,))
        samples: list[int] = []
        equal = False
        for i in range(iters):
            t0 = clock()
            out = rpc.rpc_sync(peer, workloads.echo, args=(tensor,))
            samples.append(clock() - t0)
            if i == 0:
                equal = bit_exact(tensor, out)
            del out
        metrics.update(echo_metrics(nbytes, samples, equal))
    return metrics


def autograd_step(ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """The issue's training step (:func:`bench.measure.autograd_procedure`) on torch."""
    from torch.distributed import autograd as dist_autograd
    from torch.distributed.optim import DistributedOptimizer

    peer = ctx.peer
    w = rpc.remote(peer, workloads.make_weight, args=(params["dim"],))
    w.to_here()  # setup: the remote layer reads local_value()
    opt = DistributedOptimizer(  # type: ignore[no-untyped-call]
        torch.optim.SGD, [w], lr=params["lr"]
    )
    x = autograd_batch(params)

    def step() -> None:
        with dist_autograd.context() as context_id:
            y = rpc.rpc_sync(peer, workloads.linear_relu, args=(x, w))
            dist_autograd.backward(context_id, [y.sum()])  # type: ignore[attr-defined]
            opt.step(context_id)  # type: ignore[no-untyped-call]

    return drive(
        autograd_procedure(params, ctx.baselines["autograd"]),
        {
            "step": step,
            "fused_step": step,  # torch has no optimizer-in-backward mode
            "weight": w.to_here,
            "worker_rss": lambda: rpc.rpc_sync(peer, workloads.rss_mb),
            "worker_trimmed_rss": lambda: rpc.rpc_sync(peer, workloads.trimmed_rss_mb),
        },
    )


def autograd_scaling(ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """Step overhead as the remote MLP deepens and as the calls per step grow."""
    from torch.distributed import autograd as dist_autograd
    from torch.distributed.optim import DistributedOptimizer

    peer = ctx.peer
    x = scaling_batch(params)
    step_ms: dict[str, float] = {}
    for prefix, depth, mb in scaling_cases(params):
        model = rpc.remote(peer, workloads.make_mlp, args=(depth, params["dim"]))
        model.to_here()  # setup: the remote functions read local_value()
        param_rrefs = rpc.rpc_sync(peer, workloads.mlp_param_rrefs, args=(model,))
        opt = DistributedOptimizer(  # type: ignore[no-untyped-call]
            torch.optim.SGD, param_rrefs, lr=params["lr"]
        )
        chunks = x.chunk(mb)
        times = []
        for _ in range(params["warmup"] + params["steps"]):
            t0 = time.perf_counter()
            with dist_autograd.context() as context_id:
                futs = [rpc.rpc_async(peer, workloads.mlp_forward, args=(c, model)) for c in chunks]
                ys = [f.wait() for f in futs]
                loss = sum(y.sum() for y in ys)
                dist_autograd.backward(context_id, [loss])  # type: ignore[attr-defined]
                opt.step(context_id)  # type: ignore[no-untyped-call]
            times.append(time.perf_counter() - t0)
        step_ms[prefix] = statistics.median(times[params["warmup"] :]) * 1e3
        del model, param_rrefs, opt
    return scaling_metrics(params, step_ms, ctx.baselines["autograd_scaling"])


def codec(ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """torch's internal RPC pickler: ``serialize`` then ``deserialize``."""
    from torch.distributed.rpc.internal import _internal_rpc_pickler

    def roundtrip(call: Call) -> Callable[[], object]:
        def run() -> object:
            pickler = _internal_rpc_pickler
            binary, tensors = pickler.serialize(call)  # type: ignore[no-untyped-call]
            return pickler.deserialize(binary, tensors)  # type: ignore[no-untyped-call]

        return run

    return codec_metrics(roundtrip, params)


def scale(ctx: WorkerContext, params: dict[str, Any]) -> dict[str, Any]:
    """On every rank: one no-op call to every other worker, all in flight."""
    t0 = time.perf_counter()
    torch.futures.wait_all([rpc.rpc_async(name, workloads.noop) for name in ctx.others])
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


def _drop_torchscript_optimizer_warning() -> None:
    """Silence DistributedOptimizer's TorchScript deprecation warning on its owner.

    torch raises it under ``simplefilter("always")`` each launch, so a filter
    cannot; the display hook still can.
    """
    show = warnings.showwarning

    def showwarning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        if "support for functional optimizers is deprecated" not in str(message):
            show(message, *args, **kwargs)

    warnings.showwarning = showwarning


def run_worker(ctx: WorkerContext) -> None:
    """Start the TensorPipe agent, run this rank's part of the plan, shut down gracefully.

    The options are the configuration's; ``init_method`` only swaps torch's
    ``tcp://`` rendezvous for :mod:`bench.loopback`'s.
    """
    ctx.info["torch"] = torch.__version__
    # init_rpc trips torch's own deprecation warning about Gloo process groups;
    # silenced so that any output a worker writes is worth reading.
    warnings.filterwarnings(
        "ignore", message=r"You are using a Backend .* as a ProcessGroup", category=UserWarning
    )
    _drop_torchscript_optimizer_warning()
    loopback.register()
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=loopback.init_method(ctx.port), **ctx.options
    )
    ctx.before_init()
    t0 = time.perf_counter()
    rpc.init_rpc(  # type: ignore[no-untyped-call]
        ctx.name,
        rank=ctx.rank,
        world_size=ctx.world_size,
        rpc_backend_options=options,
    )
    try:
        ctx.ready(time.perf_counter() - t0)
        for name, params, fn in ctx.steps(BENCHES):
            with ctx.measuring(name) as metrics:
                metrics.update(fn(ctx, params))
    finally:
        rpc.shutdown()
