"""The gRPC relay's protocol core, sans I/O: bytes in, bytes to forward and request events out.

A `GrpcConnection` is one client connection and its upstream (Triton) connection. The shell
(relay.py) hands it what each socket read, with the time:

    violation = conn.client_data(data, now_s)     # or conn.upstream_data(data, now_s)
    write conn.to_upstream, conn.to_client; clear them
    if violation: close (violation.flood: GOAWAY ENHANCE_YOUR_CALM is in to_client already)

It never reads a clock and never touches a socket. Every HTTP/2 frame is forwarded verbatim,
so HPACK state, flow control, deadlines (grpc-timeout), cancels (RST_STREAM), metadata,
trailers and compression pass through untouched. The core reads only:

- request and response header blocks, with an HPACK decoder per direction kept in step with
  the connection (it must see every block; a block that leaves the table as it was is
  remembered, and the same bytes again are not decoded again: _Direction.decode_block),
  for the method path and the grpc-status;
- the first bytes of inference request messages (the model name) and of ModelStreamInfer
  responses (`triton_final_response`);
- stream ends, to end requests.

What happens to requests goes to the connection's ledger (ledger.py) as plain method calls:
started, ended, refused; the ledger is the one place where in-flight counts move.

Answers the proxy gives itself (refused model control, restricted protocols, shed calls,
grpc.health.v1) are written as literal, non-indexed header fields, so the client's HPACK table
is untouched; the client's header block still goes upstream, followed by a RST_STREAM, so
Triton's table stays in step too.

Shedding on a ModelStreamInfer stream (a cap is set): the stream's request DATA frames are
taken whole and rewritten. Each message's bytes are held until its head names the model
(wire.MessageGate); a message past its model's cap is cut out, the client gets its window
credit back for those bytes (WINDOW_UPDATE on the connection and the stream), and it is
answered on the stream as Triton answers a failed request there: a ModelStreamInferResponse
with error_message and the request's id. That answer is written between two of Triton's
response messages, after Triton's response headers, which Triton sends with its first
response; where Triton ends the stream without having sent any (trailers-only), its block
reaches the client as the response headers, then our answers, then literal trailers with its
status. The client's window updates for our bytes are kept from Triton, as for the health
answers. A stream on which Triton holds no request and has not started a response would
wait for headers that may never come (Triton 2.51 sends none before its first response):
a request refused there ends the whole stream at once with RESOURCE_EXHAUSTED, as a unary
call past the cap is answered, and the stream is reset upstream.

Garbage never raises out of the core: `client_data`/`upstream_data` return a `Violation`
(the connection must close) instead.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import hpack

from tritonpilot.proxy import wire
from tritonpilot.proxy.ledger import Ledger, Ticket
from tritonpilot.proxy.limits import FrameRate, Http2Limits, Http2Refusal
from tritonpilot.proxy.restrict import MODEL_CONTROL_REFUSAL, Door
from tritonpilot.proxy.shedding import InflightCaps, refusal_message
from tritonpilot.proxy.stats import UNKNOWN_MODEL
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

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x3
H2_NO_ERROR, H2_CANCEL, H2_REFUSED_STREAM, H2_ENHANCE_YOUR_CALM = 0x0, 0x8, 0x7, 0xB
# A frame's 9-byte head: length (24 bits, as 16 + 8), type, flags, stream id (R bit included).
_FRAME_HEAD = struct.Struct(">HBBBL")
# Decoded header blocks each direction remembers (_Direction.decode_block): how many, the
# largest, the most fields. A gRPC call needs about three (request, response, trailers), each
# a few bytes of indexed fields; the bounds keep a client's worst case under 50 KiB.
_DECODED_BLOCKS, _DECODED_BLOCK_BYTES, _DECODED_BLOCK_FIELDS = 16, 128, 32
# Every peer accepts frames this large (the least SETTINGS_MAX_FRAME_SIZE may be).
MIN_MAX_FRAME_BYTES = 16384

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# A client reset this close to its deadline counts as DEADLINE_EXCEEDED (see _cancel_code).
_DEADLINE_SLACK_S = 0.05
_DEADLINE_SLACK_RATIO = 0.01

CLIENT_TO_TRITON, TRITON_TO_CLIENT = "client->triton", "triton->client"


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


RESPONSE_HEADERS = literal_header_block([(b":status", b"200"), (b"content-type", b"application/grpc")])


def trailers_only_response(stream_id: int, code: int, message: str) -> bytes:
    block = literal_header_block([(b":status", b"200"), (b"content-type", b"application/grpc"),
                                  *grpc_status_headers(code, message)])
    return frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block)


def grpc_timeout_s(value: bytes) -> float | None:
    try:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1:]]
    except (KeyError, ValueError):
        return None


class _Headers(list[tuple[bytes, bytes]]):
    """A decoded header block: its (name, value) bytes tuples in order, and `first`, each
    name's first value. The handlers look fields up in `first` (a dict get, not a Python loop
    over the fields: seven lookups per call); it is built once per decoded block, and a
    remembered block (_Direction.decode_block) keeps it."""

    __slots__ = ("first",)

    def __init__(self, fields: Iterable[tuple[bytes, bytes]]) -> None:
        super().__init__(fields)
        self.first: dict[bytes, bytes] = dict(reversed(self))  # the later assignment, the earlier field, wins


@dataclass(frozen=True)
class GrpcRules:
    """What the core enforces; the shell swaps them live (a policy reload)."""
    allow_client_model_control: bool = False
    # None = no limit: the relay never holds a whole message.
    max_message_bytes: int | None = None
    # Triton's --grpc-restricted-protocol rules (restrict.py); None = none.
    door: Door | None = None
    # Per-model caps on requests in flight (shedding.py); None = no cap.
    caps: InflightCaps | None = None


@dataclass(frozen=True, slots=True)
class Violation:
    """Why the connection must close now. `flood`: a client over an HTTP/2 abuse limit
    (GOAWAY ENHANCE_YOUR_CALM is already in `to_client` where it could be written); else bytes
    that are not HTTP/2 as the relay must understand it."""
    direction: str
    error: str
    flood: Http2Refusal | None = None
    open_streams: int = 0
    max_stream_id: int = 0


class ProtocolViolation(Exception):
    """Raised inside the core only; the caller gets a Violation."""


class _Flood(Exception):
    def __init__(self, reason: Http2Refusal) -> None:
        super().__init__(reason.value)
        self.reason = reason


class _Stream:
    """One HTTP/2 stream (one RPC) the core is following."""

    __slots__ = ("stream_id", "path", "started_s", "deadline_s", "encoding", "request_scanner",
                 "response_scanner", "unary", "pending", "response_status", "response_encoding", "gate",
                 "response_started", "answers", "split_trailers_only")

    def __init__(self, stream_id: int, path: bytes, started_s: float, deadline_s: float | None,
                 encoding: bytes | None) -> None:
        self.stream_id = stream_id
        self.path = path
        self.started_s = started_s
        self.deadline_s = deadline_s
        self.encoding = encoding
        self.request_scanner: wire.MessageScanner | None = None
        self.response_scanner: wire.MessageScanner | None = None
        # Unary ModelInfer: its ticket once the request message named the model.
        self.unary: Ticket | None = None
        # ModelStreamInfer: per model, (request id, ticket) of requests not yet finally answered.
        self.pending: dict[str, deque[tuple[str, Ticket]]] = {}
        self.response_status: int | None = None
        # Triton may compress its messages whatever the client did: read from its headers.
        self.response_encoding: bytes | None = None
        # ModelStreamInfer with a cap set: the request messages, kept or cut out one by one.
        self.gate: wire.MessageGate | None = None
        self.response_started = False  # Triton's (or our) response headers went to the client
        self.answers: list[bytes] = []  # our DATA frames waiting for a place in the response
        # Triton's trailers-only block goes to the client as response headers, our answers and
        # trailers of our own follow it.
        self.split_trailers_only = False


class _Direction:
    """Frame-boundary bookkeeping for one direction of the connection."""

    __slots__ = ("name", "buf", "data_left", "data_scanner", "in_header_block", "block", "feeding",
                 "block_stream", "block_end_stream", "pending", "out", "decoder", "preface_left",
                 "max_block_bytes", "empty_frames", "whole", "decoded")

    def __init__(self, name: str, preface_left: int) -> None:
        self.name = name
        self.buf = b""
        self.data_left = 0          # payload bytes still to pass of a streamed DATA frame
        self.data_scanner: wire.MessageScanner | None = None
        self.in_header_block = False
        self.block = b""
        self.block_stream = 0
        self.block_end_stream = False
        self.pending: list[bytes] = []  # frames to inject at the next frame boundary
        self.out: list[memoryview | bytes] = []  # bytes to write, in order (the shell clears it)
        self.decoder = hpack.Decoder()
        # Don't be stricter than the endpoints: they enforce their own limits.
        self.decoder.max_header_list_size = 1 << 30
        self.preface_left = preface_left
        self.feeding = False  # inside _relay_frames: frames already read are not in `out` yet
        # Client side only: one header block's bytes, and frames that carry nothing.
        self.max_block_bytes = 1 << 30
        self.empty_frames: FrameRate | None = None
        # Streams whose DATA frames are taken whole (not streamed through) to be rewritten or
        # followed frame by frame: gated requests (client side), answers waiting (Triton side).
        self.whole: set[int] = set()
        # Header blocks that left the HPACK table as it was, decoded against the table as it
        # is now (see decode_block).
        self.decoded: dict[bytes, _Headers] = {}

    def decode_block(self, block: bytes) -> _Headers:
        """The block's header list, with the decoder kept in step with the peer's encoder.

        gRPC peers send near-identical blocks on every call, all indexed fields once the
        table holds them: such a block leaves the table as it was, so decoding the same bytes
        again gives the same list, until a block changes the table. Those are remembered; any
        block that changes the table (an insertion always puts a new entry first, an eviction
        or a size update changes the count or the size) empties the memory. The lists are
        shared: the handlers only read them.
        """
        decoded = self.decoded.get(block)
        if decoded is not None:
            return decoded
        table = self.decoder.header_table
        entries = table.dynamic_entries
        first, count, size = entries[0] if entries else None, len(entries), table.maxsize
        headers = _Headers(self.decoder.decode(block, raw=True))
        if (entries[0] if entries else None) is first and len(entries) == count and table.maxsize == size:
            if len(block) <= _DECODED_BLOCK_BYTES and len(headers) <= _DECODED_BLOCK_FIELDS:
                if len(self.decoded) >= _DECODED_BLOCKS:
                    self.decoded.clear()
                self.decoded[block] = headers
        elif self.decoded:
            self.decoded.clear()
        return headers

    def allow_table_size(self, size: int) -> None:
        """The peer's encoder may use up to `size` bytes (our side's SETTINGS): the next block
        is decoded in full, so that hpack checks the size update it must carry."""
        self.decoder.max_allowed_table_size = size
        self.decoded.clear()

    @property
    def at_boundary(self) -> bool:
        return self.data_left == 0 and not self.in_header_block


FrameHandler = Callable[[int, int, int, bytes], "bool | bytes"]


class GrpcConnection:
    """One client connection and its own upstream connection, as bytes and events."""

    def __init__(self, rules: GrpcRules, ledger: Ledger, now_s: float, http2: Http2Limits | None = None,
                 count_refusal: Callable[[Http2Refusal], None] = lambda reason: None) -> None:
        http2 = http2 if http2 is not None else Http2Limits()
        self.ledger = ledger
        self.count_refusal = count_refusal  # the connection guard's tally (limits.ConnectionGuard)
        self.reconfigure(rules)
        self.http2 = http2
        self.c2u = _Direction(CLIENT_TO_TRITON, len(PREFACE))
        self.u2c = _Direction(TRITON_TO_CLIENT, 0)
        # What to write to each socket, in order: the shell writes and clears these lists.
        self.to_upstream = self.c2u.out
        self.to_client = self.u2c.out
        self.streams: dict[int, _Stream] = {}
        # Streams the proxy answered itself: upstream frames for them are dropped.
        self.local_streams: OrderedDict[int, None] = OrderedDict()
        self.max_client_stream = 0
        self.goaway_sent = False
        self.closed = False
        self.injected_data_credit = 0  # bytes of our own DATA the client will acknowledge
        self.stream_credit: dict[int, int] = {}  # the same, per stream still open
        self._now_s = now_s
        # HTTP/2 abuse limits: integer counts per frame, the clock looked at only past a limit.
        self.resets = FrameRate(http2.limit(http2.max_resets_per_s), now_s)
        self.settings = FrameRate(http2.limit(http2.max_settings_per_s), now_s)
        self.pings = FrameRate(http2.limit(http2.max_pings_per_s), now_s)
        if http2.max_empty_frames_per_s is not None:
            self.c2u.empty_frames = FrameRate(http2.max_empty_frames_per_s, now_s)
        self.c2u.max_block_bytes = http2.limit(http2.max_header_block_bytes)
        self.max_streams = http2.limit(http2.max_concurrent_streams)

    def reconfigure(self, rules: GrpcRules) -> None:
        """New rules for the calls that start from now on (calls open keep their answer)."""
        self.rules = rules
        self.door = rules.door
        self.caps = rules.caps if rules.caps is not None and rules.caps.enabled else None

    # ---- what the shell sees ------------------------------------------------------------

    @property
    def preface_received(self) -> bool:
        return self.c2u.preface_left == 0

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    def client_data(self, data: bytes, now_s: float) -> Violation | None:
        """Bytes the client sent. What to forward lands in to_upstream, answers in to_client."""
        return self._feed(self.c2u, data, self._client_frame, now_s)

    def upstream_data(self, data: bytes, now_s: float) -> Violation | None:
        """Bytes Triton sent."""
        return self._feed(self.u2c, data, self._upstream_frame, now_s)

    def goaway(self) -> None:
        """Graceful shutdown: the client opens no new streams here; open ones finish. The shell
        must not call it before Triton's SETTINGS reached the client (a GOAWAY first would be
        a protocol error): close instead."""
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        payload = self.max_client_stream.to_bytes(4, "big") + H2_NO_ERROR.to_bytes(4, "big")
        self.inject(self.u2c, frame(GOAWAY, 0, 0, payload))

    def close(self, code: int, now_s: float) -> None:
        """The connection is over: every request still open ends with `code`."""
        if self.closed:
            return
        self.closed = True
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            self._finish(stream, code, now_s)
        self.ledger.lost(code, now_s)  # nothing should be left; if anything is, it ends here

    # ---- the frame loop -----------------------------------------------------------------

    def _feed(self, d: _Direction, data: bytes, on_frame: FrameHandler, now_s: float) -> Violation | None:
        if self.closed:
            return None
        self._now_s = now_s
        d.feeding = True
        try:
            self._relay_frames(d, data, on_frame)
            return None
        except _Flood as flood:
            d.feeding = False
            return self._enhance_your_calm(flood.reason)
        except Exception as exc:  # garbage from a peer must never take the proxy down
            d.out.clear()  # nothing of this read is forwarded
            violation = Violation(d.name, repr(exc), None, len(self.streams), self.max_client_stream)
            self.close(GRPC_UNAVAILABLE, now_s)
            return violation
        finally:
            d.feeding = False

    def _relay_frames(self, d: _Direction, data: bytes, on_frame: FrameHandler) -> None:
        """Forward `data` frame by frame. Unpadded DATA payloads pass as they arrive; any
        other frame is handed to `on_frame` once whole, which says whether to forward it
        (True), drop it (False) or put the frame it returns (bytes) in its place."""
        if d.buf:
            data = d.buf + data
            d.buf = b""
        view = memoryview(data)
        out = d.out
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
            length_hi, length_lo, ftype, flags, stream_id = _FRAME_HEAD.unpack_from(data, pos)
            length = length_hi << 8 | length_lo
            stream_id &= 0x7FFFFFFF
            if ftype == DATA:
                if not length and not flags & END_STREAM and d.empty_frames is not None:
                    _count(d.empty_frames, Http2Refusal.EMPTY_FRAMES, self._now_s)
                if not flags & PADDED and not (d.whole and stream_id in d.whole):
                    # Stream it: forward what has arrived, scan it if this stream is scanned
                    # (_data_frame, inline).
                    stream = self.streams.get(stream_id)
                    if stream is None:
                        d.data_scanner = None
                    else:
                        d.data_scanner = stream.request_scanner if d is self.c2u else stream.response_scanner
                    d.data_left = length
                    pos += 9
                    if length == 0 and d.pending:
                        out.append(view[start:pos])
                        out.extend(d.pending)
                        d.pending.clear()
                        start = pos
                    continue
            elif length + len(d.block) > d.max_block_bytes and (ftype == HEADERS or ftype == CONTINUATION):
                raise _Flood(Http2Refusal.HEADER_BLOCK)  # before buffering the frame
            if n - pos < 9 + length:
                break
            end = pos + 9 + length
            if ftype == WINDOW_UPDATE and not self.injected_data_credit and not self.stream_credit:
                # No credit of ours to take back (_reclaim_credit): it passes unread, as its
                # handlers would pass it (three of a unary call's eight frames).
                pos = end
            else:
                keep = on_frame(ftype, flags, stream_id, data[pos + 9:end])
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
        if start < pos:
            out.append(view[start:pos])
        if d.pending and d.at_boundary:
            out.extend(d.pending)
            d.pending.clear()
        d.buf = data[pos:]

    def inject(self, d: _Direction, payload: bytes) -> None:
        """Frames of our own into direction d, between its frames."""
        if d.at_boundary and not d.feeding:
            d.out.append(payload)
        else:
            d.pending.append(payload)

    # ---- client -> Triton ---------------------------------------------------------------

    def _client_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> bool | bytes:
        if ftype == HEADERS or ftype == CONTINUATION:
            return self._header_fragment(self.c2u, ftype, flags, stream_id, payload, self._request_headers)
        if ftype == DATA:  # padded, gated, or for a stream we answered: taken whole
            if stream_id in self.local_streams:
                return True  # Triton reset the stream but must count the bytes for flow control
            stream = self.streams.get(stream_id)
            if stream is not None and stream.gate is not None:
                return self._gated_data(stream, flags, payload)
            self._data_frame(self.c2u, stream_id)
            body = _unpad(payload, flags)
            if self.c2u.data_scanner is not None:
                self.c2u.data_scanner.feed(body)
            return True
        if ftype == RST_STREAM:
            _count(self.resets, Http2Refusal.RAPID_RESET, self._now_s)
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._finish(stream, self._cancel_code(stream), self._now_s)
            return True
        if ftype == SETTINGS and not flags & ACK:
            _count(self.settings, Http2Refusal.SETTINGS_FLOOD, self._now_s)
            # The client's table size bounds what Triton's encoder may use on responses.
            size = _settings_value(payload, SETTINGS_HEADER_TABLE_SIZE)
            if size is not None:
                self.u2c.allow_table_size(size)
            return True
        if ftype == WINDOW_UPDATE and (self.injected_data_credit if stream_id == 0 else self.stream_credit):
            return self._reclaim_credit(stream_id, payload)
        if ftype == PING and not flags & ACK:
            _count(self.pings, Http2Refusal.PING_FLOOD, self._now_s)
        return True

    def _reclaim_credit(self, stream_id: int, payload: bytes) -> bool | bytes:
        """The client acknowledges DATA we wrote ourselves: Triton never sent those bytes, so
        that part of the window update must not reach it."""
        increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        if stream_id == 0:
            owed = min(self.injected_data_credit, increment)
            self.injected_data_credit -= owed
        else:
            left = self.stream_credit.get(stream_id, 0)
            owed = min(left, increment)
            if left - owed:
                self.stream_credit[stream_id] = left - owed
            else:
                self.stream_credit.pop(stream_id, None)
        if owed == 0:
            return True
        if owed == increment:
            return False
        return frame(WINDOW_UPDATE, 0, stream_id, (increment - owed).to_bytes(4, "big"))

    def _request_headers(self, stream_id: int, headers: _Headers, end_stream: bool) -> None:
        if stream_id in self.streams or stream_id <= self.max_client_stream:
            return  # request trailers, or a stream we already handle: nothing to read
        self.max_client_stream = stream_id
        first = headers.first
        path = first.get(b":path") or b""
        now = self._now_s
        if self.goaway_sent:
            return self._answer_locally(stream_id, refuse=True)
        if len(self.streams) >= self.max_streams:  # REFUSED_STREAM: grpc clients retry it
            self.count_refusal(Http2Refusal.CONCURRENT_STREAMS)
            return self._answer_locally(stream_id, refuse=True)
        if self.door is not None:
            refusal = self.door.refusal(path, headers)
            if refusal is not None:  # Triton's own answer, before anything else is said
                return self._answer_locally(stream_id, GRPC_UNAVAILABLE, refusal)
        if path in MODEL_CONTROL and not self.rules.allow_client_model_control:
            return self._answer_locally(stream_id, GRPC_PERMISSION_DENIED, MODEL_CONTROL_REFUSAL)
        if path == HEALTH_CHECK:
            return self._answer_health(stream_id)
        if path == HEALTH_WATCH:
            return self._answer_locally(stream_id, GRPC_UNIMPLEMENTED,
                                        "tritonpilot: use grpc.health.v1.Health/Check")
        timeout = first.get(b"grpc-timeout")
        timeout_s = grpc_timeout_s(timeout) if timeout else None
        stream = _Stream(stream_id, path, now, now + timeout_s if timeout_s is not None else None,
                         first.get(b"grpc-encoding"))
        if path == MODEL_INFER:
            stream.request_scanner = wire.MessageScanner(lambda h, c, n: self._unary_request(stream, h, c, n))
        elif path == MODEL_STREAM_INFER:
            if self.caps is not None:  # its messages may be cut out: take its DATA frames whole
                stream.gate = wire.MessageGate(lambda h, c, n: self._stream_request(stream, h, c, n))
                self.c2u.whole.add(stream_id)
            else:
                stream.request_scanner = wire.MessageScanner(lambda h, c, n: self._stream_request(stream, h, c, n))
            stream.response_scanner = wire.MessageScanner(lambda h, c, n: self._stream_response(stream, h, c))
        elif self.rules.max_message_bytes is not None:
            stream.request_scanner = wire.MessageScanner(lambda h, c, n: self._check_size(stream, n))
        self.streams[stream_id] = stream

    def _model_and_id(self, stream: _Stream, head: bytes, compressed: bool) -> tuple[str, str]:
        if compressed:
            head = wire.decompress_head(head, stream.encoding) or b""
        model, request_id = wire.request_model_and_id(head)
        return model or UNKNOWN_MODEL, request_id

    def _check_size(self, stream: _Stream, length: int) -> bool:
        """False (and the stream answered RESOURCE_EXHAUSTED) when a request message is over the
        limit. Requests already counted end with that code."""
        limit = self.rules.max_message_bytes
        if limit is None or length <= limit:
            return True
        if stream.stream_id in self.local_streams:
            return False  # refused already; the rest of the frame's bytes still pass the scanner
        self.inject(self.c2u, frame(RST_STREAM, 0, stream.stream_id, H2_CANCEL.to_bytes(4, "big")))
        self.streams.pop(stream.stream_id, None)
        self._finish(stream, GRPC_RESOURCE_EXHAUSTED, self._now_s)
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
        model = self._model_and_id(stream, head, compressed)[0]
        stream.request_scanner = None  # one message per unary call: stop looking
        if self.caps is not None:
            shed = self.ledger.at_cap(model, self.caps.cap, stream.started_s)
            if shed is not None:  # answered RESOURCE_EXHAUSTED, reset upstream
                self.streams.pop(stream.stream_id, None)
                self._answer_locally(stream.stream_id, GRPC_RESOURCE_EXHAUSTED, refusal_message(*shed))
                return
        stream.unary = self.ledger.started(model, self._now_s, stream.started_s)
        self._check_size(stream, length)

    def _stream_request(self, stream: _Stream, head: bytes, compressed: bool, length: int) -> bool:
        """One request message on a ModelStreamInfer stream: True to pass it to Triton."""
        if stream.stream_id in self.local_streams:
            return True
        now = self._now_s
        model, request_id = self._model_and_id(stream, head, compressed)
        if stream.gate is not None and self.caps is not None:
            shed = self.ledger.at_cap(model, self.caps.cap, now)
            if shed is not None:
                if not stream.response_started and not any(stream.pending.values()):
                    # Triton holds nothing of this stream, so it may never start a response for
                    # an answer to follow: the stream ends here, RESOURCE_EXHAUSTED.
                    self.streams.pop(stream.stream_id, None)
                    self._answer_locally(stream.stream_id, GRPC_RESOURCE_EXHAUSTED, refusal_message(*shed))
                else:
                    self._answer_on_stream(stream, request_id, refusal_message(*shed))
                return False
        stream.pending.setdefault(model, deque()).append((request_id, self.ledger.started(model, now)))
        self._check_size(stream, length)
        return True

    def _gated_data(self, stream: _Stream, flags: int, payload: bytes) -> bool | bytes:
        """A request DATA frame of a gated stream: what of it passes, as frames of our own; the
        client's window credit for what does not (cut messages, padding) is given back."""
        stream_id = stream.stream_id
        body = _unpad(payload, flags)
        gate = stream.gate
        assert gate is not None
        kept, dropped = gate.feed(body)
        end_stream = flags & END_STREAM
        if end_stream or stream_id in self.local_streams:  # no more to decide: release what is held
            kept += gate.flush()
            stream.gate = None
            self.c2u.whole.discard(stream_id)
        if not dropped and kept == body:
            return True  # as it came (padding too: Triton credits it)
        credit = dropped + len(payload) - len(body)
        if credit:
            self._give_credit(stream_id, credit, stream_too=not end_stream)
        if not kept:
            return frame(DATA, END_STREAM, stream_id) if end_stream else False
        size = max(MIN_MAX_FRAME_BYTES, len(payload))  # the client's frame fit; so do ours
        parts = [kept[i:i + size] for i in range(0, len(kept), size)]
        return b"".join(frame(DATA, END_STREAM if end_stream and i == len(parts) - 1 else 0, stream_id, part)
                        for i, part in enumerate(parts))

    def _give_credit(self, stream_id: int, credit: int, stream_too: bool) -> None:
        """WINDOW_UPDATE to the client for bytes it sent that Triton will never see."""
        increment = credit.to_bytes(4, "big")
        update = frame(WINDOW_UPDATE, 0, 0, increment)
        if stream_too:
            update += frame(WINDOW_UPDATE, 0, stream_id, increment)
        self.inject(self.u2c, update)

    def _answer_on_stream(self, stream: _Stream, request_id: str, message: str) -> None:
        """Answer one request of a stream with an error response of our own, where Triton's
        responses leave room for it (see the module's docstring)."""
        response = wire.stream_error_response(message, request_id)
        data = b"\x00" + len(response).to_bytes(4, "big") + response
        self.injected_data_credit += len(data)
        self.stream_credit[stream.stream_id] = self.stream_credit.get(stream.stream_id, 0) + len(data)
        stream.answers.append(frame(DATA, 0, stream.stream_id, data))
        scanner = stream.response_scanner
        if (stream.response_started and self.u2c.at_boundary and not self.u2c.feeding
                and scanner is not None and scanner.at_boundary):
            self.inject(self.u2c, b"".join(stream.answers))
            stream.answers.clear()
        else:
            self.u2c.whole.add(stream.stream_id)  # follow Triton's frames on it one by one

    # ---- Triton -> client ---------------------------------------------------------------

    def _upstream_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> bool | bytes:
        if ftype == HEADERS or ftype == CONTINUATION:
            # Forwarded even for streams we answered ourselves: the client's HPACK table must see
            # every block Triton encodes, and its flow-control window every DATA byte. A client
            # ignores frames on a stream it has closed (RFC 9113, 5.1).
            if ftype == HEADERS and flags & END_STREAM and self.u2c.whole and stream_id in self.u2c.whole:
                before = self._answers_before_trailers(stream_id)
                self._header_fragment(self.u2c, ftype, flags, stream_id, payload, self._response_headers)
                if before is None:  # Triton's trailers-only block: the stream does not end with it
                    return frame(ftype, flags & ~END_STREAM, stream_id, payload)
                return before + frame(ftype, flags, stream_id, payload) if before else True
            return self._header_fragment(self.u2c, ftype, flags, stream_id, payload, self._response_headers)
        if ftype == DATA:
            self._data_frame(self.u2c, stream_id)
            if self.u2c.data_scanner is not None:
                self.u2c.data_scanner.feed(_unpad(payload, flags))
            if self.u2c.whole and stream_id in self.u2c.whole:
                if flags & END_STREAM:  # no trailers will come to put them before
                    self._drop_answers(stream_id)
                else:
                    self._place_answers(stream_id)
            return True
        if ftype == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._finish(stream, GRPC_CANCELLED, self._now_s)
            return True
        if ftype == SETTINGS and not flags & ACK:
            size = _settings_value(payload, SETTINGS_HEADER_TABLE_SIZE)
            if size is not None:
                self.c2u.allow_table_size(size)
            limit = self.http2.max_concurrent_streams
            if limit is not None:  # the client hears min(Triton's, ours)
                capped = _capped_setting(payload, SETTINGS_MAX_CONCURRENT_STREAMS, limit)
                return True if capped is payload else frame(SETTINGS, flags, 0, capped)
            return True
        if ftype == GOAWAY and len(payload) >= 4:
            # Triton will not process streams above last_stream_id; the client retries them
            # elsewhere, so they are no longer in flight here.
            last_stream_id = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            for sid in [sid for sid in self.streams if sid > last_stream_id]:
                self._finish(self.streams.pop(sid), GRPC_UNAVAILABLE, self._now_s)
        return True

    def _place_answers(self, stream_id: int) -> None:
        """After one of Triton's frames on a stream with answers waiting: they follow it if it
        left the response between two messages."""
        stream = self.streams.get(stream_id)
        if stream is None or not stream.answers:
            self.u2c.whole.discard(stream_id)
            return
        scanner = stream.response_scanner
        if stream.response_started and scanner is not None and scanner.at_boundary:
            self.u2c.pending.extend(stream.answers)  # right after this frame (at_boundary)
            stream.answers.clear()
            self.u2c.whole.discard(stream_id)

    def _answers_before_trailers(self, stream_id: int) -> bytes | None:
        """Triton ends a stream with answers of ours still waiting: they go before its trailers.
        None: Triton's block is trailers-only (it sent no response headers); it then reaches
        the client without END_STREAM, as the response's headers, and our answers and literal
        trailers with its status follow it (_response_headers): a client reads no pseudo-header
        in trailers, and its HPACK table still sees Triton's block."""
        self.u2c.whole.discard(stream_id)
        stream = self.streams.get(stream_id)
        if stream is None or not stream.answers:
            return b""
        if not stream.response_started:
            stream.split_trailers_only = True
            return None
        scanner = stream.response_scanner
        if scanner is not None and not scanner.at_boundary:
            self._drop_answers(stream_id)  # Triton ends inside a message: nothing can go between
            return b""
        out = b"".join(stream.answers)
        stream.answers.clear()
        return out

    def _response_headers(self, stream_id: int, headers: _Headers, end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        first = headers.first
        encoding = first.get(b"grpc-encoding")
        if encoding is not None:
            stream.response_encoding = encoding
        status = first.get(b"grpc-status")
        if status is not None:
            try:
                stream.response_status = int(status)
            except ValueError:
                stream.response_status = GRPC_UNKNOWN
        if end_stream:
            del self.streams[stream_id]
            if stream.split_trailers_only:
                trailers = [(k, v) for k, v in headers if not k.startswith(b":") and k != b"content-type"]
                self.u2c.pending.append(b"".join(stream.answers) + frame(
                    HEADERS, END_HEADERS | END_STREAM, stream_id, literal_header_block(trailers)))
                stream.answers.clear()
            code = stream.response_status if stream.response_status is not None else GRPC_UNKNOWN
            self._finish(stream, code, self._now_s)
        elif not stream.response_started:
            stream.response_started = True
            if stream.answers:
                self._place_answers(stream_id)

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
        self.ledger.ended(found[1], GRPC_UNKNOWN if error else GRPC_OK, self._now_s)

    # ---- shared helpers ----------------------------------------------------------------

    def _data_frame(self, d: _Direction, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            d.data_scanner = None
        else:
            d.data_scanner = stream.request_scanner if d is self.c2u else stream.response_scanner

    def _header_fragment(self, d: _Direction, ftype: int, flags: int, stream_id: int, payload: bytes,
                         on_block: Callable[[int, _Headers, bool], None]) -> bool:
        if ftype == HEADERS:
            if d.in_header_block:
                raise ProtocolViolation("HEADERS inside a header block")
            d.block_stream = stream_id
            d.block_end_stream = bool(flags & END_STREAM)
            fragment = d.block = _headers_fragment(payload, flags) if flags & (PADDED | PRIORITY_FLAG) else payload
        else:
            if not d.in_header_block or stream_id != d.block_stream:
                raise ProtocolViolation("CONTINUATION outside a header block")
            fragment = payload
            d.block += payload
        if not flags & END_HEADERS:
            d.in_header_block = True
            if not fragment and d.empty_frames is not None:
                _count(d.empty_frames, Http2Refusal.EMPTY_FRAMES, self._now_s)  # a block that grows by nothing
            return True
        d.in_header_block = False
        block = d.block
        headers = d.decoded.get(block)  # decode_block's memory, looked at without the call
        if headers is None:
            headers = d.decode_block(block)
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
            if self._now_s >= stream.deadline_s - slack_s:
                return GRPC_DEADLINE_EXCEEDED
        return GRPC_CANCELLED

    def _finish(self, stream: _Stream, code: int, now_s: float) -> None:
        """The RPC is over: end whatever it still counts as in flight."""
        if stream.unary is not None:
            self.ledger.ended(stream.unary, code, now_s)
            stream.unary = None
        for entries in stream.pending.values():
            for _, ticket in entries:
                self.ledger.ended(ticket, code, now_s, timed=False)
        stream.pending.clear()
        if stream.gate is not None or stream.answers:
            stream.gate = None
            self._drop_answers(stream.stream_id, stream)
            self.c2u.whole.discard(stream.stream_id)
        if self.stream_credit:
            self.stream_credit.pop(stream.stream_id, None)

    def _drop_answers(self, stream_id: int, stream: _Stream | None = None) -> None:
        """Answers of ours that can no longer be written: the client will not acknowledge them."""
        self.u2c.whole.discard(stream_id)
        stream = stream or self.streams.get(stream_id)
        if stream is None or not stream.answers:
            return
        unsent = sum(len(f) - 9 for f in stream.answers)
        self.injected_data_credit = max(0, self.injected_data_credit - unsent)
        if stream_id in self.stream_credit:
            left = self.stream_credit[stream_id] - unsent
            if left > 0:
                self.stream_credit[stream_id] = left
            else:
                del self.stream_credit[stream_id]
        stream.answers.clear()

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
            frame(HEADERS, END_HEADERS, stream_id, RESPONSE_HEADERS),
            frame(DATA, 0, stream_id, message),
            frame(HEADERS, END_HEADERS | END_STREAM, stream_id, literal_header_block(grpc_status_headers(0, ""))),
            frame(RST_STREAM, 0, stream_id, H2_NO_ERROR.to_bytes(4, "big")),
        )))

    def _enhance_your_calm(self, reason: Http2Refusal) -> Violation:
        """A client over an abuse limit: GOAWAY ENHANCE_YOUR_CALM (unless Triton's side is
        mid-frame), and closed. Nothing it sent in this read is forwarded."""
        violation = Violation(CLIENT_TO_TRITON, reason.value, reason, len(self.streams), self.max_client_stream)
        self.c2u.out.clear()
        if self.u2c.at_boundary and not self.u2c.feeding:
            self.u2c.out.append(frame(GOAWAY, 0, 0, self.max_client_stream.to_bytes(4, "big")
                                      + H2_ENHANCE_YOUR_CALM.to_bytes(4, "big")))
        self.close(GRPC_UNAVAILABLE, self._now_s)
        return violation


T = TypeVar("T", float, Ticket)


def _take_pending(pending: dict[str, deque[tuple[str, T]]], model: str | None,
                  request_id: str) -> tuple[str, T] | None:
    """Remove and return (model, entry) of the stream request a final response answers; an
    entry orders by start (a start time, or a ledger Ticket).

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


def _count(rate: FrameRate, reason: Http2Refusal, now_s: float) -> None:
    """One more frame of a kind: raises _Flood past its limit within 1 s (limits.FrameRate)."""
    rate.count += 1
    if rate.count > rate.limit and rate.flooded(now_s):
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
