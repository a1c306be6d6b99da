"""Frame format and an incremental frame reader (sans-I/O).

Theory of operation
-------------------
A connection carries a stream of frames. Each frame is::

    prefix   24 bytes, little-endian: magic b"ARPC", version u8, flags u8,
             reserved u16 (0), header_len u32, n_buffers u32, body_len u64
    lengths  n_buffers x u64: the byte length of each buffer
    header   header_len bytes (msgpack, opaque to this layer)
    tag      TAG_SIZE bytes, on an authenticated connection only (FrameMac)
    body     body_len bytes: the buffers, each starting at an offset that is a
             multiple of ALIGN from the start of the body (zero padding between)

On a connection with a session key (the group has an auth token), every frame
carries a tag: a keyed BLAKE2b MAC of an implicit per-direction sequence
number and the frame's prefix, lengths and header (:class:`FrameMac`). The
reader checks it as soon as those bytes are in, before the frame's body is
allocated or the frame is returned, so a frame crafted, altered, replayed,
reordered or dropped by someone without the key fails with
:class:`AuthenticationError`. The body (tensor bytes) is not covered.

The reader checks every size against :class:`Limits` as soon as the prefix is
known, *before* it allocates anything, and raises :class:`ProtocolError` on a
bad magic, an unknown version, a reserved field that is not zero, inconsistent
lengths or a frame over the limits. After an error the reader stays failed.

What a connection costs in memory follows the bytes it delivered, never the
lengths it claims: the scratch buffer starts small and grows (doubling) only
as bytes arrive, up to what the frame being read needs; a body of at most
``EAGER_BODY`` bytes is allocated when its prefix is in (a bounded cost), a
larger one is an anonymous mapping the kernel backs page by page as the bytes
land in it (no zero-fill, no copy: the same single receive into the buffer).

A reader can be *gated* (``gate=``): until :meth:`FrameReader.open` it
applies the gate's (small) limits, returns at most one frame and then holds
the rest unparsed. Connections use it so a peer that has not yet said who it
is can only send one small frame (its Hello) and nothing that costs memory.

Bytes can be pushed two ways: :meth:`FrameReader.feed` (any chunking), or the
zero-copy pair :meth:`FrameReader.get_buffer` / :meth:`FrameReader.buffer_updated`
used by ``asyncio.BufferedProtocol``. Small frames are parsed out of a reusable
scratch buffer (many per read); the body of a large frame is read straight into
its own ``bytearray``, which the frame's buffers then view without a copy.

This module does no I/O and imports no asyncio.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import AuthenticationError, ProtocolError

__all__ = [
    "ALIGN",
    "EAGER_BODY",
    "MAGIC",
    "PREFIX_SIZE",
    "TAG_SIZE",
    "VERSION",
    "Frame",
    "FrameMac",
    "FrameReader",
    "Limits",
    "encode_frame",
]

MAGIC = b"ARPC"
VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<4sBBHIIQ")
PREFIX_SIZE = _PREFIX.size  # 24
_U64 = struct.Struct("<Q")
_ZEROS = bytes(ALIGN)
#: A frame body of at most this many bytes is allocated whole as soon as its
#: prefix is in; a larger one is backed by memory only as its bytes arrive.
EAGER_BODY = 1 << 20
# The scratch buffer's first size: small, so an idle or unauthenticated
# connection costs a few KiB; it grows as bytes arrive.
_FIRST_SCRATCH = 4096
# Linux's MAP_NORESERVE (not exported by Python < 3.13's mmap module): a large
# body's mapping is not charged against the commit limit up front.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


TAG_SIZE = 16


class FrameMac:
    """Authenticates the frames of one direction of a connection.

    The tag of the n-th frame (n = 0, 1, ...) is
    ``BLAKE2b(key=key, person=b"aiorpc-frame", digest_size=16)`` of ``u64 n``
    followed by the frame's prefix, lengths and header. The sequence number is
    implicit (both sides count), so a replayed, reordered, dropped or foreign
    frame fails. Keyed BLAKE2b costs about a third of HMAC-SHA256 on these
    short inputs (one compression, no inner/outer hash).

    Args:
        key: this direction's session key (up to 64 bytes).
    """

    __slots__ = ("_base", "_seq")

    def __init__(self, key: bytes) -> None:
        self._base = hashlib.blake2b(key=key, digest_size=TAG_SIZE, person=b"aiorpc-frame")
        self._seq = 0

    def tag(self, meta: bytes | bytearray | memoryview) -> bytes:
        """The tag of the next frame, whose prefix, lengths and header are ``meta``."""
        h = self._base.copy()
        h.update(_U64.pack(self._seq))
        h.update(meta)
        self._seq += 1
        return h.digest()

    def verify(self, meta: bytes | bytearray | memoryview, tag: bytes | bytearray) -> None:
        """Check the tag of the next received frame.

        Raises:
            AuthenticationError: it does not verify.
        """
        if not hmac.compare_digest(self.tag(meta), tag):
            raise AuthenticationError(
                f"frame {self._seq - 1} failed authentication (altered, replayed, "
                "reordered or injected)"
            )


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits checked before any allocation.

    Attributes:
        max_message_size: most bytes after the prefix (lengths, header and body).
        max_header_size: most bytes of header.
        max_buffers: most buffers in one frame.
    """

    max_message_size: int = 4 << 30
    max_header_size: int = 64 << 20
    max_buffers: int = 65536


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame: flags, header bytes, and the buffers as writable views."""

    flags: int
    header: bytes
    buffers: list[memoryview]


def encode_frame(
    header: bytes,
    buffers: Sequence[memoryview | bytes] = (),
    flags: int = 0,
    mac: FrameMac | None = None,
) -> list[bytes | memoryview]:
    """Lay out one frame as a list of chunks for ``transport.writelines``.

    The buffers are not copied: the returned list refers to them.

    Args:
        header: the header bytes.
        buffers: byte buffers (C-contiguous; memoryviews are cast to bytes).
        flags: frame flags (0..255).
        mac: on an authenticated connection, the sending direction's
            :class:`FrameMac`: the frame gets its tag (and its sequence number,
            so frames must go out in the order they are encoded).

    Returns:
        The chunks, in wire order.
    """
    views = [
        b if isinstance(b, bytes) or (b.ndim == 1 and b.format == "B") else b.cast("B")
        for b in buffers
    ]
    lengths = [len(v) for v in views]
    body_len = 0
    for n in lengths[:-1]:
        body_len += _aligned(n)
    if lengths:
        body_len += lengths[-1]
    meta = bytearray(_PREFIX.pack(MAGIC, VERSION, flags, 0, len(header), len(views), body_len))
    for n in lengths:
        meta += _U64.pack(n)
    meta += header
    if mac is not None:
        meta += mac.tag(meta)
    chunks: list[bytes | memoryview] = [bytes(meta)]
    for i, v in enumerate(views):
        if len(v):
            chunks.append(v)
        if i < len(views) - 1 and lengths[i] % ALIGN:
            chunks.append(_ZEROS[: ALIGN - lengths[i] % ALIGN])
    return chunks


class FrameReader:
    """Incremental frame parser; see the module docstring.

    Args:
        limits: size limits.
        scratch_size: size the reusable buffer small frames are read into
            grows to while bytes keep arriving (it starts at a few KiB; a frame
            larger than this grows it further while it is read).
        direct_threshold: a frame body at least this large, if not already
            complete in the scratch buffer, is read straight into its own buffer.
        gate: limits applied until :meth:`open` is called; while gated the
            reader returns at most one frame and then holds what follows.
        mac: on an authenticated connection, the receiving direction's
            :class:`FrameMac`: every frame's tag is checked before its body is
            allocated or the frame is returned.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        scratch_size: int = 256 * 1024,
        direct_threshold: int = 0,
        gate: Limits | None = None,
        mac: FrameMac | None = None,
    ) -> None:
        self._limits = limits or Limits()
        self._gate = gate
        self._mac = mac
        self._tag_size = TAG_SIZE if mac is not None else 0
        self._holding = False
        self._scratch_size = max(scratch_size, PREFIX_SIZE)
        self._scratch = bytearray(min(self._scratch_size, _FIRST_SCRATCH))
        self._start = 0
        self._end = 0
        # Bytes (from _start) the frame being read needs in the scratch buffer.
        self._want = PREFIX_SIZE
        self._offered = 0  # size of the last scratch view handed out
        self._grow = False  # the last read filled it: more is coming, grow
        self._direct_threshold = direct_threshold
        # Direct-body state: a frame whose body is being read into its own buffer.
        self._body: bytearray | mmap.mmap | None = None
        self._body_view: memoryview | None = None
        self._filled = 0
        self._pending: tuple[int, bytes, list[int]] | None = None
        self._pending_meta = 0  # prefix, lengths and header of that frame
        self._failed: ProtocolError | AuthenticationError | None = None

    @property
    def gated(self) -> bool:
        """True until :meth:`open`: the gate's limits apply, one frame at most."""
        return self._gate is not None

    @property
    def holding(self) -> bool:
        """True once a gated reader returned its frame: nothing more is parsed
        until :meth:`open`."""
        return self._holding

    def open(self) -> list[Frame]:
        """Lift the gate: the full limits apply from the next frame on.

        Returns:
            The frames already received after the gated one.

        Raises:
            ProtocolError: those bytes are malformed or over the limits.
        """
        self._gate = None
        self._holding = False
        return self.buffer_updated(0)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return self._end - self._start + self._filled + self._pending_meta

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Push bytes (any chunking) and return the frames they complete."""
        src = memoryview(data).cast("B")
        frames: list[Frame] = []
        while src:
            buf = self.get_buffer()
            n = min(len(buf), len(src))
            buf[:n] = src[:n]
            src = src[n:]
            frames.extend(self.buffer_updated(n))
        return frames

    def get_buffer(self) -> memoryview:
        """Return a writable view the next received bytes should go into."""
        if self._failed is not None:
            raise self._failed
        if self._body_view is not None:
            return self._body_view[self._filled :]
        if self._grow or self._end == len(self._scratch):
            self._make_room()
        view = memoryview(self._scratch)[self._end :]
        self._offered = len(view)
        return view

    def _make_room(self) -> None:
        """Compact the scratch buffer, and grow it (doubling) when it is more
        than half full or the last read filled it: bytes that arrived, never a
        claimed length, decide its size."""
        grow, self._grow = self._grow, False
        self._compact()
        size = len(self._scratch)
        cap = max(self._scratch_size, self._want)
        if self._holding:
            # Held bytes wait for open(); the owner stops reading meanwhile.
            cap = max(cap, 2 * size)
        if size < cap and (grow or 2 * self._end > size):
            grown = bytearray(min(2 * size, cap))
            grown[: self._end] = self._scratch[: self._end]
            self._scratch = grown

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Record that ``nbytes`` were written into the last :meth:`get_buffer`.

        Returns:
            The frames completed so far.

        Raises:
            ProtocolError: the stream is malformed or over the limits.
            AuthenticationError: a frame's tag does not verify.
        """
        if self._failed is not None:
            raise self._failed
        if self._body is not None:
            self._filled += nbytes
            if self._filled < len(self._body):
                return []
            assert self._pending is not None
            flags, header, lengths = self._pending
            frame = Frame(flags, header, _split(self._body, lengths))
            self._body = self._body_view = self._pending = None
            self._filled = self._pending_meta = 0
            if self._gate is not None:
                self._holding = True
            return [frame]
        if nbytes and nbytes == self._offered and len(self._scratch) < self._scratch_size:
            self._grow = True
        self._offered = 0
        self._end += nbytes
        if self._holding:
            return []
        try:
            return self._parse()
        except (ProtocolError, AuthenticationError) as exc:
            self._failed = exc
            raise

    def grow(self, scratch_size: int) -> None:
        """Let the scratch buffer grow up to ``scratch_size`` bytes (a reader
        made small for a connection that has not proven itself yet); it still
        grows only as bytes arrive."""
        self._scratch_size = max(self._scratch_size, scratch_size)

    def _check_tag(self, start: int, meta_len: int) -> None:
        """Verify the tag of the frame whose meta (tag included) is at ``start``."""
        if self._mac is not None:
            at = start + meta_len - TAG_SIZE
            # Slices copy ~100 bytes: cheaper than memoryviews for such sizes.
            self._mac.verify(self._scratch[start:at], self._scratch[at : at + TAG_SIZE])

    def _compact(self) -> None:
        if self._start:
            n = self._end - self._start
            self._scratch[:n] = self._scratch[self._start : self._end]
            self._start, self._end = 0, n

    def _parse(self) -> list[Frame]:
        frames: list[Frame] = []
        lim = self._gate or self._limits
        scratch = self._scratch
        self._want = PREFIX_SIZE
        while self._end - self._start >= PREFIX_SIZE:
            if self._gate is not None and frames:
                self._holding = True  # one frame while gated
                break
            start = self._start
            magic, version, flags, reserved, header_len, nbuf, body_len = _PREFIX.unpack_from(
                scratch, start
            )
            if magic != MAGIC:
                raise ProtocolError(f"bad frame magic {bytes(magic)!r}")
            if version != VERSION:
                raise ProtocolError(f"unsupported protocol version {version} (speaks {VERSION})")
            if reserved:
                raise ProtocolError("reserved prefix field is not zero")
            if header_len > lim.max_header_size:
                raise ProtocolError(
                    f"header of {header_len} bytes exceeds the limit of {lim.max_header_size}"
                )
            if nbuf > lim.max_buffers:
                raise ProtocolError(f"{nbuf} buffers exceed the limit of {lim.max_buffers}")
            total = 8 * nbuf + header_len + body_len
            if total > lim.max_message_size:
                raise ProtocolError(
                    f"message of {total} bytes exceeds max_message_size={lim.max_message_size}"
                )
            meta_len = PREFIX_SIZE + 8 * nbuf + header_len + self._tag_size
            avail = self._end - start
            if avail < meta_len:
                self._want = meta_len  # the scratch buffer grows as it arrives
                break
            pos = start + PREFIX_SIZE
            lengths = [_U64.unpack_from(scratch, pos + 8 * i)[0] for i in range(nbuf)]
            expect = sum(_aligned(n) for n in lengths[:-1]) + (lengths[-1] if lengths else 0)
            if expect != body_len:
                raise ProtocolError(
                    f"buffer lengths add up to {expect} bytes but the body has {body_len}"
                )
            pos += 8 * nbuf
            header = bytes(scratch[pos : pos + header_len])
            pos += header_len + self._tag_size
            have = avail - meta_len
            if have >= body_len:
                self._check_tag(start, meta_len)
                body = scratch[pos : pos + body_len]  # (a slice: a copy)
                self._start = pos + body_len
                frames.append(Frame(flags, header, _split(body, lengths)))
                continue
            if body_len < self._direct_threshold:
                # Wait for the rest in the scratch buffer (grown as it arrives).
                self._want = meta_len + body_len
                break
            self._check_tag(start, meta_len)
            direct = _new_body(body_len)
            direct[:have] = scratch[pos : pos + have]
            self._start = self._end = 0
            self._shrink()
            self._body, self._body_view = direct, memoryview(direct)
            self._filled = have
            self._pending = (flags, header, lengths)
            self._pending_meta = meta_len
            break
        if self._gate is not None and frames:
            self._holding = True
        if self._start == self._end:
            self._start = self._end = 0
            self._shrink()
        return frames

    def _shrink(self) -> None:
        """An empty scratch buffer grown past its size for one large frame
        goes back to its size."""
        if self._start == self._end and len(self._scratch) > self._scratch_size:
            self._scratch = bytearray(self._scratch_size)


def _new_body(size: int) -> bytearray | mmap.mmap:
    """A writable buffer for a frame body of ``size`` bytes.

    Up to :data:`EAGER_BODY` a ``bytearray`` (a bounded cost); beyond, an
    anonymous private mapping: the kernel backs a page with memory when the
    received bytes are first written to it, so a claimed length costs address
    space, not memory, and nothing is zero-filled in advance.
    """
    if size <= EAGER_BODY:
        return bytearray(size)
    try:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    except OSError as exc:
        raise ProtocolError(f"cannot reserve {size} bytes for a frame body: {exc}") from exc


def _split(body: bytearray | mmap.mmap, lengths: list[int]) -> list[memoryview]:
    view = memoryview(body)
    out = []
    pos = 0
    for n in lengths:
        out.append(view[pos : pos + n])
        pos += _aligned(n)
    return out
