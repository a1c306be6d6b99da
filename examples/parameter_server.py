"""Parameter server: N trainers share one model held by a parameter server.

The pattern
-----------
Rank 0 is the parameter server ("ps"). It holds the model's parameters as plain
tensors, drives the epochs and evaluates the model on held-out data. Ranks
1..N are trainers ("trainer1", ...), each with its own shard of the training
data. One training step on a trainer is::

    async with dist_autograd.context() as context_id:
        params = await ps.rpc_async().parameters()         # pull the live weights
        loss = cross_entropy(functional_call(net, params, x), y)   # compute here
        await dist_autograd.backward(context_id, [loss])   # gradients go to the ps
        await optimizer.step(context_id)                   # the ps applies them

The pulled tensors are linked to the server's parameters by distributed
autograd, so ``backward`` sends each gradient back to the parameter server,
where it is kept in that context (never in ``.grad``: trainers do not race on
it), and ``DistributedOptimizer.step`` runs SGD there with exactly that
context's gradients. The trainers run concurrently and never wait for each
other: each step uses whatever weights the server holds at that moment
(asynchronous SGD, as in PyTorch's parameter-server tutorial).

The data is synthetic and made here: 8 classes, each a mixture of Gaussian
clusters in 16 dimensions, which a small MLP learns well. Chance is 12.5%;
the run fails (exit status 1) unless the held-out accuracy reaches
``--target`` (default 85%).

Run it
------
::

    python examples/parameter_server.py                  # ps + 2 trainers, local
    python examples/parameter_server.py --world-size 4 --epochs 8 --plot ps.png
    torchrun --nproc-per-node 3 examples/parameter_server.py   # one rank per process

The last line printed is ``RESULT {...}`` (JSON) for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import torch
import torch.nn.functional as F
from _plumbing import Progress, launch, save_plot
from torch.func import functional_call

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.optim import DistributedOptimizer

NUM_CLASSES = 8
INPUT_DIM = 16
TEST_SIZE = 2000


# --------------------------------------------------------------------------- data and model


def make_dataset(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` labelled points: every class is a mixture of 3 Gaussian clusters.

    The same seed gives the same data in every process, so each trainer can
    take its own shard without any data being sent around. The points after
    the first ``size - TEST_SIZE`` are held out for testing.
    """
    gen = torch.Generator().manual_seed(seed)
    clusters_per_class = 3
    centers = 1.2 * torch.randn(NUM_CLASSES * clusters_per_class, INPUT_DIM, generator=gen)
    cluster = torch.randint(0, len(centers), (size,), generator=gen)
    x = centers[cluster] + torch.randn(size, INPUT_DIM, generator=gen)
    y = cluster // clusters_per_class
    return x, y


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(INPUT_DIM, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, NUM_CLASSES),
    )


# --------------------------------------------------------------------------- parameter server


class ParameterServer:
    """Lives on rank 0 and owns the parameters: plain tensors, by name."""

    def __init__(self, seed: int) -> None:
        self.net = make_net(seed)  # the architecture, for evaluation
        self.params = {
            name: p.detach().clone().requires_grad_() for name, p in self.net.named_parameters()
        }
        self.progress: Progress | None = None  # counts the pulls of an epoch

    def parameters(self) -> dict[str, torch.Tensor]:
        """The live weights (a trainer pulls them once per step, inside its
        distributed autograd context)."""
        if self.progress is not None:
            self.progress.update(self.progress.done + 1)
        return self.params

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        logits = functional_call(self.net, self.params, (x,))
        loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
        return loss, accuracy


# --------------------------------------------------------------------------- trainers


class Trainer:
    """Lives on a trainer rank (created there by the ps with ``rpc.remote``)."""

    def __init__(
        self,
        ps: rpc.RRef[ParameterServer],
        param_rrefs: list[rpc.RRef[torch.Tensor]],
        index: int,
        num_trainers: int,
        args: argparse.Namespace,
    ) -> None:
        self.ps = ps
        self.net = make_net(args.seed)  # the architecture only: weights come from the ps
        x, y = make_dataset(args.seed, args.train_size + TEST_SIZE)
        x, y = x[: args.train_size], y[: args.train_size]
        self.x, self.y = x[index::num_trainers], y[index::num_trainers]  # this trainer's shard
        self.batch_size = args.batch_size
        # Plain SGD keeps no state, so one optimizer per trainer, each stepping
        # the ps's parameters, is exactly one SGD applied to every trainer's steps.
        self.optimizer = DistributedOptimizer(torch.optim.SGD, param_rrefs, lr=args.lr)
        self.generator = torch.Generator().manual_seed(args.seed + index)

    def steps_per_epoch(self) -> int:
        return -(-len(self.x) // self.batch_size)

    async def train_epoch(self) -> float:
        """One pass over this trainer's shard; returns its mean loss.

        An ``async def`` method: it runs on the trainer's event loop, so it can
        await the RPCs of each step.
        """
        order = torch.randperm(len(self.x), generator=self.generator)
        total = 0.0
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            async with dist_autograd.context() as context_id:
                params = await self.ps.rpc_async().parameters()
                logits = functional_call(self.net, params, (self.x[batch],))
                loss = F.cross_entropy(logits, self.y[batch])
                await dist_autograd.backward(context_id, [loss])
                await self.optimizer.step(context_id)
            total += loss.item() * len(batch)
        return total / len(self.x)


# --------------------------------------------------------------------------- the driver (rank 0)


async def run_parameter_server(world_size: int, args: argparse.Namespace) -> int:
    num_trainers = world_size - 1
    server = ParameterServer(args.seed)
    ps = rpc.RRef(server)
    param_rrefs = [rpc.RRef(p) for p in server.params.values()]
    trainers = [
        rpc.remote(rank, Trainer, (ps, param_rrefs, rank - 1, num_trainers, args))
        for rank in range(1, world_size)
    ]
    x, y = make_dataset(args.seed, args.train_size + TEST_SIZE)
    x_test, y_test = x[args.train_size :], y[args.train_size :]
    steps = sum(await asyncio.gather(*(t.rpc_async().steps_per_epoch() for t in trainers)))

    chance = 1 / NUM_CLASSES
    print(
        f"parameter server + {num_trainers} trainers: {args.train_size} training points, "
        f"{NUM_CLASSES} classes (chance {chance:.1%}), target test accuracy {args.target:.0%}"
    )
    loss, accuracy = server.evaluate(x_test, y_test)
    print(f"before training: test loss {loss:.4f}  test accuracy {accuracy:.1%}")
    history: dict[str, list[float]] = {"train": [], "test": [], "accuracy": []}
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_started = time.perf_counter()
        server.progress = Progress(steps, f"epoch {epoch}/{args.epochs} ")
        # Every trainer runs one epoch over its shard, all at the same time.
        shard_losses = await asyncio.gather(*(t.rpc_async().train_epoch() for t in trainers))
        train_loss = sum(shard_losses) / len(shard_losses)
        loss, accuracy = server.evaluate(x_test, y_test)
        history["train"].append(train_loss)
        history["test"].append(loss)
        history["accuracy"].append(accuracy)
        server.progress.print(
            f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}  test loss {loss:.4f}"
            f"  test accuracy {accuracy:.1%}  ({time.perf_counter() - epoch_started:.1f} s)"
        )
    seconds = time.perf_counter() - started

    reached = accuracy >= args.target
    print(
        f"{'reached' if reached else 'MISSED'} the target: test accuracy {accuracy:.1%} "
        f"(target {args.target:.0%}, chance {chance:.1%}) after {args.epochs} epochs, "
        f"{seconds:.1f} s"
    )
    if args.plot:
        panels = {
            "cross-entropy loss": {"train": history["train"], "test": history["test"]},
            "test accuracy": {"test": history["accuracy"]},
        }
        save_plot(args.plot, panels, "epoch")
    result = {
        "loss_first": history["train"][0],
        "loss_last": history["train"][-1],
        "accuracy": accuracy,
        "target": args.target,
        "epochs": args.epochs,
        "trainers": num_trainers,
        "seconds": round(seconds, 3),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if reached else 1


async def run_worker(rank: int, world_size: int, init_method: str, args: argparse.Namespace) -> int:
    """Everything one process does: rank 0 serves and drives, the others train."""
    if world_size < 2:
        raise SystemExit("the parameter server needs at least one trainer: --world-size >= 2")
    torch.set_num_threads(1)  # one core per process: that is the point of the exercise
    name = "ps" if rank == 0 else f"trainer{rank}"
    options = rpc.RpcOptions(rpc_timeout=120)
    if rank == 0:
        async with rpc.worker(name, rank, world_size, init_method=init_method, options=options):
            return await run_parameter_server(world_size, args)
    # A trainer only answers the ps's requests. shutdown() keeps serving until
    # every worker has called it, that is until the ps is done.
    async with rpc.worker(
        name, rank, world_size, init_method=init_method, options=options, shutdown_timeout=0
    ):
        pass
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=3, help="1 ps + N trainers (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--target", type=float, default=0.85, help="test accuracy to reach")
    parser.add_argument("--plot", metavar="PATH", help="write the training curves to this PNG")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(launch(run_worker, parse_args()))
