"""Pipeline parallelism: a model split into 2 stages on 2 workers, with
several micro-batches in flight at once.

The pattern
-----------
A model too big (or too slow) for one worker is cut into consecutive stages,
one per worker. Sending a whole batch through stage 1 and then stage 2 would
leave one of them idle at any moment, so the driver cuts each batch into
micro-batches and starts all of them at once; while stage 2 works on
micro-batch i, stage 1 already works on micro-batch i + 1 (PyTorch's
"pipeline parallelism with RPC" tutorial, ported to asyncio)::

    async def forward(x):                   # one micro-batch
        h = rpc.remote(stage1, run_stage, (stage1_module, x))  # returns at once: an RRef
        return await rpc.rpc_async(stage2, run_last_stage, (stage2_module, h))

    outputs = await asyncio.gather(*(forward(x) for x in batch.split(micro_batch)))

Stage 1 keeps its output and hands stage 2 an RRef to it; stage 2's function
is an ``async def`` that awaits ``h.to_here()`` on stage 2's event loop, so the
activations go straight from stage 1 to stage 2, and a micro-batch waiting for
its input blocks nothing (this replaces PyTorch's ``@rpc.functions.async_execution``).
Its heavy part, the stage's forward, runs in the worker's thread pool with
``await rpc.to_thread(stage, x)``, so the loop keeps serving the other
micro-batches' messages meanwhile::

    async def run_last_stage(module, h):
        x = await h.to_here()                       # waits on the loop
        return await rpc.to_thread(module.local_value(), x)   # computes off it
All of it happens inside one ``dist_autograd.context()``, so one
``dist_autograd.backward`` from the loss trains both stages, and one
``DistributedOptimizer`` steps them where they live.

The check: the same model, built from the same seed, is then trained in this
process alone on the same batches; both loss curves are printed side by side
with their wall times. Cutting a batch into micro-batches changes nothing in
the mathematics, so the curves agree to float rounding. Whether the pipeline
is also faster depends on the machine and the model: each micro-batch costs a
few messages, and the stages only overlap when there are cores to spare.

The task is synthetic: 8 classes, each a mixture of Gaussian clusters in 32
dimensions. The run fails (exit status 1) unless the distributed loss falls
below ``--target`` times its first value and every step's loss matches the
single-process run within ``--tolerance``.

Run it
------
::

    python examples/pipeline_parallel.py                 # driver + 2 stage workers
    python examples/pipeline_parallel.py --world-size 2  # the driver also runs stage 1
    torchrun --nproc-per-node 3 examples/pipeline_parallel.py --plot pipeline.png
    python examples/pipeline_parallel.py --trace step.json  # the last step's timeline
    python -m aiorpc_autograd.profiler render step.json step.png

``--trace`` records every worker's spans during the last step
(:mod:`aiorpc_autograd.profiler`) and writes them as one Chrome trace: open it
in https://ui.perfetto.dev or ``chrome://tracing``.

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

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd, profiler
from aiorpc_autograd.optim import DistributedOptimizer

INPUT_DIM = 32
NUM_CLASSES = 8


# --------------------------------------------------------------------------- data and model


def make_dataset(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8 classes, each a mixture of 3 Gaussian clusters."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES * 3, INPUT_DIM, generator=gen)
    cluster = torch.randint(0, len(centers), (size,), generator=gen)
    return centers[cluster] + torch.randn(size, INPUT_DIM, generator=gen), cluster // 3


def make_stage(index: int, width: int, seed: int) -> torch.nn.Sequential:
    """Stage 1 or 2 of the model; the same seed gives the same weights anywhere."""
    torch.manual_seed(seed + index)
    linear, relu = torch.nn.Linear, torch.nn.ReLU
    if index == 1:
        return torch.nn.Sequential(linear(INPUT_DIM, width), relu(), linear(width, width), relu())
    return torch.nn.Sequential(linear(width, width), relu(), linear(width, NUM_CLASSES))


def batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches, in order (the same for both runs)."""
    x, y = make_dataset(args.seed, args.steps * args.batch_size)
    return list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=True))


# --------------------------------------------------------------------------- the stages' side


def run_stage(module: rpc.RRef[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Stage 1: a plain function, so it runs in the stage's thread pool."""
    return module.local_value()(x)


async def run_last_stage(
    module: rpc.RRef[torch.nn.Module], h: rpc.RRef[torch.Tensor]
) -> torch.Tensor:
    """Stage 2: waits on its own event loop for stage 1's output, then runs the
    stage in the worker's thread pool (the loop keeps serving meanwhile)."""
    x = await h.to_here()
    return await rpc.to_thread(module.local_value(), x)


# --------------------------------------------------------------------------- the driver (rank 0)


class Pipeline:
    """The two stages, built on their workers, driven micro-batch by micro-batch."""

    def __init__(self, stage1: int, stage2: int, args: argparse.Namespace) -> None:
        self.workers = (stage1, stage2)
        self.stages = [
            rpc.remote(stage1, make_stage, (1, args.width, args.seed)),
            rpc.remote(stage2, make_stage, (2, args.width, args.seed)),
        ]
        self.micro_batch = args.micro_batch

    async def forward_one(self, x: torch.Tensor) -> torch.Tensor:
        h = rpc.remote(self.workers[0], run_stage, (self.stages[0], x))
        return await rpc.rpc_async(self.workers[1], run_last_stage, (self.stages[1], h))

    async def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        micro_batches = batch.split(self.micro_batch)
        return torch.cat(await asyncio.gather(*(self.forward_one(x) for x in micro_batches)))

    async def parameter_rrefs(self) -> list[rpc.RRef[torch.Tensor]]:
        calls = [
            rpc.rpc_async(worker, stage_parameters, (stage,))
            for worker, stage in zip(self.workers, self.stages, strict=True)
        ]
        return [p for params in await asyncio.gather(*calls) for p in params]


async def stage_parameters(module: rpc.RRef[torch.nn.Module]) -> list[rpc.RRef[torch.Tensor]]:
    """On a stage's worker: RRefs to its parameters, for the DistributedOptimizer."""
    return [rpc.RRef(p) for p in (await module.to_here()).parameters()]


async def train_pipeline(world_size: int, args: argparse.Namespace) -> tuple[list[float], float]:
    stage1, stage2 = world_size - 2, world_size - 1  # the last two ranks
    model = Pipeline(stage1, stage2, args)
    params = await model.parameter_rrefs()
    optimizer = DistributedOptimizer(torch.optim.SGD, params, lr=args.lr, momentum=0.9)
    micro = -(-args.batch_size // args.micro_batch)
    print(
        f"pipeline: stage 1 on worker {stage1}, stage 2 on worker {stage2}, "
        f"{micro} micro-batches of {args.micro_batch} in flight per batch of {args.batch_size}"
    )
    losses: list[float] = []
    bar = Progress(args.steps, "pipeline ")
    started = time.perf_counter()
    for step, (x, y) in enumerate(batches(args)):
        traced = args.trace and step == args.steps - 1  # the last step: warmed up
        if traced:
            await profiler.start()
        async with dist_autograd.context() as context_id:
            loss = F.cross_entropy(await model(x), y)
            await dist_autograd.backward(context_id, [loss])
            await optimizer.step(context_id)
        if traced:
            trace = await profiler.stop(args.trace)
            spans = sum(e["ph"] == "X" for e in trace["traceEvents"])
            bar.print(f"timeline of step {step + 1} ({spans} spans) written to {args.trace}")
        losses.append(loss.item())
        bar.update(len(losses), f"loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - started
    bar.print(f"pipeline: {args.steps} steps in {seconds:.2f} s")
    return losses, seconds


def train_locally(args: argparse.Namespace) -> tuple[list[float], float]:
    """The reference: the same model, optimizer and batches in this process."""
    model = torch.nn.Sequential(
        make_stage(1, args.width, args.seed), make_stage(2, args.width, args.seed)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    losses: list[float] = []
    bar = Progress(args.steps, "single process ")
    started = time.perf_counter()
    for x, y in batches(args):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update(len(losses), f"loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - started
    bar.print(f"single process: {args.steps} steps in {seconds:.2f} s")
    return losses, seconds


def report(
    args: argparse.Namespace, pipelined: list[float], local: list[float], times: tuple[float, float]
) -> int:
    print(f"{'step':>5}  {'pipeline':>9}  {'1 process':>9}  {'difference':>10}")
    every = max(1, args.steps // 10)
    for step, (a, b) in enumerate(zip(pipelined, local, strict=True), 1):
        if step % every == 0 or step == 1:
            print(f"{step:5d}  {a:9.5f}  {b:9.5f}  {abs(a - b):10.2e}")
    difference = max(abs(a - b) for a, b in zip(pipelined, local, strict=True))
    trained = pipelined[-1] <= args.target * pipelined[0]
    same = difference <= args.tolerance
    print(
        f"wall time: pipeline {times[0]:.2f} s, single process {times[1]:.2f} s; "
        f"largest loss difference {difference:.2e} (tolerance {args.tolerance:g})"
    )
    print(
        f"{'reached' if trained else 'MISSED'} the target: loss {pipelined[0]:.4f} -> "
        f"{pipelined[-1]:.4f} (target: below {args.target:g} x the first); "
        f"{'same' if same else 'DIFFERENT'} curve as the single-process run"
    )
    if args.plot:
        save_plot(args.plot, {"loss": {"pipeline": pipelined, "single process": local}}, "step")
    result = {
        "loss_first": pipelined[0],
        "loss_last": pipelined[-1],
        "local_loss_first": local[0],
        "local_loss_last": local[-1],
        "max_difference": difference,
        "tolerance": args.tolerance,
        "pipeline_seconds": round(times[0], 3),
        "local_seconds": round(times[1], 3),
        "steps": args.steps,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if trained and same else 1


async def run_worker(rank: int, world_size: int, init_method: str, args: argparse.Namespace) -> int:
    """Everything one process does: rank 0 drives, the last two ranks run the stages."""
    if world_size not in (2, 3):
        raise SystemExit("2 stages: --world-size 3 (driver + 2 stages) or 2 (driver runs stage 1)")
    torch.set_num_threads(1)  # one core per process, the single-process run included
    # torch imports torch._dynamo the first time any optimizer is built (seconds):
    # do it now, so that neither of the timings compared includes it.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    names = ["driver", "stage1", "stage2"] if world_size == 3 else ["driver", "stage2"]
    options = rpc.RpcOptions(rpc_timeout=120)
    if rank == 0:
        async with rpc.worker(
            names[rank], rank, world_size, init_method=init_method, options=options
        ):
            pipelined, pipeline_seconds = await train_pipeline(world_size, args)
        # The workers are gone: the single-process run has the machine to itself.
        local, local_seconds = train_locally(args)
        return report(args, pipelined, local, (pipeline_seconds, local_seconds))
    async with rpc.worker(
        names[rank], rank, world_size, init_method=init_method, options=options, shutdown_timeout=0
    ):
        pass
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--world-size", type=int, default=3, choices=(2, 3))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=512, help="hidden layer width")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--target", type=float, default=0.25, help="last loss / first loss")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest loss difference")
    parser.add_argument("--plot", metavar="PATH", help="write both loss curves to this PNG")
    parser.add_argument(
        "--trace",
        metavar="PATH",
        help="write the merged timeline of the last step (Chrome/Perfetto JSON) here",
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(launch(run_worker, parse_args()))
