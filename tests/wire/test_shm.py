"""The shared-memory segment pool and leases (sans-I/O), in one process: the
receiver maps this process's own segments through /proc/self's pid."""

from __future__ import annotations

import gc
import os
import struct
import threading

import numpy as np
import pytest
import torch

from aiorpc_autograd.errors import ProtocolError
from aiorpc_autograd.shm import ShmReceiver, ShmSender, peer_readable

MiB = 1 << 20
_ENTRY = struct.Struct("<IIIQQ")


class Pair:
    """A sender and a receiver wired back to back (releases go straight back)."""

    def __init__(self, threshold: int = MiB, pool_bytes: int = 64 * MiB) -> None:
        self.tx = ShmSender(threshold, pool_bytes)
        self.released: list[int] = []
        self.rx = ShmReceiver(os.getpid(), self.released.append, max_bytes=1 << 30)

    def send(self, buffers: list[memoryview | bytes]) -> list[memoryview]:
        placed = self.tx.place(buffers)
        assert placed is not None
        out, table = placed
        return self.rx.take(
            [memoryview(b) if isinstance(b, bytes) else b for b in out] + [memoryview(table)]
        )

    def release(self) -> None:
        gc.collect()
        self.tx.release(self.released)
        self.released.clear()


def payload(nbytes: int, seed: int = 0) -> memoryview:
    g = torch.Generator().manual_seed(seed)
    return memoryview(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).numpy())


def test_peer_readable() -> None:
    assert peer_readable(os.getpid())
    assert not peer_readable(2**22 + 12345)  # no such process


def test_large_buffers_move_small_stay() -> None:
    pair = Pair()
    small, big = payload(100, 1), payload(3 * MiB, 2)
    out = pair.send([small, big, b""])
    assert bytes(out[0]) == bytes(small)  # below the threshold: untouched
    assert bytes(out[1]) == bytes(big)
    assert out[2].nbytes == 0
    assert pair.tx.segments == 1 and pair.tx.held == 1 and pair.rx.leased == 1


def test_nothing_to_place() -> None:
    pair = Pair()
    assert pair.tx.place([payload(10), b"abc"]) is None
    assert pair.tx.place([]) is None
    assert pair.tx.segments == 0


def test_lease_released_when_last_view_dies() -> None:
    pair = Pair()
    data = payload(2 * MiB)
    (view,) = pair.send([data])
    t = torch.frombuffer(view, dtype=torch.uint8)  # a tensor built on the view
    del view
    gc.collect()
    assert pair.released == []  # the tensor still uses the segment
    assert torch.equal(t, torch.frombuffer(data, dtype=torch.uint8))
    del t
    gc.collect()
    assert len(pair.released) == 1 and pair.rx.leased == 0


def test_released_segments_are_reused() -> None:
    pair = Pair()
    for i in range(20):
        data = payload(2 * MiB, i)
        (view,) = pair.send([data])
        assert bytes(view) == bytes(data)
        del view
        pair.release()
    assert pair.tx.segments == 1 and pair.tx.held == 0


def test_held_segment_is_not_reused() -> None:
    pair = Pair()
    (kept,) = pair.send([payload(MiB, 1)])
    (other,) = pair.send([payload(MiB, 2)])
    assert bytes(kept) == bytes(payload(MiB, 1))  # not overwritten by the second send
    assert pair.tx.segments == 2
    del other
    pair.release()
    (third,) = pair.send([payload(MiB, 3)])
    assert pair.tx.segments == 2  # the released one came back
    assert bytes(kept) == bytes(payload(MiB, 1))
    del third


def test_pool_cap_sends_inline() -> None:
    pair = Pair(pool_bytes=4 * MiB)
    (a,) = pair.send([payload(3 * MiB)])  # a 4 MiB segment: the whole pool
    assert pair.tx.place([payload(3 * MiB)]) is None  # full: the caller sends it inline
    del a


def test_written_view_reaches_no_one_else() -> None:
    pair = Pair()
    (view,) = pair.send([payload(MiB, 5)])
    arr = np.frombuffer(view, dtype=np.uint8)
    arr[:] = 7  # received buffers are writable
    assert arr.sum() == 7 * MiB


def test_release_from_another_thread() -> None:
    pair = Pair()
    (view,) = pair.send([payload(MiB)])
    holder = [view]
    del view
    th = threading.Thread(target=holder.clear)
    th.start()
    th.join()
    gc.collect()
    assert len(pair.released) == 1


def test_close_keeps_peer_views_valid() -> None:
    pair = Pair()
    data = payload(MiB, 9)
    (view,) = pair.send([data])
    pair.tx.close()
    pair.rx.close()
    assert bytes(view) == bytes(data)
    del view
    gc.collect()
    pair.tx.release(pair.released)  # late releases after close are fine


def test_release_of_unknown_segment() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="unknown shared segment"):
        pair.tx.release([42])


def _table(*entries: tuple[int, int, int, int, int]) -> memoryview:
    return memoryview(b"".join(_ENTRY.pack(*e) for e in entries))


@pytest.mark.parametrize(
    ("buffers", "table", "match"),
    [
        ([], None, "without a placement table"),
        ([b""], b"xyz", "malformed"),
        ([b""], (1, 1, 0, MiB, 10), "bad shared-memory placement"),  # index out of range
        ([b"x"], (0, 1, 0, MiB, 10), "bad shared-memory placement"),  # buffer not empty
        ([b""], (0, 1, 0, MiB, 2 * MiB), "bad shared-memory placement"),  # over the segment
        ([b""], (0, 1, 999_999, MiB, 10), "cannot open shared segment"),  # no such fd
    ],
)
def test_bad_tables(buffers: list[bytes], table: object, match: str) -> None:
    rx = ShmReceiver(os.getpid(), lambda _: None, max_bytes=1 << 30)
    views = [memoryview(b) for b in buffers]
    if isinstance(table, tuple):
        views.append(_table(table))
    elif table is not None:
        views.append(memoryview(table))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=match):
        rx.take(views)


def test_duplicate_and_unsealed_and_oversized() -> None:
    pair = Pair()
    placed = pair.tx.place([payload(MiB), payload(MiB, 1)])
    assert placed is not None
    (_, table) = placed
    first = table[: _ENTRY.size]
    _, seg_id, fd, size, n = _ENTRY.unpack(first)
    # The same buffer twice, and one segment named for two buffers.
    with pytest.raises(ProtocolError, match="bad shared-memory placement"):
        pair.rx.take([memoryview(b""), memoryview(first + first)])
    with pytest.raises(ProtocolError, match="bad shared-memory placement"):
        pair.rx.take(
            [
                memoryview(b""),
                memoryview(b""),
                _table((0, seg_id, fd, size, n), (1, seg_id, fd, size, n)),
            ]
        )
    # A frame larger than the receiver accepts.
    small = ShmReceiver(os.getpid(), lambda _: None, max_bytes=100)
    with pytest.raises(ProtocolError, match="bad shared-memory placement"):
        small.take([memoryview(b""), memoryview(first)])
    # A file that is not a sealed segment (a plain memfd without seals).
    plain = os.memfd_create("plain")
    try:
        os.ftruncate(plain, MiB)
        with pytest.raises(ProtocolError, match="not sealed"):
            pair.rx.take([memoryview(b""), _table((0, 77, plain, MiB, 10))])
    finally:
        os.close(plain)


def test_read_only_and_bytes_sources() -> None:
    pair = Pair()
    data = bytes(payload(MiB, 3))
    ro = memoryview(data)  # read-only: copied without torch (no warning)
    out = pair.send([ro, data])
    assert bytes(out[0]) == data and bytes(out[1]) == data


def sealed_memfd(size: int, data: bytes = b"") -> int:
    """A memfd of ``size`` bytes (``data`` at its start), sealed against
    shrinking and growing, as a sender's segment is."""
    import fcntl

    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_sparse_segment_maps_only_the_placed_bytes() -> None:
    # A peer names a 1 GiB (sparse) segment for a 4 KiB buffer: only 4 KiB
    # are mapped and prefaulted here.
    data = bytes(range(256)) * 16
    fd = sealed_memfd(1 << 30, data)
    try:
        rx = ShmReceiver(os.getpid(), lambda _: None, max_bytes=1 << 30)
        before = _rss()
        views = [rx.take([memoryview(b""), _table((0, i, fd, 1 << 30, 4096))])[0] for i in (1, 2)]
        assert all(bytes(v) == data for v in views)
        assert rx.mapped == 2 * 4096
        assert _rss() - before < 4 * MiB
    finally:
        os.close(fd)


def test_mapped_bytes_per_connection_are_capped() -> None:
    fd = sealed_memfd(4 * MiB)
    try:
        rx = ShmReceiver(os.getpid(), lambda _: None, max_bytes=1 << 30, max_mapped=3 * MiB)
        first = rx.take([memoryview(b""), _table((0, 1, fd, 4 * MiB, 2 * MiB))])
        with pytest.raises(ProtocolError, match="over the limit"):
            rx.take([memoryview(b""), _table((0, 2, fd, 4 * MiB, 2 * MiB))])
        assert rx.mapped == 2 * MiB
        del first
        gc.collect()
        # The same segment placed again with more bytes is mapped anew, larger:
        # the smaller mapping no longer counts.
        rx.take([memoryview(b""), _table((0, 1, fd, 4 * MiB, 3 * MiB))])
        assert rx.mapped == 3 * MiB
    finally:
        os.close(fd)


def test_copy_mode_buffers_do_not_change_with_the_segment() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    fd = sealed_memfd(2 * MiB, data)
    try:
        released: list[int] = []
        shared = ShmReceiver(os.getpid(), released.append, max_bytes=1 << 30)
        copied = ShmReceiver(os.getpid(), released.append, max_bytes=1 << 30, copy=True)
        (live,) = shared.take([memoryview(b""), _table((0, 1, fd, 2 * MiB, MiB))])
        (own,) = copied.take([memoryview(b""), _table((0, 1, fd, 2 * MiB, MiB))])
        assert released == [1]  # a copy releases its segment at once
        assert copied.leased == 0 and shared.leased == 1
        os.pwrite(fd, b"\xff" * 100, 0)
        assert bytes(live[:100]) == b"\xff" * 100  # a shared view sees the sender's writes
        assert bytes(own) == data  # the copy does not
        assert not own.readonly
    finally:
        os.close(fd)


def test_copy_buffers_are_reused_once_released_never_while_kept() -> None:
    fd = sealed_memfd(2 * MiB)
    try:
        rx = ShmReceiver(os.getpid(), lambda _: None, max_bytes=1 << 30, copy=True)
        table = _table((0, 1, fd, 2 * MiB, MiB))
        os.pwrite(fd, b"\x01" * MiB, 0)
        (kept,) = rx.take([memoryview(b""), table])
        os.pwrite(fd, b"\x02" * MiB, 0)
        (second,) = rx.take([memoryview(b""), table])
        assert bytes(kept) == b"\x01" * MiB  # a kept copy is never reused
        assert bytes(second) == b"\x02" * MiB
        address = np.frombuffer(second, dtype=np.uint8).ctypes.data
        del second
        gc.collect()
        os.pwrite(fd, b"\x03" * MiB, 0)
        (third,) = rx.take([memoryview(b""), table])
        assert np.frombuffer(third, dtype=np.uint8).ctypes.data == address  # reused
        assert bytes(third) == b"\x03" * MiB and bytes(kept) == b"\x01" * MiB
    finally:
        os.close(fd)
