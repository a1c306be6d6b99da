"""Every message class of the codec through ``encode -> wire -> decode``.

Samples are built from each dataclass's field annotations, so a message class
added to the codec is covered without touching this file (an annotation the
table below does not know fails loudly instead).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
import torch

from aiorpc_autograd import codec, wire
from aiorpc_autograd.codec import (
    ForwardAutogradReq,
    ForwardAutogradResp,
    Message,
    MessageType,
    Payload,
    PayloadKind,
    PropagateGradientsReq,
    PythonCall,
    PythonRet,
    RunWithProfilingReq,
    RunWithProfilingResp,
    dump_payload,
    load_payload,
    tensor_payload,
)
from aiorpc_autograd.errors import ProtocolError

MESSAGE_CLASSES = sorted(codec._REGISTRY.values(), key=lambda c: int(c.TYPE))

# The PyTorch values (torch/csrc/distributed/rpc/message.h) and ours: pinned,
# because a peer built against docs/PROTOCOL.md relies on them.
PINNED_TYPES = {
    "PYTHON_CALL": (0x02, False),
    "PYTHON_RET": (0x03, True),
    "PYTHON_REMOTE_CALL": (0x05, False),
    "REMOTE_RET": (0x06, True),
    "PYTHON_RREF_FETCH_CALL": (0x08, False),
    "PYTHON_RREF_FETCH_RET": (0x0A, True),
    "RREF_USER_DELETE": (0x0B, False),
    "RREF_FORK_REQUEST": (0x0C, False),
    "RREF_CHILD_ACCEPT": (0x0D, False),
    "RREF_ACK": (0x0E, True),
    "FORWARD_AUTOGRAD_REQ": (0x0F, False),
    "FORWARD_AUTOGRAD_RESP": (0x10, True),
    "BACKWARD_AUTOGRAD_REQ": (0x11, False),
    "BACKWARD_AUTOGRAD_RESP": (0x12, True),
    "CLEANUP_AUTOGRAD_CONTEXT_REQ": (0x13, False),
    "RUN_WITH_PROFILING_REQ": (0x15, False),
    "RUN_WITH_PROFILING_RESP": (0x16, True),
    "RREF_BACKWARD_REQ": (0x17, False),
    "RREF_BACKWARD_RESP": (0x18, True),
    "EXCEPTION": (0x37, True),
    "HELLO": (0x40, False),
    "HEARTBEAT": (0x41, False),
}


# --------------------------------------------------------------------------- samples


def tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, 3, generator=g, requires_grad=True),
        torch.arange(5, dtype=torch.int32),
        torch.randn(4, generator=g)[::2],  # a strided view
        torch.tensor(1.5, dtype=torch.float64),
    ]


def call_payload() -> Payload:
    a, b, c, d = tensors()
    return dump_payload((torch.add, (a, d), {"alpha": 2, "extra": [b, c]}))


def result_payload() -> Payload:
    a, _, c, _ = tensors()
    return dump_payload({"out": a * 1, "aux": (c, "text", None)})


def sample_value(cls: type[Message], field: dataclasses.Field[Any]) -> Any:
    annotation = str(field.type)
    if field.name == "grads":  # gradients travel as the tensor table itself
        return tensor_payload([tensors()[0], None, tensors()[3]])
    if annotation == "Message":
        return PythonRet(result_payload()) if cls.IS_RESPONSE else PythonCall(None, call_payload())
    if annotation == "Payload":
        return result_payload() if cls.IS_RESPONSE else call_payload()
    table: dict[str, Any] = {
        "int": 2**40 + 7,
        "str": f"{cls.__name__}.{field.name} ✓",
        "str | None": "registered_fn",
        "bool": True,
        "list[int]": [3, 2**33],
        "IntList": [2**40 + 9, 1, 2],
        "dict[str, str]": {"cpu": "cpu", "cuda:0": "cuda:1"},
        "dict[str, Any]": {"record_shapes": True, "n": 3, "names": ["a"]},
        "list[Any]": [{"name": "aten::add", "cpu_us": 1.5}, ["x", 2]],
    }
    if annotation not in table:
        pytest.fail(f"no sample for a field annotated {annotation!r}: add one to sample_value")
    return table[annotation]


def sample(cls: type[Message]) -> Message:
    return cls(*(sample_value(cls, f) for f in dataclasses.fields(cls)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- comparison


def assert_tensor_equal(got: torch.Tensor | None, sent: torch.Tensor | None) -> None:
    if sent is None:
        assert got is None
        return
    assert got is not None
    assert got.dtype == sent.dtype and got.shape == sent.shape
    assert got.requires_grad == sent.requires_grad
    assert torch.equal(got.detach(), sent.detach())


def assert_payload_equal(got: Payload, sent: Payload) -> None:
    assert got.kind is sent.kind
    assert got.data == sent.data
    assert len(got.tensors) == len(sent.tensors)
    for g, s in zip(got.tensors, sent.tensors, strict=True):
        assert_tensor_equal(g, s)


def assert_message_equal(got: Message, sent: Message) -> None:
    assert type(got) is type(sent)
    for f in dataclasses.fields(sent):  # type: ignore[arg-type]
        g, s = getattr(got, f.name), getattr(sent, f.name)
        if isinstance(s, Payload):
            assert_payload_equal(g, s)
        elif isinstance(s, Message):
            assert_message_equal(g, s)
        else:
            assert g == s, f.name
            assert type(g) is type(s), f.name


def through_the_wire(message: Message, request_id: int = 9) -> tuple[int, Message, wire.Frame]:
    header, buffers = codec.encode(message, request_id)
    data = b"".join(bytes(c) for c in wire.encode_frame(header, buffers))
    (frame,) = wire.FrameReader().feed(data)
    rid, decoded = codec.decode(frame)
    return rid, decoded, frame


# --------------------------------------------------------------------------- tests


def test_message_type_values_are_pinned() -> None:
    for name, (value, is_response) in PINNED_TYPES.items():
        assert MessageType[name] == value, name
        cls = codec._REGISTRY[value]
        assert cls.TYPE is MessageType[name]
        assert cls.IS_RESPONSE is is_response, name


def test_notices_are_never_answered_and_their_answers_are_reserved() -> None:
    notices = {cls.__name__ for cls in MESSAGE_CLASSES if cls.IS_NOTICE}
    assert notices == {"CleanupAutogradContextReq", "Goodbye"}
    assert not any(cls.IS_RESPONSE for cls in MESSAGE_CLASSES if cls.IS_NOTICE)
    # torch's CLEANUP_AUTOGRAD_CONTEXT_RESP keeps its value, and no message has it.
    assert MessageType.CLEANUP_AUTOGRAD_CONTEXT_RESP == 0x14
    assert 0x14 not in codec._REGISTRY


def test_message_types_are_unique_and_registered_once() -> None:
    values = [m.value for m in MessageType.__members__.values()]
    assert len(values) == len(set(values)), "an IntEnum alias hides a duplicate value"
    for value, cls in codec._REGISTRY.items():
        assert value == cls.TYPE
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert sorted(codec._REGISTRY) == sorted({int(c.TYPE) for c in MESSAGE_CLASSES})


def test_payload_kind_values_are_pinned() -> None:
    assert (PayloadKind.PICKLE, PayloadKind.MSGPACK, PayloadKind.TENSORS) == (0, 1, 2)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("request_id", [0, 1, 2**64 - 1])
def test_every_message_round_trips(cls: type[Message], request_id: int) -> None:
    sent = sample(cls)
    rid, got, _ = through_the_wire(sent, request_id)
    assert rid == request_id
    assert_message_equal(got, sent)
    # The frame's tensor table is the (innermost) payload's.
    sent_payload, got_payload = sent.payload(), got.payload()
    if sent_payload is None:
        assert got_payload is None
    else:
        assert got_payload is not None
        assert_payload_equal(got_payload, sent_payload)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_header_layout(cls: type[Message]) -> None:
    sent = sample(cls)
    header, buffers = codec.encode(sent, 77)
    decoded = msgpack.unpackb(header, strict_map_key=False)
    assert decoded[0] == int(cls.TYPE)
    assert decoded[1] == 77
    payload = sent.payload()
    table = decoded[2]
    n = len(payload.tensors) if payload is not None else 0
    assert len(table) == n
    assert len(buffers) == sum(t is not None for t in (payload.tensors if payload else []))
    for desc, t in zip(table, payload.tensors if payload else [], strict=True):
        if t is None:
            assert desc is None
            continue
        dtype, shape, index, offset, requires_grad = desc
        assert dtype == str(t.dtype).removeprefix("torch.")
        assert shape == list(t.shape)
        assert offset == 0
        assert buffers[index].nbytes == t.numel() * t.element_size()
        assert requires_grad is t.requires_grad
    assert decoded[3:] == msgpack.unpackb(_packb(sent.to_fields()), strict_map_key=False)


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_call_payload_decodes_to_a_callable_call() -> None:
    _, got, _ = through_the_wire(PythonCall(None, call_payload()))
    assert isinstance(got, PythonCall)
    func, args, kwargs = load_payload(got.value)
    assert func is torch.add
    a, _, _, d = tensors()
    assert torch.equal(func(*args, alpha=kwargs["alpha"]), torch.add(a, d, alpha=2))


def test_named_call_in_safe_mode() -> None:
    t = torch.arange(3.0)
    payload = dump_payload([[t, 2], {"k": "v"}], allow_pickle=False)
    _, got, _ = through_the_wire(PythonCall("my.fn", payload))
    assert isinstance(got, PythonCall) and got.target == "my.fn"
    (arg0, arg1), kwargs = load_payload(got.value, allow_pickle=False)
    assert torch.equal(arg0, t) and arg1 == 2 and kwargs == {"k": "v"}


# --------------------------------------------------------------------------- wrappers


def test_forward_autograd_request_wraps_a_call() -> None:
    inner = PythonCall(None, call_payload())
    sent = ForwardAutogradReq(3, (3 << 48) | 17, 42, {"cpu": "cpu"}, inner)
    assert sent.payload() is inner.value
    _, got, frame = through_the_wire(sent)
    assert isinstance(got, ForwardAutogradReq)
    assert (got.from_worker, got.context_id, got.message_id) == (3, (3 << 48) | 17, 42)
    assert got.device_map == {"cpu": "cpu"}
    assert isinstance(got.wrapped, PythonCall)
    assert got.payload() is got.wrapped.value
    assert_message_equal(got, sent)
    # The innermost payload's tensors are the frame's: one buffer each.
    assert len(frame.buffers) == len(inner.value.tensors)
    _, (a, _), _ = load_payload(got.wrapped.value)
    assert a.requires_grad and a.is_leaf


def test_forward_autograd_response_wraps_a_result() -> None:
    sent = ForwardAutogradResp(1, 5, 6, {}, PythonRet(result_payload()))
    _, got, _ = through_the_wire(sent)
    assert_message_equal(got, sent)
    assert got.IS_RESPONSE


def test_profiling_wraps_autograd_wraps_call() -> None:
    inner = PythonCall("f", dump_payload([[torch.ones(2, requires_grad=True)], {}], False))
    sent = RunWithProfilingReq([1, 9], {"use_cpu": True}, ForwardAutogradReq(0, 1, 2, {}, inner))
    assert sent.payload() is inner.value
    _, got, _ = through_the_wire(sent)
    assert_message_equal(got, sent)
    assert isinstance(got, RunWithProfilingReq)
    assert isinstance(got.wrapped, ForwardAutogradReq)
    assert got.payload() is got.wrapped.wrapped.value  # type: ignore[attr-defined]

    resp = RunWithProfilingResp(
        [1, 9], [{"name": "op"}], ForwardAutogradResp(1, 1, 3, {}, PythonRet(result_payload()))
    )
    _, got_resp, _ = through_the_wire(resp)
    assert_message_equal(got_resp, resp)


def test_nested_autograd_wrappers_are_refused() -> None:
    inner = ForwardAutogradReq(0, 1, 2, {}, PythonCall(None, call_payload()))
    header, buffers = codec.encode(ForwardAutogradReq(0, 1, 3, {}, inner))
    frame = wire.FrameReader().feed(b"".join(bytes(c) for c in wire.encode_frame(header, buffers)))[
        0
    ]
    with pytest.raises(ProtocolError, match="nested"):
        codec.decode(frame)


def test_gradients_keep_their_undefined_entries() -> None:
    g = torch.randn(3)
    fields = [f.name for f in dataclasses.fields(PropagateGradientsReq) if f.name != "grads"]
    values = {name: i + 1 for i, name in enumerate(fields)}
    values["retain_graph"] = False
    values["optimizer"] = [7, 1, 2]  # type: ignore[assignment]
    sent = PropagateGradientsReq(grads=tensor_payload([None, g, None]), **values)
    _, got, frame = through_the_wire(sent)
    assert isinstance(got, PropagateGradientsReq)
    assert got.grads.kind is PayloadKind.TENSORS
    assert len(frame.buffers) == 1
    a, b, c = load_payload(got.grads)
    assert a is None and c is None and torch.equal(b, g)
    assert_message_equal(got, sent)
