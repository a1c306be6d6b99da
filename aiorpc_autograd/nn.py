"""``RemoteModule``: an ``nn.Module`` that lives on another worker.

``from aiorpc_autograd.nn import RemoteModule``
"""

from __future__ import annotations

from typing import Any

import torch

from .api import current_agent, remote, rpc_async
from .options import WorkerInfo
from .rref import RRef

__all__ = ["RemoteModule"]


async def _parameter_rrefs(
    module: RRef[torch.nn.Module], recurse: bool
) -> list[RRef[torch.Tensor]]:
    value = await module.to_here()  # on the owner: the module itself, once created
    return [RRef(p) for p in value.parameters(recurse)]


class RemoteModule:
    """Constructs ``module_cls(*args, **kwargs)`` on worker ``remote_device``
    and calls it there.

    ``remote_device`` is a worker name, rank or WorkerInfo; ``"name/cpu"`` is
    accepted for symmetry with PyTorch (only CPU is supported for now).

    Example::

        net = RemoteModule("ps", torch.nn.Linear, (4, 2))
        async with dist_autograd.context() as cid:
            out = await net(x)
            ...
        opt = DistributedOptimizer(SGD, await net.remote_parameters(), lr=0.1)
    """

    def __init__(
        self,
        remote_device: str | int | WorkerInfo,
        module_cls: type[torch.nn.Module],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(remote_device, str) and "/" in remote_device:
            remote_device, device = remote_device.split("/", 1)
            if device != "cpu":
                raise ValueError(f"unsupported device {device!r}: only cpu")
        self.owner = current_agent().worker_info(remote_device)
        self.module_rref: RRef[torch.nn.Module] = remote(self.owner, module_cls, args, kwargs)

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's forward on its worker (recorded for dist autograd)."""
        return await self.module_rref.rpc_async().forward(*args, **kwargs)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self.forward(*args, **kwargs)

    async def remote_parameters(self, recurse: bool = True) -> list[RRef[torch.Tensor]]:
        """RRefs to the module's parameters, for a DistributedOptimizer."""
        result = await rpc_async(self.owner, _parameter_rrefs, (self.module_rref, recurse))
        return result

    async def train(self, mode: bool = True) -> None:
        """Set the remote module's training mode."""
        await self.module_rref.rpc_async().train(mode)

    async def eval(self) -> None:
        """Set the remote module to evaluation mode."""
        await self.module_rref.rpc_async().train(False)
