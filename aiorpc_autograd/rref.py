"""Remote references: ownership, the fork protocol, proxies and backward.

Theory of operation
-------------------
An RRef names a value that lives on its *owner*. Ids are ``(worker id,
counter)`` pairs: ``rref_id`` names the value (its first half is the worker
that created the reference: the caller of ``remote()``, or the owner of an
``RRef(value)``), ``fork_id`` one user's reference to it. The owner keeps an
entry per value with the fork ids it knows (and which worker holds each, where
known) and the number of live owner-side handles; it frees the value exactly
when both are empty. Every other worker holds :class:`RRef` handles ("users"),
each with its fork id; when one is garbage-collected, the owner is told
(``RRefUserDelete``).

Passing an RRef in a payload *forks* it (PyTorch's protocol):

* the owner forks: it registers the child's fork id at once (early
  registration); the child is confirmed on arrival;
* a user forks: it keeps the RRef alive as a *pending child* until the child
  confirms; the child sends ``RRefForkRequest`` to the owner, and after the
  owner's ack, ``RRefChildAccept`` to the parent, which drops its hold -- so a
  fork in flight never lets the owner free the value, even if the parent
  drops its own reference meanwhile;
* a user sends it to the owner: the owner resolves it to its own value. In a
  request on the user's own connection (``rpc_async``, ``remote``), the user
  names its own fork and holds nothing: its ``RRefUserDelete`` of that fork
  can only travel behind the request, every handler decodes a request's
  arguments as its frame arrives, and the owner handle made then keeps the
  value. Elsewhere (in a response, which travels on the other connection) it
  sends a phantom fork id and keeps the RRef as a pending child until the
  owner, which does not know that fork, sends ``RRefChildAccept`` (PyTorch's
  protocol does this in both cases: one more message and answer each way).

A user's delete waits until it is confirmed. A graceful shutdown sends the
deletes of every live user RRef and waits for them.

Creation, waiting and failure
-----------------------------
The creator's ``remote()`` request registers the entry synchronously on
arrival, so every later message of the creator (which travels on the same
connection, in order) finds it. A reference from a third worker can overtake
the creation request: the owner then keeps a *placeholder* entry that waits
for the creation at most ``rpc_timeout`` (the creating request's default
timeout; at most a short grace when the creator itself sent the reference),
or until the creator is gone, and then fails with a typed error -- an owner
never waits unboundedly for a value nobody is creating. Fetches and RRef
backward requests that wait for a value count against the requesting peer's
``max_pending_fetches_per_peer`` and end when that peer's connection is lost;
entries created on behalf of a peer count against its
``max_owner_rrefs_per_peer``.

A call that receives an owner RRef whose value is still being created does not
start before the value exists (it fails with the creation's error): no pool
thread is parked waiting for another pool job, and ``local_value()`` works in
it even on the event loop. ``local_value()`` itself waits off the loop.

On the creator, the outcome of ``remote()`` decides first: once it failed
(timeout, lost connection, injected failure, the function raised),
``to_here``, proxies and ``backward`` raise that error at once without
sending anything. When a peer is declared gone (``agent.peer_gone_hooks``),
RRefs it owns raise ``ConnectionLostError`` naming it, and the forks it held
are released on this owner.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from . import codec
from .agent import (
    NO_AGENT_FOR_RREF,
    RpcAgent,
    fresh_error,
    outcome,
    sending_to,
    serving_connection,
    wait_before_call,
)
from .autograd import current_context_id
from .codec import (
    Message,
    PythonRemoteCall,
    RemoteRet,
    RRefAck,
    RRefBackwardReq,
    RRefBackwardResp,
    RRefChildAccept,
    RRefFetchCall,
    RRefFetchRet,
    RRefForkRequest,
    RRefUserDelete,
)
from .errors import ConnectionLostError, RpcError, RpcTimeoutError
from .options import WorkerInfo
from .transport import retrieve_error

__all__ = ["RRef", "RRefService"]

log = logging.getLogger(__name__)
T = TypeVar("T")

Id = tuple[int, int]

# A reference sent by the creator itself can only find no entry if its
# creation request was lost (one connection delivers in order); this grace
# covers the creation's handler being scheduled a little later than the
# reference's (wrapped under autograd, say).
_IN_ORDER_GRACE_S = 1.0

_USER_LOCAL_BACKWARD = (
    "User RRefs require 'dist_autograd_ctx_id' to be specified: local autograd "
    "(-1) runs on the owner only"
)
_UNKNOWN = -1  # the worker holding a fork, or charged for an entry: not known / none


def _id(pair: list[int] | tuple[int, int]) -> Id:
    return (int(pair[0]), int(pair[1]))


def _id_str(rref_id: Id) -> str:
    """An id in torch's words."""
    return f"GloballyUniqueId(created_on={rref_id[0]}, local_id={rref_id[1]})"


@dataclass(eq=False)
class _OwnerEntry:
    """The owner's record of one value."""

    value: asyncio.Future[Any]
    # fork id -> the worker holding it (_UNKNOWN for a fork the owner sent)
    forks: dict[Id, int] = field(default_factory=dict)
    handles: int = 0
    peer: int = _UNKNOWN  # the worker charged for it (max_owner_rrefs_per_peer)
    # A placeholder: a reference arrived before the creation request, which
    # it waits for until ``expiry`` (None: no time limit, rpc_timeout=0).
    placeholder: bool = False
    expiry: asyncio.TimerHandle | None = None


class RRef(Generic[T]):
    """A reference to a value owned by some worker.

    ``RRef(value)`` wraps a local value (this worker owns it). RRefs returned
    by ``rpc.remote`` or received in arguments and results refer to a value
    elsewhere (or here). See ``shared/API.md``, section RRef.
    """

    __slots__ = (
        "__weakref__",
        "_confirmed",
        "_creation",
        "_deleted",
        "_fork_id",
        "_owner",
        "_rref_id",
        "_service",
    )

    def __init__(self, value: T) -> None:
        service = RRefService.current()
        self._service = service
        self._owner = service.agent.info
        self._rref_id = service.new_id()
        self._fork_id = self._rref_id
        self._confirmed = True
        self._creation: asyncio.Future[None] | None = None
        self._deleted = False
        service.agent.on_loop(lambda: service.own(self, value))

    @classmethod
    def _make(
        cls,
        service: RRefService,
        owner: WorkerInfo,
        rref_id: Id,
        fork_id: Id,
        confirmed: bool,
    ) -> RRef[Any]:
        # The facade (aiorpc_autograd.sync) makes its own subclass the type of
        # every RRef of a process it started.
        self: RRef[Any] = cls.__new__(service.rref_class)
        self._service = service
        self._owner = owner
        self._rref_id = rref_id
        self._fork_id = fork_id
        self._confirmed = confirmed
        self._creation = None
        self._deleted = False
        if owner.id == service.agent.info.id:
            service.add_owner_handle(self)
        else:
            service.add_user(self)
        return self

    def _check_usable(self, what: str) -> None:
        """A user RRef outlives its agent as a dead handle, as in torch.

        Raises:
            RpcError: this worker's RPC is shut down and this is a user RRef
                (torch's words: "Cannot call to_here() on it after deletion").
        """
        if not self._service.agent.running and not self.is_owner():
            raise RpcError(
                f"{self!r} has been deleted. Cannot call {what} on it after deletion "
                "(this worker's RPC is shut down)"
            )

    def __repr__(self) -> str:
        # torch's words (PyRRef.__str__ and __repr__)
        if self.is_owner():
            return f"OwnerRRef({_id_str(self._rref_id)})"
        return f"UserRRef(RRefId = {_id_str(self._rref_id)}, ForkId = {_id_str(self._fork_id)})"

    def __del__(self) -> None:
        try:
            service = self._service
        except AttributeError:
            return  # construction failed
        service.handle_dropped(self)

    # -- API -----------------------------------------------------------------

    def owner(self) -> WorkerInfo:
        """The owner's :class:`WorkerInfo`."""
        return self._owner

    def owner_name(self) -> str:
        """The owner's name."""
        return self._owner.name

    def is_owner(self) -> bool:
        """True on the owner."""
        return self._owner.id == self._service.agent.info.id

    def confirmed_by_owner(self) -> bool:
        """True once the owner knows of this reference."""
        return self.is_owner() or self._confirmed

    def local_value(self) -> T:
        """The value, on the owner only.

        Off the event loop (a plain remote function in the pool, a user
        thread) it waits for a value still being created, as torch does; on
        the loop thread it returns a value that exists and never blocks.

        Raises:
            RuntimeError: not the owner; or on the loop thread, the value is
                not created yet (use ``await rref.to_here()`` there).
            Exception: creating the value failed (its error).
        """
        if not self.is_owner():
            ids = f"rref_id={_id_str(self._rref_id)}, fork_id={_id_str(self._fork_id)}"
            raise RuntimeError(
                f"For UserRRef({ids}), can't call localValue() on user "
                f"{self._service.agent.info}. Call it on owner {self._owner}: "
                "local_value() is for the owner only; use to_here()"
            )
        service = self._service
        agent = service.agent
        if agent.on_loop_thread():
            failure = service.failure(self)
            if failure is not None:
                raise fresh_error(failure)
            entry = service._owners.get(self._rref_id)
            if entry is None or not entry.value.done():
                raise RuntimeError(
                    "the value of this RRef is not created yet: on the event loop use "
                    "`await rref.to_here()` (local_value() waits only off the loop)"
                )
            return _result(entry.value)  # type: ignore[no-any-return]
        # Off the loop: a value that exists is read here (a done future is
        # safe to read from any thread); only a wait goes through the loop.
        entry = service._owners.get(self._rref_id)
        if entry is not None and entry.value.done() and _error_of(entry.value) is None:
            return entry.value.result()  # type: ignore[no-any-return]
        return agent.blocking(lambda: asyncio.ensure_future(self.to_here(0)))

    async def to_here(self, timeout: float | None = None) -> T:
        """A copy of the value (the value itself on the owner).

        Args:
            timeout: bounds the whole wait, for the creation as well as the
                fetch; None: the options' ``rpc_timeout`` (on the owner: no
                limit); 0: no limit.

        Raises:
            RemoteError: creating the value failed on the owner.
            RpcTimeoutError: ``remote()`` timed out, or this wait did.
            ConnectionLostError: the creation was lost, or the owner is gone.
        """
        self._check_usable("to_here()")
        service = self._service
        failure = service.failure(self)
        if failure is not None:
            raise fresh_error(failure)
        if self.is_owner():
            return await service.owner_value(self, timeout)  # type: ignore[no-any-return]
        agent = service.agent
        limit = agent.options.rpc_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit if limit > 0 else None
        message = RRefFetchCall(list(self._rref_id), agent.info.id)
        fetch = agent.request(self._owner, message, limit, service.decode_fetch)
        creation = self._creation
        if creation is None or creation.done():
            return await fetch  # type: ignore[no-any-return]
        try:
            await asyncio.wait({creation, fetch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            fetch.add_done_callback(retrieve_error)
            raise
        error = _creation_error(creation)
        if error is not None:  # the creation's failure decides, whatever the fetch does
            fetch.add_done_callback(retrieve_error)
            raise fresh_error(error)
        if not fetch.done() or fetch.exception() is None:
            return await fetch  # type: ignore[no-any-return]
        # The fetch failed while the creation was pending: the creation decides.
        fetch_error = fetch.exception()
        assert fetch_error is not None
        if isinstance(fetch_error, RpcTimeoutError):
            raise fetch_error
        left = _left(deadline)
        done, _ = await asyncio.wait({creation}, timeout=left if left else None)
        if not done:
            raise RpcTimeoutError(f"to_here() timed out after {limit}s")
        error = _creation_error(creation)
        if error is not None:
            raise fresh_error(error)
        # Created after all (the fetch overtook a delayed creation): once more.
        again = agent.request(self._owner, message, left, service.decode_fetch)
        return await again  # type: ignore[no-any-return]

    def to_here_sync(self, timeout: float | None = None) -> T:
        """The blocking form of :meth:`to_here`, for threads other than the
        event loop's (as ``rpc_sync`` is for calls).

        Raises:
            RuntimeError: called on the event loop's thread (it would
                deadlock): use ``await rref.to_here()`` there.
            RpcError: as :meth:`to_here`.
        """
        self._check_usable("to_here()")
        agent = self._service.agent
        if agent.on_loop_thread():
            raise RuntimeError(
                "to_here_sync() would block the event loop it needs: use `await rref.to_here()`"
            )
        return agent.blocking(lambda: asyncio.ensure_future(self.to_here(timeout)))

    def rpc_async(self, timeout: float | None = None) -> _Proxy:
        """A proxy: ``await rref.rpc_async().method(*args)`` calls ``method``
        of the owner's value and returns its result."""
        return _Proxy(self, "rpc_async", timeout)

    def rpc_sync(self, timeout: float | None = None) -> _Proxy:
        """A proxy whose calls block (for code off the event loop)."""
        return _Proxy(self, "rpc_sync", timeout)

    def remote(self, timeout: float | None = None) -> _Proxy:
        """A proxy whose calls return an RRef to the result, owned by the owner."""
        return _Proxy(self, "remote", timeout)

    async def backward(self, context_id: int = -1, retain_graph: bool = False) -> None:
        """Run backward from the referenced scalar tensor, on its owner.

        Args:
            context_id: the distributed autograd context; -1 runs local
                autograd on the owner (gradients in ``.grad``): on the owner
                only, as in torch.
            retain_graph: keep the graph.

        Raises:
            RuntimeError: -1 on a user RRef ("User RRefs require
                'dist_autograd_ctx_id' to be specified"); the value is not a
                tensor ("RRef should contain a tensor for .backward()", from
                the owner: a ``RemoteError`` on a user).
        """
        service = self._service
        failure = service.failure(self)
        if failure is not None:
            raise fresh_error(failure)
        if context_id == -1 and not self.is_owner():
            raise RuntimeError(_USER_LOCAL_BACKWARD)
        if self.is_owner():
            await service.owner_backward(self._rref_id, context_id, retain_graph)
            return
        request = service.agent.request(
            self._owner,
            RRefBackwardReq(list(self._rref_id), context_id, retain_graph),
            decode=lambda m: None,
        )
        await service.creation_first(self, request)

    def __reduce__(self) -> Any:
        # torch's error type and words: an RRef pickled outside RPC.
        raise RuntimeError(
            "Can not pickle rref in python pickler, rref can only be pickled when using RPC "
            "(an RRef can only be sent in RPC arguments and results)"
        )


def _creation_error(creation: asyncio.Future[Any]) -> BaseException | None:
    """The error a failed creation gives the RRef's uses: a timed-out one in
    torch's words (the value may or may not exist on the owner)."""
    error = _error_of(creation)
    if isinstance(error, RpcTimeoutError):
        translated = RpcTimeoutError(
            "RRef creation via rpc.remote() timed out, and it is possible that the RRef "
            f"on the owner node does not exist ({error})"
        )
        translated.__cause__ = error
        return translated
    return error


def _error_of(fut: asyncio.Future[Any]) -> BaseException | None:
    """The error a done future failed with (None if it succeeded or is pending)."""
    if not fut.done():
        return None
    if fut.cancelled():
        return RpcError("cancelled")
    return fut.exception()


def _result(fut: asyncio.Future[T]) -> T:
    """The result of a done future others share (its error as a fresh copy)."""
    exc = _error_of(fut)
    if exc is not None:
        raise fresh_error(exc)
    return fut.result()


def _left(deadline: float | None) -> float:
    """Seconds left until ``deadline`` for a request timeout (0: no limit)."""
    if deadline is None:
        return 0.0
    return max(deadline - time.monotonic(), 0.001)


async def _invoke_method(rref: RRef[Any], name: str, args: tuple[Any, ...], kwargs: Any) -> Any:
    """Runs on the owner: call ``name`` on the referenced value."""
    value = await rref.to_here()
    method = getattr(value, name)
    if inspect.iscoroutinefunction(method):
        return await method(*args, **kwargs)
    return await rref._service.agent.invoke(method, args, kwargs)


class _Proxy:
    """``rref.rpc_async()`` and friends: attribute access gives a method caller."""

    __slots__ = ("_how", "_rref", "_timeout")

    def __init__(self, rref: RRef[Any], how: str, timeout: float | None) -> None:
        self._rref = rref
        self._how = how
        self._timeout = timeout

    def __getattr__(self, name: str) -> Callable[..., Any]:
        rref, how, timeout = self._rref, self._how, self._timeout
        service = rref._service
        agent = service.agent

        def method(*args: Any, **kwargs: Any) -> Any:
            call_args = (rref, name, args, kwargs)
            owner = rref.owner()
            if how == "remote":
                return agent.on_loop(
                    lambda: service.remote(owner, _invoke_method, call_args, None, timeout, rref)
                )

            def start() -> asyncio.Future[Any]:
                failure = service.failure(rref)
                if failure is not None:  # nothing is sent
                    fut: asyncio.Future[Any] = agent.loop.create_future()
                    fut.set_exception(fresh_error(failure))
                    return fut
                call = agent.call(owner, _invoke_method, call_args, None, timeout)
                return service.creation_first(rref, call)

            if how == "rpc_sync":
                return agent.blocking(start)
            return start()

        method.__name__ = name
        return method


class RRefService:
    """RRef bookkeeping and message handlers of one agent."""

    _current: RRefService | None = None
    # The type of the RRefs services make (remote(), received ones): the sync
    # facade sets its subclass for the processes it starts, before they start.
    rref_class: type[RRef[Any]] = RRef

    def __init__(self, agent: RpcAgent) -> None:
        self.agent = agent
        self._ids = itertools.count()  # local ids from 0, as torch's
        self._owners: dict[Id, _OwnerEntry] = {}
        self._users: weakref.WeakValueDictionary[Id, RRef[Any]] = weakref.WeakValueDictionary()
        self._pending_children: dict[Id, RRef[Any]] = {}
        self._children_at: dict[Id, int] = {}  # pending child -> the worker it went to
        self._unconfirmed_deletes: dict[Id, tuple[WorkerInfo, Id]] = {}
        self._ops = 0  # scheduled but not yet sent deletes
        # Reentrant: RRef.__del__ takes it and may run from a GC triggered
        # while this thread already holds it.
        self._lock = threading.RLock()
        # Forks confirmed after their handle was dropped but before the drop
        # was processed here.
        self._confirmed_forks: set[Id] = set()
        self._shutting_down = False
        # Per peer: owner entries charged to it, fetches of it waiting here.
        self._charged: Counter[int] = Counter()
        self._fetching: Counter[int] = Counter()
        # Workers declared gone, with the error their RRefs raise.
        self._gone: dict[int, RpcError] = {}

    @classmethod
    def install(cls, agent: RpcAgent) -> RRefService:
        """Create the service and hook it into ``agent``."""
        self = cls(agent)
        agent.handlers[PythonRemoteCall] = self._on_remote_call
        agent.handlers[RRefFetchCall] = self._on_fetch
        agent.handlers[RRefUserDelete] = self._on_user_delete
        agent.handlers[RRefForkRequest] = self._on_fork_request
        agent.handlers[RRefChildAccept] = self._on_child_accept
        agent.handlers[RRefBackwardReq] = self._on_backward
        agent.debug_counters["num_owner_rrefs"] = lambda: len(self._owners)
        agent.debug_counters["num_user_rrefs"] = lambda: len(self._users)
        agent.debug_counters["num_pending_rref_children"] = lambda: len(self._pending_children)
        agent.debug_counters["num_pending_rref_fetches"] = lambda: sum(self._fetching.values())
        agent.idle_checks.append(self._idle)
        agent.before_shutdown.append(self.delete_all_users)
        agent.peer_gone_hooks.append(self.on_peer_gone)
        agent.peer_back_hooks.append(self._peer_back)
        agent.extensions["rref"] = self
        cls._current = self
        return self

    @classmethod
    def current(cls) -> RRefService:
        """The service of this process's running agent.

        Raises:
            RpcError: RPC is not initialised.
        """
        service = cls._current
        if service is None or not service.agent.running:
            raise RpcError(NO_AGENT_FOR_RREF)
        return service

    def new_id(self) -> Id:
        return (self.agent.info.id, next(self._ids))

    # -- failures seen by users ------------------------------------------------

    def failure(self, rref: RRef[Any]) -> BaseException | None:
        """Why ``rref`` cannot be used (None if it can): its creation failed,
        or its owner is gone. Loop thread only."""
        creation = rref._creation
        if creation is not None:
            error = _creation_error(creation)
            if error is not None:
                return error
        gone = self._gone.get(rref._owner.id)
        if gone is not None and not rref.is_owner():
            return ConnectionLostError(
                f"RRef {rref._rref_id} cannot be used: its owner, worker "
                f"{rref._owner.name!r}, is gone ({gone})"
            )
        return None

    def creation_first(self, rref: RRef[Any], work: asyncio.Future[T]) -> asyncio.Future[T]:
        """``work`` (a request about ``rref``), failing with the creation's
        error instead when the creation of ``rref`` fails first."""
        creation = rref._creation
        if creation is None or creation.done():
            return work
        return asyncio.ensure_future(self._creation_first(creation, work))

    async def _creation_first(self, creation: asyncio.Future[Any], work: asyncio.Future[T]) -> T:
        try:
            await asyncio.wait({creation, work}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.add_done_callback(retrieve_error)
            raise
        error = _creation_error(creation)
        if error is not None:
            work.add_done_callback(retrieve_error)
            raise fresh_error(error)
        if work.done() and not isinstance(work.exception(), RpcTimeoutError):
            # Failed while the creation was pending: its outcome explains it.
            await asyncio.wait({creation})
            error = _creation_error(creation)
            if error is not None:
                raise fresh_error(error)
        return await work

    # -- owner side ------------------------------------------------------------

    def _requester(self) -> int:
        """The worker whose request is being served here (_UNKNOWN if none)."""
        conn = serving_connection.get()
        peer = conn.peer if conn is not None else None
        return peer.id if isinstance(peer, WorkerInfo) else _UNKNOWN

    def _new_entry(self, rref_id: Id, peer: int) -> _OwnerEntry:
        """A new entry charged to ``peer``.

        Raises:
            RpcError: ``peer`` is at its ``max_owner_rrefs_per_peer``.
        """
        if peer not in (_UNKNOWN, self.agent.info.id):
            limit = self.agent.options.max_owner_rrefs_per_peer
            if self._charged[peer] >= limit:
                raise RpcError(
                    f"worker {self.agent.info.name!r} already owns {limit} RRef values on "
                    f"behalf of worker {peer} (max_owner_rrefs_per_peer)"
                )
            self._charged[peer] += 1
        else:
            peer = _UNKNOWN
        entry = _OwnerEntry(self.agent.loop.create_future(), peer=peer)
        entry.value.add_done_callback(retrieve_error)
        self._owners[rref_id] = entry
        return entry

    def _lookup(self, rref_id: Id, requester: int) -> _OwnerEntry:
        """The entry of ``rref_id`` for a request of ``requester``; a bounded
        placeholder if its creation request may still arrive.

        Raises:
            RpcError: it cannot arrive any more (or the peer is over a limit).
        """
        entry = self._owners.get(rref_id)
        if entry is not None:
            return entry
        creator = rref_id[0]
        me = self.agent.info
        if creator == me.id:
            raise RpcError(f"worker {me.name!r} owns no RRef {rref_id} (never created or freed)")
        gone = self._gone.get(creator)
        if gone is not None:
            raise ConnectionLostError(
                f"RRef {rref_id} will never exist on {me.name!r}: its creator is gone ({gone})"
            )
        # The creator's own messages arrive in order: its request came first.
        wait = _IN_ORDER_GRACE_S if creator == requester else self.agent.options.rpc_timeout
        entry = self._new_entry(rref_id, requester)
        entry.placeholder = True
        if wait > 0:  # else (no rpc_timeout) only the creator's end ends the wait
            entry.expiry = self.agent.loop.call_later(wait, self._expire, rref_id, entry, wait)
        return entry

    @staticmethod
    def _adopt(entry: _OwnerEntry) -> None:
        """A placeholder's creation request arrived."""
        entry.placeholder = False
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None

    def _expire(
        self, rref_id: Id, entry: _OwnerEntry, waited: float, error: RpcError | None = None
    ) -> None:
        """A placeholder's creation request did not come: fail it, drop it."""
        self._adopt(entry)  # no longer waiting
        if not entry.value.done():
            entry.value.set_exception(
                error
                or RpcTimeoutError(
                    f"the creation request of RRef {rref_id} did not reach its owner "
                    f"{self.agent.info.name!r} within {waited}s"
                )
            )
        if self._owners.get(rref_id) is entry:
            entry.forks.clear()
            self._maybe_free(rref_id)

    def _drop_entry(self, rref_id: Id) -> None:
        entry = self._owners.pop(rref_id)
        self._adopt(entry)  # its timer goes
        if not entry.value.done():
            # Every reference went before the value existed: waiting requests
            # (which hold none) get an answer; a creation still running keeps
            # nothing (_settle).
            entry.value.set_exception(
                RpcError(f"RRef {rref_id} was deleted by every holder before its value existed")
            )
        if entry.peer != _UNKNOWN:
            self._charged[entry.peer] -= 1
            if self._charged[entry.peer] <= 0:
                del self._charged[entry.peer]

    def own(self, rref: RRef[Any], value: Any) -> None:
        """Register a new owner RRef of ``value`` (``RRef(value)``)."""
        entry = self._new_entry(rref._rref_id, _UNKNOWN)
        entry.value.set_result(value)
        entry.handles += 1

    def add_owner_handle(self, rref: RRef[Any]) -> None:
        entry = self._owners.get(rref._rref_id)
        if entry is None:  # remote() to this worker: the handle comes first
            entry = self._new_entry(rref._rref_id, _UNKNOWN)
        entry.handles += 1

    def _maybe_free(self, rref_id: Id) -> None:
        entry = self._owners.get(rref_id)
        if entry is not None and not entry.forks and entry.handles <= 0:
            self._drop_entry(rref_id)

    def _fork_of_owner_gone(self, rref_id: Id, fork_id: Id) -> None:
        entry = self._owners.get(rref_id)
        if entry is not None:
            entry.forks.pop(fork_id, None)
            self._maybe_free(rref_id)

    async def owner_value(self, rref: RRef[Any], timeout: float | None) -> Any:
        """On the owner: the value of ``rref`` once it exists (a ``remote()``
        to this worker may still be creating it)."""
        entry = self._owners.get(rref._rref_id)
        assert entry is not None, "an owner handle keeps its entry"
        value = entry.value
        creation = rref._creation
        # A remote() to this worker: its outcome (the caller's view, a
        # RemoteError) decides; it ends right after the value is set.
        waited = creation if creation is not None and not creation.done() else value
        if not waited.done():
            done, _ = await asyncio.wait({waited}, timeout=timeout or None)
            if not done:
                raise RpcTimeoutError(f"to_here() timed out after {timeout}s")
        failure = self.failure(rref)
        if failure is not None:
            raise fresh_error(failure)
        if not value.done():  # (created: the value is set before the reply)
            done, _ = await asyncio.wait({value}, timeout=timeout or None)
            if not done:
                raise RpcTimeoutError(f"to_here() timed out after {timeout}s")
        return _result(value)

    # -- user side ---------------------------------------------------------------

    def add_user(self, rref: RRef[Any]) -> None:
        self._users[rref._fork_id] = rref
        if rref._owner.id in self._gone:
            rref._deleted = True  # nobody to tell

    def handle_dropped(self, rref: RRef[Any]) -> None:
        """``RRef.__del__``: may run on any thread, during any GC."""
        loop = self.agent.loop
        if loop.is_closed():
            return
        with self._lock:
            self._ops += 1
        try:
            loop.call_soon_threadsafe(
                self._dropped,
                rref._owner,
                rref._rref_id,
                rref._fork_id,
                rref._confirmed,
                rref._deleted,
            )
        except RuntimeError:  # the loop closed meanwhile
            with self._lock:
                self._ops -= 1

    def _dropped(
        self, owner: WorkerInfo, rref_id: Id, fork_id: Id, confirmed: bool, deleted: bool
    ) -> None:
        with self._lock:
            self._ops -= 1
        if owner.id == self.agent.info.id:
            entry = self._owners.get(rref_id)
            if entry is not None:
                entry.handles -= 1
                self._maybe_free(rref_id)
            return
        if deleted:
            return
        if not confirmed and fork_id not in self._confirmed_forks:
            self._unconfirmed_deletes[fork_id] = (owner, rref_id)
            return
        self._confirmed_forks.discard(fork_id)
        self._send_delete(owner, rref_id, fork_id)

    def _send_delete(self, owner: WorkerInfo, rref_id: Id, fork_id: Id) -> None:
        if not self.agent.running or owner.id in self._gone:
            return
        fut = self.agent.request(
            owner, RRefUserDelete(list(rref_id), list(fork_id)), decode=lambda m: None
        )
        fut.add_done_callback(retrieve_error)

    def _confirm(self, fork_id: Id) -> None:
        rref = self._users.get(fork_id)
        if rref is not None:
            rref._confirmed = True
        pending = self._unconfirmed_deletes.pop(fork_id, None)
        if pending is not None:
            self._send_delete(pending[0], pending[1], fork_id)
        elif rref is None:
            self._confirmed_forks.add(fork_id)

    def torch_debug_info(self) -> dict[str, int]:
        """torch's RRef context counters (``_rref_context_get_debug_info``),
        read on the loop's thread: the owner RRefs shared with other workers
        (a local ``RRef(value)`` counts once shared), their forks, owner
        entries waiting for a value still being created, and references not
        yet confirmed by their owner (here or sent from here)."""
        shared = [entry for entry in self._owners.values() if entry.forks or entry.placeholder]
        return {
            "num_owner_rrefs": len(shared),
            "num_forks": sum(len(entry.forks) for entry in shared),
            "num_pending_futures": sum(entry.placeholder for entry in shared),
            "num_pending_users": len(self._pending_children)
            + sum(not rref._confirmed for rref in list(self._users.values())),
        }

    def delete_all_users(self) -> None:
        """Graceful shutdown: tell owners every live user RRef is gone, each
        once the owner confirmed it and no fork of it is in flight (PyTorch's
        delAllUsersAndUnforkedOwners); :meth:`_idle` keeps at it until done."""
        self._shutting_down = True
        self._sweep()

    def _sweep(self) -> bool:
        """Delete the user RRefs that can go now; True when none is left."""
        parents = {id(r) for r in self._pending_children.values()}
        done = True
        for rref in list(self._users.values()):
            if rref._deleted:
                continue
            if rref._confirmed and id(rref) not in parents:
                rref._deleted = True
                self._send_delete(rref._owner, rref._rref_id, rref._fork_id)
            else:
                done = False
        return done

    def _idle(self) -> bool:
        """No RRef work outstanding here: no delete scheduled and not sent, no
        fork in flight from here, no dropped reference waiting for its
        confirmation (sent deletes, fork requests and fetches are requests the
        agent counts); during a graceful shutdown, also every user RRef
        deleted (references received meanwhile included)."""
        if self._ops or self._pending_children or self._unconfirmed_deletes:
            return False
        if not self._shutting_down:
            return True
        return self._sweep()

    # -- peers gone ------------------------------------------------------------------

    def _peer_back(self, info: WorkerInfo) -> None:
        """A new incarnation of a worker declared gone joined (dynamic group)."""
        self._gone.pop(info.id, None)

    def on_peer_gone(self, info: WorkerInfo, error: RpcError) -> None:
        """``agent.peer_gone_hooks``: ``info`` is gone for good.

        RRefs it owns fail on use with ``ConnectionLostError`` naming it;
        forks it held are released here (values only it held are freed);
        placeholders it was to create fail; forks of its RRefs in flight and
        deletes owed to it are dropped (nobody can confirm or take them).
        """
        self._gone[info.id] = error
        lost = ConnectionLostError(f"worker {info.name!r} is gone ({error})")
        for rref_id, entry in list(self._owners.items()):
            for fork_id in [f for f, holder in entry.forks.items() if holder == info.id]:
                del entry.forks[fork_id]
            if entry.placeholder and rref_id[0] == info.id:
                self._expire(rref_id, entry, 0.0, lost)
            else:
                self._maybe_free(rref_id)
        for rref in list(self._users.values()):
            if rref._owner.id == info.id:
                rref._deleted = True
        for fork_id, (owner, _) in list(self._unconfirmed_deletes.items()):
            if owner.id == info.id:
                del self._unconfirmed_deletes[fork_id]
        for fork_id, parent in list(self._pending_children.items()):
            # Its owner cannot confirm it, or its child cannot accept it.
            if parent._owner.id == info.id or self._children_at.get(fork_id) == info.id:
                del self._pending_children[fork_id]
                self._children_at.pop(fork_id, None)

    # -- forking (pickling) --------------------------------------------------------

    def dump(self, rref: RRef[Any]) -> tuple[Any, ...]:
        """Persistent id of an RRef being sent: forks it (see module doc)."""
        me = self.agent.info.id
        owner = rref._owner
        to = sending_to.get()  # where it goes, when the sender knows for sure
        child = None if to is None else to[0]
        if (
            to == (owner.id, True)
            and not rref.is_owner()
            # (an injected delay may reorder our requests)
            and self.agent.fault_injector is None
        ):
            # A request to its owner, ahead of our delete of this fork: it
            # names the fork the owner knows, nothing is held for it.
            return ("RRef", owner.id, owner.name, list(rref._rref_id), list(rref._fork_id), me)
        fork_id = self.new_id()
        if rref.is_owner():
            entry = self._owners.get(rref._rref_id)
            assert entry is not None, "an owner handle keeps its entry"
            # Early fork registration; the child holds it (if it dies, it goes).
            entry.forks[fork_id] = _UNKNOWN if child is None else child
        elif owner.id not in self._gone:
            self._pending_children[fork_id] = rref
            if child is not None:
                self._children_at[fork_id] = child
        return ("RRef", owner.id, owner.name, list(rref._rref_id), list(fork_id), me)

    def load(self, pid: tuple[Any, ...]) -> RRef[Any]:
        """Rebuild a received RRef and run this side of the fork protocol."""
        _, owner_id, owner_name, rref_id_l, fork_id_l, parent = pid
        rref_id, fork_id = _id(rref_id_l), _id(fork_id_l)
        me = self.agent.info.id
        owner = WorkerInfo(owner_name, owner_id)
        if owner_id == me:
            # Ours: a plain owner handle. A parent that is the owner registered
            # the fork id (early registration): drop it; a user parent that
            # names a fork we do not know waits for our accept (the fork id is
            # a phantom); one naming its own fork holds nothing.
            entry = self._lookup(rref_id, self._requester())
            rref = RRef._make(self, owner, rref_id, rref_id, True)
            if not entry.value.done():
                # A call receiving it starts once the value exists.
                wait_before_call(entry.value)
            if parent == me:
                self._fork_of_owner_gone(rref_id, fork_id)
            elif fork_id not in entry.forks:
                self._notify(parent, RRefChildAccept(list(fork_id)))
            return rref
        if parent == owner_id:
            return RRef._make(self, owner, rref_id, fork_id, True)
        rref = RRef._make(self, owner, rref_id, fork_id, False)
        if owner_id in self._gone:
            return rref  # unusable (failure()); nothing to confirm
        fut = self.agent.request(
            owner, RRefForkRequest(list(rref_id), list(fork_id)), decode=lambda m: None
        )

        def acked(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                log.warning("fork %s of RRef %s was not confirmed by its owner", fork_id, rref_id)
                # Nothing to delete on the owner; the parent must not hold on.
                self._unconfirmed_deletes.pop(fork_id, None)
                child = self._users.get(fork_id)
                if child is not None:
                    child._deleted = True
            else:
                self._confirm(fork_id)
            self._notify(parent, RRefChildAccept(list(fork_id)))

        fut.add_done_callback(acked)
        # As in torch, a call receiving it starts once the owner confirmed it
        # (acked above runs first): its function sees confirmed_by_owner().
        wait_before_call(fut)
        return rref

    def _notify(self, worker_id: int, message: Message) -> None:
        if not self.agent.running or worker_id in self._gone:
            return
        info = self.agent.worker_info(worker_id)
        fut = self.agent.request(info, message, decode=lambda m: None)
        fut.add_done_callback(retrieve_error)

    # -- remote() ------------------------------------------------------------------

    def remote(
        self,
        to: WorkerInfo,
        func: Callable[..., Any] | str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        source: RRef[Any] | None = None,
    ) -> RRef[Any]:
        """``rpc.remote``: run ``func`` on ``to``, which owns the result.

        ``source``: the RRef a proxy call is about; if it cannot be used, the
        new RRef fails with its error and nothing is sent.
        """
        failure = self.failure(source) if source is not None else None
        fut: asyncio.Future[Any]
        if failure is not None:  # nothing is pickled (no fork) nor sent
            rref_id = fork_id = self.new_id()
            rref = RRef._make(self, to, rref_id, fork_id, False)
            rref._deleted = True  # the owner never heard of it
            fut = self.agent.loop.create_future()
            fut.set_exception(fresh_error(failure))
        else:
            token = sending_to.set((to.id, True))
            try:
                call = self.agent.call_message(func, args, kwargs)
            finally:
                sending_to.reset(token)
            # Ids as torch numbers them: the arguments' forks, then the RRef
            # id, then the creator's own fork id (torch's str() shows both); a
            # remote() to ourselves makes an owner handle, one id.
            rref_id = self.new_id()
            fork_id = rref_id if to.id == self.agent.info.id else self.new_id()
            msg = PythonRemoteCall(call.target, call.value, list(rref_id), list(fork_id))
            rref = RRef._make(self, to, rref_id, fork_id, False)
            fut = self.agent.request(to, msg, timeout, decode=lambda m: None)
            if source is not None:
                fut = self.creation_first(source, fut)
        fut.add_done_callback(retrieve_error)
        fut.add_done_callback(lambda f: self._created(fork_id, f))
        rref._creation = fut
        return rref

    def _created(self, fork_id: Id, fut: asyncio.Future[Any]) -> None:
        # The owner registers the creator's fork before running the function,
        # so it knows it whatever the outcome (after a timeout or a lost
        # connection, a delete for an unknown fork is ignored there). The
        # creation's error stays in the RRef (failure()).
        self._confirm(fork_id)

    def _on_remote_call(self, message: Message) -> Awaitable[Message]:
        """Registers the entry now (a later message of the creator finds it),
        runs the function in a Task."""
        assert isinstance(message, PythonRemoteCall)
        rref_id, fork_id = _id(message.rref_id), _id(message.fork_id)
        entry = self._owners.get(rref_id)
        if entry is None:
            entry = self._new_entry(rref_id, self._requester())
        elif entry.placeholder:  # its creation is here
            self._adopt(entry)
        if rref_id[0] != self.agent.info.id:
            # The creator's user RRef; remote() to ourselves holds an owner
            # handle instead, counted in entry.handles.
            entry.forks[fork_id] = rref_id[0]
        try:
            func, args, kwargs, waits = self.agent.resolve_call_waiting(
                message.target, message.value
            )
        except Exception as exc:
            self._settle(rref_id, entry, exc, None)
            raise
        return self._create(rref_id, fork_id, entry, func, args, kwargs, waits)

    async def _create(
        self,
        rref_id: Id,
        fork_id: Id,
        entry: _OwnerEntry,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        waits: list[asyncio.Future[Any]],
    ) -> Message:
        try:
            for fut in waits:  # values its arguments refer to
                await outcome(fut)
            value = await self.agent.invoke(func, args, kwargs)
        except BaseException as exc:
            self._settle(rref_id, entry, exc, None)
            raise
        self._settle(rref_id, entry, None, value)
        return RemoteRet(list(rref_id), list(fork_id))

    def _settle(
        self, rref_id: Id, entry: _OwnerEntry, error: BaseException | None, value: Any
    ) -> None:
        if not entry.value.done():
            if error is not None:
                entry.value.set_exception(error)
            else:
                entry.value.set_result(value)
        # Every reference may be gone already (a remote() to this worker whose
        # RRef was dropped, a creator that is gone): then nothing keeps it.
        self._maybe_free(rref_id)

    def _wait_value(self, entry: _OwnerEntry, then: Callable[[Any], T]) -> asyncio.Future[T]:
        """A future of ``then(value)`` once the value (not created yet) exists;
        it counts against the requester's ``max_pending_fetches_per_peer`` and
        fails when the requester's connection is lost.

        Raises:
            RpcError: the requester is at its limit.
        """
        conn = serving_connection.get()
        requester = self._requester()
        limit = self.agent.options.max_pending_fetches_per_peer
        if self._fetching[requester] >= limit:
            raise RpcError(
                f"worker {requester} already has {limit} RRef requests waiting on "
                f"{self.agent.info.name!r} for values not created yet "
                "(max_pending_fetches_per_peer)"
            )
        self._fetching[requester] += 1
        lost = self.agent.when_lost(conn) if conn is not None else None

        async def wait() -> T:
            value = entry.value
            if lost is None:
                return then(await outcome(value))
            await asyncio.wait({value, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not value.done():
                raise ConnectionLostError(
                    f"the connection of worker {requester} waiting for an RRef value was lost"
                )
            return then(_result(value))

        def done(_: asyncio.Future[T]) -> None:
            self._fetching[requester] -= 1
            if self._fetching[requester] <= 0:
                del self._fetching[requester]

        task = self.agent.loop.create_task(wait())
        task.add_done_callback(done)
        return task

    def _on_fetch(self, message: Message) -> Message | asyncio.Future[Message]:
        assert isinstance(message, RRefFetchCall)
        entry = self._lookup(_id(message.rref_id), self._requester())
        allow = self.agent.options.allow_pickle

        requester = self._requester()

        def ret(value: Any) -> Message:
            token = sending_to.set(None if requester == _UNKNOWN else (requester, False))
            try:
                return RRefFetchRet(codec.dump_payload(value, allow))
            finally:
                sending_to.reset(token)

        if entry.value.done():  # the common case: no Task
            return ret(_result(entry.value))
        return self._wait_value(entry, ret)

    def decode_fetch(self, message: Message) -> Any:
        if not isinstance(message, RRefFetchRet):
            raise RpcError(f"unexpected response {type(message).__name__} to an RRef fetch")
        return codec.load_payload(message.value, self.agent.options.allow_pickle)

    def _on_user_delete(self, message: Message) -> Message:
        assert isinstance(message, RRefUserDelete)
        self._fork_of_owner_gone(_id(message.rref_id), _id(message.fork_id))
        return RRefAck()

    def _on_fork_request(self, message: Message) -> Message:
        assert isinstance(message, RRefForkRequest)
        requester = self._requester()
        entry = self._lookup(_id(message.rref_id), requester)
        entry.forks[_id(message.fork_id)] = requester
        return RRefAck()

    def _on_child_accept(self, message: Message) -> Message:
        assert isinstance(message, RRefChildAccept)
        fork_id = _id(message.fork_id)
        self._pending_children.pop(fork_id, None)
        self._children_at.pop(fork_id, None)
        return RRefAck()

    # -- backward ------------------------------------------------------------------

    async def owner_backward(self, rref_id: Id, context_id: int, retain_graph: bool) -> None:
        entry = self._owners.get(rref_id)
        assert entry is not None, "an owner handle keeps its entry"
        await self._run_backward(await outcome(entry.value), context_id, retain_graph)

    async def _run_backward(self, value: Any, context_id: int, retain_graph: bool) -> None:
        if not isinstance(value, torch.Tensor):
            raise RuntimeError("RRef should contain a tensor for .backward()")
        if context_id == -1:
            await self.agent.run_in_executor(
                functools.partial(value.backward, retain_graph=retain_graph)
            )
            return
        service = self.agent.extensions["autograd"]
        token = current_context_id.set(context_id)
        try:
            await service.backward(context_id, [value], retain_graph)
        finally:
            current_context_id.reset(token)

    def _on_backward(self, message: Message) -> asyncio.Future[Message]:
        assert isinstance(message, RRefBackwardReq)
        entry = self._lookup(_id(message.rref_id), self._requester())
        context_id, retain_graph = message.context_id, message.retain_graph

        async def run(value: asyncio.Future[Any]) -> Message:
            if context_id == -1:  # a user asking for local autograd here: torch's refusal
                raise RuntimeError(_USER_LOCAL_BACKWARD)
            await self._run_backward(await outcome(value), context_id, retain_graph)
            return RRefBackwardResp()

        if entry.value.done():
            return asyncio.ensure_future(run(entry.value))
        return asyncio.ensure_future(run(self._wait_value(entry, lambda v: v)))


def _dump(rref: RRef[Any]) -> tuple[Any, ...]:
    return rref._service.dump(rref)


def _load(pid: tuple[Any, ...]) -> RRef[Any]:
    return RRefService.current().load(pid)


codec.register_persistent(RRef, "RRef", _dump, _load)
