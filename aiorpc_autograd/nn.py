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


def _recursive_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_recursive_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _recursive_to(v, device) for k, v in value.items()}
    return value


def _build_module(
    module_cls: type[torch.nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any], device: str
) -> torch.nn.Module:
    return module_cls(*args, **kwargs).to(device)


def _remote_forward(
    module: RRef[torch.nn.Module], device: str, mapped: bool, args: tuple[Any, ...], kwargs: Any
) -> Any:
    # As torch's RemoteModule on a CUDA device: inputs go to the module's
    # device; outputs come back to the CPU unless a device map takes them.
    dev = torch.device(device)
    out = module.local_value().forward(*_recursive_to(args, dev), **_recursive_to(kwargs, dev))
    return out if mapped else _recursive_to(out, torch.device("cpu"))


async def _parameter_rrefs(
    module: RRef[torch.nn.Module], recurse: bool
) -> list[RRef[torch.Tensor]]:
    value = await module.to_here()  # on the owner: the module itself, once created
    return [RRef(p) for p in value.parameters(recurse)]


class RemoteModule:
    """Constructs ``module_cls(*args, **kwargs)`` on worker ``remote_device``
    and calls it there.

    ``remote_device`` is a worker name, rank or WorkerInfo, or PyTorch's
    ``"name/device"`` (``"ps/cpu"``, ``"ps/cuda:0"``). On a CUDA device, as in
    PyTorch, the module is moved there, the inputs are moved to it on the
    owner, and the outputs come back on the CPU unless this worker has a
    device map for the owner (then by that map's inverse).

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
        device = "cpu"
        if isinstance(remote_device, str) and "/" in remote_device:
            remote_device, device = remote_device.split("/", 1)
            dev = torch.device(device)  # RuntimeError for a malformed device
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"unsupported device {device!r}: cpu or cuda")
            device = str(dev)
        agent = current_agent()
        self.owner = agent.worker_info(remote_device)
        self.device = device
        self._mapped = agent.device_maps.for_request(self.owner.name) is not None
        if device == "cpu":
            self.module_rref: RRef[torch.nn.Module] = remote(self.owner, module_cls, args, kwargs)
        else:
            self.module_rref = remote(
                self.owner, _build_module, (module_cls, args, kwargs or {}, device)
            )

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's forward on its worker (recorded for dist autograd)."""
        if self.device == "cpu":
            return await self.module_rref.rpc_async().forward(*args, **kwargs)
        return await rpc_async(
            self.owner,
            _remote_forward,
            (self.module_rref, self.device, self._mapped, args, kwargs),
        )

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
