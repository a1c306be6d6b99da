"""Configuration and small identity types (no project imports)."""

from __future__ import annotations

import os
import ssl as _ssl
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["DEFAULT_RPC_TIMEOUT", "RpcOptions", "WorkerInfo"]

DEFAULT_RPC_TIMEOUT = 60.0


class WorkerInfo(NamedTuple):
    """A worker of the group: its unique name and its id (equal to its rank).

    Frozen and hashable.
    """

    name: str
    id: int


@dataclass(frozen=True)
class RpcOptions:
    """Options of an RPC agent. Validated on construction.

    Attributes:
        rpc_timeout: default timeout of a call in seconds; 0 means no timeout.
        num_worker_threads: size of the thread pool that runs plain (non-async)
            remote functions.
        device_maps: ``{peer_name: {local_device: remote_device}}`` used when
            tensors on accelerators are sent to a peer.
        auth_token: shared secret; peers that cannot prove they hold it are
            refused. Defaults to the ``AIORPC_AUTH_TOKEN`` environment variable.
        ssl: an ``ssl.SSLContext`` used for TCP links, or None.
        max_message_size: largest frame (header and tensor data) accepted, in bytes.
        max_header_size: largest msgpack header accepted, in bytes.
        max_tensors: most tensors accepted in one message.
        listen_host: address the TCP listener binds to.
        use_unix_sockets: connect to workers on the same host over Unix sockets.
        allow_pickle: if False (safe mode), only registered functions can be
            called and only msgpack values and tensors travel.
        rendezvous_timeout: seconds to wait for the whole group in ``init_rpc``.
    """

    rpc_timeout: float = DEFAULT_RPC_TIMEOUT
    num_worker_threads: int = 16
    device_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    auth_token: str | None = field(default_factory=lambda: os.environ.get("AIORPC_AUTH_TOKEN"))
    ssl: _ssl.SSLContext | None = None
    max_message_size: int = 4 << 30
    max_header_size: int = 64 << 20
    max_tensors: int = 65536
    listen_host: str = "127.0.0.1"
    use_unix_sockets: bool = True
    allow_pickle: bool = True
    rendezvous_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.rpc_timeout < 0:
            raise ValueError(f"rpc_timeout must be >= 0, got {self.rpc_timeout}")
        if self.num_worker_threads < 1:
            raise ValueError(f"num_worker_threads must be >= 1, got {self.num_worker_threads}")
        for name in ("max_message_size", "max_header_size", "max_tensors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.rendezvous_timeout <= 0:
            raise ValueError("rendezvous_timeout must be positive")
        if self.ssl is not None and not isinstance(self.ssl, _ssl.SSLContext):
            raise TypeError("ssl must be an ssl.SSLContext or None")
