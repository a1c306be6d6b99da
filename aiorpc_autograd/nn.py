"""``RemoteModule``: an ``nn.Module`` that lives on another worker.

``from aiorpc_autograd.nn import RemoteModule``: torch's
``torch.distributed.nn.RemoteModule`` with ``await`` where a call talks to the
module's worker (the blocking form is ``aiorpc_autograd.sync.nn``).

Theory of operation
-------------------
A RemoteModule is a local ``nn.Module`` holding an RRef to the real module,
built on its worker by ``remote()``. Its state is torch's: ``on`` (the worker
as named in ``remote_device``: a name or a rank), ``device``,
``is_device_map_set``, ``is_scriptable`` (always False here),
``generated_methods`` (the ``forward_async``/``forward`` functions, installed
on the instance as bound methods, as torch's generated ones are) and
``module_rref``. Calls go to ``module_rref.owner()``.

Invariants:

* only those six attributes travel when a RemoteModule is sent in RPC
  arguments or results (:data:`_REMOTE_MODULE_PICKLED_ATTRIBUTES`); the
  receiver rebuilds an instance of the same class from them, with the
  generated methods installed and without ``nn.Module``'s own bookkeeping,
  as torch's does; any other attribute is left behind, with a warning;
* outside RPC it cannot be pickled at all (torch's ``RuntimeError``);
* the ``nn.Module`` methods that would act on local state the module does not
  have (parameters, buffers, submodules, hooks, dtype and device moves,
  state dicts) raise torch's ``ValueError`` ("Method ``X`` not supported for
  RemoteModule"), so a program never silently works on an empty local shell.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import types
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NoReturn, Self

import torch

from . import codec
from .api import current_agent, remote, rpc_async
from .options import WorkerInfo
from .rref import RRef

__all__ = ["RemoteModule"]

log = logging.getLogger(__name__)

# What travels when a RemoteModule is sent over RPC (torch's names and order).
_REMOTE_MODULE_PICKLED_ATTRIBUTES = (
    "on",
    "device",
    "is_device_map_set",
    "is_scriptable",
    "generated_methods",
    "module_rref",
)

# What stays behind silently: nn.Module's own bookkeeping (whatever this torch
# version's Module.__init__ sets) and the installed methods, which the receiver
# installs again.
_REMOTE_MODULE_ATTRIBUTES_IGNORE_FOR_PICKLING = frozenset(torch.nn.Module().__dict__) | {
    "forward_async",
    "forward",
}

_PERSISTENT_TAG = "RemoteModule"

_PARSE_ERROR = (
    "Could not parse remote_device: {}. The valid format is "
    "'<workername>/<device>' or 'rank:<rank>/<device>' or '<device>'"
)


def _parse_remote_device(remote_device: str | int | WorkerInfo) -> tuple[str | int, str]:
    """``(worker name or rank, device)`` of a ``remote_device``, by torch's
    rules: ``"name/device"``, ``"rank:N/device"``, or a bare worker name (the
    CPU); also a rank or a WorkerInfo (the CPU).

    Raises:
        ValueError: torch's "Could not parse remote_device" (no worker named,
            an empty name, more than one ``/``), or a device other than the
            CPU or a CUDA device.
        RuntimeError: a malformed device (torch.device's error).
        TypeError: neither a str, an int nor a WorkerInfo.
    """
    if isinstance(remote_device, WorkerInfo):
        return remote_device.name, "cpu"
    if isinstance(remote_device, int) and not isinstance(remote_device, bool):
        return remote_device, "cpu"
    if not isinstance(remote_device, str):
        raise TypeError(f"Invalid type for remote_device: {type(remote_device)}")
    fields = remote_device.split("/")
    if len(fields) == 2:
        worker, device = fields
    elif len(fields) == 1 and not _is_device(fields[0]):
        worker, device = fields[0], "cpu"
    else:  # more than one "/", or a device with no worker: nowhere to build it
        raise ValueError(_PARSE_ERROR.format(remote_device))
    if not worker:
        raise ValueError(_PARSE_ERROR.format(remote_device))
    dev = torch.device(device)  # RuntimeError: "Invalid device string: ..."
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r} in {remote_device!r}: cpu or cuda")
    parts = worker.split(":")
    if len(parts) == 2:
        if parts[0] != "rank" or not parts[1].isdigit():
            raise ValueError(_PARSE_ERROR.format(remote_device))
        return int(parts[1]), str(dev)
    if len(parts) > 2:
        raise ValueError(_PARSE_ERROR.format(remote_device))
    return worker, str(dev)


def _is_device(text: str) -> bool:
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        return False
    return True


def _recursive_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_recursive_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _recursive_to(v, device) for k, v in value.items()}
    return value


# -- run on the module's worker ------------------------------------------------


def _create_module(
    module_cls: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], device: str
) -> torch.nn.Module:
    module = module_cls(*args, **kwargs)
    if not isinstance(module, torch.nn.Module):
        # torch's words: a ported test matches them
        raise ValueError(
            "Expect `module_cls(*args, **kwargs)` returns an instance of <class nn.Module>, "
            f"but it returns an instance of {type(module)}."
        )
    module.to(device)
    return module


def _remote_forward(
    module: RRef[torch.nn.Module], device: str, mapped: bool, args: tuple[Any, ...], kwargs: Any
) -> Any:
    # As torch's RemoteModule on a CUDA device: inputs go to the module's
    # device; outputs come back to the CPU unless a device map takes them.
    dev = torch.device(device)
    out = module.local_value().forward(*_recursive_to(args, dev), **_recursive_to(kwargs, dev))
    return out if mapped else _recursive_to(out, torch.device("cpu"))


async def _parameter_rrefs(
    module: RRef[torch.nn.Module], recurse: bool
) -> list[RRef[torch.Tensor]]:
    value = await module.to_here()  # on the owner: the module itself, once created
    return [RRef(p) for p in value.parameters(recurse)]


def _set_training(module: RRef[torch.nn.Module], mode: bool) -> None:
    # (the module's own train() returns the module: not worth sending back)
    module.local_value().train(mode)


# -- the local side -------------------------------------------------------------


# The nn.Module methods RemoteModule refuses (torch's list), filled below.
_UNSUPPORTED_METHODS: list[str] = []


def _not_supported(name: str, advice: str = "") -> Callable[..., NoReturn]:
    """A method that raises torch's error for an nn.Module method RemoteModule lacks."""
    _UNSUPPORTED_METHODS.append(name)

    def method(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(f"Method ``{name}`` not supported for RemoteModule{advice}")

    method.__name__ = name
    method.__qualname__ = f"_RemoteModuleCore.{name}"
    method.__doc__ = f"Not supported: raises ``ValueError`` (as torch's RemoteModule).{advice}"
    return method


def _no_interface(module_interface_cls: Any) -> None:
    if module_interface_cls is not None:
        raise NotImplementedError(
            "RemoteModule with a TorchScript _module_interface_cls is not supported: "
            "use a Python RemoteModule (leave _module_interface_cls None)"
        )


class _RemoteModuleCore(torch.nn.Module):
    """What the async API's RemoteModule and the facade's share: the remote
    module's creation, torch's attributes, ``get_module_rref``, pickling over
    RPC, and torch's errors for unsupported ``nn.Module`` methods. Each
    flavour adds ``forward``/``forward_async``, ``remote_parameters`` and
    ``train``/``eval`` over the ``_start_*`` calls below (loop thread only).
    """

    on: str | int
    device: str
    is_device_map_set: bool
    is_scriptable: bool
    generated_methods: tuple[Callable[..., Any], ...]
    module_rref: RRef[torch.nn.Module]

    # The methods installed on each instance (torch's generated methods).
    _GENERATED: ClassVar[tuple[str, ...]] = ("forward_async", "forward")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every flavour and user subclass travels over RPC by its attributes.
        super().__init_subclass__(**kwargs)
        codec.register_persistent(cls, _PERSISTENT_TAG, _dump_remote_module, _load_remote_module)

    def __init__(
        self,
        remote_device: str | int | WorkerInfo,
        module_cls: Callable[..., torch.nn.Module],
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        _module_interface_cls: Any = None,
    ) -> None:
        super().__init__()
        _no_interface(_module_interface_cls)
        owner = self._prepare_init(remote_device)
        self.is_scriptable = False
        self.generated_methods = self._generated_methods()
        self.module_rref = remote(
            owner,
            _create_module,
            (module_cls, tuple(args or ()), dict(kwargs or {}), self.device),
        )
        self._install_generated_methods()

    @classmethod
    def init_from_module_rref(
        cls,
        remote_device: str | int | WorkerInfo,
        module_rref: RRef[torch.nn.Module],
        _module_interface_cls: Any = None,
    ) -> Self:
        """A RemoteModule over an existing module RRef (torch's
        ``init_from_module_rref``): several RemoteModules, on any workers, may
        share one remote module. Nothing is sent.

        Args:
            remote_device: as for the constructor (``"worker1/cpu"``...); calls
                go to ``module_rref``'s owner, as in torch.
            module_rref: the RRef to the module (``get_module_rref()``).
            _module_interface_cls: must be None (no TorchScript).

        Raises:
            ValueError, RuntimeError: a malformed ``remote_device``, or an
                unknown worker.
            NotImplementedError: ``_module_interface_cls`` given.
        """
        _no_interface(_module_interface_cls)
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._prepare_init(remote_device)
        module.is_scriptable = False
        module.generated_methods = cls._generated_methods()
        module.module_rref = module_rref
        module._install_generated_methods()
        return module

    def _prepare_init(self, remote_device: str | int | WorkerInfo) -> WorkerInfo:
        on, device = _parse_remote_device(remote_device)
        agent = current_agent()
        info = agent.worker_info(on)  # ValueError for an unknown worker
        self.on = on
        self.device = device
        self.is_device_map_set = agent.device_maps.for_request(info.name) is not None
        return info

    @classmethod
    def _generated_methods(cls) -> tuple[Callable[..., Any], ...]:
        return tuple(getattr(cls, name) for name in cls._GENERATED)

    def _install_generated_methods(self) -> None:
        # Straight into __dict__ (as torch's setattr does): bound methods.
        for fn in self.generated_methods:
            self.__dict__[fn.__name__] = types.MethodType(fn, self)

    @property
    def owner(self) -> WorkerInfo:
        """The worker that holds the module (``module_rref.owner()``)."""
        return self.module_rref.owner()

    def get_module_rref(self) -> RRef[torch.nn.Module]:
        """The RRef to the module on its worker."""
        return self.module_rref

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # forward itself: a RemoteModule has no local hooks (registering one
        # raises), and one received over RPC has no nn.Module bookkeeping.
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        on = self.__dict__.get("on")
        where = f"rank:{on}" if isinstance(on, int) else str(on)
        return f"{type(self).__name__}({where}/{self.__dict__.get('device')})"

    def __getstate__(self) -> NoReturn:
        raise RuntimeError(
            "Cannot pickle RemoteModule in python pickler. RemoteModule can only be "
            "pickled when using RPC"
        )

    def __setstate__(self, state: Any) -> NoReturn:
        raise RuntimeError(
            "Cannot unpickle RemoteModule in python pickler. RemoteModule can only be "
            "unpickled when using RPC"
        )

    # -- the calls, started on the agent's loop (its thread only) ---------------

    def _start_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        """Send the forward call (recorded for distributed autograd)."""
        rref = self.module_rref
        if torch.device(self.device).type != "cuda":
            # The async API's proxy, also for a facade RRef (whose own proxy
            # gives torch futures).
            fut: asyncio.Future[Any] = RRef.rpc_async(rref).forward(*args, **kwargs)
            return fut
        return rpc_async(
            rref.owner(), _remote_forward, (rref, self.device, self.is_device_map_set, args, kwargs)
        )

    def _start_parameters(self, recurse: bool) -> asyncio.Future[list[RRef[torch.Tensor]]]:
        return rpc_async(self.module_rref.owner(), _parameter_rrefs, (self.module_rref, recurse))

    def _start_train(self, mode: bool) -> asyncio.Future[None]:
        return rpc_async(self.module_rref.owner(), _set_training, (self.module_rref, mode))

    # -- torch's unsupported nn.Module methods: ValueError, in torch's words ----

    register_buffer = _not_supported("register_buffer")
    register_parameter = _not_supported("register_parameter")
    add_module = _not_supported("add_module")
    apply = _not_supported("apply")
    cuda = _not_supported("cuda")
    ipu = _not_supported("ipu")
    xpu = _not_supported("xpu")
    cpu = _not_supported("cpu")
    type = _not_supported("type")
    float = _not_supported("float")
    double = _not_supported("double")
    half = _not_supported("half")
    bfloat16 = _not_supported("bfloat16")
    to = _not_supported("to")
    register_backward_hook = _not_supported("register_backward_hook")
    register_forward_pre_hook = _not_supported("register_forward_pre_hook")
    register_forward_hook = _not_supported("register_forward_hook")
    state_dict = _not_supported("state_dict")
    load_state_dict = _not_supported("load_state_dict")
    parameters = _not_supported("parameters", ". Please use ``remote_parameters`` instead.")
    named_parameters = _not_supported("named_parameters")
    buffers = _not_supported("buffers")
    named_buffers = _not_supported("named_buffers")
    children = _not_supported("children")
    named_children = _not_supported("named_children")
    modules = _not_supported("modules")
    named_modules = _not_supported("named_modules")
    requires_grad_ = _not_supported("requires_grad_")
    zero_grad = _not_supported("zero_grad")
    share_memory = _not_supported("share_memory")
    extra_repr = _not_supported("extra_repr")


def _dump_remote_module(module: _RemoteModuleCore) -> tuple[Any, ...]:
    """The persistent id of a RemoteModule sent over RPC: its class (by
    reference) and torch's pickled attributes (the RRef forks as usual)."""
    state = module.__dict__
    missing = [k for k in _REMOTE_MODULE_PICKLED_ATTRIBUTES if k not in state]
    if missing:
        raise pickle.PicklingError(f"RemoteModule without {', '.join(missing)}: not initialised")
    for name in state:
        if (
            name not in _REMOTE_MODULE_PICKLED_ATTRIBUTES
            and name not in _REMOTE_MODULE_ATTRIBUTES_IGNORE_FOR_PICKLING
        ):
            log.warning(
                "The new attribute ``%s`` of RemoteModule is ignored during RPC pickling: "
                "only %s travel",
                name,
                ", ".join(_REMOTE_MODULE_PICKLED_ATTRIBUTES),
            )
    values = tuple(state[k] for k in _REMOTE_MODULE_PICKLED_ATTRIBUTES)
    return (_PERSISTENT_TAG, type(module), values)


def _load_remote_module(pid: tuple[Any, ...]) -> _RemoteModuleCore:
    """A received RemoteModule: the pickled attributes and the installed
    methods, nothing else (no ``nn.Module.__init__``), as torch's receiver."""
    _, cls, values = pid
    if not (isinstance(cls, type) and issubclass(cls, _RemoteModuleCore)):
        raise pickle.UnpicklingError(f"not a RemoteModule class: {cls!r}")
    module = object.__new__(cls)
    module.__dict__.update(zip(_REMOTE_MODULE_PICKLED_ATTRIBUTES, values, strict=True))
    module._install_generated_methods()
    return module


class _RemoteModule(_RemoteModuleCore):
    """torch's ``_RemoteModule`` (the base of :class:`RemoteModule`, whose
    constructor also takes ``_module_interface_cls``, which must be None here)."""

    def forward_async(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Send the forward call at once (on the agent's loop); an
        ``asyncio.Future`` of its result. Recorded for distributed autograd.

        Raises:
            RuntimeError: called off the agent's loop.
        """
        return self._start_forward(args, kwargs)

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's forward on its worker (recorded for dist autograd);
        ``await m(x)`` is the same."""
        return await self._start_forward(args, kwargs)

    async def remote_parameters(self, recurse: bool = True) -> list[RRef[torch.Tensor]]:
        """RRefs to the module's parameters, for a DistributedOptimizer.

        Args:
            recurse: include the parameters of submodules.
        """
        return await self._start_parameters(recurse)

    def train(self, mode: bool = True) -> asyncio.Future[None]:  # type: ignore[override]
        """Set the remote module's training mode: sent at once (so a local
        model's ``train()`` that reaches this module sends it too); await the
        future to know it is done. On the agent's loop only."""
        return self._start_train(mode)

    def eval(self) -> asyncio.Future[None]:  # type: ignore[override]
        """Set the remote module to evaluation mode (as :meth:`train`)."""
        return self._start_train(False)


class RemoteModule(_RemoteModule):
    """Constructs ``module_cls(*args, **kwargs)`` on worker ``remote_device``
    and calls it there: torch's ``RemoteModule``, an ``nn.Module``, with
    ``await`` on the calls that talk to the module's worker.

    ``remote_device`` is torch's ``"name/device"`` or ``"rank:N/device"``
    (``"ps/cpu"``, ``"ps/cuda:0"``), a worker name (the CPU), a rank or a
    WorkerInfo. On a CUDA device, as in PyTorch, the module is moved there,
    the inputs are moved to it on the owner, and the outputs come back on the
    CPU unless this worker has a device map for the owner (then by that
    map's inverse).

    ``await m(x)`` / ``await m.forward(x)`` run forward remotely;
    ``m.forward_async(x)`` returns an ``asyncio.Future`` at once;
    ``await m.remote_parameters()``, ``m.get_module_rref()`` (also
    ``m.module_rref``), ``await m.train()`` / ``await m.eval()``. A
    RemoteModule may be sent in RPC arguments and results (its module is
    shared, not copied), and ``RemoteModule.init_from_module_rref`` makes
    another one over the same module. The ``nn.Module`` methods that would
    act on local state raise ``ValueError``, as in torch.

    Example::

        net = RemoteModule("ps/cpu", torch.nn.Linear, (4, 2))
        async with dist_autograd.context() as cid:
            out = await net(x)
            ...
        opt = DistributedOptimizer(SGD, await net.remote_parameters(), lr=0.1)
    """

    def __init__(
        self,
        remote_device: str | int | WorkerInfo,
        module_cls: Callable[..., torch.nn.Module],
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Start building the module on its worker (returns at once; an error
        building it surfaces at the first call).

        Raises:
            ValueError: a malformed ``remote_device`` or an unknown worker.
            RuntimeError: a malformed device string.
        """
        super().__init__(remote_device, module_cls, args, kwargs)
