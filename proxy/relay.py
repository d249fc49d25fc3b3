"""The asyncio shell of the gRPC relay: sockets in front of the protocol core (grpc_core.py).

Why not a gRPC server that calls Triton? Measured here, a grpc.aio pass-through spends ~3x
Triton's own CPU per request (../docs/benchmarks.md). Instead each client connection gets its
own upstream connection and every HTTP/2 frame is forwarded verbatim (grpc_core.py says what
it reads and what it answers itself). This module only moves bytes: each read goes to the
connection's `GrpcConnection` with the time, what it says to write is written, and a
`Violation` closes the pair. Request counts go through the connection's `Ledger` (ledger.py).

When Triton can't be reached, the connection is served by `local.py` (every call fails fast
with UNAVAILABLE); when Triton goes away mid-connection, the client connection is dropped, as
Triton's own would be, and the next one reconnects.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

import structlog

from tritonpilot.proxy.grpc_core import PREFACE, GrpcConnection, GrpcRules, Violation
from tritonpilot.proxy.ledger import Ledger
from tritonpilot.proxy.limits import ConnectionGuard, ConnectionLimits, Http2Limits, Observed
from tritonpilot.proxy.restrict import Door, Restriction
from tritonpilot.proxy.shedding import InflightCaps
from tritonpilot.proxy.sockets import Reachability, listen, set_keepalive
from tritonpilot.proxy.stats import ProxyStats
from tritonpilot.proxy.wire import GRPC_CANCELLED, GRPC_UNAVAILABLE

if TYPE_CHECKING:
    from tritonpilot.proxy.local import LocalResponder

__all__ = ["PREFACE", "Relay", "RelayOptions"]

log = structlog.get_logger(__name__)

# After an ENHANCE_YOUR_CALM GOAWAY, how long the client's bytes are read and dropped before
# its socket closes: closing with unread bytes would send a TCP reset that can overtake the GOAWAY.
_LINGER_S = 1.0
# How often shutdown looks whether the open calls have finished.
_DRAIN_POLL_S = 0.02


@dataclass(frozen=True)
class RelayOptions:
    upstream_host: str
    upstream_port: int
    allow_client_model_control: bool = False
    # None = no limit (the default): the relay never holds a whole message.
    max_message_bytes: int | None = None
    connect_timeout_s: float = 1.0
    tcp_keepalive_s: float | None = 60.0
    # Client connections: how many, preface deadline, idle, max age (limits.py).
    limits: ConnectionLimits = ConnectionLimits()
    # TLS on the client port (tls.ServerTls.listener) and to Triton; None = plaintext.
    server_ssl: ssl.SSLContext | None = None
    upstream_ssl: ssl.SSLContext | None = None
    # Triton's --grpc-restricted-protocol rules, enforced here (restrict.py); () = none.
    restricted_protocols: tuple[Restriction, ...] = ()
    # Per-model caps on requests in flight (shedding.py); None = no cap.
    max_inflight: InflightCaps | None = None
    # HTTP/2 abuse limits per client connection (limits.py): floods, header block size, streams.
    http2: Http2Limits = Http2Limits()


def _rules(options: RelayOptions) -> GrpcRules:
    return GrpcRules(allow_client_model_control=options.allow_client_model_control,
                     max_message_bytes=options.max_message_bytes,
                     door=Door(options.restricted_protocols) if options.restricted_protocols else None,
                     caps=options.max_inflight)


class Pair:
    """A client connection and its own upstream connection: sockets around a GrpcConnection."""

    __slots__ = ("relay", "conn", "client", "upstream", "early", "upstream_ready", "closed")

    def __init__(self, relay: Relay, client: asyncio.Transport) -> None:
        self.relay = relay
        self.conn = GrpcConnection(relay.rules, Ledger(relay.stats), time.monotonic(), relay.options.http2,
                                   relay.guard.refused_http2)
        self.client = client
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []   # client bytes that arrived before upstream connected
        self.upstream_ready = False
        self.closed = False

    def upstream_connected(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        self.upstream_ready = True
        early, self.early = self.early, []
        for chunk in early:
            self.from_client(chunk)

    def from_client(self, data: bytes) -> None:
        if not self.upstream_ready:
            self.early.append(data)
            return
        conn = self.conn
        violation = conn.client_data(data, time.monotonic())
        if conn.to_client or violation is not None:  # answers of our own: rare
            self._write()
        elif conn.to_upstream:
            self.upstream.writelines(conn.to_upstream)  # type: ignore[union-attr]  # ready: connected
            conn.to_upstream.clear()
        if violation is not None:
            self._violated(violation)

    def from_upstream(self, data: bytes) -> None:
        conn = self.conn
        violation = conn.upstream_data(data, time.monotonic())
        if conn.to_upstream or violation is not None:
            self._write()
        elif conn.to_client:
            self.client.writelines(conn.to_client)
            conn.to_client.clear()
        if violation is not None:
            self._violated(violation)

    def _write(self) -> None:
        conn = self.conn
        if conn.to_upstream:
            if self.upstream is not None and not self.closed:
                self.upstream.writelines(conn.to_upstream)
            conn.to_upstream.clear()
        if conn.to_client:
            if not self.closed:
                self.client.writelines(conn.to_client)
            conn.to_client.clear()

    def _violated(self, violation: Violation) -> None:
        if violation.flood is None:
            log.warning("relay.connection_error", direction=violation.direction, error=violation.error)
            self.close()
            return
        # A client over an abuse limit: counted, GOAWAY ENHANCE_YOUR_CALM (written above), closed.
        # Triton's side closes at once; the client's after _LINGER_S, its bytes read and dropped.
        self.relay.guard.refused_http2(violation.flood)
        log.warning("relay.http2_refused", reason=violation.flood.value, open_streams=violation.open_streams,
                    max_stream_id=violation.max_stream_id)
        client = self.client
        self.close(close_client=False)
        if client.can_write_eof():
            client.write_eof()
            asyncio.get_running_loop().call_later(_LINGER_S, client.close)
        else:
            client.close()

    # ---- life cycle --------------------------------------------------------------------

    def goaway(self) -> None:
        """Graceful shutdown: the client opens no new streams here; open ones finish."""
        if self.closed:
            return
        if not self.upstream_ready:
            # No server SETTINGS have reached the client yet, so a GOAWAY would be a protocol
            # error; nothing was forwarded either, so nothing is lost by closing.
            self.close()
            return
        self.conn.goaway()
        self._write()

    def close(self, code: int = GRPC_UNAVAILABLE, close_client: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self.conn.close(code, time.monotonic())
        if self.upstream is not None:
            self.upstream.close()
        if close_client:
            self.client.close()
        self.relay.pairs.discard(self)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pair: Pair | None = None
        self.local: LocalResponder | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.relay.guard.admit(self, time.monotonic()):
            transport.close()  # over --max-connections: closed unread (counted by the guard)
            return
        set_keepalive(transport, self.relay.options.tcp_keepalive_s)
        # A stream server's transport reads and writes; uvloop's don't subclass asyncio.Transport,
        # so there is nothing to check with isinstance.
        self.pair = Pair(self.relay, cast(asyncio.Transport, transport))
        self.relay.pairs.add(self.pair)
        self.relay.connect_upstream(self)

    def data_received(self, data: bytes) -> None:
        if self.local is not None:
            self.local.data_received(data)
        elif self.pair is not None:
            self.pair.from_client(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.guard.forget(self)
        if self.local is not None:
            self.local.connection_lost()
        if self.pair is not None:
            self.pair.close(code=GRPC_CANCELLED)  # the client went away: its calls are cancelled

    # ---- what the connection guard (limits.py) sees and does -------------------------

    def observe(self) -> Observed:
        pair = self.pair
        if pair is not None:
            if pair.upstream_ready:
                preface = pair.conn.preface_received
            else:
                preface = sum(map(len, pair.early)) >= len(PREFACE)
            return Observed(preface, pair.conn.max_client_stream, pair.conn.open_streams)
        local = self.local
        return Observed(local is None or local.received_bytes >= len(PREFACE), 0, 0)

    def goaway(self) -> None:
        if self.pair is not None:
            self.pair.goaway()
        else:  # the local responder sends its own GOAWAY after each answer
            self.transport.close()

    def close(self) -> None:
        if self.pair is not None:
            self.pair.close(code=GRPC_UNAVAILABLE)
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.pair and self.pair.upstream:
            self.pair.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.pair and self.pair.upstream:
            self.pair.upstream.resume_reading()


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    def data_received(self, data: bytes) -> None:
        self.pair.from_upstream(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.pair.closed:
            log.info("relay.upstream_lost", error=repr(exc) if exc else None,
                     open_streams=self.pair.conn.open_streams)
        self.pair.close(code=GRPC_UNAVAILABLE)

    def pause_writing(self) -> None:
        self.pair.client.pause_reading()

    def resume_writing(self) -> None:
        self.pair.client.resume_reading()


class Relay:
    """The listening side: accepts client connections and pairs each with Triton."""

    def __init__(self, options: RelayOptions, stats: ProxyStats) -> None:
        self.options = options
        self.stats = stats
        self.rules = _rules(options)
        self.pairs: set[Pair] = set()
        self.guard = ConnectionGuard(options.limits)
        self.reachability = Reachability("relay")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    # What a policy reload may change while connections stay open.
    LIVE_OPTIONS = frozenset({"allow_client_model_control", "max_message_bytes", "restricted_protocols",
                              "max_inflight"})

    def reconfigure(self, **changes: object) -> None:
        """Swap options the relay takes live (LIVE_OPTIONS). Every connection, open or new,
        applies them to the calls it starts from now on; calls already open keep their answer
        (a stream open at the change checks its later messages against the new size limit)."""
        unknown = set(changes) - self.LIVE_OPTIONS
        if unknown:
            raise ValueError(f"not live options: {', '.join(sorted(unknown))} (a restart takes them)")
        self.options = replace(self.options, **changes)  # type: ignore[arg-type]
        self.rules = _rules(self.options)
        for pair in self.pairs:
            pair.conn.reconfigure(self.rules)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """reuse_port: share the port with other processes' listeners (serve --workers)."""
        self._server, bound = await listen(lambda: _ClientProtocol(self), host, port, tls=self.options.server_ssl,
                                           handshake_timeout_s=self.options.limits.preface_timeout_s,
                                           reuse_port=reuse_port)
        self.guard.start()
        return bound

    def connect_upstream(self, client: _ClientProtocol) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: _ClientProtocol) -> None:
        from tritonpilot.proxy.local import LocalResponder  # only needed when Triton is down

        pair = client.pair
        assert pair is not None
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _UpstreamProtocol(pair), self.options.upstream_host,
                                       self.options.upstream_port, ssl=self.options.upstream_ssl),
                self.options.connect_timeout_s)
        except (TimeoutError, OSError) as exc:
            if pair.closed:
                return
            reason = f"tritonpilot: Triton at {self.options.upstream_host}:{self.options.upstream_port} " \
                     f"is unreachable ({exc.__class__.__name__}: {exc})"
            self.reachability.unreachable(reason, time.monotonic())
            self.pairs.discard(pair)
            client.pair = None
            client.local = LocalResponder(pair.client, reason, self.stats)
            for chunk in pair.early:
                client.local.data_received(chunk)
            return
        if pair.closed:  # the client left while we were connecting
            transport.close()
            return
        self.reachability.reachable(time.monotonic())
        set_keepalive(transport, self.options.tcp_keepalive_s)
        pair.upstream_connected(transport)

    async def _drained(self) -> None:
        while any(p.conn.open_streams for p in self.pairs):
            await asyncio.sleep(_DRAIN_POLL_S)

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, tell clients to go away, let open calls finish within grace_s."""
        if self._server is not None:
            self._server.close()
        self.guard.stop()  # shutdown's own GOAWAY and grace take over
        for pair in list(self.pairs):
            pair.goaway()
        try:
            await asyncio.wait_for(self._drained(), grace_s)
        except TimeoutError:
            log.warning("relay.shutdown_grace_expired",
                        open_streams=sum(p.conn.open_streams for p in self.pairs))
        for pair in list(self.pairs):
            pair.close(code=GRPC_UNAVAILABLE)
        for task in list(self._tasks):
            task.cancel()
