"""Socket plumbing the gRPC and HTTP relay shells share: the listener and TCP keepalive."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable


async def listen(protocol_factory: Callable[[], asyncio.Protocol], host: str, port: int, *,
                 tls: ssl.SSLContext | None, handshake_timeout_s: float | None,
                 reuse_port: bool = False) -> tuple[asyncio.Server, int]:
    """A listening server and the port it got (port 0: the kernel picks). reuse_port: share the
    port with other processes' listeners (serve --workers). A client that never finishes the
    TLS handshake gets handshake_timeout_s (the preface's deadline; 60 s without one)."""
    server = await asyncio.get_running_loop().create_server(
        protocol_factory, host, port, reuse_address=True, reuse_port=reuse_port or None, ssl=tls,
        ssl_handshake_timeout=(handshake_timeout_s or 60.0) if tls else None)
    return server, server.sockets[0].getsockname()[1]


def set_keepalive(transport: asyncio.BaseTransport, keepalive_s: float | None) -> None:
    """TCP keepalive on a connection, so that a peer that vanished is noticed."""
    sock = transport.get_extra_info("socket")
    if sock is None or keepalive_s is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(keepalive_s)))
    except OSError:
        pass
