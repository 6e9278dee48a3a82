"""Starts the real streamserve release binary once per test session, on a free loopback port.

The server is started exactly as an operator would start it (`streamserve serve ...`), with
JSON logs on stdout. The fixture waits for the "streamserve listening" log line, takes the
bound addresses from its "addr" (HTTP) and "grpc_addr" (gRPC) fields, keeps draining the server's output in a background thread
(so a full pipe can never stall the server), and stops the process when the session ends.
"""

import collections
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("TEST_SERVER_BIN", REPO_ROOT / "target" / "release" / "streamserve"))
STARTUP_TIMEOUT_S = 60.0
LISTENING_MESSAGE = "streamserve listening"
# The server's admin token (from the environment, as a deployment gives it): the model
# repository's load and unload take it.
ADMIN_TOKEN = "python-clients-admin-token"


class _ServerOutput:
    """Collects every line the server prints and hands them, in order, to whoever waits."""

    def __init__(self, stream):
        self.lines = collections.deque(maxlen=5000)
        self._queue = queue.Queue()
        self._waiting = True
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
            if self._waiting:
                self._queue.put(line)
        self._queue.put(None)  # EOF: the process closed its output (most likely it exited)

    def next_line(self, timeout):
        return self._queue.get(timeout=timeout)

    def started(self):
        """Nobody reads lines one by one any more: keep only the bounded history."""
        self._waiting = False

    def text(self, last=200):
        with self._lock:
            return "\n".join(list(self.lines)[-last:])


def _listening_addrs(line):
    """(HTTP address, gRPC address) from the "streamserve listening" line, else None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("message") != LISTENING_MESSAGE:
        return None
    # With --log-format json the tracing fields sit at the top level; accept the nested
    # "fields" layout too so a formatter change produces a clear failure, not a hang.
    fields = record.get("fields") or {}
    addr = record.get("addr") or fields.get("addr")
    grpc_addr = record.get("grpc_addr") or fields.get("grpc_addr")
    if not addr or not grpc_addr:
        raise AssertionError(f"'{LISTENING_MESSAGE}' log line lacks addr or grpc_addr: {line}")
    return addr, grpc_addr


@pytest.fixture(scope="session")
def _server():
    """(HTTP, gRPC) "127.0.0.1:PORT" of a running streamserve serving the bundled models."""
    if not BINARY.is_file():
        pytest.fail(
            f"streamserve binary not found at {BINARY}; build it first with "
            "`cargo build --release --bin streamserve` (or set TEST_SERVER_BIN)",
            pytrace=False,
        )
    command = [
        str(BINARY), "serve",
        "--host", "127.0.0.1",
        "--port", "0",
        "--models", "models",
        "--log-format", "json",
    ]
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "STREAMSERVE_ADMIN_TOKEN": ADMIN_TOKEN},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = _ServerOutput(proc.stdout)
    try:
        addr = None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while addr is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"streamserve did not log '{LISTENING_MESSAGE}' within {STARTUP_TIMEOUT_S:.0f} s.\n"
                    f"command: {' '.join(command)}\noutput:\n{output.text()}",
                    pytrace=False,
                )
            try:
                line = output.next_line(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                proc.wait(timeout=5)
                pytest.fail(
                    f"streamserve exited with status {proc.returncode} before listening.\n"
                    f"command: {' '.join(command)}\noutput:\n{output.text()}",
                    pytrace=False,
                )
            addr = _listening_addrs(line)
        output.started()
        yield addr
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="session")
def server_addr(_server):
    """The HTTP "127.0.0.1:PORT" of the server."""
    return _server[0]


@pytest.fixture(scope="session")
def server_grpc_addr(_server):
    """The gRPC "127.0.0.1:PORT" of the same server (a free port, as `--port 0` gives)."""
    return _server[1]


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def admin_token(_server):
    """The running server's admin token."""
    return ADMIN_TOKEN
