"""Serve while training: one event loop answers inference requests from the
live parameters while it trains them.

The pattern
-----------
The model lives on a parameter worker (``ps``, rank 1) as a
:class:`RemoteModule`; the ``trainer`` (rank 0) trains it with distributed
autograd and a ``DistributedOptimizer`` and, in the same process and on the
same event loop, runs a small HTTP server (stdlib ``asyncio.start_server``)::

    GET /predict?x=0.5   ->   {"x": 0.5, "y": 0.83, "step": 412, "loss": 0.0031}

Each request is answered by a forward pass of the model as it is right now,
``await model(x)``, interleaved with the training steps, which are also just
awaits on the same loop::

    server = await asyncio.start_server(handle_request, "127.0.0.1", port)
    for step in ...:
        async with dist_autograd.context() as context_id:
            loss = mse_loss(await model(x), y)
            await dist_autograd.backward(context_id, [loss])
            await optimizer.step(context_id)

With PyTorch's RPC this needs threads: its calls block, and an HTTP server
beside a training loop means a second thread and locks. Here every RPC is an
awaitable, so a request handler and the trainer simply take turns.

By default the script also runs a little client in the same loop that asks
for ``f(1.0)`` a few times a second and prints the answers, so you can watch
them approach the truth; or query it yourself (``--port 8000 --linger 30``,
then ``curl 'http://127.0.0.1:8000/predict?x=1'``).

The task is synthetic: fit f(x) = sin(2x) + 0.3x on [-3, 3]. The run fails
(exit status 1) unless the mean squared error on a grid of test points falls
below ``--target`` (default 0.01).

Run it
------
::

    python examples/serve_while_training.py                 # trainer + ps, local
    python examples/serve_while_training.py --world-size 1  # the trainer holds the model
    torchrun --nproc-per-node 2 examples/serve_while_training.py --port 8000

The line ``serving on http://127.0.0.1:PORT`` is printed once the server is up,
and the last line printed is ``RESULT {...}`` (JSON), for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import parse_qs, urlsplit

import torch
import torch.nn.functional as F
from _plumbing import Progress, launch, save_plot

import aiorpc_autograd as rpc
from aiorpc_autograd import dist_autograd
from aiorpc_autograd.nn import RemoteModule
from aiorpc_autograd.optim import DistributedOptimizer

PROBE_X = 1.0  # where the built-in client asks


def truth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * x) + 0.3 * x


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(1, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )


# --------------------------------------------------------------------------- the service


class Service:
    """The model, what the HTTP handler reports about it, and the handlers running."""

    def __init__(self, model: RemoteModule) -> None:
        self.model = model
        self.step = 0
        self.loss = float("nan")
        self.requests = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def predict(self, x: float) -> dict[str, float]:
        """A forward pass with the parameters as they are now (no autograd context)."""
        y = await self.model(torch.tensor([[x]]))
        self.requests += 1
        return {"x": x, "y": y.item(), "step": self.step, "loss": self.loss}

    async def handle_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A minimal HTTP/1.1 handler: ``GET /predict?x=...``, one request per connection."""
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            request_line = (await reader.readline()).decode("latin-1").split()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # skip the headers
            url = urlsplit(request_line[1] if len(request_line) == 3 else "")
            query = parse_qs(url.query)
            if request_line[:1] != ["GET"] or url.path != "/predict" or "x" not in query:
                status, body = "404 Not Found", {"error": "try GET /predict?x=0.5"}
            else:
                try:
                    status, body = "200 OK", await self.predict(float(query["x"][0]))
                except ValueError:
                    status, body = "400 Bad Request", {"error": "x must be a number"}
                except rpc.RpcError as exc:  # the model's worker is unreachable
                    status, body = "503 Service Unavailable", {"error": str(exc)}
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        finally:
            writer.close()
            self.handlers.discard(task)

    async def close(self, server: asyncio.Server) -> None:
        """Stop accepting connections, then wait for the requests already accepted
        (``server.close()`` does not), so that none is left calling the model
        when RPC shuts down."""
        server.close()
        await asyncio.sleep(0)  # a connection accepted just now starts its handler
        await asyncio.gather(*self.handlers, return_exceptions=True)


async def http_get(port: int, path: str) -> dict[str, float]:
    """The built-in client: one GET over a fresh connection, the JSON body back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


async def probe(port: int, bar: Progress, every: float) -> None:
    """Ask for f(PROBE_X) every ``every`` seconds and print the answer."""
    expected = truth(torch.tensor(PROBE_X)).item()
    while True:
        await asyncio.sleep(every)
        answer = await http_get(port, f"/predict?x={PROBE_X}")
        bar.print(
            f"  client: GET /predict?x={PROBE_X} -> y = {answer['y']:+.4f} "
            f"(truth {expected:+.4f}) at step {answer['step']}"
        )


# --------------------------------------------------------------------------- the trainer (rank 0)


async def train(world_size: int, args: argparse.Namespace) -> int:
    ps = world_size - 1  # with --world-size 1 the trainer holds the model itself
    model = RemoteModule(ps, make_net, (args.seed,))
    optimizer = DistributedOptimizer(torch.optim.Adam, await model.remote_parameters(), lr=args.lr)
    service = Service(model)
    server = await asyncio.start_server(service.handle_request, "127.0.0.1", args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"serving on http://127.0.0.1:{port}  (GET /predict?x=0.5)", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    x_test = torch.linspace(-3, 3, 201).unsqueeze(1)
    bar = Progress(args.steps, "training ")
    client = asyncio.create_task(probe(port, bar, args.probe_every)) if args.probe_every else None
    losses: list[float] = []
    started = time.perf_counter()
    try:
        for step in range(1, args.steps + 1):
            x = 6 * torch.rand(args.batch_size, 1, generator=gen) - 3
            async with dist_autograd.context() as context_id:
                loss = F.mse_loss(await model(x), truth(x))
                await dist_autograd.backward(context_id, [loss])
                await optimizer.step(context_id)
            service.step, service.loss = step, loss.item()
            losses.append(service.loss)
            bar.update(step, f"loss {service.loss:.4f}")
            if step % args.log_every == 0 or step == args.steps:
                bar.print(
                    f"step {step:5d}/{args.steps}  loss {service.loss:.5f}  "
                    f"requests served {service.requests}  ({time.perf_counter() - started:.1f} s)"
                )
        seconds = time.perf_counter() - started
        if client is not None:
            client.cancel()
        test_loss = F.mse_loss(await model(x_test), truth(x_test)).item()
        if args.linger:
            print(f"training done; still serving for {args.linger:g} s", flush=True)
            await asyncio.sleep(args.linger)
    finally:
        await service.close(server)

    reached = test_loss <= args.target
    print(
        f"{'reached' if reached else 'MISSED'} the target: test MSE {test_loss:.5f} "
        f"(target {args.target:g}, first batch {losses[0]:.4f}) after {args.steps} steps, "
        f"{seconds:.1f} s, answering {service.requests} requests meanwhile"
    )
    if args.plot:
        save_plot(args.plot, {"MSE loss": {"train": losses}}, "step")
    result = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "test_loss": test_loss,
        "target": args.target,
        "requests": service.requests,
        "port": port,
        "steps": args.steps,
        "seconds": round(seconds, 3),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if reached else 1


async def run_worker(rank: int, world_size: int, init_method: str, args: argparse.Namespace) -> int:
    """Everything one process does: rank 0 trains and serves, rank 1 holds the model."""
    if world_size not in (1, 2):
        raise SystemExit("--world-size 2 (trainer + ps) or 1 (the trainer holds the model)")
    torch.set_num_threads(1)
    name = ["trainer", "ps"][rank]
    options = rpc.RpcOptions(rpc_timeout=120)
    if rank == 0:
        async with rpc.worker(name, rank, world_size, init_method=init_method, options=options):
            return await train(world_size, args)
    # The ps only answers the trainer's requests. shutdown() keeps serving until
    # every worker has called it, that is until the trainer is done.
    async with rpc.worker(
        name, rank, world_size, init_method=init_method, options=options, shutdown_timeout=0
    ):
        pass
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--world-size", type=int, default=2, choices=(1, 2))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--target", type=float, default=0.01, help="test MSE to reach")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (0: any free one)")
    parser.add_argument(
        "--probe-every",
        type=float,
        default=0.5,
        help="seconds between the built-in client's requests (0: no client)",
    )
    parser.add_argument(
        "--linger", type=float, default=0.0, help="seconds to keep serving after training"
    )
    parser.add_argument("--log-every", type=int, default=200, help="steps between log lines")
    parser.add_argument("--plot", metavar="PATH", help="write the training curve to this PNG")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(launch(run_worker, parse_args()))
