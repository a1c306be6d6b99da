"""The cost of per-frame authentication, side by side in one run.

Runs a two-process group for each configuration, interleaved over several
rounds: the code under ``--old`` (a checkout of the package before frame tags,
e.g. ``git archive 1f57c00 aiorpc_autograd | tar -x -C /tmp/old``) and this
checkout, each without and with an ``auth_token``. Rank 0 measures the
sequential no-op round trip (p50, µs) and the no-op calls/s with 256 calls in
flight. Usage::

    python -m bench.auth_cost --old /tmp/old [--rounds 3] [--tcp]
    python -m bench.auth_cost --micro   # per-frame cost in one process

``--micro`` times (best of several repeats) laying out and parsing one no-op
call frame with and without its tag, and what authenticating bodies too would
cost per MiB.
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


def micro() -> None:
    """Per-frame cost of the tag, in this process (best of repeats)."""
    import hashlib
    import hmac
    import timeit

    from aiorpc_autograd import codec, wire

    header, buffers = codec.encode(codec.PythonCall(None, codec.dump_payload((noop, (), {}))), 7)
    n = 20000

    def per_frame(mac: bool) -> tuple[float, float]:
        key = b"k" * 32
        tx = wire.FrameMac(key) if mac else None
        encode = min(
            timeit.repeat(lambda: wire.encode_frame(header, buffers, mac=tx), number=n, repeat=7)
        )
        sender = wire.FrameMac(key) if mac else None
        frames = [
            b"".join(bytes(c) for c in wire.encode_frame(header, buffers, mac=sender))
            for _ in range(n)
        ]
        blob = b"".join(frames)
        best = float("inf")
        for _ in range(7):
            reader = wire.FrameReader(mac=wire.FrameMac(key) if mac else None)
            t0 = time.perf_counter()
            for i in range(0, len(blob), 256 * 1024):
                reader.feed(blob[i : i + 256 * 1024])
            best = min(best, time.perf_counter() - t0)
        return encode / n * 1e6, best / n * 1e6

    print(f"no-op call frame: header {len(header)} bytes")
    for mac in (False, True):
        enc, parse = per_frame(mac)
        print(f"  {'tagged' if mac else 'plain ':>6}: encode {enc:.2f} us, parse {parse:.2f} us")
    body = bytes(1 << 20)
    key = b"k" * 32
    for name, fn in (
        ("HMAC-SHA256", lambda: hmac.digest(key, body, "sha256")),
        ("BLAKE2b", lambda: hashlib.blake2b(body, key=key, digest_size=16).digest()),
        ("memcpy", lambda: bytearray(body)),
    ):
        t = min(timeit.repeat(fn, number=20, repeat=5)) / 20
        print(f"  body, 1 MiB: {name:<12} {t * 1e3:.3f} ms ({(1 << 20) / t / 1e9:.2f} GB/s)")


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
    parser.add_argument("--micro", action="store_true", help="per-frame cost in one process")
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
    if ns.micro:
        micro()
        return
    configs = [("new", HERE, ""), ("new", HERE, "bench-token")]
    if ns.old is not None:
        configs = [("old", ns.old, ""), ("old", ns.old, "bench-token"), *configs]
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(ns.rounds):
        for label, code, token in configs:
            key = f"{label} {'token' if token else 'no token'}"
            results.setdefault(key, []).append(_run(code, token, ns.tcp))
    # On a shared machine the best round is the least disturbed one.
    print(f"{'config':<16} {'p50 us: best':>13} {'median':>7} {'calls/s: best':>14} {'median':>7}")
    for key, runs in results.items():
        p50s = [r["p50_us"] for r in runs]
        rates = [r["calls_per_s"] for r in runs]
        print(
            f"{key:<16} {min(p50s):>13.1f} {statistics.median(p50s):>7.1f}"
            f" {max(rates):>14.0f} {statistics.median(rates):>7.0f}"
        )


if __name__ == "__main__":
    main()
