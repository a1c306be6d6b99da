"""``torch.distributed.nn.RemoteModule`` with torch's blocking calls.

``from aiorpc_autograd.sync.nn import RemoteModule``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from .. import nn as _nn
from ..options import WorkerInfo
from ..rref import RRef
from ._bridge import Future, agent, submit, wait_for

__all__ = ["RemoteModule"]


def _remote_device(remote_device: str | int | WorkerInfo) -> str | int | WorkerInfo:
    """torch's ``"rank:N/device"`` spelling as ``"name/device"`` (the async
    API's ``RemoteModule`` takes names, ranks, WorkerInfos and ``"name/device"``)."""
    if isinstance(remote_device, str):
        worker, sep, device = remote_device.partition("/")
        if worker.startswith("rank:"):
            name = agent().worker_info(int(worker[len("rank:") :])).name
            return f"{name}{sep}{device}"
    return remote_device


class RemoteModule:
    """Builds ``module_cls(*args, **kwargs)`` on the worker of
    ``remote_device`` (``"worker1/cpu"``, ``"rank:1/cpu"``, a name, a rank) and
    runs it there: the async API's ``RemoteModule``, whose calls this one
    blocks on.

    ``forward`` (and calling the module) blocks; ``forward_async`` returns a
    torch future. Both are recorded for distributed autograd.
    """

    def __init__(
        self,
        remote_device: str | int | WorkerInfo,
        module_cls: type[torch.nn.Module],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._module = _nn.RemoteModule(
            _remote_device(remote_device), module_cls, tuple(args or ()), kwargs
        )
        self.owner = self._module.owner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's forward on its worker and block for the result."""
        return wait_for(lambda: self._module.forward(*args, **kwargs), "RemoteModule.forward()")

    __call__ = forward

    def forward_async(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run the module's forward on its worker; a torch future of the result."""
        return submit(lambda: asyncio.ensure_future(self._module.forward(*args, **kwargs)))

    def remote_parameters(self, recurse: bool = True) -> list[RRef[torch.Tensor]]:
        """RRefs to the module's parameters, for a ``DistributedOptimizer``."""
        return wait_for(
            lambda: self._module.remote_parameters(recurse), "RemoteModule.remote_parameters()"
        )

    def get_module_rref(self) -> RRef[torch.nn.Module]:
        """The RRef to the module on its worker."""
        return self._module.module_rref

    def train(self, mode: bool = True) -> RemoteModule:
        """Set the remote module's training mode; returns this module."""
        wait_for(lambda: self._module.train(mode), "RemoteModule.train()")
        return self

    def eval(self) -> RemoteModule:
        """Set the remote module to evaluation mode; returns this module."""
        return self.train(False)
