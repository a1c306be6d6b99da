"""Bounded fuzzing of the frame reader and decoder: only ProtocolError may
come out (see fuzz/fuzz_decode.py for the open-ended harness)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))
import fuzz_decode  # noqa: E402

SEEDS = fuzz_decode.seeds()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    fuzz_decode.check_input(data)


@settings(max_examples=400, deadline=None)
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 4096),
)
def test_mutated_valid_frames_only_raise_protocol_error(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed[: max(cut, 1)])
    for pos, value in flips:
        data[pos % len(data)] = value
    fuzz_decode.check_input(bytes(data))


def test_seeds_decode() -> None:
    for seed in SEEDS:
        fuzz_decode.check_input(seed)


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_short_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(seed)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / "fuzz_decode.py"),
            str(corpus),
            "-runs=30000",
            "-max_total_time=20",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr
