"""``torch.distributed.rpc``, name for name, with torch's blocking semantics.

``from aiorpc_autograd.sync import rpc`` in place of
``import torch.distributed.rpc as rpc``: ``init_rpc`` starts this process's
agent on a background event-loop thread and blocks until the group is up;
``rpc_sync`` and ``RRef.to_here`` block; ``rpc_async`` returns a
``torch.futures.Future``. Every call is the async API's (``aiorpc_autograd``)
run on that loop. See the README, "Porting from torch.distributed.rpc".
"""

from __future__ import annotations

from ...api import get_rpc_timeout
from ...errors import (
    AuthenticationError,
    ConnectionLostError,
    ProtocolError,
    RemoteError,
    RpcError,
    RpcTimeoutError,
)
from ...options import RpcOptions, WorkerInfo
from .. import _bridge
from . import constants, functions
from .api import (
    RpcAgent,
    RRef,
    TensorPipeAgent,
    get_worker_info,
    init_rpc,
    remote,
    rpc_async,
    rpc_sync,
    shutdown,
)
from .api import (
    _get_current_rpc_agent as _get_current_rpc_agent,
)
from .api import (
    _get_debug_info as _get_debug_info,
)
from .api import (
    _rref_context_get_debug_info as _rref_context_get_debug_info,
)
from .api import (
    _set_rpc_timeout as _set_rpc_timeout,
)
from .options import BackendType, RpcBackendOptions, TensorPipeRpcBackendOptions

# torch.distributed.rpc names of the same things.
Future = _bridge.Future
RemoteException = RemoteError

__all__ = [
    "AuthenticationError",
    "BackendType",
    "ConnectionLostError",
    "Future",
    "ProtocolError",
    "RRef",
    "RemoteError",
    "RemoteException",
    "RpcAgent",
    "RpcBackendOptions",
    "RpcError",
    "RpcOptions",
    "RpcTimeoutError",
    "TensorPipeAgent",
    "TensorPipeRpcBackendOptions",
    "WorkerInfo",
    "constants",
    "functions",
    "get_rpc_timeout",
    "get_worker_info",
    "init_rpc",
    "is_available",
    "remote",
    "rpc_async",
    "rpc_sync",
    "shutdown",
]


def is_available() -> bool:
    """True: RPC is always available here (torch's ``rpc.is_available``)."""
    return True
