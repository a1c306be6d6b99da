"""docs/PROTOCOL.md agrees with the code: examples, message table, dtypes, limits."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import struct
from pathlib import Path

import msgpack
import pytest
import torch

from aiorpc_autograd import codec, wire
from aiorpc_autograd.codec import MessageType, PayloadKind
from aiorpc_autograd.options import RpcOptions

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
TEXT = DOC.read_text(encoding="utf-8")


def example(name: str) -> bytes:
    match = re.search(rf"<!-- example: {name} -->\n```\n(.*?)```", TEXT, re.S)
    assert match, f"example {name!r} not found in {DOC}"
    return bytes.fromhex(match.group(1))


def frame_bytes(message: codec.Message, request_id: int) -> bytes:
    header, buffers = codec.encode(message, request_id)
    return b"".join(bytes(c) for c in wire.encode_frame(header, buffers))


def test_hello_example() -> None:
    assert frame_bytes(codec.Hello("w1", 1, "aiorpc/1/"), 0) == example("hello")


def test_call_example() -> None:
    payload = codec.dump_payload([[torch.tensor([1.0, 2.0, 3.0])], {}], allow_pickle=False)
    data = example("call")
    assert frame_bytes(codec.PythonCall("add_one", payload), 7) == data
    (frame,) = wire.FrameReader().feed(data)
    rid, msg = codec.decode(frame)
    assert rid == 7 and isinstance(msg, codec.PythonCall) and msg.target == "add_one"
    (args, kwargs) = codec.load_payload(msg.value, allow_pickle=False)
    assert args[0].tolist() == [1.0, 2.0, 3.0] and kwargs == {}


ROW = re.compile(r"^\| `0x([0-9A-F]{2})` \| `(\w+)` \| *(resp)? *\| (.*) \|$", re.M)
ROWS = {int(h, 16): (name, bool(resp), fields) for h, name, resp, fields in ROW.findall(TEXT)}


def doc_field_names(cls: type[codec.Message], cell: str) -> list[str]:
    if cell.startswith("same as"):
        other = int(re.search(r"0x([0-9A-F]{2})", cell).group(1), 16)  # type: ignore[union-attr]
        return doc_field_names(cls, ROWS[other][2])
    if cell == "(none)":
        return []
    cell = cell.split(";")[0]  # a note may follow
    return re.findall(r"`(\w+)(?::[^`]*)?`", cell)


def wire_field_names(cls: type[codec.Message]) -> list[str]:
    # Gradients travel as the tensor table, not as a field.
    return [f.name for f in dataclasses.fields(cls) if f.name != "grads"]  # type: ignore[arg-type]


@pytest.mark.parametrize("member", list(MessageType), ids=lambda m: m.name)
def test_every_message_type_is_in_the_table(member: MessageType) -> None:
    assert int(member) in ROWS, f"{member.name} (0x{int(member):02X}) is missing from {DOC.name}"
    name, resp, cell = ROWS[int(member)]
    assert name == member.name
    cls = codec._REGISTRY.get(int(member))
    if cls is None:
        assert "reserved" in cell
        return
    assert resp is cls.IS_RESPONSE
    assert doc_field_names(cls, cell) == wire_field_names(cls)


def test_the_table_lists_no_unknown_type() -> None:
    assert set(ROWS) == {int(m) for m in MessageType}


DTYPE_ROW = re.compile(r"`(\w+)` \| (\d+) \|")


def test_dtype_table() -> None:
    section = TEXT[TEXT.index("### dtype names") : TEXT.index("## 5. Payloads")]
    documented = {name: int(size) for name, size in DTYPE_ROW.findall(section)}
    for name, size in documented.items():
        assert name in codec._DTYPES, name
        assert codec._DTYPES[name].itemsize == size, name
    placeholders = {f"uint{i}" for i in range(1, 8)} | {f"int{i}" for i in range(1, 8)}
    assert set(codec._DTYPES) - placeholders == set(documented)


def test_constants_and_limits() -> None:
    assert (wire.MAGIC, wire.VERSION, wire.ALIGN, wire.PREFIX_SIZE) == (b"ARPC", 1, 64, 24)
    assert "`ALIGN = 64`" in TEXT and "`<4sBBHIIQ`" in TEXT
    limits, options = wire.Limits(), RpcOptions()
    assert limits.max_message_size == options.max_message_size == 4 << 30  # "4 GiB"
    assert limits.max_header_size == options.max_header_size == 64 << 20  # "64 MiB"
    assert limits.max_buffers == options.max_tensors == 65536
    assert [int(k) for k in PayloadKind] == [0, 1, 2]
    assert codec._EXT_TENSOR == 1


def test_authentication_exchange_matches_the_doc() -> None:
    """§9.1 and §11, computed from the formulas in the doc."""
    handshake = pytest.importorskip("aiorpc_autograd.handshake")
    from aiorpc_autograd.rendezvous import Address

    token = "sh4red secret ✓"
    group = "aiorpc/3/"

    def mac(key: bytes, *parts: bytes) -> bytes:
        return hmac.new(key, b"".join(parts), hashlib.sha256).digest()

    # §11: records, run id, confirmations, run key.
    nonce = bytes(range(32))
    maps = {"w2": {"cuda:0": "cuda:1"}}
    fields = ["w1", 1, "127.0.0.1", 4242, "", "host", 2, maps, nonce]
    record = Address("w1", 1, "127.0.0.1", 4242, "", "host", 2, maps).signed(
        nonce, lambda body: handshake.record_mac(token, group, body)
    )
    body = msgpack.packb(fields)
    assert record.mac == mac(token.encode(), b"aiorpc record\0", group.encode(), b"\0", body)
    assert record.pack() == msgpack.packb([*fields, record.mac])
    records = [b"first", record.pack()]
    expect_run = hashlib.sha256(
        b"aiorpc run\0"
        + group.encode()
        + b"\0"
        + b"".join(struct.pack("<I", len(r)) + r for r in records)
    ).digest()
    run = handshake.run_id(group, records)
    assert run == expect_run
    assert handshake.confirm_mac(token, run, 1) == mac(
        token.encode(), b"aiorpc confirm\0", run, b"1"
    )
    key = handshake.run_key(token, run)
    assert key == mac(token.encode(), b"aiorpc run key\0", run)

    # §9.1: the handshake, bound to the server's rank.
    server_id = b"1"
    client = handshake.ClientHandshake(key, server_id)
    server = handshake.ServerHandshake(key, server_id)
    step1 = bytes(client.outgoing)
    client.outgoing.clear()
    assert len(step1) == 37 and step1[:5] == b"ARPA\x02"
    cn = step1[5:]
    assert server.feed(step1) == b"" and not server.done
    step2 = bytes(server.outgoing)
    server.outgoing.clear()
    sn = step2[:32]
    assert step2 == sn + mac(key, b"S", cn, sn, server_id)
    frame = b"ARPC" + bytes(20)  # whatever follows step 3 is the frame stream
    assert client.feed(step2) == b"" and client.done
    step3 = bytes(client.outgoing)
    assert step3 == mac(key, b"C", sn, cn, server_id)
    assert server.feed(step3 + frame) == frame and server.done
    c2s, s2c = mac(key, b"K c2s", cn, sn, server_id), mac(key, b"K s2c", cn, sn, server_id)
    assert client.session_keys == (c2s, s2c) and server.session_keys == (s2c, c2s)
    assert '`"ARPA"`, version u8 `2`, `cn`' in TEXT

    # §9.1: frame tags.
    header = b"\x93\x40\x00\x90"
    sender = wire.FrameMac(c2s)
    plain = bytes(wire.encode_frame(header, [b"abc"])[0])  # prefix, lengths, header
    for seq in (0, 1):
        meta = bytes(wire.encode_frame(header, [b"abc"], mac=sender)[0])
        tag = hashlib.blake2b(
            struct.pack("<Q", seq) + plain, key=c2s, person=b"aiorpc-frame", digest_size=16
        ).digest()
        assert meta == plain + tag
    assert "tag (16 bytes)" in TEXT
