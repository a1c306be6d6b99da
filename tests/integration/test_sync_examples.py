"""The torch-style ports in ``examples/sync/`` on the synchronous facade: each
runs as its own process tree with small settings and must train.

Each port is torch code whose imports select the implementation
(``EXAMPLE_RPC=torch`` runs it on ``torch.distributed.rpc`` unchanged), so
these tests show that torch RPC code ports by changing imports only: the
parameter server (``rpc.remote`` + the ``_call_method`` helper whose
``local_value`` waits for a value being created, ``DistributedOptimizer``),
the model-parallel RNN (RRefs to remote modules, Adam over three owners) and
the pipeline (RRef proxies, ``torch.futures.wait_all``,
``@rpc.functions.async_execution`` returning a chained torch future), whose
loss curve must equal the single-process run's.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.integration.test_examples import EXAMPLES, result_of, run

SYNC = EXAMPLES / "sync"


def run_port(script: str, *args: str, timeout: float = 150) -> dict[str, Any]:
    return result_of(run([sys.executable, str(SYNC / script), *args], timeout))


@pytest.mark.timeout(180)
def test_sync_parameter_server_trains() -> None:
    result = run_port(
        "parameter_server.py",
        *("--world-size", "2", "--epochs", "1", "--train-size", "2000", "--target", "0.5"),
    )
    (trainer,) = result["trainers"]
    assert trainer["accuracy"] >= 0.5  # chance is 1/8
    assert trainer["loss_last"] < 0.6 * trainer["loss_first"]


@pytest.mark.timeout(180)
def test_sync_rnn_model_parallel_loss_falls() -> None:
    result = run_port("rnn_model_parallel.py", "--steps", "60", "--target", "2.0")
    assert result["loss_first"] > 2.0  # about ln(16): guessing
    assert result["loss_last"] < 0.7 * result["loss_first"]


@pytest.mark.timeout(180)
def test_sync_pipeline_matches_the_single_process_run() -> None:
    result = run_port("pipeline_parallel.py", "--steps", "12", "--target", "0.95")
    assert result["steps"] == 12
    assert result["max_difference"] <= 1e-4
    assert result["loss_last"] < 0.95 * result["loss_first"]
