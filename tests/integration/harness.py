"""Real-process test harness: groups of workers on 127.0.0.1, one process each.

Theory of operation
-------------------
:class:`WorkerGroup` starts ``world_size`` processes with multiprocessing's
``forkserver`` context: a fork server, started once with the parent's
``sys.path`` (so ``tests`` is importable there), imports torch and this
package; each worker is a fork of it, so a group starts in milliseconds where a
fresh interpreter per worker spent ~2 s of CPU importing torch. Nothing runs
in the server but those imports: each worker still starts from a package
nobody initialised, and applies its ``env`` before it does anything. Each
child gets one duplex pipe to the test process and runs, on :func:`rpc.run`:

* **managed** targets (:func:`run_workers`, :func:`spawn_workers`)::

      await rpc.init_rpc(f"worker{rank}", rank, world_size,
                         init_method=f"tcp://127.0.0.1:{port}", options=...)
      await barrier()  # every rank is past init_rpc (start_barrier=True)
      result = await target(rank, world_size, *args)
      await rpc.shutdown()

  (a fresh free port per group; a target that raises shuts down non-gracefully
  so the error is not hidden behind a graceful wait);
* **raw** targets (:func:`run_processes`, ``WorkerGroup(..., mode="raw")``)
  get ``(rank, world_size, init_method, *args)`` and do their own ``init_rpc``
  and ``shutdown`` (and :func:`barrier` where they need one): for tests of the
  lifecycle itself;
* the **service** target (:func:`start_service`): a managed worker that runs
  commands sent by the test (``group.call(rank, func, *args)``) until stopped,
  so one group can serve many tests; ``start_service(..., sync=True)``
  (mode ``"sync-service"``) starts its agent with the synchronous facade
  (``aiorpc_autograd.sync.rpc.init_rpc``, on a loop thread of its own) instead,
  while the commands still run on the process's main loop.

Targets are module-level ``async def`` functions of a module under ``tests/``
(they are pickled by reference). A child sends back ``("result", ok, value or
formatted traceback)`` and leaves with ``os._exit`` (left-over pool threads
cannot keep it alive). Children may also :func:`post` events to the test and
:func:`receive` messages from it, to step a test in lockstep with the workers
(kill a worker while a call is in flight, poke a worker's port from outside).

Invariants:

* no child outlives its group: the group kills every child at its timeout, on
  any error and on exit (``with`` block), children are daemons, die with the
  parent (``PR_SET_PDEATHSIG``) and leave when their pipe to the test closes;
* a failure raises ``AssertionError`` naming each rank's fate (its traceback,
  its exit code, or "killed at the timeout"); once one rank failed, the others
  get a short grace period and are then killed rather than waited for;
* only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = [
    "Died",
    "WorkerGroup",
    "agent_tcp_port",
    "barrier",
    "free_port",
    "open_service_pids",
    "post",
    "receive",
    "run_processes",
    "run_workers",
    "spawn_workers",
    "start_service",
]

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "aiorpc_autograd", "tests.integration.harness"])

# After one rank failed, how long the others may take to finish on their own.
FAIL_GRACE_S = 5.0
# Once the other ranks reported, how long ranks allowed to die may still run.
ALLOWED_GRACE_S = 2.0

# Service groups not closed yet: long-lived on purpose (the orphan check spares them).
_OPEN_SERVICES: weakref.WeakSet[WorkerGroup] = weakref.WeakSet()


def open_service_pids() -> set[int]:
    """Process ids of the workers of every service group not closed yet."""
    return {pid for group in list(_OPEN_SERVICES) for pid in group.pids}


Target = Callable[..., Coroutine[Any, Any, Any]]
EnvSpec = Mapping[str, str] | Callable[[int], Mapping[str, str]] | None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Died:
    """The result of a rank that exited without reporting (allowed by ``join``)."""

    exitcode: int | None


# --------------------------------------------------------------------- children

_child_conn: Connection | None = None
_child_lock = threading.Lock()
_messages: queue.SimpleQueue[Any] = queue.SimpleQueue()
_commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
_gos: queue.SimpleQueue[int] = queue.SimpleQueue()
_barrier_gen = itertools.count(1)


@dataclass(frozen=True)
class _Spec:
    rank: int
    world_size: int
    init_method: str
    mode: str  # "managed" | "raw" | "service" | "sync-service"
    target: Target | None
    args: tuple[Any, ...]
    options_kwargs: dict[str, Any] | None
    name: str
    env: dict[str, str] = field(default_factory=dict)
    start_barrier: bool = True


def _child_send(message: Any) -> None:
    conn = _child_conn
    if conn is None:
        raise RuntimeError("post/receive only work inside a harness worker")
    with _child_lock:
        conn.send(message)


def post(obj: Any) -> None:
    """In a worker: send ``obj`` to the test process (see ``WorkerGroup.next_event``).

    Callable from any thread of the worker.
    """
    _child_send(("event", obj))


async def receive(timeout: float = 30.0) -> Any:
    """In a worker: wait for the next ``WorkerGroup.send(rank, obj)`` and return ``obj``.

    Polls on the loop (no helper thread that could outlive the loop).

    Raises:
        TimeoutError: nothing arrived within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _messages.get_nowait()
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no message from the test within {timeout}s") from None
            await asyncio.sleep(0.005)


async def barrier(timeout: float = 60.0) -> None:
    """In a worker: wait until every rank of the group reached this barrier.

    The test process coordinates it (no use of the package under test). Managed
    workers pass one right after ``init_rpc`` so that their targets start
    together (``test_lifecycle.test_call_to_peer_still_in_init_rpc`` covers calls
    to a peer still inside ``init_rpc``, once a bug).

    Raises:
        TimeoutError: the others did not arrive within ``timeout`` seconds.
    """
    gen = next(_barrier_gen)
    _child_send(("ready", gen))
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = _gos.get_nowait()
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"barrier {gen}: not every rank arrived in {timeout}s") from None
            await asyncio.sleep(0.002)
            continue
        assert got == gen, f"barrier generations out of step: {got} != {gen}"
        return


def agent_tcp_port() -> int:
    """In a worker: the TCP port this worker's agent listens on.

    Read from the address the agent published for itself at rendezvous.
    """
    from aiorpc_autograd import api

    agent = api.current_agent()
    return int(agent._peers[agent.info.id].address.port)


def _die_with_parent() -> None:
    # Linux: SIGKILL this child when the test process goes (even by SIGKILL).
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _reader() -> None:
    conn = _child_conn
    assert conn is not None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(3)  # the test process is gone: do not linger
        if message[0] == "msg":
            _messages.put(message[1])
        elif message[0] == "go":
            _gos.put(message[1])
        else:
            _commands.put(message)


async def _managed(spec: _Spec) -> Any:
    import aiorpc_autograd as rpc

    options = rpc.RpcOptions(**spec.options_kwargs) if spec.options_kwargs else None
    if spec.mode == "sync-service":
        return await _managed_sync(spec, options)
    await rpc.init_rpc(
        spec.name, spec.rank, spec.world_size, init_method=spec.init_method, options=options
    )
    try:
        if spec.start_barrier:
            await barrier()
        if spec.mode == "service":
            result = await _serve(spec)
        else:
            assert spec.target is not None
            result = await spec.target(spec.rank, spec.world_size, *spec.args)
    except BaseException:
        await rpc.shutdown(graceful=False)
        raise
    await rpc.shutdown()
    return result


async def _managed_sync(spec: _Spec, options: Any) -> Any:
    """A service worker whose agent the synchronous facade started."""
    from aiorpc_autograd.sync import rpc as sync_rpc

    def init() -> None:
        opts = sync_rpc.TensorPipeRpcBackendOptions(
            init_method=spec.init_method, **(vars(options) if options else {})
        )
        sync_rpc.init_rpc(
            spec.name, rank=spec.rank, world_size=spec.world_size, rpc_backend_options=opts
        )

    await asyncio.to_thread(init)
    try:
        if spec.start_barrier:
            await barrier()
        result = await _serve(spec)
    except BaseException:
        await asyncio.to_thread(sync_rpc.shutdown, False)
        raise
    await asyncio.to_thread(sync_rpc.shutdown)
    return result


async def _serve(spec: _Spec) -> bool:
    tasks: set[asyncio.Task[None]] = set()

    async def run(seq: int, func: Target, args: tuple[Any, ...]) -> None:
        try:
            reply = ("reply", seq, True, await func(spec.rank, spec.world_size, *args))
        except BaseException:
            reply = ("reply", seq, False, traceback.format_exc())
        _send_safely(reply, lambda tb: ("reply", seq, False, tb))

    while True:
        try:
            command = _commands.get_nowait()
        except queue.Empty:
            await asyncio.sleep(0.005)
            continue
        if command[0] == "stop":
            break
        _, seq, func, args = command
        task = asyncio.create_task(run(seq, func, args))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    return True


def _send_safely(message: tuple[Any, ...], on_error: Callable[[str], tuple[Any, ...]]) -> None:
    try:
        payload = pickle.dumps(message)
    except Exception:
        payload = pickle.dumps(
            on_error("the value cannot be sent back:\n" + traceback.format_exc())
        )
    conn = _child_conn
    assert conn is not None
    with _child_lock:
        conn.send_bytes(payload)


def _child_main(spec: _Spec, conn: Connection) -> None:
    global _child_conn
    _die_with_parent()
    _child_conn = conn
    threading.Thread(target=_reader, name="harness-reader", daemon=True).start()
    os.environ.update(spec.env)
    try:
        import torch

        torch.set_num_threads(1)  # several workers share a couple of cores
        import aiorpc_autograd as rpc

        if spec.mode == "raw":
            assert spec.target is not None
            value = rpc.run(spec.target(spec.rank, spec.world_size, spec.init_method, *spec.args))
        else:
            value = rpc.run(_managed(spec))
        message: tuple[Any, ...] = ("result", True, value)
    except BaseException:
        message = ("result", False, traceback.format_exc())
    try:
        _send_safely(message, lambda tb: ("result", False, tb))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ------------------------------------------------------------------ test process


class WorkerGroup:
    """A group of worker processes; use as a context manager.

    Args:
        target: the module-level ``async def`` each worker runs (None for a
            service group).
        world_size: the number of workers.
        args: extra arguments for ``target``.
        mode: ``"managed"``, ``"raw"``, ``"service"`` or ``"sync-service"`` (see
            the module docstring).
        options_kwargs: keyword arguments of ``rpc.RpcOptions`` (managed/service).
        names: worker names by rank (managed/service); default ``worker{rank}``.
        env: environment variables set in each child before it starts, or a
            function of the rank returning them. Torch and this package are
            imported already (in the fork server): a variable read only at
            import (``OMP_NUM_THREADS``, say) has no effect there; launch a
            script with ``subprocess`` for that, as the example tests do.
        timeout: the default deadline, in seconds, of :meth:`join`.
        start_barrier: managed/service workers wait for each other (through
            the test process) between ``init_rpc`` and their target.
    """

    def __init__(
        self,
        target: Target | None,
        world_size: int,
        args: tuple[Any, ...] = (),
        *,
        mode: str = "managed",
        options_kwargs: dict[str, Any] | None = None,
        names: list[str] | None = None,
        env: EnvSpec = None,
        timeout: float = 60.0,
        start_barrier: bool = True,
    ) -> None:
        if mode not in ("managed", "raw", "service", "sync-service"):
            raise ValueError(f"unknown mode {mode!r}")
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        self.world_size = world_size
        self.timeout = timeout
        self.port = free_port()
        self.init_method = f"tcp://127.0.0.1:{self.port}"
        self.broken = False
        self._closed = False
        self._label = getattr(target, "__qualname__", mode)
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[Connection] = []
        self._open: set[int] = set()
        self._exitcodes: dict[int, int | None] = {}
        self._barriers: dict[int, set[int]] = {}
        self._results: dict[int, tuple[bool, Any]] = {}
        self._events: list[tuple[int, Any]] = []
        self._replies: dict[int, tuple[int, bool, Any]] = {}
        self._seq = itertools.count(1)
        if mode in ("service", "sync-service"):
            _OPEN_SERVICES.add(self)
        try:
            for rank in range(world_size):
                rank_env = env(rank) if callable(env) else env
                spec = _Spec(
                    rank=rank,
                    world_size=world_size,
                    init_method=self.init_method,
                    mode=mode,
                    target=target,
                    args=tuple(args),
                    options_kwargs=options_kwargs,
                    name=names[rank] if names else f"worker{rank}",
                    env=dict(rank_env or {}),
                    start_barrier=start_barrier,
                )
                parent_end, child_end = _CTX.Pipe(duplex=True)
                proc = _CTX.Process(
                    target=_child_main,
                    args=(spec, child_end),
                    name=f"harness-worker{rank}",
                    daemon=True,
                )
                self._conns.append(parent_end)
                self._procs.append(proc)
                proc.start()
                child_end.close()
                self._open.add(rank)
        except BaseException:
            self.close()
            raise

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- processes ----------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Process ids by rank (empty once the group is closed)."""
        if self._closed:
            return []
        return [p.pid for p in self._procs if p.pid is not None]

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to worker ``rank`` (if it is still running)."""
        proc = self._procs[rank]
        if self._closed or not proc.is_alive() or proc.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)

    def close(self) -> None:
        """Kill every child still running and release the pipes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _OPEN_SERVICES.discard(self)
        for proc in self._procs:
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    proc.kill()
        for rank, proc in enumerate(self._procs):
            with contextlib.suppress(Exception):
                proc.join(10)
                self._exitcodes.setdefault(rank, proc.exitcode)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.close()
        for conn in self._conns:
            conn.close()
        self._open.clear()

    # -- messages -----------------------------------------------------------

    def send(self, rank: int, obj: Any) -> None:
        """Deliver ``obj`` to :func:`receive` in worker ``rank``."""
        self._conns[rank].send(("msg", obj))

    def _pump(self, timeout: float) -> None:
        """Read whatever the children sent, waiting up to ``timeout`` for something."""
        conns = {self._conns[r]: r for r in self._open}
        if not conns:
            time.sleep(min(timeout, 0.01))
            return
        for conn in wait(list(conns), max(timeout, 0.0)):
            rank = conns[conn]  # type: ignore[index]
            try:
                while True:
                    self._dispatch(rank, conn.recv())  # type: ignore[union-attr]
                    if not conn.poll(0):  # type: ignore[union-attr]
                        break
            except (EOFError, OSError):
                self._open.discard(rank)

    def _dispatch(self, rank: int, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "result":
            self._results[rank] = (message[1], message[2])
        elif kind == "event":
            self._events.append((rank, message[1]))
        elif kind == "reply":
            self._replies[message[1]] = (rank, message[2], message[3])
        elif kind == "ready":
            gen = message[1]
            arrived = self._barriers.setdefault(gen, set())
            arrived.add(rank)
            if len(arrived) == self.world_size:
                for conn in self._conns:
                    with contextlib.suppress(OSError):
                        conn.send(("go", gen))

    def next_event(self, timeout: float = 30.0, rank: int | None = None) -> tuple[int, Any]:
        """The next ``post``-ed event (from ``rank`` if given) as ``(rank, obj)``.

        Raises:
            AssertionError: none came in time (each rank's fate is reported).
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, (r, obj) in enumerate(self._events):
                if rank is None or r == rank:
                    del self._events[i]
                    return r, obj
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._open:
                self.broken = True
                raise AssertionError(
                    f"no event from {'any rank' if rank is None else f'rank {rank}'} "
                    f"within {timeout}s\n" + self._report(set(), "no event")
                )
            self._pump(min(remaining, 0.5))

    # -- service groups -----------------------------------------------------

    def call(self, rank: int, func: Target, *args: Any, timeout: float = 30.0) -> Any:
        """Service groups: run ``await func(rank, world_size, *args)`` on ``rank``.

        Returns:
            Its return value.

        Raises:
            AssertionError: it raised (with its traceback), or did not finish
                in time (the group is then killed and marked broken).
        """
        return self.call_many([(rank, func, args)], timeout=timeout)[0]

    def call_all(
        self,
        func: Target,
        *args: Any,
        ranks: Iterable[int] | None = None,
        timeout: float = 30.0,
    ) -> list[Any]:
        """Service groups: :meth:`call` on several ranks at once (default: all);
        returns the results in rank order."""
        chosen = list(range(self.world_size) if ranks is None else ranks)
        return self.call_many([(r, func, args) for r in chosen], timeout=timeout)

    def call_many(
        self, calls: list[tuple[int, Target, tuple[Any, ...]]], timeout: float = 30.0
    ) -> list[Any]:
        """Service groups: start each ``(rank, func, args)`` at once, return the
        results in order; see :meth:`call`."""
        if self.broken:
            raise AssertionError("this worker group is broken by an earlier failure")
        seqs = []
        for rank, func, args in calls:
            seq = next(self._seq)
            self._conns[rank].send(("call", seq, func, tuple(args)))
            seqs.append(seq)
        deadline = time.monotonic() + timeout
        while not all(s in self._replies for s in seqs):
            remaining = deadline - time.monotonic()
            dead = [r for r, _, _ in calls if r not in self._open]
            if remaining <= 0 or dead:
                self.broken = True
                why = f"timed out after {timeout}s" if remaining <= 0 else f"ranks {dead} exited"
                report = self._report(set(), "killed")
                self.close()
                names = ", ".join(f"{getattr(f, '__qualname__', f)}@{r}" for r, f, _ in calls)
                raise AssertionError(f"service call {names} {why}\n{report}")
            self._pump(min(remaining, 0.5))
        replies = [self._replies.pop(s) for s in seqs]
        failures = [
            f"rank {rank} raised in {getattr(calls[i][1], '__qualname__', calls[i][1])}:\n{value}"
            for i, (rank, ok, value) in enumerate(replies)
            if not ok
        ]
        if failures:
            raise AssertionError("\n".join(failures))
        return [value for _, _, value in replies]

    def stop(self, timeout: float | None = None) -> list[Any]:
        """Service groups: stop serving, shut down gracefully, and :meth:`join`."""
        for rank in sorted(self._open):
            with contextlib.suppress(OSError):
                self._conns[rank].send(("stop",))
        return self.join(timeout)

    # -- results ------------------------------------------------------------

    def join(self, timeout: float | None = None, allow_dead: Iterable[int] = ()) -> list[Any]:
        """Wait for every rank's result and return them by rank.

        Args:
            timeout: seconds (default: the group's ``timeout``); then every
                child still running is killed.
            allow_dead: ranks that may exit without a result (they get
                :class:`Died` in the list); once every other rank has
                reported, these are killed if still running after a short grace.

        Raises:
            AssertionError: a rank raised, died (outside ``allow_dead``) or
                timed out; the message has each rank's traceback or fate.
        """
        allowed = set(allow_dead)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        killed_because = f"killed at the timeout of {timeout}s (still running)"
        others_done = False  # every rank outside allow_dead has reported
        while self._open:
            now = time.monotonic()
            if self._failed(allowed):
                grace_end = now + FAIL_GRACE_S
                if grace_end < deadline:
                    deadline = grace_end
                    killed_because = "killed: still running after another rank failed"
            elif not others_done and all(
                r in self._results for r in range(self.world_size) if r not in allowed
            ):
                # Ranks allowed to die that still run (stopped, say) are not waited for.
                others_done = True
                deadline = min(deadline, now + ALLOWED_GRACE_S)
            if now >= deadline:
                break
            self._pump(min(deadline - now, 0.5))
        stuck = {
            r for r in self._open if r not in self._results and not (others_done and r in allowed)
        }
        self.close()
        if stuck or self._failed(allowed):
            self.broken = True
            raise AssertionError(
                f"worker group {self._label} failed:\n" + self._report(stuck, killed_because)
            )
        results: list[Any] = []
        for rank in range(self.world_size):
            if rank in self._results:
                results.append(self._results[rank][1])
            else:
                results.append(Died(self._exitcode(rank)))
        return results

    def _failed(self, allowed: set[int]) -> bool:
        for rank in range(self.world_size):
            result = self._results.get(rank)
            if result is not None and not result[0]:
                return True
            if result is None and rank not in self._open and rank not in allowed:
                return True
        return False

    def _exitcode(self, rank: int) -> int | None:
        if rank not in self._exitcodes:
            proc = self._procs[rank]
            proc.join(5)
            self._exitcodes[rank] = proc.exitcode
        return self._exitcodes[rank]

    def _report(self, running: set[int], running_note: str) -> str:
        lines = []
        for rank in range(self.world_size):
            result = self._results.get(rank)
            if result is not None and result[0]:
                lines.append(f"--- rank {rank}: returned {result[1]!r:.200}")
            elif result is not None:
                lines.append(f"--- rank {rank} raised:\n{result[1]}")
            elif rank in running or rank in self._open:
                lines.append(f"--- rank {rank}: {running_note}")
            else:
                lines.append(f"--- rank {rank}: exited with code {self._exitcode(rank)}")
        return "\n".join(lines)


def spawn_workers(
    target: Target,
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    options_kwargs: dict[str, Any] | None = None,
    names: list[str] | None = None,
    env: EnvSpec = None,
    start_barrier: bool = True,
) -> WorkerGroup:
    """Start a managed group (see :func:`run_workers`) and return it at once,
    for tests that talk to or kill workers while they run; use it in ``with``
    and finish with :meth:`WorkerGroup.join`."""
    return WorkerGroup(
        target,
        world_size,
        args,
        mode="managed",
        options_kwargs=options_kwargs,
        names=names,
        env=env,
        timeout=timeout,
        start_barrier=start_barrier,
    )


def run_workers(
    target: Target,
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    options_kwargs: dict[str, Any] | None = None,
    names: list[str] | None = None,
    env: EnvSpec = None,
    start_barrier: bool = True,
) -> list[Any]:
    """Run ``await target(rank, world_size, *args)`` between ``init_rpc`` and a
    graceful ``shutdown`` in ``world_size`` fresh processes.

    Args:
        target: a module-level ``async def`` of a module under ``tests/``.
        world_size: the number of workers (``worker0``, ``worker1``, ...).
        args: extra arguments for ``target`` (picklable).
        timeout: seconds before every child is killed and the run fails.
        options_kwargs: keyword arguments of ``rpc.RpcOptions``.
        names: worker names by rank instead of ``worker{rank}``.
        env: environment variables for the children (or a function of the rank).
        start_barrier: wait until every rank is past ``init_rpc`` before the target.

    Returns:
        The results by rank.

    Raises:
        AssertionError: a rank raised or died, or the group outlived
            ``timeout`` (every child is killed first); with each rank's fate.
    """
    with spawn_workers(
        target,
        world_size,
        *args,
        timeout=timeout,
        options_kwargs=options_kwargs,
        names=names,
        env=env,
        start_barrier=start_barrier,
    ) as group:
        return group.join()


def run_processes(
    target: Target,
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    env: EnvSpec = None,
    allow_dead: Iterable[int] = (),
) -> list[Any]:
    """Like :func:`run_workers` for raw targets: ``await target(rank, world_size,
    init_method, *args)`` does its own ``init_rpc`` and ``shutdown``."""
    with WorkerGroup(target, world_size, args, mode="raw", env=env, timeout=timeout) as group:
        return group.join(allow_dead=allow_dead)


def start_service(
    world_size: int,
    *,
    options_kwargs: dict[str, Any] | None = None,
    timeout: float = 60.0,
    sync: bool = False,
) -> WorkerGroup:
    """Start a service group: workers that run ``group.call(rank, func, *args)``
    commands until ``group.stop()`` (``sync``: agents started by the
    synchronous facade)."""
    mode = "sync-service" if sync else "service"
    return WorkerGroup(None, world_size, mode=mode, options_kwargs=options_kwargs, timeout=timeout)
