"""Distributed autograd: ``from aiorpc_autograd import dist_autograd``.

Mirrors ``torch.distributed.autograd``; every call that talks to other workers
is awaitable, and the current context lives in a ``contextvars.ContextVar`` so
concurrent asyncio tasks each run their own forward/backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch

from .api import current_agent
from .autograd import DistAutogradContext, current_context_id
from .autograd_service import AutogradService

__all__ = [
    "DistAutogradContext",
    "backward",
    "context",
    "get_debug_info",
    "get_gradients",
    "retrieve_context",
]


def _service() -> AutogradService:
    service = current_agent().extensions.get("autograd")
    assert isinstance(service, AutogradService)
    return service


class context:
    """A distributed autograd context: ``async with dist_autograd.context() as
    context_id:`` (plain ``with`` works too).

    Its id is unique across the group. On exit the context is released here at
    once and release messages go to every worker it exchanged messages with
    (they drop theirs when those arrive), also when the body raised.
    """

    def __init__(self) -> None:
        self._ctx: DistAutogradContext | None = None
        self._token: object = None

    def __enter__(self) -> int:
        # From a thread other than the loop's (plain ``with`` in a pool thread or
        # the sync facade), the service is touched on its loop.
        agent = current_agent()
        self._ctx = agent.on_loop(_service().new_context)
        self._token = current_context_id.set(self._ctx.context_id())
        return self._ctx.context_id()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._ctx is not None
        current_context_id.reset(self._token)  # type: ignore[arg-type]
        try:
            agent = current_agent()
            service = _service()
        except Exception:
            return  # the agent is gone: nothing left to release
        context_id = self._ctx.context_id()
        agent.on_loop(lambda: service.release(context_id))

    async def __aenter__(self) -> int:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _validate_roots(roots: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(roots, torch.Tensor):
        roots = [roots]
    roots = list(roots)
    if not roots:
        raise ValueError("backward needs at least one root tensor")
    for i, root in enumerate(roots):
        if not isinstance(root, torch.Tensor):
            raise ValueError(f"root {i} is a {type(root).__name__}, not a tensor")
        if root.numel() != 1:
            raise ValueError(f"root {i} has shape {tuple(root.shape)}: roots must be scalars")
        if not root.requires_grad:
            raise ValueError(f"root {i} does not require grad")
        if root.grad_fn is None:
            raise ValueError(f"root {i} has no grad_fn: it is a leaf, nothing to differentiate")
    return roots


async def backward(
    context_id: int, roots: Sequence[torch.Tensor] | torch.Tensor, retain_graph: bool = False
) -> None:
    """Run the backward pass from the local scalar ``roots`` through every
    worker the forward pass touched; return when it is done everywhere.

    Gradients accumulate in the context (:func:`get_gradients`), never in
    ``.grad``. A send function whose result was never used does not hang the
    pass.

    Raises:
        ValueError: invalid roots (empty, not scalar, not requiring grad).
        RuntimeError: unknown context id, or a pass already running in it.
        RemoteError: the pass failed on some worker (named in the error); the
            other workers' parts of the pass are stopped.
    """
    valid = _validate_roots(roots)
    await _service().backward(context_id, valid, retain_graph)


def get_gradients(context_id: int) -> dict[torch.Tensor, torch.Tensor]:
    """The gradients this worker accumulated in the context for its leaves.

    Raises:
        RuntimeError: unknown context id.
    """
    return _service().container.retrieve(context_id).gradients()


def retrieve_context(context_id: int) -> DistAutogradContext:
    """The context object (``send_functions()``, ``recv_functions()``...).

    Raises:
        RuntimeError: unknown context id.
    """
    return _service().container.retrieve(context_id)


def get_debug_info() -> dict[str, int]:
    """``num_autograd_contexts`` and ``num_current_backward_passes`` here."""
    agent = current_agent()
    counters = agent.debug_info()
    return {
        "num_autograd_contexts": counters["num_autograd_contexts"],
        "num_current_backward_passes": counters["num_current_backward_passes"],
    }
