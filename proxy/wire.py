"""The little the proxy reads of gRPC messages: framing, and a few protobuf fields.

The relay forwards bytes verbatim and only peeks: the model name at the start
of each ModelInferRequest, and on ModelStreamInfer responses the model name
and Triton's `triton_final_response` flag. Protobuf writes fields in number
order, so everything needed sits in the first few hundred bytes of a message,
before any tensor data. Parsers here never raise on garbage: they return None.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from urllib.parse import quote

# The RPCs the relay tells apart, by :path, and the gRPC status codes it answers with.
SERVICE = b"/inference.GRPCInferenceService/"
MODEL_INFER = SERVICE + b"ModelInfer"
MODEL_STREAM_INFER = SERVICE + b"ModelStreamInfer"
MODEL_CONTROL = {SERVICE + b"RepositoryModelLoad", SERVICE + b"RepositoryModelUnload"}
HEALTH_CHECK = b"/grpc.health.v1.Health/Check"
HEALTH_WATCH = b"/grpc.health.v1.Health/Watch"

GRPC_OK, GRPC_CANCELLED, GRPC_UNKNOWN, GRPC_DEADLINE_EXCEEDED = 0, 1, 2, 4
GRPC_PERMISSION_DENIED, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED, GRPC_UNAVAILABLE = 7, 8, 12, 14

# How many bytes of each message the scanners keep for peeking.
HEAD_BYTES = 1024

# Protobuf wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); raises IndexError/ValueError on truncated or overlong input."""
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def iter_fields(buf: bytes, cut_last: bool = False):
    """Yield (field number, wire type, value) of a protobuf message prefix.

    value is an int for varints and fixed-size fields, and a bytes slice for
    length-delimited ones. Stops quietly where the prefix is cut off; with
    cut_last, a length-delimited field the prefix cuts is yielded first with
    what there is of it, so that a nested message's own first fields can be
    read (a ModelStreamInferResponse is one big field around the response).
    """
    pos, end = 0, len(buf)
    value: int | bytes
    try:
        while pos < end:
            key, pos = _varint(buf, pos)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                value, pos = _varint(buf, pos)
            elif wire == _LEN:
                size, pos = _varint(buf, pos)
                if pos + size > end:
                    if cut_last and pos < end:
                        yield number, wire, buf[pos:end]
                    return
                value, pos = buf[pos:pos + size], pos + size
            elif wire == _I64:
                value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
            elif wire == _I32:
                value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
            else:
                return  # groups are not used by Triton's protos; treat as garbage
            if pos > end:
                return
            yield number, wire, value
    except (IndexError, ValueError):
        return


def _decode_str(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def request_model_name(head: bytes) -> str | None:
    """ModelInferRequest.model_name (field 1) from a message prefix."""
    return request_model_and_id(head)[0]


def request_model_and_id(head: bytes) -> tuple[str | None, str]:
    """(model_name, id) of a ModelInferRequest prefix: fields 1 and 3 ("" when absent)."""
    # The usual request, read without the field loop (its generator and varints were ~15% of
    # the gRPC core's time per call): model_name first, its key and length one byte each,
    # then no more bytes or a one-byte key of a field past id (3). The loop would stop at
    # that key (or at garbage there) with the same answer: _request_fields says the same of
    # every prefix (tested).
    if len(head) > 1 and head[0] == 0x0A and head[1] < 0x80:
        end = 2 + head[1]
        if end == len(head) or (end < len(head) and 0x20 <= head[end] < 0x80):
            return _decode_str(head[2:end]), ""
    return _request_fields(head)


def _request_fields(head: bytes) -> tuple[str | None, str]:
    """request_model_and_id, field by field."""
    model: str | None = None
    request_id = ""
    for number, wire, value in iter_fields(head):
        if number == 1 and wire == _LEN:
            model = _decode_str(value)
        elif number == 3 and wire == _LEN:
            request_id = _decode_str(value) or ""
        elif number > 3:
            break
    return model, request_id


def stream_response_info(head: bytes) -> tuple[str | None, str, bool | None, bool]:
    """(model name, request id, triton_final_response, has error) of a ModelStreamInferResponse
    prefix; the id is "" when absent.

    ModelStreamInferResponse: error_message = 1, infer_response = 2.
    ModelInferResponse: model_name = 1, id = 3, parameters = 4 (map<string, InferParameter>),
    InferParameter.bool_param = 1. Triton sets triton_final_response on every
    stream response (true when the request is complete). Its error responses carry
    the request's id but no model name.
    """
    model: str | None = None
    request_id = ""
    final: bool | None = None
    error = False
    # The response's start is read even when its tensors run past the peek; a map entry
    # the peek cuts is not read (a cut flag must not read as false).
    for number, wire, value in iter_fields(head, cut_last=True):
        if number == 1 and wire == _LEN:
            error = len(value) > 0
        elif number == 2 and wire == _LEN:
            for n2, w2, v2 in iter_fields(value):
                if n2 == 1 and w2 == _LEN:
                    model = _decode_str(v2)
                elif n2 == 3 and w2 == _LEN:
                    request_id = _decode_str(v2) or ""
                elif n2 == 4 and w2 == _LEN:
                    key = param_value = None
                    for n3, w3, v3 in iter_fields(v2):
                        if n3 == 1 and w3 == _LEN:
                            key = v3
                        elif n3 == 2 and w3 == _LEN:
                            param_value = v3
                    if key == b"triton_final_response" and param_value is not None:
                        final = False
                        for n4, w4, v4 in iter_fields(param_value):
                            if n4 == 1 and w4 == _VARINT:
                                final = bool(v4)
                elif n2 >= 5:
                    break  # outputs and tensor data follow; nothing more to read
    return model, request_id, final, error


def decompress_head(head: bytes, encoding: bytes | None) -> bytes | None:
    """The start of a compressed message's payload, or None where it can't be read."""
    if encoding == b"gzip":
        wbits = 31
    elif encoding == b"deflate":
        wbits = 15
    else:
        return None
    try:
        return zlib.decompressobj(wbits).decompress(head, HEAD_BYTES)
    except zlib.error:
        return None


class MessageScanner:
    """Follows gRPC message boundaries (1-byte flag, 4-byte length, payload) through
    a stream's DATA bytes, fed in arbitrary pieces, and calls
    `on_message(head, compressed, length)` once per message with its first
    HEAD_BYTES bytes (or all of it, if shorter); what it returns is ignored."""

    __slots__ = ("_prefix", "_left", "_head", "_head_want", "_compressed", "_length", "on_message")

    def __init__(self, on_message: Callable[[bytes, bool, int], object]) -> None:
        self.on_message = on_message
        self._prefix = b""
        self._left = 0  # payload bytes of the current message still to come
        self._head = b""
        self._head_want = 0
        self._compressed = False
        self._length = 0

    @property
    def at_boundary(self) -> bool:
        """Between two messages: bytes written now would not land inside one."""
        return self._left == 0 and self._head_want == 0 and not self._prefix

    def feed(self, data: memoryview | bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._left == 0 and self._head_want == 0:
                if not self._prefix and n - i > 5:
                    # A message starts here, its prefix whole: when its head is here too (a
                    # unary request's one message mostly is), it is read in one step, the
                    # state at on_message as the piecewise path leaves it.
                    length = int.from_bytes(data[i + 1:i + 5], "big")
                    want = HEAD_BYTES if length > HEAD_BYTES else length
                    if n - i - 5 >= want:
                        compressed = data[i] == 1
                        i += 5
                        self._compressed, self._length, self._left, self._head = compressed, length, length, b""
                        self.on_message(bytes(data[i:i + want]), compressed, length)
                        take = min(length, n - i)
                        i += take
                        self._left -= take
                        continue
                take = min(5 - len(self._prefix), n - i)
                self._prefix += bytes(data[i:i + take])
                i += take
                if len(self._prefix) < 5:
                    return
                self._compressed = self._prefix[0] == 1
                self._length = self._left = int.from_bytes(self._prefix[1:5], "big")
                self._prefix = b""
                self._head = b""
                self._head_want = min(HEAD_BYTES, self._left)
                if self._head_want == 0:
                    self.on_message(b"", self._compressed, 0)
                continue
            take = min(self._left, n - i)
            if self._head_want:
                part = bytes(data[i:i + min(take, self._head_want - len(self._head))])
                self._head += part
                if len(self._head) == self._head_want:
                    self._head_want = 0
                    self.on_message(self._head, self._compressed, self._length)
            i += take
            self._left -= take


class MessageGate:
    """Follows gRPC message boundaries like MessageScanner, and keeps or drops each message
    whole: its bytes are held until its head is in (HEAD_BYTES, or all of a shorter one),
    then `decide(head, compressed, length)` says whether it passes (True) or not (False).

    `feed(data)` returns (bytes that pass, in order; how many were dropped). Bytes of a
    message still undecided are held (`held` of them) until a later feed, or `flush()`.
    Every byte fed comes out once: passed, dropped, or flushed."""

    __slots__ = ("decide", "_prefix", "_held", "_left", "_head_want", "_compressed", "_length", "_passing")

    def __init__(self, decide: Callable[[bytes, bool, int], bool]) -> None:
        self.decide = decide
        self._prefix = b""          # the message's first 5 bytes, while they come in
        self._held = bytearray()    # prefix + head of the undecided message
        self._left = 0              # payload bytes of the current message still to come
        self._head_want = 0         # head bytes still to come before the decision
        self._compressed = False
        self._length = 0
        self._passing = True

    @property
    def held(self) -> int:
        return len(self._prefix) + len(self._held)

    def flush(self) -> bytes:
        """The held bytes, released as they are (the gate is no longer asked about this
        message: the rest of it passes)."""
        out = self._prefix + bytes(self._held)
        self._prefix = b""
        self._held = bytearray()
        if self._head_want:
            self._head_want = 0
            self._passing = True
        return out

    def _decided(self, kept: bytearray) -> int:
        self._passing = bool(self.decide(bytes(self._held[5:]), self._compressed, self._length))
        held, self._held = self._held, bytearray()
        if self._passing:
            kept += held
            return 0
        return len(held)

    def feed(self, data: memoryview | bytes) -> tuple[bytes, int]:
        kept = bytearray()
        dropped = 0
        i, n = 0, len(data)
        while i < n:
            if self._head_want:  # undecided: hold the head
                take = min(self._head_want, n - i)
                self._held += data[i:i + take]
                i += take
                self._left -= take
                self._head_want -= take
                if not self._head_want:
                    dropped += self._decided(kept)
                continue
            if self._left:
                take = min(self._left, n - i)
                if self._passing:
                    kept += data[i:i + take]
                else:
                    dropped += take
                i += take
                self._left -= take
                continue
            take = min(5 - len(self._prefix), n - i)
            self._prefix += bytes(data[i:i + take])
            i += take
            if len(self._prefix) < 5:
                break
            self._compressed = self._prefix[0] == 1
            self._length = self._left = int.from_bytes(self._prefix[1:5], "big")
            self._held = bytearray(self._prefix)
            self._prefix = b""
            self._head_want = min(HEAD_BYTES, self._left)
            if not self._head_want:
                dropped += self._decided(kept)
        return bytes(kept), dropped


def stream_error_response(message: str, request_id: str) -> bytes:
    """A ModelStreamInferResponse as Triton writes a request's error on a stream:
    error_message (1), and infer_response (2) carrying only the request's id (3)."""
    rid = request_id.encode()
    infer = (b"\x1a" + _encode_varint(len(rid)) + rid) if rid else b""
    text = message.encode()
    return (b"\x0a" + _encode_varint(len(text)) + text
            + b"\x12" + _encode_varint(len(infer)) + infer)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def grpc_status_headers(code: int, message: str) -> list[tuple[bytes, bytes]]:
    return [(b"grpc-status", str(code).encode()),
            (b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())]
