"""The public surface of shared/API.md: exported names, errors, options."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import datetime
import importlib
import inspect
import pickle
import pkgutil
import ssl
import sys
import types

import pytest

import aiorpc_autograd as rpc
from aiorpc_autograd import errors
from aiorpc_autograd.errors import (
    AuthenticationError,
    ConnectionLostError,
    ProtocolError,
    RemoteError,
    RpcError,
    RpcTimeoutError,
    remote_error,
)
from aiorpc_autograd.options import RpcOptions, WorkerInfo

# The names of API.md's Lifecycle, Calls, Errors and Introspection sections
# (plus WorkerInfo and RRef, which they return).
API_NAMES = {
    "Lifecycle": ["run", "init_rpc", "shutdown", "worker", "get_worker_info", "RpcOptions"],
    "Calls": ["rpc_async", "rpc_sync", "remote", "register", "to_thread"],
    "Errors": [
        "RpcError",
        "RpcTimeoutError",
        "RemoteError",
        "ConnectionLostError",
        "ProtocolError",
        "AuthenticationError",
    ],
    "Introspection": ["get_debug_info"],
    "Types": ["WorkerInfo", "RRef"],
}
ALL_API_NAMES = [name for names in API_NAMES.values() for name in names]
ERROR_CLASSES = [RpcError, RpcTimeoutError, RemoteError, ConnectionLostError, ProtocolError]
ERROR_CLASSES.append(AuthenticationError)


def package_modules() -> list[types.ModuleType]:
    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(rpc.__path__, rpc.__name__ + ".")
    ]


def defined_somewhere(name: str) -> bool:
    return any(name in getattr(m, "__all__", ()) or hasattr(m, name) for m in package_modules())


# --------------------------------------------------------------------------- names


def test_all_names_exist_and_are_unique() -> None:
    assert len(rpc.__all__) == len(set(rpc.__all__))
    for name in rpc.__all__:
        assert hasattr(rpc, name), name


def test_public_names_equal_all() -> None:
    """Every public non-module name of the package is in ``__all__``
    (submodules such as ``rpc.api`` are reachable but not re-exported names)."""
    public = {
        name
        for name, value in vars(rpc).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # from __future__ import annotations
    }
    exported_non_modules = {
        name for name in rpc.__all__ if not isinstance(getattr(rpc, name), types.ModuleType)
    }
    assert public == exported_non_modules


@pytest.mark.parametrize("name", ALL_API_NAMES)
def test_api_name_is_exported(name: str) -> None:
    if not defined_somewhere(name):
        pytest.skip(f"{name} is not implemented yet")
    assert name in rpc.__all__
    assert getattr(rpc, name) is not None


def test_every_export_is_documented() -> None:
    for name in rpc.__all__:
        value = getattr(rpc, name)
        assert inspect.getdoc(value), f"{name} has no docstring"


def test_error_classes_are_all_re_exported() -> None:
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert getattr(rpc, name) is value
            assert name in rpc.__all__


def test_awaitable_calls_are_coroutine_functions() -> None:
    for name in ("init_rpc", "shutdown", "to_thread"):
        if defined_somewhere(name):
            assert inspect.iscoroutinefunction(getattr(rpc, name)), name


def test_run_returns_the_coroutine_result_on_uvloop() -> None:
    async def main() -> tuple[int, str]:
        return 42, type(asyncio.get_running_loop()).__module__

    result, loop_module = rpc.run(main())
    assert result == 42
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return
    assert loop_module.startswith("uvloop")


def test_worker_info_is_a_frozen_hashable_pair() -> None:
    info = WorkerInfo("trainer", 3)
    assert (info.name, info.id) == ("trainer", 3)
    assert info == WorkerInfo("trainer", 3) and hash(info) == hash(WorkerInfo("trainer", 3))
    assert {info: 1}[WorkerInfo(name="trainer", id=3)] == 1
    with pytest.raises(AttributeError):
        info.name = "other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(info)) == info
    assert repr(info) == str(info) == "WorkerInfo(id=3, name=trainer)"  # torch's words


@pytest.mark.parametrize("name", ["abc*", " ", "", "a" * 128, "w.1", "w/1", "wörker", 7])
def test_worker_info_refuses_names_torch_refuses(name: object) -> None:
    # torch's test_invalid_names: RuntimeError "Worker name must match" /
    # "must be non-empty" / "shorter than 128"; here also a ValueError.
    with pytest.raises(RuntimeError, match="Worker name must match") as info:
        WorkerInfo(name, 0)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert "must be non-empty" in str(info.value) and "shorter than 128" in str(info.value)


def test_worker_info_takes_torchs_names() -> None:
    for name in ["a" * 127, "worker-1_x:y", "W0"]:
        assert WorkerInfo(name, 1).name == name


# --------------------------------------------------------------------------- errors


def test_error_hierarchy() -> None:
    for cls in ERROR_CLASSES:
        assert issubclass(cls, RpcError)
        # torch's RPC raises RuntimeError for its failures: ported
        # `except RuntimeError` clauses catch ours.
        assert issubclass(cls, RuntimeError)
    assert issubclass(RpcTimeoutError, TimeoutError)
    assert issubclass(ConnectionLostError, ConnectionError)
    # API.md's ValueError for a bad argument; torch's RuntimeError for it too.
    assert issubclass(rpc.InvalidArgumentError, ValueError)
    assert not issubclass(ProtocolError, (TimeoutError, ConnectionError))
    with pytest.raises(TimeoutError):
        raise RpcTimeoutError("slow")
    with pytest.raises(ConnectionError):
        raise ConnectionLostError("gone")
    # asyncio.TimeoutError is TimeoutError on 3.11: one except clause catches both.
    with pytest.raises(asyncio.TimeoutError):
        raise RpcTimeoutError("slow")


def test_remote_error_keeps_the_remote_details() -> None:
    err = remote_error("w1", "mymod.CustomError", "it broke", "Traceback (most recent...)\n")
    assert type(err) is RemoteError
    assert (err.worker, err.type_name, err.remote_message) == (
        "w1",
        "mymod.CustomError",
        "it broke",
    )
    assert err.remote_traceback.startswith("Traceback")
    text = str(err)
    for part in ("w1", "mymod.CustomError", "it broke", "Traceback"):
        assert part in text


@pytest.mark.parametrize("type_name", ["ValueError", "builtins.ValueError"])
def test_remote_builtin_error_is_also_that_builtin(type_name: str) -> None:
    err = remote_error("w", type_name, "bad value", "tb")
    assert isinstance(err, RemoteError) and isinstance(err, ValueError)
    assert isinstance(err, RpcError)
    with pytest.raises(ValueError, match="bad value"):
        raise err
    assert type(remote_error("w", "ValueError", "again")) is type(err)  # one class per type


def test_remote_error_subclass_hierarchy_follows_the_builtin() -> None:
    err = remote_error("w", "FileNotFoundError", "no such file")
    assert isinstance(err, FileNotFoundError) and isinstance(err, OSError)
    err = remote_error("w", "KeyError", "'k'")
    assert isinstance(err, KeyError) and isinstance(err, LookupError)
    err = remote_error("w", "ZeroDivisionError", "division by zero")
    assert isinstance(err, ArithmeticError)


@pytest.mark.parametrize(
    "type_name",
    ["mymod.ValueError", "print", "int", "NoSuchThing", "KeyboardInterrupt", "SystemExit"],
)
def test_non_exception_or_unsafe_names_give_a_plain_remote_error(type_name: str) -> None:
    err = remote_error("w", type_name, "m")
    assert type(err) is RemoteError
    assert not isinstance(err, (KeyboardInterrupt, SystemExit))


class _UserError(Exception):
    """A user's exception whose constructor differs from Exception's."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code

    class Nested(LookupError):
        pass


def test_remote_error_of_a_loaded_user_type_is_also_that_type() -> None:
    name = f"{__name__}._UserError"
    err = remote_error("w", name, "it broke", "tb")
    # Made without the type's constructor; RemoteError's text and pickling.
    assert isinstance(err, RemoteError) and isinstance(err, _UserError)
    assert str(err).startswith(f"{name} on worker 'w': it broke")
    with pytest.raises(_UserError):
        raise err
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and again.remote_message == "it broke"
    nested = remote_error("w", f"{name}.Nested", "k")
    assert isinstance(nested, _UserError.Nested) and isinstance(nested, LookupError)


def test_remote_error_type_lookup_imports_nothing_and_runs_no_module_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    lazy = types.ModuleType("lazy_errors_mod")
    lazy.__getattr__ = lambda attr: asked.append(attr)  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "lazy_errors_mod", lazy)
    monkeypatch.setitem(sys.modules, "not_a_module_x", 42)  # anything may sit there
    for type_name in (
        "lazy_errors_mod.Missing",  # a module __getattr__ would answer
        "never_imported_module_x.Error",  # not imported: stays so
        "not_a_module_x.Error",
        "os.sep",  # a module attribute that is not a class
        f"{__name__}._UserError.code",  # a nested name that is not a class
        "aiorpc_autograd.errors.RpcTimeoutError",  # a nested call's timeout is not ours
    ):
        err = remote_error("w", type_name, "m")
        assert type(err) is RemoteError, type_name
    assert asked == [] and "never_imported_module_x" not in sys.modules


# Every built-in Exception subclass, except those errors.py deliberately keeps
# out (exception groups, and the BaseException-only ones are not Exceptions).
BUILTIN_ERRORS = sorted(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type)
    and issubclass(value, Exception)
    and not issubclass(value, BaseExceptionGroup)
    # A future cannot hold them, nor a coroutine raise them: plain RemoteError.
    and not issubclass(value, StopIteration | StopAsyncIteration)
)


@pytest.mark.parametrize("type_name", ["StopIteration", "StopAsyncIteration"])
def test_stop_iteration_arrives_as_plain_remote_error(type_name: str) -> None:
    err = remote_error("w", type_name, "message", "traceback text")
    assert type(err) is RemoteError and err.type_name == type_name


@pytest.mark.parametrize("type_name", BUILTIN_ERRORS)
def test_every_builtin_exception_crosses_the_wire(type_name: str) -> None:
    err = remote_error("w", type_name, "message", "traceback text")
    assert isinstance(err, getattr(builtins, type_name))
    assert isinstance(err, RemoteError)
    assert err.remote_message == "message" and "message" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert (back.worker, back.type_name, back.remote_message, back.remote_traceback) == (
        "w",
        type_name,
        "message",
        "traceback text",
    )


@pytest.mark.parametrize("type_name", ["ValueError", "pkg.Custom", "OSError", "KeyError"])
def test_remote_error_pickles(type_name: str) -> None:
    err = remote_error("worker0", type_name, "msg", "tb")
    back = pickle.loads(pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.worker == "worker0" and back.remote_traceback == "tb"


def test_plain_remote_error_pickles() -> None:
    err = RemoteError("w", "T", "m", "tb")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RemoteError and str(back) == str(err)


@pytest.mark.parametrize("cls", [c for c in ERROR_CLASSES if c is not RemoteError])
def test_local_errors_pickle(cls: type[RpcError]) -> None:
    back = pickle.loads(pickle.dumps(cls("boom")))
    assert type(back) is cls and str(back) == "boom"


# --------------------------------------------------------------------------- options


def test_options_defaults() -> None:
    opts = RpcOptions()
    assert opts.rpc_timeout == 60
    assert opts.num_worker_threads >= 1
    assert opts.device_maps == {}
    assert opts.ssl is None
    assert opts.max_message_size >= 1 << 20
    assert opts.listen_host == "127.0.0.1"
    assert dataclasses.is_dataclass(opts)


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RpcOptions().rpc_timeout = 1  # type: ignore[misc]


def test_auth_token_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIORPC_AUTH_TOKEN", "s3cret")
    assert RpcOptions().auth_token == "s3cret"
    assert RpcOptions(auth_token="explicit").auth_token == "explicit"
    monkeypatch.delenv("AIORPC_AUTH_TOKEN")
    assert RpcOptions().auth_token is None


def test_options_accept_good_values() -> None:
    opts = RpcOptions(
        rpc_timeout=0,
        num_worker_threads=1,
        device_maps={"w1": {"cpu": "cpu"}},
        auth_token="t",
        ssl=ssl.create_default_context(),
        max_message_size=1,
        listen_host="0.0.0.0",
    )
    assert opts.rpc_timeout == 0 and opts.max_message_size == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rpc_timeout": -1},
        {"rpc_timeout": -0.001},
        {"num_worker_threads": 0},
        {"num_worker_threads": -4},
        {"max_message_size": 0},
        {"max_header_size": 0},
        {"max_tensors": 0},
        {"rendezvous_timeout": 0},
        {"rendezvous_timeout": -1},
        {"heartbeat_interval": -1},
        {"heartbeat_timeout": 0},
        {"auth_token": ""},
        {"handshake_timeout": 0},
        {"handshake_timeout": float("nan")},
        {"max_unauthenticated_connections": 0},
    ],
    ids=str,
)
def test_options_reject_bad_values(kwargs: dict[str, object]) -> None:
    names = {f.name for f in dataclasses.fields(RpcOptions)}
    if not set(kwargs) <= names:
        pytest.skip(f"RpcOptions has no {sorted(set(kwargs) - names)}")
    with pytest.raises(ValueError):
        RpcOptions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rpc_timeout": datetime.timedelta(seconds=1)},  # torch's options refuse it too
        {"rpc_timeout": "1"},
        {"rpc_timeout": None},
        {"num_worker_threads": 2.0},
        {"num_worker_threads": True},
        {"max_tensors": "8"},
        {"heartbeat_timeout": True},
        {"auth_token": 3},
        {"listen_host": None},
        {"allow_pickle": 1},
    ],
    ids=str,
)
def test_options_reject_values_of_the_wrong_type(kwargs: dict[str, object]) -> None:
    (name,) = kwargs
    with pytest.raises(TypeError, match=f"^{name} must be"):
        RpcOptions(**kwargs)  # type: ignore[arg-type]


def test_options_take_an_int_for_a_float() -> None:
    opts = RpcOptions(rpc_timeout=5, heartbeat_timeout=3, busy_poll=0)
    assert (opts.rpc_timeout, opts.heartbeat_timeout, opts.busy_poll) == (5, 3, 0)


def test_options_reject_a_non_ssl_context() -> None:
    with pytest.raises(TypeError):
        RpcOptions(ssl="yes please")  # type: ignore[arg-type]


def test_options_reject_nan_timeout() -> None:
    with pytest.raises(ValueError):
        RpcOptions(rpc_timeout=float("nan"))
