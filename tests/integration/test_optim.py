"""``DistributedOptimizer`` and ``RemoteModule`` between real worker processes.

One group of five service workers serves the whole module: ``worker0``..
``worker2`` are trainers, ``worker3`` and ``worker4`` parameter servers
(``PS1``, ``PS2``). Parameters live in ``_PARAMS`` of a parameter server under
a per-test key; trainers get RRefs to them (``param_rrefs``). Every result is
compared with a local run of the same computation with the same
``torch.optim`` optimizer in the test process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.nn import RemoteModule
from aiorpc_autograd.optim import DistributedOptimizer
from tests.integration.common import await_outcome
from tests.integration.conftest import close_shared_group, shared_group
from tests.integration.harness import WorkerGroup

pytestmark = pytest.mark.timeout(90)

WORLD = 5
TRAINERS = (0, 1, 2)
PS1, PS2 = "worker3", "worker4"
PS1_RANK, PS2_RANK = 3, 4


# --------------------------------------------------------------------- the shared group


@pytest.fixture(scope="module")
def _holder() -> Iterator[dict[str, WorkerGroup]]:
    holder: dict[str, WorkerGroup] = {}
    yield holder
    close_shared_group(holder)


@pytest.fixture
def group(_holder: dict[str, WorkerGroup]) -> WorkerGroup:
    """Five service workers shared by this module's tests (restarted when an
    earlier test broke them)."""
    return shared_group(_holder, WORLD, lambda g: g.call_all(warm_up_optimizers, timeout=60))


async def warm_up_optimizers(rank: int, world_size: int) -> None:
    """Build each optimizer class once in every worker, so that the owners'
    local optimizers are built in a moment (torch.optim imports lazily on first
    use). Without this, a first step can overtake the construction: see
    test_first_step_waits_for_the_local_optimizers (an xfail for that bug)."""
    p = torch.zeros(1, requires_grad=True)
    for optimizer_class, kwargs in OPTIMIZERS.values():
        optimizer_class([p], **kwargs)
    PickySGD([p], lr=0.1, slow_on="", fail_on="")
    PausingSGD([p], lr=0.1)
    RecordingSGD([p], lr=0.1)


# --------------------------------------------------------------------- parameter servers

_PARAMS: dict[str, list[torch.Tensor]] = {}
_ARRIVED: dict[tuple[str, int], int] = {}
_ALL_HERE: dict[tuple[str, int], asyncio.Event] = {}


async def init_params(rank: int, world_size: int, key: str, values: list[torch.Tensor]) -> None:
    _PARAMS[key] = [v.clone().requires_grad_() for v in values]


async def drop_params(rank: int, world_size: int, key: str) -> None:
    _PARAMS.pop(key, None)
    for point in [p for p in _ARRIVED if p[0] == key]:
        del _ARRIVED[point], _ALL_HERE[point]


async def arrive(key: str, n: int, round_: int = 0) -> None:
    """On PS1: returns once ``n`` trainers called it for this round (so that
    they go on together)."""
    point = (key, round_)
    _ARRIVED[point] = _ARRIVED.get(point, 0) + 1
    event = _ALL_HERE.setdefault(point, asyncio.Event())
    if _ARRIVED[point] == n:
        event.set()
    await event.wait()


async def read_params(rank: int, world_size: int, key: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in _PARAMS[key]]


def param_rrefs(key: str) -> list[rpc.RRef[torch.Tensor]]:
    """On a parameter server: RRefs to its parameters under ``key``."""
    return [rpc.RRef(p) for p in _PARAMS[key]]


def set_stale_grads(key: str) -> None:
    """Leave a ``.grad`` on every parameter: a step must not apply it."""
    for p in _PARAMS[key]:
        p.grad = torch.full_like(p, 100.0)


def read_grads(key: str) -> list[torch.Tensor | None]:
    """On a parameter server: its parameters' ``.grad``."""
    return [None if p.grad is None else p.grad.clone() for p in _PARAMS[key]]


def setup_params(
    group: WorkerGroup, key: str, ps1: list[torch.Tensor], ps2: list[torch.Tensor]
) -> None:
    group.call(PS1_RANK, init_params, key, ps1)
    group.call(PS2_RANK, init_params, key, ps2)


def teardown_params(group: WorkerGroup, key: str) -> None:
    group.call(PS1_RANK, drop_params, key)
    group.call(PS2_RANK, drop_params, key)


def call_with_params(
    group: WorkerGroup,
    key: str,
    ps1: list[torch.Tensor],
    ps2: list[torch.Tensor],
    fn: Callable[..., Any],
    *args: Any,
) -> Any:
    """``fn(*args)`` on rank 0 with parameters ``key`` set up on the servers
    (dropped afterwards, also when it fails)."""
    setup_params(group, key, ps1, ps2)
    try:
        return group.call(0, fn, *args)
    finally:
        teardown_params(group, key)


async def all_param_rrefs(key: str) -> tuple[list[rpc.RRef[torch.Tensor]], ...]:
    return tuple(
        await asyncio.gather(*(rpc.rpc_async(ps, param_rrefs, (key,)) for ps in (PS1, PS2)))
    )


# --------------------------------------------------------------------- trainers and PSs


def coeff(trainer: int, step: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The constant of ``loss = (w * c).sum()``: dyadic, so every update is exact
    in float32 whatever the order in which trainers apply them. The trainers'
    offsets (0.25, 0.75, 2) are such that no mix-up of whose gradient was
    applied adds up to the right total."""
    n = 1
    for s in shape:
        n *= s
    base = ((torch.arange(n) % 5) - 2).reshape(shape).float() * 0.25
    return base + (0.25, 0.75, 2.0)[trainer] + step * 0.125 - index * 0.375


def ps_initial() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ps1 = [torch.arange(6.0).reshape(2, 3) * 0.5, torch.tensor([1.0, -2.0])]
    ps2 = [torch.tensor([[0.25, -0.75], [1.5, 2.0]]), torch.tensor([3.0, 4.0, 5.0])]  # last: unused
    return ps1, ps2


PAUSE_S = 0.05


class PausingSGD(torch.optim.SGD):
    """Plain SGD whose steps take a little longer: the trainers' concurrent
    steps on a parameter server then overlap every time, so steps that are not
    serialised show up as a wrong result rather than once in a while."""

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        time.sleep(PAUSE_S)
        return super().step(closure)


async def sgd_trainer(
    rank: int, world_size: int, key: str, steps: int, lr: float, fused: bool = False
) -> int:
    """Forward (through to_here and a proxy call), backward and step against
    the parameters of both parameter servers (``fused``: stepped in backward)."""
    ps1, ps2 = await all_param_rrefs(key)
    params = ps1 + ps2
    opt = DistributedOptimizer(PausingSGD, params, lr=lr)
    used = params[:-1]  # the last parameter (on PS2) never gets a gradient
    for step in range(steps):
        async with dist_autograd.context() as cid:
            terms = []
            for i, p in enumerate(used):
                if i == 1:
                    # A proxy call: w * c computed on the parameter server.
                    c = coeff(rank, step, i, (2,))
                    terms.append((await p.rpc_async().mul(c)).sum())
                else:
                    w = await p.to_here()
                    terms.append((w * coeff(rank, step, i, tuple(w.shape))).sum())
            loss = torch.stack(terms).sum()
            if fused:
                # The trainers go together: their passes (and steps) overlap.
                await rpc.rpc_async(PS1, arrive, (key, len(TRAINERS), step))
                await dist_autograd.backward(cid, [loss], optimizer=opt)
                continue
            await dist_autograd.backward(cid, [loss])
            # The trainers step together: their steps overlap on both servers.
            await rpc.rpc_async(PS1, arrive, (key, len(TRAINERS), step))
            await opt.step(cid)
    return steps


_NOT_SERIALISED = (
    "BUG: steps of different DistributedOptimizers on one owner run at once "
    "(_LocalOptimizer.lock is per instance), so one trainer's step can apply another "
    "trainer's gradients (both set param.grad before stepping); PyTorch's "
    "_LocalOptimizer.global_lock is shared by every local optimizer of a worker, and "
    "API.md says concurrent step calls on one owner are serialised"
)


@pytest.mark.parametrize("fused", [False, True], ids=["step", "step_in_backward"])
def test_trainers_and_parameter_servers_sgd_match_local(group: WorkerGroup, fused: bool) -> None:
    """Three trainers at once against two parameter servers, SGD with a loss
    whose gradient does not depend on the parameters: the final parameters
    equal a local run exactly, and the parameter without a gradient is left
    alone; stepped after the backward or in it."""
    key, steps, lr = f"ps-sgd-{fused}", 4, 0.25
    ps1, ps2 = ps_initial()
    setup_params(group, key, ps1, ps2)
    try:
        done = group.call_many(
            [(t, sgd_trainer, (key, steps, lr, fused)) for t in TRAINERS], timeout=60
        )
        assert done == [steps] * len(TRAINERS)
        got = group.call(PS1_RANK, read_params, key) + group.call(PS2_RANK, read_params, key)
    finally:
        teardown_params(group, key)

    # The local reference: the same updates, one trainer after another.
    local = [v.clone().requires_grad_() for v in ps1 + ps2]
    opt = torch.optim.SGD(local, lr=lr)
    for t in TRAINERS:
        for step in range(steps):
            opt.zero_grad()
            loss = sum(
                (w * coeff(t, step, i, tuple(w.shape))).sum() for i, w in enumerate(local[:-1])
            )
            loss.backward()
            opt.step()
    for g, w in zip(got, local, strict=True):
        assert torch.equal(g, w.detach()), (g, w)
    assert torch.equal(got[-1], ps2[-1])  # never had a gradient: left alone


# --------------------------------------------------------------------- stateful optimizers


def hidden(x: torch.Tensor, w: rpc.RRef[torch.Tensor]) -> torch.Tensor:
    """On PS1: the first layer, with the parameter where it lives."""
    return torch.tanh(x @ w.local_value())


def model_init() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(4, 8, generator=g) * 0.5
    w2 = torch.randn(8, 1, generator=g) * 0.5
    u = torch.randn(3, generator=g)
    b = torch.zeros(1)
    x = torch.randn(16, 4, generator=g)
    y = x.sum(1, keepdim=True).sin()
    return [w1, w2, u, b], x, y


def model_loss(
    h: torch.Tensor, w2: torch.Tensor, u: torch.Tensor | None, b: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    loss = ((h @ w2 + b - y) ** 2).mean()
    if u is not None:  # only on even steps: u has no gradient on the others
        loss = loss + 0.1 * (u * u).sum()
    return loss


OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.01}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
}


async def stateful_trainer(
    rank: int, world_size: int, key: str, name: str, steps: int, fused: bool = False
) -> tuple[list[torch.Tensor], list[float]]:
    """W1 on PS1 (used there), W2 and u on PS2 (fetched), b on this trainer
    (``fused``: stepped in backward; a later ``step`` then raises)."""
    optimizer_class, kwargs = OPTIMIZERS[name]
    (w1,), (w2, u) = await all_param_rrefs(key)
    (_, _, _, b0), x, y = model_init()
    b = b0.clone().requires_grad_()
    opt = DistributedOptimizer(optimizer_class, [w1, w2, u, rpc.RRef(b)], **kwargs)
    losses = []
    for step in range(steps):
        async with dist_autograd.context() as cid:
            h = await rpc.rpc_async(PS1, hidden, (x, w1))
            w2_value = await w2.to_here()
            u_value = await u.to_here() if step % 2 == 0 else None
            loss = model_loss(h, w2_value, u_value, b, y)
            if fused:
                await dist_autograd.backward(cid, [loss], optimizer=opt)
                again = await await_outcome(opt.step(cid))
                assert isinstance(again, RuntimeError) and "already stepped" in str(again)
            else:
                await dist_autograd.backward(cid, [loss])
                await opt.step(cid)
            losses.append(loss.item())
    final = [await w1.to_here(), await w2.to_here(), await u.to_here(), b]
    return [t.detach() for t in final], losses


@pytest.mark.parametrize(
    ("name", "fused"),
    [(name, False) for name in OPTIMIZERS] + [("adam", True), ("sgd_momentum", True)],
)
def test_stateful_optimizers_one_trainer_match_local(
    group: WorkerGroup, name: str, fused: bool
) -> None:
    """Three owners (two parameter servers and the trainer); with ``fused``,
    each steps in the backward pass."""
    key, steps = f"stateful-{name}-{fused}", 6
    (w1, w2, u, b), x, y = model_init()
    got, losses = call_with_params(
        group, key, [w1], [w2, u], stateful_trainer, key, name, steps, fused
    )

    optimizer_class, kwargs = OPTIMIZERS[name]
    local = [t.clone().requires_grad_() for t in (w1, w2, u, b)]
    opt = optimizer_class(local, **kwargs)
    local_losses = []
    for step in range(steps):
        opt.zero_grad()
        lw1, lw2, lu, lb = local
        loss = model_loss(torch.tanh(x @ lw1), lw2, lu if step % 2 == 0 else None, lb, y)
        loss.backward()
        opt.step()
        local_losses.append(loss.item())
    assert losses == pytest.approx(local_losses, rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0]
    for g, w in zip(got, local, strict=True):
        assert torch.allclose(g, w.detach(), rtol=1e-5, atol=1e-6), (g, w)
    # Every parameter moved (u only on the steps where it had a gradient).
    for g, w0 in zip(got, (w1, w2, u, b), strict=True):
        assert not torch.equal(g, w0)


# --------------------------------------------------------------------- sparse gradients


def bag(
    weight: torch.Tensor, inp: torch.Tensor, offsets: torch.Tensor, psw: torch.Tensor
) -> torch.Tensor:
    """An embedding bag whose weight gets a sparse gradient."""
    return torch.nn.functional.embedding_bag(
        inp, weight, offsets, mode="sum", sparse=True, per_sample_weights=psw
    )


def remote_bag(
    weight: rpc.RRef[torch.Tensor], inp: torch.Tensor, offsets: torch.Tensor, psw: torch.Tensor
) -> torch.Tensor:
    """On PS1: the lookup where the table lives."""
    return bag(weight.local_value(), inp, offsets, psw)


def bag_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s rows (some repeated within the batch), offsets,
    per-sample weights and targets."""
    g = torch.Generator().manual_seed(100 + step)
    inp = torch.randint(0, 12, (9,), generator=g)
    return inp, torch.tensor([0, 2, 5]), torch.rand(9, generator=g), torch.randn(3, 4, generator=g)


def sparse_grad_of(context_id: int, key: str) -> tuple[torch.layout, torch.Tensor]:
    """On PS1: the layout and (dense) value of its table's gradient in the context."""
    grad = dist_autograd.get_gradients(context_id)[_PARAMS[key][0]]
    return grad.layout, grad.to_dense()


SPARSE_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.5}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "sparse_adam": (torch.optim.SparseAdam, {"lr": 0.05}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
}


async def sparse_trainer(
    rank: int, world_size: int, key: str, name: str, steps: int, fused: bool
) -> dict[str, Any]:
    """Lookups in a table on PS1 whose gradients are sparse, the loss here."""
    optimizer_class, kwargs = SPARSE_OPTIMIZERS[name]
    (table,), _ = await all_param_rrefs(key)
    opt = DistributedOptimizer(optimizer_class, [table], **kwargs)
    grads = []
    for step in range(steps):
        inp, offsets, psw, target = bag_batch(step)
        async with dist_autograd.context() as cid:
            out = await rpc.rpc_async(PS1, remote_bag, (table, inp, offsets, psw))
            loss = ((out - target) ** 2).sum()
            if fused:
                await dist_autograd.backward(cid, [loss], optimizer=opt)
            else:
                await dist_autograd.backward(cid, [loss])
                grads.append(await rpc.rpc_async(PS1, sparse_grad_of, (cid, key)))
                await opt.step(cid)
    return {"table": (await table.to_here()).detach(), "grads": grads}


# (torch's Adagrad builds sparse tensors without saying whether to check them)
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
@pytest.mark.parametrize(
    ("name", "fused"),
    [(name, False) for name in SPARSE_OPTIMIZERS] + [("sgd", True), ("sparse_adam", True)],
)
def test_sparse_gradients_of_a_remote_embedding_step_like_local(
    group: WorkerGroup, name: str, fused: bool
) -> None:
    """``nn.EmbeddingBag(sparse=True)``'s pattern on a parameter server: the
    table's gradients travel and accumulate as sparse COO tensors, and the
    owner's optimizer (sparse-only ``SparseAdam`` included) steps it as a
    local run does."""
    key, steps = f"sparse-{name}-{fused}", 4
    table0 = torch.randn(12, 4, generator=torch.Generator().manual_seed(7))
    result = call_with_params(group, key, [table0], [], sparse_trainer, key, name, steps, fused)

    optimizer_class, kwargs = SPARSE_OPTIMIZERS[name]
    local = table0.clone().requires_grad_()
    opt = optimizer_class([local], **kwargs)
    local_grads = []
    for step in range(steps):
        inp, offsets, psw, target = bag_batch(step)
        opt.zero_grad()
        ((bag(local, inp, offsets, psw) - target) ** 2).sum().backward()
        assert local.grad is not None
        local_grads.append(local.grad.to_dense())
        opt.step()
    for (layout, grad), want in zip(result["grads"], [] if fused else local_grads, strict=True):
        assert layout == torch.sparse_coo
        torch.testing.assert_close(grad, want)
    torch.testing.assert_close(result["table"], local.detach())
    assert not torch.equal(result["table"], table0)


# --------------------------------------------------------------------- parameters without gradients


async def partial_trainer(rank: int, world_size: int, key: str) -> list[list[torch.Tensor]]:
    """Three steps, each giving gradients to some parameters only; PS2 takes no
    part in the forward of the first two at all."""
    (a, stale), (c,) = await all_param_rrefs(key)
    await rpc.rpc_async(PS1, set_stale_grads, (key,))
    opt = DistributedOptimizer(
        torch.optim.SGD, [a, stale, c], lr=0.5, momentum=0.9, weight_decay=0.1
    )
    snapshots = []
    for step in range(3):
        async with dist_autograd.context() as cid:
            used = c if step == 2 else a
            loss = ((await used.to_here()) * (1.0 if step == 2 else 2.0)).sum()
            await dist_autograd.backward(cid, [loss])
            await opt.step(cid)
        snapshots.append([await p.to_here() for p in (a, stale, c)])
    return snapshots


def test_parameters_without_gradient_are_left_alone(group: WorkerGroup) -> None:
    key = "partial"
    a0, stale0, c0 = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0]), torch.tensor([-1.0, 3.0])
    snapshots = call_with_params(group, key, [a0, stale0], [c0], partial_trainer, key)

    local = [t.clone().requires_grad_() for t in (a0, stale0, c0)]
    opt = torch.optim.SGD(local, lr=0.5, momentum=0.9, weight_decay=0.1)
    expected = []
    for step in range(3):
        opt.zero_grad()
        loss = local[2].sum() if step == 2 else (local[0] * 2.0).sum()
        loss.backward()
        opt.step()
        expected.append([t.detach().clone() for t in local])
    for got_step, want_step in zip(snapshots, expected, strict=True):
        for g, w in zip(got_step, want_step, strict=True):
            assert torch.allclose(g, w), (snapshots, expected)
    # Explicitly: the stale .grad was never applied, c stayed put while it had
    # no gradient, and a (with momentum) stayed put in the step without one.
    assert all(torch.equal(s[1], stale0) for s in snapshots)
    assert torch.equal(snapshots[0][2], c0) and torch.equal(snapshots[1][2], c0)
    assert torch.equal(snapshots[2][0], snapshots[1][0])
    assert not torch.equal(snapshots[2][2], c0)


async def grad_slot_trainer(rank: int, world_size: int, key: str) -> list[Any]:
    """A step with each mode, on parameters with a stale ``.grad`` (PS1) and
    without one (PS2); what their ``.grad`` holds after each."""
    (a, stale), (c,) = await all_param_rrefs(key)
    await rpc.rpc_async(PS1, set_stale_grads, (key,))
    opt = DistributedOptimizer(torch.optim.SGD, [a, stale, c], lr=0.5, momentum=0.9)
    seen: list[Any] = []
    for fused in (False, True):
        async with dist_autograd.context() as cid:
            loss = ((await a.to_here()) * 2.0).sum() + (await c.to_here()).sum()
            if fused:
                await dist_autograd.backward(cid, [loss], optimizer=opt)
            else:
                await dist_autograd.backward(cid, [loss])
                await opt.step(cid)
        seen.append(
            [await rpc.rpc_async(ps, read_grads, (key,)) for ps in (PS1, PS2)]
            + [[await p.to_here() for p in (a, stale, c)]]
        )
    return seen


def test_a_step_leaves_dot_grad_as_it_was(group: WorkerGroup) -> None:
    """The context's gradients are lent to ``.grad`` for the step only (as
    PyTorch's functional local optimizers never touch it): a stale ``.grad``
    stays, an absent one stays absent, in both modes; and the step used the
    context's gradients, not the stale ones."""
    key = "grad-slot"
    a0, stale0, c0 = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0]), torch.tensor([-1.0, 3.0])
    seen = call_with_params(group, key, [a0, stale0], [c0], grad_slot_trainer, key)
    hundred = torch.full((2,), 100.0)
    for ps1_grads, ps2_grads, _ in seen:
        assert all(g is not None and torch.equal(g, hundred) for g in ps1_grads), ps1_grads
        assert ps2_grads == [None]
    local = [t.clone().requires_grad_() for t in (a0, stale0, c0)]
    opt = torch.optim.SGD(local, lr=0.5, momentum=0.9)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        ((local[0] * 2.0).sum() + local[2].sum()).backward()
        opt.step()
        for g, w in zip(seen[step][2], local, strict=True):
            assert torch.allclose(g, w.detach()), (seen, local)


# --------------------------------------------------------------------- errors


class PickySGD(torch.optim.SGD):
    """SGD that is slow on one worker and refuses to step on another."""

    def __init__(self, params: Any, lr: float, slow_on: str, fail_on: str) -> None:
        super().__init__(params, lr=lr)
        self.slow_on = slow_on
        self.fail_on = fail_on

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        me = rpc.get_worker_info().name
        if me == self.slow_on:
            time.sleep(0.5)
        if me == self.fail_on:
            raise ValueError(f"step refused on {me}")
        return super().step(closure)


async def failing_step_trainer(rank: int, world_size: int, key: str) -> dict[str, Any]:
    (a,), (b,) = await all_param_rrefs(key)
    out: dict[str, Any] = {}
    opt = DistributedOptimizer(PickySGD, [a, b], lr=0.5, slow_on=PS1, fail_on=PS2)
    async with dist_autograd.context() as cid:
        loss = (await a.to_here()).sum() + (await b.to_here()).sum()
        await dist_autograd.backward(cid, [loss])
        started = time.monotonic()
        out["error"] = await await_outcome(opt.step(cid))
        out["elapsed"] = time.monotonic() - started
    # Read right after the error: the slow owner had finished its step.
    out["a"] = await a.to_here()
    out["b"] = await b.to_here()

    # The optimizer cannot even be built on the owners: the step raises.
    started = time.monotonic()
    bad = DistributedOptimizer(torch.optim.SGD, [a, b], lr=-1.0)  # returns at once
    out["ctor_returned_in"] = time.monotonic() - started
    async with dist_autograd.context() as cid:
        loss = (await a.to_here()).sum()
        await dist_autograd.backward(cid, [loss])
        out["ctor_error"] = await await_outcome(bad.step(cid))
    out["a_after_ctor_error"] = await a.to_here()
    return out


def test_error_on_one_owner_raises_at_the_caller_after_the_others(group: WorkerGroup) -> None:
    key = "failing"
    got = call_with_params(
        group, key, [torch.tensor([1.0, 2.0])], [torch.tensor([3.0])], failing_step_trainer, key
    )
    err = got["error"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, ValueError), err
    assert err.worker == PS2 and "step refused on worker4" in err.remote_message
    assert got["elapsed"] >= 0.45  # it waited for the slow owner
    assert torch.equal(got["a"], torch.tensor([0.5, 1.5]))  # stepped before the error came
    assert torch.equal(got["b"], torch.tensor([3.0]))  # the failing owner did not step
    assert got["ctor_returned_in"] < 0.5
    err = got["ctor_error"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, ValueError), err
    assert "learning rate" in err.remote_message
    assert torch.equal(got["a_after_ctor_error"], torch.tensor([0.5, 1.5]))


class SlowInitSGD(torch.optim.SGD):
    """SGD that takes a while to build."""

    def __init__(self, params: Any, lr: float) -> None:
        time.sleep(0.5)
        super().__init__(params, lr=lr)


async def step_right_away(rank: int, world_size: int, key: str) -> torch.Tensor:
    (p,), _ = await all_param_rrefs(key)
    opt = DistributedOptimizer(SlowInitSGD, [p], lr=0.5)
    async with dist_autograd.context() as cid:
        loss = (await p.to_here()).sum()
        await dist_autograd.backward(cid, [loss])
        await opt.step(cid)
    return await p.to_here()


def test_first_step_waits_for_the_local_optimizers(group: WorkerGroup) -> None:
    key = "slow-init"
    got = call_with_params(group, key, [torch.tensor([1.0, 2.0])], [], step_right_away, key)
    assert torch.equal(got, torch.tensor([0.5, 1.5]))


# --------------------------------------------------------------------- serialised steps

_ACTIVE_LOCK = threading.Lock()
_ACTIVE = {"now": 0, "max": 0, "steps": 0}


class RecordingSGD(torch.optim.SGD):
    """SGD whose steps take a while and record how many run at once here."""

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        with _ACTIVE_LOCK:
            _ACTIVE["now"] += 1
            _ACTIVE["max"] = max(_ACTIVE["max"], _ACTIVE["now"])
        try:
            time.sleep(0.1)
            return super().step(closure)
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE["now"] -= 1
                _ACTIVE["steps"] += 1


async def reset_active(rank: int, world_size: int) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE.update(now=0, max=0, steps=0)


async def read_active(rank: int, world_size: int) -> dict[str, int]:
    with _ACTIVE_LOCK:
        return dict(_ACTIVE)


async def concurrent_steps(rank: int, world_size: int, key: str, n: int, trainers: int = 1) -> int:
    """``n`` concurrent tasks, each with its own context, step one optimizer
    (started together with the other ``trainers``)."""
    (p,), _ = await all_param_rrefs(key)
    opt = DistributedOptimizer(RecordingSGD, [p], lr=0.5)
    await rpc.rpc_async(PS1, arrive, (key, trainers))

    async def one(i: int) -> None:
        async with dist_autograd.context() as cid:
            loss = ((await p.to_here()) * coeff(rank, i, 0, (3,))).sum()
            await dist_autograd.backward(cid, [loss])
            await opt.step(cid)

    await asyncio.gather(*(one(i) for i in range(n)))
    return n


def expected_after(p0: torch.Tensor, trainers: tuple[int, ...], n: int) -> torch.Tensor:
    total = sum(coeff(t, i, 0, (3,)) for t in trainers for i in range(n))
    return p0 - 0.5 * total


def test_concurrent_steps_of_one_optimizer_are_serialised(group: WorkerGroup) -> None:
    key, n, p0 = "serial-one", 4, torch.tensor([1.0, 2.0, 3.0])
    setup_params(group, key, [p0], [])
    group.call(PS1_RANK, reset_active)
    try:
        assert group.call(0, concurrent_steps, key, n) == n
        got = group.call(PS1_RANK, read_params, key)[0]
    finally:
        teardown_params(group, key)
    assert group.call(PS1_RANK, read_active) == {"now": 0, "max": 1, "steps": n}
    assert torch.equal(got, expected_after(p0, (0,), n))


def test_concurrent_steps_of_trainers_on_one_owner_are_serialised(group: WorkerGroup) -> None:
    key, n, p0 = "serial-many", 2, torch.tensor([1.0, 2.0, 3.0])
    setup_params(group, key, [p0], [])
    group.call(PS1_RANK, reset_active)
    try:
        done = group.call_many([(t, concurrent_steps, (key, n, len(TRAINERS))) for t in TRAINERS])
        assert done == [n] * len(TRAINERS)
        got = group.call(PS1_RANK, read_params, key)[0]
    finally:
        teardown_params(group, key)
    assert torch.equal(got, expected_after(p0, TRAINERS, n))
    assert group.call(PS1_RANK, read_active) == {"now": 0, "max": 1, "steps": n * 3}


# --------------------------------------------------------------------- RemoteModule


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6))


def make_head() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Linear(6, 1)


def mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 4, generator=g)
    return x, x.sum(1, keepdim=True).sin()


async def remote_module_trainer(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    """An MLP on PS1 (by "name/cpu"), a head on PS2 (by rank), trained with Adam."""
    body = RemoteModule(f"{PS1}/cpu", make_mlp)
    head = RemoteModule(PS2_RANK, make_head)
    body_params = await body.remote_parameters()
    head_params = await head.remote_parameters()
    out: dict[str, Any] = {
        "owners": [p.owner_name() for p in body_params + head_params],
        "shapes": [tuple((await p.to_here()).shape) for p in body_params + head_params],
    }
    opt = DistributedOptimizer(torch.optim.Adam, body_params + head_params, lr=0.05)
    x, y = mlp_data()
    losses = []
    for _ in range(steps):
        async with dist_autograd.context() as cid:
            loss = ((await head(await body(x))) - y).pow(2).mean()
            await dist_autograd.backward(cid, [loss])
            await opt.step(cid)
            losses.append(loss.item())
    out["losses"] = losses
    out["params"] = [await p.to_here() for p in body_params + head_params]
    out["forward"] = await head.forward(await body.forward(x))
    return out


def test_remote_module_trains_an_mlp_like_a_local_run(group: WorkerGroup) -> None:
    steps = 10
    got = group.call(0, remote_module_trainer, steps, timeout=60)
    body, head = make_mlp(), make_head()
    params = list(body.parameters()) + list(head.parameters())
    assert got["owners"] == [PS1] * 4 + [PS2] * 2
    assert got["shapes"] == [tuple(p.shape) for p in params]
    opt = torch.optim.Adam(params, lr=0.05)
    x, y = mlp_data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (head(body(x)) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert got["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0] / 2
    for g, w in zip(got["params"], params, strict=True):
        assert torch.allclose(g, w.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(got["forward"], head(body(x)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- DDP + RPC

DDP_STEPS = 3
DDP_LR = 0.1
_EMBEDDINGS: dict[str, torch.nn.Embedding] = {}


def make_embedding() -> torch.nn.Embedding:
    torch.manual_seed(1)
    return torch.nn.Embedding(10, 4)


def make_dense() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def ddp_rows(trainer: int, step: int) -> torch.Tensor:
    """The embedding rows a trainer looks up: disjoint between the trainers,
    so their updates of the embedding commute exactly."""
    return torch.tensor([5 * trainer + (step + k) % 5 for k in range(3)])


def ddp_loss(out: torch.Tensor, trainer: int) -> torch.Tensor:
    return (out * (torch.arange(9.0).reshape(3, 3) - 4 + trainer)).pow(2).sum() / 8


async def create_embedding(rank: int, world_size: int, key: str) -> None:
    _EMBEDDINGS[key] = make_embedding()


async def drop_embedding(rank: int, world_size: int, key: str) -> None:
    _EMBEDDINGS.pop(key, None)


def embedding_of(key: str) -> torch.nn.Embedding:
    """On PS1: the shared embedding (an ``rpc.remote`` of this is an RRef to it)."""
    return _EMBEDDINGS[key]


def embedding_param_rrefs(key: str) -> list[rpc.RRef[torch.Tensor]]:
    return [rpc.RRef(p) for p in _EMBEDDINGS[key].parameters()]


async def read_embedding(rank: int, world_size: int, key: str) -> torch.Tensor:
    return _EMBEDDINGS[key].weight.detach().clone()


async def ddp_trainer(rank: int, world_size: int, key: str, store: str) -> dict[str, Any]:
    """One of two DDP replicas (gloo, file store) of a dense layer fed by an
    embedding held in an RRef on PS1, trained with dist autograd and a
    DistributedOptimizer over the embedding and the replica's parameters."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    await asyncio.to_thread(
        dist.init_process_group, "gloo", init_method=f"file://{store}", rank=rank, world_size=2
    )
    try:
        ddp = await asyncio.to_thread(DistributedDataParallel, make_dense())
        emb = rpc.remote(PS1, embedding_of, (key,))
        params = await rpc.rpc_async(PS1, embedding_param_rrefs, (key,))
        params += [rpc.RRef(p) for p in ddp.parameters()]
        opt = DistributedOptimizer(torch.optim.SGD, params, lr=DDP_LR)
        weight_grads = []
        grad_untouched = True
        for step in range(DDP_STEPS):
            async with dist_autograd.context() as cid:
                rows = await emb.rpc_async().forward(ddp_rows(rank, step))
                loss = ddp_loss(ddp(rows), rank)
                before = [p.grad for p in ddp.parameters()]
                await dist_autograd.backward(cid, [loss])
                after = [p.grad for p in ddp.parameters()]
                grad_untouched &= all(a is b for a, b in zip(after, before, strict=True))
                grads = dist_autograd.get_gradients(cid)
                weight_grads.append(grads[ddp.module.weight].clone())
                await opt.step(cid)
            # Both replicas' embedding updates are in before either goes on.
            await asyncio.to_thread(dist.barrier)
        return {
            "params": [p.detach().clone() for p in ddp.parameters()],
            "weight_grads": weight_grads,
            "grad_untouched": grad_untouched,
        }
    finally:
        await asyncio.to_thread(dist.destroy_process_group)


def ddp_oracle() -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """What torch's DDP gives: each step, the dense gradient averaged over the
    two replicas (each divided by the world size, then summed, as DDP's
    allreduce does), the embedding stepped with each trainer's gradient."""
    dense, emb = make_dense(), make_embedding()
    weight_grads = []
    for step in range(DDP_STEPS):
        grads = [
            torch.autograd.grad(
                ddp_loss(dense(emb(ddp_rows(t, step))), t), [*dense.parameters(), emb.weight]
            )
            for t in (0, 1)
        ]
        with torch.no_grad():
            averaged = [a / 2 + b / 2 for a, b in zip(grads[0][:2], grads[1][:2], strict=True)]
            weight_grads.append(averaged[0])
            for p, g in zip(dense.parameters(), averaged, strict=True):
                p.add_(g, alpha=-DDP_LR)
            for t in (0, 1):
                emb.weight.add_(grads[t][2], alpha=-DDP_LR)
    return [p.detach() for p in dense.parameters()], emb.weight.detach(), weight_grads


def test_ddp_replicas_with_a_remote_embedding_average_as_in_torch(
    group: WorkerGroup, tmp_path: Any
) -> None:
    """DDP + RPC: two DDP replicas over gloo on trainers 0 and 1, an embedding
    in an RRef on PS1, trained with dist autograd and a DistributedOptimizer.
    The reducer's hooks run inside the distributed backward and average the
    dense gradients into each context: the replicas stay bit-identical, and
    equal what torch's DDP computes for the same seed and data."""
    key = "ddp"
    group.call(PS1_RANK, create_embedding, key)
    try:
        store = str(tmp_path / "gloo-store")
        got = group.call_many([(r, ddp_trainer, (key, store)) for r in (0, 1)], timeout=60)
        embedding = group.call(PS1_RANK, read_embedding, key)
    finally:
        group.call(PS1_RANK, drop_embedding, key)
    want_params, want_embedding, want_grads = ddp_oracle()
    for a, b in zip(got[0]["params"], got[1]["params"], strict=True):
        assert torch.equal(a, b)  # the replicas never diverge
    for a, b in zip(got[0]["weight_grads"], got[1]["weight_grads"], strict=True):
        assert torch.equal(a, b)  # averaged, in each trainer's context
    for g, w in zip(got[0]["weight_grads"], want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    for g, w in zip(got[0]["params"], want_params, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(embedding, want_embedding, rtol=1e-6, atol=1e-7)
    assert got[0]["grad_untouched"] and got[1]["grad_untouched"]


# --------------------------------------------------------------------- forgotten awaits


async def forgetful_trainer(rank: int, world_size: int, key: str) -> dict[str, Any]:
    import warnings

    (p,), _ = await all_param_rrefs(key)
    opt = DistributedOptimizer(torch.optim.SGD, [p], lr=0.5)
    out: dict[str, Any] = {}

    async def run(body: Callable[[int, torch.Tensor], Any]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                async with dist_autograd.context() as cid:
                    loss = (await p.to_here()).sum()
                    await body(cid, loss)
            except Exception as exc:
                seen["raised"] = exc
        seen["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
        seen["param"] = await p.to_here()
        return seen

    async def no_await_on_backward(cid: int, loss: torch.Tensor) -> None:
        dist_autograd.backward(cid, [loss])  # type: ignore[unused-coroutine]
        await opt.step(cid)

    async def no_await_on_step(cid: int, loss: torch.Tensor) -> None:
        await dist_autograd.backward(cid, [loss])
        opt.step(cid)  # type: ignore[unused-coroutine]

    async def no_await_at_all(cid: int, loss: torch.Tensor) -> None:
        dist_autograd.backward(cid, [loss])  # type: ignore[unused-coroutine]
        opt.step(cid)  # type: ignore[unused-coroutine]

    async def as_tasks(cid: int, loss: torch.Tensor) -> None:
        await asyncio.create_task(dist_autograd.backward(cid, [loss]))
        await asyncio.gather(opt.step(cid))

    out["backward"] = await run(no_await_on_backward)
    out["step"] = await run(no_await_on_step)
    out["both"] = await run(no_await_at_all)
    out["tasks"] = await run(as_tasks)
    return out


def test_a_forgotten_await_is_loud(group: WorkerGroup) -> None:
    """An un-awaited ``dist_autograd.backward``: ``step`` raises (no finished
    pass here), and the context's exit only warns about it (the body raised
    already). An un-awaited ``step``: the context's exit raises, naming it,
    and nothing was stepped. Started as tasks or gathered: no complaint."""
    key = "forgetful"
    got = call_with_params(group, key, [torch.tensor([1.0, 2.0])], [], forgetful_trainer, key)
    start = torch.tensor([1.0, 2.0])

    case = got["backward"]
    err = case["raised"]
    assert isinstance(err, RuntimeError) and "no backward pass has finished" in str(err), err
    warned = case["warnings"]
    assert any("dist_autograd.backward(...)" in w and "never awaited" in w for w in warned)
    assert torch.equal(case["param"], start)

    case = got["step"]
    err = case["raised"]
    assert isinstance(err, RuntimeError), err
    assert "DistributedOptimizer.step(...)" in str(err) and "never awaited" in str(err)
    assert "dist_autograd.backward" not in str(err)
    assert torch.equal(case["param"], start)  # the step never ran

    case = got["both"]
    err = case["raised"]
    assert isinstance(err, RuntimeError), err
    assert "dist_autograd.backward(...)" in str(err)
    assert "DistributedOptimizer.step(...)" in str(err)
    assert torch.equal(case["param"], start)
    # The closed coroutines do not add Python's own GC-time warning.
    assert not any("was never awaited" in w and "coroutine" in w for w in case["warnings"])

    case = got["tasks"]
    assert "raised" not in case and case["warnings"] == []
    assert torch.equal(case["param"], start - 0.5)


# --------------------------------------------------------------------- step in backward: errors


async def failing_fused_trainer(rank: int, world_size: int, key: str) -> dict[str, Any]:
    (a,), (b,) = await all_param_rrefs(key)
    opt = DistributedOptimizer(PickySGD, [a, b], lr=0.5, slow_on="", fail_on=PS2)
    async with dist_autograd.context() as cid:
        loss = (await a.to_here()).sum() + (await b.to_here()).sum()
        error = await await_outcome(dist_autograd.backward(cid, [loss], optimizer=opt))
    # A later pass without the optimizer works, and steps nothing.
    async with dist_autograd.context() as cid:
        loss = (await a.to_here()).sum()
        await dist_autograd.backward(cid, [loss])
    a_after = await a.to_here()
    return {"error": error, "a": a_after, "b": await b.to_here(), "ok": True}


def test_step_in_backward_error_fails_the_pass(group: WorkerGroup) -> None:
    """An owner's step raising inside the pass fails ``backward`` with that
    owner's error; the owner that refused did not step (the other may have,
    depending on whether the abort overtook its part of the pass)."""
    key = "fused-failing"
    got = call_with_params(
        group, key, [torch.tensor([1.0, 2.0])], [torch.tensor([3.0])], failing_fused_trainer, key
    )
    err = got["error"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, ValueError), err
    assert err.worker == PS2 and "step refused on worker4" in err.remote_message
    assert torch.equal(got["b"], torch.tensor([3.0]))
    assert any(torch.equal(got["a"], torch.tensor(v)) for v in ([1.0, 2.0], [0.5, 1.5]))
    assert got["ok"]
