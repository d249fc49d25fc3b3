"""proxy.http_core without I/O: bytes in -> the bytes it forwards, what it answers itself, and
what it counts, through a real ledger (ledger.py) into real ProxyStats, as the relay wires it.
No Triton here; tests/test_http_relay.py runs the same core against one."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonpilot.proxy.http_core import MODEL_CONTROL_REFUSAL, HttpDoor, HttpExchanges, HttpRules, route
from tritonpilot.proxy.ledger import Ledger
from tritonpilot.proxy.restrict import Restriction
from tritonpilot.proxy.shedding import InflightCaps
from tritonpilot.proxy.stats import GRPC, HTTP, ModelSnapshot, ProxyStats

INFER = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
LOAD = b"POST /v2/repository/models/m/load HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Type: text/plain\r\n\r\n"
OK_BODY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Conn:
    """One client connection's core, counting through its own Ledger into `stats`."""

    def __init__(self, rules: HttpRules | None = None, stats: ProxyStats | None = None,
                 max_head_bytes: int = 64 * 1024) -> None:
        self.stats = stats if stats is not None else ProxyStats()
        self.ledger = Ledger(self.stats, HTTP)
        self.core = HttpExchanges(self.ledger, rules, max_head_bytes)

    def feed(self, client: bytes = b"", upstream: bytes = b"", now_s: float = 0.0) -> tuple[bytes, bytes]:
        if client:
            self.core.client_data(client, now_s)
        if upstream:
            self.core.upstream_data(upstream, now_s)
        return b"".join(self.core.take_upstream()), b"".join(self.core.take_client())

    def model(self, name: str = "m", now_s: float = 100.0) -> ModelSnapshot | None:
        """The model's HTTP counters, None while nothing counted it."""
        return self.stats.snapshot(now_s).protocols.get((name, HTTP))

    def inflight(self, name: str = "m") -> int:
        snap = self.model(name)
        return 0 if snap is None else snap.inflight

    def finished(self, name: str = "m") -> dict[str, int]:
        snap = self.model(name)
        return {} if snap is None else snap.finished_total


def test_a_request_and_its_response_pass_unchanged_and_count_from_head_to_last_byte() -> None:
    conn = Conn()
    up, _ = conn.feed(INFER[:30], now_s=1.0)
    assert up == b"" and conn.model() is None  # the head is held until complete
    up, _ = conn.feed(INFER[30:], now_s=2.0)
    assert up == INFER and conn.inflight() == 1 and len(conn.ledger.open) == 1  # in flight from its head
    _, down = conn.feed(upstream=OK_BODY[:-1], now_s=3.0)
    assert down == OK_BODY[:-1] and conn.inflight() == 1  # streamed, not held; not over yet
    _, down = conn.feed(upstream=OK_BODY[-1:], now_s=4.5)
    snap = conn.model()
    assert snap is not None and down == OK_BODY[-1:]
    assert (snap.inflight, snap.inflight_peak, snap.started_total, snap.finished_total) == (0, 1, 1, {"200": 1})
    assert snap.latency_count == 1 and snap.latency_sum_s == pytest.approx(2.5)  # head to last byte
    assert snap.inflight_seconds == pytest.approx(2.5) and not conn.ledger.open
    assert conn.stats.snapshot(5.0).models["m"].finished_total == {"200": 1}  # the model, all protocols


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
    conn = Conn()
    conn.feed(LIVE + b"GET /v2/models/m/config HTTP/1.1\r\n\r\n")
    conn.feed(upstream=OK_EMPTY)
    conn.feed(upstream=OK_BODY)
    assert conn.stats.snapshot(1.0).models == {} and conn.core.open_requests == 0


def test_the_http_status_is_the_code_label_whatever_it_is() -> None:
    conn = Conn()
    for status in (b"404 Not Found", b"500 Internal Server Error", b"200 OK"):
        conn.feed(INFER)
        conn.feed(upstream=b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
    assert conn.finished() == {"404": 1, "500": 1, "200": 1} and conn.inflight() == 0
    snap = conn.model()
    assert snap is not None and snap.errors_total == 2


def test_pipelined_requests_go_to_triton_one_at_a_time_and_answers_keep_their_order() -> None:
    conn = Conn()  # default rules: client model control is refused
    unload = b"POST /v2/repository/models/m/unload HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    up, down = conn.feed(LIVE + unload + INFER)
    assert up == LIVE and down == b""  # the rest waits for Triton's answer to the first
    up, down = conn.feed(upstream=OK_EMPTY)
    # The refusal answered in its place, right after the first response; then INFER goes up.
    assert down.startswith(OK_EMPTY + b"HTTP/1.1 403 Forbidden\r\n")
    assert down.endswith(json.dumps({"error": MODEL_CONTROL_REFUSAL}, separators=(",", ":")).encode())
    assert up == INFER  # the refused request's bytes never reach Triton
    assert conn.inflight() == 1
    _, down = conn.feed(upstream=OK_BODY)
    assert down == OK_BODY and conn.finished() == {"200": 1}  # the 403 counts nowhere, as before


def test_chunked_bodies_both_ways_and_trailers() -> None:
    conn = Conn()
    req = (b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
    for i in range(len(req)):  # byte by byte
        conn.core.client_data(req[i:i + 1], 0.0)
    assert b"".join(conn.core.take_upstream()) == req
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    _, down = conn.feed(LIVE, upstream=resp)
    assert down == resp and conn.finished() == {"200": 1} and conn.inflight() == 0
    up, _ = conn.feed()
    assert conn.core.take_upstream() == [] and up == b""
    conn.feed(upstream=OK_EMPTY)  # LIVE went up after the response and is answered


def test_interim_100_continue_keeps_the_request_open() -> None:
    conn = Conn()
    conn.feed(INFER.replace(b"Host: x\r\n", b"Expect: 100-continue\r\n"))
    _, down = conn.feed(upstream=b"HTTP/1.1 100 Continue\r\n\r\n")
    assert down == b"HTTP/1.1 100 Continue\r\n\r\n" and conn.inflight() == 1
    conn.feed(upstream=OK_BODY)
    assert conn.inflight() == 0 and conn.finished() == {"200": 1}


def test_no_body_after_204_and_304_a_body_after_head_and_until_close_without_length() -> None:
    conn = Conn()
    conn.feed(b"HEAD /v2 HTTP/1.1\r\n\r\n")
    # Triton 2.51 sends a JSON body after HEAD, with its length: framed by the headers.
    head = b"HTTP/1.1 405 Not Allowed\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n{}"
    conn.feed(upstream=head)
    assert conn.core.open_requests == 0
    conn.feed(LIVE)
    conn.feed(upstream=b"HTTP/1.1 204 No Content\r\n\r\n")
    assert conn.core.open_requests == 0
    conn.feed(b"POST /v2/models/m/infer HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    conn.feed(upstream=b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close")
    assert conn.inflight() == 1
    conn.core.upstream_closed(1.0)
    assert conn.finished() == {"200": 1} and conn.inflight() == 0 and conn.core.close_client


def test_a_client_gone_mid_request_ends_it_as_499_and_triton_gone_as_502() -> None:
    conn = Conn()
    conn.feed(INFER[:-2], now_s=1.0)
    assert conn.inflight() == 1
    conn.core.client_closed(2.0)
    snap = conn.model()
    assert snap is not None and conn.core.close_upstream and not conn.ledger.open
    assert (snap.inflight, snap.finished_total, snap.latency_count) == (0, {"499": 1}, 0)  # untimed
    conn.core.client_closed(3.0)  # the shell may say it twice: nothing moves
    assert conn.finished() == {"499": 1} and conn.inflight() == 0
    conn = Conn()
    conn.feed(INFER, upstream=OK_BODY[:-1])
    conn.core.upstream_closed(1.0)
    assert conn.finished() == {"502": 1} and conn.inflight() == 0 and conn.core.close_client


def test_a_connection_lost_with_pipelined_requests_ends_only_what_was_counted() -> None:
    conn = Conn()
    conn.feed(INFER + INFER + LIVE, now_s=1.0)  # one at Triton, the rest held unread
    assert conn.inflight() == 1 and conn.core.held_bytes > 0
    conn.core.client_closed(2.0)
    assert conn.finished() == {"499": 1} and conn.inflight() == 0
    snap = conn.model()
    assert snap is not None and snap.started_total == 1  # held requests never started


def test_a_malformed_body_mid_request_ends_its_request_and_the_connection() -> None:
    conn = Conn()
    conn.feed(b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert conn.inflight() == 1
    conn.feed(b"zz\r\n")  # not a chunk size: part of the request went to Triton already
    assert conn.core.closed and conn.inflight() == 0 and conn.finished() == {"400": 1}


@pytest.mark.parametrize(("data", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00", 400),  # a TLS ClientHello on the plaintext port: at once
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000, 431),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
])
def test_bad_requests_get_a_clean_4xx_and_a_close(data: bytes, status: int) -> None:
    conn = Conn(max_head_bytes=64 * 1024)
    up, down = conn.feed(data)
    assert up == b"" and down.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in down
    assert conn.core.close_client
    assert conn.feed(LIVE) == (b"", b"")  # nothing more is read
    assert conn.stats.snapshot(1.0).models == {}  # counted nowhere (no model read), as before


def test_a_bad_request_after_good_ones_is_answered_in_its_turn() -> None:
    conn = Conn()
    conn.feed(INFER)
    _, down = conn.feed(b"BAD\x00\r\n\r\n")
    assert down == b"" and not conn.core.close_client  # INFER's response comes first
    _, down = conn.feed(upstream=OK_BODY)
    assert down.startswith(OK_BODY + b"HTTP/1.1 400 Bad Request") and conn.core.close_client
    assert conn.finished() == {"200": 1} and conn.inflight() == 0


def test_a_refusal_with_expect_100_continue_closes_the_connection() -> None:
    conn = Conn()
    _, down = conn.feed(b"POST /v2/repository/models/m/load HTTP/1.1\r\nExpect: 100-continue\r\n"
                        b"Content-Length: 10\r\n\r\n")
    assert down.startswith(b"HTTP/1.1 403") and b"Connection: close" in down and conn.core.close_client


def test_triton_sending_garbage_or_unasked_responses_closes_both() -> None:
    conn = Conn()
    conn.feed(upstream=OK_EMPTY)
    assert conn.core.close_client and conn.core.close_upstream
    conn = Conn()
    conn.feed(INFER, upstream=b"NOT HTTP AT ALL\r\n\r\n")
    assert conn.core.close_client and conn.inflight() == 0 and conn.finished() == {"502": 1}


def test_goaway_closes_when_idle_and_answers_later_requests_503() -> None:
    conn = Conn()
    conn.feed(INFER)
    conn.core.goaway()
    assert not conn.core.close_client
    _, down = conn.feed(INFER + INFER)  # pipelined behind the open one: held, then answered
    _, down = conn.feed(upstream=OK_BODY)
    assert down.startswith(OK_BODY + b"HTTP/1.1 503 Service Unavailable") and conn.core.close_client
    assert conn.finished() == {"200": 1}  # the drain's 503 counts nowhere, as before
    conn = Conn()
    conn.core.goaway()
    assert conn.core.close_client


def test_the_last_response_a_draining_connection_owes_says_connection_close() -> None:
    conn = Conn()
    conn.feed(INFER)
    conn.core.goaway()
    _, down = conn.feed(upstream=OK_BODY)
    assert down == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\n{}")
    assert conn.core.close_client and conn.finished() == {"200": 1}
    # Triton's own Connection header is replaced, not repeated.
    conn = Conn()
    conn.feed(INFER)
    conn.core.goaway()
    _, down = conn.feed(upstream=b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")
    assert down == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    # Not draining: the head passes as it came.
    conn = Conn()
    conn.feed(INFER)
    assert conn.feed(upstream=OK_BODY)[1] == OK_BODY and not conn.core.close_client


def test_101_switching_protocols_turns_into_a_tunnel() -> None:
    conn = Conn()
    conn.feed(b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
    _, down = conn.feed(upstream=b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw bytes")
    assert down.endswith(b"raw bytes") and conn.core.tunnel
    assert conn.feed(b"\x00\x01anything") == (b"\x00\x01anything", b"")


# ---- what the proxy answers itself, and what of it counts ---------------------------------

def test_a_model_at_its_cap_is_shed_429_counted_and_never_in_flight() -> None:
    stats = ProxyStats()
    rules = HttpRules(caps=InflightCaps(default=1))
    first, second = Conn(rules, stats), Conn(rules, stats)  # two connections, one model
    first.feed(INFER, now_s=1.0)
    assert first.inflight() == 1
    up, down = second.feed(INFER + LIVE, now_s=2.0)
    assert up == LIVE and down.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")  # its body dropped
    assert b"model 'm' has 1 requests in flight, its cap" in down
    snap = second.model()
    assert snap is not None and (snap.inflight, snap.inflight_peak, snap.started_total) == (1, 1, 2)
    assert snap.finished_total == {"429": 1} and snap.latency_count == 0 and not second.ledger.open
    first.feed(upstream=OK_BODY, now_s=3.0)
    second.feed(upstream=OK_EMPTY)
    up, _ = second.feed(INFER, now_s=4.0)  # room again
    assert up == INFER and second.inflight() == 1


def test_the_cap_counts_the_model_over_both_protocols() -> None:
    stats = ProxyStats()
    grpc = Ledger(stats, GRPC)
    ticket = grpc.started("m", 1.0)  # a gRPC call of the same model, through the same stats
    conn = Conn(HttpRules(caps=InflightCaps(per_model={"m": 1})), stats)
    _, down = conn.feed(INFER, now_s=2.0)
    assert down.startswith(b"HTTP/1.1 429 ")
    grpc.ended(ticket, 0, 3.0)
    up, _ = conn.feed(INFER, now_s=4.0)
    assert up == INFER
    snap = stats.snapshot(5.0)
    assert snap.models["m"].inflight == 1 and snap.models["m"].finished_total == {"OK": 1, "429": 1}
    assert snap.protocols[("m", GRPC)].inflight == 0 and snap.protocols[("m", HTTP)].inflight == 1


def test_triton_unreachable_answers_503_and_closes_counting_inference_as_before() -> None:
    conn = Conn()
    conn.core.upstream_unreachable("tritonpilot: Triton at h:1 is unreachable (OSError: no)")
    up, down = conn.feed(INFER, now_s=1.0)
    assert up == b"" and down.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in down and down.endswith(b'is unreachable (OSError: no)"}')
    assert conn.core.close_client and conn.core.client_done
    snap = conn.model()
    # Counted as the gRPC relay counts its UNAVAILABLE answers: started and ended at once.
    assert snap is not None and (snap.inflight, snap.started_total, snap.finished_total) == (0, 1, {"503": 1})
    assert not conn.ledger.open
    other = Conn()
    other.core.upstream_unreachable("down")
    _, down = other.feed(LIVE)
    assert down.startswith(b"HTTP/1.1 503 ") and other.stats.snapshot(1.0).models == {}


def test_restricted_apis_413_and_model_control_are_answered_here_and_count_nowhere() -> None:
    door = HttpDoor([Restriction(("inference",), "infer-key", "secret")])
    conn = Conn(HttpRules(door=door, max_message_bytes=4))
    up, down = conn.feed(INFER)
    assert up == b"" and down.startswith(b"HTTP/1.1 403 Forbidden\r\nContent-Length: ")
    assert b"Content-Type: text/plain" in down  # untyped, as Triton writes it
    assert down.endswith(b"{\"error\":\"This API is restricted, expecting header 'infer-key'\"}")
    allowed = INFER.replace(b"Host: x\r\n", b"Infer-Key: secret\r\n")
    up, down = conn.feed(allowed)
    assert up == b"" and down.startswith(b"HTTP/1.1 413 Payload Too Large")  # 5 bytes past 4
    _, down = conn.feed(LOAD)
    assert down.startswith(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json")
    assert conn.stats.snapshot(1.0).models == {} and not conn.core.closed
    up, _ = conn.feed(LIVE)  # the connection goes on
    assert up == LIVE


def test_rules_swapped_live_apply_to_the_next_request() -> None:
    conn = Conn()
    _, down = conn.feed(LOAD)
    assert down.startswith(b"HTTP/1.1 403 ")
    conn.core.reconfigure(HttpRules(allow_client_model_control=True, caps=InflightCaps()))
    assert conn.core.caps is None  # a cap set without caps is no cap
    up, _ = conn.feed(LOAD)
    assert up == LOAD


# ---- properties ----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(client=st.lists(st.binary(max_size=200) | st.sampled_from([INFER, LIVE, LOAD, INFER[:17], b"\r\n"]),
                       max_size=8),
       upstream=st.lists(st.binary(max_size=200) | st.sampled_from([OK_BODY, OK_EMPTY, OK_BODY[:9]]), max_size=8),
       end=st.sampled_from(["client", "upstream"]))
def test_arbitrary_bytes_never_raise_and_nothing_stays_in_flight_after_close(
        client: list[bytes], upstream: list[bytes], end: str) -> None:
    conn = Conn(max_head_bytes=1024)
    core = conn.core
    for i in range(max(len(client), len(upstream))):
        if i < len(client):
            core.client_data(client[i], float(i))
        if i < len(upstream):
            core.upstream_data(upstream[i], float(i))
        core.take_client()
        core.take_upstream()
        assert 0 <= conn.inflight() == len(conn.ledger.open) <= core.open_requests
    if end == "client":
        core.client_closed(99.0)
    else:
        core.upstream_closed(99.0)
    assert conn.inflight() == 0 and core.open_requests == 0 and not conn.ledger.open
    for snap in conn.stats.snapshot(100.0).models.values():
        assert snap.started_total == sum(snap.finished_total.values())  # every request ended once


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 1),
                                st.sampled_from(["infer", "ok", "partial", "client_gone", "triton_gone"])),
                      max_size=24))
def test_two_connections_under_a_cap_never_pass_it_and_end_at_zero(steps: list[tuple[int, str]]) -> None:
    stats = ProxyStats()
    rules = HttpRules(caps=InflightCaps(default=1))
    conns = [Conn(rules, stats), Conn(rules, stats)]
    for i, (which, step) in enumerate(steps):
        core, now = conns[which].core, float(i)
        if core.closed:
            conns[which] = Conn(rules, stats)  # the client connects again
            core = conns[which].core
        if step == "infer":
            core.client_data(INFER, now)
        elif step == "ok":
            core.upstream_data(OK_BODY, now)
        elif step == "partial":
            core.upstream_data(OK_BODY[:9], now)
        elif step == "client_gone":
            core.client_closed(now)
        else:
            core.upstream_closed(now)
        core.take_client()
        core.take_upstream()
        model = stats.snapshot(now).models.get("m")
        inflight = 0 if model is None else model.inflight
        assert 0 <= inflight == sum(len(c.ledger.open) for c in conns) <= 1
    for conn in conns:
        conn.core.client_closed(1000.0)
    model = stats.snapshot(1001.0).models.get("m")
    if model is not None:
        assert model.inflight == 0 and model.started_total == sum(model.finished_total.values())
