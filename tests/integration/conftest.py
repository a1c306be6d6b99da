"""Fixtures of the real-process tests: a shared service group, and a check
that no test leaves a worker process behind."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.harness import WorkerGroup, open_service_pids, start_service

# Long-lived groups whose workers are not orphans (other modules register theirs
# here too). Service groups not closed yet are spared anyway (open_service_pids).
_LIVE: list[WorkerGroup] = []


@pytest.fixture(autouse=True)
def no_orphan_workers() -> Iterator[None]:
    """Fail a test that leaves worker processes running (outside a live service group)."""
    yield
    allowed = {pid for group in _LIVE for pid in group.pids} | open_service_pids()
    deadline = time.monotonic() + 5
    while True:
        stray = [p for p in multiprocessing.active_children() if p.pid not in allowed]
        if not stray or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for proc in stray:
        proc.kill()
    assert not stray, f"worker processes left running: {stray}"


def close_shared_group(holder: dict[str, WorkerGroup]) -> None:
    """Teardown of a module's shared group: a graceful shutdown of the whole
    group after every test's workload, then the processes are gone."""
    group = holder.pop("group", None)
    if group is None:
        return
    try:
        if not group.broken:
            assert group.stop(timeout=30) == [True] * group.world_size
    finally:
        group.close()
        _LIVE.remove(group)


def shared_group(
    holder: dict[str, WorkerGroup],
    world_size: int,
    setup: Callable[[WorkerGroup], object] | None = None,
    **start_kwargs: Any,
) -> WorkerGroup:
    """The module's group of ``world_size`` service workers, started (then
    ``setup``) on first use and restarted if an earlier test broke it;
    ``start_kwargs`` go to ``start_service`` (``sync=True``...)."""
    group = holder.get("group")
    if group is not None and group.broken:
        group.close()
        _LIVE.remove(group)
        group = None
    if group is None:
        group = start_service(world_size, timeout=60, **start_kwargs)
        holder["group"] = group
        _LIVE.append(group)  # its workers are not orphans (no_orphan_workers)
        if setup is not None:
            setup(group)
    return group


@pytest.fixture(scope="module")
def _service_holder() -> Iterator[dict[str, WorkerGroup]]:
    holder: dict[str, WorkerGroup] = {}
    yield holder
    close_shared_group(holder)


@pytest.fixture
def service(_service_holder: dict[str, WorkerGroup]) -> WorkerGroup:
    """Three workers (``worker0``..``worker2``) shared by the tests of a module,
    restarted if an earlier test broke them. Run code on them with
    ``service.call(rank, func, *args)``."""
    return shared_group(_service_holder, 3)
