"""Issue 11, findings 1 and 9, as an attacker would play them, in real processes.

* The store attack: the rendezvous store (torch's ``TCPStore``) has no
  credentials, so the test, as the attacker, rewrites worker1's address record
  (a record replayed from an earlier run, or one pointing at a relay the test
  runs): ``init_rpc`` fails with ``AuthenticationError`` on both workers and
  nothing reaches the relay.
* An on-path relay (worker0's route to worker1 diverted through the test, as
  a network attacker would) forwards the handshake untouched and then injects,
  alters, replays, reorders or drops frames: each is refused by the frame tags,
  the connection is dropped, no code runs, and both workers keep serving.
* Pre-auth bounds: idle and slowloris connections are closed at the
  ``handshake_timeout``, each costs a few KiB before it proves itself, and at
  most ``max_unauthenticated_connections`` are kept at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from torch.distributed import TCPStore  # type: ignore[attr-defined]

import aiorpc_autograd as rpc
from aiorpc_autograd import api, codec, wire
from aiorpc_autograd.rendezvous import Address
from tests.integration.common import await_outcome, call_outcome
from tests.integration.harness import (
    WorkerGroup,
    agent_tcp_port,
    barrier,
    free_port,
    post,
    receive,
)

TOKEN = "attack-test-token-0123456789"
NOTES: list[str] = []


def make_file(path: str) -> str:
    """The payload of an attack: proof that code ran on the worker."""
    Path(path).write_text("code ran here")
    return "ran"


@rpc.register(name="attacks.note")
def note(tag: str) -> str:
    NOTES.append(tag)
    return tag


class AuthLog(logging.Handler):
    """Connections the package dropped for an AuthenticationError."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.dropped: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(a, rpc.AuthenticationError) for a in args):
            self.dropped.append(record.getMessage())


async def init_outcome(rank: int, world_size: int, init_method: str) -> Any:
    """init_rpc expected to fail: its error (or None), with nothing left running."""
    options = rpc.RpcOptions(auth_token=TOKEN, rpc_timeout=20, rendezvous_timeout=30)
    error = await await_outcome(
        rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method, options=options)
    )
    if not isinstance(error, Exception):
        await rpc.shutdown(graceful=False)
        error = None
    await barrier()
    return {"error": error, "after": call_outcome(rpc.get_worker_info)}


# ------------------------------------------------------------------ the store attack


async def store_phases(
    rank: int, world_size: int, init_method: str, inits: dict[str, str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # An earlier run whose records the attacker keeps.
    options = rpc.RpcOptions(auth_token=TOKEN, rpc_timeout=20)
    await rpc.init_rpc(
        f"worker{rank}", rank, world_size, init_method=inits["earlier"], options=options
    )
    await barrier()
    if rank == 0:
        post("earlier run up")
    assert await receive(30) == "harvested"
    await rpc.shutdown(timeout=20)
    # Worker0 joins first; the attacker rewrites worker1's record before
    # worker1 joins (then worker1 writes its own, which worker0 never reads).
    for phase in ("replayed", "rewritten"):
        if rank == 0:
            post(f"joining {phase}")
        else:
            assert await receive(30) == f"go {phase}"
        out[phase] = await init_outcome(rank, world_size, inits[phase])
    return out


class Relay:
    """A TCP relay the test runs: forwards both ways, counting connections."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target: tuple[str, int] | None = None
        self.accepted = 0
        self.listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            client.close()  # nothing to relay to: init_rpc must have failed first

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


def wait_key(store: Any, key: str, timeout: float = 30.0) -> bytes:
    store.wait([key], timedelta(seconds=timeout))
    return bytes(store.get(key))


def store_client(init_method: str) -> Any:
    """The attacker's client of the group's store (it counts as a worker there,
    so worker0, the store's host, does not wait for worker1 to start)."""
    host, port = init_method.removeprefix("tcp://").split(":")
    return TCPStore(host, int(port), 2, False, timedelta(seconds=30))


@pytest.mark.timeout(120)
def test_rewritten_or_replayed_store_record_fails_init_rpc(tmp_path: Path) -> None:
    inits = {k: f"tcp://127.0.0.1:{free_port()}" for k in ("earlier", "replayed", "rewritten")}
    relay = Relay()
    try:
        with WorkerGroup(store_phases, 2, (inits,), mode="raw", timeout=100) as group:
            assert group.next_event(timeout=60, rank=0) == (0, "earlier run up")
            earlier = store_client(inits["earlier"])
            harvested = wait_key(earlier, "aiorpc/1/addr/1")
            del earlier
            for rank in (0, 1):
                group.send(rank, "harvested")
            old = Address.unpack(harvested)
            fakes = {
                # Byte-identical to a record worker1 published in an earlier run
                # of a group with the same token and the same key prefix.
                "replayed": harvested,
                # Pointing at the attacker's relay, the record's MAC kept.
                "rewritten": dataclasses.replace(
                    old, port=relay.port, unix_path="", host_id="attacker"
                ).pack(),
            }
            for phase, fake in fakes.items():
                # (next_event also runs the workers' barriers meanwhile.)
                assert group.next_event(timeout=60, rank=0) == (0, f"joining {phase}")
                store = store_client(inits[phase])
                wait_key(store, "aiorpc/1/addr/0")  # worker0 published and waits
                store.set("aiorpc/1/addr/1", fake)
                group.send(1, f"go {phase}")
                del store
            results = group.join()
    finally:
        relay.close()
    for rank, got in enumerate(results):
        for phase in ("replayed", "rewritten"):
            error = got[phase]["error"]
            assert isinstance(error, rpc.AuthenticationError), (rank, phase, error)
            assert "tampered" in str(error), (rank, phase, str(error))
            assert isinstance(got[phase]["after"], rpc.RpcError)  # nothing runs
    assert relay.accepted == 0  # no worker ever dialled the attacker


# ------------------------------------------------------------- the on-path relay

HANDSHAKE_C2S = 37 + 32  # steps 1 and 3
HANDSHAKE_S2C = 64  # step 2


def split_frames(data: bytearray) -> list[bytes]:
    """Take the complete tagged frames off the front of ``data``."""
    frames = []
    while len(data) >= wire.PREFIX_SIZE:
        _, _, _, _, header_len, nbuf, body_len = struct.unpack_from("<4sBBHIIQ", data)
        size = wire.PREFIX_SIZE + 8 * nbuf + header_len + wire.TAG_SIZE + body_len
        if len(data) < size:
            break
        frames.append(bytes(data[:size]))
        del data[:size]
    return frames


def flip_header_byte(frame: bytes) -> bytes:
    nbuf = struct.unpack_from("<I", frame, 12)[0]
    at = wire.PREFIX_SIZE + 8 * nbuf + 2  # inside the header (the request id, say)
    return frame[:at] + bytes([frame[at] ^ 0x01]) + frame[at + 1 :]


def forged_call(path: str) -> bytes:
    """A pickled call the attacker crafts, with a tag under a key it made up."""
    call = codec.PythonCall(None, codec.dump_payload((make_file, (path,), {})))
    header, buffers = codec.encode(call, 99)
    return b"".join(bytes(c) for c in wire.encode_frame(header, buffers, mac=wire.FrameMac(b"k")))


# mode -> (direction tampered, frames collected first, what to forward instead)
Tamper = Callable[[list[bytes]], list[bytes]]
MODES: dict[str, tuple[str, int, Tamper]] = {
    "clean": ("c2s", 0, lambda f: f),
    "inject": ("c2s", 1, lambda f: [f[0], forged_call(PATHS["inject"])]),
    "alter": ("c2s", 2, lambda f: [f[0], flip_header_byte(f[1])]),
    "replay": ("c2s", 2, lambda f: [f[0], f[1], f[1]]),
    "reorder": ("c2s", 3, lambda f: [f[0], f[2], f[1]]),
    "drop": ("c2s", 3, lambda f: [f[0], f[2]]),
    "alter_response": ("s2c", 2, lambda f: [f[0], flip_header_byte(f[1])]),
}
PATHS: dict[str, str] = {}


class TamperingRelay:
    """An on-path attacker without the token: relays worker0's connections to
    worker1 (the N-th connection in the N-th mode of ``modes``), handshake
    untouched, then tampers with the frames of one direction."""

    def __init__(self, modes: list[str]) -> None:
        self.modes = modes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = 0
        self.closed_by_worker: dict[str, bool] = {}
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for mode in self.modes:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += (client, server)
            direction, need, tamper = MODES[mode]
            for src, dst, name, skip in (
                (client, server, "c2s", HANDSHAKE_C2S),
                (server, client, "s2c", HANDSHAKE_S2C),
            ):
                pump = threading.Thread(
                    target=self._pump,
                    args=(mode, src, dst, skip, need if name == direction else 0, tamper, name),
                    daemon=True,
                )
                pump.start()
                self._threads.append(pump)

    def _pump(
        self,
        mode: str,
        src: socket.socket,
        dst: socket.socket,
        skip: int,
        need: int,
        tamper: Tamper,
        name: str,
    ) -> None:
        pending = bytearray()
        frames: list[bytes] = []
        done = need == 0
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                if done:
                    dst.sendall(chunk)
                    continue
                pending += chunk
                if skip:  # the handshake goes through untouched
                    n = min(skip, len(pending))
                    dst.sendall(bytes(pending[:n]))
                    del pending[:n]
                    skip -= n
                    if skip:
                        continue
                frames += split_frames(pending)
                if len(frames) >= need:
                    dst.sendall(b"".join(tamper(frames[:need]) + frames[need:]) + bytes(pending))
                    done = True
        except OSError:
            pass
        if name == "s2c":
            self.closed_by_worker[mode] = True
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for thread in self._threads:
            thread.join(5)
        for sock in self._sockets:
            sock.close()


def outcome_of(value: Any) -> Any:
    return (type(value).__name__, str(value)) if isinstance(value, BaseException) else value


async def relay_phases(
    rank: int, world_size: int, init_method: str, relay_port: int, modes: list[str]
) -> dict[str, Any]:
    log = AuthLog()
    logging.getLogger("aiorpc_autograd").addHandler(log)
    options = rpc.RpcOptions(auth_token=TOKEN, rpc_timeout=20, use_unix_sockets=False)
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method, options=options)
    await barrier()
    out: dict[str, Any] = {"calls": {}}
    agent = api.current_agent()
    if rank == 1:
        post(agent_tcp_port())
    else:
        assert await receive(30) == "relay ready"
        # The network attacker's position: worker0's route to worker1 goes
        # through the relay (the record in the store is the genuine one).
        real = agent._peers[1].address
        agent._peers[1].address = dataclasses.replace(real, port=relay_port)
        for mode in modes:
            calls = [
                rpc.rpc_async("worker1", "attacks.note", args=(f"{mode}{i}",))
                for i in range(2 if mode in ("reorder", "drop") else 1)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            out["calls"][mode] = [outcome_of(r) for r in results]
            conn = agent._peers[1].conn
            if conn is not None:  # each mode on a connection of its own
                conn.close()
                while agent._peers[1].conn is not None:
                    await asyncio.sleep(0.01)
            conn = agent._peers[1].conn
            if conn is not None:  # each mode on a connection of its own
                conn.close()
                while agent._peers[1].conn is not None:
                    await asyncio.sleep(0.01)
        agent._peers[1].address = real
        if agent._peers[1].conn is not None:
            agent._peers[1].conn.close()
        await asyncio.sleep(0.1)
        out["direct"] = await rpc.rpc_async("worker1", "attacks.note", args=("direct",))
    await barrier()
    # Both keep serving each other.
    out["after"] = await rpc.rpc_async(f"worker{1 - rank}", torch.add, args=(torch.ones(2), rank))
    await barrier()
    out["notes"] = list(NOTES)
    out["dropped"] = log.dropped
    out["pending"] = rpc.get_debug_info()["num_pending_requests"]
    await rpc.shutdown(timeout=20)
    return out


@pytest.mark.timeout(120)
def test_relayed_connection_refuses_injected_altered_replayed_reordered_frames(
    tmp_path: Path,
) -> None:
    PATHS["inject"] = str(tmp_path / "injected.txt")
    modes = list(MODES)
    relay = TamperingRelay(modes)
    try:
        with WorkerGroup(relay_phases, 2, (relay.port, modes), mode="raw", timeout=100) as group:
            _, relay.target = group.next_event(timeout=60, rank=1)
            group.send(0, "relay ready")
            w0, w1 = group.join()
    finally:
        relay.close()
    calls = w0["calls"]
    assert calls["clean"] == ["clean0"]  # the relay itself is transparent
    lost = "ConnectionLostError"
    for mode in ("inject", "alter", "reorder", "drop", "alter_response"):
        assert all(c[0] == lost for c in calls[mode]), (mode, calls[mode])
    assert calls["replay"] == ["replay0"] or calls["replay"][0][0] == lost, calls["replay"]
    # What ran on worker1: genuine calls only, each at most once (a genuine
    # frame read together with a bad one is dropped with it: the replayed call
    # may not run at all).
    notes = [n for n in w1["notes"] if n != "replay0"]
    assert notes == ["clean0", "alter_response0", "direct"], w1["notes"]
    assert w1["notes"].count("replay0") <= 1
    assert not Path(PATHS["inject"]).exists()
    # worker1 dropped the tampered requests, worker0 the tampered response,
    # each for an AuthenticationError (a bad frame tag).
    assert len(w1["dropped"]) == 5 and all("failed authentication" in m for m in w1["dropped"])
    assert len(w0["dropped"]) == 1 and "failed authentication" in w0["dropped"][0]
    assert w0["direct"] == "direct"
    for rank, got in enumerate((w0, w1)):
        assert got["after"].tolist() == [1.0 + rank] * 2
        assert got["pending"] == 0


# ------------------------------------------------------------------ pre-auth bounds

DEADLINE = 1.0
PREAUTH_PHASES: dict[str, dict[str, Any]] = {
    "token": {"auth_token": TOKEN, "max_unauthenticated_connections": 1000},
    "plain": {"auth_token": None, "max_unauthenticated_connections": 16},
}
# Idle connections first, then a slowloris, then connections over the cap.
FLOOD = {"token": (200, 0), "plain": (15, 24)}


async def preauth_phases(
    rank: int, world_size: int, init_method: str, inits: dict[str, str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase, extra in PREAUTH_PHASES.items():
        options = rpc.RpcOptions(rpc_timeout=20, handshake_timeout=DEADLINE, **extra)
        await rpc.init_rpc(
            f"worker{rank}", rank, world_size, init_method=inits[phase], options=options
        )
        await barrier()
        if rank == 0:
            post((agent_tcp_port(), os.getpid()))
            # Serving (and closing connections) until the test has seen them all go.
            assert await receive(60) == "phase done"
        else:
            # A call before the flood: this connection is established already.
            out[f"{phase}_before"] = await rpc.rpc_async("worker0", torch.add, args=(1, 1))
            post("connected")
            assert await receive(30) == "call now"
            started = time.monotonic()
            out[f"{phase}_during"] = await rpc.rpc_async("worker0", torch.add, args=(2, 2))
            post(time.monotonic() - started)
        await barrier()
        if rank == 0:
            gate = api.current_agent()._gate
            out[f"{phase}_gate"] = (len(gate.pending), gate.refused, gate.expired)
        await rpc.shutdown(timeout=20)
    return out


def open_connections(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def close_times(socks: list[socket.socket], since: float, timeout: float) -> list[float | None]:
    """When (seconds after ``since``) the worker closed each socket; None: still open."""
    closed: list[float | None] = [None] * len(socks)
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, i)
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(max(deadline - time.monotonic(), 0)):
            i = key.data
            try:
                data = socks[i].recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # EOF or reset: closed by the worker
                closed[i] = time.monotonic() - since
                sel.unregister(socks[i])
    sel.close()
    return closed


class Slowloris(threading.Thread):
    """Sends ``data`` one byte every ``interval`` seconds; records when the
    worker closed the connection (seconds after it opened)."""

    def __init__(self, port: int, data: bytes, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.opened = time.monotonic()
        self.data = data
        self.interval = interval
        self.sent = 0
        self.closed_after: float | None = None
        self.start()

    def run(self) -> None:
        try:
            for byte in self.data:
                self.sock.sendall(bytes([byte]))
                self.sent += 1
                time.sleep(self.interval)
        except OSError:
            self.closed_after = time.monotonic() - self.opened
        finally:
            self.sock.close()


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


@pytest.mark.timeout(120)
def test_unauthenticated_connections_are_bounded() -> None:
    inits = {k: f"tcp://127.0.0.1:{free_port()}" for k in PREAUTH_PHASES}
    seen: dict[str, Any] = {}
    with WorkerGroup(preauth_phases, 2, (inits,), mode="raw", timeout=110) as group:
        for phase in PREAUTH_PHASES:
            _, (port, pid) = group.next_event(timeout=60, rank=0)
            assert group.next_event(timeout=30, rank=1) == (1, "connected")
            n, over = FLOOD[phase]
            before = rss(pid)
            opened = time.monotonic()
            socks = open_connections(port, n)
            # A slowloris: a valid start (the handshake's, or a frame prefix), 4 bytes/s.
            start = b"ARPA\x02" + bytes(32) if phase == "token" else wire.encode_frame(b"x")[0]
            slow = Slowloris(port, bytes(start))
            time.sleep(0.3)  # every connection accepted
            grown = rss(pid) - before
            extra_opened = time.monotonic()
            extra = open_connections(port, over)
            extra_closed = close_times(extra, extra_opened, 5)
            group.send(1, "call now")
            _, call_took = group.next_event(timeout=30, rank=1)
            closed = close_times(socks, opened, DEADLINE + 6)
            slow.join(DEADLINE + 6)
            group.send(0, "phase done")
            for sock in socks + extra:
                sock.close()
            seen[phase] = {"n": n, "grown": grown, "closed": closed, "slow": slow.closed_after}
            seen[phase].update(call_took=call_took, extra_closed=extra_closed)
        w0, w1 = group.join()
    for phase, got in seen.items():
        closed = got["closed"]
        n, over = FLOOD[phase]
        # Every pre-auth connection and the slowloris (however it trickles) are
        # closed at the deadline, not before.
        assert all(t is not None and DEADLINE - 0.2 < t < DEADLINE + 4 for t in closed), (
            phase,
            sorted(t or -1 for t in closed),
        )
        slow = got["slow"]
        assert slow is not None and DEADLINE - 0.2 < slow < DEADLINE + 4, (phase, slow)
        # Over the cap: closed at once.
        assert all(t is not None and t < 1.0 for t in got["extra_closed"]), got["extra_closed"]
        pending, refused, expired = w0[f"{phase}_gate"]
        assert (pending, refused, expired) == (0, over, n + 1), (phase, w0[f"{phase}_gate"])
        # The worker kept serving its group meanwhile, on a connection it had.
        assert got["call_took"] < 5, (phase, got["call_took"])
        assert w1[f"{phase}_during"] == 4
        # A few KiB each before the handshake/Hello, not a 256 KiB buffer.
        # (The old reader's buffers alone: 260 KiB each, 4 MiB for 16.)
        assert got["grown"] < max((n + 1) * 16 * 1024, 1 << 20), (phase, got["grown"] / (n + 1))
