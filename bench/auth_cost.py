"""The cost of per-frame authentication, side by side in one run.

Runs a two-process group for each configuration, interleaved over several
rounds: the code under ``--old`` (a checkout of the package before frame tags,
e.g. ``git archive 1f57c00 aiorpc_autograd | tar -x -C /tmp/old``) and this
checkout, each without and with an ``auth_token``. Rank 0 measures the
sequential no-op round trip (p50, µs) and the no-op calls/s with 256 calls in
flight. Usage::

    python -m bench.auth_cost --old /tmp/old [--rounds 3] [--tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


def noop() -> None:
    """The remote function."""


async def _measure(rpc: Any, calls: int, inflight: int, seconds: float) -> dict[str, float]:
    for _ in range(300):
        await rpc.rpc_async("w1", noop)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await rpc.rpc_async("w1", noop)
        samples.append(time.perf_counter_ns() - t0)
    done = 0
    stop = time.monotonic() + seconds

    async def pump() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await rpc.rpc_async("w1", noop)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(pump() for _ in range(inflight)))
    elapsed = time.monotonic() - started
    return {"p50_us": statistics.median(samples) / 1000, "calls_per_s": done / elapsed}


async def _worker(rank: int, port: int, token: str, tcp: bool) -> None:
    import aiorpc_autograd as rpc

    options = rpc.RpcOptions(auth_token=token or None, use_unix_sockets=not tcp)
    await rpc.init_rpc(f"w{rank}", rank, 2, init_method=f"tcp://127.0.0.1:{port}", options=options)
    if rank == 0:
        print(json.dumps(await _measure(rpc, 3000, 256, 2.0)), flush=True)
    await rpc.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(code: Path, token: str, tcp: bool) -> dict[str, float]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{HERE}"}
    env.pop("AIORPC_AUTH_TOKEN", None)
    args = [str(port), token or "-", "tcp" if tcp else "unix", str(code)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.auth_cost", "--worker", str(rank), *args],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        for rank in (0, 1)
    ]
    out, _ = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=60)
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--old", type=Path, required=False)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tcp", action="store_true", help="TCP instead of Unix sockets")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker is not None:
        port, token, transport, code = ns.rest
        sys.path.insert(0, code)  # ahead of the cwd, which -m put first
        import aiorpc_autograd

        assert Path(aiorpc_autograd.__file__).is_relative_to(code), aiorpc_autograd.__file__
        aiorpc_autograd.run(
            _worker(ns.worker, int(port), "" if token == "-" else token, transport == "tcp")
        )
        return
    configs = [("new", HERE, ""), ("new", HERE, "bench-token")]
    if ns.old is not None:
        configs = [("old", ns.old, ""), ("old", ns.old, "bench-token"), *configs]
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(ns.rounds):
        for label, code, token in configs:
            key = f"{label} {'token' if token else 'no token'}"
            results.setdefault(key, []).append(_run(code, token, ns.tcp))
    print(f"{'config':<16} {'p50 us (median of rounds)':>26} {'calls/s @256 (median)':>24}")
    for key, runs in results.items():
        p50 = statistics.median(r["p50_us"] for r in runs)
        rate = statistics.median(r["calls_per_s"] for r in runs)
        spread = [round(r["p50_us"], 1) for r in runs], [round(r["calls_per_s"]) for r in runs]
        print(f"{key:<16} {p50:>26.1f} {rate:>24.0f}   {spread}")


if __name__ == "__main__":
    main()
