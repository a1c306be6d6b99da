"""``DistributedOptimizer``: one local optimizer per parameter owner.

``from aiorpc_autograd.optim import DistributedOptimizer``
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeGuard

import torch
from torch.optim import optimizer as torch_optimizer
from torch.optim.sgd import sgd

from .api import current_agent, remote, rpc_async
from .autograd import DistAutogradContext, grad_keys, hold_grads, take
from .dist_autograd import _service, retrieve_context, watch
from .options import WorkerInfo
from .rref import RRef

__all__ = ["DistributedOptimizer"]


class _LocalOptimizer:
    """Lives on a parameter owner: steps its parameters with a context's grads.

    Steps on one worker are serialised by one lock shared by every local
    optimizer there, as in PyTorch (several DistributedOptimizers may share
    parameters, and a step sets their ``.grad``); a step also holds its
    parameters' ``.grad`` slots against backward jobs borrowing them
    (:func:`~aiorpc_autograd.autograd.hold_grads`).
    """

    lock = threading.Lock()

    def __init__(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        params: Sequence[torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.params = list(params)
        self.optim = optimizer_class(self.params, *args, **kwargs)
        self._grad_keys = grad_keys(self.params)

    def step(self, context_id: int) -> None:
        """Step with the context's gradients. ``.grad`` is as it was afterwards
        (as with PyTorch's functional local optimizers): a plain SGD is given
        the gradients directly, any other optimizer has them lent to its
        parameters' ``.grad`` for the step only."""
        ctx = retrieve_context(context_id)
        take(self.lock)  # (on the loop: raises WouldBlock rather than wait)
        try:
            if _steps_with_gradients_given(self.optim):
                _sgd_step(self.optim, ctx)
                return
            with hold_grads(self.params, self._grad_keys):
                saved = [p.grad for p in self.params]
                try:
                    # Parameters without a gradient in this context get none, so
                    # the optimizer leaves them alone (a stale .grad must not be
                    # reapplied).
                    for p, grad in zip(self.params, ctx.gradients_of(self.params), strict=True):
                        p.grad = grad
                    self.optim.step()
                finally:
                    for p, grad in zip(self.params, saved, strict=True):
                        p.grad = grad
        finally:
            self.lock.release()


def _steps_with_gradients_given(optim: torch.optim.Optimizer) -> TypeGuard[torch.optim.SGD]:
    """Whether ``optim`` is a plain ``torch.optim.SGD`` that :func:`_sgd_step`
    steps exactly as its own ``step`` would: no subclass, no step hooks (they
    may read or change ``.grad``), nothing differentiable or fused."""
    return (
        type(optim) is torch.optim.SGD
        and not optim._optimizer_step_pre_hooks
        and not optim._optimizer_step_post_hooks
        and not getattr(torch_optimizer, "_global_optimizer_pre_hooks", True)
        and not getattr(torch_optimizer, "_global_optimizer_post_hooks", True)
        and not any(g["differentiable"] or g["fused"] for g in optim.param_groups)
    )


# From how many parameters a group's SGD step is cheaper in foreach form
# (64x64 CPU tensors, single vs foreach, µs: 8 -> 14.0 / 14.5, 16 -> 25.3 /
# 21.0; with momentum, 4 -> 23.1 / 23.2, 8 -> 42.4 / 35.2).
_FOREACH_FROM = 8


def _sgd_step(optim: torch.optim.SGD, ctx: DistAutogradContext) -> None:
    """``optim.step()`` with each parameter's gradient taken from ``ctx``
    rather than its ``.grad`` (what ``SGD.step`` does, without lending the
    gradients to ``.grad`` and taking them back: ~1 µs a parameter).

    A group of at least ``_FOREACH_FROM`` parameters that leaves ``foreach``
    to torch (None) is stepped with the ``torch._foreach_*`` ops wherever
    they compute what the per-tensor loop does (CPU tensors default to that
    loop): the same kernels, tensor by tensor, in C++ rather than Python
    (128 small parameters: 140 against 205 µs; with momentum, 459 against
    717). Below that the loop is cheaper (foreach groups its tensors first:
    one 512x512 weight, 47 against 38 µs). Not with Nesterov momentum, whose
    foreach form adds the buffers into the gradients in place: the context's
    gradients must stay what the backward pass computed."""
    grad_scale = getattr(optim, "grad_scale", None)
    found_inf = getattr(optim, "found_inf", None)
    scaled = grad_scale is not None or found_inf is not None  # (fused only)
    with torch.no_grad():
        for group in optim.param_groups:
            params, grads = [], []
            for p, g in zip(group["params"], ctx.gradients_of(group["params"]), strict=True):
                if g is not None:
                    params.append(p)
                    grads.append(g)
            momentum = group["momentum"] != 0
            state = optim.state
            buffers = [state[p].get("momentum_buffer") for p in params] if momentum else []
            sparse = any(g.is_sparse for g in grads)
            foreach = group["foreach"]
            if (
                foreach is None
                and len(params) >= _FOREACH_FROM
                and not (group["nesterov"] or sparse or scaled)
            ):
                foreach = True
            sgd(
                params,
                grads,
                buffers,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                has_sparse_grad=sparse,
                foreach=foreach,
                fused=group["fused"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
            if momentum:
                for p, buffer in zip(params, buffers, strict=True):
                    state[p]["momentum_buffer"] = buffer


async def _new_local_optimizer(
    optimizer_id: int,
    optimizer_class: type[torch.optim.Optimizer],
    params: Sequence[RRef[torch.Tensor]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _LocalOptimizer:
    """Runs on the owner; waits for parameters still being created. Registers
    the result (or the error) for passes that step it in backward."""
    service = _service()
    try:
        values = [await p.to_here() for p in params]  # on the owner: the tensors themselves
        local = _LocalOptimizer(optimizer_class, values, args, kwargs)
    except Exception as exc:
        service.register_local_optimizer(optimizer_id, exc)
        raise
    service.register_local_optimizer(optimizer_id, local.step)
    return local


async def _step(local: RRef[_LocalOptimizer], context_id: int) -> None:
    """Runs on the owner; waits for the local optimizer if still being built."""
    optimizer = await local.to_here()
    await _service().run_job(("optimizer", id(optimizer)), lambda: optimizer.step(context_id))


async def _created(local: RRef[_LocalOptimizer]) -> None:
    """Runs on the owner: returns once the local optimizer exists, or raises
    the error its construction raised."""
    await local.to_here()


class DistributedOptimizer:
    """Steps parameters spread over workers with their gradients in a context.

    Returns at once: the per-owner optimizers are created in the background
    (``rpc.remote``), at the latest before the first step completes.

    Args:
        optimizer_class: a ``torch.optim.Optimizer`` subclass.
        params_rref: RRefs to the parameters (on any workers).
        *args: passed on to each ``optimizer_class(local_params, *args, **kwargs)``.
        **kwargs: likewise.
    """

    def __init__(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        params_rref: Iterable[RRef[torch.Tensor]],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        by_owner: dict[WorkerInfo, list[RRef[torch.Tensor]]] = {}
        for p in params_rref:
            by_owner.setdefault(p.owner(), []).append(p)
        current_agent()  # raises if RPC is not initialised
        # Group-unique: names this optimizer's local optimizers on their owners.
        self._id = _service().container.new_message_id()
        self._optimizers: dict[WorkerInfo, RRef[_LocalOptimizer]] = {
            owner: remote(
                owner, _new_local_optimizer, (self._id, optimizer_class, params, args, kwargs)
            )
            for owner, params in by_owner.items()
        }

    async def wait_created(self) -> None:
        """Return once every owner's local optimizer exists (the synchronous
        facade's constructor waits for this, as torch's does).

        Raises:
            RemoteError: an owner's ``optimizer_class(...)`` raised.
        """
        waits = [rpc_async(w, _created, (opt,)) for w, opt in self._optimizers.items()]
        results = await asyncio.gather(*waits, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def step_in_backward_plan(self) -> list[int]:
        """What a pass stepping this optimizer in backward carries: its id,
        then its owners' worker ids (see ``dist_autograd.backward``)."""
        return [self._id, *(owner.id for owner in self._optimizers)]

    def step(self, context_id: int) -> Coroutine[Any, Any, None]:
        """Step every owner's optimizer with that context's gradients,
        concurrently; steps on one owner are serialised.

        A coroutine: forgetting to await it makes the context's exit raise
        (see :class:`~aiorpc_autograd.dist_autograd.context`).

        Raises:
            RuntimeError: no backward pass finished in that context on this
                worker (a forgotten ``await`` on ``dist_autograd.backward``?).
            RemoteError: an owner failed (raised after all owners finished).
        """
        coro = self._step(context_id)
        watch(context_id, "DistributedOptimizer.step(...)", coro)
        return coro

    async def _step(self, context_id: int) -> None:
        ctx = _service().container.get(context_id)
        # Stepping with no gradients is always a mistake (PyTorch silently
        # steps nothing); an unknown context is reported by the owners.
        if ctx is not None and not ctx.has_finished_pass():
            raise RuntimeError(
                f"no backward pass has finished in autograd context {context_id} on this "
                "worker: 'await dist_autograd.backward(...)' before stepping (missing 'await'?)"
            )
        if ctx is not None and self._id in ctx.stepped_optimizers:
            raise RuntimeError(
                f"this optimizer already stepped in the backward pass of autograd context "
                f"{context_id} (dist_autograd.backward(..., optimizer=opt)): a second step "
                "would apply the same gradients again"
            )
        steps = [rpc_async(w, _step, (opt, context_id)) for w, opt in self._optimizers.items()]
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
