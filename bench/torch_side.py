"""The benchmarks on torch.distributed.rpc (TensorPipe backend).

Each benchmark is ``fn(peer, params) -> metrics`` and runs on rank 0 with
the agent already up; :func:`run_worker` does the lifecycle.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import torch
from torch.distributed import rpc

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


def noop_latency(peer: str, params: dict[str, Any]) -> dict[str, Any]:
    """Sequential ``rpc_sync`` no-op calls: per-call latency percentiles."""
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


def throughput(peer: str, params: dict[str, Any]) -> dict[str, Any]:
    """No-op calls/s with 1, 16, 64, 256 ``rpc_async`` futures kept in flight."""
    metrics: dict[str, Any] = {}
    for inflight in params["inflight"]:
        _pump(peer, inflight, params["warmup_seconds"])
        calls, elapsed = _pump(peer, inflight, params["seconds"])
        metrics.update(throughput_metrics(inflight, calls, elapsed))
    return metrics


def tensor_echo(peer: str, params: dict[str, Any]) -> dict[str, Any]:
    """Round trips of float32 tensors; the first reply per size is checked bit-exact."""
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


def autograd_step(peer: str, params: dict[str, Any]) -> dict[str, Any]:
    """Distributed autograd steps: context, remote ``tanh(x @ w)``, backward, gradients."""
    from torch.distributed import autograd as dist_autograd

    x, w = autograd_inputs(params["batch"], params["dim"])

    def step() -> dict[torch.Tensor, torch.Tensor]:
        with dist_autograd.context() as context_id:
            out = rpc.rpc_sync(peer, workloads.linear_tanh, args=(x, w))
            dist_autograd.backward(context_id, [out.sum()])  # type: ignore[attr-defined]
            grads: dict[torch.Tensor, torch.Tensor]
            grads = dist_autograd.get_gradients(context_id)  # type: ignore[attr-defined]
            return grads

    for _ in range(params["warmup"]):
        step()
    match = grads_match(x, w, step())
    clock = time.perf_counter_ns
    samples: list[int] = []
    for _ in range(params["steps"]):
        t0 = clock()
        step()
        samples.append(clock() - t0)
    return {**latency_summary_us(samples), "grads_match": match}


BENCHES: dict[str, BenchFn] = {
    "noop": noop_latency,
    "throughput": throughput,
    "echo": tensor_echo,
    "autograd": autograd_step,
}


def run_worker(ctx: WorkerContext) -> None:
    """Start the TensorPipe agent, let rank 0 run the plan, shut down gracefully.

    The options are the configuration's; ``init_method`` only swaps torch's
    ``tcp://`` rendezvous for :mod:`bench.loopback`'s.
    """
    ctx.info["torch"] = torch.__version__
    # init_rpc trips torch's own deprecation warning about Gloo process groups;
    # silenced so that any output a worker writes is worth reading.
    warnings.filterwarnings(
        "ignore", message=r"You are using a Backend .* as a ProcessGroup", category=UserWarning
    )
    loopback.register()
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=loopback.init_method(ctx.port), **ctx.options
    )
    rpc.init_rpc(  # type: ignore[no-untyped-call]
        ctx.name_of(ctx.rank),
        rank=ctx.rank,
        world_size=ctx.world_size,
        rpc_backend_options=options,
    )
    try:
        ctx.ready()
        if ctx.rank == 0:
            peer = ctx.name_of(1)
            for name, params, fn in ctx.steps(BENCHES):
                with ctx.measuring(name) as metrics:
                    metrics.update(fn(peer, params))
    finally:
        rpc.shutdown()
