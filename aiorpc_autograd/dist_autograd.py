"""Distributed autograd: ``from aiorpc_autograd import dist_autograd``.

Mirrors ``torch.distributed.autograd``; every call that talks to other workers
is awaitable, and the current context lives in a ``contextvars.ContextVar`` so
concurrent asyncio tasks each run their own forward/backward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Protocol

import torch

from .api import current_agent
from .autograd import DistAutogradContext, current_context_id
from .autograd_service import AutogradService
from .errors import InvalidArgumentError

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

    Contexts do not nest (as in torch): entering one while this task's or
    thread's current context (that of an enclosing ``context()``, or of the
    request a remote function serves) is alive raises ``RuntimeError``
    ("Already have an autograd context id for this thread").

    A forgotten ``await`` is loud: if a :func:`backward` or
    ``DistributedOptimizer.step`` called in this context was never awaited
    (nor started as a task), the exit raises ``RuntimeError`` naming it (a
    ``RuntimeWarning`` instead when the body already raised).
    """

    def __init__(self) -> None:
        self._ctx: DistAutogradContext | None = None
        self._token: object = None

    def __enter__(self) -> int:
        self._ctx = new_context_here()
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
        lost = self._ctx.never_awaited()
        try:
            agent = current_agent()
            service = _service()
        except Exception:
            agent, service = None, None  # the agent is gone: nothing left to release
        if agent is not None and service is not None:
            context_id = self._ctx.context_id()
            agent.on_loop(lambda: service.release(context_id))
        if lost:
            what = ", ".join(lost)
            message = (
                f"{what} in autograd context {self._ctx.context_id()} was never awaited: "
                "nothing was computed or stepped (missing 'await'?)"
            )
            if exc_type is None:
                raise RuntimeError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    async def __aenter__(self) -> int:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _check_argument_types(context_id: Any, roots: Any, retain_graph: Any) -> None:
    """torch's binding refuses arguments of the wrong type before anything runs.

    Raises:
        TypeError: in torch's words ("incompatible function arguments").
    """
    ok = (
        isinstance(context_id, int)
        and not isinstance(context_id, bool)
        and isinstance(retain_graph, bool)
        and (
            isinstance(roots, torch.Tensor)
            or (
                isinstance(roots, (list, tuple))
                and all(isinstance(root, torch.Tensor) for root in roots)
            )
        )
    )
    if not ok:
        raise TypeError(
            "backward(): incompatible function arguments. The following argument types "
            "are supported:\n    1. (context_id: int, roots: list[torch.Tensor], "
            f"retain_graph: bool = False) -> None\n\nInvoked with: {context_id!r}, "
            f"{roots!r}, {retain_graph!r}"
        )


def new_context_here() -> DistAutogradContext:
    """A new context of this worker (not yet made the current one).

    Raises:
        RuntimeError: a context is current here already (they do not nest).
        RpcError: RPC is not initialized.
    """
    # From a thread other than the loop's (plain ``with`` in a pool thread or
    # the sync facade), the service is touched on its loop.
    agent = current_agent()
    service = _service()
    outer = current_context_id.get()
    if outer is not None and service.container.get(outer) is not None:
        raise RuntimeError(
            f"Already have an autograd context id for this thread ({outer}): "
            "distributed autograd contexts do not nest, as in torch"
        )
    return agent.on_loop(service.new_context)


def release_here(context_id: int) -> None:
    """Release the context ``context_id`` here and on the workers it knows
    (what leaving its ``with`` block does); it is no longer current.

    Raises:
        RuntimeError: no such context here.
    """
    retrieve_context(context_id)
    service = _service()
    service.agent.on_loop(lambda: service.release(context_id))
    if current_context_id.get() == context_id:
        current_context_id.set(None)


def _validate_roots(roots: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """The roots as a list, checked in torch's order.

    Raises:
        InvalidArgumentError: no roots, or a root that does not require
            grad, is not a scalar or is a leaf (torch's messages).
    """
    if isinstance(roots, torch.Tensor):
        roots = [roots]
    roots = list(roots)
    if not roots:
        raise InvalidArgumentError("No tensors provided for gradient computation.")
    for i, root in enumerate(roots):
        if not root.requires_grad:
            raise InvalidArgumentError(f"requires_grad not set on root {i}")
        if root.numel() != 1:
            raise InvalidArgumentError(
                f"root {i} of shape {tuple(root.shape)} is not a scalar, "
                "all roots need to be scalar"
            )
        if root.grad_fn is None:
            raise InvalidArgumentError(
                f"root {i} (a leaf) does not have a valid gradient function."
            )
    return roots


class _StepsInBackward(Protocol):
    """A ``DistributedOptimizer`` (``aiorpc_autograd.optim``)."""

    def step_in_backward_plan(self) -> list[int]: ...


def backward(
    context_id: int,
    roots: Sequence[torch.Tensor] | torch.Tensor,
    retain_graph: bool = False,
    *,
    optimizer: _StepsInBackward | None = None,
) -> Coroutine[Any, Any, None]:
    """Run the backward pass from the local scalar ``roots`` through every
    worker the forward pass touched; return when it is done everywhere.

    Gradients accumulate in the context (:func:`get_gradients`), never in
    ``.grad``. A send function whose result was never used does not hang the
    pass.

    Step in backward: with ``optimizer=opt`` (a ``DistributedOptimizer``),
    each owner of ``opt``'s parameters steps its local optimizer with the
    context's gradients as soon as its own part of the pass is done, inside
    the pass: when this returns, the parameters are stepped, as after
    ``await opt.step(context_id)`` (which must then not be called for this
    context). Owners the pass does not reach have no gradient in the context
    and are not stepped (a step would leave their parameters alone).

    Raises:
        TypeError: an argument of the wrong type (raised by the call itself,
            torch's "incompatible function arguments").
        ValueError: invalid roots (empty, not scalar, not requiring grad).
        RuntimeError: unknown context id, or a pass already running in it.
        RemoteError: the pass failed on some worker (named in the error); the
            other workers' parts of the pass are stopped.

    A coroutine: forgetting to await it makes the context's exit raise (see
    :class:`context`).
    """
    _check_argument_types(context_id, roots, retain_graph)
    plan = None if optimizer is None else optimizer.step_in_backward_plan()
    coro = _backward(context_id, roots, retain_graph, plan)
    watch(context_id, "dist_autograd.backward(...)", coro)
    return coro


async def _backward(
    context_id: int,
    roots: Sequence[torch.Tensor] | torch.Tensor,
    retain_graph: bool,
    plan: list[int] | None,
) -> None:
    valid = _validate_roots(roots)
    await _service().backward(context_id, valid, retain_graph, plan)


def watch(context_id: int, what: str, coro: Coroutine[Any, Any, Any]) -> None:
    """Have the context ``context_id`` of this worker (if there is one) check on
    exit that ``coro`` (the call ``what``) was awaited."""
    try:
        ctx = _service().container.get(context_id)
    except Exception:
        return  # no agent: the coroutine raises when awaited
    if ctx is not None:
        ctx.watch(what, coro)


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
