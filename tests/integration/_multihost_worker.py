"""One worker of tests/integration/test_multihost.py, run inside a network
namespace (``ip netns exec NS python -m tests.integration._multihost_worker``).

Prints ``READY``, ``TRAINED {json}`` and ``CUT {json}`` lines for the test.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.optim import DistributedOptimizer

HEARTBEAT = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0}


def make_weight() -> torch.Tensor:
    return torch.arange(12.0).reshape(4, 3).div(10).requires_grad_()


def forward(x: torch.Tensor, w: rpc.RRef[torch.Tensor]) -> torch.Tensor:
    return torch.tanh(x @ w.local_value())


def hold(seconds: float) -> str:
    time.sleep(seconds)
    return "answered"


def local_steps(xs: list[torch.Tensor]) -> torch.Tensor:
    w = make_weight()
    opt = torch.optim.SGD([w], lr=0.5)
    for x in xs:
        opt.zero_grad()
        torch.tanh(x @ w).pow(2).sum().backward()  # type: ignore[no-untyped-call]
        opt.step()
    return w.detach()


def say(tag: str, value: object = None) -> None:
    print(f"{tag} {json.dumps(value)}", flush=True)


async def main(rank: int, port: int, hosts: list[str], token: str) -> None:
    options = rpc.RpcOptions(auth_token=token, listen_host=hosts[rank], rpc_timeout=30, **HEARTBEAT)
    await rpc.init_rpc(
        f"host{rank}", rank, 2, init_method=f"tcp://{hosts[0]}:{port}", options=options
    )
    say("READY")
    if rank == 1:  # serves until the link is cut, then notices it too
        await asyncio.sleep(60)
        return
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 4, generator=g) for _ in range(4)]
    w = rpc.remote("host1", make_weight)
    opt = DistributedOptimizer(torch.optim.SGD, [w], lr=0.5)
    for x in xs:
        async with dist_autograd.context() as cid:
            y = await rpc.rpc_async("host1", forward, (x, w))
            await dist_autograd.backward(cid, [y.pow(2).sum()])
            await opt.step(cid)
    remote_w = await w.to_here()
    links = [
        c._transport.get_extra_info("peername")[0]  # type: ignore[union-attr]
        for c in rpc.api.current_agent()._incoming
        if c._transport is not None
    ]
    say(
        "TRAINED",
        {"identical": bool(torch.equal(remote_w, local_steps(xs))), "peers": sorted(set(links))},
    )
    # A call in flight when the test cuts the link: detected by heartbeats.
    call = rpc.rpc_async("host1", hold, (30.0,), timeout=0)
    await asyncio.sleep(0.5)
    say("CALLING")
    started = time.monotonic()
    try:
        outcome = str(await call)
    except rpc.RpcError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
        lost = isinstance(exc, rpc.ConnectionLostError)
    else:
        lost = False
    say("CUT", {"lost": lost, "outcome": outcome, "after_s": time.monotonic() - started})
    await rpc.shutdown(graceful=False)


if __name__ == "__main__":
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    rpc.run(main(rank, port, sys.argv[3].split(","), sys.argv[4]))
