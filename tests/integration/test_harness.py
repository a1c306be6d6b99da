"""The harness itself: results by rank, failures reported per rank, no hangs,
no orphans."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
import torch

import aiorpc_autograd as rpc
from tests.integration.harness import run_processes, run_workers, start_service

pytestmark = pytest.mark.timeout(60)


async def report_self(rank: int, world_size: int, factor: int) -> tuple[object, ...]:
    peer = (rank + 1) % world_size
    total = await rpc.rpc_async(peer, torch.add, args=(torch.tensor([rank]), factor))
    return rank, world_size, rpc.get_worker_info(), total, os.getpid(), sys.path


def test_run_workers_returns_results_by_rank() -> None:
    results = run_workers(report_self, 2, 10, timeout=45)
    assert [r[:3] for r in results] == [
        (0, 2, rpc.WorkerInfo("worker0", 0)),
        (1, 2, rpc.WorkerInfo("worker1", 1)),
    ]
    assert [r[3].tolist() for r in results] == [[10], [11]]
    pids = {r[4] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids
    # Spawned children see the repository root, so `tests` imports there.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert all(root in r[5] for r in results)


async def fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_failure_reports_each_rank() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_workers(fail_on_rank_one, 2, timeout=45, options_kwargs={"rpc_timeout": 1.0})
    text = str(info.value)
    assert "--- rank 1 raised:" in text
    assert "ValueError: boom on rank one" in text
    assert "fail_on_rank_one" in text  # the worker's traceback, not just the message
    assert "--- rank 0" in text
    assert time.monotonic() - started < 40


async def hang_forever(rank: int, world_size: int, init_method: str) -> None:
    await asyncio.sleep(3600)


def test_timeout_kills_every_worker() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match="killed at the timeout of 4"):
        run_processes(hang_forever, 2, timeout=4)
    # The autouse fixture checks that no child is left; the wait was bounded.
    assert time.monotonic() - started < 15


async def square_on(rank: int, world_size: int, x: int) -> tuple[int, int]:
    return rank, x * x


async def fail_with(rank: int, world_size: int, message: str) -> None:
    raise KeyError(message)


def test_service_group_runs_commands_until_stopped() -> None:
    group = start_service(2, timeout=45)
    try:
        assert group.call(1, square_on, 7) == (1, 49)
        assert group.call_all(square_on, 3) == [(0, 9), (1, 9)]
        with pytest.raises(AssertionError) as info:
            group.call(0, fail_with, "no such key here")
        assert "rank 0 raised in fail_with" in str(info.value)
        assert "KeyError: 'no such key here'" in str(info.value)
        # A failing command does not break the group.
        assert not group.broken
        assert group.call(0, square_on, 2) == (0, 4)
        assert group.stop(timeout=30) == [True, True]  # graceful shutdown on both
    finally:
        group.close()
