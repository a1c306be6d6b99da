"""Pipeline parallelism in torch.distributed.rpc style, on the synchronous facade.

The sync port of ``examples/pipeline_parallel.py``, written as PyTorch's
tutorial "Distributed Pipeline Parallelism Using RPC" (the ResNet50 pipeline)
writes it: two shards built on two workers with ``rpc.remote``; the driver
cuts each batch into micro-batches, and for each one sends its input as an
``RRef`` to shard 1 (``p1_rref.remote().forward(x_rref)``, returning an RRef
at once), hands that RRef to shard 2 (``rpc.rpc_async(owner,
Shard2.forward_async, args=(p2_rref, y_rref))``, a torch future) and waits for
all of them with ``torch.futures.wait_all``.
Shard 2's ``forward_async`` is ``@rpc.functions.async_execution``: it starts
the fetch of its input with ``rpc_async`` and returns the torch future chained
on it (``fut.then``), so no thread of shard 2 waits for shard 1 meanwhile.
Only the imports below differ from torch code
(``EXAMPLE_RPC=torch`` runs the same code on ``torch.distributed.rpc``).

The check: the same model is trained in this process alone on the same
batches; the loss curves must agree to float rounding, and the loss must fall
below ``--target`` times its first value. The last line is ``RESULT {json}``.

    python examples/sync/pipeline_parallel.py [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn, optim

if os.environ.get("EXAMPLE_RPC") == "torch":  # the same code on torch's own RPC
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc
    from torch.distributed.optim import DistributedOptimizer
    from torch.distributed.rpc import RRef
else:
    from aiorpc_autograd.sync import autograd as dist_autograd
    from aiorpc_autograd.sync import rpc
    from aiorpc_autograd.sync.optim import DistributedOptimizer
    from aiorpc_autograd.sync.rpc import RRef

INPUT_DIM, NUM_CLASSES = 32, 8


def make_dataset(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES * 3, INPUT_DIM, generator=gen)
    cluster = torch.randint(0, len(centers), (size,), generator=gen)
    return centers[cluster] + torch.randn(size, INPUT_DIM, generator=gen), cluster // 3


def make_stage(index: int, width: int) -> nn.Sequential:
    torch.manual_seed(index)
    if index == 1:
        return nn.Sequential(
            nn.Linear(INPUT_DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, NUM_CLASSES))


# --------------------------------------------------------------------------- the shards


def fetch(rref: Any) -> torch.Tensor:
    return rref.to_here()


class Shard1(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.seq = make_stage(1, width)

    def forward(self, x_rref: Any) -> torch.Tensor:
        x = x_rref.to_here()
        with self._lock:
            return self.seq(x)

    def parameter_rrefs(self) -> list[Any]:
        return [RRef(p) for p in self.parameters()]


class Shard2(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.seq = make_stage(2, width)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self.seq(x)

    @staticmethod
    @rpc.functions.async_execution
    def forward_async(self_rref: Any, y_rref: Any) -> Any:
        # Fetch the input without holding a thread, then run the shard.
        self = self_rref.local_value()
        fut = rpc.rpc_async(rpc.get_worker_info(), fetch, args=(y_rref,))
        return fut.then(lambda f: self.run(f.wait()))

    def parameter_rrefs(self) -> list[Any]:
        return [RRef(p) for p in self.parameters()]


class DistModel(nn.Module):
    def __init__(self, split_size: int, workers: list[str], width: int) -> None:
        super().__init__()
        self.split_size = split_size
        self.p1_rref = rpc.remote(workers[0], Shard1, args=(width,))
        self.p2_rref = rpc.remote(workers[1], Shard2, args=(width,))

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        out_futures = []
        for x in iter(xs.split(self.split_size, dim=0)):
            x_rref = RRef(x)
            y_rref = self.p1_rref.remote().forward(x_rref)
            z_fut = rpc.rpc_async(
                self.p2_rref.owner(), Shard2.forward_async, args=(self.p2_rref, y_rref)
            )
            out_futures.append(z_fut)
        return torch.cat(torch.futures.wait_all(out_futures))

    def parameter_rrefs(self) -> list[Any]:
        remote_params = []
        remote_params.extend(self.p1_rref.remote().parameter_rrefs().to_here())
        remote_params.extend(self.p2_rref.remote().parameter_rrefs().to_here())
        return remote_params


def batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_dataset(args.seed, args.steps * args.batch_size)
    return list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=False))


def train_pipeline(args: argparse.Namespace) -> list[float]:
    model = DistModel(args.micro_batch, ["worker1", "worker2"], args.width)
    opt = DistributedOptimizer(optim.SGD, model.parameter_rrefs(), lr=args.lr, momentum=0.9)
    losses = []
    for inputs, labels in batches(args):
        with dist_autograd.context() as context_id:
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, labels)
            dist_autograd.backward(context_id, [loss])
            opt.step(context_id)
        losses.append(loss.item())
    return losses


def train_locally(args: argparse.Namespace) -> list[float]:
    model = nn.Sequential(make_stage(1, args.width), make_stage(2, args.width))
    opt = optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    losses = []
    for inputs, labels in batches(args):
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run_worker(
    rank: int, world_size: int, port: int, args: argparse.Namespace, results: Any
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=120)
    if rank == 0:
        rpc.init_rpc("master", rank=rank, world_size=world_size, rpc_backend_options=options)
        results.put(train_pipeline(args))
    else:
        rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size, rpc_backend_options=options)
    rpc.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(run_worker, args=(3, port, args, results), nprocs=3, join=True)
    pipelined = results.get()
    local = train_locally(args)
    difference = max(abs(a - b) for a, b in zip(pipelined, local, strict=False))
    print(
        f"pipeline loss {pipelined[0]:.4f} -> {pipelined[-1]:.4f}; "
        f"single process {local[0]:.4f} -> {local[-1]:.4f}; largest difference {difference:.2e}"
    )
    result = {
        "loss_first": pipelined[0],
        "loss_last": pipelined[-1],
        "local_loss_last": local[-1],
        "max_difference": difference,
        "steps": args.steps,
    }
    print("RESULT " + json.dumps(result))
    trained = pipelined[-1] < args.target * pipelined[0]
    return 0 if trained and difference <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
