"""CUDA benchmark: ours vs torch.distributed.rpc (TensorPipe, CUDA channels).

``python -m bench.cuda [--sizes-mib 1,16,256,1024] [--steps 200] [--out PATH]``
on a machine with a GPU: for each side, a fresh group of two worker processes
on 127.0.0.1 sharing ``cuda:0`` (each with the device map
``{cuda:0: cuda:0}`` to the other) measures

* ``echo``: a float32 CUDA tensor sent to the peer and back (median of
  repeats, GB/s counted as 2 x size / time; the result is checked bit-exact);
* ``step``: a training step with a ``512x512`` linear + relu on the peer's GPU
  (the bench's CPU step moved to the GPU): forward RPC, loss on the caller,
  ``dist_autograd.backward``, ``DistributedOptimizer(SGD).step``, median ms.

Sides alternate (torch, ours) ``--launches`` times in one run; the table
printed (and written as JSON to ``--out``) holds the medians and the ratio
ours / torch. Needs CUDA: exits 2 with a message without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from bench import loopback

SAME = {"cuda:0": "cuda:0"}


def _echo(t: torch.Tensor) -> torch.Tensor:
    return t


def _make_weight(dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w: torch.Tensor = (torch.randn(dim, dim, generator=g) / dim**0.5).cuda()
    return w.requires_grad_()


def _forward(w: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w.local_value())


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _torch_side(rank: int, port: int, sizes: list[int], steps: int, out: Any) -> None:
    import torch.distributed.autograd as dist_autograd
    from torch.distributed import rpc
    from torch.distributed.optim import DistributedOptimizer

    loopback.register()
    opts = rpc.TensorPipeRpcBackendOptions(init_method=loopback.init_method(port))
    opts.set_device_map(f"w{1 - rank}", SAME)  # type: ignore[arg-type]
    rpc.init_rpc(  # type: ignore[no-untyped-call]
        f"w{rank}", rank=rank, world_size=2, rpc_backend_options=opts
    )
    if rank == 0:
        res: dict[str, Any] = {}
        for size in sizes:
            t = torch.randn(size // 4, device="cuda:0")
            back = rpc.rpc_sync("w1", _echo, (t,))
            assert torch.equal(back, t)
            reps = max(3, min(50, (256 << 20) // size))
            res[f"echo_{size >> 20}MiB_s"] = _time(
                lambda t=t: rpc.rpc_sync("w1", _echo, (t,)), reps
            )
        w = rpc.remote("w1", _make_weight, (512,))
        opt = DistributedOptimizer(torch.optim.SGD, [w], lr=0.01)  # type: ignore[no-untyped-call]
        x = torch.randn(64, 512, device="cuda:0")

        def step() -> None:
            with dist_autograd.context() as cid:
                y = rpc.rpc_sync("w1", _forward, (w, x))
                dist_autograd.backward(cid, [y.sum()])  # type: ignore[attr-defined]
                opt.step(cid)  # type: ignore[no-untyped-call]

        res["step_s"] = _time(step, steps)
        out.put(res)
    rpc.shutdown()


def _ours_side(rank: int, port: int, sizes: list[int], steps: int, out: Any) -> None:
    import aiorpc_autograd as rpc
    from aiorpc_autograd import dist_autograd
    from aiorpc_autograd.optim import DistributedOptimizer

    async def main() -> None:
        opts = rpc.RpcOptions(device_maps={f"w{1 - rank}": SAME})
        async with rpc.worker(
            f"w{rank}", rank, 2, init_method=f"tcp://127.0.0.1:{port}", options=opts
        ):
            if rank != 0:
                return
            res: dict[str, Any] = {}
            for size in sizes:
                t = torch.randn(size // 4, device="cuda:0")
                back = await rpc.rpc_async("w1", _echo, (t,))
                assert torch.equal(back, t)
                reps = max(3, min(50, (256 << 20) // size))
                samples = []
                for _ in range(reps + 1):
                    t0 = time.perf_counter()
                    await rpc.rpc_async("w1", _echo, (t,))
                    torch.cuda.synchronize()
                    samples.append(time.perf_counter() - t0)
                res[f"echo_{size >> 20}MiB_s"] = statistics.median(samples[1:])
            w = rpc.remote("w1", _make_weight, (512,))
            opt = DistributedOptimizer(torch.optim.SGD, [w], lr=0.01)  # type: ignore[no-untyped-call, unused-ignore]
            x = torch.randn(64, 512, device="cuda:0")
            samples = []
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                async with dist_autograd.context() as cid:
                    y = await rpc.rpc_async("w1", _forward, (w, x))
                    await dist_autograd.backward(cid, [y.sum()])
                    await opt.step(cid)
                torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            res["step_s"] = statistics.median(samples[1:])
            out.put(res)

    rpc.run(main())


def _launch(side: Any, sizes: list[int], steps: int, port: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=side, args=(r, port, sizes, steps, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    return dict(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="1,16,256,1024")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--launches", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.cuda needs a CUDA device", file=sys.stderr)
        return 2
    sizes = [int(s) << 20 for s in args.sizes_mib.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {"torch": [], "ours": []}
    port = 29700 + os.getpid() % 500
    for i in range(args.launches):
        for name, side in (("torch", _torch_side), ("ours", _ours_side)):
            runs[name].append(_launch(side, sizes, args.steps, port + 2 * i + (name == "ours")))
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    rows = []
    print(f"device: {torch.cuda.get_device_name(0)}")
    print(f"{'metric':<16} {'ours':>12} {'torch':>12} {'ours/torch':>10}")
    for key in med["ours"]:
        ours, theirs = med["ours"][key], med["torch"][key]
        if key.startswith("echo_"):
            size = int(key[5:].split("MiB")[0]) << 20
            o, t = 2 * size / ours / 1e9, 2 * size / theirs / 1e9
            print(f"{key[5:-2] + ' GB/s':<16} {o:>12.2f} {t:>12.2f} {o / t:>10.2f}")
            rows.append({"metric": key, "ours_gbps": o, "torch_gbps": t})
        else:
            print(
                f"{'step ms':<16} {ours * 1e3:>12.3f} {theirs * 1e3:>12.3f} {ours / theirs:>10.2f}"
            )
            rows.append({"metric": key, "ours_ms": ours * 1e3, "torch_ms": theirs * 1e3})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "runs": runs, "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
