"""Same-host shared memory for large frame buffers (sans-I/O).

Theory of operation
-------------------
Between two processes on one host, a frame buffer of at least a threshold
size need not go through the socket (two copies in the kernel, and a receive
into fresh pages that fault at ~1.7 GB/s). Instead:

* The sender keeps a pool of segments (``memfd``s, sealed against shrinking,
  mapped once). It copies the buffer into a free segment, sends the frame
  with that buffer empty, and appends a small *placement table* naming the
  segment (id, the sender's fd number, size) and the byte count.
* The receiver maps a segment the first time it is named (through
  ``/proc/<sender pid>/fd/<fd>``, which the kernel allows between processes
  of one user) and keeps the mapping; the buffer it hands out is a view of
  the segment, so the tensors built on it cost no copy. It maps (and
  prefaults) only the bytes the frame places there, whatever size the
  segment claims, and refuses a connection's segments past ``max_mapped``
  bytes mapped in all: a peer cannot make it map more than it sends.
* In copy mode (safe mode: peers are not trusted) the receiver copies the
  bytes out of the segment at once and releases it: the sender can still
  write to its segment, but not to a tensor the receiver already holds. The
  copies go into private buffers the receiver keeps and reuses the same way
  (a buffer comes back once the last view of it is gone), so a copy runs at
  memcpy speed rather than at the speed of faulting in fresh pages.
* The view is a *lease*: once the last object using it (tensor, array,
  memoryview) is gone, the receiver reports the segment released and the
  sender may reuse it. A reused segment is memory already touched, so the
  copy runs at memcpy speed.

The socket still carries every frame, in order; only the bytes move aside.
Segments live as long as the connection; a sender whose pool is at its cap
sends the buffer through the socket as usual.

This module does no socket I/O and imports no asyncio; the transport decides
when to use it and carries the tables and release notices.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from .errors import ProtocolError

__all__ = ["DEFAULT_POOL_BYTES", "ShmReceiver", "ShmSender", "peer_readable"]

#: Most bytes of segments one sender keeps per connection.
DEFAULT_POOL_BYTES = 2 << 30
# Most bytes of private copy buffers a copy-mode receiver keeps per connection
# (past it, copies go to fresh memory).
_COPY_POOL_BYTES = 256 << 20
_MIN_SEGMENT = 1 << 20
# buffer index u32, segment id u32, sender's fd u32, segment size u64, bytes u64
_ENTRY = struct.Struct("<IIIQQ")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def peer_readable(pid: int) -> bool:
    """Whether this process may open the file descriptors of process ``pid``."""
    try:
        os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    return True


def _segment_size(nbytes: int) -> int:
    return max(_MIN_SEGMENT, 1 << (nbytes - 1).bit_length())


class _Segment:
    __slots__ = ("fd", "id", "map", "size")

    def __init__(self, seg_id: int, size: int) -> None:
        self.id = seg_id
        self.size = size
        self.fd = os.memfd_create(f"aiorpc-{seg_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class ShmSender:
    """The sending side's segment pool for one connection.

    Args:
        threshold: buffers of at least this many bytes go through a segment.
        pool_bytes: most bytes of segments kept; past it buffers go inline.
    """

    def __init__(self, threshold: int, pool_bytes: int = DEFAULT_POOL_BYTES) -> None:
        self.threshold = threshold
        self._pool_bytes = pool_bytes
        self._bytes = 0
        self._next_id = 1
        self._free: dict[int, list[_Segment]] = {}  # segment size -> free segments
        self._busy: dict[int, _Segment] = {}  # id -> segment the peer still holds
        self._closed = False

    @property
    def segments(self) -> int:
        """Segments allocated (free or held by the peer)."""
        return sum(len(v) for v in self._free.values()) + len(self._busy)

    @property
    def held(self) -> int:
        """Segments the peer has not released yet."""
        return len(self._busy)

    def place(
        self, buffers: Sequence[memoryview | bytes]
    ) -> tuple[list[memoryview | bytes], bytes] | None:
        """Copy the large buffers into segments.

        Returns:
            ``(buffers, table)``: the buffers with each placed one replaced by
            an empty one, and the placement table to send as one more buffer;
            or None if nothing was placed (no large buffer, or pool full).
        """
        if self._closed:
            return None
        out: list[memoryview | bytes] | None = None
        table = bytearray()
        for i, buf in enumerate(buffers):
            n = len(buf) if isinstance(buf, bytes) else buf.nbytes
            if n < self.threshold:
                continue
            seg = self._take(n)
            if seg is None:
                continue
            # One plain memcpy: torch's copy_ would split a large copy across
            # its intra-op threads, and two workers sharing the cores then wait
            # on each other's preempted threads (milliseconds per copy).
            seg.map[:n] = buf if isinstance(buf, bytes) else buf.cast("B")
            if out is None:
                out = list(buffers)
            out[i] = b""
            table += _ENTRY.pack(i, seg.id, seg.fd, seg.size, n)
        if out is None:
            return None
        return out, bytes(table)

    def _take(self, nbytes: int) -> _Segment | None:
        size = _segment_size(nbytes)
        # An exact size class first, else a free segment up to 4x as large.
        for s in (size, size << 1, size << 2):
            free = self._free.get(s)
            if free:
                seg = free.pop()
                self._busy[seg.id] = seg
                return seg
        if self._bytes + size > self._pool_bytes:
            return None
        try:
            seg = _Segment(self._next_id, size)
        except OSError:
            return None  # out of memory or file descriptors: send inline
        self._next_id += 1
        self._bytes += size
        self._busy[seg.id] = seg
        return seg

    def release(self, seg_ids: Sequence[int]) -> None:
        """The peer is done with these segments.

        Raises:
            ProtocolError: an id that is not held by the peer.
        """
        if self._closed:
            return
        for seg_id in seg_ids:
            seg = self._busy.pop(seg_id, None) if type(seg_id) is int else None
            if seg is None:
                raise ProtocolError(f"release of unknown shared segment {seg_id!r}")
            self._free.setdefault(seg.size, []).append(seg)

    def close(self) -> None:
        """Unmap and close every segment (the peer's mappings stay valid)."""
        self._closed = True
        for free in self._free.values():
            for seg in free:
                seg.close()
        self._free.clear()
        for seg in self._busy.values():
            seg.close()
        self._busy.clear()
        self._bytes = 0


class ShmReceiver:
    """The receiving side: maps the peer's segments and leases views of them.

    Args:
        pid: the sending process (from the socket's peer credentials).
        on_release: called with a segment id once its view is no longer used;
            from whichever thread drops the last reference.
        max_bytes: most bytes one frame may place in segments.
        max_mapped: most bytes of the peer's segments mapped at once (page
            granular); a frame that would need more is a protocol error.
        copy: copy the placed bytes out at once and release the segment (the
            frame's buffers are then private to this process).
    """

    def __init__(
        self,
        pid: int,
        on_release: Callable[[int], None],
        max_bytes: int,
        max_mapped: int = DEFAULT_POOL_BYTES,
        copy: bool = False,
    ) -> None:
        self._pid = pid
        self._on_release = on_release
        self._max_bytes = max_bytes
        self._max_mapped = max_mapped
        self._copy = copy
        # Copy mode: private buffers by size, free for reuse (appended to by
        # finalizers in any thread: only atomic list/dict operations).
        self._spare: dict[int, list[mmap.mmap]] = {}
        self._spare_bytes = 0  # allocated, free or in use
        self._closed = False
        self._mapped = 0  # bytes (whole pages) of the peer's segments mapped here
        self._maps: dict[int, tuple[int, mmap.mmap]] = {}  # id -> (size, mapping)
        # Changed by finalizers too, which may run in any thread or in the middle
        # of this object's own code (a collection): only atomic set operations.
        self._leased: set[int] = set()

    @property
    def leased(self) -> int:
        """Segments whose views are still in use here."""
        return len(self._leased)

    @property
    def mapped(self) -> int:
        """Bytes of the peer's segments mapped here."""
        return self._mapped

    def take(self, buffers: list[memoryview]) -> list[memoryview]:
        """Resolve a frame's placement table (its last buffer) into views.

        Raises:
            ProtocolError: a malformed table, or a segment that cannot be mapped.
        """
        if not buffers:
            raise ProtocolError("shared-memory frame without a placement table")
        table = buffers[-1]
        out = buffers[:-1]
        if len(table) % _ENTRY.size:
            raise ProtocolError("malformed shared-memory placement table")
        total = 0
        placed: list[tuple[int, int, int, int, int]] = []
        for entry in _ENTRY.iter_unpack(table):
            index, seg_id, fd, size, nbytes = entry
            total += nbytes
            if (
                index >= len(out)
                or len(out[index])
                or not 0 < nbytes <= size
                or total > self._max_bytes
                or seg_id in self._leased
                or any(p[0] == index or p[1] == seg_id for p in placed)
            ):
                raise ProtocolError("bad shared-memory placement")
            placed.append(entry)
        for index, seg_id, fd, size, nbytes in placed:
            arr = np.frombuffer(self._map(seg_id, fd, size, nbytes), dtype=np.uint8, count=nbytes)
            if self._copy:
                # Private bytes: what the sender writes from now on is not seen.
                out[index] = self._copied(arr)
                del arr
                self._on_release(seg_id)
                continue
            self._leased.add(seg_id)
            weakref.finalize(arr, self._released, seg_id).atexit = False
            out[index] = memoryview(arr)  # type: ignore[arg-type]
        return out

    def _copied(self, src: np.ndarray) -> memoryview:
        """A private copy of ``src``, in a reused buffer when one is free."""
        nbytes = len(src)
        size = _segment_size(nbytes)
        free = self._spare.get(size)
        buf = None
        if free:
            with contextlib.suppress(IndexError):  # a finalizer may race us
                buf = free.pop()
        if buf is None:
            if self._spare_bytes + size > _COPY_POOL_BYTES:
                return memoryview(src.copy())  # type: ignore[arg-type]
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._spare_bytes += size
        dst = np.frombuffer(buf, dtype=np.uint8, count=nbytes)
        np.copyto(dst, src)
        weakref.finalize(dst, self._spare_back, size, buf).atexit = False
        return memoryview(dst)  # type: ignore[arg-type]

    def _spare_back(self, size: int, buf: mmap.mmap) -> None:
        if not self._closed:
            self._spare.setdefault(size, []).append(buf)

    def _released(self, seg_id: int) -> None:
        self._leased.discard(seg_id)
        self._on_release(seg_id)

    def _map(self, seg_id: int, fd: int, size: int, nbytes: int) -> mmap.mmap:
        """The mapping of segment ``seg_id`` covering at least its first
        ``nbytes`` (mapped anew, larger, when a later frame places more)."""
        known = self._maps.get(seg_id)
        old = 0
        if known is not None:
            if known[0] != size:
                raise ProtocolError(f"shared segment {seg_id} changed size")
            if len(known[1]) >= nbytes:
                return known[1]
            # Placed again with more bytes: its views are released (leases are
            # exclusive), so the smaller mapping can go.
            old = _pages(len(known[1]))
        need = self._mapped - old + _pages(nbytes)
        if need > self._max_mapped:
            raise ProtocolError(
                f"shared segments of the peer would take {need} bytes mapped, "
                f"over the limit of {self._max_mapped}"
            )
        try:
            local = os.open(f"/proc/{self._pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ProtocolError(f"cannot open shared segment {seg_id}: {exc}") from exc
        try:
            seals = fcntl.fcntl(local, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK or os.fstat(local).st_size < size:
                raise ProtocolError(f"shared segment {seg_id} is not sealed or too small")
            # Only the placed bytes are mapped and prefaulted: the segment's
            # claimed size (a sparse file, say) costs nothing here.
            mapping = mmap.mmap(local, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as exc:
            raise ProtocolError(f"cannot map shared segment {seg_id}: {exc}") from exc
        finally:
            os.close(local)
        self._maps[seg_id] = (size, mapping)
        self._mapped = need
        return mapping

    def close(self) -> None:
        """Forget the mappings (each is unmapped once its last view is gone)."""
        self._closed = True
        self._maps.clear()
        self._mapped = 0
        self._spare.clear()


def _pages(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
