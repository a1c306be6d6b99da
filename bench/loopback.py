"""A ``tcp://`` rendezvous whose store listens on 127.0.0.1 only.

torch's own ``tcp://HOST:PORT`` handler starts the TCPStore server on every
interface (``*:PORT``), whatever HOST says; aiorpc_autograd's rendezvous uses
that handler too.  Both libraries hand ``init_method`` to
``torch.distributed.rendezvous``, so registering this handler under its own
scheme keeps every socket of a benchmark on the loopback.  The store is only
used to find the peers; it plays no part once the agents are connected.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import parse_qs, urlparse

from torch.distributed import Store, TCPStore  # type: ignore[attr-defined]
from torch.distributed.rendezvous import register_rendezvous_handler

SCHEME = "loopbacktcp"
HOST = "127.0.0.1"

_registered = False


def init_method(port: int) -> str:
    """The ``init_method`` for a group whose rank 0 hosts the store on ``port``."""
    return f"{SCHEME}://{HOST}:{port}"


def register() -> None:
    """Register the handler with torch (once per process)."""
    global _registered
    if not _registered:
        register_rendezvous_handler(SCHEME, _rendezvous)  # type: ignore[no-untyped-call]
        _registered = True


def _rendezvous(
    url: str, timeout: timedelta = timedelta(seconds=60), **_: object
) -> Iterator[tuple[Store, int, int]]:
    """torch's ``tcp://`` handler, except that rank 0 binds the listener itself.

    The socket, bound to the URL's host, reaches the store through
    ``master_listen_fd``.
    """
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    rank, world_size = int(query["rank"][0]), int(query["world_size"][0])
    host, port = parsed.hostname, parsed.port
    if host is None or port is None:
        raise ValueError(f"{url!r}: host and port are required")
    if rank == 0:
        # detach(): the store owns the descriptor from now on.
        listen_fd = socket.create_server((host, port)).detach()
        store = TCPStore(host, port, world_size, True, timeout, master_listen_fd=listen_fd)
    else:
        store = TCPStore(host, port, world_size, False, timeout)
    yield store, rank, world_size
    raise RuntimeError(f"{SCHEME}:// cannot re-rendezvous")
