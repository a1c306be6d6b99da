"""A model-parallel RNN in torch.distributed.rpc style, on the synchronous facade.

The sync port of ``examples/rnn_model_parallel.py``, written as PyTorch's
tutorial "Distributed RNN using Distributed Autograd and Distributed
Optimizer" writes it: the embedding table and the decoder live on the
parameter server ``ps`` (built there with ``rpc.remote``), the LSTM on the
trainer; the trainer's forward calls them with ``rpc_sync`` through RRefs,
and ``dist_autograd.backward`` / ``DistributedOptimizer.step`` train all
three. Only the imports below differ from torch code (``EXAMPLE_RPC=torch``
runs the same code on ``torch.distributed.rpc``).

The task is a delayed echo: the target at position t is the input token at
t - 3. The run fails unless the loss falls below ``--target``; the last line
is ``RESULT {json}``.

    python examples/sync/rnn_model_parallel.py [--steps 120]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

import torch
import torch.multiprocessing as mp
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

NTOKEN, NINP, NHID, DELAY, SEQ_LEN = 16, 16, 64, 3, 12


# --------------------------------------------------------------------------- torch's helpers


def _call_method(method: Any, rref: Any, *args: Any, **kwargs: Any) -> Any:
    return method(rref.local_value(), *args, **kwargs)


def _remote_method(method: Any, rref: Any, *args: Any, **kwargs: Any) -> Any:
    args = (method, rref, *args)
    return rpc.rpc_sync(rref.owner(), _call_method, args=args, kwargs=kwargs)


def _parameter_rrefs(module: nn.Module) -> list[Any]:
    return [RRef(param) for param in module.parameters()]


# --------------------------------------------------------------------------- the model


class EmbeddingTable(nn.Module):
    def __init__(self, ntoken: int, ninp: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Embedding(ntoken, ninp)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.encoder(inp)


class Decoder(nn.Module):
    def __init__(self, ntoken: int, nhid: int) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return self.decoder(output)


class RNNModel(nn.Module):
    def __init__(self, ps: str) -> None:
        super().__init__()
        self.emb_table_rref = rpc.remote(ps, EmbeddingTable, args=(NTOKEN, NINP))
        torch.manual_seed(3)
        self.rnn = nn.LSTM(NINP, NHID, batch_first=True)
        self.decoder_rref = rpc.remote(ps, Decoder, args=(NTOKEN, NHID))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        emb = _remote_method(EmbeddingTable.forward, self.emb_table_rref, inp)
        output, _ = self.rnn(emb)
        return _remote_method(Decoder.forward, self.decoder_rref, output)

    def parameter_rrefs(self) -> list[Any]:
        remote_params = []
        remote_params.extend(_remote_method(_parameter_rrefs, self.emb_table_rref))
        remote_params.extend(_parameter_rrefs(self.rnn))
        remote_params.extend(_remote_method(_parameter_rrefs, self.decoder_rref))
        return remote_params


def get_batch(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    inp = torch.randint(1, NTOKEN, (batch, SEQ_LEN), generator=gen)
    target = torch.zeros_like(inp)
    target[:, DELAY:] = inp[:, :-DELAY]
    return inp, target


def run_trainer(args: argparse.Namespace) -> dict[str, Any]:
    model = RNNModel("ps")
    opt = DistributedOptimizer(optim.Adam, model.parameter_rrefs(), lr=args.lr)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(args.steps):
        inp, target = get_batch(gen, args.batch_size)
        with dist_autograd.context() as context_id:
            output = model(inp)
            loss = criterion(output.reshape(-1, NTOKEN), target.reshape(-1))
            dist_autograd.backward(context_id, [loss])
            opt.step(context_id)
        losses.append(loss.item())
    return {"loss_first": losses[0], "loss_last": sum(losses[-5:]) / 5, "steps": args.steps}


def run_worker(
    rank: int, world_size: int, port: int, args: argparse.Namespace, results: Any
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if rank == 1:
        rpc.init_rpc("trainer", rank=rank, world_size=world_size)
        results.put(run_trainer(args))
    else:
        rpc.init_rpc("ps", rank=rank, world_size=world_size)
    rpc.shutdown()  # the ps serves until the trainer is done too


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--target", type=float, default=0.5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(run_worker, args=(2, port, args, results), nprocs=2, join=True)
    result = results.get()
    print(f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f} in {args.steps} steps")
    print("RESULT " + json.dumps({**result, "target": args.target}))
    return 0 if result["loss_last"] < args.target else 1


if __name__ == "__main__":
    sys.exit(main())
