"""A context a peer released is gone at once and its tensors are dropped in
the worker's next gap: the turn after it next answers a forward request, at
the latest ``DROP_WITHIN_S`` later, with at most ``DROP_HELD_MAX`` waiting
(in-process: the service on a stand-in agent)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import types
import weakref

import pytest
import torch

from aiorpc_autograd import autograd_service
from aiorpc_autograd.autograd import SendFunction
from aiorpc_autograd.autograd_service import DROP_HELD_MAX, DROP_WITHIN_S, AutogradService
from aiorpc_autograd.options import WorkerInfo

pytestmark = pytest.mark.timeout(30)

PEER = 1
_IDS = itertools.count(1)


def _service() -> AutogradService:
    agent = types.SimpleNamespace(
        info=WorkerInfo("w", 0), loop=asyncio.get_running_loop(), pinned=False, running=False
    )
    return AutogradService(agent)  # type: ignore[arg-type]


def _context_of_peer(service: AutogradService) -> tuple[int, list[weakref.ref[torch.Tensor]]]:
    """A context made by ``PEER`` holding a step's worth: a graph recorded by
    a send function and a leaf's gradient; weak references to its tensors."""
    cid = (PEER << 48) | next(_IDS)  # (made by PEER: its id's high 16 bits)
    ctx = service.container.get_or_create(cid)
    w = torch.randn(8, 8, requires_grad=True)
    y = (torch.randn(4, 8) @ w).relu()
    ctx.add_send(SendFunction(service.container.new_message_id(), PEER, [y]))
    grad = torch.randn(8, 8)
    ctx.accumulate_grad(w, grad)
    return cid, [weakref.ref(y), weakref.ref(grad)]


def _alive(refs: list[weakref.ref[torch.Tensor]]) -> int:
    return sum(ref() is not None for ref in refs)


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_released_by_a_peer_gone_at_once_dropped_after_the_next_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(autograd_service, "DROP_WITHIN_S", 60.0)  # (a slow box: not the timer)
    gc.disable()  # reference counting alone must free them
    try:
        service = _service()
        cid, refs = _context_of_peer(service)
        service.release(cid, from_peer=PEER)
        assert service.container.get(cid) is None  # later requests find it gone
        await _turns(3)
        assert _alive(refs) == 2  # held for the gap, not freed before the next forward
        service._after_answer(None)  # a forward's answer is being written
        assert _alive(refs) == 2  # not in this turn: the write comes first
        await _turns(2)
        assert _alive(refs) == 0
        assert service._drop_timer is None  # the fallback went with them
    finally:
        gc.enable()


async def test_released_by_a_peer_dropped_within_the_bound_without_traffic() -> None:
    service = _service()
    cid, refs = _context_of_peer(service)
    service.release(cid, from_peer=PEER)
    assert _alive(refs) == 2
    await asyncio.sleep(DROP_WITHIN_S + 0.05)
    assert _alive(refs) == 0


async def test_at_most_drop_held_max_released_contexts_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(autograd_service, "DROP_WITHIN_S", 60.0)
    service = _service()
    made = [_context_of_peer(service) for _ in range(DROP_HELD_MAX + 3)]
    for cid, _ in made:
        service.release(cid, from_peer=PEER)
    alive = [_alive(refs) for _, refs in made]
    assert alive == [0] * 3 + [2] * DROP_HELD_MAX  # the oldest went at once
    assert len(service._to_drop) == DROP_HELD_MAX
    service._drop_released()
    assert [_alive(refs) for _, refs in made] == [0] * len(made)


async def test_released_here_or_by_a_lost_peer_dropped_at_once() -> None:
    service = _service()
    cid, refs = _context_of_peer(service)
    service.release(cid)  # this worker's own release (the context's exit)
    assert _alive(refs) == 0 and not service._to_drop
