"""World-size scale, ours vs torch.distributed.rpc (benchmark 5 of issue 6).

For each world size, all workers are started at once on this machine; each
reports how long its ``init_rpc`` took and, once every worker is up, how long
its round of calls to every other worker (all in flight at once) took. The
launch-to-ready time (the last worker out of ``init_rpc``, counted from the
launch, so interpreter and torch import included, the same for both) and the
slowest all-pairs round are reported per world size.

    python -m bench.scale [--sizes 2,4,8,16,32] [--impls ours,torch]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from typing import Any


def noop() -> None:
    return None


def _worker_torch(rank: int, world: int, port: int) -> dict[str, float]:
    import torch.distributed.rpc as rpc

    from bench import loopback

    loopback.register()
    opts = rpc.TensorPipeRpcBackendOptions(init_method=loopback.init_method(port), rpc_timeout=300)
    t0 = time.time()
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=world, rpc_backend_options=opts)
    ready = time.time()
    futs = [rpc.rpc_async(f"w{j}", noop) for j in range(world) if j != rank]
    for f in futs:
        f.wait()
    pairs = time.time() - ready
    rpc.shutdown()
    return {"init_s": ready - t0, "ready_at": ready, "pairs_s": pairs}


async def _worker_ours(rank: int, world: int, port: int) -> dict[str, float]:
    import aiorpc_autograd as rpc

    options = rpc.RpcOptions(rpc_timeout=300, num_worker_threads=2)
    t0 = time.time()
    await rpc.init_rpc(
        f"w{rank}", rank, world, init_method=f"tcp://127.0.0.1:{port}", options=options
    )
    ready = time.time()
    await asyncio.gather(*(rpc.rpc_async(j, noop) for j in range(world) if j != rank))
    pairs = time.time() - ready
    await rpc.shutdown(timeout=0)
    return {"init_s": ready - t0, "ready_at": ready, "pairs_s": pairs}


def worker_main(impl: str, rank: int, world: int, port: int) -> None:
    if impl == "torch":
        out = _worker_torch(rank, world, port)
    else:
        import aiorpc_autograd as rpc

        out = rpc.run(_worker_ours(rank, world, port))
    print("RESULT " + json.dumps(out), flush=True)


def launch(impl: str, world: int, timeout: float) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "--worker", impl, str(r), str(world), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(timeout - (time.time() - start), 1))
            line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                return {"ok": False, "error": f"a worker exited with {p.returncode}"}
            results.append(json.loads(line[len("RESULT ") :]))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout}s"}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return {
        "ok": True,
        "launch_to_ready_s": max(r["ready_at"] for r in results) - start,
        "init_rpc_max_s": max(r["init_s"] for r in results),
        "all_pairs_max_s": max(r["pairs_s"] for r in results),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="2,4,8,16,32")
    ap.add_argument("--impls", default="ours,torch")
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args()
    table: dict[str, dict[str, Any]] = {}
    for world in (int(x) for x in a.sizes.split(",")):
        for impl in a.impls.split(","):
            row = launch(impl, world, a.timeout)
            table[f"{impl}-{world}"] = row
            print(f"{impl:5s} world={world:2d} {json.dumps(row)}", flush=True)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
