"""asyncio transports: frame-carrying connections over TCP and Unix sockets.

A :class:`Connection` is an ``asyncio.BufferedProtocol``: the event loop reads
straight into the buffer the :class:`~aiorpc_autograd.wire.FrameReader` hands
out (a reused scratch buffer for small frames, the frame's own body buffer for
large ones), and frames are written with one ``writelines`` call of the header
bytes and the tensors' memoryviews: the first frame a loop iteration sends at
once, the rest of that iteration's burst together at its end. This layer only
moves frames; it knows nothing of messages.

A connection starts *unadmitted*: its reader accepts one small frame (at most
``HELLO_LIMITS``: a few KiB of header, no buffers, no control or shared-memory
flags), hands it to the owner and reads nothing more until the owner calls
:meth:`Connection.admit` (it said a valid Hello) or drops it. A peer that has
not said who it is thus costs a few KiB, whatever lengths it claims.

Between processes on one host (a Unix socket whose peer runs as the same
user, by ``SO_PEERCRED``), each side offers the other shared memory once the
connection is admitted (a control frame carrying the most bytes of segments
it will map); after the offer, buffers of at least ``shm_threshold`` bytes
are sent through :mod:`~aiorpc_autograd.shm` segments and the socket carries
the rest of the frame. An offer or a shared-memory frame on any other
connection, or before admission, is a protocol error. Control frames (the
offer, segment releases) never leave this layer.

With an auth token, a connection first runs the handshake of
:mod:`~aiorpc_autograd.handshake` (keyed by the run key, bound to the
accepting worker) and then tags and checks every frame, control frames
included, with the per-direction session keys (:class:`~aiorpc_autograd.wire.FrameMac`).

An accepted connection is *pre-auth* until it completes the handshake (with
a token) or its owner calls :meth:`Connection.admit` (without one: the peer
said a valid Hello): a :class:`PreAuthGate` bounds how many are pre-auth at
once and for how long, and a pre-auth connection holds only small buffers (no
frame reader before the handshake, the gated reader's few KiB before Hello).

Busy polling: a :class:`BusyPoll` keeps the loop polling its sockets (a
non-blocking poll each iteration, yielding the core to other runnable threads
in between) for a short window after each frame sent or received, instead of
sleeping in ``epoll_wait``. An answer that comes within the window is picked
up without the wake-up of a sleeping thread, which on virtual machines (an
idle vCPU halts) costs tens of microseconds each way; see
``RpcOptions.busy_poll``.

uvloop is used when installed (:func:`new_event_loop`); the stdlib loop works too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import socket
import ssl as _ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from .errors import AuthenticationError, ConnectionLostError, ProtocolError
from .handshake import ClientHandshake, ServerHandshake
from .shm import DEFAULT_POOL_BYTES, ShmReceiver, ShmSender, peer_readable
from .wire import Frame, FrameMac, FrameReader, Limits, encode_frame

__all__ = [
    "HELLO_LIMITS",
    "BusyPoll",
    "Connection",
    "PreAuthGate",
    "connect",
    "new_event_loop",
    "retrieve_error",
    "serve_tcp",
    "serve_unix",
]

log = logging.getLogger(__name__)

# A frame body at least this large that is not complete in the scratch buffer is
# read straight into its own buffer (no copy through the scratch buffer).
_DIRECT_THRESHOLD = 64 * 1024
# The reader's scratch buffer grows (as bytes arrive) up to this size.
_SCRATCH = 256 * 1024

# Frame flags of this layer. SHM: the last buffer is a shared-memory placement
# table. CONTROL: a frame for the transport itself (header: one kind byte, then
# its data); never passed on.
FLAG_SHM = 0x01
FLAG_CONTROL = 0x02
_CTRL_SHM_OFFER = b"O"  # + u64 most bytes mapped: "you may send me buffers in shared memory"
_CTRL_SHM_RELEASE = b"R"  # + u32 segment ids: "I no longer use these"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

#: What an unadmitted connection may send: one frame of a small header (a
#: Hello) and no buffers.
HELLO_LIMITS = Limits(max_message_size=4096, max_header_size=4096, max_buffers=0)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


FrameHandler = Callable[["Connection", Frame], None]
LostHandler = Callable[["Connection", BaseException | None], None]


class PreAuthGate:
    """Bounds the accepted connections of a listener that have not proven
    themselves yet (handshake and Hello): at most ``limit`` at once (one over
    is closed at once) and each for at most ``timeout`` seconds from accept.

    Args:
        limit: most pre-auth connections at once.
        timeout: seconds a connection has to finish the handshake and Hello.
    """

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.pending: set[Connection] = set()
        self.refused = 0  # connections closed at once, over the limit
        self.expired = 0  # connections closed at the deadline


class BusyPoll:
    """Keeps ``loop`` polling instead of sleeping for ``window`` seconds after
    the last :meth:`poke` (a frame sent or received); 0: off.

    While hot, a callback re-schedules itself each loop iteration (so the loop
    polls its sockets without blocking) and calls ``sched_yield`` (so a pool
    thread or another process sharing the core runs first). Once the window
    passed without a poke, the loop sleeps as usual: an idle agent costs no CPU.
    It also stops while ``paused()`` says so: while this process's own pool
    computes, a spinning loop only takes a core from it (measured: with the
    remote layer's matmul on two intra-op threads and both workers unpinned on
    two cores, a 2 ms window without the pause made the bench step 2.3x
    torch's instead of 1.2x).

    With ``max_window`` above ``window`` the window adapts to the gaps between
    messages, as Linux's haltpoll cpuidle governor does for a vCPU's poll: a
    poke that comes after the loop went to sleep, but within ``max_window`` of
    the last one, shows that a longer window would have saved the wake-up, so
    the window grows to cover that gap (at least doubling, at most
    ``max_window``); a gap longer than ``max_window`` shows that the last
    spin was wasted, so it halves (not below ``window``). A training step's
    gaps (the peer's forward or backward compute) are then polled through,
    while a peer whose compute outlasts ``max_window`` finds the loop back at
    the short window, not spinning beside it.

    With ``max_crowded`` finite, a spin also gives way to the machine's load:
    every 50 µs it asks ``crowded()`` (default: :class:`RunQueue`) whether
    every CPU is wanted, this loop included, and once the samples that said
    so add up to ``max_crowded`` since the last poke, the loop sleeps. A
    spin then takes little from a peer whose compute needs every CPU (its
    intra-op threads), however long the window, while a peer computing on
    one thread beside an idle CPU is polled through the whole window. A spin
    that gave way leaves the window alone (it says nothing of the gap).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        window: float,
        paused: Callable[[], bool] | None = None,
        max_window: float = 0.0,
        max_crowded: float = math.inf,
        crowded: Callable[[], bool] | None = None,
    ) -> None:
        self._loop = loop
        self._window = window
        self._min = window
        self._max = max(window, max_window)
        self._paused = paused
        self._until = 0.0
        self._last = -math.inf  # the last poke
        self._slept = False  # the window ran out (not paused) since the last poke
        self._handle: asyncio.Handle | None = None
        # The load guard (none without a budget): a RunQueue of our own
        # unless given a test.
        self._max_crowded = max_crowded
        self._run_queue: RunQueue | None = None
        if max_crowded == math.inf:
            crowded = None
        elif crowded is None:
            self._run_queue = RunQueue()
            crowded = self._run_queue.crowded
        self._crowded = crowded
        self._crowded_for = 0.0  # seconds of this spin that every CPU was wanted
        self._sampled = 0.0  # when the load was last asked (or the last poke)
        self._gave_way = False  # the spin stopped for the load, not the window

    @property
    def spinning(self) -> bool:
        """Whether the loop is being kept polling now."""
        return self._handle is not None

    @property
    def window(self) -> float:
        """The current window (seconds)."""
        return self._window

    def poke(self) -> None:
        """Stay hot for another window from now."""
        if self._window <= 0:
            return
        now = time.perf_counter()
        if self._slept:
            self._slept = False
            if self._max > self._min and not self._gave_way:
                self._adapt(now - self._last)
        self._gave_way = False
        self._crowded_for = 0.0
        self._sampled = now
        self._last = now
        self._until = now + self._window
        if self._handle is None:
            self._handle = self._loop.call_soon(self._spin)

    def _adapt(self, gap: float) -> None:
        if gap > self._max:
            self._window = max(self._min, self._window / 2)
        elif gap > self._window:
            self._window = min(self._max, max(2 * self._window, 1.25 * gap))

    def close(self) -> None:
        """Stop polling for good (the agent is closing)."""
        self._window = 0.0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._run_queue is not None:
            self._run_queue.close()

    def _give_way(self, crowded: Callable[[], bool], now: float) -> bool:
        """Whether this spin has taken ``max_crowded`` of CPU time that other
        threads wanted (every CPU wanted at the samples since the last poke)."""
        if now - self._sampled < _LOAD_SAMPLE:
            return False
        if crowded():
            self._crowded_for += now - self._sampled
        self._sampled = now
        return self._crowded_for >= self._max_crowded

    def _spin(self) -> None:
        if self._paused is not None and self._paused():
            self._handle = None  # the next poke (the job's reply, say) resumes
            return
        now = time.perf_counter()
        if now < self._until and not self._loop.is_closed():
            crowded = self._crowded
            if crowded is None or not self._give_way(crowded, now):
                os.sched_yield()
                self._handle = self._loop.call_soon(self._spin)
                return
            self._gave_way = True
        self._handle = None
        self._slept = True


# How often a spin with a load guard asks whether the CPUs are crowded (s).
_LOAD_SAMPLE = 50e-6


class RunQueue:
    """Whether every CPU of the machine is wanted now: Linux's count of
    runnable threads (the fourth field of ``/proc/loadavg``, the asking
    thread included) above the online CPUs. One ``pread`` (~0.6 µs). Where
    that file cannot be read, always crowded. ``path``, ``cpus``: for tests."""

    def __init__(self, path: str = "/proc/loadavg", cpus: int | None = None) -> None:
        self._path = path
        self._cpus = cpus or os.cpu_count() or 1
        self._fd: int | None = None  # opened at the first question
        self._closed = False

    def crowded(self) -> bool:
        if self._fd is None:
            if self._closed:
                return True
            try:
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._closed = True  # no such count here: do not try again
                return True
        try:
            running = int(os.pread(self._fd, 128, 0).split()[3].split(b"/")[0])
        except (OSError, IndexError, ValueError):
            return True
        return running > self._cpus

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Connection(asyncio.BufferedProtocol):
    """One framed, full-duplex connection.

    Args:
        limits: frame size limits for what this side receives.
        on_frame: called on the loop with each complete frame, in order.
        on_lost: called once when the connection is closed or lost, with the
            error (None on a clean close).
        auth: ``(run_key, server)``: run the challenge-response of
            :mod:`~aiorpc_autograd.handshake` first, as ``client`` or server,
            keyed by ``run_key`` and bound to the accepting worker ``server``;
            then authenticate every frame.
        client: this side opened the connection.
        shm_threshold: on a Unix socket, send buffers of at least this many
            bytes through shared memory once the peer offers it (0: never).
        shm_copy: copy buffers received through shared memory out of the
            peer's segments at once (safe mode: the peer cannot change them
            afterwards).
        gate: for an accepted connection, the listener's pre-auth bounds:
            the connection is closed at once over its limit, and at its
            deadline unless :meth:`admit` was called by then.
        write_limit: flow control for the side that answers requests: while
            more than this many bytes wait in the transport's write buffer
            (the peer does not read), no further frame is read or delivered,
            until the buffer drained to a quarter of it; 0: off.
        busy_poll: poked on every read and every frame sent (see :class:`BusyPoll`).
    """

    def __init__(
        self,
        limits: Limits,
        on_frame: FrameHandler,
        on_lost: LostHandler,
        auth: tuple[bytes, bytes] | None = None,
        client: bool = False,
        shm_threshold: int = 0,
        shm_copy: bool = False,
        gate: PreAuthGate | None = None,
        write_limit: int = 0,
        busy_poll: BusyPoll | None = None,
    ) -> None:
        self.client = client
        self._busy_poll = busy_poll
        # Flow control (see pause_writing): above this many buffered bytes the
        # connection stops delivering frames; 0: the transport's default limits
        # and no read pause.
        self._write_limit = write_limit
        # Why frames are not delivered now ("writes", or the owner's reasons),
        # and the frames of the last read that arrived meanwhile.
        self._read_pauses: set[str] = set()
        self._held: collections.deque[Frame] = collections.deque()
        self._resume_scheduled = False
        # Requests from this peer being served; kept by the owner (the agent).
        self.serving = 0
        # This side closed it on purpose (close()): its loss says nothing of the peer.
        self.closed_here = False
        self._limits = limits
        # Made after the handshake (with auth); gated to one Hello-sized frame
        # until admit(): a stranger costs a few KiB.
        self._reader: FrameReader | None = None
        self._tx_mac: FrameMac | None = None
        self._gate = gate
        self._deadline: asyncio.TimerHandle | None = None
        self._admitted = False
        # The transport reads nothing while a pause reason holds or the reader
        # holds an unadmitted peer's first frame (see _update_reading).
        self._reading_paused = False
        self._gate_hold = False
        self._shm_threshold = shm_threshold
        self._shm_copy = shm_copy
        # Most bytes of the peer's segments this side maps (announced in its offer).
        self._shm_cap = min(DEFAULT_POOL_BYTES, limits.max_message_size)
        self._shm_tx: ShmSender | None = None
        self._shm_rx: ShmReceiver | None = None
        # Segment ids to report released: appended by finalizers, from any thread.
        self._released: collections.deque[int] = collections.deque()
        self._release_scheduled = False
        self._handshake: ClientHandshake | ServerHandshake | None = None
        self._hs_buf = bytearray()
        if auth is not None:
            key, server = auth
            hs = ClientHandshake if client else ServerHandshake
            self._handshake = hs(key, server)
            self._hs_buf = bytearray(1024)
        else:
            self._reader = self._new_reader(None)
        # The first frame sent in a loop iteration is written at once (a reply
        # or a request waits for no later part of the iteration); those sent
        # after it in the same iteration wait in the outbox and go out in one
        # writelines call at its end: one syscall (and one wake-up of the
        # peer) for a burst instead of one per frame. (Deferring every frame
        # to the iteration's end cost the bench's fused training step 43-59
        # us pinned: four writes on its critical path, each an iteration late.)
        self._outbox: list[bytes | memoryview] = []
        self._burst = False  # a frame went out in this iteration: batch the rest
        self._loop = asyncio.get_running_loop()
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._error: BaseException | None = None
        self.peer: Any = None  # set by the owner once the peer is known
        # Done once connected and (with a token) mutually authenticated.
        self.made: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.made.add_done_callback(retrieve_error)  # accepted connections never await it
        self.last_received = 0.0
        self.probe_sent = 0.0  # when the owner last sent a liveness probe

    # -- asyncio.BaseProtocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        gate = self._gate
        if gate is not None:
            if len(gate.pending) >= gate.limit:
                gate.refused += 1
                self._gate = None
                self.abort(ConnectionLostError("too many unauthenticated connections"))
                return
            gate.pending.add(self)
            self._deadline = self._loop.call_later(gate.timeout, self._expired)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last_received = time.monotonic()
        if self._write_limit > 0:
            self._transport.set_write_buffer_limits(high=self._write_limit)
        if self._handshake is None:
            self._up()
        else:
            self._flush_handshake()

    def _new_reader(self, mac: FrameMac | None) -> FrameReader:
        return FrameReader(
            self._limits,
            scratch_size=_SCRATCH,
            direct_threshold=_DIRECT_THRESHOLD,
            gate=HELLO_LIMITS,
            mac=mac,
        )

    def _expired(self) -> None:
        self._deadline = None
        if self._gate is not None:
            self._gate.expired += 1
        log.info("closing connection from %s: no handshake and Hello in time", self.peer_label)
        self.abort(ProtocolError("the handshake and Hello did not complete in time"))

    def _leave_gate(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._gate is not None:
            self._gate.pending.discard(self)
            self._gate = None

    def _up(self) -> None:
        """Connected (and authenticated)."""
        self.made.set_result(None)

    def _same_user_peer(self) -> int:
        """The peer's pid if it is a process of this user on a Unix socket
        (``SO_PEERCRED``, taken when it connected), else 0."""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None or sock.family != socket.AF_UNIX:
            return 0
        try:
            pid, uid, _ = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
        except OSError:
            return 0
        return pid if pid > 0 and uid == os.geteuid() else 0

    @property
    def admitted(self) -> bool:
        """True once the owner accepted the peer (:meth:`admit`)."""
        return self._admitted

    def admit(self) -> None:
        """Accept the peer (it said a valid Hello): from now on the full limits
        apply, control frames are accepted, and shared memory is offered to a
        same-user peer on a Unix socket. Frames the peer sent after its first
        one are delivered from the next loop iteration on, in order."""
        if self._admitted or self._closed:
            return
        self._admitted = True
        self._leave_gate()
        if self._shm_threshold > 0:
            pid = self._same_user_peer()
            if pid and peer_readable(pid):
                self._shm_rx = ShmReceiver(
                    pid,
                    self._segment_released,
                    self._limits.max_message_size,
                    max_mapped=self._shm_cap,
                    copy=self._shm_copy,
                )
                self.send(_CTRL_SHM_OFFER + _U64.pack(self._shm_cap), [], FLAG_CONTROL)
        self._loop.call_soon(self._open_reader)

    def _open_reader(self) -> None:
        if self._closed or self._reader is None:
            return
        try:
            frames = self._reader.open()
        except (ProtocolError, AuthenticationError) as exc:
            log.warning("dropping connection from %s: %s", self.peer_label, exc)
            self.abort(exc)
            return
        self._gate_hold = False
        self._update_reading()
        self._deliver(frames)

    def _flush_handshake(self) -> None:
        hs = self._handshake
        assert hs is not None and self._transport is not None
        if hs.outgoing:
            self._transport.write(bytes(hs.outgoing))
            hs.outgoing.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._leave_gate()
        self._held.clear()
        error = self._error or exc
        if self._shm_tx is not None:
            self._shm_tx.close()
        if self._shm_rx is not None:
            self._shm_rx.close()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionLostError("connection closed"))
        self._drain_waiters.clear()
        if not self.made.done():
            self.made.set_exception(
                error
                if isinstance(error, AuthenticationError)
                else ConnectionLostError("connection closed")
            )
        self._on_lost(self, error)

    def pause_writing(self) -> None:
        self._paused = True
        if self._write_limit > 0:
            # The peer does not read what we write: read nothing new from it
            # either, so what it can make us buffer stays bounded.
            self.hold_reading("writes", True)

    def resume_writing(self) -> None:
        self._paused = False
        if self._write_limit > 0:
            self.hold_reading("writes", False)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- asyncio.BufferedProtocol --------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._handshake is not None:
            return memoryview(self._hs_buf)
        assert self._reader is not None
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.last_received = time.monotonic()
        if self._busy_poll is not None:
            self._busy_poll.poke()
        if self._outbox:
            # What this turn sent goes out before we spend time on what came
            # in (a request's flush would otherwise wait behind the answer to
            # an earlier notice, read in the same loop iteration).
            self._flush()
        try:
            if self._handshake is not None:
                frames = self._handshake_received(nbytes)
            else:
                assert self._reader is not None
                frames = self._reader.buffer_updated(nbytes)
        except (ProtocolError, AuthenticationError) as exc:
            log.warning("dropping connection from %s: %s", self.peer_label, exc)
            self.abort(exc)
            return
        if self._reader is not None and self._reader.holding:
            # Unadmitted and its one frame is in: read nothing more until the
            # owner admits (or drops) the peer.
            self._gate_hold = True
            self._update_reading()
        self._deliver(frames)

    def _deliver(self, frames: list[Frame]) -> None:
        for frame in frames:
            if self._closed:
                return
            if self._read_pauses or self._held:  # paused by an earlier frame
                self._held.append(frame)
            else:
                self._deliver_one(frame)

    def _deliver_one(self, frame: Frame) -> None:
        if frame.flags:
            try:
                if not self._admitted:
                    raise ProtocolError(f"frame flags {frame.flags:#x} before the Hello")
                if frame.flags == FLAG_CONTROL:
                    self._control(frame.header)
                    return
                frame = self._unplace(frame)
            except ProtocolError as exc:
                log.warning("dropping connection from %s: %s", self.peer_label, exc)
                self.abort(exc)
                return
        self._on_frame(self, frame)

    def hold_reading(self, reason: str, hold: bool) -> None:
        """Stop (``hold``) or resume reading and delivering frames for ``reason``.

        Frames are delivered only while no reason holds them; those of a read
        already received are kept (in order) until then. Idempotent per reason.
        """
        if hold:
            self._read_pauses.add(reason)
            self._update_reading()
            return
        if reason not in self._read_pauses:
            return
        self._read_pauses.discard(reason)
        if not self._read_pauses and not self._resume_scheduled:
            self._resume_scheduled = True  # not from inside a callback of ours
            self._loop.call_soon(self._deliver_held)

    def _deliver_held(self) -> None:
        self._resume_scheduled = False
        while self._held and not self._read_pauses and not self._closed:
            self._deliver_one(self._held.popleft())
        self._update_reading()

    def _update_reading(self) -> None:
        """Pause or resume the transport's reads as the holds say."""
        want = bool(self._read_pauses) or self._gate_hold
        if want == self._reading_paused or self._closed or self._transport is None:
            return
        if self._transport.is_closing():
            return
        self._reading_paused = want
        if want:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    def _unplace(self, frame: Frame) -> Frame:
        if frame.flags != FLAG_SHM:
            raise ProtocolError(f"unknown frame flags {frame.flags:#x}")
        if self._shm_rx is None:
            raise ProtocolError("shared-memory frame on a connection that did not offer it")
        return Frame(0, frame.header, self._shm_rx.take(frame.buffers))

    def _control(self, header: bytes) -> None:
        kind, data = header[:1], header[1:]
        if kind == _CTRL_SHM_OFFER and len(data) == _U64.size:
            # A peer that is not a same-user process on a Unix socket never
            # offers: it cannot open our segments (and must not make us fill them).
            if not self._same_user_peer():
                raise ProtocolError("shared-memory offer on a connection that cannot use it")
            if self._shm_tx is None and self._shm_threshold > 0:  # else: declined
                (cap,) = _U64.unpack(data)
                self._shm_tx = ShmSender(self._shm_threshold, min(DEFAULT_POOL_BYTES, cap))
        elif kind == _CTRL_SHM_RELEASE and len(data) % 4 == 0 and self._shm_tx is not None:
            self._shm_tx.release([i for (i,) in _U32.iter_unpack(data)])
        else:
            raise ProtocolError(f"unknown control frame {bytes(header[:16])!r}")

    def _segment_released(self, seg_id: int) -> None:
        # From a finalizer, in whichever thread dropped the last view (possibly
        # in the middle of other code of this object): no locks, report on the loop.
        self._released.append(seg_id)
        if not self._release_scheduled and not self._closed:
            self._release_scheduled = True
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody to tell
                self._loop.call_soon_threadsafe(self._send_releases)

    def _send_releases(self) -> None:
        self._release_scheduled = False
        ids = []
        with contextlib.suppress(IndexError):
            while True:
                ids.append(self._released.popleft())
        if ids and not self.closed:
            self.send(_CTRL_SHM_RELEASE + b"".join(_U32.pack(i) for i in ids), [], FLAG_CONTROL)

    def _handshake_received(self, nbytes: int) -> list[Frame]:
        hs = self._handshake
        assert hs is not None
        rest = hs.feed(bytes(self._hs_buf[:nbytes]))
        self._flush_handshake()
        if not hs.done:
            return []
        assert hs.session_keys is not None
        send_key, receive_key = hs.session_keys
        self._handshake = None
        self._hs_buf = bytearray()
        self._tx_mac = FrameMac(send_key)
        # A token holder: out of the pre-auth bounds (its Hello may wait for
        # this worker's rendezvous to finish); its reader is still gated to a
        # Hello until admit().
        self._leave_gate()
        self._reader = self._new_reader(FrameMac(receive_key))
        if not self.made.done():
            self._up()
        return self._reader.feed(rest) if rest else []

    def eof_received(self) -> bool:
        return False  # close the transport

    # -- API -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed."""
        return self._closed or self._transport is None or self._transport.is_closing()

    @property
    def shm_stats(self) -> tuple[int, int, int]:
        """Shared-memory segments: this side's (allocated, held by the peer),
        and the peer's whose views are still used here."""
        tx, rx = self._shm_tx, self._shm_rx
        return (
            tx.segments if tx else 0,
            tx.held if tx else 0,
            rx.leased if rx else 0,
        )

    @property
    def peer_label(self) -> str:
        """The peer, for messages: its name when known, else its address."""
        if self.peer is not None:
            return str(getattr(self.peer, "name", self.peer))
        if self._transport is not None:
            return str(self._transport.get_extra_info("peername"))
        return "?"

    def send(self, header: bytes, buffers: Sequence[memoryview | bytes], flags: int = 0) -> None:
        """Write one frame (no copy of the buffers).

        Raises:
            ConnectionLostError: the connection is closed.
        """
        if self.closed:
            raise ConnectionLostError(f"connection to {self.peer_label} is closed")
        if self._handshake is not None:  # no session key yet: nothing may go out
            raise ConnectionLostError(f"connection to {self.peer_label} is not authenticated")
        if self._shm_tx is not None and buffers:
            placed = self._shm_tx.place(buffers)
            if placed is not None:
                buffers = [*placed[0], placed[1]]
                flags |= FLAG_SHM
        chunks = encode_frame(header, buffers, flags, self._tx_mac)
        if self._burst:
            self._outbox += chunks  # written by the flush at the iteration's end
            return
        self._burst = True
        self._loop.call_soon(self.flush)
        self._write(chunks)

    def flush(self) -> None:
        """Write the frames sent so far now, not at the end of this loop turn.
        Nothing is queued after it: the next frame is written at once too (a
        release notice flushed at the end of a training step does not hold
        the next step's forward, sent in the same turn, until the turn ends)."""
        self._flush()
        self._burst = False

    def _flush(self) -> None:
        chunks, self._outbox = self._outbox, []
        if chunks:
            self._write(chunks)

    def _write(self, chunks: list[bytes | memoryview]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(chunks)
            if self._busy_poll is not None:
                self._busy_poll.poke()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._closed:
            raise ConnectionLostError(f"connection to {self.peer_label} is closed")
        if not self._paused:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        """Close after the buffered writes are flushed (:attr:`closed_here`)."""
        self.closed_here = True
        if self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.close()

    def abort(self, error: BaseException | None = None) -> None:
        """Close at once, discarding buffered writes."""
        if error is not None and self._error is None:
            self._error = _detached(error)
        if self._transport is not None:
            self._transport.abort()


def _detached(error: BaseException) -> BaseException:
    """``error`` without its tracebacks (and its causes'): kept by the
    connection, a traceback would hold the frames that handled the bad frame
    -- this connection among them (a cycle only the cyclic collector breaks)
    and the hostile frame's bytes."""
    seen: set[int] = set()
    exc: BaseException | None = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
    return error


def retrieve_error(fut: asyncio.Future[Any]) -> None:
    """A done callback for a future nobody awaits: mark its error as seen
    (asyncio would log it as never retrieved)."""
    if not fut.cancelled():
        fut.exception()


ProtocolFactory = Callable[[], Connection]


async def serve_tcp(
    factory: ProtocolFactory, host: str, port: int = 0, ssl: _ssl.SSLContext | None = None
) -> tuple[asyncio.AbstractServer, int]:
    """Listen on TCP; returns the server and the port it is bound to."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host, port, ssl=ssl, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    return server, int(bound)


async def serve_unix(factory: ProtocolFactory, path: str) -> asyncio.AbstractServer:
    """Listen on a Unix socket (a leading NUL selects Linux's abstract namespace)."""
    loop = asyncio.get_running_loop()
    # Bound here, not by the loop: uvloop refuses abstract-namespace names.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.setblocking(False)
        return await loop.create_unix_server(factory, sock=sock)
    except BaseException:
        sock.close()
        raise


async def connect(
    factory: ProtocolFactory,
    *,
    host: str | None = None,
    port: int | None = None,
    path: str | None = None,
    ssl: _ssl.SSLContext | None = None,
) -> Connection:
    """Open a connection over a Unix socket (``path``) or TCP (``host``, ``port``)."""
    loop = asyncio.get_running_loop()
    if path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
            _, proto = await loop.create_unix_connection(factory, sock=sock)
        except BaseException:
            sock.close()
            raise
    else:
        if host is None or port is None:
            raise ValueError("connect needs a path, or a host and a port")
        _, proto = await loop.create_connection(
            factory, host, port, ssl=ssl, server_hostname=host if ssl else None
        )
    await proto.made
    return proto
