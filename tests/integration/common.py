"""Small remote functions and helpers shared by the real-process tests.

Everything here is module-level so it pickles by name into the workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import aiorpc_autograd as rpc


def echo(value: Any) -> Any:
    """A plain function: runs in the callee's thread pool."""
    return value


async def echo_async(value: Any) -> Any:
    """An ``async def``: awaited on the callee's loop."""
    await asyncio.sleep(0)
    return value


def whoami() -> tuple[rpc.WorkerInfo, int]:
    return rpc.get_worker_info(), os.getpid()


def blocking_sleep(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


async def async_sleep(seconds: float, value: Any = None) -> Any:
    await asyncio.sleep(seconds)
    return value


async def attempt(
    to: Any,
    func: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """``await rpc.rpc_async(...)``'s value, or the exception it raised (returned,
    not raised), whether ``rpc_async`` itself raised or its future did."""
    try:
        return await rpc.rpc_async(to, func, args, kwargs, timeout)
    except Exception as exc:
        return exc


def call_outcome(func: Any, *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)``, or the exception it raised (returned, not raised)."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        return exc


async def await_outcome(awaitable: Any) -> Any:
    """The awaitable's value, or the exception it raised (returned, not raised)."""
    try:
        return await awaitable
    except Exception as exc:
        return exc


class WarningMessages(logging.Handler):
    """Collects the messages of the warnings (and worse) logged where it is
    added, in a worker process (where pytest's caplog does not reach)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
