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
the ``BackwardStartReq`` that first reached this worker is answered then, so
the root's ``backward`` returns only when every worker's part is done.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import codec
from .agent import RpcAgent
from .autograd import (
    BackwardPass,
    ContextContainer,
    DistAutogradContext,
    RecvFunction,
    SendFunction,
    current_context_id,
)
from .codec import (
    BackwardAbortReq,
    BackwardStartReq,
    BackwardStartResp,
    CleanupAutogradContextReq,
    CleanupAutogradContextResp,
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
from .errors import RemoteError, remote_error
from .options import WorkerInfo
from .tracing import tracer_of

__all__ = ["AutogradService"]

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

    def __init__(self, service: AutogradService, ctx: DistAutogradContext, pass_id: int) -> None:
        self.service = service
        self.ctx = ctx
        self.pass_id = pass_id
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
        )
        self.track(self.service.send(recv.peer, msg, recv.device_map))

    def compute(
        self, job: Callable[[], list[torch.Tensor | None]], done: Callable[[Any], None]
    ) -> None:
        tracer = tracer_of(self.service.agent)
        if tracer is not None:
            args = {"context_id": self.ctx.context_id(), "pass_id": self.pass_id}
            job = tracer.timed_job(job, "engine job", args)
        fut = self.service.agent.run_in_executor(job)

        def finished(f: asyncio.Future[list[torch.Tensor | None]]) -> None:
            done(f.exception() if f.exception() is not None else f.result())

        fut.add_done_callback(finished)

    def finished(self, error: BaseException | None) -> None:
        self.engine_done = True
        if error is not None:
            self.fail(error)
        self._check()

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


class AutogradService:
    """Distributed autograd on one agent; see the module docstring."""

    def __init__(self, agent: RpcAgent) -> None:
        self.agent = agent
        self.container = ContextContainer(agent.info.id)
        self._runs: dict[tuple[int, int], _PassRun] = {}

    @classmethod
    def install(cls, agent: RpcAgent) -> AutogradService:
        """Create the service and hook it into ``agent``."""
        self = cls(agent)
        agent.request_wrapper = self._wrap_request
        agent.response_unwrappers[ForwardAutogradResp] = self._unwrap_response
        agent.handlers[ForwardAutogradReq] = self._on_forward
        agent.handlers[PropagateGradientsReq] = self._on_propagate
        agent.handlers[CleanupAutogradContextReq] = self._on_cleanup
        agent.handlers[BackwardStartReq] = self._on_start
        agent.handlers[BackwardAbortReq] = self._on_abort
        agent.debug_counters["num_autograd_contexts"] = lambda: len(self.container)
        agent.debug_counters["num_current_backward_passes"] = lambda: sum(
            1 for run in self._runs.values() if not run.done.done()
        )
        agent.extensions["autograd"] = self
        return self

    # -- helpers ---------------------------------------------------------------

    def send(
        self, worker_id: int, message: Message, device_map: dict[str, str] | None = None
    ) -> asyncio.Future[Any]:
        """A request to ``worker_id`` with no timeout (liveness is the
        connection's business); the future's errors are the caller's."""
        info = self.agent.worker_info(worker_id)
        return self.agent.request(
            info, message, timeout=0, decode=lambda m: m, device_map=device_map
        )

    def _device_map(self, peer: int) -> dict[str, str]:
        """This worker's map for requests to ``peer`` (carried in the metadata)."""
        name = self.agent.worker_info(peer).name
        return dict(self.agent.device_maps.for_request(name) or {})

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
            ctx.add_send(SendFunction(mid, to.id, tensors))
        else:
            ctx.add_known_worker(to.id)
        return ForwardAutogradReq(
            self.agent.info.id, context_id, mid, self._device_map(to.id), message
        )

    def _record_recv(
        self, ctx: DistAutogradContext, message: ForwardAutogradReq | ForwardAutogradResp
    ) -> None:
        peer = message.from_worker
        tensors = _grad_tensors(message.wrapped)
        if tensors:
            # Gradients go back by the inverse of the map the message came by.
            back = inverse(message.device_map)
            ctx.add_recv(RecvFunction(message.message_id, peer, tensors, back))
        else:
            ctx.add_known_worker(peer)

    def _unwrap_response(self, peer: int, message: Message) -> Message:
        assert isinstance(message, ForwardAutogradResp)
        ctx = self.container.get_or_create(message.context_id)
        self._record_recv(ctx, message)
        return message.wrapped

    async def _on_forward(self, message: Message) -> Message:
        assert isinstance(message, ForwardAutogradReq)
        ctx = self.container.get_or_create(message.context_id)
        self._record_recv(ctx, message)
        handler = self.agent.handlers.get(type(message.wrapped))
        if handler is None or isinstance(message.wrapped, ForwardAutogradReq):
            raise RuntimeError(f"cannot run {type(message.wrapped).__name__} under autograd")
        token = current_context_id.set(message.context_id)
        try:
            result = handler(message.wrapped)
            if not isinstance(result, Message):
                result = await result
        finally:
            current_context_id.reset(token)
        tensors = _grad_tensors(result)
        if not tensors:
            return result
        mid = self.container.new_message_id()
        ctx.add_send(SendFunction(mid, message.from_worker, tensors))
        # The response travels by the inverse of the request's map (the agent's
        # reply map for this peer is the same): say so in the metadata.
        return ForwardAutogradResp(
            self.agent.info.id, message.context_id, mid, inverse(message.device_map), result
        )

    # -- contexts ----------------------------------------------------------------

    def new_context(self) -> DistAutogradContext:
        return self.container.new_context()

    def release(self, context_id: int, exclude: int | None = None) -> None:
        """Release a context here and send the release to the workers it knows."""
        ctx = self.container.release(context_id)
        if ctx is None:
            return
        for key in [k for k in self._runs if k[0] == context_id]:
            self._runs.pop(key).fail(RuntimeError(f"autograd context {context_id} was released"))
        if not self.agent.running:
            return
        for worker_id in ctx.known_worker_ids() - {self.agent.info.id, exclude}:
            fut = self.send(worker_id, CleanupAutogradContextReq(context_id))
            fut.add_done_callback(_ignore_result)

    def _on_cleanup(self, message: Message) -> Message:
        assert isinstance(message, CleanupAutogradContextReq)
        self.release(message.context_id)
        return CleanupAutogradContextResp()

    # -- backward ------------------------------------------------------------------

    def _run_for(
        self,
        ctx: DistAutogradContext,
        pass_id: int,
        retain_graph: bool,
        roots: Sequence[torch.Tensor] | None,
        came_from: int | None,
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
        run = _PassRun(self, ctx, pass_id)
        run.engine = BackwardPass(ctx, pass_id, retain_graph, roots, run)
        ctx.current_pass = run.engine
        self._runs[key] = run
        run.done.add_done_callback(lambda _: self._runs.pop(key, None))
        tracer = tracer_of(self.agent)
        if tracer is not None:
            args = {"context_id": ctx.context_id(), "pass_id": pass_id}
            tracer.pass_span(run.done, "backward pass", args)
        me = self.agent.info.id
        for worker_id in ctx.known_worker_ids() - {me, came_from}:
            run.track(
                self.send(worker_id, BackwardStartReq(ctx.context_id(), pass_id, retain_graph, me))
            )
        try:
            run.engine.start()
        except Exception as exc:
            run.fail(exc)
            run.finished(exc)
        return run

    async def backward(
        self, context_id: int, roots: Sequence[torch.Tensor], retain_graph: bool
    ) -> None:
        """Run a distributed backward pass from local ``roots``; see the API."""
        ctx = self.container.retrieve(context_id)
        pass_id = self.container.new_pass_id()
        run = self._run_for(ctx, pass_id, retain_graph, roots, None)
        assert run is not None
        run.owned = True
        try:
            await run.done
        except BaseException as exc:
            self._abort_everywhere(ctx, pass_id, exc)
            raise self._as_remote(exc) from exc

    def _as_remote(self, exc: BaseException) -> BaseException:
        if isinstance(exc, RemoteError) or not isinstance(exc, Exception):
            return exc
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        name = type(exc).__qualname__
        if type(exc).__module__ != "builtins":
            name = f"{type(exc).__module__}.{name}"
        return remote_error(self.agent.info.name, name, str(exc), tb)

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
        reason = f"{type(error).__name__}: {error}"
        for worker_id in ctx.known_worker_ids() - {self.agent.info.id}:
            fut = self.send(worker_id, BackwardAbortReq(ctx.context_id(), pass_id, reason))
            fut.add_done_callback(_ignore_result)

    async def _on_start(self, message: Message) -> Message:
        assert isinstance(message, BackwardStartReq)
        ctx = self.container.get(message.context_id)
        if ctx is None:
            return BackwardStartResp()  # nothing of this context lives here
        run = self._run_for(ctx, message.pass_id, message.retain_graph, None, message.from_worker)
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

    def _on_propagate(self, message: Message) -> Message:
        assert isinstance(message, PropagateGradientsReq)
        ctx = self.container.retrieve(message.context_id)
        run = self._run_for(ctx, message.pass_id, message.retain_graph, None, message.from_worker)
        if run is None or run.engine is None:
            raise RuntimeError(f"backward pass {message.pass_id} is over on this worker")
        grads = list(message.grads.tensors)
        run.engine.on_gradients(message.message_id, grads or None)
        return PropagateGradientsResp()

    def _on_abort(self, message: Message) -> Message:
        assert isinstance(message, BackwardAbortReq)
        ctx = self.container.get(message.context_id)
        if ctx is not None:
            error = RuntimeError(f"backward pass aborted: {message.reason}")
            self._abort_everywhere(ctx, message.pass_id, error)
        return BackwardStartResp()


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a failed release is not the caller's problem
