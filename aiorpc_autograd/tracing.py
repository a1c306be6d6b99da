"""Spans of RPCs and backward passes: recording, the profiling wrapper, clocks.

Theory of operation
-------------------
A :class:`Tracer` lives on every agent (``agent.extensions["tracing"]``). The
agent's hot paths make one check, ``agent.tracer is not None`` (the request
path also reads torch's ``_is_profiler_enabled`` flag): ``agent.tracer`` is
the tracer only while this worker records spans (between
:func:`aiorpc_autograd.profiler.start` and ``stop``) or serves a profiled
request, and None otherwise, so profiling off costs two attribute reads.

A traced request is a :class:`CallSpan`. It wraps the request, outermost
(outside the autograd wrapper), in ``RunWithProfilingReq(profiling_id,
config, request)``; the callee runs the wrapped request as it would have (the
handler of :class:`Tracer` dispatches it) while timing the queue, the function
(in the pool or on the loop) and the reply's serialisation, and answers
``RunWithProfilingResp(profiling_id, events, response)`` where ``events`` is
``[t1, t2, name, spans]``: its clock when it took the request and when it
answered, the name of what it ran, and (when ``config["ship"]``) its spans for
that call, nested calls' included. The caller takes ``t0`` (the write) and
``t3`` (the answer) on its own clock, so every profiled call is an NTP sample:
``offset = ((t1 - t0) + (t2 - t3)) / 2``, exact to within half of
``(t3 - t0) - (t2 - t1)``. The callee's spans come back converted to the
caller's clock with that call's offset.

``config`` asks for ``ship`` (return the spans) and ``ops`` (record torch op
events of the function with the thread-local legacy profiler); a config with
``cmd`` instead is a control request of the group timeline (``start``,
``stop``, ``fetch``, ``ping``; see :mod:`aiorpc_autograd.profiler`) answered
at once on the loop.

A span is a list ``[worker, track, name, category, start_ns, end_ns, args]``
(it travels in columns: :func:`pack_spans`); ``track`` groups a worker's spans into rows
(``calls``, ``serving``, ``backward``); times are :func:`time.perf_counter_ns`
(``CLOCK_MONOTONIC`` on Linux) plus ``skew_ns`` (tests shift it to play a
host with another clock). Under ``torch.profiler`` the caller's spans are also
``record_function`` ranges, and the spans that came back are kept for
:func:`aiorpc_autograd.profiler.export_chrome_trace`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import json
import pickletools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import torch.autograd.profiler as torch_profiler
import torch.autograd.profiler_legacy as torch_profiler_legacy

from .codec import (
    BackwardAbortReq,
    BackwardStartReq,
    ForwardAutogradReq,
    Heartbeat,
    Message,
    Payload,
    PayloadKind,
    PropagateGradientsReq,
    PythonCall,
    PythonRemoteCall,
    RRefAck,
    RRefBackwardReq,
    RRefChildAccept,
    RRefFetchCall,
    RRefForkRequest,
    RRefUserDelete,
    RunWithProfilingReq,
    RunWithProfilingResp,
)
from .errors import ProtocolError, RemoteError
from .options import WorkerInfo

if TYPE_CHECKING:
    from .agent import RpcAgent, _Pending

__all__ = [
    "CallSpan",
    "Span",
    "Tracer",
    "current_serve",
    "pack_spans",
    "tracer_of",
    "unpack_spans",
    "valid_span",
]

Span = list[Any]  # [worker, track, name, category, start_ns, end_ns, args]

# The profiled request this task or thread is serving (nested calls report into it).
current_serve: contextvars.ContextVar[_Serve | None] = contextvars.ContextVar(
    "aiorpc_autograd_serve", default=None
)

MAX_SPANS = 2_000_000  # per worker and recording window; beyond, spans are counted, not kept
MAX_OPS = 900  # torch op events shipped back per profiled call
# Spans shipped back with one answer: the decoder takes arrays of up to
# max(max_tensors, 1024) items, and spans travel in columns.
MAX_SHIP = 1_000
MAX_TORCH_CALLS = 200_000  # calls kept for export_chrome_trace


def tracer_of(agent: RpcAgent) -> Tracer | None:
    """The tracer to report to, when anything listens (recording, serving a
    profiled request, or ``torch.profiler`` on); else None."""
    if agent.tracer is not None:
        return agent.tracer
    if torch_profiler._is_profiler_enabled:
        tracer: Tracer | None = agent.extensions.get("tracing")
        return tracer
    return None


# --------------------------------------------------------------------------- names


def _pickled_name(data: bytes) -> str | None:
    """The qualified name of the callable a pickled ``(func, args, kwargs)``
    starts with, read from the first opcodes (nothing is unpickled)."""
    strings: list[str] = []
    found: list[str] = []
    try:
        for i, (op, arg, _) in enumerate(pickletools.genops(data)):
            if i > 40:
                break
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
                if len(found) == 2 and found[0] == "builtins.getattr":
                    return f"{found[1]}.{arg}"
            elif op.name in ("STACK_GLOBAL", "GLOBAL"):
                if op.name == "GLOBAL":
                    module, name = str(arg).split(" ", 1)
                elif len(strings) >= 2:
                    module, name = strings[-2], strings[-1]
                else:
                    return None
                found.append(f"{module}.{name}")
                if found[0] != "builtins.getattr":
                    return found[0]
    except Exception:  # a payload the walk does not follow: no name
        return None
    return None


# Calls whose pickle does not name what runs: the callee's name replaces these.
_UNNAMED = "<pickled>"
_GENERIC = frozenset({_UNNAMED, "aiorpc_autograd.rref._invoke_method"})


def call_label(message: Message) -> tuple[str, str]:
    """(prefix, what) naming the call ``message`` makes, as in
    ``rpc_async#<what>``."""
    if isinstance(message, ForwardAutogradReq):
        message = message.wrapped
    if isinstance(message, PythonCall | PythonRemoteCall):
        prefix = "rpc_async" if isinstance(message, PythonCall) else "remote"
        if message.target is not None:
            return prefix, message.target
        payload = message.value
        name = None
        if isinstance(payload, Payload) and payload.kind == PayloadKind.PICKLE:
            name = _pickled_name(payload.data)
        return prefix, name or _UNNAMED
    labels: dict[type[Message], tuple[str, str]] = {
        RRefFetchCall: ("to_here", "RRef"),
        PropagateGradientsReq: ("backward", "gradients"),
        BackwardStartReq: ("backward", "start"),
        BackwardAbortReq: ("backward", "abort"),
        RRefUserDelete: ("rref", "delete"),
        RRefForkRequest: ("rref", "fork"),
        RRefChildAccept: ("rref", "accept_child"),
        RRefBackwardReq: ("rref", "backward"),
        Heartbeat: ("heartbeat", "ping"),
    }
    return labels.get(type(message), ("rpc", type(message).__name__))


def _call_args(message: Message) -> dict[str, Any]:
    """Arguments worth showing on a call's span (autograd ids, gradient counts)."""
    args: dict[str, Any] = {}
    if isinstance(message, ForwardAutogradReq):
        args["context_id"] = message.context_id
        args["autograd_message_id"] = message.message_id
        message = message.wrapped
    if isinstance(message, PropagateGradientsReq):
        args["context_id"] = message.context_id
        args["send_function"] = message.message_id
        args["gradients"] = sum(1 for t in message.grads.tensors if t is not None)
    return args


def function_name(func: Any, args: tuple[Any, ...] = ()) -> str:
    """``module.qualname`` of a callable (``RRef.<method>`` for RRef proxies)."""
    module = getattr(func, "__module__", None) or ""
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    if module == "aiorpc_autograd.rref" and qualname == "_invoke_method" and len(args) > 1:
        return f"RRef.{args[1]}"
    return f"{module}.{qualname}" if module else qualname


def valid_span(span: Any) -> bool:
    """Whether ``span`` (from a peer) has the shape of a span."""
    return (
        type(span) is list
        and len(span) == 7
        and all(type(v) is str for v in span[:4])
        and type(span[4]) is int
        and type(span[5]) is int
        and type(span[6]) is dict
    )


def pack_spans(spans: list[Span]) -> list[list[Any]]:
    """Spans as they travel: seven columns (worker, track, name, category,
    start, end, args as JSON), so a message of many spans holds eight msgpack
    arrays rather than two per span (the decoder allows one per 256 bytes)."""
    columns: list[list[Any]] = [[], [], [], [], [], [], []]
    for span in spans:
        for i in range(6):
            columns[i].append(span[i])
        columns[6].append(json.dumps(span[6], separators=(",", ":")) if span[6] else "")
    return columns


def unpack_spans(columns: Any) -> list[Span]:
    """The spans of :func:`pack_spans` (a peer's data: malformed ones are left out)."""
    if type(columns) is not list or len(columns) != 7:
        return []
    if any(type(c) is not list or len(c) != len(columns[0]) for c in columns):
        return []
    spans: list[Span] = []
    for worker, track, name, cat, start, end, raw in zip(*columns, strict=True):
        span = [worker, track, name, cat, start, end, {}]
        if type(raw) is str and raw:
            try:
                span[6] = json.loads(raw)
            except ValueError:
                continue
        if valid_span(span):
            spans.append(span)
    return spans


def _payload_bytes(message: Message | None) -> int:
    payload = message.payload() if message is not None else None
    if payload is None:
        return 0
    return len(payload.data) + sum(t.nbytes for t in payload.tensors if t is not None)


# --------------------------------------------------------------------------- spans


class CallSpan:
    """One traced request on the caller: timestamps, sizes, and the callee's
    answer. Created by :meth:`Tracer.begin_call`, driven by the agent."""

    __slots__ = (
        "args",
        "bytes_in",
        "bytes_out",
        "decode_span",
        "name",
        "ops",
        "parent",
        "profiling_id",
        "record",
        "remote",
        "rf",
        "ship",
        "t0",
        "t_enc",
        "t_resp",
        "t_write",
        "to",
        "tracer",
        "what",
    )

    def __init__(
        self,
        tracer: Tracer,
        to: WorkerInfo,
        message: Message,
        parent: _Serve | None,
        torch_on: bool,
    ) -> None:
        self.tracer = tracer
        self.to = to
        prefix, what = call_label(message)
        self.name = f"{prefix}#{what}({tracer.worker} -> {to.name})"
        self.what = what
        self.profiling_id = [tracer.worker_id, next(tracer.ids)]
        self.parent = parent
        self.ship = torch_on or (parent is not None and parent.ship)
        self.ops = torch_on or (parent is not None and parent.ops)
        self.record = tracer.recording
        self.args = _call_args(message)
        self.rf: Any = None
        if torch_on:
            self.rf = torch_profiler.record_function(self.name)
            self.rf.__enter__()
        self.t0 = tracer.now()
        self.t_enc = self.t_write = self.t_resp = 0
        self.decode_span: tuple[int, int] | None = None
        self.bytes_out = self.bytes_in = 0
        self.remote: list[Any] | None = None  # the callee's events

    def wrap(self, message: Message) -> Message:
        """The request as sent: ``message`` inside the profiling wrapper."""
        config = {"ship": self.ship, "ops": self.ops}
        return RunWithProfilingReq(self.profiling_id, config, message)

    def encoded(self, header: bytes, buffers: list[memoryview]) -> None:
        """The request is serialised."""
        self.t_enc = self.tracer.now()
        self.bytes_out = len(header) + sum(b.nbytes for b in buffers)

    def start(self, pending: _Pending) -> None:
        """The request is registered as pending: follow it to its end."""
        pending.span = self
        decode = pending.decode

        def timed_decode(message: Message) -> Any:
            start = self.tracer.now()
            try:
                return decode(message)
            finally:
                self.decode_span = (start, self.tracer.now())

        pending.decode = timed_decode
        self.tracer.inflight[(self.profiling_id[0], self.profiling_id[1])] = self
        pending.future.add_done_callback(self.finish)

    def written(self) -> None:
        """The request was handed to its connection (after any wait for it)."""
        self.t_write = self.tracer.now()

    def answered(self, events: list[Any], inner: Message) -> None:
        """The callee's answer arrived with its ``events``."""
        self.t_resp = self.tracer.now()
        self.bytes_in = _payload_bytes(inner)
        if len(events) == 4 and all(type(t) is int for t in events[:2]):
            self.remote = events
            t1, t2, name = events[0], events[1], events[2]
            sent = self.t_write or self.t_enc
            self.tracer.clock_sample(self.to.name, sent, t1, t2, self.t_resp)
            if isinstance(name, str) and name and self.what in _GENERIC:
                self.name = self.name.replace(self.what, name)

    def finish(self, fut: asyncio.Future[Any]) -> None:
        """The call is over (answered, failed, timed out): emit its spans."""
        tracer = self.tracer
        end = tracer.now()
        tracer.inflight.pop((self.profiling_id[0], self.profiling_id[1]), None)
        if fut.cancelled():
            status = "cancelled"
        else:
            exc = fut.exception()
            if exc is None:
                status = "ok"
            elif isinstance(exc, RemoteError):
                status = f"remote {exc.type_name}"
            else:
                status = type(exc).__name__
        if self.rf is not None:
            try:
                self.rf.__exit__(None, None, None)
            except Exception:  # the profiler went away meanwhile: the spans still count
                self.rf = None
        me = tracer.worker
        flow = f"{self.profiling_id[0]}:{self.profiling_id[1]}"
        args = {
            "peer": self.to.name,
            "status": status,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "flow": flow,
            **self.args,
        }
        t_enc = self.t_enc or end
        spans: list[Span] = [[me, "calls", self.name, "rpc_call", self.t0, end, args]]
        spans.append([me, "calls", "serialise", "rpc_phase", self.t0, t_enc, {}])
        sent = self.t_write or t_enc
        if self.t_write:
            spans.append([me, "calls", "queued before write", "rpc_phase", t_enc, sent, {}])
        got = self.t_resp or end
        spans.append([me, "calls", "wait for reply", "rpc_phase", sent, got, {}])
        if self.t_resp:
            args["reply_after_ns"] = self.t_resp - self.t0  # where the answer's arrow lands
        if self.decode_span is not None:
            s, e = self.decode_span
            spans.append([me, "calls", "deserialise", "rpc_phase", s, e, {}])
        remote: list[Span] = []
        if self.remote is not None:
            t1, t2, _, shipped = self.remote
            offset = tracer.call_offset(sent, t1, t2, got)
            for sp in unpack_spans(shipped):
                remote.append([*sp[:4], sp[4] - offset, sp[5] - offset, sp[6]])
        if self.record:
            tracer.emit(spans)
        parent = self.parent
        if parent is not None and parent.ship:
            parent.shipped.extend(spans)
            parent.shipped.extend(remote)
        if self.rf is not None and len(tracer.torch_calls) < MAX_TORCH_CALLS:
            name = self.rf.name  # the range's, as the profiler recorded it
            tracer.torch_calls.append((name, self.t0, end, self.to.name, flow, remote))


class _Serve:
    """One profiled request being served here."""

    __slots__ = (
        "caller",
        "fn_end",
        "fn_name",
        "fn_start",
        "ops",
        "profiling_id",
        "ship",
        "shipped",
        "t1",
        "where",
    )

    def __init__(self, caller: str, profiling_id: list[int], config: dict[str, Any], t1: int):
        self.caller = caller
        self.profiling_id = profiling_id
        self.ship = bool(config.get("ship"))
        self.ops = bool(config.get("ops"))
        self.t1 = t1
        self.fn_name = ""
        self.where = ""
        self.fn_start = self.fn_end = 0
        self.shipped: list[Span] = []


# --------------------------------------------------------------------------- the tracer


class Tracer:
    """Spans of one agent, and the handler of the profiling wrapper.

    Attributes:
        recording: spans go to this worker's buffer (the group timeline).
        spans: that buffer.
        dropped: spans not kept (the buffer was full).
        skew_ns: added to every timestamp (tests: a host with another clock).
        offsets: per peer, the best NTP sample ``(delay_ns, offset_ns)``.
        torch_calls: traced calls made under ``torch.profiler``, with the
            spans that came back, for ``export_chrome_trace``.
    """

    def __init__(self, agent: RpcAgent) -> None:
        self.agent = agent
        self.worker = agent.info.name
        self.worker_id = agent.info.id
        self.recording = False
        self.spans: list[Span] = []
        self.dropped = 0
        self.skew_ns = 0
        self.ids = itertools.count(1)
        self.inflight: dict[tuple[int, int], CallSpan] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.torch_calls: list[tuple[str, int, int, str, str, list[Span]]] = []
        self._serving = 0
        self._lock = threading.Lock()

    @classmethod
    def install(cls, agent: RpcAgent) -> Tracer:
        """Create the tracer and hook it into ``agent``."""
        self = cls(agent)
        agent.handlers[RunWithProfilingReq] = self._on_profiled
        agent.response_unwrappers[RunWithProfilingResp] = self._unwrap
        agent.extensions["tracing"] = self
        return self

    # -- clock and buffer ----------------------------------------------------------

    def now(self) -> int:
        """This worker's profiling clock, in nanoseconds."""
        return time.perf_counter_ns() + self.skew_ns

    def emit(self, spans: list[Span]) -> None:
        """Keep ``spans`` in this worker's buffer (when recording)."""
        if not self.recording:
            return
        if len(self.spans) + len(spans) > MAX_SPANS:
            self.dropped += len(spans)
            return
        self.spans.extend(spans)

    def _update(self) -> None:
        # The agent's hot-path check: on while recording or serving a profiled call.
        self.agent.tracer = self if self.recording or self._serving else None

    def set_recording(self, on: bool) -> None:
        """Start (clearing the buffer) or stop recording spans here."""
        if on:
            self.spans = []
            self.dropped = 0
            self.offsets.clear()
        self.recording = on
        self._update()

    # -- clocks --------------------------------------------------------------------

    @staticmethod
    def call_offset(t0: int, t1: int, t2: int, t3: int) -> int:
        """The callee's clock minus ours, from one exchange (NTP)."""
        return ((t1 - t0) + (t2 - t3)) // 2

    def clock_sample(self, peer: str, t0: int, t1: int, t2: int, t3: int) -> None:
        """Keep the exchange with the least delay per peer: its offset is the
        most exact (to within half that delay)."""
        delay = (t3 - t0) - (t2 - t1)
        best = self.offsets.get(peer)
        if best is None or delay < best[0]:
            self.offsets[peer] = (delay, self.call_offset(t0, t1, t2, t3))

    # -- the caller's side -------------------------------------------------------------

    def begin_call(self, to: WorkerInfo, message: Message) -> CallSpan | None:
        """A span for the request ``message`` to ``to``, or None when nobody
        listens for it (nor for control requests, already wrapped)."""
        if isinstance(message, RunWithProfilingReq):
            return None
        torch_on = torch_profiler._is_profiler_enabled
        parent = current_serve.get()
        if not (self.recording or torch_on or parent is not None):
            return None
        return CallSpan(self, to, message, parent, torch_on)

    def _unwrap(self, peer: int, message: Message) -> Message:
        assert isinstance(message, RunWithProfilingResp)
        pid = message.profiling_id
        span = self.inflight.get((pid[0], pid[1])) if pid[0] == self.worker_id else None
        if span is None:
            return message  # a control request's answer: the caller decodes it whole
        inner = message.wrapped
        span.answered(message.events, inner)
        unwrap = self.agent.response_unwrappers.get(type(inner))
        if unwrap is not None and not isinstance(inner, RunWithProfilingResp):
            inner = unwrap(peer, inner)
        return inner

    # -- the callee's side ---------------------------------------------------------------

    def _on_profiled(self, message: Message) -> Message | Awaitable[Message]:
        assert isinstance(message, RunWithProfilingReq)
        t1 = self.now()
        command = message.config.get("cmd")
        if command is not None:
            events = [t1, 0, "", self._control(command, message.config)]
            events[1] = self.now()
            return RunWithProfilingResp(message.profiling_id, events, RRefAck())
        return self._serve(message, t1)

    def _control(self, command: Any, config: dict[str, Any]) -> Any:
        """The group timeline's requests; see :mod:`aiorpc_autograd.profiler`."""
        if command == "ping":
            return []
        if command == "start":
            self.set_recording(True)
            return []
        if command == "stop":
            self.set_recording(False)
            return [len(self.spans), self.dropped]
        if command == "fetch":
            first, count = config.get("first", 0), config.get("count", 0)
            if type(first) is not int or type(count) is not int:
                raise ProtocolError("malformed profiler fetch")
            return pack_spans(self.spans[first : first + count])
        raise ProtocolError(f"unknown profiler command {command!r}")

    def _serve(self, message: RunWithProfilingReq, t1: int) -> Awaitable[Message]:
        """Run the wrapped request's handler now, as if it came unwrapped (its
        arguments are decoded in the order frames arrive: an RRef in them
        before a later delete of it), in the serve's scope; answer once done."""
        inner = message.wrapped
        caller = self.agent.worker_info(message.profiling_id[0]).name
        serve = _Serve(caller, message.profiling_id, message.config, t1)
        token = current_serve.set(serve)
        self._serving += 1
        self._update()
        outcome: Message | asyncio.Future[Message] | Exception
        try:
            handler = self.agent.handlers.get(type(inner))
            if handler is None or isinstance(inner, RunWithProfilingReq):
                raise ProtocolError(f"cannot profile {type(inner).__name__}")
            result = handler(inner)
            # A coroutine's Task starts here, in the serve's scope.
            outcome = result if isinstance(result, Message) else asyncio.ensure_future(result)
        except Exception as exc:
            outcome = exc
        finally:
            current_serve.reset(token)
        return self._answer(message, serve, outcome)

    async def _answer(
        self,
        message: RunWithProfilingReq,
        serve: _Serve,
        outcome: Message | asyncio.Future[Message] | Exception,
    ) -> Message:
        from .agent import exception_message  # the agent layer's error format

        inner, t1 = message.wrapped, serve.t1
        status = "ok"
        try:
            if isinstance(outcome, Exception):
                raise outcome
            result = outcome if isinstance(outcome, Message) else await outcome
        except asyncio.CancelledError:
            if isinstance(outcome, asyncio.Future):
                outcome.cancel()
            raise
        except Exception as exc:
            status = type(exc).__name__
            result = exception_message(self.agent.info.name, exc)
        finally:
            self._serving -= 1
            self._update()
        t_result = self.now()
        prefix, what = call_label(inner)  # named as the caller names it
        if what in _GENERIC:
            what = serve.fn_name or what
        name = f"{prefix}#{what}({serve.caller} -> {self.worker})"
        me = self.worker
        flow = f"{serve.profiling_id[0]}:{serve.profiling_id[1]}"
        args = _call_args(inner)  # for gradients: the send function they are for
        t2 = self.now()
        spans: list[Span] = [
            [me, "serving", name, "rpc_serve", t1, t2, {"status": status, "flow": flow, **args}]
        ]
        if serve.fn_start:
            fn_end = serve.fn_end or t_result
            spans.append([me, "serving", "queued", "rpc_phase", t1, serve.fn_start, {}])
            run = f"run {serve.fn_name} ({serve.where})"
            spans.append([me, "serving", run, "rpc_run", serve.fn_start, fn_end, {}])
            spans.append([me, "serving", "serialise reply", "rpc_phase", fn_end, t_result, {}])
        self.emit(spans)
        shipped: list[Span] = []
        if serve.ship:
            shipped = (spans + serve.shipped)[:MAX_SHIP]
        events = [t1, t2, what, pack_spans(shipped)]
        return RunWithProfilingResp(message.profiling_id, events, result)

    def wrap_function(self, func: Any, args: tuple[Any, ...]) -> Any:
        """``func`` timed (and its torch ops recorded when asked) if it runs for
        a profiled request; else ``func`` itself."""
        serve = current_serve.get()
        if serve is None or serve.fn_name:
            return func
        serve.fn_name = function_name(func, args)
        label = serve.fn_name
        tracer = self
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def timed_async(*a: Any, **kw: Any) -> Any:
                serve.where = "loop"
                serve.fn_start = tracer.now()
                try:
                    return await func(*a, **kw)
                finally:
                    serve.fn_end = tracer.now()

            return timed_async

        def timed(*a: Any, **kw: Any) -> Any:
            on_loop = threading.current_thread() is threading.main_thread()
            serve.where = "loop" if on_loop else "pool"
            if not serve.ops or torch_profiler._is_profiler_enabled:
                # (A profiler on in this process records the ops itself.)
                return tracer._timed_call(serve, func, a, kw)
            prof = torch_profiler_legacy.profile()  # type: ignore[no-untyped-call]
            anchor = 0
            try:
                with prof:
                    # The range's own timestamp is taken early in its (at first
                    # slow) __enter__: align on the time just before it.
                    anchor = tracer.now()
                    with torch_profiler.record_function(label):
                        return tracer._timed_call(serve, func, a, kw)
            finally:
                if anchor:
                    serve.fn_start = anchor  # the run includes the range's own start-up
                    tracer._ship_ops(serve, label, prof, anchor)

        return timed

    def _timed_call(
        self, serve: _Serve, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        serve.fn_start = self.now()
        try:
            return func(*args, **kwargs)
        finally:
            serve.fn_end = self.now()

    def _ship_ops(self, serve: _Serve, label: str, prof: Any, anchor_ns: int) -> None:
        """Torch op events of one profiled run, aligned on its own range."""
        try:
            events = list(prof.function_events)
        except Exception:  # the profiler failed: the spans still go
            return
        anchor = next((e for e in events if e.name == label), None)
        if anchor is None:
            return
        base = anchor_ns - int(anchor.time_range.start * 1000)
        me = self.worker
        for e in events[:MAX_OPS]:
            if e is anchor:
                continue
            serve.shipped.append(
                [
                    me,
                    "torch ops",
                    e.name,
                    "cpu_op",
                    base + int(e.time_range.start * 1000),
                    base + int(e.time_range.end * 1000),
                    {},
                ]
            )

    # -- distributed autograd --------------------------------------------------------------

    def timed_job(
        self, job: Callable[[], Any], name: str, args: dict[str, Any]
    ) -> Callable[[], Any]:
        """An engine job that records its span (and a torch range) where it runs."""
        torch_on = torch_profiler._is_profiler_enabled

        def run() -> Any:
            start = self.now()
            try:
                if torch_on:
                    with torch_profiler.record_function(f"dist_autograd#{name}"):
                        return job()
                return job()
            finally:
                span = [self.worker, "backward", name, "autograd_job", start, self.now(), args]
                self.emit([span])

        return run

    def pass_span(self, done: asyncio.Future[Any], name: str, args: dict[str, Any]) -> None:
        """A span from now until ``done`` (a worker's part of a backward pass)."""
        start = self.now()

        def finished(fut: asyncio.Future[Any]) -> None:
            ok = not fut.cancelled() and fut.exception() is None
            span_args = {**args, "status": "ok" if ok else "error"}
            self.emit([[self.worker, "backward", name, "autograd", start, self.now(), span_args]])

        done.add_done_callback(finished)

    def ping_message(self, command: str, **config: Any) -> RunWithProfilingReq:
        """A control request of the group timeline."""
        return RunWithProfilingReq(
            [self.worker_id, next(self.ids)], {"cmd": command, **config}, Heartbeat()
        )
