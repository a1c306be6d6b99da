"""The RPC agent: peers, request ids to futures, timeouts, dispatch, executor.

Theory of operation
-------------------
One :class:`RpcAgent` per process runs on one event loop. It listens on TCP
and (for workers on the same host) a Unix socket, and opens one outgoing
connection per peer lazily, on the first request, reusing it afterwards.
Connections are symmetric: the first frame each way is a ``Hello`` naming the
worker; after that either side may send requests, and a response goes back on
the connection its request came in on.

Invariants:

* every request this worker sent and that is not answered yet is in
  ``_pending`` (request id -> :class:`_Pending`); it leaves exactly once:
  answered, timed out, its connection lost, or the agent shut down;
* ``_inflight`` counts requests this worker is serving and has not answered;
* a frame that does not decode (:class:`ProtocolError`) drops its connection
  only; an error raised while *serving* a request goes back as an
  ``ExceptionMsg`` and never touches the connection;
* requests go out only on connections this worker opened, so requests arrive
  only on connections it accepted and responses only on ones it opened; a
  response is accepted only on the connection its request went out on (a
  response for an id not pending there drops that connection: a forgery);
* flow control: a connection that answers requests stops reading while its
  replies are not read (``max_pending_reply_bytes``) or while
  ``max_concurrent_requests`` of its requests are being served;
* ``_activity`` counts the requests sent and received and the notices sent
  (liveness probes excepted; what a notice's handler sends on counts there):
  a graceful shutdown ends only after a round in which no worker's count
  moved and none had anything outstanding (see :meth:`RpcAgent.shutdown`);
* a worker never closes its connections without a ``Goodbye`` on each first,
  which tells the peer why, so its calls fail with that reason.

Liveness
--------
A peer is *declared gone* once, after which ``peer_gone_hooks`` run (the
layers drop what they hold for it): when a heartbeat probe to it went
unanswered for ``heartbeat_timeout`` (silence counted from the last frame it
sent), when it refused a new connection (nobody listens at its address any
more), or when its connection was lost and no new one could be opened within
``heartbeat_timeout``. Probes go to peers with calls pending and to the peers
the layers hold state for (``liveness_watchers``); a silent connection gets one
probe after ``min(heartbeat_interval, heartbeat_timeout / 2)``, so the idle
cost is one small frame per interval per watched peer.

Plain functions run in a thread pool so the loop keeps serving; ``async def``
functions are awaited on the loop. Handlers for further message kinds (RRefs,
distributed autograd) are registered in ``handlers`` by their layers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import ctypes
import functools
import hmac
import inspect
import itertools
import logging
import math
import os
import secrets
import socket
import ssl
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.autograd.profiler as torch_profiler

from . import codec
from .codec import (
    ExceptionMsg,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Payload,
    PythonCall,
    PythonRet,
    RRefAck,
)
from .devices import DeviceMap, DeviceMaps, cuda_device_count, normalize_map, validate_group
from .errors import (
    AuthenticationError,
    ConnectionLostError,
    InvalidArgumentError,
    ProtocolError,
    RemoteError,
    RpcError,
    RpcTimeoutError,
    WorkerLeftError,
    remote_error,
)
from .handshake import confirm_mac, record_mac, run_id, run_key
from .membership import Membership
from .options import RpcOptions, WorkerInfo, check_worker_name
from .pool import StopError, WorkerPool, raisable
from .rendezvous import Address, Rendezvous
from .transport import (
    BusyPoll,
    Connection,
    PreAuthGate,
    connect,
    retrieve_error,
    serve_tcp,
    serve_unix,
)
from .wire import Frame, Limits

if TYPE_CHECKING:
    from .tracing import CallSpan, Tracer

__all__ = ["RpcAgent", "registered_functions", "register_function"]

log = logging.getLogger(__name__)

# What a call made before init_rpc (or after shutdown) raises, in torch's
# words (its tests match "^RPC has not been initialized").
NOT_INITIALIZED = "RPC has not been initialized. Call `await rpc.init_rpc(...)` first"
# torch's words where an RRef needs the agent (its RRef context's)
NO_AGENT_FOR_RREF = (
    "Current RPC agent is not set! Did you initialize the RPC framework "
    "(e.g. by calling `rpc.init_rpc`)?"
)
T = TypeVar("T")

ResponseDecoder = Callable[[Message], Any]
# A request handler returns the response, or an awaitable of it; raising (or the
# awaitable failing) answers with the error.
Handler = Callable[[Message], "Message | Awaitable[Message]"]
NoticeHandler = Callable[[Connection, Message], None]
RequestWrapper = Callable[[WorkerInfo, Message], Message]
# (action, delay) for an outgoing message, or None: see aiorpc_autograd.testing.
FaultHook = Callable[[Message], "tuple[str, float] | None"]
ResponseUnwrapper = Callable[[int, Message], Message]

# Ids of timed-out requests remembered per connection (their late answers are
# not forgeries); past this, the oldest are forgotten.
_MAX_ABANDONED = 100_000
# The most characters of a served call's error (repr and traceback) logged.
_MAX_LOGGED_ERROR = 8192

# Functions callable by name (rpc.register); process-wide like Python imports.
_REGISTERED: dict[str, Callable[..., Any]] = {}

# The connection whose request is being served (set while its handler runs, and
# inherited by the Task serving it): lets a layer charge state to the peer.
serving_connection: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "aiorpc_serving_connection", default=None
)

# While a payload is encoded: the worker it goes to (an RRef forked into it is
# held there), and whether it goes as a request, on this worker's own
# connection to it, ahead of every later request to it (a user RRef sent so to
# its owner is no fork in flight: the user's delete can only come after it).
# Unset where the sender does not know the worker for sure.
sending_to: contextvars.ContextVar[tuple[int, bool] | None] = contextvars.ContextVar(
    "aiorpc_sending_to", default=None
)
# While a call's arguments are decoded: futures the call must wait for before
# its function starts (an owner RRef whose value is still being created).
_call_waits: contextvars.ContextVar[list[asyncio.Future[Any]] | None] = contextvars.ContextVar(
    "aiorpc_call_waits", default=None
)


def fresh_error(exc: BaseException) -> BaseException:
    """A copy of ``exc`` to raise again: raising a stored exception (a shared
    future's) would grow its traceback with the frames it passes, keeping
    their locals (RRefs, tensors) alive as long as the future."""
    try:
        new = copy.copy(exc)
    except Exception:  # not copyable: raise the original
        return exc
    if type(new) is not type(exc):
        return exc
    new.__cause__, new.__context__ = exc.__cause__, exc.__context__
    new.__suppress_context__ = exc.__suppress_context__
    return new.with_traceback(exc.__traceback__)


async def outcome(fut: asyncio.Future[T]) -> T:
    """``await fut`` for a future others await too: its error is raised as a
    :func:`fresh_error`; cancelling this wait leaves ``fut`` alone."""
    if not fut.done():
        await asyncio.wait({fut})
    if fut.cancelled():
        raise RpcError("cancelled")
    exc = fut.exception()
    if exc is not None:
        raise fresh_error(exc)
    return fut.result()


def wait_before_call(fut: asyncio.Future[Any]) -> bool:
    """While a call's arguments are being decoded: make the call wait for
    ``fut`` before its function starts (and fail with ``fut``'s error).

    Returns:
        False when no call is being decoded here (the caller must wait itself).
    """
    waits = _call_waits.get()
    if waits is None:
        return False
    waits.append(fut)
    return True


def register_function(name: str, func: Callable[..., Any]) -> None:
    """Make ``func`` callable as ``name``.

    Raises:
        ValueError: another function is registered under ``name``.
    """
    current = _REGISTERED.get(name)
    if current is not None and current is not func:
        raise ValueError(f"a different function is already registered as {name!r}")
    _REGISTERED[name] = func


def registered_functions() -> dict[str, Callable[..., Any]]:
    """The registry of functions callable by name."""
    return _REGISTERED


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.set_exception(RpcError("cancelled"))
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


def _host_id() -> str:
    """Identifies 'same host and network namespace' (where Unix sockets reach)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return f"{socket.gethostname()}:{uuid.getnode()}"
    return f"{socket.gethostname()}:{boot}:{netns}"


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def exception_message(worker: str, exc: BaseException) -> ExceptionMsg:
    """The wire form of an exception raised while serving a request."""
    if isinstance(exc, RemoteError):  # a nested call failed: keep the origin
        return ExceptionMsg(exc.worker, exc.type_name, exc.remote_message, exc.remote_traceback)
    if isinstance(exc, StopError) and exc.__cause__ is not None:
        exc = exc.__cause__  # report the StopIteration it carries
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    # Where it was raised, as torch prints it (its test_py_raise_in_user_func);
    # bounded: a peer chooses the arguments an error message may quote.
    log.warning("On worker %r:\n%.*s", worker, _MAX_LOGGED_ERROR, f"{exc!r}\n{tb}")
    if isinstance(exc, ConnectionLostError) and exc.worker:
        # Serving failed because *another* worker was lost: name that one, so
        # the caller's error is a ConnectionLostError naming the lost worker.
        return ExceptionMsg(exc.worker, _type_name(ConnectionLostError(exc.worker)), str(exc), tb)
    return ExceptionMsg(worker, _type_name(exc), str(exc), tb)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    peer: int
    decode: ResponseDecoder
    timer: asyncio.TimerHandle | None = None
    conn: Connection | None = None  # the connection it went out on (None: queued)
    span: CallSpan | None = None  # profiling (aiorpc_autograd.tracing)


@dataclass(slots=True)
class _Peer:
    info: WorkerInfo
    address: Address
    conn: Connection | None = None
    # Frames waiting for the connection: (header, buffers, request id; 0: a notice).
    queue: list[tuple[bytes, list[memoryview], int]] = field(default_factory=list)
    connecting: asyncio.Task[BaseException | None] | None = None
    # Set once the peer said Goodbye: what its calls fail with from then on.
    gone: RpcError | None = None
    left_cleanly: bool = False


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` (``mallopt``), which also turns
    off its dynamic adjustment; False where the C library is not glibc.

    glibc serves allocations of at least the threshold with their own
    mappings (returned to the OS on free), but raises the threshold to the
    size of every such block freed (up to 32 MiB): from then on a training
    step's tensors and message buffers (128 KiB-1 MiB in the bench's step) come
    from the heaps of whichever threads allocate them, and freed space there is
    kept. Measured on the bench's worker: +5.6 MiB over 5000 steps with the
    dynamic threshold (+0.1 MiB after ``malloc_trim``); fixed at 128 KiB the
    RSS stays flat but the step took 30% longer (17% at 1 MiB), each block's
    pages faulted in afresh: hence opt-in (``RpcOptions``).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


# How early a loop timer may fire against time.monotonic() (uvloop's clock
# counts milliseconds).
_TIMER_SLACK = 0.002
# How often a thread blocked on the loop checks that the loop has not closed.
_LOOP_CHECK_INTERVAL = 0.5


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity now; without affinity
    on this platform, the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def on_one_cpu() -> bool:
    """Whether this process may run on one CPU only: its threads then take
    turns on that CPU instead of running side by side."""
    return usable_cpus() == 1


def torch_threads_on_one_cpu() -> int:
    """torch's intra-op threads if there are several and this process may run
    on one CPU only (confined after torch sized its pool), else 0: they then
    wait for each other on that CPU, and ops take many times longer."""
    threads = torch.get_num_threads()
    return threads if threads > 1 and on_one_cpu() else 0


def adopt_torch_threads() -> None:
    """Give the calling thread the process's count of torch intra-op threads
    (``torch.set_num_threads``), as torch's own threads take it when they
    start: the count is a per-thread OpenMP setting, and a thread started by
    Python keeps the library's default (the CPUs at import) until an op that
    reads torch's count runs on it. A matrix product does not: after
    ``torch.set_num_threads(1)`` (or pinning after ``import torch``), a pool
    thread ran it on the default team of 2 threads, which on one CPU wait for
    each other (1000 64x64 products: 15 s instead of 6 ms). Reading the count
    on the thread (``torch.get_num_threads()``) applies it there."""
    torch.get_num_threads()


def spinning_takes_no_cpu(world_size: int | None) -> bool:
    """Whether this process's loop may poll without taking a CPU from compute:
    the process may run on one CPU only (its threads take turns there), or the
    group's workers, each computing on torch's intra-op threads, would fit the
    CPUs it may use even if all of them ran on this host (one worker per CPU
    with ``torch.set_num_threads(1)``, say, as torchrun's ``OMP_NUM_THREADS=1``
    sets up). A dynamic group (``world_size`` None) may grow: no."""
    cpus = usable_cpus()
    if cpus == 1:
        return True
    return world_size is not None and world_size * torch.get_num_threads() <= cpus


def _busy_poll_windows(options: RpcOptions, world_size: int | None) -> tuple[float, float, float]:
    """The busy-poll window to start with, the longest it may grow to and the
    most a spin may take while every CPU is wanted (see
    :class:`~aiorpc_autograd.transport.BusyPoll`): ``busy_poll_pinned`` fixed
    where polling takes no CPU from compute (:func:`spinning_takes_no_cpu`);
    ``busy_poll`` adapting up to ``busy_poll_max``, giving way to the load
    after ``busy_poll_crowded``, where the group's workers fit the CPUs but
    their intra-op threads may not; else ``busy_poll`` fixed. ``busy_poll``
    0: off."""
    if options.busy_poll == 0:
        return 0.0, 0.0, math.inf
    if spinning_takes_no_cpu(world_size):
        return options.busy_poll_pinned, options.busy_poll_pinned, math.inf
    if world_size is not None and world_size <= usable_cpus():
        longest = max(options.busy_poll, options.busy_poll_max)
        return options.busy_poll, longest, options.busy_poll_crowded
    return options.busy_poll, options.busy_poll, math.inf


class RpcAgent:
    """This process's agent. Create with :meth:`start`.

    Attributes:
        info: this worker.
        options: the options it runs with.
        handlers: request handlers by message class.
    """

    def __init__(self, name: str, options: RpcOptions, rdv: Rendezvous) -> None:
        # peer_gone_hooks: called once (on the loop) when a peer is declared
        #   gone, with the error saying why; see "Liveness" in the module doc.
        # liveness_watchers: each returns the ids of the peers a layer holds
        #   state for; those are probed (and connected to) like peers with
        #   calls pending, so that their loss is noticed.
        self.info = WorkerInfo(name, rdv.rank)
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.world_size = rdv.world_size
        self._rdv = rdv
        self._limits = Limits(
            options.max_message_size, options.max_header_size, options.max_tensors
        )
        self._group = ""
        self._peers: dict[int, _Peer] = {}
        self._by_name: dict[str, WorkerInfo] = {}
        # Dynamic groups: the membership service, this worker's own record,
        # and the workers that left (name or rank -> why).
        self.membership: Membership | None = None
        self._me: Address | None = None
        self._departed: dict[str | int, str] = {}
        self._peer_maps: dict[str, DeviceMap] = {}
        # The maps CUDA tensors travel by (set at rendezvous; see devices.py).
        self._own_maps = {peer: normalize_map(m, peer) for peer, m in options.device_maps.items()}
        self.device_maps = DeviceMaps({}, {})
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._incoming: set[Connection] = set()
        # Accepted connections that have not said a valid Hello yet: bounded.
        self._gate = PreAuthGate(options.max_unauthenticated_connections, options.handshake_timeout)
        # With a token: the key of this run's handshakes (None until the group
        # agreed on the run; connections accepted before are refused).
        self._run_key: bytes | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._pool = WorkerPool(
            self.loop,
            options.num_worker_threads,
            f"aiorpc-{name}",
            thread_init=adopt_torch_threads,
        )
        # Confined to one CPU when the agent starts (workers pinned one per
        # core): the loop and the pool take turns on it.
        self.pinned = on_one_cpu()
        adopt_torch_threads()  # the loop's thread runs ops too (the facade's is not the main one)
        threads = torch_threads_on_one_cpu()
        if threads:
            log.warning(
                "this process may run on one CPU only, but torch runs ops on %d intra-op "
                "threads, which then wait for each other there (a matmul can take 10-40x "
                "longer): call torch.set_num_threads(1), or confine the process before it "
                "starts (taskset, or os.sched_setaffinity before torch is imported)",
                threads,
            )
        # Keeps the loop polling for a moment after each message (see BusyPoll).
        window, max_window, max_crowded = _busy_poll_windows(options, rdv.world_size)
        self._busy_poll = BusyPoll(
            self.loop, window, lambda: self._pool.busy, max_window, max_crowded
        )
        self._inflight = 0
        self._activity = 0
        self._probes: set[int] = set()  # request ids of shutdown liveness probes
        self._running = False
        # Frames from peers that finished the rendezvous before we did: replayed
        # once every worker is known.
        self._early: list[tuple[Connection, Frame]] | None = []
        self.handlers: dict[type[Message], Handler] = {
            PythonCall: self._run_call,
            Heartbeat: lambda m: RRefAck(),
        }
        # Notices (request id 0, never answered): handled at once, on the loop.
        self.notice_handlers: dict[type[Message], NoticeHandler] = {Goodbye: self._on_goodbye}
        # Tests: decides per outgoing message whether to drop, delay, fail it
        # or drop its connection (aiorpc_autograd.testing).
        self.fault_injector: FaultHook | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        # Hooks of the distributed-autograd layer: wrap outgoing requests, unwrap
        # responses by type (the int is the peer's worker id).
        self.request_wrapper: RequestWrapper | None = None
        self.response_unwrappers: dict[type[Message], ResponseUnwrapper] = {}
        self.debug_counters: dict[str, Callable[[], int]] = {}
        # Profiling (aiorpc_autograd.tracing): the tracer while this worker
        # records spans or serves a profiled request, else None: the one check
        # the hot paths make when profiling is off.
        self.tracer: Tracer | None = None
        # Services installed on this agent by the layers above (autograd, rrefs),
        # what they need to be idle before shutdown, and what to do once every
        # worker has called a graceful shutdown (this one's, in a dynamic group).
        self.extensions: dict[str, Any] = {}
        self.idle_checks: list[Callable[[], bool]] = []
        self.before_shutdown: list[Callable[[], None]] = []
        self.peer_gone_hooks: list[Callable[[WorkerInfo, RpcError], None]] = []
        self.liveness_watchers: list[Callable[[], Iterable[int]]] = []
        # A dynamic group's rank that was declared gone joined again (a new
        # incarnation): the layers forget what they recorded of its death.
        self.peer_back_hooks: list[Callable[[WorkerInfo], None]] = []
        # Peers whose last connection failed TLS or token authentication: alive
        # (they answered), so their silence is not taken for death.
        self._unverified: set[int] = set()
        self._gone: dict[int, RpcError] = {}
        self._leaving = False  # in a graceful shutdown
        self._suspects: dict[int, asyncio.Task[None]] = {}
        # Per connection we opened: ids of requests sent on it that timed out,
        # whose late answers are dropped silently (oldest first, capped).
        self._abandoned: dict[Connection, dict[int, None]] = {}
        # when_lost(conn): futures resolved when that connection goes.
        self._lost_waiters: dict[Connection, asyncio.Future[None]] = {}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def start(
        cls,
        name: str,
        rank: int | None,
        world_size: int | None,
        init_method: str,
        options: RpcOptions,
        services: Sequence[Callable[[RpcAgent], object]] = (),
    ) -> RpcAgent:
        """Listen, rendezvous with the group and return the running agent.

        ``services`` install their handlers on the agent before it listens.

        Raises:
            ValueError: bad arguments (an ``InvalidArgumentError`` for a name
                that breaks torch's rule), or a worker name used twice in the group.
            RpcTimeoutError: the group did not assemble in time.
        """
        check_worker_name(name)
        for peer, mapping in options.device_maps.items():
            normalize_map(mapping, peer)  # a malformed map fails before the rendezvous
        rdv = await Rendezvous.join(init_method, rank, world_size, options.rendezvous_timeout)
        if options.malloc_mmap_threshold:
            fix_mmap_threshold(options.malloc_mmap_threshold)
        self = cls(name, options, rdv)
        for install in services:
            install(self)
        try:
            await self._listen_and_exchange()
        except BaseException:
            self._running = False
            # Every worker sees the same bad group (a duplicate name, a wrong
            # token): let the store's host keep it until the others read it too.
            await self._rdv.leave(min(options.rendezvous_timeout, 10.0))
            await self._close(RpcError("initialisation failed"))
            raise
        self._running = True
        if options.heartbeat_interval > 0:
            self._heartbeat = self.loop.create_task(self._heartbeat_loop())
        return self

    @property
    def _use_unix(self) -> bool:
        # With TLS on, every link is TLS over TCP, also on one host.
        opts = self.options
        return opts.use_unix_sockets and opts.ssl is None and hasattr(socket, "AF_UNIX")

    @property
    def _shm_threshold(self) -> int:
        return self.options.shm_threshold if self._use_unix else 0

    @property
    def _client_ssl(self) -> ssl.SSLContext | None:
        return self.options.ssl_client or self.options.ssl

    async def _listen_and_exchange(self) -> None:
        opts = self.options
        if (
            opts.allow_pickle
            and not opts.auth_token
            and opts.listen_host not in ("127.0.0.1", "::1", "localhost")
        ):
            log.warning(
                "worker %r listens on %s with pickle allowed and no auth_token: any peer "
                "that reaches this port can run code here; set auth_token (or "
                "AIORPC_AUTH_TOKEN), ssl, or allow_pickle=False",
                self.info.name,
                opts.listen_host,
            )
        server, port = await serve_tcp(self._accept, opts.listen_host, 0, ssl=opts.ssl)
        self._servers.append(server)
        unix_path = ""
        if self._use_unix:
            unix_path = f"\0aiorpc-{uuid.uuid4().hex}"
            self._servers.append(await serve_unix(self._accept, unix_path))
        host = opts.listen_host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        group = self._rdv.prefix
        token = opts.auth_token
        me = Address(
            self.info.name,
            self.info.id,
            host,
            port,
            unix_path,
            _host_id(),
            cuda_device_count(),
            self._own_maps,
        )
        if token:
            me = me.signed(secrets.token_bytes(32), lambda body: record_mac(token, group, body))
        self._me = me
        self._group = group
        if self._rdv.world_size is None:
            # A dynamic group: no run to bind records to (members come and go);
            # each record's MAC is checked as it is read (_add_address), and the
            # handshake is keyed by the token and the group.
            if token:
                self._run_key = run_key(token, run_id(group, []))
            self.membership = Membership(self, self._rdv)
            deadline = time.monotonic() + opts.rendezvous_timeout
            addresses = await self.membership.join(me, deadline)
        else:
            records = await self._rdv.exchange_records(me)
            # Our own record as we wrote it, whatever the store returns for it.
            records[self.info.id] = me.pack()
            if token:
                addresses = await self._authenticate_group(token, group, records)
            else:
                addresses = [Address.unpack(record) for record in records]
        # Both ends of every map check it on the same records: both raise.
        validate_group(self.info.name, [(a.name, a.cuda_devices, a.device_maps) for a in addresses])
        seen: dict[str, int] = {}
        for addr in addresses:
            if addr.name in seen:
                raise InvalidArgumentError(
                    f"worker name {addr.name!r} is not unique: it is used by both rank "
                    f"{seen[addr.name]} and rank {addr.rank}"
                )
            seen[addr.name] = addr.rank
            self._add_address(addr)
        # Running from here on: requests that arrived early are served now, and
        # what they run may use the API (RRefs, nested calls).
        self._running = True
        early, self._early = self._early or [], None
        for conn, frame in early:
            if not conn.closed:
                self._on_frame(conn, frame)
        if self.membership is not None:
            self.membership.start()

    def _add_address(self, addr: Address) -> WorkerInfo:
        """Make the worker at ``addr`` a peer (its record checked first).

        Raises:
            AuthenticationError: its record does not prove this group's token.
        """
        token, group = self.options.auth_token, self._group
        if token and not (
            addr.mac and hmac.compare_digest(addr.mac, record_mac(token, group, addr.body()))
        ):
            raise AuthenticationError(
                f"the address record of worker {addr.name!r} (rank {addr.rank}) does not "
                "verify: it holds another auth_token (or none), or the store was tampered with"
            )
        if not token and addr.mac:
            raise AuthenticationError(
                f"worker {addr.name!r} (rank {addr.rank}) uses an auth_token "
                "and this worker has none"
            )
        info = WorkerInfo(addr.name, addr.rank)
        self._peers[addr.rank] = _Peer(info, addr)
        self._by_name[addr.name] = info
        if self._gone.pop(addr.rank, None) is not None:  # a new incarnation of a dead rank
            for hook in list(self.peer_back_hooks):
                hook(info)
        self._departed.pop(addr.name, None)
        self._departed.pop(addr.rank, None)
        if addr.rank != self.info.id:
            self._peer_maps[addr.name] = normalize_map(
                addr.device_maps.get(self.info.name, {}), self.info.name
            )
        self.device_maps = DeviceMaps(self._own_maps, self._peer_maps)
        return info

    # ------------------------------------------------------------------ membership

    def add_peer(self, addr: Address) -> WorkerInfo:
        """A worker joined the (dynamic) group: make it a peer.

        Raises:
            ValueError: its device maps and ours do not fit, or its name is
                held by another live rank.
            AuthenticationError: its record does not prove the group's token.
        """
        assert self._me is not None
        validate_group(
            self.info.name,
            [(a.name, a.cuda_devices, a.device_maps) for a in (self._me, addr)],
        )
        holder = self._by_name.get(addr.name)
        if holder is not None and holder.id != addr.rank:
            raise ValueError(f"worker name {addr.name!r} is held by rank {holder.id}")
        old = self._peers.get(addr.rank)
        if old is not None and old.info.name != addr.name:
            self._by_name.pop(old.info.name, None)
        return self._add_address(addr)

    def remove_peer(self, info: WorkerInfo, reason: str) -> None:
        """``info`` left the (dynamic) group (``reason`` says how): new calls to
        it fail with :class:`WorkerLeftError`; calls already sent get their
        answer or fail when its connection goes."""
        peer = self._peers.get(info.id)
        if peer is None or peer.info != info or info.id == self.info.id:
            return
        del self._peers[info.id]
        self._by_name.pop(info.name, None)
        self._peer_maps.pop(info.name, None)
        self.device_maps = DeviceMaps(self._own_maps, self._peer_maps)
        self._departed[info.name] = self._departed[info.id] = reason
        error = WorkerLeftError(f"worker {info.name!r} left the group ({reason})")
        # Calls still queued for a connection never went out: they fail now.
        self._fail_pending(lambda p: p.peer == info.id and p.conn is None, error)
        peer.queue.clear()
        if peer.connecting is not None:
            peer.connecting.cancel()

    async def _authenticate_group(
        self, token: str, group: str, records: list[bytes]
    ) -> list[Address]:
        """Check every record and that the whole group read the same records of
        this run (handshake.py); sets the run key and returns the addresses.

        This worker's confirmation of the run is published before anything can
        fail, so the others never wait for it in vain.

        Raises:
            AuthenticationError: a worker holds another token or none, or a
                record was rewritten, replayed from another run or withheld.
        """
        run = run_id(group, records)
        self._run_key = run_key(token, run)
        await self._rdv.publish_confirmation(confirm_mac(token, run, self.info.id))
        addresses = []
        for rank, record in enumerate(records):
            try:
                addr = Address.unpack(record)
            except ValueError as exc:
                raise AuthenticationError(
                    f"the address record of rank {rank} is malformed: the rendezvous "
                    "store was tampered with"
                ) from exc
            if not addr.mac:
                raise AuthenticationError(
                    f"worker {addr.name!r} (rank {addr.rank}) has no auth_token "
                    "and this worker has one"
                )
            if addr.rank != rank or not hmac.compare_digest(
                addr.mac, record_mac(token, group, addr.body())
            ):
                raise AuthenticationError(
                    f"the address record of worker {addr.name!r} (rank {rank}) does not "
                    "verify: that worker holds another auth_token (check the token given to "
                    "each worker), or the rendezvous store was tampered with"
                )
            addresses.append(addr)
        confirmations = await self._rdv.confirmations()
        for rank, got in enumerate(confirmations):
            if not hmac.compare_digest(got, confirm_mac(token, run, rank)):
                raise AuthenticationError(
                    f"worker rank {rank} read other address records than this worker: the "
                    "rendezvous store was tampered with (a record rewritten, replayed from "
                    "an earlier run or withheld); refusing to start"
                )
        return addresses

    async def shutdown(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop the agent; see ``aiorpc_autograd.shutdown``.

        A graceful shutdown keeps serving while it runs rounds of a vote over
        the store (PyTorch's agent ``join`` loops the same way until the
        group-wide count of active calls is 0). In each round a worker first
        waits until it is idle here (no call awaiting an answer, none being
        served, the services' ``idle_checks`` true), then votes, vetoing if
        requests were sent or received here since its previous vote; it leaves
        after the first round without a veto. A round without one means nothing
        moved anywhere between two votes of every worker, each idle at its
        vote, so nothing is in flight and nothing can start: every request,
        RRef deletion or backward pass of the group is done.

        Meanwhile every peer is probed (heartbeats; none if
        ``heartbeat_interval`` is 0): one that does not answer within
        ``heartbeat_timeout``, leaves without a clean ``Goodbye`` or is
        declared gone ends the wait with :class:`ConnectionLostError`.
        Whatever the outcome, each connection gets a ``Goodbye`` saying why
        this worker leaves before it closes.
        """
        if not self._running:
            return
        limit = timeout or 0.0  # None or 0: no limit
        deadline = time.monotonic() + limit if limit > 0 else float("inf")
        failure: RpcError | None = None
        self._leaving = True
        if graceful:
            try:
                if self.membership is not None:
                    # A dynamic group does not stop together: this worker
                    # leaves once nothing of its own is outstanding.
                    self._run_before_shutdown()
                    await self._wait_idle(deadline, lambda: None)
                    await self.membership.leave(deadline)
                    if self.info.id == 0 and self._rdv.hosted_by_rank0:
                        settle = time.monotonic() + self.options.heartbeat_timeout
                        await self.membership.outlast(min(deadline, settle))
                else:
                    await self._quiesce(deadline)
            except RpcError as exc:
                failure = exc
        elif self.membership is not None:
            await self.membership.leave(min(deadline, time.monotonic() + 2.0))
        if not graceful:
            reason = "shutdown(graceful=False)"
        elif isinstance(failure, RpcTimeoutError):
            reason = f"graceful shutdown timed out after {limit}s"
        elif failure is not None:
            reason = f"graceful shutdown failed: {failure}"
        else:
            reason = "graceful shutdown"
        self._say_goodbye(reason, clean=graceful and failure is None)
        host = self._peers.get(0)
        if (
            graceful
            and self.membership is None
            and not (host is not None and host.gone is not None and failure is not None)
        ):
            # The store's host (rank 0) waits until the others are done with the
            # store; a host that left already is not asked (c10d would log the
            # broken pipe).
            settle = self.options.heartbeat_timeout if failure is None else 1.0
            await self._rdv.leave(min(settle, max(deadline - time.monotonic(), 0.0)))
        self._running = False
        await self._close(RpcError(f"RPC agent {self.info.name!r} shut down ({reason})"))
        if isinstance(failure, RpcTimeoutError):
            raise RpcTimeoutError(f"graceful shutdown did not complete in {limit}s: {failure}")
        if isinstance(failure, ConnectionLostError):
            raise ConnectionLostError(f"graceful shutdown could not complete: {failure}")
        if failure is not None:
            raise RpcError(f"graceful shutdown could not reach the group: {failure}")

    def _run_before_shutdown(self) -> None:
        for hook in self.before_shutdown:
            hook()

    async def _quiesce(self, deadline: float) -> None:
        """The rounds of :meth:`shutdown`, until one without a veto.

        Raises:
            RpcTimeoutError: ``deadline`` passed.
            ConnectionLostError: a peer died or left without a clean Goodbye.
            RpcError: the store is unreachable.
        """
        lost: list[RpcError] = []

        def on_gone(info: WorkerInfo, error: RpcError) -> None:
            lost.append(error)

        def stop() -> None:
            if lost:
                raise lost[0]
            for peer in self._peers.values():
                if peer.gone is not None and not peer.left_cleanly:
                    raise peer.gone

        # A store call to a frozen or vanished store host fails within the
        # heartbeat timeout instead of the rendezvous timeout.
        await self._rdv.bound(min(deadline, time.monotonic() + self.options.heartbeat_timeout))
        await self._find_the_dead()
        self.peer_gone_hooks.append(on_gone)
        watch = self.loop.create_task(self._watch_peers(lost))
        try:
            # Peers declared gone before this shutdown began are left out of
            # the vote (for everyone: whoever knows marks them in the store), so
            # the survivors' shutdown completes; a peer that dies during the
            # wait ends it with ConnectionLostError (stop()).
            for wid in list(self._gone):
                await self._on_store(self._rdv.mark_dead(wid, deadline), deadline)
            last: int | None = None
            for round_ in itertools.count():
                await self._wait_idle(deadline, stop)
                mark = self._activity
                veto, last = mark != last, mark  # round 0: always a veto
                if await self._vote(f"shutdown/{round_}", veto, deadline, stop):
                    return
                if round_ == 0:
                    # Every worker has called shutdown, and each was idle at
                    # its vote: no user code is left that could still fork an
                    # RRef of this worker's. Only now the services' last acts
                    # (the user RRefs' deletions), as torch deletes them after
                    # _wait_all_workers; the rounds go on until those settle.
                    self._run_before_shutdown()
        finally:
            self.peer_gone_hooks.remove(on_gone)
            watch.cancel()

    async def _vote(self, tag: str, veto: bool, deadline: float, stop: Callable[[], None]) -> bool:
        """One round's vote (see :meth:`_on_store`)."""
        return await self._on_store(self._rdv.vote(tag, veto, deadline, stop), deadline)

    async def _on_store(self, step: Awaitable[T], deadline: float) -> T:
        """A store step of the shutdown; a store that fails before ``deadline``
        is a lost peer (its host), not a timeout of the shutdown."""
        try:
            return await step
        except ConnectionLostError:
            raise
        except RpcError as exc:
            # (uvloop's timers run on a millisecond clock: the store call's
            # wait may end up to that much before monotonic() reaches deadline.)
            if isinstance(exc, RpcTimeoutError) and time.monotonic() >= deadline - _TIMER_SLACK:
                raise
            host = self._peers.get(0)
            hosted = ""
            if host is not None and self._rdv.hosted_by_rank0:
                hosted = f" (worker {host.info.name!r} hosts it)"
            limit = self.options.heartbeat_timeout
            raise ConnectionLostError(
                f"the rendezvous store{hosted} did not answer within {limit}s: {exc}"
                if isinstance(exc, RpcTimeoutError)
                else f"the rendezvous store{hosted} is unreachable: {exc}"
            ) from exc

    def _peers_not_gone(self) -> list[WorkerInfo]:
        """The other workers, less those declared gone or that said goodbye."""
        return [
            peer.info
            for peer in self._peers.values()
            if peer.info.id != self.info.id and peer.info.id not in self._gone and peer.gone is None
        ]

    async def _find_the_dead(self) -> None:
        """As a graceful shutdown starts: probe every peer once and declare
        gone those that cannot be reached (a refused connection), so they are
        counted out like peers declared gone before. A worker that never
        talked to a dead peer learns of its death only now; without this it
        would fail its shutdown as if the peer had died during it. Waits at
        most a quarter of the heartbeat timeout (a hung peer is the watch's
        to find)."""
        limit = self.options.heartbeat_timeout
        if self.options.heartbeat_interval <= 0:
            return
        probes = {info: self._probe(info, limit) for info in self._peers_not_gone()}
        if not probes:
            return
        await asyncio.wait(probes.values(), timeout=limit / 4)
        for info, fut in probes.items():
            if not fut.done():
                fut.add_done_callback(retrieve_error)
                continue
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None and not isinstance(exc, RpcTimeoutError):
                error = exc if isinstance(exc, RpcError) else ConnectionLostError(str(exc))
                self._declare_gone(info, error)

    async def _watch_peers(self, lost: list[RpcError]) -> None:
        """Probe every peer while a graceful shutdown waits; a peer that does
        not answer is appended to ``lost``."""
        interval = self.options.heartbeat_interval
        limit = self.options.heartbeat_timeout
        if interval <= 0:
            return
        probing: set[int] = set()

        def answered(info: WorkerInfo, fut: asyncio.Future[Any]) -> None:
            probing.discard(info.id)
            if fut.cancelled() or fut.exception() is None or info.id in self._unverified:
                return
            peer = self._peers[info.id]
            if peer.left_cleanly:
                return  # it finished; the vote tells this worker the same
            exc = fut.exception()
            if isinstance(exc, RpcTimeoutError):
                exc = ConnectionLostError(
                    f"worker {info.name!r} did not answer a heartbeat within {limit}s "
                    "while this worker waited in shutdown"
                )
            elif not isinstance(exc, ConnectionLostError):
                exc = ConnectionLostError(f"worker {info.name!r} is unreachable: {exc}")
            lost.append(exc)  # type: ignore[arg-type, unused-ignore]

        while True:
            for info in self._peers_not_gone():
                if info.id in probing:
                    continue
                probing.add(info.id)
                self._probe(info, limit).add_done_callback(functools.partial(answered, info))
            await asyncio.sleep(min(interval, limit / 2))

    def _probe(self, to: WorkerInfo, timeout: float) -> asyncio.Future[Any]:
        """Send a heartbeat as a request of its own; it counts neither as
        activity nor as outstanding work (see :meth:`_busy`)."""
        rid = next(self._ids)
        header, buffers = codec.encode(Heartbeat(), rid)
        fut: asyncio.Future[Any] = self.loop.create_future()
        pending = _Pending(fut, to.id, lambda m: None)
        pending.timer = self.loop.call_later(timeout, self._expire, rid, timeout, to)
        self._pending[rid] = pending
        self._probes.add(rid)
        fut.add_done_callback(lambda f: self._probes.discard(rid))
        self._send(to.id, header, buffers, rid)
        return fut

    def _busy(self) -> bool:
        """Anything outstanding here: a call awaiting its answer (probes
        aside), a request being served, or a service not idle."""
        if self._inflight:
            return True
        if self._pending and any(rid not in self._probes for rid in self._pending):
            return True
        return not all(check() for check in self.idle_checks)

    async def _wait_idle(self, deadline: float, stop: Callable[[], None]) -> None:
        """Wait until this worker is idle and stays so across a few loop
        iterations with no activity (the callbacks of the last answers ran:
        they may send more); ``stop()`` may raise to end the wait.

        Raises:
            RpcTimeoutError: ``deadline`` passed.
        """
        delay = 0.001
        while True:
            stop()
            if not self._busy():
                mark = self._activity
                for _ in range(3):
                    await asyncio.sleep(0)
                if mark == self._activity and not self._busy():
                    return
                delay = 0.001
            if time.monotonic() >= deadline:
                pending = sum(rid not in self._probes for rid in self._pending)
                raise RpcTimeoutError(f"{pending} requests pending, {self._inflight} being served")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _say_goodbye(self, reason: str, clean: bool) -> None:
        """Tell every connected peer that this worker is leaving, and why."""
        header, _ = codec.encode(Goodbye(reason, clean), 0)
        conns = [p.conn for p in self._peers.values() if p.conn is not None]
        for conn in {*conns, *self._incoming}:
            if not conn.closed and conn.peer is not None:
                with contextlib.suppress(ConnectionLostError):
                    conn.send(header, [])

    def _on_goodbye(self, conn: Connection, message: Message) -> None:
        assert isinstance(message, Goodbye)
        info = conn.peer
        if not isinstance(info, WorkerInfo):
            return
        peer = self._peers.get(info.id)
        if peer is None or peer.gone is not None:
            return
        error = ConnectionLostError(f"worker {info.name!r} shut down ({message.reason})")
        peer.gone = error
        peer.left_cleanly = message.clean
        # Every call to it fails now (queued, sent, or being served there).
        self._fail_pending(lambda p: p.peer == info.id, error)
        if not message.clean:
            self._declare_gone(info, error)

    async def _close(self, error: RpcError) -> None:
        self._running = False
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in self._suspects.values():
            task.cancel()
        for server in self._servers:
            server.close()
        for peer in self._peers.values():
            if peer.connecting is not None:
                peer.connecting.cancel()
            if peer.conn is not None:
                peer.conn.close()
            peer.queue.clear()
        for conn in list(self._incoming):
            conn.close()
        self._fail_pending(lambda p: True, error)
        self._pool.shutdown()
        self._busy_poll.close()
        if self.membership is not None:
            self.membership.close()
        self._rdv.close()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`shutdown`."""
        return self._running

    # ------------------------------------------------------------------ workers

    def set_rpc_timeout(self, seconds: float) -> None:
        """Make ``seconds`` the default timeout of the calls started from now
        on (torch's ``rpc._set_rpc_timeout``): ``options`` becomes a copy with
        that ``rpc_timeout``, validated as any options are.

        Raises:
            TypeError, ValueError: not a number of seconds >= 0.
        """
        self.options = replace(self.options, rpc_timeout=seconds)

    def worker_info(self, to: str | int | WorkerInfo | None = None) -> WorkerInfo:
        """Resolve a worker name, rank or WorkerInfo (None: this worker).

        Raises:
            InvalidArgumentError: no such worker in the group (a ValueError,
                and a RuntimeError as torch's "could not find destination").
        """
        if to is None:
            return self.info
        if isinstance(to, WorkerInfo):
            peer = self._peers.get(to.id)
            if peer is None or peer.info != to:
                self._left(to.name)
                raise InvalidArgumentError(f"unknown worker {to!r}: could not find destination")
            return to
        if isinstance(to, str):
            info = self._by_name.get(to)
            if info is None:
                self._left(to)
                raise InvalidArgumentError(
                    f"unknown worker name {to!r}: could not find destination"
                )
            return info
        if isinstance(to, int) and not isinstance(to, bool):
            peer = self._peers.get(to)
            if peer is None:
                self._left(to)
                raise InvalidArgumentError(f"unknown worker rank {to}: could not find destination")
            return peer.info
        # torch raises ValueError for a float rank
        raise InvalidArgumentError(
            f"a worker is a name, a rank or a WorkerInfo, not {type(to).__name__}"
        )

    def _left(self, key: str | int) -> None:
        reason = self._departed.get(key)
        if reason is not None:
            raise WorkerLeftError(f"worker {key!r} left the group ({reason})")

    def all_workers(self) -> list[WorkerInfo]:
        """Every worker of the group, by rank."""
        return [self._peers[r].info for r in sorted(self._peers)]

    def debug_info(self) -> dict[str, int]:
        """Counters for ``get_debug_info``, read on the loop's thread, where
        the tables they count change (from another thread this waits for the
        loop; a stopped loop's are read here)."""
        if self.loop.is_running() and not self.loop.is_closed():
            try:
                return self.on_loop(self._read_debug_counters)
            except RpcError:
                if not self.loop.is_closed():
                    raise
        return self._read_debug_counters()  # the loop stopped: nothing changes them

    def _read_debug_counters(self) -> dict[str, int]:
        live = [p.conn for p in self._peers.values() if p.conn is not None and not p.conn.closed]
        live += [c for c in self._incoming if not c.closed]
        info = {
            "num_pending_requests": len(self._pending),
            "num_inflight_requests": self._inflight,
            "num_connections": len(live),
            "num_worker_threads": self.options.num_worker_threads,
            "num_idle_worker_threads": self._pool.idle,
        }
        for key in ("num_shm_segments", "num_shm_segments_held", "num_shm_segments_leased"):
            info[key] = 0
        for conn in live:
            segments, held, leased = conn.shm_stats
            info["num_shm_segments"] += segments
            info["num_shm_segments_held"] += held
            info["num_shm_segments_leased"] += leased
        for key, counter in self.debug_counters.items():
            info[key] = counter()
        return info

    # ------------------------------------------------------------------ sending

    def request(
        self,
        to: WorkerInfo,
        message: Message,
        timeout: float | None = None,
        decode: ResponseDecoder | None = None,
        device_map: DeviceMap | None = None,
        write_now: bool = False,
    ) -> asyncio.Future[Any]:
        """Send a request; the future resolves to ``decode(response)``.

        Args:
            to: the callee.
            message: the request.
            timeout: seconds; None: the options' ``rpc_timeout``; 0: none.
            decode: turns the response message into the result; the default
                loads a ``PythonRet`` payload. An ``ExceptionMsg`` always raises
                :class:`RemoteError`.
            device_map: the map its CUDA tensors travel by; None: this
                worker's map for ``to`` (the autograd layer passes the inverse
                map of a recv function for gradients).
            write_now: write it (and what was sent before it on its
                connection) at once, not with what the rest of this loop turn
                sends: a notice the peer can handle while it would otherwise
                wait, instead of before the request that follows it.

        Raises:
            RpcError: the agent is not running.
            TypeError: the message cannot be encoded.
        """
        if not self._running:
            raise RpcError("RPC agent is not running (call init_rpc first)")
        span = None
        if self.tracer is not None or torch_profiler._is_profiler_enabled:
            span = self._begin_span(to, message)
        rid = next(self._ids)
        self._activity += 1
        if self.request_wrapper is not None:
            message = self.request_wrapper(to, message)
        if device_map is None:
            device_map = self.device_maps.for_request(to.name)
        if span is not None:
            message = span.wrap(message)  # the profiling wrapper goes outermost
        header, buffers = codec.encode(message, rid, device_map)
        if span is not None:
            span.encoded(header, buffers)
        fut = self.loop.create_future()
        pending = _Pending(fut, to.id, decode or self.decode_result)
        if timeout is None:
            timeout = self.options.rpc_timeout
        if timeout > 0:
            pending.timer = self.loop.call_later(timeout, self._expire, rid, timeout, to)
        self._pending[rid] = pending
        if span is not None:
            span.start(pending)
        if self.fault_injector is not None:
            resend = functools.partial(self._send, to.id, header, buffers, rid)
            if self._inject(to.id, message, resend, rid):
                return fut
        self._send(to.id, header, buffers, rid, write_now)
        return fut

    def _begin_span(self, to: WorkerInfo, message: Message) -> CallSpan | None:
        tracer: Tracer | None = self.extensions.get("tracing")
        return tracer.begin_call(to, message) if tracer is not None else None

    def _inject(self, peer_id: int, message: Message, resend: Callable[[], None], rid: int) -> bool:
        """Apply an injected fault to an outgoing request (``rid``) or notice
        (``rid`` 0: nothing waits for it, so "fail" only drops it); True if it
        was handled. ``resend``: sends it, for "delay"."""
        assert self.fault_injector is not None
        fault = self.fault_injector(message)
        if fault is None:
            return False
        action, delay = fault
        if action == "drop":
            return True
        if action == "delay":
            self.loop.call_later(delay, resend)
            return True
        if action == "fail":
            if rid:
                error = RpcError("injected failure")
                self._fail_pending(lambda p: p is self._pending.get(rid), error)
            return True
        if action == "disconnect":
            conn = self._peers[peer_id].conn
            if conn is not None:
                conn.abort(ConnectionLostError("injected disconnect"))
            return False  # it goes out on a new connection
        raise ValueError(f"unknown fault action {action!r}")

    def on_loop_thread(self) -> bool:
        """True when called on the thread running the agent's loop."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def call_message(self, func: Callable[..., Any] | str, args: Any, kwargs: Any) -> PythonCall:
        """The request that calls ``func(*args, **kwargs)`` (by name if a str).

        Raises:
            TypeError: not callable, not encodable, or pickled in safe mode.
        """
        allow = self.options.allow_pickle
        args = tuple(args)
        kwargs = dict(kwargs or {})
        if isinstance(func, str):
            return PythonCall(func, codec.dump_payload((args, kwargs), allow))
        if not callable(func):
            raise TypeError(
                f"func must be callable or a registered name, not {type(func).__name__}"
            )
        if not allow:
            raise TypeError(
                "safe mode (allow_pickle=False) calls registered functions by name only"
            )
        return PythonCall(None, codec.dump_payload((func, args, kwargs), allow))

    def call(
        self,
        to: str | int | WorkerInfo,
        func: Callable[..., Any] | str,
        args: Any = (),
        kwargs: Any = None,
        timeout: float | None = None,
    ) -> asyncio.Future[Any]:
        """Send a call; the future resolves to its result. Loop thread only.

        Raises:
            RuntimeError: called off the agent's loop.
        """
        if not self.on_loop_thread():
            raise RuntimeError(
                "rpc_async must be called on the RPC agent's event loop; use rpc_sync"
            )
        info = self.worker_info(to)
        token = sending_to.set((info.id, True))
        try:
            message = self.call_message(func, args, kwargs)
        finally:
            sending_to.reset(token)
        return self.request(info, message, timeout)

    def blocking(self, start: Callable[[], asyncio.Future[T]]) -> T:
        """From a thread other than the loop's: run ``start`` on the loop (in a
        copy of this thread's contextvars, so an autograd context travels) and
        block until the future it returns is done.

        Raises:
            RuntimeError: called on the loop thread (it would deadlock).
            RpcError: the loop closed before the future was done.
        """
        if self.on_loop_thread():
            raise RuntimeError(
                "this call would block the event loop it needs: use its async form here"
            )
        ctx = contextvars.copy_context()
        cfut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut = ctx.run(start)
            except BaseException as exc:
                cfut.set_exception(exc)
                return

            def done(f: asyncio.Future[T]) -> None:
                if f.cancelled():  # (tasks are cancelled as the loop ends)
                    cfut.set_exception(
                        RpcError(f"RPC agent {self.info.name!r}: the call was cancelled")
                    )
                elif f.exception() is not None:
                    cfut.set_exception(f.exception())  # type: ignore[arg-type, unused-ignore]
                else:
                    cfut.set_result(f.result())

            fut.add_done_callback(done)

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError:  # closed already
            raise self._loop_closed() from None
        # A loop closes only after its last turn: what it has not finished by
        # then never finishes (the agent shut down meanwhile).
        while True:
            try:
                return cfut.result(_LOOP_CHECK_INTERVAL)
            except TimeoutError:
                if cfut.done():  # the call's own timeout, or done just now
                    return cfut.result()
                if self.loop.is_closed():
                    raise self._loop_closed() from None

    def _loop_closed(self) -> RpcError:
        return RpcError(
            f"RPC agent {self.info.name!r} shut down: its event loop closed "
            "before this call finished"
        )

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread (directly if already there) and return
        its result; from another thread this blocks until it ran."""
        if self.on_loop_thread():
            return fn()

        def start() -> asyncio.Future[T]:
            fut: asyncio.Future[T] = self.loop.create_future()
            fut.set_result(fn())
            return fut

        return self.blocking(start)

    def decode_result(self, message: Message) -> Any:
        """The default response decoder: the value of a ``PythonRet``."""
        if isinstance(message, PythonRet):
            return codec.load_payload(message.value, self.options.allow_pickle)
        raise ProtocolError(f"unexpected response {type(message).__name__}")

    def _send(
        self,
        peer_id: int,
        header: bytes,
        buffers: list[memoryview],
        rid: int,
        write_now: bool = False,
    ) -> None:
        pending = self._pending.get(rid)
        if pending is None:
            return  # already failed or timed out (a delayed send, say)
        peer = self._peers.get(peer_id)
        if peer is None:  # it left the (dynamic) group since the call was made
            why = self._departed.get(peer_id, "left")
            error = WorkerLeftError(f"worker {peer_id} left the group ({why})")
            self._fail_pending(lambda p: p is pending, error)
            return
        if peer.gone is not None:  # it said Goodbye: it answers nothing more
            gone = peer.gone
            self._fail_pending(lambda p: p is pending, gone)
            return
        conn = self._write(peer, header, buffers, rid, write_now)
        if conn is not None:
            pending.conn = conn
            if pending.span is not None:
                pending.span.written()

    def _write(
        self, peer: _Peer, header: bytes, buffers: list[memoryview], rid: int, write_now: bool
    ) -> Connection | None:
        """Send a frame on ``peer``'s connection and return it; or queue it
        (``rid``: its request id, 0 for a notice) until that connection is
        open, opening it, and return None."""
        conn = peer.conn
        if conn is not None and not conn.closed and not peer.queue:
            conn.send(header, buffers)
            if write_now:
                conn.flush()
            return conn
        peer.queue.append((header, buffers, rid))
        if peer.connecting is None:
            peer.connecting = self.loop.create_task(self._connect(peer))
        return None

    def notify(self, to: WorkerInfo, message: Message, write_now: bool = False) -> None:
        """Send the notice ``message`` (``IS_NOTICE``: request id 0, never
        answered) to ``to``, in order with the requests sent to it. Best
        effort: dropped when ``to`` is gone or left, or its connection fails.
        ``write_now``: as for :meth:`request`."""
        assert message.IS_NOTICE
        if not self._running:
            return
        peer = self._peers.get(to.id)
        if peer is None or peer.gone is not None:
            return
        self._activity += 1
        header, buffers = codec.encode(message, 0)
        if self.fault_injector is not None:
            resend = functools.partial(self._late_notice, peer, header, buffers)
            if self._inject(to.id, message, resend, 0):
                return
        self._write(peer, header, buffers, 0, write_now)

    def _late_notice(self, peer: _Peer, header: bytes, buffers: list[memoryview]) -> None:
        if self._running and peer.gone is None and self._peers.get(peer.info.id) is peer:
            self._write(peer, header, buffers, 0, True)

    async def _connect(self, peer: _Peer, limit: float | None = None) -> BaseException | None:
        """Open the connection to ``peer`` and send what is queued for it;
        returns None, or the error that failed it (the queued calls fail too)."""
        addr = peer.address
        # A peer that accepts but never completes the TLS/auth handshake (hung,
        # say) must not hold the queued calls forever.
        if limit is None:
            limit = self.options.heartbeat_timeout
        try:
            make = functools.partial(self._connection, True, peer.info.id)
            if addr.unix_path and self._use_unix and addr.host_id == _host_id():
                opening = connect(make, path=addr.unix_path)
            else:
                opening = connect(make, host=addr.host, port=addr.port, ssl=self._client_ssl)
            conn = await asyncio.wait_for(opening, limit)
            # The peer may have closed it already (died right after accepting):
            # then this raises ConnectionLostError and the queued calls fail.
            conn.peer = peer.info
            hello, _ = codec.encode(Hello(self.info.name, self.info.id, self._group))
            conn.send(hello, [])
        except (OSError, ConnectionLostError, AuthenticationError, TimeoutError) as exc:
            peer.connecting = None
            peer.queue.clear()
            name = peer.info.name
            error: RpcError
            if isinstance(exc, AuthenticationError):
                error = exc
            elif isinstance(exc, TimeoutError):
                error = ConnectionLostError(
                    f"worker {name!r} did not complete the connection in {limit:.3g}s", worker=name
                )
            else:
                error = ConnectionLostError(
                    f"cannot connect to worker {name!r}: {exc}", worker=name
                )
            self._fail_pending(lambda p: p.peer == peer.info.id and p.conn is None, error)
            if isinstance(exc, ConnectionRefusedError):
                # Nobody listens at its address any more: the worker is gone.
                self._declare_gone(peer.info, error)
            elif isinstance(exc, (ssl.SSLError, AuthenticationError)):
                # It answers but cannot be authenticated (TLS or token set up
                # differently): a configuration error, not a sign of death.
                self._unverified.add(peer.info.id)
            else:  # try again later (now, the calls just failed would fail twice)
                self._suspect(peer.info, first_try_after=self._probe_retry)
            return error
        self._unverified.discard(peer.info.id)
        peer.conn = conn
        peer.connecting = None
        queue, peer.queue = peer.queue, []
        for header, buffers, rid in queue:
            if rid:  # a request, unless it failed or timed out meanwhile
                pending = self._pending.get(rid)
                if pending is None:
                    continue
                pending.conn = conn
                if pending.span is not None:
                    pending.span.written()
            conn.send(header, buffers)
        return None

    def reply(self, conn: Connection, rid: int, message: Message) -> None:
        """Send the response to request ``rid`` (dropped if the peer is gone).

        Every request dispatched from ``conn`` is answered through here exactly
        once: this is where its slot of ``max_concurrent_requests`` is freed.
        """
        conn.serving -= 1
        if conn.serving < self.options.max_concurrent_requests:
            conn.hold_reading("busy", False)
        if conn.closed:
            log.debug("dropping the reply to %s: connection closed", conn.peer_label)
            return
        peer = conn.peer.name if isinstance(conn.peer, WorkerInfo) else ""
        try:
            header, buffers = codec.encode(message, rid, self.device_maps.for_reply(peer))
        except Exception as exc:  # the result cannot travel: say so instead
            header, buffers = codec.encode(exception_message(self.info.name, exc), rid)
        if self.fault_injector is not None:
            fault = self.fault_injector(message)
            if fault is not None:
                action, delay = fault
                if action in ("drop", "fail"):
                    return
                if action == "disconnect":
                    conn.abort(ConnectionLostError("injected disconnect"))
                    return
                if action == "delay":
                    self.loop.call_later(delay, self._send_on, conn, header, buffers)
                    return
        conn.send(header, buffers)

    @staticmethod
    def _send_on(conn: Connection, header: bytes, buffers: list[memoryview]) -> None:
        if not conn.closed:
            conn.send(header, buffers)

    def reply_error(self, conn: Connection, rid: int, exc: BaseException) -> None:
        """Send ``exc`` as the failure of request ``rid``."""
        self.reply(conn, rid, exception_message(self.info.name, exc))

    # ------------------------------------------------------------------ receiving

    def _connection(self, client: bool, server: int) -> Connection:
        auth = None
        if self.options.auth_token:
            # Before the group agreed on the run no honest peer connects: a key
            # nobody holds refuses whoever does.
            key = self._run_key or secrets.token_bytes(32)
            auth = (key, str(server).encode())
        return Connection(
            self._limits,
            self._on_frame,
            self._on_lost,
            auth,
            client=client,
            shm_threshold=self._shm_threshold,
            # Safe mode: a peer must not change a tensor after sending it.
            shm_copy=not self.options.allow_pickle,
            gate=None if client else self._gate,
            # Replies flow on accepted connections only: pausing reads on a
            # connection we opened would stop the answers that drain it.
            write_limit=0 if client else self.options.max_pending_reply_bytes,
            busy_poll=self._busy_poll,
        )

    def _accept(self) -> Connection:
        conn = self._connection(False, self.info.id)
        self._incoming.add(conn)
        return conn

    def _on_frame(self, conn: Connection, frame: Frame) -> None:
        if self._early is not None:
            # At most one (small) frame per connection: an unadmitted
            # connection reads nothing more until its Hello is accepted.
            self._early.append((conn, frame))
            return
        if not conn.admitted:
            self._on_first_frame(conn, frame)
            return
        try:
            rid, message = codec.decode(frame, self.options.max_tensors)
        except ProtocolError as exc:
            log.warning("dropping connection from %s: %s", conn.peer_label, exc)
            conn.abort(exc)
            return
        if message.IS_RESPONSE:
            self._on_response(conn, rid, message)
            return
        if isinstance(message, Hello):
            log.warning("dropping connection from %s: a second Hello", conn.peer_label)
            conn.abort(ProtocolError("a second Hello on one connection"))
            return
        if message.IS_NOTICE:  # on any connection with the peer
            self._on_notice(conn, message)
            return
        if conn.client:
            # Requests travel on the requester's own connection; one coming the
            # other way would escape the flow control of the answering side.
            log.warning("dropping connection to %s: a request on our connection", conn.peer_label)
            conn.abort(ProtocolError("a request on a connection the requester did not open"))
            return
        claimed = getattr(message, "from_worker", None)
        if claimed is not None and claimed != conn.peer.id:
            log.warning(
                "dropping connection from %s: claims to be worker %s", conn.peer_label, claimed
            )
            conn.abort(ProtocolError(f"a request from worker {conn.peer.id} claims {claimed}"))
            return
        if type(message) is Heartbeat:  # liveness, not work: no activity
            self.dispatch(conn, rid, message)
            return
        self._activity += 1
        self.dispatch(conn, rid, message)

    def _on_first_frame(self, conn: Connection, frame: Frame) -> None:
        """The first frame of a connection (at most the transport's
        ``HELLO_LIMITS``): it must be a valid Hello, else the connection is
        dropped; nothing else is decoded before it."""
        try:
            _, message = codec.decode(frame, 0)
            if not isinstance(message, Hello):
                raise ProtocolError("the first message must be Hello")
        except ProtocolError as exc:
            log.warning("dropping connection from %s: %s", conn.peer_label, exc)
            conn.abort(exc)
            return
        self._on_hello(conn, message)

    def _on_notice(self, conn: Connection, message: Message) -> None:
        handler = self.notice_handlers.get(type(message))
        if handler is None:
            log.warning("dropping connection from %s: unexpected notice", conn.peer_label)
            conn.abort(ProtocolError(f"unsupported notice {message.TYPE.name}"))
            return
        handler(conn, message)

    def dispatch(self, conn: Connection, rid: int, message: Message) -> None:
        """Run the handler of a request and answer it (through :meth:`reply`)."""
        conn.serving += 1
        if conn.serving >= self.options.max_concurrent_requests:
            conn.hold_reading("busy", True)
        handler = self.handlers.get(type(message))
        token = serving_connection.set(conn)
        try:
            try:
                if handler is None:
                    raise ProtocolError(f"unsupported request {message.TYPE.name}")
                result = handler(message)
            except Exception as exc:
                self.reply_error(conn, rid, exc)
                return
            if isinstance(result, Message):
                self.reply(conn, rid, result)
            else:
                self.serve(conn, rid, result)  # its Task inherits serving_connection
        finally:
            serving_connection.reset(token)

    def when_lost(self, conn: Connection) -> asyncio.Future[None]:
        """A future that resolves once ``conn`` is closed or lost."""
        fut = self._lost_waiters.get(conn)
        if fut is None:
            fut = self.loop.create_future()
            if conn.closed:
                fut.set_result(None)
            else:
                self._lost_waiters[conn] = fut
        return fut

    def _on_hello(self, conn: Connection, hello: Hello) -> None:
        peer = self._peers.get(hello.worker_id)
        if (
            hello.group != self._group
            or peer is None
            or peer.info.name != hello.name
            # On a connection we opened, the Hello must name whom we dialled.
            or (conn.peer is not None and conn.peer != peer.info)
        ):
            log.warning("refusing %s: not a worker of this group", conn.peer_label)
            conn.abort(ProtocolError("not a worker of this group"))
            return
        if conn.peer is None:  # an incoming connection: answer with ours
            conn.peer = peer.info
            header, _ = codec.encode(Hello(self.info.name, self.info.id, self._group))
            conn.send(header, [])
        conn.admit()

    def _on_response(self, conn: Connection, rid: int, message: Message) -> None:
        pending = self._pending.get(rid)
        if pending is None or pending.conn is not conn:
            if rid == 0 and isinstance(message, RRefAck) and conn.client:
                return  # a heartbeat's ack (last_received is already updated)
            late = self._abandoned.get(conn)
            if pending is None and late is not None and rid in late:
                del late[rid]  # the answer to a call that timed out here
                return
            # Not a request sent on this connection: forged, or a confused peer.
            log.warning("dropping connection from %s: answer to a foreign request", conn.peer_label)
            conn.abort(ProtocolError(f"response to request {rid}, not pending on this connection"))
            return
        del self._pending[rid]
        if pending.timer is not None:
            pending.timer.cancel()
        fut = pending.future
        if fut.done():
            return
        unwrap = self.response_unwrappers.get(type(message))
        if unwrap is not None:
            try:
                message = unwrap(pending.peer, message)
            except Exception as exc:
                fut.set_exception(exc)
                return
        try:
            if isinstance(message, ExceptionMsg):
                m = message
                fut.set_exception(remote_error(m.worker, m.type_name, m.message, m.traceback))
            else:
                fut.set_result(pending.decode(message))
        except Exception as exc:  # the future resolves whatever happens
            fut.set_exception(exc)

    def _on_lost(self, conn: Connection, exc: BaseException | None) -> None:
        self._incoming.discard(conn)
        self._abandoned.pop(conn, None)
        waiter = self._lost_waiters.pop(conn, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        info = conn.peer
        if not isinstance(info, WorkerInfo):
            return
        peer = self._peers.get(info.id)
        if peer is not None and peer.conn is conn:
            peer.conn = None
        # Only the calls that went out on this connection: later ones may be
        # queued for, or already on, a new one.
        reason = f": {exc}" if exc else ""
        self._fail_pending(
            lambda p: p.conn is conn,
            ConnectionLostError(
                f"lost the connection to worker {info.name!r}{reason}", worker=info.name
            ),
        )
        if not conn.closed_here:  # closed on purpose here: nothing to suspect
            self._suspect(info)

    # ------------------------------------------------------------------ liveness

    def peer_gone(self, worker: int | WorkerInfo) -> bool:
        """True once ``worker`` was declared gone (see the module doc)."""
        return (worker.id if isinstance(worker, WorkerInfo) else worker) in self._gone

    def _live_conn(self, worker_id: int) -> bool:
        peer = self._peers.get(worker_id)
        if peer is not None and peer.conn is not None and not peer.conn.closed:
            return True
        return any(
            not c.closed and isinstance(c.peer, WorkerInfo) and c.peer.id == worker_id
            for c in self._incoming
        )

    def _declare_gone(self, info: WorkerInfo, error: RpcError) -> None:
        """Declare ``info`` gone (once): fail what waits on it, run the hooks."""
        if not self._running or info.id in self._gone or info.id == self.info.id:
            return
        self._gone[info.id] = error
        # Peers leave one by one at the end of a graceful shutdown: expected then.
        level = logging.DEBUG if self._leaving else logging.WARNING
        log.log(level, "worker %r is gone: %s", info.name, error)
        self._fail_pending(lambda p: p.peer == info.id, error)
        for hook in list(self.peer_gone_hooks):
            try:
                hook(info, error)
            except Exception:  # one layer's failure must not skip the others
                log.exception("a peer_gone hook failed for worker %r", info.name)

    @property
    def _probe_retry(self) -> float:
        limit = self.options.heartbeat_timeout
        return min(self.options.heartbeat_interval or limit / 4, limit / 4)

    def _suspect(self, info: WorkerInfo, first_try_after: float = 0.0) -> None:
        """``info``'s connection was lost (or could not be opened): find out
        whether it is gone, unless a connection with it is still up."""
        wid = info.id
        if (
            not self._running
            or wid == self.info.id
            or wid in self._gone
            or wid in self._suspects
            or self._live_conn(wid)
        ):
            return
        peer = self._peers.get(wid)
        if peer is None or peer.info != info:
            return  # it left the (dynamic) group: nothing to find out
        self._suspects[wid] = self.loop.create_task(self._probe_peer(peer, first_try_after))

    async def _probe_peer(self, peer: _Peer, first_try_after: float) -> None:
        """Reconnect to a suspect until a connection is up (alive), it refuses
        (gone, see :meth:`_connect`) or ``heartbeat_timeout`` passed (gone)."""
        wid = peer.info.id
        limit = self.options.heartbeat_timeout
        deadline = time.monotonic() + limit
        retry = self._probe_retry
        try:
            await asyncio.sleep(first_try_after)
            while self._running and wid not in self._gone and not self._live_conn(wid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._declare_gone(
                        peer.info,
                        ConnectionLostError(
                            f"lost the connection to worker {peer.info.name!r} and could not "
                            f"open a new one within heartbeat_timeout={limit}s",
                            worker=peer.info.name,
                        ),
                    )
                    return
                if peer.connecting is None:
                    peer.connecting = self.loop.create_task(self._connect(peer, remaining))
                if await asyncio.shield(peer.connecting) is None or wid in self._unverified:
                    return  # connected, or it answered but failed authentication: alive
                await asyncio.sleep(min(retry, max(deadline - time.monotonic(), 0)))
        finally:
            if self._suspects.get(wid) is asyncio.current_task():
                del self._suspects[wid]

    def _liveness_targets(self) -> set[Connection]:
        """Connections to probe: those with calls pending, and those to the
        peers the layers hold state for (opened if need be)."""
        targets = {p.conn for p in self._pending.values() if p.conn is not None}
        watched: set[int] = set()
        for watcher in self.liveness_watchers:
            watched.update(watcher())
        watched -= self._gone.keys() | {self.info.id}
        for wid in watched:
            peer = self._peers.get(wid)
            if peer is None:
                continue
            if peer.conn is not None and not peer.conn.closed:
                targets.add(peer.conn)
            elif peer.connecting is None and wid not in self._suspects:
                peer.connecting = self.loop.create_task(self._connect(peer))
        return targets

    async def _heartbeat_loop(self) -> None:
        """Probe silent connections to peers we depend on; a peer silent for
        ``heartbeat_timeout`` with a probe unanswered is declared gone.

        Wakes exactly when the next probe or deadline is due, so a hung peer is
        detected within ``heartbeat_timeout`` of the last frame it sent.
        """
        interval = self.options.heartbeat_interval
        limit = self.options.heartbeat_timeout
        probe_after = min(interval, limit / 2)
        probe, _ = codec.encode(Heartbeat(), 0)  # id 0: the ack matches nothing
        while True:
            now = time.monotonic()
            wake = now + probe_after
            for conn in self._liveness_targets():
                if conn.closed:
                    continue
                last = conn.last_received
                if conn.probe_sent > last:  # a probe is unanswered
                    # The probe gets as long as a steady one would: a connection
                    # that was idle until now is not judged on its old silence.
                    dead_at = max(last + limit, conn.probe_sent + limit - probe_after)
                    if now < dead_at:
                        wake = min(wake, dead_at)
                        continue
                    info = conn.peer
                    error = ConnectionLostError(
                        f"worker {conn.peer_label!r} sent nothing for {now - last:.1f}s and "
                        f"did not answer a heartbeat (heartbeat_timeout={limit}s)",
                        worker=getattr(info, "name", None),
                    )
                    conn.abort(error)
                    if isinstance(info, WorkerInfo):
                        self._declare_gone(info, error)
                elif now - last >= probe_after:
                    conn.probe_sent = now
                    conn.send(probe, [])
                    wake = min(wake, max(last + limit, now + limit - probe_after))
                else:
                    wake = min(wake, last + probe_after)
            await asyncio.sleep(max(wake - time.monotonic(), 0.005))

    def _expire(self, rid: int, timeout: float, to: WorkerInfo) -> None:
        pending = self._pending.pop(rid, None)
        if pending is not None and pending.conn is not None and not pending.conn.closed:
            late = self._abandoned.setdefault(pending.conn, {})
            late[rid] = None
            if len(late) > _MAX_ABANDONED:
                del late[next(iter(late))]  # its answer, if it ever comes, drops the link
        if pending is not None and not pending.future.done():
            pending.future.set_exception(
                # torch's words too, which ported code matches
                RpcTimeoutError(
                    f"call to worker {to.name!r} timed out after {timeout}s: RPC ran for "
                    f"more than set timeout ({timeout * 1000:.0f} ms) and will now be "
                    "marked with an error"
                )
            )

    def _fail_pending(self, which: Callable[[_Pending], bool], error: RpcError) -> None:
        for rid in [rid for rid, p in self._pending.items() if which(p)]:
            pending = self._pending.pop(rid)
            if pending.timer is not None:
                pending.timer.cancel()
            if not pending.future.done():
                pending.future.set_exception(error)

    # ------------------------------------------------------------------ serving

    def serve(
        self, conn: Connection, rid: int, work: Awaitable[Message] | asyncio.Future[Message]
    ) -> None:
        """Answer request ``rid`` with the message ``work`` produces (or its error).

        A coroutine runs as a Task from its first step: code in it may rely on
        ``asyncio.current_task()`` (``asyncio.timeout``, ``TaskGroup``).
        """
        self._inflight += 1
        fut = work if isinstance(work, asyncio.Future) else asyncio.ensure_future(work)
        fut.add_done_callback(functools.partial(self._served, conn, rid))

    def _served(self, conn: Connection, rid: int, fut: asyncio.Future[Message]) -> None:
        self._inflight -= 1
        if fut.cancelled():
            self.reply_error(conn, rid, RpcError("the request was cancelled on the callee"))
            return
        exc = fut.exception()
        if exc is not None:
            self.reply_error(conn, rid, exc)
        else:
            self.reply(conn, rid, fut.result())

    def resolve_call(self, target: str | None, payload: Payload) -> tuple[Any, Any, Any]:
        """Decode a call's ``(func, args, kwargs)``.

        Raises:
            LookupError: no function is registered under ``target``.
            ProtocolError: the payload is pickled and pickle is not allowed.
            AttributeError, ImportError: the payload names a function or class
                this worker does not have (torch's "RPC pickler does not
                serialize function code..." in the message).
        """
        allow = self.options.allow_pickle
        if target is None and not allow:
            raise ProtocolError(
                "refused a pickled call: this worker runs in safe mode, "
                "call a function registered with rpc.register by name"
            )
        func = None if target is None else _REGISTERED.get(target)
        if target is not None and func is None:
            raise LookupError(f"no function is registered as {target!r}")
        try:
            loaded = codec.load_payload(payload, allow)
        except (AttributeError, ImportError) as exc:
            if type(exc) not in (AttributeError, ImportError, ModuleNotFoundError):
                raise  # a class's own error type, raised by its unpickling
            # A function or class the caller has and this worker does not.
            raise type(exc)(
                "RPC pickler does not serialize function code. Ensure that UDFs are "
                f"defined on both caller and callee modules: {exc}"
            ) from exc
        if func is None:
            func, args, kwargs = loaded
        else:
            args, kwargs = loaded
        return func, tuple(args), dict(kwargs or {})

    def resolve_call_waiting(
        self, target: str | None, payload: Payload
    ) -> tuple[Any, Any, Any, list[asyncio.Future[Any]]]:
        """:meth:`resolve_call`, plus the futures the call must wait for before
        it starts (see :func:`wait_before_call`)."""
        waits: list[asyncio.Future[Any]] = []
        token = _call_waits.set(waits)
        try:
            func, args, kwargs = self.resolve_call(target, payload)
        finally:
            _call_waits.reset(token)
        return func, args, kwargs, waits

    def run_in_executor(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` in the agent's thread pool."""
        return self._pool.run(fn)

    @property
    def pool_busy(self) -> bool:
        """Whether the agent's thread pool runs or holds a job."""
        return self._pool.busy

    async def invoke(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``func``: awaited on the loop if it is ``async``, else in the pool
        (a coroutine a plain function returns is awaited on the loop).

        The current ``contextvars`` context travels with it either way.
        """
        if self.tracer is not None:
            func = self.tracer.wrap_function(func, args)
        if inspect.iscoroutinefunction(func):
            return await func(*args, **kwargs)
        result = await self._pool.run(
            functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        )
        if inspect.isawaitable(result):
            result = await result
        return result

    def _run_call(self, message: Message) -> Message | Awaitable[Message]:
        assert isinstance(message, PythonCall)
        func, args, kwargs, waits = self.resolve_call_waiting(message.target, message.value)
        conn = serving_connection.get()
        peer = conn.peer.id if conn is not None and isinstance(conn.peer, WorkerInfo) else None
        if waits:  # start only once the values its arguments refer to exist
            return self._await_call(self._after(waits, func, args, kwargs), peer)
        if self.tracer is not None:  # (invoke, on the path above, wraps it itself)
            func = self.tracer.wrap_function(func, args)
        if inspect.iscoroutinefunction(func):
            return self._await_call(func(*args, **kwargs), peer)
        # The hot path: a pool job and one future, no Task and no coroutine.
        result: asyncio.Future[Message] = self.loop.create_future()
        self._pool.submit(
            functools.partial(contextvars.copy_context().run, func, *args, **kwargs),
            functools.partial(self._call_done, result, peer),
        )
        return result

    async def _after(
        self,
        waits: list[asyncio.Future[Any]],
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        for fut in waits:
            await outcome(fut)  # a failed value fails the call with its error
        return await self.invoke(func, args, kwargs)

    def _result_message(self, value: Any, peer: int | None) -> PythonRet:
        token = sending_to.set(None if peer is None else (peer, False))
        try:
            return PythonRet(codec.dump_payload(value, self.options.allow_pickle))
        finally:
            sending_to.reset(token)

    async def _await_call(self, awaitable: Awaitable[Any], peer: int | None) -> Message:
        value = await awaitable
        if inspect.isawaitable(value):
            value = await value
        return self._result_message(value, peer)

    def _call_done(
        self, result: asyncio.Future[Message], peer: int | None, ok: bool, value: Any
    ) -> None:
        if result.done():
            return
        if not ok:
            result.set_exception(raisable(value))
            return
        if inspect.isawaitable(value):  # a plain function returned a coroutine
            task = self.loop.create_task(self._await_call(value, peer))
            task.add_done_callback(lambda t: _chain(t, result))
            return
        try:
            result.set_result(self._result_message(value, peer))
        except Exception as err:
            result.set_exception(err)
