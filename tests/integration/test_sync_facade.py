"""The synchronous facade (``aiorpc_autograd.sync``) between real workers, and
``rpc.to_thread`` (heavy parts of async remote functions off the loop).

Two module-wide groups of three service workers: one started with the async
API (``conftest.service``), one with the facade (``start_service(sync=True)``:
its agents run on the facade's background loop thread). The scenarios of
``SCENARIOS`` are written once against a small adapter (:class:`AsyncApi`,
:class:`SyncApi`) and run through both APIs: the same calls, RRefs,
distributed autograd and optimizer behaviour whichever API drives them. The
facade's own shapes (torch futures, ``async_execution``, blocking calls on the
loop thread, ``RemoteModule``) run on the facade group.

A check runs on ``worker0`` as a module-level ``async def check_*(rank,
world_size, ...)``; for the facade group it runs on the process's main loop,
which is *not* the agent's loop, so each blocking facade call is made in a
thread (``asyncio.to_thread``), as a plain user thread would make it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import api, dist_autograd
from aiorpc_autograd.optim import DistributedOptimizer
from aiorpc_autograd.rref import RRefService
from aiorpc_autograd.sync import autograd as sync_autograd
from aiorpc_autograd.sync import nn as sync_nn
from aiorpc_autograd.sync import optim as sync_optim
from aiorpc_autograd.sync import rpc as sync_rpc
from tests.integration.conftest import close_shared_group, shared_group
from tests.integration.harness import WorkerGroup

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------- the facade group


@pytest.fixture(scope="module")
def _sync_holder() -> Iterator[dict[str, WorkerGroup]]:
    holder: dict[str, WorkerGroup] = {}
    yield holder
    close_shared_group(holder)


def _sync_group(holder: dict[str, WorkerGroup]) -> WorkerGroup:
    return shared_group(holder, 3, sync=True, options_kwargs={"num_worker_threads": 2})


@pytest.fixture
def sync_service(_sync_holder: dict[str, WorkerGroup]) -> WorkerGroup:
    """Three workers started by the facade (2 pool threads each: a pool thread
    held where none should be shows up as a hang)."""
    return _sync_group(_sync_holder)


@pytest.fixture(params=["async", "sync"])
def either(
    request: pytest.FixtureRequest, service: WorkerGroup, _sync_holder: dict[str, WorkerGroup]
) -> tuple[str, WorkerGroup]:
    """(API name, its group): a scenario runs through both APIs."""
    if request.param == "async":
        return "async", service
    return "sync", _sync_group(_sync_holder)


# --------------------------------------------------------------------- remote functions


class SlowCounter:
    """Takes a moment to build: a call right after ``remote()`` finds it not ready."""

    def __init__(self, start: int) -> None:
        time.sleep(0.3)
        self.n = start

    def add(self, k: int) -> int:
        self.n += k
        return self.n


def call_method(method: Callable[..., Any], rref: Any, *args: Any, **kwargs: Any) -> Any:
    """torch's tutorial helper: on the owner, in a pool thread; local_value waits
    for a value still being created (facade)."""
    return method(rref.local_value(), *args, **kwargs)


async def call_method_async(method: Callable[..., Any], rref: Any, *args: Any) -> Any:
    """The async API's form of the helper (awaits the value on the owner's loop)."""
    return method(await rref.to_here(), *args)


def relay(api_name: str, to: str, x: torch.Tensor) -> torch.Tensor:
    """A plain function (pool thread) making a blocking nested call."""
    caller = sync_rpc.rpc_sync if api_name == "sync" else rpc.rpc_sync
    y: torch.Tensor = caller(to, torch.mul, (x, 3))
    return y + 1


def fetch_n(rref: Any) -> int:
    """A plain function: ``rref.to_here()`` blocks here (facade RRef)."""
    return int(rref.to_here().n)


async def fetch_n_async(rref: Any) -> int:
    return int((await rref.to_here()).n)


def make_leaf(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, requires_grad=True)


def scale_by(rref: Any, x: torch.Tensor) -> torch.Tensor:
    result: torch.Tensor = rref.local_value() * x
    return result


def echo(value: Any) -> Any:
    return value


async def echo_async(value: Any) -> Any:
    return value


def blocking_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# --------------------------------------------------------------------- the two APIs


class AsyncApi:
    """The async API: awaited on the agent's own loop (worker0's main loop)."""

    name = "async"
    call_method = staticmethod(call_method_async)
    fetch_n = staticmethod(fetch_n_async)

    async def call(
        self, to: Any, func: Any, args: tuple[Any, ...] = (), timeout: Any = None
    ) -> Any:
        return await rpc.rpc_async(to, func, args, timeout=timeout)

    async def gather(self, calls: list[tuple[Any, Any, tuple[Any, ...]]]) -> list[Any]:
        return list(await asyncio.gather(*(rpc.rpc_async(*c) for c in calls)))

    def remote(self, to: Any, func: Any, args: tuple[Any, ...] = ()) -> Any:
        return rpc.remote(to, func, args)

    async def to_here(self, rref: Any) -> Any:
        return await rref.to_here()

    async def proxy(self, rref: Any, how: str, method: str, *args: Any) -> Any:
        if how == "rpc_sync":  # the blocking proxy, from a thread off the loop
            return await asyncio.to_thread(lambda: getattr(rref.rpc_sync(), method)(*args))
        result = getattr(getattr(rref, how)(), method)(*args)
        if how == "remote":
            return await result.to_here()
        return await result

    def context(self) -> Any:
        return dist_autograd.context()

    async def backward(self, cid: int, roots: list[torch.Tensor]) -> None:
        await dist_autograd.backward(cid, roots)

    def gradients(self, cid: int) -> dict[torch.Tensor, torch.Tensor]:
        return dist_autograd.get_gradients(cid)

    async def step(self, params: list[Any], cid: int, lr: float) -> None:
        await DistributedOptimizer(torch.optim.SGD, params, lr=lr).step(cid)


class SyncApi:
    """The facade, called from a plain thread as torch code would be."""

    name = "sync"
    call_method = staticmethod(call_method)
    fetch_n = staticmethod(fetch_n)

    async def call(self, to: Any, func: Any, args: tuple[Any, ...] = (), timeout: Any = -1) -> Any:
        limit = -1 if timeout is None else timeout
        return await asyncio.to_thread(sync_rpc.rpc_sync, to, func, args, None, limit)

    async def gather(self, calls: list[tuple[Any, Any, tuple[Any, ...]]]) -> list[Any]:
        def run() -> list[Any]:
            futures = [sync_rpc.rpc_async(*c) for c in calls]
            return list(torch.futures.wait_all(futures))

        return await asyncio.to_thread(run)

    def remote(self, to: Any, func: Any, args: tuple[Any, ...] = ()) -> Any:
        return sync_rpc.remote(to, func, args)

    async def to_here(self, rref: Any) -> Any:
        return await asyncio.to_thread(rref.to_here)

    async def proxy(self, rref: Any, how: str, method: str, *args: Any) -> Any:
        def run() -> Any:
            result = getattr(getattr(rref, how)(), method)(*args)
            if how == "rpc_async":
                return result.wait()
            if how == "remote":
                return result.to_here()
            return result

        return await asyncio.to_thread(run)

    def context(self) -> Any:
        return sync_autograd.context()

    async def backward(self, cid: int, roots: list[torch.Tensor]) -> None:
        await asyncio.to_thread(sync_autograd.backward, cid, roots)

    def gradients(self, cid: int) -> dict[torch.Tensor, torch.Tensor]:
        return sync_autograd.get_gradients(cid)

    async def step(self, params: list[Any], cid: int, lr: float) -> None:
        def run() -> None:
            sync_optim.DistributedOptimizer(torch.optim.SGD, params, lr=lr).step(cid)

        await asyncio.to_thread(run)


def api_named(name: str) -> AsyncApi | SyncApi:
    return AsyncApi() if name == "async" else SyncApi()


# --------------------------------------------------------------------- scenarios (both APIs)


async def scenario_calls(a: AsyncApi | SyncApi) -> dict[str, Any]:
    value = (1, "a", {2: 3}, [torch.arange(4)])
    back = await a.call("worker1", echo, (value,))
    assert back[:3] == value[:3] and torch.equal(back[3][0], value[3][0])
    assert await a.call(1, echo_async, ("x",)) == "x"
    sums = await a.gather([(f"worker{1 + i % 2}", torch.add, (torch.ones(2), i)) for i in range(6)])
    assert [s.tolist() for s in sums] == [[1.0 + i] * 2 for i in range(6)]
    with pytest.raises(ValueError, match="invalid literal") as info:
        await a.call("worker1", int, ("x",))
    assert isinstance(info.value, rpc.RemoteError) and info.value.worker == "worker1"
    nested = await a.call("worker1", relay, (a.name, "worker2", torch.ones(2)))
    assert nested.tolist() == [4.0, 4.0]
    with pytest.raises(rpc.RpcTimeoutError):
        await a.call("worker2", blocking_sleep, (2.0,), timeout=0.3)
    return {"ok": True}


async def scenario_rrefs(a: AsyncApi | SyncApi) -> dict[str, Any]:
    rref = a.remote("worker1", SlowCounter, (5,))
    # Right after remote(): the owner's helper waits for the value being built.
    assert await a.call("worker1", a.call_method, (SlowCounter.add, rref, 2)) == 7
    assert (await a.to_here(rref)).n == 7
    assert rref.owner() == rpc.WorkerInfo("worker1", 1) and rref.owner_name() == "worker1"
    assert not rref.is_owner()
    assert await a.proxy(rref, "rpc_sync", "add", 1) == 8
    assert await a.proxy(rref, "rpc_async", "add", 1) == 9
    assert await a.proxy(rref, "remote", "add", 1) == 10
    # Passed on to a third worker, which fetches it (a plain function there).
    assert await a.call("worker2", a.fetch_n, (rref,)) == 10
    deadline = time.monotonic() + 10
    while not rref.confirmed_by_owner():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    local = rpc.RRef(torch.ones(2)) if a.name == "async" else sync_rpc.RRef(torch.ones(2))
    assert local.is_owner() and torch.equal(local.local_value(), torch.ones(2))
    broken = a.remote("worker2", int, ("x",))
    with pytest.raises(ValueError, match="invalid literal"):
        await a.to_here(broken)
    return {"rref_type": type(rref).__module__ + "." + type(rref).__qualname__}


async def scenario_autograd(a: AsyncApi | SyncApi) -> dict[str, Any]:
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    with a.context() as cid:
        y = await a.call("worker1", torch.mul, (w, 2.0))
        z = await a.call("worker2", torch.add, (y, w))
        loss = (z * z).sum()
        await a.backward(cid, [loss])
        grads = a.gradients(cid)
    w_local = w.detach().clone().requires_grad_()
    ((w_local * 2.0 + w_local) ** 2).sum().backward()
    assert list(grads) == [w]
    assert torch.allclose(grads[w], w_local.grad)  # type: ignore[arg-type]
    assert w.grad is None
    return {"grad": grads[w].tolist()}


async def scenario_optimizer(a: AsyncApi | SyncApi) -> dict[str, Any]:
    param = a.remote("worker1", make_leaf, ([1.0, 2.0, 3.0],))
    before = (await a.to_here(param)).detach().clone()
    x = torch.tensor([1.0, -1.0, 0.5])
    with a.context() as cid:
        y = await a.call("worker1", scale_by, (param, x))
        await a.backward(cid, [y.sum()])
        await a.step([param], cid, lr=0.5)
    after = await a.to_here(param)
    assert torch.allclose(after, before - 0.5 * x)
    return {"after": after.tolist()}


SCENARIOS = {
    "calls": scenario_calls,
    "rrefs": scenario_rrefs,
    "autograd": scenario_autograd,
    "optimizer": scenario_optimizer,
}


async def check_scenario(rank: int, world_size: int, api_name: str, scenario: str) -> Any:
    return await SCENARIOS[scenario](api_named(api_name))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenario_through_both_apis(either: tuple[str, WorkerGroup], scenario: str) -> None:
    api_name, group = either
    got = group.call(0, check_scenario, api_name, scenario, timeout=60)
    if scenario == "rrefs":
        expected = "RRef" if api_name == "async" else "aiorpc_autograd.sync.rpc.api.RRef"
        assert got["rref_type"].endswith(expected)
        if api_name == "async":
            assert got["rref_type"] == "aiorpc_autograd.rref.RRef"


# --------------------------------------------------------------------- facade-only shapes


async def check_futures(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        fut = sync_rpc.rpc_async("worker1", torch.add, args=(torch.ones(2), 1))
        assert isinstance(fut, torch.futures.Future)
        out["wait"] = fut.wait().tolist()
        out["value"] = fut.value().tolist()
        out["done"] = fut.done()
        seen: list[Any] = []
        fut2 = sync_rpc.rpc_async("worker2", echo, args=(3,))
        chained = fut2.then(lambda f: f.wait() * 10)
        event = threading.Event()
        fut2.add_done_callback(lambda f: (seen.append(f.value()), event.set()))
        out["then"] = chained.wait()
        assert event.wait(10)
        out["callback"] = seen
        futures = [sync_rpc.rpc_async(f"worker{1 + i % 2}", echo, args=(i,)) for i in range(8)]
        out["wait_all"] = torch.futures.wait_all(futures)
        collected = torch.futures.collect_all(
            [sync_rpc.rpc_async("worker1", echo, args=(i,)) for i in range(3)]
        ).wait()
        out["collect_all"] = [f.value() for f in collected]
        failing = sync_rpc.rpc_async("worker1", int, args=("x",))
        with pytest.raises(ValueError, match="invalid literal"):
            failing.wait()
        with pytest.raises(ValueError, match="unknown worker"):
            sync_rpc.rpc_async("nobody", echo, args=(1,))
        slow = sync_rpc.rpc_async("worker1", blocking_sleep, args=(2.0,), timeout=0.3)
        with pytest.raises(rpc.RpcTimeoutError):
            slow.wait()
        # torch's keyword forms; args as a list
        out["kwargs"] = sync_rpc.rpc_sync(to="worker2", func=echo, args=[5], timeout=0)
        return out

    return await asyncio.to_thread(run)


def test_rpc_async_returns_a_torch_future(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_futures)
    assert got["wait"] == [2.0, 2.0] and got["value"] == [2.0, 2.0] and got["done"] is True
    assert got["then"] == 30 and got["callback"] == [3]
    assert got["wait_all"] == list(range(8))
    assert got["collect_all"] == [0, 1, 2]
    assert got["kwargs"] == 5


# async_execution: futures parked on the callee until another call releases them.
_PARKED: dict[str, torch.futures.Future[Any]] = {}


@sync_rpc.functions.async_execution
def park(key: str) -> torch.futures.Future[Any]:
    fut: torch.futures.Future[Any] = torch.futures.Future()
    _PARKED[key] = fut
    return fut


def release(value: int) -> list[str]:
    keys = sorted(_PARKED)
    for i, key in enumerate(keys):
        _PARKED.pop(key).set_result(value + i)
    return keys


@sync_rpc.functions.async_execution
def add_later(to: str, x: torch.Tensor) -> torch.futures.Future[Any]:
    """torch's tutorial shape: chain on another call's future."""
    return sync_rpc.rpc_async(to, torch.add, args=(x, 1)).then(lambda f: f.wait() * 2)


@sync_rpc.functions.async_execution
def awaitable_result(x: int) -> Any:
    return echo_async(x + 1)  # a coroutine: awaited on the callee's loop


class Service:
    @staticmethod
    @sync_rpc.functions.async_execution
    def static_add_later(to: str, x: torch.Tensor) -> torch.futures.Future[Any]:
        return sync_rpc.rpc_async(to, torch.add, args=(x, 2))


async def check_async_execution(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        # worker1 has 2 pool threads: 5 parked calls would hold them all if a
        # thread waited for its future, and `release` could never run.
        parked = [sync_rpc.rpc_async("worker1", park, args=(f"k{i}",)) for i in range(5)]
        deadline = time.monotonic() + 20
        released: list[str] = []
        while len(released) < 5:
            assert time.monotonic() < deadline, released
            released += sync_rpc.rpc_sync("worker1", release, args=(100,))
            time.sleep(0.02)
        values = sorted(f.wait() for f in parked)
        chained = sync_rpc.rpc_sync("worker1", add_later, args=("worker2", torch.ones(2)))
        static = sync_rpc.rpc_sync(
            "worker1", Service.static_add_later, args=("worker2", torch.ones(1))
        )
        awaited = sync_rpc.rpc_sync("worker2", awaitable_result, args=(41,))
        return {
            "released": sorted(released),
            "parked_values": values,
            "chained": chained.tolist(),
            "static": static.tolist(),
            "awaited": awaited,
        }

    return await asyncio.to_thread(run)


def test_async_execution_replies_when_the_future_completes(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_async_execution)
    assert got["released"] == [f"k{i}" for i in range(5)]
    assert len(got["parked_values"]) == 5 and all(v >= 100 for v in got["parked_values"])
    assert got["chained"] == [4.0, 4.0]
    assert got["static"] == [3.0]
    assert got["awaited"] == 42


async def blocking_calls_on_the_loop(to: str) -> dict[str, str]:
    """An async remote function: the facade's blocking calls refuse to block its loop."""
    out: dict[str, str] = {}
    with pytest.raises(RuntimeError) as info:
        sync_rpc.rpc_sync(to, echo, args=(1,))
    out["rpc_sync"] = str(info.value)
    fut = sync_rpc.rpc_async(to, blocking_sleep, args=(0.2,))  # non-blocking: fine here
    with pytest.raises(RuntimeError) as info:
        fut.wait()
    out["wait"] = str(info.value)
    out["awaited"] = str(await fut)
    rref = sync_rpc.remote(to, echo, args=(7,))
    out["to_here"] = str(await rref.to_here())  # on a loop: the awaitable form
    return out


def pool_thread_calls(to: str) -> int:
    """A plain remote function: the facade's blocking calls work in pool threads."""
    rref = sync_rpc.remote(to, echo, args=(20,))
    value: int = rref.to_here() + sync_rpc.rpc_async(to, echo, args=(1,)).wait()
    return value + sync_rpc.rpc_sync(to, echo, args=(1,))


def test_blocking_calls_on_the_loop_thread_raise_and_work_in_pool_threads(
    sync_service: WorkerGroup,
) -> None:
    got = sync_service.call(0, check_blocking_on_loop)
    assert "event loop" in got["rpc_sync"] and "rpc_async" in got["rpc_sync"]
    assert "event loop" in got["wait"]
    assert got["awaited"] == "0.2" and got["to_here"] == "7"
    assert got["pool"] == 22


async def check_blocking_on_loop(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = await asyncio.to_thread(
        sync_rpc.rpc_sync, "worker1", blocking_calls_on_the_loop, ("worker2",)
    )
    out["pool"] = await asyncio.to_thread(
        sync_rpc.rpc_sync, "worker1", pool_thread_calls, ("worker2",)
    )
    return out


async def check_remote_module(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        torch.manual_seed(0)
        local = torch.nn.Linear(3, 2)
        net = sync_nn.RemoteModule("rank:1/cpu", torch.nn.Linear, args=(3, 2))  # torch spelling
        # the same weights on both sides
        for p_remote, p_local in zip(net.remote_parameters(), local.parameters(), strict=True):
            sync_rpc.rpc_sync("worker1", copy_into, args=(p_remote, p_local.detach()))
        x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 1.0]])
        assert net.get_module_rref().owner_name() == "worker1"
        opt = sync_optim.DistributedOptimizer(torch.optim.SGD, net.remote_parameters(), lr=0.1)
        local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
        for _ in range(3):
            with sync_autograd.context() as cid:
                out = net(x) + net.forward_async(x).wait()
                loss = (out**2).sum()
                sync_autograd.backward(cid, [loss])
                opt.step(cid)
            local_opt.zero_grad()
            ((local(x) + local(x)) ** 2).sum().backward()
            local_opt.step()
        net.eval()
        remote_out = net(x)
        return {"same": bool(torch.allclose(remote_out, local(x), atol=1e-6))}

    return await asyncio.to_thread(run)


def copy_into(rref: Any, value: torch.Tensor) -> None:
    with torch.no_grad():
        rref.local_value().copy_(value)


def test_remote_module_and_optimizer_match_local_training(sync_service: WorkerGroup) -> None:
    assert sync_service.call(0, check_remote_module) == {"same": True}


async def check_facade_options(rank: int, world_size: int) -> dict[str, Any]:
    opts = api.current_agent().options
    return {
        "threads": opts.num_worker_threads,
        "facade_rrefs": RRefService.current().rref_class is sync_rpc.RRef,
        "loop_thread": api.current_agent().loop is not asyncio.get_running_loop(),
    }


def test_facade_service_runs_with_mapped_options(sync_service: WorkerGroup) -> None:
    got = sync_service.call(1, check_facade_options)
    assert got == {"threads": 2, "facade_rrefs": True, "loop_thread": True}


def facade_in_async_process(to: str) -> int:
    """A plain function in a process started with the async API: the facade's
    calls work there too (its RRefs are the async API's)."""
    a: int = sync_rpc.rpc_sync(to, echo, args=(1,))
    b: int = sync_rpc.rpc_async(to, echo, args=(2,)).wait()
    rref = sync_rpc.remote(to, echo, args=(3,))
    assert type(rref) is rpc.RRef
    return a + b + rpc.rpc_sync(to, fetch_value, (rref,))


async def fetch_value(rref: Any) -> Any:
    return await rref.to_here()


async def check_facade_in_async_process(rank: int, world_size: int) -> int:
    result: int = await rpc.rpc_async("worker1", facade_in_async_process, ("worker2",))
    return result


def test_facade_calls_in_a_process_started_with_the_async_api(service: WorkerGroup) -> None:
    assert service.call(0, check_facade_in_async_process) == 6


# --------------------------------------------------------------------- rpc.to_thread


def spin(seconds: float) -> int:
    """CPU work that releases the GIL (torch kernels), for ``seconds``."""
    a = torch.randn(128, 128)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a)
        n += 1
    return n


async def heavy(seconds: float) -> int:
    return await rpc.to_thread(spin, seconds)


async def check_to_thread_keeps_serving(rank: int, world_size: int) -> dict[str, Any]:
    started = time.monotonic()
    job = rpc.rpc_async("worker1", heavy, (1.5,))
    await asyncio.sleep(0.2)  # the heavy call has started
    latencies = []
    for _ in range(5):
        t0 = time.monotonic()
        assert await rpc.rpc_async("worker1", echo_async, (1,)) == 1
        latencies.append(time.monotonic() - t0)
    answered_at = time.monotonic() - started
    iterations = await job
    return {
        "max_latency": max(latencies),
        "answered_at": answered_at,
        "heavy_done_at": time.monotonic() - started,
        "iterations": iterations,
    }


def test_to_thread_keeps_the_loop_serving(service: WorkerGroup) -> None:
    got = service.call(0, check_to_thread_keeps_serving)
    assert got["iterations"] > 0
    # Answered while the heavy part ran (it ends at about 1.5 s).
    assert got["answered_at"] < got["heavy_done_at"]
    assert got["max_latency"] < 0.5, got


def affine_then_remote(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Runs in worker1's pool (to_thread): local ops, then a nested blocking
    call, which must see the caller's autograd context to be recorded."""
    h = torch.tanh(w * x)
    return rpc.rpc_sync("worker2", torch.mul, (h, h)) + w


async def stage_to_thread(w: torch.Tensor, x: torch.Tensor) -> Any:
    return await rpc.to_thread(affine_then_remote, w, x)


async def check_to_thread_gradients(rank: int, world_size: int) -> dict[str, Any]:
    w = torch.tensor([0.3, -0.7, 1.1], requires_grad=True)
    x = torch.tensor([2.0, 1.0, -0.5])
    async with dist_autograd.context() as cid:
        y = await rpc.rpc_async("worker1", stage_to_thread, (w, x))
        await dist_autograd.backward(cid, [y.sum()])
        grad = dist_autograd.get_gradients(cid)[w]
    wl = w.detach().clone().requires_grad_()
    h = torch.tanh(wl * x)
    (h * h + wl).sum().backward()
    assert wl.grad is not None
    return {"grad": grad.tolist(), "expected": wl.grad.tolist()}


def test_to_thread_records_gradients_in_the_callers_context(service: WorkerGroup) -> None:
    got = service.call(0, check_to_thread_gradients)
    assert got["grad"] == pytest.approx(got["expected"], abs=1e-6)


async def check_torch_introspection_names(rank: int, world_size: int) -> dict[str, Any]:
    """torch's ``_test_graph`` checks, through torch's private names the facade
    also has."""

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {"timeout": sync_rpc.get_rpc_timeout()}
        t1, t2 = torch.ones(3, 3, requires_grad=True), torch.zeros(3, 3, requires_grad=True)
        with sync_autograd.context() as cid:
            ret = sync_rpc.rpc_sync("worker1", torch.add, args=(t1, t2))
            ctx = sync_autograd._current_context()
            sync_autograd._is_valid_context(cid)
            (send,) = ctx._send_functions().values()
            (recv,) = ctx._recv_functions().values()
            out["ids"] = (ctx._context_id() == cid, sync_autograd._retrieve_context(cid) is ctx)
            out["contexts"] = sync_autograd._get_debug_info()["num_autograd_contexts"] >= 1
            out["known"] = ctx._known_worker_ids()
            # torch's _verify_graph_for_first_rpc_call
            (f1, i1), (f2, i2) = send.next_functions
            out["graph"] = [
                send.name(),
                [f.name() for f in (f1, f2)],
                f1.variable is t1 and f2.variable is t2 and i1 == i2 == 0,
                ret.grad_fn is recv and recv.name(),
                not ret.is_leaf,
            ]
            # and _verify_graph_for_rpc_call_exec, on the callee
            out["callee_graph"] = sync_rpc.rpc_sync("worker1", callee_graph, args=(cid,))
            ret.mul_(2)  # a received tensor is computed, not a leaf: in place works
            sync_autograd.backward(cid, [ret.sum()])
            grads = sync_autograd.get_gradients(cid)
            out["inplace_grads"] = (grads[t1].tolist(), grads[t2].tolist())
        for probe in (sync_autograd._current_context, lambda: sync_autograd._is_valid_context(cid)):
            try:
                probe()
            except RuntimeError as exc:
                out.setdefault("after", []).append(str(exc))
        return out

    return await asyncio.to_thread(run)


def tanh_twice(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 2


class Hybrid(torch.nn.Module):
    """A local layer, a remote op (an RPC inside ``forward``; local with no
    ``remote``), a local layer."""

    def __init__(self, remote: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = torch.nn.Linear(4, 4)
        self.post = torch.nn.Linear(4, 2)
        self.remote = remote

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if self.remote is None:
            h = tanh_twice(h)
        else:
            h = sync_rpc.rpc_sync(self.remote, tanh_twice, (h,))
        return self.post(h)  # type: ignore[no-any-return]


def hybrid_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    return torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)


def hybrid_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum()


def ddp_whole_model_grads(rank: int, store: str) -> list[torch.Tensor]:
    """torch's DdpMode.OUTSIDE: DDP wraps the whole model, RPC inside."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        ddp = DistributedDataParallel(Hybrid("worker2"))
        x, target = hybrid_batch(rank)
        with sync_autograd.context() as cid:
            sync_autograd.backward(cid, [hybrid_loss(ddp(x), target)])
            grads = sync_autograd.get_gradients(cid)
            return [grads[p].clone() for p in ddp.module.parameters()]
    finally:
        dist.destroy_process_group()


async def check_ddp_whole_model(rank: int, world_size: int, store: str) -> list[torch.Tensor]:
    return await asyncio.to_thread(ddp_whole_model_grads, rank, store)


def test_ddp_around_a_model_with_an_rpc_inside_averages_every_gradient(
    sync_service: WorkerGroup, tmp_path: Any
) -> None:
    """DDP wrapping a model whose forward makes an RPC (torch's
    ``DdpUnderDistAutogradTest`` with ``DdpMode.OUTSIDE``): the last layer's
    gradients are computed in the pass's first job, the first layer's in a
    later one (after the remote op's gradient comes back), and DDP's bucket
    holds both. The averaged bucket is written when the last gradient is in,
    into every parameter's gradient in the context, the earlier job's too."""
    store = str(tmp_path / "gloo-store")
    got = sync_service.call_many([(r, check_ddp_whole_model, (store,)) for r in (0, 1)], timeout=60)
    local = []
    for rank in (0, 1):
        model = Hybrid(None)
        x, target = hybrid_batch(rank)
        local.append(torch.autograd.grad(hybrid_loss(model(x), target), list(model.parameters())))
    want = [a / 2 + b / 2 for a, b in zip(*local, strict=True)]
    for g0, g1, w in zip(got[0], got[1], want, strict=True):
        assert torch.equal(g0, g1)  # both replicas hold the averaged gradient
        torch.testing.assert_close(g0, w)


def callee_graph(cid: int) -> list[Any]:
    """On the callee of ``torch.add(t1, t2)``: the graph torch's test checks."""
    (send,) = sync_autograd._retrieve_context(cid)._send_functions().values()
    ((add, _),) = send.next_functions
    (r1, n1), (r2, n2) = add.next_functions
    return [add.name(), r1.name(), r1 is r2, (n1, n2), len(r1.tensors)]


def test_torch_introspection_names(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_torch_introspection_names)
    assert got["timeout"] == 60.0
    assert got["ids"] == (True, True) and got["known"] == {1} and got["contexts"]
    recv_name = "torch::distributed::autograd::RecvRpcBackward"
    assert got["graph"] == [
        "torch::distributed::autograd::SendRpcBackward",
        ["torch::autograd::AccumulateGrad"] * 2,
        True,
        recv_name,
        True,
    ]
    assert got["callee_graph"] == ["AddBackward0", recv_name, True, (0, 1), 2]
    assert got["inplace_grads"] == ([[2.0] * 3] * 3, [[2.0] * 3] * 3)
    no_context, released = got["after"]
    assert "doesn't have a valid autograd context" in no_context
    assert released.startswith("Could not find autograd context with id: ")


class Held:
    """A user class: an RRef's value whose type ``_get_type`` reports."""

    def __init__(self, n: int) -> None:
        self.n = n


@sync_rpc.functions.async_execution
def async_returns_a_tensor() -> torch.Tensor:
    """Wrong: an ``async_execution`` function must return a future."""
    return torch.zeros(2)


async def check_torch_private_names(rank: int, world_size: int) -> dict[str, Any]:
    """torch's private names that its RPC tests (and programs) use."""

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        agent = sync_rpc._get_current_rpc_agent()
        # torch's test_infer_backend_from_options: the agent's type by torch's names
        out["agent_type"] = (
            isinstance(agent, sync_rpc.TensorPipeAgent),
            isinstance(agent, sync_rpc.RpcAgent),
            sync_rpc.api._get_current_rpc_agent().__class__ is sync_rpc.TensorPipeAgent,
        )
        out["infos"] = [tuple(i) for i in agent.get_worker_infos()]
        out["info"] = (tuple(agent.get_worker_info()), tuple(agent.get_worker_info("worker2")))
        out["debug"] = sync_rpc._get_debug_info()["num_pending_requests"] == 0
        # RRef._get_type: a user fetches it from the owner once, then keeps it.
        user = sync_rpc.remote("worker1", Held, args=(3,))
        fut = user._get_type(blocking=False)
        out["user_type"] = (fut.wait() is Held, user._get_type() is Held)
        out["cached"] = user._get_type(blocking=False).done()
        owner = sync_rpc.RRef(Held(1))
        out["owner_type"] = (owner._get_type() is Held, owner._get_type(blocking=False).wait())
        out["tensor_type"] = sync_rpc.remote("worker2", torch.ones, args=(2,))._get_type()
        # torch's test_rref_proxy_non_exist: remote() raises at once too.
        for form in ("rpc_sync", "remote"):
            with pytest.raises(AttributeError, match="has no attribute 'non_exist'"):
                getattr(user, form)().non_exist()
        with pytest.raises(AttributeError, match="has no attribute 'non_exist'"):
            user.rpc_async().non_exist().wait()
        # torch's test_rref_type_with_error_*: the creation's error, as itself.
        failed = sync_rpc.remote("worker1", raise_value_error, args=("Expected error",))
        with pytest.raises(ValueError, match="Expected error"):
            failed._get_type()
        with pytest.raises(ValueError, match="Expected error"):
            sync_rpc.remote("worker2", raise_value_error, args=("Expected error",))._get_type(
                blocking=False
            ).wait()
        # _set_rpc_timeout: the default of the calls started from now on.
        sync_rpc._set_rpc_timeout(0.05)
        try:
            out["set_timeout"] = sync_rpc.get_rpc_timeout()
            started = time.monotonic()
            with pytest.raises(RuntimeError) as info:  # RpcTimeoutError is one
                sync_rpc.rpc_sync("worker1", blocking_sleep, args=(1.0,))
            out["timed_out"] = (type(info.value).__name__, time.monotonic() - started < 0.9)
            out["explicit_wins"] = sync_rpc.rpc_sync(
                "worker1", blocking_sleep, args=(0.2,), timeout=5
            )
            # torch's test_default_timeout_used: a call keeps the default of
            # the moment it was made.
            sync_rpc._set_rpc_timeout(30)
            started_long = sync_rpc.rpc_async("worker1", blocking_sleep, args=(0.3,))
            sync_rpc._set_rpc_timeout(0.001)
            out["kept_default"] = started_long.wait()

        finally:
            sync_rpc._set_rpc_timeout(sync_rpc.constants.DEFAULT_RPC_TIMEOUT_SEC)
        out["restored"] = sync_rpc.get_rpc_timeout()
        with pytest.raises(RuntimeError) as info:
            sync_rpc.rpc_sync("worker1", async_returns_a_tensor)
        out["wrong_return"] = str(info.value)
        # Contexts do not nest (torch: "Already have an autograd context id").
        with sync_autograd.context() as outer:
            with pytest.raises(RuntimeError) as info, sync_autograd.context():
                pass
            out["nested"] = str(info.value)
            out["outer_alive"] = sync_autograd._retrieve_context(outer)._context_id() == outer
        with sync_autograd.context() as after:  # the outer one left: fine again
            out["after"] = after != outer
        return out

    return await asyncio.to_thread(run)


def test_torch_private_names(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_torch_private_names)
    assert got["agent_type"] == (True, True, True)
    assert got["infos"] == [("worker0", 0), ("worker1", 1), ("worker2", 2)]
    assert got["info"] == (("worker0", 0), ("worker2", 2)) and got["debug"]
    assert got["user_type"] == (True, True) and got["cached"]
    assert got["owner_type"] == (True, Held)
    assert got["tensor_type"] is torch.Tensor
    assert got["set_timeout"] == 0.05
    assert got["timed_out"] == ("RpcTimeoutError", True)
    assert got["explicit_wins"] == 0.2 and got["restored"] == 60.0
    assert got["kept_default"] == 0.3
    # torch's regex (test_async_function_wrong_return_type)
    assert re.search(
        r"Functions decorated with @rpc\.async_function must return a "
        r"torch\.futures\.Future object,",
        got["wrong_return"],
    )
    assert "but got torch.Tensor" in got["wrong_return"]
    assert got["nested"].startswith("Already have an autograd context id for this thread")
    assert got["outer_alive"] and got["after"]


async def nested_context_in_a_served_call() -> str:
    """Runs on the callee inside the caller's context: a new one would nest."""
    try:
        async with dist_autograd.context():
            pass
    except RuntimeError as exc:
        return str(exc)
    return "no error"


async def check_nested_contexts(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with dist_autograd.context() as outer:
        with pytest.raises(RuntimeError, match="Already have an autograd context id"):
            async with dist_autograd.context():
                pass
        out["served"] = await rpc.rpc_async("worker1", nested_context_in_a_served_call)

        # A task started inside the context inherits it: nesting there is refused too.
        async def child() -> str:
            try:
                with dist_autograd.context():
                    return "no error"
            except RuntimeError as exc:
                return str(exc)

        out["task"] = await asyncio.create_task(child())

    # Outside any context, concurrent tasks each open their own.
    async def own() -> int:
        async with dist_autograd.context() as cid:
            await asyncio.sleep(0.01)
            return cid

    ids = await asyncio.gather(*(own() for _ in range(4)))
    out["concurrent"] = len(set(ids)) == 4 and outer not in ids
    return out


def test_contexts_do_not_nest(service: WorkerGroup) -> None:
    got = service.call(0, check_nested_contexts)
    assert got["served"].startswith("Already have an autograd context id")
    assert got["task"].startswith("Already have an autograd context id")
    assert got["concurrent"]


class OptimizerFailingOnConstructor(torch.optim.SGD):
    """torch's dist_optimizer_test: an optimizer whose construction fails."""

    def __init__(self, params: Any) -> None:
        raise ValueError("Error creating optimizer.")


class FailingOptimizer(torch.optim.SGD):
    """torch's dist_optimizer_test: an optimizer whose step fails."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.1)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        raise ValueError("Error running optimizer.")


async def check_optimizer_errors(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        params = [sync_rpc.remote(f"worker{r}", make_leaf, args=([1.0, 2.0],)) for r in (1, 2)]
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"Error creating optimizer\.") as info:
            sync_optim.DistributedOptimizer(OptimizerFailingOnConstructor, params)
        out["construct"] = (type(info.value).__name__, time.monotonic() - started < 10)
        opt = sync_optim.DistributedOptimizer(FailingOptimizer, params)
        with sync_autograd.context() as cid:
            loss = sum(
                sync_rpc.rpc_sync(p.owner(), scale_by, args=(p, torch.ones(2))) for p in params
            )
            sync_autograd.backward(cid, [loss.sum()])
            with pytest.raises(ValueError, match="Error running optimizer") as info:
                opt.step(cid)
            out["step"] = type(info.value).__name__
        return out

    return await asyncio.to_thread(run)


def test_optimizer_errors_raise_where_torch_raises_them(sync_service: WorkerGroup) -> None:
    # torch's test_dist_optim_exception(_on_constructor): the facade's
    # constructor blocks until every owner's optimizer exists, as torch's does.
    got = sync_service.call(0, check_optimizer_errors)
    assert got["construct"] == ("RemoteValueError", True)
    assert got["step"] == "RemoteValueError"


def raise_value_error(message: str) -> None:
    raise ValueError(message)


async def check_wait_all_ends_at_a_failure(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        slow = sync_rpc.rpc_async("worker1", blocking_sleep, args=(3.0,))
        failing = sync_rpc.rpc_async("worker2", raise_value_error, args=("Expected error",))
        started = time.monotonic()
        with pytest.raises(ValueError, match="Expected error") as info:
            torch.futures.wait_all([slow, failing])
        out["early"] = (type(info.value).__name__, time.monotonic() - started < 2.0)
        out["slow"] = slow.wait()
        # All succeed: every value, in order (a plain torch future mixed in).
        plain: torch.futures.Future[int] = torch.futures.Future()
        plain.set_result(7)
        futs = [sync_rpc.rpc_async("worker1", echo, args=(i,)) for i in range(3)]
        out["values"] = torch.futures.wait_all([*futs, plain])
        return out

    return await asyncio.to_thread(run)


def test_wait_all_ends_at_the_first_failure(sync_service: WorkerGroup) -> None:
    # torch's test_wait_all_exit_early_python: wait_all reports a failed
    # call without waiting for a slow one.
    got = sync_service.call(0, check_wait_all_ends_at_a_failure)
    assert got["early"] == ("RemoteValueError", True)
    assert got["slow"] == 3.0 and got["values"] == [0, 1, 2, 7]


# ------------------------------------------- torch's private _wait_all, _all_gather, _barrier


def gather_my_id(names: list[str] | None) -> dict[str, int]:
    """On a facade worker (a pool thread): torch's ``rpc.api._all_gather`` of its id."""
    return sync_rpc.api._all_gather(sync_rpc.get_worker_info().id, names)


_BARRIER_COUNT: list[int] = []


def count_up() -> None:
    _BARRIER_COUNT.append(1)


def count_reset() -> int:
    count = len(_BARRIER_COUNT)
    _BARRIER_COUNT.clear()
    return count


def barrier_then_count(names: list[str], leader: str) -> None:
    """torch's ``_test_barrier_helper`` on one worker: after the first barrier
    every worker adds one to the leader's count; after the second the leader
    reads them all."""
    sync_rpc.api._barrier(names)
    sync_rpc.rpc_sync(leader, count_up)
    sync_rpc.api._barrier(names)


async def check_all_gather_and_barrier(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        everyone = [f"worker{i}" for i in range(world_size)]
        for round_no in range(2):  # rounds of one group follow each other
            others = [sync_rpc.rpc_async(n, gather_my_id, args=(None,)) for n in everyone[1:]]
            out[f"round{round_no}"] = [gather_my_id(None)] + [f.wait() for f in others]
        # A subset, led by worker1 (its name sorts first): worker0 is a follower.
        pair = ["worker2", "worker1"]
        led = sync_rpc.rpc_async("worker1", gather_my_id, args=(pair,))
        out["pair"] = [sync_rpc.rpc_sync("worker2", gather_my_id, args=(pair,)), led.wait()]
        # torch's barrier test: no worker passes the second barrier before all counted.
        count_reset()
        others = [
            sync_rpc.rpc_async(n, barrier_then_count, args=(everyone, "worker0"))
            for n in everyone[1:]
        ]
        barrier_then_count(everyone, "worker0")
        out["counted"] = count_reset()
        for f in others:
            f.wait()
        # Nobody else comes: the wait ends at the timeout (torch went on with
        # the objects it had; ours raises).
        t0 = time.monotonic()
        with pytest.raises(rpc.RpcTimeoutError, match=r"timed out in _all_gather after 0\.30 s"):
            sync_rpc.api._all_gather("x", ["worker0", "worker2"], timeout=0.3)
        out["timeout_s"] = time.monotonic() - t0
        return out

    return await asyncio.to_thread(run)


def test_all_gather_and_barrier_as_torch(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_all_gather_and_barrier)
    ids = {f"worker{i}": i for i in range(3)}
    assert got["round0"] == got["round1"] == [ids] * 3
    assert got["pair"] == [{"worker1": 1, "worker2": 2}] * 2
    assert got["counted"] == 3
    assert 0.3 <= got["timeout_s"] < 5


async def check_wait_all(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        local = sync_rpc.api._thread_local_var
        with sync_rpc.api._wait_all():
            assert local.future_list == []
            futs = [sync_rpc.rpc_async("worker1", echo, args=(i,)) for i in range(5)]
            out["sync"] = sync_rpc.rpc_sync("worker2", echo, args=(9,))  # not collected
            out["collected"] = len(local.future_list)
            slow = sync_rpc.rpc_async("worker2", blocking_sleep, args=(0.3,))
        out["done"] = [f.done() for f in [*futs, slow]]
        out["values"] = [f.wait() for f in futs]
        out["cleared"] = not hasattr(local, "future_list")
        with pytest.raises(ValueError, match="invalid literal"), sync_rpc.api._wait_all():
            sync_rpc.rpc_async("worker1", int, args=("x",))
        with pytest.raises(rpc.RpcTimeoutError), sync_rpc.api._wait_all():
            sync_rpc.rpc_async("worker1", blocking_sleep, args=(2.0,), timeout=0.2)
        with pytest.raises(KeyError), sync_rpc.api._wait_all():
            raise KeyError("in the body")
        out["cleared_after_errors"] = not hasattr(local, "future_list")
        return out

    return await asyncio.to_thread(run)


def test_wait_all_waits_for_the_calls_made_in_its_block(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_wait_all)
    assert got["sync"] == 9 and got["collected"] == 5
    assert got["done"] == [True] * 6 and got["values"] == list(range(5))
    assert got["cleared"] and got["cleared_after_errors"]


def contexts_once_released(context_id: int) -> int:
    """On a worker, as torch's ``test_debug_info`` checks: once the context is
    gone (``_retrieve_context`` raises), the count of contexts, read at once."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sync_autograd._retrieve_context(context_id)
        except RuntimeError:
            return int(sync_autograd._get_debug_info()["num_autograd_contexts"])
    raise AssertionError(f"context {context_id} was never released")


async def check_context_count_after_release(rank: int, world_size: int) -> list[int]:
    def run() -> list[int]:
        counts = []
        for _ in range(5):
            with sync_autograd.context() as context_id:
                t = torch.ones(2, requires_grad=True)
                sync_rpc.rpc_sync("worker1", torch.add, args=(t, 1))
            counts.append(sync_rpc.rpc_sync("worker1", contexts_once_released, args=(context_id,)))
        return counts

    return await asyncio.to_thread(run)


def test_a_released_context_is_not_counted(sync_service: WorkerGroup) -> None:
    """A context released by its creator is dropped by the time a worker reads
    its debug counters (it waited up to 5 ms for a gap in the traffic)."""
    assert sync_service.call(0, check_context_count_after_release) == [0] * 5


_KEPT: list[Any] = []


def keep_rref(rref: Any) -> bool:
    """Holds a reference sent here (torch's set_global_rref)."""
    _KEPT.append(rref)
    return True


def drop_rrefs() -> int:
    n = len(_KEPT)
    _KEPT.clear()
    return n


def wait_all_workers_then(value: int) -> int:
    sync_rpc.api._wait_all_workers()
    return value


async def check_torch_debug_and_creation_names(rank: int, world_size: int) -> dict[str, Any]:
    """torch's private debug-info, RRef-creation, shutdown-barrier and
    autograd-context names (rpc_test.py / dist_autograd_test.py use them)."""

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        # Three disjoint parts whose union is _get_debug_info (test_debug_info).
        rref_info = sync_rpc._rref_context_get_debug_info()
        agent_info = sync_rpc.api._get_current_rpc_agent().get_debug_info()
        autograd_info = sync_autograd._get_debug_info()
        union = sync_rpc._get_debug_info()
        out["disjoint"] = not (rref_info.keys() & agent_info.keys() & autograd_info.keys())
        out["union"] = union.keys() == (rref_info | agent_info | autograd_info).keys()
        out["pool"] = (agent_info["agent.thread_pool_size"], agent_info["agent.num_idle_threads"])
        # A local RRef counts once shared (test_rref_context_debug_info).
        local = sync_rpc.RRef(torch.ones(1))
        before = sync_rpc._rref_context_get_debug_info()
        out["local"] = (before["num_owner_rrefs"], before["num_pending_users"])
        sync_rpc.rpc_sync("worker1", keep_rref, args=(local,))
        deadline = time.monotonic() + 10
        while sync_rpc._rref_context_get_debug_info()["num_forks"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        shared = sync_rpc._rref_context_get_debug_info()
        out["shared"] = (shared["num_owner_rrefs"], shared["num_forks"])
        out["dropped"] = sync_rpc.rpc_sync("worker1", drop_rrefs)
        # RRef._get_future: the creation's future.
        made = sync_rpc.remote("worker1", echo, args=(3,))
        out["created"] = (made._get_future().wait(), made.to_here(), local._get_future().done())
        slow = sync_rpc.remote("worker2", blocking_sleep, args=(1.0,), timeout=0.05)
        with pytest.raises(rpc.RpcTimeoutError) as timed_out:
            slow._get_future().wait()
        out["creation_timeout"] = str(timed_out.value)
        with pytest.raises(RuntimeError) as use:
            slow.to_here()
        out["use_after_timeout"] = str(use.value)
        # _wait_all_workers: returns once every worker called it.
        others = [
            sync_rpc.rpc_async(f"worker{i}", wait_all_workers_then, args=(i,)) for i in (1, 2)
        ]
        sync_rpc.api._wait_all_workers()
        out["barrier"] = [f.wait() for f in others]
        # dist_autograd._new_context / _release_context / _get_max_id
        out["max_id"] = sync_autograd._get_max_id()
        ctx = sync_autograd._new_context()
        cid = ctx._context_id()
        out["current"] = sync_autograd._current_context()._context_id() == cid
        with pytest.raises(RuntimeError, match="Already have an autograd context id"):
            sync_autograd._new_context()
        sync_autograd._release_context(cid)
        with pytest.raises(RuntimeError, match=f"Could not find autograd context with id: {cid}"):
            sync_autograd._retrieve_context(cid)
        with pytest.raises(RuntimeError, match="doesn't have a valid autograd context"):
            sync_autograd._current_context()
        with pytest.raises(RuntimeError, match="Could not find autograd context with id"):
            sync_autograd._release_context(cid)
        with sync_autograd.context() as after:  # the thread may open one again
            out["again"] = after != cid
        return out

    return await asyncio.to_thread(run)


def test_torch_debug_info_rref_creation_and_context_names(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_torch_debug_and_creation_names)
    assert got["disjoint"] and got["union"]
    assert got["pool"][0] == 2 and 0 <= got["pool"][1] <= 2  # the group's num_worker_threads
    assert got["local"] == (0, 0)  # not counted until shared, as in torch
    assert got["shared"] == (1, 1) and got["dropped"] == 1
    assert got["created"] == (None, 3, True)
    # the call's timeout in torch's words too; a later use says it was the creation
    assert "RPC ran for more than set timeout (50 ms)" in got["creation_timeout"]
    assert got["use_after_timeout"].startswith("RRef creation via rpc.remote() timed out")
    assert got["barrier"] == [1, 2]
    assert got["max_id"] == (0 << 48) + 281474976710655  # worker0: torch's value
    assert got["current"] and got["again"]
