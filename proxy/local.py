"""Serving a client connection when Triton cannot be reached.

With no upstream to relay to, the proxy speaks HTTP/2 itself (the h2 library):
every call fails at once with UNAVAILABLE and says why, grpc.health.v1 still
answers SERVING for the proxy, and after answering, a GOAWAY tells the client
to open a fresh connection for its next call, which tries Triton again. So
clients fail fast while Triton is down and recover by themselves when it's back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import structlog

from proxy.relay import GRPC_UNAVAILABLE, GRPC_UNIMPLEMENTED, HEALTH_CHECK, grpc_status_headers

log = structlog.get_logger(__name__)

# Close a connection the client keeps open after our GOAWAY.
_LINGER_S = 5.0


class LocalResponder:
    def __init__(self, transport: asyncio.Transport, reason: str,
                 on_close: Callable[[object], None] | None = None) -> None:
        self.transport = transport
        self.reason = reason
        self._on_close = on_close
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False))
        self.conn.initiate_connection()
        self._flush()
        self._closer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("local.protocol_error", error=repr(exc))
            self._flush()
            self.transport.close()
            return
        answered = False
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._answer(event.stream_id, dict(event.headers).get(b":path", b""))
                answered = True
            elif isinstance(event, h2.events.DataReceived):
                # Keep the client's window open; the bytes themselves are dropped.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
        if answered and self._closer is None:
            self.conn.close_connection()
            self._closer = asyncio.get_running_loop().call_later(_LINGER_S, self.transport.close)
        self._flush()

    def _answer(self, stream_id: int, path: bytes) -> None:
        try:
            if path == HEALTH_CHECK:
                self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                self.conn.send_data(stream_id, b"\x00\x00\x00\x00\x02\x08\x01")  # SERVING
                self.conn.send_headers(stream_id, grpc_status_headers(0, ""), end_stream=True)
                return
            code = GRPC_UNIMPLEMENTED if path.startswith(b"/grpc.health.v1.") else GRPC_UNAVAILABLE
            message = "tritonpilot: use grpc.health.v1.Health/Check" if code == GRPC_UNIMPLEMENTED else self.reason
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                               *grpc_status_headers(code, message)], end_stream=True)
        except h2.exceptions.H2Error as exc:  # e.g. the client already reset the stream
            log.debug("local.answer_failed", stream_id=stream_id, error=repr(exc))

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self) -> None:
        if self._closer is not None:
            self._closer.cancel()
        if self._on_close is not None:
            self._on_close(self)
