"""aiorpc_autograd: asyncio-native RPC and distributed autograd for PyTorch.

``import aiorpc_autograd as rpc`` gives the API of ``shared/API.md``; this
module only re-exports.
"""

from __future__ import annotations

from . import dist_autograd
from .api import (
    _set_rpc_timeout as _set_rpc_timeout,  # torch's private name (ported tests use it)
)
from .api import (
    get_debug_info,
    get_rpc_timeout,
    get_worker_info,
    get_worker_infos,
    init_rpc,
    membership_events,
    register,
    remote,
    rpc_async,
    rpc_sync,
    run,
    shutdown,
    to_thread,
    worker,
)
from .errors import (
    AuthenticationError,
    ConnectionLostError,
    InvalidArgumentError,
    ProtocolError,
    RemoteError,
    ResourceLimitError,
    RpcError,
    RpcTimeoutError,
    WorkerLeftError,
)
from .membership import MembershipEvent
from .options import RpcOptions, WorkerInfo
from .rref import RRef

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ConnectionLostError",
    "InvalidArgumentError",
    "MembershipEvent",
    "ProtocolError",
    "RemoteError",
    "ResourceLimitError",
    "RpcError",
    "RpcOptions",
    "RRef",
    "RpcTimeoutError",
    "WorkerInfo",
    "WorkerLeftError",
    "dist_autograd",
    "get_debug_info",
    "get_rpc_timeout",
    "get_worker_info",
    "get_worker_infos",
    "init_rpc",
    "membership_events",
    "register",
    "remote",
    "rpc_async",
    "rpc_sync",
    "run",
    "shutdown",
    "to_thread",
    "worker",
]
