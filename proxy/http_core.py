"""The sans-IO core of the HTTP/1.1 relay: one client connection, bytes in, bytes out.

`HttpExchanges` is fed the client's bytes (`client_data`) and Triton's (`upstream_data`),
with the time passed in, and leaves what to write in `to_upstream` / `to_client` (read
them with `take_upstream()` / `take_client()`). Bytes pass unchanged: the core only finds
where each message starts and ends, so keep-alive, pipelining, chunked bodies, the binary
tensor extension (Inference-Header-Content-Length), compressed bodies and the
server-sent events of generate_stream all go through as they are.

What it reads:
- a request's head (request line and headers), parsed by httptools (llhttp, the C parser
  uvicorn uses). Why httptools rather than h11: it is C, so a head costs microseconds on
  the hot path, and h11 is a whole-connection state machine that can't relay pipelined
  requests (its client side allows one request at a time) nor keep bytes verbatim.
  The head is held until complete (bounded by `max_head_bytes`: 431 and close past it),
  then forwarded, or answered by the proxy (`HttpRules`, below);
- each body's framing (Content-Length, chunked), read here to know where the next
  request starts, strictly: both Content-Length and Transfer-Encoding, several lengths
  that differ, or a Transfer-Encoding other than chunked get 400 and a closed connection,
  so the proxy and Triton can never disagree on where a request ends (request smuggling);
- each response's status line, headers and framing: no body after 1xx, 204, 304;
  Content-Length; chunked (with trailers); otherwise until Triton closes (HEAD: see
  response_body). Responses come back in request order, so the open requests are a FIFO.
  A 1xx (100 Continue) is interim: the request stays open. A 101 turns the connection
  into a tunnel.

The core never raises on bad bytes: a malformed request gets 400 (after the responses
owed to earlier requests) and the connection closes; Triton sending something that is
not HTTP closes both sides.

What the proxy answers itself, at the request head, in Triton's format, in this order
(`HttpRules`; the shell swaps them live with `reconfigure`): 403 for a restricted API
without its header (as Triton's --http-restricted-api answers), 403 for client model
control unless allowed, 413 for a Content-Length past max_message_bytes, 503 and close
while Triton is unreachable (`upstream_unreachable`), 429 for an inference request whose
model is at its cap (shedding.py); and 503 and close once draining (`goaway`).

Counting goes to the connection's ledger (ledger.py, protocol "http"), the one place where
both relays' in-flight counts move. Inference requests (/v2/models/<m>[/versions/<v>]/
infer|generate|generate_stream) count, per model: `started` at the head, `ended` with the
response's HTTP status once its last byte has passed (the code label is the status, e.g.
"200"). Shed (429) is the ledger's `at_cap`: counted, never in flight; 503 for Triton
unreachable counts as the gRPC relay counts its UNAVAILABLE answers (started and ended at
once). The other answers of the proxy's own count nowhere. When the connection ends
(`client_closed`, `upstream_closed`, a malformed body, garbage from Triton), the ledger's
`lost` ends whatever is still open: 499 (client gone), 502 (Triton gone), untimed, so
nothing stays in flight.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import httptools

from tritonpilot.proxy.ledger import HTTP_TOO_MANY_REQUESTS, Ledger, Ticket
from tritonpilot.proxy.restrict import MODEL_CONTROL_REFUSAL, Restriction
from tritonpilot.proxy.shedding import InflightCaps, refusal_message
from tritonpilot.proxy.stats import HTTP_CLIENT_CLOSED, HTTP_UPSTREAM_FAILED

# Triton's own routes (server src/http_server.cc, HTTPAPIServer::Handle), matched on the
# raw path as Triton matches them: Triton does not URL-decode a model name.
_MODEL_ROUTE = re.compile(
    r"/v2/models/([^/]+)(?:/versions/([0-9]+))?(?:/(infer|generate|generate_stream|ready|config|stats|trace/setting))?")
_SERVER_ROUTE = re.compile(r"/v2(?:/health/(live|ready))?")
_SHM_ROUTE = re.compile(r"/v2/(?:system|cuda)sharedmemory(?:/region/([^/]+))?/(status|register|unregister)")
_REPOSITORY_ROUTE = re.compile(r"/v2/repository(?:/([^/]+))?/(index|models/([^/]+)/(load|unload))")
INFERENCE_KINDS = frozenset({"infer", "generate", "generate_stream"})

# What a response's status line may say before its headers (1 MiB is far past any
# header block Triton writes); past it, Triton is taken as not speaking HTTP.
_MAX_RESPONSE_HEAD_BYTES = 1 << 20
_MAX_CHUNK_LINE_BYTES = 4096
_MAX_TRAILER_BYTES = 64 * 1024

_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 413: "Payload Too Large",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 501: "Not Implemented",
            503: "Service Unavailable"}

# Triton unreachable: what it answers and counts (the HTTP status of gRPC's UNAVAILABLE).
HTTP_UNAVAILABLE = 503


@functools.lru_cache(maxsize=256)  # pure; clients repeat a few paths (bounded: paths come from them)
def route(path: str) -> tuple[str | None, str | None, str | None]:
    """(protocol group as Triton's restricted APIs name it, model, kind) of a request path.
    kind is the model route's last part ("infer", "config", "" for metadata), "load" or
    "unload" for model control; None where the path has none. Group None: Triton's 404."""
    if path == "/v2/models/stats":
        return "statistics", None, None
    if path == "/v2/logging":
        return "logging", None, None
    m = _MODEL_ROUTE.fullmatch(path)
    if m is not None:
        model, version, kind = m.group(1), m.group(2), m.group(3) or ""
        group = {"ready": "health", "infer": "inference", "generate": "inference", "generate_stream": "inference",
                 "config": "model-config", "stats": "statistics", "": "metadata"}.get(kind)
        if kind == "trace/setting":
            group = "trace" if version is None else None
        if group is not None:
            return group, model, kind
    if path == "/v2":
        return "metadata", None, None
    if _SERVER_ROUTE.fullmatch(path):
        return "health", None, None
    if _SHM_ROUTE.fullmatch(path):
        return "shared-memory", None, None
    m = _REPOSITORY_ROUTE.fullmatch(path)
    if m is not None:
        return "model-repository", m.group(3), m.group(4)
    if path == "/v2/trace/setting":
        return "trace", None, None
    return None, None, None


class RequestHead(NamedTuple):
    """A request's head, as read. Immutable; a NamedTuple rather than a frozen dataclass because
    one is made per request, and a frozen dataclass's __init__ costs twice a tuple's."""
    method: bytes                          # b"POST"
    target: bytes                          # the request target as sent, query included
    path: str                              # the target without its query
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased, values as sent
    group: str | None                      # Triton's protocol group of the path (route())
    model: str | None
    kind: str | None

    @property
    def counted(self) -> bool:
        """Inference requests count in flight, per model (as the gRPC relay counts ModelInfer)."""
        return self.model is not None and self.kind in INFERENCE_KINDS

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True)
class Refusal:
    """An answer the proxy gives itself, in Triton's format: `{"error": message}`."""
    status: int
    message: str
    close: bool = False  # close the connection after it (e.g. Triton unreachable)
    # Triton's restricted-API answer sets no content type: libevhtp then writes its length
    # first and "Content-Type: text/plain". True: write it that way, byte for byte.
    untyped: bool = False


_DRAINING = Refusal(HTTP_UNAVAILABLE, "tritonpilot: the proxy is shutting down this connection; retry", close=True)


class HttpDoor:
    """Triton's --http-restricted-api rules by protocol group (the same groups as gRPC's):
    a request of a restricted group without the header `KEY: VALUE` gets what Triton answers,
    403 `{"error":"This API is restricted, expecting header 'KEY'"}` (server
    src/http_server.cc, RespondIfRestricted, Triton 2.51)."""

    __slots__ = ("_by_group",)

    def __init__(self, restrictions: Sequence[Restriction]) -> None:
        self._by_group: dict[str, tuple[bytes, bytes, str]] = {}
        for r in restrictions:
            message = f"This API is restricted, expecting header '{r.key}'"
            for group in r.groups:
                self._by_group[group] = (r.key.lower().encode(), r.value.encode(), message)

    def refusal(self, head: RequestHead) -> str | None:
        rule = self._by_group.get(head.group) if head.group is not None else None
        if rule is None:
            return None
        name, value, message = rule
        return None if head.header(name) == value else message


@dataclass(frozen=True, slots=True)
class HttpRules:
    """What the core enforces at each request head; the shell swaps them live (a policy reload)."""
    allow_client_model_control: bool = False
    # None = no limit: a Content-Length past it is answered 413 (chunked bodies are not measured).
    max_message_bytes: int | None = None
    # Triton's --http-restricted-api rules; None = none.
    door: HttpDoor | None = None
    # Per-model caps on requests in flight (shedding.py); None = no cap.
    caps: InflightCaps | None = None


def error_response(status: int, message: str, close: bool = False, untyped: bool = False) -> bytes:
    """Triton's error response: JSON `{"error": ...}` with its length, its headers in Triton's order."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    if untyped:
        lines += [f"Content-Length: {len(body)}", "Content-Type: text/plain"]
    else:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Malformed(Exception):
    """Bytes that are not HTTP/1.1 as the relay must understand it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---- body framing ------------------------------------------------------------------------

class _Kind(enum.Enum):
    NONE = 0
    LENGTH = 1
    CHUNKED = 2
    UNTIL_CLOSE = 3


class _Chunk(enum.Enum):
    SIZE = 0
    DATA = 1
    DATA_END = 2
    TRAILER = 3


class Body:
    """Where one message body ends: Content-Length, chunked (with trailers) or the close."""

    __slots__ = ("kind", "left", "state", "line", "trailer_bytes")

    def __init__(self, kind: _Kind, length: int = 0) -> None:
        self.kind = kind
        self.left = length
        self.state = _Chunk.SIZE
        self.line = bytearray()
        self.trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self.kind is _Kind.NONE or (self.kind is _Kind.LENGTH and self.left == 0)

    def feed(self, data: bytes | memoryview, pos: int) -> tuple[int, bool]:
        """Consume body bytes from data[pos:]: (position after them, body complete)."""
        n = len(data)
        kind = self.kind
        if kind is _Kind.NONE:
            return pos, True
        if kind is _Kind.UNTIL_CLOSE:
            return n, False
        if kind is _Kind.LENGTH:
            take = min(self.left, n - pos)
            self.left -= take
            return pos + take, self.left == 0
        while pos < n:
            state = self.state
            if state is _Chunk.DATA:
                take = min(self.left, n - pos)
                self.left -= take
                pos += take
                if self.left == 0:
                    self.state = _Chunk.DATA_END
                continue
            end = bytes(data[pos:pos + _MAX_CHUNK_LINE_BYTES + 2]).find(b"\n")
            if end < 0:
                self.line += data[pos:]
                if len(self.line) > _MAX_CHUNK_LINE_BYTES:
                    raise Malformed("chunk line too long")
                return n, False
            self.line += data[pos:pos + end + 1]
            pos += end + 1
            line, self.line = bytes(self.line), bytearray()
            if not line.endswith(b"\r\n"):
                raise Malformed("chunk line not ended by CRLF")
            line = line[:-2]
            if state is _Chunk.DATA_END:
                if line:
                    raise Malformed("chunk data longer than its size")
                self.state = _Chunk.SIZE
            elif state is _Chunk.SIZE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
                    raise Malformed(f"bad chunk size {size[:20]!r}")
                self.left = int(size, 16)
                self.state = _Chunk.DATA if self.left else _Chunk.TRAILER
            else:  # trailer lines, until an empty one
                if not line:
                    return pos, True
                self.trailer_bytes += len(line)
                if self.trailer_bytes > _MAX_TRAILER_BYTES:
                    raise Malformed("trailers too large")
        return pos, False


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[list[bytes], list[bytes]]:
    """(Transfer-Encoding values, Content-Length values) of a head, each in order: one pass."""
    te: list[bytes] = []
    lengths: list[bytes] = []
    for k, v in headers:
        if k == b"content-length":
            lengths.append(v)
        elif k == b"transfer-encoding":
            te.append(v)
    return te, lengths


def _content_length(values: list[bytes]) -> int | None:
    if not values:
        return None
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])  # the usual head: what the loop below makes of it, in one step
    parsed = set()
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part.isdigit() or len(part) > 18:
                raise Malformed(f"bad Content-Length {value[:30]!r}")
            parsed.add(int(part))
    if len(parsed) != 1:
        raise Malformed("several different Content-Length values")
    return parsed.pop()


def request_body(headers: list[tuple[bytes, bytes]]) -> Body:
    """How a request's body is framed (RFC 9112, 6.3), strictly."""
    te, lengths = _framing(headers)
    length = _content_length(lengths)
    if te:
        if length is not None:
            raise Malformed("both Transfer-Encoding and Content-Length")
        codings = [c.strip(b" \t").lower() for v in te for c in v.split(b",") if c.strip(b" \t")]
        if not codings or codings[-1] != b"chunked":  # RFC 9112, 6.3: the length can't be known
            raise Malformed(f"Transfer-Encoding {b', '.join(codings)[:40]!r} does not end in chunked")
        if codings != [b"chunked"]:
            raise Malformed(f"unsupported Transfer-Encoding {b', '.join(codings)[:40]!r}", 501)
        return Body(_Kind.CHUNKED)
    return Body(_Kind.LENGTH, length) if length else Body(_Kind.NONE)


def response_body(method: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> Body:
    """How a response's body is framed. Not by RFC 9112 for HEAD: Triton 2.51 (libevhtp)
    answers every HEAD with 405 and a JSON body its Content-Length announces, so a HEAD
    response is framed by its headers like any other (the proxy's own answers do the same)."""
    if status < 200 or status in (204, 304):
        return Body(_Kind.NONE)
    te_values, lengths = _framing(headers)
    if te_values:
        te = [c.strip(b" \t").lower() for v in te_values for c in v.split(b",")]
        te = [c for c in te if c]
        if te:
            return Body(_Kind.CHUNKED) if te[-1] == b"chunked" else Body(_Kind.UNTIL_CLOSE)
    length = _content_length(lengths)
    if length is None:
        return Body(_Kind.UNTIL_CLOSE)
    return Body(_Kind.LENGTH, length) if length else Body(_Kind.NONE)


# ---- heads -------------------------------------------------------------------------------

class _HeadCollector:
    """httptools callbacks for one head."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request_head(raw: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(method, target, headers) of a complete request head. Raises Malformed."""
    collector = _HeadCollector()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # Upgrade / CONNECT: the head is read; Triton answers it as it likes
    except httptools.HttpParserError as exc:
        if not collector.complete:  # llhttp pauses after a complete Upgrade/CONNECT head
            raise Malformed(f"malformed request: {exc}") from None
    if not collector.complete:
        raise Malformed("malformed request head")
    return parser.get_method(), collector.url, collector.headers


def check_partial_request_head(raw: bytes) -> None:
    """Raise Malformed when these first bytes of a head can't start a valid one (a TLS
    ClientHello on the plaintext port, garbage), rather than waiting for more."""
    parser = httptools.HttpRequestParser(_HeadCollector())
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise Malformed(f"malformed request: {exc}") from None


def parse_response_head(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    collector = _HeadCollector()
    parser = httptools.HttpResponseParser(collector)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        if not collector.complete:  # llhttp pauses after a complete 101 head
            raise Malformed(f"malformed response from Triton: {exc}") from None
    if not collector.complete:
        raise Malformed("malformed response head from Triton")
    return parser.get_status_code(), collector.headers


def _head_end(buf: bytearray, start: int) -> int:
    """Index just past the blank line ending a head in buf, or -1."""
    i = buf.find(b"\r\n\r\n", max(0, start - 3))
    return -1 if i < 0 else i + 4


def with_connection_close(head: bytes) -> bytes:
    """A response head (ending in a blank line) with `Connection: close` in place of any
    Connection header it had."""
    lines = head[:-4].split(b"\r\n")
    kept = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() != b"connection"]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


# ---- one client connection -----------------------------------------------------------------

@dataclass(slots=True)
class Exchange:
    """One request and its response, in the connection's FIFO."""
    head: RequestHead | None
    ticket: Ticket | None = None   # the ledger's, for requests counted in flight
    answer: bytes | None = None    # the proxy's own answer; None: Triton answers
    close_after: bool = False
    status: int | None = None      # the final status, once Triton's head is read


@dataclass
class _Side:
    buf: bytearray = field(default_factory=bytearray)
    body: Body | None = None       # the body being passed, None between messages


class HttpExchanges:
    """One client connection and its upstream connection, without I/O. `ledger`: the
    connection's (ledger.Ledger(stats, "http")), which counts its requests."""

    def __init__(self, ledger: Ledger, rules: HttpRules | None = None, max_head_bytes: int = 64 * 1024) -> None:
        self.ledger = ledger
        self.reconfigure(rules if rules is not None else HttpRules())
        self.max_head_bytes = max_head_bytes
        self.unreachable: str | None = None  # why Triton can't be reached: every request gets 503
        self.fifo: deque[Exchange] = deque()
        self._req = _Side()
        self._resp = _Side()
        self._dropping = False          # the request being read was answered here: its body is dropped
        self._scanned = 0               # head bytes already searched for the blank line
        self._resp_scanned = 0
        self._forwarded_open = 0        # requests sent to Triton and not yet answered in full
        self._held = bytearray()        # pipelined client bytes waiting for those answers
        self._out_up: list[bytes] = []
        self._out_client: list[bytes] = []
        self.requests_seen = 0
        self.client_done = False        # no more client bytes are read (malformed, refused-and-close)
        self.close_client = False       # the shell closes the client once it has written to_client
        self.close_upstream = False
        self.tunnel = False             # 101 Switching Protocols: bytes pass unread both ways
        self.draining = False           # goaway(): new requests are answered 503 and the connection closes
        self.closed = False
        self.abort_reason: str | None = None

    def reconfigure(self, rules: HttpRules) -> None:
        """New rules for the requests whose head arrives from now on."""
        self.rules = rules
        self.caps = rules.caps if rules.caps is not None and rules.caps.enabled else None

    def upstream_unreachable(self, reason: str) -> None:
        """Triton can't be reached: every request is answered 503 with `reason`, and the
        connection closes, so the client's next connection tries Triton again."""
        self.unreachable = reason

    # ---- output -------------------------------------------------------------------------

    def take_upstream(self) -> list[bytes]:
        out, self._out_up = self._out_up, []
        return out

    def take_client(self) -> list[bytes]:
        out, self._out_client = self._out_client, []
        return out

    @property
    def open_requests(self) -> int:
        return len(self.fifo)

    @property
    def mid_request(self) -> bool:
        """Part of a request has arrived and not the rest."""
        return bool(self._req.buf) or self._req.body is not None

    # ---- client -> Triton ---------------------------------------------------------------

    def client_data(self, data: bytes, now_s: float) -> None:
        if self.closed or self.client_done:
            return
        if self.tunnel:
            self._out_up.append(data)
            return
        if self._held:
            self._held += data
            return
        try:
            self._client_bytes(data, now_s)
        except Malformed as exc:
            self._refuse_connection(exc.status, str(exc), now_s)

    @property
    def held_bytes(self) -> int:
        """Client bytes of pipelined requests held until Triton has answered the one before."""
        return len(self._held)

    def _release_held(self, now_s: float) -> None:
        held, self._held = bytes(self._held), bytearray()
        try:
            self._client_bytes(held, now_s)
        except Malformed as exc:
            self._refuse_connection(exc.status, str(exc), now_s)

    def _client_bytes(self, data: bytes, now_s: float) -> None:
        side = self._req
        pos, n = 0, len(data)
        view = memoryview(data)
        while pos < n and not self.client_done and not self.closed:
            if side.body is not None:
                start = pos
                try:
                    pos, done = side.body.feed(view, pos)
                except Malformed as exc:
                    # Part of this request went to Triton already: no clean answer is possible.
                    self._abort(now_s, exc.status, reason=str(exc))
                    return
                if not self._dropping and pos > start:
                    self._out_up.append(data if start == 0 and pos == n else data[start:pos])
                if done:
                    side.body = None
                    self._dropping = False
                continue
            if not side.buf:  # between requests: skip the empty lines RFC 9112 (2.2) allows
                while pos < n and data[pos] in b"\r\n":
                    pos += 1
                if pos == n:
                    break
                if self._forwarded_open:
                    # Pipelined: Triton 2.51 drops requests pipelined behind one without a body
                    # (measured), so it gets the next request once it has answered this one.
                    self._held += view[pos:]
                    return
            if not side.buf and (end := data.find(b"\r\n\r\n", pos)) >= 0:
                # The whole head is in this read: taken from it, without the buffer's copies.
                end += 4
                raw = data[pos:end]
                pos = end
            else:
                before = len(side.buf)
                side.buf += view[pos:]
                end = _head_end(side.buf, self._scanned)
                if end < 0:
                    if len(side.buf) > self.max_head_bytes:
                        raise Malformed(f"request head larger than {self.max_head_bytes} bytes", 431)
                    self._scanned = len(side.buf)
                    if before < 1024:  # the start of a head that can't become one: 400 now (bounded work)
                        check_partial_request_head(bytes(side.buf))
                    return
                pos += end - before
                raw = bytes(side.buf[:end])
                side.buf = bytearray()
                self._scanned = 0
            if len(raw) > self.max_head_bytes:
                raise Malformed(f"request head larger than {self.max_head_bytes} bytes", 431)
            self._request_head(raw, now_s)

    def _request_head(self, raw: bytes, now_s: float) -> None:
        method, target, headers = parse_request_head(raw)
        body = request_body(headers)  # raises before anything of this request is sent
        path = target.split(b"?", 1)[0].decode("latin-1")
        group, model, kind = route(path)
        head = RequestHead(method, target, path, tuple(headers), group, model, kind)
        self.requests_seen += 1
        refusal = _DRAINING if self.draining else self._refusal(head, now_s)
        if refusal is not None:
            # Expect: 100-continue and a refusal: the client may or may not send the body.
            close = refusal.close or (not body.done and head.header(b"expect") is not None)
            answer = error_response(refusal.status, refusal.message, close, refusal.untyped)
            self._queue_answer(head, now_s, answer, close)
            if close:
                self.client_done = True
                return
            self._dropping = True
        else:
            exchange = Exchange(head)
            if model is not None and kind in INFERENCE_KINDS:  # head.counted
                exchange.ticket = self.ledger.started(model, now_s)
            self.fifo.append(exchange)
            self._forwarded_open += 1
            self._out_up.append(raw)
        if not body.done:
            self._req.body = body
        else:
            self._dropping = False

    def _refusal(self, head: RequestHead, now_s: float) -> Refusal | None:
        """What the proxy answers this request itself (counted where it counts), or None."""
        rules = self.rules
        if rules.door is not None:
            message = rules.door.refusal(head)
            if message is not None:
                return Refusal(403, message, untyped=True)
        if head.kind in ("load", "unload") and head.method == b"POST" and not rules.allow_client_model_control:
            return Refusal(403, MODEL_CONTROL_REFUSAL)
        if rules.max_message_bytes is not None:
            length = head.header(b"content-length")
            if length is not None and length.isdigit() and int(length) > rules.max_message_bytes:
                return Refusal(413, f"tritonpilot: request body larger than max "
                                    f"({int(length)} vs. {rules.max_message_bytes})")
        if self.unreachable is not None:
            if head.counted:
                assert head.model is not None
                # As the gRPC relay counts its UNAVAILABLE answers: a request that started and
                # ended at once (it counts in the latency histogram, as Triton answering at once).
                ledger = self.ledger
                ledger.ended(ledger.started(head.model, now_s), HTTP_UNAVAILABLE, now_s)
            return Refusal(HTTP_UNAVAILABLE, self.unreachable, close=True)
        if self.caps is not None and head.counted:
            assert head.model is not None
            shed = self.ledger.at_cap(head.model, self.caps.cap, now_s)
            if shed is not None:
                return Refusal(HTTP_TOO_MANY_REQUESTS, refusal_message(*shed))
        return None

    def _queue_answer(self, head: RequestHead | None, now_s: float, answer: bytes, close: bool) -> None:
        self.fifo.append(Exchange(head, answer=answer, close_after=close))
        self._flush_answers()

    def _refuse_connection(self, status: int, message: str, now_s: float) -> None:
        """A malformed request head: answer it (after what earlier requests are owed) and close."""
        self._req = _Side()
        self._queue_answer(None, now_s, error_response(status, f"tritonpilot: {message}", close=True), True)
        self.client_done = True

    def _flush_answers(self) -> None:
        """Write the proxy's own answers that are at the head of the FIFO."""
        while self.fifo and self.fifo[0].answer is not None:
            exchange = self.fifo.popleft()
            assert exchange.answer is not None
            self._out_client.append(exchange.answer)
            if exchange.close_after:
                self.close_client = True
                self.close_upstream = True
                self.fifo.clear()
                return
        if self.draining and not self.fifo:
            self.close_client = self.close_upstream = True

    # ---- Triton -> client ---------------------------------------------------------------

    def upstream_data(self, data: bytes, now_s: float) -> None:
        if self.closed:
            return
        if self.tunnel:
            self._out_client.append(data)
            return
        try:
            self._upstream_bytes(data, now_s)
        except Malformed as exc:
            self._abort(now_s, HTTP_UPSTREAM_FAILED, reason=str(exc))

    def _upstream_bytes(self, data: bytes, now_s: float) -> None:
        side = self._resp
        pos, n = 0, len(data)
        view = memoryview(data)
        start = 0  # the first byte of data not yet written to the client
        while pos < n and not self.closed:
            if side.body is not None:
                pos, done = side.body.feed(view, pos)
                if done:
                    side.body = None
                    self._out_client.append(data[start:pos])
                    start = pos
                    self._response_done(now_s)
                continue
            if not self.fifo or self.fifo[0].answer is not None:
                raise Malformed("Triton sent a response no request waits for")
            exchange = self.fifo[0]
            head_at = -1  # where the head starts in data, when all of it is in this read
            if not side.buf and (end := data.find(b"\r\n\r\n", pos)) >= 0:
                end += 4  # the whole head is in this read (as for requests)
                raw = data[pos:end]
                head_at, pos = pos, end
            else:
                before = len(side.buf)
                side.buf += view[pos:]
                end = _head_end(side.buf, self._resp_scanned)
                if end < 0:
                    if len(side.buf) > _MAX_RESPONSE_HEAD_BYTES:
                        raise Malformed("response head too large")
                    self._resp_scanned = len(side.buf)
                    pos = n
                    break
                pos += end - before
                raw = bytes(side.buf[:end])
                side.buf = bytearray()
                self._resp_scanned = 0
            status, headers = parse_response_head(raw)
            if status == 101:  # Switching Protocols: from here on, bytes pass unread
                self._out_client.append(data[start:])
                exchange.status = status
                self._response_done(now_s)
                self.tunnel = True
                return
            if status < 200:
                continue  # interim (100 Continue): forwarded, the request stays open
            exchange.status = status
            last = len(self.fifo) == 1 and not self._held and not self.mid_request
            if self.draining and head_at >= 0 and last:
                # The last response this connection owes: say that the connection closes after
                # it, so that the client does not send its next request into the close.
                if head_at > start:
                    self._out_client.append(data[start:head_at])
                self._out_client.append(with_connection_close(raw))
                start = pos
            method = exchange.head.method if exchange.head is not None else b"GET"
            body = response_body(method, status, headers)
            if body.done:
                self._out_client.append(data[start:pos])
                start = pos
                self._response_done(now_s)
            else:
                side.body = body
        if start < n and not self.closed:
            self._out_client.append(data[start:] if start else data)

    def _response_done(self, now_s: float) -> None:
        exchange = self.fifo.popleft()
        self._forwarded_open -= 1
        if exchange.ticket is not None:
            status = exchange.status if exchange.status is not None else HTTP_UPSTREAM_FAILED
            self.ledger.ended(exchange.ticket, status, now_s)
        self._flush_answers()
        if self._held and not self._forwarded_open and not self.closed and not self.client_done:
            self._release_held(now_s)

    # ---- the ends of the connection -----------------------------------------------------

    def client_closed(self, now_s: float) -> None:
        """The client went away: what it still waited for ends as 499."""
        self._abort(now_s, HTTP_CLIENT_CLOSED)

    def upstream_closed(self, now_s: float) -> None:
        """Triton closed: a response that ends at the close ends now, normally; the others 502."""
        if self.closed:
            return
        body = self._resp.body
        if body is not None and body.kind is _Kind.UNTIL_CLOSE and self.fifo:
            self._resp.body = None
            self._response_done(now_s)
        self._abort(now_s, HTTP_UPSTREAM_FAILED)

    def _abort(self, now_s: float, status: int, reason: str | None = None) -> None:
        """Both connections close; every request still open ends with `status`, untimed."""
        self.ledger.lost(status, now_s)
        self.fifo.clear()
        self._forwarded_open = 0
        self._held = bytearray()
        self.closed = True
        self.close_client = self.close_upstream = True
        self.abort_reason = reason

    def goaway(self) -> None:
        """Graceful close: open requests finish; new ones get 503 with Connection: close;
        the connection closes once nothing is owed."""
        self.draining = True
        if not self.fifo and not self.mid_request:
            self.close_client = self.close_upstream = True
