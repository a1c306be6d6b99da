"""Remote references: ownership, the fork protocol, proxies and backward.

Theory of operation
-------------------
An RRef names a value that lives on its *owner*. Ids are ``(worker id,
counter)`` pairs: ``rref_id`` names the value, ``fork_id`` one user's
reference to it. The owner keeps an entry per value with the set of fork ids
it knows and the number of live owner-side handles; it frees the value
exactly when both are empty. Every other worker holds :class:`RRef` handles
("users"), each with its fork id; when one is garbage-collected, the owner is
told (``RRefUserDelete``).

Passing an RRef in a payload *forks* it (PyTorch's protocol):

* the owner forks: it registers the child's fork id at once (early
  registration); the child is confirmed on arrival;
* a user forks: it keeps the RRef alive as a *pending child* until the child
  confirms; the child sends ``RRefForkRequest`` to the owner, and after the
  owner's ack, ``RRefChildAccept`` to the parent, which drops its hold -- so a
  fork in flight never lets the owner free the value, even if the parent
  drops its own reference meanwhile;
* a user sends it to the owner: the owner resolves it to its own value and
  sends ``RRefChildAccept`` to the parent (the fork id is a phantom).

A user's delete waits until it is confirmed. A graceful shutdown sends the
deletes of every live user RRef and waits for them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from . import codec
from .agent import RpcAgent
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
from .errors import RpcError
from .options import WorkerInfo

__all__ = ["RRef", "RRefService"]

log = logging.getLogger(__name__)
T = TypeVar("T")

Id = tuple[int, int]


def _id(pair: list[int] | tuple[int, int]) -> Id:
    return (int(pair[0]), int(pair[1]))


@dataclass(eq=False)
class _OwnerEntry:
    """The owner's record of one value."""

    value: asyncio.Future[Any]
    forks: set[Id] = field(default_factory=set)
    handles: int = 0


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

    def __repr__(self) -> str:
        kind = "OwnerRRef" if self.is_owner() else "UserRRef"
        ids = f"rref_id={self._rref_id}, fork_id={self._fork_id}"
        return f"{kind}({ids}, owner={self._owner.name!r})"

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

        Raises:
            RuntimeError: not the owner, or the value is not created yet.
        """
        if not self.is_owner():
            raise RuntimeError(
                f"local_value() is for the owner ({self._owner.name!r}) only; use to_here()"
            )
        entry = self._service.owner_entry(self._rref_id, create=False)
        if entry is None or not entry.value.done():
            raise RuntimeError("the value of this RRef is not created yet: await to_here()")
        return entry.value.result()  # type: ignore[no-any-return]

    async def to_here(self, timeout: float | None = None) -> T:
        """A copy of the value (the value itself on the owner).

        Raises:
            RemoteError: creating the value failed on the owner.
            RpcTimeoutError: creation or fetch timed out.
        """
        service = self._service
        if self.is_owner():
            entry = service.owner_entry(self._rref_id, create=True)
            assert entry is not None
            if self._creation is not None:
                await self._creation
            return await asyncio.wait_for(asyncio.shield(entry.value), timeout or None)
        fetch = service.agent.request(
            self._owner,
            RRefFetchCall(list(self._rref_id), service.agent.info.id),
            timeout,
            service.decode_fetch,
        )
        if self._creation is not None and not self._creation.done():
            try:
                await self._creation
            except BaseException:
                fetch.add_done_callback(_retrieve)
                raise
        return await fetch  # type: ignore[no-any-return]

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
                autograd on the owner (gradients in ``.grad``).
            retain_graph: keep the graph.
        """
        service = self._service
        if self.is_owner():
            await service.owner_backward(self._rref_id, context_id, retain_graph)
            return
        await service.agent.request(
            self._owner,
            RRefBackwardReq(list(self._rref_id), context_id, retain_graph),
            decode=lambda m: None,
        )

    def __reduce__(self) -> Any:
        raise TypeError("an RRef can only be sent in RPC arguments and results")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


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
                    lambda: service.remote(owner, _invoke_method, call_args, None, timeout)
                )
            if how == "rpc_sync":
                return agent.blocking(
                    lambda: agent.call(owner, _invoke_method, call_args, None, timeout)
                )
            return agent.call(owner, _invoke_method, call_args, None, timeout)

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
        self._ids = itertools.count(1)
        self._owners: dict[Id, _OwnerEntry] = {}
        self._users: weakref.WeakValueDictionary[Id, RRef[Any]] = weakref.WeakValueDictionary()
        self._pending_children: dict[Id, RRef[Any]] = {}
        self._unconfirmed_deletes: dict[Id, tuple[WorkerInfo, Id]] = {}
        self._ops = 0  # scheduled but not yet sent deletes
        # Reentrant: RRef.__del__ takes it and may run from a GC triggered
        # while this thread already holds it.
        self._lock = threading.RLock()
        # Forks confirmed after their handle was dropped but before the drop
        # was processed here.
        self._confirmed_forks: set[Id] = set()
        self._shutting_down = False

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
        agent.idle_checks.append(self._idle)
        agent.before_shutdown.append(self.delete_all_users)
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
            raise RpcError("RPC is not initialised: call `await init_rpc(...)` first")
        return service

    def new_id(self) -> Id:
        return (self.agent.info.id, next(self._ids))

    # -- owner side ------------------------------------------------------------

    def owner_entry(self, rref_id: Id, create: bool) -> _OwnerEntry | None:
        entry = self._owners.get(rref_id)
        if entry is None and create:
            entry = self._owners[rref_id] = _OwnerEntry(self.agent.loop.create_future())
            entry.value.add_done_callback(_retrieve)
        return entry

    def own(self, rref: RRef[Any], value: Any) -> None:
        """Register a new owner RRef of ``value`` (``RRef(value)``)."""
        entry = self.owner_entry(rref._rref_id, create=True)
        assert entry is not None
        entry.value.set_result(value)
        self.add_owner_handle(rref)

    def add_owner_handle(self, rref: RRef[Any]) -> None:
        entry = self.owner_entry(rref._rref_id, create=True)
        assert entry is not None
        entry.handles += 1

    def _maybe_free(self, rref_id: Id) -> None:
        entry = self._owners.get(rref_id)
        if entry is not None and not entry.forks and entry.handles <= 0:
            del self._owners[rref_id]

    def _fork_of_owner_gone(self, rref_id: Id, fork_id: Id) -> None:
        entry = self._owners.get(rref_id)
        if entry is not None:
            entry.forks.discard(fork_id)
            self._maybe_free(rref_id)

    # -- user side ---------------------------------------------------------------

    def add_user(self, rref: RRef[Any]) -> None:
        self._users[rref._fork_id] = rref

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
        if not self.agent.running:
            return
        fut = self.agent.request(
            owner, RRefUserDelete(list(rref_id), list(fork_id)), decode=lambda m: None
        )
        fut.add_done_callback(_retrieve)

    def _confirm(self, fork_id: Id) -> None:
        rref = self._users.get(fork_id)
        if rref is not None:
            rref._confirmed = True
        pending = self._unconfirmed_deletes.pop(fork_id, None)
        if pending is not None:
            self._send_delete(pending[0], pending[1], fork_id)
        elif rref is None:
            self._confirmed_forks.add(fork_id)

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
        """No RRef work left that a graceful shutdown must wait for."""
        if self._ops:
            return False
        if not self._shutting_down:
            return True
        return self._sweep() and not self._pending_children and not self._unconfirmed_deletes

    # -- forking (pickling) --------------------------------------------------------

    def dump(self, rref: RRef[Any]) -> tuple[Any, ...]:
        """Persistent id of an RRef being sent: forks it (see module doc)."""
        fork_id = self.new_id()
        me = self.agent.info.id
        if rref.is_owner():
            entry = self.owner_entry(rref._rref_id, create=True)
            assert entry is not None
            entry.forks.add(fork_id)  # early fork registration
        else:
            self._pending_children[fork_id] = rref
        owner = rref._owner
        return ("RRef", owner.id, owner.name, list(rref._rref_id), list(fork_id), me)

    def load(self, pid: tuple[Any, ...]) -> RRef[Any]:
        """Rebuild a received RRef and run this side of the fork protocol."""
        _, owner_id, owner_name, rref_id_l, fork_id_l, parent = pid
        rref_id, fork_id = _id(rref_id_l), _id(fork_id_l)
        me = self.agent.info.id
        owner = WorkerInfo(owner_name, owner_id)
        if owner_id == me:
            # Ours: a plain owner handle. A parent that is the owner registered
            # the fork id (early registration): drop it; a user parent waits
            # for our accept (the fork id was a phantom).
            rref = RRef._make(self, owner, rref_id, rref_id, True)
            if parent == me:
                self._fork_of_owner_gone(rref_id, fork_id)
            else:
                self._notify(parent, RRefChildAccept(list(fork_id)))
            return rref
        if parent == owner_id:
            return RRef._make(self, owner, rref_id, fork_id, True)
        rref = RRef._make(self, owner, rref_id, fork_id, False)
        fut = self.agent.request(
            owner, RRefForkRequest(list(rref_id), list(fork_id)), decode=lambda m: None
        )

        def acked(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                log.warning("fork %s of RRef %s was not confirmed by its owner", fork_id, rref_id)
                return
            self._confirm(fork_id)
            self._notify(parent, RRefChildAccept(list(fork_id)))

        fut.add_done_callback(acked)
        return rref

    def _notify(self, worker_id: int, message: Message) -> None:
        if not self.agent.running:
            return
        info = self.agent.worker_info(worker_id)
        fut = self.agent.request(info, message, decode=lambda m: None)
        fut.add_done_callback(_retrieve)

    # -- remote() ------------------------------------------------------------------

    def remote(
        self,
        to: WorkerInfo,
        func: Callable[..., Any] | str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> RRef[Any]:
        """``rpc.remote``: run ``func`` on ``to``, which owns the result."""
        call = self.agent.call_message(func, args, kwargs)
        rref_id = self.new_id()
        msg = PythonRemoteCall(call.target, call.value, list(rref_id), list(rref_id))
        rref = RRef._make(self, to, rref_id, rref_id, False)
        fut = self.agent.request(to, msg, timeout, decode=lambda m: None)
        fut.add_done_callback(_retrieve)
        fut.add_done_callback(lambda f: self._created(rref_id, f))
        rref._creation = fut
        return rref

    def _created(self, rref_id: Id, fut: asyncio.Future[Any]) -> None:
        # The owner registers the creator's fork before running the function,
        # so it knows it whatever the outcome (after a timeout or a lost
        # connection, a delete for an unknown fork is ignored there).
        self._confirm(rref_id)

    async def _on_remote_call(self, message: Message) -> Message:
        assert isinstance(message, PythonRemoteCall)
        rref_id, fork_id = _id(message.rref_id), _id(message.fork_id)
        entry = self.owner_entry(rref_id, create=True)
        assert entry is not None
        if rref_id[0] != self.agent.info.id:
            # The creator's user RRef; remote() to ourselves holds an owner
            # handle instead, counted in entry.handles.
            entry.forks.add(fork_id)
        try:
            func, args, kwargs = self.agent.resolve_call(message.target, message.value)
            value = await self.agent.invoke(func, args, kwargs)
        except BaseException as exc:
            if not entry.value.done():
                entry.value.set_exception(exc)
            raise
        if not entry.value.done():
            entry.value.set_result(value)
        return RemoteRet(list(rref_id), list(fork_id))

    async def _on_fetch(self, message: Message) -> Message:
        assert isinstance(message, RRefFetchCall)
        entry = self.owner_entry(_id(message.rref_id), create=True)
        assert entry is not None
        value = await asyncio.shield(entry.value)
        return RRefFetchRet(codec.dump_payload(value, self.agent.options.allow_pickle))

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
        entry = self.owner_entry(_id(message.rref_id), create=True)
        assert entry is not None
        entry.forks.add(_id(message.fork_id))
        return RRefAck()

    def _on_child_accept(self, message: Message) -> Message:
        assert isinstance(message, RRefChildAccept)
        self._pending_children.pop(_id(message.fork_id), None)
        return RRefAck()

    # -- backward ------------------------------------------------------------------

    async def owner_backward(self, rref_id: Id, context_id: int, retain_graph: bool) -> None:
        entry = self.owner_entry(rref_id, create=True)
        assert entry is not None
        value = await asyncio.shield(entry.value)
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

    async def _on_backward(self, message: Message) -> Message:
        assert isinstance(message, RRefBackwardReq)
        await self.owner_backward(_id(message.rref_id), message.context_id, message.retain_graph)
        return RRefBackwardResp()


def _dump(rref: RRef[Any]) -> tuple[Any, ...]:
    return rref._service.dump(rref)


def _load(pid: tuple[Any, ...]) -> RRef[Any]:
    return RRefService.current().load(pid)


codec.register_persistent(RRef, "RRef", _dump, _load)
