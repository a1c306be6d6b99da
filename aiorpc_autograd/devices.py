"""CUDA device maps: their validation, and which map each message travels by.

Theory of operation
-------------------
As in ``torch.distributed.rpc``, a worker may send CUDA tensors to a peer
only through a *device map* ``{local_device: remote_device}`` it configured
for that peer (``RpcOptions.device_maps[peer_name]``). The rules:

* a **request** to ``peer`` is sent by this worker's map for ``peer``;
* its **response** goes back by the inverse of that map (the callee learns
  the caller's map at rendezvous, where every worker publishes its maps and
  its number of CUDA devices, so nothing per message is needed);
* a message wrapped for distributed autograd carries the map it was sent
  by (``RpcWithAutograd.deviceMap``); the receiver's recv function keeps its
  inverse, and the gradients of that recv function go back by it, so they
  land on the devices the forward tensors came from.

A map is one-to-one, names CUDA devices only (``"cuda:N"``; ints and
``torch.device`` are accepted and normalised), and every device it names
exists on its side: checked for the local side when the options are made,
and for both sides at rendezvous, where both workers raise the same
``ValueError``. A CUDA tensor with no entry in the map it travels by is an
error (``TypeError`` from the encoder), never a silent copy to the CPU.

This module holds the pure rules (no I/O); the codec applies a map to the
tensors of a message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "DeviceMap",
    "DeviceMaps",
    "cuda_device_count",
    "inverse",
    "normalize_device",
    "normalize_map",
    "target_device",
    "validate_group",
]

DeviceMap = dict[str, str]


def normalize_device(device: Any) -> str:
    """``"cuda:N"`` for a CUDA device given as ``"cuda:N"``, ``torch.device`` or ``N``.

    Raises:
        ValueError: not a CUDA device with an explicit index.
    """
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise ValueError(f"invalid device {device!r} in a device map")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r} in a device map: {exc}") from exc
    if dev.type != "cuda":
        raise ValueError(
            f"device maps name CUDA devices only, not {device!r} (CPU tensors need no map)"
        )
    if dev.index is None or dev.index < 0:
        raise ValueError(f"a device map names devices with an index ('cuda:0'), not {device!r}")
    return f"cuda:{dev.index}"


def normalize_map(mapping: Mapping[Any, Any], peer: str = "?") -> DeviceMap:
    """The map with normalised device names, checked one-to-one.

    Raises:
        ValueError: a device is not a CUDA device, or two local devices map to
            one remote device.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"the device map for {peer!r} must be a mapping, not {type(mapping).__name__}"
        )
    out: DeviceMap = {}
    seen: dict[str, str] = {}
    for local, remote in mapping.items():
        src, dst = normalize_device(local), normalize_device(remote)
        if src in out and out[src] != dst:
            raise ValueError(f"device map for {peer!r}: {src} is mapped twice")
        if dst in seen and seen[dst] != src:
            raise ValueError(
                f"device map for {peer!r} is not one-to-one: {seen[dst]} and {src} "
                f"both map to {dst}"
            )
        out[src] = dst
        seen[dst] = src
    return out


def inverse(mapping: Mapping[str, str]) -> DeviceMap:
    """``{remote: local}`` for a one-to-one ``{local: remote}`` map."""
    return {dst: src for src, dst in mapping.items()}


def cuda_device_count() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_exists(devices: Iterable[str], count: int, where: str) -> None:
    for dev in devices:
        index = int(dev.split(":", 1)[1])
        if index >= count:
            have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
            raise ValueError(f"{where} names {dev}, but that worker has {have}")


def validate_group(
    me: str, records: Iterable[tuple[str, int, Mapping[str, Mapping[str, str]]]]
) -> None:
    """Check every device map that involves worker ``me``, both directions.

    ``records`` holds ``(name, cuda_device_count, device_maps)`` per worker,
    as published at rendezvous. Both ends of a bad map run this check on the
    same records, so both raise the same error.

    Raises:
        ValueError: a map names a worker not in the group, or a device one of
            its two workers does not have.
    """
    rows = list(records)
    counts = {name: count for name, count, _ in rows}
    for name, count, maps in rows:
        for peer, mapping in maps.items():
            if name != me and peer != me:
                continue
            where = f"the device map of worker {name!r} for {peer!r}"
            if peer not in counts:
                raise ValueError(f"{where} names a worker that is not in the group")
            _check_exists(mapping.keys(), count, f"{where} (its local side)")
            _check_exists(mapping.values(), counts[peer], f"{where} (its remote side)")


class DeviceMaps:
    """The maps one worker sends by: its own per peer, and the inverse of each
    peer's map to it (for the responses it sends that peer).

    Args:
        own: this worker's ``{peer: map}`` (normalised).
        to_me: each peer's map for this worker (normalised), from rendezvous.
    """

    def __init__(self, own: Mapping[str, DeviceMap], to_me: Mapping[str, DeviceMap]) -> None:
        self._requests = {peer: dict(m) for peer, m in own.items() if m}
        self._replies = {peer: inverse(m) for peer, m in to_me.items() if m}

    def __bool__(self) -> bool:
        return bool(self._requests or self._replies)

    def for_request(self, peer: str) -> DeviceMap | None:
        """The map a request to ``peer`` travels by (None: CPU tensors only)."""
        return self._requests.get(peer)

    def for_reply(self, peer: str) -> DeviceMap | None:
        """The map a response to ``peer`` travels by: the inverse of ``peer``'s map."""
        return self._replies.get(peer)


def target_device(tensor: torch.Tensor, mapping: Mapping[str, str] | None) -> str | None:
    """The receiver's device for ``tensor`` (None: the CPU).

    Raises:
        TypeError: the tensor is not on the CPU and ``mapping`` has no entry
            for its device.
    """
    dev = tensor.device
    if dev.type == "cpu":
        return None
    key = f"{dev.type}:{dev.index}" if dev.index is not None else dev.type
    target = mapping.get(key) if mapping else None
    if target is None:
        raise TypeError(
            f"cannot send a tensor on {key}: no device map entry for {key} to this peer "
            "(set RpcOptions(device_maps={peer: {local_device: remote_device}}), "
            "or move the tensor to the CPU first)"
        )
    return target
