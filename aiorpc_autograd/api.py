"""The public functions of ``shared/API.md``: lifecycle, calls, introspection.

Thin by design: each finds this process's agent and delegates to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar, overload

from .agent import NOT_INITIALIZED, RpcAgent, register_function
from .autograd_service import AutogradService
from .errors import RpcError
from .membership import MembershipEvent
from .options import RpcOptions, WorkerInfo
from .rref import RRef, RRefService
from .tracing import Tracer
from .transport import new_event_loop

__all__ = [
    "current_agent",
    "get_debug_info",
    "get_rpc_timeout",
    "get_worker_info",
    "init_rpc",
    "register",
    "remote",
    "rpc_async",
    "rpc_sync",
    "run",
    "shutdown",
    "to_thread",
    "worker",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
WorkerRef = str | int | WorkerInfo

_agent: RpcAgent | None = None


def current_agent() -> RpcAgent:
    """This process's running agent.

    Raises:
        RpcError: ``init_rpc`` has not been called (or shutdown has).
    """
    agent = _agent
    if agent is None or not agent.running:
        raise RpcError(NOT_INITIALIZED)
    return agent


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the coroutine ``main`` on uvloop (asyncio's loop if uvloop is
    missing) and return its result: the usual entry point of a worker script."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


async def init_rpc(
    name: str,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    init_method: str | None = None,
    options: RpcOptions | None = None,
) -> WorkerInfo:
    """Start this process's agent on the running loop and join the group.

    Args:
        name: this worker's name, unique in the group.
        rank: this worker's rank (env:// reads RANK when None).
        world_size: the number of workers (env:// reads WORLD_SIZE when None).
        init_method: ``"tcp://HOST:PORT"`` (rank 0 hosts the store) or
            ``"env://"`` (the default).
        options: agent options.

    Returns:
        This worker's :class:`WorkerInfo`, once every worker is known.

    Raises:
        RuntimeError: an agent is already running in this process.
        ValueError: bad arguments, or ``name`` is used by another worker.
        RpcTimeoutError: the group did not assemble in time.
    """
    global _agent
    if _agent is not None and _agent.running:
        raise RuntimeError("RPC is already initialized in this process")
    agent = await RpcAgent.start(
        name,
        rank,
        world_size,
        init_method or "env://",
        options or RpcOptions(),
        services=(AutogradService.install, RRefService.install, Tracer.install),
    )
    _agent = agent
    return agent.info


async def shutdown(graceful: bool = True, timeout: float | None = None) -> None:
    """Stop this process's agent.

    Args:
        graceful: keep serving while waiting until every worker called shutdown
            and the whole group is quiescent (no request, RRef deletion or
            backward pass outstanding anywhere), then close; False fails every
            pending call with :class:`RpcError` and closes at once.
        timeout: bounds the whole wait in seconds; None or 0 (the default, as
            in torch): no limit, as long as the group works.

    Raises:
        RpcTimeoutError: the graceful wait timed out.
        ConnectionLostError: a peer died (no answer to heartbeats within the
            heartbeat timeout) or left without completing its own graceful
            shutdown.
        RpcError: the rendezvous store is unreachable.

    The agent is closed whatever the outcome; its peers first get a notice
    (``Goodbye``) saying why, so their calls still outstanding here fail with
    :class:`ConnectionLostError` naming this worker and the reason.
    """
    global _agent
    agent = _agent
    if agent is None:
        return
    try:
        await agent.shutdown(graceful, timeout)
    finally:
        if _agent is agent:
            _agent = None


@contextlib.asynccontextmanager
async def worker(
    name: str,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    init_method: str | None = None,
    options: RpcOptions | None = None,
    shutdown_timeout: float | None = None,
) -> AsyncIterator[WorkerInfo]:
    """``init_rpc`` on enter, graceful ``shutdown(timeout=shutdown_timeout)`` on
    exit (non-graceful when the body raised, so an error is not hidden behind a
    wait). ``shutdown_timeout`` None or 0: no limit."""
    info = await init_rpc(name, rank, world_size, init_method=init_method, options=options)
    try:
        yield info
    except BaseException:
        await shutdown(graceful=False)
        raise
    await shutdown(timeout=shutdown_timeout)


def get_worker_info(name: str | None = None) -> WorkerInfo:
    """The :class:`WorkerInfo` of worker ``name`` (this worker when None).

    Raises:
        ValueError: no worker of that name.
    """
    return current_agent().worker_info(name)


def get_rpc_timeout() -> float:
    """The default timeout of this worker's calls, in seconds (its options'
    ``rpc_timeout``; 0: none), as torch's ``rpc.get_rpc_timeout``."""
    return float(current_agent().options.rpc_timeout)


def _set_rpc_timeout(seconds: float) -> None:
    """Set this worker's default call timeout, in seconds (0: none), for the
    calls started from now on: torch's private ``rpc._set_rpc_timeout``, which
    ported tests and programs use.

    Raises:
        TypeError, ValueError: not a number of seconds >= 0.
    """
    current_agent().set_rpc_timeout(seconds)


def get_worker_infos() -> list[WorkerInfo]:
    """Every worker of the group now, by rank, this one included: in a dynamic
    group (``world_size=None``) its current members."""
    agent = current_agent()
    return agent.membership.members() if agent.membership else agent.all_workers()


def membership_events() -> AsyncIterator[MembershipEvent]:
    """The joins and leaves of this worker's dynamic group from now on, until
    it shuts down: ``async for event in rpc.membership_events(): ...``
    (:class:`MembershipEvent`: ``kind`` ``"join"``/``"leave"``, ``worker``,
    ``reason``). Each call is a stream of its own.

    Raises:
        ValueError: this worker's group is fixed-size (it has no changes).
    """
    agent = current_agent()
    if agent.membership is None:
        raise ValueError("a fixed-size group has no membership changes (init with world_size=None)")
    return agent.membership.events()


def get_debug_info() -> dict[str, int]:
    """This worker's counters: ``num_pending_requests`` (calls awaiting a reply),
    ``num_owner_rrefs``, ``num_user_rrefs``, ``num_connections`` and more."""
    return current_agent().debug_info()


@overload
def register(func: F, *, name: str | None = None) -> F: ...
@overload
def register(func: None = None, *, name: str | None = None) -> Callable[[F], F]: ...
def register(func: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Make ``func`` callable by name: ``rpc_async(to, "name", ...)``.

    Usable as ``@register``, ``@register(name="x")`` or ``register(f)``. The
    only way to call anything in safe mode (``allow_pickle=False``).

    Raises:
        ValueError: a different function is registered under that name.
    """

    def deco(f: F) -> F:
        register_function(name or getattr(f, "__name__", None) or repr(f), f)
        return f

    return deco(func) if func is not None else deco


@overload
def rpc_async(
    to: WorkerRef,
    func: Callable[..., Awaitable[T]],
    args: tuple[Any, ...] | list[Any] = ...,
    kwargs: dict[str, Any] | None = ...,
    timeout: float | None = ...,
) -> asyncio.Future[T]: ...
@overload
def rpc_async(
    to: WorkerRef,
    func: Callable[..., T] | str,
    args: tuple[Any, ...] | list[Any] = ...,
    kwargs: dict[str, Any] | None = ...,
    timeout: float | None = ...,
) -> asyncio.Future[T]: ...
def rpc_async(
    to: WorkerRef,
    func: Callable[..., Any] | str,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> asyncio.Future[T]:
    """Call ``func(*args, **kwargs)`` on worker ``to``.

    Sends the call at once and returns an ``asyncio.Future`` of the result, so
    many calls can be in flight. Must be called on the agent's loop.

    Args:
        to: the callee: a name, a rank or a :class:`WorkerInfo` (self included).
        func: a picklable callable or the name of a registered function.
        args: positional arguments.
        kwargs: keyword arguments.
        timeout: seconds; None: the options' ``rpc_timeout``; 0: no timeout.

    Raises:
        RuntimeError: called off the agent's event loop (use :func:`rpc_sync`).
        ValueError: unknown worker.
        TypeError: the call cannot be encoded.

    The future raises :class:`RemoteError` (the callee raised),
    :class:`RpcTimeoutError` or :class:`ConnectionLostError`.
    """
    return current_agent().call(to, func, args, kwargs, timeout)


@overload
def rpc_sync(
    to: WorkerRef,
    func: Callable[..., Awaitable[T]],
    args: tuple[Any, ...] | list[Any] = ...,
    kwargs: dict[str, Any] | None = ...,
    timeout: float | None = ...,
) -> T: ...
@overload
def rpc_sync(
    to: WorkerRef,
    func: Callable[..., T] | str,
    args: tuple[Any, ...] | list[Any] = ...,
    kwargs: dict[str, Any] | None = ...,
    timeout: float | None = ...,
) -> T: ...
def rpc_sync(
    to: WorkerRef,
    func: Callable[..., Any] | str,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """The blocking form of :func:`rpc_async`, for code off the event loop
    (a plain remote function, another thread). The caller's contextvars (its
    autograd context) travel with the call.

    Raises:
        RuntimeError: called on the agent's loop thread (it would deadlock).
    """
    agent = current_agent()
    return agent.blocking(lambda: agent.call(to, func, args, kwargs, timeout))


@overload
def remote(
    to: WorkerRef,
    func: Callable[..., Awaitable[T]],
    args: tuple[Any, ...] | list[Any] = ...,
    kwargs: dict[str, Any] | None = ...,
    timeout: float | None = ...,
) -> RRef[T]: ...
@overload
def remote(
    to: WorkerRef,
    func: Callable[..., T] | str,
    args: tuple[Any, ...] | list[Any] = ...,
    kwargs: dict[str, Any] | None = ...,
    timeout: float | None = ...,
) -> RRef[T]: ...
def remote(
    to: WorkerRef,
    func: Callable[..., Any] | str,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> RRef[T]:
    """Run ``func(*args, **kwargs)`` on ``to``, which owns the result; returns
    an :class:`RRef` to it at once.

    Errors creating the value surface at its next use (``to_here``, proxies)
    as :class:`RemoteError`, a creation timeout as :class:`RpcTimeoutError`.
    """
    agent = current_agent()
    service = RRefService.current()
    info = agent.worker_info(to)
    return agent.on_loop(lambda: service.remote(info, func, args, kwargs, timeout))


async def to_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run the plain function ``func(*args, **kwargs)`` in this worker's thread
    pool and return its result: the heavy parts of an ``async def`` remote
    function, so that the event loop keeps serving meanwhile.

    Like ``asyncio.to_thread``, but on the agent's pool (the threads that run
    plain remote functions, ``num_worker_threads`` of them) and with the
    caller's ``contextvars``: the current distributed autograd context is the
    caller's, so ``rpc_sync`` calls made by ``func`` are recorded in it, and
    the autograd graph ``func`` builds is the caller's graph.

    Raises:
        RpcError: RPC is not initialised.
        Exception: whatever ``func`` raised.
    """
    agent = current_agent()
    ctx = contextvars.copy_context()
    return await agent.run_in_executor(functools.partial(ctx.run, func, *args, **kwargs))
