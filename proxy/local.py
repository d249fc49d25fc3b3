"""Serving a client connection when Triton cannot be reached.

With no upstream to relay to, the proxy speaks HTTP/2 itself (the h2 library):
every call fails at once with UNAVAILABLE and says why, grpc.health.v1 still
answers SERVING for the proxy, and after answering, a GOAWAY tells the client
to open a fresh connection for its next call, which tries Triton again. So
clients fail fast while Triton is down and recover by themselves when it's back.

Stream calls (ModelStreamInfer) get their answer after a short hold, `STREAM_ANSWER_HOLD_S`.
Python's grpc.aio client races a stream call's status against the completion of its own
first message write: when the status comes back at once, the write's failure can win and
the call ends with INTERNAL "Internal error from Core" instead of our UNAVAILABLE, which a
client does not retry. Measured with Triton down and 4 grpc.aio stream clients on 2 cores:
2-3% of stream calls ended INTERNAL when answered at once, 5 of 9,741 with a 5 ms hold,
0 of 3,435 with 20 ms. Triton itself is never answered this way while it is down (its port
refuses the connection), so this is ours to avoid. Unary calls are not affected.
"""

from __future__ import annotations

import asyncio
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import structlog

from tritonpilot.proxy import wire
from tritonpilot.proxy.stats import UNKNOWN_MODEL, ProxyStats
from tritonpilot.proxy.wire import (
    GRPC_UNAVAILABLE,
    GRPC_UNIMPLEMENTED,
    HEALTH_CHECK,
    MODEL_INFER,
    MODEL_STREAM_INFER,
    grpc_status_headers,
)

log = structlog.get_logger(__name__)

# Close a connection the client keeps open after our GOAWAY.
_LINGER_S = 5.0

# How long a stream call's refusal is held back (see the module docstring).
STREAM_ANSWER_HOLD_S = 0.02


class LocalResponder:
    def __init__(self, transport: asyncio.Transport, reason: str, stats: ProxyStats | None = None) -> None:
        self.transport = transport
        self.reason = reason
        self.stats = stats
        # Inference calls wait for their first message bytes, so that the refusal is counted
        # under the model it was for (the bytes normally arrive with the headers): path, bytes.
        self._waiting: dict[int, tuple[bytes, bytes]] = {}
        # Stream calls refused and counted, whose answer is held (STREAM_ANSWER_HOLD_S).
        self._held: dict[int, asyncio.TimerHandle] = {}
        self.received_bytes = 0  # the connection guard's "has it sent the preface yet"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False))
        self.conn.initiate_connection()
        self._flush()
        self._closer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        if self._closer is not None:
            # After our GOAWAY, h2 would take any frame for a protocol error. What still comes
            # is the tail of calls already answered, and streams the client opened before it
            # saw the GOAWAY (above its last stream id, so the client retries them itself):
            # read and dropped, rather than closing the socket under a client still writing.
            return
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
                path = dict(event.headers).get(b":path", b"")
                if path in (MODEL_INFER, MODEL_STREAM_INFER) and self.stats is not None:
                    self._waiting[event.stream_id] = (path, b"")
                else:
                    self._answer(event.stream_id, path)
                    answered = True
            elif isinstance(event, h2.events.DataReceived):
                # Keep the client's window open; the bytes themselves are dropped.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                waiting = self._waiting.get(event.stream_id)
                if waiting is not None:
                    path, head = waiting[0], waiting[1] + event.data
                    if len(head) >= 5 + min(wire.HEAD_BYTES, int.from_bytes(head[1:5], "big")):
                        answered |= self._refuse_inference(event.stream_id, path, head)
                    else:
                        self._waiting[event.stream_id] = (path, head)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                waiting = self._waiting.get(event.stream_id)
                if waiting is not None:
                    answered |= self._refuse_inference(event.stream_id, *waiting)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
        if answered:
            self._goaway_when_done()
        self._flush()

    def _goaway_when_done(self) -> None:
        """Once nothing is left to answer: GOAWAY, so the next call opens a fresh connection
        (which tries Triton again); the socket closes after _LINGER_S if the client keeps it."""
        if self._closer is None and not self._waiting and not self._held:
            self.conn.close_connection()
            self._closer = asyncio.get_running_loop().call_later(_LINGER_S, self.transport.close)

    def _refuse_inference(self, stream_id: int, path: bytes, head: bytes) -> bool:
        """Count the refusal under its model; answer now (True), or hold a stream call's answer."""
        del self._waiting[stream_id]
        assert self.stats is not None  # inference calls wait for their bytes only when there are stats
        model = None
        if len(head) >= 5 and head[0] == 0:  # uncompressed: compressed ones count as unknown
            model, _ = wire.request_model_and_id(head[5:5 + wire.HEAD_BYTES])
        now = time.monotonic()
        stats = self.stats.model(model or UNKNOWN_MODEL, now)
        stats.begin(now)
        stats.end(now, GRPC_UNAVAILABLE, 0.0)
        if path == MODEL_STREAM_INFER:
            self._held[stream_id] = asyncio.get_running_loop().call_later(
                STREAM_ANSWER_HOLD_S, self._answer_held, stream_id)
            return False
        self._answer(stream_id, path)
        return True

    def _answer_held(self, stream_id: int) -> None:
        del self._held[stream_id]
        if self.transport.is_closing():
            return
        self._answer(stream_id, MODEL_STREAM_INFER)
        self._goaway_when_done()
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
        for timer in self._held.values():
            timer.cancel()
        self._held.clear()
