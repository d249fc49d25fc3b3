"""An HTTP/2-aware byte relay for Triton's gRPC port.

Why not a gRPC server that calls Triton? Measured here, a grpc.aio
pass-through spends ~3x Triton's own CPU per request (../docs/benchmarks.md).
Instead each client connection gets its own upstream connection and every
HTTP/2 frame is forwarded verbatim, so HPACK state, flow control, deadlines
(grpc-timeout), cancels (RST_STREAM), metadata, trailers and compression pass
through untouched. The relay only reads:

- request and response header blocks, with an HPACK decoder per direction kept
  in step with the connection (it must see every block), for the method path
  and the grpc-status;
- the first bytes of inference request messages (the model name) and of
  ModelStreamInfer responses (`triton_final_response`);
- stream ends, to count requests in flight.

Answers the proxy gives itself (refused model control, grpc.health.v1) are
written as literal, non-indexed header fields, so the client's HPACK table is
untouched; the client's header block still goes upstream, followed by a
RST_STREAM, so Triton's table stays in step too.

When Triton can't be reached, the connection is served by `local.py` (every
call fails fast with UNAVAILABLE); when Triton goes away mid-connection, the
client connection is dropped, as Triton's own would be, and the next one
reconnects.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

import hpack
import structlog

from tritonpilot.proxy import wire
from tritonpilot.proxy.limits import (
    ConnectionGuard,
    ConnectionLimits,
    FrameRate,
    Http2Limits,
    Http2Refusal,
    Observed,
)
from tritonpilot.proxy.restrict import Door, Restriction
from tritonpilot.proxy.shedding import InflightCaps, refusal_message
from tritonpilot.proxy.stats import UNKNOWN_MODEL, ModelStats, ProxyStats
from tritonpilot.proxy.wire import (
    GRPC_CANCELLED,
    GRPC_DEADLINE_EXCEEDED,
    GRPC_OK,
    GRPC_PERMISSION_DENIED,
    GRPC_RESOURCE_EXHAUSTED,
    GRPC_UNAVAILABLE,
    GRPC_UNIMPLEMENTED,
    GRPC_UNKNOWN,
    HEALTH_CHECK,
    HEALTH_WATCH,
    MODEL_CONTROL,
    MODEL_INFER,
    MODEL_STREAM_INFER,
    grpc_status_headers,
)

if TYPE_CHECKING:
    from tritonpilot.proxy.local import LocalResponder

log = structlog.get_logger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x3
H2_NO_ERROR, H2_CANCEL, H2_REFUSED_STREAM, H2_ENHANCE_YOUR_CALM = 0x0, 0x8, 0x7, 0xB
# After an ENHANCE_YOUR_CALM GOAWAY, how long the client's bytes are read and dropped before
# its socket closes: closing with unread bytes would send a TCP reset that can overtake the GOAWAY.
_LINGER_S = 1.0

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# A client reset this close to its deadline counts as DEADLINE_EXCEEDED (see _cancel_code).
_DEADLINE_SLACK_S = 0.05
_DEADLINE_SLACK_RATIO = 0.01


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


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + stream_id.to_bytes(4, "big") + payload


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal_header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Header fields as 'literal without indexing, new name': touches no HPACK table."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value
    return bytes(out)


def trailers_only_response(stream_id: int, code: int, message: str) -> bytes:
    block = literal_header_block([(b":status", b"200"), (b"content-type", b"application/grpc"),
                                  *grpc_status_headers(code, message)])
    return frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block)


def grpc_timeout_s(value: bytes) -> float | None:
    try:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1:]]
    except (KeyError, ValueError):
        return None


# The first decoded header list of a block comes as (name, value) bytes tuples.
def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


@dataclass(slots=True)
class _Stream:
    """One HTTP/2 stream (one RPC) the relay is following."""
    stream_id: int
    path: bytes
    started_s: float
    deadline_s: float | None
    encoding: bytes | None
    request_scanner: wire.MessageScanner | None = None
    response_scanner: wire.MessageScanner | None = None
    # Unary ModelInfer: the model's stats once the request message named it.
    unary: ModelStats | None = None
    # ModelStreamInfer: per model, (request id, start time) of requests not yet finally answered.
    pending: dict[str, deque[tuple[str, float]]] = field(default_factory=dict)
    response_status: int | None = None
    # Triton may compress its messages whatever the client did: read from its headers.
    response_encoding: bytes | None = None


class _Direction:
    """Frame-boundary bookkeeping for one direction of a connection pair."""

    __slots__ = ("name", "buf", "data_left", "data_scanner", "in_header_block", "block", "feeding",
                 "block_stream", "block_end_stream", "pending", "transport", "decoder", "preface_left",
                 "max_block_bytes", "empty_frames")

    def __init__(self, name: str, preface_left: int) -> None:
        self.name = name
        self.buf = b""
        self.data_left = 0          # payload bytes still to pass of an unpadded DATA frame
        self.data_scanner: wire.MessageScanner | None = None
        self.in_header_block = False
        self.block = b""
        self.block_stream = 0
        self.block_end_stream = False
        self.pending: list[bytes] = []  # frames to inject at the next frame boundary
        self.transport: asyncio.Transport | None = None
        self.decoder = hpack.Decoder()
        # Don't be stricter than the endpoints: they enforce their own limits.
        self.decoder.max_header_list_size = 1 << 30
        self.preface_left = preface_left
        self.feeding = False  # inside _relay_frames: frames already read are not written yet
        # Client side only (Pair sets them): one header block's bytes, and frames that carry nothing.
        self.max_block_bytes = 1 << 30
        self.empty_frames: FrameRate | None = None

    @property
    def at_boundary(self) -> bool:
        return self.data_left == 0 and not self.in_header_block


class ProtocolViolation(Exception):
    """Bytes that are not HTTP/2 as the relay must understand it; the pair is closed."""


class _Flood(Exception):
    """A client over an HTTP/2 abuse limit: GOAWAY ENHANCE_YOUR_CALM, and the pair is closed."""

    def __init__(self, reason: Http2Refusal) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Pair:
    """A client connection and its own upstream connection."""

    def __init__(self, relay: Relay, client: asyncio.Transport) -> None:
        self.relay = relay
        self.stats = relay.stats
        self.opts = relay.options
        self.door = relay.door  # None unless protocols are restricted
        self.caps = relay.caps  # None unless a cap is set
        self.c2u = _Direction("client->triton", len(PREFACE))
        self.u2c = _Direction("triton->client", 0)
        self.u2c.transport = client
        self.client = client
        self.streams: dict[int, _Stream] = {}
        # Streams the proxy answered itself: upstream frames for them are dropped.
        self.local_streams: OrderedDict[int, None] = OrderedDict()
        self.max_client_stream = 0
        self.goaway_sent = False
        self.injected_data_credit = 0  # bytes of our own DATA the client will acknowledge
        self.early: list[bytes] = []   # client bytes that arrived before upstream connected
        self.upstream_ready = False
        self.closed = False
        self.drained = asyncio.Event()
        self.drained.set()
        # HTTP/2 abuse limits: integer counts per frame, the clock read only past a limit.
        h2 = self.opts.http2
        now = time.monotonic()
        self.resets = FrameRate(h2.limit(h2.max_resets_per_s), now)
        self.settings = FrameRate(h2.limit(h2.max_settings_per_s), now)
        self.pings = FrameRate(h2.limit(h2.max_pings_per_s), now)
        if h2.max_empty_frames_per_s is not None:
            self.c2u.empty_frames = FrameRate(h2.max_empty_frames_per_s, now)
        self.c2u.max_block_bytes = h2.limit(h2.max_header_block_bytes)
        self.max_streams = h2.limit(h2.max_concurrent_streams)

    # ---- wiring -------------------------------------------------------------------------

    def upstream_connected(self, transport: asyncio.Transport) -> None:
        self.c2u.transport = transport
        self.upstream_ready = True
        early, self.early = self.early, []
        for chunk in early:
            self.from_client(chunk)

    def from_client(self, data: bytes) -> None:
        if not self.upstream_ready:
            self.early.append(data)
            return
        self._feed(self.c2u, data, self._client_frame)

    def from_upstream(self, data: bytes) -> None:
        self._feed(self.u2c, data, self._upstream_frame)

    def _feed(self, d: _Direction, data: bytes, on_frame: Callable[[int, int, int, bytes], bool | bytes]) -> None:
        if self.closed:
            return
        d.feeding = True
        try:
            self._relay_frames(d, data, on_frame)
        except _Flood as flood:
            d.feeding = False
            self._enhance_your_calm(flood.reason)
        except Exception as exc:  # garbage from a peer must never take the proxy down
            log.warning("relay.connection_error", direction=d.name, error=repr(exc))
            self.close()
        finally:
            d.feeding = False

    # ---- the frame loop -----------------------------------------------------------------

    def _relay_frames(self, d: _Direction, data: bytes,
                      on_frame: Callable[[int, int, int, bytes], bool | bytes]) -> None:
        """Forward `data` frame by frame. Unpadded DATA payloads pass as they arrive; any
        other frame is handed to `on_frame` once whole, which says whether to forward it
        (True), drop it (False) or put the frame it returns (bytes) in its place."""
        if d.buf:
            data = d.buf + data
            d.buf = b""
        view = memoryview(data)
        out: list[memoryview | bytes] = []
        start = pos = 0
        n = len(data)
        if d.preface_left:
            take = min(d.preface_left, n)
            expected = PREFACE[len(PREFACE) - d.preface_left:][:take]
            if data[:take] != expected:
                raise ProtocolViolation("not an HTTP/2 connection preface")
            d.preface_left -= take
            pos = take
        while pos < n:
            if d.data_left:
                take = min(d.data_left, n - pos)
                if d.data_scanner is not None:
                    d.data_scanner.feed(view[pos:pos + take])
                pos += take
                d.data_left -= take
                if d.data_left == 0 and d.pending:
                    out.append(view[start:pos])
                    out.extend(d.pending)
                    d.pending.clear()
                    start = pos
                continue
            if n - pos < 9:
                break
            length = int.from_bytes(data[pos:pos + 3], "big")
            ftype, flags = data[pos + 3], data[pos + 4]
            stream_id = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if ftype == DATA and not flags & PADDED:
                if not length and not flags & END_STREAM and d.empty_frames is not None:
                    _count(d.empty_frames, Http2Refusal.EMPTY_FRAMES)
                # Stream it: forward what has arrived, scan it if this stream is scanned.
                self._data_frame(d, stream_id, flags)
                d.data_left = length
                pos += 9
                if length == 0 and d.pending:
                    out.append(view[start:pos])
                    out.extend(d.pending)
                    d.pending.clear()
                    start = pos
                continue
            if length + len(d.block) > d.max_block_bytes and (ftype == HEADERS or ftype == CONTINUATION):
                raise _Flood(Http2Refusal.HEADER_BLOCK)  # before buffering the frame
            if n - pos < 9 + length:
                break
            payload = data[pos + 9:pos + 9 + length]
            keep = on_frame(ftype, flags, stream_id, payload)
            end = pos + 9 + length
            if keep is not True:
                out.append(view[start:pos])
                if keep:  # a replacement frame
                    out.append(keep)
                start = end
            pos = end
            if d.pending and d.at_boundary:
                out.append(view[start:pos])
                out.extend(d.pending)
                d.pending.clear()
                start = pos
        out.append(view[start:pos])
        if d.pending and d.at_boundary:
            out.extend(d.pending)
            d.pending.clear()
        d.buf = data[pos:]
        if d.transport is not None and not self.closed:
            d.transport.writelines(out)

    def inject(self, d: _Direction, payload: bytes) -> None:
        """Write frames of our own into direction d, between its frames."""
        if d.at_boundary and not d.feeding and d.transport is not None:
            d.transport.write(payload)
        else:
            d.pending.append(payload)

    # ---- client -> Triton ---------------------------------------------------------------

    def _client_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> bool | bytes:
        if ftype in (HEADERS, CONTINUATION):
            return self._header_fragment(self.c2u, ftype, flags, stream_id, payload, self._request_headers)
        if ftype == DATA:  # padded, or for a stream we answered: forwarded whole
            if stream_id in self.local_streams:
                return True  # Triton reset the stream but must count the bytes for flow control
            self._data_frame(self.c2u, stream_id, flags)
            body = _unpad(payload, flags)
            if self.c2u.data_scanner is not None:
                self.c2u.data_scanner.feed(body)
            return True
        if ftype == RST_STREAM:
            _count(self.resets, Http2Refusal.RAPID_RESET)
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._finish(stream, self._cancel_code(stream), time.monotonic())
            return True
        if ftype == SETTINGS and not flags & ACK:
            _count(self.settings, Http2Refusal.SETTINGS_FLOOD)
            # The client's table size bounds what Triton's encoder may use on responses.
            size = _settings_value(payload, SETTINGS_HEADER_TABLE_SIZE)
            if size is not None:
                self.u2c.decoder.max_allowed_table_size = size
            return True
        if ftype == WINDOW_UPDATE and stream_id == 0 and self.injected_data_credit:
            return self._reclaim_credit(payload)
        if ftype == PING and not flags & ACK:
            _count(self.pings, Http2Refusal.PING_FLOOD)
        return True

    def _reclaim_credit(self, payload: bytes) -> bool | bytes:
        """The client acknowledges DATA we wrote ourselves: Triton never sent those bytes, so
        that part of the window update must not reach it."""
        increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        owed = min(self.injected_data_credit, increment)
        self.injected_data_credit -= owed
        if owed == increment:
            return False
        return frame(WINDOW_UPDATE, 0, 0, (increment - owed).to_bytes(4, "big"))

    def _request_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if stream_id in self.streams or stream_id <= self.max_client_stream:
            return  # request trailers, or a stream we already handle: nothing to read
        self.max_client_stream = stream_id
        path = _header(headers, b":path") or b""
        now = time.monotonic()
        if self.goaway_sent:
            return self._answer_locally(stream_id, refuse=True)
        if len(self.streams) >= self.max_streams:  # REFUSED_STREAM: grpc clients retry it
            self.relay.guard.refused_http2(Http2Refusal.CONCURRENT_STREAMS)
            return self._answer_locally(stream_id, refuse=True)
        if self.door is not None:
            refusal = self.door.refusal(path, headers)
            if refusal is not None:  # Triton's own answer, before anything else is said
                return self._answer_locally(stream_id, GRPC_UNAVAILABLE, refusal)
        if path in MODEL_CONTROL and not self.opts.allow_client_model_control:
            return self._answer_locally(stream_id, GRPC_PERMISSION_DENIED,
                                        "tritonpilot: model control is reserved for the tritonpilot "
                                        "controller, which owns the model lifecycle; start the sidecar "
                                        "with --allow-client-model-control to let clients load and unload models")
        if path == HEALTH_CHECK:
            return self._answer_health(stream_id)
        if path == HEALTH_WATCH:
            return self._answer_locally(stream_id, GRPC_UNIMPLEMENTED,
                                        "tritonpilot: use grpc.health.v1.Health/Check")
        timeout = _header(headers, b"grpc-timeout")
        timeout_s = grpc_timeout_s(timeout) if timeout else None
        stream = _Stream(stream_id, path, now, now + timeout_s if timeout_s is not None else None,
                         _header(headers, b"grpc-encoding"))
        if path == MODEL_INFER:
            stream.request_scanner = wire.MessageScanner(lambda h, c, n: self._unary_request(stream, h, c, n))
        elif path == MODEL_STREAM_INFER:
            stream.request_scanner = wire.MessageScanner(lambda h, c, n: self._stream_request(stream, h, c, n))
            stream.response_scanner = wire.MessageScanner(lambda h, c, n: self._stream_response(stream, h, c))
        elif self.opts.max_message_bytes is not None:
            stream.request_scanner = wire.MessageScanner(lambda h, c, n: self._check_size(stream, n))
        self.streams[stream_id] = stream
        self.drained.clear()

    def _model_of(self, stream: _Stream, head: bytes, compressed: bool) -> str:
        return self._model_and_id(stream, head, compressed)[0]

    def _model_and_id(self, stream: _Stream, head: bytes, compressed: bool) -> tuple[str, str]:
        if compressed:
            head = wire.decompress_head(head, stream.encoding) or b""
        model, request_id = wire.request_model_and_id(head)
        return model or UNKNOWN_MODEL, request_id

    def _check_size(self, stream: _Stream, length: int) -> bool:
        """False (and the stream answered RESOURCE_EXHAUSTED) when a request message is over the
        limit. Requests already counted end with that code."""
        limit = self.opts.max_message_bytes
        if limit is None or length <= limit:
            return True
        if stream.stream_id in self.local_streams:
            return False  # refused already; the rest of the frame's bytes still pass the scanner
        self.inject(self.c2u, frame(RST_STREAM, 0, stream.stream_id, H2_CANCEL.to_bytes(4, "big")))
        self.streams.pop(stream.stream_id, None)
        self._finish(stream, GRPC_RESOURCE_EXHAUSTED, time.monotonic())
        self._mark_local(stream.stream_id)
        self.inject(self.u2c, trailers_only_response(
            stream.stream_id, GRPC_RESOURCE_EXHAUSTED,
            f"tritonpilot: received message larger than max ({length} vs. {limit})"))
        self.inject(self.u2c, frame(RST_STREAM, 0, stream.stream_id, H2_NO_ERROR.to_bytes(4, "big")))
        return False

    # A request is counted before its size is checked, so a refused one shows up under its
    # model with RESOURCE_EXHAUSTED rather than not at all.

    def _unary_request(self, stream: _Stream, head: bytes, compressed: bool, length: int) -> None:
        if stream.unary is not None:
            return
        model_stats = self.stats.model(self._model_of(stream, head, compressed), stream.started_s)
        stream.request_scanner = None  # one message per unary call: stop looking
        if self.caps is not None and self._shed(stream, model_stats):
            return
        stream.unary = model_stats
        stream.unary.begin(time.monotonic())
        self._check_size(stream, length)

    def _shed(self, stream: _Stream, model_stats: ModelStats) -> bool:
        """True (and the call answered RESOURCE_EXHAUSTED, reset upstream) when its model is at
        its cap. The reset follows the frame being relayed, before any later frame of the call."""
        assert self.caps is not None
        cap = self.caps.cap(model_stats.model)
        if cap is None or model_stats.inflight < cap:
            return False
        model_stats.refused(GRPC_RESOURCE_EXHAUSTED)
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            self.drained.set()
        self._answer_locally(stream.stream_id, GRPC_RESOURCE_EXHAUSTED, refusal_message(model_stats.model, cap))
        return True

    def _stream_request(self, stream: _Stream, head: bytes, compressed: bool, length: int) -> None:
        if stream.stream_id in self.local_streams:
            return
        now = time.monotonic()
        model, request_id = self._model_and_id(stream, head, compressed)
        self.stats.model(model, now).begin(now)
        stream.pending.setdefault(model, deque()).append((request_id, now))
        self._check_size(stream, length)

    # ---- Triton -> client ---------------------------------------------------------------

    def _upstream_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> bool | bytes:
        if ftype in (HEADERS, CONTINUATION):
            # Forwarded even for streams we answered ourselves: the client's HPACK table must see
            # every block Triton encodes, and its flow-control window every DATA byte. A client
            # ignores frames on a stream it has closed (RFC 9113, 5.1).
            return self._header_fragment(self.u2c, ftype, flags, stream_id, payload, self._response_headers)
        if ftype == DATA:
            self._data_frame(self.u2c, stream_id, flags)
            if self.u2c.data_scanner is not None:
                self.u2c.data_scanner.feed(_unpad(payload, flags))
            return True
        if ftype == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._finish(stream, GRPC_CANCELLED, time.monotonic())
            return True
        if ftype == SETTINGS and not flags & ACK:
            size = _settings_value(payload, SETTINGS_HEADER_TABLE_SIZE)
            if size is not None:
                self.c2u.decoder.max_allowed_table_size = size
            limit = self.opts.http2.max_concurrent_streams
            if limit is not None:  # the client hears min(Triton's, ours)
                capped = _capped_setting(payload, SETTINGS_MAX_CONCURRENT_STREAMS, limit)
                return True if capped is payload else frame(SETTINGS, flags, 0, capped)
            return True
        if ftype == GOAWAY and len(payload) >= 4:
            # Triton will not process streams above last_stream_id; the client retries them
            # elsewhere, so they are no longer in flight here.
            last_stream_id = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            now = time.monotonic()
            for sid in [sid for sid in self.streams if sid > last_stream_id]:
                self._finish(self.streams.pop(sid), GRPC_UNAVAILABLE, now)
        return True

    def _response_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        encoding = _header(headers, b"grpc-encoding")
        if encoding is not None:
            stream.response_encoding = encoding
        status = _header(headers, b"grpc-status")
        if status is not None:
            try:
                stream.response_status = int(status)
            except ValueError:
                stream.response_status = GRPC_UNKNOWN
        if end_stream:
            del self.streams[stream_id]
            code = stream.response_status if stream.response_status is not None else GRPC_UNKNOWN
            self._finish(stream, code, time.monotonic())

    def _stream_response(self, stream: _Stream, head: bytes, compressed: bool) -> None:
        if compressed:
            head = wire.decompress_head(head, stream.response_encoding) or b""
        model, request_id, final, error = wire.stream_response_info(head)
        if final is False:
            return  # more responses of a decoupled request are coming
        # A response without the flag (an older Triton) completes a request, as does final.
        found = _take_pending(stream.pending, model, request_id)
        if found is None:
            return
        model, started = found
        now = time.monotonic()
        self.stats.model(model, now).end(now, GRPC_UNKNOWN if error else GRPC_OK, now - started)

    # ---- shared helpers ----------------------------------------------------------------

    def _data_frame(self, d: _Direction, stream_id: int, flags: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            d.data_scanner = None
        else:
            d.data_scanner = stream.request_scanner if d is self.c2u else stream.response_scanner

    def _header_fragment(self, d: _Direction, ftype: int, flags: int, stream_id: int, payload: bytes,
                         on_block: Callable[[int, list[tuple[bytes, bytes]], bool], None]) -> bool:
        if ftype == HEADERS:
            if d.in_header_block:
                raise ProtocolViolation("HEADERS inside a header block")
            d.block_stream = stream_id
            d.block_end_stream = bool(flags & END_STREAM)
            fragment = d.block = _headers_fragment(payload, flags)
        else:
            if not d.in_header_block or stream_id != d.block_stream:
                raise ProtocolViolation("CONTINUATION outside a header block")
            fragment = payload
            d.block += payload
        d.in_header_block = not flags & END_HEADERS
        if d.in_header_block and not fragment and d.empty_frames is not None:
            _count(d.empty_frames, Http2Refusal.EMPTY_FRAMES)  # a block that grows by nothing
        if d.in_header_block:
            return True
        # hpack annotates an Iterable (it returns a list): the handlers read the headers more than once.
        headers: list[tuple[bytes, bytes]] = list(d.decoder.decode(d.block, raw=True))
        d.block = b""
        on_block(stream_id, headers, d.block_end_stream)
        return True

    def _cancel_code(self, stream: _Stream) -> int:
        """DEADLINE_EXCEEDED for a client's reset at its deadline, else CANCELLED.

        The relay's copy of the deadline starts when it reads the headers, later than the
        client's clock did, and the client resets the stream the moment its own deadline
        passes: so a reset within a little of the relay's deadline is the deadline.
        """
        if stream.deadline_s is not None:
            slack_s = max(_DEADLINE_SLACK_S, _DEADLINE_SLACK_RATIO * (stream.deadline_s - stream.started_s))
            if time.monotonic() >= stream.deadline_s - slack_s:
                return GRPC_DEADLINE_EXCEEDED
        return GRPC_CANCELLED

    def _finish(self, stream: _Stream, code: int, now: float) -> None:
        """The RPC is over: end whatever it still counts as in flight."""
        if stream.unary is not None:
            stream.unary.end(now, code, now - stream.started_s)
            stream.unary = None
        for model, starts in stream.pending.items():
            stats = self.stats.model(model, now)
            for _ in starts:
                stats.end(now, code, None)
        stream.pending.clear()
        if not self.streams:
            self.drained.set()

    def _mark_local(self, stream_id: int) -> None:
        self.local_streams[stream_id] = None
        while len(self.local_streams) > 1024:
            self.local_streams.popitem(last=False)

    def _answer_locally(self, stream_id: int, code: int = GRPC_UNAVAILABLE, message: str = "",
                        refuse: bool = False) -> None:
        """Answer a stream ourselves. Its header block has gone to Triton already (HPACK);
        a RST_STREAM there makes Triton drop the call before any message reaches it."""
        self._mark_local(stream_id)
        self.inject(self.c2u, frame(RST_STREAM, 0, stream_id, H2_CANCEL.to_bytes(4, "big")))
        if refuse:  # after GOAWAY: the client may retry it elsewhere
            self.inject(self.u2c, frame(RST_STREAM, 0, stream_id, H2_REFUSED_STREAM.to_bytes(4, "big")))
            return
        self.inject(self.u2c, trailers_only_response(stream_id, code, message))
        self.inject(self.u2c, frame(RST_STREAM, 0, stream_id, H2_NO_ERROR.to_bytes(4, "big")))

    def _answer_health(self, stream_id: int) -> None:
        self._mark_local(stream_id)
        self.inject(self.c2u, frame(RST_STREAM, 0, stream_id, H2_CANCEL.to_bytes(4, "big")))
        message = b"\x00\x00\x00\x00\x02\x08\x01"  # HealthCheckResponse{status: SERVING}
        self.injected_data_credit += len(message)
        self.inject(self.u2c, b"".join((
            frame(HEADERS, END_HEADERS, stream_id,
                  literal_header_block([(b":status", b"200"), (b"content-type", b"application/grpc")])),
            frame(DATA, 0, stream_id, message),
            frame(HEADERS, END_HEADERS | END_STREAM, stream_id, literal_header_block(grpc_status_headers(0, ""))),
            frame(RST_STREAM, 0, stream_id, H2_NO_ERROR.to_bytes(4, "big")),
        )))

    # ---- life cycle --------------------------------------------------------------------

    def goaway(self) -> None:
        """Graceful shutdown: the client opens no new streams here; open ones finish."""
        if self.goaway_sent or self.closed:
            return
        if not self.upstream_ready:
            # No server SETTINGS have reached the client yet, so a GOAWAY would be a protocol
            # error; nothing was forwarded either, so nothing is lost by closing.
            self.close()
            return
        self.goaway_sent = True
        payload = self.max_client_stream.to_bytes(4, "big") + H2_NO_ERROR.to_bytes(4, "big")
        self.inject(self.u2c, frame(GOAWAY, 0, 0, payload))

    def _enhance_your_calm(self, reason: Http2Refusal) -> None:
        """A client over an abuse limit: counted, GOAWAY ENHANCE_YOUR_CALM, closed. Nothing it
        sent after the frame over the limit is forwarded. Triton's side closes at once; the
        client's after _LINGER_S, its bytes read and dropped meanwhile."""
        self.relay.guard.refused_http2(reason)
        log.warning("relay.http2_refused", reason=reason.value, open_streams=len(self.streams),
                    max_stream_id=self.max_client_stream)
        client = self.client
        if self.u2c.at_boundary and not self.u2c.feeding:  # else mid-frame: just close
            client.write(frame(GOAWAY, 0, 0, self.max_client_stream.to_bytes(4, "big")
                               + H2_ENHANCE_YOUR_CALM.to_bytes(4, "big")))
        self.u2c.transport = None  # close() below closes Triton's side only
        self.close()
        if client.can_write_eof():
            client.write_eof()
            asyncio.get_running_loop().call_later(_LINGER_S, client.close)
        else:
            client.close()

    def close(self, code: int = GRPC_UNAVAILABLE) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            self._finish(stream, code, now)
        self.drained.set()
        for d in (self.c2u, self.u2c):
            if d.transport is not None:
                d.transport.close()
        self.relay.pairs.discard(self)


def _take_pending(pending: dict[str, deque[tuple[str, float]]], model: str | None,
                  request_id: str) -> tuple[str, float] | None:
    """Remove and return (model, start time) of the stream request a final response answers.

    By request id where the response has one (Triton's error responses carry the id but no
    model name); else the oldest request of the response's model; else, where the model is
    missing or unknown, the oldest request of the stream: Triton answers a stream's requests
    to a non-decoupled model in order.
    """
    if not pending:
        return None
    models = [model] if model in pending else list(pending)
    chosen: str | None = None
    index = 0
    if request_id:
        for m in models:
            for i, (rid, _) in enumerate(pending[m]):
                if rid == request_id:
                    chosen, index = m, i
                    break
            if chosen is not None:
                break
    if chosen is None:
        chosen = models[0] if len(models) == 1 else min(models, key=lambda m: pending[m][0][1])
    starts = pending[chosen]
    _, started = starts[index]
    del starts[index]
    if not starts:
        del pending[chosen]
    return chosen, started


def _unpad(payload: bytes, flags: int) -> bytes:
    if flags & PADDED and payload:
        return payload[1:len(payload) - payload[0]]
    return payload


def _headers_fragment(payload: bytes, flags: int) -> bytes:
    start, end = 0, len(payload)
    if flags & PADDED:
        start, end = 1, end - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    if start > end:
        raise ProtocolViolation("HEADERS padding longer than the frame")
    return payload[start:end]


def _count(rate: FrameRate, reason: Http2Refusal) -> None:
    """One more frame of a kind: raises _Flood past its limit within 1 s (limits.FrameRate)."""
    rate.count += 1
    if rate.count > rate.limit and rate.flooded(time.monotonic()):
        raise _Flood(reason)


def _capped_setting(payload: bytes, key: int, limit: int) -> bytes:
    """A SETTINGS payload with `key` at most `limit` (added where absent); `payload` itself when
    it needs no change. Settings carry no HPACK state, so the frame may change size."""
    out: bytearray | None = None
    found = False
    for i in range(0, len(payload) - 5, 6):
        if int.from_bytes(payload[i:i + 2], "big") == key:
            found = True
            if int.from_bytes(payload[i + 2:i + 6], "big") > limit:
                out = out if out is not None else bytearray(payload)
                out[i + 2:i + 6] = limit.to_bytes(4, "big")
    if not found:
        return payload + key.to_bytes(2, "big") + limit.to_bytes(4, "big")
    return bytes(out) if out is not None else payload


def _settings_value(payload: bytes, key: int) -> int | None:
    value = None
    for i in range(0, len(payload) - 5, 6):
        if int.from_bytes(payload[i:i + 2], "big") == key:
            value = int.from_bytes(payload[i + 2:i + 6], "big")
    return value


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
        _set_keepalive(transport, self.relay.options.tcp_keepalive_s)
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
                preface = pair.c2u.preface_left == 0
            else:
                preface = sum(map(len, pair.early)) >= len(PREFACE)
            return Observed(preface, pair.max_client_stream, len(pair.streams))
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
        if self.pair and self.pair.c2u.transport:
            self.pair.c2u.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.pair and self.pair.c2u.transport:
            self.pair.c2u.transport.resume_reading()


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    def data_received(self, data: bytes) -> None:
        self.pair.from_upstream(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.pair.closed:
            log.info("relay.upstream_lost", error=repr(exc) if exc else None,
                     open_streams=len(self.pair.streams))
        self.pair.close(code=GRPC_UNAVAILABLE)

    def pause_writing(self) -> None:
        self.pair.client.pause_reading()

    def resume_writing(self) -> None:
        self.pair.client.resume_reading()


def _set_keepalive(transport: asyncio.BaseTransport, keepalive_s: float | None) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or keepalive_s is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(keepalive_s)))
    except OSError:
        pass


class Relay:
    """The listening side: accepts client connections and pairs each with Triton."""

    def __init__(self, options: RelayOptions, stats: ProxyStats) -> None:
        self.options = options
        self.stats = stats
        self.door = Door(options.restricted_protocols) if options.restricted_protocols else None
        caps = options.max_inflight
        self.caps = caps if caps is not None and caps.enabled else None
        self.pairs: set[Pair] = set()
        self.guard = ConnectionGuard(options.limits)
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
        self.options = options = replace(self.options, **changes)  # type: ignore[arg-type]
        self.door = Door(options.restricted_protocols) if options.restricted_protocols else None
        caps = options.max_inflight
        self.caps = caps if caps is not None and caps.enabled else None
        for pair in self.pairs:  # each pair keeps its own references off the hot path
            pair.opts, pair.door, pair.caps = options, self.door, self.caps

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        tls = self.options.server_ssl
        self._server = await loop.create_server(
            lambda: _ClientProtocol(self), host, port, reuse_address=True, ssl=tls,
            # A client that never finishes the handshake gets the preface's deadline.
            ssl_handshake_timeout=(self.options.limits.preface_timeout_s or 60.0) if tls else None)
        self.guard.start()
        return self._server.sockets[0].getsockname()[1]

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
            log.warning("relay.upstream_unreachable", reason=reason)
            self.pairs.discard(pair)
            client.pair = None
            client.local = LocalResponder(pair.client, reason, self.stats)
            for chunk in pair.early:
                client.local.data_received(chunk)
            return
        if pair.closed:  # the client left while we were connecting
            transport.close()
            return
        _set_keepalive(transport, self.options.tcp_keepalive_s)
        pair.upstream_connected(transport)

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, tell clients to go away, let open calls finish within grace_s."""
        if self._server is not None:
            self._server.close()
        self.guard.stop()  # shutdown's own GOAWAY and grace take over
        for pair in list(self.pairs):
            pair.goaway()
        pending = [p.drained.wait() for p in list(self.pairs)]
        if pending:
            try:
                await asyncio.wait_for(asyncio.gather(*pending), grace_s)
            except TimeoutError:
                log.warning("relay.shutdown_grace_expired",
                            open_streams=sum(len(p.streams) for p in self.pairs))
        for pair in list(self.pairs):
            pair.close(code=GRPC_UNAVAILABLE)
        for task in list(self._tasks):
            task.cancel()
