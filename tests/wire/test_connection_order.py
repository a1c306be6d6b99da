"""A connection writes what was sent on it before it delivers what it read:
an answer read in the same loop iteration as a request is queued does not
hold that request back while the answer's handler runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import uvloop

from aiorpc_autograd.transport import Connection, connect, serve_tcp
from aiorpc_autograd.wire import Frame, Limits

pytestmark = pytest.mark.timeout(30)


def _lost(conn: Connection, error: BaseException | None) -> None:
    pass


async def _serve(
    until: Callable[[list[bytes]], bool],
) -> tuple[asyncio.AbstractServer, int, list[Connection], list[bytes], asyncio.Future[None]]:
    """A server on loopback: its accepted connections (for the test to
    close), the headers of the frames they got, and a future done once
    ``until(headers)``."""
    served: list[Connection] = []
    got: list[bytes] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_frame(conn: Connection, frame: Frame) -> None:
        got.append(bytes(frame.header))
        if not conn.admitted:
            conn.admit()  # (as the agent does after a Hello): read on
        if not done.done() and until(got):
            done.set_result(None)

    def accept() -> Connection:
        conn = Connection(Limits(), on_frame, _lost)
        served.append(conn)
        return conn

    server, port = await serve_tcp(accept, "127.0.0.1")
    return server, port, served, got, done


async def _close(
    client: Connection, served: list[Connection], server: asyncio.AbstractServer
) -> None:
    client.close()
    for conn in served:
        conn.close()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.01)  # the transports close


async def _unwritten_at_delivery() -> tuple[list[bytes], list[bytes]]:
    """(what the client got, and what was still queued on it then), and what
    the server got."""
    seen: list[bytes] = []

    def on_client_frame(conn: Connection, frame: Frame) -> None:
        seen.append(bytes(frame.header))
        seen.extend(b"queued" for _ in conn._outbox)

    server, port, served, server_got, done = await _serve(lambda got: got[-1] == b"request")
    client = await connect(
        lambda: Connection(Limits(), on_client_frame, _lost, client=True),
        host="127.0.0.1",
        port=port,
    )
    try:
        async with asyncio.timeout(5):
            while not served:
                await asyncio.sleep(0.001)
        served[0].send(b"answer", [])
        served[0].flush()
        time.sleep(0.05)  # the answer waits in the client's socket buffer
        client.send(b"first", [])  # the first frame of this turn: written at once
        client.send(b"request", [])  # the rest of the burst: due at the turn's end
        await asyncio.wait_for(done, 5)
        return seen, server_got
    finally:
        await _close(client, served, server)


def test_a_queued_frame_is_written_before_a_read_is_delivered() -> None:
    seen, server_got = uvloop.run(_unwritten_at_delivery())
    assert seen == [b"answer"]  # nothing was left queued when it was delivered
    assert server_got == [b"first", b"request"]


async def _writes_of_bursts() -> list[list[bytes]]:
    """The frames each write of a client carried: three sent in one loop
    iteration, then one in a later iteration, then two sent in one iteration
    around a flush."""
    writes: list[list[bytes]] = []
    server, port, served, got, enough = await _serve(lambda got: len(got) == 6)
    client = await connect(
        lambda: Connection(Limits(), _ignore, _lost, client=True), host="127.0.0.1", port=port
    )
    try:
        write = client._write

        def recorded(chunks: list[bytes | memoryview]) -> None:
            data = b"".join(bytes(c) for c in chunks)
            writes.append(
                [f"frame{i}".encode() for i in range(1, 7) if f"frame{i}".encode() in data]
            )
            write(chunks)

        client._write = recorded  # type: ignore[method-assign]

        await asyncio.sleep(0)  # a fresh iteration
        client.send(b"frame1", [])
        assert writes == [[b"frame1"]]  # written at once, not at the iteration's end
        client.send(b"frame2", [])
        client.send(b"frame3", [])
        assert len(writes) == 1  # the rest of the burst waits...
        await asyncio.sleep(0)
        assert writes[1:] == [[b"frame2", b"frame3"]]  # ...and goes out in one write
        await asyncio.sleep(0)
        client.send(b"frame4", [])
        assert writes[2:] == [[b"frame4"]]  # a later iteration: at once again
        client.send(b"frame5", [])
        client.flush()
        client.send(b"frame6", [])  # after a flush nothing is queued: at once
        assert writes[3:] == [[b"frame5"], [b"frame6"]]
        await asyncio.sleep(0)
        assert len(writes) == 5  # (the iteration's end had nothing left to write)
        await asyncio.wait_for(enough, 5)
        assert got == [b"frame1", b"frame2", b"frame3", b"frame4", b"frame5", b"frame6"]
        return writes
    finally:
        await _close(client, served, server)


def _ignore(conn: Connection, frame: Frame) -> None:
    pass


def test_the_first_frame_of_an_iteration_goes_at_once_the_rest_of_a_burst_in_one_write() -> None:
    assert len(uvloop.run(_writes_of_bursts())) == 5
