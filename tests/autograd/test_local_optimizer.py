"""The owner's side of ``DistributedOptimizer`` (``_LocalOptimizer``) in one
process: a plain ``torch.optim.SGD`` is stepped with the context's gradients
given directly (no ``.grad`` lend); it must match ``SGD.step`` bit for bit,
and anything that could observe ``.grad`` (a subclass, a step hook) must get
the lend as before."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import aiorpc_autograd.optim as optim_module
from aiorpc_autograd.autograd import DistAutogradContext
from aiorpc_autograd.optim import _LocalOptimizer

pytestmark = pytest.mark.timeout(60)

SGD_CONFIGS: list[dict[str, Any]] = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True},
    {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "maximize": True},
    {"lr": 0.1, "momentum": 0.9, "foreach": True},
    {"lr": torch.tensor(0.1), "momentum": 0.9},
]


@pytest.fixture
def contexts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, DistAutogradContext]]:
    """Context id -> context, as ``retrieve_context`` finds them here."""
    known: dict[int, DistAutogradContext] = {}
    monkeypatch.setattr(optim_module, "retrieve_context", known.__getitem__)
    yield known


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (2, 2)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def _run(
    contexts: dict[int, DistAutogradContext],
    optimizer_class: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    steps: int = 4,
) -> tuple[_LocalOptimizer, list[torch.Tensor], torch.optim.Optimizer, list[torch.Tensor]]:
    """Step a local optimizer with context gradients and a reference optimizer
    with the same gradients in ``.grad``; the last parameter has no gradient
    every other step. Each parameter of the local optimizer has a stale
    ``.grad`` that must be neither used nor changed."""
    params, ref_params = _params(0), _params(0)
    stale = [torch.full_like(p, 1e6) for p in params]
    for p, s in zip(params, stale, strict=True):
        p.grad = s
    local = _LocalOptimizer(optimizer_class, params, (), kwargs)
    ref = optimizer_class(ref_params, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        ctx = contexts[step] = DistAutogradContext(step)
        for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
            if i == len(params) - 1 and step % 2:
                q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen)
            ctx.set_gradient(p, g)
            q.grad = g.clone()
        local.step(step)
        ref.step()
    assert all(p.grad is s for p, s in zip(params, stale, strict=True))
    return local, params, ref, ref_params


@pytest.mark.parametrize("kwargs", SGD_CONFIGS, ids=lambda kw: ",".join(kw))
def test_sgd_given_gradients_matches_its_own_step_exactly(
    contexts: dict[int, DistAutogradContext], kwargs: dict[str, Any]
) -> None:
    assert optim_module._steps_with_gradients_given(torch.optim.SGD(_params(0), **kwargs))
    local, params, ref, ref_params = _run(contexts, torch.optim.SGD, kwargs)
    _assert_stepped_alike(local, params, ref, ref_params)


def _assert_stepped_alike(
    local: _LocalOptimizer,
    params: list[torch.Tensor],
    ref: torch.optim.Optimizer,
    ref_params: list[torch.Tensor],
) -> None:
    """Parameters and momentum buffers equal the reference's bit for bit."""
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q)
        buf, ref_buf = (o.state[t].get("momentum_buffer") for o, t in ((local.optim, p), (ref, q)))
        assert (buf is None) == (ref_buf is None)
        if buf is not None:
            assert torch.equal(buf, ref_buf)


@pytest.mark.parametrize("many", [False, True], ids=["few-params", "many-params"])
@pytest.mark.parametrize("kwargs", SGD_CONFIGS, ids=lambda kw: ",".join(kw))
def test_sgd_left_to_torch_runs_the_foreach_ops_where_they_compute_the_same(
    contexts: dict[int, DistAutogradContext],
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any],
    many: bool,
) -> None:
    """CPU parameters default to SGD's per-tensor loop; the local optimizer
    runs the ``torch._foreach_*`` form instead for a group of many
    parameters, where it is the same arithmetic (the same kernels, tensor by
    tensor): parameters and momentum buffers equal ``SGD.step``'s bit for
    bit, at sizes the kernels vectorise, and the context's gradients are left
    as they were (Nesterov's foreach form would add into them: that group
    keeps the loop, as does a group of few parameters)."""
    from torch.optim import sgd as sgd_module

    forms: list[str] = []
    for name in ("_single_tensor_sgd", "_multi_tensor_sgd"):
        original = getattr(sgd_module, name)

        def spy(*args: Any, _f: Any = original, _name: str = name, **kw: Any) -> Any:
            forms.append(_name)
            return _f(*args, **kw)

        monkeypatch.setattr(sgd_module, name, spy)
    gen = torch.Generator().manual_seed(3)
    shapes = [(257, 129), (1031,), (64, 64), (3,)]
    if many:
        shapes *= 2
    assert (len(shapes) >= optim_module._FOREACH_FROM) == many
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    local = _LocalOptimizer(torch.optim.SGD, params, (), kwargs)
    ref = torch.optim.SGD(ref_params, **kwargs)
    for step in range(3):
        ctx = contexts[step] = DistAutogradContext(step)
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(params, ref_params, grads, strict=True):
            ctx.set_gradient(p, g)
            q.grad = g.clone()
        local.step(step)
        ref.step()
        assert all(torch.equal(ctx.gradient(p), g) for p, g in zip(params, grads, strict=True))
        _assert_stepped_alike(local, params, ref, ref_params)
    foreach = kwargs.get("foreach") or (many and not kwargs.get("nesterov", False))
    # The reference's own steps run the loop (CPU's default) unless told foreach.
    expected = "_multi_tensor_sgd" if foreach else "_single_tensor_sgd"
    reference = "_multi_tensor_sgd" if kwargs.get("foreach") else "_single_tensor_sgd"
    assert forms == [expected, reference] * 3


def _doubling_hook(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """A step pre-hook that changes ``.grad`` (as gradient clipping would)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = p.grad * 2


class _HalfStepSGD(torch.optim.SGD):
    """A subclass whose step reads ``.grad`` itself."""

    @torch.no_grad()  # type: ignore[untyped-decorator, unused-ignore]
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.5 * group["lr"])


def test_a_global_step_hook_sees_the_gradients_in_dot_grad(
    contexts: dict[int, DistAutogradContext],
) -> None:
    handle = register_optimizer_step_pre_hook(_doubling_hook)
    try:
        assert not optim_module._steps_with_gradients_given(torch.optim.SGD(_params(0), lr=0.1))
        _, params, _, ref_params = _run(contexts, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    finally:
        handle.remove()
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q)
    assert optim_module._steps_with_gradients_given(torch.optim.SGD(_params(0), lr=0.1))


def test_a_subclass_and_other_optimizers_get_the_gradients_in_dot_grad(
    contexts: dict[int, DistAutogradContext],
) -> None:
    for optimizer_class, kwargs in [
        (_HalfStepSGD, {"lr": 0.1}),
        (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.01}),
    ]:
        assert not optim_module._steps_with_gradients_given(optimizer_class(_params(0), **kwargs))
        _, params, _, ref_params = _run(contexts, optimizer_class, kwargs)
        moved = [not torch.equal(p, q0) for p, q0 in zip(params, _params(0), strict=True)]
        assert all(moved)
        for p, q in zip(params, ref_params, strict=True):
            assert torch.equal(p, q), optimizer_class
    differentiable = torch.optim.SGD(_params(0), lr=0.1, differentiable=True)
    assert not optim_module._steps_with_gradients_given(differentiable)


def test_an_unknown_context_raises_and_steps_nothing(
    contexts: dict[int, DistAutogradContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    def retrieve(context_id: int) -> DistAutogradContext:
        raise RuntimeError(f"Could not find autograd context with id: {context_id}")

    monkeypatch.setattr(optim_module, "retrieve_context", retrieve)
    params = _params(0)
    local = _LocalOptimizer(torch.optim.SGD, params, (), {"lr": 0.1})
    with pytest.raises(RuntimeError, match="autograd context with id: 7"):
        local.step(7)
    assert all(torch.equal(p, q) for p, q in zip(params, _params(0), strict=True))
    assert not _LocalOptimizer.lock.locked()
