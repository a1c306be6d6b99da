"""A parameter server in torch.distributed.rpc style, on the synchronous facade.

The sync port of ``examples/parameter_server.py``, written as PyTorch's tutorial
"Implementing a Parameter Server Using Distributed RPC Framework" writes it:
the server holds the model, each trainer calls it with ``rpc_sync`` through
an ``RRef`` inside ``with dist_autograd.context()``, runs
``dist_autograd.backward`` and ``DistributedOptimizer.step``. Only the imports
below differ from torch code: run it with ``EXAMPLE_RPC=torch`` and the very
same code runs on ``torch.distributed.rpc``.

The data is synthetic (8 classes of Gaussian clusters in 16 dimensions;
chance is 12.5%). Each trainer trains on its own shard, asynchronously, then
measures the accuracy on held-out data; the run fails unless both reach
``--target``. The last line is ``RESULT {json}``.

    python examples/sync/parameter_server.py [--world-size 3] [--epochs 2]
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

NUM_CLASSES, INPUT_DIM, TEST_SIZE = 8, 16, 1000


def make_dataset(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = 1.2 * torch.randn(NUM_CLASSES * 3, INPUT_DIM, generator=gen)
    cluster = torch.randint(0, len(centers), (size,), generator=gen)
    return centers[cluster] + torch.randn(size, INPUT_DIM, generator=gen), cluster // 3


# --------------------------------------------------------------------------- torch's helpers


def _call_method(method: Any, rref: Any, *args: Any, **kwargs: Any) -> Any:
    return method(rref.local_value(), *args, **kwargs)


def _remote_method(method: Any, rref: Any, *args: Any, **kwargs: Any) -> Any:
    args = (method, rref, *args)
    return rpc.rpc_sync(rref.owner(), _call_method, args=args, kwargs=kwargs)


# --------------------------------------------------------------------------- the server


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(INPUT_DIM, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


class ParameterServer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Net()

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        # Asynchronous SGD: other trainers step the live weights while this
        # trainer's pass is in flight, and its backward needs the weights it
        # used: a (differentiable) copy of them.
        weights = {name: p.clone() for name, p in self.model.named_parameters()}
        return torch.func.functional_call(self.model, weights, (inp,))

    def get_param_rrefs(self) -> list[Any]:
        return [RRef(param) for param in self.model.parameters()]


param_server = None
global_lock = threading.Lock()


def get_parameter_server() -> ParameterServer:
    global param_server
    with global_lock:
        if not param_server:
            param_server = ParameterServer()
        return param_server


def run_parameter_server(rank: int, world_size: int) -> None:
    rpc.init_rpc(name="parameter_server", rank=rank, world_size=world_size)
    rpc.shutdown()  # waits for the trainers


# --------------------------------------------------------------------------- the trainers


class TrainerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.param_server_rref = rpc.remote("parameter_server", get_parameter_server)

    def get_global_param_rrefs(self) -> list[Any]:
        return _remote_method(ParameterServer.get_param_rrefs, self.param_server_rref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _remote_method(ParameterServer.forward, self.param_server_rref, x)


def run_training_loop(rank: int, num_trainers: int, args: argparse.Namespace) -> dict[str, Any]:
    net = TrainerNet()
    param_rrefs = net.get_global_param_rrefs()
    opt = DistributedOptimizer(optim.SGD, param_rrefs, lr=args.lr)
    x, y = make_dataset(args.seed, args.train_size + TEST_SIZE)
    x_train, y_train = (
        x[rank - 1 : args.train_size : num_trainers],
        y[rank - 1 : args.train_size : num_trainers],
    )
    losses = []
    for _ in range(args.epochs):
        for data, target in zip(
            x_train.split(args.batch_size), y_train.split(args.batch_size), strict=False
        ):
            with dist_autograd.context() as cid:
                model_output = net(data)
                loss = F.nll_loss(model_output, target)
                dist_autograd.backward(cid, [loss])
                opt.step(cid)
            losses.append(loss.item())
    with torch.no_grad():
        predicted = net(x[args.train_size :]).argmax(dim=1)
    accuracy = (predicted == y[args.train_size :]).float().mean().item()
    return {"loss_first": losses[0], "loss_last": sum(losses[-5:]) / 5, "accuracy": accuracy}


def run_worker(
    rank: int, world_size: int, port: int, args: argparse.Namespace, results: Any
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if rank == 0:
        run_parameter_server(0, world_size)
        return
    rpc.init_rpc(name=f"trainer_{rank}", rank=rank, world_size=world_size)
    results.put((rank, run_training_loop(rank, world_size - 1, args)))
    rpc.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.7)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(
        run_worker, args=(args.world_size, port, args, results), nprocs=args.world_size, join=True
    )
    trainers = dict(results.get() for _ in range(args.world_size - 1))
    for rank, r in sorted(trainers.items()):
        print(
            f"trainer_{rank}: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, "
            f"test accuracy {r['accuracy']:.1%}"
        )
    reached = all(r["accuracy"] >= args.target for r in trainers.values())
    print("RESULT " + json.dumps({"trainers": list(trainers.values()), "target": args.target}))
    return 0 if reached else 1


if __name__ == "__main__":
    sys.exit(main())
