"""Device-map rules (aiorpc_autograd.devices) and the codec's use of them.

CPU-only: a tensor off the CPU is a ``meta`` tensor here; the GPU side of the
same rules is in tests/integration/test_cuda.py (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from aiorpc_autograd import codec
from aiorpc_autograd.codec import PythonRet
from aiorpc_autograd.devices import (
    DeviceMaps,
    inverse,
    normalize_device,
    normalize_map,
    target_device,
    validate_group,
)
from aiorpc_autograd.errors import ProtocolError
from aiorpc_autograd.options import RpcOptions
from aiorpc_autograd.wire import Frame


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("cuda:0", "cuda:0"),
        (1, "cuda:1"),
        (torch.device("cuda", 3), "cuda:3"),
        ("cuda:12", "cuda:12"),
    ],
)
def test_devices_are_normalised(given: object, expected: str) -> None:
    assert normalize_device(given) == expected


@pytest.mark.parametrize(
    "bad", ["cpu", "cuda", "meta", "gpu:0", torch.device("cpu"), -1, True, 1.5]
)
def test_non_cuda_or_unindexed_devices_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="device"):
        normalize_device(bad)


def test_a_map_must_be_one_to_one() -> None:
    with pytest.raises(ValueError, match="one-to-one"):
        normalize_map({"cuda:0": "cuda:1", 1: "cuda:1"}, "worker1")
    assert normalize_map({0: 1, "cuda:1": torch.device("cuda:0")}) == {
        "cuda:0": "cuda:1",
        "cuda:1": "cuda:0",
    }


def test_inverse_of_a_map() -> None:
    m = {"cuda:0": "cuda:2", "cuda:1": "cuda:0"}
    assert inverse(m) == {"cuda:2": "cuda:0", "cuda:0": "cuda:1"}
    assert inverse(inverse(m)) == m


def test_requests_use_the_own_map_and_replies_the_inverse_of_the_callers() -> None:
    maps = DeviceMaps(
        {"w1": {"cuda:0": "cuda:1"}, "w3": {}},
        {"w1": {"cuda:1": "cuda:0"}, "w2": {"cuda:0": "cuda:3"}},
    )
    assert maps.for_request("w1") == {"cuda:0": "cuda:1"}
    assert maps.for_request("w2") is None and maps.for_request("w3") is None
    assert maps.for_reply("w1") == {"cuda:0": "cuda:1"}  # inverse of w1's map to us
    assert maps.for_reply("w2") == {"cuda:3": "cuda:0"}
    assert bool(maps) and not DeviceMaps({}, {})


def test_group_validation_checks_both_sides_of_every_map_with_this_worker() -> None:
    records = [("w0", 2, {"w1": {"cuda:1": "cuda:3"}}), ("w1", 2, {}), ("w2", 0, {})]
    # w1 has 2 devices: cuda:3 does not exist there. Both ends raise alike.
    for me in ("w0", "w1"):
        with pytest.raises(ValueError, match=r"'w0' for 'w1' \(its remote side\) names cuda:3"):
            validate_group(me, records)
    validate_group("w2", records)  # not w2's business
    with pytest.raises(ValueError, match=r"local side.*no CUDA device"):
        validate_group("w2", [("w2", 0, {"w0": {"cuda:0": "cuda:0"}}), ("w0", 1, {})])
    with pytest.raises(ValueError, match="not in the group"):
        validate_group("w0", [("w0", 1, {"ghost": {"cuda:0": "cuda:0"}})])
    validate_group("w0", [("w0", 2, {"w0": {"cuda:0": "cuda:1"}})])  # calls to itself
    with pytest.raises(ValueError, match="names cuda:2"):
        validate_group("w0", [("w0", 2, {"w0": {"cuda:0": "cuda:2"}})])
    validate_group("w0", [("w0", 2, {"w1": {"cuda:1": "cuda:0"}}), ("w1", 1, {})])


def test_a_tensor_off_the_cpu_needs_a_map_entry() -> None:
    cpu, meta = torch.ones(2), torch.empty(2, device="meta")
    assert target_device(cpu, None) is None
    assert target_device(cpu, {"cuda:0": "cuda:1"}) is None
    for mapping in (None, {}, {"cuda:0": "cuda:1"}):
        with pytest.raises(TypeError, match="no device map entry for meta"):
            target_device(meta, mapping)


def test_the_encoder_refuses_an_unmapped_device_before_copying_it() -> None:
    message = PythonRet(codec.tensor_payload([torch.ones(1), torch.empty(3, device="meta")]))
    with pytest.raises(TypeError, match="no device map entry"):
        codec.encode(message, 7)
    with pytest.raises(TypeError, match="no device map entry"):
        codec.encode(message, 7, {"cuda:0": "cuda:0"})


def test_cpu_tensors_carry_no_device_and_ignore_the_map() -> None:
    message = PythonRet(codec.tensor_payload([torch.arange(4.0)]))
    header, buffers = codec.encode(message, 1, {"cuda:0": "cuda:1"})
    plain, _ = codec.encode(message, 1)
    assert header == plain  # no sixth descriptor element, byte for byte
    _, decoded = codec.decode(Frame(0, header, [memoryview(bytearray(b)) for b in buffers]))
    assert isinstance(decoded, PythonRet)
    assert torch.equal(decoded.value.tensors[0], torch.arange(4.0))


def _with_device(device: object) -> Frame:
    import msgpack

    message = PythonRet(codec.tensor_payload([torch.arange(4.0)]))
    header, buffers = codec.encode(message, 1)
    fields = msgpack.unpackb(header)
    fields[2][0].append(device)
    return Frame(0, msgpack.packb(fields), [memoryview(bytearray(b)) for b in buffers])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a worker without CUDA")
def test_a_tensor_for_a_device_this_worker_lacks_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="does not have"):
        codec.decode(_with_device("cuda:0"))


@pytest.mark.parametrize("bad", ["cpu", "cuda:", "cuda:x", "cuda:-1", 0, None, "meta"])
def test_a_malformed_tensor_device_is_a_protocol_error(bad: object) -> None:
    with pytest.raises(ProtocolError, match="bad tensor device"):
        codec.decode(_with_device(bad))


def test_options_check_the_shape_of_device_maps() -> None:
    with pytest.raises(TypeError, match="device_maps"):
        RpcOptions(device_maps={"w1": [("cuda:0", "cuda:0")]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="device_maps"):
        RpcOptions(device_maps=[("w1", {})])  # type: ignore[arg-type]
    RpcOptions(device_maps={"w1": {"cuda:0": "cuda:1"}})
