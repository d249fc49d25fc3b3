"""The little the relay reads of gRPC messages (proxy/wire.py) and how it matches stream
responses to requests: tables against real protobuf encodings, and garbage that must
never raise."""

from __future__ import annotations

import gzip
import zlib
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from tritonpilot.proxy import wire
from tritonpilot.proxy.grpc_core import _take_pending


def infer_request(model: str, request_id: str = "", tensor_bytes: int = 0) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version="1", id=request_id)
    request.parameters["sequence_id"].int64_param = 7
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[tensor_bytes // 4])
    request.raw_input_contents.append(b"\x01" * tensor_bytes)
    return request.SerializeToString()


def stream_response(model: str = "", request_id: str = "", final: bool | None = None, error: str = "",
                    extra_parameter_bytes: int = 0) -> bytes:
    response = service_pb2.ModelStreamInferResponse(error_message=error)
    if model or request_id or final is not None:
        response.infer_response.model_name = model
        response.infer_response.id = request_id
        if final is not None:
            response.infer_response.parameters["triton_final_response"].bool_param = final
        if extra_parameter_bytes:
            response.infer_response.parameters["big"].string_param = "x" * extra_parameter_bytes
        response.infer_response.raw_output_contents.append(b"\x02" * 4096)
    return response.SerializeToString()


@pytest.mark.parametrize("message, expected", [
    (infer_request("resnet"), ("resnet", "")),
    (infer_request("resnet", "req-1"), ("resnet", "req-1")),
    (infer_request("m\u00e9t\u00e9o", "\u00e9", tensor_bytes=1 << 20), ("m\u00e9t\u00e9o", "\u00e9")),
    (infer_request("", "only-id"), (None, "only-id")),  # proto3 leaves an empty name out
    (b"", (None, "")),
    (b"\x0a\x05ab", (None, "")),  # the name is cut off by the peek
    (b"\x0a\x02\xff\xfe", (None, "")),  # not UTF-8
])
def test_request_model_and_id(message: bytes, expected: tuple) -> None:
    assert wire.request_model_and_id(message[:wire.HEAD_BYTES]) == expected


@pytest.mark.parametrize("message, expected", [
    (stream_response("dec", "a", final=False), ("dec", "a", False, False)),
    (stream_response("dec", "a", final=True), ("dec", "a", True, False)),
    (stream_response("plain", "b"), ("plain", "b", None, False)),  # no flag: an older Triton
    # Triton's in-stream errors: the id, no model name.
    (stream_response(request_id="c", error="unknown model"), (None, "c", None, True)),
    (stream_response(error="bad"), (None, "", None, True)),
])
def test_stream_response_info(message: bytes, expected: tuple) -> None:
    assert wire.stream_response_info(message[:wire.HEAD_BYTES]) == expected


def infer_response(model: str = "", request_id: str = "", final: bool | None = None,
                   parameter_bytes: int = 0) -> bytes:
    response = service_pb2.ModelInferResponse(model_name=model, id=request_id)
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    if parameter_bytes:
        response.parameters["big"].string_param = "x" * parameter_bytes
    return response.SerializeToString()


def as_stream_response(infer_response_bytes: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response (field 2): these bytes}, written by hand so
    the bytes (and so the map entries' order) stay as given."""
    n, length = len(infer_response_bytes), b""
    while n >= 0x80:
        length, n = length + bytes((n & 0x7F | 0x80,)), n >> 7
    return b"\x12" + length + bytes((n,)) + infer_response_bytes


def test_final_flag_beyond_the_peek_is_not_seen() -> None:
    # Map entries are written in no fixed order; a large one ahead of the flag hides it.
    # Documented limit: the response then counts as final. Serialized messages concatenated
    # merge into one, so here the order is set by the test, not left to the encoder.
    big = 2 * wire.HEAD_BYTES
    flag_last = as_stream_response(infer_response("dec", "a", parameter_bytes=big) + infer_response(final=False))
    flag_first = as_stream_response(infer_response("dec", "a", final=False) + infer_response(parameter_bytes=big))
    for message in (flag_last, flag_first):  # the same response, the flag in it
        parsed = service_pb2.ModelStreamInferResponse.FromString(message).infer_response
        assert (parsed.model_name, parsed.id, parsed.parameters["triton_final_response"].bool_param) == (
            "dec", "a", False)
        assert parsed.parameters["triton_final_response"].HasField("bool_param")
    assert wire.stream_response_info(flag_last[:wire.HEAD_BYTES]) == ("dec", "a", None, False)
    assert wire.stream_response_info(flag_first[:wire.HEAD_BYTES]) == ("dec", "a", False, False)
    # As the encoder writes it, the flag is seen or not, but never read as something else.
    message = stream_response("dec", "a", final=False, extra_parameter_bytes=2 * wire.HEAD_BYTES)
    model, request_id, final, _ = wire.stream_response_info(message[:wire.HEAD_BYTES])
    assert (model, request_id) == ("dec", "a") and final in (False, None)


@pytest.mark.parametrize("encoding, compress", [
    (b"gzip", gzip.compress),
    (b"deflate", zlib.compress),
])
def test_decompress_head_reads_a_compressed_prefix(encoding: bytes, compress) -> None:
    message = infer_request("resnet", "r", tensor_bytes=64 << 10)
    head = compress(message)[:wire.HEAD_BYTES]
    plain = wire.decompress_head(head, encoding)
    assert plain == message[:len(plain)] and len(plain) > 0
    assert wire.request_model_and_id(plain) == ("resnet", "r")


def test_decompress_head_unknown_or_broken() -> None:
    assert wire.decompress_head(b"\x00" * 10, b"snappy") is None
    assert wire.decompress_head(b"\x00" * 10, None) is None
    assert wire.decompress_head(b"not gzip at all", b"gzip") is None


def test_scanner_finds_each_message_in_any_pieces() -> None:
    messages = [infer_request("a", "1"), b"", infer_request("b", "2", tensor_bytes=5000), infer_request("c")]
    stream = b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)
    for piece in (1, 3, 7, 1024, len(stream)):
        seen: list[tuple[bytes, bool, int]] = []
        scanner = wire.MessageScanner(lambda *found, seen=seen: seen.append(found))  # (head, compressed, length)
        for i in range(0, len(stream), piece):
            scanner.feed(memoryview(stream)[i:i + piece])
        assert [(h, n) for h, _, n in seen] == [(m[:wire.HEAD_BYTES], len(m)) for m in messages]


@given(st.binary(max_size=2000))
def test_parsers_never_raise_on_garbage(data: bytes) -> None:
    wire.request_model_and_id(data)
    wire.stream_response_info(data)
    wire.decompress_head(data, b"gzip")
    scanner = wire.MessageScanner(lambda head, compressed, length: None)
    scanner.feed(data)


@given(name=st.binary(max_size=130), rest=st.binary(max_size=40), cut=st.integers(0, 200))
def test_request_model_fast_path_reads_as_the_field_loop(name: bytes, rest: bytes, cut: int) -> None:
    """request_model_and_id reads the usual request (model_name first) without its field
    loop: it must say what the loop says of any prefix, garbage after the name included."""
    for head in ((b"\x0a" + bytes((len(name) & 0x7F,)) + name + rest)[:cut], name + rest):
        assert wire.request_model_and_id(head) == wire._request_fields(head)
    message = infer_request(name.decode("latin-1"), rest.decode("latin-1"))
    for head in (message[:cut], message):
        assert wire.request_model_and_id(head) == wire._request_fields(head)


@given(sizes=st.lists(st.sampled_from([0, 1, 50, wire.HEAD_BYTES - 1, wire.HEAD_BYTES, 3000]), max_size=6),
       verdicts=st.lists(st.booleans(), min_size=6, max_size=6), piece=st.integers(1, 2000),
       cut_at_end=st.integers(0, 8))
def test_gate_keeps_and_drops_whole_messages_in_any_pieces(sizes: list[int], verdicts: list[bool], piece: int,
                                                          cut_at_end: int) -> None:
    messages = [infer_request(f"m{i}", str(i), tensor_bytes=size) if size else b"" for i, size in enumerate(sizes)]
    framed = [b"\x00" + len(m).to_bytes(4, "big") + m for m in messages]
    stream = b"".join(framed)
    stream += b"\x00\x00\x00\x01\x00\x07"[:cut_at_end]  # a message cut off at the stream's end
    seen: list[tuple[bytes, int]] = []

    def decide(head: bytes, compressed: bool, length: int) -> bool:
        seen.append((head, length))
        return verdicts[len(seen) - 1]

    gate = wire.MessageGate(decide)
    kept, dropped = b"", 0
    for i in range(0, len(stream), piece):
        k, d = gate.feed(memoryview(stream)[i:i + piece])
        kept, dropped = kept + k, dropped + d
    assert seen == [(m[:wire.HEAD_BYTES], len(m)) for m in messages]
    assert kept == b"".join(f for f, v in zip(framed, verdicts) if v)
    assert dropped == sum(len(f) for f, v in zip(framed, verdicts) if not v)
    assert gate.held == len(stream) - len(kept) - dropped  # only the cut-off message is held
    assert gate.flush() == stream[len(b"".join(framed)):] and gate.held == 0


def test_stream_error_response_is_what_triton_writes_for_a_failed_request() -> None:
    parsed = service_pb2.ModelStreamInferResponse.FromString(wire.stream_error_response("busy ü", "r-1"))
    assert parsed.error_message == "busy ü" and parsed.infer_response.id == "r-1"
    assert parsed.HasField("infer_response")
    assert wire.stream_response_info(wire.stream_error_response("x" * 300, "r")) == (None, "r", None, True)


@given(st.binary(max_size=2000))
def test_gate_never_raises_on_garbage(data: bytes) -> None:
    gate = wire.MessageGate(lambda head, compressed, length: length % 2 == 0)
    kept, dropped = gate.feed(data)
    assert len(kept) + dropped + gate.held == len(data)


def pending(*entries: tuple[str, str, float]) -> dict[str, deque[tuple[str, float]]]:
    table: dict[str, deque[tuple[str, float]]] = {}
    for model, request_id, started in entries:
        table.setdefault(model, deque()).append((request_id, started))
    return table


@pytest.mark.parametrize("entries, model, request_id, taken, left", [
    # By id, wherever it is.
    ([("a", "1", 1.0), ("a", "2", 2.0)], "a", "2", ("a", 2.0), [("a", "1", 1.0)]),
    ([("a", "1", 1.0), ("b", "x", 2.0)], None, "x", ("b", 2.0), [("a", "1", 1.0)]),
    # No id (or an unknown one): the oldest of the response's model.
    ([("a", "", 1.0), ("b", "", 0.5), ("a", "", 3.0)], "a", "", ("a", 1.0), [("b", "", 0.5), ("a", "", 3.0)]),
    ([("a", "1", 1.0), ("a", "2", 2.0)], "a", "zz", ("a", 1.0), [("a", "2", 2.0)]),
    # No model either: the oldest of the stream, not the first model seen.
    ([("a", "", 5.0), ("b", "", 2.0)], None, "", ("b", 2.0), [("a", "", 5.0)]),
    ([("a", "", 5.0)], "unknown-model", "", ("a", 5.0), []),
    ([], "a", "1", None, []),
])
def test_take_pending(entries, model, request_id, taken, left) -> None:
    table = pending(*entries)
    assert _take_pending(table, model, request_id) == taken
    assert table == pending(*left)
