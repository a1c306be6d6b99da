"""``torch.distributed.autograd``, name for name, with blocking ``backward``.

``from aiorpc_autograd.sync import autograd as dist_autograd`` in place of
``import torch.distributed.autograd as dist_autograd``::

    with dist_autograd.context() as context_id:
        loss = ...                                   # forward, RPCs included
        dist_autograd.backward(context_id, [loss])   # blocks until done everywhere
        grads = dist_autograd.get_gradients(context_id)

The context is the async API's (it lives in a ``contextvars.ContextVar`` of
the calling thread, and the facade's blocking calls carry it to the loop).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import dist_autograd as _dist_autograd
from ..autograd import current_context_id
from ..dist_autograd import DistAutogradContext, context, get_gradients
from ._bridge import wait_for

__all__ = [
    "DistAutogradContext",
    "backward",
    "context",
    "get_gradients",
    "is_available",
    "retrieve_context",
]


def backward(
    context_id: int, roots: Sequence[torch.Tensor] | torch.Tensor, retain_graph: bool = False
) -> None:
    """Run the distributed backward pass from the local scalar ``roots`` and
    block until it is done on every worker (``dist_autograd.backward``; its
    signature is torch's: the optimizer-in-backward mode is the async API's).

    Raises:
        ValueError: invalid roots.
        RuntimeError: unknown context id; or called on the RPC agent's loop
            thread (await the async API's ``backward`` there).
        RemoteError: the pass failed on some worker (named in the error).
    """
    wait_for(
        lambda: _dist_autograd.backward(context_id, roots, retain_graph),
        "dist_autograd.backward()",
    )


def retrieve_context(context_id: int) -> DistAutogradContext:
    """The context object (torch's ``_retrieve_context``).

    Raises:
        RuntimeError: unknown context id.
    """
    return _dist_autograd.retrieve_context(context_id)


# torch's private names, which its tests and some programs use.
_retrieve_context = retrieve_context


def _new_context() -> DistAutogradContext:
    """A new context, made this thread's current one until
    :func:`_release_context` (torch's private ``_new_context``, for code that
    cannot use ``with context()``).

    Raises:
        RuntimeError: this thread has a context already (they do not nest).
    """
    ctx = _dist_autograd.new_context_here()
    current_context_id.set(ctx.context_id())
    return ctx


def _release_context(context_id: int) -> None:
    """Release a context here and on the workers it knows, as leaving its
    ``with`` block does (torch's private ``_release_context``).

    Raises:
        RuntimeError: no such context ("Could not find autograd context with id: N").
    """
    _dist_autograd.release_here(context_id)


def _get_max_id() -> int:
    """The largest context id this worker can make (torch's private
    ``_get_max_id``): its worker id in the top 16 bits, all ones below."""
    return _dist_autograd._service().container.max_id()


def _current_context() -> DistAutogradContext:
    """The context of this thread (task): torch's ``_current_context``.

    Raises:
        RuntimeError: no context is active here.
    """
    context_id = current_context_id.get()
    if context_id is None:
        raise RuntimeError(
            "Current thread doesn't have a valid autograd context. Please wrap your code "
            "using: `with torch.distributed.autograd.context() as context_id` to generate "
            "a valid context"
        )
    return retrieve_context(context_id)


def _is_valid_context(context_id: int) -> None:
    """Returns if ``context_id`` is a context here, as torch's
    ``_is_valid_context``.

    Raises:
        RuntimeError: it is not.
    """
    retrieve_context(context_id)


def _get_debug_info() -> dict[str, int]:
    """torch's private ``dist_autograd._get_debug_info()``: at least
    ``num_autograd_contexts`` and ``num_current_backward_passes``."""
    return _dist_autograd.get_debug_info()


def is_available() -> bool:
    """True (torch's ``dist_autograd.is_available``)."""
    return True
