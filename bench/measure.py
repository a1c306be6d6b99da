"""Inputs and metric names shared by both sides, so they measure alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench import workloads
from bench.specs import size_label
from bench.stats import latency_summary_us


def echo_tensor(nbytes: int, seed: int = 0) -> torch.Tensor:
    """A contiguous float32 tensor of ``nbytes`` bytes with random values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(nbytes // 4, generator=gen, dtype=torch.float32)


def bit_exact(sent: torch.Tensor, got: object) -> bool:
    """True when ``got`` is a tensor with ``sent``'s dtype, shape and values."""
    return isinstance(got, torch.Tensor) and got.dtype == sent.dtype and torch.equal(got, sent)


def echo_metrics(nbytes: int, samples_ns: Sequence[int], equal: bool) -> dict[str, float | bool]:
    """Metrics of one echo size: GB/s from the median and best round trip.

    GB/s counts the bytes both ways: ``2 * nbytes / round trip``, GB = 1e9.
    """
    label = size_label(nbytes)
    lat = latency_summary_us(samples_ns)
    return {
        f"{label}_GBps": 2 * nbytes / (lat["p50_us"] * 1e3),
        f"{label}_GBps_best": 2 * nbytes / (lat["min_us"] * 1e3),
        f"{label}_rtt_p50_us": lat["p50_us"],
        f"{label}_rtt_max_us": lat["max_us"],
        f"{label}_iters": lat["n"],
        f"{label}_equal": equal,
    }


def throughput_metrics(inflight: int, calls: int, seconds: float) -> dict[str, float]:
    """Metrics of one throughput level."""
    return {
        f"inflight_{inflight}_calls_per_s": calls / seconds,
        f"inflight_{inflight}_calls": float(calls),
    }


def autograd_inputs(batch: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf tensors ``x`` (batch x dim) and ``w`` (dim x dim) that require grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen).requires_grad_()
    w = torch.randn(dim, dim, generator=gen).div_(dim**0.5).requires_grad_()
    return x, w


def grads_match(x: torch.Tensor, w: torch.Tensor, grads: dict[torch.Tensor, torch.Tensor]) -> bool:
    """Whether distributed gradients of ``tanh(x @ w).sum()`` equal local autograd's."""
    loss = workloads.linear_tanh(x, w).sum()
    gx, gw = torch.autograd.grad(loss, (x, w))
    return (
        x in grads
        and w in grads
        and torch.allclose(grads[x], gx, rtol=1e-5, atol=1e-6)
        and torch.allclose(grads[w], gw, rtol=1e-5, atol=1e-6)
    )
