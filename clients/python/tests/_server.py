"""Starting the real server binary (`actwatch serve`) for the end-to-end tests (test_client.py, test_access.py).

The binary is $ACTWATCH_BIN, default ../../target/debug/actwatch relative to clients/python (i.e. `cargo
build` in the repository root). :func:`require_binary` skips, saying why, when that binary does not
exist or has no `serve` subcommand yet; ACTWATCH_REQUIRE_SERVER=1 makes that a failure. A binary that
has `serve` but does not report SERVING on the gRPC health service is a failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NoReturn

import grpc
import pytest

HERE = Path(__file__).resolve().parent.parent  # clients/python
REPO = (HERE / "../..").resolve()
BIN = Path(os.environ.get("ACTWATCH_BIN", HERE / "../../target/debug/actwatch")).resolve()
SERVICE = "actwatch.v1.ActivationMonitor"
STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("ACTWATCH_REQUIRE_SERVER"):
        pytest.fail(reason + " (ACTWATCH_REQUIRE_SERVER is set)")
    pytest.skip(reason)


def require_binary() -> str:
    """Skips (or fails, see the module) unless $ACTWATCH_BIN exists and has `serve`; returns its help."""
    if not BIN.exists():
        skip_or_fail(f"actwatch binary not found at {BIN}: run `cargo build` or set ACTWATCH_BIN")
    try:
        help_ = subprocess.run([str(BIN), "serve", "--help"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        skip_or_fail(f"cannot run {BIN}: {e}")
    if help_.returncode != 0:
        skip_or_fail(
            f"{BIN} has no `serve` subcommand yet (the gRPC server is not built): "
            f"{(help_.stderr.decode(errors='replace').strip().splitlines() or [''])[0][:200]}"
        )
    return help_.stdout.decode(errors="replace")


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def wait_serving(
    address: str,
    proc: subprocess.Popen,
    log_path: Path,
    channel: Callable[[str], grpc.Channel] = grpc.insecure_channel,
) -> None:
    """Waits until the server reports SERVICE SERVING on grpc.health.v1.Health, asked on ``channel(address)``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer"
    with channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"actwatch serve exited with {proc.returncode} before serving:\n{tail(log_path)}")
            try:
                resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(0.2)
    raise RuntimeError(
        f"actwatch serve at {address} did not report {SERVICE!r} SERVING on grpc.health.v1.Health "
        f"within {STARTUP_TIMEOUT_S} s (last: {last}):\n{tail(log_path)}"
    )


@contextmanager
def running_server(
    root: Path,
    *,
    args: Sequence[str] = (),
    channel: Callable[[str], grpc.Channel] = grpc.insecure_channel,
) -> Iterator[str]:
    """Runs `actwatch serve` on a free loopback port with an empty data directory under ``root`` (and
    its log, ``root / "server.log"``), plus ``args``; yields its address once it is SERVING (asked over
    ``channel(address)``, e.g. a TLS channel), and stops it on exit."""
    data_dir = root / "data"
    data_dir.mkdir()
    log_path = root / "server.log"
    address = f"127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(BIN), "serve", *args, "--data-dir", str(data_dir), "--listen", address, "--metrics-listen", "off"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_serving(address, proc, log_path, channel)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
