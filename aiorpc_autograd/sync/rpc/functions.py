"""``rpc.functions.async_execution``: a remote function that answers later.

torch's decorator marks a function that returns a ``torch.futures.Future``;
the callee replies when that future completes. Here the decorated function
runs as any plain function (in the callee's thread pool) and may return a
torch future or any awaitable: the reply is sent when it completes, and no
pool thread waits for it meanwhile (the agent awaits it on its loop). An
``async def`` needs no decorator (it is awaited on the loop anyway); the
decorator leaves it as it is.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .._bridge import Future, awaitable

__all__ = ["async_execution"]

F = TypeVar("F", bound=Callable[..., Any])


def async_execution(fn: F) -> F:
    """Decorate a remote function returning a ``torch.futures.Future`` (or an
    awaitable): its caller gets the future's value, or its error.

    Usable under ``@staticmethod`` / ``@classmethod`` as in torch. Called
    locally, it returns a torch future too (an awaitable one).

    Raises:
        RuntimeError: (when called) the function returned something else, as
            torch's ("...must return a torch.futures.Future object...").
    """
    if inspect.iscoroutinefunction(fn):
        fn._wrapped_async_rpc_function = fn  # type: ignore[attr-defined]
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        # torch.futures.Future, and what its then() returns (torch._C.Future):
        # made awaitable, so the agent awaits it on its loop and replies then.
        if isinstance(result, torch._C.Future) and not isinstance(result, Future):
            return awaitable(result)
        if not inspect.isawaitable(result):
            # torch's error, raised on the callee (its caller gets it).
            raise RuntimeError(
                "Functions decorated with @rpc.async_function must return a "
                "torch.futures.Future object, but got "
                f"{type(result).__module__}.{type(result).__qualname__} "
                "(an awaitable is accepted too)"
            )
        return result

    # torch's marker, for code that checks for it.
    wrapper._wrapped_async_rpc_function = fn  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
