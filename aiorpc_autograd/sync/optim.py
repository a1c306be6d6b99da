"""``torch.distributed.optim.DistributedOptimizer`` with a blocking ``step``.

``from aiorpc_autograd.sync.optim import DistributedOptimizer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import optim as _optim
from ..rref import RRef
from ._bridge import wait_for

__all__ = ["DistributedOptimizer"]


class DistributedOptimizer:
    """One ``optimizer_class(local_params, *args, **kwargs)`` per parameter
    owner, stepped with a distributed autograd context's gradients (the async
    API's ``DistributedOptimizer``, whose ``step`` this one blocks on).

    Args:
        optimizer_class: a ``torch.optim.Optimizer`` subclass.
        params_rref: RRefs to the parameters (on any workers).
        *args: passed on to each local optimizer.
        **kwargs: likewise.

    Raises:
        RemoteError: (construction) an owner's ``optimizer_class(...)`` raised.
        RuntimeError: constructed on the RPC agent's loop thread.
    """

    def __init__(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        params_rref: Iterable[RRef[torch.Tensor]],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._optimizer = _optim.DistributedOptimizer(optimizer_class, params_rref, *args, **kwargs)
        # torch's constructor returns once every owner's optimizer exists, and
        # raises the error of one that failed to build.
        wait_for(self._optimizer.wait_created, "DistributedOptimizer()")

    def step(self, context_id: int) -> None:
        """Step every owner's optimizer with that context's gradients; blocks.

        Raises:
            RemoteError: an owner failed.
            RuntimeError: called on the RPC agent's loop thread.
        """
        wait_for(lambda: self._optimizer.step(context_id), "DistributedOptimizer.step()")
