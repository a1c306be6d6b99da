"""Group rendezvous through PyTorch's own store (``TCPStore``).

Blocking store calls are made on a dedicated thread so the event loop keeps
serving. ``init_method`` is ``tcp://HOST:PORT`` (rank 0 hosts the store) or
``env://`` (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, as torchrun sets them,
including ``TORCHELASTIC_USE_AGENT_STORE``).

The store is multi-tenant, as torch's own env:// and tcp:// stores are: a c10d
process group (``dist.init_process_group``) and this library can share one
``MASTER_ADDR:MASTER_PORT`` in either order; in one process they share one
store server, and every key of ours lives under ``aiorpc/``.

Long waits (the shutdown rounds) poll the store with short calls instead of
blocking in ``store.wait``: a ``wait`` that runs out logs a c10d warning
("waitForInput ... likely a timeout"), and a thread blocked in a store call
at interpreter exit would abort the process when the call returns.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlparse

import msgpack
import torch.distributed as dist
from torch.distributed import Store, TCPStore  # type: ignore[attr-defined]

from .errors import InvalidArgumentError, RpcError, RpcTimeoutError
from .options import check_worker_name

__all__ = ["Address", "Rendezvous"]

T = TypeVar("T")


@dataclass(frozen=True)
class Address:
    """Where a worker listens, as published in the store.

    With an auth token, ``nonce`` is fresh per run and ``mac`` authenticates
    every other field (``handshake.record_mac`` of :meth:`body`); both are
    empty without one.
    """

    name: str
    rank: int
    host: str
    port: int
    unix_path: str
    host_id: str
    # For the device maps (aiorpc_autograd.devices): this worker's CUDA device
    # count and its maps {peer: {local: remote}}, checked by both ends.
    cuda_devices: int = 0
    device_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    nonce: bytes = b""
    mac: bytes = b""

    def _fields(self) -> list[Any]:
        return [
            self.name,
            self.rank,
            self.host,
            self.port,
            self.unix_path,
            self.host_id,
            self.cuda_devices,
            self.device_maps,
            self.nonce,
        ]

    def body(self) -> bytes:
        """The authenticated part: every field but the MAC."""
        return msgpack.packb(self._fields())  # type: ignore[no-any-return]

    def signed(self, nonce: bytes, mac: Callable[[bytes], bytes]) -> Address:
        """This record with ``nonce`` and the MAC ``mac`` computes over its body."""
        unsigned = replace(self, nonce=nonce, mac=b"")
        return replace(unsigned, mac=mac(unsigned.body()))

    def pack(self) -> bytes:
        """The record as stored."""
        return msgpack.packb([*self._fields(), self.mac])  # type: ignore[no-any-return]

    @classmethod
    def unpack(cls, data: bytes) -> Address:
        """Parse a stored record.

        Raises:
            ValueError: not a record of this format.
        """
        try:
            values = msgpack.unpackb(data)
            name, rank, host, port, unix_path, host_id, cuda, maps, nonce, mac = values
            fields = (name, host, unix_path, host_id)
            if not (all(isinstance(f, str) for f in fields) and isinstance(port, int)):
                raise TypeError("field types")
            if not (isinstance(rank, int) and isinstance(nonce, bytes) and isinstance(mac, bytes)):
                raise TypeError("field types")
            if type(cuda) is not int or type(maps) is not dict:
                raise TypeError("field types")
            check_worker_name(name)
        except (ValueError, TypeError, msgpack.ExtraData) as exc:
            raise ValueError(f"malformed address record in the rendezvous store: {exc}") from exc
        return cls(name, rank, host, port, unix_path, host_id, cuda, maps, nonce, mac)


class Rendezvous:
    """A joined store and the helpers the agent needs from it.

    Use :meth:`join` to create one.
    """

    def __init__(
        self, store: Store, rank: int, world_size: int | None, prefix: str, timeout: float
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix
        self.timeout = timeout
        # Rank 0 hosts the store (tcp://, env://), not torchelastic's agent.
        self.hosted_by_rank0 = False
        self._joining = False  # counted in JOINING_KEY (a dynamic group's join)
        self._thread = _StoreThread()

    @classmethod
    async def join(
        cls, init_method: str, rank: int | None, world_size: int | None, timeout: float
    ) -> Rendezvous:
        """Join the group's store.

        Raises:
            ValueError: rank or world size missing or inconsistent.
            RpcTimeoutError: the store could not be reached in time.
        """
        if init_method.startswith("env://"):
            rank = int(os.environ["RANK"]) if rank is None and "RANK" in os.environ else rank
            if world_size is None and "WORLD_SIZE" in os.environ:
                world_size = int(os.environ["WORLD_SIZE"])
        dynamic = world_size is None
        if rank is None:
            # torch's words for either init method
            if init_method.startswith("env://"):
                raise ValueError(
                    "environment variable RANK expected, but not set: rank is required "
                    f"with init_method={init_method!r}"
                )
            raise ValueError(f"rank parameter missing: rank is required with {init_method!r}")
        if world_size is not None and (world_size < 1 or not 0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if dynamic and rank < 0:
            raise ValueError(f"a rank is >= 0, got {rank}")
        mode = b"dynamic" if dynamic else b"fixed"

        def connect() -> tuple[Store, int, int | None]:
            assert rank is not None
            delta = timedelta(seconds=timeout)
            address = _store_address(init_method)
            if address is not None:
                store = _tcp_store(*address, rank, world_size, delta)
                r, w = rank, world_size
            else:
                it = dist.rendezvous(  # type: ignore[attr-defined]
                    init_method,
                    rank=rank,
                    world_size=-1 if world_size is None else world_size,
                    timeout=delta,
                )
                store, r, w = next(it)
                store.set_timeout(delta)
                w = world_size
            # One kind of group per store: a fixed-size group and a dynamic one
            # cannot share it (what each would expect of the other is undefined).
            current = bytes(store.compare_set(_MODE_KEY, "", mode))  # type: ignore[arg-type]
            if current != mode:
                raise InvalidArgumentError(
                    "RPC group mixes statically and dynamically initialized members which is "
                    f"not supported: the group at {init_method} is {current.decode()!r} and "
                    f"this worker asked for a {mode.decode()!r} one (world_size={world_size}): "
                    "a group is either fixed-size (every worker passes world_size) or dynamic "
                    "(world_size=None)"
                )
            if dynamic:
                # Counted from the moment the store is reached, so that its host
                # does not close it under a join in progress (see joined()).
                store.add(JOINING_KEY, 1)
            return store, r, w

        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            try:
                store, r, w = await loop.run_in_executor(pool, connect)
            except RpcError:
                raise
            except (RuntimeError, TimeoutError) as exc:
                if "timeout" in str(exc).lower() or isinstance(exc, TimeoutError):
                    raise RpcTimeoutError(f"rendezvous at {init_method} timed out: {exc}") from exc
                raise
        hosted_by_rank0 = _store_address(init_method) is not None
        if w is None:  # dynamic: one group on the store, its state under DYNAMIC_PREFIX
            self = cls(store, r, None, DYNAMIC_PREFIX, timeout)
            self.hosted_by_rank0 = hosted_by_rank0
            self._joining = True
            return self
        # A generation per rank, so re-initialising on one store gets fresh keys;
        # every rank counts the same number of inits, so all agree on it.
        self = cls(store, r, w, "", timeout)
        self.hosted_by_rank0 = hosted_by_rank0
        gen = await self.call(store.add, f"aiorpc/gen/{r}", 1)
        self.prefix = f"aiorpc/{gen}/"
        return self

    async def call(self, fn: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """Run a blocking store call on the store thread.

        Raises:
            RpcTimeoutError: ``deadline`` (a ``time.monotonic()`` value) passed.
            RpcError: the store is unreachable (its host left, say).
        """
        fut = self._thread.submit(fn, *args)
        try:
            if deadline is None or deadline == float("inf"):
                return await fut
            return await asyncio.wait_for(fut, max(deadline - time.monotonic(), 0.001))
        except TimeoutError as exc:
            raise RpcTimeoutError("the rendezvous store did not answer in time") from exc
        except RuntimeError as exc:  # torch's DistNetworkError/DistStoreError
            if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
                raise RpcTimeoutError(f"rendezvous store timed out: {exc}") from exc
            raise RpcError(f"the rendezvous store is unreachable: {exc}") from exc

    async def bound(self, deadline: float) -> None:
        """Cut the store's own timeout to ``deadline``, so the store calls that
        follow (and the thread blocked in one) do not outlive it."""
        remaining = timedelta(seconds=max(deadline - time.monotonic(), 0.001))
        await self.call(self.store.set_timeout, remaining, deadline=deadline)

    async def exchange(self, me: Address) -> list[Address]:
        """Publish this worker's address and return every worker's, by rank.

        Raises:
            ValueError: a record in the store is malformed.
        """
        return [Address.unpack(v) for v in await self.exchange_records(me)]

    async def exchange_records(self, me: Address) -> list[bytes]:
        """Publish this worker's address; every worker's record as stored, by rank."""
        store = self.store
        assert self.world_size is not None, "a dynamic group has no fixed exchange"
        await self.call(store.set, f"{self.prefix}addr/{self.rank}", me.pack())
        keys = [f"{self.prefix}addr/{r}" for r in range(self.world_size)]
        try:
            await self.call(store.wait, keys, timedelta(seconds=self.timeout))
        except RpcTimeoutError as exc:
            raise RpcTimeoutError(f"not every worker joined within {self.timeout}s") from exc
        return [bytes(v) for v in await self.call(store.multi_get, keys)]

    async def publish_confirmation(self, confirmation: bytes) -> None:
        """Publish this worker's confirmation of the run (see handshake.py)."""
        await self.call(self.store.set, f"{self.prefix}confirm/{self.rank}", confirmation)

    async def confirmations(self) -> list[bytes]:
        """Every worker's confirmation of the run, by rank."""
        assert self.world_size is not None, "a dynamic group confirms no run"
        keys = [f"{self.prefix}confirm/{r}" for r in range(self.world_size)]
        try:
            await self.call(self.store.wait, keys, timedelta(seconds=self.timeout))
        except RpcTimeoutError as exc:
            raise RpcTimeoutError(f"not every worker confirmed within {self.timeout}s") from exc
        return [bytes(v) for v in await self.call(self.store.multi_get, keys)]

    async def _poll(self, key: str, deadline: float, stop: Callable[[], None]) -> int:
        """Poll the counter ``key`` until it reaches the world size; its value.

        Short store calls with sleeps in between, never a ``store.wait`` that
        may run out (see the module doc). ``stop()`` runs after each poll that
        found the count short and may raise to end the wait (a peer died, say):
        a complete count wins over a peer found gone meanwhile, which may have
        left because it saw that count.

        Raises:
            RpcTimeoutError: ``deadline`` passed.
            RpcError: the store is unreachable.
        """
        assert self.world_size is not None, "a dynamic group has no group-wide counts"
        delay = _POLL_MIN
        while True:
            count, complete = await self._count(key, deadline)
            if complete:
                return count
            try:
                stop()
            except RpcError:
                # The count read here may predate a peer's leave: one that saw
                # it complete (after this read) may be gone already, and was
                # found so while the read was in flight. Read it once more.
                count, complete = await self._count(key, deadline)
                if complete:
                    return count
                raise
            if time.monotonic() >= deadline:
                raise RpcTimeoutError(f"{count} of {self.world_size} workers arrived")
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, _POLL_MAX)

    async def _count(self, key: str, deadline: float) -> tuple[int, bool]:
        """The counter ``key``, and whether it reached the live world size."""
        assert self.world_size is not None
        count = int(await self.call(self.store.add, key, 0, deadline=deadline))
        return count, count >= self.world_size - await self._dead(deadline)

    async def barrier(
        self, tag: str, timeout: float, stop: Callable[[], None] = lambda: None
    ) -> None:
        """Wait until every worker reached the barrier ``tag``.

        Raises:
            RpcTimeoutError: not all arrived within ``timeout`` seconds.
            RpcError: the store is unreachable, or ``stop()`` raised it.
        """
        deadline = time.monotonic() + timeout  # may be inf: no limit
        key = f"{self.prefix}{tag}/arrived"
        try:
            await self.call(self.store.add, key, 1, deadline=deadline)
            await self._poll(key, deadline, stop)
        except RpcTimeoutError as exc:
            raise RpcTimeoutError(f"barrier {tag!r} timed out after {timeout}s: {exc}") from exc

    async def mark_dead(self, rank: int, deadline: float) -> None:
        """Count worker ``rank`` out of this group's shutdown votes (it was
        declared gone); once, whoever of the survivors marks it first."""
        if await self.call(self.store.add, f"{self.prefix}dead/{rank}", 1, deadline=deadline) == 1:
            await self.call(self.store.add, f"{self.prefix}dead", 1, deadline=deadline)

    async def _dead(self, deadline: float) -> int:
        """How many workers were counted out (:meth:`mark_dead`)."""
        return int(await self.call(self.store.add, f"{self.prefix}dead", 0, deadline=deadline))

    async def vote(
        self, tag: str, veto: bool, deadline: float, stop: Callable[[], None] = lambda: None
    ) -> bool:
        """A barrier that also tells whether any worker vetoed: True when every
        worker arrived at ``tag`` with ``veto`` False.

        Each worker adds its veto before it counts itself in, so once all are
        counted every veto is in and all workers read the same answer.

        Raises:
            RpcTimeoutError: ``deadline`` (``time.monotonic()``) passed first.
            RpcError: the store is unreachable, or ``stop()`` raised it.
        """
        key = f"{self.prefix}{tag}"
        if veto:
            await self.call(self.store.add, f"{key}/vetoes", 1, deadline=deadline)
        await self.call(self.store.add, f"{key}/arrived", 1, deadline=deadline)
        await self._poll(f"{key}/arrived", deadline, stop)
        vetoes = await self.call(self.store.add, f"{key}/vetoes", 0, deadline=deadline)
        return vetoes == 0

    async def leave(self, timeout: float) -> None:
        """Announce this worker is done with the store; the host (rank 0) waits,
        up to ``timeout``, until all others are, so nobody loses the store early."""
        store = self.store
        if self.world_size is None:
            # A dynamic group: Membership keeps its host until the others are
            # done (Membership.outlast); a join that failed is no longer one.
            await self.joined()
            return
        deadline = time.monotonic() + min(timeout, _CHUNK)
        key = f"{self.prefix}left"
        try:
            await self.bound(deadline)
            left = await self.call(store.add, key, 1, deadline=deadline)
            while (
                self.rank == 0
                and left < self.world_size - await self._dead(deadline)
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.01)
                left = await self.call(store.add, key, 0, deadline=deadline)
        except (RpcError, RuntimeError):
            pass  # the store's host is gone or stuck: nothing left to protect

    async def joined(self) -> None:
        """A dynamic group's join is over (done or failed): uncount it, once."""
        if self._joining:
            self._joining = False
            with contextlib.suppress(RpcError, RuntimeError):  # the host is gone: moot
                await self.call(self.store.add, JOINING_KEY, -1)

    def close(self) -> None:
        """Stop the store thread (the store goes when the last reference does)."""
        self._thread.close()


_CHUNK = 30.0  # seconds: the longest single store wait
# Seconds between polls of a store counter: from fast (a barrier that is
# almost complete ends at once) to a rate a long wait can afford.
_POLL_MIN = 0.002
_POLL_MAX = 0.05
_MODE_KEY = "aiorpc/mode"  # "fixed" or "dynamic": the kind of group the store hosts
DYNAMIC_PREFIX = "aiorpc/dyn/"  # a dynamic group's keys (see membership)
# Workers that reached a dynamic group's store and have not finished joining.
JOINING_KEY = DYNAMIC_PREFIX + "joining"


def _store_address(init_method: str) -> tuple[str, int] | None:
    """Host and port of the store for ``tcp://`` and plain ``env://``; None
    where torch's own handler must make the store (torchelastic's agent store)."""
    url = urlparse(init_method)
    if url.scheme == "tcp" and url.hostname and url.port:
        return url.hostname, url.port
    if url.scheme == "env" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        try:
            return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"env:// needs MASTER_ADDR and MASTER_PORT: {exc}") from exc
    return None


def _tcp_store(
    host: str, port: int, rank: int, world_size: int | None, timeout: timedelta
) -> Store:
    """A multi-tenant TCPStore hosted by rank 0 that listens on ``host`` only.

    torch's handlers bind the store to every interface whatever the URL says;
    here rank 0 binds the socket itself and hands it to the store. Where this
    process already serves a multi-tenant store on that port (a c10d process
    group made it first), that server is shared, as torch's env:// does. In a
    dynamic group (``world_size`` None) nobody waits for a number of workers,
    and a rank 0 that finds the port taken joins as a client (the group's
    rank 0 hosts it; the membership check then refuses a live holder of rank 0).

    Raises:
        RpcError: the port is held by something other than a store of this
            process (the message says what holds it).
    """
    wait = world_size is not None
    if rank != 0:
        return TCPStore(
            host, port, world_size, False, timeout, wait_for_workers=wait, multi_tenant=True
        )
    try:
        sock = socket.create_server((host, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        if not wait:
            return TCPStore(host, port, None, False, timeout, wait_for_workers=False)
        holder = _port_holder(port)
        if holder not in ("this process", None):
            raise RpcError(
                f"cannot host the rendezvous store on {host}:{port}: the port is held by "
                f"{holder}; pick a free MASTER_PORT (or init_method port)"
            ) from exc
        # Most likely a c10d store of this process: share its server.
        try:
            return TCPStore(host, port, world_size, True, timeout, multi_tenant=True)
        except RuntimeError as err:
            raise RpcError(
                f"cannot host the rendezvous store on {host}:{port}: the port is held by "
                f"{holder or 'another socket'} and it is not a multi-tenant c10d store "
                f"of this process ({err})"
            ) from exc
    return TCPStore(
        host,
        port,
        world_size,
        True,
        timeout,
        wait_for_workers=wait,
        multi_tenant=True,
        master_listen_fd=sock.detach(),
    )


def _port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` here: ``"this process"``, ``"process PID
    (command line)"``, ``"another user's process"``, or None when /proc cannot
    tell (not Linux)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as table_file:
                rows = table_file.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            # local address "HEX_IP:HEX_PORT", state 0A = LISTEN, inode at 9
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}

    def holds(pid: str) -> bool:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    return True
        return False

    if holds("self"):
        return "this process"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if holds(pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    cmd = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            return f"process {pid} ({cmd[:200]})"
    return "another user's process"


class _StoreThread:
    """One thread for every call on a store: torch's store objects are not safe
    to use from several threads at once, and a call stuck on a frozen store
    host must not keep the process from exiting (a daemon thread).

    At interpreter exit the thread is given the time of the call it is in to
    finish: a daemon thread that returns from a C++ store call after Python
    began finalising is ended by a forced unwind, which aborts the process
    ("terminate called without an active exception").
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="aiorpc-store", daemon=True)
        self._thread.start()
        _STORE_THREADS.add(self)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, fut, fn, args))
        return fut

    def close(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        """Stop taking calls and wait up to ``timeout`` for the current one."""
        self.close()
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, fut, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(_settle, fut, result, error)
            del item, loop, fut, fn, args, result, error


_STORE_THREADS: weakref.WeakSet[_StoreThread] = weakref.WeakSet()
# At exit, the longest wait for a store call in progress: calls are short
# (polls; a frozen store host is given its timeout, bounded by the agent).
_EXIT_JOIN_S = 30.0


@atexit.register
def _join_store_threads() -> None:
    deadline = time.monotonic() + _EXIT_JOIN_S
    for thread in list(_STORE_THREADS):
        thread.join(max(deadline - time.monotonic(), 0.0))


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
