"""The typed errors of aiorpc_autograd.

Every error the library raises on purpose derives from :class:`RpcError`::

    RpcError
     ├── RpcTimeoutError      (also a built-in TimeoutError) a call, rendezvous or
     │                        shutdown took longer than its timeout
     ├── RemoteError          the callee raised; carries the worker's name, the
     │    │                   remote exception's type name, message and traceback
     │    └── <RemoteError+builtin>  when the remote type is a built-in exception,
     │                        the raised error is also an instance of it, so
     │                        ``except ValueError`` works across the wire
     ├── ConnectionLostError  (also a ConnectionError) a peer went away while
     │    │                   requests to it were in flight; ``worker`` names it
     │    └── <RemoteError+ConnectionLostError>  a remote part (a backward
     │                        pass's) failed because *its* peer was lost: both
     │                        a RemoteError and a ConnectionLostError, naming
     │                        the lost worker
     ├── ProtocolError        a malformed or oversized frame; the connection that
     │                        carried it is dropped, the agent keeps serving
     ├── AuthenticationError  a peer failed the shared-secret handshake
     ├── ResourceLimitError   a peer asked for more state than its per-peer
     │                        limit (``RpcOptions.max_peer_contexts``...)
     └── WorkerLeftError      (also a ValueError) the worker left the dynamic
                              group, or died and was removed from it

Remote failures travel as data (worker, type name, message, traceback text) and
are rebuilt on the caller by :func:`remote_error`.
"""

from __future__ import annotations

import builtins
import sys
import types
from typing import cast

__all__ = [
    "AuthenticationError",
    "ConnectionLostError",
    "InvalidArgumentError",
    "ProtocolError",
    "RemoteError",
    "ResourceLimitError",
    "RpcError",
    "RpcTimeoutError",
    "WorkerLeftError",
    "remote_error",
]


class RpcError(RuntimeError):
    """Base class of every error raised by aiorpc_autograd.

    Also a ``RuntimeError``, the type torch's RPC raises for its failures
    (timeouts, lost peers, shutdown), so ported ``except RuntimeError``
    clauses still catch them.
    """


class InvalidArgumentError(RpcError, ValueError):
    """An argument this library cannot act on: an unknown worker, a worker
    name that breaks torch's rule, roots ``backward`` cannot start from.

    A ``ValueError`` (what API.md names for these) and, being an
    :class:`RpcError`, a ``RuntimeError``: what torch's RPC raises for them,
    with torch's words in the message ("could not find destination", "Worker
    name must match", "is not a scalar"...), so ported checks hold.
    """


class RpcTimeoutError(RpcError, TimeoutError):
    """An operation did not complete within its timeout."""


class ConnectionLostError(RpcError, ConnectionError):
    """The connection to a peer was lost while requests to it were in flight.

    Attributes:
        worker: the name of the lost worker, when known (else None).
    """

    worker: str | None

    def __init__(self, message: str = "", *, worker: str | None = None) -> None:
        super().__init__(message)
        self.worker = worker

    def __reduce__(self) -> tuple[object, ...]:
        return (_connection_lost, (str(self), self.worker))


def _connection_lost(message: str, worker: str | None) -> ConnectionLostError:
    return ConnectionLostError(message, worker=worker)


class WorkerLeftError(RpcError, ValueError):
    """The worker left the (dynamic) group, or died and was removed from it.

    Also a ``ValueError``, as for any worker that is not in the group.
    """


class ResourceLimitError(RpcError):
    """A peer asked this worker to hold more state on its behalf than the
    per-peer limit allows (see ``RpcOptions.max_peer_contexts``)."""


class ProtocolError(RpcError):
    """A peer sent a malformed, oversized or otherwise invalid message."""


class AuthenticationError(RpcError):
    """A peer could not prove it holds the group's shared secret."""


class RemoteError(RpcError):
    """The remote callee raised an exception.

    Attributes:
        worker: name of the worker on which the exception was raised.
        type_name: qualified name of the remote exception's type.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: the remote traceback, formatted as text.
    """

    def __init__(
        self, worker: str, type_name: str, remote_message: str, remote_traceback: str = ""
    ) -> None:
        self.worker = worker
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        # Not super(): a mixed-in built-in (UnicodeDecodeError...) has its own
        # constructor signature.
        BaseException.__init__(self, worker, type_name, remote_message, remote_traceback)

    def __str__(self) -> str:
        text = f"{self.type_name} on worker {self.worker!r}: {self.remote_message}"
        if self.remote_traceback:
            text += f"\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return text

    def __reduce__(self) -> tuple[object, tuple[str, str, str, str]]:
        return (
            remote_error,
            (self.worker, self.type_name, self.remote_message, self.remote_traceback),
        )


class RemoteConnectionLostError(RemoteError, ConnectionLostError):  # type: ignore[misc]
    """A remote part failed because a peer was lost: ``worker`` (always set) names the lost
    worker; both ``except RemoteError`` and ``except ConnectionLostError`` work."""


_CONNECTION_LOST_NAMES = frozenset(
    {
        "ConnectionLostError",
        f"{__name__}.ConnectionLostError",
        "aiorpc_autograd.ConnectionLostError",
    }
)

_REMOTE_SUBCLASSES: dict[type[BaseException], type[RemoteError]] = {}

# Built-in exceptions whose constructors or semantics make them unsafe to mix in
# (StopIteration cannot be set on a future or raised out of a coroutine).
_NOT_MIXED = (
    BaseExceptionGroup,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
    StopIteration,
    StopAsyncIteration,
)


def _exception_type(type_name: str) -> type[Exception] | None:
    """The exception class ``type_name`` names, if this process has it: a
    built-in, or a class of a module already imported here (looked up in
    the modules' and classes' ``__dict__``s: nothing is imported, no module
    ``__getattr__`` runs). None for this package's own errors (a nested
    call's timeout is not the caller's) and the types :data:`_NOT_MIXED`."""
    if "." not in type_name or type_name.startswith("builtins."):
        candidate = vars(builtins).get(type_name.rpartition(".")[2])
    else:
        candidate = _loaded(type_name)
    try:  # (a user's metaclass may answer issubclass oddly: the error still goes)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, Exception)
            and not issubclass(candidate, _NOT_MIXED)
            and not str(candidate.__module__).startswith(_PACKAGE)
        ):
            return candidate
    except Exception:
        pass
    return None


_PACKAGE = __name__.partition(".")[0] + "."


def _loaded(type_name: str) -> object:
    """What ``module.Qual.Name`` names in a module already imported, or None."""
    parts = type_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if not isinstance(module, types.ModuleType):  # (anything may sit in sys.modules)
            continue
        value: object = vars(module).get(parts[cut])
        for part in parts[cut + 1 :]:  # a nested class: through classes only
            if not isinstance(value, type):
                return None
            value = vars(value).get(part)
        return value
    return None


def remote_error(
    worker: str, type_name: str, message: str, traceback_text: str = ""
) -> RemoteError:
    """Build the error raised on the caller for an exception raised remotely.

    Args:
        worker: the worker on which the exception was raised.
        type_name: the remote exception type's name (``ValueError`` or
            ``module.Class``).
        message: ``str()`` of the remote exception.
        traceback_text: the remote traceback as text.

    Returns:
        A :class:`RemoteError`; for an exception type this process has (a
        built-in, or a class of a module imported here), an instance of a
        subclass of both :class:`RemoteError` and that type (made without
        calling the type's constructor).
    """
    if type_name in _CONNECTION_LOST_NAMES:
        return RemoteConnectionLostError(worker, type_name, message, traceback_text)
    base = _exception_type(type_name)
    cls: type[RemoteError] = RemoteError
    if base is not None:
        cls = _REMOTE_SUBCLASSES.get(base) or RemoteError
        if base not in _REMOTE_SUBCLASSES:
            try:
                cls = cast(
                    type[RemoteError], type(f"Remote{base.__name__}", (RemoteError, base), {})
                )
                cls("", "", "")  # probe: some built-ins refuse to be mixed in
            except Exception:  # layout or constructor conflict: no mix-in
                cls = RemoteError
            _REMOTE_SUBCLASSES[base] = cls
    return cls(worker, type_name, message, traceback_text)
