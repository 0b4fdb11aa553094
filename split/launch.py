"""Start fedsplit processes on loopback: free ports, the command line, the
environment, and a server process that is waited for until it answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .security import ClientKeys
from .transport import Connection, ServerUnavailable
from .wire import Message

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedsplit_command(*args: str) -> list[str]:
    """The command line that runs ``fedsplit ARGS`` with this interpreter."""
    return [sys.executable, "-m", "split.cli", *args]


def child_env() -> dict:
    """This environment, with this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_server(model, cut: str, endpoint: str, *server_args: str, output=subprocess.PIPE) -> subprocess.Popen:
    """Start ``fedsplit server`` bound to ``endpoint``."""
    args = ["server", "--cut", cut, "--bind", endpoint, *server_args]
    if model is not None:
        args += ["--model", str(model)]
    return subprocess.Popen(fedsplit_command(*args), stdout=output, stderr=subprocess.STDOUT, text=True,
                            env=child_env())


def wait_ready(endpoint: str, proc: subprocess.Popen, timeout: float = 120.0, keys: ClientKeys | None = None) -> None:
    """Block until the server at ``endpoint`` answers a status request (an
    encrypted server: from a client holding ``keys``)."""
    deadline = time.monotonic() + timeout
    conn = Connection(endpoint, "probe", timeout=1.0, keys=keys)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise RuntimeError(f"the server exited with code {proc.returncode}:\n{out[-3000:]}")
            try:
                conn.request(Message("status"))
                return
            except ServerUnavailable:
                continue
        raise TimeoutError(f"the server at {endpoint} was not ready after {timeout:.0f}s")
    finally:
        conn.close()


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server process (kill it if it does not exit in 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_server(model, cut: str = "1,1", *server_args: str, probe_keys: ClientKeys | None = None):
    """A ready ``fedsplit server`` process on a free loopback port; yields its
    endpoint. An encrypted server (``--secret-key`` in ``server_args``) is
    probed with ``probe_keys``, a client key pair it admits."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(model, cut, endpoint, *server_args)
    try:
        wait_ready(endpoint, proc, keys=probe_keys)
        yield endpoint
    finally:
        stop(proc)
