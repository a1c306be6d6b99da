"""Spawn one group of benchmark workers and collect rank 0's records.

Workers are ``python -m bench.worker`` subprocesses, each in its own session
(process group) so that a hung group can be killed whole, and each with a
log file rather than a pipe so that a chatty worker can never block.  All
addresses are on 127.0.0.1: the rendezvous store listens there only (see
:mod:`bench.loopback`), TensorPipe is told to use the loopback interface, and
aiorpc_autograd listens on its default ``listen_host``, 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.specs import BENCHMARKS, Config

ROOT = Path(__file__).resolve().parent.parent

#: Seconds allowed for interpreter start, ``import torch`` and rendezvous.
STARTUP_S = 90.0
#: Once a worker has exited, how long the others get to exit on their own
#: (shutdown is collective, so they normally follow within a second).
EXIT_GRACE_S = 15.0
#: Characters of each worker's log kept when something went wrong.
LOG_TAIL = 4000


@dataclass
class LaunchResult:
    """What one launch produced.

    Attributes:
        config: the configuration's name.
        records: rank 0's JSON records by benchmark name (for an
            ``all_ranks`` benchmark, every rank's combined by
            :func:`combine_ranks`); a planned benchmark without a record gets
            an ``ok: False`` one explaining why.
        ranks: each rank's facts (pid, affinity, ...) from its "ready" line;
            None for a rank that never got its agent up.
        cpu: CPU seconds other processes used (``foreign_cpu_s``) and the
            hypervisor stole (``steal_s``) during the launch.
        returncodes: exit status per rank (negative: killed by that signal).
        timed_out: the launch hit its timeout and was killed.
        wall_s: seconds from spawn to the last exit.
        logs: the tail of each rank's output (stdout and stderr; normally
            empty, so anything there, warnings included, is worth a look).
    """

    config: str
    records: dict[str, dict[str, Any]]
    returncodes: list[int]
    timed_out: bool
    wall_s: float
    ranks: list[dict[str, Any] | None]
    cpu: dict[str, float]
    logs: list[str]

    @property
    def ok(self) -> bool:
        """Every rank exited 0 and every benchmark reported success."""
        return (
            not self.timed_out
            and all(rc == 0 for rc in self.returncodes)
            and all(r.get("ok") for r in self.records.values())
        )


@dataclass(frozen=True)
class CpuSample:
    """System-wide and own CPU seconds at one instant (Linux ``/proc/stat``).

    The difference of two samples tells how much CPU *other* processes used
    in between: the machine is shared, and that is the noise to watch.
    """

    busy_s: float
    steal_s: float
    ours_s: float

    @classmethod
    def take(cls) -> CpuSample:
        """Read the counters now (reaped children count as ours)."""
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        ours = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            ours += usage.ru_utime + usage.ru_stime
        return cls((user + nice + system + irq + softirq) / tick, steal / tick, ours)

    def foreign_since(self, before: CpuSample) -> dict[str, float]:
        """CPU seconds used by other processes, and stolen, since ``before``."""
        busy = self.busy_s - before.busy_s
        return {
            "foreign_cpu_s": max(0.0, busy - (self.ours_s - before.ours_s)),
            "steal_s": self.steal_s - before.steal_s,
        }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def worker_env() -> dict[str, str]:
    """The environment of a worker: this one, plus loopback-only settings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["MASTER_ADDR"] = "127.0.0.1"
    # TensorPipe otherwise resolves the hostname and may listen elsewhere.
    env["TP_SOCKET_IFNAME"] = "lo"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill, the process group led by ``proc`` (ours alone)."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> bool:
    """Wait for every process; kill the rest at the deadline or when one lingers.

    Returns:
        True when the deadline was hit.
    """
    deadline = time.monotonic() + timeout_s
    first_exit: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return False
        now = time.monotonic()
        if first_exit is None and any(c is not None for c in codes):
            first_exit = now
        expired = now >= deadline
        if expired or (first_exit is not None and now - first_exit > EXIT_GRACE_S):
            for p in procs:
                _kill_group(p)
            return expired
        time.sleep(0.25)


def combine_ranks(name: str, by_rank: dict[int, dict[str, Any]], world_size: int) -> dict[str, Any]:
    """One record of an ``all_ranks`` benchmark from every rank's.

    Each numeric metric is the maximum over ranks (the slowest rank), each
    boolean true only if it is on every rank; the ranks' own metrics are
    kept under ``per_rank``.  Missing or failed ranks fail the record.
    """
    missing = [r for r in range(world_size) if r not in by_rank]
    failed = {r: rec.get("error", "") for r, rec in by_rank.items() if not rec.get("ok")}
    if missing or failed:
        first = next(iter(failed.values()), "").strip().splitlines()
        return {
            "bench": name,
            "ok": False,
            "error": (
                f"rank(s) {missing} reported nothing; rank(s) {sorted(failed)} failed"
                + (f": {first[-1]}" if first else "")
            ),
        }
    metrics: dict[str, Any] = {}
    for rank in sorted(by_rank):
        for key, value in by_rank[rank]["metrics"].items():
            if isinstance(value, bool):
                metrics[key] = metrics.get(key, True) and value
            else:
                metrics[key] = max(metrics.get(key, value), value)
    return {
        **by_rank[0],
        "metrics": metrics,
        "seconds": max(rec.get("seconds", 0.0) for rec in by_rank.values()),
        "per_rank": [by_rank[r]["metrics"] for r in sorted(by_rank)],
    }


def _tail(path: Path) -> str:
    data = path.read_bytes()[-LOG_TAIL:]
    return data.decode("utf-8", errors="replace")


def launch(
    config: Config,
    plan: Sequence[tuple[str, dict[str, Any]]],
    *,
    world_size: int,
    timeout_s: float,
    cores: Sequence[int],
) -> LaunchResult:
    """Run ``plan`` once under ``config`` with ``world_size`` fresh workers.

    Args:
        config: library, pinning and options.
        plan: ``(benchmark name, params)`` for rank 0 to run in order.
        world_size: number of worker processes.
        timeout_s: the whole launch, start-up included.
        cores: cores to pin to; rank ``r`` gets ``cores[r % len(cores)]``.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmpdir = Path(tmp)
        result_file = tmpdir / "rank0.jsonl"
        port = free_port()
        env = worker_env()
        procs: list[subprocess.Popen[bytes]] = []
        log_paths = [tmpdir / f"rank{rank}.log" for rank in range(world_size)]
        cpu_before = CpuSample.take()
        start = time.monotonic()
        spawned_at = time.time()
        try:
            for rank, log_path in enumerate(log_paths):
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.worker",
                    f"--impl={config.impl}",
                    f"--rank={rank}",
                    f"--world-size={world_size}",
                    f"--port={port}",
                    f"--options={json.dumps(dict(config.options))}",
                    f"--plan={json.dumps(list(plan))}",
                    f"--result-file={result_file}",
                    f"--spawned-at={spawned_at!r}",
                ]
                if config.pinned:
                    cmd.append(f"--pin-core={cores[rank % len(cores)]}")
                with log_path.open("wb") as log:
                    procs.append(
                        subprocess.Popen(
                            cmd,
                            cwd=ROOT,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            timed_out = _wait_all(procs, timeout_s)
        finally:
            for p in procs:  # a no-op unless spawning or waiting raised
                _kill_group(p)
        wall_s = time.monotonic() - start
        cpu = CpuSample.take().foreign_since(cpu_before)
        returncodes = [p.returncode for p in procs]

        by_bench: dict[str, dict[int, dict[str, Any]]] = {}
        ranks: list[dict[str, Any] | None] = [None] * world_size
        if result_file.exists():
            for line in result_file.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("ready"):
                    ranks[record["rank"]] = record["info"]
                elif "bench" in record:
                    by_bench.setdefault(record["bench"], {})[record["rank"]] = record
        records: dict[str, dict[str, Any]] = {}
        for name, by_rank in by_bench.items():
            spec = BENCHMARKS.get(name)
            if spec is not None and spec.all_ranks:
                records[name] = combine_ranks(name, by_rank, world_size)
            elif 0 in by_rank:
                records[name] = by_rank[0]
        not_ready = [rank for rank, info in enumerate(ranks) if info is None]
        why = "timed out" if timed_out else f"exit codes {returncodes}"
        if not_ready:
            why += f"; rank(s) {not_ready} never finished init_rpc"
        for name, _ in plan:
            records.setdefault(name, {"bench": name, "ok": False, "error": f"no result ({why})"})

        logs = [_tail(p) for p in log_paths]
        return LaunchResult(config.name, records, returncodes, timed_out, wall_s, ranks, cpu, logs)


def probe_ours(timeout_s: float = 120.0) -> str | None:
    """Check, in a fresh interpreter, that our package offers the API we use.

    Returns:
        None when usable, otherwise the reason (the error's last lines).
    """
    code = (
        "import aiorpc_autograd as r\n"
        "for n in ('run', 'init_rpc', 'rpc_async', 'shutdown', 'RpcOptions'):\n"
        "    getattr(r, n)\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=worker_env(),
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"`import aiorpc_autograd` did not finish within {timeout_s:.0f} s"
    if proc.returncode == 0:
        return None
    lines = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()
    return "\n".join(lines[-6:]) or f"probe exited with {proc.returncode}"
