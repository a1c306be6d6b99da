"""Where engine jobs and optimizer steps run (JobCosts): measured first in the
pool, inline on the loop while cheap, back to the pool when slow or when a
lock is taken; and on how many intra-op threads: the faster of one and the
thread's own count, tried on the kind's first runs."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Callable

import pytest
import torch

from aiorpc_autograd import autograd
from aiorpc_autograd.autograd import WouldBlock, hold_grads, no_waiting, take
from aiorpc_autograd.autograd_service import (
    INLINE_BELOW_IDLE_S,
    INLINE_BELOW_S,
    AutogradService,
    JobCosts,
    run_on_threads,
)
from aiorpc_autograd.options import WorkerInfo
from aiorpc_autograd.pool import WorkerPool

pytestmark = pytest.mark.timeout(30)


def _service_on_a_pool(loop: asyncio.AbstractEventLoop) -> tuple[AutogradService, WorkerPool]:
    """A service on a stand-in agent (unpinned, its pool counted busy) with a
    real two-thread pool."""
    pool = WorkerPool(loop, 2, "t")
    agent = types.SimpleNamespace(
        info=WorkerInfo("w", 0), loop=loop, run_in_executor=pool.run, pinned=False, pool_busy=True
    )
    return AutogradService(agent), pool  # type: ignore[arg-type]


def test_costs_inline_only_after_a_cheap_measurement() -> None:
    costs = JobCosts(inline_below=0.001, inline_below_idle=0.001)
    assert not costs.inline("k")  # never measured: the pool first
    costs.record("k", 0.0002)
    assert costs.inline("k")
    costs.record("k", 0.05)  # one slow run: back to the pool at once
    assert not costs.inline("k")
    for _ in range(30):  # fast runs earn it back gradually
        costs.record("k", 0.0001)
    assert costs.inline("k")
    costs.record("slow", 1.0)
    assert not costs.inline("slow")


def test_a_kind_keeps_the_faster_of_one_intra_op_thread_and_its_own() -> None:
    costs = JobCosts(inline_below=0.001, inline_below_idle=0.001)
    assert costs.one_thread("never run") is False  # the first run: its own threads
    for kind, one, own in (("small ops", 0.0004, 0.005), ("large ops", 0.004, 0.002)):
        costs.record(kind, 0.02)  # the first run (a warm-up) does not count
        tried = []
        for _ in range(JobCosts.TRIAL_RUNS):
            single = costs.one_thread(kind)
            tried.append(single)
            costs.record(kind, one if single else own, single)
        assert tried == [True, False, True, False]
        chosen = kind == "small ops"
        assert [costs.one_thread(kind) for _ in range(3)] == [chosen] * 3
        # The estimate restarts from the chosen setting's best run, not from
        # the warm-up: the small-ops kind is inline at once.
        assert costs.inline(kind) is chosen
        best = one if chosen else own
        costs.record(kind, 3 * best, chosen)  # a slow run still sends it to the pool,
        assert not costs.inline(kind) and costs.one_thread(kind) is chosen  # same threads
    # A run far off the chosen setting's best (a larger batch through the
    # same graph, say) tries both again, and the kind follows the new data.
    costs.record("small ops", 0.0004 * JobCosts.RETRY_FACTOR * 2, True)
    tried = []
    for _ in range(JobCosts.TRIAL_RUNS):
        single = costs.one_thread("small ops")
        tried.append(single)
        costs.record("small ops", 0.01 if single else 0.004, single)
    assert tried == [True, False, True, False]
    assert costs.one_thread("small ops") is False


def test_run_on_threads_sets_one_thread_for_the_job_only_and_only_here() -> None:
    own = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: dict[str, int] = {}
        started, finish = threading.Event(), threading.Event()

        def other() -> None:
            torch.get_num_threads()  # takes its count when it starts (as the pool's do)
            started.set()
            finish.wait(5)
            seen["other thread after"] = torch.get_num_threads()

        t = threading.Thread(target=other)
        t.start()
        assert started.wait(5)

        def job() -> int:
            seen["job"] = torch.get_num_threads()
            x = torch.randn(32, 64, requires_grad=True)
            (x @ torch.randn(64, 64)).relu().sum().backward()
            assert x.grad is not None
            return 7

        assert run_on_threads(True, job) == 7
        assert seen["job"] == 1 and torch.get_num_threads() == 2
        finish.set()
        t.join(5)
        assert seen["other thread after"] == 2
        assert run_on_threads(False, job) == 7 and seen["job"] == 2
        with pytest.raises(ZeroDivisionError):
            run_on_threads(True, lambda: 1 // 0)
        assert torch.get_num_threads() == 2  # restored after an error too
    finally:
        torch.set_num_threads(own)


async def test_run_job_runs_a_kind_on_the_threads_it_was_faster_on() -> None:
    """Through the service with a real pool: a job that is slower on several
    intra-op threads (as a graph of tiny products is on a busy host) runs on
    one after its trial, inline or in the pool; one that is faster on its
    threads keeps them."""
    loop = asyncio.get_running_loop()
    service, pool = _service_on_a_pool(loop)
    own = torch.get_num_threads()
    torch.set_num_threads(2)
    try:

        def job(slow_on: int) -> Callable[[], int]:
            def run() -> int:
                n = torch.get_num_threads()
                time.sleep(0.02 if n == slow_on else 0.002)  # far apart: a busy host
                return n

            return run

        for kind, slow_on, keeps in (("tiny ops", 2, 1), ("large ops", 1, 2)):
            seen = [await service.run_job(kind, job(slow_on)) for _ in range(8)]
            assert seen[: 1 + JobCosts.TRIAL_RUNS] == [2, 1, 2, 1, 2]
            assert seen[1 + JobCosts.TRIAL_RUNS :] == [keeps] * 3
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(own)
        pool.shutdown()


def test_take_never_waits_under_no_waiting() -> None:
    lock = threading.Lock()
    lock.acquire()
    with no_waiting(), pytest.raises(WouldBlock):
        take(lock)
    lock.release()
    with no_waiting():
        take(lock)  # free: taken
    assert lock.locked()
    lock.release()
    # hold_grads takes nothing when one of its tensors is busy.
    a, b = torch.zeros(1), torch.zeros(1)
    held, release = threading.Event(), threading.Event()

    def other() -> None:
        with hold_grads([b]):
            held.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    assert held.wait(5)
    with no_waiting(), pytest.raises(WouldBlock), hold_grads([a, b]):
        pass
    with hold_grads([a]):  # a was not kept
        pass
    release.set()
    t.join(5)


async def test_run_job_inline_when_cheap_pool_when_slow_or_locked() -> None:
    loop = asyncio.get_running_loop()
    service, pool = _service_on_a_pool(loop)
    loop_thread = threading.get_ident()

    def where() -> bool:
        return threading.get_ident() == loop_thread

    assert await service.run_job("cheap", where) is False  # measured in the pool
    assert await service.run_job("cheap", where) is True  # then inline
    assert service.job_costs.inline_runs == 1

    def slow() -> bool:
        time.sleep(0.01)
        return where()

    for _ in range(3):
        assert await service.run_job("slow", slow) is False

    # Errors of an inline job reach the awaiting caller.
    def boom() -> None:
        raise ValueError("x")

    service.job_costs.record("boom", 0.0)
    with pytest.raises(ValueError, match="x"):
        await service.run_job("boom", boom)

    # A cheap kind whose lock a pool thread holds runs in the pool, once the
    # lock is free, and only once.
    t = torch.zeros(1)
    runs: list[bool] = []

    def job() -> None:
        with hold_grads([t]):
            runs.append(where())

    service.job_costs.record("locked", 0.0)
    entered, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with hold_grads([t]):
            entered.set()
            leave.wait(5)

    holding = pool.run(holder)
    assert await asyncio.to_thread(entered.wait, 5)
    running = service.run_job("locked", job)
    await asyncio.sleep(0.05)
    assert not running.done()  # waits in the pool, not on the loop
    leave.set()
    await running
    await holding
    assert runs == [False]
    pool.shutdown()


def test_longer_jobs_run_inline_where_a_hop_buys_no_parallelism() -> None:
    """A 1 ms job kind runs inline on a worker confined to one CPU (the pool
    computes nothing in parallel with the loop there) and, unpinned, while the
    pool is idle; unpinned with the pool busy, only jobs under 200 us do."""
    agents = {
        pinned: types.SimpleNamespace(info=WorkerInfo("w", 0), loop=None, pinned=pinned)
        for pinned in (False, True)
    }
    seen = {}
    for pinned, agent in agents.items():
        costs = AutogradService(agent).job_costs  # type: ignore[arg-type]
        costs.record("engine", 0.001)
        costs.record("small", 0.0001)
        costs.record("long", 0.05)
        seen[pinned] = {
            busy: [costs.inline(k, pool_busy=busy) for k in ("small", "engine", "long")]
            for busy in (True, False)
        }
    assert seen == {
        False: {True: [True, False, False], False: [True, True, False]},
        True: {True: [True, True, False], False: [True, True, False]},
    }
    assert INLINE_BELOW_S == 200e-6 and INLINE_BELOW_IDLE_S == 10e-3


async def test_run_job_asks_whether_the_pool_is_busy() -> None:
    """The same 1 ms kind, unpinned: inline while the agent's pool is idle,
    in the pool while it runs another job."""
    loop = asyncio.get_running_loop()
    pool = WorkerPool(loop, 2, "t")

    class Agent:
        info = WorkerInfo("w", 0)
        pinned = False

        def __init__(self) -> None:
            self.loop = loop
            self.run_in_executor = pool.run

        @property
        def pool_busy(self) -> bool:
            return pool.busy

    service = AutogradService(Agent())  # type: ignore[arg-type]
    service.job_costs.record("engine", 0.001)
    loop_thread = threading.get_ident()

    def where() -> bool:
        return threading.get_ident() == loop_thread

    assert await service.run_job("engine", where) is True
    release = threading.Event()
    other = pool.run(lambda: release.wait(5))
    assert pool.busy
    assert await service.run_job("engine", where) is False
    release.set()
    assert await other is True
    assert not pool.busy
    assert await service.run_job("engine", where) is True
    pool.shutdown()


def test_grad_slots_are_held_per_tensor_and_all_or_nothing() -> None:
    # Two holders wait for each other only if they share a tensor: a long job
    # over some tensors never holds up one over others (a striped lock did,
    # by chance, for any two tensors whose identities fell on one stripe).
    tensors = [torch.zeros(1) for _ in range(300)]
    mine, others = tensors[:150], tensors[150:]
    held, release = threading.Event(), threading.Event()

    def long_job() -> None:
        with hold_grads(mine):
            held.set()
            release.wait(5)

    t = threading.Thread(target=long_job)
    t.start()
    try:
        assert held.wait(5)
        with no_waiting(), hold_grads(others):  # none shared: taken at once
            pass
        with no_waiting(), pytest.raises(WouldBlock), hold_grads([others[0], mine[-1]]):
            pass
        with no_waiting(), hold_grads([others[0]]):  # nothing was kept of the refusal
            pass
    finally:
        release.set()
        t.join(5)


def test_grad_slot_waiters_are_served_in_arrival_order() -> None:
    # A waiter over many tensors is not overtaken by later ones over some of
    # them (all-or-nothing alone would let a stream of small jobs starve it).
    a, b = torch.zeros(1), torch.zeros(1)
    order: list[str] = []
    first_in, first_out = threading.Event(), threading.Event()

    def holder() -> None:
        with hold_grads([a]):
            first_in.set()
            first_out.wait(5)

    def job(name: str, tensors: list[torch.Tensor]) -> None:
        with hold_grads(tensors):
            order.append(name)

    def waiters(n: int) -> None:
        deadline = time.monotonic() + 5
        while len(autograd._GRAD_SLOTS._waiting) < n and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(autograd._GRAD_SLOTS._waiting) == n

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert first_in.wait(5)
    threads.append(threading.Thread(target=job, args=("big", [a, b])))
    threads[1].start()
    waiters(1)
    # b is free, but the earlier waiter wants it: a later holder waits its turn.
    with no_waiting(), pytest.raises(WouldBlock), hold_grads([b]):
        pass
    threads.append(threading.Thread(target=job, args=("small", [b])))
    threads[2].start()
    waiters(2)
    first_out.set()
    for t in threads:
        t.join(5)
    assert order == ["big", "small"]
    assert not autograd._GRAD_SLOTS._waiting and not autograd._GRAD_SLOTS._held
