"""The thread bridge of the synchronous facade: the background event loop,
blocking waits on it, and torch futures completed from it.

Theory of operation
-------------------
A process started with the facade's ``init_rpc`` runs its agent on a daemon
thread of its own (:class:`LoopThread`, one per process, stopped by
``shutdown``). Every facade call is the async API's call run on that loop:

* a blocking call (``rpc_sync``, ``to_here``, ``backward``, ``step``) hands a
  coroutine to the loop in a copy of the caller's ``contextvars`` (so the
  current distributed autograd context travels) and waits for it
  (:func:`wait_for`);
* a non-blocking call (``rpc_async``) schedules its start on the loop and
  returns a :class:`Future` at once, completed on the loop thread when the
  call's ``asyncio.Future`` is (:func:`submit`).

Invariants:

* the loop thread itself never blocks on the loop: a blocking facade call made
  on it raises ``RuntimeError`` naming the async form, instead of deadlocking
  (another thread's event loop may block, as on any torch call);
* calls scheduled from one thread start on the loop in the order they were made;
* the bridge works on whatever agent is current, so plain remote functions of
  a process started with the async API may use the facade too.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import torch

from .. import api
from ..agent import RpcAgent
from ..errors import RpcError
from ..transport import new_event_loop

__all__ = [
    "Future",
    "LoopThread",
    "agent",
    "awaitable",
    "on_agent_loop",
    "submit",
    "timeout_of",
    "wait_all",
    "wait_for",
]

T = TypeVar("T")
log = logging.getLogger(__name__)


def on_agent_loop() -> bool:
    """True on the thread running this process's agent's event loop."""
    rpc_agent = api._agent
    return rpc_agent is not None and rpc_agent.on_loop_thread()


def _refuse_on_loop(what: str) -> None:
    # Only the agent's own loop: blocking it would deadlock. Another loop (a
    # notebook's, an application's) may block, as any torch call would.
    if on_agent_loop():
        raise RuntimeError(
            f"{what} blocks, and this thread runs the RPC agent's event loop (an "
            "async remote function, a callback on the loop): use the async API "
            "here (await rpc.rpc_async(...), await rref.to_here(), await fut)"
        )


def agent() -> RpcAgent:
    """This process's running agent (``RpcError`` if RPC is not initialised)."""
    return api.current_agent()


def timeout_of(timeout: float | None) -> float | None:
    """torch's timeout convention to ours: negative (torch's ``UNSET_RPC_TIMEOUT``,
    -1) or None is the default; 0 is no timeout in both."""
    if timeout is None or timeout < 0:
        return None
    return float(timeout)


def wait_for(make: Callable[[], Awaitable[T]], what: str = "this call") -> T:
    """Run the coroutine ``make()`` on the agent's loop, in a copy of this
    thread's contextvars, and block until it is done; its result or error.

    Raises:
        RuntimeError: this is the agent's loop thread (it would deadlock).
    """
    _refuse_on_loop(what)
    return agent().blocking(lambda: asyncio.ensure_future(make()))


class Future(torch.futures.Future[T]):
    """A ``torch.futures.Future`` completed by the agent.

    Everything torch's future offers works (``wait``, ``value``, ``then``,
    ``add_done_callback``, ``done``, ``torch.futures.wait_all`` and
    ``collect_all``). As in torch, callbacks run in the thread that completes
    the future: here a thread of the agent's pool when a callback was added
    through ``then``/``add_done_callback`` before the result came in (so a
    callback may compute, or make blocking calls), the loop thread otherwise
    (no hop: a thread blocked in ``wait()`` wakes at once). Two additions:
    ``wait()`` on the agent's loop thread raises ``RuntimeError`` instead of
    deadlocking when the result is not in yet, and the future is
    awaitable (``await fut`` in async code).
    """

    # True once a user callback is attached: completed from a pool thread then.
    has_callbacks = False

    def wait(self) -> T:
        """Block until the result is in; return it or raise its error.

        Raises:
            RuntimeError: not done yet and this is the agent's loop thread.
        """
        if not self.done():
            _refuse_on_loop("Future.wait()")
        return super().wait()

    def then(self, callback: Callable[[torch.futures.Future[T]], Any]) -> Any:
        """torch's ``then``: a new future of ``callback(self)``'s result."""
        self.has_callbacks = True
        return super().then(callback)

    def add_done_callback(self, callback: Callable[[torch.futures.Future[T]], None]) -> None:
        """torch's ``add_done_callback``: ``callback(self)`` once done."""
        self.has_callbacks = True
        super().add_done_callback(callback)

    def __await__(self) -> Generator[Any, None, T]:
        if not self.done():
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            # Not a user callback: cheap, fine on the completing thread.
            super().add_done_callback(functools.partial(_wake_soon, loop, waiter))
            yield from waiter.__await__()
        return super().wait()


_torch_wait_all = torch.futures.wait_all


def wait_all(futures: list[torch.futures.Future[Any]]) -> list[Any]:
    """``torch.futures.wait_all``, as the facade installs it: ends at the first
    failure among the futures, as torch's does for its RPC futures.

    torch's own waits for every future unless one carries an error of its C++
    future, which a Python-completed future (ours) cannot: a failed call
    would wait for the slowest other call. Lists without a facade future go
    to torch's own.

    Raises:
        the first failure's error; RuntimeError: on the agent's loop thread
        with a future not done yet (it would deadlock).
    """
    futures = list(futures)
    if not any(isinstance(f, Future) for f in futures):
        return _torch_wait_all(futures)
    if not all(f.done() for f in futures):
        _refuse_on_loop("torch.futures.wait_all()")
    finished = threading.Event()
    lock = threading.Lock()
    state: dict[str, Any] = {"left": len(futures), "failed": None}

    def settled(fut: torch.futures.Future[Any]) -> None:
        try:
            fut.value()
            failed = False
        except BaseException:
            failed = True
        with lock:
            state["left"] -= 1
            if failed and state["failed"] is None:
                state["failed"] = fut
            if failed or state["left"] == 0:
                finished.set()

    for fut in futures:
        # torch's own add_done_callback: not a user callback (no pool hop).
        torch._C.Future.add_done_callback(fut, settled)
    finished.wait()
    if state["failed"] is not None:
        state["failed"].wait()  # raises its error
    return [fut.wait() for fut in futures]


# Ported code calls torch.futures.wait_all on the facade's futures.
torch.futures.wait_all = wait_all


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake_soon(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None], _: object) -> None:
    """A torch future's callback (on whatever thread completed it): wake
    ``waiter`` on its loop."""
    loop.call_soon_threadsafe(_wake, waiter)


def complete(target: torch.futures.Future[Any], source: asyncio.Future[Any]) -> None:
    """Settle the torch future ``target`` like the done asyncio future ``source``."""
    if source.cancelled():
        target.set_exception(RpcError("the call was cancelled"))
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type, unused-ignore]
    else:
        target.set_result(source.result())


def _settle(target: Future[Any], source: asyncio.Future[Any]) -> None:
    """On the loop: settle ``target`` here, or in a pool thread if user
    callbacks will run (they may compute or block, as in torch's RPC threads)."""
    if target.has_callbacks:
        try:
            job = agent().run_in_executor(functools.partial(complete, target, source))
        except RpcError:  # the agent is closing: no pool left
            complete(target, source)
            return
        job.add_done_callback(functools.partial(_settled_in_pool, target, source))
    else:
        complete(target, source)


def _settled_in_pool(
    target: Future[Any], source: asyncio.Future[Any], job: asyncio.Future[Any]
) -> None:
    # The pool shut down before it ran the job: settle it here, never leave it.
    if not target.done():
        complete(target, source)
    elif not job.cancelled() and job.exception() is not None:
        log.error("a torch future callback raised", exc_info=job.exception())


def _start(start: Callable[[], asyncio.Future[T]], target: Future[T]) -> None:
    try:
        fut = start()
    except BaseException as exc:
        target.set_exception(exc)  # type: ignore[arg-type]
        return
    fut.add_done_callback(functools.partial(_settle, target))


# Futures handed to other threads by submit(): the loop settles them, or, if it
# closes first (stopped under them), LoopThread fails those still pending.
_unsettled: weakref.WeakSet[Future[Any]] = weakref.WeakSet()


def submit(start: Callable[[], asyncio.Future[T]]) -> Future[T]:
    """Run ``start`` on the agent's loop (now if this is the loop thread, else
    as soon as the loop gets to it, in a copy of this thread's contextvars) and
    return a :class:`Future` of the asyncio future it returns. Never blocks;
    an error raised by ``start`` settles the future."""
    rpc_agent = agent()
    target: Future[T] = Future()
    if rpc_agent.on_loop_thread():
        _start(start, target)
    else:
        _unsettled.add(target)  # failed if the loop ends first (LoopThread)
        ctx = contextvars.copy_context()
        try:
            rpc_agent.loop.call_soon_threadsafe(ctx.run, _start, start, target)
        except RuntimeError:  # the loop closed under us: shut down meanwhile
            raise RpcError("RPC agent is not running (shut down)") from None
    return target


def awaitable(fut: torch._C.Future[Any]) -> Future[Any]:
    """A :class:`Future` (awaitable) settled like the torch future ``fut``."""
    out: Future[Any] = Future()

    def transfer(done: torch._C.Future[Any]) -> None:
        try:
            value = done.wait()
        except BaseException as exc:
            out.set_exception(exc)  # type: ignore[arg-type, unused-ignore]
            return
        out.set_result(value)

    fut.add_done_callback(transfer)
    return out


class LoopThread:
    """An event loop (uvloop where installed) running on a daemon thread."""

    def __init__(self, name: str = "aiorpc-loop") -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Whatever the agent left (a Task between steps) is cancelled and
            # given a chance to finish, as asyncio.run does.
            tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            # What the closed loop never settled never will be: fail it, as
            # RpcAgent.blocking does for its callers.
            for fut in list(_unsettled):
                if not fut.done():
                    fut.set_exception(
                        RpcError(
                            "RPC agent shut down: its event loop closed before this call finished"
                        )
                    )

    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on this loop and block until it is done."""
        _refuse_on_loop("this call")

        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for its thread (``timeout`` seconds at most)."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return  # closed meanwhile
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
