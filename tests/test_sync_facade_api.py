"""The synchronous facade's surface, without processes: torch's names and
signatures, the backend-options mapping, and the torch futures it returns.

The facade promises that torch RPC code ports by changing imports only, so
each mirrored callable must accept what torch's accepts: the parameter names
(and defaults where they carry meaning) are compared with torch's own.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import inspect
import socket
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed.autograd as torch_autograd
import torch.distributed.rpc as torch_rpc

import aiorpc_autograd as ours
from aiorpc_autograd.options import RpcOptions
from aiorpc_autograd.sync import autograd, nn, optim, rpc
from aiorpc_autograd.sync._bridge import Future, awaitable
from aiorpc_autograd.sync.rpc.options import resolve_options


def params(func: Callable[..., Any]) -> list[str]:
    return [
        p.name
        for p in inspect.signature(func).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"
    ]


@pytest.mark.parametrize(
    "name", ["init_rpc", "shutdown", "rpc_sync", "rpc_async", "remote", "get_worker_info"]
)
def test_rpc_functions_take_torchs_parameters(name: str) -> None:
    assert params(getattr(rpc, name)) == params(getattr(torch_rpc, name))


def test_defaults_follow_torch() -> None:
    assert inspect.signature(rpc.shutdown).parameters["timeout"].default == 0
    for name in ("rpc_sync", "rpc_async", "remote"):
        sig = inspect.signature(getattr(rpc, name))
        assert sig.parameters["timeout"].default == -1.0  # torch's UNSET_RPC_TIMEOUT
        assert sig.parameters["args"].default is None


# torch's PyRRef is a pybind class without signatures here: its documented ones.
TORCH_RREF_METHODS = {
    "to_here": ["timeout"],
    "backward": ["dist_autograd_ctx_id", "retain_graph"],
    "rpc_sync": ["timeout"],
    "rpc_async": ["timeout"],
    "remote": ["timeout"],
    "local_value": [],
    "owner": [],
    "owner_name": [],
    "is_owner": [],
    "confirmed_by_owner": [],
}


@pytest.mark.parametrize("method", sorted(TORCH_RREF_METHODS))
def test_rref_methods_take_torchs_parameters(method: str) -> None:
    assert callable(getattr(torch_rpc.RRef, method))
    assert params(getattr(rpc.RRef, method)) == TORCH_RREF_METHODS[method]


def test_rref_has_torchs_methods() -> None:
    for method in ("owner_name", "is_owner", "confirmed_by_owner"):
        assert callable(getattr(rpc.RRef, method))
    assert issubclass(rpc.RRef, ours.RRef)


def test_autograd_and_optim_and_nn_names() -> None:
    with warnings.catch_warnings():  # torch's optim module scripts functions (deprecated)
        warnings.simplefilter("ignore")
        from torch.distributed.nn import RemoteModule as TorchRemoteModule
        from torch.distributed.optim import DistributedOptimizer as TorchDistributedOptimizer
    assert params(autograd.backward) == ["context_id", "roots", "retain_graph"]
    # pybind: the signature is the docstring's first line
    doc = (torch_autograd.backward.__doc__ or "").strip().splitlines()[0]
    assert doc.startswith("backward(context_id: int, roots: List[Tensor], retain_graph")
    assert params(autograd.get_gradients) == ["context_id"]
    assert params(optim.DistributedOptimizer.__init__) == params(TorchDistributedOptimizer.__init__)
    assert params(optim.DistributedOptimizer.step) == ["context_id"]
    assert params(nn.RemoteModule.__init__)[:4] == params(TorchRemoteModule.__init__)[:4]
    for method in ("forward", "forward_async", "remote_parameters", "get_module_rref"):
        assert callable(getattr(nn.RemoteModule, method))


def test_public_names_are_all_documented() -> None:
    for module in (rpc, autograd, optim, nn):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
            value = getattr(module, name)
            if callable(value):
                assert inspect.getdoc(value), f"{module.__name__}.{name} has no docstring"
    assert rpc.RemoteException is ours.RemoteError
    assert rpc.is_available() and autograd.is_available()
    assert callable(rpc.functions.async_execution)


# --------------------------------------------------------------------- backend options


def test_tensorpipe_options_map_to_rpc_options() -> None:
    opts = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=3, rpc_timeout=12.5, device_maps={"w1": {0: 1}}, devices=["cpu"]
    )
    assert opts.init_method == "env://"
    opts.init_method = "tcp://127.0.0.1:29555"  # torch code sets it after construction
    opts.set_device_map("w2", {"cuda:0": torch.device("cuda", 2)})
    mapped, init_method = resolve_options(opts)
    assert init_method == "tcp://127.0.0.1:29555"
    assert (mapped.num_worker_threads, mapped.rpc_timeout) == (3, 12.5)
    assert mapped.device_maps == {"w1": {"cuda:0": "cuda:1"}, "w2": {"cuda:0": "cuda:2"}}
    assert opts.devices == ["cpu"]


def test_tensorpipe_options_reject_conflicting_device_maps() -> None:
    opts = rpc.TensorPipeRpcBackendOptions()
    opts.set_device_map("w1", {0: 1})
    with pytest.raises(ValueError, match="already mapped"):
        opts.set_device_map("w1", {0: 2})
    with pytest.raises(ValueError, match="one-to-one"):
        opts.set_device_map("w1", {3: 1})


def test_tensorpipe_options_pass_our_options_and_refuse_unknown_ones() -> None:
    opts = rpc.TensorPipeRpcBackendOptions(auth_token="s3cret", shm_threshold=0)
    mapped, _ = resolve_options(opts)
    assert mapped.auth_token == "s3cret" and mapped.shm_threshold == 0
    with pytest.raises(TypeError, match="no_such_option"):
        rpc.TensorPipeRpcBackendOptions(no_such_option=1)
    with pytest.raises(ValueError):  # validated like RpcOptions
        resolve_options(rpc.TensorPipeRpcBackendOptions(num_worker_threads=0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rpc_timeout": datetime.timedelta()},  # torch's test_..._throw_on_timedelta_timeout
        {"rpc_timeout": "60"},
        {"num_worker_threads": 2.0},
        {"shm_threshold": "0"},
    ],
    ids=str,
)
def test_tensorpipe_options_refuse_wrong_types_on_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="incompatible constructor arguments"):
        rpc.TensorPipeRpcBackendOptions(**kwargs)


def test_torchs_constants_and_options_base_class() -> None:
    opts = rpc.TensorPipeRpcBackendOptions()
    assert isinstance(opts, rpc.RpcBackendOptions)
    assert opts.rpc_timeout == rpc.constants.DEFAULT_RPC_TIMEOUT_SEC == 60.0
    assert opts.num_worker_threads == rpc.constants.DEFAULT_NUM_WORKER_THREADS == 16
    assert opts.init_method == rpc.constants.DEFAULT_INIT_METHOD == "env://"
    assert rpc.constants.UNSET_RPC_TIMEOUT < 0 and rpc.constants.DEFAULT_SHUTDOWN_TIMEOUT == 0


def test_tensorpipe_transports_and_channels_are_ignored() -> None:
    opts = rpc.TensorPipeRpcBackendOptions(_transports=["uv"], _channels=["basic"])
    assert resolve_options(opts)[0] == RpcOptions(auth_token=RpcOptions().auth_token)


def test_torchs_own_options_object_is_accepted() -> None:
    torch_opts = torch_rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=5, rpc_timeout=7, init_method="tcp://127.0.0.1:29556"
    )
    mapped, init_method = resolve_options(torch_opts)
    assert (mapped.num_worker_threads, mapped.rpc_timeout) == (5, 7.0)
    assert init_method == "tcp://127.0.0.1:29556"


def test_other_option_values() -> None:
    assert resolve_options(None) == (RpcOptions(), "env://")
    mine = RpcOptions(rpc_timeout=3)
    assert resolve_options(mine) == (mine, "env://")
    # torch's test_wrong_types: its words
    with pytest.raises(TypeError, match="Argument rpc_backend_options must be an instance of"):
        resolve_options({"rpc_timeout": 3})

    class FooBackendOptions(rpc.RpcBackendOptions):  # torch's: options of another backend
        def __init__(self, init_method: str) -> None:
            self.init_method = init_method

    foo = FooBackendOptions("env://")
    # torch's test_cannot_infer_backend_from_options / test_mismatched_type_for_options
    with pytest.raises(TypeError, match="Could not infer backend for options"):
        rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options=foo)
    with pytest.raises(
        TypeError, match="`rpc_backend_options` must be a `TensorPipeRpcBackendOptions`"
    ):
        rpc.init_rpc(
            "w", rank=0, world_size=1, backend=rpc.BackendType.TENSORPIPE, rpc_backend_options=foo
        )


def test_init_rpc_refuses_other_backends_before_starting_anything() -> None:
    # torch's test_wrong_types: a string is not a BackendType member
    with pytest.raises(TypeError, match="Argument backend must be a member of BackendType"):
        rpc.init_rpc("w", backend="TENSORPIPE", rank=0, world_size=1)

    class Other(enum.Enum):
        PROCESS_GROUP = "PROCESS_GROUP"

    with pytest.raises(ValueError, match="TENSORPIPE"):
        rpc.init_rpc("w", backend=Other.PROCESS_GROUP, rank=0, world_size=1)
    assert threading.active_count() >= 1  # nothing left running: no agent
    with pytest.raises(ours.RpcError, match="RPC has not been initialized"):
        rpc.get_worker_info()
    # torch's test_pg_init_no_rpc_init: an RRef needs the agent, in torch's words
    with pytest.raises(RuntimeError, match="Current RPC agent is not set! Did you initialize"):
        rpc.RRef(torch.ones(1))


@pytest.mark.parametrize("name", ["w/1", "w 1", "", "x" * 128])
def test_init_rpc_refuses_a_name_torch_refuses_before_the_rendezvous(name: str) -> None:
    # No store is listening at this address: the name is refused first.
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    try:
        options = rpc.TensorPipeRpcBackendOptions(
            init_method=f"tcp://127.0.0.1:{port.getsockname()[1]}", rendezvous_timeout=5.0
        )
        with pytest.raises(RuntimeError, match="Worker name must match") as info:
            rpc.init_rpc(name, rank=0, world_size=2, rpc_backend_options=options)
    finally:
        port.close()
    assert isinstance(info.value, ValueError)
    with pytest.raises(ours.RpcError, match="RPC has not been initialized"):
        rpc.get_worker_info()


def test_shutdown_without_init_is_a_no_op() -> None:
    rpc.shutdown()


# --------------------------------------------------------------------- futures


def test_future_is_a_torch_future_usable_by_torch_helpers() -> None:
    futures: list[Future[int]] = [Future() for _ in range(3)]
    threading.Timer(0.05, lambda: [f.set_result(i) for i, f in enumerate(futures)]).start()
    assert torch.futures.wait_all(futures) == [0, 1, 2]
    assert [f.value() for f in torch.futures.collect_all(futures).wait()] == [0, 1, 2]
    assert futures[1].then(lambda f: f.wait() + 1).wait() == 2


def test_future_can_be_awaited_and_waited_for_on_a_foreign_loop() -> None:
    """Only the agent's own loop refuses a blocking wait (tested with workers);
    another loop (a notebook's, say) may block on it, as on any torch call."""
    fut: Future[str] = Future()
    later: Future[str] = Future()

    async def main() -> tuple[str, str]:
        threading.Timer(0.05, fut.set_result, ("done",)).start()
        value = await fut
        threading.Timer(0.05, later.set_result, ("blocked",)).start()
        return value, later.wait()

    assert asyncio.run(main()) == ("done", "blocked")


def test_awaitable_carries_a_torch_futures_value_and_error() -> None:
    ok: torch.futures.Future[int] = torch.futures.Future()
    bad: torch.futures.Future[int] = torch.futures.Future()

    async def main() -> int:
        threading.Timer(0.02, ok.set_result, (5,)).start()
        threading.Timer(0.02, bad.set_exception, (ValueError("no"),)).start()
        with pytest.raises(ValueError, match="no"):
            await awaitable(bad)
        return await awaitable(ok.then(lambda f: f.wait() * 2))

    assert asyncio.run(main()) == 10


def test_async_execution_returns_an_awaitable_torch_future_locally() -> None:
    @rpc.functions.async_execution
    def later(x: int) -> torch.futures.Future[int]:
        fut: torch.futures.Future[int] = torch.futures.Future()
        fut.set_result(x + 1)
        return fut

    result = later(1)
    assert isinstance(result, torch.futures.Future) and inspect.isawaitable(result)
    assert result.wait() == 2
    assert later._wrapped_async_rpc_function is not later  # type: ignore[attr-defined]

    async def coro(x: int) -> int:
        return x

    assert rpc.functions.async_execution(coro) is coro
