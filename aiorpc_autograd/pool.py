"""The agent's worker threads: run blocking jobs off the event loop, cheaply.

Theory of operation
-------------------
``loop.run_in_executor`` with a ``ThreadPoolExecutor`` costs, per job, a
concurrent future, a wake-up of a pool thread and one ``call_soon_threadsafe``
(an eventfd write and a loop wake-up) to carry the result back: tens of
microseconds of CPU on a call that does nothing. Here:

* Jobs wait in a deque. A job submitted while an awake thread is free to take
  it wakes nobody; otherwise one idle thread is woken (or a new one started,
  up to ``max_threads``).
* A thread keeps taking jobs until the deque is empty, and before it runs one
  while more are waiting with no other free thread awake, it wakes one more:
  a job that blocks (on I/O, a lock, a nested RPC) never holds up the jobs
  queued behind it for longer than a wake-up, as with a thread per job.
* Results go into a second deque; the first result of a batch schedules one
  drain on the loop, which hands every result gathered by then to its
  callback. Under load, one loop wake-up carries many results.

Callbacks run on the loop thread, in completion order. Threads are daemons,
but at interpreter exit the jobs still running are waited for (as
``concurrent.futures`` does for its pools): Python ends a daemon thread that
comes back from C++ code (a torch op) after finalisation began with a forced
unwind, which aborts the process ("terminate called without an active
exception"). A job stuck forever is waited for at exit, with a warning.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["StopError", "WorkerPool", "raisable"]

T = TypeVar("T")
log = logging.getLogger(__name__)
Done = Callable[[bool, Any], None]  # (ok, value or exception), on the loop


class StopError(RuntimeError):
    """Carries a ``StopIteration`` (or ``StopAsyncIteration``), which a future
    or a coroutine cannot carry: the original is its ``__cause__``."""


def raisable(exc: BaseException) -> BaseException:
    """``exc``, or a :class:`StopError` carrying it if no future can hold it."""
    if isinstance(exc, StopIteration | StopAsyncIteration):
        wrapped = StopError(f"job raised {type(exc).__name__}")
        wrapped.__cause__ = exc
        return wrapped
    return exc


class WorkerPool:
    """Threads running jobs for an event loop.

    Args:
        loop: where the results' callbacks run.
        max_threads: most threads (started on demand).
        name: thread name prefix.
        raisable: what :meth:`run`'s future raises for a job's exception (a
            future cannot carry ``StopIteration``: it would end the coroutine
            awaiting it).
        thread_init: called first on each new thread, before its first job.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_threads: int,
        name: str,
        raisable: Callable[[BaseException], BaseException] = raisable,
        thread_init: Callable[[], object] | None = None,
    ) -> None:
        self._loop = loop
        self._thread_init = thread_init
        self._raisable = raisable
        self._max = max_threads
        self._name = name
        self._jobs: collections.deque[tuple[Callable[[], Any], Done]] = collections.deque()
        self._results: collections.deque[tuple[Done, bool, Any]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._threads = 0
        self._idle = 0  # threads waiting for a job
        self._free = 0  # awake threads not running a job (about to take one)
        self._draining = False  # a drain of the results is scheduled on the loop
        self._closed = False
        _POOLS.add(self)

    @property
    def threads(self) -> int:
        """Threads alive (idle ones included until the pool is shut down)."""
        return self._threads

    @property
    def busy(self) -> bool:
        """Whether a job is running or waiting."""
        return self._threads - self._idle - self._free > 0 or bool(self._jobs)

    @property
    def idle(self) -> int:
        """Threads of ``max_threads`` not running a job (not yet started ones
        included): torch's ``agent.num_idle_threads``."""
        return max(0, self._max - (self._threads - self._idle - self._free))

    @property
    def name(self) -> str:
        """The thread name prefix."""
        return self._name

    def submit(self, fn: Callable[[], Any], done: Done) -> None:
        """Run ``fn()`` on a pool thread; then ``done(ok, value or exception)``
        on the loop. Call from the loop thread.

        Raises:
            RuntimeError: the pool is shut down.
        """
        if self._closed:
            raise RuntimeError("the worker pool is shut down")
        self._jobs.append((fn, done))
        # Unlocked first look: when it says a thread is free, that thread (or the
        # one that took another job instead) rechecks the deque under the lock
        # after it changes state, so the job is never stranded.
        if self._free == 0:
            with self._cond:
                if self._free == 0:
                    self._wake_locked()

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn()`` on a pool thread; a loop future of its result."""
        fut: asyncio.Future[T] = self._loop.create_future()

        def done(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(self._raisable(value))

        self.submit(fn, done)
        return fut

    def _wake_locked(self) -> None:
        # Wake an idle thread, else start one: either way a free thread.
        if self._idle:
            self._idle -= 1
            self._free += 1
            self._cond.notify()
        elif self._threads < self._max:
            self._threads += 1
            self._free += 1
            name = f"{self._name}_{self._threads - 1}"
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        if self._thread_init is not None:
            try:
                self._thread_init()
            except Exception:
                log.exception("%s: thread_init failed", threading.current_thread().name)
        jobs, cond = self._jobs, self._cond
        while True:
            with cond:
                while not jobs:
                    self._free -= 1
                    if self._closed:
                        self._threads -= 1
                        return
                    self._idle += 1
                    cond.wait()  # _wake_locked moves us back from idle to free
                fn, done = jobs.popleft()
                self._free -= 1
                if jobs and self._free == 0:
                    self._wake_locked()  # more waiting, nobody free: in case this one blocks
            try:
                result: tuple[Done, bool, Any] = (done, True, fn())
            except BaseException as exc:
                result = (done, False, exc)
            del fn, done
            with cond:
                # Free again before the result goes out: a job its callback
                # submits finds this thread (no second thread for a chain).
                self._free += 1
            self._results.append(result)
            del result
            if not self._draining:
                self._draining = True
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._draining = False
        results = self._results
        while results:
            done, ok, value = results.popleft()
            done(ok, value)

    def shutdown(self) -> None:
        """Fail the jobs not started (``done(False, RuntimeError)``, here) and
        let the threads exit; running jobs finish and report as usual. Call
        from the loop thread."""
        self._closed = True
        with self._cond:
            dropped = list(self._jobs)
            self._jobs.clear()
        for _, done in dropped:
            done(False, RuntimeError("the worker pool is shut down"))
        with self._cond:
            self._free += self._idle  # each woken thread counts itself out
            self._idle = 0
            self._cond.notify_all()

    def join_at_exit(self, deadline: float) -> bool:
        """Interpreter exit: stop the idle threads and wait until ``deadline``
        (``time.monotonic()``) for the running jobs. True when none is left.

        Jobs not started are dropped without their callbacks (the loop is gone).
        """
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._free += self._idle
            self._idle = 0
            self._cond.notify_all()
            while self._threads and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(deadline - time.monotonic(), 0.0)))
            return self._threads == 0


_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_EXIT_WARN_S = 5.0


@atexit.register
def _join_pools() -> None:
    pools = list(_POOLS)
    if not any(pool.threads for pool in pools):
        return
    warned = time.monotonic() + _EXIT_WARN_S
    for pool in pools:
        if not pool.join_at_exit(warned):
            log.warning(
                "exit waits for %d RPC job(s) still running in %s",
                pool.threads,
                pool.name,
            )
            pool.join_at_exit(float("inf"))
