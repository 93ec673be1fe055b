"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: moto's server in a
subprocess, reached through a TCP proxy that a test can cut (open connections reset, new ones
refused) and restore, while the server keeps its data.

Nothing here talks to anything but 127.0.0.1: the credentials are dummies, the endpoint is
explicit, and the EC2 metadata service lookup is disabled.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """Forwards 127.0.0.1:``port`` to the server; :meth:`cut` drops every connection and refuses
    new ones until :meth:`restore`. ``cut_after(n)`` cuts once ``n`` more bytes went upstream."""

    def __init__(self, upstream: int) -> None:
        self.upstream = ("127.0.0.1", upstream)
        self.port = free_port()
        self.sent = self.received = 0
        self.down = False
        self._cut_at: int | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.cut_done = threading.Event()
        self._listen()

    def _listen(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(128)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream)
            except OSError:
                c.close()
                continue
            with self._lock:
                if self.down:
                    c.close()
                    u.close()
                    continue
                self._conns |= {c, u}
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    if up:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                    trip = up and self._cut_at is not None and self.sent >= self._cut_at
                if trip:
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self.cut_done.clear()
            self._cut_at = self.sent + nbytes

    def cut(self) -> None:
        """The server is gone: reset every open connection, refuse new ones."""
        with self._lock:
            self.down, self._cut_at = True, None
            conns, self._conns = list(self._conns), set()
        try:
            self._srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._srv.close()
        for s in conns:  # shutdown first: it wakes the pump blocked in recv (a close alone would not)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.cut_done.set()

    def restore(self) -> None:
        with self._lock:
            self.down = False
        self._listen()

    def close(self) -> None:
        if not self.down:
            self.cut()


class S3Server:
    """``python -m moto.server`` on a free 127.0.0.1 port, behind a :class:`Proxy`."""

    def __init__(self) -> None:
        self.server_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.server_port)],
            env={**os.environ, **ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.server_port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError("moto server did not start (is moto[server] installed?)") from None
                time.sleep(0.05)
        self.proxy = Proxy(self.server_port)
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"

    def fsspec_config(self) -> dict[str, Any]:
        """s3fs options: this endpoint, dummy keys, no botocore retries and short timeouts (errors come
        fast; s3fs's own retries are the class attribute ``S3FileSystem.retries``)."""
        return {
            "endpoint_url": self.endpoint,
            "key": ENV["AWS_ACCESS_KEY_ID"],
            "secret": ENV["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {
                "retries": {"max_attempts": 1, "mode": "standard"},
                "connect_timeout": 2,
                "read_timeout": 20,
            },
        }

    def close(self) -> None:
        self.proxy.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
