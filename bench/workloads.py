"""Remote functions the benchmarks call.

They live at module level in a module every worker imports, so both
torch.distributed.rpc and aiorpc_autograd pickle them by reference
(``bench.workloads.noop``) rather than by value.  Keep this module free of
module-level imports beyond the standard library: it is loaded on the callee
of every call (torch is imported where needed; every worker has it loaded).
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import Tensor

T = TypeVar("T")


def noop() -> None:
    """Do nothing; the cost of a call is then all RPC overhead."""


def echo(value: T) -> T:
    """Return the argument unchanged (the tensor echo benchmark)."""
    return value


def make_weight(dim: int) -> Tensor:
    """The autograd step's ``dim x dim`` weight, seeded: the same on every run."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(dim, dim, generator=gen).div_(dim**0.5).requires_grad_()


def linear_relu(x: Tensor, w_rref: Any) -> Tensor:
    """``relu(x @ w)`` with the weight its owner holds: the step's remote layer."""
    import torch

    return torch.relu(x @ w_rref.local_value())


def rss_mb() -> float:
    """This process's resident set size in MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def trimmed_rss_mb() -> float:
    """:func:`rss_mb` after glibc's ``malloc_trim(0)`` returned free heap to the OS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()


def make_mlp(depth: int, dim: int) -> Any:
    """The scaling benchmark's remote model: ``depth`` x (Linear(dim, dim), ReLU), seeded."""
    import torch

    torch.manual_seed(depth)
    layers: list[Any] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(dim, dim), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def mlp_forward(x: Tensor, module_rref: Any) -> Tensor:
    """The remote model's forward on its owner."""
    out: Tensor = module_rref.local_value()(x)
    return out


def mlp_param_rrefs(module_rref: Any) -> list[Any]:
    """Owner RRefs to the remote model's parameters, of the caller's RRef type
    (torch's or ours), for a DistributedOptimizer."""
    rref_type = type(module_rref)
    return [rref_type(p) for p in module_rref.local_value().parameters()]
