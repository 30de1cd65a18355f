"""A real `cbir serve` in a subprocess on 127.0.0.1, and a plain HTTP client for it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180  # the first start in a session converts the model for OpenVINO


class Server:
    """`cbir serve DB --port 0` until `stop()`; `url` is what it printed when ready."""

    def __init__(self, db: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "bin" / "cbir"), "serve", str(db), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        )  # fmt: skip
        self.ready_line = self._wait_ready()
        self.url = self.ready_line.rsplit(" at ", 1)[1]
        split = urlsplit(self.url)
        self.host, self.port = split.hostname, split.port
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("serving "):
                return line.strip()
            if not line and self.process.poll() is not None:
                break
        self.process.kill()
        raise AssertionError(f"cbir serve did not start: {line!r} {self.process.stderr.read()}")

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request, the path sent exactly as given (no normalisation)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True,
                            skip_host="Host" in (headers or {}))  # fmt: skip
            for key, value in (headers or {}).items():
                conn.putheader(key, value)
            if body is not None and "Transfer-Encoding" not in (headers or {}):
                conn.putheader("Content-Length", str(len(body)))
            # The server may answer (e.g. 413) before reading it all: then read the answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.endheaders(body)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, Any]:
        status, _, body = self.request("GET", path)
        return status, json.loads(body)

    def upload(
        self, path: str, data: bytes, name: str = "query.jpg", **fields: str
    ) -> tuple[int, Any]:
        body, content_type = multipart(data, name, fields)
        status, _, reply = self.request("POST", path, body, {"Content-Type": content_type})
        return status, json.loads(reply)


def multipart(data: bytes, name: str, fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body with the file as field 'image': (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]  # fmt: skip
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                 f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                 + data + b"\r\n")  # fmt: skip
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
