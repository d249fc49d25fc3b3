"""The HTTP/REST relay for Triton's HTTP port: the asyncio shell around http_core.py.

Each client connection gets its own upstream connection to Triton's HTTP port; bytes are
relayed unchanged (http_core.HttpExchanges finds where messages start and end, answers
what the proxy answers itself, and counts through the connection's ledger, ledger.py, as
the gRPC relay does). This shell only does I/O: sockets, time, logs, and the rules it
hands the core (`HttpRules`, swapped live on every open connection by `reconfigure`).
Backpressure: a side that can't write pauses reading on the other.

The front door, as on the gRPC port:
- TLS on the client side (tls.ServerTls with ALPN http/1.1); Triton's HTTP port is plaintext;
- connection limits (limits.ConnectionGuard): max connections (closed unread), the first
  request's head within the preface timeout, idle timeout, max age. The graceful close
  ("GOAWAY") of HTTP/1.1: requests open then finish, later ones get 503 with
  `Connection: close`, and the connection closes once nothing is owed;
- a cap on a request head's size (431 and close);
- Triton's restricted APIs (`--http-restricted-api GROUPS:KEY=VALUE`): a request of a
  restricted group without the header `KEY: VALUE` gets what Triton answers,
  403 `{"error":"This API is restricted, expecting header 'KEY'"}` (server
  src/http_server.cc, RespondIfRestricted, Triton 2.51);
- client model control (POST /v2/repository[/<repo>]/models/<m>/load|unload) gets 403
  unless allowed;
- per-model caps on requests in flight (shedding.py): 429, the HTTP status gRPC's
  RESOURCE_EXHAUSTED (what the gRPC relay answers) maps to. Triton's own "too busy"
  (a full queue) is UNAVAILABLE, HTTP 503: 429 keeps the proxy's shedding apart from
  Triton's in the metrics, and tells clients to retry later;
- a Content-Length past --max-message-bytes gets 413 (chunked bodies are not measured).

Triton unreachable: every request on that connection is answered 503 at once with
`Connection: close`, so the client's next connection tries Triton again.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import structlog

from tritonpilot.proxy.http_core import HttpDoor, HttpExchanges, HttpRules
from tritonpilot.proxy.ledger import Ledger
from tritonpilot.proxy.limits import ConnectionGuard, ConnectionLimits, Observed
from tritonpilot.proxy.restrict import Restriction
from tritonpilot.proxy.shedding import InflightCaps
from tritonpilot.proxy.sockets import Reachability, listen, set_keepalive
from tritonpilot.proxy.stats import HTTP, ProxyStats

log = structlog.get_logger(__name__)

# Client bytes held while the upstream connection is being made; past this, reading pauses.
_EARLY_LIMIT_BYTES = 1 << 20


@dataclass(frozen=True)
class HttpRelayOptions:
    upstream_host: str
    upstream_port: int
    allow_client_model_control: bool = False
    # None = no limit: a Content-Length past it is answered 413.
    max_message_bytes: int | None = None
    connect_timeout_s: float = 1.0
    tcp_keepalive_s: float | None = 60.0
    limits: ConnectionLimits = ConnectionLimits()
    # A request's head (request line + headers) past this many bytes: 431 and close.
    max_head_bytes: int = 64 * 1024
    server_ssl: ssl.SSLContext | None = None
    # Triton's --http-restricted-api rules, enforced here; () = none.
    restricted_apis: tuple[Restriction, ...] = ()
    max_inflight: InflightCaps | None = None


def _rules(options: HttpRelayOptions) -> HttpRules:
    return HttpRules(allow_client_model_control=options.allow_client_model_control,
                     max_message_bytes=options.max_message_bytes,
                     door=HttpDoor(options.restricted_apis) if options.restricted_apis else None,
                     caps=options.max_inflight)


class _Pair:
    """A client connection, its upstream connection and their core."""

    def __init__(self, relay: HttpRelay, client: asyncio.Transport) -> None:
        self.relay = relay
        self.client = client
        self.upstream: asyncio.Transport | None = None
        self.core = HttpExchanges(Ledger(relay.stats, HTTP), relay.rules, relay.options.max_head_bytes)
        self.early: list[bytes] = []
        self.early_bytes = 0
        self.connected = False
        self.held_paused = False
        self.closed = False
        self.done = asyncio.get_running_loop().create_future()

    # ---- bytes --------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if not self.connected:
            self.early.append(data)
            self.early_bytes += len(data)
            if self.early_bytes > _EARLY_LIMIT_BYTES:
                self.client.pause_reading()
            return
        self._step(lambda now: self.core.client_data(data, now))

    def from_upstream(self, data: bytes) -> None:
        self._step(lambda now: self.core.upstream_data(data, now))

    def upstream_connected(self, transport: asyncio.Transport | None, unreachable: str | None = None) -> None:
        self.upstream = transport
        if unreachable is not None:
            self.core.upstream_unreachable(unreachable)
        self.connected = True
        early, self.early = self.early, []
        if self.early_bytes > _EARLY_LIMIT_BYTES:
            self.client.resume_reading()
        self.early_bytes = 0
        for chunk in early:
            self.from_client(chunk)

    def _step(self, action: Callable[[float], None]) -> None:
        if self.closed:
            return
        try:
            action(time.monotonic())
        except Exception as exc:  # a bug must cost one connection, never the relay
            log.error("http_relay.connection_error", error=repr(exc))
            self.core.client_closed(time.monotonic())
        self.flush()

    def flush(self) -> None:
        core = self.core
        up = core.take_upstream()
        if up and self.upstream is not None and not self.upstream.is_closing():
            self.upstream.writelines(up)
        out = core.take_client()
        if out and not self.client.is_closing():
            self.client.writelines(out)
        # Pipelined requests wait in the core until Triton answers the one before: bounded.
        if not self.held_paused and core.held_bytes > _EARLY_LIMIT_BYTES:
            self.held_paused = True
            self.client.pause_reading()
        elif self.held_paused and core.held_bytes <= _EARLY_LIMIT_BYTES:
            self.held_paused = False
            self.client.resume_reading()
        if core.abort_reason is not None:
            log.info("http_relay.connection_closed", reason=core.abort_reason)
            core.abort_reason = None
        if core.close_client or core.close_upstream:
            self.close()

    # ---- life cycle ---------------------------------------------------------------------

    def client_lost(self) -> None:
        if not self.closed:
            self.core.client_closed(time.monotonic())
            self.close()

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            if self.core.open_requests:
                log.info("http_relay.upstream_lost", error=repr(exc) if exc else None,
                         open_requests=self.core.open_requests)
            self.core.upstream_closed(time.monotonic())
            self.flush()
            self.close()

    def goaway(self) -> None:
        self.core.goaway()
        self.flush()

    def close(self) -> None:
        if self.closed:
            return
        if not self.core.closed:
            self.core.client_closed(time.monotonic())  # whatever is still open ends as 499 (ledger.lost)
        self.closed = True
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.relay.pairs.discard(self)
        if not self.done.done():
            self.done.set_result(None)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, relay: HttpRelay) -> None:
        self.relay = relay
        self.pair: _Pair | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.relay.guard.admit(self, time.monotonic()):
            transport.close()  # over --max-connections: closed unread (counted by the guard)
            return
        set_keepalive(transport, self.relay.options.tcp_keepalive_s)
        self.pair = _Pair(self.relay, cast(asyncio.Transport, transport))
        self.relay.pairs.add(self.pair)
        self.relay.connect_upstream(self.pair)

    def data_received(self, data: bytes) -> None:
        if self.pair is not None:
            self.pair.from_client(data)

    def eof_received(self) -> bool | None:
        # A client that half-closes after its requests still gets their responses; one that
        # stops in the middle of a request is gone.
        pair = self.pair
        if pair is None or pair.core.mid_request or not (pair.core.open_requests or pair.core.held_bytes):
            return None  # the transport closes
        pair.core.goaway()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.guard.forget(self)
        if self.pair is not None:
            self.pair.client_lost()

    # ---- what the connection guard (limits.py) sees and does -------------------------

    def observe(self) -> Observed:
        pair = self.pair
        if pair is None:
            return Observed(True, 0, 0)
        core = pair.core
        # The "preface" of an HTTP/1.1 connection: its first request head.
        busy = core.open_requests + (core.mid_request or core.held_bytes > 0)
        return Observed(core.requests_seen > 0, core.requests_seen, busy)

    def goaway(self) -> None:
        if self.pair is not None:
            self.pair.goaway()
        else:
            self.transport.close()

    def close(self) -> None:
        if self.pair is not None:
            self.pair.close()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.pair is not None and self.pair.upstream is not None:
            self.pair.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.pair is not None and self.pair.upstream is not None:
            self.pair.upstream.resume_reading()


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def data_received(self, data: bytes) -> None:
        self.pair.from_upstream(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.pair.client.pause_reading()

    def resume_writing(self) -> None:
        self.pair.client.resume_reading()


class HttpRelay:
    """The HTTP listening side: accepts client connections and pairs each with Triton's HTTP port."""

    # What a policy reload may change while connections stay open.
    LIVE_OPTIONS = frozenset({"allow_client_model_control", "max_message_bytes", "restricted_apis", "max_inflight"})

    def __init__(self, options: HttpRelayOptions, stats: ProxyStats) -> None:
        self.stats = stats
        self.pairs: set[_Pair] = set()
        self.guard = ConnectionGuard(options.limits)
        self.reachability = Reachability("http_relay")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._apply(options)

    def _apply(self, options: HttpRelayOptions) -> None:
        self.options = options
        self.rules = _rules(options)
        for pair in self.pairs:
            pair.core.reconfigure(self.rules)

    def reconfigure(self, **changes: object) -> None:
        """Swap options the relay takes live (LIVE_OPTIONS); requests from now on see them,
        on every connection, open or new."""
        unknown = set(changes) - self.LIVE_OPTIONS
        if unknown:
            raise ValueError(f"not live options: {', '.join(sorted(unknown))} (a restart takes them)")
        self._apply(replace(self.options, **changes))  # type: ignore[arg-type]

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """reuse_port: share the port with other processes' listeners (serve --workers)."""
        self._server, bound = await listen(lambda: _ClientProtocol(self), host, port, tls=self.options.server_ssl,
                                           handshake_timeout_s=self.options.limits.preface_timeout_s,
                                           reuse_port=reuse_port)
        self.guard.start()
        return bound

    def connect_upstream(self, pair: _Pair) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(pair))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, pair: _Pair) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _UpstreamProtocol(pair), opts.upstream_host, opts.upstream_port),
                opts.connect_timeout_s)
        except (TimeoutError, OSError) as exc:
            if pair.closed:
                return
            reason = (f"tritonpilot: Triton at {opts.upstream_host}:{opts.upstream_port} is unreachable "
                      f"({exc.__class__.__name__}: {exc})")
            self.reachability.unreachable(reason, time.monotonic())
            pair.upstream_connected(None, unreachable=reason)
            return
        if pair.closed:
            transport.close()
            return
        self.reachability.reachable(time.monotonic())
        set_keepalive(transport, opts.tcp_keepalive_s)
        pair.upstream_connected(transport)

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting; open requests finish within grace_s, later ones get 503; then close."""
        if self._server is not None:
            self._server.close()
        self.guard.stop()
        for pair in list(self.pairs):
            pair.goaway()
        pending = [pair.done for pair in list(self.pairs)]
        if pending:
            try:
                await asyncio.wait_for(asyncio.gather(*pending), grace_s)
            except TimeoutError:
                log.warning("http_relay.shutdown_grace_expired",
                            open_requests=sum(p.core.open_requests for p in self.pairs))
        for pair in list(self.pairs):
            pair.close()
        for task in list(self._tasks):
            task.cancel()
