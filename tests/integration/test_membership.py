"""Dynamic membership between real worker processes (``world_size=None``).

Raw targets (``harness.run_processes``): each process does its own
``init_rpc(..., world_size=None)`` on the group's ``tcp://`` store, which rank 0
(the "ps") hosts and keeps for the group's life. The harness barrier (run by
the test process, not the package) orders the steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from tests.integration.common import WarningMessages, attempt, await_outcome, echo
from tests.integration.harness import barrier, run_processes

pytestmark = pytest.mark.timeout(120)

FAST = rpc.RpcOptions(heartbeat_interval=0.2, heartbeat_timeout=1.5, rpc_timeout=20)


def name_of(rank: int) -> str:
    return "ps" if rank == 0 else f"trainer{rank}"


async def join(rank: int, init_method: str, options: rpc.RpcOptions = FAST) -> rpc.WorkerInfo:
    return await rpc.init_rpc(name_of(rank), rank, None, init_method=init_method, options=options)


async def collect(events: list[rpc.MembershipEvent]) -> None:
    async for event in rpc.membership_events():
        events.append(event)


def seen(events: list[rpc.MembershipEvent]) -> list[tuple[str, str, str]]:
    return [(e.kind, e.worker.name, e.reason.split(":")[0]) for e in events]


def plus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


async def members() -> list[str]:
    return [w.name for w in rpc.get_worker_infos()]


# ------------------------------------------------------------------ join, leave, rejoin


async def join_leave_rejoin(rank: int, world_size: int, init_method: str) -> Any:
    if rank == 0:
        await join(rank, init_method)
        events: list[rpc.MembershipEvent] = []
        watcher = asyncio.create_task(collect(events))
        await asyncio.sleep(0)
        await barrier()  # 1: ps serving, trainer1 joins
        await barrier()  # 2: trainer1 served calls; trainer2 joins now
        await barrier()  # 3: trainer2 joined and called trainer1
        during = await members()
        await barrier()  # 4: trainer1 left
        left = await attempt("trainer1", echo, (1,))
        await barrier()  # 5: trainer1 rejoined under its old name
        again = await rpc.rpc_async("trainer1", echo, (2,))
        await barrier()  # 6: done
        await barrier()  # 7: the others left: the store's host goes last
        await rpc.shutdown()
        watcher.cancel()
        return seen(events), during, left, again
    if rank == 1:
        await barrier()  # 1
        await join(rank, init_method)
        answers = [await rpc.rpc_async("ps", echo, (i,)) for i in range(5)]
        await barrier()  # 2
        await barrier()  # 3
        started = time.monotonic()
        await rpc.shutdown()  # leaves the group
        leave_s = time.monotonic() - started
        await barrier()  # 4
        await join(rank, init_method)  # the same name and rank again
        after = await members()
        await barrier()  # 5
        await barrier()  # 6
        await rpc.shutdown()
        await barrier()  # 7
        return answers, leave_s, after
    await barrier()  # 1
    await barrier()  # 2
    started = time.monotonic()
    await join(rank, init_method)
    joined = time.monotonic()
    # The newcomer calls both, with tensors: both know it without any call of theirs.
    out = await rpc.rpc_async("trainer1", plus, (torch.ones(2), torch.ones(2)))
    first_call_s = time.monotonic() - joined
    at_join = await members()
    await barrier()  # 3
    await barrier()  # 4
    await barrier()  # 5
    await barrier()  # 6
    await rpc.shutdown()
    await barrier()  # 7
    return joined - started, first_call_s, out, at_join


def test_join_a_serving_group_leave_and_rejoin_under_the_same_name() -> None:
    ps, t1, t2 = run_processes(join_leave_rejoin, 3, timeout=90)
    events, during, left, again = ps
    assert (
        events
        == [
            ("join", "trainer1", "joined"),
            ("join", "trainer2", "joined"),
            ("leave", "trainer1", "left"),
            ("join", "trainer1", "joined"),
            ("leave", "trainer2", "left"),  # at the end, both leave before the ps
            ("leave", "trainer1", "left"),
        ]
        or events[-2:] == [("leave", "trainer1", "left"), ("leave", "trainer2", "left")]
    ), events
    assert events[:4] == [
        ("join", "trainer1", "joined"),
        ("join", "trainer2", "joined"),
        ("leave", "trainer1", "left"),
        ("join", "trainer1", "joined"),
    ], events
    assert during == ["ps", "trainer1", "trainer2"]
    assert isinstance(left, rpc.WorkerLeftError) and "left the group" in str(left), left
    assert again == 2
    answers, leave_s, after = t1
    assert answers == list(range(5))
    assert leave_s < 10, leave_s
    assert after == ["ps", "trainer1", "trainer2"]
    join_s, first_call_s, out, at_join = t2
    assert torch.equal(out, torch.full((2,), 2.0))
    assert at_join == ["ps", "trainer1", "trainer2"]
    assert join_s < 10 and first_call_s < 5, (join_s, first_call_s)
    print(f"\njoin (init_rpc) {join_s:.3f}s, then first call answered in {first_call_s:.3f}s")


# ------------------------------------------------------------------ calls racing a leave


async def slow_echo(value: Any) -> Any:
    await asyncio.sleep(0.01)
    return value


async def calls_race_a_leave(rank: int, world_size: int, init_method: str) -> Any:
    if rank == 0:
        await join(rank, init_method)
        await barrier()  # 1: both up
        await barrier()  # 2: trainer1 starts leaving now
        outcomes: list[Any] = []
        deadline = time.monotonic() + 20
        # Bursts with pauses (the leaver waits for an idle moment), until the
        # leave has taken effect and some more calls were made.
        after_leave = 0
        i = 0
        while after_leave < 10 and time.monotonic() < deadline:
            burst = []
            for _ in range(3):
                burst.append(attempt("trainer1", slow_echo, (i,)))
                i += 1
            got = await asyncio.gather(*burst)
            outcomes += got
            if any(isinstance(o, BaseException) for o in got):
                after_leave += 1
            await asyncio.sleep(0.005)
        await barrier()  # 3
        await rpc.shutdown()
        return outcomes
    await join(rank, init_method)
    await barrier()  # 1
    await barrier()  # 2
    await rpc.shutdown()
    await barrier()  # 3
    return None


def test_calls_racing_a_leave_resolve_once_with_a_value_or_a_typed_error() -> None:
    outcomes = run_processes(calls_race_a_leave, 2, timeout=90)[0]
    values = [o for o in outcomes if not isinstance(o, BaseException)]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    # Every call resolved: to its own argument (calls are numbered in order)...
    assert values == list(range(len(values))), values
    # ...or, from the leave on, to a typed error: a call never hangs.
    assert len(errors) >= 10, errors
    assert all(isinstance(o, BaseException) for o in outcomes[len(values) :]), outcomes
    for error in errors:
        assert isinstance(error, (rpc.WorkerLeftError, rpc.ConnectionLostError)), repr(error)


# ------------------------------------------------------------------ a member dies


async def member_dies(rank: int, world_size: int, init_method: str) -> Any:
    if rank == 0:
        await join(rank, init_method)
        events: list[rpc.MembershipEvent] = []
        watcher = asyncio.create_task(collect(events))
        await barrier()  # 1: all up
        rref = rpc.remote("trainer1", torch.ones, (3,))
        await rref.to_here()
        await barrier()  # 2: trainer1 dies now
        killed = time.monotonic()
        while not any(e.kind == "leave" for e in events) and time.monotonic() - killed < 15:
            await asyncio.sleep(0.02)
        seen_s = time.monotonic() - killed
        call = await attempt("trainer1", echo, (1,))
        use = await await_outcome(rref.to_here())
        info = rpc.get_debug_info()
        # trainer2 leaves first (the ps hosts the store).
        left = time.monotonic() + 20
        while ("leave", "trainer2", "left") not in seen(events) and time.monotonic() < left:
            await asyncio.sleep(0.02)
        started = time.monotonic()
        await rpc.shutdown()
        watcher.cancel()
        return seen(events), seen_s, call, use, info, time.monotonic() - started
    if rank == 1:
        await join(rank, init_method)
        await barrier()  # 1
        await barrier()  # 2
        os.kill(os.getpid(), signal.SIGKILL)
    await join(rank, init_method)
    await barrier()  # 1
    await barrier()  # 2
    until = time.monotonic() + 20
    while "trainer1" in await members() and time.monotonic() < until:
        await asyncio.sleep(0.02)
    gone = "trainer1" not in await members()
    await rpc.shutdown()
    return gone


def test_a_killed_member_leaves_every_survivors_view_and_shutdown_succeeds() -> None:
    ps, _, t2_saw_it = run_processes(member_dies, 3, timeout=90, allow_dead=[1])
    assert t2_saw_it
    events, seen_s, call, use, info, shutdown_s = ps
    assert ("leave", "trainer1", "lost") in events, events
    # Declared gone within heartbeat_timeout (1.5 s) of the death, plus slack
    # for a loaded 2-core machine.
    assert seen_s < 1.5 + 3, seen_s
    assert isinstance(call, rpc.WorkerLeftError), call
    assert isinstance(use, rpc.RpcError), use
    assert info["num_pending_requests"] == 0
    assert shutdown_s < 10, shutdown_s
    print(f"\na SIGKILLed member seen to leave {seen_s:.3f}s after the kill")


# ------------------------------------------------------------------ refusals


async def mixed(rank: int, world_size: int, init_method: str) -> Any:
    if rank == 0:
        await join(rank, init_method)
        await barrier()
        await barrier()
        await rpc.shutdown()
        return None
    await barrier()
    fixed = await await_outcome(rpc.init_rpc("fixed1", 1, 2, init_method=init_method, options=FAST))
    twin = await await_outcome(rpc.init_rpc("ps", 5, None, init_method=init_method, options=FAST))
    same_rank = await await_outcome(
        rpc.init_rpc("other", 0, None, init_method=init_method, options=FAST)
    )
    await barrier()
    return fixed, twin, same_rank


def test_mixing_fixed_and_dynamic_and_taking_a_live_name_are_refused() -> None:
    _, (fixed, twin, same_rank) = run_processes(mixed, 2, timeout=60)
    # torch's words and type (a RuntimeError), and still a ValueError
    assert isinstance(fixed, rpc.InvalidArgumentError), fixed
    assert isinstance(fixed, RuntimeError) and isinstance(fixed, ValueError), fixed
    mixes = "RPC group mixes statically and dynamically initialized members which is not supported"
    assert str(fixed).startswith(mixes), fixed
    assert isinstance(twin, ValueError) and "unique" in str(twin), twin
    assert isinstance(same_rank, ValueError) and "unique" in str(same_rank), same_rank


# ------------------------------------------------------------------ everyone at once


async def join_and_leave_at_once(rank: int, world_size: int, init_method: str) -> Any:
    # torch's test_dynamic_rpc_init_rpc, in rounds: every worker, the store's
    # host included, joins and leaves at once, with no barrier, each round a
    # fresh incarnation under the same name. Joins then race leaves, and the
    # host's own leave races everybody's (the store lives in its process,
    # which exits when this returns). Default heartbeats: the host's wait is
    # bounded by heartbeat_timeout. One barrier first: the processes start
    # together, as torch's forked ranks do (spawned ones finish importing
    # seconds apart, longer than the host outlasts a quiet group).
    warnings = WarningMessages()
    logging.getLogger("aiorpc_autograd").addHandler(warnings)
    options = rpc.RpcOptions(rpc_timeout=20)
    rounds = 1 if rank == 0 else 3
    await barrier()
    joins, leaves = [], []
    for _ in range(rounds):
        t0 = time.monotonic()
        await join(rank, init_method, options)
        joins.append(time.monotonic() - t0)
        t0 = time.monotonic()
        await rpc.shutdown()
        leaves.append(time.monotonic() - t0)
    return joins, leaves, warnings.messages


def test_workers_joining_and_leaving_at_once_with_the_store_host_all_succeed() -> None:
    results = run_processes(join_and_leave_at_once, 4, timeout=90)
    for rank, (joins, leaves, warnings) in enumerate(results):
        # A join that raced a leave used to wait out the leaver's acknowledgement
        # (10 s); the host used to close the store under joins still in progress.
        assert max(joins) < 5, (rank, joins)
        assert not warnings, (rank, warnings)
        if rank == 0:
            # It outlasted the group: quiet for a second before it left.
            assert leaves[0] >= 1.0, leaves
        else:
            assert max(leaves) < 5, (rank, leaves)
