"""Socket plumbing the gRPC and HTTP relay shells share: the listener, TCP keepalive, and
the log of Triton's reachability."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


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


class Reachability:
    """Logs when Triton stops and starts taking the relay's connections, not once per
    connection: while Triton is down every client connection fails to connect upstream, and
    a warning each flooded the log (15,000 in a 15-minute soak). A warning when it goes
    down, a reminder with the count every `remind_s` while it stays down, an info line with
    the count and the outage's length when a connection gets through again."""

    def __init__(self, relay: str, remind_s: float = 30.0) -> None:
        self.relay = relay  # the event prefix: "relay" (gRPC), "http_relay"
        self.remind_s = remind_s
        self.down_since_s: float | None = None
        self.refused = 0  # connections answered locally since the outage began
        self._reminded_s = 0.0

    def unreachable(self, reason: str, now_s: float) -> None:
        self.refused += 1
        if self.down_since_s is None:
            self.down_since_s = self._reminded_s = now_s
            log.warning(f"{self.relay}.upstream_unreachable", reason=reason)
        elif now_s - self._reminded_s >= self.remind_s:
            self._reminded_s = now_s
            log.warning(f"{self.relay}.upstream_still_unreachable", reason=reason, connections_refused=self.refused,
                        down_s=round(now_s - self.down_since_s, 1))

    def reachable(self, now_s: float) -> None:
        if self.down_since_s is None:
            return
        log.info(f"{self.relay}.upstream_reachable", connections_refused=self.refused,
                 down_s=round(now_s - self.down_since_s, 1))
        self.down_since_s = None
        self.refused = 0
