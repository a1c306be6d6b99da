"""Entry point of one benchmark worker process: ``python -m bench.worker``.

The launcher passes everything on the command line.  The process pins
itself first (so every thread the RPC library starts later inherits the
affinity), then imports the side module and hands over.  Rank 0 writes one
JSON line per benchmark to ``--result-file`` as soon as it is measured, so a
later hang or crash loses only what was still running; every rank adds an
"imported" line before ``init_rpc`` and a "ready" line once its agent is up.
A benchmark registered with ``all_ranks`` runs on every rank, and every rank
writes its record.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.specs import BENCHMARKS

#: How long rank 0 waits for the other ranks' imports before a baseline.
IMPORT_WAIT_S = 60.0

BenchFn = Callable[..., Any]
"""A side module's benchmark: ``fn(ctx, params) -> metrics`` on torch's side,
``async fn(rpc, ctx, params) -> metrics`` on ours."""


@dataclass
class WorkerContext:
    """What a side module needs to run its part of a launch.

    Attributes:
        rank: this worker's rank; rank 0 measures.
        world_size: number of workers.
        port: TCP port of the rendezvous on 127.0.0.1 (see :mod:`bench.loopback`).
        options: keyword arguments for the library's options object.
        plan: ``(benchmark name, params)`` in order.
        result_file: where every rank appends its "imported" and "ready"
            lines and rank 0 (every rank, for ``all_ranks`` benchmarks) its
            benchmark records (short appends, so lines do not interleave).
        spawned_at: wall-clock time (``time.time()``) the launcher started
            spawning the group.
        info: facts about this process, attached to every record.
        baselines: on rank 0, figures measured before ``init_rpc`` by
            :data:`bench.measure.BASELINES`, by benchmark name.
    """

    rank: int
    world_size: int
    port: int
    options: dict[str, Any]
    plan: list[tuple[str, dict[str, Any]]]
    result_file: str
    spawned_at: float
    info: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)

    @staticmethod
    def name_of(rank: int) -> str:
        """The worker name used for ``rank`` on both sides."""
        return f"w{rank}"

    @property
    def name(self) -> str:
        """This worker's name."""
        return self.name_of(self.rank)

    @property
    def peer(self) -> str:
        """The worker rank 0 measures against (rank 1)."""
        return self.name_of(1)

    @property
    def others(self) -> list[str]:
        """Every other worker's name."""
        return [self.name_of(r) for r in range(self.world_size) if r != self.rank]

    def emit(self, record: dict[str, Any]) -> None:
        """Append one JSON record to the result file and flush it."""
        with open(self.result_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**record, "rank": self.rank, "info": self.info}) + "\n")
            fh.flush()

    def before_init(self) -> None:
        """Call once the libraries are imported, right before ``init_rpc``.

        Every rank collects and freezes its garbage-collected heap (see
        below), records that it got here; rank 0 then waits (up to
        :data:`IMPORT_WAIT_S`) until every rank did, so that no process of
        the launch is still starting, and measures the planned benchmarks'
        baselines while no RPC thread runs anywhere.
        """
        # Importing torch leaves a heap of ~10^5 objects that each full
        # collection walks (~70 ms here): the first one would fall wherever
        # the allocation count crosses the threshold, in one library's timed
        # region (the scale benchmark's first call, say). Collected once and
        # frozen here, on every rank, before either library starts.
        gc.collect()
        gc.freeze()
        self.emit({"imported": True})
        if self.rank != 0:
            return
        from bench.measure import BASELINES

        planned = [(name, params) for name, params in self.plan if name in BASELINES]
        if not planned:
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < IMPORT_WAIT_S and self._imported() < self.world_size:
            time.sleep(0.05)
        self.info["import_wait_s"] = time.monotonic() - t0
        for name, params in planned:
            self.baselines[name] = BASELINES[name](params)

    def _imported(self) -> int:
        """How many ranks have recorded ``imported`` so far."""
        count = 0
        with open(self.result_file, encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(json.JSONDecodeError):  # a line being written
                    count += bool(json.loads(line).get("imported"))
        return count

    def ready(self, init_rpc_s: float) -> None:
        """Record, on every rank, that the agent is up (and this rank's facts).

        Args:
            init_rpc_s: seconds ``init_rpc`` took here.
        """
        self.info["init_rpc_s"] = init_rpc_s
        self.info["ready_s"] = time.time() - self.spawned_at
        self.emit({"ready": True})

    def steps(self, benches: dict[str, BenchFn]) -> Iterator[tuple[str, dict[str, Any], BenchFn]]:
        """Yield ``(name, params, fn)`` for each planned benchmark this rank runs.

        Rank 0 runs every benchmark, other ranks those registered with
        ``all_ranks``.  A benchmark missing from ``benches`` is recorded as
        not implemented.
        """
        for name, params in self.plan:
            spec = BENCHMARKS.get(name)
            if self.rank != 0 and not (spec and spec.all_ranks):
                continue
            fn = benches.get(name)
            if fn is None:
                self.emit({"bench": name, "ok": False, "error": "not implemented for this library"})
            else:
                yield name, params, fn

    @contextlib.contextmanager
    def measuring(self, name: str) -> Iterator[dict[str, Any]]:
        """Record one benchmark: fill the yielded dict with its metrics.

        An exception inside the block is recorded with its traceback and
        suppressed, so the next benchmark still runs.
        """
        metrics: dict[str, Any] = {}
        outcome: dict[str, Any]
        gc.collect()  # not the garbage of the benchmark before, in this one
        t0 = time.perf_counter()
        try:
            yield metrics
        except Exception:
            outcome = {"ok": False, "error": traceback.format_exc()}
        else:
            outcome = {"ok": True, "metrics": metrics}
        self.emit({"bench": name, **outcome, "seconds": time.perf_counter() - t0})


def main(argv: list[str] | None = None) -> int:
    """Parse the launcher's arguments, pin, and run the chosen side."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", choices=("torch", "ours"), required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pin-core", type=int, default=None)
    parser.add_argument("--options", default="{}", help="JSON dict of library options")
    parser.add_argument("--plan", required=True, help="JSON list of [name, params]")
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--spawned-at", type=float, required=True, help="launcher's time.time()")
    args = parser.parse_args(argv)

    # Pin before importing torch: threads inherit the affinity of their creator.
    if args.pin_core is not None:
        os.sched_setaffinity(0, {args.pin_core})
    ctx = WorkerContext(
        rank=args.rank,
        world_size=args.world_size,
        port=args.port,
        options=json.loads(args.options),
        plan=[(name, params) for name, params in json.loads(args.plan)],
        result_file=args.result_file,
        spawned_at=args.spawned_at,
        info={"pid": os.getpid(), "affinity": sorted(os.sched_getaffinity(0))},
    )
    if args.impl == "torch":
        from bench import torch_side

        torch_side.run_worker(ctx)
    else:
        from bench import ours_side

        ours_side.run_worker(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
