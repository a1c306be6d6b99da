"""Configuration and small identity types (no project imports)."""

from __future__ import annotations

import os
import re
import ssl as _ssl
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from .errors import InvalidArgumentError

__all__ = [
    "DEFAULT_RPC_TIMEOUT",
    "RpcOptions",
    "WorkerInfo",
    "check_worker_name",
]

DEFAULT_RPC_TIMEOUT = 60.0

# The types a scalar option's annotation admits (an int is a fine float; a
# bool is not a number here, though Python makes it an int).
_ADMITS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "None": (type(None),),
}


# torch's rule for worker names (its WorkerInfo's): ASCII letters, digits,
# '-', '_' and ':', 1 to 127 of them.
_WORKER_NAME = re.compile(r"[A-Za-z0-9_:-]{1,127}")


def check_worker_name(name: object) -> str:
    """``name`` if it is a valid worker name.

    Raises:
        InvalidArgumentError: not a string of 1 to 127 ASCII letters, digits,
            ``-``, ``_`` or ``:`` (torch's rule).
    """
    if not (isinstance(name, str) and _WORKER_NAME.fullmatch(name)):
        raise InvalidArgumentError(
            "Worker name must match ^[A-Za-z0-9-_:]*$, and must be non-empty and "
            f"shorter than 128 chars, but got {name!r}"
        )
    return name


class _WorkerInfo(NamedTuple):
    name: str
    id: int


class WorkerInfo(_WorkerInfo):
    """A worker of the group: its unique name and its id (equal to its rank).

    Frozen and hashable. ``WorkerInfo(name, id)`` checks the name as torch's
    does.

    Raises:
        InvalidArgumentError: (construction) see :func:`check_worker_name`.
    """

    __slots__ = ()

    def __new__(cls, name: str, id: int) -> WorkerInfo:
        return super().__new__(cls, check_worker_name(name), id)

    def __repr__(self) -> str:
        return f"WorkerInfo(id={self.id}, name={self.name})"  # torch's words


@dataclass(frozen=True)
class RpcOptions:
    """Options of an RPC agent. Validated on construction.

    Attributes:
        rpc_timeout: default timeout of a call in seconds; 0 means no timeout.
        num_worker_threads: size of the thread pool that runs plain (non-async)
            remote functions.
        device_maps: ``{peer_name: {local_device: remote_device}}``: how CUDA
            tensors sent to ``peer_name`` are placed there (``"cuda:N"``, an
            int or a ``torch.device`` on either side; one-to-one; responses
            come back by the inverse map). A CUDA tensor with no entry is
            refused, never copied to the CPU silently. Checked by both ends
            at ``init_rpc``; see :mod:`aiorpc_autograd.devices`.
        auth_token: shared secret; peers that cannot prove they hold it are
            refused, the rendezvous records are authenticated and bound to the
            run, and every frame's prefix, lengths and header (every pickle and
            control field) is authenticated with a per-connection session key.
            Tensor bytes on the network are not: TLS (``ssl``) protects them.
            Defaults to the ``AIORPC_AUTH_TOKEN`` environment variable.
        ssl: an ``ssl.SSLContext`` for TCP links (the listening side's, and the
            connecting side's too unless ``ssl_client`` is set), or None. With
            TLS on, workers on one host also talk over TLS/TCP, not Unix sockets.
        ssl_client: the ``ssl.SSLContext`` for connections this worker opens.
        max_message_size: largest frame (header and tensor data) accepted, in bytes.
        max_header_size: largest msgpack header accepted, in bytes.
        max_tensors: most tensors accepted in one message.
        heartbeat_interval: a connection silent this many seconds gets a
            liveness probe, if it has calls in flight or leads to a peer this
            worker holds state for (autograd contexts, RRefs), and every peer
            is probed while a graceful shutdown waits; 0 disables probes.
        heartbeat_timeout: a probed peer silent this long (counted from the
            last frame received from it) is considered dead: its connection is
            dropped, the calls in flight to it fail with ``ConnectionLostError``
            and the peer is declared gone. A peer whose connection was lost is
            declared gone when it refuses a new connection, or when none could
            be opened within this many seconds.
        max_pending_reply_bytes: per-connection flow control: while more than
            this many bytes of replies wait to be written to a connection (its
            peer reads slowly or not at all), no new request is read from it.
        max_concurrent_requests: most requests from one connection served at
            once; further ones wait unread. With ``max_pending_reply_bytes``
            this bounds what a peer that does not read can pin: about
            ``max_pending_reply_bytes`` plus the replies of
            ``max_concurrent_requests`` requests.
        max_peer_contexts: most distributed autograd contexts one peer may
            create on this worker; a request over it fails with
            ``ResourceLimitError``.
        listen_host: address the TCP listener binds to.
        use_unix_sockets: connect to workers on the same host over Unix sockets.
        shm_threshold: between workers on one host (Unix sockets), tensor
            buffers of at least this many bytes travel through shared memory
            instead of the socket; 0 disables it.
        allow_pickle: if False (safe mode), only registered functions can be
            called and only msgpack values and tensors travel.
        rendezvous_timeout: seconds to wait for the whole group in ``init_rpc``.
        handshake_timeout: seconds an accepted connection has, from accept, to
            finish the auth handshake (with a token) or send a valid Hello
            (without one); then it is closed.
        max_unauthenticated_connections: most accepted connections at once
            that have not done so yet; one more is closed at once.
        max_pending_fetches_per_peer: most ``to_here`` fetches (and RRef
            backward requests) from one peer that may wait here for a value not
            created yet; more fail at once with ``RpcError``.
        max_owner_rrefs_per_peer: most values this worker owns on behalf of one
            peer (created by its ``remote()`` calls, or referred to before
            their creation arrived); more fail with ``RpcError``.
        busy_poll: seconds the event loop keeps polling its sockets after
            each message sent or received, instead of sleeping until the next
            one (yielding the core to other runnable threads meanwhile); an
            answer within the window costs no thread wake-up. Spends up to that
            much CPU per burst of messages; an idle worker, and one whose thread
            pool is computing, spends none. 0: off.
        busy_poll_pinned: the window used instead of ``busy_poll`` when a
            polling loop takes no CPU from compute (checked when the agent
            starts; unless ``busy_poll`` is 0): this process may run on one
            CPU only, where the loop competes only with its own threads (it
            pauses while its pool computes, and yields the core to any other
            runnable thread); or the group's workers would fit the CPUs it
            may use, even all on this host, each with torch's intra-op
            threads busy (world size x ``torch.get_num_threads()`` <= CPUs:
            one worker per CPU with ``torch.set_num_threads(1)``, say). The
            loop then stays hot across a whole training step; otherwise it
            would take a CPU from torch's intra-op threads.
        busy_poll_max: where the group's workers fit the CPUs this process
            may use (world size <= CPUs) but their intra-op threads may not,
            the window adapts between ``busy_poll`` and this: it grows to
            cover a gap between messages that it missed by less than this, and
            halves after a gap longer than this (a wasted spin). A step whose
            peer answers within it is then polled through, if a CPU is free
            for the poll (see ``busy_poll_crowded``).
        busy_poll_crowded: the most an adapting window spins after a message
            while every CPU of the machine is wanted (Linux's count of
            runnable threads, sampled every 50 µs, above its CPUs; always,
            where that count cannot be read): a peer computing on every CPU
            (torch's intra-op threads) gets them back after this, however
            long the window, while a peer computing beside an idle CPU is
            polled through the window.
        malloc_mmap_threshold: if set, ``init_rpc`` fixes glibc's mmap
            threshold (``mallopt(M_MMAP_THRESHOLD)``, process-wide) at this
            many bytes: blocks this large are mapped and unmapped on their own
            instead of being carved from, and kept in, the heaps once glibc's
            dynamic threshold has risen, so a training loop's RSS stays flat,
            at the price of fresh pages (page faults) for every such block.
            0 (default): leave the C library's settings alone.
    """

    rpc_timeout: float = DEFAULT_RPC_TIMEOUT
    num_worker_threads: int = 16
    device_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    auth_token: str | None = field(default_factory=lambda: os.environ.get("AIORPC_AUTH_TOKEN"))
    ssl: _ssl.SSLContext | None = None
    ssl_client: _ssl.SSLContext | None = None
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    max_pending_reply_bytes: int = 16 << 20
    max_concurrent_requests: int = 128
    max_peer_contexts: int = 10_000
    max_message_size: int = 4 << 30
    max_header_size: int = 64 << 20
    max_tensors: int = 65536
    listen_host: str = "127.0.0.1"
    use_unix_sockets: bool = True
    shm_threshold: int = 512 << 10
    allow_pickle: bool = True
    rendezvous_timeout: float = 300.0
    handshake_timeout: float = 5.0
    max_unauthenticated_connections: int = 64
    max_pending_fetches_per_peer: int = 10_000
    max_owner_rrefs_per_peer: int = 100_000
    busy_poll: float = 0.0002
    busy_poll_pinned: float = 0.002
    busy_poll_max: float = 0.008
    busy_poll_crowded: float = 0.002
    malloc_mmap_threshold: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if not self.rpc_timeout >= 0:  # also refuses NaN
            raise ValueError(f"rpc_timeout must be >= 0, got {self.rpc_timeout}")
        if self.num_worker_threads < 1:
            raise ValueError(f"num_worker_threads must be >= 1, got {self.num_worker_threads}")
        for name in (
            "max_message_size",
            "max_header_size",
            "max_tensors",
            "max_pending_reply_bytes",
            "max_concurrent_requests",
            "max_peer_contexts",
            "max_pending_fetches_per_peer",
            "max_owner_rrefs_per_peer",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.shm_threshold < 0:
            raise ValueError(f"shm_threshold must be >= 0, got {self.shm_threshold}")
        if not self.rendezvous_timeout > 0:
            raise ValueError("rendezvous_timeout must be positive")
        if not self.handshake_timeout > 0:  # also refuses NaN
            raise ValueError(f"handshake_timeout must be positive, got {self.handshake_timeout}")
        if self.max_unauthenticated_connections < 1:
            raise ValueError(
                "max_unauthenticated_connections must be >= 1, got "
                f"{self.max_unauthenticated_connections}"
            )
        for name in ("ssl", "ssl_client"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, _ssl.SSLContext):
                raise TypeError(f"{name} must be an ssl.SSLContext or None")
        if self.malloc_mmap_threshold < 0:
            raise ValueError(
                f"malloc_mmap_threshold must be >= 0, got {self.malloc_mmap_threshold}"
            )
        for name in ("busy_poll", "busy_poll_pinned", "busy_poll_max", "busy_poll_crowded"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.heartbeat_interval >= 0 and self.heartbeat_timeout > 0):
            raise ValueError("heartbeat_interval must be >= 0 and heartbeat_timeout > 0")
        if not isinstance(self.device_maps, dict) or not all(
            isinstance(peer, str) and isinstance(m, dict) for peer, m in self.device_maps.items()
        ):
            raise TypeError("device_maps must be a dict {peer_name: {local_device: remote_device}}")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("auth_token must be a non-empty string or None")

    def _check_types(self) -> None:
        """Each scalar option has a value of its annotated type.

        Raises:
            TypeError: naming the option (``rpc_timeout=timedelta(...)``,
                ``num_worker_threads=2.0``, ``max_tensors=True``...).
        """
        for f in fields(self):
            kinds = str(f.type).split(" | ")
            if not all(kind in _ADMITS for kind in kinds):
                continue  # device maps, SSL contexts: checked where used
            value = getattr(self, f.name)
            admitted = tuple(t for kind in kinds for t in _ADMITS[kind])
            if not isinstance(value, admitted) or (
                isinstance(value, bool) and bool not in admitted
            ):
                raise TypeError(
                    f"{f.name} must be {' or '.join(kinds)}, got {type(value).__name__} {value!r}"
                )
