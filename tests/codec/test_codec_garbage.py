"""Malformed frames: ``codec.decode`` raises ``ProtocolError`` and nothing else.

The agent drops a connection on ``ProtocolError`` and keeps serving; any other
exception escaping ``decode`` would escape the transport's ``buffer_updated``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiorpc_autograd import codec, wire
from aiorpc_autograd.codec import Message, dump_payload, tensor_payload
from aiorpc_autograd.errors import ProtocolError

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

MESSAGE_CLASSES = sorted(codec._REGISTRY.values(), key=lambda c: int(c.TYPE))
DTYPE_NAMES = sorted(codec._DTYPES)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame(header: Any, buffers: list[bytes] = ()) -> wire.Frame:  # type: ignore[assignment]
    raw = header if isinstance(header, bytes) else packb(header)
    # Real frames' buffers view a writable bytearray: so do these.
    return wire.Frame(0, raw, [memoryview(bytearray(b)) for b in buffers])


def decode(header: Any, buffers: list[bytes] = ()) -> tuple[int, Message]:  # type: ignore[assignment]
    return codec.decode(frame(header, buffers))


def desc(
    dtype: Any = "float32",
    shape: Any = (2,),
    index: Any = 0,
    offset: Any = 0,
    requires_grad: Any = False,
) -> list[Any]:
    return [dtype, list(shape) if isinstance(shape, tuple) else shape, index, offset, requires_grad]


RET = [0x03, 1]  # PythonRet, request id 1; then the tensor table and [kind, data]
PAYLOAD = [0, b""]


def test_valid_baseline() -> None:
    """The malformed headers below differ from this one in one place each."""
    rid, msg = decode([*RET, [desc()], PAYLOAD], [b"\x00" * 8])
    assert rid == 1 and isinstance(msg, codec.PythonRet)
    (t,) = msg.value.tensors
    assert t is not None and t.shape == (2,) and t.dtype == torch.float32


@pytest.mark.parametrize(
    ("header", "buffers"),
    [
        # not msgpack / not an array / too short
        (b"", []),
        (b"\xc1", []),
        (b"\x93\x03\x01", []),  # truncated
        (packb([0x0E, 1, []]) + b"\x00", []),  # trailing bytes
        ({"type": 3}, []),
        ("PythonRet", []),
        ([], []),
        ([0x0E], []),
        ([0x0E, 1], []),
        # request id
        ([0x0E, -1, []], []),
        ([0x0E, "1", []], []),
        ([0x0E, 1.0, []], []),
        ([0x0E, None, []], []),
        # message type
        ([0x00, 1, []], []),  # SCRIPT_CALL: reserved, never sent
        ([0x01, 1, []], []),
        ([0x36, 1, []], []),
        ([0xFF, 1, []], []),
        ([-3, 1, []], []),
        ([2**64 - 1, 1, []], []),
        (["PYTHON_RET", 1, []], []),
        ([None, 1, []], []),
        ([3.0, 1, []], []),
        ([True, 1, []], []),
        # tensor table
        ([*RET, None, PAYLOAD], []),
        ([*RET, {"0": 1}, PAYLOAD], []),
        ([*RET, [5], PAYLOAD], [b"x"]),
        ([*RET, [desc()[:4]], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [[*desc(), 0]], PAYLOAD], [b"\x00" * 8]),
        # tensor descriptor: dtype
        ([*RET, [desc(dtype="float128")], PAYLOAD], [b"\x00" * 16]),
        ([*RET, [desc(dtype="torch.float32")], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(dtype="Float")], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(dtype="")], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(dtype=6)], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(dtype=b"float32")], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(dtype="qint8")], PAYLOAD], [b"\x00" * 8]),
        # tensor descriptor: shape
        ([*RET, [desc(shape=2)], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(shape=(-1,))], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(shape=(2.0,))], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(shape=(True,))], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(shape=("2",))], PAYLOAD], [b"\x00" * 8]),
        # tensor descriptor: buffer index and offset
        ([*RET, [desc(index=1)], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(index=-1)], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(index=0)], PAYLOAD], []),
        ([*RET, [desc(index="0")], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(index=False)], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(offset=-8)], PAYLOAD], [b"\x00" * 16]),
        ([*RET, [desc(offset=None)], PAYLOAD], [b"\x00" * 8]),
        # tensor descriptor overrunning its buffer
        ([*RET, [desc()], PAYLOAD], [b"\x00" * 7]),
        ([*RET, [desc(offset=1)], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(shape=(2**40, 2**40))], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(shape=(2**64 - 1,))], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(shape=(2**63, 2))], PAYLOAD], [b"\x00" * 8]),
        ([*RET, [desc(dtype="complex128", shape=())], PAYLOAD], [b"\x00" * 15]),
        ([*RET, [desc(offset=2**64 - 1)], PAYLOAD], [b"\x00" * 8]),
        # payload field
        ([*RET, [], [0]], []),
        ([*RET, [], [0, "text"]], []),
        ([*RET, [], [9, b""]], []),
        ([*RET, [], [-1, b""]], []),
        ([*RET, [], ["PICKLE", b""]], []),
        ([*RET, [], b"data"], []),
        ([*RET, [], None], []),
        ([*RET, [], [0, b"", 1]], []),
        # wrong field counts
        ([*RET, []], []),
        ([*RET, [], PAYLOAD, PAYLOAD], []),
        ([0x0E, 1, [], 1], []),
        ([0x40, 0, [], "name", 0], []),
        # PythonCall target
        ([0x02, 1, [], 5, PAYLOAD], []),
        ([0x02, 1, [], b"fn", PAYLOAD], []),
        # RRef / fork ids
        ([0x0D, 1, [], [1]], []),
        ([0x0D, 1, [], [1, 2, 3]], []),
        ([0x0D, 1, [], [1, "2"]], []),
        ([0x0D, 1, [], [1, True]], []),
        ([0x0D, 1, [], {"a": 1, "b": 2}], []),
        # autograd wrapper metadata and wrapped message
        ([0x0F, 1, [], "0", 1, 2, {}, 0x0E, []], []),
        ([0x0F, 1, [], 0, 1, 2, [], 0x0E, []], []),
        ([0x0F, 1, [], 0, 1, 2, {}, 0x99, []], []),
        ([0x0F, 1, [], 0, 1, 2, {}, 0x0E, [1]], []),
        ([0x0F, 1, [], 0, 1, 2, {}, 0x0E, None], []),
        ([0x0F, 1, [], 0, 1, 2, {}, 0x0F, [0, 1, 2, {}, 0x0E, []]], []),  # nested
        ([0x0F, 1, [], 0, 1, 2, {}], []),
        ([0x15, 1, [], [1, 2], {}, 0x0E], []),
        ([0x15, 1, [], [1], {}, 0x0E, []], []),
        ([0x15, 1, [], [1, 2], {}, "RRefAck", []], []),
        # a wrapped payload message with a bad payload
        ([0x0F, 1, [], 0, 1, 2, {}, 0x03, [[0, "x"]]], []),
    ],
)
def test_malformed_header_is_a_protocol_error(header: Any, buffers: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(header, buffers)


# --------------------------------------------------------------------------- wrong field types


def sample_fields(cls: type[Message]) -> list[Any]:
    """Valid wire fields of a ``cls`` (from its own encoder)."""
    values: list[Any] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        annotation = str(f.type)
        if f.name == "grads":
            values.append(tensor_payload([]))
        elif annotation == "Message":
            values.append(codec.RRefAck() if cls.IS_RESPONSE else codec.Heartbeat())
        elif annotation == "Payload":
            values.append(dump_payload(None))
        else:
            values.append(
                {
                    "int": 5,
                    "str": "s",
                    "str | None": "fn",
                    "bool": True,
                    "list[int]": [1, 2],
                    "IntList": [3, 1, 2],
                    "dict[str, str]": {"cpu": "cpu"},
                    "dict[str, Any]": {"k": 1},
                    "list[Any]": [1],
                }[annotation]
            )
    return cls(*values).to_fields()  # type: ignore[arg-type]


def wrong(value: Any) -> Any:
    """A msgpack value of another type than ``value``'s."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int):
        return "7"
    if isinstance(value, str):
        return 7
    if value is None:
        return 5
    if isinstance(value, list):
        return "x"
    if isinstance(value, dict):
        return ["x"]
    raise AssertionError(f"no wrong value for {value!r}")


# Fields the codec does not check yet: each one decodes into a message whose
# field has the wrong type, for a handler to trip over later.
UNCHECKED: dict[tuple[str, int], str] = {}


def wrong_field_cases() -> list[Any]:
    cases = []
    for cls in MESSAGE_CLASSES:
        for i in range(len(sample_fields(cls))):
            bug = UNCHECKED.get((cls.__name__, i))
            marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {bug}")] if bug else []
            cases.append(pytest.param(cls, i, id=f"{cls.__name__}-field{i}", marks=marks))
    return cases


@pytest.mark.parametrize(("cls", "position"), wrong_field_cases())
def test_wrong_field_type_is_a_protocol_error(cls: type[Message], position: int) -> None:
    fields = sample_fields(cls)
    decode([int(cls.TYPE), 1, [], *fields])  # the valid ones decode
    fields[position] = wrong(fields[position])
    with pytest.raises(ProtocolError):
        decode([int(cls.TYPE), 1, [], *fields])


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_wrong_field_count_is_a_protocol_error(cls: type[Message]) -> None:
    fields = sample_fields(cls)
    with pytest.raises(ProtocolError):
        decode([int(cls.TYPE), 1, [], *fields, 0])
    if fields:
        with pytest.raises(ProtocolError):
            decode([int(cls.TYPE), 1, [], *fields[:-1]])


def test_device_map_must_map_strings_to_strings() -> None:
    with pytest.raises(ProtocolError):
        decode([0x0F, 1, [], 0, 1, 2, {1: 2}, 0x0E, []])


# --------------------------------------------------------------------------- found bugs


@pytest.mark.parametrize(
    "shape", [(0, 2**64 - 1), (0, 2**40, 2**40)], ids=["uint64-dim", "stride-overflow"]
)
def test_zero_size_tensor_with_huge_dims_is_a_protocol_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ProtocolError):
        decode([*RET, [desc(shape=shape)], PAYLOAD], [b""])


def nested_profiling_header(depth: int) -> bytes:
    """A RunWithProfilingReq wrapping itself ``depth`` times around an RRefAck,
    written by hand (msgpack's own packer stops at 511 levels)."""
    level = bytes([0x94, 0x92, 0x01, 0x02, 0x80])  # [[1, 2], {}, <type>, <fields>]
    return (
        bytes([0x97, 0x15, 0x01, 0x90, 0x92, 0x01, 0x02, 0x80])  # [0x15, 1, [], [1,2], {},
        + (bytes([0x15]) + level) * depth
        + bytes([0x0E, 0x90])  # RREF_ACK, []
    )


def test_moderately_nested_wrappers_decode() -> None:
    _, msg = codec.decode(wire.Frame(0, nested_profiling_header(50), []))
    for _ in range(51):
        assert isinstance(msg, codec.RunWithProfilingReq)
        msg = msg.wrapped
    assert isinstance(msg, codec.RRefAck)


def test_deeply_nested_wrappers_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        codec.decode(wire.Frame(0, nested_profiling_header(1000), []))


# --------------------------------------------------------------------------- fuzzing

# Integers within int64 (and small shape entries): the uint64 and stride
# overflow cases are the known bug of test_zero_size_tensor_with_huge_dims_*.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=4) | st.integers(-3, 3), inner, max_size=3)
    ),
    max_leaves=15,
)
descriptors = st.none() | st.lists(
    st.one_of(
        st.sampled_from(DTYPE_NAMES),
        st.lists(st.integers(-1, 2**20), max_size=3),
        st.integers(-1, 4),
        st.integers(-1, 64),
        st.booleans(),
        values,
    ),
    min_size=4,
    max_size=6,
)
well_formed_descriptors = st.builds(
    desc,
    dtype=st.sampled_from(DTYPE_NAMES),
    shape=st.lists(st.integers(0, 4), max_size=2).map(tuple),
    index=st.integers(0, 3),
    offset=st.sampled_from([0, 0, 0, 1, 8, 40]),
    requires_grad=st.booleans(),
)
tables = st.one_of(
    st.lists(well_formed_descriptors, max_size=4),
    st.lists(well_formed_descriptors, max_size=4),
    st.lists(descriptors | well_formed_descriptors, max_size=4),
    values,
)
message_types = st.sampled_from(sorted(codec._REGISTRY)) | st.integers(-1, 0x50) | values


# True one time in eight (integers() would favour its bounds).
rarely = st.sampled_from([False] * 7 + [True])


@st.composite
def mutated_fields(draw: st.DrawFn) -> tuple[int, list[Any]]:
    """The valid fields of a random message class, with some replaced at random."""
    cls = draw(st.sampled_from(MESSAGE_CLASSES))
    fields = sample_fields(cls)
    for _ in range(draw(st.integers(0, 3))):
        if fields and draw(st.booleans()):
            fields[draw(st.integers(0, len(fields) - 1))] = draw(values)
        elif draw(st.booleans()):
            fields.append(draw(values))
        elif fields:
            fields.pop()
    return int(cls.TYPE), fields


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["mutated", "mutated", "mutated", "structured", "value", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=64))
    if how == "value":
        return packb(draw(values))
    table = draw(tables)
    rid = draw(st.integers(0, 2**64 - 1))
    if draw(rarely):
        rid = draw(st.integers(-2, -1) | values)
    if how == "structured":
        mtype, fields = draw(message_types), draw(st.lists(values, max_size=7))
    else:
        mtype, fields = draw(mutated_fields())
    header = packb([mtype, rid, table, *fields])
    if draw(rarely):  # now and then a damaged encoding
        cut = draw(st.integers(0, len(header)))
        header = header[:cut] + draw(st.binary(max_size=4)) + header[cut + 1 :]
    return header


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers(), buffers=st.lists(st.binary(max_size=64), max_size=4))
def test_random_frames_only_raise_protocol_error(header: bytes, buffers: list[bytes]) -> None:
    try:
        rid, msg = decode(header, buffers)
    except ProtocolError:
        return
    assert type(rid) is int and rid >= 0
    assert isinstance(msg, Message)
    payload = msg.payload()
    if payload is not None and payload.kind is codec.PayloadKind.MSGPACK:
        with contextlib.suppress(ProtocolError):
            codec.load_payload(payload, allow_pickle=False)


# --------------------------------------------------------------------------- bounded decoding


def _empty_arrays_header(n_arrays: int, per_array: int = 65535) -> bytes:
    """[PythonCall, 1, [], then ``n_arrays`` arrays of ``per_array`` empty arrays]."""
    inner = b"\xdc" + per_array.to_bytes(2, "big") + b"\x90" * per_array
    head = b"\xdc" + (3 + n_arrays).to_bytes(2, "big")
    return head + bytes([int(codec.MessageType.PYTHON_CALL)]) + b"\x01\x90" + inner * n_arrays


def test_a_header_of_empty_arrays_is_refused_fast_and_small() -> None:
    import time
    import tracemalloc

    data = _empty_arrays_header(128)  # 8 MiB
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ProtocolError, match="arrays and maps"):
            codec.decode(frame(data))
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Unbounded: 8M lists, ~600 MB and seconds. Bounded: ~33k lists.
    budget = codec.header_budget(len(data), 0, 65536)
    assert budget < len(data) // 128
    assert peak < 100 * budget + (1 << 20), peak
    assert elapsed < 1.0, elapsed


def test_the_budget_holds_at_its_edge() -> None:
    """Headers up to the budget in bytes are parsed without counting (each
    array takes a byte, so they cannot exceed it); past it they are counted,
    and the shortest header of empty arrays that holds more than the budget
    is refused."""

    def arrays_header(size: int) -> bytes:
        # [3, 1, [], [] x n]: a 3-byte array head, 2 ints, then n + 1 empty arrays
        n = size - 6
        return b"\xdc" + (3 + n).to_bytes(2, "big") + b"\x03\x01\x90" + b"\x90" * n

    for n_buffers in (0, 7):
        edge = 6
        while codec.header_budget(edge + 1, n_buffers, 65536) >= edge + 1:
            edge += 1
        values = codec._load_header(arrays_header(edge), n_buffers, 65536)
        assert len(values) == edge - 3 and values[2:] == [[]] * (edge - 5)
        over = edge + 1
        while over - 4 <= codec.header_budget(over, n_buffers, 65536):  # arrays held
            over += 1
        with pytest.raises(ProtocolError, match="arrays and maps"):
            codec._load_header(arrays_header(over), n_buffers, 65536)
        # One byte shorter it holds no more than the budget: parsed, counted.
        assert len(codec._load_header(arrays_header(over - 1), n_buffers, 65536)) == over - 4


def test_one_long_array_is_refused_by_its_length() -> None:
    data = b"\x94\x01\x00\x90\xdd" + (1 << 20).to_bytes(4, "big") + b"\xc0" * (1 << 20)
    with pytest.raises(ProtocolError, match=r"max_array_len|exceeds"):
        codec.decode(frame(data), max_tensors=16)


def test_a_full_tensor_table_fits_the_budget() -> None:
    tensors = [torch.full((2, 3), float(i)) for i in range(5000)]
    header, buffers = codec.encode(codec.PythonRet(tensor_payload(tensors)), 3)
    data = b"".join(bytes(c) for c in wire.encode_frame(header, buffers))
    (f,) = wire.FrameReader().feed(data)
    rid, message = codec.decode(f)
    assert rid == 3
    assert isinstance(message, codec.PythonRet)
    assert [float(t[0, 0]) for t in message.value.tensors] == [float(i) for i in range(5000)]


# --------------------------------------------------------------------------- sparse COO descriptors


def sparse_desc(**changes: Any) -> list[Any]:
    """A valid descriptor of a (2, 3) float32 COO tensor with 2 entries,
    indices in buffer 0, values in buffer 1; ``changes`` by element name."""
    d = {
        "tag": "sparse_coo",
        "dtype": "float32",
        "shape": [2, 3],
        "sparse_dim": 2,
        "nnz": 2,
        "indices_at": 0,
        "values_at": 1,
        "coalesced": False,
        "requires_grad": False,
    }
    d.update(changes)
    return list(d.values())


def sparse_buffers(indices: list[list[int]] = [[0, 1], [2, 0]]) -> list[bytes]:  # noqa: B006
    return [torch.tensor(indices).numpy().tobytes(), torch.ones(2).numpy().tobytes()]


def test_valid_sparse_baseline() -> None:
    """The hostile sparse descriptors below differ from this one in one place each."""
    _, msg = decode([*RET, [sparse_desc()], PAYLOAD], sparse_buffers())
    (t,) = msg.payload().tensors
    assert t is not None and t.layout == torch.sparse_coo
    assert torch.equal(t.to_dense(), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    _, msg = decode(
        [*RET, [sparse_desc(coalesced=True)], PAYLOAD], sparse_buffers([[0, 1], [2, 0]])
    )
    assert msg.payload().tensors[0].is_coalesced()


@pytest.mark.parametrize(
    ("descriptor", "buffers"),
    [
        # indices out of bounds, negative, or a false claim to be coalesced:
        # later sparse kernels would read or write out of bounds
        (sparse_desc(), sparse_buffers([[0, 2], [2, 0]])),
        (sparse_desc(), sparse_buffers([[0, 1], [3, 0]])),
        (sparse_desc(), sparse_buffers([[0, -1], [2, 0]])),
        (sparse_desc(coalesced=True), sparse_buffers([[1, 0], [0, 0]])),
        (sparse_desc(coalesced=True), sparse_buffers([[1, 1], [0, 0]])),
        # the parts do not fit their buffers
        (sparse_desc(nnz=3), sparse_buffers()),
        (sparse_desc(sparse_dim=1), sparse_buffers()),  # values would be [2, 3]
        (sparse_desc(dtype="float64"), sparse_buffers()),
        (sparse_desc(), sparse_buffers()[:1]),
        (sparse_desc(indices_at=1, values_at=0), sparse_buffers()),
        (sparse_desc(values_at=0), sparse_buffers()),
        (sparse_desc(indices_at=2), sparse_buffers()),
        # malformed elements
        (sparse_desc(tag="sparse_csr"), sparse_buffers()),
        (sparse_desc(dtype="sparse"), sparse_buffers()),
        (sparse_desc(shape=[2, -3]), sparse_buffers()),
        (sparse_desc(shape=[2, "3"]), sparse_buffers()),
        (sparse_desc(shape=3), sparse_buffers()),
        (sparse_desc(sparse_dim=3), sparse_buffers()),
        (sparse_desc(sparse_dim=-1), sparse_buffers()),
        (sparse_desc(nnz=-2), sparse_buffers()),
        (sparse_desc(nnz=2.0), sparse_buffers()),
        (sparse_desc(coalesced=1), sparse_buffers()),
        (sparse_desc(indices_at="0"), sparse_buffers()),
        ([*sparse_desc(), "cpu"], sparse_buffers()),
        ([*sparse_desc(), "cuda:0"], sparse_buffers()),  # no CUDA device here
        (sparse_desc()[:8], sparse_buffers()),
        ([*sparse_desc(), "cuda:0", 1], sparse_buffers()),
        # a logical size whose element count overflows
        (sparse_desc(shape=[2**62, 2**62, 2**62], sparse_dim=2), sparse_buffers()),
    ],
)
def test_hostile_sparse_descriptor_is_a_protocol_error(
    descriptor: list[Any], buffers: list[bytes]
) -> None:
    with pytest.raises(ProtocolError):
        decode([*RET, [descriptor], PAYLOAD], buffers)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    columns=st.lists(st.lists(st.integers(-2, 5), min_size=3, max_size=3), max_size=6),
    coalesced=st.booleans(),
)
def test_sparse_index_checks_agree_with_torchs(
    sizes: list[int], columns: list[list[int]], coalesced: bool
) -> None:
    # The codec checks a received COO tensor's indices itself (torch's
    # check_invariants costs ~2 ms in a busy worker); it must refuse exactly
    # what torch's check refuses.
    sparse_dim = len(sizes)
    indices = (
        torch.tensor([c[:sparse_dim] for c in columns], dtype=torch.int64)
        .reshape(len(columns), sparse_dim)
        .t()
        .contiguous()
    )
    values = torch.ones(len(columns))
    try:
        torch.sparse_coo_tensor(
            indices, values, sizes, is_coalesced=coalesced, check_invariants=True
        )
        torch_refuses = False
    except RuntimeError:
        torch_refuses = True
    try:  # what the decoder does
        codec._check_sparse_indices(indices, sizes, coalesced)
        torch.sparse_coo_tensor(
            indices, values, sizes, is_coalesced=coalesced, check_invariants=False
        )
        ours_refuses = False
    except (ProtocolError, RuntimeError):
        ours_refuses = True
    assert ours_refuses == torch_refuses, (indices.tolist(), sizes, coalesced)
