"""Free loopback ports for servers a test or benchmark starts (S3, Serve, Ray nodes)."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports free right now (all held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = HOST) -> int:
    return free_ports(1, host)[0]
