"""``torch.distributed.nn.RemoteModule`` with torch's blocking calls.

``from aiorpc_autograd.sync.nn import RemoteModule``. The module's creation,
its attributes (``module_rref``, ``on``, ``device``...), pickling over RPC,
``init_from_module_rref`` and torch's errors for unsupported ``nn.Module``
methods are the async API's (:mod:`aiorpc_autograd.nn`); this flavour's calls
block on them, as torch's do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Self

import torch

from .. import nn as _nn
from ..nn import (  # torch's module-level name, used by its tests
    _REMOTE_MODULE_PICKLED_ATTRIBUTES as _REMOTE_MODULE_PICKLED_ATTRIBUTES,
)
from ..options import WorkerInfo
from ..rref import RRef
from ._bridge import Future, submit, wait_for

__all__ = ["RemoteModule"]


class _RemoteModule(_nn._RemoteModuleCore):
    """torch's ``_RemoteModule``, the base of :class:`RemoteModule`; its
    ``_module_interface_cls`` (TorchScript) must be None here."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's forward on its worker and block for the result
        (recorded for distributed autograd).

        Raises:
            RuntimeError: called on the agent's loop thread (use
                ``await m.forward_async(...)`` there).
        """
        return wait_for(lambda: self._start_forward(args, kwargs), "RemoteModule.forward()")

    def forward_async(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run the module's forward on its worker; a torch future of the
        result, at once (recorded for distributed autograd)."""
        return submit(lambda: self._start_forward(args, kwargs))

    def remote_parameters(self, recurse: bool = True) -> list[RRef[torch.Tensor]]:
        """RRefs to the module's parameters, for a ``DistributedOptimizer``; blocks.

        Args:
            recurse: include the parameters of submodules.
        """
        return wait_for(lambda: self._start_parameters(recurse), "RemoteModule.remote_parameters()")

    def train(self, mode: bool = True) -> Self:
        """Set the remote module's training mode (blocks); returns this module."""
        wait_for(lambda: self._start_train(mode), "RemoteModule.train()")
        return self

    def eval(self) -> Self:
        """Set the remote module to evaluation mode (blocks); returns this module."""
        return self.train(False)


class RemoteModule(_RemoteModule):
    """Builds ``module_cls(*args, **kwargs)`` on the worker of
    ``remote_device`` (``"worker1/cpu"``, ``"rank:1/cpu"``, ``"worker1"``, a
    rank) and runs it there, as torch's ``RemoteModule``: an ``nn.Module``
    whose ``forward`` (and calling it) blocks and ``forward_async`` returns a
    torch future, both recorded for distributed autograd;
    ``remote_parameters()``, ``get_module_rref()`` / ``module_rref``,
    ``train()`` / ``eval()``, ``RemoteModule.init_from_module_rref(...)``.
    It may be sent in RPC arguments and results (torch's pickled attributes
    travel; the module is shared, not copied). ``nn.Module`` methods acting
    on local state raise torch's ``ValueError``.
    """

    def __init__(
        self,
        remote_device: str | int | WorkerInfo,
        module_cls: Callable[..., torch.nn.Module],
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Start building the module on its worker (returns at once; an error
        building it surfaces at the first call, as in torch).

        Raises:
            ValueError: a malformed ``remote_device`` or an unknown worker.
            RuntimeError: a malformed device string.
        """
        super().__init__(remote_device, module_cls, args, kwargs)
