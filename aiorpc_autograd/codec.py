"""Message types and their encoding to (msgpack header, tensor buffers).

Theory of operation
-------------------
Every message is a small frozen dataclass whose class names its
:class:`MessageType` (the set mirrors PyTorch's ``message.h``). A frame's
header is the msgpack array ``[type, request_id, tensor_table, *fields]``:

* ``request_id`` matches a response to its request (0 for none);
* ``tensor_table`` lists one descriptor per tensor the message carries,
  ``[dtype_name, shape, buffer_index, byte_offset, requires_grad]`` (or nil for
  an undefined tensor, such as a missing gradient); the frame's buffer
  ``buffer_index`` holds the tensor's elements, C-contiguous, from
  ``byte_offset``; a sparse COO tensor's descriptor is ``["sparse_coo",
  dtype_name, shape, sparse_dim, nnz, indices_buffer, values_buffer,
  coalesced, requires_grad]``, its int64 indices (``[sparse_dim, nnz]``) and
  its values (``[nnz, *shape[sparse_dim:]]``) each in a buffer of their own
  (either descriptor may end with the device the tensor goes to);
* the fields are the message's own, in declaration order.

Tensors never go through pickle: a :class:`Payload` is a value encoded as
pickle (``PICKLE``, tensors replaced by references by ``reducer_override``) or msgpack
(``MSGPACK``, safe mode, tensors as an ext type), plus its tensor table. A
payload is decoded lazily (:func:`load_payload`) so the autograd layer can
replace received tensors (hang them off a recv function) before the value is
built, and so a value that fails to unpickle fails that one request, not the
connection. Wrapping messages (autograd forward request/response, profiling)
carry another message as a field; the frame's tensor table is the innermost
payload's.

Sending a tensor costs no copy when it is C-contiguous (a contiguous view sends
just its own elements); a received tensor is built on the received buffer.
Structural errors raise :class:`ProtocolError`.
"""

from __future__ import annotations

import gc
import importlib
import io
import pickle
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar

import msgpack
import numpy as np
import torch

from .devices import cuda_device_count, target_device
from .errors import ProtocolError
from .wire import Frame

__all__ = [
    "MessageType",
    "Payload",
    "PayloadKind",
    "Message",
    "PythonCall",
    "PythonRet",
    "PythonRemoteCall",
    "RemoteRet",
    "RRefFetchCall",
    "RRefFetchRet",
    "RRefUserDelete",
    "RRefForkRequest",
    "RRefChildAccept",
    "RRefAck",
    "ForwardAutogradReq",
    "ForwardAutogradResp",
    "PropagateGradientsReq",
    "PropagateGradientsResp",
    "CleanupAutogradContextReq",
    "RunWithProfilingReq",
    "RunWithProfilingResp",
    "RRefBackwardReq",
    "RRefBackwardResp",
    "BackwardAbortReq",
    "BackwardStartReq",
    "BackwardStartResp",
    "ExceptionMsg",
    "Hello",
    "Heartbeat",
    "Goodbye",
    "decode",
    "dump_payload",
    "encode",
    "load_payload",
    "tensor_payload",
]


class MessageType(IntEnum):
    """Message kinds; values are PyTorch's (``message.h``) where it has one."""

    SCRIPT_CALL = 0x00  # reserved: builtins travel as PYTHON_CALL
    SCRIPT_RET = 0x01  # reserved
    PYTHON_CALL = 0x02
    PYTHON_RET = 0x03
    SCRIPT_REMOTE_CALL = 0x04  # reserved
    PYTHON_REMOTE_CALL = 0x05
    REMOTE_RET = 0x06
    SCRIPT_RREF_FETCH_CALL = 0x07  # reserved
    PYTHON_RREF_FETCH_CALL = 0x08
    SCRIPT_RREF_FETCH_RET = 0x09  # reserved
    PYTHON_RREF_FETCH_RET = 0x0A
    RREF_USER_DELETE = 0x0B
    RREF_FORK_REQUEST = 0x0C
    RREF_CHILD_ACCEPT = 0x0D
    RREF_ACK = 0x0E
    FORWARD_AUTOGRAD_REQ = 0x0F
    FORWARD_AUTOGRAD_RESP = 0x10
    BACKWARD_AUTOGRAD_REQ = 0x11
    BACKWARD_AUTOGRAD_RESP = 0x12
    CLEANUP_AUTOGRAD_CONTEXT_REQ = 0x13
    CLEANUP_AUTOGRAD_CONTEXT_RESP = 0x14  # reserved: a release is a notice, never answered
    RUN_WITH_PROFILING_REQ = 0x15
    RUN_WITH_PROFILING_RESP = 0x16
    RREF_BACKWARD_REQ = 0x17
    RREF_BACKWARD_RESP = 0x18
    EXCEPTION = 0x37
    # Ours (connection management), beyond PyTorch's set.
    HELLO = 0x40
    HEARTBEAT = 0x41
    BACKWARD_START_REQ = 0x42
    BACKWARD_START_RESP = 0x43
    BACKWARD_ABORT_REQ = 0x44
    GOODBYE = 0x4A


class PayloadKind(IntEnum):
    """How a payload's value is encoded."""

    PICKLE = 0
    MSGPACK = 1
    TENSORS = 2  # the value is the tensor table itself (e.g. gradients)


class Payload:
    """An encoded value and the tensors pulled out of it.

    Attributes:
        kind: the encoding of ``data``.
        data: the encoded value (tensors replaced by table indices).
        tensors: the tensor table; entries may be None (undefined tensors).
    """

    __slots__ = ("data", "kind", "tensors")

    def __init__(self, kind: PayloadKind, data: bytes, tensors: list[torch.Tensor | None]) -> None:
        self.kind = kind
        self.data = data
        self.tensors = tensors

    def __repr__(self) -> str:
        return f"Payload({self.kind.name}, {len(self.data)} bytes, {len(self.tensors)} tensors)"


# --------------------------------------------------------------------------- values


_EXT_TENSOR = 1
_SPARSE_COO = "sparse_coo"  # a tensor descriptor's tag for a sparse COO tensor
_DTYPES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v
    for v in vars(torch).values()
    if isinstance(v, torch.dtype) and not str(v).startswith(("torch.qint", "torch.quint"))
}


class _Pickler(pickle.Pickler):
    """Pickles with tensors (and registered types) replaced by references.

    ``reducer_override`` is only consulted for objects that are not of a
    built-in container or scalar type, so plain values pickle at C speed.
    """

    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor | None]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._tensors = tensors

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            # The pickler memoizes the reference: one tensor twice is one entry.
            self._tensors.append(obj)
            index = len(self._tensors) - 1
            if type(obj) is torch.nn.Parameter:
                return _parameter_ref, (index,)
            return _tensor_ref, (index,)
        hook = _persistent_hooks.get(type(obj))
        if hook is not None:
            return _persistent_ref, (hook(obj),)
        if isinstance(obj, torch.jit.ScriptFunction):
            # Not picklable; by name, as torch's RPC sends a script call.
            return _script_function, (obj.qualified_name,)
        return NotImplemented


# The tensor table of the payload being unpickled on this thread.
_loading = threading.local()


def _table() -> Sequence[torch.Tensor | None]:
    table: Sequence[torch.Tensor | None] | None = getattr(_loading, "tensors", None)
    if table is None:
        raise pickle.UnpicklingError("tensor reference outside of a payload")
    return table


def _tensor_ref(index: int) -> torch.Tensor | None:
    return _table()[index]


def _parameter_ref(index: int) -> torch.Tensor:
    t = _table()[index]
    if t is None:
        raise pickle.UnpicklingError(f"parameter {index} is missing from the tensor table")
    if t.grad_fn is not None:
        # A recv function's output (a message in an autograd context): a
        # Parameter is a leaf, the one behind that output.
        accumulate: Any = t.grad_fn.next_functions[t.output_nr][0]
        t = accumulate.variable
    # Made a Parameter in place, not wrapped: the table's tensor is the object
    # autograd recorded (a recv function's leaf), and one tensor appearing
    # twice stays one object.
    if type(t) is not torch.nn.Parameter:
        t.__class__ = torch.nn.Parameter
    return t


def _script_function(qualified_name: str) -> Any:
    """This process's TorchScript function ``__torch__.<module>.<name>``: its
    module is imported (which compiles it, as unpickling a plain function
    imports its module), then it is found by name, as torch's RPC finds a
    script call's function."""
    module, _, name = qualified_name.removeprefix("__torch__.").rpartition(".")
    if module:
        fn = getattr(importlib.import_module(module), name, None)
        if isinstance(fn, torch.jit.ScriptFunction) and fn.qualified_name == qualified_name:
            return fn  # the module's own object
    found = torch.jit._state._python_cu.find_function(qualified_name)
    if found is None:
        raise pickle.UnpicklingError(f"no TorchScript function {qualified_name} here")
    return found


def _persistent_ref(pid: Any) -> Any:
    if type(pid) is tuple and pid and pid[0] in _persistent_loaders:
        return _persistent_loaders[pid[0]](pid)
    raise pickle.UnpicklingError(f"unknown reference {pid!r}")


# Extension points for objects that must not be pickled by value (RRefs): a
# dumper maps an instance to a persistent id tuple ``(tag, ...)``; a loader maps
# that tuple back. Registered by the layers that own those types.
_persistent_hooks: dict[type, Callable[[Any], Any]] = {}
_persistent_loaders: dict[str, Callable[[tuple[Any, ...]], Any]] = {}


def register_persistent(
    cls: type,
    tag: str,
    dump: Callable[[Any], tuple[Any, ...]],
    load: Callable[[tuple[Any, ...]], Any],
) -> None:
    """Make instances of ``cls`` travel by reference in pickled payloads.

    Args:
        cls: the type to intercept.
        tag: the first element of the persistent id tuples ``dump`` returns.
        dump: maps an instance to ``(tag, ...)`` (msgpack-able elements).
        load: maps such a tuple back to an object on the receiver.
    """
    _persistent_hooks[cls] = dump
    _persistent_loaders[tag] = load


_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})


def dump_payload(value: Any, allow_pickle: bool = True) -> Payload:
    """Encode ``value`` with its tensors pulled out into the tensor table.

    Args:
        value: any picklable value (msgpack values and tensors in safe mode).
        allow_pickle: False encodes with msgpack only (safe mode).

    Raises:
        TypeError: the value cannot be encoded.
    """
    if allow_pickle and type(value) in _SCALARS:  # no tensor inside: no table to build
        return Payload(PayloadKind.PICKLE, pickle.dumps(value, pickle.HIGHEST_PROTOCOL), [])
    tensors: list[torch.Tensor | None] = []
    if allow_pickle:
        buf = io.BytesIO()
        try:
            _Pickler(buf, tensors).dump(value)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(f"cannot pickle {type(value).__name__}: {exc}") from exc
        return Payload(PayloadKind.PICKLE, buf.getvalue(), tensors)

    def default(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
            return msgpack.ExtType(_EXT_TENSOR, (len(tensors) - 1).to_bytes(4, "little"))
        raise TypeError(f"{type(obj).__name__} cannot travel in safe mode (no pickle)")

    return Payload(PayloadKind.MSGPACK, msgpack.packb(value, default=default), tensors)


def tensor_payload(tensors: Iterable[torch.Tensor | None]) -> Payload:
    """A payload whose value is just a list of tensors (None allowed)."""
    return Payload(PayloadKind.TENSORS, b"", list(tensors))


def load_payload(payload: Payload, allow_pickle: bool = True) -> Any:
    """Decode a payload's value, tensors taken from its table.

    Raises:
        ProtocolError: the payload is pickled and ``allow_pickle`` is False, or
            the msgpack data is malformed.
        Exception: whatever unpickling raises (a missing class, say).
    """
    kind = payload.kind
    tensors = payload.tensors
    if kind is PayloadKind.TENSORS:
        return tensors
    if kind is PayloadKind.PICKLE:
        if not allow_pickle:
            raise ProtocolError("pickled payload refused: this worker runs in safe mode")
        previous = getattr(_loading, "tensors", None)
        _loading.tensors = tensors
        try:
            return pickle.loads(payload.data)
        finally:
            _loading.tensors = previous

    def ext_hook(code: int, data: bytes) -> Any:
        if code != _EXT_TENSOR or len(data) != 4:
            raise ProtocolError(f"unknown msgpack extension {code}")
        index = int.from_bytes(data, "little")
        if index >= len(tensors):
            raise ProtocolError(f"tensor index {index} out of range")
        return tensors[index]

    data = payload.data
    try:
        # Every length bounded by the data's own size; ext types are 4-byte tensor refs.
        return msgpack.unpackb(
            data,
            ext_hook=ext_hook,
            strict_map_key=False,
            max_str_len=len(data),
            max_bin_len=len(data),
            max_array_len=len(data),
            max_map_len=len(data) // 2,
            max_ext_len=4,
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed msgpack payload: {exc}") from exc


# --------------------------------------------------------------------------- tensors


# dtypes whose tensors convert to numpy arrays (the others are viewed as bytes
# first, and built with torch.frombuffer when received), and their numpy dtypes.
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}
_NUMPY_OF: dict[torch.dtype, np.dtype[Any]] = {
    dtype: np.dtype(_DTYPE_NAMES[dtype])  # (the same names in numpy)
    for dtype in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    )
}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The elements of ``t`` as a flat byte view, copying only if not contiguous
    (or, for a CUDA tensor, staged through host memory: a copy on the current
    stream, so it waits for the kernels queued there that produce ``t``)."""
    if t.layout != torch.strided:
        raise TypeError(f"cannot send a tensor with layout {t.layout}")
    if t.is_quantized:
        raise TypeError("cannot send a quantized tensor")
    if not t.is_cpu:
        t = t.cpu()
    if t.requires_grad:  # (numpy() refuses it; a detach costs ~0.4 µs)
        t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if not t.numel():
        return memoryview(b"")
    # numpy() shares memory and keeps the tensor alive for as long as the view.
    if t.dtype in _NUMPY_OF:
        return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _encode_tensors(
    tensors: Sequence[torch.Tensor | None], device_map: Mapping[str, str] | None = None
) -> tuple[list[Any], list[memoryview]]:
    table: list[Any] = []
    buffers: list[memoryview] = []
    for t in tensors:
        if t is None:
            table.append(None)
            continue
        # Before any copy: a tensor off the CPU with no map entry is refused.
        device = None if t.is_cpu else target_device(t, device_map)
        if t.layout == torch.sparse_coo:
            desc = _sparse_coo_descriptor(t, buffers)
        else:
            buffers.append(_tensor_bytes(t))
            desc = [
                _DTYPE_NAMES[t.dtype],
                list(t.shape),
                len(buffers) - 1,
                0,
                bool(t.requires_grad),
            ]
        if device is not None:
            desc.append(device)
        table.append(desc)
    return table, buffers


def _sparse_coo_descriptor(t: torch.Tensor, buffers: list[memoryview]) -> list[Any]:
    """Appends a sparse COO tensor's indices and values to ``buffers`` and
    returns its descriptor (see the module's docstring)."""
    requires_grad = bool(t.requires_grad)
    if requires_grad:
        t = t.detach()
    # _indices()/_values(): as stored, coalesced or not (indices() refuses an
    # uncoalesced tensor, and coalescing would change what the peer gets).
    buffers.append(_tensor_bytes(t._indices()))
    buffers.append(_tensor_bytes(t._values()))
    return [
        _SPARSE_COO,
        _DTYPE_NAMES[t.dtype],
        list(t.shape),
        t.sparse_dim(),
        t._nnz(),
        len(buffers) - 2,
        len(buffers) - 1,
        t.is_coalesced(),
        requires_grad,
    ]


def _local_device(name: Any) -> torch.device:
    """The device a received tensor goes to: a CUDA device of this worker."""
    if type(name) is not str or not name.startswith("cuda:") or not name[5:].isdigit():
        raise ProtocolError(f"bad tensor device {name!r}")
    index = int(name[5:])
    if index >= cuda_device_count():
        raise ProtocolError(f"a tensor was sent to {name}, which this worker does not have")
    return torch.device("cuda", index)


def _decode_tensors(
    table: Any, buffers: list[memoryview], max_tensors: int
) -> list[torch.Tensor | None]:
    if type(table) is not list:
        raise ProtocolError("tensor table is not a list")
    if len(table) > max_tensors:
        raise ProtocolError(f"{len(table)} tensors exceed the limit of {max_tensors}")
    out: list[torch.Tensor | None] = []
    for desc in table:
        if desc is None:
            out.append(None)
            continue
        if type(desc) is not list:
            raise ProtocolError("malformed tensor descriptor")
        if len(desc) in (5, 6):
            dtype_name, shape, index, offset, requires_grad = desc[:5]
            dtype = _dtype(dtype_name)
            t = _buffer_tensor(dtype, shape, buffers, index, offset)
        elif len(desc) in (9, 10) and desc[0] == _SPARSE_COO:
            t = _sparse_coo_tensor(desc, buffers)
            dtype, requires_grad = t.dtype, desc[8]
        else:
            raise ProtocolError("malformed tensor descriptor")
        if len(desc) in (6, 10):  # a host-to-device copy on the current stream
            t = t.to(_local_device(desc[-1]))
        if requires_grad is True and (dtype.is_floating_point or dtype.is_complex):
            t.requires_grad_()
        out.append(t)
    return out


def _dtype(name: Any) -> torch.dtype:
    dtype = _DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise ProtocolError(f"unknown tensor dtype {name!r}")
    return dtype


def _buffer_tensor(
    dtype: torch.dtype, shape: Any, buffers: list[memoryview], index: Any, offset: Any
) -> torch.Tensor:
    """A strided tensor of ``shape`` on ``buffers[index]`` from byte ``offset``,
    checked to fit it."""
    if (
        type(shape) is not list
        or not all(type(d) is int and d >= 0 for d in shape)
        or type(index) is not int
        or type(offset) is not int
        or not 0 <= index < len(buffers)
        or offset < 0
    ):
        raise ProtocolError("malformed tensor descriptor")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    buf = buffers[index]
    if offset + nbytes > len(buf):
        raise ProtocolError(
            f"tensor of {nbytes} bytes at offset {offset} overruns its {len(buf)}-byte buffer"
        )
    np_dtype = _NUMPY_OF.get(dtype)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if np_dtype is not None and not buf.readonly:
        # Shaped in one step, no torch op (an op releases the GIL: on a
        # loop whose pool computes, each is a thread switch).
        return torch.from_numpy(np.ndarray(shape, np_dtype, buf, offset))
    t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset)
    return t.view(shape) if len(shape) != 1 else t


def _sparse_coo_tensor(desc: list[Any], buffers: list[memoryview]) -> torch.Tensor:
    """The sparse COO tensor a descriptor names, its invariants checked: a
    peer's indices out of bounds, or a false claim to be coalesced, would make
    later sparse kernels read out of bounds."""
    _, dtype_name, shape, sparse_dim, nnz, indices_at, values_at, coalesced = desc[:8]
    dtype = _dtype(dtype_name)
    if (
        type(shape) is not list
        or not all(type(d) is int and d >= 0 for d in shape)
        or type(sparse_dim) is not int
        or type(nnz) is not int
        or type(coalesced) is not bool
        or not 0 <= sparse_dim <= len(shape)
        or nnz < 0
        or indices_at == values_at
    ):
        raise ProtocolError("malformed sparse tensor descriptor")
    indices = _buffer_tensor(torch.int64, [sparse_dim, nnz], buffers, indices_at, 0)
    values = _buffer_tensor(dtype, [nnz, *shape[sparse_dim:]], buffers, values_at, 0)
    try:
        _check_sparse_indices(indices, shape, coalesced)
        return torch.sparse_coo_tensor(
            indices, values, shape, is_coalesced=coalesced, check_invariants=False
        )
    except (RuntimeError, OverflowError) as exc:
        raise ProtocolError(f"invalid sparse tensor: {exc}") from exc


def _check_sparse_indices(indices: torch.Tensor, shape: list[int], coalesced: bool) -> None:
    """The invariants of a COO tensor's ``[sparse_dim, nnz]`` indices: each
    index within its dimension, and a claim to be coalesced true (the columns
    strictly increasing, in lexicographic order).

    What ``torch.sparse_coo_tensor(check_invariants=True)`` checks, by a few
    reductions: torch's check took ~2 ms a tensor in a worker whose peer is
    busy (13 us alone), a sparse backward pass ~9 ms against ~1.4 ms.

    Raises:
        ProtocolError: an invariant does not hold.
    """
    sparse_dim, nnz = indices.shape
    if nnz == 0 or sparse_dim == 0:  # no index to check (torch checks none either)
        return
    bounds = torch.tensor(shape[:sparse_dim], dtype=torch.int64)
    if int(indices.min()) < 0 or bool((indices.amax(dim=1) >= bounds).any()):
        raise ProtocolError("invalid sparse tensor: an index is out of bounds")
    if coalesced and nnz > 1:
        step = indices[:, 1:] - indices[:, :-1]
        moved = step != 0
        first = moved.to(torch.uint8).argmax(dim=0, keepdim=True)  # first dim that moves
        rises = step.gather(0, first).squeeze(0) > 0
        if not bool((moved.any(dim=0) & rises).all()):
            raise ProtocolError(
                "invalid sparse tensor: claimed coalesced, with indices not strictly increasing"
            )


# --------------------------------------------------------------------------- messages


class Message:
    """Base class of every message. Subclasses are frozen slotted dataclasses."""

    __slots__ = ()
    TYPE: ClassVar[MessageType]
    IS_RESPONSE: ClassVar[bool] = False
    # A notice: sent with request id 0 and never answered (its receiver's
    # handler runs at once on the loop, so it holds nothing for the sender).
    IS_NOTICE: ClassVar[bool] = False

    def payload(self) -> Payload | None:
        """The payload whose tensor table the frame carries, if any."""
        return None

    def to_fields(self) -> list[Any]:
        """The message's fields as msgpack values (payload: ``[kind, data]``)."""
        return [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]

    @classmethod
    def from_fields(cls, values: list[Any], tensors: list[torch.Tensor | None]) -> Message:
        """Rebuild the message from its fields and the frame's tensors."""
        checks = _field_checks(cls)
        if len(values) != len(checks):
            raise ProtocolError(f"{cls.__name__} takes {len(checks)} fields, got {len(values)}")
        for value, (name, check) in zip(values, checks, strict=True):
            if not check(value):
                raise ProtocolError(f"{cls.__name__}.{name} has the wrong type")
        return cls(*values)


def _is_id_pair(v: Any) -> bool:
    return type(v) is list and len(v) == 2 and all(type(x) is int for x in v)


# A field of any number of ints (``list[int]`` fields are id pairs).
IntList = list[int]


def _is_int_list(v: Any) -> bool:
    return type(v) is list and all(type(x) is int for x in v)


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: type(v) is str,
    "int": lambda v: type(v) is int,
    "bool": lambda v: type(v) is bool,
    "list[int]": _is_id_pair,
    "IntList": _is_int_list,
}
_FIELD_CHECKS: dict[type, list[tuple[str, Callable[[Any], bool]]]] = {}


def _field_checks(cls: type[Message]) -> list[tuple[str, Callable[[Any], bool]]]:
    checks = _FIELD_CHECKS.get(cls)
    if checks is None:
        checks = _FIELD_CHECKS[cls] = [
            (f.name, _CHECKS[str(f.type)])
            for f in fields(cls)  # type: ignore[arg-type]
        ]
    return checks


_REGISTRY: dict[int, type[Message]] = {}


def _message(cls: type[Message]) -> type[Message]:
    _REGISTRY[cls.TYPE] = cls
    return cls


def _payload_field(p: Payload) -> list[Any]:
    return [int(p.kind), p.data]


_KINDS = {int(k): k for k in PayloadKind}  # Enum(...) lookups are slow


def _payload_from(value: Any, tensors: list[torch.Tensor | None]) -> Payload:
    if type(value) is not list or len(value) != 2 or type(value[1]) is not bytes:
        raise ProtocolError("malformed payload field")
    kind = _KINDS.get(value[0])
    if kind is None:
        raise ProtocolError(f"unknown payload kind {value[0]!r}")
    return Payload(kind, value[1], tensors)


class _WithPayload(Message):
    """A message whose only variable part is one payload."""

    __slots__ = ()
    value: Payload

    def payload(self) -> Payload:
        return self.value

    def to_fields(self) -> list[Any]:
        return [_payload_field(self.value)]

    @classmethod
    def from_fields(cls, values: list[Any], tensors: list[torch.Tensor | None]) -> Message:
        (value,) = values
        return cls(_payload_from(value, tensors))  # type: ignore[call-arg]


@_message
@dataclass(frozen=True, slots=True)
class PythonCall(Message):
    """Call a function. ``target`` is a registered name, or None when the
    payload is the pickled ``(func, args, kwargs)``; else it is ``(args, kwargs)``."""

    TYPE: ClassVar[MessageType] = MessageType.PYTHON_CALL
    target: str | None
    value: Payload

    def payload(self) -> Payload:
        return self.value

    def to_fields(self) -> list[Any]:
        return [self.target, _payload_field(self.value)]

    @classmethod
    def from_fields(cls, values: list[Any], tensors: list[torch.Tensor | None]) -> Message:
        target, value = values
        if target is not None and type(target) is not str:
            raise ProtocolError("call target must be a string or nil")
        return cls(target, _payload_from(value, tensors))


@_message
@dataclass(frozen=True, slots=True)
class PythonRet(_WithPayload):
    """The result of a call (or of an RRef-owner method call)."""

    TYPE: ClassVar[MessageType] = MessageType.PYTHON_RET
    IS_RESPONSE: ClassVar[bool] = True
    value: Payload


@_message
@dataclass(frozen=True, slots=True)
class PythonRemoteCall(Message):
    """Run a call whose result the callee owns as RRef ``rref_id``."""

    TYPE: ClassVar[MessageType] = MessageType.PYTHON_REMOTE_CALL
    target: str | None
    value: Payload
    rref_id: list[int]
    fork_id: list[int]

    def payload(self) -> Payload:
        return self.value

    def to_fields(self) -> list[Any]:
        return [self.target, _payload_field(self.value), self.rref_id, self.fork_id]

    @classmethod
    def from_fields(cls, values: list[Any], tensors: list[torch.Tensor | None]) -> Message:
        target, value, rref_id, fork_id = values
        if target is not None and type(target) is not str:
            raise ProtocolError("call target must be a string or nil")
        return cls(target, _payload_from(value, tensors), _id_pair(rref_id), _id_pair(fork_id))


def _id_pair(value: Any) -> list[int]:
    if type(value) is not list or len(value) != 2 or not all(type(v) is int for v in value):
        raise ProtocolError("malformed RRef/fork id")
    return value


@_message
@dataclass(frozen=True, slots=True)
class RemoteRet(Message):
    """The owner created the value of ``rref_id``."""

    TYPE: ClassVar[MessageType] = MessageType.REMOTE_RET
    IS_RESPONSE: ClassVar[bool] = True
    rref_id: list[int]
    fork_id: list[int]


@_message
@dataclass(frozen=True, slots=True)
class RRefFetchCall(Message):
    """``to_here``: fetch the value of ``rref_id``."""

    TYPE: ClassVar[MessageType] = MessageType.PYTHON_RREF_FETCH_CALL
    rref_id: list[int]
    from_worker: int


@_message
@dataclass(frozen=True, slots=True)
class RRefFetchRet(_WithPayload):
    """The value of an RRef."""

    TYPE: ClassVar[MessageType] = MessageType.PYTHON_RREF_FETCH_RET
    IS_RESPONSE: ClassVar[bool] = True
    value: Payload


@_message
@dataclass(frozen=True, slots=True)
class RRefUserDelete(Message):
    """A user dropped its reference ``fork_id`` to ``rref_id``."""

    TYPE: ClassVar[MessageType] = MessageType.RREF_USER_DELETE
    rref_id: list[int]
    fork_id: list[int]


@_message
@dataclass(frozen=True, slots=True)
class RRefForkRequest(Message):
    """A child tells the owner about its new reference ``fork_id``."""

    TYPE: ClassVar[MessageType] = MessageType.RREF_FORK_REQUEST
    rref_id: list[int]
    fork_id: list[int]


@_message
@dataclass(frozen=True, slots=True)
class RRefChildAccept(Message):
    """The child tells its parent the owner knows of ``fork_id``."""

    TYPE: ClassVar[MessageType] = MessageType.RREF_CHILD_ACCEPT
    fork_id: list[int]


@_message
@dataclass(frozen=True, slots=True)
class RRefAck(Message):
    """Empty acknowledgement."""

    TYPE: ClassVar[MessageType] = MessageType.RREF_ACK
    IS_RESPONSE: ClassVar[bool] = True


class _AutogradWrapper(Message):
    """``RpcWithAutograd``: a message plus autograd metadata."""

    __slots__ = ()
    from_worker: int
    context_id: int
    message_id: int
    device_map: dict[str, str]
    wrapped: Message

    def payload(self) -> Payload | None:
        return self.wrapped.payload()

    def to_fields(self) -> list[Any]:
        w = self.wrapped
        return [
            self.from_worker,
            self.context_id,
            self.message_id,
            self.device_map,
            int(w.TYPE),
            w.to_fields(),
        ]

    @classmethod
    def from_fields(cls, values: list[Any], tensors: list[torch.Tensor | None]) -> Message:
        from_worker, context_id, message_id, device_map, wtype, wfields = values
        if not (type(from_worker) is int and type(context_id) is int and type(message_id) is int):
            raise ProtocolError("malformed autograd metadata")
        if type(device_map) is not dict or not all(
            type(k) is str and type(v) is str for k, v in device_map.items()
        ):
            raise ProtocolError("malformed device map")
        wrapped = _build(wtype, wfields, tensors)
        if isinstance(wrapped, _AutogradWrapper):
            raise ProtocolError("nested autograd wrappers")
        return cls(from_worker, context_id, message_id, device_map, wrapped)  # type: ignore[call-arg]


@_message
@dataclass(frozen=True, slots=True)
class ForwardAutogradReq(_AutogradWrapper):
    """A request sent inside a distributed autograd context."""

    TYPE: ClassVar[MessageType] = MessageType.FORWARD_AUTOGRAD_REQ
    from_worker: int
    context_id: int
    message_id: int
    device_map: dict[str, str]
    wrapped: Message


@_message
@dataclass(frozen=True, slots=True)
class ForwardAutogradResp(_AutogradWrapper):
    """The response to a wrapped request whose tensors require grad."""

    TYPE: ClassVar[MessageType] = MessageType.FORWARD_AUTOGRAD_RESP
    IS_RESPONSE: ClassVar[bool] = True
    from_worker: int
    context_id: int
    message_id: int
    device_map: dict[str, str]
    wrapped: Message


@_message
@dataclass(frozen=True, slots=True)
class PropagateGradientsReq(Message):
    """Gradients for the send function ``message_id`` of context ``context_id``;
    ``optimizer``: the pass's step-in-backward plan (``[]``: none, else the
    optimizer id then its owners' worker ids)."""

    TYPE: ClassVar[MessageType] = MessageType.BACKWARD_AUTOGRAD_REQ
    context_id: int
    message_id: int
    grads: Payload
    retain_graph: bool
    from_worker: int
    pass_id: int
    optimizer: IntList = field(default_factory=list)

    def payload(self) -> Payload:
        return self.grads

    def to_fields(self) -> list[Any]:
        return [
            self.context_id,
            self.message_id,
            self.retain_graph,
            self.from_worker,
            self.pass_id,
            self.optimizer,
        ]

    @classmethod
    def from_fields(cls, values: list[Any], tensors: list[torch.Tensor | None]) -> Message:
        if len(values) != 6:
            raise ProtocolError("malformed PropagateGradientsReq")
        context_id, message_id, retain_graph, from_worker, pass_id, optimizer = values
        if not all(type(v) is int for v in (context_id, message_id, from_worker, pass_id)):
            raise ProtocolError("malformed PropagateGradientsReq")
        if type(retain_graph) is not bool:
            raise ProtocolError("PropagateGradientsReq.retain_graph has the wrong type")
        if not _is_int_list(optimizer):
            raise ProtocolError("PropagateGradientsReq.optimizer has the wrong type")
        return cls(
            context_id,
            message_id,
            tensor_payload(tensors),
            bool(retain_graph),
            from_worker,
            pass_id,
            optimizer,
        )


@_message
@dataclass(frozen=True, slots=True)
class PropagateGradientsResp(Message):
    """The gradients were applied."""

    TYPE: ClassVar[MessageType] = MessageType.BACKWARD_AUTOGRAD_RESP
    IS_RESPONSE: ClassVar[bool] = True


@_message
@dataclass(frozen=True, slots=True)
class CleanupAutogradContextReq(Message):
    """Release context ``context_id`` (and forward to the workers it knows).
    A notice: torch answers it with an empty response that nobody waits for;
    here it costs neither side a response to write and read every step."""

    TYPE: ClassVar[MessageType] = MessageType.CLEANUP_AUTOGRAD_CONTEXT_REQ
    IS_NOTICE: ClassVar[bool] = True
    context_id: int


class _ProfilingWrapper(Message):
    """A message plus a profiling id and profiler data (``META``: its field
    name and msgpack type)."""

    __slots__ = ()
    META: ClassVar[tuple[str, type]]
    profiling_id: list[int]
    wrapped: Message

    def payload(self) -> Payload | None:
        return self.wrapped.payload()

    def to_fields(self) -> list[Any]:
        w = self.wrapped
        meta = getattr(self, self.META[0])
        return [self.profiling_id, meta, int(w.TYPE), w.to_fields()]

    @classmethod
    def from_fields(cls, values: list[Any], tensors: list[torch.Tensor | None]) -> Message:
        profiling_id, meta, wtype, wfields = values
        name, kind = cls.META
        if type(meta) is not kind:
            raise ProtocolError(f"{cls.__name__}.{name} has the wrong type")
        return cls(_id_pair(profiling_id), meta, _build(wtype, wfields, tensors))  # type: ignore[call-arg]


@_message
@dataclass(frozen=True, slots=True)
class RunWithProfilingReq(_ProfilingWrapper):
    """Run ``wrapped`` with the profiler on; ``config`` is the profiler's."""

    TYPE: ClassVar[MessageType] = MessageType.RUN_WITH_PROFILING_REQ
    META: ClassVar[tuple[str, type]] = ("config", dict)
    profiling_id: list[int]
    config: dict[str, Any]
    wrapped: Message


@_message
@dataclass(frozen=True, slots=True)
class RunWithProfilingResp(_ProfilingWrapper):
    """The wrapped response with the profiled events."""

    TYPE: ClassVar[MessageType] = MessageType.RUN_WITH_PROFILING_RESP
    IS_RESPONSE: ClassVar[bool] = True
    META: ClassVar[tuple[str, type]] = ("events", list)
    profiling_id: list[int]
    events: list[Any]
    wrapped: Message


@_message
@dataclass(frozen=True, slots=True)
class RRefBackwardReq(Message):
    """Run backward from the scalar RRef ``rref_id`` on its owner."""

    TYPE: ClassVar[MessageType] = MessageType.RREF_BACKWARD_REQ
    rref_id: list[int]
    context_id: int
    retain_graph: bool


@_message
@dataclass(frozen=True, slots=True)
class RRefBackwardResp(Message):
    """The RRef backward finished."""

    TYPE: ClassVar[MessageType] = MessageType.RREF_BACKWARD_RESP
    IS_RESPONSE: ClassVar[bool] = True


@_message
@dataclass(frozen=True, slots=True)
class BackwardStartReq(Message):
    """Ours: a backward pass ``pass_id`` started in ``context_id``; answered
    (:class:`BackwardStartResp`) when the receiver's part of it is done;
    ``optimizer`` as in :class:`PropagateGradientsReq`."""

    TYPE: ClassVar[MessageType] = MessageType.BACKWARD_START_REQ
    context_id: int
    pass_id: int
    retain_graph: bool
    from_worker: int
    optimizer: IntList = field(default_factory=list)


@_message
@dataclass(frozen=True, slots=True)
class BackwardStartResp(Message):
    """Ours: the receiver's part of the pass is done."""

    TYPE: ClassVar[MessageType] = MessageType.BACKWARD_START_RESP
    IS_RESPONSE: ClassVar[bool] = True


@_message
@dataclass(frozen=True, slots=True)
class BackwardAbortReq(Message):
    """Ours: stop pass ``pass_id`` of ``context_id`` (an error elsewhere);
    answered with :class:`BackwardStartResp`."""

    TYPE: ClassVar[MessageType] = MessageType.BACKWARD_ABORT_REQ
    context_id: int
    pass_id: int
    reason: str


@_message
@dataclass(frozen=True, slots=True)
class ExceptionMsg(Message):
    """The request failed: the remote error as data."""

    TYPE: ClassVar[MessageType] = MessageType.EXCEPTION
    IS_RESPONSE: ClassVar[bool] = True
    worker: str
    type_name: str
    message: str
    traceback: str


@_message
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on a connection, both ways: who is speaking."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    name: str
    worker_id: int
    group: str


@_message
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Liveness probe; answered with a Heartbeat response."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT


@_message
@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """Ours: a notice, not answered (request id 0), sent on every connection
    just before a worker closes them: it shut down and will answer nothing
    more. ``clean``: after a graceful shutdown that completed (the group is
    quiescent); otherwise ``reason`` says why (its graceful shutdown timed out,
    say) and the receiver fails its calls to that worker with it."""

    TYPE: ClassVar[MessageType] = MessageType.GOODBYE
    IS_NOTICE: ClassVar[bool] = True
    reason: str
    clean: bool


# --------------------------------------------------------------------------- frames


def _packb(obj: Any) -> bytes:
    # A fresh packer per call: encode may run on any thread.
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def encode(
    message: Message, request_id: int = 0, device_map: Mapping[str, str] | None = None
) -> tuple[bytes, list[memoryview]]:
    """Encode a message as (header, buffers) for :func:`wire.encode_frame`.

    Args:
        message: the message.
        request_id: its request id (0 for none).
        device_map: ``{local_device: remote_device}`` the message travels by
            (see :mod:`~aiorpc_autograd.devices`); None: CPU tensors only.

    Raises:
        TypeError: a tensor or value cannot be encoded (a CUDA tensor with no
            entry in ``device_map`` included).
    """
    payload = message.payload()
    if payload is None or not payload.tensors:
        table: list[Any] = []
        buffers: list[memoryview] = []
    else:
        table, buffers = _encode_tensors(payload.tensors, device_map)
    header = _packb([int(message.TYPE), request_id, table, *message.to_fields()])
    return header, buffers


def decode(frame: Frame, max_tensors: int = 65536) -> tuple[int, Message]:
    """Decode a frame into (request_id, message). Tensors are built on the
    frame's buffers without a copy; at most ``max_tensors`` of them.

    Raises:
        ProtocolError: the frame is not a well-formed message.
    """
    try:
        header = _load_header(frame.header, len(frame.buffers), max_tensors)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed message header: {exc}") from exc
    if type(header) is not list or len(header) < 3:
        raise ProtocolError("message header is not [type, id, tensors, ...]")
    mtype, request_id, table = header[0], header[1], header[2]
    if type(request_id) is not int or request_id < 0:
        raise ProtocolError("bad request id")
    try:
        tensors = _decode_tensors(table, frame.buffers, max_tensors)
        return request_id, _build(mtype, header[3:], tensors)
    except ProtocolError:
        raise
    except (Exception, RecursionError) as exc:  # only ProtocolError leaves the decoder
        raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def header_budget(header_len: int, n_buffers: int, max_tensors: int) -> int:
    """Most arrays and maps a header of ``header_len`` bytes in a frame of
    ``n_buffers`` buffers may hold: a fixed allowance for the message's own
    structure, two per tensor descriptor, and one per 256 bytes of the header
    (bulk data travels as bin or str: a payload is one bin).

    Each array or map costs ~70 bytes of Python objects (and ~0.1-0.3 us) for
    one byte of msgpack: the budget keeps a header's decoded size and decoding
    time proportional to its bytes with a small factor, not ~70x.
    """
    return 256 + 2 * min(n_buffers, max_tensors) + header_len // 256


def _load_header(data: bytes, n_buffers: int, max_tensors: int) -> Any:
    size = len(data)
    budget = header_budget(size, n_buffers, max_tensors)
    count = 0

    def counted(obj: Any) -> Any:
        nonlocal count
        count += 1
        if count > budget:
            raise ProtocolError(
                f"message header of {size} bytes holds more than {budget} arrays and maps"
            )
        return obj

    # Every array or map takes at least a byte: a header no longer than the
    # budget cannot exceed it, so it is parsed without counting (~0.5 us a
    # message; most messages).
    hook = counted if size > budget else None
    # No single array or map is longer than the tensor table may be (nor than
    # the header has bytes); nesting is bounded by msgpack's own stack limit.
    max_len = min(size, max(max_tensors, 1024))
    # A large header builds many objects at once, each of which would count
    # towards the cyclic collector's thresholds: with a big heap (torch's)
    # that is a full collection every few thousand objects. None of them can
    # be in a cycle yet, so collecting meanwhile is wasted.
    pause_gc = size > 65536 and gc.isenabled()
    if pause_gc:
        gc.disable()
    try:
        return msgpack.unpackb(
            data,
            use_list=True,
            strict_map_key=False,
            list_hook=hook,
            object_hook=hook,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=max_len,
            max_map_len=max_len,
            max_ext_len=0,
        )
    finally:
        if pause_gc:
            gc.enable()


def _build(mtype: Any, values: Any, tensors: list[torch.Tensor | None]) -> Message:
    cls = _REGISTRY.get(mtype) if type(mtype) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype!r}")
    if type(values) is not list:
        raise ProtocolError(f"malformed {cls.__name__} fields")
    try:
        return cls.from_fields(values, tensors)
    except ProtocolError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"malformed {cls.__name__}: {exc}") from exc
