"""Coverage-guided fuzzing of the frame reader and the message decoder.

Run it for as long as you like (atheris, from PyPI)::

    python fuzz/fuzz_decode.py -max_total_time=60 -rss_limit_mb=2048

Each input is split by its first byte into a chunk size and fed to a
:class:`~aiorpc_autograd.wire.FrameReader` (small limits) in chunks; every
frame that comes out is decoded, and every payload loaded in safe mode. Only
:class:`~aiorpc_autograd.errors.ProtocolError` may escape from reading and
decoding; any other exception is a finding. The test suite runs
:func:`check_input` over a bounded Hypothesis run and a short atheris run.
"""

from __future__ import annotations

import contextlib
import sys

from aiorpc_autograd import codec
from aiorpc_autograd.errors import ProtocolError
from aiorpc_autograd.wire import FrameReader, Limits

LIMITS = Limits(max_message_size=1 << 20, max_header_size=1 << 16, max_buffers=64)


def check_input(data: bytes) -> None:
    """Feed ``data`` through reading and decoding; raise on anything but
    ProtocolError."""
    if not data:
        return
    step = data[0] % 16 + 1
    reader = FrameReader(LIMITS, scratch_size=64, direct_threshold=32)
    body = data[1:]
    try:
        for i in range(0, len(body), step):
            for frame in reader.feed(body[i : i + step]):
                _, message = codec.decode(frame)
                payload = message.payload()
                if payload is not None and payload.kind is not codec.PayloadKind.PICKLE:
                    codec.load_payload(payload, allow_pickle=False)
    except ProtocolError:
        pass


def seeds() -> list[bytes]:
    """Valid frames of several kinds, as a starting corpus."""
    import torch

    from aiorpc_autograd.wire import encode_frame

    out = []
    messages = [
        codec.PythonCall("f", codec.dump_payload(([1, torch.ones(3)], {}), allow_pickle=False)),
        codec.ExceptionMsg("w", "ValueError", "m", "tb"),
        codec.CleanupAutogradContextReq(7),
        codec.ForwardAutogradReq(
            1, 2, 3, {}, codec.PythonCall("g", codec.dump_payload(([], {}), allow_pickle=False))
        ),
        codec.PropagateGradientsReq(1, 2, codec.tensor_payload([torch.ones(2), None]), False, 0, 5),
    ]
    for m in messages:
        header, buffers = codec.encode(m, 9)
        out.append(b"\x07" + b"".join(bytes(c) for c in encode_frame(header, buffers)))
    return out


def main() -> None:
    import atheris

    # Instrument only our own code: torch is big and not the target.
    for module in (codec, sys.modules["aiorpc_autograd.wire"]):
        for name, obj in list(vars(module).items()):
            if callable(obj) and getattr(obj, "__module__", None) == module.__name__:
                # Classes and builtins cannot be instrumented: left as they are.
                with contextlib.suppress(Exception):
                    setattr(module, name, atheris.instrument_func(obj))
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
