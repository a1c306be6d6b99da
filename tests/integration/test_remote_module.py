"""``RemoteModule`` as torch's ``torch.distributed.nn.RemoteModule``, through
both APIs, between real workers.

Two module-wide groups of three workers: one started with the async API
(``conftest.service``), one with the synchronous facade
(``start_service(sync=True)``). A check runs on ``worker0`` as a module-level
``async def check_*(rank, world_size, ...)``; on the facade group it runs on
the process's main loop, not the agent's, so its blocking facade calls are
made in a thread (``asyncio.to_thread``), as a plain user thread would.

The module of torch's own tests (``MyModule``: ``forward(tensor, number,
word)`` returns them reversed, one parameter of ones) is used throughout, so
the expectations read as torch's ``remote_module_test.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd import nn as async_nn
from aiorpc_autograd.errors import RemoteError
from aiorpc_autograd.sync import autograd as sync_autograd
from aiorpc_autograd.sync import nn as sync_nn
from aiorpc_autograd.sync import optim as sync_optim
from aiorpc_autograd.sync import rpc as sync_rpc
from tests.integration.common import WarningMessages
from tests.integration.conftest import close_shared_group, shared_group
from tests.integration.harness import WorkerGroup

pytestmark = pytest.mark.timeout(120)

PICKLED = ["on", "device", "is_device_map_set", "is_scriptable", "generated_methods", "module_rref"]
RECEIVED_KEYS = [*PICKLED, "forward_async", "forward"]
BAD_MODULE = r"Expect `module_cls\(\*args, \*\*kwargs\)` returns an instance of <class nn.Module>,"
PY_PICKLE = (
    "Cannot pickle RemoteModule in python pickler. RemoteModule can only be pickled when using RPC"
)


# --------------------------------------------------------------------- the facade group


@pytest.fixture(scope="module")
def _sync_holder() -> Iterator[dict[str, WorkerGroup]]:
    holder: dict[str, WorkerGroup] = {}
    yield holder
    close_shared_group(holder)


@pytest.fixture
def sync_service(_sync_holder: dict[str, WorkerGroup]) -> WorkerGroup:
    """Three workers started by the facade, restarted if a test broke them."""
    return shared_group(_sync_holder, 3, sync=True)


# --------------------------------------------------------------------- modules and helpers


class MyModule(torch.nn.Module):
    """torch's test module."""

    def __init__(self, first_arg: int, first_kwarg: int = -1) -> None:
        super().__init__()
        self.param1 = torch.nn.Parameter(torch.ones(1))
        self.args = (first_arg, first_kwarg)

    def forward(
        self, tensor: torch.Tensor, number: int, word: str = "default"
    ) -> tuple[str, int, torch.Tensor]:
        return word, number, tensor


class BadModule:
    """Not an nn.Module (torch's ``test_bad_module``)."""

    def __init__(self, first_arg: int, first_kwarg: int = -1) -> None:
        pass


def training_of(module_rref: Any) -> bool:
    """On the owner: the module's training flag."""
    return bool(module_rref.local_value().training)


def args_of(module_rref: Any) -> tuple[int, int]:
    """On the owner: the constructor arguments the module got."""
    first_arg, first_kwarg = module_rref.local_value().args
    return first_arg, first_kwarg


def attributes_of(remote_module: Any) -> dict[str, Any]:
    """torch's ``remote_module_attributes``: the received instance's ``__dict__``."""
    return dict(remote_module.__dict__)


def keys_of(remote_module: Any) -> list[str]:
    return list(remote_module.__dict__)


def blocking_forward(remote_module: Any, args: tuple[Any, ...]) -> Any:
    """torch's ``remote_forward``: a plain function (a pool thread) blocking on forward."""
    return remote_module.forward(*args)


def blocking_forward_async(remote_module: Any, args: tuple[Any, ...]) -> Any:
    """torch's ``remote_forward_async``: ``forward_async(...).wait()`` in a pool thread."""
    return remote_module.forward_async(*args).wait()


async def awaited_forward(remote_module: Any, args: tuple[Any, ...]) -> Any:
    """The async API's form: on the receiver's loop."""
    return await remote_module(*args)


async def forward_on_the_loop(remote_module: Any, x: torch.Tensor) -> dict[str, Any]:
    """An ``async def`` remote function of a facade process: the blocking
    ``forward`` refuses the loop thread; ``await forward_async`` works there."""
    out: dict[str, Any] = {}
    try:
        remote_module.forward(x, 1)
    except RuntimeError as exc:
        out["blocking"] = str(exc)
    out["awaited"] = await remote_module.forward_async(x, 1)
    return out


def kind_of(exc: BaseException) -> str:
    """The built-in type a torch program would catch ``exc`` as (a remote
    error is a ``RemoteError`` that is also an instance of its built-in type)."""
    for kind in (NotImplementedError, ValueError, RuntimeError, TypeError):
        if isinstance(exc, kind):
            return kind.__name__
    return type(exc).__name__


def describe_error(call: Callable[[], Any]) -> tuple[str, str, bool]:
    """(built-in kind, message, is a RemoteError) of what ``call()`` raises."""
    try:
        call()
    except Exception as exc:
        return kind_of(exc), str(exc), isinstance(exc, RemoteError)
    raise AssertionError("no error")


async def describe_error_async(make: Callable[[], Any]) -> tuple[str, str, bool]:
    try:
        await make()
    except Exception as exc:
        return kind_of(exc), str(exc), isinstance(exc, RemoteError)
    raise AssertionError("no error")


def unsupported_errors(module: Any) -> dict[str, tuple[str, str]]:
    """Each unsupported nn.Module method's error, by name."""
    errors: dict[str, tuple[str, str]] = {}
    for name in async_nn._UNSUPPORTED_METHODS:
        try:
            getattr(module, name)()
        except Exception as exc:
            errors[name] = (type(exc).__name__, str(exc))
    return errors


def python_pickle_errors(module: Any) -> list[tuple[str, str]]:
    out = []
    for save in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        try:
            save(module)
        except Exception as exc:
            out.append((type(exc).__name__, str(exc)))
    return out


def bad_device_errors(cls: type[Any]) -> dict[str, tuple[str, str]]:
    """What torch's ``test_invalid_devices`` spells, and more, at construction."""
    out = {}
    for device in (
        "worker1/cuda:0/cuda:1",
        "/",
        "/cuda:0",
        "worker1/cpu2",
        "worker1/",
        "rank:x/cpu",
        "cpu",
        "worker1/meta",
        "nosuch/cpu",
    ):
        try:
            cls(device, MyModule, (1,))
        except Exception as exc:
            out[device] = (kind_of(exc), str(exc))
    return out


def check_common(got: dict[str, Any]) -> None:
    """What both APIs' checks return the same."""
    t = torch.ones(1)
    assert got["is_module"] == [True, True]
    assert got["attrs"] == {
        "on": "worker1",
        "device": "cpu",
        "is_device_map_set": False,
        "is_scriptable": False,
        "owner": "worker1",
    }
    assert got["keys"][-len(RECEIVED_KEYS) :] == RECEIVED_KEYS
    assert got["rank_on"] == (1, "worker1")
    assert got["module_args"] == (1, 2)
    assert got["same_rref"] is True
    assert got["forward"] == ("3", 2, t)
    assert got["call"] == ("3", 2, t)
    assert got["forward_async"] == ("3", 2, t)
    assert got["kwargs"] == ("3", 2, t)
    assert got["params"] == [torch.ones(1)]
    assert got["training"] == [False, True]
    assert got["repr"] == "RemoteModule(worker1/cpu)"
    bad_name, bad_message, bad_remote = got["bad_module"]
    assert bad_name == "ValueError" and bad_remote
    assert re.search(BAD_MODULE, bad_message)
    assert "but it returns an instance of <class" in bad_message
    errors = got["unsupported"]
    assert set(errors) == set(async_nn._UNSUPPORTED_METHODS)
    for name, (kind, message) in errors.items():
        assert kind == "ValueError"
        if name == "parameters":
            assert message == (
                "Method ``parameters`` not supported for RemoteModule. "
                "Please use ``remote_parameters`` instead."
            )
        else:
            assert message == f"Method ``{name}`` not supported for RemoteModule"
    assert got["pickle"] == [("RuntimeError", PY_PICKLE)] * 2
    devices = got["bad_devices"]
    for spelling in ("worker1/cuda:0/cuda:1", "/", "/cuda:0", "rank:x/cpu", "cpu"):
        kind, message = devices[spelling]
        assert kind == "ValueError"
        assert message.startswith(f"Could not parse remote_device: {spelling}. The valid format")
    assert devices["worker1/cpu2"] == ("RuntimeError", "Invalid device string: 'cpu2'")
    assert devices["worker1/"][0] == "RuntimeError"
    assert "Device string must not be empty" in devices["worker1/"][1]
    assert (
        devices["worker1/meta"][0] == "ValueError" and "cpu or cuda" in devices["worker1/meta"][1]
    )
    assert devices["nosuch/cpu"][0] == "ValueError"
    assert "nosuch" in devices["nosuch/cpu"][1]
    assert got["interface"][0] == "NotImplementedError"


# --------------------------------------------------------------------- the async API


def torch_attributes(m: Any) -> dict[str, Any]:
    """torch's public attributes of a RemoteModule (either flavour)."""
    return {
        "on": m.on,
        "device": m.device,
        "is_device_map_set": m.is_device_map_set,
        "is_scriptable": m.is_scriptable,
        "owner": m.owner.name,
    }


async def check_async_module(rank: int, world_size: int) -> dict[str, Any]:
    t = torch.ones(1)
    m = async_nn.RemoteModule("worker1/cpu", MyModule, (1,), {"first_kwarg": 2})
    out: dict[str, Any] = {
        "is_module": [isinstance(m, torch.nn.Module), isinstance(m, async_nn._RemoteModule)],
        "attrs": torch_attributes(m),
        "keys": list(m.__dict__),
        "module_args": await rpc.rpc_async("worker1", args_of, (m.module_rref,)),
        "same_rref": m.get_module_rref() is m.module_rref,
        "forward": await m.forward(t, 2, "3"),
        "call": await m(t, 2, "3"),
        "kwargs": await m(t, 2, word="3"),
        "repr": repr(m),
    }
    fut = m.forward_async(t, 2, "3")
    out["forward_async_is_future"] = isinstance(fut, asyncio.Future)
    out["forward_async"] = await fut
    params = await m.remote_parameters()
    out["params"] = [await p.to_here() for p in params]
    by_rank = async_nn.RemoteModule("rank:1/cpu", MyModule, (1,))
    by_int = async_nn.RemoteModule(1, MyModule, (1,))
    out["rank_on"] = (by_rank.on, by_int.owner.name)
    training = []
    evaluating = m.eval()  # sent at once
    out["eval_is_future"] = isinstance(evaluating, asyncio.Future)
    await evaluating
    training.append(await rpc.rpc_async("worker1", training_of, (m.module_rref,)))
    await m.train()
    training.append(await rpc.rpc_async("worker1", training_of, (m.module_rref,)))
    out["training"] = training
    out["bad_module"] = await describe_error_async(
        lambda: async_nn.RemoteModule("worker1/cpu", BadModule, (1,)).forward()
    )
    out["unsupported"] = unsupported_errors(m)
    out["pickle"] = python_pickle_errors(m)
    out["bad_devices"] = bad_device_errors(async_nn.RemoteModule)
    out["interface"] = describe_error(
        lambda: async_nn._RemoteModule("worker1", MyModule, _module_interface_cls=int)
    )
    return out


def test_async_remote_module_behaves_as_torchs_with_await(service: WorkerGroup) -> None:
    got = service.call(0, check_async_module)
    check_common(got)
    assert got["forward_async_is_future"] is True
    assert got["eval_is_future"] is True


async def check_async_over_the_wire(rank: int, world_size: int) -> dict[str, Any]:
    t = torch.ones(1)
    m = async_nn.RemoteModule("worker1/cpu", MyModule, (1,))
    records = WarningMessages()
    logging.getLogger("aiorpc_autograd.nn").addHandler(records)
    try:
        plain = await rpc.rpc_async("worker2", keys_of, (m,))
        m.new_attr = 1
        with_new = await rpc.rpc_async("worker2", keys_of, (m,))
    finally:
        logging.getLogger("aiorpc_autograd.nn").removeHandler(records)
    attrs = await rpc.rpc_async("worker2", attributes_of, (m,))
    back = attrs["forward"].__self__  # the instance worker2 rebuilt, sent back here
    # worker2 shares worker1's module: another RemoteModule over the same RRef
    twin = await rpc.rpc_async(
        "worker2", async_nn.RemoteModule.init_from_module_rref, ("worker2", m.get_module_rref())
    )
    await twin.eval()
    local_twin = async_nn.RemoteModule.init_from_module_rref("worker1", m.get_module_rref())
    return {
        "keys": [plain, with_new],
        "warned": records.messages,
        "values": [attrs[k] for k in ("on", "device", "is_device_map_set", "is_scriptable")],
        "received_type": type(back) is async_nn.RemoteModule,
        "received_owner": back.module_rref.owner_name(),
        "on_worker2": await rpc.rpc_async("worker2", awaited_forward, (m, (t, 2, "3"))),
        "back_here": await back(t, 2, "3"),
        "twin": [twin.on, twin.module_rref.owner_name(), await twin(t, 5)],
        "twin_keys": list(twin.__dict__)[-len(RECEIVED_KEYS) :],
        # one built here is a whole nn.Module (the received ones have torch's
        # pickled attributes only)
        "local_twin": [hasattr(local_twin, "training"), await local_twin(t, 7)],
        "shared_training": await rpc.rpc_async("worker1", training_of, (m.module_rref,)),
    }


def test_async_remote_module_travels_by_torchs_pickled_attributes(service: WorkerGroup) -> None:
    got = service.call(0, check_async_over_the_wire)
    t = torch.ones(1)
    assert got["keys"] == [RECEIVED_KEYS, RECEIVED_KEYS]  # new_attr stays behind
    assert len(got["warned"]) == 1 and "``new_attr``" in got["warned"][0]
    assert got["values"] == ["worker1", "cpu", False, False]
    assert got["received_type"] is True and got["received_owner"] == "worker1"
    assert got["on_worker2"] == ("3", 2, t)
    assert got["back_here"] == ("3", 2, t)
    assert got["twin"] == ["worker2", "worker1", ("default", 5, t)]
    assert got["twin_keys"] == RECEIVED_KEYS
    assert got["local_twin"] == [True, ("default", 7, t)]
    assert got["shared_training"] is False  # twin.eval() reached the shared module


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


async def check_async_training(rank: int, world_size: int) -> list[torch.Tensor]:
    from aiorpc_autograd.optim import DistributedOptimizer

    m = async_nn.RemoteModule("worker2/cpu", Affine)
    opt = DistributedOptimizer(torch.optim.SGD, await m.remote_parameters(), lr=0.1)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
    for _ in range(3):
        async with dist_autograd.context() as cid:
            loss = (await m(x)).pow(2).sum()
            await dist_autograd.backward(cid, [loss])
            await opt.step(cid)
    return [await p.to_here() for p in await m.remote_parameters()]


def test_async_remote_module_trains_like_local(service: WorkerGroup) -> None:
    got = service.call(0, check_async_training)
    local = Affine()
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
    for _ in range(3):
        opt.zero_grad()
        local(x).pow(2).sum().backward()
        opt.step()
    for remote, mine in zip(got, local.parameters(), strict=True):
        torch.testing.assert_close(remote, mine.detach())


# --------------------------------------------------------------------- the facade


async def check_sync_module(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        t = torch.ones(1)
        m = sync_nn.RemoteModule("worker1/cpu", MyModule, (1,), {"first_kwarg": 2})
        out: dict[str, Any] = {
            "is_module": [isinstance(m, torch.nn.Module), isinstance(m, sync_nn._RemoteModule)],
            "attrs": torch_attributes(m),
            "keys": list(m.__dict__),
            "module_args": sync_rpc.rpc_sync("worker1", args_of, (m.module_rref,)),
            "same_rref": m.get_module_rref() is m.module_rref,
            "forward": m.forward(t, 2, "3"),
            "call": m(t, 2, "3"),
            "kwargs": m(t, 2, word="3"),
            "repr": repr(m),
        }
        fut = m.forward_async(t, 2, "3")
        out["forward_async_is_torch_future"] = isinstance(fut, torch.futures.Future)
        out["forward_async"] = fut.wait()
        out["params"] = [p.to_here() for p in m.remote_parameters()]
        by_rank = sync_nn.RemoteModule("rank:1/cpu", MyModule, (1,))
        out["rank_on"] = (by_rank.on, by_rank.owner.name)
        returned = [m.eval() is m]
        training = [sync_rpc.rpc_sync("worker1", training_of, (m.module_rref,))]
        returned.append(m.train() is m)
        training.append(sync_rpc.rpc_sync("worker1", training_of, (m.module_rref,)))
        out["training"], out["returned_self"] = training, returned
        out["bad_module"] = describe_error(
            lambda: sync_nn.RemoteModule("worker1/cpu", BadModule, (1,)).forward()
        )
        out["bad_module_async"] = describe_error(
            lambda: sync_nn.RemoteModule("worker1/cpu", BadModule, (1,)).forward_async().wait()
        )
        out["unsupported"] = unsupported_errors(m)
        out["pickle"] = python_pickle_errors(m)
        out["bad_devices"] = bad_device_errors(sync_nn.RemoteModule)
        out["interface"] = describe_error(
            lambda: sync_nn._RemoteModule(
                "worker1", MyModule, (1,), None, _module_interface_cls=int
            )
        )
        return out

    return await asyncio.to_thread(run)


def test_facade_remote_module_behaves_as_torchs(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_sync_module)
    check_common(got)
    assert got["forward_async_is_torch_future"] is True
    assert got["returned_self"] == [True, True]
    assert got["bad_module_async"][0] == "ValueError"


async def check_sync_over_the_wire(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        t = torch.ones(1)
        args = (t, 2, "3")
        m = sync_nn.RemoteModule("worker1/cpu", MyModule, (1,))
        attrs = sync_rpc.rpc_sync("worker2", attributes_of, (m,))
        m.new_attr = 1
        twin = sync_rpc.rpc_sync(
            "worker2", sync_nn.RemoteModule.init_from_module_rref, ("worker2", m.get_module_rref())
        )
        return {
            "keys": list(attrs),
            "values": [attrs[k] for k in ("on", "device", "is_device_map_set", "is_scriptable")],
            "with_new": sync_rpc.rpc_sync("worker2", keys_of, (m,)),
            "received_type": type(attrs["forward"].__self__) is sync_nn.RemoteModule,
            "forward": sync_rpc.rpc_sync("worker2", blocking_forward, (m, args)),
            "forward_async": sync_rpc.rpc_sync("worker2", blocking_forward_async, (m, args)),
            "twin": sync_rpc.rpc_sync("worker1", blocking_forward, (twin, args)),
            "twin_here": twin(*args),
            "twin_on": twin.on,
            "on_the_loop": sync_rpc.rpc_sync("worker2", forward_on_the_loop, (m, t)),
        }

    return await asyncio.to_thread(run)


def test_facade_remote_module_travels_over_rpc(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_sync_over_the_wire)
    t = torch.ones(1)
    # torch's test_send_remote_module_over_the_wire and ..._with_a_new_attribute_not_pickled
    assert got["keys"] == RECEIVED_KEYS
    assert got["values"] == ["worker1", "cpu", False, False]
    assert got["with_new"] == RECEIVED_KEYS
    assert got["received_type"] is True
    assert got["forward"] == ("3", 2, t)
    assert got["forward_async"] == ("3", 2, t)
    # torch's test_create_remote_module_from_module_rref
    assert got["twin"] == ("3", 2, t) and got["twin_here"] == ("3", 2, t)
    assert got["twin_on"] == "worker2"
    assert "event loop" in got["on_the_loop"]["blocking"]
    assert got["on_the_loop"]["awaited"] == ("default", 1, t)


class Hybrid(torch.nn.Module):
    """torch's DDP+RPC tutorial shape: a remote layer and a local one."""

    def __init__(self, remote: bool) -> None:
        super().__init__()
        self.body: torch.nn.Module = (
            sync_nn.RemoteModule("worker2/cpu", Affine) if remote else Affine()
        )
        torch.manual_seed(1)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


async def check_sync_hybrid(rank: int, world_size: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        model = Hybrid(remote=True)
        body = model.body
        assert isinstance(body, sync_nn.RemoteModule)
        out: dict[str, Any] = {"children": [type(c).__name__ for c in model.children()]}
        model.eval()  # reaches the remote module, as in torch
        out["eval"] = sync_rpc.rpc_sync("worker2", training_of, (body.module_rref,))
        model.train()
        out["train"] = sync_rpc.rpc_sync("worker2", training_of, (body.module_rref,))
        out["repr"] = repr(model)
        out["parameters"] = describe_error(lambda: list(model.parameters()))
        params = body.remote_parameters() + [sync_rpc.RRef(p) for p in model.head.parameters()]
        opt = sync_optim.DistributedOptimizer(torch.optim.SGD, params, lr=0.1)
        x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
        for _ in range(3):
            with sync_autograd.context() as cid:
                loss = model(x).pow(2).sum()
                sync_autograd.backward(cid, [loss])
                opt.step(cid)
        out["params"] = [p.to_here() for p in params]
        return out

    return await asyncio.to_thread(run)


def test_facade_hybrid_model_trains_like_local(sync_service: WorkerGroup) -> None:
    got = sync_service.call(0, check_sync_hybrid)
    assert got["children"] == ["RemoteModule", "Linear"]
    assert got["eval"] is False and got["train"] is True
    assert "(body): RemoteModule(worker2/cpu)" in got["repr"]
    assert got["parameters"][:2] == (
        "ValueError",
        "Method ``named_modules`` not supported for RemoteModule",
    )
    local = Hybrid(remote=False)
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
    for _ in range(3):
        opt.zero_grad()
        local(x).pow(2).sum().backward()
        opt.step()
    mine = list(local.body.parameters()) + list(local.head.parameters())
    for remote, expected in zip(got["params"], mine, strict=True):
        torch.testing.assert_close(remote, expected.detach())


# --------------------------------------------------------------------- without workers


_NOT_SUPPORTED = re.compile(r"_raise_not_supported\(|not supported for RemoteModule")


def test_unsupported_methods_are_torchs_list() -> None:
    with warnings.catch_warnings():  # torch's module scripts its templates
        warnings.simplefilter("ignore")
        from torch.distributed.nn.api import remote_module as torch_rm
    torch_unsupported = {
        name
        for name, fn in vars(torch_rm._RemoteModule).items()
        if inspect.isfunction(fn) and _NOT_SUPPORTED.search(inspect.getsource(fn))
    }
    assert set(async_nn._UNSUPPORTED_METHODS) == torch_unsupported
    assert sync_nn._REMOTE_MODULE_PICKLED_ATTRIBUTES == torch_rm._REMOTE_MODULE_PICKLED_ATTRIBUTES
    assert issubclass(sync_nn.RemoteModule, sync_nn._RemoteModule)
    assert issubclass(async_nn.RemoteModule, async_nn._RemoteModule)
    assert issubclass(sync_nn._RemoteModule, torch.nn.Module)
    assert inspect.signature(sync_nn.RemoteModule.init_from_module_rref).parameters.keys() == (
        inspect.signature(torch_rm.RemoteModule.init_from_module_rref).parameters.keys()
    )
