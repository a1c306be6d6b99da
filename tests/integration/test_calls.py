"""Calls between real worker processes: ``rpc_async``/``rpc_sync``, values,
errors, timeouts, introspection and registered functions.

Every test runs its checks on the module's shared three-worker service group
(``worker0``..``worker2``, see ``conftest.service``): a check is a module-level
``async def check_*(rank, world_size, ...)`` run on one worker (usually rank 0),
which returns what it observed; the assertions are made here, in the test
process. Functions called remotely are module-level so they pickle by name.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import dataclasses
import enum
import os
import sys
import threading
import time
import types
import uuid
import warnings
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from tests.integration.common import (
    async_sleep,
    attempt,
    await_outcome,
    blocking_sleep,
    call_outcome,
    echo,
    echo_async,
    whoami,
)
from tests.integration.harness import WorkerGroup

pytestmark = pytest.mark.timeout(90)

WORKERS = ("worker0", "worker1", "worker2")


# --------------------------------------------------------------------- remote functions


def combine(a: int, b: int = 10, *rest: int, scale: int = 1, **extra: Any) -> tuple[Any, ...]:
    return (a + b + sum(rest)) * scale, extra, rpc.get_worker_info().name


def thread_facts() -> tuple[str, bool]:
    return rpc.get_worker_info().name, threading.current_thread() is threading.main_thread()


async def async_thread_facts() -> tuple[str, bool]:
    await asyncio.sleep(0)
    return rpc.get_worker_info().name, threading.current_thread() is threading.main_thread()


def affine(i: int, k: int = 1) -> int:
    return i * k + 1


async def async_affine(i: int, k: int = 1) -> int:
    return i * k + 2


async def hop_async(route: list[str], value: int) -> tuple[list[str], int]:
    """Awaited on the callee's loop; forwards with rpc_async along ``route``."""
    me = rpc.get_worker_info().name
    if not route:
        return [me], value * 2
    path, result = await rpc.rpc_async(route[0], hop_async, args=(route[1:], value + 1))
    return [me, *path], result


def hop_sync(route: list[str], value: int) -> tuple[list[tuple[str, bool]], int]:
    """Runs in the callee's thread pool; forwards with the blocking rpc_sync."""
    me = (rpc.get_worker_info().name, threading.current_thread() is threading.main_thread())
    if not route:
        return [me], value * 2
    path, result = rpc.rpc_sync(route[0], hop_sync, args=(route[1:], value + 1))
    return [me, *path], result


def hop_sync_then_async(target: str, value: int) -> tuple[list[str], int]:
    """A plain function forwarding to an ``async def`` one with rpc_sync."""
    path, result = rpc.rpc_sync(target, hop_async, args=([], value + 1))
    return [rpc.get_worker_info().name, *path], result


async def rpc_sync_on_loop(target: str) -> Any:
    """An async remote function wrongly using the blocking form on its loop."""
    return rpc.rpc_sync(target, whoami)


class CustomError(Exception):
    pass


def raise_value_error(message: str) -> None:
    raise ValueError(message)


async def raise_custom_async(message: str) -> None:
    await asyncio.sleep(0)
    raise CustomError(message)


def raise_key_error() -> None:
    _ = {}["missing"]


async def relay_error(route: list[str], message: str) -> None:
    if not route:
        raise_value_error(message)
    await rpc.rpc_async(route[0], relay_error, args=(route[1:], message))


GHOST_MODULE = "tests_integration_ghost_module"


def ghost_class() -> type:
    """A class of a module that exists only in this process (not importable elsewhere)."""
    module = sys.modules.get(GHOST_MODULE)
    if module is None:
        module = types.ModuleType(GHOST_MODULE)
        exec("class Ghost:\n    pass\n", module.__dict__)
        sys.modules[GHOST_MODULE] = module
    return module.Ghost  # type: ignore[no-any-return]


def return_ghost() -> Any:
    return ghost_class()()


def make_lock() -> threading.Lock:
    return threading.Lock()  # cannot be pickled: the result cannot travel


def debug_info_here() -> dict[str, int]:
    return rpc.get_debug_info()


_GATES: dict[str, asyncio.Event] = {}


async def wait_gate(key: str, value: Any) -> Any:
    """Blocks (on the callee's loop) until ``open_gate(key)`` is called there."""
    await _GATES.setdefault(key, asyncio.Event()).wait()
    return value


async def open_gate(key: str) -> None:
    _GATES.setdefault(key, asyncio.Event()).set()


def tensor_facts(t: torch.Tensor) -> dict[str, Any]:
    """How a tensor arrived: its metadata, bits and storage footprint."""
    return {
        "dtype": t.dtype,
        "shape": tuple(t.shape),
        "bits": bits(t),
        "storage_nbytes": t.untyped_storage().nbytes(),
        "storage_offset": t.storage_offset(),
        "own_nbytes": t.numel() * t.element_size(),
    }


def bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements, in logical order (bit-exact comparisons)."""
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def int_checksum(t: torch.Tensor) -> int:
    return int(t.view(torch.int32).to(torch.int64).sum())


VIEW_BASE_SHAPE = (300, 400)


def view_base() -> torch.Tensor:
    return torch.arange(VIEW_BASE_SHAPE[0] * VIEW_BASE_SHAPE[1], dtype=torch.float32).reshape(
        VIEW_BASE_SHAPE
    )


def make_views() -> dict[str, torch.Tensor]:
    """Views of a 480 kB local tensor, each far smaller than its base."""
    base = view_base()
    return {
        "strided": base[::7, 3::11],
        "transposed": base[:20, :30].t(),
        "offset_rows": base[150:152],
        "column": base[:, 7],
        "scalar_element": base[5, 5],
        "expanded": base[0, :4].expand(5, 4),
    }


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclasses.dataclass
class Record:
    name: str
    tags: tuple[str, ...]
    point: Point
    tensor: torch.Tensor | None = None


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@rpc.register
def registered_scale(t: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return t * factor


@rpc.register(name="tests.integration.concat")
async def registered_concat(a: str, b: str) -> str:
    await asyncio.sleep(0)
    return f"{a}{b}@{rpc.get_worker_info().name}"


def plain_pow(x: int, p: int) -> int:
    return x**p


rpc.register(plain_pow, name="tests.integration.pow")


async def noop(rank: int, world_size: int) -> int:
    """Imports this module (and so runs its ``rpc.register`` calls) on a worker."""
    return rank


# ----------------------------------------------------------------------------- helpers


def type_tree(value: Any) -> Any:
    """The types of ``value`` and everything inside it, in order."""
    if isinstance(value, dict):
        return (dict, [(type_tree(k), type_tree(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value), [type_tree(v) for v in value])
    if isinstance(value, set | frozenset):
        return (type(value), sorted(repr(type_tree(v)) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [type_tree(getattr(value, f.name)) for f in dataclasses.fields(value)]
        return (type(value), fields)
    return type(value)


# ------------------------------------------------------------------------ basic calls


async def check_builtins(rank: int, world_size: int) -> dict[str, Any]:
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.full((2, 3), 0.25)
    return {
        "a": a,
        "b": b,
        "add": await rpc.rpc_async("worker1", torch.add, args=(a, b)),
        "add_alpha": await rpc.rpc_async("worker2", torch.add, args=(a, b), kwargs={"alpha": 3}),
        "matmul": await rpc.rpc_async("worker1", torch.matmul, args=(a, b.t())),
        "ones": await rpc.rpc_async(2, torch.ones, args=(2, 2), kwargs={"dtype": torch.int64}),
        "sync_add": await asyncio.to_thread(rpc.rpc_sync, "worker2", torch.add, (a, 1)),
    }


def test_builtin_torch_functions(service: WorkerGroup) -> None:
    got = service.call(0, check_builtins)
    a, b = got["a"], got["b"]
    assert torch.equal(got["add"], a + b)
    assert torch.equal(got["add_alpha"], torch.add(a, b, alpha=3))
    assert torch.equal(got["matmul"], a @ b.t())
    assert got["ones"].dtype == torch.int64 and torch.equal(got["ones"], torch.ones(2, 2).long())
    assert torch.equal(got["sync_add"], a + 1)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # (TorchScript is, in torch 2.13)

    @torch.jit.script
    def script_add(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        return torch.add(t1, t2)

    def _double(t: torch.Tensor) -> torch.Tensor:
        return t * 2

    # Under another name than its own: found by its qualified name.
    script_add_renamed = torch.jit.script(_double)


def apply(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def check_script_functions(rank: int, world_size: int) -> dict[str, Any]:
    from aiorpc_autograd import dist_autograd

    a, b = torch.arange(6.0).view(2, 3), torch.full((2, 3), 0.5)
    out: dict[str, Any] = {
        "call": await rpc.rpc_async("worker1", script_add, args=(a, b)),
        "remote": await rpc.remote("worker2", script_add, args=(a, torch.ones(3))).to_here(),
        "as_argument": await rpc.rpc_async("worker1", apply, args=(script_add, a, b)),
        "returned": await rpc.rpc_async("worker2", echo, args=(script_add,)) is script_add,
        "renamed": await rpc.rpc_async("worker1", script_add_renamed, args=(a,)),
    }
    t1, t2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    async with dist_autograd.context() as cid:
        y = await rpc.rpc_async("worker1", script_add, args=(t1, t2 * 3))
        await dist_autograd.backward(cid, [(y * y).sum()])
        grads = dist_autograd.get_gradients(cid)
        out["grads"] = (grads[t1], grads[t2], y.detach())
    return out


def test_torchscript_functions_are_called_by_name(service: WorkerGroup) -> None:
    """A ``@torch.jit.script`` function (which pickle refuses) travels by its
    qualified name, as torch's RPC sends a script call; the callee has it
    from the same module."""
    got = service.call(0, check_script_functions)
    a, b = torch.arange(6.0).view(2, 3), torch.full((2, 3), 0.5)
    assert torch.equal(got["call"], a + b) and torch.equal(got["as_argument"], a + b)
    assert torch.equal(got["remote"], a + 1)
    assert got["returned"] is True
    assert torch.equal(got["renamed"], a * 2)
    g1, g2, y = got["grads"]
    assert torch.equal(y, a + 3 * b)
    assert torch.equal(g1, 2 * y) and torch.equal(g2, 6 * y)


async def check_python_functions(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["positional"] = await rpc.rpc_async("worker1", combine, args=(1,))
    out["list_args"] = await rpc.rpc_async("worker1", combine, args=[1, 2, 3, 4])
    out["kwargs"] = await rpc.rpc_async(
        "worker2", combine, args=(1,), kwargs={"b": 5, "scale": 2, "tag": "x"}
    )
    out["kwargs_only"] = await rpc.rpc_async("worker2", combine, kwargs={"a": 7})
    out["no_args"] = await rpc.rpc_async("worker1", whoami)
    out["class"] = await rpc.rpc_async("worker1", Point, args=(1,), kwargs={"y": 2})
    out["plain_thread"] = await rpc.rpc_async("worker1", thread_facts)
    out["async_thread"] = await rpc.rpc_async("worker1", async_thread_facts)
    # A blocking plain function does not stop the callee's loop from serving.
    slow = rpc.rpc_async("worker1", blocking_sleep, args=(3.0, "slow"))
    started = time.monotonic()
    out["fast_while_slow"] = await rpc.rpc_async("worker1", echo_async, args=("fast",))
    out["fast_elapsed"] = time.monotonic() - started
    out["slow_done_early"] = slow.done()
    out["slow"] = await slow
    return out


def test_python_functions_args_and_kwargs(service: WorkerGroup) -> None:
    got = service.call(0, check_python_functions)
    assert got["positional"] == (11, {}, "worker1")
    assert got["list_args"] == (10, {}, "worker1")
    assert got["kwargs"] == (12, {"tag": "x"}, "worker2")
    assert got["kwargs_only"] == (17, {}, "worker2")
    assert got["no_args"][0] == rpc.WorkerInfo("worker1", 1)
    assert got["class"] == Point(1, 2)
    # Plain functions run in the callee's thread pool, async ones on its loop.
    assert got["plain_thread"] == ("worker1", False)
    assert got["async_thread"] == ("worker1", True)
    assert got["fast_while_slow"] == "fast"
    assert got["fast_elapsed"] < 2.0 and not got["slow_done_early"]
    assert got["slow"] == "slow"


async def check_to_forms(rank: int, world_size: int) -> dict[str, Any]:
    info2 = rpc.get_worker_info("worker2")
    me = rpc.get_worker_info()
    return {
        "peer": [await rpc.rpc_async(to, whoami) for to in ("worker2", 2, info2)],
        "self": [await rpc.rpc_async(to, whoami) for to in ("worker0", 0, me)],
        "self_tensor": await rpc.rpc_async(me, torch.mul, args=(torch.arange(4), 3)),
        "self_sync": await asyncio.to_thread(rpc.rpc_sync, 0, whoami),
        "peer_sync": await asyncio.to_thread(rpc.rpc_sync, info2, whoami),
        "pid": os.getpid(),
    }


def test_to_by_name_rank_workerinfo_and_self(service: WorkerGroup) -> None:
    got = service.call(0, check_to_forms)
    peer_infos = {info for info, _ in got["peer"]}
    peer_pids = {pid for _, pid in got["peer"]}
    assert peer_infos == {rpc.WorkerInfo("worker2", 2)}
    assert len(peer_pids) == 1 and got["pid"] not in peer_pids
    assert got["self"] == [(rpc.WorkerInfo("worker0", 0), got["pid"])] * 3
    assert torch.equal(got["self_tensor"], torch.arange(4) * 3)
    assert got["self_sync"] == (rpc.WorkerInfo("worker0", 0), got["pid"])
    assert got["peer_sync"] == got["peer"][0]


async def check_nested(rank: int, world_size: int) -> dict[str, Any]:
    return {
        # worker0 -> worker1 -> worker2, each hop an async def awaiting rpc_async
        "async": await rpc.rpc_async("worker1", hop_async, args=(["worker2"], 1)),
        # ... and back to the caller, which keeps serving while it awaits
        "async_back": await rpc.rpc_async("worker1", hop_async, args=(["worker2", "worker0"], 1)),
        # plain functions in the callees' thread pools using the blocking rpc_sync
        "sync": await rpc.rpc_async("worker1", hop_sync, args=(["worker2"], 1)),
        "sync_back": await rpc.rpc_async("worker1", hop_sync, args=(["worker2", "worker0"], 1)),
        "sync_then_async": await rpc.rpc_async("worker2", hop_sync_then_async, args=("worker1", 5)),
    }


def test_nested_calls_a_b_c(service: WorkerGroup) -> None:
    got = service.call(0, check_nested)
    assert got["async"] == (["worker1", "worker2"], 4)
    assert got["async_back"] == (["worker1", "worker2", "worker0"], 6)
    assert got["sync"] == ([("worker1", False), ("worker2", False)], 4)
    assert got["sync_back"] == ([("worker1", False), ("worker2", False), ("worker0", False)], 6)
    assert got["sync_then_async"] == (["worker2", "worker1"], 12)


async def check_rpc_sync_on_loop(rank: int, world_size: int) -> dict[str, Any]:
    started = time.monotonic()
    local = call_outcome(rpc.rpc_sync, "worker1", whoami)
    elapsed = time.monotonic() - started
    return {
        "local": local,
        "elapsed": elapsed,
        "pending_after": rpc.get_debug_info()["num_pending_requests"],
        "remote": await attempt("worker1", rpc_sync_on_loop, args=("worker2",)),
        "off_loop": await asyncio.to_thread(rpc.rpc_sync, "worker1", whoami),
    }


def test_rpc_sync_on_the_loop_thread_raises(service: WorkerGroup) -> None:
    got = service.call(0, check_rpc_sync_on_loop)
    assert isinstance(got["local"], RuntimeError), got["local"]
    assert got["elapsed"] < 1.0 and got["pending_after"] == 0
    # Inside an async remote function it raises there, and travels back.
    assert isinstance(got["remote"], rpc.RemoteError) and isinstance(got["remote"], RuntimeError)
    assert got["remote"].worker == "worker1" and got["remote"].type_name == "RuntimeError"
    assert got["off_loop"][0] == rpc.WorkerInfo("worker1", 1)


async def check_many_concurrent(rank: int, world_size: int, n: int) -> dict[str, Any]:
    futures = []
    for i in range(n):
        to = WORKERS[i % 3]
        if i % 5 == 0:
            futures.append(rpc.rpc_async(to, torch.add, args=(torch.tensor([i]), 1)))
        elif i % 5 == 1:
            futures.append(rpc.rpc_async(to, async_affine, args=(i,), kwargs={"k": 3}))
        else:
            futures.append(rpc.rpc_async(to, affine, args=(i,), kwargs={"k": 3}))
    all_futures = all(isinstance(f, asyncio.Future) for f in futures)
    pending = rpc.get_debug_info()["num_pending_requests"]
    results = await asyncio.gather(*futures)
    return {
        "all_futures": all_futures,
        "pending_while_in_flight": pending,
        "results": [r.tolist() if isinstance(r, torch.Tensor) else r for r in results],
        "pending_after": rpc.get_debug_info()["num_pending_requests"],
    }


def test_500_concurrent_calls(service: WorkerGroup) -> None:
    n = 500
    got = service.call(0, check_many_concurrent, n)
    expected = [[i + 1] if i % 5 == 0 else 3 * i + (2 if i % 5 == 1 else 1) for i in range(n)]
    assert got["all_futures"]
    assert got["results"] == expected
    # rpc_async sent every call before any reply could be read.
    assert got["pending_while_in_flight"] == n
    assert got["pending_after"] == 0


# ----------------------------------------------------------------------------- values


async def check_large_tensor(rank: int, world_size: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(16 * 1024 * 1024, generator=gen)  # 64 MiB of float32
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
    x[1_000_003::2_000_003][: len(specials)] = specials
    started = time.monotonic()
    y = await rpc.rpc_async("worker1", echo, args=(x,))
    elapsed = time.monotonic() - started
    return {
        "nbytes": x.numel() * x.element_size(),
        "dtype": y.dtype,
        "shape": tuple(y.shape),
        "bit_exact": torch.equal(x.view(torch.int32), y.view(torch.int32)),
        "callee_checksum": await rpc.rpc_async("worker2", int_checksum, args=(x,)),
        "checksum": int_checksum(x),
        "elapsed": elapsed,
    }


def test_64mib_tensor_round_trip_bit_exact(service: WorkerGroup) -> None:
    got = service.call(0, check_large_tensor, timeout=60)
    assert got["nbytes"] == 64 * 1024 * 1024
    assert got["dtype"] == torch.float32 and got["shape"] == (16 * 1024 * 1024,)
    assert got["bit_exact"]
    assert got["callee_checksum"] == got["checksum"]


def dtype_samples() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    int64 = torch.randint(-(2**40), 2**40, (3, 5), dtype=torch.int64, generator=gen)
    int64[0, :2] = torch.tensor([torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max])
    return {
        "bfloat16": torch.randn(4, 6, generator=gen).to(torch.bfloat16),
        "bool": torch.rand(3, 7, generator=gen) > 0.5,
        "complex64": torch.randn(5, 3, dtype=torch.complex64, generator=gen),
        "int64": int64,
        "float16": torch.randn(9, generator=gen).to(torch.float16),
        "float64": torch.randn(2, 2, 2, dtype=torch.float64, generator=gen),
        "uint8": torch.randint(0, 256, (17,), dtype=torch.uint8, generator=gen),
        "int8": torch.randint(-128, 128, (4, 4), dtype=torch.int8, generator=gen),
        "complex128": torch.randn(3, dtype=torch.complex128, generator=gen),
        "zero_dim": torch.tensor(3.5),
        "empty": torch.empty(0, 4, dtype=torch.int64),
    }


async def check_dtypes_and_views(rank: int, world_size: int) -> dict[str, Any]:
    samples = dtype_samples()
    base = view_base()
    views = make_views()
    return {
        "echoed": await rpc.rpc_async("worker1", echo, args=(samples,)),
        "callee_sees": {
            name: await rpc.rpc_async("worker2", tensor_facts, args=(t,))
            for name, t in {**samples, **views}.items()
        },
        "returned_views": await rpc.rpc_async("worker1", make_views),
        "views_sent": {name: bits(v) for name, v in views.items()},
        "shared_base": await rpc.rpc_async("worker2", echo, args=((base[0], base[0, 1:3]),)),
    }


def test_dtypes_and_views_round_trip(service: WorkerGroup) -> None:
    got = service.call(0, check_dtypes_and_views)
    samples = dtype_samples()
    for name, t in samples.items():
        back = got["echoed"][name]
        assert back.dtype == t.dtype and back.shape == t.shape, name
        assert bits(back) == bits(t), name
        seen = got["callee_sees"][name]
        assert (seen["dtype"], seen["shape"], seen["bits"]) == (t.dtype, tuple(t.shape), bits(t))
    # A view travels as a compact tensor of its own elements, in both directions.
    expected_views = make_views()
    for name, view in expected_views.items():
        seen = got["callee_sees"][name]
        assert seen["shape"] == tuple(view.shape) and seen["bits"] == bits(view), name
        assert seen["storage_nbytes"] <= seen["own_nbytes"], (name, seen)
        assert seen["storage_offset"] == 0, name
        back = got["returned_views"][name]
        assert back.shape == view.shape and torch.equal(back, view), name
        assert back.untyped_storage().nbytes() <= back.numel() * back.element_size(), name
    row, part = got["shared_base"]
    assert torch.equal(row, view_base()[0]) and torch.equal(part, view_base()[0, 1:3])


VALUE: dict[Any, Any] = {
    "tuple": (1, "two", (3.0, None)),
    "list": [1, [2, (3,)]],
    1: "int key",
    2.5: "float key",
    (1, "a"): "tuple key",
    None: "none key",
    b"raw": "bytes key",
    frozenset({1, 2}): "frozenset key",
    Point(0, 1): "dataclass key",
    "set": {1, 2, 3},
    "bytes": b"\x00\xff",
    "bytearray": bytearray(b"ab"),
    "big": 2**100,
    "negative_big": -(2**70),
    "inf": float("inf"),
    "complex": 1 + 2j,
    "text": "héllo ✓",
    "empties": [(), [], {}, "", b""],
    "bool": (True, False),
    "point": Point(1, 2),
    "record": Record("r", ("a", "b"), Point(3, 4)),
    "enum": Color.BLUE,
    "range": range(2, 9, 3),
    "decimal": Decimal("1.10"),
    "fraction": Fraction(1, 3),
    "int_dict": {1: {2: (3,)}},
}


async def type_tree_here(value: Any) -> Any:
    return type_tree(value)


async def check_python_values(rank: int, world_size: int) -> dict[str, Any]:
    tensor = torch.arange(5)
    with_tensors = {
        "t": tensor,
        "l": [tensor * 2, (tensor * 3,)],
        "rec": Record("t", (), Point(0, 0), tensor),
    }
    return {
        "back": await rpc.rpc_async("worker1", echo, args=(VALUE,)),
        "callee_tree": await rpc.rpc_async("worker2", type_tree_here, args=(VALUE,)),
        "kwarg_back": await rpc.rpc_async("worker2", echo_async, kwargs={"value": VALUE}),
        "with_tensors": await rpc.rpc_async("worker1", echo, args=(with_tensors,)),
        "top_level_tuple": await rpc.rpc_async("worker1", echo, args=((1, 2),)),
    }


def test_non_tensor_values_round_trip_as_pickle(service: WorkerGroup) -> None:
    got = service.call(0, check_python_values)
    expected_tree = type_tree(VALUE)
    for key in ("back", "kwarg_back"):
        assert got[key] == VALUE
        assert type_tree(got[key]) == expected_tree  # tuples stay tuples, keys keep types
        assert got[key]["enum"] is Color.BLUE
    assert got["callee_tree"] == expected_tree
    assert type(got["top_level_tuple"]) is tuple
    back = got["with_tensors"]
    tensor = torch.arange(5)
    assert torch.equal(back["t"], tensor)
    assert type(back["l"][1]) is tuple and torch.equal(back["l"][1][0], tensor * 3)
    assert isinstance(back["rec"], Record) and torch.equal(back["rec"].tensor, tensor)


# ----------------------------------------------------------------------------- errors


async def check_remote_errors(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        await rpc.rpc_async("worker1", raise_value_error, args=("bad value 42",))
    except ValueError as exc:  # a remote ValueError is caught as one
        out["value"] = exc
    out["custom"] = await attempt("worker2", raise_custom_async, args=("custom!",))
    out["key"] = await attempt("worker1", raise_key_error)
    out["nested"] = await attempt("worker1", relay_error, args=(["worker2"], "deep failure"))
    out["sync"] = await asyncio.to_thread(
        call_outcome, rpc.rpc_sync, "worker2", raise_value_error, ("from rpc_sync",)
    )
    out["unpicklable_result"] = await attempt("worker1", make_lock)
    out["unpicklable_arg"] = await attempt("worker1", echo, args=(threading.Lock(),))
    # Values whose class the other side cannot import fail the call, nothing more.
    out["unimportable_arg"] = await attempt("worker1", echo, (ghost_class()(),))
    del sys.modules[GHOST_MODULE]
    out["unimportable_result"] = await attempt("worker2", return_ghost)
    out["still_serving"] = await rpc.rpc_async("worker1", affine, args=(4,))
    return out


def test_remote_exceptions(service: WorkerGroup) -> None:
    got = service.call(0, check_remote_errors)
    err = got["value"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, ValueError)
    assert err.worker == "worker1"
    assert err.type_name == "ValueError"
    assert err.remote_message == "bad value 42"
    assert "raise_value_error" in err.remote_traceback
    assert "ValueError: bad value 42" in err.remote_traceback
    assert "worker1" in str(err) and "bad value 42" in str(err)

    custom = got["custom"]
    # A user's exception class the caller has too: also an instance of it
    # (torch re-raises that type); the message and traceback as for any.
    assert isinstance(custom, rpc.RemoteError) and isinstance(custom, CustomError)
    assert not isinstance(custom, ValueError)
    assert custom.type_name == f"{CustomError.__module__}.CustomError"
    assert (custom.worker, custom.remote_message) == ("worker2", "custom!")
    assert "raise_custom_async" in custom.remote_traceback

    key = got["key"]
    assert isinstance(key, rpc.RemoteError) and isinstance(key, KeyError)
    assert key.remote_message == "'missing'"

    # A failure two hops away names the worker where it was raised.
    nested = got["nested"]
    assert isinstance(nested, rpc.RemoteError) and isinstance(nested, ValueError)
    assert (nested.worker, nested.remote_message) == ("worker2", "deep failure")

    sync = got["sync"]
    assert isinstance(sync, rpc.RemoteError) and isinstance(sync, ValueError)
    assert (sync.worker, sync.remote_message) == ("worker2", "from rpc_sync")

    # A result that cannot travel fails the call instead of hanging it.
    assert isinstance(got["unpicklable_result"], rpc.RpcError), got["unpicklable_result"]
    assert "lock" in str(got["unpicklable_result"]).lower()
    assert isinstance(got["unpicklable_arg"], TypeError), got["unpicklable_arg"]
    arg = got["unimportable_arg"]
    assert isinstance(arg, rpc.RemoteError) and isinstance(arg, ModuleNotFoundError), arg
    assert arg.worker == "worker1" and GHOST_MODULE in arg.remote_message
    assert isinstance(got["unimportable_result"], Exception), got["unimportable_result"]
    assert GHOST_MODULE in str(got["unimportable_result"])
    assert got["still_serving"] == 5


# Checked elsewhere: the Unicode errors need more constructor arguments
# (test_remote_builtin_errors_that_are_hard_to_rebuild); StopIteration and
# StopAsyncIteration arrive as plain RemoteError, since no future can hold them
# (test_faults.test_plain_function_raising_stop_iteration).
NOT_HERE = {
    "StopAsyncIteration",
    "StopIteration",
    "UnicodeDecodeError",
    "UnicodeEncodeError",
    "UnicodeTranslateError",
}
BUILTIN_EXCEPTIONS = sorted(
    {  # by class: IOError and EnvironmentError are OSError
        obj.__name__
        for obj in vars(builtins).values()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and not issubclass(obj, BaseExceptionGroup)
        and obj.__name__ not in NOT_HERE
    }
)


def raise_builtin(name: str) -> None:
    raise getattr(builtins, name)(f"a remote {name}")


async def raise_builtin_async(name: str) -> None:
    await asyncio.sleep(0)
    raise getattr(builtins, name)(f"a remote {name}")


class OnlyOnTheCaller:
    """Made importable on the caller only (see check_missing_on_callee)."""


async def check_missing_on_callee(rank: int, world_size: int) -> dict[str, Any]:
    """torch's test_function_not_on_callee: a function (or an argument's
    class) the callee's module lacks fails the call with torch's hint, and the
    callee keeps serving."""
    module = sys.modules[__name__]

    def only_here() -> int:
        return 1

    only_here.__qualname__ = only_here.__name__ = "only_on_the_caller"
    module.only_on_the_caller = only_here  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    try:
        out["function"] = await attempt("worker1", only_here)
        await rpc.rpc_async("worker1", _drop_attr, ("OnlyOnTheCaller",))
        out["argument"] = await attempt("worker1", echo, (OnlyOnTheCaller(),))
        out["after"] = await rpc.rpc_async("worker1", echo, ("still serving",))
    finally:
        del module.only_on_the_caller  # type: ignore[attr-defined]
        await rpc.rpc_async("worker1", _restore_attr, ("OnlyOnTheCaller",))
    return out


def _drop_attr(name: str) -> None:
    module = sys.modules[__name__]
    _DROPPED[name] = getattr(module, name)
    delattr(module, name)


def _restore_attr(name: str) -> None:
    setattr(sys.modules[__name__], name, _DROPPED.pop(name))


_DROPPED: dict[str, Any] = {}


def test_a_function_missing_on_the_callee_fails_with_torchs_hint(service: WorkerGroup) -> None:
    got = service.call(0, check_missing_on_callee)
    for key in ("function", "argument"):
        error = got[key]
        assert isinstance(error, rpc.RemoteError) and isinstance(error, AttributeError), error
        assert isinstance(error, RuntimeError)  # torch: assertRaisesRegex(RuntimeError, ...)
        assert "RPC pickler does not serialize function code" in str(error), error
    assert got["after"] == "still serving"


async def check_builtin_exceptions(rank: int, world_size: int) -> dict[str, Any]:
    return {
        (func.__name__, name): await attempt("worker1", func, (name,), timeout=10)
        for func in (raise_builtin, raise_builtin_async)
        for name in BUILTIN_EXCEPTIONS
    }


def test_remote_error_of_every_builtin_exception_type(service: WorkerGroup) -> None:
    got = service.call(0, check_builtin_exceptions)
    wrong = {}
    for (func, name), err in got.items():
        cls = getattr(builtins, name)
        ok = (
            isinstance(err, rpc.RemoteError)
            and isinstance(err, cls)
            and err.type_name == name
            and err.worker == "worker1"
        )
        if not ok:
            wrong[(func, name)] = repr(err)
    assert not wrong


def raise_hard_builtin(name: str) -> None:
    if name == "MemoryError":
        raise MemoryError("out of memory")
    if name == "UnicodeDecodeError":
        b"\xff".decode("utf-8")
    if name == "UnicodeEncodeError":
        "\xe9".encode("ascii")
    if name == "UnicodeTranslateError":
        raise UnicodeTranslateError("\xe9", 0, 1, "cannot translate")


HARD_BUILTINS = ["MemoryError", "UnicodeDecodeError", "UnicodeEncodeError", "UnicodeTranslateError"]


async def check_hard_builtins(rank: int, world_size: int) -> dict[str, Any]:
    async def one(name: str) -> tuple[Any, float, Any]:
        bystander = rpc.rpc_async("worker1", async_sleep, args=(0.5, "bystander"), timeout=5)
        started = time.monotonic()
        try:  # bounded from outside too: the call's own timeout was lost once
            err = await asyncio.wait_for(
                attempt("worker1", raise_hard_builtin, (name,), timeout=1), 3
            )
        except TimeoutError:
            err = "no answer, not even its RpcTimeoutError after 1s"
        return err, time.monotonic() - started, await await_outcome(bystander)

    results = await asyncio.gather(*(one(name) for name in HARD_BUILTINS))
    return dict(zip(HARD_BUILTINS, results, strict=True))


def test_remote_builtin_errors_that_are_hard_to_rebuild(service: WorkerGroup) -> None:
    # Regression: errors.remote_error() raised TypeError for these types inside
    # the caller's frame handler; the call never resolved (its timer was already
    # cancelled) and the connection was dropped with every call on it.
    got = service.call(0, check_hard_builtins)
    for name, (err, elapsed, bystander) in got.items():
        assert isinstance(err, rpc.RemoteError), (name, err)
        assert isinstance(err, getattr(builtins, name)) and err.type_name == name, (name, err)
        assert elapsed < 1.0, (name, elapsed)
        assert bystander == "bystander", (name, bystander)


async def check_timeouts(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = time.monotonic()
    out["async"] = await attempt("worker1", async_sleep, args=(3.0, "late"), timeout=0.3)
    out["async_elapsed"] = time.monotonic() - started
    started = time.monotonic()
    out["plain"] = await attempt("worker2", blocking_sleep, args=(3.0, "late"), timeout=0.3)
    out["plain_elapsed"] = time.monotonic() - started
    out["sync"] = await asyncio.to_thread(
        call_outcome, rpc.rpc_sync, "worker1", async_sleep, (3.0,), None, 0.3
    )
    out["pending_after"] = rpc.get_debug_info()["num_pending_requests"]
    # timeout=0 means no timeout (not "expire at once")
    out["no_timeout"] = await rpc.rpc_async("worker1", async_sleep, args=(0.8, "done"), timeout=0)
    out["still_serving"] = await rpc.rpc_async("worker1", torch.add, args=(1, 2), timeout=5)
    return out


def test_timeouts(service: WorkerGroup) -> None:
    got = service.call(0, check_timeouts)
    for key in ("async", "plain", "sync"):
        err = got[key]
        assert isinstance(err, rpc.RpcTimeoutError), (key, err)
        assert isinstance(err, TimeoutError) and isinstance(err, rpc.RpcError)
    assert 0.25 <= got["async_elapsed"] < 2.5  # the call itself takes 3s
    assert 0.25 <= got["plain_elapsed"] < 2.5  # the call itself takes 3s
    assert got["pending_after"] == 0
    assert got["no_timeout"] == "done"
    assert got["still_serving"] == 3


async def check_unknown_workers(rank: int, world_size: int) -> dict[str, Any]:
    targets = {
        "name": "nobody",
        "rank": 7,
        "negative_rank": -1,
        "info": rpc.WorkerInfo("ghost", 1),
        "info_wrong_id": rpc.WorkerInfo("worker1", 2),
        "float_rank": 1.5,  # torch: ValueError
    }
    out = {key: await attempt(to, whoami) for key, to in targets.items()}
    out["sync"] = await asyncio.to_thread(call_outcome, rpc.rpc_sync, "nobody", whoami)
    out["pending_after"] = rpc.get_debug_info()["num_pending_requests"]
    return out


def test_unknown_worker_is_value_error(service: WorkerGroup) -> None:
    got = service.call(0, check_unknown_workers)
    for key in ("name", "rank", "negative_rank", "info", "info_wrong_id", "sync", "float_rank"):
        assert isinstance(got[key], ValueError), (key, got[key])
        assert isinstance(got[key], RuntimeError), (key, got[key])
        if key != "float_rank":  # torch's RuntimeError("... could not find destination")
            assert "could not find destination" in str(got[key]), (key, got[key])
    assert "nobody" in str(got["name"])
    assert got["pending_after"] == 0


# ---------------------------------------------------------------------- introspection


async def check_worker_info(rank: int, world_size: int) -> dict[str, Any]:
    me = rpc.get_worker_info()
    frozen = []
    for attr in ("name", "id"):
        try:
            setattr(me, attr, "x")
        except AttributeError:
            frozen.append(attr)
    peer = (rank + 1) % world_size
    return {
        "rank": rank,
        "me": me,
        "named": {name: rpc.get_worker_info(name) for name in WORKERS},
        "unknown": call_outcome(rpc.get_worker_info, "nobody"),
        "frozen": frozen,
        "hash_lookup": {me: "found"}[rpc.get_worker_info(me.name)],
        "through_rpc": await rpc.rpc_async(peer, echo, args=(me,)),
        "is_workerinfo": isinstance(me, rpc.WorkerInfo),
    }


def test_get_worker_info(service: WorkerGroup) -> None:
    everyone = service.call_all(check_worker_info)
    expected = {name: rpc.WorkerInfo(name, i) for i, name in enumerate(WORKERS)}
    for got in everyone:
        rank = got["rank"]
        assert got["me"] == rpc.WorkerInfo(f"worker{rank}", rank)
        assert got["me"].id == rank and got["me"].name == f"worker{rank}"
        assert got["is_workerinfo"]
        assert got["named"] == expected
        assert isinstance(got["unknown"], ValueError)
        assert isinstance(got["unknown"], RuntimeError)
        assert "could not find destination" in str(got["unknown"])
        assert got["frozen"] == ["name", "id"]
        assert got["hash_lookup"] == "found"
        assert got["through_rpc"] == got["me"]
        assert isinstance(got["through_rpc"], rpc.WorkerInfo)
    info = rpc.WorkerInfo(name="a", id=3)
    assert info == rpc.WorkerInfo("a", 3) and hash(info) == hash(rpc.WorkerInfo("a", 3))
    assert len({info, rpc.WorkerInfo("a", 3), rpc.WorkerInfo("b", 3)}) == 2


async def check_debug_info(rank: int, world_size: int) -> dict[str, Any]:
    key = uuid.uuid4().hex
    before = rpc.get_debug_info()
    futures = [rpc.rpc_async("worker1", wait_gate, args=(key, i), timeout=20) for i in range(5)]
    right_after = rpc.get_debug_info()
    await asyncio.sleep(0.3)  # the calls now wait on worker1
    while_served = rpc.get_debug_info()
    callee = await rpc.rpc_async("worker1", debug_info_here)
    await rpc.rpc_async("worker1", open_gate, args=(key,))
    values = await asyncio.gather(*futures)
    return {
        "before": before,
        "right_after": right_after,
        "while_served": while_served,
        "callee": callee,
        "values": values,
        "after": rpc.get_debug_info(),
    }


def test_get_debug_info_counts_pending_requests(service: WorkerGroup) -> None:
    got = service.call(0, check_debug_info)
    keys = {"num_pending_requests", "num_owner_rrefs", "num_user_rrefs", "num_connections"}
    for snapshot in ("before", "right_after", "while_served", "callee", "after"):
        info = got[snapshot]
        assert keys <= info.keys(), (snapshot, info)
        assert all(isinstance(info[k], int) for k in keys), (snapshot, info)
    assert got["before"]["num_pending_requests"] == 0
    assert got["right_after"]["num_pending_requests"] == 5
    assert got["while_served"]["num_pending_requests"] == 5
    assert got["callee"]["num_pending_requests"] == 0  # serving is not calling
    assert got["values"] == [0, 1, 2, 3, 4]
    assert got["after"]["num_pending_requests"] == 0
    assert got["while_served"]["num_connections"] >= 1
    assert got["callee"]["num_connections"] >= 1


# ---------------------------------------------------------------- registered functions


async def check_registered(rank: int, world_size: int) -> dict[str, Any]:
    t = torch.arange(3)
    return {
        "scale": await rpc.rpc_async("worker1", "registered_scale", args=(t,)),
        "scale_kw": await rpc.rpc_async(
            "worker2", "registered_scale", args=(t,), kwargs={"factor": 5}
        ),
        "async": await rpc.rpc_async("worker2", "tests.integration.concat", args=("a", "b")),
        "pow": await rpc.rpc_async("worker1", "tests.integration.pow", args=(3, 4)),
        "self": await rpc.rpc_async("worker0", "tests.integration.pow", args=(2, 10)),
        "sync": await asyncio.to_thread(
            rpc.rpc_sync, "worker1", "tests.integration.concat", ("x", "y")
        ),
        "unknown": await attempt("worker1", "tests.integration.no_such_function"),
    }


def test_registered_functions_by_name(service: WorkerGroup) -> None:
    service.call_all(noop)  # the workers import this module, registering its functions
    got = service.call(0, check_registered)
    assert torch.equal(got["scale"], torch.arange(3) * 2)
    assert torch.equal(got["scale_kw"], torch.arange(3) * 5)
    assert got["async"] == "ab@worker2"
    assert got["pow"] == 81 and got["self"] == 1024
    assert got["sync"] == "xy@worker1"
    assert isinstance(got["unknown"], rpc.RemoteError), got["unknown"]
    assert "no_such_function" in str(got["unknown"])
    # The decorator returns the function itself; names are unique per process.
    assert registered_scale(torch.ones(1)).item() == 2
    with pytest.raises(ValueError):
        rpc.register(plain_pow, name="registered_scale")
    assert rpc.register(plain_pow, name="tests.integration.pow") is plain_pow


# ------------------------------------------------------------------- async functions

_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("_TAG", default="unset")


async def async_set_tag(value: str) -> str:
    # Finishes without suspending, in its own context.
    _TAG.set(value)
    return _TAG.get()


async def async_read_tag() -> str:
    return _TAG.get()


async def async_fail_before_await() -> None:
    raise KeyError("before any await")


async def async_fail_after_await() -> None:
    await asyncio.sleep(0.01)
    raise KeyError("after an await")


async def async_suspend_twice(value: int) -> int:
    await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    return value + 1


async def async_cancel_itself() -> None:
    raise asyncio.CancelledError


async def async_with_timeout(value: int) -> int:
    # asyncio.timeout needs the current task from the function's first step.
    async with asyncio.timeout(5):
        assert asyncio.current_task() is not None
        return value * 2


async def _failure(fut: Any) -> tuple[str, str]:
    exc = await await_outcome(fut)
    return type(exc).__name__, str(exc)


async def check_async_paths(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["set"] = await rpc.rpc_async("worker1", async_set_tag, args=("mine",))
    out["read_after"] = await rpc.rpc_async("worker1", async_read_tag)  # no leak between calls
    out["suspending"] = await asyncio.gather(
        *(rpc.rpc_async("worker1", async_suspend_twice, args=(i,)) for i in range(20))
    )
    out["fail_before"] = await _failure(rpc.rpc_async("worker1", async_fail_before_await))
    out["fail_after"] = await _failure(rpc.rpc_async("worker1", async_fail_after_await))
    out["cancelled"] = await _failure(rpc.rpc_async("worker1", async_cancel_itself))
    out["timeout_cm"] = await rpc.rpc_async("worker1", async_with_timeout, args=(21,))
    out["pending_after"] = rpc.get_debug_info()["num_pending_requests"]
    return out


def test_async_functions_with_and_without_suspending(service: WorkerGroup) -> None:
    got = service.call(0, check_async_paths)
    assert got["set"] == "mine" and got["read_after"] == "unset"
    assert got["suspending"] == [i + 1 for i in range(20)]
    # The remote KeyError arrives as a RemoteError that is also a KeyError.
    assert got["fail_before"][0] == "RemoteKeyError" and "before any await" in got["fail_before"][1]
    assert got["fail_after"][0] == "RemoteKeyError" and "after an await" in got["fail_after"][1]
    assert got["cancelled"][0] == "RemoteError" and "cancelled" in got["cancelled"][1]
    assert got["timeout_cm"] == 42
    assert got["pending_after"] == 0


# ------------------------------------------------------------------ busy polling


async def idle_cpu_seconds(settle: float, window: float) -> float:
    """CPU seconds this process uses over ``window`` seconds of idleness,
    starting ``settle`` seconds after this call arrived."""
    await asyncio.sleep(settle)
    cpu = time.process_time()
    await asyncio.sleep(window)
    return time.process_time() - cpu


async def check_idle_after_calls(rank: int, world_size: int) -> dict[str, float]:
    for i in range(50):
        assert await rpc.rpc_async("worker1", affine, args=(i, 1)) == affine(i, 1)
    # busy_poll (200 us by default) keeps each loop polling just after these
    # messages; then both sleep: a second of idleness costs next to no CPU.
    remote = rpc.rpc_async("worker1", idle_cpu_seconds, args=(0.1, 1.0))
    here = await idle_cpu_seconds(0.1, 1.0)
    return {"caller": here, "callee": await remote, "busy_poll": rpc.RpcOptions().busy_poll}


def test_busy_polling_stops_when_idle(service: WorkerGroup) -> None:
    got = service.call(0, check_idle_after_calls)
    assert got["busy_poll"] > 0
    # A loop spinning through the window would use about 1 s; heartbeats
    # and their short windows use a few ms.
    assert got["caller"] < 0.1, got
    assert got["callee"] < 0.1, got


_CALLEE_LOGS = """
import sys
from aiorpc_autograd.sync import rpc

def raise_func(n: int) -> None:
    raise ValueError("Expected error " + "x" * n)

opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{sys.argv[1]}")
rpc.init_rpc("w0", rank=0, world_size=1, rpc_backend_options=opts)
for n in (int(sys.argv[2]), 0):
    try:
        rpc.rpc_sync("w0", raise_func, args=(n,))
    except ValueError as exc:
        print("caller got", type(exc).__name__)
    print("-" * 10, file=sys.stderr, flush=True)
rpc.shutdown()
"""


def test_the_callee_logs_the_error_a_call_raised() -> None:
    """torch's test_py_raise_in_user_func: the worker that ran the function
    prints its error (repr and traceback) to stderr, with no logging set up
    (Python's last-resort handler), bounded in size."""
    import subprocess

    from tests.integration.harness import free_port

    cmd = [sys.executable, "-c", _CALLEE_LOGS, str(free_port()), "20000"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.count("caller got RemoteValueError") == 2, out
    long, short = out.stderr.split("-" * 10)[:2]
    assert "On worker 'w0':\nValueError('Expected error " in short, short
    assert "Traceback (most recent call last)" in short and "in raise_func" in short, short
    assert "On worker 'w0':\nValueError('Expected error xxx" in long, long[:200]
    assert 8192 < len(long) < 8192 + 200, len(long)  # cut at the bound
