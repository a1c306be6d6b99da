"""torch's ``torch.distributed.rpc.constants``: the facade's defaults."""

from __future__ import annotations

from ...options import DEFAULT_RPC_TIMEOUT

__all__ = [
    "DEFAULT_INIT_METHOD",
    "DEFAULT_NUM_WORKER_THREADS",
    "DEFAULT_RPC_TIMEOUT_SEC",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "UNSET_RPC_TIMEOUT",
]

DEFAULT_RPC_TIMEOUT_SEC: float = DEFAULT_RPC_TIMEOUT
DEFAULT_INIT_METHOD: str = "env://"
DEFAULT_SHUTDOWN_TIMEOUT: float = 0
DEFAULT_NUM_WORKER_THREADS: int = 16
# A timeout argument left at this (any negative value) means the default.
UNSET_RPC_TIMEOUT: float = -1.0
