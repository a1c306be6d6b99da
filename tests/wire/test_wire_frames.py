"""The frame format and the incremental frame reader (``aiorpc_autograd.wire``).

Everything here is sans-I/O: frames are laid out with ``encode_frame`` and
pushed into a ``FrameReader`` in every chunking we can think of -- one byte at
a time, Hypothesis-chosen splits, and the ``get_buffer``/``buffer_updated``
pair that ``asyncio.BufferedProtocol`` uses.
"""

from __future__ import annotations

import itertools
import struct
import time
import tracemalloc
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiorpc_autograd.errors import ProtocolError
from aiorpc_autograd.wire import (
    ALIGN,
    MAGIC,
    PREFIX_SIZE,
    VERSION,
    Frame,
    FrameReader,
    Limits,
    encode_frame,
)

PREFIX = struct.Struct("<4sBBHIIQ")

# A frame as the tests describe it: (flags, header, buffers).
Spec = tuple[int, bytes, list[bytes]]


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def frame_bytes(header: bytes, buffers: Sequence[bytes | memoryview] = (), flags: int = 0) -> bytes:
    return b"".join(bytes(c) for c in encode_frame(header, buffers, flags))


def spec_bytes(spec: Spec) -> bytes:
    flags, header, buffers = spec
    return frame_bytes(header, buffers, flags)


def prefix(
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    flags: int = 0,
    reserved: int = 0,
    header_len: int = 0,
    n_buffers: int = 0,
    body_len: int = 0,
) -> bytes:
    return PREFIX.pack(magic, version, flags, reserved, header_len, n_buffers, body_len)


def as_spec(frame: Frame) -> Spec:
    return (frame.flags, bytes(frame.header), [bytes(b) for b in frame.buffers])


def address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


# Frames chosen to hit the edges: no buffers, empty buffers (first, middle,
# last), sizes at and around ALIGN, a header larger than a small scratch
# buffer, many buffers, every flag bit.
SAMPLES: list[Spec] = [
    (0, b"", []),
    (0, b"h", []),
    (1, b"", [b""]),
    (2, b"hdr", [b"", b"", b""]),
    (0, b"x" * 63, [b"a"]),
    (255, b"\x00\xff" * 10, [b"a" * 63, b"b" * 64, b"c" * 65]),
    (0, b"H" * 1000, [b"", b"q" * 7, b""]),
    (7, b"z", [bytes(range(256)) * 3, b"", b"tail"]),
    (0, b"many", [bytes([i]) * i for i in range(20)]),
    (0, b"", [b"\x01" * 130]),
]

READER_CONFIGS = [
    {},  # defaults: every incomplete body goes the direct path
    {"scratch_size": PREFIX_SIZE},  # the smallest scratch buffer: it must grow
    {"scratch_size": 100, "direct_threshold": 10**9},  # never direct: scratch grows
    {"scratch_size": 64, "direct_threshold": 100},  # a mix of both paths
]


# --------------------------------------------------------------------------- layout


def test_constants() -> None:
    assert MAGIC == b"ARPC"
    assert VERSION == 1
    assert ALIGN == 64
    assert PREFIX_SIZE == 24 == PREFIX.size


def test_layout_matches_the_documented_format() -> None:
    data = frame_bytes(b"hdr", [b"abc", b"de"], flags=5)
    expected = (
        PREFIX.pack(b"ARPC", 1, 5, 0, 3, 2, 64 + 2)
        + struct.pack("<QQ", 3, 2)
        + b"hdr"
        + b"abc"
        + bytes(61)
        + b"de"
    )
    assert data == expected


def test_empty_frame_is_just_the_prefix() -> None:
    data = frame_bytes(b"")
    assert data == prefix()
    assert FrameReader().feed(data) == [Frame(0, b"", [])]


@pytest.mark.parametrize(
    "sizes", [[], [0], [1], [0, 0], [64], [63, 1], [64, 64], [65, 0, 3], [1, 2, 3, 4]]
)
def test_body_length_and_zero_padding(sizes: list[int]) -> None:
    buffers = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    data = frame_bytes(b"", buffers)
    _, _, _, _, header_len, n_buffers, body_len = PREFIX.unpack_from(data)
    assert (header_len, n_buffers) == (0, len(sizes))
    # Every buffer but the last is padded to ALIGN; the last is not.
    expect = sum(aligned(n) for n in sizes[:-1]) + (sizes[-1] if sizes else 0)
    assert body_len == expect
    assert len(data) == PREFIX_SIZE + 8 * len(sizes) + body_len
    lengths = struct.unpack_from(f"<{len(sizes)}Q", data, PREFIX_SIZE)
    assert list(lengths) == sizes
    body = data[PREFIX_SIZE + 8 * len(sizes) :]
    pos = 0
    for i, n in enumerate(sizes):
        assert pos % ALIGN == 0
        assert body[pos : pos + n] == buffers[i]
        if i < len(sizes) - 1:
            assert body[pos + n : pos + aligned(n)] == bytes(aligned(n) - n)  # zero padding
        pos += aligned(n)


def test_encode_frame_does_not_copy_the_buffers() -> None:
    big = bytearray(b"x" * 1000)
    view = memoryview(big)
    chunks = encode_frame(b"h", [view])
    assert any(c is view for c in chunks)


def test_encode_frame_casts_typed_memoryviews_to_bytes() -> None:
    arr = np.arange(10, dtype=np.float32)
    data = frame_bytes(b"", [memoryview(arr)])
    (frame,) = FrameReader().feed(data)
    assert bytes(frame.buffers[0]) == arr.tobytes()


def test_encode_frame_multidimensional_byte_memoryview() -> None:
    view = memoryview(bytearray(range(6))).cast("B", (2, 3))
    frames = FrameReader().feed(frame_bytes(b"h", [view, b"z"]) + frame_bytes(b"next"))
    assert [as_spec(f) for f in frames] == [
        (0, b"h", [bytes(range(6)), b"z"]),
        (0, b"next", []),
    ]


# --------------------------------------------------------------------------- reading


def test_frame_buffers_are_writable_byte_views() -> None:
    (frame,) = FrameReader().feed(frame_bytes(b"h", [b"abc", b"", b"defg"]))
    for view in frame.buffers:
        assert isinstance(view, memoryview)
        assert view.format == "B"
        assert not view.readonly
    assert isinstance(frame.header, bytes)


@pytest.mark.parametrize("config", READER_CONFIGS, ids=str)
def test_byte_by_byte(config: dict[str, int]) -> None:
    """Each frame comes out exactly when its last byte arrives, and not before."""
    stream = b""
    ends: list[int] = []
    for spec in SAMPLES:
        stream += spec_bytes(spec)
        ends.append(len(stream))
    reader = FrameReader(**config)
    got: list[Frame] = []
    for i in range(len(stream)):
        out = reader.feed(stream[i : i + 1])
        expect = sum(1 for e in ends if e == i + 1)
        assert len(out) == expect, f"byte {i}"
        got.extend(out)
        if config.get("direct_threshold") == 10**9:  # see test_buffered_while_reading_a_direct_body
            assert reader.buffered == (i + 1) - max([0, *(e for e in ends if e <= i + 1)])
    assert reader.buffered == 0
    # Compared only at the end: a frame must not alias memory the reader reuses.
    assert [as_spec(f) for f in got] == SAMPLES


@pytest.mark.parametrize("config", READER_CONFIGS, ids=str)
def test_byte_by_byte_through_get_buffer(config: dict[str, int]) -> None:
    stream = b"".join(spec_bytes(s) for s in SAMPLES)
    reader = FrameReader(**config)
    got: list[Frame] = []
    for byte in stream:
        buf = reader.get_buffer()
        assert len(buf) >= 1
        buf[0] = byte
        got.extend(reader.buffer_updated(1))
    assert [as_spec(f) for f in got] == SAMPLES


@pytest.mark.parametrize("config", READER_CONFIGS, ids=str)
def test_all_at_once(config: dict[str, int]) -> None:
    stream = b"".join(spec_bytes(s) for s in SAMPLES)
    frames = FrameReader(**config).feed(stream)
    assert [as_spec(f) for f in frames] == SAMPLES


def test_feed_accepts_bytes_bytearray_and_memoryview() -> None:
    data = spec_bytes(SAMPLES[5])
    reader = FrameReader()
    third = len(data) // 3
    out = reader.feed(data[:third])
    out += reader.feed(bytearray(data[third : 2 * third]))
    out += reader.feed(memoryview(data)[2 * third :])
    assert [as_spec(f) for f in out] == [SAMPLES[5]]
    assert reader.feed(b"") == []


# --------------------------------------------------------------------------- Hypothesis

buffer_st = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 2 * ALIGN]).map(lambda n: b"\xab" * n),
)
spec_st = st.tuples(
    st.integers(0, 255),
    st.binary(max_size=300),
    st.lists(buffer_st, max_size=6),
)
config_st = st.fixed_dictionaries(
    {
        "scratch_size": st.sampled_from([1, PREFIX_SIZE, 33, 100, 4096, 256 * 1024]),
        "direct_threshold": st.sampled_from([0, 1, 64, 500, 10**9]),
    }
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


@SETTINGS
@given(specs=st.lists(spec_st, min_size=1, max_size=10), config=config_st, data=st.data())
def test_random_frames_random_chunks(
    specs: list[Spec], config: dict[str, int], data: st.DataObject
) -> None:
    stream = b"".join(spec_bytes(s) for s in specs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    reader = FrameReader(**config)
    got: list[Frame] = []
    for chunk in split(stream, cuts):  # empty chunks included
        got.extend(reader.feed(chunk))
    assert reader.buffered == 0
    assert [as_spec(f) for f in got] == specs


@SETTINGS
@given(specs=st.lists(spec_st, min_size=1, max_size=10), config=config_st, data=st.data())
def test_random_frames_through_get_buffer(
    specs: list[Spec], config: dict[str, int], data: st.DataObject
) -> None:
    """The BufferedProtocol path: the 'socket' delivers at most what the reader
    asks for, in reads of random sizes."""
    stream = memoryview(b"".join(spec_bytes(s) for s in specs))
    reads = data.draw(st.lists(st.integers(1, 700), min_size=1, max_size=20), label="reads")
    reader = FrameReader(**config)
    got: list[Frame] = []
    pos = i = 0
    while pos < len(stream):
        buf = reader.get_buffer()
        assert len(buf) > 0, "an empty buffer would stall the transport"
        n = min(len(buf), reads[i % len(reads)], len(stream) - pos)
        i += 1
        buf[:n] = stream[pos : pos + n]
        pos += n
        got.extend(reader.buffer_updated(n))
    assert reader.buffered == 0
    assert [as_spec(f) for f in got] == specs


@SETTINGS
@given(spec=spec_st)
def test_buffers_start_at_aligned_offsets_of_one_body(spec: Spec) -> None:
    (frame,) = FrameReader().feed(spec_bytes(spec))
    views = [v for v in frame.buffers if len(v)]
    if not views:
        return
    assert all(v.obj is views[0].obj for v in views), "the buffers view one body"
    base = address(frame.buffers[0]) if len(frame.buffers[0]) else None
    sizes = [len(b) for b in spec[2]]
    offsets = [sum(aligned(n) for n in sizes[:i]) for i in range(len(sizes))]
    if base is None:  # the first buffer is empty: work back from a non-empty one
        j = next(k for k, n in enumerate(sizes) if n)
        base = address(frame.buffers[j]) - offsets[j]
    for view, offset in zip(frame.buffers, offsets, strict=True):
        if len(view):
            assert address(view) - base == offset
            assert offset % ALIGN == 0


# --------------------------------------------------------------------------- direct body path


def test_large_body_is_read_straight_into_its_own_buffer() -> None:
    payload = bytes(range(256)) * 400  # 100 KiB
    data = frame_bytes(b"big", [b"small", payload]) + frame_bytes(b"after", [b"x"])
    first_len = len(data) - len(frame_bytes(b"after", [b"x"]))
    reader = FrameReader(scratch_size=1024, direct_threshold=4096)
    # Prefix, lengths, header and a little of the body arrive in the scratch buffer.
    head = PREFIX_SIZE + 16 + 3 + 100
    assert reader.feed(data[:head]) == []
    # From now on the reader hands out exactly the rest of this frame's body.
    buf = reader.get_buffer()
    assert len(buf) == first_len - head
    target = buf.obj
    buf[:] = data[head:first_len]
    (frame,) = reader.buffer_updated(len(buf))
    assert as_spec(frame) == (0, b"big", [b"small", payload])
    # Zero copy: the frame's buffers view the very memory get_buffer exposed.
    assert all(v.obj is target for v in frame.buffers)
    assert address(frame.buffers[1]) == address(buf) - head + PREFIX_SIZE + 16 + 3 + ALIGN
    # The reader is back to the scratch buffer for the next frame.
    assert len(reader.get_buffer()) <= 1024
    assert [as_spec(f) for f in reader.feed(data[first_len:])] == [(0, b"after", [b"x"])]


def test_body_below_the_threshold_waits_in_the_scratch_buffer() -> None:
    payload = b"p" * 3000
    data = frame_bytes(b"mid", [payload])
    reader = FrameReader(scratch_size=256, direct_threshold=10_000)
    assert reader.feed(data[:300]) == []
    assert reader.buffered == 300
    (frame,) = reader.feed(data[300:])
    assert as_spec(frame) == (0, b"mid", [payload])


def test_direct_body_never_swallows_the_next_frame() -> None:
    big = frame_bytes(b"a", [b"A" * 10_000])
    small = frame_bytes(b"b", [b"B"])
    reader = FrameReader(scratch_size=512, direct_threshold=1)
    assert reader.feed(big[:600]) == []
    # The reader offers exactly the rest of the body, so a read can never
    # carry bytes of the next frame into it...
    assert len(reader.get_buffer()) == len(big) - 600
    # ...and feed() splits a chunk spanning both frames accordingly.
    got = reader.feed(big[600:] + small)
    assert [as_spec(f) for f in got] == [(0, b"a", [b"A" * 10_000]), (0, b"b", [b"B"])]


def test_buffered_while_reading_a_direct_body() -> None:
    data = frame_bytes(b"hdr", [b"x" * 1000])
    reader = FrameReader(direct_threshold=0)
    assert reader.feed(data[:100]) == []
    assert reader.buffered == 100


# --------------------------------------------------------------------------- limits


def test_huge_body_claim_raises_at_once_without_allocating() -> None:
    claim = prefix(header_len=0, n_buffers=1, body_len=2**62)
    for limits in (Limits(max_message_size=1 << 20), Limits()):
        reader = FrameReader(limits)
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            with pytest.raises(ProtocolError, match="max_message_size"):
                reader.feed(claim)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert time.perf_counter() - t0 < 1.0
        assert peak < 1 << 20


@pytest.mark.parametrize(
    ("fields", "limits", "match"),
    [
        ({"header_len": 2**32 - 1}, Limits(), "header"),
        ({"header_len": 1001}, Limits(max_header_size=1000), "header"),
        ({"n_buffers": 2**32 - 1}, Limits(), "buffers"),
        ({"n_buffers": 11}, Limits(max_buffers=10), "buffers"),
        ({"n_buffers": 1, "body_len": 2**64 - 1}, Limits(), "max_message_size"),
        ({"header_len": 100}, Limits(max_message_size=99), "max_message_size"),
        ({"n_buffers": 13}, Limits(max_message_size=8 * 13 - 1), "max_message_size"),
    ],
)
def test_limits_are_checked_on_the_prefix_alone(
    fields: dict[str, int], limits: Limits, match: str
) -> None:
    reader = FrameReader(limits)
    data = prefix(**fields)
    assert reader.feed(data[:-1]) == []  # nothing to judge yet
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=match):
            reader.feed(data[-1:])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_limits_are_inclusive_and_count_everything_after_the_prefix() -> None:
    header, buffers = b"h" * 10, [b"a" * 70, b"b" * 5]
    data = frame_bytes(header, buffers)
    total = len(data) - PREFIX_SIZE
    assert total == 2 * 8 + 10 + aligned(70) + 5
    exact = Limits(max_message_size=total, max_header_size=10, max_buffers=2)
    assert len(FrameReader(exact).feed(data)) == 1
    for tight in (
        Limits(max_message_size=total - 1),
        Limits(max_header_size=9),
        Limits(max_buffers=1),
    ):
        with pytest.raises(ProtocolError):
            FrameReader(tight).feed(data)


# --------------------------------------------------------------------------- malformed streams


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (prefix(magic=b"ARPX"), "magic"),
        (prefix(magic=b"\x00\x00\x00\x00"), "magic"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "magic"),
        (prefix(version=0), "version"),
        (prefix(version=2), "version"),
        (prefix(version=255), "version"),
        (prefix(reserved=1), "reserved"),
        (prefix(reserved=0x8000), "reserved"),
    ],
)
def test_bad_prefix_fails_on_its_24th_byte(data: bytes, match: str) -> None:
    reader = FrameReader()
    for i in range(PREFIX_SIZE - 1):
        assert reader.feed(data[i : i + 1]) == []
    with pytest.raises(ProtocolError, match=match):
        reader.feed(data[PREFIX_SIZE - 1 :])


def meta(lengths: list[int], body_len: int, header: bytes = b"") -> bytes:
    return (
        prefix(header_len=len(header), n_buffers=len(lengths), body_len=body_len)
        + b"".join(struct.pack("<Q", n) for n in lengths)
        + header
    )


@pytest.mark.parametrize(
    ("lengths", "body_len"),
    [
        ([], 1),  # a body without buffers
        ([5], 4),
        ([5], 6),
        ([5, 5], 10),  # the padding after the first buffer is missing
        ([5, 5], 64 + 5 + 1),
        ([64, 0], 63),
        ([0, 0], 1),
        ([2**63, 2**63], 0),
    ],
)
def test_lengths_that_do_not_add_up(lengths: list[int], body_len: int) -> None:
    data = meta(lengths, body_len, header=b"hh")
    reader = FrameReader()
    assert reader.feed(data[:-1]) == []
    # Judged as soon as the lengths and header are in, before any body byte.
    with pytest.raises(ProtocolError, match="add up"):
        reader.feed(data[-1:])


def test_reader_stays_failed() -> None:
    reader = FrameReader()
    good = frame_bytes(b"ok", [b"x"])
    assert len(reader.feed(good)) == 1
    with pytest.raises(ProtocolError) as first:
        reader.feed(prefix(magic=b"XXXX"))
    for attempt in (
        lambda: reader.feed(good),
        reader.get_buffer,
        lambda: reader.buffer_updated(0),
    ):
        with pytest.raises(ProtocolError) as again:
            attempt()
        assert again.value is first.value


def test_reader_stays_failed_through_get_buffer() -> None:
    reader = FrameReader()
    buf = reader.get_buffer()
    bad = prefix(version=9)
    buf[: len(bad)] = bad
    with pytest.raises(ProtocolError):
        reader.buffer_updated(len(bad))
    with pytest.raises(ProtocolError):
        reader.get_buffer()


def test_error_after_good_frames_in_a_byte_stream() -> None:
    """Frames before the bad one are delivered; the bad prefix then fails."""
    stream = spec_bytes(SAMPLES[5]) + spec_bytes(SAMPLES[1]) + prefix(reserved=3)
    reader = FrameReader()
    got: list[Frame] = []
    with pytest.raises(ProtocolError):
        for i in range(len(stream)):
            got += reader.feed(stream[i : i + 1])
    assert [as_spec(f) for f in got] == [SAMPLES[5], SAMPLES[1]]


# ------------------------------------------------------------ memory follows the bytes


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_claimed_body_costs_only_the_bytes_delivered() -> None:
    # 33 bytes claiming a 3.9 GiB body: nothing is allocated or zeroed for the
    # claim; memory follows the bytes that actually arrive.
    body_len = int(3.9 * (1 << 30))
    claim = prefix(header_len=1, n_buffers=1, body_len=body_len) + struct.pack("<Q", body_len)
    reader = FrameReader(direct_threshold=64 * 1024)
    before = _rss()
    t0 = time.perf_counter()
    assert reader.feed(claim + b"h") == []
    assert time.perf_counter() - t0 < 0.1
    assert _rss() - before < 4 << 20
    sent = 16 << 20
    chunk = b"\x01" * (1 << 20)
    for _ in range(sent >> 20):
        assert reader.feed(chunk) == []
    grown = _rss() - before
    assert grown < sent + (4 << 20), grown
    assert reader.buffered == 33 + sent
    del reader


def test_large_body_completes_in_its_lazily_backed_buffer() -> None:
    payload = bytes(range(256)) * (12 * 1024)  # 3 MiB: past EAGER_BODY
    data = frame_bytes(b"big", [payload]) + frame_bytes(b"next")
    frames = FrameReader(direct_threshold=64 * 1024).feed(data)
    assert [as_spec(f) for f in frames] == [(0, b"big", [payload]), (0, b"next", [])]
    view = frames[0].buffers[0]
    assert not view.readonly  # tensors are built on it without a copy
    view[0] = 7
    assert view[0] == 7


def test_large_header_grows_the_scratch_only_as_bytes_arrive() -> None:
    header = b"h" * (3 << 20)
    data = frame_bytes(header, [b"tail"])
    reader = FrameReader(scratch_size=4096, direct_threshold=1 << 30)
    assert reader.feed(data[:100]) == []
    # The whole header is claimed but only 100 bytes came: the buffer the
    # reader offers stays small.
    assert len(reader.get_buffer()) < 8192
    step = 64 * 1024
    got: list[Frame] = []
    for i in range(100, len(data), step):
        got += reader.feed(data[i : i + step])
        assert len(reader._scratch) <= max(2 * (i + step), 8192)
    assert [as_spec(f) for f in got] == [(0, header, [b"tail"])]
    # Back to its size once the large frame is done.
    assert len(reader._scratch) <= 4096


def test_scratch_starts_small_and_grows_while_reads_fill_it() -> None:
    reader = FrameReader(scratch_size=256 * 1024)
    assert len(reader.get_buffer()) <= 4096
    small = frame_bytes(b"x" * 10)
    stream = small * 20_000
    pos = 0
    sizes = []
    while pos < len(stream):
        buf = reader.get_buffer()
        n = min(len(buf), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pos += n
        reader.buffer_updated(n)
        sizes.append(len(buf))
    assert max(sizes) > 128 * 1024  # full reads grew it...
    assert len(reader._scratch) <= 256 * 1024  # ...up to its size


# --------------------------------------------------------------------------- the gate


GATE = Limits(max_message_size=4096, max_header_size=4096, max_buffers=0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (prefix(header_len=64 << 20), "header"),
        (prefix(header_len=4097), "header"),
        (prefix(n_buffers=1, body_len=1), "buffers"),
    ],
)
def test_gated_reader_refuses_more_than_a_hello(data: bytes, match: str) -> None:
    reader = FrameReader(gate=GATE)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=match):
            reader.feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_gated_reader_returns_one_frame_then_holds_until_open() -> None:
    big = b"B" * 100_000
    data = frame_bytes(b"hello") + frame_bytes(b"second", [big]) + frame_bytes(b"third")
    reader = FrameReader(gate=GATE, direct_threshold=1024)
    assert reader.gated and not reader.holding
    first = reader.feed(data[:3000])
    assert [as_spec(f) for f in first] == [(0, b"hello", [])]
    assert reader.holding
    # Held bytes are not parsed (the second frame would be over the gate).
    assert reader.feed(data[3000:4000]) == []
    rest = reader.open()
    assert not reader.gated and not reader.holding
    rest += reader.feed(data[4000:])
    assert [as_spec(f) for f in rest] == [(0, b"second", [big]), (0, b"third", [])]
