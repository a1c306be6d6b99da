"""Remote functions the benchmarks call.

They live at module level in a module every worker imports, so both
torch.distributed.rpc and aiorpc_autograd pickle them by reference
(``bench.workloads.noop``) rather than by value.  Keep this module free of
imports: it is loaded on the callee of every call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from torch import Tensor

T = TypeVar("T")


def noop() -> None:
    """Do nothing; the cost of a call is then all RPC overhead."""


def echo(value: T) -> T:
    """Return the argument unchanged (the tensor echo benchmark)."""
    return value


def linear_tanh(x: Tensor, w: Tensor) -> Tensor:
    """``tanh(x @ w)``: the remote layer of the distributed autograd step."""
    return (x @ w).tanh()
