"""torch's backend options, mapped to :class:`aiorpc_autograd.RpcOptions`.

``TensorPipeRpcBackendOptions`` keeps torch's constructor and mutable fields
(``options.init_method = ...`` and ``set_device_map`` work as in torch); the
facade's ``init_rpc`` turns it into our frozen :class:`RpcOptions` once.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import sys
from typing import Any

import torch

from ...options import RpcOptions
from .constants import DEFAULT_INIT_METHOD, DEFAULT_NUM_WORKER_THREADS, DEFAULT_RPC_TIMEOUT_SEC

__all__ = ["BackendType", "RpcBackendOptions", "TensorPipeRpcBackendOptions", "resolve_options"]

log = logging.getLogger(__name__)

DeviceLike = int | str | torch.device

_RPC_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(RpcOptions))


class BackendType(enum.Enum):
    """The RPC backends: one, ours, answering to torch's name."""

    TENSORPIPE = "TENSORPIPE"


def _device(device: DeviceLike) -> str:
    """torch's device spellings (an int is a CUDA index) as a device string."""
    if isinstance(device, int) and not isinstance(device, bool):
        return str(torch.device("cuda", device))
    return str(torch.device(device))


class RpcBackendOptions:
    """torch's base class of backend options (``isinstance`` checks); the
    one backend's options are :class:`TensorPipeRpcBackendOptions`."""

    rpc_timeout: float
    init_method: str


class TensorPipeRpcBackendOptions(RpcBackendOptions):
    """torch's ``TensorPipeRpcBackendOptions``, accepted as an alias.

    Args:
        num_worker_threads: size of the thread pool running plain remote
            functions (``RpcOptions.num_worker_threads``).
        rpc_timeout: default per-call timeout in seconds (0: none).
        init_method: ``"env://"`` (the default) or ``"tcp://HOST:PORT"``;
            settable after construction, as in torch.
        device_maps: ``{worker: {local device: remote device}}``, devices as
            ints (CUDA indices), strings or ``torch.device``.
        devices: the local devices this worker uses.
        _transports, _channels: TensorPipe's transport and channel choices;
            ignored (this library picks Unix sockets, TCP and shared memory
            itself), with a log line saying so.
        **aiorpc_options: any further :class:`RpcOptions` field
            (``auth_token``, ``ssl``, ``shm_threshold``...), passed on.

    Raises:
        TypeError: an unknown keyword, or a value of the wrong type
            (``rpc_timeout=timedelta(...)``, ``num_worker_threads=2.0``), as
            torch's "incompatible constructor arguments".
        ValueError: a value out of range (a negative timeout...).
    """

    def __init__(
        self,
        *,
        num_worker_threads: int = DEFAULT_NUM_WORKER_THREADS,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT_SEC,
        init_method: str = DEFAULT_INIT_METHOD,
        device_maps: dict[str, dict[DeviceLike, DeviceLike]] | None = None,
        devices: list[DeviceLike] | None = None,
        _transports: list[Any] | None = None,
        _channels: list[Any] | None = None,
        **aiorpc_options: Any,
    ) -> None:
        unknown = set(aiorpc_options) - _RPC_OPTION_FIELDS
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}")
        if _transports is not None or _channels is not None:
            log.info(
                "TensorPipeRpcBackendOptions: _transports/_channels are ignored: "
                "aiorpc_autograd picks Unix sockets, TCP and shared memory itself"
            )
        self.num_worker_threads = num_worker_threads
        self.rpc_timeout = rpc_timeout
        self.init_method = init_method
        self.device_maps: dict[str, dict[str, str]] = {}
        for worker, device_map in (device_maps or {}).items():
            self.set_device_map(worker, device_map)
        self.devices: list[str] = [_device(d) for d in devices or []]
        self.aiorpc_options = dict(aiorpc_options)
        try:  # refused here, as torch's constructor refuses them
            self.to_options()
        except TypeError as exc:
            raise TypeError(
                f"TensorPipeRpcBackendOptions(): incompatible constructor arguments: {exc}"
            ) from None

    def set_device_map(self, to: str, device_map: dict[DeviceLike, DeviceLike]) -> None:
        """Map this worker's devices to worker ``to``'s for tensors sent there
        (merged with any map set before).

        Raises:
            ValueError: a local device mapped to two different remote devices,
                or two local devices mapped to one remote device.
        """
        current = dict(self.device_maps.get(to, {}))
        for local, remote in device_map.items():
            src, dst = _device(local), _device(remote)
            if current.get(src, dst) != dst:
                raise ValueError(f"device {src} is already mapped to {current[src]} on {to!r}")
            current[src] = dst
        if len(set(current.values())) != len(current):
            raise ValueError(f"the device map to {to!r} is not one-to-one: {current}")
        self.device_maps[to] = current

    def set_devices(self, devices: list[DeviceLike]) -> None:
        """Set the local devices this worker uses."""
        self.devices = [_device(d) for d in devices]

    def to_options(self) -> RpcOptions:
        """The :class:`RpcOptions` these options stand for."""
        fields: dict[str, Any] = {
            "num_worker_threads": self.num_worker_threads,
            "rpc_timeout": self.rpc_timeout,
            "device_maps": {k: dict(v) for k, v in self.device_maps.items()},
        }
        fields.update(self.aiorpc_options)
        return RpcOptions(**fields)

    def __repr__(self) -> str:
        return (
            f"TensorPipeRpcBackendOptions(num_worker_threads={self.num_worker_threads}, "
            f"rpc_timeout={self.rpc_timeout}, init_method={self.init_method!r}, "
            f"device_maps={self.device_maps}, devices={self.devices})"
        )


def resolve_options(options: Any, backend: Any = None) -> tuple[RpcOptions, str]:
    """``(RpcOptions, init_method)`` for the ``rpc_backend_options`` of
    ``init_rpc``: ours, an :class:`RpcOptions` (init_method ``env://``), None,
    or torch's own ``TensorPipeRpcBackendOptions`` (its fields read by name).
    ``backend`` is the one ``init_rpc`` was given (None: torch infers it from
    the options, which its error says).

    Raises:
        TypeError: anything else (torch's words).
    """
    if options is None:
        return RpcOptions(), DEFAULT_INIT_METHOD
    if isinstance(options, RpcOptions):
        return options, DEFAULT_INIT_METHOD
    if isinstance(options, TensorPipeRpcBackendOptions):
        return options.to_options(), options.init_method
    names = ("num_worker_threads", "rpc_timeout", "init_method", "device_maps", "devices")
    if all(hasattr(options, name) for name in names):  # torch's own options object
        mapped = TensorPipeRpcBackendOptions(
            num_worker_threads=options.num_worker_threads,
            rpc_timeout=options.rpc_timeout,
            init_method=options.init_method,
            device_maps=options.device_maps,
            devices=options.devices,
        )
        return mapped.to_options(), mapped.init_method
    # torch's words, in torch's order: not options at all; options of another
    # backend, which torch tries to infer when none is given
    kind = type(options).__name__
    if not isinstance(options, RpcBackendOptions) and not _is_torch_options(options):
        raise TypeError(
            "Argument rpc_backend_options must be an instance of RpcBackendOptions "
            f"(a TensorPipeRpcBackendOptions) or an RpcOptions, not {kind}"
        )
    if backend is None:
        raise TypeError(f"Could not infer backend for options {options!r} (a {kind})")
    raise TypeError(f"`rpc_backend_options` must be a `TensorPipeRpcBackendOptions`, not a {kind}")


def _is_torch_options(options: Any) -> bool:
    """An instance of torch's own ``RpcBackendOptions`` (torch's RPC imported)."""
    torch_rpc = sys.modules.get("torch.distributed.rpc")
    base = getattr(torch_rpc, "RpcBackendOptions", None)
    return isinstance(base, type) and isinstance(options, base)
