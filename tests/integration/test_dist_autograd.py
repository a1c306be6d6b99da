"""Distributed autograd between real worker processes.

Gradient parity is the oracle. A *scenario* is a module-level ``async def``
that builds a computation through :func:`call` (a remote call in the
distributed run, a plain local call in the oracle run) and returns its roots;
every leaf comes from :func:`param`, which names it after the worker that owns
it. :func:`parity`, run on one worker of the module's shared four-worker
service group (``worker0``..``worker3``, see the ``group`` fixture), runs the
scenario twice in that process:

* once as the oracle, with every call made locally (``_ORACLE`` set: each
  ``param`` is a fresh leaf of the same values, and ``me()`` names the worker
  the call would have run on), and gradients from ``torch.autograd.grad``;
* once for real inside ``dist_autograd.context()``, then
  ``dist_autograd.backward``, then each owner's ``get_gradients`` collected over
  RPC (made outside the context, so the queries record nothing).

Assertions are made here in the test process on what the workers return.
Functions called remotely are module-level so they pickle by name.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.autograd import hold_grads
from tests.integration.conftest import close_shared_group, shared_group
from tests.integration.harness import WorkerGroup, barrier, run_processes

# Generous: the first test also waits for the group to start (spawning four
# interpreters that import torch takes tens of seconds on a loaded 2-core box);
# every check itself takes well under a second.
pytestmark = pytest.mark.timeout(150)

WORLD = 4


@pytest.fixture(scope="module")
def _group_holder() -> Iterator[dict[str, WorkerGroup]]:
    holder: dict[str, WorkerGroup] = {}
    yield holder
    close_shared_group(holder)


@pytest.fixture
def group(_group_holder: dict[str, WorkerGroup]) -> WorkerGroup:
    """Four workers (``worker0``..``worker3``) shared by this module's tests
    (three trainers and a parameter server need four); start-up is waited for
    here, not charged to the first check's call timeout."""
    return shared_group(_group_holder, WORLD, _all_ready)


def _all_ready(group: WorkerGroup) -> None:
    assert group.call_all(ready, timeout=120) == list(range(WORLD))


async def ready(rank: int, world_size: int) -> int:
    return rank


# ------------------------------------------------------------------ oracle plumbing

# Set in the oracle run: the table of oracle leaves by key.
_ORACLE: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
    "oracle", default=None
)
# In the oracle run: the worker a call would be running on.
_WHERE: contextvars.ContextVar[str | None] = contextvars.ContextVar("where", default=None)
# This process's leaves by key (the real run).
_PARAMS: dict[str, torch.Tensor] = {}


def me() -> str:
    """The name of the worker this code runs on (as the oracle pretends)."""
    where = _WHERE.get() if _ORACLE.get() is not None else None
    return where if where is not None else rpc.get_worker_info().name


def _leaf(key: str, make: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """The leaf ``key`` of this run (the oracle's or the real one), made once
    by ``make`` from a generator seeded by the key."""
    table = _ORACLE.get()
    if table is None:
        table = _PARAMS
    leaf = table.get(key)
    if leaf is None:
        made = make(torch.Generator().manual_seed(zlib.crc32(key.encode())))
        leaf = table.setdefault(key, made.requires_grad_())
    return leaf


def param(
    name: str, shape: Sequence[int] = (3,), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """This worker's leaf ``name`` (created once per process, same values
    everywhere for the same key); its key starts with the owner's name."""
    key = f"{me()}:{name}:{'x'.join(map(str, shape))}:{str(dtype).removeprefix('torch.')}"
    return _leaf(
        key, lambda g: (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    )


def sparse_param(name: str) -> torch.Tensor:
    """This worker's sparse COO leaf ``name``: 3x3 with three entries,
    uncoalesced as built (as PyTorch's RPC tests build theirs); otherwise as
    :func:`param`."""
    indices = [[0, 1, 1], [2, 0, 2]]
    return _leaf(
        f"{me()}:{name}:sparse",
        lambda g: torch.sparse_coo_tensor(
            indices, torch.randn(3, generator=g) * 0.7, (3, 3), check_invariants=True
        ),
    )


async def call(to: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``await rpc.rpc_async(to, fn, args)``; in the oracle run, ``fn(*args)`` here."""
    if _ORACLE.get() is None:
        return await rpc.rpc_async(to, fn, args=args)
    token = _WHERE.set(to)
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result
    finally:
        _WHERE.reset(token)


def call_sync(to: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``rpc.rpc_sync(to, fn, args)`` (off the loop); in the oracle run, ``fn(*args)``."""
    if _ORACLE.get() is None:
        return rpc.rpc_sync(to, fn, args=args)
    token = _WHERE.set(to)
    try:
        return fn(*args)
    finally:
        _WHERE.reset(token)


class _LocalRRef:
    """The oracle's stand-in for an RRef: holds the value here."""

    def __init__(self, value: Any) -> None:
        self.value = value

    async def to_here(self) -> Any:
        return self.value


async def remote(to: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``rpc.remote(to, fn, args)``; in the oracle run, a local stand-in."""
    if _ORACLE.get() is None:
        return rpc.remote(to, fn, args=args)
    return _LocalRRef(await call(to, fn, *args))


async def query(to: str | int, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` on ``to`` outside any autograd context (nothing is recorded)."""
    return await contextvars.Context().run(rpc.rpc_async, to, fn, args=args)


def ctx_info(context_id: int) -> dict[str, Any] | None:
    """This worker's view of a context: record counts and known workers (None: absent)."""
    try:
        ctx = dist_autograd.retrieve_context(context_id)
    except RuntimeError:
        return None
    return {
        "sends": len(ctx.send_functions()),
        "recvs": len(ctx.recv_functions()),
        "known": sorted(ctx.known_worker_ids()),
    }


def debug_info() -> dict[str, int]:
    return dist_autograd.get_debug_info()


def local_grads(context_id: int, keys: list[str]) -> dict[str, Any]:
    """The gradients of this worker's leaves ``keys`` in the context (None where
    none), and whether every ``.grad`` is still untouched."""
    try:
        grads = dist_autograd.get_gradients(context_id)
    except RuntimeError:
        grads = {}
    by_id = {id(t): g for t, g in grads.items()}
    leaves = [_PARAMS.get(k) for k in keys]
    # Concurrent passes over these leaves borrow their .grad while a job runs:
    # read it between jobs.
    with hold_grads([t for t in leaves if t is not None]):
        untouched = all(t is None or t.grad is None for t in leaves)
    return {
        "grads": {
            k: None if t is None else by_id.get(id(t)) for k, t in zip(keys, leaves, strict=True)
        },
        "untouched": untouched,
    }


def workers(world_size: int) -> list[str]:
    return [f"worker{i}" for i in range(world_size)]


async def all_debug_info(world_size: int) -> list[dict[str, int]]:
    return list(await asyncio.gather(*(query(w, debug_info) for w in workers(world_size))))


async def wait_everywhere(
    world_size: int, key: str, deadline_s: float = 10.0
) -> tuple[bool, list[dict[str, int]]]:
    """Poll every worker's ``get_debug_info`` until ``key`` is 0 everywhere."""
    end = time.monotonic() + deadline_s
    while True:
        infos = await all_debug_info(world_size)
        if all(info[key] == 0 for info in infos):
            return True, infos
        if time.monotonic() > end:
            return False, infos
        await asyncio.sleep(0.01)


Scenario = Callable[..., Awaitable[list[torch.Tensor]]]


async def parity(
    world_size: int,
    scenario: Scenario,
    *args: Any,
    repeat: int = 1,
    before_backward: Callable[[], Awaitable[Any]] | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` as the oracle and distributed; see the module docstring.

    ``repeat`` backward passes run in one context (``retain_graph=True`` for
    all but the last): the expected gradients are ``repeat`` times the oracle's.
    ``before_backward`` is awaited between the forward and the backward passes.
    """
    table: dict[str, torch.Tensor] = {}
    t_oracle, t_where = _ORACLE.set(table), _WHERE.set(me())
    try:
        roots = await scenario(*args)
        keys = sorted(table)
        oracle = torch.autograd.grad(roots, [table[k] for k in keys], allow_unused=True)
    finally:
        _ORACLE.reset(t_oracle)
        _WHERE.reset(t_where)
    expected = {k: None if g is None else g * repeat for k, g in zip(keys, oracle, strict=True)}

    async with dist_autograd.context() as cid:
        roots = await scenario(*args)
        if before_backward is not None:
            await before_backward()
        for i in range(repeat):
            await dist_autograd.backward(cid, roots, retain_graph=i < repeat - 1)
        names = workers(world_size)
        by_owner = {n: [k for k in keys if k.split(":")[0] == n] for n in names}
        answers = await asyncio.gather(*(query(n, local_grads, cid, by_owner[n]) for n in names))
        infos = await asyncio.gather(*(query(n, ctx_info, cid) for n in names))
        passes = [i["num_current_backward_passes"] for i in await all_debug_info(world_size)]
    got: dict[str, Any] = {}
    for answer in answers:
        got.update(answer["grads"])
    return {
        "cid": cid,
        "expected": expected,
        "got": got,
        "untouched": all(a["untouched"] for a in answers),
        "info": dict(zip(names, infos, strict=True)),
        "passes_after": passes,
    }


def assert_parity(result: dict[str, Any], alone: bool = True) -> None:
    """The gradients match; with ``alone`` (no other pass ran in the group at
    the time), no backward pass was still running anywhere once backward returned."""
    expected, got = result["expected"], result["got"]
    assert set(expected) == set(got)
    assert any(g is not None for g in expected.values())
    for key, want in expected.items():
        have = got[key]
        if want is None:
            assert have is None, f"{key}: a gradient where local autograd has none"
        else:
            assert have is not None, f"{key}: no gradient (local autograd: {want})"
            assert have.dtype == want.dtype and have.layout == want.layout, key
            torch.testing.assert_close(have, want, msg=lambda m, k=key: f"{k}: {m}")
    assert result["untouched"], ".grad was written"
    if alone:  # backward returned only when every worker's part was over
        assert result["passes_after"] == [0] * len(result["passes_after"])


# ------------------------------------------------------------------ remote functions


def scaled(t: torch.Tensor) -> torch.Tensor:
    """``t`` times this worker's ``scale`` leaf."""
    return t * param("scale", tuple(t.shape), t.dtype)


async def hop(x: torch.Tensor, path: list[str]) -> torch.Tensor:
    """Multiply by this worker's leaf, pass the rest of ``path`` on, come back."""
    h = x * param("hop", tuple(x.shape), x.dtype)
    if path:
        h = await call(path[0], hop, h, path[1:])
    return h.tanh() + x


def sync_hop(x: torch.Tensor, to: str) -> torch.Tensor:
    """A plain function (the callee's thread pool) making a nested ``rpc_sync``."""
    y = x * param("sync", tuple(x.shape), x.dtype)
    z = call_sync(to, torch.mul, y, y)
    return z + x


def first_only(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Uses ``a``; ``b`` was sent for nothing."""
    return scaled(a).sin()


def three_outputs(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = param("multi", tuple(a.shape), a.dtype)
    return a * w, a + w, (a * w).cos()


async def slow_async(t: torch.Tensor, delay: float) -> torch.Tensor:
    await asyncio.sleep(delay)
    return scaled(t)


def own_leaf(shape: tuple[int, ...]) -> torch.Tensor:
    """This worker's leaf itself, as the result."""
    return param("own", shape)


def own_leaf_twice(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = param("own2", shape)
    return leaf, leaf


class Boom(torch.autograd.Function):
    """Identity forward; its backward raises ValueError."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom in a remote backward")


# Ends Slow's sleeps early: a scenario that leaves one running sets it when it
# is done, so the sleep does not hold that worker's compute thread into the next
# test (whose jobs would queue behind it).
_SLOW_WAKE = threading.Event()
_SLOW_SLEEPING = threading.Event()  # a Slow.backward is waiting on _SLOW_WAKE


async def slow_sleeping() -> bool:
    return _SLOW_SLEEPING.is_set()


async def wake_slow(wake: bool) -> None:
    # (async: runs on the loop, not behind the sleep in the pool)
    if wake:
        _SLOW_WAKE.set()
    else:
        _SLOW_WAKE.clear()
        _SLOW_SLEEPING.clear()


class Slow(torch.autograd.Function):
    """Identity forward; its backward sleeps first (until :data:`_SLOW_WAKE`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        _SLOW_SLEEPING.set()
        _SLOW_WAKE.wait(ctx.seconds)
        return grad, None


def boom_forward(x: torch.Tensor) -> torch.Tensor:
    return Boom.apply(x * 2)


async def boom_via(x: torch.Tensor, to: str) -> torch.Tensor:
    return await rpc.rpc_async(to, boom_forward, args=(x,)) + 1


def slow_forward(x: torch.Tensor, seconds: float) -> torch.Tensor:
    return Slow.apply(x * 3, seconds)


# ------------------------------------------------------------------ scenarios


async def sc_other_and_self(dtype: torch.dtype) -> list[torch.Tensor]:
    x, y = param("x", (4,), dtype), param("y", (4,), dtype)
    a = await call("worker1", torch.add, x, y)  # another worker
    b = await call("worker0", torch.mul, a, x)  # this worker, through RPC
    c = await call("worker1", scaled, b)
    return [(c * y).sum()]


async def sc_nested(path: list[str]) -> list[torch.Tensor]:
    x = param("x", (3,))
    out = await call(path[0], hop, x, path[1:])
    return [(out * x).sum()]


async def sc_round_trips(dtype: torch.dtype) -> list[torch.Tensor]:
    x, y = param("mx", (3, 3), dtype), param("my", (3, 3), dtype)
    a = await call("worker1", torch.matmul, x, y)
    b = await call("worker2", torch.add, a, x)
    c = await call("worker1", torch.mul, b, y)
    s = await call("worker2", torch.stack, [a, b, c])
    d = await call("worker0", torch.matmul, s, y)
    e = await call("worker2", scaled, d.tanh())
    f = await call("worker1", torch.add, e.sum(0), a)
    return [(f * x).sum()]


async def sc_multi_roots() -> list[torch.Tensor]:
    x = param("rx", (3,))
    a = await call("worker1", scaled, x)
    b = await call("worker2", scaled, x * x)
    return [(a * b).sum(), a.sin().sum(), (b * 3).mean()]


async def sc_unused() -> list[torch.Tensor]:
    x, y, z = param("ux", (3,)), param("uy", (3,)), param("uz", (3,))
    a = await call("worker1", first_only, x, y)  # y sent, never used remotely
    never = await call("worker2", scaled, z)  # an RPC result never used
    del never
    also_never = await call("worker1", three_outputs, x)  # a tuple never used
    del also_never
    return [(a * 2).sum()]


async def sc_multi_outputs() -> list[torch.Tensor]:
    x = param("ox", (3,))
    p, q, r = await call("worker2", three_outputs, x)
    del q  # one of the three outputs unused
    return [(p * r).sum() + x.sum()]


async def sc_sync_nested() -> list[torch.Tensor]:
    x = param("sx", (3,))
    out = await call("worker1", sync_hop, x, "worker2")
    return [(out * x).sum()]


async def sc_leaves_returned() -> list[torch.Tensor]:
    """Remote functions returning their own leaves (one twice in a tuple)."""
    x = param("lx", (3,))
    w = await call("worker1", own_leaf, (3,))
    a, b = await call("worker2", own_leaf_twice, (3,))
    return [(w * x * a + b * 2).sum()]


async def sc_views() -> list[torch.Tensor]:
    """Views (transposed, sliced, strided) as arguments and results."""
    x, y = param("vx", (3, 3)), param("vy", (3, 3))
    a = await call("worker1", torch.mul, x.t(), y[0])
    b = await call("worker2", torch.add, a[1:], x[::2])
    c = await call("worker0", scaled, b.t())
    return [(c * 3).sum() + a.sum()]


def add_relu_in_place(a: torch.Tensor) -> torch.Tensor:
    """In place on a received argument: it is computed (by the recv
    function), not a leaf, as in torch."""
    a.add_(param("ipw", tuple(a.shape), a.dtype))
    return a.relu_() * 2


async def sc_in_place() -> list[torch.Tensor]:
    """In-place ops on received tensors, on the callee and on the caller."""
    x = param("ipx", (4,))
    y = await call("worker1", add_relu_in_place, x * 3)
    y.add_(x)
    return [(y * y).sum()]


def parameter_arrival(p: torch.Tensor) -> torch.Tensor:
    """A Parameter sent in a context arrives as a Parameter leaf whose
    gradient goes back to the sender."""
    if not (type(p) is torch.nn.Parameter and p.is_leaf and p.requires_grad):
        raise TypeError(f"arrived as {type(p).__name__}, leaf {p.is_leaf}")
    return p * 2


async def check_parameter_argument(rank: int, world_size: int) -> list[float]:
    p = torch.nn.Parameter(torch.ones(3))
    async with dist_autograd.context() as cid:
        y = await call("worker1", parameter_arrival, p)
        await dist_autograd.backward(cid, [(y * y).sum()])
        return dist_autograd.get_gradients(cid)[p].tolist()  # type: ignore[no-any-return]


async def sc_rref() -> list[torch.Tensor]:
    """``remote()`` then ``to_here()`` twice: one send/recv per message."""
    x = param("rx", (3,))
    rref = await remote("worker1", scaled, x)
    y1 = await rref.to_here()
    y2 = await rref.to_here()
    return [(y1 * x + y2.tanh()).sum()]


async def sc_tagged(tag: int) -> list[torch.Tensor]:
    """Different values per tag; the remote side sleeps so passes interleave."""
    x = param(f"t{tag}", (3,))
    a = await call("worker1", slow_async, x, 0.01 * (4 - tag))
    await asyncio.sleep(0.005 * tag)
    b = await call("worker2", hop, a * (tag + 1), ["worker1"])
    c = await call("worker0", scaled, b)
    return [(c * x).sum() * (tag + 1)]


def sparse_scaled(t: torch.Tensor) -> torch.Tensor:
    """``t`` times this worker's sparse leaf, elementwise."""
    return t * sparse_param("sscale")


def bag_lookup(per_sample_weights: torch.Tensor) -> torch.Tensor:
    """Bags of rows of this worker's dense table, whose gradient is sparse."""
    table = param("table", (8, 3))
    rows, offsets = torch.tensor([1, 4, 4, 2, 7, 1]), torch.tensor([0, 2])
    return torch.nn.functional.embedding_bag(
        rows, table, offsets, mode="sum", sparse=True, per_sample_weights=per_sample_weights
    )


async def sc_sparse(via: str) -> list[torch.Tensor]:
    """PyTorch's ``test_backward_simple_sparse`` / ``test_backward_rref_sparse``:
    sparse leaves added remotely, sparse gradients back."""
    t1, t2 = sparse_param("s1"), sparse_param("s2")
    if via == "remote":
        ret = await (await remote("worker1", torch.add, t1, t2)).to_here()
    else:
        ret = await call("worker1", torch.add, t1, t2)
    return [torch.sparse.sum(ret)]


async def sc_sparse_round_trips() -> list[torch.Tensor]:
    """Sparse values through three workers, one with a sparse leaf of its own."""
    t1, t2 = sparse_param("r1"), sparse_param("r2")
    a = await call("worker1", torch.add, t1, t2)
    b = await call("worker2", sparse_scaled, a)
    s = await call("worker1", torch.stack, [a, b])
    c = await call("worker2", torch.mul, s, s)
    return [torch.sparse.sum(c)]


async def sc_embedding_bag() -> list[torch.Tensor]:
    """A dense table elsewhere whose gradient is sparse, dense weights here."""
    psw = param("psw", (6,))
    out = await call("worker1", bag_lookup, psw)
    return [(out * out).sum()]


# ------------------------------------------------------------------ checks (run on a worker)


async def check_parity(rank: int, world_size: int, scenario: Scenario, *args: Any) -> Any:
    return await parity(world_size, scenario, *args)


async def check_repeat(rank: int, world_size: int, scenario: Scenario, *args: Any) -> Any:
    return await parity(world_size, scenario, *args, repeat=2)


async def check_concurrent_tasks(rank: int, world_size: int) -> list[Any]:
    # Every task finishes its forward pass before any starts its backward pass,
    # so that the four passes run at the same time.
    barrier = asyncio.Barrier(4)
    tasks = (parity(world_size, sc_tagged, t, before_backward=barrier.wait) for t in range(4))
    return list(await asyncio.gather(*tasks))


async def failing_pass(world_size: int) -> str:
    """A pass whose backward fails on worker1; returns the error's type name."""
    x = param("fx", (3,))
    async with dist_autograd.context() as cid:
        a = await rpc.rpc_async("worker1", boom_forward, args=(x,))
        b = await rpc.rpc_async("worker2", scaled, args=(a,))
        try:
            await dist_autograd.backward(cid, [b.sum()])
        except rpc.RemoteError as exc:
            return f"{exc.worker}:{exc.type_name}"
    return "no error"


async def check_concurrent_with_failures(rank: int, world_size: int) -> Any:
    results = await asyncio.gather(
        failing_pass(world_size),
        *(parity(world_size, sc_tagged, t) for t in range(3)),
        failing_pass(world_size),
    )
    cleaned, contexts = await wait_everywhere(world_size, "num_autograd_contexts")
    return {"results": results, "cleaned": cleaned, "contexts": contexts}


async def check_second_backward_without_retain(rank: int, world_size: int) -> Any:
    x = param("sx", (3,))
    async with dist_autograd.context() as cid:
        y = await rpc.rpc_async("worker1", scaled, args=(x,))
        loss = (y.tanh() * x).sum()
        await dist_autograd.backward(cid, [loss])
        try:
            await asyncio.wait_for(dist_autograd.backward(cid, [loss]), 20)
        except Exception as exc:
            error: Any = exc
        else:
            error = None
        stopped, passes = await wait_everywhere(world_size, "num_current_backward_passes")
    return {
        "type": type(error).__name__,
        "is_runtime_error": isinstance(error, RuntimeError),
        "worker": getattr(error, "worker", None),
        "text": str(error),
        "stopped": stopped,
        "passes": passes,
    }


_KEPT: dict[int, torch.Tensor] = {}


def scale_and_keep(x: torch.Tensor, context_id: int) -> torch.Tensor:
    """``scaled(x)``, also kept here for a later :func:`backward_here`."""
    y = scaled(x)
    _KEPT[context_id] = y
    return y


async def backward_here(context_id: int) -> dict[str, Any]:
    """Run the pass from this worker (inside an RPC handler) from the kept value."""
    await dist_autograd.backward(context_id, [_KEPT.pop(context_id).sum()])
    return local_grads(context_id, [f"{me()}:scale:3:float32"])


async def check_backward_from_another_worker(rank: int, world_size: int) -> Any:
    x = param("bx", (3,))
    async with dist_autograd.context() as cid:
        await rpc.rpc_async("worker1", scale_and_keep, args=(x, cid))
        there = await rpc.rpc_async("worker1", backward_here, args=(cid,))
        here = local_grads(cid, [f"{me()}:bx:3:float32"])
    scale = await query("worker1", param, "scale", (3,))
    return {"x": x.detach(), "scale": scale.detach(), "there": there, "here": here}


async def check_no_grad_and_cleanup(rank: int, world_size: int, raise_in_body: bool) -> Any:
    ok, before = await wait_everywhere(world_size, "num_autograd_contexts")
    assert ok, f"contexts left over from earlier checks: {before}"
    infos: list[Any] = []
    cid = -1
    try:
        async with dist_autograd.context() as cid:
            plain = torch.ones(3)
            # Only tensors that need no grad: a call, and a nested call 0 -> 1 -> 2.
            await rpc.rpc_async("worker1", torch.add, args=(plain, plain))
            await rpc.rpc_async("worker1", sync_hop_no_grad, args=(plain, "worker2"))
            infos = list(
                await asyncio.gather(*(query(w, ctx_info, cid) for w in workers(world_size)))
            )
            if raise_in_body:
                raise KeyError("the body raised")
    except KeyError:
        pass
    gone_here = ctx_info(cid) is None
    ok, after = await wait_everywhere(world_size, "num_autograd_contexts")
    return {"infos": infos, "gone_here": gone_here, "cleaned": ok, "after": after}


def sync_hop_no_grad(x: torch.Tensor, to: str) -> torch.Tensor:
    return rpc.rpc_sync(to, torch.mul, args=(x, x))


async def check_cleanup_after_backward(rank: int, world_size: int) -> Any:
    ok, before = await wait_everywhere(world_size, "num_autograd_contexts")
    assert ok, f"contexts left over from earlier checks: {before}"
    async with dist_autograd.context() as cid:
        roots = await sc_nested(["worker1", "worker2"])
        await dist_autograd.backward(cid, roots)
        during = await all_debug_info(world_size)
    ok, after = await wait_everywhere(world_size, "num_autograd_contexts")
    return {"during": during, "cleaned": ok, "after": after}


# Weak references to every worker's part of the contexts a check watches,
# and to the tensors its send and recv functions recorded.
_CONTEXT_REFS: list[weakref.ref[Any]] = []
_TENSOR_REFS: list[weakref.ref[Any]] = []


def watch_context_weakly(context_id: int) -> None:
    ctx = dist_autograd.retrieve_context(context_id)
    _CONTEXT_REFS.append(weakref.ref(ctx))
    records = [*ctx.send_functions().values(), *ctx.recv_functions().values()]
    params = {id(p) for p in _PARAMS.values()}  # these stay: they are the workers' leaves
    _TENSOR_REFS.extend(weakref.ref(t) for fn in records for t in fn.tensors if id(t) not in params)


def set_cycle_collector(enabled: bool) -> tuple[int, int]:
    """Switch the cycle collector; return how many watched contexts and
    tensors are alive."""
    alive = tuple(sum(ref() is not None for ref in refs) for refs in (_CONTEXT_REFS, _TENSOR_REFS))
    if enabled:
        gc.enable()
        _CONTEXT_REFS.clear()
        _TENSOR_REFS.clear()
    else:
        gc.collect()
        gc.disable()
    return alive  # type: ignore[return-value]


def freed_weight() -> torch.Tensor:
    return torch.randn(64, 64, generator=torch.Generator().manual_seed(5)).requires_grad_()


def times_rref(x: torch.Tensor, w: rpc.RRef[torch.Tensor]) -> torch.Tensor:
    return x @ w.local_value()


async def check_contexts_freed_by_refcount(rank: int, world_size: int, mode: str) -> Any:
    """One step in a context watched weakly on every worker it reaches: nested
    calls, an RRef-held weight, ``mode`` = ``backward``, ``backward_then_step``
    (``DistributedOptimizer.step``) or ``step_in_backward``."""
    from aiorpc_autograd.optim import DistributedOptimizer

    names = workers(world_size)
    w = rpc.remote("worker2", freed_weight)
    opt = DistributedOptimizer(torch.optim.SGD, [w], lr=0.1)
    await asyncio.gather(*(query(n, set_cycle_collector, False) for n in names))
    try:
        async with dist_autograd.context() as cid:
            x = param("freed", (64, 64))
            y = await rpc.rpc_async("worker1", hop, args=(x, ["worker2"]))
            z = await rpc.rpc_async("worker2", times_rref, args=(y, w))
            await asyncio.gather(*(query(n, watch_context_weakly, cid) for n in names[:3]))
            if mode == "step_in_backward":
                await dist_autograd.backward(cid, [z.sum()], optimizer=opt)
            else:
                await dist_autograd.backward(cid, [z.sum()])
                if mode == "backward_then_step":
                    await opt.step(cid)
        cleaned, contexts = await wait_everywhere(world_size, "num_autograd_contexts")
        del x, y, z
        alive = await asyncio.gather(*(query(n, set_cycle_collector, False) for n in names))
    finally:
        await asyncio.gather(*(query(n, set_cycle_collector, True) for n in names))
    return {"cleaned": cleaned, "contexts": contexts, "alive": alive}


async def check_remote_backward_error(rank: int, world_size: int, via: str | None) -> Any:
    await asyncio.gather(*(query(w, wake_slow, False) for w in workers(world_size)))
    x = param("ex", (3,))
    async with dist_autograd.context() as cid:
        if via is None:
            a = await rpc.rpc_async("worker1", boom_forward, args=(x,))
        else:
            a = await rpc.rpc_async(via, boom_via, args=(x, "worker1"))
        b = await rpc.rpc_async(
            "worker2" if via is None else "worker0", slow_forward, args=(x, 5.0)
        )
        loss = (a + b).sum()
        started = time.monotonic()
        try:
            await dist_autograd.backward(cid, [loss])
        except Exception as exc:
            error: Any = exc
        else:
            error = None
        elapsed = time.monotonic() - started
        stopped, passes = await wait_everywhere(world_size, "num_current_backward_passes", 3.5)
        stopped_at = time.monotonic() - started
        # (the slow part's sleep is still running: end it)
        await asyncio.gather(*(query(w, wake_slow, True) for w in workers(world_size)))
    cleaned, contexts = await wait_everywhere(world_size, "num_autograd_contexts")
    # The group still works: a fresh pass in a fresh context succeeds.
    healthy = await parity(world_size, sc_nested, ["worker1", "worker2"])
    return {
        "raised": error is not None,
        "is_remote_error": isinstance(error, rpc.RemoteError),
        "is_value_error": isinstance(error, ValueError),
        "worker": getattr(error, "worker", None),
        "type_name": getattr(error, "type_name", None),
        "text": str(error),
        "traceback": getattr(error, "remote_traceback", ""),
        "elapsed": elapsed,
        "stopped": stopped,
        "stopped_at": stopped_at,
        "passes": passes,
        "cleaned": cleaned,
        "contexts": contexts,
        "healthy": healthy,
    }


def sum_all(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).sum(0)


async def check_unrelated_passes(rank: int, world_size: int, n: int) -> Any:
    """A pass over ``n`` tensors through worker1 while another context's part
    there sleeps in its backward: it shares no tensor with it, so it must not
    wait for it."""
    await asyncio.gather(*(query(w, wake_slow, False) for w in workers(world_size)))
    x = param("unrelated_slow", (3,))

    async def slow_pass() -> None:
        async with dist_autograd.context() as cid:
            a = await rpc.rpc_async("worker1", slow_forward, args=(x, 20.0))
            await dist_autograd.backward(cid, [a.sum()])

    slow = asyncio.create_task(slow_pass())
    try:
        deadline = time.monotonic() + 10
        while not await query("worker1", slow_sleeping) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sleeping = await query("worker1", slow_sleeping)
        leaves = [param(f"unrelated{i}", (2,)) for i in range(n)]
        started = time.monotonic()
        async with dist_autograd.context() as cid:
            s = await rpc.rpc_async("worker1", sum_all, args=(leaves,))
            await dist_autograd.backward(cid, [(s * s).sum()])
            grads = dist_autograd.get_gradients(cid)
        took = time.monotonic() - started
        slow_running = not slow.done()
        expected = 2 * torch.stack(leaves).detach().sum(0)
        exact = all(torch.equal(grads[t], expected) for t in leaves)
    finally:
        await asyncio.gather(*(query(w, wake_slow, True) for w in workers(world_size)))
        await slow
    return {"sleeping": sleeping, "took": took, "slow_running": slow_running, "exact": exact}


async def check_invalid_calls(rank: int, world_size: int) -> dict[str, str]:
    seen: dict[str, str] = {}

    async def expect(case: str, coro: Awaitable[Any]) -> None:
        try:
            await coro
        except Exception as exc:
            seen[case] = type(exc).__name__
            if isinstance(exc, ValueError):
                # torch raises RuntimeError with these words: both catch it.
                assert isinstance(exc, RuntimeError), exc
                seen[case + " says"] = str(exc)
        else:
            seen[case] = "no error"

    def sync(case: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:
            seen[case] = type(exc).__name__
            if isinstance(exc, TypeError):
                seen[case + " says"] = str(exc).split(" The following")[0]
        else:
            seen[case] = "no error"

    x = param("ix", (3,))
    async with dist_autograd.context() as cid:
        y = await rpc.rpc_async("worker1", scaled, args=(x,))
        await expect("empty", dist_autograd.backward(cid, []))
        await expect("non_scalar", dist_autograd.backward(cid, [y * 2]))
        await expect("no_grad", dist_autograd.backward(cid, [torch.tensor(1.0)]))
        await expect("no_grad_sum", dist_autograd.backward(cid, [y.detach().sum()]))
        await expect("leaf", dist_autograd.backward(cid, [param("leaf", (1,))]))
        # Arguments of the wrong type: the call itself raises, as torch's binding.
        bad: list[tuple[Any, Any]] = [(cid, [1.0]), (cid, None), (None, None)]
        for case, (context_id, roots) in zip(("not_a_tensor", "none", "no_id"), bad, strict=True):
            sync(case, lambda: dist_autograd.backward(context_id, roots))  # noqa: B023
        # A failed validation leaves the context usable.
        await expect("valid_after", dist_autograd.backward(cid, [y.sum()]))
    unknown = (0xFFFF << 48) | 12345
    loss = (x * 2).sum()
    await expect("backward_unknown", dist_autograd.backward(unknown, [loss]))
    sync("get_gradients_unknown", lambda: dist_autograd.get_gradients(unknown))
    sync("retrieve_unknown", lambda: dist_autograd.retrieve_context(unknown))
    await expect("backward_released", dist_autograd.backward(cid, [loss]))
    sync("get_gradients_released", lambda: dist_autograd.get_gradients(cid))
    sync("retrieve_released", lambda: dist_autograd.retrieve_context(cid))
    return seen


# ------------------------------------------------------------------ tests: parity


def test_call_to_another_worker_and_to_self(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_other_and_self, torch.float32)
    assert_parity(result)
    info = result["info"]
    # worker0: its call to worker1 (x, y out; a back) twice, and to itself.
    assert info["worker1"]["sends"] == 2 and info["worker1"]["recvs"] == 2
    assert info["worker0"]["sends"] == info["worker0"]["recvs"]
    assert info["worker2"] is None and info["worker3"] is None  # never touched


def test_float64(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_other_and_self, torch.float64)
    assert_parity(result)
    assert all(g.dtype == torch.float64 for g in result["got"].values() if g is not None)


def test_nested_a_b_c(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_nested, ["worker1", "worker2"])
    assert_parity(result)
    counts = {w: (i["sends"], i["recvs"]) for w, i in result["info"].items() if i}
    assert counts == {"worker0": (1, 1), "worker1": (2, 2), "worker2": (1, 1)}
    assert result["info"]["worker2"]["known"] == [1]  # worker2 only met worker1


def test_nested_a_b_a(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_nested, ["worker1", "worker0"])
    assert_parity(result)
    counts = {w: (i["sends"], i["recvs"]) for w, i in result["info"].items() if i}
    # Two sends and two recvs in one context on each side.
    assert counts == {"worker0": (2, 2), "worker1": (2, 2)}
    assert result["info"]["worker2"] is None


def test_round_trips_add_mul_matmul_stack_three_workers(group: WorkerGroup) -> None:
    assert_parity(group.call(0, check_parity, sc_round_trips, torch.float32))


def test_round_trips_float64_started_on_another_worker(group: WorkerGroup) -> None:
    assert_parity(group.call(2, check_parity, sc_round_trips, torch.float64))


def test_multiple_roots(group: WorkerGroup) -> None:
    assert_parity(group.call(0, check_parity, sc_multi_roots))


def test_unused_tensors_and_never_used_results(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_unused)
    assert_parity(result)
    got = result["got"]
    assert got["worker0:uy:3:float32"] is None  # sent, never used
    assert got["worker0:uz:3:float32"] is None  # its result never used
    assert got["worker2:scale:3:float32"] is None
    assert got["worker1:multi:3:float32"] is None


def test_remote_function_returning_several_tensors(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_multi_outputs)
    assert_parity(result)
    assert result["info"]["worker2"] == {"sends": 1, "recvs": 1, "known": [0]}


def test_remote_functions_returning_their_own_leaves(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_leaves_returned)
    assert_parity(result)
    assert result["got"]["worker2:own2:3:float32"] is not None


def test_views_as_arguments_and_results(group: WorkerGroup) -> None:
    assert_parity(group.call(0, check_parity, sc_views))


def test_in_place_ops_on_received_tensors(group: WorkerGroup) -> None:
    assert_parity(group.call(0, check_parity, sc_in_place))


def test_parameter_argument_is_a_leaf_with_its_gradient_sent_back(group: WorkerGroup) -> None:
    assert group.call(0, check_parameter_argument) == [8.0, 8.0, 8.0]


def test_remote_and_to_here_record_send_and_recv(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_rref)
    assert_parity(result)
    info = result["info"]
    # remote(): x out; each to_here(): the value back.
    assert (info["worker0"]["sends"], info["worker0"]["recvs"]) == (1, 2)
    assert (info["worker1"]["sends"], info["worker1"]["recvs"]) == (2, 1)


def test_retain_graph_twice_accumulates(group: WorkerGroup) -> None:
    assert_parity(group.call(0, check_repeat, sc_round_trips, torch.float64))


@pytest.mark.parametrize("via", ["rpc_async", "remote"])
def test_sparse_leaves_get_sparse_gradients(group: WorkerGroup, via: str) -> None:
    result = group.call(0, check_parity, sc_sparse, via)
    assert_parity(result)
    assert all(g.layout == torch.sparse_coo for g in result["got"].values())


def test_sparse_values_through_three_workers(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_sparse_round_trips)
    assert_parity(result)
    assert result["got"]["worker2:sscale:sparse"] is not None


def test_sparse_gradients_accumulate_over_repeated_passes(group: WorkerGroup) -> None:
    assert_parity(group.call(0, check_repeat, sc_sparse_round_trips))


def test_embedding_bag_table_elsewhere_gets_its_sparse_gradient(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_embedding_bag)
    assert_parity(result)
    assert result["got"]["worker1:table:8x3:float32"].layout == torch.sparse_coo
    assert result["got"]["worker0:psw:6:float32"].layout == torch.strided


def test_nested_rpc_sync_from_a_plain_function_joins_the_context(group: WorkerGroup) -> None:
    result = group.call(0, check_parity, sc_sync_nested)
    assert_parity(result)
    assert result["got"]["worker1:sync:3:float32"] is not None
    # worker2 was reached only by worker1's rpc_sync from its thread pool.
    assert result["info"]["worker2"] == {"sends": 1, "recvs": 1, "known": [1]}


def test_four_concurrent_tasks_each_with_its_own_context(group: WorkerGroup) -> None:
    results = group.call(0, check_concurrent_tasks)
    assert len({r["cid"] for r in results}) == 4
    for result in results:
        assert_parity(result, alone=False)
    # The tasks share worker1's and worker2's leaves, with different gradients.
    key = "worker1:hop:3:float32"
    grads = [r["got"][key] for r in results]
    assert not torch.allclose(grads[0], grads[1])


def test_failing_passes_do_not_disturb_concurrent_ones(group: WorkerGroup) -> None:
    got = group.call(0, check_concurrent_with_failures, timeout=45)
    first, *fine, last = got["results"]
    assert first == last == "worker1:ValueError"
    for result in fine:
        assert_parity(result, alone=False)
    assert got["cleaned"], f"contexts left: {got['contexts']}"


def test_concurrent_passes_started_on_different_workers(group: WorkerGroup) -> None:
    calls = [(r, check_parity, (sc_round_trips, torch.float64)) for r in range(3)]
    for result in group.call_many(calls, timeout=45):
        assert_parity(result, alone=False)


def test_backward_started_by_another_worker_inside_an_rpc(group: WorkerGroup) -> None:
    """worker0 opens the context; worker1 runs backward from its own root,
    while handling worker0's call; the gradient reaches worker0's leaf."""
    got = group.call(0, check_backward_from_another_worker)
    (grad_scale,) = got["there"]["grads"].values()
    (grad_x,) = got["here"]["grads"].values()
    assert grad_scale is not None and grad_x is not None
    torch.testing.assert_close(grad_scale, got["x"])
    torch.testing.assert_close(grad_x, got["scale"])
    assert got["there"]["untouched"] and got["here"]["untouched"]


# ------------------------------------------------------------------ tests: contexts


def test_context_ids_are_unique_and_carry_the_worker_id(group: WorkerGroup) -> None:
    results = group.call_many([(r, check_parity, (sc_multi_roots,)) for r in (1, 1, 2)], timeout=45)
    for result in results:
        assert_parity(result, alone=False)
    cids = [r["cid"] for r in results]
    assert len(set(cids)) == 3
    assert [c >> 48 for c in cids] == [1, 1, 2]


def test_no_grad_calls_record_nothing_but_the_workers(group: WorkerGroup) -> None:
    got = group.call(0, check_no_grad_and_cleanup, False)
    w0, w1, w2, w3 = got["infos"]
    assert w3 is None
    assert (w0["sends"], w0["recvs"]) == (0, 0)
    assert (w1["sends"], w1["recvs"]) == (0, 0)
    assert (w2["sends"], w2["recvs"]) == (0, 0)
    assert w0["known"] == [1]
    assert w1["known"] == [0, 2]
    assert w2["known"] == [1]
    assert got["gone_here"]
    assert got["cleaned"], f"contexts left: {got['after']}"


def test_cleanup_reaches_every_worker_when_the_body_raised(group: WorkerGroup) -> None:
    got = group.call(0, check_no_grad_and_cleanup, True)
    assert [info is not None for info in got["infos"]] == [True, True, True, False]
    assert got["gone_here"]
    assert got["cleaned"], f"contexts left: {got['after']}"


def test_cleanup_after_a_backward_pass(group: WorkerGroup) -> None:
    got = group.call(0, check_cleanup_after_backward)
    assert [i["num_autograd_contexts"] for i in got["during"]] == [1, 1, 1, 0]
    assert [i["num_current_backward_passes"] for i in got["during"]] == [0, 0, 0, 0]
    assert got["cleaned"], f"contexts left: {got['after']}"


@pytest.mark.parametrize("mode", ["backward", "backward_then_step", "step_in_backward"])
def test_released_contexts_are_freed_by_reference_counting(group: WorkerGroup, mode: str) -> None:
    # What a released context holds (its graph, saved tensors, gradients)
    # must go when it is released, not wait for a full collection: a
    # training loop makes one per step, and memory held by garbage cycles
    # grows with the step rate (1.2 MB a step in the bench's step). (A
    # failed pass's error keeps frames that refer back to the pass: that
    # rare path may wait for the collector.)
    got = group.call(0, check_contexts_freed_by_refcount, mode)
    assert got["cleaned"], f"contexts left: {got['contexts']}"
    # (contexts, recorded tensors) still alive on each worker
    assert [tuple(alive) for alive in got["alive"]] == [(0, 0)] * WORLD, got


def test_invalid_roots_and_unknown_contexts(group: WorkerGroup) -> None:
    seen = group.call(0, check_invalid_calls)
    # torch's messages (dist_engine.cpp's validateRootsAndRetrieveEdges), in
    # its order: requires_grad before the shape.
    assert seen == {
        "empty": "InvalidArgumentError",
        "empty says": "No tensors provided for gradient computation.",
        "non_scalar": "InvalidArgumentError",
        "non_scalar says": "root 0 of shape (3,) is not a scalar, all roots need to be scalar",
        "no_grad": "InvalidArgumentError",
        "no_grad says": "requires_grad not set on root 0",
        "no_grad_sum": "InvalidArgumentError",
        "no_grad_sum says": "requires_grad not set on root 0",
        "leaf": "InvalidArgumentError",
        "leaf says": "root 0 (a leaf) does not have a valid gradient function.",
        "not_a_tensor": "TypeError",
        "not_a_tensor says": "backward(): incompatible function arguments.",
        "none": "TypeError",
        "none says": "backward(): incompatible function arguments.",
        "no_id": "TypeError",
        "no_id says": "backward(): incompatible function arguments.",
        "valid_after": "no error",
        "backward_unknown": "RuntimeError",
        "get_gradients_unknown": "RuntimeError",
        "retrieve_unknown": "RuntimeError",
        "backward_released": "RuntimeError",
        "get_gradients_released": "RuntimeError",
        "retrieve_released": "RuntimeError",
    }


# ------------------------------------------------------------------ tests: errors


@pytest.mark.parametrize("via", [None, "worker2"], ids=["direct", "nested"])
def test_error_in_a_remote_backward(group: WorkerGroup, via: str | None) -> None:
    got = group.call(0, check_remote_backward_error, via, timeout=45)
    assert got["raised"]
    assert got["is_remote_error"], got["text"]
    assert got["worker"] == "worker1", got["text"]
    assert got["is_value_error"], got["text"]
    # torch's words lead the message: its tests match "Error on Node [0-9]+: ..."
    assert "Error on Node 1: boom in a remote backward" in got["text"], got["text"]
    assert 'raise ValueError("boom in a remote backward")' in got["traceback"]
    # The other workers' parts were stopped, not left to finish on their own
    # (the slow part sleeps 5 s in its backward).
    assert got["stopped"], f"passes still running: {got['passes']}"
    assert got["stopped_at"] < 4.0, got
    assert got["cleaned"], f"contexts left: {got['contexts']}"
    assert_parity(got["healthy"])


@pytest.mark.parametrize("n", [1, 300])
def test_a_pass_does_not_wait_for_an_unrelated_slow_one(group: WorkerGroup, n: int) -> None:
    # Jobs hold their tensors' .grad slots while they run; a slow one must
    # hold up only jobs over the same tensors. (With 300 tensors, a job here
    # met every one of the 64 striped locks that guarded the slots before.)
    got = group.call(0, check_unrelated_passes, n, timeout=60)
    assert got["sleeping"], got
    assert got["slow_running"], got  # (the slow part sleeps 20 s unless woken)
    assert got["took"] < 10.0, got
    assert got["exact"], got


def test_second_backward_without_retain_graph_raises(group: WorkerGroup) -> None:
    got = group.call(0, check_second_backward_without_retain)
    # worker1's part of the graph was freed by the first pass: its error
    # comes back (PyTorch's message), not a hang.
    assert got["is_runtime_error"], got
    assert got["worker"] == "worker1", got
    assert "second time" in got["text"]
    assert got["stopped"], got["passes"]


# ------------------------------------------------------------------ parameter server


async def ps_forward(x: torch.Tensor) -> torch.Tensor:
    await asyncio.sleep(0.005)
    return torch.tanh(x @ param("W", (3, 3)))


async def sc_trainer(step: int) -> list[torch.Tensor]:
    x = param(f"x{step}", (2, 3))
    out = await call("worker0", ps_forward, x)
    return [(out * x).sum()]


async def check_trainer(rank: int, world_size: int, steps: int) -> list[Any]:
    return [await parity(world_size, sc_trainer, step) for step in range(steps)]


def test_three_trainers_against_one_parameter_server(group: WorkerGroup) -> None:
    per_rank = group.call_many([(r, check_trainer, (4,)) for r in (1, 2, 3)], timeout=45)
    grads_of_w = []
    for rank, results in zip((1, 2, 3), per_rank, strict=True):
        assert len(results) == 4
        for result in results:
            assert_parity(result, alone=False)
            assert result["cid"] >> 48 == rank
            grads_of_w.append(result["got"]["worker0:W:3x3:float32"])
    # Each context got only its own trainer's share of W's gradient.
    assert not torch.allclose(grads_of_w[0], grads_of_w[4])


# ------------------------------------------------------------------ random graphs

OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "matmul": lambda a, b: (a @ b) / 3,
    "tanh": lambda a, b: torch.tanh(a),
    "sum": lambda a, b: a.sum(0, keepdim=True).repeat(3, 1) / 3,
    "param": lambda a, b: a * param("hyp", (3, 3), torch.float64),
}

Step = tuple[str, str, str | None, int, int]  # op, worker, via, operand indices


def apply_op(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return OPS[op](a, b)


async def forward_op(to: str, op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return await call(to, apply_op, op, a, b)


async def sc_program(program: list[Step], used: list[bool]) -> list[torch.Tensor]:
    pool = [
        param("h0", (3, 3), torch.float64),
        param("h1", (3, 3), torch.float64),
        torch.full((3, 3), 0.5, dtype=torch.float64),  # needs no grad
    ]
    for op, worker, via, i, j in program:
        a, b = pool[i % len(pool)], pool[j % len(pool)]
        if via is None:
            pool.append(await call(worker, apply_op, op, a, b))
        else:
            pool.append(await call(via, forward_op, worker, op, a, b))
    produced = pool[3:]
    loss = (pool[0] * 0.1).sum()
    for value, keep in zip(produced, used, strict=False):
        if keep and value.requires_grad:
            loss = loss + value.sum()
    return [loss]


WORKER = st.sampled_from(["worker0", "worker1", "worker2"])
STEP = st.tuples(
    st.sampled_from(sorted(OPS)),
    WORKER,
    st.one_of(st.none(), WORKER),
    st.integers(0, 20),
    st.integers(0, 20),
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    driver=st.integers(0, 2),
    program=st.lists(STEP, min_size=1, max_size=8),
    used=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_random_graphs_match_local_autograd(
    group: WorkerGroup, driver: int, program: list[Step], used: list[bool]
) -> None:
    """Random ops among add/mul/matmul/tanh/sum (and a worker's own leaf),
    each on a random worker, directly or through another one, started on a
    random worker; results used or not."""
    assert_parity(group.call(driver, check_parity, sc_program, program, used))


# ------------------------------------------------------------------ hooks in the backward

_HOOKED: dict[str, dict[str, Any]] = {}


def hooked_model(key: str) -> dict[str, Any]:
    """This process's hooked model under ``key``: a weight with a tensor hook
    (doubles its gradient), AccumulateGrad pre/post hooks and a
    post-accumulate-grad hook that halves ``.grad`` in place (as a clipping
    hook would); a bias with a post-accumulate-grad hook only. Every hook logs."""
    model = _HOOKED.get(key)
    if model is not None:
        return model
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 3, generator=gen).requires_grad_()
    b = torch.randn(3, generator=gen).requires_grad_()
    log: list[str] = []
    w.register_hook(lambda g: (log.append("w:tensor"), g * 2)[1])
    acc = w.view_as(w).grad_fn.next_functions[0][0]
    acc.register_prehook(lambda gi: log.append("w:pre"))
    acc.register_hook(lambda gi, go: log.append("w:post"))

    def halve(p: torch.Tensor) -> None:
        log.append("w:acc")
        p.grad.mul_(0.5)

    w.register_post_accumulate_grad_hook(halve)
    b.register_post_accumulate_grad_hook(lambda p: log.append("b:acc"))
    # acc is held weakly by w: the model keeps it (and its hooks) alive.
    model = _HOOKED[key] = {"w": w, "b": b, "acc": acc, "log": log}
    return model


def hooked_forward(key: str, x: torch.Tensor) -> torch.Tensor:
    model = hooked_model(key)
    return torch.tanh(x @ model["w"] + model["b"])


async def hooked_pass(rank: int, world_size: int) -> dict[str, Any]:
    """On worker0: x here, the hooked model on worker1 (and a local copy as
    the oracle); the pass's gradients and worker1's hook log vs local
    autograd's ``.grad`` and log."""
    x = torch.linspace(-1, 1, 6).reshape(2, 3).requires_grad_()
    local = hooked_model("local")
    loss = (hooked_forward("local", x) * x).sum()
    loss.backward()
    async with dist_autograd.context() as cid:
        xd = x.detach().requires_grad_()
        y = await rpc.rpc_async("worker1", hooked_forward, args=("dist", xd))
        await dist_autograd.backward(cid, [(y * xd).sum()])
        remote = await rpc.rpc_async("worker1", hooked_state, args=(cid,))
        x_grad = dist_autograd.get_gradients(cid)[xd]
    return {
        "want": {"x": x.grad, "w": local["w"].grad, "b": local["b"].grad},
        "want_log": list(local["log"]),
        "got": {"x": x_grad, **remote["grads"]},
        "got_log": remote["log"],
        "dotgrad": remote["dotgrad"],
    }


def hooked_state(cid: int) -> dict[str, Any]:
    model = hooked_model("dist")
    grads = dist_autograd.get_gradients(cid)
    return {
        "grads": {"w": grads.get(model["w"]), "b": grads.get(model["b"])},
        "log": list(model["log"]),
        "dotgrad": [model["w"].grad, model["b"].grad],
    }


def test_hooks_run_in_a_distributed_backward_as_in_local_autograd(group: WorkerGroup) -> None:
    """A model with tensor hooks, AccumulateGrad pre/post hooks and
    post-accumulate-grad hooks (one changing ``.grad`` in place) on a remote
    worker: the distributed backward runs each hook as local autograd does,
    in the same order, and the context's gradients equal local ``.grad``;
    ``.grad`` itself stays untouched."""
    result = group.call(0, hooked_pass)
    assert result["got_log"] == result["want_log"]
    assert sorted(result["want_log"]) == ["b:acc", "w:acc", "w:post", "w:pre", "w:tensor"]
    for name in ("x", "w", "b"):
        got, want = result["got"][name], result["want"][name]
        assert got is not None and want is not None, name
        torch.testing.assert_close(got, want)
    assert result["dotgrad"] == [None, None]


# ------------------------------------------------------------------ the leaf walk off the backward

_WALK_LOG: list[tuple[str, int]] = []


def log_walks(on: bool) -> None:
    """Log, in this worker, frames written and send functions' leaf walks
    (``on``), or stop logging."""
    from aiorpc_autograd import autograd as engine
    from aiorpc_autograd.transport import Connection

    if not on:
        _unpatch()
        return
    _WALK_LOG.clear()
    write, walk = Connection._write, engine._leaf_closure

    def logged_write(conn: Connection, chunks: list[bytes | memoryview]) -> None:
        _WALK_LOG.append(("write", sum(len(c) for c in chunks)))
        write(conn, chunks)

    def logged_walk(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        _WALK_LOG.append(("walk", len(tensors)))
        return walk(tensors)

    _patch((Connection, "_write", logged_write), (engine, "_leaf_closure", logged_walk))


_UNDO: list[tuple[Any, str, Any]] = []


def _patch(*patches: tuple[Any, str, Any]) -> None:
    """Set ``owner.name = new`` for each patch, in this worker, until :func:`_unpatch`."""
    for owner, name, new in patches:
        _UNDO.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)


def _unpatch() -> None:
    while _UNDO:
        owner, name, original = _UNDO.pop()
        setattr(owner, name, original)


def walk_log() -> list[tuple[str, int]]:
    return list(_WALK_LOG)


def deep_tanh(x: torch.Tensor) -> torch.Tensor:
    y = x
    for i in range(8):
        y = (y * param(f"deep{i}", (512,))).tanh()
    return y


async def walked_pass(rank: int, world_size: int) -> dict[str, Any]:
    await rpc.rpc_async("worker1", log_walks, args=(True,))
    try:
        x = torch.ones(512, requires_grad=True)
        async with dist_autograd.context() as cid:
            y = await rpc.rpc_async("worker1", deep_tanh, args=(x,))
            await asyncio.sleep(0.05)
            before = await rpc.rpc_async("worker1", walk_log)
            await dist_autograd.backward(cid, [y.sum()])
            grad = dist_autograd.get_gradients(cid)[x]
        log = await rpc.rpc_async("worker1", walk_log)
    finally:
        await rpc.rpc_async("worker1", log_walks, args=(False,))
    return {"before": before, "log": log, "grad": grad}


def test_the_leaf_walk_runs_once_after_the_reply_is_written(group: WorkerGroup) -> None:
    """The worker walks its reply's graph to the leaves once, right after the
    reply's frame is written (not before it, which would delay the reply),
    before any backward pass, which reuses that walk; gradients are unchanged."""
    got = group.call(0, walked_pass)
    assert ("walk", 1) in got["before"]
    log = got["log"]
    walks = [i for i, (what, _) in enumerate(log) if what == "walk"]
    assert len(walks) == 1, log
    # The reply (a 512-float tensor, 2 KiB) was written before the walk.
    assert any(what == "write" and n >= 2048 for what, n in log[: walks[0]]), log
    x = torch.ones(512, requires_grad=True)
    torch.autograd.backward([_local_deep_tanh(x).sum()])
    assert torch.allclose(got["grad"], x.grad)


def _local_deep_tanh(x: torch.Tensor) -> torch.Tensor:
    y = x
    for i in range(8):
        key = f"worker1:deep{i}:512:float32"
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        w = (torch.randn(512, generator=gen, dtype=torch.float64) * 0.7).float()
        y = (y * w).tanh()
    return y


# ------------------------------------------------------------------ releases go out at once

_RELEASED: dict[int, float] = {}


def log_releases(on: bool) -> None:
    """Note, in this worker, when each context is released here (``on``), or stop."""
    from aiorpc_autograd.autograd_service import AutogradService

    if not on:
        _unpatch()
        return
    _RELEASED.clear()
    original = AutogradService._release_here

    def logged(self: AutogradService, context_id: int, *args: Any, **kwargs: Any) -> Any:
        _RELEASED.setdefault(context_id, time.monotonic())
        return original(self, context_id, *args, **kwargs)

    _patch((AutogradService, "_release_here", logged))


def released_at(context_id: int) -> float | None:
    return _RELEASED.get(context_id)


async def release_then_block(rank: int, world_size: int) -> dict[str, Any]:
    await rpc.rpc_async("worker1", log_releases, args=(True,))
    try:
        x = torch.ones(4, requires_grad=True)
        async with dist_autograd.context() as cid:
            y = await rpc.rpc_async("worker1", torch.mul, args=(x, 2))
            await dist_autograd.backward(cid, [y.sum()])
        # Block this loop right after the release, as a training loop's next
        # step keeps it busy: the release must be on the wire already.
        time.sleep(0.3)
        unblocked = time.monotonic()
        released = await rpc.rpc_async("worker1", released_at, args=(cid,))
    finally:
        await rpc.rpc_async("worker1", log_releases, args=(False,))
    return {"released": released, "unblocked": unblocked}


def test_a_context_release_is_written_at_once(group: WorkerGroup) -> None:
    """Leaving a context writes its release to the workers it knows before the
    releasing loop turn ends: the worker releases its part while the creator
    is still busy (not with, and before, the creator's next request)."""
    got = group.call(0, release_then_block)
    assert got["released"] is not None
    assert got["released"] < got["unblocked"], got


async def release_is_a_notice(rank: int, world_size: int, drop_connection: bool) -> dict[str, Any]:
    from aiorpc_autograd import api
    from aiorpc_autograd.errors import ConnectionLostError

    agent = api.current_agent()
    x = torch.ones(4, requires_grad=True)
    async with dist_autograd.context() as cid:
        y = await rpc.rpc_async("worker2", torch.mul, args=(x, 2))
        await dist_autograd.backward(cid, [y.sum()])
        held = await query("worker2", ctx_info, cid)
        if drop_connection:  # the release must wait for, and use, a new one
            conn = agent._peers[2].conn
            assert conn is not None
            conn.abort(ConnectionLostError("dropped by the test"))
    pending = rpc.get_debug_info()["num_pending_requests"]
    start = time.monotonic()
    left = held
    while left is not None and time.monotonic() - start < 5.0:
        await asyncio.sleep(0.01)
        left = await query("worker2", ctx_info, cid)
    return {
        "held": held is not None,
        "pending": pending,
        "left": left,
        "took": time.monotonic() - start,
        "gone": agent.peer_gone(2),
    }


@pytest.mark.parametrize("drop_connection", [False, True], ids=["connected", "reconnecting"])
def test_a_context_release_is_a_notice(group: WorkerGroup, drop_connection: bool) -> None:
    """A release is never answered: leaving the context leaves no request
    pending; the worker still releases its part, also when the release had
    to wait for the connection to be opened again."""
    got = group.call(0, release_is_a_notice, drop_connection)
    assert got["held"]
    assert got["pending"] == 0
    assert got["left"] is None, got
    assert not got["gone"]
    # Well within the heartbeat timeout: the release, not liveness, freed it.
    assert got["took"] < 5.0


async def release_with_fault(rank: int, world_size: int, action: str) -> dict[str, Any]:
    from aiorpc_autograd import api
    from aiorpc_autograd.codec import CleanupAutogradContextReq
    from aiorpc_autograd.testing import Fault, clear_faults, inject_faults

    x = torch.ones(4, requires_grad=True)
    injector = inject_faults([Fault(CleanupAutogradContextReq, action=action, delay=0.4)])  # type: ignore[arg-type]
    try:
        async with dist_autograd.context() as cid:
            await rpc.rpc_async("worker2", torch.mul, args=(x, 2))
        left_at = time.monotonic()
    finally:
        clear_faults()
    await asyncio.sleep(0.2)
    held_soon = await query("worker2", ctx_info, cid) is not None
    start = time.monotonic()
    held_later = held_soon
    while held_later and time.monotonic() - start < 3.0:
        await asyncio.sleep(0.02)
        held_later = await query("worker2", ctx_info, cid) is not None
    released_after = time.monotonic() - left_at
    if held_later:  # dropped: release it now, for the group's later tests
        agent = api.current_agent()
        agent.notify(rpc.get_worker_info("worker2"), CleanupAutogradContextReq(cid))
        await wait_everywhere(world_size, "num_autograd_contexts")
    return {
        "applied": dict(injector.applied),
        "held_soon": held_soon,
        "held_later": held_later,
        "released_after": released_after,
    }


@pytest.mark.parametrize("action", ["drop", "fail", "delay", "disconnect"])
def test_injected_faults_apply_to_a_release(group: WorkerGroup, action: str) -> None:
    got = group.call(0, release_with_fault, action)
    assert got["applied"] == {action: 1}
    if action in ("drop", "fail"):  # never sent: the worker keeps its part
        assert got["held_soon"] and got["held_later"], got
    elif action == "delay":  # sent 0.4 s late
        assert got["held_soon"] and not got["held_later"], got
        assert got["released_after"] >= 0.4, got
    else:  # sent on a new connection
        assert not got["held_later"], got


_NOTICES: list[tuple[int, int]] = []


def log_release_notices(on: bool) -> list[tuple[int, int]]:
    """Note, in this worker, each release sent: (context id, to); or stop and
    return them."""
    from aiorpc_autograd.agent import RpcAgent
    from aiorpc_autograd.codec import CleanupAutogradContextReq

    if not on:
        _unpatch()
        return list(_NOTICES)
    _NOTICES.clear()
    original = RpcAgent.notify

    def logged(self: RpcAgent, to: Any, message: Any, write_now: bool = False) -> None:
        if isinstance(message, CleanupAutogradContextReq):
            _NOTICES.append((message.context_id, to.id))
        original(self, to, message, write_now)

    _patch((RpcAgent, "notify", logged))
    return []


async def release_along_a_chain(rank: int, world_size: int) -> dict[str, Any]:
    ranks = range(3)
    await asyncio.gather(*(query(r, log_release_notices, True) for r in ranks))
    try:
        x = torch.ones(4, requires_grad=True)
        async with dist_autograd.context() as cid:
            await call("worker1", hop, x, ["worker2"])  # worker0 -> worker1 -> worker2
        cleaned, _ = await wait_everywhere(world_size, "num_autograd_contexts")
    finally:
        sent = await asyncio.gather(*(query(r, log_release_notices, False) for r in ranks))
    return {"cid": cid, "cleaned": cleaned, "sent": [sorted(s) for s in sent]}


def test_a_release_cascades_never_back_to_its_sender_or_the_creator(group: WorkerGroup) -> None:
    got = group.call(0, release_along_a_chain)
    cid = got["cid"]
    assert got["cleaned"]
    # worker1 knows worker0 (the creator, which sent it) and worker2; worker2
    # knows only worker1, which sent it: it sends nothing.
    assert got["sent"] == [[(cid, 1)], [(cid, 2)], []], got


async def first_pass_imports(rank: int, world_size: int, init_method: str) -> list[str]:
    """A fresh worker's first distributed backward pass: which of the heavy
    modules torch.autograd.backward's grad check imports it loaded."""
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method)
    await barrier()
    if rank == 0:
        x = torch.ones(3, requires_grad=True)
        async with dist_autograd.context() as cid:
            y = await rpc.rpc_async("worker1", torch.mul, (x, x))
            await dist_autograd.backward(cid, [y.sum()])
            assert dist_autograd.get_gradients(cid)[x].tolist() == [2.0] * 3
    await rpc.shutdown()
    return [m for m in ("sympy", "torch.fx.experimental.symbolic_shapes") if m in sys.modules]


def test_the_first_backward_pass_does_not_import_sympy() -> None:
    # torch.autograd.backward's Python check of explicit gradients imports
    # torch.fx's symbolic shapes and sympy on its first call: ~0.75 s of every
    # worker's first pass. The engine's own check is used instead.
    assert run_processes(first_pass_imports, 2, timeout=60) == [[], []]
