"""Device maps between real worker processes, on CPU-only workers.

What needs no GPU: both ends refuse a map naming devices a worker lacks, a
tensor off the CPU with no map entry is refused with a clear error (never
copied to the CPU silently) in requests and responses, and autograd metadata
carries the map so recv functions send gradients back by its inverse. The
CUDA transfers themselves are tests/integration/test_cuda.py (GPU only).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.api import current_agent
from aiorpc_autograd.devices import DeviceMaps
from tests.integration.common import attempt, await_outcome, call_outcome, echo
from tests.integration.harness import barrier, run_processes, run_workers

pytestmark = pytest.mark.timeout(120)


async def init_with_map(rank: int, world_size: int, init_method: str) -> Any:
    maps = {"worker1": {"cuda:0": "cuda:0"}} if rank == 0 else {}
    started = time.monotonic()
    error = await await_outcome(
        rpc.init_rpc(
            f"worker{rank}",
            rank,
            world_size,
            init_method=init_method,
            options=rpc.RpcOptions(device_maps=maps),
        )
    )
    elapsed = time.monotonic() - started
    if not isinstance(error, Exception):
        await rpc.shutdown(graceful=False)
    return error, elapsed, call_outcome(rpc.get_worker_info)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs workers without CUDA")
def test_a_map_to_devices_the_workers_lack_fails_init_on_both_sides() -> None:
    results = run_processes(init_with_map, 2, timeout=60)
    for rank, (error, elapsed, after) in enumerate(results):
        assert isinstance(error, ValueError), (rank, error)
        assert "device map of worker 'worker0' for 'worker1'" in str(error), str(error)
        assert "no CUDA device" in str(error), str(error)
        assert elapsed < 20, (rank, elapsed)
        assert isinstance(after, rpc.RpcError), (rank, after)  # nothing left running


def meta_tensor() -> torch.Tensor:
    return torch.empty(2, device="meta")


async def send_unmapped(rank: int, world_size: int) -> Any:
    if rank != 0:
        return None
    sent = await attempt("worker1", echo, (torch.empty(3, device="meta"),))
    returned = await attempt("worker1", meta_tensor)
    after = await rpc.rpc_async("worker1", echo, (torch.ones(2),))
    return sent, returned, after


def test_a_tensor_off_the_cpu_without_a_map_is_refused_both_ways() -> None:
    sent, returned, after = run_workers(send_unmapped, 2)[0]
    # The request is refused at the call, before anything is sent.
    assert isinstance(sent, TypeError) and "no device map entry for meta" in str(sent), sent
    # The callee's result cannot travel back: the caller gets the callee's error.
    assert isinstance(returned, rpc.RemoteError) and isinstance(returned, TypeError), returned
    assert "no device map entry for meta" in str(returned), returned
    assert torch.equal(after, torch.ones(2))  # both keep serving


def _recv_maps(cid: int) -> list[dict[str, str] | None]:
    ctx = dist_autograd.retrieve_context(cid)
    return [r.device_map for _, r in sorted(ctx.recv_functions().items())]


async def recv_maps(cid: int) -> list[dict[str, str] | None]:
    return _recv_maps(cid)


async def gradients_of(cid: int) -> list[torch.Tensor]:
    return list(dist_autograd.get_gradients(cid).values())


async def metadata_carries_the_map(rank: int, world_size: int) -> Any:
    # What rendezvous would build on two workers with one CUDA device each and
    # worker0's map {cuda:0 -> cuda:1}... were there devices: the maps only
    # decide where CUDA tensors go, so CPU tensors travel as before.
    agent = current_agent()
    to_w1 = {"cuda:0": "cuda:1"}
    agent.device_maps = (
        DeviceMaps({"worker1": to_w1}, {}) if rank == 0 else DeviceMaps({}, {"worker0": to_w1})
    )
    await barrier()
    if rank != 0:
        await barrier()
        return None
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    async with dist_autograd.context() as cid:
        y = await rpc.rpc_async("worker1", torch.mul, (x, 3.0))
        await dist_autograd.backward(cid, [y.sum()])
        mine = _recv_maps(cid)
        theirs = await rpc.rpc_async("worker1", recv_maps, (cid,))
        grads = dist_autograd.get_gradients(cid)
    await barrier()
    return mine, theirs, grads[x]


def test_autograd_metadata_carries_the_map_and_gradients_go_back_by_its_inverse() -> None:
    mine, theirs, grad = run_workers(metadata_carries_the_map, 2)[0]
    # worker1 received the request by worker0's map: its recv sends back by the inverse.
    assert theirs == [{"cuda:1": "cuda:0"}]
    # worker0 received the response by the inverse: its recv sends back by the map.
    assert mine == [{"cuda:0": "cuda:1"}]
    assert torch.equal(grad, torch.full((2,), 3.0))
