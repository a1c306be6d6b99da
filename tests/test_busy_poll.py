"""BusyPoll: the loop polls (instead of sleeping) for a window after a poke,
then sleeps again; off at 0; closed for good."""

from __future__ import annotations

import asyncio
import time

import pytest

from aiorpc_autograd import RpcOptions
from aiorpc_autograd.transport import BusyPoll

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


def test_option_validation() -> None:
    assert RpcOptions().busy_poll == 0.0002
    assert RpcOptions(busy_poll=0).busy_poll == 0
    for bad in (-0.001, float("nan")):
        with pytest.raises(ValueError, match="busy_poll"):
            RpcOptions(busy_poll=bad)
