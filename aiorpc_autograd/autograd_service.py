"""The agent side of distributed autograd: wrapping, handlers, pass runs.

Installs on an :class:`~aiorpc_autograd.agent.RpcAgent`:

* a request wrapper: inside a context, a call (``PythonCall``, remote call,
  RRef fetch) goes out as ``ForwardAutogradReq``, recording a send function
  when any of its tensors requires grad, and always recording the peer;
* handlers for ``ForwardAutogradReq`` (record the recv function, run the
  wrapped request inside the context, wrap the response when its tensors
  require grad), ``PropagateGradientsReq``, ``CleanupAutogradContextReq``,
  ``BackwardStartReq`` and ``BackwardAbortReq``;
* an unwrapper for ``ForwardAutogradResp`` (record the recv function).

A pass on one worker is a :class:`_PassRun`: the engine's
:class:`~aiorpc_autograd.autograd.BackwardPass` plus the requests it sent.
It is done when the engine is done and every request it sent was answered;
the request that first reached this worker for the pass (a
``BackwardStartReq`` or a ``PropagateGradientsReq``) is answered then, so the
root's ``backward`` returns only when every worker's part is done. A worker
starting its part sends ``BackwardStartReq`` to the workers it knows in the
context except those it will send gradients to without waiting on anyone (the
peers of recv functions that only the local roots reach, or none: every recv
function answers once per pass): those get their start with the gradients,
which saves the start round trip of a training step.

Step in backward: a pass may carry an optimizer plan (the optimizer's id and
its owners). An owner steps its local optimizer (registered here by
:mod:`aiorpc_autograd.optim`) with the context's gradients as soon as its
engine is done (its gradients in the context are final), before its part of
the pass counts as done.

Failures: a worker learns that a peer is gone through the agent's
``peer_gone_hooks`` (it probes the creators and participants of the contexts it
holds, see ``liveness_watchers``). Then every pass of a context that peer took
part in fails here and is aborted onward (the abort names the lost worker, so
the root raises a :class:`ConnectionLostError` naming it); a context whose
creator is gone is released here (each holder watches the creator); a context whose
every link here is gone, or that the gone peer made here, is released here
(no release can reach it any more). Contexts a peer makes here are capped per
peer (``RpcOptions.max_peer_contexts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch

from . import codec
from .agent import RpcAgent
from .autograd import (
    _ID_BITS,
    BackwardPass,
    ContextContainer,
    DistAutogradContext,
    RecvFunction,
    SendFunction,
    WouldBlock,
    current_context_id,
    no_waiting,
)
from .codec import (
    BackwardAbortReq,
    BackwardStartReq,
    BackwardStartResp,
    CleanupAutogradContextReq,
    ForwardAutogradReq,
    ForwardAutogradResp,
    Message,
    PropagateGradientsReq,
    PropagateGradientsResp,
    PythonCall,
    PythonRemoteCall,
    RRefFetchCall,
)
from .devices import inverse
from .errors import ConnectionLostError, RemoteError, ResourceLimitError, RpcError, remote_error
from .options import WorkerInfo
from .pool import raisable
from .tracing import tracer_of
from .transport import Connection

__all__ = ["AutogradService", "JobCosts"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# Requests always wrapped inside a context: their results may require grad even
# when their arguments do not (PyTorch's forceGradRecording).
_ALWAYS_WRAPPED = (PythonCall, PythonRemoteCall, RRefFetchCall)


def _grad_tensors(message: Message) -> list[torch.Tensor]:
    payload = message.payload()
    if payload is None:
        return []
    return [t for t in payload.tensors if t is not None and t.requires_grad]


class _PassRun:
    """One worker's part of one pass: the engine plus its outstanding requests."""

    def __init__(
        self,
        service: AutogradService,
        ctx: DistAutogradContext,
        pass_id: int,
        plan: list[int] | None = None,
    ) -> None:
        self.service = service
        self.ctx = ctx
        self.pass_id = pass_id
        # Step in backward: [optimizer id, owner worker ids...], or [].
        self.plan: list[int] = list(plan or [])
        self.engine: BackwardPass | None = None
        self.outstanding: set[asyncio.Future[Any]] = set()
        self.engine_done = False
        self.error: BaseException | None = None
        self.done: asyncio.Future[None] = service.agent.loop.create_future()
        self.done.add_done_callback(_ignore_result)  # awaited only when owned
        self.owned = False  # a BackwardStartReq (or the root) waits on this run

    # -- PassIO ----------------------------------------------------------------

    def propagate(self, recv: RecvFunction, grads: list[torch.Tensor | None] | None) -> None:
        assert self.engine is not None
        msg = PropagateGradientsReq(
            self.ctx.context_id(),
            recv.message_id,
            codec.tensor_payload(grads or []),
            self.engine.retain_graph,
            self.service.agent.info.id,
            self.pass_id,
            self.plan,
        )
        self.track(self.service.send(recv.peer, msg, recv.device_map))

    def compute(
        self,
        job: Callable[[], list[torch.Tensor | None]],
        done: Callable[[Any], None],
        kind: Hashable = None,
    ) -> None:
        tracer = tracer_of(self.service.agent)
        if tracer is not None:
            args = {"context_id": self.ctx.context_id(), "pass_id": self.pass_id}
            job = tracer.timed_job(job, "engine job", args)
        fut = self.service.run_job(("engine", kind), job)

        def finished(f: asyncio.Future[list[torch.Tensor | None]]) -> None:
            done(f.exception() if f.exception() is not None else f.result())

        fut.add_done_callback(finished)

    def finished(self, error: BaseException | None) -> None:
        self.engine_done = True
        if error is not None:
            self.fail(error)
        elif self.steps_here() and not (self.engine and self.engine.ran_after_last_job):
            # This owner's gradients in the context are final: step now (if
            # the engine's last job did not already).
            step = self.service.step_local_optimizer(self.plan[0], self.ctx.context_id())
            self.track(asyncio.ensure_future(step))
        self._check()

    def steps_here(self) -> bool:
        """Whether this worker steps an optimizer in this pass."""
        return bool(self.plan) and self.service.agent.info.id in self.plan[1:]

    # -- bookkeeping -----------------------------------------------------------

    def track(self, fut: asyncio.Future[Any]) -> None:
        self.outstanding.add(fut)
        fut.add_done_callback(self._request_done)

    def _request_done(self, fut: asyncio.Future[Any]) -> None:
        self.outstanding.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            self.fail(fut.exception())  # type: ignore[arg-type]
        self._check()

    def fail(self, error: BaseException) -> None:
        """Stop this run: the engine (if still going) and the wait for answers."""
        if self.error is None:
            self.error = error
        if self.engine is not None and not self.engine.done:
            self.engine.abort(error)  # reports back through finished()
        self._check()

    def _check(self) -> None:
        if self.done.done():
            return
        if self.error is not None or (self.engine_done and not self.outstanding):
            self.ctx.finished_passes.setdefault(self.pass_id, self.error)
            if self.ctx.current_pass is self.engine:
                self.ctx.current_pass = None
            if self.error is not None:
                self.done.set_exception(self.error)
            else:
                self.done.set_result(None)
            # The engine points back here (its I/O): drop the run's side of
            # that cycle, so the context (its graph, saved tensors and
            # gradients) is freed by reference counting when it is released,
            # not at the next full collection.
            self.engine = None


# A job kind measured under this many seconds runs on the event loop while
# the pool computes something else: the pool hop costs 40-80 us here (a
# thread wake-up there, a loop wake-up back, a GIL hand-off each way: the
# bench step's caller-side job took 100 us in the pool for ~45 us of work),
# and holding the loop this long delays other frames by no more than decoding
# a mid-size message does.
INLINE_BELOW_S = 200e-6
# When a hop would buy no parallelism, longer jobs run inline too: on a worker
# confined to one CPU (the pool and the loop take turns on it), or while the
# pool is idle (the job would run there alone); the hop then buys only the
# loop's freedom to read other frames meanwhile. Pinned A/B of the bench's
# step in backward: the worker's backward 1.00-1.03 -> 0.92-0.97 ms. Unpinned
# (2-vCPU VM, interleaved launches, medians of step overhead; README, Design):
# classic step 2.56 -> 2.25 ms, step in backward 2.17 -> 1.86, MLP depth 1
# 1.78 -> 1.53 and depth 64 31.2 -> 18.8, and no launch's classic step in the
# slow mode (6-9 ms) that 8 of 22 launches hit with the worker's backward job
# in the pool. 10 ms: with 2 ms a 64-layer MLP's backward (1.8 ms) went to
# the pool after each run slowed past the bound and came back only runs
# later, paying the hop (+50-100 us) in a third to two thirds of the steps; a
# loop held 10 ms still answers heartbeats in time.
INLINE_BELOW_IDLE_S = 10e-3

# A context released by a peer is dropped within this many seconds, and at
# most this many wait (see AutogradService._drop_later).
DROP_WITHIN_S = 5e-3
DROP_HELD_MAX = 8


class _KindStats:
    """What :class:`JobCosts` knows of one kind of job."""

    __slots__ = ("best_one", "best_own", "cost", "runs")

    def __init__(self, seconds: float) -> None:
        self.cost = seconds  # the estimate that places the job (loop or pool)
        self.runs = 1  # since the last trial began (the first run: a warm-up)
        self.best_own = float("inf")  # fastest trial run on the thread's own intra-op threads
        self.best_one = float("inf")  # fastest trial run on one intra-op thread

    @property
    def best(self) -> float:
        """The faster setting's best trial run."""
        return min(self.best_one, self.best_own)

    def retry(self) -> None:
        """Try both settings again (the kind's work changed)."""
        self.runs = 1
        self.best_own = self.best_one = float("inf")


class JobCosts:
    """Where engine jobs and optimizer steps run, and on how many of torch's
    intra-op threads, chosen with data.

    Place: a kind of job runs inline on the event loop once a run of it was
    measured (first in the pool) under ``inline_below`` seconds, or under
    ``inline_below_idle`` while the pool has nothing else to run, and goes
    back to the pool as soon as one run takes longer. Inline jobs never wait
    for a lock another thread holds (:func:`~aiorpc_autograd.autograd.no_waiting`):
    such a job runs in the pool instead.

    Threads: after its first run, a kind's next ``TRIAL_RUNS`` runs alternate
    between one intra-op thread and the thread's own count (where that is
    more than one), and the kind then keeps the faster, until a run takes
    ``RETRY_FACTOR`` times longer or shorter than the chosen setting's best
    (a kind is a graph's shape, not its tensors' sizes: a larger batch may
    want the threads back). A graph of small ops (a deep MLP of 64-wide
    layers) pays an OpenMP team wake-up for each product's parallel region,
    ~100 us on a busy 2-vCPU host, for ops that take a few us on one thread;
    a large product keeps its threads."""

    MAX_KINDS = 4096
    TRIAL_RUNS = 4
    RETRY_FACTOR = 4.0

    def __init__(
        self, inline_below: float = INLINE_BELOW_S, inline_below_idle: float = INLINE_BELOW_IDLE_S
    ) -> None:
        self.inline_below = inline_below
        self.inline_below_idle = inline_below_idle
        self._kinds: dict[Hashable, _KindStats] = {}
        self.inline_runs = 0  # for tests and the record

    def inline(self, kind: Hashable, pool_busy: bool = True) -> bool:
        """Whether a job of ``kind`` runs on the loop now (``pool_busy``:
        whether the pool runs or holds other jobs)."""
        stats = self._kinds.get(kind)
        if stats is None:
            return False
        return stats.cost < (self.inline_below if pool_busy else self.inline_below_idle)

    def one_thread(self, kind: Hashable) -> bool:
        """Whether the next job of ``kind`` runs on one intra-op thread (only
        asked where the thread's own count is more than one)."""
        stats = self._kinds.get(kind)
        if stats is None:
            return False  # the first run: its own threads (and a warm-up)
        if stats.runs <= self.TRIAL_RUNS:
            return stats.runs % 2 == 1  # the trial: one thread, own, one, own
        return stats.best_one < stats.best_own

    def record(self, kind: Hashable, seconds: float, one_thread: bool = False) -> None:
        """A run of ``kind`` took ``seconds`` (from any thread), on one
        intra-op thread or on the thread's own count."""
        stats = self._kinds.get(kind)
        if stats is None:
            if len(self._kinds) >= self.MAX_KINDS:
                self._kinds.clear()  # kinds are per graph shape: a bound, not a cache policy
            self._kinds[kind] = _KindStats(seconds)
            return
        trial = stats.runs <= self.TRIAL_RUNS
        stats.runs += 1
        if trial:
            if one_thread:
                stats.best_one = min(stats.best_one, seconds)
            else:
                stats.best_own = min(stats.best_own, seconds)
            if stats.runs > self.TRIAL_RUNS:
                # Chosen. The estimate restarts from the chosen setting's best
                # run: the first run's (a warm-up, maybe on the slower setting)
                # would otherwise keep the kind in the pool for several runs.
                stats.cost = stats.best
                return
        elif not stats.best / self.RETRY_FACTOR <= seconds <= stats.best * self.RETRY_FACTOR:
            stats.retry()
        # A slow run counts at once; fast runs lower the estimate gradually.
        prev = stats.cost
        stats.cost = seconds if seconds > prev else 0.75 * prev + 0.25 * seconds


def run_on_threads(one_thread: bool, fn: Callable[[], T]) -> T:
    """``fn()`` on one torch intra-op thread when ``one_thread``, else on the
    calling thread's own count. The count is per thread (OpenMP's and MKL's
    settings); torch also keeps it for threads that start their first op in
    the meantime, and the pool's threads and the loop's took theirs when they
    started (:func:`~aiorpc_autograd.agent.adopt_torch_threads`)."""
    if not one_thread:
        return fn()
    own = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(own)


class AutogradService:
    """Distributed autograd on one agent; see the module docstring."""

    def __init__(self, agent: RpcAgent) -> None:
        self.agent = agent
        self.container = ContextContainer(agent.info.id)
        self._runs: dict[tuple[int, int], _PassRun] = {}
        # Contexts that a peer's request created here: peer id -> context ids,
        # and context id -> that peer (capped per peer; see _on_forward).
        self._made_by_peer: dict[int, set[int]] = {}
        self._maker: dict[int, int] = {}
        # Step in backward: optimizer id -> (a future of) a weak reference to
        # the function stepping this worker's local optimizer of that id.
        self._local_optimizers: dict[int, asyncio.Future[Any]] = {}
        self.job_costs = JobCosts(
            INLINE_BELOW_IDLE_S if agent.pinned else INLINE_BELOW_S, INLINE_BELOW_IDLE_S
        )
        # Contexts released by peers, their tensors not yet dropped (_drop_later).
        self._to_drop: list[DistAutogradContext] = []
        self._drop_timer: asyncio.TimerHandle | None = None

    @classmethod
    def install(cls, agent: RpcAgent) -> AutogradService:
        """Create the service and hook it into ``agent``."""
        self = cls(agent)
        agent.request_wrapper = self._wrap_request
        agent.response_unwrappers[ForwardAutogradResp] = self._unwrap_response
        agent.handlers[ForwardAutogradReq] = self._on_forward
        agent.handlers[PropagateGradientsReq] = self._on_propagate
        agent.notice_handlers[CleanupAutogradContextReq] = self._on_cleanup
        agent.handlers[BackwardStartReq] = self._on_start
        agent.handlers[BackwardAbortReq] = self._on_abort
        agent.debug_counters["num_autograd_contexts"] = self._count_contexts
        agent.debug_counters["num_current_backward_passes"] = lambda: sum(
            1 for run in self._runs.values() if not run.done.done()
        )
        agent.extensions["autograd"] = self
        agent.peer_gone_hooks.append(self.on_peer_gone)
        agent.liveness_watchers.append(self._watched_peers)
        return self

    # -- helpers ---------------------------------------------------------------

    def send(
        self,
        worker_id: int,
        message: Message,
        device_map: dict[str, str] | None = None,
        write_now: bool = False,
    ) -> asyncio.Future[Any]:
        """A request to ``worker_id`` with no timeout (liveness is the
        connection's business); the future's errors are the caller's."""
        info = self.agent.worker_info(worker_id)
        return self.agent.request(
            info,
            message,
            timeout=0,
            decode=lambda m: m,
            device_map=device_map,
            write_now=write_now,
        )

    def _device_map(self, peer: int) -> dict[str, str]:
        """This worker's map for requests to ``peer`` (carried in the metadata)."""
        name = self.agent.worker_info(peer).name
        return dict(self.agent.device_maps.for_request(name) or {})

    def run_job(self, kind: Hashable, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run an engine job or an optimizer step: inline on the loop when
        jobs of ``kind`` are cheap, else in the pool; on one intra-op thread
        when that was faster for ``kind`` (:class:`JobCosts`)."""
        costs = self.job_costs
        one = torch.get_num_threads() > 1 and costs.one_thread(kind)
        if costs.inline(kind, self.agent.pool_busy):
            fut: asyncio.Future[T] = self.agent.loop.create_future()
            t0 = time.perf_counter()
            try:
                with no_waiting():
                    result = run_on_threads(one, fn)
            except WouldBlock:
                pass  # nothing ran: the pool waits for the lock instead
            except BaseException as exc:
                costs.record(kind, time.perf_counter() - t0, one)
                fut.set_exception(raisable(exc))
                return fut
            else:
                costs.record(kind, time.perf_counter() - t0, one)
                costs.inline_runs += 1
                fut.set_result(result)
                return fut

        def timed() -> T:
            t0 = time.perf_counter()
            try:
                return run_on_threads(one, fn)
            finally:
                costs.record(kind, time.perf_counter() - t0, one)

        return self.agent.run_in_executor(timed)

    # -- forward: wrapping -------------------------------------------------------

    def _wrap_request(self, to: WorkerInfo, message: Message) -> Message:
        context_id = current_context_id.get()
        if context_id is None or not isinstance(message, _ALWAYS_WRAPPED):
            return message
        ctx = self.container.get(context_id)
        if ctx is None:
            raise RuntimeError(f"autograd context {context_id} is not valid on this worker")
        mid = self.container.new_message_id()
        tensors = _grad_tensors(message)
        if tensors:
            send = SendFunction(mid, to.id, tensors)
            ctx.add_send(send)
            self._walk_when_written(send)
        else:
            ctx.add_known_worker(to.id)
        return ForwardAutogradReq(
            self.agent.info.id, context_id, mid, self._device_map(to.id), message
        )

    def _after_answer(self, send: SendFunction | None) -> None:
        """A forward request's answer is being written: the peer computes on
        it now, and this worker waits. Use that gap, the turn after the write
        (see :meth:`_walk_when_written`), for the work kept for it: the walk
        of ``send`` (the answer's send function, if any), then the contexts
        released meanwhile (:meth:`_drop_later`)."""
        if send is not None:
            self._walk_when_written(send)
        if self._to_drop:
            loop = self.agent.loop
            loop.call_soon(loop.call_soon, self._drop_released)

    def _count_contexts(self) -> int:
        """The contexts this worker holds (its ``num_autograd_contexts``).
        Those released by peers and still waiting to be dropped
        (:meth:`_drop_later`) are dropped first: a count read right after the
        last context went (torch's tests do) is 0 then, not up to 5 ms later."""
        self._drop_released()
        return len(self.container)

    def _drop_later(self, ctx: DistAutogradContext) -> None:
        """Drop what ``ctx`` (released by a peer, gone from the container)
        holds in this worker's next gap (:meth:`_after_answer`), at the latest
        after ``DROP_WITHIN_S``; at most ``DROP_HELD_MAX`` wait. Freeing a
        step's graph and gradients costs ~1 us a tensor, on the loop: the
        release comes just before the next step's forward (a 64-layer MLP's
        context took 100 us, and that forward waited for it)."""
        self._to_drop.append(ctx)
        if len(self._to_drop) > DROP_HELD_MAX:
            self._to_drop.pop(0).clear()
        if self._drop_timer is None:
            self._drop_timer = self.agent.loop.call_later(DROP_WITHIN_S, self._drop_released)

    def _drop_released(self) -> None:
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        dropping, self._to_drop = self._to_drop, []
        for ctx in dropping:
            ctx.clear()

    def _walk_when_written(self, send: SendFunction) -> None:
        """Walk to the leaves ``send`` reaches once the message carrying it is
        written, while this worker waits for the peer: a backward pass then
        finds the walk done (~1 us a graph node; at depth 64 the worker's
        backward went from 2.44-2.48 to 2.20-2.24 ms). Call it when the
        message is made or handed to the agent: the agent sends the frame at
        once or one loop turn later (a future's callback), and the connection
        writes it at once or at the end of that turn; this runs after it."""
        loop = self.agent.loop
        loop.call_soon(loop.call_soon, send.leaves)

    def _record_recv(
        self, ctx: DistAutogradContext, message: ForwardAutogradReq | ForwardAutogradResp
    ) -> None:
        peer = message.from_worker
        payload = message.wrapped.payload()
        table = [] if payload is None else payload.tensors
        at: list[int] = []
        leaves: list[torch.Tensor] = []
        for i, t in enumerate(table):
            if t is not None and t.requires_grad:
                at.append(i)
                leaves.append(t)
        if at:
            # Gradients go back by the inverse of the map the message came by.
            back = inverse(message.device_map)
            recv, outputs = RecvFunction.record(message.message_id, peer, leaves, back)
            # The message delivers the recv function's outputs (as torch's).
            for i, out in zip(at, outputs, strict=True):
                table[i] = out
            ctx.add_recv(recv)
        else:
            ctx.add_known_worker(peer)

    def _unwrap_response(self, peer: int, message: Message) -> Message:
        assert isinstance(message, ForwardAutogradResp)
        ctx = self.container.get_or_create(message.context_id)
        self._record_recv(ctx, message)
        return message.wrapped

    def _context_for_peer(self, context_id: int, peer: int) -> DistAutogradContext:
        """The context, created on behalf of ``peer`` if new here.

        Raises:
            ResourceLimitError: ``peer`` made ``max_peer_contexts`` contexts here.
        """
        ctx = self.container.get(context_id)
        if ctx is not None:
            return ctx
        made = self._made_by_peer.setdefault(peer, set())
        limit = self.agent.options.max_peer_contexts
        if len(made) >= limit:
            raise ResourceLimitError(
                f"worker {self.agent.info.name!r} holds {len(made)} autograd contexts made by "
                f"worker {self.agent.worker_info(peer).name!r}: max_peer_contexts={limit}"
            )
        made.add(context_id)
        self._maker[context_id] = peer
        return self.container.get_or_create(context_id)

    def _on_forward(self, message: Message) -> Message | asyncio.Future[Message]:
        assert isinstance(message, ForwardAutogradReq)
        ctx = self._context_for_peer(message.context_id, message.from_worker)
        self._record_recv(ctx, message)
        handler = self.agent.handlers.get(type(message.wrapped))
        if handler is None or isinstance(message.wrapped, ForwardAutogradReq):
            raise RuntimeError(f"cannot run {type(message.wrapped).__name__} under autograd")
        token = current_context_id.set(message.context_id)
        try:
            result = handler(message.wrapped)
            if not isinstance(result, (Message, asyncio.Future)):
                # A coroutine: its Task starts here, in the context id's scope.
                result = asyncio.ensure_future(result)
        finally:
            current_context_id.reset(token)
        if isinstance(result, Message):
            response, send = self._forward_response(ctx, message, result)
            self._after_answer(send)
            return response
        # A future (a plain function's pool job, the hot path): answer from its
        # callback, no Task of our own.
        answer: asyncio.Future[Message] = self.agent.loop.create_future()

        def done(inner: asyncio.Future[Message]) -> None:
            if inner.cancelled():
                answer.cancel()
            elif inner.exception() is not None:
                answer.set_exception(inner.exception())  # type: ignore[arg-type]
            else:
                try:
                    response, send = self._forward_response(ctx, message, inner.result())
                except Exception as exc:
                    answer.set_exception(exc)
                else:
                    answer.set_result(response)
                    self._after_answer(send)

        result.add_done_callback(done)
        return answer

    def _forward_response(
        self, ctx: DistAutogradContext, message: ForwardAutogradReq, result: Message
    ) -> tuple[Message, SendFunction | None]:
        """The response to ``message``: ``result``, wrapped with a send function
        recorded (and returned) when it carries tensors that require grad."""
        tensors = _grad_tensors(result)
        if not tensors:
            return result, None
        mid = self.container.new_message_id()
        send = SendFunction(mid, message.from_worker, tensors)
        ctx.add_send(send)
        # The response travels by the inverse of the request's map (the agent's
        # reply map for this peer is the same): say so in the metadata.
        wrapped = ForwardAutogradResp(
            self.agent.info.id, message.context_id, mid, inverse(message.device_map), result
        )
        return wrapped, send

    # -- contexts ----------------------------------------------------------------

    def new_context(self) -> DistAutogradContext:
        return self.container.new_context()

    def release(self, context_id: int, from_peer: int | None = None) -> None:
        """Release a context here and send the release to the workers it
        knows but ``from_peer`` (the peer the release came from, if any: what
        the context holds is then dropped in this worker's next gap) and,
        then, the context's creator (where releases start, or it is gone)."""
        error = RuntimeError(f"autograd context {context_id} was released")
        ctx = self._release_here(context_id, error, drop_later=from_peer is not None)
        if ctx is None:
            return
        if not self.agent.running:
            return
        skip = {self.agent.info.id}
        if from_peer is not None:
            skip.update((from_peer, context_id >> 48))  # (the creator: its id's high bits)
        for worker_id in ctx.known_worker_ids() - skip:
            if self.agent.peer_gone(worker_id):
                continue
            # A notice (no answer to write or read), written at once: a
            # training loop's next step sends its forward right after (written
            # at once too: a flush leaves nothing queued), and the worker, idle
            # until then, handles the release first instead of before that
            # forward.
            info = self.agent.worker_info(worker_id)
            self.agent.notify(info, CleanupAutogradContextReq(context_id), write_now=True)

    def _on_cleanup(self, conn: Connection, message: Message) -> None:
        assert isinstance(message, CleanupAutogradContextReq)
        assert isinstance(conn.peer, WorkerInfo)  # (an admitted connection)
        # Released from the next loop iteration: a training loop's next
        # forward often comes in the same read, and freeing the step's tensors
        # waits until it is dispatched (every later read still finds the
        # context gone). Never sent back to the sender nor to the creator.
        self.agent.loop.call_soon(self.release, message.context_id, conn.peer.id)

    # -- backward ------------------------------------------------------------------

    def _run_for(
        self,
        ctx: DistAutogradContext,
        pass_id: int,
        retain_graph: bool,
        roots: Sequence[torch.Tensor] | None,
        came_from: int | None,
        plan: list[int] | None = None,
    ) -> _PassRun | None:
        """The run of ``pass_id`` here, started if new; None if already over."""
        key = (ctx.context_id(), pass_id)
        run = self._runs.get(key)
        if run is not None:
            return run
        if pass_id in ctx.finished_passes:
            return None
        if ctx.current_pass is not None and not ctx.current_pass.done:
            raise RuntimeError(
                f"a backward pass is already running in autograd context {ctx.context_id()}"
            )
        run = _PassRun(self, ctx, pass_id, plan)
        run.engine = BackwardPass(ctx, pass_id, retain_graph, roots, run)
        if run.steps_here():
            run.engine.after_last_job = self._ready_step(run.plan[0], ctx.context_id())
        ctx.current_pass = run.engine
        self._runs[key] = run
        run.done.add_done_callback(lambda _: self._runs.pop(key, None))
        tracer = tracer_of(self.agent)
        if tracer is not None:
            args = {"context_id": ctx.context_id(), "pass_id": pass_id}
            tracer.pass_span(run.done, "backward pass", args)
        me = self.agent.info.id
        # Peers that will get gradients (or a "none") from a recv function here
        # without this worker waiting on anyone get their start with those;
        # the others must start now (their part may be what we wait on).
        fed = run.engine.peers_answered_without_waiting()
        for worker_id in ctx.known_worker_ids() - fed - {me, came_from}:
            start = BackwardStartReq(ctx.context_id(), pass_id, retain_graph, me, run.plan)
            run.track(self.send(worker_id, start))
        try:
            run.engine.start()
        except Exception as exc:
            run.fail(exc)
            run.finished(exc)
        return run

    async def backward(
        self,
        context_id: int,
        roots: Sequence[torch.Tensor],
        retain_graph: bool,
        plan: list[int] | None = None,
    ) -> None:
        """Run a distributed backward pass from local ``roots``; see the API.
        ``plan``: step in backward, ``[optimizer id, owner worker ids...]``."""
        ctx = self.container.retrieve(context_id)
        pass_id = self.container.new_pass_id()
        run = self._run_for(ctx, pass_id, retain_graph, roots, None, plan)
        assert run is not None
        run.owned = True
        try:
            await run.done
        except BaseException as exc:
            self._abort_everywhere(ctx, pass_id, exc)
            raise self._as_remote(exc) from exc
        if plan:
            ctx.stepped_optimizers.add(plan[0])

    # -- step in backward ----------------------------------------------------------

    def _optimizer_slot(self, optimizer_id: int) -> asyncio.Future[Any]:
        slot = self._local_optimizers.get(optimizer_id)
        if slot is None:
            slot = self._local_optimizers[optimizer_id] = self.agent.loop.create_future()
            slot.add_done_callback(_ignore_result)
        return slot

    def register_local_optimizer(
        self, optimizer_id: int, step: Callable[[int], None] | BaseException
    ) -> None:
        """On the loop: this worker's local optimizer ``optimizer_id`` is built
        (the bound method ``step(context_id)`` steps it; held weakly, forgotten
        with its object), or failed to build (``step`` is the error). Passes
        stepping it wait for this."""
        slot = self._optimizer_slot(optimizer_id)
        if slot.done():
            return
        if isinstance(step, BaseException):
            slot.set_exception(step)
            return
        slot.set_result(weakref.WeakMethod(step))  # type: ignore[arg-type, unused-ignore]
        owner = step.__self__  # type: ignore[attr-defined]
        weakref.finalize(owner, self._local_optimizers.pop, optimizer_id, None)

    def _ready_step(self, optimizer_id: int, context_id: int) -> Callable[[], None] | None:
        """The step of local optimizer ``optimizer_id`` with the gradients of
        ``context_id``, if that optimizer is built here already."""
        slot = self._local_optimizers.get(optimizer_id)
        if slot is None or not slot.done() or slot.exception() is not None:
            return None
        step = slot.result()()
        if step is None:
            return None
        return lambda: step(context_id)

    async def step_local_optimizer(self, optimizer_id: int, context_id: int) -> None:
        """Step this worker's local optimizer ``optimizer_id`` with the
        gradients of ``context_id`` (waiting for it to be built)."""
        ref = await self._optimizer_slot(optimizer_id)
        step = ref()
        if step is None:
            raise RuntimeError(f"the optimizer {optimizer_id} was deleted on this worker")
        # An optimizer step is user code of any cost: measured (JobCosts).
        await self.run_job(("optimizer", optimizer_id), lambda: step(context_id))

    def _as_remote(self, exc: BaseException) -> BaseException:
        """The error a failed pass raises on its root: a :class:`RemoteError`
        naming the worker where the pass failed, its message led by torch's
        "Error on Node N: " (N: that worker's id), which ported code matches."""
        if not isinstance(exc, Exception):
            return exc
        if isinstance(exc, RemoteError):
            worker, name = exc.worker, exc.type_name
            message, tb = exc.remote_message, exc.remote_traceback
        else:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            name = type(exc).__qualname__
            if type(exc).__module__ != "builtins":
                name = f"{type(exc).__module__}.{name}"
            worker, message = self.agent.info.name, str(exc)
            if isinstance(exc, ConnectionLostError) and exc.worker:
                worker = exc.worker  # a lost participant: name it, not this worker
                name = f"{ConnectionLostError.__module__}.{ConnectionLostError.__qualname__}"
        with contextlib.suppress(Exception):  # a worker no longer in the group: no id
            message = f"Error on Node {self.agent.worker_info(worker).id}: {message}"
        return remote_error(worker, name, message, tb)

    def _abort_everywhere(
        self, ctx: DistAutogradContext, pass_id: int, error: BaseException
    ) -> None:
        """Stop the pass here and, once, send the abort to the workers ctx knows."""
        if pass_id in ctx.aborted_passes:
            return
        ctx.aborted_passes.add(pass_id)
        ctx.finished_passes.setdefault(pass_id, error)
        run = self._runs.get((ctx.context_id(), pass_id))
        if run is not None:
            run.fail(error)
        if not self.agent.running:
            return
        reason = _abort_reason(error)
        for worker_id in ctx.known_worker_ids() - {self.agent.info.id}:
            if self.agent.peer_gone(worker_id):
                continue
            fut = self.send(worker_id, BackwardAbortReq(ctx.context_id(), pass_id, reason))
            fut.add_done_callback(_ignore_result)

    def _run_for_request(
        self, ctx: DistAutogradContext, message: BackwardStartReq | PropagateGradientsReq
    ) -> _PassRun | None:
        """The run of the pass a start or gradient request belongs to (made
        here if it is the first to reach this worker)."""
        return self._run_for(
            ctx, message.pass_id, message.retain_graph, None, message.from_worker, message.optimizer
        )

    async def _on_start(self, message: Message) -> Message:
        assert isinstance(message, BackwardStartReq)
        ctx = self.container.get(message.context_id)
        if ctx is None:
            return BackwardStartResp()  # nothing of this context lives here
        run = self._run_for_request(ctx, message)
        if run is None:  # over already: report how it ended
            error = ctx.finished_passes.get(message.pass_id)
            if error is not None:
                raise error
            return BackwardStartResp()
        if run.owned:
            return BackwardStartResp()  # another request waits on it already
        run.owned = True
        await run.done
        return BackwardStartResp()

    def _on_propagate(self, message: Message) -> Message | Awaitable[Message]:
        assert isinstance(message, PropagateGradientsReq)
        ctx = self.container.retrieve(message.context_id)
        run = self._run_for_request(ctx, message)
        if run is None or run.engine is None:
            raise RuntimeError(f"backward pass {message.pass_id} is over on this worker")
        grads = list(message.grads.tensors)
        run.engine.on_gradients(message.message_id, grads or None)
        if run.owned:
            return PropagateGradientsResp()
        # The first message of the pass here: it stands for the start request
        # and is answered when this worker's part is done.
        run.owned = True
        return self._answer_when_done(run)

    async def _answer_when_done(self, run: _PassRun) -> Message:
        await run.done
        return PropagateGradientsResp()

    def _on_abort(self, message: Message) -> Message:
        assert isinstance(message, BackwardAbortReq)
        ctx = self.container.get(message.context_id)
        if ctx is not None:
            error: Exception = RuntimeError(f"backward pass aborted: {message.reason}")
            lost = _LOST_REASON.match(message.reason)
            if lost is not None:  # keep the type and the name of the lost worker
                error = ConnectionLostError(
                    f"backward pass aborted: {message.reason}", worker=lost["worker"]
                )
            self._abort_everywhere(ctx, message.pass_id, error)
        return BackwardStartResp()

    # -- liveness --------------------------------------------------------------

    def _watched_peers(self) -> set[int]:
        """The peers this worker's contexts depend on: creators and participants."""
        ids: set[int] = set()
        for ctx in self.container.contexts():
            ids.add(ctx.context_id() >> _ID_BITS)
            ids.update(ctx.known_worker_ids())
        return ids

    def on_peer_gone(self, info: WorkerInfo, error: RpcError) -> None:
        """``info`` is gone for good: fail and abort the passes it took part
        in, and release the contexts that can no longer be released otherwise."""
        me = self.agent.info.id
        lost = (
            error
            if isinstance(error, ConnectionLostError)
            else ConnectionLostError(str(error), worker=info.name)
        )
        lost.worker = lost.worker or info.name
        for ctx in self.container.contexts():
            cid = ctx.context_id()
            if cid >> _ID_BITS == info.id:
                # Its creator is gone. Every holder watches the creator and
                # releases its own part: no release is sent on, so that a
                # worker that wrongly took the creator for gone (a stalled
                # loop) cannot make the others, the creator included, drop theirs.
                self._release_here(cid, lost)
                continue
            known = ctx.known_worker_ids() - {me}
            made_by_it = self._maker.get(cid) == info.id
            if info.id not in known and not made_by_it:
                continue
            passes = {pass_id for (c, pass_id) in self._runs if c == cid}
            for pass_id in passes:
                self._abort_everywhere(ctx, pass_id, lost)
            creator = cid >> _ID_BITS
            if made_by_it or (creator != me and all(self.agent.peer_gone(w) for w in known)):
                # No release can reach this part any more (it would come
                # through the gone worker): drop it here only.
                self._release_here(cid, lost)
        self._made_by_peer.pop(info.id, None)

    def _release_here(
        self, context_id: int, error: BaseException, drop_later: bool = False
    ) -> DistAutogradContext | None:
        """Drop the context here (its passes fail with ``error``; what it
        holds is freed now, or by :meth:`_drop_later`); None if absent."""
        maker = self._maker.pop(context_id, None)
        if maker is not None:
            self._made_by_peer.get(maker, set()).discard(context_id)
        ctx = self.container.release(context_id)
        if ctx is None:
            return None
        for key in [k for k in self._runs if k[0] == context_id]:
            self._runs.pop(key).fail(error)
        if drop_later:
            self._drop_later(ctx)
        else:
            ctx.clear()
        return ctx


# A BackwardAbortReq reason that says a worker was lost (see _abort_reason).
_LOST_REASON = re.compile(r"lost worker '(?P<worker>[^']*)'")


def _abort_reason(error: BaseException) -> str:
    if isinstance(error, ConnectionLostError) and error.worker:
        # Parsed by _on_abort: the receivers fail with a ConnectionLostError too.
        return f"lost worker {error.worker!r}: {error}"
    return f"{type(error).__name__}: {error}"


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a failed release is not the caller's problem
