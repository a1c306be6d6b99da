"""The backward-pass state machine on hand-built graphs (pure, in-process).

A :class:`Sim` plays a group of workers in one process: each "worker" has its
own :class:`DistAutogradContext`; ``sim.send(src, dst, tensors)`` records a
send function on ``src`` and a recv function on ``dst`` under one message id
and returns ``dst``'s copies (fresh leaves), as the agent does for a wrapped
message. ``sim.backward`` runs one :class:`BackwardPass` per worker with fake
:class:`PassIO` objects: ``compute`` runs the job synchronously (or, with
``deferred=True``, queues it for the test to run), ``propagate`` records the
call and queues the gradients for the peer's pass, ``finished`` records the
outcome. The oracle is local ``torch.autograd`` on the same computation with
every send replaced by the identity.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from aiorpc_autograd.autograd import (
    BackwardPass,
    DistAutogradContext,
    RecvFunction,
    SendFunction,
    run_local_backward,
)

pytestmark = pytest.mark.timeout(30)

Grads = list[torch.Tensor | None] | None


class FakeIO:
    """A PassIO that records everything; see the module docstring."""

    def __init__(self, worker: int, outbox: collections.deque[Any], deferred: bool = False):
        self.worker = worker
        self.outbox = outbox
        self.deferred = deferred
        self.propagated: list[tuple[int, int, Grads]] = []  # (message id, peer, grads)
        self.finished_with: list[BaseException | None] = []
        self.jobs: list[tuple[Callable[[], Any], Callable[[Any], None]]] = []

    def propagate(self, recv: RecvFunction, grads: Grads) -> None:
        self.propagated.append((recv.message_id, recv.peer, grads))
        self.outbox.append((recv.peer, recv.message_id, grads))

    def compute(
        self, job: Callable[[], Any], done: Callable[[Any], None], kind: Any = None
    ) -> None:
        if self.deferred:
            self.jobs.append((job, done))
        else:
            done(_call(job))

    def run_jobs(self) -> int:
        """Deferred mode: run the queued jobs (and any they queue); how many ran."""
        n = 0
        while self.jobs:
            job, done = self.jobs.pop(0)
            done(_call(job))
            n += 1
        return n

    def finished(self, error: BaseException | None) -> None:
        self.finished_with.append(error)


def _call(job: Callable[[], Any]) -> Any:
    try:
        return job()
    except Exception as exc:
        return exc


class Sim:
    """``n`` in-process workers sharing one context id; see the module docstring."""

    def __init__(self, n: int, context_id: int = (1 << 48) | 1) -> None:
        self.n = n
        self.ctx = [DistAutogradContext(context_id) for _ in range(n)]
        self._mids = itertools.count(1)
        self._pass_ids = itertools.count(1)
        self.outbox: collections.deque[Any] = collections.deque()
        self.ios: list[FakeIO] = []
        self.passes: list[BackwardPass] = []

    def send(self, src: int, dst: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        mid = next(self._mids)
        needs = [t for t in tensors if t.requires_grad]
        received = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
        if needs:
            self.ctx[src].add_send(SendFunction(mid, dst, needs))
            at = [i for i, r in enumerate(received) if r.requires_grad]
            recv, outputs = RecvFunction.record(mid, src, [received[i] for i in at])
            self.ctx[dst].add_recv(recv)
            for i, out in zip(at, outputs, strict=True):  # delivered, as the agent does
                received[i] = out
        else:
            self.ctx[src].add_known_worker(dst)
            self.ctx[dst].add_known_worker(src)
        return received

    def backward(
        self, root_worker: int, roots: Sequence[torch.Tensor], retain_graph: bool = False
    ) -> None:
        """Run one pass on every worker to the end (the fake network drained)."""
        pass_id = next(self._pass_ids)
        self.ios = [FakeIO(w, self.outbox) for w in range(self.n)]
        self.passes = [
            BackwardPass(
                self.ctx[w],
                pass_id,
                retain_graph,
                list(roots) if w == root_worker else None,
                self.ios[w],
            )
            for w in range(self.n)
        ]
        for p in self.passes:
            p.start()
        self.drain()

    def drain(self) -> None:
        while self.outbox:
            dst, mid, grads = self.outbox.popleft()
            self.passes[dst].on_gradients(mid, grads)

    def grad(self, worker: int, leaf: torch.Tensor) -> torch.Tensor | None:
        for t, g in self.ctx[worker].gradients().items():
            if t is leaf:
                return g
        return None


def _local_send(src: int, dst: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors)


def _leaf(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()


Send = Callable[[int, int, Sequence[torch.Tensor]], list[torch.Tensor]]


def _check_parity(
    build: Callable[[Send, list[list[torch.Tensor]]], list[torch.Tensor]],
    params: list[list[torch.Tensor]],
    n: int,
    root: int = 0,
) -> Sim:
    """Run ``build`` distributed (in a Sim) and locally; compare every worker's
    leaf gradients and check that every pass finished cleanly."""
    flat = [p for ps in params for p in ps]
    local_roots = build(_local_send, params)
    expected = torch.autograd.grad(local_roots, flat, allow_unused=True)

    sim = Sim(n)
    roots = build(sim.send, params)
    sim.backward(root, roots)
    for w, io in enumerate(sim.ios):
        assert io.finished_with == [None], f"worker {w}: {io.finished_with}"
        assert sim.passes[w].done
    # Every recv function answered exactly once.
    for w in range(n):
        answered = [mid for mid, _, _ in sim.ios[w].propagated]
        assert sorted(answered) == sorted(sim.ctx[w].recv_functions()), f"worker {w}"
    i = 0
    for w, ps in enumerate(params):
        for p in ps:
            got, want = sim.grad(w, p), expected[i]
            i += 1
            if want is None:
                assert got is None, f"worker {w} leaf {i - 1}: unexpected gradient"
            else:
                assert got is not None, f"worker {w} leaf {i - 1}: no gradient"
                assert got.dtype == want.dtype
                torch.testing.assert_close(got, want)
            assert p.grad is None  # .grad is never touched
    return sim


# ------------------------------------------------------------------ graphs


def graph_round_trip(send: Send, params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """A -> B -> A: A sends x*2, B multiplies by its w, A uses the result."""
    (x,), (w,) = params
    (r,) = send(0, 1, [x * 2])
    (back,) = send(1, 0, [(r * w).tanh()])
    return [(back * x).sum()]


def graph_three_workers(send: Send, params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """A -> B -> C -> A with matmul/stack/add, a leaf sent as-is, a tuple back
    of which one part is unused, and two roots."""
    (x, a), (w,), (v,) = params
    xb, ab = send(0, 1, [x, a])  # a leaf goes out unchanged
    hb = xb @ w + ab
    (hc,) = send(1, 2, [hb])
    u = torch.stack([hc * v, hc + v]).sum(0)
    unused = hc * 100.0
    ua, unused_a = send(2, 0, [u, unused])
    del unused_a
    loss1 = (ua * x).sum()
    loss2 = (ua**2).mean()
    return [loss1, loss2]


def graph_a_b_a_b(send: Send, params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Several round trips between two workers; B reuses an earlier received
    tensor after the second message (its leaf is reached by two sends)."""
    (x,), (w,) = params
    (xb,) = send(0, 1, [x])
    (ya,) = send(1, 0, [xb * w])
    (zb,) = send(0, 1, [ya.sin() + x])
    (out,) = send(1, 0, [zb * xb + w])
    return [out.sum()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_local_only_pass_accumulates_into_the_context(dtype: torch.dtype) -> None:
    x = _leaf(3, seed=0, dtype=dtype)
    sim = _check_parity(lambda send, ps: [(ps[0][0] ** 3).sum()], [[x]], n=1)
    assert sim.passes[0].batches == 1
    assert sim.ios[0].propagated == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_parity(dtype: torch.dtype) -> None:
    params = [[_leaf(4, seed=1, dtype=dtype)], [_leaf(4, seed=2, dtype=dtype)]]
    _check_parity(graph_round_trip, params, n=2)


def test_three_workers_parity_with_unused_part_of_a_tuple() -> None:
    params = [
        [_leaf(2, 3, seed=3), _leaf(2, 3, seed=4)],
        [_leaf(3, 3, seed=5)],
        [_leaf(2, 3, seed=6)],
    ]
    sim = _check_parity(graph_three_workers, params, n=3)
    # A's recv of (u, unused) answered with a gradient only for u.
    (grads,) = [g for mid, peer, g in sim.ios[0].propagated if peer == 2]
    assert grads is not None and grads[0] is not None and grads[1] is None


def test_repeated_round_trips_parity() -> None:
    params = [[_leaf(5, seed=7)], [_leaf(5, seed=8)]]
    _check_parity(graph_a_b_a_b, params, n=2)


def test_root_on_a_middle_worker() -> None:
    def build(send: Send, params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        (x,), (w,), (v,) = params
        (xb,) = send(0, 1, [x.exp()])
        (vb,) = send(2, 1, [v * 3])
        return [(xb * w * vb).sum()]

    params = [[_leaf(3, seed=9)], [_leaf(3, seed=10)], [_leaf(3, seed=11)]]
    _check_parity(build, params, n=3, root=1)


def test_leaf_used_by_root_and_by_a_send_accumulates_both() -> None:
    def build(send: Send, params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        (x,), (w,) = params
        (xb,) = send(0, 1, [x])
        (yb,) = send(1, 0, [xb * w])
        return [(yb + x * x).sum()]

    _check_parity(build, [[_leaf(3, seed=12)], [_leaf(3, seed=13)]], n=2)


# ------------------------------------------------------------- unused results


def test_unreachable_recv_is_answered_with_none_at_start() -> None:
    ctx = DistAutogradContext(1)
    unused = torch.ones(2, requires_grad=True)
    used = torch.ones(2, requires_grad=True)
    ctx.add_recv(RecvFunction.record(10, 0, [unused])[0])
    ctx.add_recv(RecvFunction.record(11, 0, [used])[0])
    out = used * 3
    ctx.add_send(SendFunction(20, 0, [out]))
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    assert io.propagated == [(10, 0, None)]
    assert not bp.done and io.finished_with == []
    bp.on_gradients(20, [torch.full((2,), 2.0)])
    assert [mid for mid, _, _ in io.propagated] == [10, 11]
    grads = io.propagated[1][2]
    assert grads is not None and grads[0] is not None
    torch.testing.assert_close(grads[0], torch.full((2,), 6.0))
    assert io.finished_with == [None] and bp.done


def test_a_worker_with_only_unused_recvs_finishes_at_start() -> None:
    ctx = DistAutogradContext(1)
    ctx.add_recv(RecvFunction.record(3, 0, [torch.ones(1, requires_grad=True)])[0])
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    assert io.propagated == [(3, 0, None)]
    assert io.finished_with == [None] and bp.batches == 0


def test_rpc_result_never_used_does_not_hang() -> None:
    """A calls B with x and never uses the result; the pass still ends
    everywhere (PyTorch's FAST mode waits forever here)."""

    def build(send: Send, params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        (x, y), (w,) = params
        (xb,) = send(0, 1, [x])
        (never_used,) = send(1, 0, [xb * w])
        del never_used
        return [(y * 2).sum()]

    params = [[_leaf(2, seed=14), _leaf(2, seed=15)], [_leaf(2, seed=16)]]
    sim = _check_parity(build, params, n=2)
    assert sim.grad(0, params[0][0]) is None and sim.grad(1, params[1][0]) is None
    assert sim.passes[1].batches == 0  # B had nothing to compute
    assert [g for _, _, g in sim.ios[1].propagated] == [None]


def test_send_resolved_without_gradients_computes_nothing() -> None:
    ctx = DistAutogradContext(1)
    r = torch.ones(2, requires_grad=True)
    ctx.add_recv(RecvFunction.record(1, 0, [r])[0])
    ctx.add_send(SendFunction(2, 0, [r.tanh()]))
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    assert io.propagated == []
    bp.on_gradients(2, None)
    assert bp.batches == 0
    assert io.propagated == [(1, 0, None)] and io.finished_with == [None]


def test_a_job_touches_only_the_leaves_its_gradients_reach() -> None:
    """A send of two tensors whose gradient comes back for one only: the job
    accumulates into the leaf that one reaches; the leaf only the other
    reaches gets no gradient in the context, and no leaf's .grad (None, a
    stale one, one a local backward outside the pass set) changes."""
    ctx = DistAutogradContext(1)
    a, b, local_p = _leaf(3, seed=30), _leaf(3, seed=31), _leaf(3, seed=32)
    stale = torch.full((3,), 5.0)
    b.grad = stale
    (local_p * 2).sum().backward()
    local_p_grad = local_p.grad
    ctx.add_send(SendFunction(1, 0, [a * 3, (b * local_p).tanh()]))
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    bp.on_gradients(1, [torch.ones(3), None])
    assert io.finished_with == [None] and bp.batches == 1
    grads = ctx.gradients()
    assert list(grads) == [a]
    torch.testing.assert_close(grads[a], torch.full((3,), 3.0))
    assert a.grad is None and b.grad is stale and local_p.grad is local_p_grad


# ------------------------------------------------------------ batching


def _shared_subgraph_worker() -> tuple[DistAutogradContext, torch.Tensor, torch.Tensor]:
    """Worker B: a received r and its own w feed h, sent on to A and to C."""
    ctx = DistAutogradContext(1)
    r = _leaf(3, seed=20)
    w = _leaf(3, seed=21)
    ctx.add_recv(RecvFunction.record(1, 0, [r])[0])
    h = (r * w).tanh()
    ctx.add_send(SendFunction(2, 0, [h * 2]))
    ctx.add_send(SendFunction(3, 2, [h + 1]))
    return ctx, r, w


def test_shared_subgraph_runs_once_after_both_sends_resolved() -> None:
    ctx, r, w = _shared_subgraph_worker()
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    assert bp.batches == 0 and io.propagated == []
    g1, g2 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.25, -1.0])
    bp.on_gradients(2, [g1])
    # r and w are also reached by the send to C: nothing runs yet.
    assert bp.batches == 0 and io.propagated == [] and not bp.done
    bp.on_gradients(3, [g2])
    assert bp.batches == 1
    assert io.finished_with == [None]

    # Oracle: the same subgraph locally.
    r2, w2 = r.detach().requires_grad_(), w.detach().requires_grad_()
    h2 = (r2 * w2).tanh()
    want_r, want_w = torch.autograd.grad([h2 * 2, h2 + 1], [r2, w2], [g1, g2])
    ((mid, peer, grads),) = io.propagated
    assert (mid, peer) == (1, 0)
    assert grads is not None and grads[0] is not None
    torch.testing.assert_close(grads[0], want_r)
    ((leaf, gw),) = ctx.gradients().items()
    assert leaf is w
    torch.testing.assert_close(gw, want_w)


def test_shared_subgraph_in_a_deferred_engine_still_one_batch() -> None:
    ctx, _, _ = _shared_subgraph_worker()
    io = FakeIO(1, collections.deque(), deferred=True)
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    bp.on_gradients(3, [torch.ones(3)])
    bp.on_gradients(2, [torch.ones(3)])
    assert bp.batches == 1 and len(io.jobs) == 1
    assert io.run_jobs() == 1
    assert bp.batches == 1 and io.finished_with == [None]
    assert [mid for mid, _, _ in io.propagated] == [1]


def test_independent_subgraphs_do_not_wait_for_each_other() -> None:
    ctx = DistAutogradContext(1)
    r1, r2 = _leaf(2, seed=22), _leaf(2, seed=23)
    ctx.add_recv(RecvFunction.record(1, 0, [r1])[0])
    ctx.add_recv(RecvFunction.record(2, 2, [r2])[0])
    ctx.add_send(SendFunction(3, 0, [r1 * 5]))
    ctx.add_send(SendFunction(4, 2, [r2 * 7]))
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    bp.on_gradients(4, [torch.ones(2)])
    # r2's recv answers at once: its only source resolved.
    assert bp.batches == 1 and [mid for mid, _, _ in io.propagated] == [2]
    assert not bp.done
    bp.on_gradients(3, [torch.ones(2)])
    assert bp.batches == 2 and [mid for mid, _, _ in io.propagated] == [2, 1]
    grads = {mid: g for mid, _, g in io.propagated}
    assert grads[1] is not None and grads[2] is not None
    torch.testing.assert_close(grads[1][0], torch.full((2,), 5.0))
    torch.testing.assert_close(grads[2][0], torch.full((2,), 7.0))
    assert io.finished_with == [None]


def _micro_batch_worker(n: int) -> tuple[DistAutogradContext, list[torch.Tensor], torch.Tensor]:
    """Worker B of ``n`` micro-batches: each call's received input r_i times
    B's one weight w, sent back (message i + 100 answers recv i)."""
    ctx = DistAutogradContext(1)
    w = _leaf(3, seed=30)
    rs = [_leaf(3, seed=31 + i) for i in range(n)]
    for i, r in enumerate(rs):
        ctx.add_recv(RecvFunction.record(i, 0, [r])[0])
        ctx.add_send(SendFunction(i + 100, 0, [(r * w).tanh()]))
    return ctx, rs, w


@pytest.mark.parametrize("deferred", [False, True], ids=["inline", "deferred"])
def test_micro_batches_sharing_a_weight_answer_each_call_as_it_resolves(deferred: bool) -> None:
    """Each call's input is reached by its own send alone, so its gradient
    can be completed (and its recv answered) as soon as that send resolves,
    while the shared weight is complete only with the last; gradients that
    arrive while a job runs go in the next job together."""
    n = 6
    ctx, rs, w = _micro_batch_worker(n)
    io = FakeIO(1, collections.deque(), deferred=deferred)
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    assert bp.batches == 0
    gen = torch.Generator().manual_seed(5)
    gs = [torch.randn(3, generator=gen) for _ in range(n)]
    order = [3, 0, 5, 1, 4, 2]
    for k, i in enumerate(order):
        bp.on_gradients(i + 100, [gs[i]])
        if not deferred:
            assert bp.batches == k + 1
            assert [mid for mid, _, _ in io.propagated] == order[: k + 1]
            assert bp.done == (k == n - 1)
    if deferred:
        # The first job took the first gradients; the rest waited for it and
        # go in one job, the last one (every source is in by then).
        assert bp.batches == 1 and io.run_jobs() == 2 and bp.batches == 2
        assert sorted(mid for mid, _, _ in io.propagated) == sorted(order)
    assert io.finished_with == [None]

    # Oracle: the same micro-batches locally.
    rs2 = [r.detach().requires_grad_() for r in rs]
    w2 = w.detach().requires_grad_()
    want = torch.autograd.grad([(r * w2).tanh() for r in rs2], [*rs2, w2], gs)
    got = {mid: grads for mid, _, grads in io.propagated}
    for i in range(n):
        assert got[i] is not None and got[i][0] is not None
        torch.testing.assert_close(got[i][0], want[i])
    ((leaf, gw),) = ctx.gradients().items()
    assert leaf is w
    torch.testing.assert_close(gw, want[n])


def test_a_shared_leaf_is_ready_only_when_its_last_source_resolves() -> None:
    """Three sends that reach only leaves they share two by two (w01, w12,
    w02): no job runs until some leaf has all its sources, then the pending
    sources run together."""
    ctx = DistAutogradContext(1)
    w01, w12, w02 = _leaf(2, seed=40), _leaf(2, seed=41), _leaf(2, seed=42)
    ctx.add_send(SendFunction(10, 0, [w01 * w02]))
    ctx.add_send(SendFunction(11, 0, [w01 * w12]))
    ctx.add_send(SendFunction(12, 0, [w12 * w02]))
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    bp.on_gradients(10, [torch.ones(2)])
    assert bp.batches == 0  # w01 waits for 11, w02 for 12
    bp.on_gradients(11, [torch.ones(2)])
    assert bp.batches == 1  # w01 complete: 10 and 11 run
    bp.on_gradients(12, [torch.ones(2)])
    assert bp.batches == 2 and io.finished_with == [None]
    grads = ctx.gradients()
    torch.testing.assert_close(grads[w01], (w02 + w12).detach())
    torch.testing.assert_close(grads[w12], (w01 + w02).detach())
    torch.testing.assert_close(grads[w02], (w01 + w12).detach())


# ------------------------------------------------------------ retain_graph


def test_retain_graph_twice_accumulates() -> None:
    params = [[_leaf(3, seed=30)], [_leaf(3, seed=31)]]
    sim = Sim(2)
    roots = graph_round_trip(sim.send, params)
    sim.backward(0, roots, retain_graph=True)
    first = [sim.grad(w, p) for w, (p,) in enumerate(params)]
    snapshot = [None if g is None else g.clone() for g in first]
    sim.backward(0, roots, retain_graph=True)
    assert all(io.finished_with == [None] for io in sim.ios)
    second = [sim.grad(w, p) for w, (p,) in enumerate(params)]
    for a, b, before in zip(first, second, snapshot, strict=True):
        assert a is not None and b is not None and before is not None
        torch.testing.assert_close(b, 2 * before)
        # As AccumulateGrad does (and torch's context): in place, no new buffer.
        assert b is a


def test_second_pass_over_a_freed_graph_reports_the_error() -> None:
    params = [[_leaf(3, seed=32)], [_leaf(3, seed=33)]]
    sim = Sim(2)
    roots = graph_round_trip(sim.send, params)
    sim.backward(0, roots, retain_graph=False)
    assert all(io.finished_with == [None] for io in sim.ios)
    sim.backward(0, roots, retain_graph=False)
    # Some worker's part of the graph was freed by the first pass (B's at
    # least): its error reaches its ``finished`` (the agent then fails the
    # pass everywhere) instead of being lost.
    errors = [e for io in sim.ios for e in io.finished_with if e is not None]
    assert errors
    for error in errors:
        assert isinstance(error, RuntimeError)
        assert "second time" in str(error)


# ------------------------------------------------------------ errors and abort


class Boom(torch.autograd.Function):
    """Identity forward; its backward raises."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom in backward")


def test_error_in_the_root_job_reaches_finished() -> None:
    ctx = DistAutogradContext(1)
    x = torch.ones(3, requires_grad=True)
    r = torch.ones(3, requires_grad=True)
    ctx.add_recv(RecvFunction.record(5, 1, [r])[0])
    loss = (Boom.apply(x) * r).sum()
    io = FakeIO(0, collections.deque())
    bp = BackwardPass(ctx, 1, False, [loss], io)
    bp.start()
    assert bp.done and len(io.finished_with) == 1
    error = io.finished_with[0]
    assert isinstance(error, ValueError) and "boom in backward" in str(error)
    assert bp.error is error
    assert io.propagated == []  # the failed batch answers nothing
    assert ctx.gradients() == {}


def test_error_in_a_send_job_reaches_finished() -> None:
    ctx = DistAutogradContext(1)
    r = torch.ones(3, requires_grad=True)
    ctx.add_recv(RecvFunction.record(1, 0, [r])[0])
    ctx.add_send(SendFunction(2, 0, [Boom.apply(r * 2)]))
    io = FakeIO(1, collections.deque(), deferred=True)
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    bp.on_gradients(2, [torch.ones(3)])
    assert not bp.done
    io.run_jobs()
    assert len(io.finished_with) == 1 and isinstance(io.finished_with[0], ValueError)
    assert io.propagated == []


def test_abort_before_gradients_arrive() -> None:
    ctx, _, _ = _shared_subgraph_worker()
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    bp.on_gradients(2, [torch.ones(3)])
    error = RuntimeError("stop")
    bp.abort(error)
    assert bp.done and bp.error is error and io.finished_with == [error]
    # Whatever comes later is ignored: nothing runs, nothing is sent.
    bp.on_gradients(3, [torch.ones(3)])
    bp.abort(RuntimeError("again"))
    assert bp.batches == 0 and io.propagated == [] and io.finished_with == [error]
    assert ctx.gradients() == {}


def test_abort_while_a_batch_runs() -> None:
    ctx, _, _ = _shared_subgraph_worker()
    io = FakeIO(1, collections.deque(), deferred=True)
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    bp.on_gradients(2, [torch.ones(3)])
    bp.on_gradients(3, [torch.ones(3)])
    assert len(io.jobs) == 1
    error = RuntimeError("stop")
    bp.abort(error)
    assert io.finished_with == [error]
    io.run_jobs()  # the batch completes after the abort: its results are dropped
    assert io.finished_with == [error]
    assert io.propagated == [] and ctx.gradients() == {}


# ---------------------------------------------------------- protocol errors


def _two_send_worker() -> tuple[DistAutogradContext, BackwardPass, FakeIO]:
    ctx = DistAutogradContext(1)
    r = torch.ones(2, requires_grad=True)
    ctx.add_recv(RecvFunction.record(1, 0, [r])[0])
    ctx.add_send(SendFunction(2, 0, [r * 2]))
    ctx.add_send(SendFunction(3, 2, [r * 3, r * 4]))
    io = FakeIO(1, collections.deque())
    bp = BackwardPass(ctx, 1, False, None, io)
    bp.start()
    return ctx, bp, io


def test_duplicate_gradients_for_one_message_raise() -> None:
    _, bp, io = _two_send_worker()
    bp.on_gradients(2, [torch.ones(2)])
    with pytest.raises(RuntimeError, match="twice"):
        bp.on_gradients(2, [torch.ones(2)])
    with pytest.raises(RuntimeError, match="twice"):
        bp.on_gradients(2, None)
    # The pass is unharmed and finishes normally.
    bp.on_gradients(3, [torch.ones(2), None])
    assert io.finished_with == [None]
    ((_, _, grads),) = io.propagated
    assert grads is not None and grads[0] is not None
    torch.testing.assert_close(grads[0], torch.full((2,), 5.0))


def test_gradients_for_an_unknown_message_raise() -> None:
    _, bp, _ = _two_send_worker()
    with pytest.raises(RuntimeError, match="99"):
        bp.on_gradients(99, [torch.ones(2)])
    with pytest.raises(RuntimeError, match="no send function"):
        bp.on_gradients(1, [torch.ones(2)])  # 1 is a recv here, not a send


def test_wrong_number_of_gradients_raise() -> None:
    _, bp, _ = _two_send_worker()
    with pytest.raises(RuntimeError, match="gradients"):
        bp.on_gradients(3, [torch.ones(2)])


# ------------------------------------------------------------------ hooks, AccumulateGrad


_KEEP_ALIVE: list[Any] = []


def _hooked(log: list[str], name: str, leaf: torch.Tensor) -> torch.Tensor:
    """Hang on ``leaf`` a tensor hook (doubles the gradient), an AccumulateGrad
    pre-hook, post-hook and a post-accumulate-grad hook, each logging under
    ``name``; the last one also logs what ``.grad`` holds when it runs."""
    leaf.register_hook(lambda g: (log.append(f"{name}:tensor"), g * 2)[1])
    acc = leaf.view_as(leaf).grad_fn.next_functions[0][0]
    # The leaf holds its AccumulateGrad weakly: keep it (with its hooks) alive.
    _KEEP_ALIVE.append(acc)
    acc.register_prehook(lambda gi: log.append(f"{name}:pre"))
    acc.register_hook(lambda gi, go: log.append(f"{name}:post"))
    leaf.register_post_accumulate_grad_hook(
        lambda p: log.append(f"{name}:acc={p.grad.sum().item():.4f}")
    )
    return leaf


def graph_there_and_back(send: Send, params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """A -> B -> A, each leaf used once: B's w scales A's x, A squares it."""
    (x,), (w,) = params
    (xb,) = send(0, 1, [x * 2])
    (back,) = send(1, 0, [(xb * w).tanh() + w])
    return [(back**2).sum()]


def test_hooks_and_accumulate_grad_run_as_in_local_autograd() -> None:
    """Tensor hooks, AccumulateGrad pre/post hooks and post-accumulate-grad hooks
    run once per leaf and pass, in local autograd's order, seeing what local
    autograd shows them; gradients (hooks applied) go to the context; the
    user's .grad is left as it was. (A leaf whose gradient arrives in several
    parts of a pass sees its hooks once per part, as in torch's engine.)"""
    local_log: list[str] = []
    x0, w0 = _leaf(3, seed=60), _leaf(3, seed=61)
    _hooked(local_log, "x", x0)
    _hooked(local_log, "w", w0)
    loss = graph_there_and_back(_local_send, [[x0], [w0]])
    torch.autograd.backward(loss)
    expected = [x0.grad, w0.grad]

    dist_log: list[str] = []
    x, w = _leaf(3, seed=60), _leaf(3, seed=61)
    _hooked(dist_log, "x", x)
    _hooked(dist_log, "w", w)
    stale = torch.full((3,), 100.0)
    x.grad = stale
    sim = Sim(2)
    sim.backward(0, graph_there_and_back(sim.send, [[x], [w]]))
    assert all(io.finished_with == [None] for io in sim.ios)
    assert x.grad is stale and w.grad is None  # .grad untouched
    for got, want in zip([sim.grad(0, x), sim.grad(1, w)], expected, strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want)
    assert sorted(dist_log) == sorted(local_log)
    # Order per leaf as in local autograd: tensor hook, pre, accumulate, post.
    for name in ("x", "w"):
        mine = [e for e in dist_log if e.startswith(name)]
        assert [e.split(":")[1].split("=")[0] for e in mine] == ["tensor", "pre", "acc", "post"]


def test_post_accumulate_grad_hook_sees_the_contexts_gradient_so_far() -> None:
    """Two passes in one context (retain_graph): the hook sees the running sum
    of that context, not the user's .grad."""
    log: list[str] = []
    x, w = _leaf(3, seed=62), _leaf(3, seed=63)
    w.register_post_accumulate_grad_hook(lambda p: log.append(f"{p.grad.sum().item():.4f}"))
    w.grad = torch.full((3,), 7.0)
    sim = Sim(2)
    roots = graph_round_trip(sim.send, [[x], [w]])
    sim.backward(0, roots, retain_graph=True)
    g1 = sim.grad(1, w)
    assert g1 is not None
    once = g1.sum().item()
    sim.backward(0, roots, retain_graph=True)
    assert log == [f"{once:.4f}", f"{2 * once:.4f}"]
    assert torch.equal(w.grad, torch.full((3,), 7.0))


class _SameGradTwice(torch.autograd.Function):
    """``a + b`` whose backward hands one gradient tensor to both inputs."""

    grad_ptr = 0

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _SameGradTwice.grad_ptr = grad.data_ptr()
        return grad, grad


class _Identity(torch.autograd.Function):
    grad_ptr = 0

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        return a.view_as(a)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _Identity.grad_ptr = grad.data_ptr()
        return grad


class _NonContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        ctx.size = a.size()
        return torch.tensor([1.0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.ones(1).expand(ctx.size)


def _local_pass(roots: list[torch.Tensor]) -> Sim:
    sim = Sim(1)
    sim.backward(0, roots)
    assert sim.ios[0].finished_with == [None]
    return sim


def test_no_grad_copy() -> None:
    """PyTorch's test_no_grad_copy (dist_autograd_test.py), with local
    autograd's stealing rules: one gradient handed to two leaves gives them two
    buffers (one may keep the computed one), a gradient nobody else holds is
    not copied, a non-contiguous one is."""
    a, b = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)

    sim = _local_pass([_NonContiguousGrad.apply(_SameGradTwice.apply(a, b))])
    ga, gb = sim.grad(0, a), sim.grad(0, b)
    assert ga is not None and gb is not None
    assert ga.data_ptr() != _SameGradTwice.grad_ptr and gb.data_ptr() != _SameGradTwice.grad_ptr
    assert ga.is_contiguous() and gb.is_contiguous()

    sim = _local_pass([_Identity.apply(a)[1][0]])
    ga = sim.grad(0, a)
    assert ga is not None and ga.data_ptr() == _Identity.grad_ptr  # stolen: no copy

    sim = _local_pass([_SameGradTwice.apply(a, b)[1][0]])
    ga, gb = sim.grad(0, a), sim.grad(0, b)
    assert ga is not None and gb is not None
    assert ga.data_ptr() != gb.data_ptr()
    ga.add_(1.0)
    assert not torch.equal(ga, gb)  # an in-place update of one leaves the other


def test_gradient_never_aliases_a_tensor_the_user_holds() -> None:
    """A gradient still referenced elsewhere (here: kept by the backward) is
    copied into the context, as AccumulateGrad copies it."""
    kept: list[torch.Tensor] = []

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            return t.view_as(t)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            out = grad * 3
            kept.append(out)
            return out

    a = torch.randn(4, requires_grad=True)
    sim = _local_pass([Keep.apply(a).sum()])
    ga = sim.grad(0, a)
    assert ga is not None and ga.data_ptr() != kept[0].data_ptr()
    torch.testing.assert_close(ga, kept[0])


def test_after_last_job_sees_the_final_gradients() -> None:
    """``after_last_job`` runs once, inside the last job of a worker's part,
    with that worker's gradients in the context already final."""
    x, w = _leaf(3, seed=70), _leaf(3, seed=71)
    sim = Sim(2)
    roots = graph_a_b_a_b(sim.send, [[x], [w]])
    seen: list[torch.Tensor | None] = []
    pass_id = 99
    sim.ios = [FakeIO(i, sim.outbox) for i in range(2)]
    sim.passes = [
        BackwardPass(sim.ctx[i], pass_id, False, list(roots) if i == 0 else None, sim.ios[i])
        for i in range(2)
    ]
    sim.passes[1].after_last_job = lambda: seen.append(sim.grad(1, w))
    for p in sim.passes:
        p.start()
    sim.drain()
    assert all(io.finished_with == [None] for io in sim.ios)
    final = sim.grad(1, w)
    assert len(seen) == 1 and seen[0] is final and sim.passes[1].ran_after_last_job


def test_local_backward_checks_gradient_shapes_through_the_engine() -> None:
    # run_local_backward skips torch.autograd.backward's Python shape check
    # (its first call imports sympy); the C++ engine's check still refuses a
    # gradient of the wrong shape, and casts one of another dtype.
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="invalid gradient at index 0"):
        run_local_backward([x * 2], [torch.ones(4)], [x], None, False)
    (grad,) = run_local_backward([x * 2], [torch.ones(3, dtype=torch.float64)], [x], None, False)
    assert grad is not None and grad.dtype == torch.float32 and grad.tolist() == [2.0] * 3
    assert x.grad is None
