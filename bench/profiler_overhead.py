"""What RPC profiling costs: no-op latency and the training step, side by side.

``python -m bench.profiler_overhead [--calls N] [--steps N] [--blocks N]``

One group of two workers on loopback: rank 0 drives, rank 1 serves. The
modes alternate in blocks (``off``, ``group``: :func:`aiorpc_autograd.profiler.start`
on both workers, ``torch``: ``torch.profiler.profile()`` on the caller), so
a load change on the machine hits them alike; each mode's figure is the median
over all its samples. ``--modes off`` runs with profiling off only, which also
works on the code before the profiler existed (put that checkout first on
``PYTHONPATH``): compare its ``off`` with this one's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import torch

from bench import workloads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _mode(mode: str) -> Iterator[None]:
    if mode == "torch":
        with torch.profiler.profile() as prof:
            yield
        del prof
    else:
        yield


async def _timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


async def _driver(args: argparse.Namespace) -> dict[str, Any]:
    import aiorpc_autograd as rpc
    from aiorpc_autograd import dist_autograd
    from aiorpc_autograd.optim import DistributedOptimizer

    profiler: Any = None
    if args.modes != ["off"]:
        from aiorpc_autograd import profiler

    peer = "worker1"
    w = rpc.remote(peer, workloads.make_weight, args=(512,))
    await w.to_here()
    opt = DistributedOptimizer(torch.optim.SGD, [w], lr=0.01)
    x = torch.randn(64, 512)

    async def noop() -> None:
        await rpc.rpc_async(peer, workloads.noop)

    async def step() -> None:
        async with dist_autograd.context() as ctx:
            y = await rpc.rpc_async(peer, workloads.linear_relu, args=(x, w))
            await dist_autograd.backward(ctx, [y.sum()])
            await opt.step(ctx)

    await _timed(noop, 300)  # warm-up
    await _timed(step, 10)
    noops: dict[str, list[float]] = {m: [] for m in args.modes}
    steps: dict[str, list[float]] = {m: [] for m in args.modes}
    for _ in range(args.blocks):
        for mode in args.modes:
            if mode == "group":
                await profiler.start()
            with _mode(mode):
                noops[mode] += await _timed(noop, args.calls)
                steps[mode] += await _timed(step, args.steps)
            if mode == "group":
                await profiler.stop()
    result: dict[str, Any] = {}
    for mode in args.modes:
        result[mode] = {
            "noop_p50_us": round(statistics.median(noops[mode]), 1),
            "step_p50_ms": round(statistics.median(steps[mode]) / 1000, 3),
        }
    base = result[args.modes[0]]
    for mode in args.modes[1:]:
        result[mode]["noop_vs_off"] = round(result[mode]["noop_p50_us"] / base["noop_p50_us"], 3)
        result[mode]["step_vs_off"] = round(result[mode]["step_p50_ms"] / base["step_p50_ms"], 3)
    return result


def _worker(rank: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    import aiorpc_autograd as rpc

    torch.set_num_threads(1)

    async def main() -> None:
        await rpc.init_rpc(f"worker{rank}", rank, 2, init_method=f"tcp://127.0.0.1:{port}")
        if rank == 0:
            queue.put(await _driver(args))
        await rpc.shutdown(timeout=0)

    rpc.run(main())


def micro() -> dict[str, float]:
    """ns per call of what profiling-off adds to a call's hot paths (the checks
    in ``request``, ``_send`` and ``_run_call``, and ``_Pending``'s extra slot),
    timed in a loop: too small for the A/B runs to resolve."""
    import timeit
    from dataclasses import dataclass

    import torch.autograd.profiler as torch_profiler

    from aiorpc_autograd.agent import _Pending

    @dataclass(slots=True)
    class _Before:  # _Pending as it was
        future: Any
        peer: int
        decode: Any
        timer: Any = None
        conn: Any = None

    class _Agent:
        tracer = None

    def gated(agent: Any, span: Any, pending: Any) -> None:
        # The off path's additions, as they run there: locals and attributes.
        if agent.tracer is not None or torch_profiler._is_profiler_enabled:
            pass
        if span is not None:
            pass
        if span is not None:
            pass
        if span is not None:
            pass
        if pending.span is not None:
            pass
        if agent.tracer is not None:
            pass

    def plain(agent: Any, span: Any, pending: Any) -> None:
        pass

    loop = asyncio.new_event_loop()
    fut = loop.create_future()
    agent, pending = _Agent(), _Pending(fut, 1, repr)
    n = 1_000_000

    def best(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e9

    checks = best(lambda: gated(agent, None, pending)) - best(lambda: plain(agent, None, pending))
    slot = best(lambda: _Pending(fut, 1, repr)) - best(lambda: _Before(fut, 1, repr))
    loop.close()
    return {"checks_ns": round(checks, 1), "pending_extra_slot_ns": round(slot, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="no-op calls per block and mode")
    parser.add_argument("--steps", type=int, default=10, help="training steps per block and mode")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--modes", default="off,group,torch")
    parser.add_argument("--micro", action="store_true", help="only time the off-path checks")
    args = parser.parse_args()
    if args.micro:
        print(json.dumps(micro()))
        return
    args.modes = args.modes.split(",")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    while True:  # a worker that died ends the wait
        try:
            result = queue.get(timeout=5)
            break
        except Exception:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise SystemExit(f"a worker failed: {[p.exitcode for p in procs]}") from None
    for p in procs:
        p.join(60)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
