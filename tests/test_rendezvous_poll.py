"""The shutdown vote's counter poll against a peer that leaves in the window
between this worker's read of the count and its check for lost peers."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch.distributed as dist

from aiorpc_autograd import membership
from aiorpc_autograd.errors import ConnectionLostError, RpcError
from aiorpc_autograd.rendezvous import Rendezvous

pytestmark = pytest.mark.timeout(30)


def _rendezvous(world_size: int) -> Rendezvous:
    return Rendezvous(dist.HashStore(), 0, world_size, "test/", 10.0)


def test_a_peer_that_left_after_the_count_completed_is_not_a_loss() -> None:
    """Another worker completes the count after this worker's read, sees it
    complete and leaves; this worker finds it gone before reading again: the
    complete count wins (before the fix: ConnectionLostError, and a graceful
    shutdown that had completed everywhere failed on this worker)."""

    async def main() -> int:
        rdv = _rendezvous(2)
        try:
            await rdv.call(rdv.store.add, "test/round/arrived", 1)
            calls = 0

            def stop() -> None:
                nonlocal calls
                calls += 1
                # While this worker's read was in flight: the other arrived
                # (the count is complete), saw it, left; found gone just now.
                rdv.store.add("test/round/arrived", 1)
                raise ConnectionLostError("cannot connect to worker 'w1': refused")

            count = await rdv._poll("test/round/arrived", float("inf"), stop)
            assert calls == 1
            return count
        finally:
            rdv.close()

    assert asyncio.run(main()) == 2


def test_a_peer_lost_before_the_count_completes_still_ends_the_wait() -> None:
    async def main() -> None:
        rdv = _rendezvous(3)
        try:
            await rdv.call(rdv.store.add, "test/round/arrived", 1)

            def stop() -> None:
                raise ConnectionLostError("worker 'w2' died")

            with pytest.raises(ConnectionLostError, match="w2"):
                await rdv._poll("test/round/arrived", float("inf"), stop)
        finally:
            rdv.close()

    asyncio.run(main())


@pytest.mark.parametrize("name", ["a/b", "", "w 1"])
def test_a_member_list_naming_a_worker_torch_refuses_is_malformed(name: str) -> None:
    # The dynamic group's member list comes from the store like the address
    # records, and is checked like them.
    good = msgpack.packb([[0, "worker0", "i0"], [1, "w-1:x_y", "i1"]])
    assert [m[1] for m in membership._unpack(good)] == ["worker0", "w-1:x_y"]
    with pytest.raises(RpcError, match="malformed member list"):
        membership._unpack(msgpack.packb([[0, "worker0", "i0"], [1, name, "i1"]]))


async def test_a_missing_rank_is_torch_s_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's test_dynamic_rpc_init_rpc_without_rank: its words per init method,
    before anything is contacted."""
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="rank parameter missing"):
        await Rendezvous.join("tcp://127.0.0.1:9", None, None, 1.0)
    with pytest.raises(ValueError, match="environment variable RANK expected"):
        await Rendezvous.join("env://", None, None, 1.0)
