"""Side-by-side benchmarks: aiorpc_autograd against torch.distributed.rpc.

Run ``python -m bench.run [--quick] [--only NAME[,NAME]] [--launches N]``.

Every benchmark runs, in the same invocation, under four configurations
(see :data:`bench.specs.CONFIGS`): torch "default" and "tuned", ours
"unpinned" and "pinned".  Launches of the configurations alternate, and each
launch is a fresh group of worker processes on 127.0.0.1, bounded by a
timeout.  Rank 0 measures, the other ranks serve.

Layout (each module imports only those above it, except that ``worker``
loads a side module, after pinning):

``stats``       percentiles and across-launch summaries (no torch).
``worker``      the entry point of one worker process
                (``python -m bench.worker``): pins, then runs a side.
``workloads``   module-level remote functions, importable on every worker
                so both sides pickle them by reference.
``specs``       configurations and the benchmark registry: names, parameters
                (full and ``--quick``), headline metrics, plot layout.
``measure``     inputs and metric names both sides share.
``loopback``    a rendezvous whose store listens on 127.0.0.1 only.
``torch_side``  the torch.distributed.rpc implementation of each benchmark.
``ours_side``   the aiorpc_autograd implementation of each benchmark.
``launcher``    spawns a group of workers with pinning and a timeout and
                collects rank 0's records.
``report``      results JSON (merged per day), markdown table, PNG plots.
``run``         the command line.

Adding a benchmark (for instance the world-size scan or a codec
microbenchmark): add a :class:`bench.specs.BenchSpec` to
:data:`bench.specs.BENCHMARKS`, then a function under the same name in
``torch_side.BENCHES`` and/or ``ours_side.BENCHES``.  A side without an entry
is reported as "not implemented" for that benchmark; nothing else changes.
"""

from __future__ import annotations
