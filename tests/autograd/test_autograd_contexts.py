"""Contexts, the context container and the send/recv records (pure, in-process)."""

from __future__ import annotations

import contextvars
import threading

import pytest
import torch

from aiorpc_autograd.autograd import (
    ContextContainer,
    DistAutogradContext,
    RecvFunction,
    SendFunction,
    current_context_id,
    reachable_leaves,
)

pytestmark = pytest.mark.timeout(30)

LOW = (1 << 48) - 1


@pytest.mark.parametrize("worker_id", [0, 1, 7, 0xFFFF])
def test_ids_carry_the_worker_id_in_the_high_16_bits(worker_id: int) -> None:
    container = ContextContainer(worker_id)
    contexts = [container.new_context().context_id() for _ in range(3)]
    messages = [container.new_message_id() for _ in range(3)]
    passes = [container.new_pass_id() for _ in range(3)]
    for ids in (contexts, messages, passes):
        assert [i >> 48 for i in ids] == [worker_id] * 3
        assert len(set(ids)) == 3
        lows = [i & LOW for i in ids]
        assert lows == sorted(lows) and all(n > 0 for n in lows)
        assert all(i < 1 << 64 for i in ids)


def test_ids_of_different_workers_never_collide() -> None:
    a, b = ContextContainer(1), ContextContainer(2)
    ids_a = {a.new_context().context_id() for _ in range(50)}
    ids_b = {b.new_context().context_id() for _ in range(50)}
    assert not ids_a & ids_b


@pytest.mark.parametrize("worker_id", [-1, 1 << 16, 1 << 20])
def test_worker_id_must_fit_in_16_bits(worker_id: int) -> None:
    with pytest.raises(ValueError):
        ContextContainer(worker_id)


def test_ids_are_unique_across_threads() -> None:
    container = ContextContainer(3)
    seen: list[int] = []
    lock = threading.Lock()

    def make() -> None:
        ids = [container.new_message_id() for _ in range(500)]
        with lock:
            seen.extend(ids)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == len(set(seen)) == 2000


def test_container_lookup_create_retrieve_release() -> None:
    container = ContextContainer(2)
    assert len(container) == 0
    mine = container.new_context()
    cid = mine.context_id()
    assert len(container) == 1
    assert container.get(cid) is mine
    assert container.retrieve(cid) is mine
    assert container.get_or_create(cid) is mine

    # A context started elsewhere (worker 5) is created on first use, once.
    foreign_id = (5 << 48) | 9
    assert container.get(foreign_id) is None
    foreign = container.get_or_create(foreign_id)
    assert foreign.context_id() == foreign_id
    assert container.get_or_create(foreign_id) is foreign
    assert len(container) == 2
    assert set(container.contexts()) == {mine, foreign}

    assert container.release(cid) is mine
    assert container.release(cid) is None
    assert container.get(cid) is None
    with pytest.raises(RuntimeError, match=str(cid)):
        container.retrieve(cid)
    assert len(container) == 1
    assert container.release(foreign_id) is foreign
    assert len(container) == 0


def test_send_and_recv_records_and_known_workers() -> None:
    ctx = DistAutogradContext(42)
    assert ctx.context_id() == 42
    assert ctx.send_functions() == {} and ctx.recv_functions() == {}
    assert ctx.known_worker_ids() == set()

    t = torch.ones(2, requires_grad=True)
    send = SendFunction(11, 1, [t])
    recv, _ = RecvFunction.record(12, 2, [torch.zeros(3, requires_grad=True)])
    ctx.add_send(send)
    ctx.add_recv(recv)
    ctx.add_known_worker(3)

    assert ctx.send_functions() == {11: send}
    assert ctx.recv_functions() == {12: recv}
    assert ctx.send_functions()[11].tensors[0] is t
    assert ctx.known_worker_ids() == {1, 2, 3}
    assert "11" in repr(send) and "12" in repr(recv)

    # The accessors return copies: callers cannot corrupt the records.
    ctx.send_functions().clear()
    ctx.recv_functions().clear()
    ctx.known_worker_ids().clear()
    assert len(ctx.send_functions()) == 1 and len(ctx.recv_functions()) == 1
    assert ctx.known_worker_ids() == {1, 2, 3}


def test_send_and_recv_functions_have_torchs_graph_shape() -> None:
    """torch's SendRpcBackward / RecvRpcBackward, as its tests walk them."""
    dense = torch.ones(2, requires_grad=True)
    sparse = torch.sparse_coo_tensor(
        [[0, 1]], [1.0, 2.0], (2,), check_invariants=True
    ).requires_grad_()
    recv, (r_dense, r_sparse) = RecvFunction.record(7, 1, [dense, sparse])
    assert recv.name() == "torch::distributed::autograd::RecvRpcBackward"
    assert (recv.message_id, recv.peer, recv.tensors) == (7, 1, [dense, sparse])
    # What a message delivers: computed by the recv node, not leaves, not views.
    assert r_dense.grad_fn is recv and r_sparse.grad_fn is recv
    assert (r_dense.output_nr, r_sparse.output_nr) == (0, 1)
    assert not r_dense.is_leaf and not r_dense._is_view()
    r_dense.mul_(3)  # in place works, as on any computed tensor

    leaf = torch.zeros(2, requires_grad=True)
    sparse_leaf = torch.sparse_coo_tensor(
        [[1]], [5.0], (2,), check_invariants=True
    ).requires_grad_()
    computed = leaf * 2
    send = SendFunction(8, 2, [leaf, sparse_leaf, computed, r_sparse])
    assert send.name() == "torch::distributed::autograd::SendRpcBackward"
    edges = send.next_functions
    assert [node.name() for node, _ in edges] == [
        "torch::autograd::AccumulateGrad",
        "torch::autograd::AccumulateGrad",
        "MulBackward0",
        "torch::distributed::autograd::RecvRpcBackward",
    ]
    assert edges[0][0].variable is leaf and edges[1][0].variable is sparse_leaf
    assert edges[2] == (computed.grad_fn, 0) and edges[3] == (recv, 1)

    # The recv node passes gradients through to its leaves; an output nothing
    # reaches gives its leaf no gradient (None, not zeros).
    r_dense.sum().backward()
    assert dense.grad is not None and dense.grad.tolist() == [3.0, 3.0]
    assert sparse.grad is None


def test_gradients_accumulate_per_leaf() -> None:
    ctx = DistAutogradContext(1)
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)  # equal values, a different leaf
    ctx.accumulate_grad(a, torch.tensor([1.0, 2.0]))
    ctx.accumulate_grad(a, torch.tensor([10.0, 20.0]))
    ctx.accumulate_grad(b, torch.tensor([5.0, 5.0]))
    grads = ctx.gradients()
    assert set(map(id, grads)) == {id(a), id(b)}
    assert torch.equal(grads[a], torch.tensor([11.0, 22.0]))
    assert torch.equal(grads[b], torch.tensor([5.0, 5.0]))
    assert a.grad is None and b.grad is None
    grads.clear()
    assert len(ctx.gradients()) == 2


def test_current_context_is_per_asyncio_context() -> None:
    assert current_context_id.get() is None

    def inside(value: int) -> int | None:
        current_context_id.set(value)
        return current_context_id.get()

    assert contextvars.copy_context().run(inside, 7) == 7
    assert current_context_id.get() is None


def test_reachable_leaves() -> None:
    x = torch.ones(2, requires_grad=True)
    w = torch.ones(2, requires_grad=True)
    c = torch.ones(2)  # no grad: not a leaf of the graph
    y = (x * w + c).tanh()
    z = y * 2 + x
    assert {id(t) for t in reachable_leaves([z])} == {id(x), id(w)}
    assert {id(t) for t in reachable_leaves([x])} == {id(x)}  # a leaf reaches itself
    assert reachable_leaves([c]) == []
    assert {id(t) for t in reachable_leaves([z, x, y])} == {id(x), id(w)}


def test_a_send_functions_leaves_are_walked_once_and_again_after_an_in_place_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiorpc_autograd.autograd as engine

    walks: list[int] = []
    walk = engine._leaf_closure

    def counted(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        walks.append(1)
        return walk(tensors)

    monkeypatch.setattr(engine, "_leaf_closure", counted)
    x = torch.ones(2, requires_grad=True)
    w = torch.ones(2, requires_grad=True)
    y = x * 2
    send = SendFunction(1, 1, [y])
    assert [id(t) for t in send.leaves()] == [id(x)]
    assert [id(t) for t in send.leaves()] == [id(x)]
    assert len(walks) == 1
    y.mul_(w)  # a new grad_fn on the sent tensor, reaching w too
    assert {id(t) for t in send.leaves()} == {id(x), id(w)}
    assert len(walks) == 2
