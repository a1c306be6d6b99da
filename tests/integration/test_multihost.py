"""Two hosts simulated by network namespaces this test creates.

Each namespace gets one end of a veth pair and a private address that exists
only inside it (10.231.7.1 and 10.231.7.2); a worker process runs in each
(``ip netns exec``). They train over TCP with an auth token (the result must
equal the same steps run locally, bit for bit), then the test cuts the link
(the veth end goes down: no FIN, no RST) while a call is in flight, and the
caller must get ``ConnectionLostError`` within the heartbeat bound. Skipped
with the reason when namespaces cannot be created here (not root, no ``ip``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._multihost_worker import HEARTBEAT

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["10.231.7.1", "10.231.7.2"]
NS = [f"aiorpc-h{i}-{os.getpid()}" for i in range(2)]
DEV = [f"arv{i}{os.getpid() % 10000}" for i in range(2)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[None]:
    try:
        for ns in NS:
            _ip("netns", "add", ns)
        _ip("link", "add", DEV[0], "type", "veth", "peer", "name", DEV[1])
        for i in range(2):
            _ip("link", "set", DEV[i], "netns", NS[i])
            _ip("-n", NS[i], "addr", "add", f"{HOSTS[i]}/30", "dev", DEV[i])
            _ip("-n", NS[i], "link", "set", DEV[i], "up")
            _ip("-n", NS[i], "link", "set", "lo", "up")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        for ns in NS:
            with contextlib.suppress(Exception):
                _ip("netns", "del", ns)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield
    finally:
        for ns in NS:
            with contextlib.suppress(Exception):
                _ip("netns", "del", ns)


def _lines(proc: subprocess.Popen[str], until: str, timeout: float) -> dict[str, object]:
    """Read ``TAG json`` lines of ``proc`` until ``until``; the values by tag."""
    seen: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    buf = ""
    while until not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {until} line in time; got {seen}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        line = proc.stdout.readline()
        assert line, f"the worker exited before {until}: {seen}"
        buf += line
        tag, _, rest = line.strip().partition(" ")
        if tag in ("READY", "TRAINED", "CALLING", "CUT"):
            seen[tag] = json.loads(rest) if rest else None
    return seen


@pytest.mark.timeout(150)
def test_training_across_two_hosts_then_a_cut_link_is_detected(hosts: None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                NS[rank],
                sys.executable,
                "-m",
                "tests.integration._multihost_worker",
                str(rank),
                str(port),
                ",".join(HOSTS),
                "multihost-token",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        trained = _lines(procs[0], "CALLING", 90)
        result = trained["TRAINED"]
        assert isinstance(result, dict)
        assert result["identical"], result  # bit-identical to the same steps run locally
        assert result["peers"] == [HOSTS[1]], result  # over the veth, from the other host
        _ip("-n", NS[0], "link", "set", DEV[0], "down")  # the cable is pulled
        cut = _lines(procs[0], "CUT", 30)["CUT"]
        assert isinstance(cut, dict)
        assert cut["lost"], cut
        # Detected by heartbeats within heartbeat_timeout of the last frame
        # received (a probe after at most the interval), plus scheduling slack.
        bound = HEARTBEAT["heartbeat_timeout"] + HEARTBEAT["heartbeat_interval"]
        assert cut["after_s"] < bound + 1.5, cut
        assert procs[0].wait(timeout=20) == 0
        print(f"\nlink cut detected after {cut['after_s']:.2f}s: {cut['outcome'][:120]}")
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
