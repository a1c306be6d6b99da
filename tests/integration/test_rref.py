"""RRefs between real worker processes: the API on owners and users, proxies,
creation errors and timeouts, backward through RRefs, the fork protocol
(chains, forks in flight while their parent drops its reference) and
reference counting back to zero, including at a graceful shutdown.

Most tests run their checks on one shared group of four service workers
(``worker0``..``worker3``): a check is a module-level ``async def
check_*(rank, world_size, ...)`` run on one worker, which returns plain values
(never RRefs); the assertions are made here, in the test process. After a
check, :func:`assert_settled` polls every worker (with a deadline) until no
owner or user RRef is left anywhere and every value an owner held is freed.

Values created on owners register themselves (weakly) in ``_OBJECTS`` of
their process under a token, so a check can ask "is this the owner's very
object" (identity) and "has the owner freed it" (the token is gone).

The graceful-shutdown tests run their own small groups (raw targets that call
``init_rpc``/``shutdown`` themselves and report the owner's counts after it).
"""

from __future__ import annotations

import asyncio
import gc
import pickle
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import api, dist_autograd
from aiorpc_autograd.codec import RRefBackwardReq
from tests.integration.common import async_sleep, await_outcome, blocking_sleep, call_outcome
from tests.integration.conftest import close_shared_group, shared_group
from tests.integration.harness import WorkerGroup, barrier, run_processes, run_workers

pytestmark = pytest.mark.timeout(90)

WORLD = 4
WORKERS = tuple(f"worker{r}" for r in range(WORLD))
SETTLE_S = 15.0
SHUTDOWN_S = 6.0  # bounds the graceful shutdowns of the shutdown tests


# --------------------------------------------------------------------- the shared group


@pytest.fixture(scope="module")
def _holder() -> Iterator[dict[str, WorkerGroup]]:
    holder: dict[str, WorkerGroup] = {}
    yield holder
    close_shared_group(holder)


@pytest.fixture
def group(_holder: dict[str, WorkerGroup]) -> WorkerGroup:
    """Four service workers shared by this module's tests (restarted when an
    earlier test broke them)."""
    return shared_group(_holder, WORLD)


# --------------------------------------------------------------------- remote values

_OBJECTS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_HELD: dict[str, Any] = {}  # strong references a worker keeps between checks
_LEAVES: dict[str, torch.Tensor] = {}


class Box:
    """A mutable value with plain and ``async`` methods."""

    def __init__(self, v: Any, token: str | None = None) -> None:
        self.v = v
        self.token = token
        if token is not None:
            _OBJECTS[token] = self  # only the constructing (owning) process

    def get(self) -> Any:
        return self.v

    def add(self, x: Any) -> Any:
        self.v = self.v + x
        return self.v

    def where(self) -> tuple[str, bool]:
        """Where a plain method runs: the owner's name, on the loop thread?"""
        return rpc.get_worker_info().name, threading.current_thread() is threading.main_thread()

    async def aget(self, delay: float = 0.0) -> tuple[Any, str, bool]:
        """An ``async`` method: awaited on the owner's loop (main thread)."""
        await asyncio.sleep(delay)
        name = rpc.get_worker_info().name
        return self.v, name, threading.current_thread() is threading.main_thread()

    def fail(self) -> None:
        raise ValueError(f"box {self.token} refuses")


async def make_box_async(v: Any, token: str | None = None) -> Box:
    await asyncio.sleep(0.01)
    return Box(v, token)


def slow_box(delay: float, v: Any, token: str | None = None) -> Box:
    time.sleep(delay)
    return Box(v, token)


def raise_key_error() -> None:
    _ = {}["missing"]


async def raise_value_error_async(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


def _state_here() -> tuple[str, int, int, list[str]]:
    gc.collect()
    info = rpc.get_debug_info()
    name = rpc.get_worker_info().name
    return name, info["num_owner_rrefs"], info["num_user_rrefs"], sorted(_OBJECTS)


async def all_states() -> list[tuple[str, int, int, list[str]]]:
    return list(await asyncio.gather(*(rpc.rpc_async(n, _state_here) for n in WORKERS)))


async def check_settled(
    rank: int, world_size: int, deadline_s: float = SETTLE_S
) -> list[tuple[str, int, int, list[str]]]:
    """Poll every worker until no RRef and no owned value is left anywhere, or
    the deadline passes; return the last observation."""
    end = time.monotonic() + deadline_s
    while True:
        states = await all_states()
        if all(s[1:] == (0, 0, []) for s in states) or time.monotonic() > end:
            return states
        await asyncio.sleep(0.05)


def assert_settled(group: WorkerGroup) -> None:
    states = group.call(0, check_settled, timeout=SETTLE_S + 15)
    assert states == [(n, 0, 0, []) for n in WORKERS]


async def check_states(rank: int, world_size: int) -> list[tuple[str, int, int, list[str]]]:
    return await all_states()


async def release_held(rank: int, world_size: int) -> list[str]:
    keys = sorted(_HELD)
    _HELD.clear()
    gc.collect()
    return keys


async def wait_until(predicate: Any, deadline_s: float = 5.0) -> bool:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


# --------------------------------------------------------------------- owner and user API


async def check_owner_side(rank: int, world_size: int) -> dict[str, Any]:
    me = rpc.get_worker_info()
    box = Box(5, "owner-side")
    r = rpc.RRef(box)
    out: dict[str, Any] = {
        "me": me,
        "is_owner": r.is_owner(),
        "owner": r.owner(),
        "owner_name": r.owner_name(),
        "local_value_is_box": r.local_value() is box,
        "to_here_is_box": (await r.to_here()) is box,
        "to_here_timeout_is_box": (await r.to_here(timeout=5)) is box,
        "confirmed": r.confirmed_by_owner(),
        "get": await r.rpc_async().get(),
        "add": await r.rpc_async().add(2),
        "add_kwargs": await r.rpc_async(timeout=10).add(x=1),
        "aget": await r.rpc_async().aget(0.01),
        "where": await r.rpc_async().where(),
        # The blocking proxy, off the loop thread (on it, it would deadlock).
        "rpc_sync_add": await asyncio.to_thread(lambda: r.rpc_sync().add(3)),
    }
    try:
        r.rpc_sync().get()
        out["rpc_sync_on_loop"] = "no error"
    except RuntimeError as exc:
        out["rpc_sync_on_loop"] = exc
    r2 = r.remote().add(1)
    out["remote_proxy"] = (r2.is_owner(), r2.owner_name(), await r2.to_here())
    r3 = r.remote().aget()
    out["remote_proxy_async"] = await r3.to_here()
    out["box_v"] = box.v
    # Pickled outside RPC: torch's RuntimeError.
    out["pickled"] = call_outcome(pickle.dumps, r)

    # remote() to this very worker: by name (plain function) and by rank (async).
    r4 = rpc.remote(me.name, Box, (40, "self-remote"))
    r5 = rpc.remote(rank, make_box_async, (50, "self-remote-async"))
    v4, v5 = await r4.to_here(), await r5.to_here()
    out["self_remote"] = (
        r4.is_owner(),
        r4.owner_name(),
        v4 is _OBJECTS["self-remote"],
        r4.local_value() is v4,
        r4.confirmed_by_owner(),
        await r4.rpc_async().add(2),
    )
    out["self_remote_async"] = (r5.is_owner(), v5 is _OBJECTS["self-remote-async"], v5.v)
    return out


def test_owner_side_api(group: WorkerGroup) -> None:
    got = group.call(0, check_owner_side)
    me = rpc.WorkerInfo("worker0", 0)
    assert got["me"] == me
    assert got["is_owner"] is True
    assert got["owner"] == me
    assert got["owner_name"] == "worker0"
    assert got["local_value_is_box"] and got["to_here_is_box"] and got["to_here_timeout_is_box"]
    assert got["confirmed"] is True
    assert got["get"] == 5
    assert got["add"] == 7
    assert got["add_kwargs"] == 8
    assert got["aget"] == (8, "worker0", True)  # async method: on the owner's loop
    assert got["where"] == ("worker0", False)  # plain method: in the owner's pool
    assert got["rpc_sync_add"] == 11
    assert isinstance(got["rpc_sync_on_loop"], RuntimeError)
    assert got["remote_proxy"] == (True, "worker0", 12)
    assert got["remote_proxy_async"] == (12, "worker0", True)
    assert got["box_v"] == 12
    assert isinstance(got["pickled"], RuntimeError) and "Can not pickle rref" in str(got["pickled"])
    assert got["self_remote"] == (True, "worker0", True, True, True, 42)
    assert got["self_remote_async"] == (True, True, 50)
    assert_settled(group)


def sync_proxy_add(r: rpc.RRef[Box], x: int) -> tuple[int, str]:
    """A plain remote function using the blocking proxy (runs off the loop)."""
    return r.rpc_sync().add(x), rpc.get_worker_info().name


def owner_value(token: str) -> Any:
    return _OBJECTS[token].v


async def check_user_side(rank: int, world_size: int) -> dict[str, Any]:
    slow = rpc.remote("worker2", slow_box, (0.3, 1))
    r = rpc.remote("worker1", Box, (5, "user-side"))
    out: dict[str, Any] = {
        "slow_confirmed_at_once": slow.confirmed_by_owner(),
        "is_owner": r.is_owner(),
        "owner": r.owner(),
        "owner_name": r.owner_name(),
    }
    try:
        r.local_value()
        out["local_value"] = "no error"
    except RuntimeError as exc:
        out["local_value"] = exc
    copy = await r.to_here()
    out["to_here"] = (type(copy).__name__, copy.v, copy.token)
    copy.v = 1000  # a copy: the owner's value does not change
    out["after_copy_mutation"] = (await r.to_here(timeout=5)).v
    out["confirmed"] = await wait_until(r.confirmed_by_owner)
    out["get"] = await r.rpc_async().get()
    out["add"] = await r.rpc_async().add(2)
    out["add_kwargs"] = await r.rpc_async(timeout=10).add(x=1)
    out["aget"] = await r.rpc_async().aget(0.01)
    out["where"] = await r.rpc_async().where()
    out["rpc_sync_add"] = await asyncio.to_thread(lambda: r.rpc_sync().add(3))
    # The blocking proxy inside a plain remote function on a third worker.
    out["rpc_sync_elsewhere"] = await rpc.rpc_async("worker2", sync_proxy_add, (r, 1))
    r2 = r.remote().add(1)
    out["remote_proxy"] = (r2.is_owner(), r2.owner(), await r2.to_here())
    r3 = r.remote().aget()
    out["remote_proxy_async"] = await r3.to_here()
    out["owner_value"] = await rpc.rpc_async("worker1", owner_value, ("user-side",))
    out["slow_value"] = (await slow.to_here()).v
    out["slow_confirmed_later"] = await wait_until(slow.confirmed_by_owner)
    return out


def test_user_side_api(group: WorkerGroup) -> None:
    got = group.call(0, check_user_side)
    owner = rpc.WorkerInfo("worker1", 1)
    assert got["is_owner"] is False
    assert got["owner"] == owner
    assert got["owner_name"] == "worker1"
    assert isinstance(got["local_value"], RuntimeError)
    assert got["to_here"] == ("Box", 5, "user-side")
    assert got["after_copy_mutation"] == 5
    assert got["confirmed"] is True
    assert got["get"] == 5
    assert got["add"] == 7
    assert got["add_kwargs"] == 8
    assert got["aget"] == (8, "worker1", True)
    assert got["where"] == ("worker1", False)
    assert got["rpc_sync_add"] == 11
    assert got["rpc_sync_elsewhere"] == (12, "worker2")
    assert got["remote_proxy"] == (False, owner, 13)
    assert got["remote_proxy_async"] == (13, "worker1", True)
    assert got["owner_value"] == 13
    # The creator's reference is confirmed once the owner created the value.
    assert got["slow_confirmed_at_once"] is False
    assert (got["slow_value"], got["slow_confirmed_later"]) == (1, True)
    assert_settled(group)


# --------------------------------------------------------------------- RRef(value) travels


async def describe(r: rpc.RRef[Any]) -> dict[str, Any]:
    """On a user: what it sees of an RRef it received."""
    out: dict[str, Any] = {
        "me": rpc.get_worker_info().name,
        "is_owner": r.is_owner(),
        "owner_name": r.owner_name(),
    }
    try:
        r.local_value()
        out["local_value"] = "no error"
    except RuntimeError as exc:
        out["local_value"] = type(exc).__name__
    value = await r.to_here()
    out["value"] = value.v if isinstance(value, Box) else value
    out["confirmed"] = await wait_until(r.confirmed_by_owner)
    return out


async def is_own_value(r: rpc.RRef[Any], token: str) -> tuple[bool, bool, bool, bool]:
    """On the owner: the received RRef resolves to its very object."""
    value = await r.to_here()
    return (
        r.is_owner(),
        r.local_value() is _OBJECTS[token],
        value is _OBJECTS[token],
        (r.confirmed_by_owner()),
    )


async def relay(r: rpc.RRef[Any], to: str, func: Any, *args: Any) -> Any:
    """Pass ``r`` on: ``func(r, *args)`` runs on ``to``."""
    return await rpc.rpc_async(to, func, (r, *args))


async def identity_async(r: Any) -> Any:
    return r


def is_user_rref(rref: rpc.RRef[Any]) -> bool:
    return not rref.is_owner()


async def check_printed_forms(rank: int, world_size: int) -> dict[str, Any]:
    """torch's test_rref_str and test_local_value_not_on_owner, in a fresh group."""
    dst = (rank + 1) % world_size
    owned = rpc.RRef(rank)
    user = rpc.remote(f"worker{dst}", torch.add, (torch.ones(2, 2), 1))
    try:
        user.local_value()
        local_value = "no error"
    except RuntimeError as exc:
        local_value = str(exc)
    await user.to_here()
    # An RRef argument is forked (id 3) before the new RRef's ids (4, 5), as in torch.
    passed = rpc.remote(f"worker{dst}", is_user_rref, (owned,))
    return {
        "owned": (str(owned), repr(owned)),
        "user": (str(user), repr(user)),
        "passed": (str(passed), await passed.to_here()),
        "local_value": local_value,
        "me": repr(rpc.get_worker_info()),
    }


def test_rrefs_and_worker_infos_print_in_torchs_words() -> None:
    results = run_workers(check_printed_forms, 2)
    for rank, got in enumerate(results):
        uid = "GloballyUniqueId(created_on={}, local_id={})".format
        owned = f"OwnerRRef({uid(rank, 0)})"
        user = f"UserRRef(RRefId = {uid(rank, 1)}, ForkId = {uid(rank, 2)})"
        assert got["owned"] == (owned, owned)
        assert got["user"] == (user, user)
        passed = f"UserRRef(RRefId = {uid(rank, 4)}, ForkId = {uid(rank, 5)})"
        assert got["passed"] == (passed, True)
        assert got["me"] == f"WorkerInfo(id={rank}, name=worker{rank})"
        other = 1 - rank
        assert got["local_value"].startswith(
            f"For UserRRef(rref_id={uid(rank, 1)}, fork_id={uid(rank, 2)}), can't call "
            f"localValue() on user WorkerInfo(id={rank}, name=worker{rank}). "
            f"Call it on owner WorkerInfo(id={other}, name=worker{other})"
        ), got["local_value"]


async def check_local_rref_travels(rank: int, world_size: int) -> dict[str, Any]:
    box = Box(3, "local-rref")
    r = rpc.RRef(box)
    t = rpc.RRef(torch.arange(6.0).reshape(2, 3))
    out: dict[str, Any] = {}
    out["users"] = await asyncio.gather(
        rpc.rpc_async("worker1", describe, (r,)),
        rpc.rpc_async("worker2", describe, (r,)),
        rpc.rpc_async("worker3", describe, (t,)),
    )
    # Back to the owner through a user: the owner sees its own object.
    out["back_via_user"] = await rpc.rpc_async(
        "worker2", relay, (r, "worker0", is_own_value, "local-rref")
    )
    # In a result: an RRef to our own value comes back as an owner RRef.
    back = await rpc.rpc_async("worker3", identity_async, (r,))
    out["back_in_result"] = (back.is_owner(), back.local_value() is box)
    # A user mutates the owner's value through a proxy.
    out["user_proxy_add"] = await rpc.rpc_async("worker1", relay_add, (r, 4))
    out["box_v"] = box.v
    return out


async def relay_add(r: rpc.RRef[Box], x: int) -> Any:
    return await r.rpc_async().add(x)


def test_local_owner_rref_passed_to_other_workers(group: WorkerGroup) -> None:
    got = group.call(0, check_local_rref_travels)
    users = got["users"]
    for name, seen in zip(("worker1", "worker2"), users[:2], strict=True):
        assert seen == {
            "me": name,
            "is_owner": False,
            "owner_name": "worker0",
            "local_value": "RuntimeError",
            "value": 3,
            "confirmed": True,
        }
    assert users[2]["owner_name"] == "worker0"
    assert torch.equal(users[2]["value"], torch.arange(6.0).reshape(2, 3))
    assert got["back_via_user"] == (True, True, True, True)
    assert got["back_in_result"] == (True, True)
    assert got["user_proxy_add"] == 7
    assert got["box_v"] == 7
    assert_settled(group)


# --------------------------------------------------------------------- creation errors


async def fetch_outcome(r: rpc.RRef[Any]) -> Any:
    return await await_outcome(r.to_here())


async def check_creation_errors(rank: int, world_size: int) -> dict[str, Any]:
    bad = rpc.remote("worker1", raise_key_error)
    out: dict[str, Any] = {
        "to_here": await await_outcome(bad.to_here()),
        "to_here_again": await await_outcome(bad.to_here()),
        "proxy": await await_outcome(bad.rpc_async().get()),
        "remote_proxy": await await_outcome(bad.remote().get().to_here()),
        "async_func": await await_outcome(
            rpc.remote("worker2", raise_value_error_async, ("async boom",)).to_here()
        ),
        "bad_ctor": await await_outcome(rpc.remote("worker3", Box, (1,), {"nope": 2}).to_here()),
        "self": await await_outcome(rpc.remote("worker0", raise_key_error).to_here()),
    }
    # A third worker fetching the failed value gets the owner's error too.
    out["fetched_elsewhere"] = await rpc.rpc_async("worker2", fetch_outcome, (bad,))
    try:
        await bad.to_here()
        out["except_key_error"] = "no error"
    except KeyError:
        out["except_key_error"] = "caught"
    # A method that raises, on a good value: the RRef itself stays usable.
    good = rpc.remote("worker1", Box, (1, "creation-errors-good"))
    out["method_raises"] = await await_outcome(good.rpc_async().fail())
    out["no_such_method"] = await await_outcome(good.rpc_async().nope())
    out["remote_method_raises"] = await await_outcome(good.remote().fail().to_here())
    out["still_usable"] = await good.rpc_async().get()
    return out


def test_remote_creation_errors_surface_as_remote_error(group: WorkerGroup) -> None:
    got = group.call(0, check_creation_errors)
    for key in ("to_here", "to_here_again", "proxy", "remote_proxy", "fetched_elsewhere"):
        err = got[key]
        assert isinstance(err, rpc.RemoteError), (key, err)
        assert isinstance(err, KeyError), (key, err)
        assert err.type_name.endswith("KeyError") and "missing" in err.remote_message, key
        assert err.worker == "worker1", key
    assert got["except_key_error"] == "caught"
    err = got["async_func"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, ValueError)
    assert err.worker == "worker2" and err.remote_message == "async boom"
    err = got["bad_ctor"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, TypeError)
    assert err.worker == "worker3"
    err = got["self"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, KeyError)
    assert err.worker == "worker0"
    err = got["method_raises"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, ValueError)
    assert "refuses" in err.remote_message and err.worker == "worker1"
    assert isinstance(got["no_such_method"], rpc.RemoteError)
    assert isinstance(got["no_such_method"], AttributeError)
    err = got["remote_method_raises"]
    assert isinstance(err, rpc.RemoteError) and isinstance(err, ValueError)
    assert got["still_usable"] == 1
    assert_settled(group)


async def check_creation_timeout(rank: int, world_size: int) -> dict[str, Any]:
    started = time.monotonic()
    slow_plain = rpc.remote("worker1", blocking_sleep, (1.5, "late"), timeout=0.2)
    slow_async = rpc.remote("worker2", async_sleep, (1.5, "late"), timeout=0.2)
    results = await asyncio.gather(
        await_outcome(slow_plain.to_here()), await_outcome(slow_async.to_here())
    )
    return {"errors": results, "elapsed": time.monotonic() - started}


def test_remote_creation_timeout_raises_at_to_here(group: WorkerGroup) -> None:
    got = group.call(0, check_creation_timeout)
    for err in got["errors"]:
        assert isinstance(err, rpc.RpcTimeoutError), err
        assert isinstance(err, TimeoutError)
    assert got["elapsed"] < 1.4  # the small timeout, not the slow function
    # The late values are created after all; the user references are gone and
    # the owners free them.
    assert_settled(group)


# --------------------------------------------------------------------- local_value waits


def failing_ctor(delay: float) -> Box:
    time.sleep(delay)
    raise ValueError("the constructor failed")


def _call_method(method: Any, rref: rpc.RRef[Any], *args: Any, **kwargs: Any) -> Any:
    """The helper of every PyTorch RPC tutorial, verbatim."""
    return method(rref.local_value(), *args, **kwargs)


async def _acall_method(name: str, rref: rpc.RRef[Any]) -> Any:
    """The same in an ``async def`` (on the owner's loop)."""
    return getattr(rref.local_value(), name)()


async def relay_call_method(r: rpc.RRef[Box], owner: str) -> Any:
    return await rpc.rpc_async(owner, _call_method, (Box.get, r))


async def owner_local_value() -> dict[str, Any]:
    """On the owner: ``local_value()`` of a ``remote()`` to itself still being
    created, on the loop thread and in a user thread."""
    me = rpc.get_worker_info()
    r = rpc.remote(me, slow_box, (0.3, 5))
    on_loop = call_outcome(r.local_value)
    in_thread = await asyncio.to_thread(r.local_value)
    bad = rpc.remote(me, failing_ctor, (0.2,))
    bad_in_thread = await asyncio.to_thread(call_outcome, bad.local_value)
    return {"on_loop": on_loop, "in_thread": in_thread.v, "bad_in_thread": bad_in_thread}


async def check_local_value_waits(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The tutorial pattern, right after remote() of a constructor that sleeps.
    values = []
    for i in range(3):
        r = rpc.remote("worker1", slow_box, (0.2, i))
        values.append(await rpc.rpc_async(r.owner(), _call_method, (Box.get, r)))
    out["call_method"] = values
    r = rpc.remote("worker1", slow_box, (0.2, 10))
    out["call_method_sync"] = await asyncio.to_thread(
        lambda: rpc.rpc_sync(r.owner(), _call_method, (Box.add, r, 1))
    )
    r = rpc.remote("worker1", slow_box, (0.2, 20))
    out["call_method_async"] = await rpc.rpc_async(r.owner(), _acall_method, ("get", r))
    # Through a third worker that received the RRef from the creator.
    r = rpc.remote("worker1", slow_box, (0.2, 30))
    out["via_third"] = await rpc.rpc_async("worker2", relay_call_method, (r, "worker1"))
    # A constructor that fails: the call fails with its error.
    bad = rpc.remote("worker1", failing_ctor, (0.2,))
    out["failing"] = await await_outcome(rpc.rpc_async("worker1", _call_method, (Box.get, bad)))
    out["failing_to_here"] = await await_outcome(bad.to_here())
    out["owner"] = await rpc.rpc_async("worker1", owner_local_value)
    # The blocking to_here, from a thread; on the loop it refuses.
    r = rpc.remote("worker2", slow_box, (0.2, 40))
    out["to_here_sync"] = (await asyncio.to_thread(r.to_here_sync)).v
    out["to_here_sync_on_loop"] = call_outcome(r.to_here_sync)
    slow = rpc.remote("worker2", slow_box, (1.0, 41))
    started = time.monotonic()
    out["to_here_sync_timeout"] = await asyncio.to_thread(
        call_outcome, slow.to_here_sync, timeout=0.2
    )
    out["to_here_sync_timeout_s"] = time.monotonic() - started
    return out


def test_local_value_waits_for_a_value_being_created(group: WorkerGroup) -> None:
    """Issue 12 item 1: ``_call_method`` via ``rpc_async(rref.owner(), ...)``
    right after ``remote(owner, SlowCtor)`` works every time; a failing
    constructor gives the caller its error; ``local_value()`` waits off the loop
    and refuses on it; ``to_here_sync`` blocks in threads."""
    got = group.call(0, check_local_value_waits)
    assert got["call_method"] == [0, 1, 2]
    assert got["call_method_sync"] == 11
    assert got["call_method_async"] == 20
    assert got["via_third"] == 30
    for key in ("failing", "failing_to_here"):
        err = got[key]
        assert isinstance(err, rpc.RemoteError) and isinstance(err, ValueError), (key, err)
        assert err.worker == "worker1" and "constructor failed" in err.remote_message, key
    owner = got["owner"]
    assert isinstance(owner["on_loop"], RuntimeError)
    assert "await rref.to_here()" in str(owner["on_loop"])
    assert owner["in_thread"] == 5
    err = owner["bad_in_thread"]
    assert isinstance(err, ValueError) and "constructor failed" in str(err), err
    assert got["to_here_sync"] == 40
    assert isinstance(got["to_here_sync_on_loop"], RuntimeError)
    assert "await rref.to_here()" in str(got["to_here_sync_on_loop"])
    assert isinstance(got["to_here_sync_timeout"], rpc.RpcTimeoutError)
    assert got["to_here_sync_timeout_s"] < 0.9
    assert_settled(group)


# --------------------------------------------------------------------- remote() timeouts


async def check_remote_timeouts(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # remote() times out; the value is created late on the owner.
    r = rpc.remote("worker1", blocking_sleep, (0.6, "late"), timeout=0.2)
    await asyncio.sleep(1.0)
    out["late_to_here"] = await await_outcome(r.to_here())
    out["late_to_here_timeout"] = await await_outcome(r.to_here(timeout=5))
    out["late_proxy"] = await await_outcome(r.rpc_async(timeout=5).upper())
    out["late_proxy_sync"] = await asyncio.to_thread(
        call_outcome, lambda: r.rpc_sync(timeout=5).upper()
    )
    out["late_proxy_remote"] = await await_outcome(r.remote(timeout=5).upper().to_here())
    # A proxy call made while the creation is still pending: it times out first.
    r2 = rpc.remote("worker2", blocking_sleep, (0.6, "late"), timeout=0.2)
    out["pending_proxy"] = await await_outcome(r2.rpc_async(timeout=5).upper())
    # to_here's own timeout bounds the wait for a slow creation.
    r3 = rpc.remote("worker3", blocking_sleep, (1.5, "slow"))
    started = time.monotonic()
    out["bounded"] = await await_outcome(r3.to_here(timeout=0.3))
    out["bounded_s"] = time.monotonic() - started
    out["later"] = await r3.to_here()
    # remote() to this worker, dropped before the value exists: no leak.
    r4 = rpc.remote("worker0", slow_box, (0.3, 1, "self-dropped"))
    del r4
    gc.collect()
    await asyncio.sleep(0.6)
    gc.collect()
    out["self_dropped"] = (rpc.get_debug_info()["num_owner_rrefs"], "self-dropped" in _OBJECTS)
    return out


def test_remote_timeouts_and_lifetimes_as_in_torch(group: WorkerGroup) -> None:
    """Issue 12 item 9: after remote() timed out, to_here and proxies raise
    RpcTimeoutError (not the late value); to_here(timeout) bounds the wait for
    the creation; a remote() to self dropped early does not leak its entry."""
    got = group.call(0, check_remote_timeouts)
    for key in (
        "late_to_here",
        "late_to_here_timeout",
        "late_proxy",
        "late_proxy_sync",
        "late_proxy_remote",
        "pending_proxy",
        "bounded",
    ):
        assert isinstance(got[key], rpc.RpcTimeoutError), (key, got[key])
    assert got["bounded_s"] < 1.0, got["bounded_s"]
    assert got["later"] == "slow"
    assert got["self_dropped"] == (0, False)
    assert_settled(group)


# --------------------------------------------------------------------- backward


def make_loss(token: str) -> torch.Tensor:
    """On the owner: a leaf kept in ``_LEAVES`` and a scalar loss of it."""
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    _LEAVES[token] = w
    return (w * w).sum()


def weighted_loss(x: torch.Tensor, token: str) -> torch.Tensor:
    """On the owner: a local leaf ``w`` and a loss of a remote input ``x``."""
    w = torch.tensor([0.5, 1.5, -1.0], requires_grad=True)
    _LEAVES[token] = w
    return (x * x * w).sum()


def leaf_grad(token: str) -> torch.Tensor | None:
    return _LEAVES[token].grad


def pop_leaf(token: str) -> torch.Tensor:
    return _LEAVES.pop(token).detach()


def context_grad(context_id: int, token: str) -> torch.Tensor | None:
    return dist_autograd.get_gradients(context_id).get(_LEAVES[token])


async def check_backward(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Owner, local autograd (context_id=-1): .grad of the leaves.
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    r = rpc.RRef((w * w).sum())
    await r.backward()
    out["owner_local"] = w.grad.clone()  # type: ignore[union-attr]
    r = rpc.RRef((w * 3).sum())
    await r.backward(retain_graph=True)
    await r.backward(context_id=-1)
    out["owner_local_accumulated"] = w.grad.clone()  # type: ignore[union-attr]

    # User, local autograd (-1): refused, as torch refuses it ("In the local
    # case, the node calling this API has to be the owner of the RRef"), here
    # and on the owner when a peer asks for it on the wire.
    r = rpc.remote("worker1", make_loss, ("bw-user-local",))
    # The refusals below need not wait for the creation; the leaf must exist
    # before leaf_grad reads it.
    await r.to_here()
    for attempt in (r.backward(-1, retain_graph=True), r.backward()):
        with pytest.raises(RuntimeError) as info:
            await attempt
        out.setdefault("user_local", []).append(str(info.value))
    agent = api.current_agent()
    raw = RRefBackwardReq(list(r._rref_id), -1, False)
    with pytest.raises(rpc.RemoteError) as remote_info:
        await agent.request(agent.worker_info("worker1"), raw, decode=lambda m: None)
    out["user_local_on_the_wire"] = str(remote_info.value)
    out["user_local_dot_grad"] = await rpc.rpc_async("worker1", leaf_grad, ("bw-user-local",))
    await rpc.rpc_async("worker1", pop_leaf, ("bw-user-local",))
    # A value that is not a tensor: torch's words, from the owner.
    async with dist_autograd.context() as cid:
        not_a_tensor = rpc.remote("worker1", str.upper, ("foo",))
        with pytest.raises(RuntimeError) as info:
            await not_a_tensor.backward(cid)
        out["not_a_tensor"] = (type(info.value).__name__, str(info.value))

    # Owner, in a context: the backward crosses to worker1 and back.
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    async with dist_autograd.context() as cid:
        y = await rpc.rpc_async("worker1", torch.mul, (x, x))
        r = rpc.RRef((y * 2).sum())
        await r.backward(cid)
        out["owner_ctx"] = dist_autograd.get_gradients(cid)[x]
    out["owner_ctx_dot_grad"] = x.grad

    # User, in a context: the loss lives on worker1, the input on worker0.
    x = torch.tensor([1.0, -1.0, 2.0], requires_grad=True)
    async with dist_autograd.context() as cid:
        r = rpc.remote("worker1", weighted_loss, (x, "bw-user-ctx"))
        await r.backward(cid)
        out["user_ctx_x"] = dist_autograd.get_gradients(cid)[x]
        out["user_ctx_w"] = await rpc.rpc_async("worker1", context_grad, (cid, "bw-user-ctx"))
    out["user_ctx_w_dot_grad"] = await rpc.rpc_async("worker1", leaf_grad, ("bw-user-ctx",))
    out["user_ctx_w_value"] = await rpc.rpc_async("worker1", pop_leaf, ("bw-user-ctx",))
    out["user_ctx_x_value"] = x.detach()
    return out


def test_backward_from_rref_owner_and_user(group: WorkerGroup) -> None:
    got = group.call(0, check_backward)
    assert torch.equal(got["owner_local"], torch.tensor([2.0, 4.0, 6.0]))
    assert torch.equal(got["owner_local_accumulated"], torch.tensor([8.0, 10.0, 12.0]))
    assert len(got["user_local"]) == 2
    for said in [*got["user_local"], got["user_local_on_the_wire"]]:
        assert "User RRefs require 'dist_autograd_ctx_id' to be specified" in said
    assert got["user_local_dot_grad"] is None
    kind, said = got["not_a_tensor"]
    assert kind == "RemoteRuntimeError" and "RRef should contain a tensor for .backward()" in said
    assert torch.equal(got["owner_ctx"], torch.tensor([4.0, 8.0, 12.0]))
    assert got["owner_ctx_dot_grad"] is None
    # Parity with local autograd on the same computation.
    x = got["user_ctx_x_value"].clone().requires_grad_()
    w = got["user_ctx_w_value"].clone().requires_grad_()
    (x * x * w).sum().backward()
    assert torch.allclose(got["user_ctx_x"], x.grad)
    assert torch.allclose(got["user_ctx_w"], w.grad)
    assert got["user_ctx_w_dot_grad"] is None
    assert_settled(group)


def make_param(token: str) -> torch.Tensor:
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]], requires_grad=True)
    _LEAVES[token] = w
    return w


async def third_worker_backward(
    r: rpc.RRef[torch.Tensor], c: torch.Tensor, token: str
) -> dict[str, Any]:
    """On a third worker: fetch and call through the RRef in a context, run the
    backward and collect the gradient that reached the owner."""
    async with dist_autograd.context() as cid:
        v = await r.to_here()
        scaled = await r.rpc_async().mul(c)  # a proxy call, recorded as well
        loss = (v * v * c).sum() + scaled.sum()
        await dist_autograd.backward(cid, [loss])
        owner_grad = await rpc.rpc_async(r.owner(), context_grad, (cid, token))
        local_grads = dist_autograd.get_gradients(cid)
    return {
        "requires_grad": v.requires_grad,
        "value": v.detach(),
        "owner_grad": owner_grad,
        "local_grads": len(local_grads),
    }


async def check_third_worker_backward(rank: int, world_size: int) -> dict[str, Any]:
    r = rpc.remote("worker1", make_param, ("third",))
    c = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    got = await rpc.rpc_async("worker2", third_worker_backward, (r, c, "third"))
    got["owner_dot_grad"] = await rpc.rpc_async("worker1", leaf_grad, ("third",))
    got["owner_value"] = await rpc.rpc_async("worker1", pop_leaf, ("third",))
    got["c"] = c
    return got


def test_third_worker_to_here_in_context_backward_reaches_owner(group: WorkerGroup) -> None:
    got = group.call(0, check_third_worker_backward)
    assert got["requires_grad"] is True
    assert torch.equal(got["value"], got["owner_value"])
    w = got["owner_value"].clone().requires_grad_()
    c = got["c"]
    ((w * w * c).sum() + (w * c).sum()).backward()
    assert got["owner_grad"] is not None
    assert torch.allclose(got["owner_grad"], w.grad)
    assert got["local_grads"] == 0  # no leaf of the third worker took part
    assert got["owner_dot_grad"] is None  # gradients go to the context only
    assert_settled(group)


# --------------------------------------------------------------------- forks


async def observe(r: rpc.RRef[Box], add: int) -> dict[str, Any]:
    """On a user at the end of a chain: what it sees, and a proxy update."""
    return {
        "me": rpc.get_worker_info().name,
        "is_owner": r.is_owner(),
        "owner_name": r.owner_name(),
        "value": (await r.to_here()).v,
        "after_add": await r.rpc_async().add(add),
    }


async def pass_on(r: rpc.RRef[Box], to: str, add: int) -> dict[str, Any]:
    """On C: look at the RRef, then pass it to D."""
    mine = (await r.to_here()).v
    theirs = await rpc.rpc_async(to, observe, (r, add))
    return {"me": rpc.get_worker_info().name, "value": mine, "next": theirs}


async def hop(r: rpc.RRef[Box], route: list[str]) -> list[tuple[str, bool, Any]]:
    """Fetch here, then pass the RRef along ``route``."""
    here = (rpc.get_worker_info().name, r.is_owner(), (await r.to_here()).v)
    if not route:
        return [here]
    return [here, *await rpc.rpc_async(route[0], hop, (r, route[1:]))]


async def round_trip(r: rpc.RRef[Box], via: str) -> rpc.RRef[Box]:
    """On C: send the RRef to D and return what D returned (an RRef in results)."""
    return await rpc.rpc_async(via, identity_async, (r,))


async def hold(r: rpc.RRef[Any], key: str) -> tuple[str, bool]:
    _HELD[key] = r
    return rpc.get_worker_info().name, r.is_owner()


async def fetch_held(rank: int, world_size: int, key: str) -> Any:
    return (await _HELD[key].to_here(timeout=5)).v


async def check_chains(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    r = rpc.remote("worker1", Box, (10, "chain"))  # A=worker0 creates on B=worker1
    # A -> C (worker2) -> D (worker3), each fetching; D updates through a proxy.
    out["a_c_d"] = await rpc.rpc_async("worker2", pass_on, (r, "worker3", 1))
    out["a_sees"] = (await r.to_here()).v
    # C passes it back to the owner B, which sees its own object.
    out["c_to_owner"] = await rpc.rpc_async("worker2", relay, (r, "worker1", is_own_value, "chain"))
    # A long route through every worker, the owner and the creator included.
    route = ["worker3", "worker0", "worker2", "worker1", "worker3", "worker2"]
    out["route"] = await rpc.rpc_async("worker2", hop, (r, route))
    # Back to A as a result through C and D: the same value.
    back = await rpc.rpc_async("worker2", round_trip, (r, "worker3"))
    out["returned"] = (back.is_owner(), back.owner_name(), await back.rpc_async().add(5))
    out["a_sees_after"] = (await r.to_here()).v
    del back
    # D keeps a fork (received through C) after everyone else dropped theirs.
    out["held"] = await rpc.rpc_async("worker2", relay, (r, "worker3", hold, "chain"))
    return out


def test_chains_of_forks(group: WorkerGroup) -> None:
    got = group.call(0, check_chains)
    assert got["a_c_d"] == {
        "me": "worker2",
        "value": 10,
        "next": {
            "me": "worker3",
            "is_owner": False,
            "owner_name": "worker1",
            "value": 10,
            "after_add": 11,
        },
    }
    assert got["a_sees"] == 11
    assert got["c_to_owner"] == (True, True, True, True)
    assert got["route"] == [
        ("worker2", False, 11),
        ("worker3", False, 11),
        ("worker0", False, 11),
        ("worker2", False, 11),
        ("worker1", True, 11),
        ("worker3", False, 11),
        ("worker2", False, 11),
    ]
    assert got["returned"] == (False, "worker1", 16)
    assert got["a_sees_after"] == 16
    assert got["held"] == ("worker3", False)

    # Only D's fork is left: the owner keeps the value for it.
    deadline = time.monotonic() + SETTLE_S
    while True:
        states = group.call(0, check_states)
        if states[0][1:] == (0, 0, []) and states[2][1:] == (0, 0, []):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.05)
    assert states[1] == ("worker1", 1, 0, ["chain"])
    assert states[3][1:3] == (0, 1)
    assert group.call(3, fetch_held, "chain") == 16
    assert group.call(3, release_held) == ["chain"]
    assert_settled(group)


async def fetch_later(r: rpc.RRef[Box], delay: float) -> tuple[Any, bool]:
    """On the child of a fork: wait (the parent drops its reference meanwhile),
    then fetch."""
    await asyncio.sleep(delay)
    gc.collect()
    value = (await r.to_here(timeout=5)).v
    return value, await wait_until(r.confirmed_by_owner)


async def fork_and_drop(key: str, to: str) -> Any:
    """On a user parent: send the held RRef to ``to`` and drop it at once."""
    r = _HELD.pop(key)
    fut = rpc.rpc_async(to, fetch_later, (r, 0.3))
    del r
    gc.collect()
    return await fut


async def owner_fork_and_drop(token: str, to: str) -> Any:
    """On the owner: fork an owner RRef to ``to`` and drop it at once."""
    r = rpc.RRef(Box(21, token))
    fut = rpc.rpc_async(to, fetch_later, (r, 0.3))
    del r
    gc.collect()
    return await fut


async def check_fork_in_flight(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # 1. The creator (confirmed) forks to worker2 and drops its reference.
    r = rpc.remote("worker1", Box, (7, "inflight-1"))
    await r.to_here()
    fut = rpc.rpc_async("worker2", fetch_later, (r, 0.3))
    del r
    gc.collect()
    out["creator_confirmed"] = await fut

    # 2. The creator forks before the owner confirmed the creation, and drops.
    r = rpc.remote("worker1", slow_box, (0.3, 8, "inflight-2"))
    fut = rpc.rpc_async("worker2", fetch_later, (r, 0.0))
    del r
    gc.collect()
    out["creator_unconfirmed"] = await fut

    # 3. A user that is not the creator forks to worker3 and drops; the creator
    #    dropped its own reference before.
    r = rpc.remote("worker1", Box, (9, "inflight-3"))
    await rpc.rpc_async("worker2", hold, (r, "inflight-3"))
    del r
    gc.collect()
    await asyncio.sleep(0.1)
    out["user_parent"] = await rpc.rpc_async("worker2", fork_and_drop, ("inflight-3", "worker3"))

    # 4. A user forks to the owner itself and drops.
    r = rpc.remote("worker1", Box, (10, "inflight-4"))
    await rpc.rpc_async("worker3", hold, (r, "inflight-4"))
    del r
    gc.collect()
    out["user_to_owner"] = await rpc.rpc_async("worker3", fork_and_drop, ("inflight-4", "worker1"))

    # 5. The owner forks an RRef(value) and drops it.
    out["owner_parent"] = await rpc.rpc_async(
        "worker1", owner_fork_and_drop, ("inflight-5", "worker2")
    )
    return out


def test_fork_in_flight_while_parent_drops_its_reference(group: WorkerGroup) -> None:
    got = group.call(0, check_fork_in_flight)
    assert got == {
        "creator_confirmed": (7, True),
        "creator_unconfirmed": (8, True),
        "user_parent": (9, True),
        "user_to_owner": (10, True),
        "owner_parent": (21, True),
    }
    assert_settled(group)


async def return_held(key: str) -> rpc.RRef[Box]:
    """On a user: give the held RRef back to the caller (in the response)."""
    return _HELD.pop(key)


async def call_back_for(key: str, to: str) -> tuple[Any, bool]:
    """On the owner: ask user ``to`` for its RRef of our value (it comes back
    in a response), then read it here."""
    r = await rpc.rpc_async(to, return_held, (key,))
    return (await r.to_here()).v, r.is_owner()


async def check_rref_to_its_owner(rank: int, world_size: int) -> dict[str, Any]:
    """A user sends its RRef to the owner in a call (plain, profiled, a
    remote() argument) and drops it at once: the owner's value lives through
    the call, and no RRefChildAccept comes back; in a response the user holds
    it (a pending child) until the owner's accept."""
    from aiorpc_autograd.codec import RRefChildAccept

    agent = api.current_agent()
    accepts: list[Any] = []
    handler = agent.handlers[RRefChildAccept]

    def counting(message: Any) -> Any:
        accepts.append(message.fork_id)
        return handler(message)

    agent.handlers[RRefChildAccept] = counting
    out: dict[str, Any] = {}
    try:
        # The owner's loop is held meanwhile: the call and the delete reach
        # it in one read. Profiled, as is the call and not the delete (torch's
        # profiler on around the call only), the owner decodes the call's
        # arguments first all the same.
        for v, profiled in ((31, False), (32, True)):
            r = rpc.remote("worker1", Box, (v, f"to-owner-{v}"))
            await r.to_here()
            blocker = rpc.rpc_async("worker1", block_loop_async, (0.3,))
            await asyncio.sleep(0.05)
            with torch.autograd.profiler.profile(enabled=profiled):
                fut = rpc.rpc_async("worker1", fetch_later, (r, 0.3))
            out.setdefault("pending_after_call", agent.debug_info()["num_pending_rref_children"])
            del r
            gc.collect()
            out["profiled_call" if profiled else "call"] = await fut
            await blocker

        r = rpc.remote("worker1", Box, (33, "to-owner-3"))
        await r.to_here()
        created = rpc.remote("worker1", fetch_later, (r, 0.3))
        del r
        gc.collect()
        out["remote_argument"] = await created.to_here()
        del created
        out["accepts_in_requests"] = len(accepts)

        r = rpc.remote("worker1", Box, (34, "to-owner-4"))
        await r.to_here()
        _HELD["to-owner-4"] = r
        del r
        out["response"] = await rpc.rpc_async("worker1", call_back_for, ("to-owner-4", "worker0"))
        out["response_accepted"] = await wait_until(
            lambda: len(accepts) == 1 and agent.debug_info()["num_pending_rref_children"] == 0
        )
    finally:
        agent.handlers[RRefChildAccept] = handler
    return out


def test_an_rref_sent_to_its_owner_in_a_request_needs_no_accept(group: WorkerGroup) -> None:
    got = group.call(0, check_rref_to_its_owner)
    assert got == {
        "pending_after_call": 0,
        "call": (31, True),
        "profiled_call": (32, True),
        "remote_argument": (33, True),
        "accepts_in_requests": 0,
        "response": (34, True),
        "response_accepted": True,
    }
    assert_settled(group)


# --------------------------------------------------------------------- counts


async def fetch_v(r: rpc.RRef[Box]) -> Any:
    return (await r.to_here()).v


async def check_many_references(rank: int, world_size: int, n: int) -> int:
    """On every worker at once: many RRefs owned by the others and by itself,
    forked to third workers, in arguments and results; all dropped at the end."""
    me = rpc.get_worker_info().name
    others = [w for w in WORKERS if w != me]
    refs: list[rpc.RRef[Box]] = []
    for i in range(n):
        owner = others[i % len(others)]
        refs.append(rpc.remote(owner, Box, (i, f"many-{me}-r{i}")))
        refs.append(rpc.RRef(Box(i, f"many-{me}-l{i}")))
    calls = [
        rpc.rpc_async(others[(i + 1) % len(others)], fetch_v, (r,)) for i, r in enumerate(refs)
    ]
    calls += [
        rpc.rpc_async(others[(i + 2) % len(others)], identity_async, (r,))
        for i, r in enumerate(refs)
    ]
    results = await asyncio.gather(*calls)
    values = results[: len(refs)]
    returned = results[len(refs) :]
    assert values == [i // 2 for i in range(len(refs))], values
    assert all(b.owner_name() == r.owner_name() for b, r in zip(returned, refs, strict=True))
    return len(refs)


def test_counts_return_to_zero_after_all_references_dropped(group: WorkerGroup) -> None:
    assert group.call_all(check_many_references, 15, timeout=60) == [30] * WORLD
    assert_settled(group)


# --------------------------------------------------------------------- graceful shutdown


async def block_loop_async(seconds: float) -> None:
    time.sleep(seconds)  # on purpose: holds the owner's loop, delaying its acks


def make_owner_rref(token: str) -> rpc.RRef[Box]:
    """On the owner: an RRef(value) returned to the caller (an owner fork)."""
    return rpc.RRef(Box(7, token))


async def shutdown_holding(
    rank: int, world_size: int, init_method: str, case: str
) -> tuple[bool, int, int, list[str], Any]:
    """Raw target: users keep RRefs owned by worker1 until their graceful
    shutdown; every worker reports whether its shutdown completed in time, and
    its counts and live values after it (the owner's must be 0 and none)."""
    await rpc.init_rpc(f"worker{rank}", rank, world_size, init_method=init_method)
    agent = api.current_agent()
    await barrier()
    seen: Any = None
    if case == "confirmed" and rank == 0:
        refs = [rpc.remote("worker1", Box, (i, f"sd-{i}")) for i in range(5)]
        await asyncio.gather(*(r.to_here() for r in refs))
        refs.append(await rpc.rpc_async("worker1", make_owner_rref, ("sd-owned",)))
        seen = [r.confirmed_by_owner() for r in refs]
        _HELD["refs"] = refs
    elif case == "creating" and rank == 0:
        # The owner is still creating the value when the creator shuts down.
        _HELD["slow"] = rpc.remote("worker1", slow_box, (0.5, 1, "sd-slow"))
    elif case == "unconfirmed_fork":
        if rank == 0:
            ref = rpc.remote("worker1", Box, (1, "sd-fork"))
            await ref.to_here()
            # Hold the owner's loop so that it acknowledges worker2's fork late.
            blocker = rpc.rpc_async("worker1", block_loop_async, (0.5,))
            await asyncio.sleep(0.05)
            await rpc.rpc_async("worker2", hold, (ref, "sd"))
            _HELD["ref"] = ref
            await blocker
        elif rank == 2:
            # Shut down as soon as the fork arrived, before the owner confirmed it.
            assert await wait_until(lambda: "sd" in _HELD, 10)
    elif case == "fork_in_flight":
        if rank == 0:
            ref = rpc.remote("worker1", Box, (1, "sd-inflight"))
            await ref.to_here()
            # Hold worker2's loop: the fork reaches it (and it tells the owner)
            # only after this parent started its shutdown.
            _HELD["blocker"] = rpc.rpc_async("worker2", block_loop_async, (0.5,))
            await asyncio.sleep(0.05)
            _HELD["call"] = rpc.rpc_async("worker2", hold, (ref, "sd"))
            _HELD["ref"] = ref
        elif rank == 2:
            assert await wait_until(lambda: "sd" in _HELD, 10)
            value = await await_outcome(_HELD["sd"].to_here(timeout=2))
            seen = value.v if isinstance(value, Box) else repr(value)
    try:
        await rpc.shutdown(timeout=SHUTDOWN_S)
        clean = True
    except rpc.RpcTimeoutError:
        clean = False
    gc.collect()
    info = agent.debug_info()
    _HELD.clear()
    return clean, info["num_owner_rrefs"], info["num_user_rrefs"], sorted(_OBJECTS), seen


def test_graceful_shutdown_deletes_the_rrefs_users_still_hold() -> None:
    """Users still holding RRefs at their graceful shutdown: the owner ends with
    no RRef and has freed every value."""
    results = run_processes(shutdown_holding, 2, "confirmed", timeout=40)
    assert [r[0] for r in results] == [True, True], results  # no shutdown timed out
    assert results[0][4] == [True] * 6  # every reference was confirmed
    assert results[1] == (True, 0, 0, [], None), results


_PYTORCH_WAITS = (
    "PyTorch's RRefContext::delAllUsersAndUnforkedOwners first waits for pending users "
    "and pending children to be confirmed"
)


@pytest.mark.parametrize(
    ("case", "world_size"),
    [
        pytest.param(
            "creating",
            2,
        ),
        pytest.param(
            "unconfirmed_fork",
            3,
        ),
        pytest.param(
            "fork_in_flight",
            3,
        ),
    ],
)
def test_graceful_shutdown_with_references_not_yet_confirmed(case: str, world_size: int) -> None:
    """A user shuts down while the owner has not confirmed its reference yet
    (a remote() still being created, a fork just received), or while a fork of
    it is on its way to a child: the owner still ends with no RRef, and the
    child of the fork in flight can use it."""
    results = run_processes(shutdown_holding, world_size, case, timeout=40)
    if case == "fork_in_flight":
        assert results[2][4] == 1, results  # the child could still fetch the value
    assert [r[0] for r in results] == [True] * world_size, results
    assert results[1] == (True, 0, 0, [], None), results


def confirmed_here(r: rpc.RRef[Any]) -> bool:
    """torch's check_rref_confirmed: run on a worker that received a fork."""
    return r.confirmed_by_owner()


async def check_forwarded_user_rrefs_are_confirmed(rank: int, world_size: int) -> dict[str, Any]:
    # torch's test_user_rrefs_confirmed(_remote): a call receiving a user RRef
    # from a user (not the owner) starts once the owner confirmed the fork.
    r = rpc.remote("worker2", torch.add, (torch.zeros(2), 1))
    out = {
        "rpc": [await rpc.rpc_async("worker1", confirmed_here, (r,)) for _ in range(3)],
        "remote": await rpc.remote("worker1", confirmed_here, (r,)).to_here(),
        "owner": await rpc.rpc_async("worker2", confirmed_here, (r,)),
        "value": (await r.to_here()).tolist(),
    }
    return out


def test_a_forwarded_user_rref_is_confirmed_before_the_call_runs(group: WorkerGroup) -> None:
    got = group.call(0, check_forwarded_user_rrefs_are_confirmed)
    assert got == {"rpc": [True] * 3, "remote": True, "owner": True, "value": [1.0, 1.0]}
    assert_settled(group)
