"""Smoke tests of the scripts in ``examples/``: each runs as its own process
tree with tiny settings, exactly as a user would start it, and must train.

Every example prints a last line ``RESULT {json}``; the tests assert on it
(the loss fell by a stated factor, an accuracy or reward above a threshold),
on the exit status (an example exits non-zero when it missed its target), and
for the pipeline example on its parity with the single-process run. One
example runs under ``torchrun`` (env:// rendezvous), the HTTP example is
queried while it trains.

Each example runs in a session of its own, so a timeout kills its spawned
workers too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# Variables that would make an example think it runs under torchrun.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _started(command: list[str], stdout: Any = subprocess.PIPE) -> Iterator[subprocess.Popen[str]]:
    """The command running in a session of its own, output to ``stdout``; on
    exit the whole session (the example and any worker left) is killed."""
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        _kill_tree(proc)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def run(command: list[str], timeout: float) -> str:
    """Run to completion (killed at ``timeout``); its output, asserting exit status 0."""
    with _started(command) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            output, _ = proc.communicate()
            pytest.fail(f"{command} still running after {timeout}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{output[-4000:]}"
    return output


def run_example(script: str, *args: str, timeout: float = 75) -> dict[str, Any]:
    """``python examples/<script> <args>``; its ``RESULT`` line, decoded."""
    return result_of(run([sys.executable, str(EXAMPLES / script), *args], timeout))


def result_of(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in the output:\n{output[-4000:]}"
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- one test per example


@pytest.mark.timeout(90)
def test_parameter_server_trains_a_classifier() -> None:
    result = run_example(
        "parameter_server.py", "--epochs", "2", "--train-size", "4000", "--target", "0.6"
    )
    assert result["trainers"] == 2
    assert result["accuracy"] >= 0.6  # chance is 1/8
    assert result["loss_last"] < 0.7 * result["loss_first"]


@pytest.mark.timeout(90)
def test_rnn_model_parallel_loss_falls() -> None:
    result = run_example("rnn_model_parallel.py", "--steps", "150", "--target", "0.5")
    assert result["loss_first"] > 2.0  # about ln(16): guessing
    assert result["loss_last"] < 0.5
    assert result["loss_last"] < result["loss_first"] / 5


@pytest.mark.timeout(90)
def test_pipeline_matches_the_single_process_run(tmp_path: Path) -> None:
    trace_path = tmp_path / "step.json"
    result = run_example(
        "pipeline_parallel.py",
        *("--steps", "15", "--batch-size", "128", "--micro-batch", "32", "--width", "256"),
        *("--lr", "0.1", "--seed", "3", "--target", "0.8", "--tolerance", "1e-5"),
        *("--trace", str(trace_path)),
    )
    # --trace: the last step's merged timeline, one process row per worker.
    trace = json.loads(trace_path.read_text())
    rows = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    assert rows == {"driver", "stage1", "stage2"}
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert "rpc_async#__main__.run_last_stage(driver -> stage2)" in names
    assert {"backward pass", "engine job"} <= names
    assert any(e["ph"] == "f" for e in trace["traceEvents"])
    assert result["steps"] == 15
    # The same seed gives the same model and batches: the same curve, up to rounding.
    assert result["loss_first"] == pytest.approx(result["local_loss_first"], abs=1e-6)
    assert result["max_difference"] <= 1e-5
    assert result["loss_last"] < 0.8 * result["loss_first"]
    assert result["pipeline_seconds"] > 0 and result["local_seconds"] > 0


@pytest.mark.timeout(90)
def test_rl_running_reward_rises(tmp_path: Path) -> None:
    plot = tmp_path / "rl.png"
    result = run_example(
        "rl_agent_observer.py", "--episodes", "80", "--target", "50", "--plot", str(plot)
    )
    assert result["solved"] is True
    assert result["running_reward"] >= 50
    assert result["running_reward"] > 2 * result["reward_first"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # the example printed how to install it instead
    assert plot.stat().st_size > 0


def _truth(x: float) -> float:
    return math.sin(2 * x) + 0.3 * x


@pytest.mark.timeout(90)
def test_serve_while_training_answers_from_live_parameters(tmp_path: Path) -> None:
    steps = 600
    command = [
        sys.executable,
        str(EXAMPLES / "serve_while_training.py"),
        *("--steps", str(steps), "--probe-every", "0", "--linger", "1", "--log-every", "100"),
    ]
    log = tmp_path / "output.txt"
    deadline = time.monotonic() + 75
    answers: list[dict[str, Any]] = []
    with log.open("w") as out, _started(command, stdout=out) as proc:
        # Wait for the server to come up.
        port = None
        while port is None:
            assert time.monotonic() < deadline, "no server after 75 s:\n" + log.read_text()
            assert proc.poll() is None, "exited before serving:\n" + log.read_text()
            for line in log.read_text().splitlines():
                if line.startswith("serving on http://127.0.0.1:"):
                    port = int(line.split()[2].rsplit(":", 1)[1])
            time.sleep(0.05)

        # Ask while it trains, and a little after (--linger 1), until it stops serving.
        url = f"http://127.0.0.1:{port}/predict?x=1.0"
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    assert response.status == 200
                    answers.append(json.loads(response.read()))
            except (urllib.error.URLError, ConnectionError):
                break  # the server has closed: training is over
            time.sleep(0.05)
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    result = result_of(text)

    during = [a for a in answers if a["step"] < steps]
    assert len(during) >= 3, f"only {len(during)} answers during training: {answers}"
    assert len({a["step"] for a in during}) >= 2
    assert len({a["y"] for a in during}) >= 2, f"the answers did not change: {answers}"
    assert all(a["x"] == 1.0 for a in answers)
    final = max(answers, key=lambda a: a["step"])
    assert abs(final["y"] - _truth(1.0)) < 0.3, answers
    assert result["requests"] >= len(answers)
    assert result["test_loss"] <= result["target"]


@pytest.mark.timeout(90)
def test_parameter_server_under_torchrun() -> None:
    """``torchrun --nproc-per-node 2 examples/parameter_server.py``: one ps, one trainer,
    each started by torchrun and meeting through env://."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run"),  # the `torchrun` command
        *("--nnodes", "1", "--nproc-per-node", "2"),
        *("--master-addr", "127.0.0.1", "--master-port", str(free_port())),
        str(EXAMPLES / "parameter_server.py"),
        *("--epochs", "2", "--train-size", "4000", "--target", "0.6"),
    ]
    result = result_of(run(command, timeout=75))
    assert result["trainers"] == 1  # the world size came from torchrun, not --world-size
    assert result["accuracy"] >= 0.6
    assert result["loss_last"] < 0.7 * result["loss_first"]


@pytest.mark.timeout(120)
def test_elastic_parameter_server_survives_a_killed_trainer_and_a_join() -> None:
    """The ps and trainers 1 and 2; trainer1 is SIGKILLed mid-run, trainer3 joins."""
    result = run_example(
        "elastic_parameter_server.py",
        *("--steps", "300", "--trainer-steps", "150", "--kill-after", "40"),
        *("--train-size", "4000", "--target", "0.6"),
        timeout=100,
    )
    events = [(e["kind"], e["worker"], e["reason"]) for e in result["events"]]
    assert ("leave", "trainer1", "lost") in events, events
    assert ("join", "trainer3", "joined") in events, events
    assert events.index(("leave", "trainer1", "lost")) < events.index(
        ("join", "trainer3", "joined")
    )
    assert result["steps"] >= 300 and result["by_trainer"].get("trainer3", 0) > 0, result
    assert result["accuracy"] >= 0.6  # chance is 1/8


@pytest.mark.timeout(180)
def test_elastic_restart_under_torchrun_rejoins_the_running_group() -> None:
    """The ps on its own; one trainer under ``torchrun --nnodes=1:2 --max-restarts=2``
    crashes after 30 steps, torchrun restarts it, and it rejoins under its old
    name: the ps (and its parameters) carried on."""
    port = free_port()
    common = ("--port", str(port), "--steps", "200", "--train-size", "4000", "--target", "0.6")
    script = str(EXAMPLES / "elastic_parameter_server.py")
    with _started([sys.executable, script, "--role", "ps", *common]) as ps:
        time.sleep(2.0)  # the ps hosts the store
        command = [
            *(sys.executable, "-m", "torch.distributed.run"),
            *("--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "2"),
            *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"),
            *("--rdzv-conf", "last_call_timeout=1"),
            *("--monitor-interval", "0.2"),
            script,
            *("--role", "trainer", *common),
        ]
        env = _env()
        env["ELASTIC_CRASH_AFTER"] = "30"
        # In a session of its own, so its workers are killed with it whatever happens.
        trainers = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            log, _ = trainers.communicate(timeout=150)
        finally:
            _kill_tree(trainers)
            trainers.wait()
        assert trainers.returncode == 0, log[-4000:]
        output, _ = ps.communicate(timeout=60)
    assert ps.returncode == 0, output[-4000:]
    result = result_of(output)
    events = [(e["kind"], e["worker"]) for e in result["events"]]
    # trainer1 joined, was lost (or replaced by its restart), and joined again.
    assert events[0] == ("join", "trainer1"), events
    assert events.count(("join", "trainer1")) == 2, events
    assert ("leave", "trainer1") in events[1:3], events
    assert result["accuracy"] >= 0.6
