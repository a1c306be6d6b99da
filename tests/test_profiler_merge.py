"""The pure parts of profiling: call names read from pickles, lanes, the merge
into one Chrome trace (clock offsets, flow pairing) and the PNG rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aiorpc_autograd import codec
from aiorpc_autograd.profiler import _lanes, merge, render
from aiorpc_autograd.tracing import Span, _pickled_name, call_label, pack_spans, unpack_spans


def _payload_name(func: object) -> str | None:
    return _pickled_name(codec.dump_payload((func, (torch.ones(2),), {}), True).data)


def module_function(x: int) -> int:
    return x


def test_call_names_come_from_the_pickle_without_unpickling() -> None:
    assert _payload_name(module_function) == f"{__name__}.module_function"
    assert _payload_name(torch.add) == "torch._C._VariableFunctionsClass.add"
    assert _payload_name(len) == "builtins.len"
    assert _pickled_name(b"\x80\x05garbage") is None
    call = codec.PythonCall("registered", codec.dump_payload(((), {}), True))
    assert call_label(call) == ("rpc_async", "registered")


def _span(worker: str, track: str, name: str, start: int, end: int, **args: object) -> Span:
    return [worker, track, name, args.pop("cat", "rpc_phase"), start, end, dict(args)]


def test_lanes_keep_children_with_their_parent_and_split_overlaps() -> None:
    a = _span("w", "calls", "a", 0, 100)
    a1 = _span("w", "calls", "a1", 0, 10)
    a2 = _span("w", "calls", "a2", 10, 100)
    b = _span("w", "calls", "b", 50, 150)  # overlaps a partially
    c = _span("w", "calls", "c", 150, 160)
    lanes = {span[2]: lane for span, lane in _lanes([b, a2, c, a1, a])}
    assert lanes["a"] == lanes["a1"] == lanes["a2"] == 0
    assert lanes["b"] == 1 and lanes["c"] == 0


def test_merge_aligns_clocks_and_pairs_each_call_with_its_execution() -> None:
    skew = 5_000_000_000  # worker1's clock is 5 s ahead
    spans = {
        "worker0": [
            _span(
                "worker0",
                "calls",
                "rpc_async#f(worker0 -> worker1)",
                1_000,
                9_000,
                cat="rpc_call",
                flow="0:1",
                reply_after_ns=7_500,
            )
        ],
        "worker1": [
            _span(
                "worker1",
                "serving",
                "rpc_async#f(worker0 -> worker1)",
                skew + 3_000,
                skew + 7_000,
                cat="rpc_serve",
                flow="0:1",
            )
        ],
    }
    trace = merge(spans, {"worker0": (0, 0), "worker1": (skew, 200)}, {"worker0": 0, "worker1": 1})
    json.loads(json.dumps(trace))  # plain JSON
    xs = {e["pid"]: e for e in trace["traceEvents"] if e["ph"] == "X"}
    assert xs[0]["ts"] == 0.0 and xs[0]["dur"] == 8.0  # µs, from the earliest span
    assert xs[1]["ts"] == 2.0 and xs[1]["dur"] == 4.0
    flows = [e for e in trace["traceEvents"] if e["ph"] in ("s", "f")]
    request = sorted((e for e in flows if e["name"] == "request"), key=lambda e: e["ph"])
    response = sorted((e for e in flows if e["name"] == "response"), key=lambda e: e["ph"])
    assert [(e["ph"], e["pid"]) for e in request] == [("f", 1), ("s", 0)]
    assert [(e["ph"], e["pid"]) for e in response] == [("f", 0), ("s", 1)]
    assert request[0]["id"] == request[1]["id"] != response[0]["id"]
    assert response[0]["ts"] == 7.5  # the answer lands where the caller got it
    names = {
        e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"
    }
    assert names == {0: "worker0", 1: "worker1"}
    assert trace["otherData"]["clock"]["worker1"] == {"offset_ns": skew, "error_bound_ns": 200}


def test_render_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    spans = {
        "worker0": [
            _span(
                "worker0",
                "calls",
                "rpc_async#f(worker0 -> worker1)",
                0,
                9_000,
                cat="rpc_call",
                flow="0:1",
                reply_after_ns=8_000,
            ),
            _span("worker0", "calls", "wait for reply", 100, 8_000),
        ],
        "worker1": [
            _span(
                "worker1",
                "serving",
                "rpc_async#f(worker0 -> worker1)",
                1_000,
                7_000,
                cat="rpc_serve",
                flow="0:1",
            ),
            _span("worker1", "backward", "engine job", 2_000, 3_000, cat="autograd_job"),
        ],
    }
    trace = merge(spans, {"worker0": (0, 0), "worker1": (0, 50)}, {"worker0": 0, "worker1": 1})
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    out = tmp_path / "t.png"
    render(path, out, title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spans_travel_in_columns_and_malformed_ones_are_dropped() -> None:
    spans = [
        _span("w0", "calls", "a", 1, 2, cat="rpc_call", flow="0:1"),
        _span("w1", "serving", "b", 3, 4),
    ]
    columns = pack_spans(spans)
    assert len(columns) == 7 and all(len(c) == 2 for c in columns)
    assert unpack_spans(columns) == spans
    columns[4][1] = "not an int"
    columns[6][0] = "{broken json"
    assert unpack_spans(columns) == []
    assert unpack_spans([[1], [2]]) == [] and unpack_spans("x") == []
