"""Security in real processes: the shared-secret handshake, TLS, safe mode
(``allow_pickle=False``) and bounded input.

Each test runs one group of worker processes through several phases; a phase
is a fresh ``init_rpc`` on its own ``tcp://`` rendezvous (so one process can
fail ``init_rpc`` and then join the next group), which keeps the number of
process spawns, the expensive part on this machine, low.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import api, codec, handshake, wire
from tests.integration.common import attempt, await_outcome, call_outcome, echo
from tests.integration.harness import (
    WorkerGroup,
    agent_tcp_port,
    barrier,
    free_port,
    post,
    receive,
    run_processes,
)

pytestmark = pytest.mark.timeout(120)

TOKEN = "right-token-0123456789"
ENV_TOKEN = "token-from-the-environment"


# ----------------------------------------------------------------- remote helpers


def make_file(path: str) -> str:
    """The 'payload' of an attack: proof that code ran on the worker."""
    Path(path).write_text("code ran here")
    return "ran"


class Booby:
    """Unpickling an instance runs ``make_file(path)`` on the receiver."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return make_file, (self.path,)


@rpc.register(name="security.scale")
def scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    return t * factor


@rpc.register(name="security.describe")
async def describe(value: Any, **kwargs: Any) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"value": value, "kwargs": kwargs, "type": type(value).__name__}


@rpc.register(name="security.booby")
def booby(path: str) -> Booby:
    return Booby(path)


NOTES: list[str] = []


@rpc.register(name="security.note")
def note(tag: str, value: Any = None) -> str:
    NOTES.append(tag)
    return tag


class LogCapture(logging.Handler):
    """Warnings of the package: (message, whether it carries a ProtocolError)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        has_protocol_error = any(isinstance(a, rpc.ProtocolError) for a in args)
        self.records.append((record.getMessage(), has_protocol_error))


def capture_logs() -> LogCapture:
    handler = LogCapture()
    logging.getLogger("aiorpc_autograd").addHandler(handler)
    return handler


def typed(value: Any) -> Any:
    """An outcome made comparable in the test process: exceptions as (type, message)."""
    if isinstance(value, BaseException):
        return type(value), str(value)
    return value


async def init_outcome(
    rank: int, world_size: int, init_method: str, options: rpc.RpcOptions | None
) -> dict[str, Any]:
    """init_rpc that is expected to fail: its error, its duration, what is left."""
    started = time.monotonic()
    error = await await_outcome(
        rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method, options=options)
    )
    elapsed = time.monotonic() - started
    if not isinstance(error, Exception):
        await rpc.shutdown(graceful=False)
    await barrier()  # rank 0 keeps the store up until both have read it
    return {"error": error, "elapsed": elapsed, "after": call_outcome(rpc.get_worker_info)}


# ------------------------------------------------------------------ authentication


class DecodeSpy:
    """Counts the frames the agent decodes (wraps ``codec.decode`` in a worker)."""

    def __init__(self) -> None:
        self.decoded: list[str] = []
        self._decode = codec.decode

        def spy(*args: Any, **kwargs: Any) -> Any:
            rid, message = self._decode(*args, **kwargs)
            self.decoded.append(type(message).__name__)
            return rid, message

        codec.decode = spy  # type: ignore[assignment]

    def take(self) -> list[str]:
        out, self.decoded = self.decoded, []
        return out


async def auth_phases(
    rank: int, world_size: int, init_method: str, inits: dict[str, str]
) -> dict[str, Any]:
    peer = f"worker{1 - rank}"
    out: dict[str, Any] = {}

    # The same explicit token on both sides: calls work both ways.
    options = rpc.RpcOptions(auth_token=TOKEN, rpc_timeout=30)
    await rpc.init_rpc(
        f"worker{rank}", rank, world_size, init_method=inits["right"], options=options
    )
    await barrier()
    out["right"] = await rpc.rpc_async(peer, torch.add, args=(torch.ones(2), rank))
    await rpc.shutdown(timeout=30)

    # Different tokens: both sides fail in init_rpc.
    token = TOKEN if rank == 0 else "a-wrong-token"
    out["wrong"] = await init_outcome(
        rank, world_size, inits["wrong"], rpc.RpcOptions(auth_token=token)
    )

    # A token on one side only (None overrides the environment's token).
    token = TOKEN if rank == 0 else None
    out["missing"] = await init_outcome(
        rank, world_size, inits["missing"], rpc.RpcOptions(auth_token=token)
    )

    # No options at all: the token comes from AIORPC_AUTH_TOKEN.
    out["env_default"] = rpc.RpcOptions().auth_token
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=inits["env"])
    await barrier()
    out["env_call"] = await rpc.rpc_async(peer, torch.mul, args=(torch.ones(2), rank + 2))
    # Both calls done (the peer's may still be arriving here): only then spy.
    await barrier()
    spy = DecodeSpy()
    if rank == 0:
        agent = api.current_agent()
        post((agent_tcp_port(), agent._group, agent._run_key))
    # The test attacks worker0's TCP port now; both workers stay idle meanwhile
    # (no call in flight, so no heartbeats either).
    assert await receive(60) == "attacks sent"
    out["decoded_during_attacks"] = spy.take()
    if rank == 0:
        post("attacks counted")  # the test sends the control call now
    assert await receive(60) == "control sent"
    out["decoded_during_control"] = spy.take()
    await barrier()
    # The worker keeps serving its group.
    out["after_attacks"] = [
        await rpc.rpc_async(peer, torch.add, args=(torch.tensor([i]), rank)) for i in range(3)
    ]
    await rpc.shutdown(timeout=30)
    return out


def attack_frames(group: str, path: Path, mac: wire.FrameMac | None = None) -> bytes:
    """A Hello that names worker1 of the group, then a pickled call that creates
    ``path`` (tagged with ``mac``: the frames of an authenticated session)."""
    chunks: list[bytes] = []
    hello = codec.Hello("worker1", 1, group)
    call = codec.PythonCall(None, codec.dump_payload((make_file, (str(path),), {})))
    for rid, message in ((0, hello), (7, call)):
        header, buffers = codec.encode(message, rid)
        chunks += (bytes(c) for c in wire.encode_frame(header, buffers, mac=mac))
    return b"".join(chunks)


def drain_until_closed(sock: socket.socket) -> tuple[str, bytes]:
    """Read until the worker closes the connection: (how, what it sent first)."""
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return "eof", got
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return "reset", got
    except TimeoutError:
        return "still open after 10s", got


def attack(port: int, first: bytes) -> tuple[str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(first)
        except (ConnectionResetError, BrokenPipeError):
            return "reset", b""
        return drain_until_closed(sock)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def forged_handshake(port: int, frames: bytes) -> tuple[str, bytes, bool]:
    """Speak the handshake with a wrong key: (how it ended, what came back,
    whether the server's proof verified under the wrong key)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        cn = secrets.token_bytes(32)
        sock.sendall(handshake.AUTH_MAGIC + bytes([handshake.VERSION]) + cn)
        reply = recv_exact(sock, 64)
        sn, server_mac = reply[:32], reply[32:]
        wrong = b"a-wrong-token"
        verified = hmac.compare_digest(
            server_mac, hmac.new(wrong, b"S" + cn + sn + b"0", hashlib.sha256).digest()
        )
        proof = hmac.new(wrong, b"C" + sn + cn + b"0", hashlib.sha256).digest()
        try:
            sock.sendall(proof + frames)
        except (ConnectionResetError, BrokenPipeError):
            return "reset", b"", verified
        how, got = drain_until_closed(sock)
        return how, got, verified


def authenticated_call(port: int, group: str, key: bytes, path: Path) -> list[codec.Message]:
    """The control: the same frames after a handshake with the right run key
    (and tagged with the session key); the worker answers with its Hello and
    the call's result."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        client = handshake.ClientHandshake(key, b"0")
        sock.sendall(bytes(client.outgoing))
        client.outgoing.clear()
        rest = client.feed(recv_exact(sock, 64))  # verifies the server's proof
        assert client.done and not rest and client.session_keys is not None
        send_key, receive_key = client.session_keys
        frames = attack_frames(group, path, wire.FrameMac(send_key))
        sock.sendall(bytes(client.outgoing) + frames)
        reader = wire.FrameReader(mac=wire.FrameMac(receive_key))
        messages: list[codec.Message] = []
        while len(messages) < 2:
            chunk = sock.recv(65536)
            assert chunk, "the worker closed the authenticated connection"
            messages += [codec.decode(f)[1] for f in reader.feed(chunk)]
        return messages


def test_authentication(tmp_path: Path) -> None:
    inits = {k: f"tcp://127.0.0.1:{free_port()}" for k in ("right", "wrong", "missing", "env")}
    env = {"AIORPC_AUTH_TOKEN": ENV_TOKEN}
    paths = {k: tmp_path / f"{k}.txt" for k in ("plain", "forged", "control")}
    with WorkerGroup(auth_phases, 2, (inits,), mode="raw", env=env, timeout=90) as group:
        _, (port, group_id, run_key) = group.next_event(timeout=60, rank=0)
        garbage = attack(port, bytes((i * 131 + 7) % 256 for i in range(4096)))
        # A well-formed Hello + pickled call, as a no-token peer would send it.
        plain = attack(port, attack_frames(group_id, paths["plain"]))
        forged = forged_handshake(port, attack_frames(group_id, paths["forged"]))
        time.sleep(0.3)  # anything the worker would run has run by now
        for rank in (0, 1):
            group.send(rank, "attacks sent")
        assert group.next_event(timeout=30, rank=0) == (0, "attacks counted")
        control = authenticated_call(port, group_id, run_key, paths["control"])
        for rank in (0, 1):
            group.send(rank, "control sent")
        results = group.join()

    for rank, got in enumerate(results):
        assert got["right"].tolist() == [1.0 + rank] * 2
        for phase in ("wrong", "missing"):
            outcome = got[phase]
            assert isinstance(outcome["error"], rpc.AuthenticationError), (rank, phase, outcome)
            assert isinstance(outcome["error"], rpc.RpcError)
            assert "auth_token" in str(outcome["error"]), str(outcome["error"])
            assert outcome["elapsed"] < 30, (rank, phase, outcome["elapsed"])
            assert isinstance(outcome["after"], rpc.RpcError), outcome["after"]  # nothing runs
        assert got["env_default"] == ENV_TOKEN
        assert got["env_call"].tolist() == [float(rank + 2)] * 2
        assert [t.tolist() for t in got["after_attacks"]] == [[i + rank] for i in range(3)]
    # Unauthenticated bytes: dropped before the frame reader, nothing decoded.
    assert garbage[0] in ("eof", "reset"), garbage
    assert plain[0] in ("eof", "reset") and plain[1] == b"", plain
    how, sent_back, verified = forged
    assert how in ("eof", "reset"), forged
    assert len(sent_back) == 0 and not verified  # only the nonce + proof came before
    assert not paths["plain"].exists() and not paths["forged"].exists()
    assert results[0]["decoded_during_attacks"] == []
    # The control proves the frames were valid: authenticated, the call ran.
    assert isinstance(control[0], codec.Hello) and isinstance(control[1], codec.PythonRet)
    assert codec.load_payload(control[1].value) == "ran"
    assert paths["control"].read_text() == "code ran here"
    assert results[0]["decoded_during_control"] == ["Hello", "PythonCall"]


# ------------------------------------------------------------------------------ TLS


def make_certificate(directory: Path, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (IP SAN); returns (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def tls_options(cert: str, key: str, trusted: str, **kwargs: Any) -> rpc.RpcOptions:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=trusted)
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    return rpc.RpcOptions(ssl=server, ssl_client=client, **kwargs)


def tls_links() -> list[dict[str, Any]]:
    """How this worker's outgoing connections are carried."""
    agent = api.current_agent()
    links = []
    for peer in agent._peers.values():
        if peer.conn is None:
            continue
        transport = peer.conn._transport
        assert transport is not None
        ssl_object = transport.get_extra_info("ssl_object")
        links.append(
            {
                "peer": peer.info.name,
                "tls": ssl_object.version() if ssl_object is not None else None,
                "peername": transport.get_extra_info("peername"),
            }
        )
    return links


async def tls_phases(
    rank: int,
    world_size: int,
    init_method: str,
    inits: dict[str, str],
    cert: tuple[str, str],
    wrong_ca: str,
) -> dict[str, Any]:
    peer = f"worker{1 - rank}"
    out: dict[str, Any] = {}

    options = tls_options(*cert, trusted=cert[0], auth_token=TOKEN, rpc_timeout=30)
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=inits["ok"], options=options)
    await barrier()
    big = torch.arange(300_000, dtype=torch.float64)
    out["calls"] = [await rpc.rpc_async(peer, torch.add, args=(big, i)) for i in range(3)]
    out["links"] = tls_links()
    out["listeners"] = len(api.current_agent()._servers)
    await barrier()
    await rpc.shutdown(timeout=30)

    # The client side trusts another CA: the server's certificate does not verify.
    options = tls_options(*cert, trusted=wrong_ca, rpc_timeout=20)
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=inits["bad"], options=options)
    await barrier()
    started = time.monotonic()
    out["bad_call"] = await attempt(peer, torch.add, (torch.ones(1), 1))
    out["bad_elapsed"] = time.monotonic() - started
    out["bad_pending"] = rpc.get_debug_info()["num_pending_requests"]
    await barrier()
    await rpc.shutdown(timeout=30)
    return out


def test_tls(tmp_path: Path) -> None:
    cert = make_certificate(tmp_path, "worker")
    wrong_ca, _ = make_certificate(tmp_path, "another-ca")
    inits = {k: f"tcp://127.0.0.1:{free_port()}" for k in ("ok", "bad")}
    results = run_processes(tls_phases, 2, inits, cert, wrong_ca, timeout=90)
    for rank, got in enumerate(results):
        big = torch.arange(300_000, dtype=torch.float64)
        assert all(torch.equal(t, big + i) for i, t in enumerate(got["calls"]))
        # TLS over TCP on one host (no Unix socket listener, no Unix links).
        assert got["listeners"] == 1
        assert got["links"], got
        for link in got["links"]:
            assert link["tls"] in ("TLSv1.2", "TLSv1.3"), link
            assert link["peername"][0] == "127.0.0.1", link
        error = got["bad_call"]
        assert isinstance(error, rpc.ConnectionLostError), (rank, typed(error))
        assert f"worker{1 - rank}" in str(error)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error) or "certificate" in str(error).lower()
        assert got["bad_elapsed"] < 10, got["bad_elapsed"]
        assert got["bad_pending"] == 0


# ------------------------------------------------------------------------ safe mode


async def safe_phases(
    rank: int, world_size: int, init_method: str, inits: dict[str, str], paths: dict[str, str]
) -> dict[str, Any]:
    peer = f"worker{1 - rank}"
    out: dict[str, Any] = {}

    # Both workers in safe mode.
    options = rpc.RpcOptions(allow_pickle=False, rpc_timeout=30)
    await rpc.init_rpc(
        f"worker{rank}", rank, world_size, init_method=inits["safe"], options=options
    )
    await barrier()
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out["scale"] = await rpc.rpc_async(peer, "security.scale", args=(t, 2.5))
    value = {"ints": [1, -2, 2**40], "nested": {"t": t, "b": b"\x00\xff"}, "none": None}
    out["describe"] = await rpc.rpc_async(
        peer, "security.describe", args=(value,), kwargs={"flag": True, "pair": (1, 2.5)}
    )
    out["callable"] = call_outcome(rpc.rpc_async, peer, scale, args=(t, 2))
    out["callable_builtin"] = call_outcome(rpc.rpc_async, peer, torch.add, args=(t, 2))
    out["remote_callable"] = call_outcome(rpc.remote, peer, scale, args=(t, 2))
    out["object_arg"] = call_outcome(rpc.rpc_async, peer, "security.note", args=("x", Booby("x")))
    out["set_arg"] = call_outcome(rpc.rpc_async, peer, "security.note", args=("x", {1, 2}))
    out["unknown_name"] = await attempt(peer, "security.no_such_function", (1,))
    # A registered function whose result cannot travel without pickle.
    out["unpicklable_result"] = await attempt(peer, "security.booby", (paths["unused"],))
    await barrier()
    await rpc.shutdown(timeout=30)

    # Mixed: worker0 allows pickle (a careless or hostile peer), worker1 is safe.
    options = rpc.RpcOptions(allow_pickle=(rank == 0), rpc_timeout=30)
    await rpc.init_rpc(
        f"worker{rank}", rank, world_size, init_method=inits["mixed"], options=options
    )
    await barrier()
    if rank == 0:
        out["pickled_call"] = await attempt("worker1", make_file, (paths["pickled_call"],))
        # By name, but from a pickle-enabled worker the arguments travel pickled.
        out["pickled_args"] = await attempt("worker1", "security.scale", (torch.ones(2), 2))
        out["self_call"] = await rpc.rpc_async("worker0", make_file, args=(paths["self"],))
    else:
        # worker0 answers with a pickle that would run make_file when loaded.
        out["pickled_result"] = await attempt("worker0", "security.booby", (paths["result"],))
        out["safe_self_call"] = await rpc.rpc_async(
            "worker1", "security.scale", args=(torch.ones(2), 3)
        )
    await barrier()
    out["pending"] = rpc.get_debug_info()["num_pending_requests"]
    await rpc.shutdown(timeout=30)
    return out


def test_safe_mode(tmp_path: Path) -> None:
    inits = {k: f"tcp://127.0.0.1:{free_port()}" for k in ("safe", "mixed")}
    names = ("unused", "pickled_call", "self", "result")
    paths = {k: str(tmp_path / f"{k}.txt") for k in names}
    results = run_processes(safe_phases, 2, inits, paths, timeout=90)
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    for rank, got in enumerate(results):
        assert torch.equal(got["scale"], t * 2.5)
        described = got["describe"]
        assert described["type"] == "dict"
        assert described["kwargs"] == {"flag": True, "pair": [1, 2.5]}  # msgpack: lists
        assert described["value"]["ints"] == [1, -2, 2**40]
        assert described["value"]["none"] is None
        assert described["value"]["nested"]["b"] == b"\x00\xff"
        assert torch.equal(described["value"]["nested"]["t"], t)
        for key in ("callable", "callable_builtin", "remote_callable", "object_arg", "set_arg"):
            assert isinstance(got[key], TypeError), (rank, key, typed(got[key]))
        assert "safe mode" in str(got["callable"])
        assert isinstance(got["unknown_name"], rpc.RemoteError), typed(got["unknown_name"])
        assert isinstance(got["unknown_name"], LookupError)
        assert isinstance(got["unpicklable_result"], rpc.RemoteError)
        assert isinstance(got["unpicklable_result"], TypeError)
        assert got["pending"] == 0
    w0, w1 = results
    # A pickled call reaches the safe worker: refused before anything is loaded.
    for key in ("pickled_call", "pickled_args"):
        error = w0[key]
        assert isinstance(error, rpc.RemoteError), (key, typed(error))
        assert error.worker == "worker1" and "ProtocolError" in error.type_name, error
        assert "safe mode" in error.remote_message, error.remote_message
    assert not Path(paths["pickled_call"]).exists()
    assert w0["self_call"] == "ran"  # the same call runs where pickle is allowed
    # A pickled result reaches the safe worker: refused, not loaded.
    assert isinstance(w1["pickled_result"], rpc.RpcError), typed(w1["pickled_result"])
    assert "safe mode" in str(w1["pickled_result"]), str(w1["pickled_result"])
    assert not Path(paths["result"]).exists()
    assert torch.equal(w1["safe_self_call"], torch.full((2,), 3.0))


# ---------------------------------------------------------------------- bounded input

LIMITS = {"max_message_size": 1 << 20, "max_header_size": 16 << 10, "max_tensors": 8}


async def bounded_input(rank: int, world_size: int, init_method: str) -> dict[str, Any]:
    options = rpc.RpcOptions(rpc_timeout=30, **(LIMITS if rank == 0 else {}))
    logs = capture_logs()
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method, options=options)
    await barrier()
    out: dict[str, Any] = {}
    if rank == 1:  # worker0 has the small limits; worker1 sends it too much
        cases = {
            "oversized": ("big", torch.zeros(1 << 19)),  # 2 MiB of tensor data
            "too_many_tensors": ("many", [torch.zeros(1) for _ in range(20)]),
            "oversized_header": ("header", "x" * (100 << 10)),
        }
        for case, (tag, value) in cases.items():
            out[case] = await attempt("worker0", "security.note", (tag, value))
            out[f"{case}_then"] = await rpc.rpc_async(
                "worker0", "security.note", args=(f"ok after {case}", torch.ones(2))
            )
    else:
        # A reply over worker0's own limit: worker0 drops the connection it came on.
        out["oversized_reply"] = await attempt("worker1", echo, (torch.zeros(1 << 19),))
        out["reply_then"] = await rpc.rpc_async("worker1", echo, args=(torch.ones(3),))
    await barrier()
    out["notes"] = list(NOTES)
    out["logs"] = logs.records
    out["pending"] = rpc.get_debug_info()["num_pending_requests"]
    await rpc.shutdown(timeout=30)
    return out


def test_bounded_input_drops_only_that_connection() -> None:
    w0, w1 = run_processes(bounded_input, 2, timeout=90)
    for case in ("oversized", "too_many_tensors", "oversized_header"):
        error = w1[case]
        assert isinstance(error, rpc.ConnectionLostError), (case, typed(error))
        assert w1[f"{case}_then"] == f"ok after {case}"
    assert isinstance(w0["oversized_reply"], rpc.ConnectionLostError), typed(w0["oversized_reply"])
    assert torch.equal(w0["reply_then"], torch.ones(3))
    # Nothing over the limits was decoded, let alone run.
    assert w0["notes"] == [
        "ok after oversized",
        "ok after too_many_tensors",
        "ok after oversized_header",
    ]
    dropped = [msg for msg, is_protocol_error in w0["logs"] if is_protocol_error]
    assert len(dropped) == 4, w0["logs"]
    assert all("dropping connection" in msg for msg in dropped), dropped
    assert w0["pending"] == w1["pending"] == 0
