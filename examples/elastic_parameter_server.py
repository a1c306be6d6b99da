"""Elastic parameter server: trainers come and go while the model trains.

The pattern
-----------
The parameter server ("ps", rank 0) starts a *dynamic* group
(``init_rpc(..., world_size=None)``) and hosts its store. Trainers join it
whenever they start, with no call on the server's side, train for as long as
the server wants more steps, and leave by shutting down. One training step on
a trainer is the classic parameter-server step::

    async with dist_autograd.context() as context_id:
        params = await rpc.rpc_async("ps", pull)           # the live weights
        loss = cross_entropy(functional_call(net, params, x), y)
        await dist_autograd.backward(context_id, [loss])  # gradients to the ps
        await optimizer.step(context_id)                  # SGD there

The server watches the group (``async for event in rpc.membership_events()``)
and prints every join and leave. During the run, the launcher SIGKILLs one
trainer in the middle of its work: the server sees it leave ("lost", within
``heartbeat_timeout``), whatever it held there (its autograd contexts) is
released, and training goes on with the others. Then a new trainer joins and
takes over. The server's state (the parameters, the step count) is all that
survives a trainer; a trainer keeps nothing that the run needs.

Under torchrun, run the server on its own and the trainers under
``torchrun --nnodes=1:N --max-restarts=K``: a trainer that crashes is
restarted by torchrun and rejoins the running group under its old name, and
the server's state is kept (only torchrun's own worker group restarts)::

    python examples/elastic_parameter_server.py --role ps --port 29600 &
    torchrun --nnodes=1:2 --nproc-per-node=2 --max-restarts=3 \\
        --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29601 \\
        examples/elastic_parameter_server.py --role trainer --port 29600

The data is the parameter-server example's synthetic 8-class task; the run
fails (exit status 1) unless the held-out accuracy reaches ``--target``.

Run it
------
::

    python examples/elastic_parameter_server.py           # ps + 2 trainers, 1 killed, 1 joins

Each trainer makes at most ``--trainer-steps`` steps and the server wants
``--steps`` in all, so the trainer that joins is needed to finish.

The last line printed is ``RESULT {...}`` (JSON) for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from _plumbing import free_port
from parameter_server import TEST_SIZE, make_dataset, make_net
from torch.func import functional_call

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.optim import DistributedOptimizer

OPTIONS = rpc.RpcOptions(rpc_timeout=120)


# --------------------------------------------------------------------------- the server


class Server:
    """The parameter server's state: the weights and the steps done."""

    def __init__(self, seed: int, steps: int) -> None:
        self.net = make_net(seed)
        self.params = {
            n: p.detach().clone().requires_grad_() for n, p in self.net.named_parameters()
        }
        self.steps_wanted = steps
        self.steps_done = 0
        self.by_trainer: dict[str, int] = {}


SERVER: Server | None = None  # in the ps process


def pull() -> dict[str, torch.Tensor]:
    """The live weights (called by trainers inside their autograd context)."""
    assert SERVER is not None
    return SERVER.params


def param_rrefs() -> list[rpc.RRef[torch.Tensor]]:
    assert SERVER is not None
    return [rpc.RRef(p) for p in SERVER.params.values()]


def report(trainer: str, steps: int) -> bool:
    """Count a trainer's steps; False once the server has enough."""
    assert SERVER is not None
    SERVER.steps_done += steps
    SERVER.by_trainer[trainer] = SERVER.by_trainer.get(trainer, 0) + steps
    return SERVER.steps_done < SERVER.steps_wanted


async def watch(log: list[dict[str, Any]], started: float) -> None:
    async for event in rpc.membership_events():
        members = [w.name for w in rpc.get_worker_infos()]
        at = time.monotonic() - started
        print(f"[{at:6.2f}s] {event.worker.name} {event.kind}s ({event.reason}); members {members}")
        log.append(
            {
                "t": round(at, 3),
                "kind": event.kind,
                "worker": event.worker.name,
                "reason": event.reason.split(":")[0],
            }
        )


async def run_server(args: argparse.Namespace, init_method: str) -> int:
    global SERVER
    SERVER = Server(args.seed, args.steps)
    await rpc.init_rpc("ps", 0, None, init_method=init_method, options=OPTIONS)
    started = time.monotonic()
    log: list[dict[str, Any]] = []
    watcher = asyncio.create_task(watch(log, started))
    x, y = make_dataset(args.seed, args.train_size + TEST_SIZE)
    x_test, y_test = x[args.train_size :], y[args.train_size :]
    print(f"ps: a dynamic group at {init_method}; training until {args.steps} steps")
    last = 0
    while SERVER.steps_done < args.steps and time.monotonic() - started < args.max_seconds:
        await asyncio.sleep(0.2)
        if SERVER.steps_done - last >= args.steps // 5:
            last = SERVER.steps_done
            print(f"[{time.monotonic() - started:6.2f}s] {last} steps done")
    # The trainers see report() return False and leave; wait (bounded) for them.
    until = time.monotonic() + 30
    while len(rpc.get_worker_infos()) > 1 and time.monotonic() < until:
        await asyncio.sleep(0.1)
    with torch.no_grad():
        logits = functional_call(SERVER.net, SERVER.params, (x_test,))
        accuracy = (logits.argmax(dim=1) == y_test).float().mean().item()
        loss = F.cross_entropy(logits, y_test).item()
    seconds = time.monotonic() - started
    reached = accuracy >= args.target
    print(
        f"{'reached' if reached else 'MISSED'} the target: test accuracy {accuracy:.1%} "
        f"(target {args.target:.0%}), test loss {loss:.4f}, {SERVER.steps_done} steps by "
        f"{SERVER.by_trainer}, {seconds:.1f} s"
    )
    await rpc.shutdown()
    watcher.cancel()
    result = {
        "accuracy": accuracy,
        "target": args.target,
        "steps": SERVER.steps_done,
        "by_trainer": SERVER.by_trainer,
        "events": log,
        "seconds": round(seconds, 3),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if reached else 1


# --------------------------------------------------------------------------- trainers


async def run_trainer(rank: int, args: argparse.Namespace, init_method: str) -> int:
    name = f"trainer{rank}"
    torch.set_num_threads(1)
    await rpc.init_rpc(name, rank, None, init_method=init_method, options=OPTIONS)
    net = make_net(args.seed)  # the architecture: the weights come from the ps
    x, y = make_dataset(args.seed, args.train_size + TEST_SIZE)
    x, y = x[: args.train_size], y[: args.train_size]
    gen = torch.Generator().manual_seed(args.seed + rank)
    opt = DistributedOptimizer(torch.optim.SGD, await rpc.rpc_async("ps", param_rrefs), lr=args.lr)
    crash_after = int(os.environ.get("ELASTIC_CRASH_AFTER", "0"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    steps, unreported, more = 0, 0, True
    while more and steps < args.trainer_steps:
        batch = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        async with dist_autograd.context() as context_id:
            params = await rpc.rpc_async("ps", pull)
            loss = F.cross_entropy(functional_call(net, params, (x[batch],)), y[batch])
            await dist_autograd.backward(context_id, [loss])
            await opt.step(context_id)
        steps += 1
        unreported += 1
        if crash_after and restarts == 0 and steps == crash_after:
            print(f"{name}: crashing on purpose after {steps} steps", flush=True)
            os._exit(1)  # torchrun restarts it; it rejoins under the same name
        if unreported == 10 or steps == args.trainer_steps:
            more = await rpc.rpc_async("ps", report, (name, unreported))
            unreported = 0
    await rpc.shutdown()  # leaves the group
    return 0


def _trainer_process(rank: int, args: argparse.Namespace, init_method: str) -> None:
    sys.exit(rpc.run(run_trainer(rank, args, init_method)))


# --------------------------------------------------------------------------- launching


def run_local(args: argparse.Namespace) -> int:
    """The ps here; trainers 1 and 2 at once, trainer 1 SIGKILLed mid-run, then
    trainer 3 joins."""
    init_method = f"tcp://127.0.0.1:{free_port()}"
    spawn = multiprocessing.get_context("spawn")

    def trainer(rank: int) -> multiprocessing.process.BaseProcess:
        proc = spawn.Process(target=_trainer_process, args=(rank, args, init_method), daemon=True)
        proc.start()
        return proc

    async def main() -> int:
        server = asyncio.create_task(run_server(args, init_method))
        await asyncio.sleep(0.5)  # the ps hosts the store: let it start first
        procs = [trainer(1), trainer(2)]
        # Kill trainer1 once it is well into training.
        while SERVER is None or SERVER.by_trainer.get("trainer1", 0) < args.kill_after:
            if server.done():
                break
            await asyncio.sleep(0.05)
        if not server.done():
            print(f"launcher: SIGKILL trainer1 (pid {procs[0].pid})", flush=True)
            os.kill(procs[0].pid or 0, signal.SIGKILL)
            await asyncio.sleep(args.join_delay)
            print("launcher: starting trainer3", flush=True)
            procs.append(trainer(3))
        code = await server
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        return code

    return rpc.run(main())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("local", "ps", "trainer"), default="local")
    parser.add_argument("--port", type=int, default=29600, help="the ps's store (ps/trainer)")
    parser.add_argument("--steps", type=int, default=600, help="trainer steps in all")
    parser.add_argument(
        "--trainer-steps", type=int, default=300, help="steps one trainer makes at most"
    )
    parser.add_argument("--kill-after", type=int, default=100, help="trainer1's steps before")
    parser.add_argument("--join-delay", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--target", type=float, default=0.85, help="test accuracy to reach")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    init_method = f"tcp://127.0.0.1:{args.port}"
    if args.role == "ps":
        return rpc.run(run_server(args, init_method))
    if args.role == "trainer":
        # One torchrun worker per trainer; rank 0 is the ps's, so trainers start at 1.
        rank = 1 + int(os.environ.get("RANK", "0"))
        return rpc.run(run_trainer(rank, args, init_method))
    return run_local(args)


if __name__ == "__main__":
    sys.exit(main())
