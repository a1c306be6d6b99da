"""``torch.distributed.nn.RemoteModule`` with torch's blocking calls.

``from aiorpc_autograd.sync.nn import RemoteModule``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import nn as _nn
from ..options import WorkerInfo
from ..rref import RRef
from ._bridge import Future, submit, wait_for

__all__ = ["RemoteModule"]


def _worker(remote_device: str | int | WorkerInfo) -> str | int | WorkerInfo:
    """torch's ``"name/cpu"`` and ``"rank:N/cpu"`` spellings, as ours."""
    if not isinstance(remote_device, str):
        return remote_device
    worker, _, device = remote_device.partition("/")
    if device and device != "cpu":
        raise ValueError(f"unsupported device {device!r}: only cpu")
    if worker.startswith("rank:"):
        return int(worker[len("rank:") :])
    return worker


class RemoteModule:
    """Builds ``module_cls(*args, **kwargs)`` on the worker of
    ``remote_device`` (``"worker1/cpu"``, ``"rank:1/cpu"``) and runs it there.

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
        self._module = _nn.RemoteModule(_worker(remote_device), module_cls, args or (), kwargs)
        self.owner = self._module.owner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's forward on its worker and block for the result."""
        return self._module.module_rref.rpc_sync().forward(*args, **kwargs)

    __call__ = forward

    def forward_async(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run the module's forward on its worker; a torch future of the result."""
        # The async API's proxy (whatever the RRef's type): its asyncio future
        # becomes a torch future.
        start = RRef.rpc_async(self._module.module_rref).forward
        return submit(lambda: start(*args, **kwargs))

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
