"""Dynamic membership: workers join and leave a running group through the store.

Theory of operation
-------------------
A group started with ``world_size=None`` is *dynamic*. Its state lives in the
rendezvous store under ``aiorpc/dyn/``:

``members``          the current members, a msgpack list of
                     ``[rank, name, incarnation]`` (an incarnation is a fresh
                     random id per ``init_rpc``), changed only by
                     compare-and-set, so concurrent joins and leaves serialise;
``addr/R/I``         the address record of rank ``R``'s incarnation ``I``
                     (written before the member is added, never rewritten);
``version``, ``v/N`` a counter bumped after each change, and a key set for
                     each value: members look for ``v/<last seen + 1>``;
``seen/R/I``         the last version member ``R`` (incarnation ``I``) applied;
``why/R/I``          why ``R`` was removed by another worker (its death);
``joining``          a count of the workers that reached the store and have not
                     finished joining (bumped by the rendezvous, dropped at the
                     end of the join, whatever its outcome).

A worker **joins** by publishing its record, adding itself to ``members``,
bumping the version and waiting (bounded) until every member has applied
that version, so that its first call finds every member ready for it. A
name or rank already in ``members`` is taken over only if its holder is dead
(its listening address refuses a connection): that is how a restarted
worker (torchrun ``--max-restarts``) rejoins under its old name; a live holder
makes ``init_rpc`` fail with ``ValueError``. A graceful ``shutdown`` **leaves**:
it waits until its own calls and requests are done, removes itself, bumps
the version and keeps serving until every member applied it; the store's host
(rank 0) then keeps the store up until the group has been quiet (no member,
no join in progress, no change) for a second, bounded by ``heartbeat_timeout``,
as the others need it to the end of their own join or leave. A member that
**dies** is removed by the first worker that declares it gone (the agent's
``peer_gone_hooks``), with the reason. Every member applies every version it
sees: new members become peers (``join`` event), removed ones stop being
peers (``leave`` event; calls to them then fail with :class:`WorkerLeftError`).

The watcher runs on its own thread with its own store connection, looks for
the next version every 50 ms (a cheap ``check``), and hands each change to
the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgpack

from .errors import RpcError, WorkerLeftError
from .options import WorkerInfo, check_worker_name
from .rendezvous import DYNAMIC_PREFIX, JOINING_KEY, Address, Rendezvous

if TYPE_CHECKING:
    from .agent import RpcAgent

__all__ = ["Membership", "MembershipEvent", "WorkerLeftError"]  # the error: from errors

log = logging.getLogger(__name__)

PREFIX = DYNAMIC_PREFIX
_POLL = 0.05  # seconds between the watcher's looks at the version
_ACK_WAIT = 10.0  # seconds a join or leave waits for the members to apply it
_HOST_LINGER = 1.0  # seconds the store's host waits, once the group is quiet, before leaving


@dataclass(frozen=True)
class MembershipEvent:
    """A change of a dynamic group's members, as seen by this worker.

    Attributes:
        kind: ``"join"`` or ``"leave"``.
        worker: the worker that joined or left.
        reason: for a leave, ``"left"`` (graceful ``shutdown``), ``"lost: ..."``
            (it died: connection lost and not back, or heartbeats unanswered),
            or ``"replaced"`` (a new incarnation took its name after it died);
            ``"joined"`` for a join.
    """

    kind: Literal["join", "leave"]
    worker: WorkerInfo
    reason: str


Member = tuple[int, str, str]  # rank, name, incarnation


def _pack(members: list[Member]) -> bytes:
    return msgpack.packb(sorted([list(m) for m in members]))  # type: ignore[no-any-return]


def _unpack(blob: bytes) -> list[Member]:
    if not blob:
        return []
    rows = msgpack.unpackb(blob)
    if type(rows) is not list or not all(
        type(r) is list
        and len(r) == 3
        and type(r[0]) is int
        and type(r[1]) is str
        and type(r[2]) is str
        and _valid_name(r[1])
        for r in rows
    ):
        raise RpcError("malformed member list in the rendezvous store")
    return [(r[0], r[1], r[2]) for r in rows]


def _valid_name(name: str) -> bool:
    try:
        check_worker_name(name)
    except ValueError:
        return False
    return True


def _key(kind: str, member: Member) -> str:
    return f"{PREFIX}{kind}/{member[0]}/{member[2]}"


def _alive(addr: Address, timeout: float = 1.0) -> bool:
    """Whether the worker at ``addr`` still listens (a refused connect: dead)."""
    try:
        with socket.create_connection((addr.host, addr.port), timeout=timeout):
            return True
    except OSError:
        return False


class Membership:
    """This worker's view of a dynamic group; see the module docstring.

    Args:
        agent: the agent (its peers are added and removed here).
        rdv: the joined store.
    """

    def __init__(self, agent: RpcAgent, rdv: Rendezvous) -> None:
        self.agent = agent
        self.rdv = rdv
        self.incarnation = secrets.token_hex(8)
        self.version = 0
        self._members: dict[int, Member] = {}
        self._lost: dict[int, str] = {}  # rank -> why, for members we declared gone
        self._subscribers: list[asyncio.Queue[MembershipEvent]] = []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._applying: asyncio.Task[None] | None = None
        self._dirty = False
        self._closed = False

    # -- store helpers (run on the rendezvous store thread) ----------------------

    def _get(self, key: str) -> bytes:
        # compare_set with an empty expected value creates a missing key as
        # empty and returns the current value otherwise: a get that never blocks.
        store = self.rdv.store
        return bytes(store.compare_set(key, "", ""))

    def _change(self, edit: Callable[[list[Member]], list[Member] | None]) -> int:
        """Compare-and-set ``members`` with ``edit`` until it holds; bump the version.

        ``edit`` returns the new list, or None for no change. Returns the new
        version (the current one when nothing changed).
        """
        store = self.rdv.store
        key = PREFIX + "members"
        while True:
            current = self._get(key)
            new = edit(_unpack(current))
            if new is None:
                return int(store.add(PREFIX + "version", 0))
            packed = _pack(new)
            if bytes(store.compare_set(key, current, packed)) == packed:  # type: ignore[arg-type]
                break
        version = int(store.add(PREFIX + "version", 1))
        store.set(f"{PREFIX}v/{version}", b"1")  # type: ignore[arg-type]
        return version

    # -- join ----------------------------------------------------------------------

    async def join(self, me: Address, deadline: float) -> list[Address]:
        """Add this worker to the group; returns every member's address, self included.

        Raises:
            ValueError: a live worker already holds this name or rank.
            RpcTimeoutError: the store did not answer before ``deadline``.
        """
        try:
            return await self._join(me, deadline)
        finally:
            await self.rdv.joined()

    async def _join(self, me: Address, deadline: float) -> list[Address]:
        rank, name, inc = me.rank, me.name, self.incarnation
        await self.rdv.call(
            self.rdv.store.set, _key("addr", (rank, name, inc)), me.pack(), deadline=deadline
        )
        while True:
            members = _unpack(await self.rdv.call(self._get, PREFIX + "members", deadline=deadline))
            holders = [m for m in members if m[0] == rank or m[1] == name]
            for holder in holders:
                addr = await self._address(holder, deadline)
                alive = addr is not None and await asyncio.to_thread(_alive, addr)
                if alive:
                    what = f"name {name!r}" if holder[1] == name else f"rank {rank}"
                    raise ValueError(
                        f"worker {holder[1]!r} (rank {holder[0]}) of the running group holds the "
                        f"{what}: names and ranks must be unique"
                    )
                await self.rdv.call(
                    self.rdv.store.set, _key("why", holder), b"replaced", deadline=deadline
                )

            def add(current: list[Member], gone: list[Member] = holders) -> list[Member] | None:
                if any(m not in current for m in gone):
                    return None  # changed under us: look again
                return [m for m in current if m not in gone] + [(rank, name, inc)]

            version = await self.rdv.call(self._change, add, deadline=deadline)
            current = _unpack(await self.rdv.call(self._get, PREFIX + "members", deadline=deadline))
            if (rank, name, inc) in current:
                break
        self._members = {m[0]: m for m in current}
        self.version = version
        addresses = []
        for member in current:
            addr = me if member[0] == rank else await self._address(member, deadline)
            if addr is not None:
                addresses.append(addr)
        await self._ack(version)
        # Every member knows this worker before its first call reaches one.
        await self.wait_seen(version, max(0.0, min(deadline - time.monotonic(), _ACK_WAIT)))
        return addresses

    async def wait_seen(self, version: int, timeout: float) -> None:
        """Wait (at most ``timeout``) until every other member applied ``version``."""
        deadline = time.monotonic() + timeout
        me = self.agent.info.id
        pending = [m for m in self._members.values() if m[0] != me]
        while pending and time.monotonic() < deadline:
            behind = []
            for member in pending:
                seen = await self.rdv.call(self._get, _key("seen", member), deadline=deadline)
                if not seen or int(seen) < version:
                    behind.append(member)
            if behind:
                # One that left or was removed meanwhile never applies it; the
                # store's list, not ours: a joiner does not watch the group yet.
                current = await self.rdv.call(self._get, PREFIX + "members", deadline=deadline)
                behind = [m for m in behind if m in _unpack(current)]
            pending = behind
            if pending:
                await asyncio.sleep(0.01)

    def start(self) -> None:
        """Start watching the group (once the agent is up)."""
        try:
            store = self.rdv.store.clone()  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            store = None  # polled through the store thread instead
        self._watcher = threading.Thread(
            target=self._watch, args=(store,), name="aiorpc-members", daemon=True
        )
        self._watcher.start()
        self.agent.peer_gone_hooks.append(self._on_peer_gone)

    # -- leave -----------------------------------------------------------------------

    async def leave(self, deadline: float) -> None:
        """Remove this worker from the group and wait (bounded) until the others
        applied it, serving meanwhile."""
        me = (self.agent.info.id, self.agent.info.name, self.incarnation)

        def remove(current: list[Member]) -> list[Member] | None:
            return [m for m in current if m != me] if me in current else None

        try:
            version = await self.rdv.call(self._change, remove, deadline=deadline)
            self._members.pop(me[0], None)
            await self.wait_seen(version, max(0.0, min(deadline - time.monotonic(), _ACK_WAIT)))
        except RpcError as exc:
            log.warning("could not leave the group cleanly: %s", exc)

    async def outlast(self, deadline: float) -> None:
        """The store's host, once it left: keep the store up until the group has
        been quiet for :data:`_HOST_LINGER` seconds (no member left, no join in
        progress, no change of the version), or until ``deadline``. The others
        need the store to the end of their own join or leave, and a worker
        still starting may not have reached it yet (c10d's client backs off
        ~0.5-1 s after a refused first connection). Members that die meanwhile
        are removed as usual (this worker still watches the group)."""
        store = self.rdv.store
        quiet_since: float | None = None
        last_version = -1
        while time.monotonic() < deadline:
            try:
                members = await self.rdv.call(self._get, PREFIX + "members", deadline=deadline)
                joining = await self.rdv.call(store.add, JOINING_KEY, 0, deadline=deadline)
                version = await self.rdv.call(store.add, PREFIX + "version", 0, deadline=deadline)
            except RpcError:
                return
            now = time.monotonic()
            if _unpack(members) or int(joining) > 0 or version != last_version:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= _HOST_LINGER:
                return
            last_version = version
            await asyncio.sleep(_POLL)

    def close(self) -> None:
        """Stop the watcher and end the event streams."""
        self._closed = True
        self._stop.set()
        for queue in self._subscribers:
            queue.put_nowait(None)  # type: ignore[arg-type]
        self._subscribers.clear()

    # -- events -----------------------------------------------------------------------

    def members(self) -> list[WorkerInfo]:
        """The current members, by rank."""
        return [WorkerInfo(m[1], m[0]) for _, m in sorted(self._members.items())]

    async def events(self) -> AsyncIterator[MembershipEvent]:
        """Joins and leaves from now on, until this worker shuts down."""
        queue: asyncio.Queue[MembershipEvent] = asyncio.Queue()
        if self._closed:
            return
        self._subscribers.append(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(queue)

    def _emit(self, event: MembershipEvent) -> None:
        log.info("membership: %s %s (%s)", event.kind, event.worker.name, event.reason)
        for queue in self._subscribers:
            queue.put_nowait(event)

    # -- applying changes ----------------------------------------------------------------

    def _watch(self, store: Any) -> None:
        """Watcher thread: wake the loop on every new version.

        Polls ``check`` on its own store connection: a timed-out ``wait``
        would make c10d log a warning at every poll.
        """
        loop = self.agent.loop
        seen = self.version
        while not self._stop.wait(_POLL):
            try:
                if store is None:
                    changed = True
                elif store.check([f"{PREFIX}v/{seen + 1}"]):
                    seen = int(store.add(PREFIX + "version", 0))
                    changed = True
                else:
                    changed = False
            except RuntimeError:  # the store is gone: nothing more to learn
                return
            if changed:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(self._changed)

    def _changed(self) -> None:
        if self._closed:
            return
        if self._applying is not None and not self._applying.done():
            self._dirty = True
            return
        self._applying = self.agent.loop.create_task(self._apply())

    async def _apply(self) -> None:
        while True:
            self._dirty = False
            try:
                await self._apply_once()
            except Exception as exc:  # the store is gone: nothing more to learn
                if not self._closed:
                    log.warning("membership: cannot read the group: %s", exc)
                return
            if not self._dirty:
                return

    async def _apply_once(self) -> None:
        deadline = time.monotonic() + 30.0
        version = int(
            await self.rdv.call(self.rdv.store.add, PREFIX + "version", 0, deadline=deadline)
        )
        members = _unpack(await self.rdv.call(self._get, PREFIX + "members", deadline=deadline))
        current = {m[0]: m for m in members}
        me = self.agent.info.id
        for rank, old in list(self._members.items()):
            if rank == me or current.get(rank) == old:
                continue
            why = self._lost.pop(rank, "")
            if not why:
                why = (await self.rdv.call(self._get, _key("why", old), deadline=deadline)).decode()
            del self._members[rank]
            info = WorkerInfo(old[1], old[0])
            self.agent.remove_peer(info, why or "left")
            self._emit(MembershipEvent("leave", info, why or "left"))
        for rank, new in current.items():
            if rank == me or self._members.get(rank) == new:
                continue
            addr = await self._address(new, deadline)
            if addr is None:
                continue  # its record is gone: it is leaving already
            try:
                info = self.agent.add_peer(addr)
            except (ValueError, RpcError) as exc:
                log.warning("membership: refusing %s: %s", new[1], exc)
                continue
            self._members[rank] = new
            self._emit(MembershipEvent("join", info, "joined"))
        self.version = max(self.version, version)
        await self._ack(self.version)

    async def _ack(self, version: int) -> None:
        key = _key("seen", (self.agent.info.id, self.agent.info.name, self.incarnation))
        await self.rdv.call(self.rdv.store.set, key, str(version).encode())

    async def _address(self, member: Member, deadline: float) -> Address | None:
        blob = await self.rdv.call(self._get, _key("addr", member), deadline=deadline)
        return Address.unpack(blob) if blob else None

    def _on_peer_gone(self, info: WorkerInfo, error: RpcError) -> None:
        """A member died: remove it from the group for everyone."""
        member = self._members.get(info.id)
        if member is None or member[1] != info.name or self._closed:
            return
        why = f"lost: {error}"
        self._lost[info.id] = why
        task = self.agent.loop.create_task(self._remove_dead(member, why))
        task.add_done_callback(_retrieved)

    async def _remove_dead(self, member: Member, why: str) -> None:
        deadline = time.monotonic() + 30.0
        await self.rdv.call(
            self.rdv.store.set, _key("why", member), why.encode(), deadline=deadline
        )

        def remove(current: list[Member]) -> list[Member] | None:
            return [m for m in current if m != member] if member in current else None

        await self.rdv.call(self._change, remove, deadline=deadline)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("membership: %s", task.exception())
