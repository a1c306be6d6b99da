"""What every example shares and none is about: progress output, plotting,
and starting the workers (locally, or one rank per process under torchrun).

Each example keeps its pattern in its own file and ends with
``sys.exit(launch(run_worker, parse_args()))``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiorpc_autograd as rpc

# run_worker(rank, world_size, init_method, args) -> exit status
RunWorker = Callable[[int, int, str, argparse.Namespace], Coroutine[Any, Any, int]]


class Progress:
    """A text progress bar, redrawn in place on a terminal (silent elsewhere);
    ``print`` writes a permanent line in its place."""

    def __init__(self, total: int, label: str = "", width: int = 30) -> None:
        self.total, self.label, self.width = total, label, width
        self.done = 0
        self.tty = sys.stdout.isatty()

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if self.tty:
            filled = self.width * min(done, self.total) // max(self.total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            print(f"\r{self.label}[{bar}] {done}/{self.total} {note}\033[K", end="", flush=True)

    def print(self, line: str) -> None:
        print(("\r\033[K" if self.tty else "") + line, flush=True)


def save_plot(path: str, panels: dict[str, dict[str, list[float]]], xlabel: str) -> None:
    """Write one panel per entry of ``panels`` ({title: {curve label: values}})
    to a PNG with matplotlib, an optional dependency imported only here."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'aiorpc_autograd[plot]' (or pip install matplotlib)",
            file=sys.stderr,
        )
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for style, (label, values) in zip(("-", "--", ":"), curves.items(), strict=False):
            marker = "o" if len(values) <= 30 else None
            ax.plot(range(1, len(values) + 1), values, style, marker=marker, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    fig.suptitle(Path(sys.argv[0]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawned(
    run_worker: RunWorker, rank: int, world_size: int, init_method: str, args: argparse.Namespace
) -> None:
    sys.exit(rpc.run(run_worker(rank, world_size, init_method, args)))


def launch(run_worker: RunWorker, args: argparse.Namespace) -> int:
    """Run every rank: under torchrun this process is one of them (env://);
    otherwise rank 0 runs here and ranks 1.. are spawned on this machine."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rpc.run(run_worker(rank, world_size, "env://", args))
    init_method = f"tcp://127.0.0.1:{free_port()}"
    spawn = multiprocessing.get_context("spawn")
    others = [
        spawn.Process(
            target=spawned,
            args=(run_worker, rank, args.world_size, init_method, args),
            daemon=True,
        )
        for rank in range(1, args.world_size)
    ]
    for proc in others:
        proc.start()
    try:
        code = rpc.run(run_worker(0, args.world_size, init_method, args))
    except BaseException:
        for proc in others:
            proc.kill()
        raise
    for proc in others:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    failed = [proc for proc in others if proc.exitcode != 0]
    return code or (1 if failed else 0)
