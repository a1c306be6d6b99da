"""The agent's worker pool: results, errors, blocking jobs, thread use, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from aiorpc_autograd.pool import WorkerPool

pytestmark = pytest.mark.timeout(30)


async def test_results_and_errors() -> None:
    pool = WorkerPool(asyncio.get_running_loop(), 4, "t")
    assert await pool.run(lambda: 41 + 1) == 42
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 / 0)
    pool.shutdown()


async def test_stop_iteration_does_not_end_the_awaiting_coroutine() -> None:
    pool = WorkerPool(asyncio.get_running_loop(), 2, "t")

    def stop() -> None:
        raise StopIteration(5)

    with pytest.raises(RuntimeError, match="StopIteration") as info:
        await pool.run(stop)
    assert isinstance(info.value.__cause__, StopIteration)
    custom = WorkerPool(asyncio.get_running_loop(), 1, "t", raisable=lambda e: KeyError(repr(e)))
    with pytest.raises(KeyError, match="StopIteration"):
        await custom.run(stop)
    pool.shutdown()
    custom.shutdown()


async def test_thread_init_runs_once_on_each_thread_before_its_jobs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inited: list[int] = []
    pool = WorkerPool(
        asyncio.get_running_loop(), 3, "t", thread_init=lambda: inited.append(threading.get_ident())
    )
    gate = threading.Event()

    def job() -> bool:
        gate.wait(5)
        return threading.get_ident() in inited

    jobs = [pool.run(job) for _ in range(3)]  # each blocks: three threads
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.gather(*jobs) == [True, True, True]
    assert await pool.run(lambda: threading.get_ident() in inited)
    assert len(inited) == len(set(inited)) == pool.threads == 3
    pool.shutdown()

    def broken() -> None:
        raise OSError("no such library")

    failing = WorkerPool(asyncio.get_running_loop(), 1, "t", thread_init=broken)
    assert await failing.run(lambda: 7) == 7  # the thread still serves
    assert "thread_init failed" in caplog.text
    failing.shutdown()


async def test_callbacks_run_on_the_loop_thread() -> None:
    pool = WorkerPool(asyncio.get_running_loop(), 3, "t")
    loop_thread = threading.get_ident()
    seen: list[tuple[bool, int, bool]] = []
    all_done = asyncio.get_running_loop().create_future()

    def done(ok: bool, value: int) -> None:
        seen.append((ok, value, threading.get_ident() == loop_thread))
        if len(seen) == 200 and not all_done.done():
            all_done.set_result(None)

    for i in range(200):
        pool.submit(lambda i=i: (threading.get_ident() != loop_thread) * i, done)
    await all_done
    assert sorted(v for _, v, _ in seen) == list(range(200))
    assert all(ok and on_loop for ok, _, on_loop in seen)
    pool.shutdown()


async def test_sequential_jobs_reuse_one_thread() -> None:
    # Threads start on demand: one job at a time never needs a second thread.
    # (Bursts may wake spares, one per job taken while others wait: the price
    # of never letting a blocked job hold up the queue.)
    pool = WorkerPool(asyncio.get_running_loop(), 16, "t")
    for i in range(200):
        assert await pool.run(lambda i=i: i) == i
    assert pool.threads == 1
    results = await asyncio.gather(*(pool.run(lambda i=i: i) for i in range(500)))
    assert results == list(range(500)) and pool.threads <= 16
    pool.shutdown()


async def test_blocked_job_does_not_hold_up_the_queue() -> None:
    # The first job waits for an event only a later job sets: with a thread per
    # job (PyTorch's pool) this completes; a pool that ran the queue on one
    # thread would deadlock.
    pool = WorkerPool(asyncio.get_running_loop(), 4, "t")
    event = threading.Event()
    first = pool.run(lambda: event.wait(10))
    later = [pool.run(lambda: None) for _ in range(5)]
    setter = pool.run(event.set)
    assert await asyncio.wait_for(first, 5) is True
    await asyncio.gather(setter, *later)
    pool.shutdown()


async def test_at_most_max_threads() -> None:
    pool = WorkerPool(asyncio.get_running_loop(), 3, "t")
    running = 0
    peak = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    start = time.monotonic()
    await asyncio.gather(*(pool.run(job) for _ in range(9)))
    assert peak == 3 and pool.threads == 3
    assert time.monotonic() - start >= 0.14  # three rounds of three
    pool.shutdown()


async def test_shutdown_drops_queued_jobs_and_refuses_new_ones() -> None:
    pool = WorkerPool(asyncio.get_running_loop(), 1, "t")
    gate = threading.Event()
    ran: list[int] = []
    busy = pool.run(lambda: gate.wait(5))
    queued = pool.run(lambda: ran.append(1))
    await asyncio.sleep(0.05)
    pool.shutdown()
    gate.set()
    await asyncio.sleep(0.1)
    assert ran == []  # never started: failed instead
    with pytest.raises(RuntimeError, match="shut down"):
        await queued
    assert await busy is True  # the running job finished and reported
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None, lambda ok, v: None)
    deadline = time.monotonic() + 2
    while pool.threads and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert pool.threads == 0  # the threads left


async def test_exit_waits_for_running_jobs_only() -> None:
    # At interpreter exit (the atexit hook) idle threads leave and running jobs
    # are waited for: a thread killed inside a torch op would abort the process.
    pool = WorkerPool(asyncio.get_running_loop(), 3, "t")
    assert await asyncio.gather(*(pool.run(lambda: 1) for _ in range(3))) == [1, 1, 1]
    gate = threading.Event()
    busy = pool.run(lambda: gate.wait(5))
    await asyncio.sleep(0.05)
    assert not pool.join_at_exit(time.monotonic() + 0.2)  # the job still runs
    assert pool.threads == 1  # only its thread is left
    threading.Timer(0.2, gate.set).start()
    assert pool.join_at_exit(time.monotonic() + 5)
    assert pool.threads == 0
    assert await busy is True


async def test_busy_while_a_job_runs_or_waits() -> None:
    pool = WorkerPool(asyncio.get_running_loop(), 1, "t")
    assert not pool.busy
    gate = threading.Event()
    first = pool.run(lambda: gate.wait(5))
    second = pool.run(lambda: 2)
    assert pool.busy
    gate.set()
    assert await first is True and await second == 2
    await asyncio.sleep(0.01)
    assert not pool.busy
    pool.shutdown()
