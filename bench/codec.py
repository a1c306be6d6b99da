"""Codec microbenchmarks (benchmark 6 of issue 6), for regressions.

Encodes and decodes a Python call ``(torch.add, args, {})`` carrying 0, 1 or
16 small tensors: ours (codec + frame, then frame reader + decode + load) and
torch's internal RPC pickler (``serialize`` / ``deserialize``), same process,
alternating. Reports the median microseconds per round trip and the ratio.

    python -m bench.codec [--repeat 5] [--number 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit
from collections.abc import Callable

import torch
from torch.distributed.rpc.internal import _internal_rpc_pickler

from aiorpc_autograd import codec
from aiorpc_autograd.wire import FrameReader, encode_frame


def ours(call: tuple[object, ...]) -> Callable[[], object]:
    reader = FrameReader()

    def run() -> object:
        header, buffers = codec.encode(codec.PythonCall(None, codec.dump_payload(call)), 1)
        data = b"".join(bytes(c) for c in encode_frame(header, buffers))
        (frame,) = reader.feed(data)
        _, message = codec.decode(frame)
        payload = message.payload()
        assert payload is not None
        return codec.load_payload(payload)

    return run


def torchs(call: tuple[object, ...]) -> Callable[[], object]:
    def run() -> object:
        binary, tensors = _internal_rpc_pickler.serialize(call)
        return _internal_rpc_pickler.deserialize(binary, tensors)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--number", type=int, default=2000)
    a = ap.parse_args()
    out = {}
    for n in (0, 1, 16):
        call = (torch.add, tuple(torch.randn(64) for _ in range(n)), {})
        times: dict[str, list[float]] = {"ours": [], "torch": []}
        for _ in range(a.repeat):  # alternate
            for name, make in (("ours", ours), ("torch", torchs)):
                t = timeit.timeit(make(call), number=a.number)
                times[name].append(t / a.number * 1e6)
        row = {k: statistics.median(v) for k, v in times.items()}
        row["ratio_ours_torch"] = row["ours"] / row["torch"]
        out[f"{n}_tensors_us"] = row
        print(f"{n:2d} tensors: ours {row['ours']:.1f} us, torch {row['torch']:.1f} us", flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
