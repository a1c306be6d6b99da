"""Payloads: pickle with out-of-band tensors, msgpack (safe mode), tensor lists."""

from __future__ import annotations

import contextlib
import math
import pickle
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiorpc_autograd import codec
from aiorpc_autograd.codec import Payload, PayloadKind, dump_payload, load_payload, tensor_payload
from aiorpc_autograd.errors import ProtocolError

SETTINGS = settings(max_examples=150, deadline=None)


def travel(payload: Payload, allow_pickle: bool = True) -> Any:
    """Through encode/decode (no wire: the wire is tested on its own)."""
    from aiorpc_autograd import wire

    header, buffers = codec.encode(codec.PythonRet(payload))
    (frame,) = wire.FrameReader().feed(
        b"".join(bytes(c) for c in wire.encode_frame(header, buffers))
    )
    _, msg = codec.decode(frame)
    assert isinstance(msg, codec.PythonRet)
    return load_payload(msg.value, allow_pickle)


class Point:
    """An importable class: rebuilt on the receiver as pickle would."""

    def __init__(self, x: int, t: torch.Tensor) -> None:
        self.x, self.t = x, t


# --------------------------------------------------------------------------- pickle


def test_pickle_keeps_python_types() -> None:
    t = torch.randn(3)
    value = {(1, "a"): (t, [1.5, None]), 2: {3, 4}, "p": Point(7, t), b"k": frozenset({1})}
    payload = dump_payload(value)
    assert payload.kind is PayloadKind.PICKLE
    assert len(payload.tensors) == 1 and payload.tensors[0] is t
    assert payload.data[:1] == b"\x80"  # a pickle stream
    got = travel(payload)
    assert set(got) == {(1, "a"), 2, "p", b"k"}
    gt, rest = got[(1, "a")]
    assert torch.equal(gt, t) and rest == [1.5, None]
    assert got[2] == {3, 4} and got[b"k"] == frozenset({1})
    assert isinstance(got["p"], Point) and got["p"].x == 7
    assert got["p"].t is gt  # one tensor, referenced twice


def test_tensors_never_go_through_pickle() -> None:
    t = torch.full((1000,), 3.25)
    payload = dump_payload([t])
    assert len(payload.data) < 100  # the elements are not in the pickle stream
    assert payload.tensors[0] is t


@pytest.mark.parametrize(
    "value",
    [lambda: 1, (x for x in ()), type("Local", (), {})()],
    ids=["lambda", "generator", "local-class"],
)
def test_unpicklable_value_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        dump_payload(value)


def test_pickled_payload_refused_in_safe_mode() -> None:
    payload = dump_payload({"x": 1})
    with pytest.raises(ProtocolError, match="safe mode"):
        load_payload(payload, allow_pickle=False)
    # Even one that merely looks harmless, and even without any tensor.
    with pytest.raises(ProtocolError):
        load_payload(Payload(PayloadKind.PICKLE, pickle.dumps(1), []), allow_pickle=False)


# --------------------------------------------------------------------------- msgpack (safe mode)


def test_msgpack_payload_with_tensors_round_trips() -> None:
    t, u = torch.randn(2, 2), torch.arange(4, dtype=torch.uint8)
    value = {"a": t, "b": [u, 1, "x", b"raw", None, 1.5, True, -(2**63), 2**64 - 1], "c": {}}
    payload = dump_payload(value, allow_pickle=False)
    assert payload.kind is PayloadKind.MSGPACK
    got = travel(payload, allow_pickle=False)
    assert torch.equal(got["a"], t) and torch.equal(got["b"][0], u)
    assert got["b"][1:] == value["b"][1:]  # type: ignore[index]
    assert got["c"] == {}


def test_msgpack_tensor_is_an_ext_type_holding_its_index() -> None:
    t = torch.ones(1)
    payload = dump_payload([0, t], allow_pickle=False)
    assert payload.data == msgpack.packb([0, msgpack.ExtType(1, (0).to_bytes(4, "little"))])
    assert len(payload.tensors) == 1 and payload.tensors[0] is t


def test_msgpack_turns_tuples_into_lists() -> None:
    assert travel(dump_payload((1, (2, 3)), allow_pickle=False), allow_pickle=False) == [1, [2, 3]]


@pytest.mark.parametrize(
    "value",
    [{1, 2}, object(), print, Point(1, torch.ones(1)), 2**64, -(2**63) - 1, 1j, {"k": [{1}]}],
    ids=["set", "object", "builtin", "instance", "big-int", "small-int", "complex", "nested"],
)
def test_non_msgpack_value_in_safe_mode_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        dump_payload(value, allow_pickle=False)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # never used
        b"\x92\x01",  # truncated array
        msgpack.packb(msgpack.ExtType(1, (5).to_bytes(4, "little"))),  # no tensor 5
        msgpack.packb(msgpack.ExtType(1, b"\x00\x00")),  # short index
        msgpack.packb(msgpack.ExtType(9, b"\x00\x00\x00\x00")),  # unknown ext code
        msgpack.packb(1) + b"\x01",  # extra data
    ],
)
def test_malformed_msgpack_payload_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        load_payload(Payload(PayloadKind.MSGPACK, data, [torch.ones(1)]), allow_pickle=False)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(value=msgpack_values)
def test_msgpack_values_round_trip(value: Any) -> None:
    for allow_pickle in (False, True):
        assert travel(dump_payload(value, allow_pickle), allow_pickle) == value


@SETTINGS
@given(data=st.binary(max_size=64), n=st.integers(0, 3))
def test_random_msgpack_payload_only_raises_protocol_error(data: bytes, n: int) -> None:
    payload = Payload(PayloadKind.MSGPACK, data, [torch.zeros(1)] * n)
    with contextlib.suppress(ProtocolError):
        load_payload(payload, allow_pickle=False)


def test_float_specials_round_trip_in_msgpack() -> None:
    got = travel(dump_payload([math.inf, -0.0], allow_pickle=False), allow_pickle=False)
    assert got[0] == math.inf and math.copysign(1, got[1]) == -1
    (nan,) = travel(dump_payload([math.nan], allow_pickle=False), allow_pickle=False)
    assert math.isnan(nan)


# --------------------------------------------------------------------------- tensor lists


def test_tensor_payload_is_its_table() -> None:
    a = torch.randn(2)
    payload = tensor_payload([a, None])
    assert payload.kind is PayloadKind.TENSORS and payload.data == b""
    got = load_payload(payload, allow_pickle=False)
    assert len(got) == 2 and got[0] is a and got[1] is None


class _ScriptRef:
    """Pickles as a reference to the TorchScript function ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return codec._script_function, (self.name,)


@pytest.mark.parametrize(
    "name",
    [
        "__torch__.json.no_such_function",  # the module has nothing of that name
        "__torch__.json.dumps",  # a plain function, not TorchScript
        "__torch__.no_such_function",  # nothing compiled under that name here
    ],
)
def test_a_torchscript_function_not_found_here_fails_that_value(name: str) -> None:
    payload = codec.dump_payload(_ScriptRef(name))
    with pytest.raises(pickle.UnpicklingError, match="no TorchScript function"):
        codec.load_payload(payload)
