"""The blocking calls of ``torch.distributed.rpc``, over the async API.

Each function here is the async API's function run on the agent's loop
(see :mod:`aiorpc_autograd.sync._bridge`); none re-implements a behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar, cast

import torch

from ... import api, codec
from ...agent import fresh_error
from ...errors import ConnectionLostError, RpcTimeoutError
from ...options import WorkerInfo
from ...rref import RRef as _AsyncRRef
from ...rref import RRefService, _creation_error, _dump, _load
from .._bridge import Future, LoopThread, agent, on_agent_loop, submit, timeout_of, wait_for
from .constants import DEFAULT_SHUTDOWN_TIMEOUT
from .options import BackendType, resolve_options

__all__ = [
    "RRef",
    "get_worker_info",
    "init_rpc",
    "remote",
    "rpc_async",
    "rpc_sync",
    "shutdown",
]

T = TypeVar("T")
WorkerRef = str | int | WorkerInfo
log = logging.getLogger(__name__)

# The loop thread of a process started with this facade's init_rpc.
_loop_thread: LoopThread | None = None
_lifecycle = threading.Lock()


def init_rpc(
    name: str,
    backend: Any = None,
    rank: int = -1,
    world_size: int | None = None,
    rpc_backend_options: Any = None,
) -> None:
    """Start this process's agent on a background event-loop thread and join
    the group; returns once every worker is known (torch's ``init_rpc``).

    Args:
        name: this worker's unique name.
        backend: None or ``BackendType.TENSORPIPE`` (torch's enum is accepted).
        rank: this worker's rank; -1 reads ``RANK`` (env://).
        world_size: the number of workers; None reads ``WORLD_SIZE`` (env://).
        rpc_backend_options: a :class:`TensorPipeRpcBackendOptions` (ours or
            torch's) or an :class:`aiorpc_autograd.RpcOptions`; its
            ``init_method`` (default ``env://``) says where to meet.

    Raises:
        RuntimeError: RPC is already initialized in this process.
        TypeError: ``backend`` is not a ``BackendType`` member, or the options
            are of no known type (torch's words).
        ValueError: another backend, bad arguments, a duplicate name (an
            ``InvalidArgumentError``, also a ``RuntimeError``: "is not unique").
        RpcTimeoutError: the group did not assemble in time.
    """
    global _loop_thread
    if backend is not None and not isinstance(backend, enum.Enum):
        raise TypeError(f"Argument backend must be a member of BackendType, not {backend!r}")
    if backend is not None and backend.name != BackendType.TENSORPIPE.name:
        raise ValueError(f"unsupported backend {backend!r}: only BackendType.TENSORPIPE")
    options, init_method = resolve_options(rpc_backend_options, backend)
    with _lifecycle:
        if _loop_thread is not None:
            raise RuntimeError("RPC is already initialized in this process")
        thread = LoopThread(f"aiorpc-loop-{name}")
        # Every RRef of this process is a facade RRef (blocking to_here...),
        # also those of the requests served as soon as the agent is up.
        RRefService.rref_class = RRef
        try:
            thread.run(
                api.init_rpc(
                    name,
                    None if rank is None or rank < 0 else rank,
                    world_size,
                    init_method=init_method,
                    options=options,
                )
            )
        except BaseException:
            RRefService.rref_class = _AsyncRRef
            thread.stop()
            raise
        _loop_thread = thread


def shutdown(graceful: bool = True, timeout: float = 0) -> None:
    """Stop this process's agent (torch's ``shutdown``).

    Graceful: keeps serving until every worker called shutdown and the group is
    quiescent; ``timeout`` bounds that wait in seconds, 0 (the default, as in
    torch) for no limit. Then stops the background loop started by ``init_rpc``.

    Raises:
        RpcTimeoutError: the graceful wait timed out (the agent is closed anyway).
        RuntimeError: called on the RPC agent's loop thread.
    """
    global _loop_thread
    with _lifecycle:
        thread = _loop_thread
        try:
            if api._agent is not None:
                limit = timeout if timeout and timeout > 0 else 0
                wait_for(lambda: api.shutdown(graceful, limit), "shutdown()")
        finally:
            if thread is not None:
                _loop_thread = None
                RRefService.rref_class = _AsyncRRef
                thread.stop()


def get_worker_info(worker_name: str | None = None) -> WorkerInfo:
    """The :class:`WorkerInfo` of ``worker_name`` (this worker when None)."""
    return api.get_worker_info(worker_name)


def _set_rpc_timeout(rpcTimeoutSeconds: float) -> None:  # torch's argument name
    """Set the default timeout of the calls started from now on, in seconds
    (torch's private ``rpc._set_rpc_timeout``; 0: none)."""
    api._set_rpc_timeout(rpcTimeoutSeconds)


def _get_debug_info() -> dict[str, int]:
    """This worker's counters (torch's private ``rpc._get_debug_info``): the
    union of the agent's (``_get_current_rpc_agent().get_debug_info()``), the
    RRef context's (:func:`_rref_context_get_debug_info`) and distributed
    autograd's (``dist_autograd._get_debug_info()``), whose keys are disjoint
    as torch's are."""
    agent_info, rref_info, autograd_info = _debug_info_parts()
    return agent_info | rref_info | autograd_info


_RREF_KEYS = frozenset(
    {"num_owner_rrefs", "num_user_rrefs", "num_pending_rref_children", "num_pending_rref_fetches"}
)
_AUTOGRAD_KEYS = frozenset({"num_autograd_contexts", "num_current_backward_passes"})


def _debug_info_parts() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(agent, RRef context, autograd) counters, each under torch's names as
    well as the async API's (:func:`aiorpc_autograd.get_debug_info`)."""
    full = api.get_debug_info()
    service = RRefService.current()
    rref_info = {k: v for k, v in full.items() if k in _RREF_KEYS}
    rref_info |= service.agent.on_loop(service.torch_debug_info)
    autograd_info = {k: v for k, v in full.items() if k in _AUTOGRAD_KEYS}
    agent_info = {k: v for k, v in full.items() if k not in _RREF_KEYS | _AUTOGRAD_KEYS}
    agent_info |= {
        "agent.num_pending_requests": full["num_pending_requests"],
        "agent.thread_pool_size": full["num_worker_threads"],
        "agent.num_idle_threads": full["num_idle_worker_threads"],
    }
    return agent_info, rref_info, autograd_info


def _rref_context_get_debug_info() -> dict[str, int]:
    """torch's private ``rpc._rref_context_get_debug_info()``, torch's keys:
    ``num_owner_rrefs`` (owner RRefs shared with other workers: a local
    ``RRef(value)`` counts once shared, as in torch), ``num_forks`` (their
    references known to this owner), ``num_pending_futures`` (references that
    arrived before their value's creation), ``num_pending_users``
    (references not yet confirmed by their owner); also the async API's
    ``num_user_rrefs``, ``num_pending_rref_children`` and
    ``num_pending_rref_fetches``.

    Raises:
        RpcError: RPC has not been initialized in this process.
    """
    return _debug_info_parts()[1]


class RpcAgent:
    """What ``_get_current_rpc_agent()`` gives: torch's agent methods that
    programs and tests use, over this process's agent. torch's names:
    ``rpc.RpcAgent``, and ``rpc.TensorPipeAgent`` the type of the agent
    (the only backend's); neither is made by hand."""

    __slots__ = ()

    def get_worker_info(self, worker_name: str | None = None) -> WorkerInfo:
        """The :class:`WorkerInfo` of ``worker_name`` (this worker when None)."""
        return api.get_worker_info(worker_name)

    def get_worker_infos(self) -> list[WorkerInfo]:
        """Every worker of the group, by rank, this one included."""
        return api.get_worker_infos()

    def get_debug_info(self) -> dict[str, int]:
        """The agent's counters, under torch's names (``agent.thread_pool_size``,
        ``agent.num_pending_requests``, ``agent.num_idle_threads``) and the
        async API's (``num_pending_requests``, ``num_connections``...)."""
        return _debug_info_parts()[0]


class TensorPipeAgent(RpcAgent):
    """torch's name of its agent's type: this process's agent, as
    ``_get_current_rpc_agent()`` gives it."""

    __slots__ = ()


def _get_current_rpc_agent() -> TensorPipeAgent:
    """torch's private ``rpc.api._get_current_rpc_agent()``, for its
    ``get_worker_infos()`` (every worker of the group), ``get_worker_info``
    and ``get_debug_info``.

    Raises:
        RpcError: RPC has not been initialized in this process.
    """
    api.current_agent()
    return TensorPipeAgent()


def _args(args: Any) -> tuple[Any, ...]:
    return tuple(args) if args is not None else ()


def rpc_sync(
    to: WorkerRef,
    func: Callable[..., Any] | str,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = -1.0,
) -> Any:
    """Call ``func(*args, **kwargs)`` on ``to`` and block for its result.

    ``timeout``: seconds; negative (the default) for the options'
    ``rpc_timeout``; 0 for none.

    Raises:
        RemoteError: the callee raised (also an instance of a built-in type).
        RpcTimeoutError, ConnectionLostError: as the async API.
        RuntimeError: called on the RPC agent's loop thread.
    """
    if on_agent_loop():
        raise RuntimeError(
            "rpc_sync blocks, and this thread runs the RPC agent's event loop: "
            "await rpc_async(...) here"
        )
    return api.rpc_sync(to, func, _args(args), kwargs, timeout_of(timeout))


def rpc_async(
    to: WorkerRef,
    func: Callable[..., Any] | str,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = -1.0,
) -> Future[Any]:
    """Send the call and return a torch future of its result at once.

    The future works with ``wait()``, ``then()``, ``add_done_callback()``,
    ``torch.futures.wait_all`` / ``collect_all``, and ``await``.

    Raises:
        ValueError: unknown worker (at once); encoding errors and the call's
            own errors arrive through the future.
    """
    rpc_agent = agent()
    info = rpc_agent.worker_info(to)
    call_args, limit = _args(args), _limit(timeout)
    fut = submit(lambda: rpc_agent.call(info, func, call_args, kwargs, limit))
    waited = getattr(_thread_local_var, "future_list", None)
    if waited is not None:
        waited.append(fut)
    return fut


def _limit(timeout: float | None) -> float:
    """torch's timeout argument as seconds, the default read now: a call
    started here (on the loop, a moment later) keeps the default of the
    moment it was made, whatever ``_set_rpc_timeout`` does meanwhile."""
    limit = timeout_of(timeout)
    return agent().options.rpc_timeout if limit is None else limit


def remote(
    to: WorkerRef,
    func: Callable[..., Any] | str,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    timeout: float = -1.0,
) -> RRef[Any]:
    """Run ``func(*args, **kwargs)`` on ``to``, which owns the result; an
    :class:`RRef` to it at once."""
    rref = api.remote(to, func, _args(args), kwargs, timeout_of(timeout))
    # A facade RRef in a process started with init_rpc above (the async API's
    # in one started with the async API, whose code awaits its RRefs).
    return cast("RRef[Any]", rref)


class RRef(_AsyncRRef[T], Generic[T]):
    """torch's ``RRef``: ``RRef(value)`` wraps a local value; RRefs from
    ``remote`` and received in arguments are of this type in a process started
    with the facade.

    Calls that talk to the owner block (torch's semantics), except on the
    agent's loop thread, where they return an awaitable, so that
    ``await rref.to_here()`` keeps working in ``async def`` remote functions
    and in the library's own code.
    """

    __slots__ = ("_value_type",)

    def _get_type(self, timeout: float | None = -1.0, blocking: bool = True) -> Any:
        """The type of the referenced value (torch's private ``RRef._get_type``):
        on the owner ``type(local_value())``; on a user fetched from the owner
        by one call, the first time only (then kept, as torch's). With
        ``blocking=False``, a torch future of it (a completed one once known).

        Raises:
            RpcTimeoutError: the fetch (or the value's creation) timed out.
            RemoteError: creating the value failed on the owner.
        """
        known = getattr(self, "_value_type", None)
        if known is None and self.is_owner():
            known = type(self.local_value())
        if known is not None:
            if blocking:
                return known
            done: Future[Any] = Future()
            done.set_result(known)
            return done

        rpc_agent, owner, limit = agent(), self.owner(), _limit(timeout)

        def keep(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self._value_type = fut.result()

        def start() -> asyncio.Future[Any]:
            fut = rpc_agent.call(owner, _type_of_value, (self,), None, limit)
            fut.add_done_callback(keep)
            return fut

        # (not a then(): a callback's error would arrive as RuntimeError, and
        # the owner's error, a ValueError say, must arrive as itself)
        fetched = submit(start)
        return fetched.wait() if blocking else fetched

    def _get_future(self) -> Future[None]:
        """The future of this RRef's creation by ``remote`` (torch's private
        ``RRef._get_future``): done once the owner ran the function, with the
        call's error if it failed or timed out; a done one for an RRef made
        otherwise (``RRef(value)``, received in a message)."""

        creation = self._creation  # set once, when remote() made it
        if creation is None:
            done: Future[None] = Future()
            done.set_result(None)
            return done

        def start() -> asyncio.Future[None]:
            created: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def settle(fut: asyncio.Future[Any]) -> None:
                error = _creation_error(fut)
                if error is None:
                    created.set_result(None)
                else:
                    created.set_exception(fresh_error(error))

            creation.add_done_callback(settle)
            return created

        return submit(start)

    def to_here(self, timeout: float | None = -1.0) -> Any:  # type: ignore[override, unused-ignore]
        """A copy of the value (the value itself on the owner); blocks.

        Raises:
            RemoteError: creating the value failed on the owner.
            RpcTimeoutError: creation or fetch timed out.
        """
        self._check_usable("to_here()")
        limit = timeout_of(timeout)
        base = super().to_here
        if on_agent_loop():
            return base(limit)
        return wait_for(lambda: base(limit), "RRef.to_here()")

    # local_value(): the base's (off the agent's loop thread it waits for a
    # value still being created by ``remote``, as torch's does).

    def backward(  # type: ignore[override, unused-ignore]
        self, dist_autograd_ctx_id: int = -1, retain_graph: bool = False
    ) -> Any:
        """Run backward from the referenced scalar on its owner; blocks.

        ``dist_autograd_ctx_id`` -1 runs local autograd on the owner."""
        base = super().backward
        if on_agent_loop():
            return base(dist_autograd_ctx_id, retain_graph)
        return wait_for(lambda: base(dist_autograd_ctx_id, retain_graph), "RRef.backward()")

    def rpc_async(self, timeout: float | None = -1.0) -> Any:
        """A proxy: ``rref.rpc_async().method(*args)`` calls ``method`` of the
        owner's value and returns a torch future of the result."""
        return _AsyncProxy(super().rpc_async(_limit(timeout)))

    def rpc_sync(self, timeout: float | None = -1.0) -> Any:
        """A proxy whose method calls block for the result."""
        return super().rpc_sync(timeout_of(timeout))

    def remote(self, timeout: float | None = -1.0) -> Any:
        """A proxy whose method calls return an :class:`RRef` to the result.

        As torch's, a method the value's type lacks raises ``AttributeError``
        at once (the type is fetched once: :meth:`_get_type`), where the
        RRef it would return could only fail later. On the agent's loop
        thread (it cannot wait for the type) the check is left to the owner.
        """
        proxy = super().remote(timeout_of(timeout))
        return proxy if on_agent_loop() else _CheckedProxy(proxy, self, timeout)


def _type_of_value(rref: RRef[Any]) -> type:
    """On the owner (a pool thread: waits for a value still being created)."""
    return type(rref.local_value())


class _CheckedProxy:
    """A ``remote()`` proxy that looks the method up on the value's type
    first, as torch's does."""

    __slots__ = ("_proxy", "_rref", "_timeout")

    def __init__(self, proxy: Any, rref: RRef[Any], timeout: float | None) -> None:
        self._proxy, self._rref, self._timeout = proxy, rref, timeout

    def __getattr__(self, name: str) -> Any:
        value_type = self._rref._get_type(self._timeout)
        # torch skips ScriptModules (their methods are not the type's attributes)
        if not issubclass(value_type, torch.jit.ScriptModule):
            getattr(value_type, name)  # AttributeError: "... has no attribute '<name>'"
        return getattr(self._proxy, name)


class _AsyncProxy:
    """Wraps the async API's proxy: its calls' asyncio futures become torch futures."""

    __slots__ = ("_proxy",)

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy

    def __getattr__(self, name: str) -> Callable[..., Future[Any]]:
        proxy = self._proxy

        def method(*args: Any, **kwargs: Any) -> Future[Any]:
            start = getattr(proxy, name)
            return submit(lambda: start(*args, **kwargs))

        method.__name__ = name
        return method


# Facade RRefs travel exactly as the async API's do.
codec.register_persistent(RRef, "RRef", _dump, _load)


# -- torch's private helpers over RPC: _wait_all, _all_gather, _barrier -------

# ``future_list``: the futures rpc_async made in this thread inside _wait_all.
_thread_local_var = threading.local()


@contextlib.contextmanager
def _wait_all() -> Iterator[None]:
    """torch's private ``rpc.api._wait_all()``: the futures ``rpc_async``
    returns in this thread inside the block are waited for at its end (the
    first failure raises; ``torch.futures.wait_all``)."""
    _thread_local_var.future_list = []
    try:
        yield
    finally:
        try:
            torch.futures.wait_all(_thread_local_var.future_list)
        finally:
            del _thread_local_var.future_list


class _Gather:
    """One ``_all_gather`` round of this process: the objects (every
    worker's, on the leader; then the leader's map, on a follower) and the
    signal that they are all there."""

    __slots__ = ("objects", "proceed")

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.proceed = threading.Event()


_gather_lock = threading.Lock()
_gather_rounds: dict[str, int] = {}  # the names of a group -> rounds started
_gathers: collections.defaultdict[str, _Gather] = collections.defaultdict(_Gather)


def _gather_to_leader(round_id: str, worker_name: str, obj: Any, names: frozenset[str]) -> None:
    """On the leader (a pool thread): ``worker_name``'s object of ``round_id``."""
    with _gather_lock:
        gather = _gathers[round_id]
        if worker_name in gather.objects:
            raise RuntimeError(f"{worker_name} reported _all_gather round {round_id} twice")
        gather.objects[worker_name] = obj
        if names == gather.objects.keys():
            gather.proceed.set()


def _broadcast_to_followers(round_id: str, objects: dict[str, Any]) -> None:
    """On a follower: the leader's map of ``round_id``."""
    with _gather_lock:
        gather = _gathers[round_id]
    if gather.proceed.is_set():
        raise RuntimeError(f"_all_gather round {round_id} was answered twice")
    gather.objects = objects
    gather.proceed.set()


def _wait_for_round(gather: _Gather, leader: str, limit: float | None) -> None:
    """Wait for ``gather``'s signal (on the leader: every object arrived; on
    a follower: the map did): at most ``limit`` seconds (None: no limit),
    and not past the leader's loss."""
    rpc_agent = agent()
    leader_id = rpc_agent.worker_info(leader).id
    deadline = None if limit is None else time.monotonic() + limit
    while not gather.proceed.wait(0.05):
        if rpc_agent.peer_gone(leader_id):
            raise ConnectionLostError(f"_all_gather: the leader {leader!r} is gone")
        if deadline is not None and time.monotonic() >= deadline:
            raise RpcTimeoutError(f"timed out in _all_gather after {limit:.2f} seconds")


def _all_gather(
    obj: Any, worker_names: Iterable[str] | None = None, timeout: float = -1.0
) -> dict[str, Any]:
    """torch's private ``rpc.api._all_gather``: every named worker's ``obj``
    (worker name -> object), on each of them. The worker whose name sorts
    first gathers and sends the map to the others. ``worker_names``: the
    group when None; ``timeout``: the calls' (the default: the default
    timeout, and no limit on waiting for the others; 0: no limit at all).

    Raises:
        RpcTimeoutError: a call (or, with a timeout, the wait) took too long.
        RuntimeError: on the leader, "Followers [...] timed out in _all_gather
            after T seconds" (torch's words) when the map did not reach them.
        ConnectionLostError: the leader is gone (once this worker's agent
            knows: like torch's, a follower that is done calling the leader
            does not watch it).
    """
    if on_agent_loop():
        raise RuntimeError("_all_gather blocks, and this thread runs the RPC agent's event loop")
    names = frozenset(worker_names or (w.name for w in api.get_worker_infos()))
    leader, me = min(names), api.get_worker_info().name
    key = ",".join(sorted(names))  # names hold no comma
    with _gather_lock:
        round_no = _gather_rounds.get(key, 0)
        _gather_rounds[key] = round_no + 1
    round_id = f"{key}#{round_no}"
    if timeout < 0:
        rpc_timeout, wait_limit = _limit(None), None
    else:
        rpc_timeout = timeout
        wait_limit = timeout or None
    try:
        if me == leader:
            _gather_to_leader(round_id, me, obj, names)
        else:
            rpc_sync(leader, _gather_to_leader, (round_id, me, obj, names), timeout=rpc_timeout)
        with _gather_lock:
            gather = _gathers[round_id]
        _wait_for_round(gather, leader, wait_limit)
        if me == leader:
            futures = {
                name: rpc_async(
                    name, _broadcast_to_followers, (round_id, gather.objects), timeout=rpc_timeout
                )
                for name in sorted(names - {leader})
            }
            errors = []
            for name, fut in futures.items():
                try:
                    fut.wait()
                except RuntimeError as exc:
                    errors.append((name, exc))
            if errors:
                raise RuntimeError(
                    f"Followers {[name for name, _ in errors]} timed out in _all_gather "
                    f"after {rpc_timeout:.2f} seconds. The first exception is {errors[0][1]}"
                )
        return gather.objects
    finally:
        with _gather_lock:
            _gathers.pop(round_id, None)


def _barrier(worker_names: Iterable[str]) -> None:
    """torch's private ``rpc.api._barrier``: return once every named worker
    called it (an :func:`_all_gather` of nothing). A failure is logged, not
    raised, as torch's is."""
    try:
        _all_gather(None, set(worker_names))
    except RuntimeError:
        log.exception("Failed to complete barrier")


def _wait_all_workers(timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    """torch's private ``rpc.api._wait_all_workers``: return once every worker
    of the group called it (an :func:`_all_gather` of nothing; ``timeout`` 0:
    no limit). The facade's graceful ``shutdown`` has its own protocol and does
    not call it.

    Raises:
        RpcTimeoutError, RuntimeError: as :func:`_all_gather` (also logged).
    """
    try:
        _all_gather(None, timeout=timeout)
    except RuntimeError:
        log.exception("Failed to respond to 'Shutdown Proceed' in time")
        raise
