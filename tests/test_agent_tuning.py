"""BusyPoll: the loop polls (instead of sleeping) for a window after a poke,
then sleeps again; off at 0; closed for good; the window adapting to the gaps
between pokes where it may. And the opt-in fixed mmap
threshold (RpcOptions.malloc_mmap_threshold)."""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aiorpc_autograd import RpcOptions
from aiorpc_autograd.transport import BusyPoll, RunQueue

pytestmark = pytest.mark.timeout(30)


async def test_spins_for_the_window_after_a_poke_then_sleeps() -> None:
    loop = asyncio.get_running_loop()
    poll = BusyPoll(loop, 0.2)
    assert not poll.spinning
    cpu0 = time.process_time()
    poll.poke()
    assert poll.spinning
    await asyncio.sleep(0.1)
    assert poll.spinning  # still inside the window
    busy = time.process_time() - cpu0
    await asyncio.sleep(0.25)
    assert not poll.spinning  # the window passed without a poke
    # Spinning used the CPU (it polled instead of sleeping)...
    assert busy > 0.03, busy
    # ...and once the window passed, the loop sleeps: almost no CPU.
    cpu1 = time.process_time()
    await asyncio.sleep(0.3)
    assert time.process_time() - cpu1 < 0.03


async def test_a_poke_extends_the_window() -> None:
    poll = BusyPoll(asyncio.get_running_loop(), 0.15)
    poll.poke()
    for _ in range(3):
        await asyncio.sleep(0.1)
        assert poll.spinning
        poll.poke()
    await asyncio.sleep(0.3)
    assert not poll.spinning


async def test_zero_window_never_spins_and_close_stops_for_good() -> None:
    loop = asyncio.get_running_loop()
    off = BusyPoll(loop, 0.0)
    off.poke()
    assert not off.spinning
    poll = BusyPoll(loop, 5.0)
    poll.poke()
    assert poll.spinning
    poll.close()
    assert not poll.spinning
    poll.poke()  # after close: nothing
    assert not poll.spinning
    await asyncio.sleep(0)


async def test_no_spinning_while_paused() -> None:
    busy = [True]
    poll = BusyPoll(asyncio.get_running_loop(), 5.0, lambda: busy[0])
    poll.poke()
    await asyncio.sleep(0.01)
    assert not poll.spinning  # paused: the loop sleeps
    busy[0] = False
    poll.poke()
    await asyncio.sleep(0.01)
    assert poll.spinning
    poll.close()


async def test_window_adapts_to_the_gaps_it_misses() -> None:
    """Between ``window`` and ``max_window``: a poke after the loop went to
    sleep, within ``max_window`` of the last, grows the window to cover that
    gap; a gap past ``max_window`` (a wasted spin) halves it, never below
    ``window``; a poke caught while spinning, or after a pause for the pool,
    leaves it alone; without a ``max_window`` above it, it stays put."""
    busy = [False]
    poll = BusyPoll(asyncio.get_running_loop(), 0.03, lambda: busy[0], max_window=0.3)
    assert poll.window == 0.03
    poll.poke()
    await asyncio.sleep(0.005)
    poll.poke()  # caught while spinning
    assert poll.window == 0.03
    await asyncio.sleep(0.1)  # the 30 ms window ran out: the loop slept
    assert not poll.spinning
    poll.poke()  # a gap of 100+ ms, under 300 ms: a longer window would have caught it
    grown = poll.window
    assert 1.25 * 0.1 <= grown <= 0.3, grown
    await asyncio.sleep(0.01)
    poll.poke()  # caught
    assert poll.window == grown
    await asyncio.sleep(0.4)
    poll.poke()  # a gap past max_window: the last spin was wasted
    assert poll.window == grown / 2
    for _ in range(4):
        await asyncio.sleep(0.4)  # past max_window each time
        poll.poke()
    assert poll.window == 0.03  # halved down to the floor, not below
    # A pause (the pool computing) is no missed gap: no growth after it.
    busy[0] = True
    await asyncio.sleep(0.1)
    busy[0] = False
    poll.poke()
    assert poll.window == 0.03
    poll.close()
    # Without a max_window above the window, it never moves.
    fixed = BusyPoll(asyncio.get_running_loop(), 0.03)
    fixed.poke()
    await asyncio.sleep(0.1)
    fixed.poke()
    assert fixed.window == 0.03
    fixed.close()


async def test_a_spin_gives_way_to_a_crowded_machine() -> None:
    """With a load guard, a spin stops once the samples that found every CPU
    wanted add up to ``max_crowded`` since the last poke, well before its
    window; a poke starts the count afresh; the gap after such a spin grows
    nothing. An uncrowded spin runs its whole window."""
    crowded = [True]
    asked = [0]

    def load() -> bool:
        asked[0] += 1
        return crowded[0]

    loop = asyncio.get_running_loop()
    poll = BusyPoll(loop, 0.5, max_window=1.0, max_crowded=0.02, crowded=load)
    poll.poke()
    t0 = time.perf_counter()
    while poll.spinning and time.perf_counter() - t0 < 5:
        await asyncio.sleep(0)
    gave_way = time.perf_counter() - t0
    assert 0.02 <= gave_way < 0.3, gave_way  # not the 500 ms window
    assert asked[0] >= 2  # sampled, not asked once per loop turn only at the end
    await asyncio.sleep(0.6)  # a gap the window would have grown for
    crowded[0] = False
    t0 = time.perf_counter()
    poll.poke()
    assert poll.window == 0.5  # a spin that gave way says nothing of the gap
    while poll.spinning and time.perf_counter() - t0 < 5:
        await asyncio.sleep(0)
    assert 0.5 <= time.perf_counter() - t0 < 2  # its whole window
    poll.close()
    # Without a budget the load is never asked.
    asked[0] = 0
    plain = BusyPoll(loop, 0.05, max_window=0.1, crowded=load)
    plain.poke()
    await asyncio.sleep(0.1)
    assert asked[0] == 0
    plain.close()


def test_run_queue_reads_the_machine_load(tmp_path: Path) -> None:
    """RunQueue compares Linux's runnable threads (the fourth field of
    /proc/loadavg, "running/total") with the CPUs; a file it cannot read or
    parse says crowded (the spin then takes no more than its budget). On
    Linux, with a spinning process per CPU besides this one, it is crowded."""

    def crowded(text: str | None, cpus: int = 2) -> bool:
        path = tmp_path / "loadavg"
        path.unlink(missing_ok=True)
        if text is not None:
            path.write_text(text)
        queue = RunQueue(str(path), cpus)
        try:
            return queue.crowded()
        finally:
            queue.close()

    assert not crowded("0.50 0.40 0.30 2/190 12345\n")  # this thread and one other
    assert crowded("0.50 0.40 0.30 3/190 12345\n")
    assert not crowded("9.00 9.00 9.00 16/900 12345\n", cpus=16)
    assert crowded(None)  # unreadable
    assert crowded("garbage\n")
    closed = RunQueue(str(tmp_path / "loadavg"), 2)
    closed.close()
    assert closed.crowded()  # a closed agent's spin never outlasts its budget
    if not os.path.exists("/proc/loadavg"):
        return
    ncpu = os.cpu_count() or 1
    spin = "import time\nt = time.time() + 20\nwhile time.time() < t: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(ncpu)]
    queue = RunQueue()
    try:
        time.sleep(0.5)
        assert sum(queue.crowded() for _ in range(50)) > 25
    finally:
        queue.close()
        for p in spinners:
            p.kill()
            p.wait()


def test_option_validation() -> None:
    assert RpcOptions().busy_poll == 0.0002
    assert RpcOptions().busy_poll_pinned == 0.002
    assert RpcOptions().busy_poll_max == 0.008
    assert RpcOptions().busy_poll_crowded == 0.002
    assert RpcOptions(busy_poll=0).busy_poll == 0
    for name in ("busy_poll", "busy_poll_pinned", "busy_poll_max", "busy_poll_crowded"):
        for bad in (-0.001, float("nan")):
            with pytest.raises(ValueError, match=name):
                RpcOptions(**{name: bad})


def test_busy_poll_window_follows_the_cpus_compute_may_need() -> None:
    """(window, longest window, most spun while crowded) read in a child
    process confined to each choice of CPUs. The long window, fixed, where a
    polling loop takes no CPU from compute: a process on one CPU, or a group
    whose workers, each on torch's intra-op threads, fit this process's CPUs
    (world size x threads <= CPUs). Adapting from the short window up to
    busy_poll_max, giving way to the load after busy_poll_crowded, where the
    workers fit the CPUs but their threads may not. The short window, fixed,
    for a larger or dynamic group (world size unknown). busy_poll=0: off."""
    # One child reads every choice: the windows follow its affinity and torch's
    # threads as they are when read, so it re-confines itself between reads.
    probe = textwrap.dedent(
        """
        import json, os, sys
        import torch
        from aiorpc_autograd.agent import _busy_poll_windows
        from aiorpc_autograd.options import RpcOptions
        out = []
        for pin, threads, world in json.loads(sys.argv[1]):
            os.sched_setaffinity(0, set(pin))
            torch.set_num_threads(threads)
            row = []
            for options in (RpcOptions(), RpcOptions(busy_poll=0),
                            RpcOptions(busy_poll_pinned=0.0005, busy_poll_max=0.0007,
                                       busy_poll_crowded=0.0003)):
                row += _busy_poll_windows(options, world)
            out.append(row)
        print(json.dumps(out))
        """
    )
    cpus = sorted(os.sched_getaffinity(0))
    one, two = cpus[:1], cpus[:2]
    cases: list[tuple[list[int], int, int | None]] = [(one, 1, 8), (one, 1, None)]
    if len(cpus) > 1:
        cases += [(two, 1, 2), (two, 2, 1), (two, 2, 2), (two, 1, 3), (two, 1, None)]
    cmd = [sys.executable, "-c", probe, json.dumps(cases)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    got = [[float(v) for v in row] for row in json.loads(out.stdout)]

    inf = math.inf
    off = [0.0, 0.0, inf]
    long = [0.002, 0.002, inf, *off, 0.0005, 0.0005, inf]
    adaptive = [0.0002, 0.008, 0.002, *off, 0.0002, 0.0007, 0.0003]
    short = [0.0002, 0.0002, inf, *off, 0.0002, 0.0002, inf]
    # On one CPU: always (its threads take turns there), whatever the group
    # (8 workers, or a dynamic group). On two: one worker per CPU with one
    # thread each, or one worker of two threads; adaptive for 2 workers x 2
    # threads; short for 3 workers or a dynamic group.
    expected = [long, long, long, long, adaptive, short, short]
    assert got == expected[: len(cases)]


def test_malloc_mmap_threshold_option_fixes_glibc_threshold() -> None:
    """With the threshold fixed, an 8 MiB block is its own mapping even after
    a freed 16 MiB block raised glibc's dynamic threshold (which, left alone,
    serves it from the heap, where freed space stays in RSS)."""
    assert RpcOptions().malloc_mmap_threshold == 0  # opt-in
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        RpcOptions(malloc_mmap_threshold=-1)
    probe = textwrap.dedent(
        """
        import ctypes, sys
        from aiorpc_autograd.agent import fix_mmap_threshold

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        if sys.argv[1] == "fix":
            assert fix_mmap_threshold(128 << 10)
        big = ctypes.create_string_buffer(16 << 20)
        del big  # freeing a mapped 16 MiB block raises the dynamic threshold
        before = libc.mallinfo2().hblks
        block = ctypes.create_string_buffer(8 << 20)  # more than any free heap chunk
        print(libc.mallinfo2().hblks - before)
        """
    )
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    mapped = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("dynamic", "fix")
    }
    assert mapped == {"dynamic": 0, "fix": 1}


def test_init_rpc_warns_when_torch_threads_share_the_one_cpu() -> None:
    """A worker confined to one CPU after torch sized its intra-op pool (its
    threads then wait for each other there) is told at init_rpc how to fix it;
    with one intra-op thread there is nothing to say."""
    from tests.integration.harness import free_port

    probe = textwrap.dedent(
        """
        import logging, os, sys
        import torch
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        torch.set_num_threads(int(sys.argv[1]))
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
        import aiorpc_autograd as rpc

        async def main() -> None:
            await rpc.init_rpc("w0", 0, 1, init_method=f"tcp://127.0.0.1:{sys.argv[2]}")
            print("ran:", await rpc.rpc_async("w0", torch.add, args=(torch.ones(2), 1)))
            await rpc.shutdown()

        rpc.run(main())
        """
    )

    def output(threads: int) -> str:
        cmd = [sys.executable, "-c", probe, str(threads), str(free_port())]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
        assert "ran: tensor([2., 2.])" in out.stdout, out
        return out.stdout

    warned = output(2)
    assert "one CPU only, but torch runs ops on 2 intra-op threads" in warned
    assert "torch.set_num_threads(1)" in warned
    assert "intra-op" not in output(1)


@pytest.mark.timeout(90)
def test_pool_threads_take_the_process_torch_thread_count() -> None:
    """After ``torch.set_num_threads(1)``, a function the agent runs on its
    threads computes on one intra-op thread: OpenMP's count is per thread, and
    a Python thread keeps the library's default (the CPUs at import) until an
    op that reads torch's count runs there; a matrix product does not, and ran
    on a team of several threads (on one CPU, ~2000x slower)."""
    from tests.integration.harness import free_port

    if (os.cpu_count() or 1) < 2:
        pytest.skip("OpenMP's default is 1 thread on one CPU: nothing to adopt")
    probe = textwrap.dedent(
        """
        import ctypes, sys, threading
        import torch
        torch.set_num_threads(1)
        gomp = next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
        omp_max_threads = ctypes.CDLL(gomp).omp_get_max_threads
        import aiorpc_autograd as rpc

        def seen() -> tuple[str, int]:
            return threading.current_thread().name, omp_max_threads()

        async def main() -> None:
            await rpc.init_rpc("w0", 0, 1, init_method=f"tcp://127.0.0.1:{sys.argv[1]}")
            plain: list[tuple[str, int]] = []
            thread = threading.Thread(target=lambda: plain.append(seen()), name="plain")
            thread.start()
            thread.join()
            print("plain", *plain[0])
            print("call", *await rpc.rpc_async("w0", seen))
            print("to_thread", *await rpc.to_thread(seen))
            await rpc.shutdown()

        rpc.run(main())
        """
    )
    cmd = [sys.executable, "-c", probe, str(free_port())]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    seen = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
    # A thread of the caller's own keeps OpenMP's default (what the fix is about).
    assert int(seen["plain"][1]) > 1, out
    for how in ("call", "to_thread"):
        name, threads = seen[how]
        assert name.startswith("aiorpc-w0"), out
        assert int(threads) == 1, out

    # The facade's loop runs on a thread of its own, and async functions run there.
    facade = textwrap.dedent(
        """
        import ctypes, sys, threading
        import torch
        torch.set_num_threads(1)
        gomp = next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
        omp_max_threads = ctypes.CDLL(gomp).omp_get_max_threads
        from aiorpc_autograd.sync import rpc

        async def seen_on_loop() -> tuple[str, int]:
            return threading.current_thread().name, omp_max_threads()

        opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{sys.argv[1]}")
        rpc.init_rpc("w0", rank=0, world_size=1, rpc_backend_options=opts)
        print("loop", *rpc.rpc_sync("w0", seen_on_loop))
        rpc.shutdown()
        """
    )
    cmd = [sys.executable, "-c", facade, str(free_port())]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    name, threads = out.stdout.split()[1:3]
    assert name.startswith("aiorpc-loop") and int(threads) == 1, out
