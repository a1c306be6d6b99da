"""A connection writes what was sent on it before it delivers what it read:
an answer read in the same loop iteration as a request is queued does not
hold that request back while the answer's handler runs."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from aiorpc_autograd.transport import Connection, connect, serve_tcp
from aiorpc_autograd.wire import Frame, Limits

pytestmark = pytest.mark.timeout(30)


def _lost(conn: Connection, error: BaseException | None) -> None:
    pass


async def _unwritten_at_delivery() -> tuple[list[bytes], list[bytes]]:
    """(what the client got, and what was still queued on it then), and what
    the server got."""
    seen: list[bytes] = []
    server_got: list[bytes] = []
    served: list[Connection] = []
    done = asyncio.get_running_loop().create_future()

    def on_server_frame(conn: Connection, frame: Frame) -> None:
        server_got.append(bytes(frame.header))
        if not done.done():
            done.set_result(None)

    def on_client_frame(conn: Connection, frame: Frame) -> None:
        seen.append(bytes(frame.header))
        seen.extend(b"queued" for _ in conn._outbox)

    def accept() -> Connection:
        conn = Connection(Limits(), on_server_frame, _lost)
        served.append(conn)
        return conn

    server, port = await serve_tcp(accept, "127.0.0.1")
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
        client.send(b"request", [])  # its write is due at the end of this turn
        await asyncio.wait_for(done, 5)
        return seen, server_got
    finally:
        client.close()
        for conn in served:
            conn.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # the transports close


def test_a_queued_frame_is_written_before_a_read_is_delivered() -> None:
    seen, server_got = uvloop.run(_unwritten_at_delivery())
    assert seen == [b"answer"]  # nothing was left queued when it was delivered
    assert server_got == [b"request"]
