"""CUDA tensors between real worker processes (skipped without a GPU).

Two workers share the machine's GPU(s). Every worker gets the map
``{cuda:0: cuda:0}`` to every worker (itself included), so CUDA tensors travel
by it and come back by its inverse. Run on a GPU machine with::

    python -m pytest -q tests/integration/test_cuda.py tests/devices
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.nn import RemoteModule
from aiorpc_autograd.optim import DistributedOptimizer
from tests.integration.common import attempt
from tests.integration.harness import run_workers

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SAME = {"cuda:0": "cuda:0"}
MAPS = {"device_maps": {"worker0": SAME, "worker1": SAME}}
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]


def where(t: torch.Tensor) -> tuple[str, torch.Tensor]:
    return str(t.device), t


def make(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * torch.empty((), dtype=dtype).element_size(),), generator=g)
    t = raw.to(torch.uint8).view(dtype) if dtype != torch.bool else raw.remainder(2).bool()
    return t.cuda()


async def echo_every_dtype(rank: int, world_size: int) -> Any:
    if rank != 0:
        return None
    out = []
    for i, dtype in enumerate(DTYPES):
        for n in (0, 1, 1000, (1 << 20) + 3):
            t = make(dtype, n, i * 7 + n)
            device, back = await rpc.rpc_async("worker1", where, (t,))
            same = back.device == t.device and torch.equal(
                back.view(torch.uint8) if n else back, t.view(torch.uint8) if n else t
            )
            out.append((str(dtype), n, device, same))
    return out


def test_echo_of_cuda_tensors_of_every_dtype_is_bit_exact() -> None:
    rows = run_workers(echo_every_dtype, 2, options_kwargs=MAPS)[0]
    for dtype, n, device, same in rows:
        assert device == "cuda:0", (dtype, n, device)
        assert same, (dtype, n)


async def map_to_second_device(rank: int, world_size: int) -> Any:
    if rank != 0:
        return None
    t = torch.arange(10.0, device="cuda:0")
    device, back = await rpc.rpc_async("worker1", where, (t,))
    return device, str(back.device), torch.equal(back.cpu(), t.cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_map_to_another_device_and_back_by_the_inverse() -> None:
    maps = {"device_maps": {"worker1": {"cuda:0": "cuda:1"}}}
    device, back_device, same = run_workers(map_to_second_device, 2, options_kwargs=maps)[0]
    assert (device, back_device, same) == ("cuda:1", "cuda:0", True)


async def unmapped(rank: int, world_size: int) -> Any:
    if rank != 0:
        return None
    return await attempt("worker1", where, (torch.ones(2, device="cuda:0"),))


def test_a_cuda_tensor_with_no_map_is_refused() -> None:
    error = run_workers(unmapped, 2)[0]
    assert isinstance(error, TypeError) and "no device map entry for cuda:0" in str(error)


def produced_late(n: int) -> torch.Tensor:
    return torch.full((n,), 7.0, device="cuda:0")


async def stream_race(rank: int, world_size: int) -> Any:
    if rank != 0:
        return None
    bad = 0
    for _ in range(5):
        t = torch.zeros(1 << 22, device="cuda:0")
        torch.cuda._sleep(200_000_000)  # a long kernel on the current stream...
        t.add_(1.0)  # ...before the one that writes the values sent right away
        _, back = await rpc.rpc_async("worker1", where, (t,))
        bad += int(not bool((back == 1.0).all()))
    return bad


def test_the_callee_never_reads_a_tensor_before_the_callers_kernels_wrote_it() -> None:
    assert run_workers(stream_race, 2, options_kwargs=MAPS)[0] == 0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


async def train_remote_gpu_module(rank: int, world_size: int) -> Any:
    if rank != 0:
        return None
    torch.manual_seed(1)
    xs = [torch.randn(8, 16) for _ in range(3)]
    ys = [torch.randn(8, 4) for _ in range(3)]
    # The oracle: the same model trained locally on the GPU.
    local = _model().cuda()
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        torch.nn.functional.mse_loss(local(x.cuda()), y.cuda()).backward()
        opt.step()
    net = RemoteModule("worker1/cuda:0", _model)
    dopt = DistributedOptimizer(torch.optim.SGD, await net.remote_parameters(), lr=0.1)
    for x, y in zip(xs, ys, strict=True):
        async with dist_autograd.context() as cid:
            out = await net(x.cuda())
            loss = torch.nn.functional.mse_loss(out, y.cuda())
            await dist_autograd.backward(cid, [loss])
            await dopt.step(cid)
    remote = await rpc.rpc_async("worker1", _params_of, (net.module_rref,))
    return [p.detach().cpu() for p in local.parameters()], remote


def _params_of(module: rpc.RRef[torch.nn.Module]) -> list[torch.Tensor]:
    return [p.detach().cpu() for p in module.local_value().parameters()]


def test_a_dist_autograd_step_with_the_remote_module_on_the_gpu_matches_local() -> None:
    local, remote = run_workers(train_remote_gpu_module, 2, options_kwargs=MAPS)[0]
    for a, b in zip(local, remote, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
