"""Large tensors between workers on one host go through shared memory
(``RpcOptions.shm_threshold``): values arrive bit-exact in every shape the
socket path carries, segments are reused once the receiver drops its tensors,
a tensor kept by the receiver is never overwritten, and gradients flow back
through the same path. With ``shm_threshold=0`` the socket carries everything.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any, ClassVar

import pytest
import torch

import aiorpc_autograd as rpc
import aiorpc_autograd.dist_autograd as dist_autograd
from tests.integration.common import echo
from tests.integration.harness import barrier, run_processes, run_workers

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1024, 1024, generator=g)  # 4 MiB float32
    return [
        base,
        base.t(),  # not contiguous: sent as a dense copy
        base[:, 1:513],  # a strided slice
        torch.randint(-(2**40), 2**40, (MiB,), dtype=torch.int64, generator=g),  # 8 MiB
        torch.rand(MiB, generator=g).to(torch.bfloat16),
        torch.rand(300_000, generator=g, dtype=torch.float64).view(torch.complex128),
        torch.rand(3, generator=g),  # small: through the socket
    ]


def add_one_in_place(t: torch.Tensor) -> torch.Tensor:
    t.add_(1)  # the receiver owns what it got: writing it must not reach the caller
    return t


class Keeper:
    """Holds received tensors on the callee (kept leases)."""

    kept: ClassVar[list[torch.Tensor]] = []


def keep(t: torch.Tensor) -> float:
    Keeper.kept.append(t)
    return float(t.double().sum())


def kept_sums() -> list[float]:
    return [float(t.double().sum()) for t in Keeper.kept]


def drop_kept() -> None:
    Keeper.kept.clear()
    gc.collect()


def shm_counters() -> dict[str, int]:
    gc.collect()
    info = rpc.get_debug_info()
    return {k: v for k, v in info.items() if k.startswith("num_shm")}


async def _settled(to: str) -> tuple[dict[str, int], dict[str, int]]:
    """Both sides' counters once releases had time to travel."""
    for _ in range(50):
        gc.collect()
        here = shm_counters()
        there = await rpc.rpc_async(to, shm_counters)
        counts = [
            side[f"num_shm_segments_{k}"] for side in (here, there) for k in ("held", "leased")
        ]
        if not any(counts):
            break
        await asyncio.sleep(0.05)
    return here, there


async def check_round_trips(rank: int, world_size: int) -> dict[str, Any]:
    if rank != 0:
        return {}
    await rpc.rpc_async("worker1", echo, args=(0,))  # the peer's offer arrived by its reply
    sent = _tensors()
    back = await rpc.rpc_async("worker1", echo, args=(sent,))
    exact = [
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(sent, back, strict=True)
    ]
    del back
    # Many large calls in flight at once, then sequentially: segments are reused.
    outs = await asyncio.gather(*(rpc.rpc_async("worker1", echo, args=(t,)) for t in sent[:4]))
    concurrent_exact = all(torch.equal(a, b) for a, b in zip(sent[:4], outs, strict=True))
    del outs
    for i in range(30):
        t = torch.full((MiB,), float(i))
        got = await rpc.rpc_async("worker1", echo, args=(t,))
        assert torch.equal(got, t)
        del got
    here, there = await _settled("worker1")
    # In-place writes on the callee do not reach the caller's tensor.
    original = torch.zeros(MiB)
    plus = await rpc.rpc_async("worker1", add_one_in_place, args=(original,))
    return {
        "exact": exact,
        "concurrent_exact": concurrent_exact,
        "caller": here,
        "callee": there,
        "original_untouched": bool((original == 0).all()),
        "plus": bool((plus == 1).all()),
    }


def test_large_tensors_travel_through_shared_memory() -> None:
    (result, _) = run_workers(check_round_trips, 2, timeout=90)
    assert result["exact"] == [True] * 7
    assert result["concurrent_exact"]
    assert result["original_untouched"] and result["plus"]
    # Both directions used segments, reused them (30 sequential 4 MiB calls did
    # not need 30), and every segment came back once its tensors were dropped.
    for side in ("caller", "callee"):
        counters = result[side]
        assert 1 <= counters["num_shm_segments"] <= 12, counters
        assert counters["num_shm_segments_held"] == 0, counters
        assert counters["num_shm_segments_leased"] == 0, counters


async def check_kept(rank: int, world_size: int) -> dict[str, Any]:
    if rank != 0:
        return {}
    await rpc.rpc_async("worker1", echo, args=(0,))  # the peer's offer arrived by its reply
    sums = []
    for i in range(5):
        t = torch.full((MiB,), float(i + 1))
        sums.append(await rpc.rpc_async("worker1", keep, args=(t,)))
    # The callee keeps all five; more traffic must not overwrite them.
    for _ in range(5):
        await rpc.rpc_async("worker1", echo, args=(torch.rand(MiB),))
    still = await rpc.rpc_async("worker1", kept_sums)
    while_kept = shm_counters()
    await rpc.rpc_async("worker1", drop_kept)
    after, _ = await _settled("worker1")
    return {"sums": sums, "still": still, "while_kept": while_kept, "after": after}


def test_tensors_kept_by_the_receiver_stay_intact() -> None:
    (result, _) = run_workers(check_kept, 2, timeout=90)
    expected = [float(MiB * (i + 1)) for i in range(5)]
    assert result["sums"] == expected
    assert result["still"] == expected
    assert result["while_kept"]["num_shm_segments_held"] >= 5
    assert result["after"]["num_shm_segments_held"] == 0


def remote_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w)


async def check_gradients(rank: int, world_size: int) -> dict[str, Any]:
    if rank != 0:
        return {}
    g = torch.Generator().manual_seed(1)
    x = torch.rand(256, 1024, generator=g, requires_grad=True)  # 1 MiB each way
    w = torch.rand(1024, 1024, generator=g, requires_grad=True)  # 4 MiB
    with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("worker1", remote_linear, args=(x, w))
        await dist_autograd.backward(ctx, [y.sum()])
        grads = dist_autograd.get_gradients(ctx)
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    torch.relu(xl @ wl).sum().backward()
    assert xl.grad is not None and wl.grad is not None
    return {
        "x": torch.allclose(grads[x], xl.grad),
        "w": torch.allclose(grads[w], wl.grad),
        "segments": shm_counters()["num_shm_segments"],
    }


def test_gradients_through_shared_memory() -> None:
    (result, _) = run_workers(check_gradients, 2, timeout=90)
    assert result["x"] and result["w"]
    assert result["segments"] >= 1


async def check_disabled(rank: int, world_size: int) -> dict[str, Any]:
    if rank != 0:
        return {}
    t = torch.rand(2 * MiB)
    back = await rpc.rpc_async("worker1", echo, args=(t,))
    return {
        "exact": torch.equal(back, t),
        "here": shm_counters(),
        "there": await rpc.rpc_async("worker1", shm_counters),
    }


@pytest.mark.parametrize("options", [{"shm_threshold": 0}, {"use_unix_sockets": False}])
def test_socket_only(options: dict[str, Any]) -> None:
    (result, _) = run_workers(check_disabled, 2, timeout=60, options_kwargs=options)
    assert result["exact"]
    assert result["here"]["num_shm_segments"] == 0
    assert result["there"]["num_shm_segments"] == 0


def test_shm_threshold_validated() -> None:
    with pytest.raises(ValueError, match="shm_threshold"):
        rpc.RpcOptions(shm_threshold=-1)


async def check_one_side_disabled(rank: int, world_size: int, init_method: str) -> dict[str, Any]:
    # worker1 turned shared memory off; worker0 has the default and offers it.
    options = rpc.RpcOptions(shm_threshold=0 if rank == 1 else 512 << 10)
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method, options=options)
    await barrier()
    t = torch.arange(float(MiB))
    out: dict[str, Any] = {}
    for _ in range(3):  # the first call may precede the offer: several
        back = await rpc.rpc_async(f"worker{1 - rank}", echo, args=(t,))
        out.setdefault("exact", []).append(torch.equal(back, t))
    await barrier()
    out["counters"] = shm_counters()
    await rpc.shutdown()
    return out


def test_a_worker_with_shared_memory_off_declines_the_offer() -> None:
    w0, w1 = run_processes(check_one_side_disabled, 2, timeout=60)
    assert w0["exact"] == w1["exact"] == [True] * 3
    assert w0["counters"]["num_shm_segments"] == 0  # worker1 never offered
    assert w1["counters"]["num_shm_segments"] == 0  # and declined worker0's offer
