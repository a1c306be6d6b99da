"""Side-by-side benchmarks: aiorpc_autograd against torch.distributed.rpc.

Run ``python -m bench.run [--quick] [--only NAME[,NAME]] [--launches N] ...``
(``--help`` for the rest): one command for all seven benchmarks (noop,
throughput, echo, autograd, autograd_scaling, codec, scale), writing ``results/<date>.json``,
``results/<date>.md`` and a PNG per benchmark.

A run is made of phases (see :data:`bench.specs.PHASES`): "scale" launches
the default configurations at world sizes 2..32; "main" runs the other
benchmarks at world size 2 under four configurations (see
:data:`bench.specs.CONFIGS`): torch "default" and "tuned", ours "unpinned"
and "pinned".  Launches of the configurations alternate, and each launch is a
fresh group of worker processes on 127.0.0.1, bounded by a timeout.  Rank 0
measures, the other ranks serve (every rank measures an ``all_ranks``
benchmark, and the slowest rank's figures count).

Layout (each module imports only those above it, except that ``worker``
loads a side module, after pinning):

``stats``       percentiles and across-launch summaries (no torch).
``specs``       configurations, phases and the benchmark registry: names,
                parameters (full and ``--quick``), headline metrics, plot
                layout; the issue's targets (no torch).
``worker``      the entry point of one worker process
                (``python -m bench.worker``): pins, then runs a side.
``workloads``   module-level remote functions, importable on every worker
                so both sides pickle them by reference.
``measure``     inputs, metric names and measurement procedures both sides
                share (the autograd step is one generator both drive).
``loopback``    a rendezvous whose store listens on 127.0.0.1 only.
``torch_side``  the torch.distributed.rpc implementation of each benchmark.
``ours_side``   the aiorpc_autograd implementation of each benchmark.
``launcher``    spawns a group of workers with pinning and a timeout and
                collects rank 0's records (all ranks' for ``all_ranks``).
``report``      results JSON (merged per day), targets, markdown, PNG plots.
``run``         the command line.
``autograd_step``, ``scale``, ``codec``: ``python -m bench.X`` shorthands
                for ``python -m bench.run --only ...``.

Adding a benchmark: add a :class:`bench.specs.BenchSpec` to
:data:`bench.specs.BENCHMARKS`, then a function under the same name in
``torch_side.BENCHES`` and/or ``ours_side.BENCHES``.  A side without an entry
is reported as "not implemented" for that benchmark; nothing else changes.
"""

from __future__ import annotations
