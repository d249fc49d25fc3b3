"""Free TCP ports for servers started on this machine (tests, the demo, embedded Triton)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago.

    The kernel picks it (bind to port 0), so two callers never get the same
    port at once; another process may still take it before the caller binds,
    which is why EmbeddedTriton retries start-up with fresh ports.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
