"""Group rendezvous through PyTorch's own store (``TCPStore``).

Blocking store calls are made on a dedicated thread so the event loop keeps
serving. ``init_method`` is ``tcp://HOST:PORT`` (rank 0 hosts the store) or
``env://`` (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, as torchrun sets them,
including ``TORCHELASTIC_USE_AGENT_STORE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlparse

import msgpack
import torch.distributed as dist
from torch.distributed import Store, TCPStore  # type: ignore[attr-defined]

from .errors import RpcError, RpcTimeoutError

__all__ = ["Address", "Rendezvous"]

T = TypeVar("T")


@dataclass(frozen=True)
class Address:
    """Where a worker listens, as published in the store."""

    name: str
    rank: int
    host: str
    port: int
    unix_path: str
    host_id: str
    token_proof: bytes = b""  # handshake.token_proof, when the group has a token
    # For the device maps (aiorpc_autograd.devices): this worker's CUDA device
    # count and its maps {peer: {local: remote}}, checked by both ends.
    cuda_devices: int = 0
    device_maps: dict[str, dict[str, str]] = field(default_factory=dict)

    def pack(self) -> bytes:
        return msgpack.packb(  # type: ignore[no-any-return]
            [
                self.name,
                self.rank,
                self.host,
                self.port,
                self.unix_path,
                self.host_id,
                self.token_proof,
                self.cuda_devices,
                self.device_maps,
            ]
        )

    @classmethod
    def unpack(cls, data: bytes) -> Address:
        name, rank, host, port, unix_path, host_id, proof, cuda, maps = msgpack.unpackb(data)
        if type(cuda) is not int or type(maps) is not dict:
            raise RpcError("malformed address record in the rendezvous store")
        return cls(name, rank, host, port, unix_path, host_id, proof, cuda, maps)


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
            raise ValueError(
                f"rank is required with init_method={init_method!r} (or set RANK for env://)"
            )
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
                raise ValueError(
                    f"the group at {init_method} is {current.decode()!r} and this worker asked "
                    f"for a {mode.decode()!r} one (world_size={world_size}): a group is either "
                    "fixed-size (every worker passes world_size) or dynamic (world_size=None)"
                )
            return store, r, w

        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            try:
                store, r, w = await loop.run_in_executor(pool, connect)
            except (RuntimeError, TimeoutError) as exc:
                if "timeout" in str(exc).lower() or isinstance(exc, TimeoutError):
                    raise RpcTimeoutError(f"rendezvous at {init_method} timed out: {exc}") from exc
                raise
        if w is None:  # dynamic: one group on the store, its state under aiorpc/dyn/
            return cls(store, r, None, "aiorpc/dyn/", timeout)
        # A generation per rank, so re-initialising on one store gets fresh keys;
        # every rank counts the same number of inits, so all agree on it.
        self = cls(store, r, w, "", timeout)
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
            if deadline is None:
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
        """Publish this worker's address and return every worker's, by rank."""
        store = self.store
        assert self.world_size is not None, "a dynamic group has no fixed exchange"
        await self.call(store.set, f"{self.prefix}addr/{self.rank}", me.pack())
        keys = [f"{self.prefix}addr/{r}" for r in range(self.world_size)]
        try:
            await self.call(store.wait, keys, timedelta(seconds=self.timeout))
        except RpcTimeoutError as exc:
            raise RpcTimeoutError(f"not every worker joined within {self.timeout}s") from exc
        values = await self.call(store.multi_get, keys)
        return [Address.unpack(v) for v in values]

    async def barrier(self, tag: str, timeout: float) -> None:
        """Wait until every worker reached the barrier ``tag``.

        Raises:
            RpcTimeoutError: not all arrived within ``timeout`` seconds.
        """
        store = self.store
        deadline = time.monotonic() + timeout  # may be inf: no limit
        key = f"{self.prefix}{tag}"
        arrived: int | None = None
        while True:  # store calls take finite timeouts: wait in chunks
            chunk = min(deadline, time.monotonic() + _CHUNK)
            await self.bound(chunk)
            try:
                if arrived is None:
                    arrived = await self.call(store.add, f"{key}/arrived", 1, deadline=chunk)
                    if arrived == self.world_size:
                        await self.call(store.set, f"{key}/done", b"1", deadline=chunk)
                remaining = timedelta(seconds=max(chunk - time.monotonic(), 0.001))
                await self.call(store.wait, [f"{key}/done"], remaining, deadline=chunk)
                return
            except RpcTimeoutError as exc:
                if time.monotonic() >= deadline:
                    raise RpcTimeoutError(f"barrier {tag!r} timed out after {timeout}s") from exc

    async def leave(self, timeout: float) -> None:
        """Announce this worker is done with the store; the host (rank 0) waits,
        up to ``timeout``, until all others are, so nobody loses the store early."""
        store = self.store
        if self.world_size is None:
            return  # a dynamic group: the store's host simply stays
        deadline = time.monotonic() + min(timeout, _CHUNK)
        key = f"{self.prefix}left"
        try:
            await self.bound(deadline)
            left = await self.call(store.add, key, 1, deadline=deadline)
            while self.rank == 0 and left < self.world_size and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                left = await self.call(store.add, key, 0, deadline=deadline)
        except (RpcError, RuntimeError):
            pass  # the store's host is gone or stuck: nothing left to protect

    def close(self) -> None:
        """Stop the store thread (the store goes when the last reference does)."""
        self._thread.close()


_CHUNK = 30.0  # seconds: the longest single store wait
_MODE_KEY = "aiorpc/mode"  # "fixed" or "dynamic": the kind of group the store hosts


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
    """A TCPStore hosted by rank 0 that listens on ``host`` only.

    torch's handlers bind the store to every interface whatever the URL says;
    here rank 0 binds the socket itself and hands it to the store. In a
    dynamic group (``world_size`` None) rank 0 hosts it too, and nobody waits
    for a number of workers.
    """
    wait = world_size is not None
    if rank == 0:
        try:
            listen_fd = socket.create_server((host, port)).detach()  # the store owns it
        except OSError as exc:
            if wait or exc.errno != errno.EADDRINUSE:
                raise
            # A dynamic group's rank 0 is already up (its store listens here): this
            # worker joins as a client, and the membership check refuses a live
            # holder of its rank.
            return TCPStore(host, port, None, False, timeout, wait_for_workers=False)
        return TCPStore(
            host, port, world_size, True, timeout, wait_for_workers=wait, master_listen_fd=listen_fd
        )
    return TCPStore(host, port, world_size, False, timeout, wait_for_workers=wait)


class _StoreThread:
    """One daemon thread for every call on a store: torch's store objects are
    not safe to use from several threads at once, and a call stuck on a frozen
    store host must not keep the process from exiting."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="aiorpc-store", daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, fut, fn, args))
        return fut

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, fut, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(_settle, fut, result, error)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
