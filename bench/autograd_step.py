"""The distributed autograd training step of issues 3 and 6, ours vs torch.

The caller holds a 64x512 batch, the remote worker a 512x512 weight; a step is
``relu(x @ w)`` on the remote worker, ``loss = y.sum()`` on the caller,
distributed backward and ``DistributedOptimizer(SGD).step``. Reports the
median step time, the same step run locally in one process, the overhead
(distributed minus local), and the RSS growth of both processes between a
warm-up mark and the last step (and after ``malloc_trim``). Both libraries run
in the same invocation, alternating, pinned or not.

    python -m bench.autograd_step [--steps 2000] [--launches 2] [--pin]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

BATCH, DIM, LR = 64, 512, 1e-3


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trim() -> float:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()


def make_weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(DIM, DIM, requires_grad=True)


def linear_relu(x: torch.Tensor, w_rref: Any) -> torch.Tensor:
    return torch.relu(x @ w_rref.local_value())


def local_step_ms(steps: int) -> float:
    w = make_weight()
    opt = torch.optim.SGD([w], lr=LR)
    x = torch.randn(BATCH, DIM)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad()
        torch.relu(x @ w).sum().backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[steps // 10 :]) * 1e3


def run_torch(rank: int, port: int, steps: int) -> dict[str, Any] | None:
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc
    from torch.distributed.optim import DistributedOptimizer

    from bench import loopback

    loopback.register()
    opts = rpc.TensorPipeRpcBackendOptions(init_method=loopback.init_method(port))
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=opts)
    out = None
    if rank == 0:
        w = rpc.remote("w1", make_weight)
        opt = DistributedOptimizer(torch.optim.SGD, [w], lr=LR)
        x = torch.randn(BATCH, DIM)
        times, marks = [], {}
        for i in range(steps):
            if i == steps // 10:
                marks["start"] = (rss_mb(), rpc.rpc_sync("w1", rss_mb))
            t = time.perf_counter()
            with dist_autograd.context() as cid:
                y = rpc.rpc_sync("w1", linear_relu, (x, w))
                dist_autograd.backward(cid, [y.sum()])
                opt.step(cid)
            times.append(time.perf_counter() - t)
        marks["end"] = (rss_mb(), rpc.rpc_sync("w1", rss_mb))
        marks["trim"] = (trim(), rpc.rpc_sync("w1", trim))
        out = {"times": times[steps // 10 :], "rss": marks}
    rpc.shutdown()
    return out


async def _ours(rank: int, port: int, steps: int) -> dict[str, Any] | None:
    import aiorpc_autograd as rpc
    from aiorpc_autograd import dist_autograd
    from aiorpc_autograd.optim import DistributedOptimizer

    await rpc.init_rpc(f"w{rank}", rank, 2, init_method=f"tcp://127.0.0.1:{port}")
    out = None
    if rank == 0:
        w = rpc.remote("w1", make_weight)
        await w.to_here()  # setup: linear_relu reads local_value(), so wait for creation
        opt = DistributedOptimizer(torch.optim.SGD, [w], lr=LR)
        x = torch.randn(BATCH, DIM)
        times, marks = [], {}
        for i in range(steps):
            if i == steps // 10:
                marks["start"] = (rss_mb(), await rpc.rpc_async("w1", rss_mb))
            t = time.perf_counter()
            async with dist_autograd.context() as cid:
                y = await rpc.rpc_async("w1", linear_relu, (x, w))
                await dist_autograd.backward(cid, [y.sum()])
                await opt.step(cid)
            times.append(time.perf_counter() - t)
        marks["end"] = (rss_mb(), await rpc.rpc_async("w1", rss_mb))
        marks["trim"] = (trim(), await rpc.rpc_async("w1", trim))
        out = {"times": times[steps // 10 :], "rss": marks}
    await rpc.shutdown(timeout=0)
    return out


def worker_main() -> None:
    impl, rank, port, steps, pin = (
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
        sys.argv[6] == "1",
    )
    if pin:
        os.sched_setaffinity(0, {rank})
    if impl == "torch":
        out = run_torch(rank, port, steps)
    else:
        import aiorpc_autograd as rpc

        out = rpc.run(_ours(rank, port, steps))
    if out is not None:
        print("RESULT " + json.dumps(out))


def launch(impl: str, steps: int, pin: bool) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "bench.autograd_step", "--worker", impl]
    procs = [
        subprocess.Popen(
            [*args, str(r), str(port), str(steps), "1" if pin else "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for r in (1, 0)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    line = next(ln for ln in outs[1].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main()
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--launches", type=int, default=2)
    ap.add_argument("--pin", action="store_true")
    a = ap.parse_args()
    local = local_step_ms(300)
    rows: dict[str, list[dict[str, float]]] = {"torch": [], "ours": []}
    for _ in range(a.launches):
        for impl in ("torch", "ours"):
            r = launch(impl, a.steps, a.pin)
            (c0, w0), (c1, w1), (ct, wt) = r["rss"]["start"], r["rss"]["end"], r["rss"]["trim"]
            rows[impl].append(
                {
                    "step_ms": statistics.median(r["times"]) * 1e3,
                    "rss_growth_caller_mb": c1 - c0,
                    "rss_growth_worker_mb": w1 - w0,
                    "after_trim_caller_mb": ct - c0,
                    "after_trim_worker_mb": wt - w0,
                }
            )
    summary = {"local_step_ms": local, "steps": a.steps, "pinned": a.pin}
    for impl, runs in rows.items():
        summary[impl] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        summary[impl]["overhead_ms"] = summary[impl]["step_ms"] - local
    summary["overhead_ratio_ours_torch"] = summary["ours"]["overhead_ms"] / max(
        summary["torch"]["overhead_ms"], 1e-9
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
