"""Model-parallel RNN: the embedding table and decoder on one worker, the LSTM on another.

The pattern
-----------
When a model does not fit on one machine, split it by layers and put each part
where it fits; distributed autograd then trains the whole as if it were local
(PyTorch's "distributed RNN" tutorial, ported to asyncio). Here:

* ``ps`` (rank 1) holds the embedding table and the decoder, the two layers
  whose size grows with the vocabulary;
* the LSTM lives on the ``trainer`` (rank 0), or with ``--world-size 3`` on a
  worker of its own, ``lstm`` (rank 2), leaving the trainer only to drive.

The trainer sees the model as three :class:`RemoteModule` calls in a row::

    async with dist_autograd.context() as context_id:
        vectors = await embedding(tokens)    # on ps
        hidden = await lstm(vectors)          # on the LSTM's worker
        logits = await decoder(hidden)        # on ps again
        loss = cross_entropy(logits, targets)  # here
        await dist_autograd.backward(context_id, [loss])  # back through all three
        await optimizer.step(context_id)      # Adam, on every parameter owner

Each call ships its tensors to the next worker and records the hop for
distributed autograd, so ``backward`` retraces the path in reverse and leaves
each layer's gradients on the worker that owns it, where
``DistributedOptimizer`` steps them.

The task is synthetic: a *delayed echo*. The input is a random sequence of
tokens 1..15 and the target at position t is the input token at t - 3 (0 for
the first three positions): the model must carry three tokens in its LSTM
state. The loss starts near ln(16) = 2.77 (a guess); the run fails (exit
status 1) unless the mean loss of the last 20 steps falls below ``--target``
(default 0.1).

Run it
------
::

    python examples/rnn_model_parallel.py                    # trainer + ps, local
    python examples/rnn_model_parallel.py --world-size 3 --plot rnn.png
    torchrun --nproc-per-node 2 examples/rnn_model_parallel.py

The last line printed is ``RESULT {...}`` (JSON) for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from _plumbing import Progress, launch, save_plot

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.nn import RemoteModule
from aiorpc_autograd.optim import DistributedOptimizer

VOCAB = 16  # token 0 is "nothing yet"; sequences use 1..15
EMBED = 32
HIDDEN = 64
DELAY = 3
WORKERS = ["trainer", "ps", "lstm"]  # by rank


# --------------------------------------------------------------------------- data and model


def make_batch(gen: torch.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences and their echo ``DELAY`` steps later."""
    tokens = torch.randint(1, VOCAB, (batch, length), generator=gen)
    targets = torch.zeros_like(tokens)
    targets[:, DELAY:] = tokens[:, :-DELAY]
    return tokens, targets


# The layers, built on their workers by RemoteModule. Two of them may be built
# at once in one worker's thread pool, so seeding and drawing from torch's
# global random generator happen under a lock: runs repeat exactly.
_rng_lock = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    with _rng_lock, torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def make_embedding(seed: int) -> torch.nn.Module:
    with seeded(seed):
        return torch.nn.Embedding(VOCAB, EMBED)


class LSTM(torch.nn.Module):
    """An LSTM layer that returns its outputs only (not its final state)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with seeded(seed + 1):
            self.lstm = torch.nn.LSTM(EMBED, HIDDEN, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


def make_decoder(seed: int) -> torch.nn.Module:
    with seeded(seed + 2):
        return torch.nn.Linear(HIDDEN, VOCAB)


class RNNModel:
    """The model as the trainer sees it: three remote layers called in turn."""

    def __init__(self, ps: str, lstm_worker: str, seed: int) -> None:
        self.embedding = RemoteModule(ps, make_embedding, (seed,))
        self.lstm = RemoteModule(lstm_worker, LSTM, (seed,))
        self.decoder = RemoteModule(ps, make_decoder, (seed,))

    async def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        vectors = await self.embedding(tokens)
        hidden = await self.lstm(vectors)
        return await self.decoder(hidden)

    async def parameter_rrefs(self) -> list[rpc.RRef[torch.Tensor]]:
        layers = (self.embedding, self.lstm, self.decoder)
        per_layer = await asyncio.gather(*(layer.remote_parameters() for layer in layers))
        return [p for params in per_layer for p in params]


# --------------------------------------------------------------------------- the trainer (rank 0)


async def train(world_size: int, args: argparse.Namespace) -> int:
    lstm_worker = "lstm" if world_size == 3 else "trainer"
    model = RNNModel("ps", lstm_worker, args.seed)
    optimizer = DistributedOptimizer(torch.optim.Adam, await model.parameter_rrefs(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"embedding + decoder on 'ps', LSTM on {lstm_worker!r}; delayed echo ({DELAY} steps) "
        f"over {VOCAB - 1} tokens; loss at chance {math.log(VOCAB):.2f}, target {args.target}"
    )

    losses: list[float] = []
    accuracies: list[float] = []
    bar = Progress(args.steps, "training ")
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens, targets = make_batch(gen, args.batch_size, args.seq_len)
        async with dist_autograd.context() as context_id:
            logits = await model(tokens)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
            await dist_autograd.backward(context_id, [loss])
            await optimizer.step(context_id)
        losses.append(loss.item())
        accuracies.append((logits.argmax(-1) == targets).float().mean().item())
        bar.update(step, f"loss {losses[-1]:.4f}")
        if step % args.log_every == 0 or step == args.steps:
            recent = losses[-args.log_every :]
            bar.print(
                f"step {step:4d}/{args.steps}  loss {sum(recent) / len(recent):.4f}"
                f"  accuracy {accuracies[-1]:.1%}  ({time.perf_counter() - started:.1f} s)"
            )
    seconds = time.perf_counter() - started

    # A fresh batch, twice as long as those seen in training (outside any
    # distributed autograd context, so nothing is recorded for backward).
    tokens, targets = make_batch(gen, args.batch_size, 2 * args.seq_len)
    accuracy = ((await model(tokens)).argmax(-1) == targets).float().mean().item()
    final = sum(losses[-20:]) / len(losses[-20:])
    reached = final <= args.target
    print(
        f"{'reached' if reached else 'MISSED'} the target: loss {final:.4f} "
        f"(mean of the last 20 steps; target {args.target}, start {losses[0]:.4f}) "
        f"in {args.steps} steps, {seconds:.1f} s; accuracy on {2 * args.seq_len}-token "
        f"sequences {accuracy:.1%}"
    )
    if args.plot:
        save_plot(args.plot, {"loss": {"train": losses}, "accuracy": {"train": accuracies}}, "step")
    result = {
        "loss_first": losses[0],
        "loss_last": final,
        "accuracy": accuracy,
        "target": args.target,
        "steps": args.steps,
        "seconds": round(seconds, 3),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if reached else 1


async def run_worker(rank: int, world_size: int, init_method: str, args: argparse.Namespace) -> int:
    """Everything one process does: rank 0 trains, the others hold layers."""
    if world_size not in (2, 3):
        raise SystemExit("the model is split over 2 or 3 workers: --world-size 2 or 3")
    torch.set_num_threads(1)
    name = WORKERS[rank]
    options = rpc.RpcOptions(rpc_timeout=120)
    if rank == 0:
        async with rpc.worker(name, rank, world_size, init_method=init_method, options=options):
            return await train(world_size, args)
    # The other workers only answer the trainer's requests. shutdown() keeps
    # serving until every worker has called it, that is until training is done.
    async with rpc.worker(
        name, rank, world_size, init_method=init_method, options=options, shutdown_timeout=0
    ):
        pass
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--world-size", type=int, default=2, choices=(2, 3))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--target", type=float, default=0.1, help="loss to reach")
    parser.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    parser.add_argument("--plot", metavar="PATH", help="write the training curves to this PNG")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(launch(run_worker, parse_args()))
