"""Liveness and peer-caused state in real processes (issue 11, findings 4, 5, 6,
8 and 12): forged responses, replies nobody reads, participants lost in a
distributed backward pass, a creator lost with its context alive elsewhere,
and contexts a peer makes on this worker.

Raw peers here are plain sockets in the test process that speak the wire
protocol (no token in these groups, as on a trusted loopback: a stranger can
say Hello as any worker).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import time
from typing import Any

import psutil
import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import api, codec, dist_autograd, wire
from tests.integration.common import async_sleep, await_outcome
from tests.integration.harness import (
    Died,
    WorkerGroup,
    agent_tcp_port,
    barrier,
    post,
    receive,
    spawn_workers,
)

pytestmark = pytest.mark.timeout(90)

# Small failure-detection settings: every bound below is in these units.
HEARTBEAT = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0}


def frame_bytes(message: codec.Message, rid: int) -> bytes:
    header, buffers = codec.encode(message, rid)
    return b"".join(bytes(chunk) for chunk in wire.encode_frame(header, buffers))


def group_string() -> str:
    return str(api.current_agent()._group)


def raw_hello(port: int, name: str, rank: int, group: str) -> socket.socket:
    """A TCP connection to a worker that said Hello as ``name``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(frame_bytes(codec.Hello(name, rank, group), 0))
    return sock


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the worker closed ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 16):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def debug_counters() -> dict[str, int]:
    return rpc.get_debug_info()


# --------------------------------------------------------------- finding 4: forgeries


async def victim_calls(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rank == 1:
        post((agent_tcp_port(), group_string()))
        # Calls to the real worker0 in flight while the forger sprays answers.
        calls = [rpc.rpc_async("worker0", async_sleep, args=(1.5, i)) for i in range(50)]
        await asyncio.sleep(0.2)
        post("calls in flight")
        out["values"] = [await await_outcome(f) for f in calls]
        out["after"] = await rpc.rpc_async("worker0", async_sleep, args=(0, "after"))
        out["pending"] = rpc.get_debug_info()["num_pending_requests"]
    await barrier()
    return out


@pytest.mark.timeout(60)
def test_forged_responses_are_refused_and_drop_their_connection() -> None:
    with spawn_workers(victim_calls, 2, timeout=60) as group:
        _, (port, group_str) = group.next_event(timeout=45, rank=1)
        assert group.next_event(timeout=30, rank=1)[1] == "calls in flight"
        forged = codec.PythonRet(codec.dump_payload("forged", allow_pickle=False))
        sock = raw_hello(port, "worker0", 0, group_str)
        try:
            with pytest.raises(OSError):  # reset part way: the worker dropped us
                for rid in range(1, 2001):
                    sock.sendall(frame_bytes(forged, rid))
                    if rid % 200 == 0:
                        time.sleep(0.01)
                time.sleep(0.5)
                sock.sendall(frame_bytes(forged, 1))
                if closed_by_peer(sock, 5):
                    raise ConnectionResetError("closed")
        finally:
            sock.close()
        _, w1 = group.join()
    assert w1["values"] == list(range(50)), w1["values"]
    assert w1["after"] == "after" and w1["pending"] == 0


# ------------------------------------------------------- finding 5: unread replies

REPLY_MIB = 1
FLOW = {"max_pending_reply_bytes": 1 << 20, "max_concurrent_requests": 8}


def big_reply(i: int) -> torch.Tensor:
    return torch.full((REPLY_MIB << 18,), float(i))  # 1 MiB, pages touched


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def flooded_callee(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rank == 0:
        big_reply(0)  # warm the allocator and the pool threads
        await rpc.rpc_async("worker0", big_reply, args=(0,))
        out["rss_before"] = rss()
        post((agent_tcp_port(), group_string()))
        assert await receive(60) == "flooding"
        peak = 0
        for _ in range(20):  # 2 s under the flood
            await asyncio.sleep(0.1)
            peak = max(peak, rss())
        out["rss_peak"] = peak
        out["inflight"] = rpc.get_debug_info()["num_inflight_requests"]
    await barrier()  # worker1 calls worker0 while the flood is on
    if rank == 1:
        started = time.monotonic()
        out["served"] = [
            float((await rpc.rpc_async("worker0", big_reply, args=(i,)))[0]) for i in range(5)
        ]
        out["served_in"] = time.monotonic() - started
    await barrier()
    return out


@pytest.mark.timeout(60)
def test_replies_nobody_reads_cost_bounded_memory() -> None:
    with spawn_workers(
        flooded_callee, 2, timeout=60, options_kwargs={"use_unix_sockets": False, **FLOW}
    ) as group:
        _, (port, group_str) = group.next_event(timeout=45, rank=0)
        sock = raw_hello(port, "worker1", 1, group_str)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            calls = b"".join(
                frame_bytes(
                    codec.PythonCall(None, codec.dump_payload((big_reply, (i,), {}), True)), i + 1
                )
                for i in range(1500)
            )
            sock.sendall(calls)  # 1500 requests (~0.2 MB) asking for 1.5 GB; never read
            group.send(0, "flooding")
            w0, w1 = group.join()
        finally:
            sock.close()
    growth = (w0["rss_peak"] - w0["rss_before"]) >> 20
    # Bound: max_pending_reply_bytes + max_concurrent_requests replies (9 MiB),
    # plus allocator slack; 1.5 GB without flow control.
    assert growth < 48, f"callee RSS grew {growth} MiB"
    assert w0["inflight"] <= FLOW["max_concurrent_requests"], w0["inflight"]
    assert w1["served"] == [float(i) for i in range(5)]
    print(f"\nflooded callee: RSS +{growth} MiB; another peer served in {w1['served_in']:.2f}s")


# ------------------------------------------- findings 6 and 12: lost participants


class StallInBackward(torch.autograd.Function):
    """Identity; its backward tells the test and then stalls (it is killed)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        post("in backward")
        time.sleep(60)
        return grad


async def middle(x: torch.Tensor, victim: int) -> torch.Tensor:
    """On worker1: pass the tensor on to worker2 (stalling in backward on the victim)."""
    y = x * 1.0
    if victim == 1:
        y = StallInBackward.apply(y)
    return await rpc.rpc_async("worker2", last, args=(y, victim == 2))


def last(y: torch.Tensor, stall: bool) -> torch.Tensor:
    """On worker2: the end of the chain."""
    return (StallInBackward.apply(y) if stall else y) * 2


def autograd_and_requests(served_here: int = 0) -> dict[str, int]:
    """The counters that must go back to 0; ``served_here``: the requests being
    served to ask this (not counted)."""
    info = rpc.get_debug_info()
    info["num_inflight_requests"] -= served_here
    return {
        key: info[key]
        for key in (
            "num_autograd_contexts",
            "num_current_backward_passes",
            "num_inflight_requests",
            "num_pending_requests",
        )
    }


async def poll_until_clean(to: str, bound: float) -> tuple[dict[str, int], float]:
    started = time.monotonic()
    while True:
        state = await rpc.rpc_async(to, autograd_and_requests, args=(1,))
        elapsed = time.monotonic() - started
        if not any(state.values()) or elapsed > bound:
            return state, elapsed
        await asyncio.sleep(0.05)


async def chain_kill(rank: int, world_size: int, init_method: str, victim: int) -> dict[str, Any]:
    options = rpc.RpcOptions(rpc_timeout=20, **HEARTBEAT)
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method, options=options)
    await barrier()
    out: dict[str, Any] = {}
    survivor = f"worker{3 - victim}"
    if rank == 0:
        x = torch.ones(4, requires_grad=True)
        async with dist_autograd.context() as context_id:
            z = await rpc.rpc_async("worker1", middle, args=(x, victim))
            out["during"] = await rpc.rpc_async(survivor, autograd_and_requests, args=(1,))
            out["backward"] = await await_outcome(dist_autograd.backward(context_id, [z.sum()]))
            out["backward_failed_at"] = time.monotonic()  # one clock for every process
        # The survivor drops its part (context, pass, the requests it serves)
        # with no help from the root: worker2 never talked to worker0.
        out["after"], out["clean_in"] = await poll_until_clean(survivor, 10.0)
        await rpc.rpc_async(survivor, receive_flag)
    elif rank != victim:
        await wait_flag()
    else:
        await asyncio.sleep(3600)  # killed in its part of the backward pass
    out["state"] = autograd_and_requests()
    out["shutdown"] = await await_outcome(rpc.shutdown(timeout=3.0))
    return out


_DONE = asyncio.Event()


async def receive_flag() -> None:
    _DONE.set()


async def wait_flag() -> None:
    await asyncio.wait_for(_DONE.wait(), 60)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", [1, 2], ids=["middle", "end"])
def test_participant_lost_mid_backward(victim: int) -> None:
    """Chain worker0 -> worker1 -> worker2 (nested calls), the victim SIGKILLed
    in its part of the backward pass: the middle (worker2 never talked to the
    root), or the end (the root never talked to it)."""
    with WorkerGroup(chain_kill, 3, (victim,), mode="raw", timeout=80) as group:
        assert group.next_event(timeout=60) == (victim, "in backward")
        group.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        results = group.join(allow_dead={victim})
    assert results[victim] == Died(-signal.SIGKILL)
    w0 = results[0]
    assert w0["during"]["num_autograd_contexts"] == 1
    error = w0["backward"]
    # Finding 12: both a RemoteError and a ConnectionLostError, naming the lost worker.
    assert isinstance(error, rpc.ConnectionLostError), repr(error)
    assert isinstance(error, rpc.RemoteError), repr(error)
    assert error.worker == f"worker{victim}", repr(error)
    failed_after = w0["backward_failed_at"] - t_kill
    assert failed_after < HEARTBEAT["heartbeat_timeout"], failed_after
    # Finding 6: the other survivor dropped everything of the context.
    assert not any(w0["after"].values()), w0["after"]
    assert w0["clean_in"] < HEARTBEAT["heartbeat_timeout"] + 1.0, w0["clean_in"]
    for got in (w0, results[3 - victim]):
        assert not any(got["state"].values()), got["state"]
        # The survivors' graceful shutdown succeeds: the dead worker, declared
        # gone before it began, is counted out of the shutdown vote.
        assert got["shutdown"] is None, got["shutdown"]
    print(
        f"\nworker{victim} killed: the root raised after {failed_after:.2f}s, the survivor "
        f"was clean {w0['clean_in']:.2f}s later; {error!r:.120}"
    )


# ----------------------------------------------- finding 6: the creator is lost


async def creator_killed(rank: int, world_size: int, init_method: str) -> dict[str, Any]:
    options = rpc.RpcOptions(rpc_timeout=20, **HEARTBEAT)
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method, options=options)
    gone: list[tuple[str, str, str | None]] = []
    api.current_agent().peer_gone_hooks.append(
        lambda info, error: gone.append((info.name, type(error).__name__, error.worker))  # type: ignore[attr-defined]
    )
    await barrier()
    out: dict[str, Any] = {}
    if rank == 0:
        x = torch.ones(4, requires_grad=True)
        async with dist_autograd.context():
            await rpc.rpc_async("worker1", relay, args=(x,))
            post("contexts made")
            await asyncio.sleep(3600)  # killed here, inside its context
    assert await receive(60) == "report"
    post(rpc.get_debug_info()["num_autograd_contexts"])
    t_kill = await receive(60)
    while time.monotonic() - t_kill < 10:
        if rpc.get_debug_info()["num_autograd_contexts"] == 0:
            break
        await asyncio.sleep(0.02)
    out["released_after"] = time.monotonic() - t_kill
    out["state"] = autograd_and_requests()
    await asyncio.sleep(0.5)  # a second declaration would come by now
    out["gone"] = list(gone)
    out["shutdown"] = await await_outcome(rpc.shutdown(timeout=2.0))
    return out


async def relay(x: torch.Tensor) -> torch.Tensor:
    """On worker1: worker2 gets a part of the context, made by worker1."""
    return await rpc.rpc_async("worker2", torch.mul, args=(x, 2))


@pytest.mark.timeout(90)
def test_context_of_a_lost_creator_is_released_everywhere() -> None:
    with WorkerGroup(creator_killed, 3, mode="raw", timeout=80) as group:
        assert group.next_event(timeout=60) == (0, "contexts made")
        for rank in (1, 2):
            group.send(rank, "report")
        held = dict(group.next_event(timeout=30) for _ in (1, 2))
        time.sleep(0.3)  # one heartbeat tick: worker2 watches the creator now
        group.kill(0, signal.SIGKILL)
        t_kill = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        for rank in (1, 2):
            group.send(rank, t_kill)
        w0, w1, w2 = group.join(allow_dead={0})
    assert w0 == Died(-signal.SIGKILL)
    assert held == {1: 1, 2: 1}, held
    for got in (w1, w2):
        # peer_gone_hooks: called once for it, with a ConnectionLostError naming
        # it (the other survivor may leave first: the store died with worker0).
        about_0 = [g for g in got["gone"] if g[0] == "worker0"]
        assert about_0 == [("worker0", "ConnectionLostError", "worker0")], got["gone"]
        assert not any(got["state"].values()), got["state"]
        assert got["released_after"] < HEARTBEAT["heartbeat_timeout"], got["released_after"]
    print(f"\ncreator killed: released after {[round(g['released_after'], 3) for g in (w1, w2)]}s")


# ----------------------------------------- finding 8: contexts made by one peer

CONTEXT_LIMIT = 1000


async def make_contexts(rank: int, world_size: int, init_method: str) -> dict[str, Any]:
    opts: dict[str, Any] = dict(HEARTBEAT)
    if rank == 0:
        opts["max_peer_contexts"] = CONTEXT_LIMIT
    options = rpc.RpcOptions(**opts)
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method, options=options)
    await barrier()
    out: dict[str, Any] = {}
    agent = api.current_agent()
    if rank == 1:
        # Fresh context ids, as a peer bypassing the API would send them.
        to = agent.worker_info("worker0")
        call = codec.PythonCall(None, codec.dump_payload((len, ((),), {}), True))
        futures = [
            agent.request(
                to,
                codec.ForwardAutogradReq(1, (1 << 48) | (10**6 + i), i + 1, {}, call),
                timeout=30,
            )
            for i in range(2 * CONTEXT_LIMIT)
        ]
        outcomes = [await await_outcome(f) for f in futures]
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        kinds = {o.type_name if isinstance(o, rpc.RemoteError) else repr(o) for o in refused}
        post(("made", len(outcomes) - len(refused), len(refused), kinds))
        assert await receive(30) == "go"
        os._exit(0)  # gone for good
    assert await receive(60) == "count"
    out["held"] = rpc.get_debug_info()["num_autograd_contexts"]
    post("counted")
    started = time.monotonic()
    while time.monotonic() - started < 10:
        if rpc.get_debug_info()["num_autograd_contexts"] == 0:
            break
        await asyncio.sleep(0.02)
    out["released_after"] = time.monotonic() - started
    out["left"] = rpc.get_debug_info()["num_autograd_contexts"]
    await rpc.shutdown(graceful=False)
    return out


@pytest.mark.timeout(90)
def test_contexts_made_by_a_peer_are_capped_and_released_when_it_is_gone() -> None:
    with WorkerGroup(make_contexts, 2, mode="raw", timeout=80) as group:
        _, (event, ok, refused, kinds) = group.next_event(timeout=60, rank=1)
        assert event == "made"
        group.send(0, "count")
        assert group.next_event(timeout=30, rank=0) == (0, "counted")
        group.send(1, "go")
        w0, _ = group.join(allow_dead={1})
    assert (ok, refused) == (CONTEXT_LIMIT, CONTEXT_LIMIT), (ok, refused)
    assert kinds == {"aiorpc_autograd.errors.ResourceLimitError"}, kinds
    assert w0["held"] == CONTEXT_LIMIT
    assert w0["left"] == 0
    assert w0["released_after"] < HEARTBEAT["heartbeat_timeout"] + 0.5, w0["released_after"]
