"""Authenticated framing, byte by byte (sans-I/O): frame tags with implicit
sequence numbers, the run-bound and server-bound handshake and its session
keys, and the authenticated rendezvous records."""

from __future__ import annotations

import hashlib
import secrets
import struct

import pytest

from aiorpc_autograd import handshake
from aiorpc_autograd.errors import AuthenticationError, ProtocolError
from aiorpc_autograd.rendezvous import Address
from aiorpc_autograd.wire import (
    PREFIX_SIZE,
    TAG_SIZE,
    Frame,
    FrameMac,
    FrameReader,
    Limits,
    encode_frame,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def frame_bytes(header: bytes, buffers: list[bytes], mac: FrameMac | None) -> bytes:
    return b"".join(bytes(c) for c in encode_frame(header, buffers, mac=mac))


def stream(n: int, key: bytes = KEY) -> list[bytes]:
    """``n`` tagged frames of one direction, in order (frame i has header b"h<i>")."""
    mac = FrameMac(key)
    return [frame_bytes(b"h%d" % i, [b"body%d" % i, b"x" * 70], mac) for i in range(n)]


def reader(key: bytes = KEY, **kwargs: int) -> FrameReader:
    return FrameReader(mac=FrameMac(key), **kwargs)


def expected_tag(key: bytes, seq: int, meta: bytes) -> bytes:
    return hashlib.blake2b(
        struct.pack("<Q", seq) + meta, key=key, person=b"aiorpc-frame", digest_size=TAG_SIZE
    ).digest()


# ------------------------------------------------------------------------ frame tags


def test_tag_sits_between_header_and_body_and_covers_prefix_lengths_header() -> None:
    mac = FrameMac(KEY)
    for seq in range(3):
        data = frame_bytes(b"hdr", [b"abc", b"defg"], mac)
        plain = frame_bytes(b"hdr", [b"abc", b"defg"], None)
        meta_len = PREFIX_SIZE + 16 + 3
        assert data[:meta_len] == plain[:meta_len]
        assert data[meta_len : meta_len + TAG_SIZE] == expected_tag(KEY, seq, plain[:meta_len])
        assert data[meta_len + TAG_SIZE :] == plain[meta_len:]  # the body, untouched


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_in_order_frames_are_accepted_in_any_chunking(chunk: int) -> None:
    data = b"".join(stream(5))
    r = reader(scratch_size=64, direct_threshold=32)
    frames: list[Frame] = []
    for i in range(0, len(data), chunk):
        frames += r.feed(data[i : i + chunk])
    assert [f.header for f in frames] == [b"h%d" % i for i in range(5)]
    assert [bytes(f.buffers[0]) for f in frames] == [b"body%d" % i for i in range(5)]
    assert r.buffered == 0


def test_every_byte_of_prefix_lengths_header_and_tag_is_covered() -> None:
    first, second = stream(2)
    meta_len = PREFIX_SIZE + 16 + 2 + TAG_SIZE  # prefix, 2 lengths, b"h0", tag
    # Small limits: a length flipped upwards either breaks them or makes the
    # reader wait for bytes that the padding then supplies.
    limits = Limits(max_message_size=2048, max_header_size=256, max_buffers=8)
    for i in range(meta_len):
        for bit in (0x01, 0x80):
            altered = bytearray(first)
            altered[i] ^= bit
            r = FrameReader(limits, mac=FrameMac(KEY))
            with pytest.raises((AuthenticationError, ProtocolError)):
                r.feed(bytes(altered) + second + bytes(4096))
        # The reader stays failed: nothing after the bad frame is ever returned.
        with pytest.raises((AuthenticationError, ProtocolError)):
            r.feed(second)


def test_header_change_is_an_authentication_error() -> None:
    (data,) = stream(1)
    altered = bytearray(data)
    altered[PREFIX_SIZE + 16] ^= 0xFF  # first header byte
    with pytest.raises(AuthenticationError, match="failed authentication"):
        reader().feed(bytes(altered))


def test_body_bytes_are_not_covered() -> None:
    """Documented split: tensor bytes are TLS's job, not the tag's."""
    (data,) = stream(1)
    altered = bytearray(data)
    altered[-1] ^= 0xFF
    (frame,) = reader().feed(bytes(altered))
    assert frame.header == b"h0"


@pytest.mark.parametrize(
    "order",
    [
        pytest.param([0, 0], id="replayed"),
        pytest.param([1, 0], id="reordered"),
        pytest.param([0, 2], id="dropped"),
        pytest.param([0, 1, 1], id="replayed-later"),
    ],
)
def test_replayed_reordered_or_dropped_frames_fail(order: list[int]) -> None:
    frames = stream(3)
    r = reader()
    got: list[Frame] = []
    with pytest.raises(AuthenticationError):
        for i in order:
            got += r.feed(frames[i])
    # Only the frames before the first out-of-sequence one were returned.
    good = 0
    while good < len(order) and order[good] == good:
        good += 1
    assert [f.header for f in got] == [b"h%d" % i for i in range(good)]


def test_frames_of_another_connection_or_direction_fail() -> None:
    with pytest.raises(AuthenticationError):
        reader(KEY).feed(stream(1, OTHER)[0])
    # An untagged (no-token) frame is not accepted either.
    with pytest.raises((AuthenticationError, ProtocolError)):
        reader(KEY).feed(frame_bytes(b"h0", [b"body0"], None) + bytes(64))


def test_injected_frame_fails_before_its_body_is_allocated() -> None:
    """A forged prefix claiming a large body is refused once the tag is in:
    the body is never allocated (nor awaited)."""
    big = 1 << 30
    prefix = struct.pack("<4sBBHIIQ", b"ARPC", 1, 0, 0, 2, 1, big)
    forged = prefix + struct.pack("<Q", big) + b"h0" + secrets.token_bytes(TAG_SIZE)
    r = reader(direct_threshold=1024)
    with pytest.raises(AuthenticationError):
        r.feed(forged)
    assert r.buffered < 4096


def test_tagged_large_body_is_read_directly() -> None:
    mac = FrameMac(KEY)
    payload = bytes(range(256)) * 1024
    data = frame_bytes(b"big", [payload], mac) + frame_bytes(b"next", [], mac)
    r = reader(scratch_size=64, direct_threshold=1024)
    frames: list[Frame] = []
    for i in range(0, len(data), 4096):
        frames += r.feed(data[i : i + 4096])
    assert [f.header for f in frames] == [b"big", b"next"]
    assert bytes(frames[0].buffers[0]) == payload


def test_tag_not_counted_in_limits() -> None:
    limits = Limits(max_message_size=8 + 2 + 5, max_header_size=2, max_buffers=1)
    mac = FrameMac(KEY)
    data = frame_bytes(b"h0", [b"12345"], mac)
    (frame,) = FrameReader(limits, mac=FrameMac(KEY)).feed(data)
    assert bytes(frame.buffers[0]) == b"12345"


# ------------------------------------------------------------------------- handshake


def run_handshake(
    client: handshake.ClientHandshake, server: handshake.ServerHandshake
) -> tuple[bytes, bytes]:
    step1 = bytes(client.outgoing)
    client.outgoing.clear()
    server.feed(step1)
    step2 = bytes(server.outgoing)
    server.outgoing.clear()
    client.feed(step2)
    step3 = bytes(client.outgoing)
    client.outgoing.clear()
    server.feed(step3)
    return step2, step3


def test_session_keys_agree_per_direction() -> None:
    client = handshake.ClientHandshake(KEY, b"1")
    server = handshake.ServerHandshake(KEY, b"1")
    run_handshake(client, server)
    assert client.done and server.done
    assert client.session_keys is not None and server.session_keys is not None
    c_send, c_recv = client.session_keys
    s_send, s_recv = server.session_keys
    assert c_send == s_recv and s_send == c_recv and c_send != c_recv
    # Each connection gets fresh keys.
    again_c = handshake.ClientHandshake(KEY, b"1")
    again_s = handshake.ServerHandshake(KEY, b"1")
    run_handshake(again_c, again_s)
    assert again_c.session_keys is not None
    assert not set(again_c.session_keys) & set(client.session_keys)


def test_client_refuses_another_worker_or_run() -> None:
    """A relay that splices the connection to another worker (or a worker of
    another run) fails at step 2, before the client sends anything else."""
    for server in (
        handshake.ServerHandshake(KEY, b"2"),  # another rank
        handshake.ServerHandshake(OTHER, b"1"),  # another run
    ):
        client = handshake.ClientHandshake(KEY, b"1")
        server.feed(bytes(client.outgoing))
        with pytest.raises(AuthenticationError):
            client.feed(bytes(server.outgoing))
        assert not client.done and client.session_keys is None


def test_server_refuses_a_wrong_proof_and_old_versions() -> None:
    client = handshake.ClientHandshake(OTHER, b"1")
    server = handshake.ServerHandshake(KEY, b"1")
    server.feed(bytes(client.outgoing))
    with pytest.raises(AuthenticationError):
        server.feed(secrets.token_bytes(32))
    assert not server.done
    old = handshake.ServerHandshake(KEY, b"1")
    with pytest.raises(ProtocolError, match="version 1"):
        old.feed(b"ARPA\x01" + bytes(32))


def test_relay_without_the_key_cannot_continue_a_relayed_session() -> None:
    """The attack of issue 11: a relay forwards the handshake untouched, then
    injects a frame. It has the nonces but not the key: its frame fails."""
    client = handshake.ClientHandshake(KEY, b"1")
    server = handshake.ServerHandshake(KEY, b"1")
    step2, step3 = run_handshake(client, server)
    assert server.session_keys is not None and client.session_keys is not None
    r = FrameReader(mac=FrameMac(server.session_keys[1]))
    cn = b""  # the relay saw everything on the wire; guessing keys from it fails
    for guess in (KEY, hashlib.sha256(step2 + step3 + cn).digest(), bytes(32)):
        with pytest.raises(AuthenticationError):
            FrameReader(mac=FrameMac(server.session_keys[1])).feed(
                frame_bytes(b"call", [], FrameMac(guess))
            )
    # The genuine client's frames pass.
    (frame,) = r.feed(frame_bytes(b"hello", [], FrameMac(client.session_keys[0])))
    assert frame.header == b"hello"


# ------------------------------------------------------------------------- records

TOKEN = "token-for-records"
GROUP = "aiorpc/1/"


def signed() -> Address:
    base = Address("worker1", 1, "127.0.0.1", 5000, "\0aiorpc-x", "host:boot:1")
    return base.signed(bytes(32), lambda body: handshake.record_mac(TOKEN, GROUP, body))


def verifies(addr: Address, group: str = GROUP, token: str = TOKEN) -> bool:
    return addr.mac == handshake.record_mac(token, group, addr.body())


def test_record_mac_covers_every_field_and_the_group() -> None:
    record = signed()
    assert Address.unpack(record.pack()) == record and verifies(record)
    import dataclasses

    for field, value in [
        ("name", "worker2"),
        ("rank", 2),
        ("host", "10.0.0.9"),
        ("port", 5001),
        ("unix_path", "\0evil"),
        ("host_id", "other"),
        ("cuda_devices", 4),
        ("device_maps", {"worker0": {"cuda:0": "cuda:1"}}),
        ("nonce", b"\1" * 32),
    ]:
        assert not verifies(dataclasses.replace(record, **{field: value})), field
    assert not verifies(record, group="aiorpc/2/")
    assert not verifies(record, token="another")


def test_run_id_changes_with_any_record_and_binds_confirmations() -> None:
    records = [signed().pack(), b"second"]
    run = handshake.run_id(GROUP, records)
    replayed = [
        Address("worker1", 1, "127.0.0.1", 5000, "\0aiorpc-x", "host:boot:1")
        .signed(b"\2" * 32, lambda body: handshake.record_mac(TOKEN, GROUP, body))
        .pack(),
        b"second",
    ]
    assert handshake.run_id(GROUP, replayed) != run
    assert handshake.run_id("aiorpc/2/", records) != run
    assert handshake.confirm_mac(TOKEN, run, 0) != handshake.confirm_mac(TOKEN, run, 1)
    assert handshake.run_key(TOKEN, run) != handshake.run_key(
        TOKEN, handshake.run_id(GROUP, replayed)
    )


@pytest.mark.parametrize(
    "data",
    [b"", b"\x90", b"\xc1", b"\x98" + b"\xc0" * 8, Address("a", 0, "h", 1, "", "").pack()[:-1]],
)
def test_malformed_records_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed address record"):
        Address.unpack(data)


@pytest.mark.parametrize("name", ["", "a/b", "w 1", "w.1", "x" * 128, "wörker"])
def test_records_with_a_name_torch_refuses_are_malformed(name: str) -> None:
    # A worker name is a path part ("name/device") and a log field: only
    # torch's names are taken from the store.
    with pytest.raises(ValueError, match="malformed address record"):
        Address.unpack(Address(name, 0, "h", 1, "", "").pack())
    assert Address.unpack(Address("w-1_a:b", 0, "h", 1, "", "").pack()).name == "w-1_a:b"
