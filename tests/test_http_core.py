"""proxy.http_core without I/O: bytes in -> the bytes it forwards, what it answers itself, and
what it counts. No Triton here; tests/test_http_relay.py runs the same core against one."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonpilot.proxy.http_core import HttpExchanges, Refusal, RequestHead, route

INFER = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Type: text/plain\r\n\r\n"
OK_BODY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Ledger:
    """A Gate that records begin/end and refuses what `refuse` says."""

    def __init__(self, refuse: dict[str, Refusal] | None = None) -> None:
        self.refuse = refuse or {}
        self.events: list[tuple[Any, ...]] = []
        self.inflight = 0

    def admit(self, head: RequestHead, now_s: float) -> Refusal | None:
        return self.refuse.get(head.kind or "")

    def begin(self, head: RequestHead, now_s: float) -> object:
        self.inflight += 1
        self.events.append(("begin", head.model, now_s))
        return head.model

    def end(self, token: object, status: int, now_s: float, duration_s: float | None) -> None:
        self.inflight -= 1
        self.events.append(("end", token, status, duration_s))


def feed(core: HttpExchanges, client: bytes = b"", upstream: bytes = b"", now_s: float = 0.0) -> tuple[bytes, bytes]:
    if client:
        core.client_data(client, now_s)
    if upstream:
        core.upstream_data(upstream, now_s)
    return b"".join(core.take_upstream()), b"".join(core.take_client())


def test_a_request_and_its_response_pass_unchanged_and_count_from_head_to_last_byte() -> None:
    ledger = Ledger()
    core = HttpExchanges(ledger)
    up, _ = feed(core, INFER[:30], now_s=1.0)
    assert up == b"" and ledger.events == []  # the head is held until complete
    up, _ = feed(core, INFER[30:], now_s=2.0)
    assert up == INFER and ledger.events == [("begin", "m", 2.0)]
    _, down = feed(core, upstream=OK_BODY[:-1], now_s=3.0)
    assert down == OK_BODY[:-1] and ledger.inflight == 1  # streamed, not held; not over yet
    _, down = feed(core, upstream=OK_BODY[-1:], now_s=4.5)
    assert down == OK_BODY[-1:] and ledger.events[-1] == ("end", "m", 200, 2.5)


@pytest.mark.parametrize(("path", "want"), [
    ("/v2/models/m/infer", ("inference", "m", "infer")),
    ("/v2/models/m/versions/3/generate_stream", ("inference", "m", "generate_stream")),
    ("/v2/models/fa%73t/generate", ("inference", "fa%73t", "generate")),  # not decoded: Triton doesn't
    ("/v2/models/m", ("metadata", "m", "")),
    ("/v2/models/m/ready", ("health", "m", "ready")),
    ("/v2/models/m/versions/1/trace/setting", (None, None, None)),  # Triton: 404
    ("/v2/models/stats", ("statistics", None, None)),
    ("/v2/repository/models/m/load", ("model-repository", "m", "load")),
    ("/v2/repository/r/models/m/unload", ("model-repository", "m", "unload")),
    ("/v2/repository/index", ("model-repository", None, None)),
    ("/v2/systemsharedmemory/region/r/register", ("shared-memory", None, None)),
    ("/v2/health/live", ("health", None, None)),
    ("/v2", ("metadata", None, None)),
    ("/v2/logging", ("logging", None, None)),
    ("/v2/trace/setting", ("trace", None, None)),
    ("/metrics", (None, None, None)),
])
def test_routes_as_triton_reads_them(path: str, want: tuple[str | None, ...]) -> None:
    assert route(path) == want


def test_only_inference_requests_count() -> None:
    ledger = Ledger()
    core = HttpExchanges(ledger)
    feed(core, LIVE + b"GET /v2/models/m/config HTTP/1.1\r\n\r\n")
    feed(core, upstream=OK_EMPTY)
    feed(core, upstream=OK_BODY)
    assert ledger.events == [] and core.open_requests == 0


def test_pipelined_requests_go_to_triton_one_at_a_time_and_answers_keep_their_order() -> None:
    ledger = Ledger({"unload": Refusal(403, "no")})
    core = HttpExchanges(ledger)
    unload = b"POST /v2/repository/models/m/unload HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    up, down = feed(core, LIVE + unload + INFER)
    assert up == LIVE and down == b""  # the rest waits for Triton's answer to the first
    up, down = feed(core, upstream=OK_EMPTY)
    # The refusal answered in its place, right after the first response; then INFER goes up.
    assert down.startswith(OK_EMPTY + b"HTTP/1.1 403 Forbidden\r\n") and down.endswith(b'{"error":"no"}')
    assert up == INFER  # the refused request's bytes never reach Triton
    _, down = feed(core, upstream=OK_BODY)
    assert down == OK_BODY and [e[0] for e in ledger.events] == ["begin", "end"]


def test_chunked_bodies_both_ways_and_trailers() -> None:
    ledger = Ledger()
    core = HttpExchanges(ledger)
    req = (b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
    for i in range(len(req)):  # byte by byte
        core.client_data(req[i:i + 1], 0.0)
    assert b"".join(core.take_upstream()) == req
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    _, down = feed(core, LIVE, upstream=resp)
    assert down == resp and ledger.events[-1][:3] == ("end", "m", 200)
    up, _ = feed(core)
    assert core.take_upstream() == [] and up == b""
    feed(core, upstream=OK_EMPTY)  # LIVE went up after the response and is answered


def test_interim_100_continue_keeps_the_request_open() -> None:
    ledger = Ledger()
    core = HttpExchanges(ledger)
    feed(core, INFER.replace(b"Host: x\r\n", b"Expect: 100-continue\r\n"))
    _, down = feed(core, upstream=b"HTTP/1.1 100 Continue\r\n\r\n")
    assert down == b"HTTP/1.1 100 Continue\r\n\r\n" and ledger.inflight == 1
    feed(core, upstream=OK_BODY)
    assert ledger.inflight == 0


def test_no_body_after_204_and_304_a_body_after_head_and_until_close_without_length() -> None:
    ledger = Ledger()
    core = HttpExchanges(ledger)
    feed(core, b"HEAD /v2 HTTP/1.1\r\n\r\n")
    # Triton 2.51 sends a JSON body after HEAD, with its length: framed by the headers.
    head = b"HTTP/1.1 405 Not Allowed\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n{}"
    feed(core, upstream=head)
    assert core.open_requests == 0
    feed(core, LIVE)
    feed(core, upstream=b"HTTP/1.1 204 No Content\r\n\r\n")
    assert core.open_requests == 0
    feed(core, b"POST /v2/models/m/infer HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    feed(core, upstream=b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close")
    assert ledger.inflight == 1
    core.upstream_closed(1.0)
    assert ledger.events[-1][:3] == ("end", "m", 200) and core.close_client


def test_a_client_gone_mid_request_ends_it_as_499_and_triton_gone_as_502() -> None:
    ledger = Ledger()
    core = HttpExchanges(ledger)
    feed(core, INFER[:-2])
    core.client_closed(1.0)
    assert ledger.events[-1] == ("end", "m", 499, None) and core.close_upstream
    ledger = Ledger()
    core = HttpExchanges(ledger)
    feed(core, INFER, upstream=OK_BODY[:-1])
    core.upstream_closed(1.0)
    assert ledger.events[-1] == ("end", "m", 502, None) and core.close_client


@pytest.mark.parametrize(("data", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00", 400),  # a TLS ClientHello on the plaintext port: at once
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000, 431),
])
def test_bad_requests_get_a_clean_4xx_and_a_close(data: bytes, status: int) -> None:
    core = HttpExchanges(Ledger(), max_head_bytes=64 * 1024)
    up, down = feed(core, data)
    assert up == b"" and down.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in down
    assert core.close_client
    assert feed(core, LIVE) == (b"", b"")  # nothing more is read


def test_a_bad_request_after_good_ones_is_answered_in_its_turn() -> None:
    core = HttpExchanges(Ledger())
    feed(core, INFER)
    _, down = feed(core, b"BAD\x00\r\n\r\n")
    assert down == b"" and not core.close_client  # INFER's response comes first
    _, down = feed(core, upstream=OK_BODY)
    assert down.startswith(OK_BODY + b"HTTP/1.1 400 Bad Request") and core.close_client


def test_a_refusal_with_expect_100_continue_closes_the_connection() -> None:
    core = HttpExchanges(Ledger({"load": Refusal(403, "no")}))
    _, down = feed(core, b"POST /v2/repository/models/m/load HTTP/1.1\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 10\r\n\r\n")
    assert down.startswith(b"HTTP/1.1 403") and b"Connection: close" in down and core.close_client


def test_triton_sending_garbage_or_unasked_responses_closes_both() -> None:
    ledger = Ledger()
    core = HttpExchanges(ledger)
    feed(core, upstream=OK_EMPTY)
    assert core.close_client and core.close_upstream
    core = HttpExchanges(ledger)
    feed(core, INFER, upstream=b"NOT HTTP AT ALL\r\n\r\n")
    assert core.close_client and ledger.inflight == 0 and ledger.events[-1][2] == 502


def test_goaway_closes_when_idle_and_answers_later_requests_503() -> None:
    core = HttpExchanges(Ledger())
    feed(core, INFER)
    core.goaway()
    assert not core.close_client
    _, down = feed(core, upstream=OK_BODY)
    assert down == OK_BODY and core.close_client  # closed once nothing is owed
    core = HttpExchanges(Ledger())
    core.goaway()
    assert core.close_client


def test_101_switching_protocols_turns_into_a_tunnel() -> None:
    core = HttpExchanges(Ledger())
    feed(core, b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
    _, down = feed(core, upstream=b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw bytes")
    assert down.endswith(b"raw bytes") and core.tunnel
    assert feed(core, b"\x00\x01anything") == (b"\x00\x01anything", b"")


LOAD = b"POST /v2/repository/models/m/load HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"


@settings(max_examples=300, deadline=None)
@given(client=st.lists(st.binary(max_size=200) | st.sampled_from([INFER, LIVE, LOAD, INFER[:17], b"\r\n"]),
                       max_size=8),
       upstream=st.lists(st.binary(max_size=200) | st.sampled_from([OK_BODY, OK_EMPTY, OK_BODY[:9]]), max_size=8),
       end=st.sampled_from(["client", "upstream"]))
def test_arbitrary_bytes_never_raise_and_nothing_stays_in_flight_after_close(
        client: list[bytes], upstream: list[bytes], end: str) -> None:
    ledger = Ledger({"load": Refusal(403, "no")})
    core = HttpExchanges(ledger, max_head_bytes=1024)
    for i in range(max(len(client), len(upstream))):
        if i < len(client):
            core.client_data(client[i], float(i))
        if i < len(upstream):
            core.upstream_data(upstream[i], float(i))
        core.take_client()
        core.take_upstream()
        assert 0 <= ledger.inflight <= core.open_requests
    if end == "client":
        core.client_closed(99.0)
    else:
        core.upstream_closed(99.0)
    assert ledger.inflight == 0 and core.open_requests == 0
    assert sum(e[0] == "begin" for e in ledger.events) == sum(e[0] == "end" for e in ledger.events)
