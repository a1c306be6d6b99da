"""Fault injection for tests: fail, delay or drop the N-th message of a kind.

Like PyTorch's faulty agent backend (``faulty_agent_backend_registry.py``),
but per worker and per message kind, installed on a running agent::

    from aiorpc_autograd.testing import Fault, inject_faults
    from aiorpc_autograd.codec import PythonCall

    inject_faults([Fault(PythonCall, nth=3, action="drop")])

A fault matches a message of its kind (for a message wrapped for distributed
autograd, the wrapped kind matches too). Actions: ``"drop"`` (never sent: the
call times out), ``"delay"`` (sent ``delay`` seconds later), ``"fail"`` (a
request's future fails with ``RpcError``; a reply or a notice is not sent),
and ``"disconnect"`` (the connection carrying it is dropped; a request or a
notice is then sent on a new connection, a reply is lost). Notices (a context's
release, ``CleanupAutogradContextReq``) are never answered: dropped, nothing
times out.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .api import current_agent
from .codec import Message

__all__ = ["Fault", "FaultInjector", "clear_faults", "inject_faults"]

Action = Literal["drop", "delay", "fail", "disconnect"]


@dataclass(frozen=True)
class Fault:
    """Apply ``action`` to the ``nth`` (1-based) message of ``kind`` this
    worker sends, and to every later one if ``repeat``."""

    kind: type[Message]
    nth: int = 1
    action: Action = "drop"
    delay: float = 0.0
    repeat: bool = False

    def __post_init__(self) -> None:
        if self.nth < 1:
            raise ValueError("nth counts from 1")
        if self.action not in ("drop", "delay", "fail", "disconnect"):
            raise ValueError(f"unknown action {self.action!r}")


class FaultInjector:
    """Counts outgoing messages by kind and answers which fault applies."""

    def __init__(self, faults: Iterable[Fault]) -> None:
        self.faults = list(faults)
        self.counts: Counter[type[Message]] = Counter()
        self.applied: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> tuple[str, float] | None:
        kinds = {type(message)}
        wrapped = getattr(message, "wrapped", None)
        if isinstance(wrapped, Message):
            kinds.add(type(wrapped))
        with self._lock:
            for kind in kinds:
                self.counts[kind] += 1
            for fault in self.faults:
                if fault.kind in kinds:
                    n = self.counts[fault.kind]
                    if n == fault.nth or (fault.repeat and n > fault.nth):
                        self.applied[fault.action] += 1
                        return fault.action, fault.delay
        return None


def inject_faults(faults: Iterable[Fault]) -> FaultInjector:
    """Install faults on this process's agent (replacing earlier ones)."""
    injector = FaultInjector(faults)
    current_agent().fault_injector = injector
    return injector


def clear_faults() -> None:
    """Remove injected faults."""
    current_agent().fault_injector = None
