"""RPC profiling: the group timeline, torch.profiler traces with remote events,
and a PNG rendering. ``from aiorpc_autograd import profiler``

The group timeline
------------------
::

    await profiler.start()                 # every worker records spans from now
    ...                                    # one training step, say
    trace = await profiler.stop("step.json")   # gathered, aligned, merged

``stop`` returns (and writes, given a path) one Chrome / Perfetto trace: one
process row per worker (its rank is the pid), rows per kind of span (``calls``
made, requests ``serving``, ``backward`` pass and engine jobs), flow arrows from
each call to its execution on the callee and back. Every worker's clock is
mapped onto the collecting worker's with the offset the NTP exchange gives
(``stop`` pings each worker a few times and keeps the exchange with the least
delay); ``trace["otherData"]["clock"]`` says per worker the offset applied and
its error bound (half that least round trip). No clock is assumed shared:
workers on other hosts line up the same way. :func:`collect` records over a
fixed window instead. Open the file in https://ui.perfetto.dev or
``chrome://tracing``, or draw it with :func:`render`.

torch.profiler
--------------
Under ``torch.profiler.profile()`` on a caller, every RPC is a
``record_function`` range named as PyTorch's RPC named them
(``rpc_async#module.fn(worker0 -> worker1)``; also ``remote#``, ``to_here#``,
``backward#gradients``), the callee records its spans and torch ops for that
call and sends them back with the answer, and :func:`export_chrome_trace`
writes the profiler's Chrome trace with them added: one process row per remote
worker (``worker1 (remote)``), each event named
``<call>#remote_op: <event>`` and placed inside the call on the caller's
timeline, with flow arrows.

Command line: ``python -m aiorpc_autograd.profiler render trace.json out.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .api import current_agent
from .codec import RunWithProfilingResp
from .options import WorkerInfo
from .tracing import Span, Tracer, unpack_spans

__all__ = ["collect", "export_chrome_trace", "render", "start", "stop"]

WorkerRef = str | int | WorkerInfo

_PINGS = 8  # NTP exchanges per worker; the one with the least delay counts
_PAGE = 1_000  # spans per fetch (the decoder's floor on array lengths is 1024)
_TRACK_ORDER = ("calls", "serving", "torch ops", "backward")


def _tracer() -> Tracer:
    agent = current_agent()
    tracer: Tracer = agent.extensions["tracing"]
    return tracer


def _workers(workers: Iterable[WorkerRef] | None) -> list[WorkerInfo]:
    agent = current_agent()
    if workers is None:
        return agent.all_workers()
    return sorted({agent.worker_info(w) for w in workers}, key=lambda w: w.id)


async def _control(to: WorkerInfo, command: str, **config: Any) -> RunWithProfilingResp:
    agent = current_agent()
    tracer = _tracer()
    message = tracer.ping_message(command, **config)
    answer = await agent.request(to, message, decode=lambda m: m)
    if not isinstance(answer, RunWithProfilingResp) or len(answer.events) != 4:
        raise RuntimeError(f"worker {to.name!r} answered the profiler with {answer!r}")
    return answer


async def start(workers: Iterable[WorkerRef] | None = None) -> None:
    """Start recording spans on ``workers`` (default: every worker of the
    group, this one included), each from an empty buffer."""
    me = current_agent().info
    targets = _workers(workers)
    await asyncio.gather(*(_control(w, "start") for w in targets if w != me))
    if me in targets or workers is None:
        _tracer().set_recording(True)


async def _clock(to: WorkerInfo, pings: int) -> tuple[int, int]:
    """(offset, error bound) of ``to``'s clock against ours, in ns."""
    tracer = _tracer()
    best: tuple[int, int] | None = None
    for _ in range(pings):
        t0 = tracer.now()
        answer = await _control(to, "ping")
        t3 = tracer.now()
        t1, t2 = answer.events[0], answer.events[1]
        delay = (t3 - t0) - (t2 - t1)
        if best is None or delay < best[0]:
            best = (delay, Tracer.call_offset(t0, t1, t2, t3))
    assert best is not None
    return best[1], best[0] // 2


async def _gather(to: WorkerInfo) -> tuple[list[Span], int]:
    answer = await _control(to, "stop")
    count, dropped = answer.events[3]
    spans: list[Span] = []
    for first in range(0, count, _PAGE):
        page = await _control(to, "fetch", first=first, count=_PAGE)
        spans.extend(unpack_spans(page.events[3]))
    return spans, dropped


async def stop(
    path: str | os.PathLike[str] | None = None,
    workers: Iterable[WorkerRef] | None = None,
    *,
    pings: int = _PINGS,
) -> dict[str, Any]:
    """Stop recording on ``workers`` (default: all), gather their spans, align
    the clocks and merge them into one Chrome trace.

    Args:
        path: where to write the trace as JSON (None: only return it).
        workers: the workers to gather (those :func:`start` started).
        pings: clock exchanges per worker (the least delayed one counts).

    Returns:
        The trace (a dict in Chrome's JSON trace format).
    """
    agent = current_agent()
    me = agent.info
    tracer = _tracer()
    targets = _workers(workers)
    others = [w for w in targets if w != me]
    # This worker first: from now on its calls are not profiled, so the others
    # see no new profiled request; only those in flight may show on one side.
    if me in targets:
        tracer.set_recording(False)
    gathered = await asyncio.gather(*(_gather(w) for w in others))
    per_worker: dict[str, list[Span]] = {}
    dropped: dict[str, int] = {}
    for w, (spans, lost) in zip(others, gathered, strict=True):
        per_worker[w.name] = spans
        dropped[w.name] = lost
    if me in targets:
        per_worker[me.name] = tracer.spans
        dropped[me.name] = tracer.dropped
    clocks: dict[str, tuple[int, int]] = {me.name: (0, 0)}
    for w in others:  # one at a time: concurrent pings would share the loop's delays
        clocks[w.name] = await _clock(w, pings)
    trace = merge(per_worker, clocks, {w.name: w.id for w in targets}, dropped)
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(trace, f)
    return trace


async def collect(
    duration: float,
    path: str | os.PathLike[str] | None = None,
    workers: Iterable[WorkerRef] | None = None,
) -> dict[str, Any]:
    """Record every worker's spans for ``duration`` seconds and return (and
    write, given ``path``) the merged timeline: :func:`start`, a sleep,
    :func:`stop`."""
    chosen = None if workers is None else list(workers)
    await start(chosen)
    await asyncio.sleep(duration)
    return await stop(path, chosen)


# --------------------------------------------------------------------------- Chrome trace


def _lanes(spans: Sequence[Span]) -> list[tuple[Span, int]]:
    """Place spans on lanes where they nest (a child inside its parent, never
    a partial overlap): first fit, in start order, longer first."""
    order = sorted(spans, key=lambda s: (s[4], -(s[5] - s[4])))
    stacks: list[list[int]] = []  # per lane: ends of the open spans
    placed: list[tuple[Span, int]] = []
    for span in order:
        start, end = span[4], max(span[5], span[4])
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or stack[-1] >= end:
                stack.append(end)
                placed.append((span, lane))
                break
        else:
            stacks.append([end])
            placed.append((span, len(stacks) - 1))
    return placed


def _x_events(
    spans: Sequence[Span], pid: int, base_ns: int, shift_ns: int, prefix: str = ""
) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int, float, float]]]:
    """Chrome "X" events of one process's spans (shifted by ``-shift_ns``),
    their thread names, and per flow id where its span sits."""
    events: list[dict[str, Any]] = []
    flows: dict[str, tuple[int, int, float, float]] = {}
    by_track: dict[str, list[Span]] = {}
    for span in spans:
        by_track.setdefault(span[1], []).append(span)
    tracks = sorted(by_track, key=lambda t: (*_TRACK_ORDER, t).index(t))
    for ti, track in enumerate(tracks):
        lanes = 0
        for span, lane in _lanes(by_track[track]):
            tid = (ti + 1) * 100 + lane
            lanes = max(lanes, lane + 1)
            start = (span[4] - shift_ns - base_ns) / 1000
            dur = max(span[5] - span[4], 0) / 1000
            args = dict(span[6]) if isinstance(span[6], dict) else {}
            args.setdefault("worker", span[0])
            name = f"{prefix}{span[2]}"
            events.append(
                {
                    "ph": "X",
                    "name": name,
                    "cat": span[3],
                    "pid": pid,
                    "tid": tid,
                    "ts": start,
                    "dur": dur,
                    "args": args,
                }
            )
            flow = args.get("flow")
            if isinstance(flow, str) and span[3] in ("rpc_call", "rpc_serve"):
                flows[f"{span[3]}:{flow}"] = (pid, tid, start, start + dur)
                reply = args.get("reply_after_ns")
                if isinstance(reply, int):
                    flows[f"reply:{flow}"] = (pid, tid, start + reply / 1000, 0.0)
        for lane in range(lanes):
            events.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": pid,
                    "tid": (ti + 1) * 100 + lane,
                    "args": {"name": f"{track} {lane}" if lanes > 1 else track},
                }
            )
            events.append(
                {
                    "ph": "M",
                    "name": "thread_sort_index",
                    "pid": pid,
                    "tid": (ti + 1) * 100 + lane,
                    "args": {"sort_index": (ti + 1) * 100 + lane},
                }
            )
    return events, flows


def _flow_events(flows: dict[str, tuple[int, int, float, float]]) -> list[dict[str, Any]]:
    """Arrows from each call to its execution on the callee and back."""
    events: list[dict[str, Any]] = []
    n = 0
    for key, (cpid, ctid, cstart, _cend) in flows.items():
        if not key.startswith("rpc_call:"):
            continue
        flow = key[len("rpc_call:") :]
        serve = flows.get(f"rpc_serve:{flow}")
        if serve is None:
            continue
        spid, stid, sstart, send = serve
        n += 1
        common = {"cat": "rpc_flow", "args": {"flow": flow}}
        events.append(
            {
                "ph": "s",
                "id": 2 * n,
                "name": "request",
                "pid": cpid,
                "tid": ctid,
                "ts": cstart,
                **common,
            }
        )
        events.append(
            {
                "ph": "f",
                "bp": "e",
                "id": 2 * n,
                "name": "request",
                "pid": spid,
                "tid": stid,
                "ts": sstart,
                **common,
            }
        )
        back = flows.get(f"reply:{flow}")
        if back is not None:
            end = max(sstart, send - min(0.001, (send - sstart) / 2))
            events.append(
                {
                    "ph": "s",
                    "id": 2 * n + 1,
                    "name": "response",
                    "pid": spid,
                    "tid": stid,
                    "ts": end,
                    **common,
                }
            )
            events.append(
                {
                    "ph": "f",
                    "bp": "e",
                    "id": 2 * n + 1,
                    "name": "response",
                    "pid": back[0],
                    "tid": back[1],
                    "ts": back[2],
                    **common,
                }
            )
    return events


def merge(
    spans: dict[str, list[Span]],
    clocks: dict[str, tuple[int, int]],
    ranks: dict[str, int],
    dropped: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One Chrome trace from each worker's spans.

    Args:
        spans: worker name -> its spans (on its own clock).
        clocks: worker name -> (offset of its clock against the reference, in
            ns; the error bound of that offset).
        ranks: worker name -> rank (the trace's pid).
        dropped: worker name -> spans it could not keep.
    """
    starts = [s[4] - clocks.get(w, (0, 0))[0] for w, ss in spans.items() for s in ss]
    base = min(starts) if starts else 0
    events: list[dict[str, Any]] = []
    flows: dict[str, tuple[int, int, float, float]] = {}
    for worker in sorted(spans, key=lambda w: ranks.get(w, 0)):
        pid = ranks.get(worker, 0)
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": worker}})
        events.append(
            {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}}
        )
        xs, fl = _x_events(spans[worker], pid, base, clocks.get(worker, (0, 0))[0])
        events.extend(xs)
        flows.update(fl)
    events.extend(_flow_events(flows))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "producer": "aiorpc_autograd.profiler",
            "clock": {
                w: {"offset_ns": off, "error_bound_ns": err} for w, (off, err) in clocks.items()
            },
            "base_ns": base,
            "dropped_spans": dropped or {},
        },
    }


# --------------------------------------------------------------------------- torch.profiler


def export_chrome_trace(prof: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``prof``'s Chrome trace (``prof.export_chrome_trace(path)``) with
    the remote side of every RPC made under it added: per remote worker a
    process row ``<worker> (remote)``, its events named
    ``<call>#remote_op: <name>`` on the caller's timeline, and flow arrows
    from each call's ``record_function`` range to them. Consumes the remote
    events this worker kept (a second export of another profile starts empty).

    Args:
        prof: a finished ``torch.profiler.profile`` (or autograd profiler).
        path: the JSON file to write.

    Returns:
        The trace written.
    """
    tracer = _tracer()
    calls, tracer.torch_calls = tracer.torch_calls, []
    prof.export_chrome_trace(str(path))
    with open(path, encoding="utf-8") as f:
        trace: dict[str, Any] = json.load(f)
    events: list[dict[str, Any]] = trace.setdefault("traceEvents", [])
    shift = _torch_shift(events, calls, trace)
    local: dict[str, list[dict[str, Any]]] = {}  # call name -> its ranges, in order
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation":
            local.setdefault(str(e.get("name", "")), []).append(e)
    remote: dict[str, list[Span]] = {}
    for name, _t0, _t1, _peer, _flow, spans in calls:
        for s in spans:
            args = s[6] if isinstance(s[6], dict) else {}
            remote.setdefault(s[0], []).append(
                [s[0], s[1], f"{name}#remote_op: {s[2]}", s[3], s[4], s[5], args]
            )
    ranks: dict[str, int] = {}
    with contextlib.suppress(Exception):  # after shutdown: number the rows instead
        ranks = {w.name: w.id for w in current_agent().all_workers()}
    flows: dict[str, tuple[int, int, float, float]] = {}
    for i, (worker, spans) in enumerate(sorted(remote.items())):
        pid = 10_000_000 + ranks.get(worker, 1000 + i)
        events.append(
            {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"{worker} (remote)"}}
        )
        xs, fl = _x_events(spans, pid, 0, -shift)
        for e in xs:
            if e.get("ph") == "X":
                e["args"]["remote"] = True
        events.extend(xs)
        flows.update(fl)
    events.extend(_flow_events(flows))  # calls the remote workers made in turn
    seen: dict[str, int] = {}
    n = 0
    for name, _t0, _t1, _peer, flow, _spans in calls:
        k = seen.get(name, 0)
        seen[name] = k + 1
        ranges = local.get(name, [])
        target = flows.get(f"rpc_serve:{flow}")
        if k >= len(ranges) or target is None:
            continue
        src = ranges[k]
        n += 1
        common = {"name": "rpc", "cat": "rpc_flow", "args": {"flow": flow}}
        events.append(
            {
                "ph": "s",
                "id": 900_000_000 + n,
                "pid": src["pid"],
                "tid": src["tid"],
                "ts": src["ts"],
                **common,
            }
        )
        events.append(
            {
                "ph": "f",
                "bp": "e",
                "id": 900_000_000 + n,
                "pid": target[0],
                "tid": target[1],
                "ts": target[2],
                **common,
            }
        )
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trace, f)
    return trace


def _torch_shift(events: list[dict[str, Any]], calls: Sequence[Any], trace: dict[str, Any]) -> int:
    """ns to add to our clock to get the trace's ``ts`` (x1000): matched on our
    own ``record_function`` ranges, else from the wall clock."""
    starts: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation":
            starts.setdefault(e.get("name", ""), []).append(float(e["ts"]))
    diffs = []
    seen: dict[str, int] = {}
    for name, t0, *_ in calls:
        k = seen.get(name, 0)
        seen[name] = k + 1
        found = starts.get(name, [])
        if k < len(found):
            diffs.append(found[k] * 1000 - t0)
    if diffs:
        return int(statistics.median(diffs))
    wall = time.time_ns() - _tracer().now()
    return wall - int(trace.get("baseTimeNanoseconds", 0))


# --------------------------------------------------------------------------- rendering

_COLOURS = {
    "rpc_call": "#4c72b0",
    "rpc_serve": "#dd8452",
    "rpc_run": "#c44e52",
    "rpc_phase": "#8c8c8c",
    "autograd": "#55a868",
    "autograd_job": "#1b5e20",
    "cpu_op": "#8172b3",
}


def render(
    trace: dict[str, Any] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> None:
    """Draw a merged timeline (as :func:`stop` returns or writes) to a PNG:
    one band per worker and kind of span (its concurrent lanes stacked inside),
    spans as bars (nested phases thinner, on top), the wait for a reply left
    pale, and arrows between calls and their execution. Needs matplotlib (the
    ``plot`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    data: dict[str, Any]
    if isinstance(trace, dict):
        data = trace
    else:
        with open(trace, encoding="utf-8") as f:
            data = json.load(f)
    events: list[dict[str, Any]] = data["traceEvents"]
    pnames = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    tnames = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"
    }
    xs = [e for e in events if e.get("ph") == "X"]
    # Bands: (pid, track); a thread "serving 3" is lane 3 of band "serving".
    lanes: dict[tuple[int, int], tuple[tuple[int, str], int]] = {}
    for pid, tid in sorted({(e["pid"], e["tid"]) for e in xs}):
        name = tnames.get((pid, tid), str(tid))
        track, _, lane = name.rpartition(" ")
        if not (track and lane.isdigit()):
            track, lane = name, "0"
        lanes[(pid, tid)] = ((pid, track), int(lane))
    bands = sorted(
        {band for band, _ in lanes.values()},
        key=lambda b: (b[0], (*_TRACK_ORDER, b[1]).index(b[1])),
    )
    count = {b: 1 + max(lane for band, lane in lanes.values() if band == b) for b in bands}
    height = {b: 0.9 * max(1.0, min(count[b], 6) * 0.45) for b in bands}
    top: dict[tuple[int, str], float] = {}
    y = 0.0
    for b in reversed(bands):
        top[b] = y + height[b]
        y += height[b] + 0.35

    def row(pid: int, tid: int) -> tuple[float, float]:
        band, lane = lanes[(pid, tid)]
        h = height[band] / count[band]
        return top[band] - (lane + 1) * h, h  # (bottom, lane height)

    span_ms = max((e["ts"] + e["dur"] for e in xs), default=1.0) / 1000
    span_ms -= min((e["ts"] for e in xs), default=0.0) / 1000
    fig, ax = plt.subplots(figsize=(14, max(3.0, 0.55 * y + 1.5)))
    for pid, tid in lanes:
        mine = sorted(
            (e for e in xs if (e["pid"], e["tid"]) == (pid, tid)),
            key=lambda e: (e["ts"], -e["dur"]),
        )
        bottom, h = row(pid, tid)
        stack: list[float] = []
        for e in mine:
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            depth = len(stack)
            stack.append(e["ts"] + e["dur"])
            bar = h * 0.85 * (0.6**depth)
            pale = e["name"] == "wait for reply"
            ax.broken_barh(
                [(e["ts"] / 1000, max(e["dur"] / 1000, span_ms / 2000))],
                (bottom + (h - bar) / 2, bar),
                facecolors="#e8e8e8" if pale else _COLOURS.get(e.get("cat", ""), "#999999"),
                edgecolors="none" if depth else "black",
                linewidth=0.2,
                alpha=0.5 if pale else 1.0,
            )
            if depth == 0 and e["dur"] / 1000 > span_ms * 0.06:
                ax.text(
                    e["ts"] / 1000 + span_ms * 0.002,
                    bottom + h / 2,
                    _short(e["name"]),
                    fontsize=5.5,
                    va="center",
                    ha="left",
                    clip_on=True,
                )
    ends: dict[int, dict[str, tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") in ("s", "f") and (e["pid"], e["tid"]) in lanes:
            bottom, h = row(e["pid"], e["tid"])
            ends.setdefault(e["id"], {})[e["ph"]] = (e["ts"] / 1000, bottom + h / 2)
    for pair in ends.values():
        if "s" in pair and "f" in pair:
            ax.annotate(
                "",
                xy=pair["f"],
                xytext=pair["s"],
                arrowprops={"arrowstyle": "->", "color": "#222222", "lw": 0.4, "alpha": 0.35},
            )
    ax.set_yticks([top[b] - height[b] / 2 for b in bands])
    ax.set_yticklabels(
        [
            f"{pnames.get(b[0], b[0])} · {b[1]}" + (f" ({count[b]})" if count[b] > 1 else "")
            for b in bands
        ],
        fontsize=8,
    )
    for b in bands:
        ax.axhline(top[b] + 0.175, color="#cccccc", lw=0.5)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.2, y)
    clock = data.get("otherData", {}).get("clock", {})
    bound = max((c.get("error_bound_ns", 0) for c in clock.values()), default=0)
    ax.set_title(
        title or f"RPC timeline: {len(pnames)} workers, clocks aligned to ±{bound / 1000:.0f} µs",
        fontsize=10,
    )
    legend = [Patch(color=c, label=k.replace("rpc_", "")) for k, c in _COLOURS.items()]
    ax.legend(handles=legend, loc="upper right", fontsize=6, ncol=len(legend))
    fig.tight_layout()
    fig.savefig(out, dpi=140)
    plt.close(fig)


def _short(name: str) -> str:
    head, _, rest = name.partition("(")
    head = head.split("#", 1)[-1] if "#" in head else head
    return head.rsplit(".", 1)[-1] + ("(" + rest if rest else "")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aiorpc_autograd.profiler render TRACE.json OUT.png [TITLE]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "render":
        print(main.__doc__, file=sys.stderr)
        return 2
    render(args[1], args[2], title=args[3] if len(args) > 3 else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
