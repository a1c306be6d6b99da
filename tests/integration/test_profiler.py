"""RPC profiling between real worker processes: spans, torch.profiler, timeline.

Every check runs on ``worker0`` of the module's shared three-worker service
group (``conftest.service``) and returns what it saw; assertions are made
here. Functions called remotely are module-level so they pickle by name.

Tolerances: spans that come back with a call are placed with that call's own
NTP offset, which puts the callee's ``[t1, t2]`` strictly inside the caller's
``[t0, t3]`` (so nesting is checked exactly, up to the microsecond rounding of
Chrome's JSON); the group timeline uses one offset per worker, whose error the
trace states (``otherData.clock[w].error_bound_ns``, half the least round trip
of the clock exchanges): nesting there is checked within the sum of the two
workers' bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from typing import Any

import pytest
import torch

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd, profiler
from aiorpc_autograd.api import current_agent
from aiorpc_autograd.optim import DistributedOptimizer
from aiorpc_autograd.tracing import Tracer
from tests.integration.harness import WorkerGroup

# Generous: a loaded 2-core box runs several such groups at once; each check
# itself takes well under a second once torch's profiler is warm.
pytestmark = pytest.mark.timeout(240)
CALL_TIMEOUT = 90.0

MODULE = __name__
ROUND = 0.002  # µs: float rounding of the JSON timestamps


# --------------------------------------------------------------------- remote functions


def leaf(x: torch.Tensor) -> torch.Tensor:
    return torch.add(x, 1) * 2


def hop(x: torch.Tensor, to: str) -> torch.Tensor:
    """On worker1: a plain function (pool thread) that calls on to ``to``."""
    return rpc.rpc_sync(to, leaf, (x,)) + 1


async def hop_async(x: torch.Tensor, to: str) -> torch.Tensor:
    return await rpc.rpc_async(to, leaf, (x,)) - 1


def fail(message: str) -> None:
    raise ValueError(message)


def make_param() -> torch.Tensor:
    return torch.ones(4, requires_grad=True)


def warm_optimizers() -> None:
    """The first optimizer a process builds imports torch._dynamo (seconds on
    a loaded box): done here, in the pool, not on the loop that builds the
    DistributedOptimizer's local optimizer."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def use_param(p: rpc.RRef[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return p.local_value() * x * 3


def _tracer() -> Tracer:
    tracer: Tracer = current_agent().extensions["tracing"]
    return tracer


async def set_skew(rank: int, world_size: int, skew_ns: int) -> None:
    """Shift this worker's profiling clock: it plays a host with another clock."""
    _tracer().skew_ns = skew_ns


async def tracer_state(rank: int, world_size: int) -> dict[str, Any]:
    tracer = _tracer()
    return {
        "active": current_agent().tracer is not None,
        "spans": len(tracer.spans),
        "ids": repr(tracer.ids),
        "inflight": len(tracer.inflight),
        "torch_calls": len(tracer.torch_calls),
        "recording": tracer.recording,
    }


# --------------------------------------------------------------------- checks (on worker0)


async def check_torch_nested(rank: int, world_size: int, path: str) -> dict[str, Any]:
    x = torch.ones(3)
    with torch.profiler.profile() as prof:
        value = await rpc.rpc_async("worker1", hop, (x, "worker2"))
    trace = profiler.export_chrome_trace(prof, path)
    names = [e.name for e in prof.events()]
    return {"value": value.tolist(), "trace": trace, "event_names": names}


async def check_torch_exception(rank: int, world_size: int, path: str) -> dict[str, Any]:
    with torch.profiler.profile() as prof:
        try:
            await rpc.rpc_async("worker1", fail, ("boom",))
        except ValueError as exc:
            raised = str(exc)
    trace = profiler.export_chrome_trace(prof, path)
    return {"raised": raised, "trace": trace}


async def check_timeline(rank: int, world_size: int, path: str) -> dict[str, Any]:
    x = torch.ones(3)
    await profiler.start()
    await rpc.rpc_async("worker1", hop, (x, "worker2"))
    await rpc.rpc_async("worker1", hop_async, (x, "worker2"))
    await rpc.rpc_async("worker2", leaf, (x,))
    ref = rpc.remote("worker2", leaf, (x,))
    await ref.to_here()
    with contextlib.suppress(ValueError):
        await rpc.rpc_async("worker2", fail, ("in the window",))
    trace = await profiler.stop(path)
    return trace


async def check_backward(rank: int, world_size: int) -> dict[str, Any]:
    await rpc.rpc_async("worker1", warm_optimizers, timeout=0)
    param = rpc.remote("worker1", make_param)
    opt = DistributedOptimizer(torch.optim.SGD, [param], lr=0.1)
    x = torch.full((4,), 2.0, requires_grad=True)
    await param.to_here()
    await profiler.start()
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("worker1", use_param, (param, x))
        await dist_autograd.backward(ctx, [y.sum()])
        grads = dist_autograd.get_gradients(ctx)
        await opt.step(ctx)
    trace = await profiler.stop()
    return {"trace": trace, "x_grad": grads[x].tolist()}


async def check_collect(rank: int, world_size: int) -> dict[str, Any]:
    """Calls made by a task while ``collect`` records a fixed window."""
    stop = asyncio.Event()

    async def traffic() -> int:
        n = 0
        while not stop.is_set():
            await rpc.rpc_async("worker1", leaf, (torch.ones(2),))
            n += 1
        return n

    task = asyncio.create_task(traffic())
    await asyncio.sleep(0.05)
    trace = await profiler.collect(0.3, workers=["worker0", "worker1"])
    stop.set()
    return {"calls": await task, "trace": trace}


async def check_off(rank: int, world_size: int) -> list[Any]:
    before = [await rpc.rpc_async(f"worker{r}", _remote_state) for r in range(world_size)]
    x = torch.ones(2, requires_grad=True)
    await rpc.rpc_async("worker1", hop, (x, "worker2"))
    ref = rpc.remote("worker2", leaf, (x,))
    await ref.to_here()
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("worker1", leaf, (x,))
        await dist_autograd.backward(ctx, [y.sum()])
    after = [await rpc.rpc_async(f"worker{r}", _remote_state) for r in range(world_size)]
    return [before, after]


async def _remote_state() -> dict[str, Any]:
    return await tracer_state(0, 0)


# --------------------------------------------------------------------- helpers


def _x(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e.get("ph") == "X"]


def _processes(trace: dict[str, Any]) -> dict[int, str]:
    return {
        e["pid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }


def _one(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [e for e in events if e["name"] == name]
    assert len(found) == 1, (name, [e["name"] for e in events])
    return found[0]


def _inside(inner: dict[str, Any], outer: dict[str, Any], tol_us: float = ROUND) -> bool:
    return (
        inner["ts"] >= outer["ts"] - tol_us
        and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + tol_us
    )


# --------------------------------------------------------------------- tests


def test_nested_call_spans_in_torch_trace(service: WorkerGroup, tmp_path: Any) -> None:
    """A -> B -> C under torch.profiler on A: A's trace holds its call as a
    record_function range and B's and C's spans and torch ops, named after the
    call, in rows named after the remote workers, nested in time."""
    out = service.call(0, check_torch_nested, str(tmp_path / "torch.json"), timeout=CALL_TIMEOUT)
    assert out["value"] == [5.0, 5.0, 5.0]
    call = f"rpc_async#{MODULE}.hop(worker0 -> worker1)"
    inner = f"rpc_async#{MODULE}.leaf(worker1 -> worker2)"
    assert call in out["event_names"]  # a record_function range of torch.profiler
    trace = out["trace"]
    with open(tmp_path / "torch.json", encoding="utf-8") as f:
        assert json.load(f) == trace
    procs = _processes(trace)
    xs = _x(trace)
    local = [e for e in xs if e["name"] == call and e.get("cat") == "user_annotation"]
    assert len(local) == 1
    top = local[0]
    remote = {name: pid for pid, name in procs.items() if name.endswith("(remote)")}
    assert set(remote) == {"worker1 (remote)", "worker2 (remote)"}
    w1 = [e for e in xs if e["pid"] == remote["worker1 (remote)"]]
    w2 = [e for e in xs if e["pid"] == remote["worker2 (remote)"]]
    assert all(e["name"].startswith(f"{call}#remote_op: ") for e in w1 + w2)
    assert all(e["args"]["worker"] == "worker1" for e in w1)
    assert all(e["args"]["worker"] == "worker2" for e in w2)
    b_serve = _one(w1, f"{call}#remote_op: {call}")  # B serving A's call
    b_run = _one(w1, f"{call}#remote_op: run {MODULE}.hop (pool)")
    b_call = _one(w1, f"{call}#remote_op: {inner}")  # B's own call to C
    c_serve = _one(w2, f"{call}#remote_op: {inner}")
    c_run = _one(w2, f"{call}#remote_op: run {MODULE}.leaf (pool)")
    c_ops = [e for e in w2 if e["name"].endswith("aten::add") or e["name"].endswith("aten::mul")]
    b_ops = [e for e in w1 if e["name"].endswith("aten::add")]
    assert len(c_ops) == 2 and b_ops, [e["name"] for e in w2]
    chain = [top, b_serve, b_run, b_call, c_serve, c_run]
    for outer, inner_ev in itertools.pairwise(chain):
        assert _inside(inner_ev, outer), (inner_ev, outer)
    for op in c_ops:
        assert _inside(op, c_run, 5.0), (op, c_run)  # µs: the legacy profiler's alignment
    # Arrows from A's range to B's execution, and from B's call to C's.
    flows = [e for e in trace["traceEvents"] if e.get("ph") in ("s", "f")]
    ids = {e["id"] for e in flows}
    assert len(ids) >= 2 and all(sum(e["id"] == i for e in flows) >= 2 for i in ids)


def test_remote_exception_still_closes_spans(service: WorkerGroup, tmp_path: Any) -> None:
    out = service.call(0, check_torch_exception, str(tmp_path / "exc.json"), timeout=CALL_TIMEOUT)
    assert "boom" in out["raised"]
    call = f"rpc_async#{MODULE}.fail(worker0 -> worker1)"
    xs = _x(out["trace"])
    top = [e for e in xs if e["name"] == call and e.get("cat") == "user_annotation"]
    assert len(top) == 1 and top[0]["dur"] > 0
    serve = _one(xs, f"{call}#remote_op: {call}")
    assert serve["args"]["status"] == "ValueError"
    assert _inside(serve, top[0])


def test_group_timeline_of_three_workers(service: WorkerGroup, tmp_path: Any) -> None:
    """Valid Chrome-trace JSON; one row per worker; every flow pairs a call with
    its execution on the callee, which lies inside the call once the clocks
    are aligned, here with worker1's clock 7 s ahead and worker2's 3 s behind
    (as on other hosts); also rendered to a PNG."""
    skews = {1: 7_000_000_000, 2: -3_000_000_000}
    for rank, skew in skews.items():
        service.call(rank, set_skew, skew, timeout=CALL_TIMEOUT)
    try:
        path = tmp_path / "timeline.json"
        trace = service.call(0, check_timeline, str(path), timeout=CALL_TIMEOUT)
    finally:
        for rank in skews:
            service.call(rank, set_skew, 0, timeout=CALL_TIMEOUT)
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == trace
    assert _processes(trace) == {0: "worker0", 1: "worker1", 2: "worker2"}
    clock = trace["otherData"]["clock"]
    for rank, skew in skews.items():
        c = clock[f"worker{rank}"]
        # Same host: the true offset is the skew; the estimate is within its bound.
        assert abs(c["offset_ns"] - skew) <= c["error_bound_ns"], c
        assert 0 < c["error_bound_ns"] < 50_000_000
    events = trace["traceEvents"]
    for e in events:
        assert isinstance(e["ph"], str) and isinstance(e["pid"], int)
        if e["ph"] in ("X", "s", "f"):
            assert isinstance(e["ts"], float | int) and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert e["dur"] >= 0
    xs = _x(trace)
    calls = {e["args"]["flow"]: e for e in xs if e["cat"] == "rpc_call"}
    serves = {e["args"]["flow"]: e for e in xs if e["cat"] == "rpc_serve"}
    # hop, hop_async (and their calls on), leaf, remote, to_here, fail
    assert len(calls) >= 8 and set(calls) == set(serves)
    names = {e["name"] for e in calls.values()}
    assert {
        f"rpc_async#{MODULE}.hop(worker0 -> worker1)",
        f"rpc_async#{MODULE}.hop_async(worker0 -> worker1)",
        f"rpc_async#{MODULE}.leaf(worker1 -> worker2)",
        f"remote#{MODULE}.leaf(worker0 -> worker2)",
        "to_here#RRef(worker0 -> worker2)",
        f"rpc_async#{MODULE}.fail(worker0 -> worker2)",
    } <= names
    failed = [e for e in calls.values() if "fail" in e["name"]]
    assert failed[0]["args"]["status"] == "remote ValueError"
    flows: dict[int, dict[str, dict[str, Any]]] = {}
    for e in events:
        if e["ph"] in ("s", "f"):
            flows.setdefault(e["id"], {})[e["ph"]] = e
    assert all(set(pair) == {"s", "f"} for pair in flows.values())
    requests = {p["s"]["args"]["flow"]: p for p in flows.values() if p["s"]["name"] == "request"}
    assert set(requests) == set(calls)
    procs = _processes(trace)
    bound_us = {pid: clock[name]["error_bound_ns"] / 1000 for pid, name in procs.items()}
    for flow, pair in requests.items():
        call, serve = calls[flow], serves[flow]
        assert (pair["s"]["pid"], pair["s"]["tid"]) == (call["pid"], call["tid"])
        assert (pair["f"]["pid"], pair["f"]["tid"]) == (serve["pid"], serve["tid"])
        assert call["pid"] != serve["pid"]
        tol = bound_us[call["pid"]] + bound_us[serve["pid"]] + ROUND
        assert _inside(serve, call, tol), (call, serve, tol)
    png = tmp_path / "timeline.png"
    profiler.render(trace, png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000


def test_backward_phases_per_worker(service: WorkerGroup) -> None:
    out = service.call(0, check_backward, timeout=CALL_TIMEOUT)
    assert out["x_grad"] == [3.0] * 4  # d(sum(p * x * 3))/dx with p = 1
    xs = _x(out["trace"])
    by_worker: dict[str, set[str]] = {}
    for e in xs:
        by_worker.setdefault(e["args"]["worker"], set()).add(e["name"])
    for w in ("worker0", "worker1"):
        assert {"backward pass", "engine job"} <= by_worker[w], by_worker[w]
    assert "backward#gradients(worker0 -> worker1)" in by_worker["worker0"]  # sent
    assert "backward#gradients(worker0 -> worker1)" in by_worker["worker1"]  # received
    assert "backward#gradients(worker1 -> worker0)" in by_worker["worker1"]
    assert "backward#gradients(worker1 -> worker0)" in by_worker["worker0"]
    assert "rpc_async#aiorpc_autograd.optim._step(worker0 -> worker1)" in by_worker["worker0"]
    assert "run aiorpc_autograd.optim._step (loop)" in by_worker["worker1"]
    grads = [e for e in xs if e["name"] == "backward#gradients(worker0 -> worker1)"]
    sent = [e for e in grads if e["cat"] == "rpc_call"]
    assert sent and sent[0]["args"]["gradients"] == 1 and sent[0]["args"]["send_function"] > 0
    got = [e for e in grads if e["cat"] == "rpc_serve"]
    assert got and got[0]["args"]["send_function"] == sent[0]["args"]["send_function"]


def test_collect_records_a_window_of_the_chosen_workers(service: WorkerGroup) -> None:
    out = service.call(0, check_collect, timeout=CALL_TIMEOUT)
    trace = out["trace"]
    assert _processes(trace) == {0: "worker0", 1: "worker1"}
    calls = [e for e in _x(trace) if e["cat"] == "rpc_call"]
    serves = [e for e in _x(trace) if e["cat"] == "rpc_serve"]
    name = f"rpc_async#{MODULE}.leaf(worker0 -> worker1)"
    assert calls and all(e["name"] == name for e in calls)
    assert 0 < len(calls) <= out["calls"]
    # A call in flight as the window closes may be recorded on one side only.
    paired = {e["args"]["flow"] for e in calls} & {e["args"]["flow"] for e in serves}
    assert len(paired) >= len(calls) - 1 and len(paired) >= len(serves) - 1


def test_profiling_off_records_nothing(service: WorkerGroup) -> None:
    before, after = service.call(0, check_off, timeout=CALL_TIMEOUT)
    assert before == after
    for state in after:
        assert not state["active"] and not state["recording"]
        assert state["inflight"] == 0 and state["torch_calls"] == 0
