"""A redis-server of one test: its own folder and port, optionally a password, an append-only
file (so a restart keeps queued messages) and a non-loopback address (for other network
namespaces). Restartable on the same port. The machine's shared Redis is never touched."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

# How long a starting redis-server may take to answer PING, seconds.
START_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class OwnRedis:
    def __init__(
        self, folder: Path, *, host: str = "127.0.0.1", password: str | None = None, appendonly: bool = False
    ) -> None:
        self.folder, self.host, self.password, self.appendonly = folder, host, password, appendonly
        self.port = free_port(host)
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password)

    def start(self) -> OwnRedis:
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.folder),
            "--save",
            "",
        ]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=(self.folder / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        client = self.client()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError(f"redis-server on {self.host}:{self.port} did not start")
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
