"""Free TCP ports for servers started on this machine (tests, the demo, embedded Triton)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago.

    The kernel picks it (bind to port 0); another process may still take it
    before the caller binds, which is why EmbeddedTriton retries start-up with
    fresh ports. Two calls in a row may return the same port (the first socket
    is closed by then): for several ports that must differ, use `free_ports`.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different free ports: every socket stays bound until all are picked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
