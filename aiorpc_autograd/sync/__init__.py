"""A synchronous facade mirroring ``torch.distributed`` RPC, name for name.

=================================  ==========================================
torch                              here
=================================  ==========================================
``torch.distributed.rpc``          ``aiorpc_autograd.sync.rpc``
``torch.distributed.autograd``     ``aiorpc_autograd.sync.autograd``
``torch.distributed.optim``        ``aiorpc_autograd.sync.optim``
``torch.distributed.nn``           ``aiorpc_autograd.sync.nn``
=================================  ==========================================

so that torch RPC code ports by changing its imports only::

    from aiorpc_autograd.sync import rpc
    from aiorpc_autograd.sync import autograd as dist_autograd
    from aiorpc_autograd.sync.optim import DistributedOptimizer

``rpc.init_rpc`` runs this process's agent on a background event-loop thread;
every facade call is the async API's call run there (a thin layer: one
implementation of every behaviour). The async API (``import aiorpc_autograd``)
stays the primary one. Layering: this package sits above the api layer, and
nothing else in the package imports it.
"""

from __future__ import annotations

from . import autograd, nn, optim, rpc

__all__ = ["autograd", "nn", "optim", "rpc"]
