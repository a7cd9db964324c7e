"""A real `mlflow server` on loopback for the tests: started, stopped and started again on the
same store and port (a server that blinks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.ports import free_port


class MlflowServer:
    """`mlflow server` with its own sqlite store under `root` (and artifact directory, unless
    `extra_args` name one)."""

    def __init__(self, root: Path, port: int | None = None, extra_args: tuple[str, ...] = (),
                 env: dict | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.extra_args, self.env = extra_args, env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        """Start it and wait until /health answers."""
        artifacts = () if "--artifacts-destination" in self.extra_args else (
            "--artifacts-destination", str(self.root / "artifacts"))
        with open(self.root / "server.log", "a") as log:
            # its own session: uvicorn and the job runners it starts are stopped with it
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}", *artifacts,
                 *self.extra_args],
                cwd=self.root, stdout=log, stderr=log, start_new_session=True,
                env=self.env if self.env is not None else os.environ.copy())
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mlflow server did not start:\n"
                                   + (self.root / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        return self

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and its workers (the whole process group), and wait until the port no
        longer answers."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None
        while self.answers():
            time.sleep(0.1)
