"""Faults in real processes: a worker that dies mid-call, a remote function
whose exception cannot be carried, and bytes that are not the protocol arriving
on a worker's listening port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import codec, wire
from tests.integration.common import async_sleep, attempt, await_outcome, blocking_sleep, echo
from tests.integration.harness import (
    Died,
    WorkerGroup,
    agent_tcp_port,
    barrier,
    post,
    receive,
    run_processes,
    run_workers,
    spawn_workers,
)

pytestmark = pytest.mark.timeout(90)

# ------------------------------------------------------------------ dying mid-call


async def exit_in_call(code: int) -> None:
    await asyncio.sleep(0.3)  # the caller's other calls are in flight here by now
    os._exit(code)


async def report_then_block() -> None:
    post("in call")  # the test SIGKILLs this worker now
    await asyncio.sleep(3600)


async def call_dying_workers(rank: int, world_size: int, init_method: str) -> dict[str, Any]:
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method)
    await barrier()
    if rank != 0:
        await asyncio.sleep(3600)  # serve until this process exits or is killed
    out: dict[str, Any] = {}
    # worker1 calls os._exit while serving one call, with more in flight to it;
    # timeout=0, so only the lost connection can end them.
    started = time.monotonic()
    to_1 = [rpc.rpc_async("worker1", async_sleep, args=(60, i), timeout=0) for i in range(3)]
    to_1.append(rpc.rpc_async("worker1", blocking_sleep, args=(60,), timeout=0))
    to_1.append(rpc.rpc_async("worker1", exit_in_call, args=(17,), timeout=0))
    out["exit_errors"] = [await await_outcome(f) for f in to_1]
    out["exit_elapsed"] = time.monotonic() - started
    # worker2 is SIGKILLed by the test while it serves a call.
    started = time.monotonic()
    to_2 = [rpc.rpc_async("worker2", async_sleep, args=(60, i), timeout=0) for i in range(2)]
    to_2.append(rpc.rpc_async("worker2", report_then_block, timeout=0))
    out["kill_errors"] = [await await_outcome(f) for f in to_2]
    out["kill_elapsed"] = time.monotonic() - started
    # New calls to the dead workers fail at once too.
    out["new_call_errors"] = [
        await attempt(to, async_sleep, (0,), timeout=0) for to in ("worker1", "worker2")
    ]
    out["self_still_works"] = await rpc.rpc_async("worker0", torch.add, args=(1, 2))
    out["pending_after"] = rpc.get_debug_info()["num_pending_requests"]
    # The dead never reach the shutdown vote: those declared gone before it are
    # counted out (the shutdown succeeds); one found gone during the wait ends
    # it (API.md: ConnectionLostError) -- in time either way.
    started = time.monotonic()
    out["shutdown_error"] = await await_outcome(rpc.shutdown(timeout=1.0))
    out["shutdown_elapsed"] = time.monotonic() - started
    return out


def test_worker_dying_mid_call_fails_pending_futures() -> None:
    with WorkerGroup(call_dying_workers, 3, mode="raw", timeout=60) as group:
        rank, event = group.next_event(timeout=45)
        assert (rank, event) == (2, "in call")
        group.kill(2, signal.SIGKILL)
        w0, w1, w2 = group.join(allow_dead={1, 2})
    assert w1 == Died(17) and w2 == Died(-signal.SIGKILL)
    for key, worker in (("exit_errors", "worker1"), ("kill_errors", "worker2")):
        for error in w0[key]:
            assert isinstance(error, rpc.ConnectionLostError), (key, error)
            assert isinstance(error, ConnectionError) and isinstance(error, rpc.RpcError)
            assert worker in str(error), (key, str(error))
    assert w0["exit_elapsed"] < 10 and w0["kill_elapsed"] < 10
    for error in w0["new_call_errors"]:
        assert isinstance(error, rpc.ConnectionLostError), error
    assert w0["self_still_works"] == 3
    assert w0["pending_after"] == 0
    error = w0["shutdown_error"]
    assert error is None or isinstance(error, rpc.ConnectionLostError), error
    if isinstance(error, rpc.ConnectionLostError):
        assert "worker1" in str(error) or "worker2" in str(error), error
    assert w0["shutdown_elapsed"] < 3.0


# ------------------------------------------------------------ StopIteration


def raise_stop_iteration() -> None:
    next(iter([]))  # StopIteration, from a plain function in the thread pool


async def call_stop_iteration(rank: int, world_size: int, init_method: str) -> dict[str, Any]:
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method)
    await barrier()
    out: dict[str, Any] = {}
    if rank == 0:
        started = time.monotonic()
        out["error"] = await attempt("worker1", raise_stop_iteration, timeout=3)
        out["elapsed"] = time.monotonic() - started
    out["shutdown"] = await await_outcome(rpc.shutdown(timeout=3))
    return out


def test_plain_function_raising_stop_iteration() -> None:
    w0, w1 = run_processes(call_stop_iteration, 2, timeout=60)
    err = w0["error"]
    # Not an instance of StopIteration: asyncio refuses those in futures.
    assert isinstance(err, rpc.RemoteError), err
    assert err.type_name == "StopIteration" and err.worker == "worker1"
    assert w0["elapsed"] < 2.0
    assert w0["shutdown"] is None and w1["shutdown"] is None, (w0["shutdown"], w1["shutdown"])


# ---------------------------------------------------------------- garbage on the wire

MAX_MESSAGE_SIZE = 64 << 20  # the workers' max_message_size in this test
_PREFIX = struct.Struct("<4sBBHIIQ")  # magic, version, flags, reserved, header, buffers, body


def prefix(header_len: int = 0, n_buffers: int = 0, body_len: int = 0) -> bytes:
    data = _PREFIX.pack(wire.MAGIC, wire.VERSION, 0, 0, header_len, n_buffers, body_len)
    assert len(data) == wire.PREFIX_SIZE
    return data


def frame(message: codec.Message) -> bytes:
    header, buffers = codec.encode(message, 1)
    return b"".join(bytes(chunk) for chunk in wire.encode_frame(header, buffers))


BAD_STREAMS = {
    "http_request": b"GET / HTTP/1.1\r\nHost: worker\r\n\r\n" + bytes(range(256)),
    "random_bytes": bytes((i * 131 + 7) % 256 for i in range(4096)),
    "oversized_body_length": prefix(body_len=1 << 62),
    "just_over_max_message_size": prefix(body_len=MAX_MESSAGE_SIZE + 1),
    "oversized_header_length": prefix(header_len=(1 << 32) - 1),
    "too_many_buffers": prefix(n_buffers=(1 << 32) - 1),
    "header_not_msgpack": b"".join(bytes(c) for c in wire.encode_frame(b"\xc1" * 16, [])),
    "request_before_hello": frame(
        codec.PythonCall("registered", codec.dump_payload(((), {}), allow_pickle=False))
    ),
    "hello_from_another_group": frame(codec.Hello("worker1", 1, "not/this/group/")),
    # Transport flags (PROTOCOL.md 9.3): a shared-memory frame on a connection
    # that offered none (over TCP), a control frame of an unknown kind, a
    # release of a segment never sent, and flags no one defined.
    "shm_frame_over_tcp": b"".join(
        bytes(c) for c in wire.encode_frame(b"\x90", [bytes(28)], flags=0x01)
    ),
    "unknown_control_frame": b"".join(bytes(c) for c in wire.encode_frame(b"Z", [], flags=0x02)),
    "release_of_unknown_segment": b"".join(
        bytes(c) for c in wire.encode_frame(b"R\x07\x00\x00\x00", [], flags=0x02)
    ),
    "undefined_flags": b"".join(bytes(c) for c in wire.encode_frame(b"\x90", [], flags=0x80)),
}


def expect_dropped(port: int, data: bytes) -> str:
    """Send ``data`` on a new connection; how the worker ended it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            while True:  # anything sent before the drop is ignored
                if not sock.recv(65536):
                    return "eof"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except TimeoutError:
            return "still open after 10s"


async def serve_through_bad_streams(rank: int, world_size: int) -> dict[str, Any]:
    peer = f"worker{1 - rank}"
    out: dict[str, Any] = {}
    if rank == 0:  # opens worker0 -> worker1 (TCP) before the bad bytes arrive
        out["before"] = int(await rpc.rpc_async(peer, torch.add, args=(1, 1)))
    post(agent_tcp_port())
    assert await receive(60) == "bad streams sent"
    await barrier()
    # worker1 -> worker0 is a new connection to a listener that saw the garbage.
    out["after"] = [int(await rpc.rpc_async(peer, torch.add, args=(i, rank))) for i in range(3)]
    big = torch.arange(1_000_000)
    out["big_ok"] = torch.equal(await rpc.rpc_async(peer, echo, args=(big,)), big)
    await barrier()
    return out


def test_garbage_and_oversized_frames_drop_only_that_connection() -> None:
    # TCP between the workers too, so their listeners carry real traffic.
    with spawn_workers(
        serve_through_bad_streams,
        2,
        timeout=60,
        options_kwargs={"use_unix_sockets": False, "max_message_size": MAX_MESSAGE_SIZE},
    ) as group:
        ports = dict(group.next_event(timeout=45) for _ in range(2))
        # A connection that sends half a prefix and stalls stays open meanwhile.
        stalled = [socket.create_connection(("127.0.0.1", p), timeout=10) for p in ports.values()]
        try:
            for sock in stalled:
                sock.sendall(prefix()[:10])
            outcomes = {
                (rank, name): expect_dropped(port, data)
                for rank, port in sorted(ports.items())
                for name, data in BAD_STREAMS.items()
            }
            for rank in ports:
                group.send(rank, "bad streams sent")
            w0, w1 = group.join()
        finally:
            for sock in stalled:
                sock.close()
    bad = {key: how for key, how in outcomes.items() if how not in ("eof", "reset")}
    assert not bad, f"connections the worker kept open: {bad}"
    assert w0["before"] == 2
    assert w0["after"] == [0, 1, 2] and w1["after"] == [1, 2, 3]
    assert w0["big_ok"] and w1["big_ok"]


# ---------------------------------------------- a connection closed as it opens


async def connection_closed_on_arrival(rank: int, world_size: int) -> dict[str, Any]:
    from aiorpc_autograd import agent as agent_module

    out: dict[str, Any] = {}
    if rank != 0:
        return out
    real_connect = agent_module.connect

    async def connect_then_lose(*args: Any, **kwargs: Any) -> Any:
        # As when the peer dies right after accepting: the connection is
        # already closed when the agent gets it.
        conn = await real_connect(*args, **kwargs)
        conn.abort()
        while not conn.closed:
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        return conn

    agent_module.connect = connect_then_lose  # type: ignore[assignment]
    try:
        failed = rpc.rpc_async("worker1", torch.add, args=(1, 1), timeout=0)
        out["failed"] = await asyncio.wait_for(await_outcome(failed), 10)
    finally:
        agent_module.connect = real_connect
    # The next call opens a new connection.
    out["next"] = int(await asyncio.wait_for(rpc.rpc_async("worker1", torch.add, args=(1, 2)), 10))
    out["pending"] = rpc.get_debug_info()["num_pending_requests"]
    return out


def test_connection_closed_as_it_opens_fails_the_queued_call() -> None:
    w0, _ = run_workers(connection_closed_on_arrival, 2, timeout=60)
    assert isinstance(w0["failed"], rpc.ConnectionLostError), w0["failed"]
    assert w0["next"] == 3 and w0["pending"] == 0
