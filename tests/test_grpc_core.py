"""The gRPC relay's protocol core (proxy/grpc_core.py), in memory: no sockets, no Triton, no clock.

A real HTTP/2 client and a stand-in Triton (both the h2 library, which checks every frame,
HPACK block and flow-control window it receives) talk through a GrpcConnection; each test
reads what was forwarded, what each side received and what the ledger counted. Time is
passed in, so deadlines and flood windows are a timeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from tritonpilot.proxy.grpc_core import (
    CLIENT_TO_TRITON,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    GrpcConnection,
    GrpcRules,
    Violation,
    _Direction,
    frame,
    literal_header_block,
)
from tritonpilot.proxy.ledger import Ledger
from tritonpilot.proxy.limits import Http2Limits, Http2Refusal
from tritonpilot.proxy.restrict import Door, parse_restrictions
from tritonpilot.proxy.shedding import InflightCaps, refusal_message
from tritonpilot.proxy.stats import ProxyStats
from tritonpilot.proxy.wire import HEALTH_CHECK, MODEL_INFER, MODEL_STREAM_INFER, SERVICE

OK, CANCELLED, DEADLINE_EXCEEDED = "OK", "CANCELLED", "DEADLINE_EXCEEDED"


def message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def infer_request(model: str, request_id: str = "", tensor_bytes: int = 0) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    if tensor_bytes:
        request.raw_input_contents.append(b"\x01" * tensor_bytes)
    return message(request.SerializeToString())


def stream_response(model: str, request_id: str) -> bytes:
    response = service_pb2.ModelStreamInferResponse()
    response.infer_response.model_name = model
    response.infer_response.id = request_id
    return message(response.SerializeToString())


def parse_stream_responses(data: bytes) -> list[service_pb2.ModelStreamInferResponse]:
    out, i = [], 0
    while i + 5 <= len(data):
        length = int.from_bytes(data[i + 1:i + 5], "big")
        out.append(service_pb2.ModelStreamInferResponse.FromString(data[i + 5:i + 5 + length]))
        i += 5 + length
    return out


class Link:
    """client (h2) <-> GrpcConnection <-> Triton stand-in (h2), pumped by hand."""

    def __init__(self, rules: GrpcRules | None = None, http2: Http2Limits | None = None, now_s: float = 100.0,
                 handshake: bool = True) -> None:
        rules = rules if rules is not None else GrpcRules()
        self.now_s = now_s
        self.stats = ProxyStats()
        self.ledger = Ledger(self.stats)
        self.refusals: list[Http2Refusal] = []
        self.conn = GrpcConnection(rules, self.ledger, now_s, http2, self.refusals.append)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.triton = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        self.forwarded = b""  # every byte the core passed to Triton
        self.delivered = b""  # every byte the core passed to the client
        self.triton_events: list[h2.events.Event] = []
        self.client_events: list[h2.events.Event] = []
        self.violations: list[Violation] = []
        self.client_reads = True  # h2 reads nothing after a GOAWAY: tests stop feeding it then
        if handshake:
            self.client.initiate_connection()
            self.triton.initiate_connection()
            self.pump()

    # ---- moving bytes ---------------------------------------------------------------------

    def from_client(self, data: bytes) -> Violation | None:
        violation = self.conn.client_data(data, self.now_s)
        self._deliver()
        if violation is not None:
            self.violations.append(violation)
        return violation

    def from_triton(self, data: bytes) -> Violation | None:
        violation = self.conn.upstream_data(data, self.now_s)
        self._deliver()
        if violation is not None:
            self.violations.append(violation)
        return violation

    def _deliver(self) -> None:
        up = b"".join(bytes(b) for b in self.conn.to_upstream)
        self.conn.to_upstream.clear()
        down = b"".join(bytes(b) for b in self.conn.to_client)
        self.conn.to_client.clear()
        self.forwarded += up
        self.delivered += down
        if up:
            for event in self.triton.receive_data(up):
                self.triton_events.append(event)
                if isinstance(event, h2.events.DataReceived):  # Triton gives the window back
                    self.triton.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if down and self.client_reads:
            for event in self.client.receive_data(down):
                self.client_events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def pump(self) -> None:
        while not self.conn.closed:
            c, t = self.client.data_to_send(), self.triton.data_to_send()
            if not c and not t:
                return
            if c:
                self.from_client(c)
            if t:
                self.from_triton(t)

    # ---- the client's side ------------------------------------------------------------------

    def call(self, path: bytes, messages: Sequence[bytes] = (), end: bool = True,
             metadata: Sequence[tuple[bytes, bytes]] = ()) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
                                       (b":authority", b"triton"), (b"content-type", b"application/grpc"),
                                       (b"te", b"trailers"), *metadata])
        size = self.client.max_outbound_frame_size
        for m in messages:  # before anything comes back (the proxy may answer at once)
            for i in range(0, len(m), size):
                self.client.send_data(sid, m[i:i + size])
        if end:
            self.client.end_stream(sid)
        self.pump()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        """As a client does: frames no larger than allowed, within the window it has (h2 raises
        FlowControlError past it)."""
        size = self.client.max_outbound_frame_size
        for i in range(0, len(data), size):
            self.client.send_data(sid, data[i:i + size])
            self.pump()
        if end:
            self.client.end_stream(sid)
        self.pump()

    def reset(self, sid: int) -> None:
        self.client.reset_stream(sid, 8)
        self.pump()

    def client_data(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.client_events
                        if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)

    def client_headers(self, sid: int) -> list[dict[bytes, bytes]]:
        return [dict(e.headers) for e in self.client_events
                if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived) and e.stream_id == sid]

    def status(self, sid: int) -> tuple[bytes, str] | None:
        for headers in self.client_headers(sid):
            if b"grpc-status" in headers:
                return headers[b"grpc-status"], unquote(headers.get(b"grpc-message", b"").decode())
        return None

    # ---- Triton's side ----------------------------------------------------------------------

    def triton_data(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.triton_events
                        if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)

    def triton_reset(self, sid: int) -> bool:
        return any(isinstance(e, h2.events.StreamReset) and e.stream_id == sid for e in self.triton_events)

    def triton_headers(self, sid: int) -> None:
        self.triton.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.pump()

    def triton_send(self, sid: int, data: bytes) -> None:
        self.triton.send_data(sid, data)
        self.pump()

    def triton_trailers(self, sid: int, code: int = 0) -> None:
        self.triton.send_headers(sid, [(b"grpc-status", str(code).encode())], end_stream=True)
        self.pump()

    def triton_answers(self, sid: int, data: bytes, code: int = 0) -> None:
        self.triton_headers(sid)
        self.triton_send(sid, data)
        self.triton_trailers(sid, code)

    # ---- counts -----------------------------------------------------------------------------

    def inflight(self, model: str) -> int:
        snap = self.stats.snapshot(self.now_s).models.get(model)
        return snap.inflight if snap else 0

    def finished(self, model: str) -> dict[str, int]:
        snap = self.stats.snapshot(self.now_s).models.get(model)
        return dict(snap.finished_total) if snap else {}

    def total_inflight(self) -> int:
        return sum(m.inflight for m in self.stats.snapshot(self.now_s).models.values())


def windows_agree(link: Link, sid: int | None = None) -> bool:
    """Each side's view of each flow-control window matches the other's, but for the proxy's own
    DATA the client has not acknowledged yet (Triton's view is larger by those bytes)."""
    conn = link.conn
    ok = (link.client.outbound_flow_control_window == link.triton.inbound_flow_control_window
          and link.triton.outbound_flow_control_window - conn.injected_data_credit
          == link.client.inbound_flow_control_window)
    if sid is not None and sid in link.client.streams and sid in link.triton.streams:
        ok = ok and (link.client.local_flow_control_window(sid) == link.triton.remote_flow_control_window(sid)
                     and link.triton.local_flow_control_window(sid) - conn.stream_credit.get(sid, 0)
                     == link.client.remote_flow_control_window(sid))
    return ok


# ------------------------------------------------------------------------------ calls that pass


def test_a_unary_call_passes_verbatim_and_counts_once_with_its_latency() -> None:
    link = Link()
    before = len(link.forwarded)
    sid = link.call(MODEL_INFER, [infer_request("m", "1")])
    assert link.inflight("m") == 1
    assert link.triton_data(sid) == infer_request("m", "1")
    assert link.forwarded[before:] == link.forwarded[before:]  # what Triton read is what the client wrote
    link.now_s += 0.003
    link.triton_answers(sid, message(b"response"))
    assert link.client_data(sid) == message(b"response") and link.status(sid) == (b"0", "")
    assert (link.inflight("m"), link.finished("m")) == (0, {OK: 1})
    snap = link.stats.snapshot(link.now_s).models["m"]
    assert snap.latency_count == 1 and snap.latency_sum_s == pytest.approx(0.003)


def test_every_byte_the_client_sends_reaches_triton_unchanged() -> None:
    link = Link(handshake=False)
    link.client.initiate_connection()
    sid = link.client.get_next_available_stream_id()
    link.client.send_headers(sid, [(b":method", b"POST"), (b":path", MODEL_INFER), (b":scheme", b"http"),
                                   (b":authority", b"t")])
    link.client.send_data(sid, infer_request("m", tensor_bytes=3000), end_stream=True)
    wrote = link.client.data_to_send()
    for i in range(0, len(wrote), 7):  # in small pieces: frames cut anywhere
        assert link.from_client(wrote[i:i + 7]) is None
    assert link.forwarded == wrote
    assert link.inflight("m") == 1


def test_a_stream_counts_each_request_until_its_response() -> None:
    link = Link()
    sid = link.call(MODEL_STREAM_INFER, [infer_request("m", str(i)) for i in range(3)], end=False)
    assert link.inflight("m") == 3
    link.triton_headers(sid)
    link.triton_send(sid, stream_response("m", "1"))
    assert link.inflight("m") == 2
    link.triton_send(sid, stream_response("m", "0") + stream_response("m", "2"))
    assert (link.inflight("m"), link.finished("m")) == (0, {OK: 3})
    link.send(sid, b"", end=True)
    link.triton_trailers(sid)
    assert link.finished("m") == {OK: 3} and link.conn.open_streams == 0


def test_a_stream_closed_with_requests_unanswered_ends_them_with_its_status() -> None:
    link = Link()
    sid = link.call(MODEL_STREAM_INFER, [infer_request("m", "a"), infer_request("n", "b")])
    link.triton_headers(sid)
    link.triton_trailers(sid, code=14)
    assert link.finished("m") == {"UNAVAILABLE": 1} and link.finished("n") == {"UNAVAILABLE": 1}
    assert link.total_inflight() == 0


# ------------------------------------------------------------------------------ cancels and losses


def test_a_client_reset_mid_request_is_cancelled_and_at_its_deadline_deadline_exceeded() -> None:
    link = Link()
    plain = link.call(MODEL_INFER, [infer_request("m")])
    timed = link.call(MODEL_INFER, [infer_request("m")], metadata=[(b"grpc-timeout", b"200m")])
    assert link.inflight("m") == 2
    link.now_s += 0.05
    link.reset(plain)
    assert link.finished("m") == {CANCELLED: 1}
    link.now_s += 0.15  # 200 ms after the headers: the client's deadline
    link.reset(timed)
    assert link.finished("m") == {CANCELLED: 1, DEADLINE_EXCEEDED: 1}
    assert link.inflight("m") == 0 and link.triton_reset(plain) and link.triton_reset(timed)


def test_upstream_loss_ends_every_open_request() -> None:
    link = Link()
    link.call(MODEL_INFER, [infer_request("m")])
    link.call(MODEL_STREAM_INFER, [infer_request("m", "1"), infer_request("n", "2")], end=False)
    assert link.total_inflight() == 3
    link.conn.close(14, link.now_s)
    assert link.finished("m") == {"UNAVAILABLE": 2} and link.finished("n") == {"UNAVAILABLE": 1}
    assert link.total_inflight() == 0 and not link.ledger.open
    link.conn.close(1, link.now_s)  # twice: nothing more
    assert link.finished("m") == {"UNAVAILABLE": 2}
    assert link.conn.client_data(b"anything", link.now_s) is None and not link.conn.to_upstream


def test_triton_s_goaway_ends_the_streams_it_will_not_process() -> None:
    link = Link()
    first = link.call(MODEL_INFER, [infer_request("m")])
    link.call(MODEL_INFER, [infer_request("m")])
    link.triton.close_connection(last_stream_id=first)
    link.pump()
    assert link.finished("m") == {"UNAVAILABLE": 1} and link.inflight("m") == 1


# ------------------------------------------------------------------------------ answered by the proxy


def test_client_model_control_is_refused_and_reset_at_triton() -> None:
    link = Link()
    sid = link.call(SERVICE + b"RepositoryModelLoad", [message(b"\x0a\x01m")])
    status = link.status(sid)
    assert status is not None and status[0] == b"7" and "reserved for the tritonpilot controller" in status[1]
    assert link.triton_reset(sid) and link.triton_data(sid) == b""
    assert link.stats.snapshot(link.now_s).models == {}
    allowed = Link(GrpcRules(allow_client_model_control=True))
    sid = allowed.call(SERVICE + b"RepositoryModelLoad", [message(b"\x0a\x01m")])
    assert not allowed.triton_reset(sid) and allowed.status(sid) is None


def test_a_restricted_protocol_without_its_header_gets_triton_s_answer() -> None:
    door = Door(parse_restrictions(["inference:key=secret"]))
    link = Link(GrpcRules(door=door))
    refused = link.call(MODEL_INFER, [infer_request("m")])
    assert link.status(refused) == (b"14", "This protocol is restricted, expecting header "
                                           "'triton-grpc-protocol-key'")
    assert link.triton_reset(refused) and link.inflight("m") == 0
    passed = link.call(MODEL_INFER, [infer_request("m")], metadata=[(b"triton-grpc-protocol-key", b"secret")])
    assert link.inflight("m") == 1 and not link.triton_reset(passed)


def test_health_check_is_answered_by_the_proxy_and_the_window_stays_triton_s() -> None:
    link = Link()
    sid = link.call(HEALTH_CHECK, [message(b"")])
    assert link.client_data(sid) == b"\x00\x00\x00\x00\x02\x08\x01" and link.status(sid) == (b"0", "")
    assert link.conn.injected_data_credit == 7 and windows_agree(link)
    # The client's window update for those 7 bytes is not Triton's to receive.
    window = link.triton.outbound_flow_control_window
    link.client.increment_flow_control_window(7 + 100)
    link.pump()
    assert link.conn.injected_data_credit == 0 and link.triton.outbound_flow_control_window == window + 100
    assert windows_agree(link)


# ------------------------------------------------------------------------------ shedding


def test_a_unary_call_past_the_cap_is_refused_and_never_reaches_triton() -> None:
    link = Link(GrpcRules(caps=InflightCaps(1)))
    first = link.call(MODEL_INFER, [infer_request("m")])
    shed = link.call(MODEL_INFER, [infer_request("m")])
    assert link.status(shed) == (b"8", refusal_message("m", 1))
    # The message's frame had passed when its model was read: the reset follows it at once.
    assert link.triton_reset(shed)
    assert link.inflight("m") == 1 and link.finished("m") == {"RESOURCE_EXHAUSTED": 1}
    link.triton_answers(first, message(b"r"))
    assert link.finished("m") == {OK: 1, "RESOURCE_EXHAUSTED": 1}


def shed_link(cap: int = 2) -> Link:
    return Link(GrpcRules(caps=InflightCaps(cap)))


def refusals(link: Link, sid: int) -> list[tuple[str, str]]:
    return [(r.infer_response.id, r.error_message) for r in parse_stream_responses(link.client_data(sid))
            if r.error_message]


def test_stream_requests_past_the_cap_are_cut_out_and_answered_on_the_stream() -> None:
    link = shed_link(cap=2)
    sid = link.call(MODEL_STREAM_INFER, end=False)
    link.triton_headers(sid)  # Triton's response headers are out: answers go at once
    for i in range(5):
        link.send(sid, infer_request("m", str(i), tensor_bytes=100))
    # Triton saw exactly the two admitted requests, byte for byte.
    assert link.triton_data(sid) == infer_request("m", "0", 100) + infer_request("m", "1", 100)
    message_text = refusal_message("m", 2)
    assert refusals(link, sid) == [("2", message_text), ("3", message_text), ("4", message_text)]
    assert link.inflight("m") == 2 and link.finished("m") == {"RESOURCE_EXHAUSTED": 3}
    assert link.stats.snapshot(link.now_s).models["m"].inflight_peak == 2
    assert windows_agree(link, sid)
    # Triton answers one: the next request passes again.
    link.triton_send(sid, stream_response("m", "0"))
    link.send(sid, infer_request("m", "5"))
    assert link.triton_data(sid).endswith(infer_request("m", "5"))
    link.send(sid, b"", end=True)
    link.triton_send(sid, stream_response("m", "1") + stream_response("m", "5"))
    link.triton_trailers(sid)
    assert link.finished("m") == {OK: 3, "RESOURCE_EXHAUSTED": 3} and link.total_inflight() == 0
    assert not link.conn.stream_credit and windows_agree(link)


def test_stream_answers_wait_for_triton_s_headers_and_go_between_its_messages() -> None:
    link = shed_link(cap=1)
    sid = link.call(MODEL_STREAM_INFER, [infer_request("m", "0"), infer_request("m", "1")], end=False)
    assert refusals(link, sid) == []  # Triton has said nothing yet on this stream
    link.triton_headers(sid)
    assert refusals(link, sid) == [("1", refusal_message("m", 1))]
    # Triton's response split over frames: another refusal waits for the message's end.
    response = stream_response("m", "0") + b""
    link.send(sid, infer_request("m", "2"))
    link.triton_send(sid, response[:4])
    assert len(refusals(link, sid)) == 2  # the response had not started: the answer went first
    link.send(sid, infer_request("m", "3"))
    assert len(refusals(link, sid)) == 2  # now inside Triton's message: it waits
    link.triton_send(sid, response[4:])
    assert [i for i, _ in refusals(link, sid)] == ["1", "2", "3"]
    responses = parse_stream_responses(link.client_data(sid))
    assert [r.infer_response.id for r in responses] == ["1", "2", "0", "3"]
    assert windows_agree(link, sid)


def test_answers_on_a_stream_triton_ends_without_headers_come_before_its_trailers() -> None:
    link = Link(GrpcRules(caps=InflightCaps(1)))
    sid = link.call(MODEL_STREAM_INFER, [infer_request("m", "a"), infer_request("m", "b")])
    assert link.triton_data(sid) == infer_request("m", "a")  # a took the slot, b was cut out
    assert refusals(link, sid) == []  # b's answer waits for Triton's response to start
    link.triton.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                   (b"grpc-status", b"13")], end_stream=True)  # trailers-only
    link.pump()
    assert [i for i, _ in refusals(link, sid)] == ["b"]
    assert link.status(sid) == (b"13", "")  # Triton's status, after our answer
    assert link.finished("m") == {"RESOURCE_EXHAUSTED": 1, "INTERNAL": 1} and link.total_inflight() == 0
    assert windows_agree(link)


def test_a_stream_triton_holds_nothing_of_ends_at_its_first_refusal() -> None:
    """No request of the stream at Triton, no response started: Triton may never send headers
    for an answer to follow, so the stream is answered RESOURCE_EXHAUSTED at once."""
    link = Link(GrpcRules(caps=InflightCaps(1)))
    held = link.call(MODEL_INFER, [infer_request("m")])  # the model's one slot, elsewhere
    sid = link.call(MODEL_STREAM_INFER, [infer_request("m", "a")], end=False)
    assert link.status(sid) == (b"8", refusal_message("m", 1))  # RESOURCE_EXHAUSTED
    assert link.triton_data(sid) == b"" and link.triton_reset(sid)  # Triton never saw the request
    assert link.finished("m") == {"RESOURCE_EXHAUSTED": 1} and link.inflight("m") == 1
    # Triton's later frames on the stream still reach the client's HPACK decoder; nothing breaks.
    link.triton_answers(held, message(b"r"))
    assert link.status(held) == (b"0", "") and link.total_inflight() == 0
    assert not link.violations and windows_agree(link)


def test_stream_requests_below_the_cap_pass_as_they_came() -> None:
    link = shed_link(cap=10)
    sid = link.call(MODEL_STREAM_INFER, end=False)
    sent = [infer_request("m", str(i), tensor_bytes=40000) for i in range(3)]  # several frames each
    for m in sent:
        link.send(sid, m)
    assert link.triton_data(sid) == b"".join(sent) and link.inflight("m") == 3
    assert windows_agree(link, sid)


def test_a_large_request_cut_out_gives_its_whole_window_back() -> None:
    link = shed_link(cap=1)
    sid = link.call(MODEL_STREAM_INFER, end=False)
    link.triton_headers(sid)
    link.send(sid, infer_request("m", "0"))
    link.send(sid, infer_request("m", "big", tensor_bytes=50000))  # most of the client's 64 KiB window
    link.send(sid, infer_request("m", "big2", tensor_bytes=50000))  # only fits if the first came back
    assert link.triton_data(sid) == infer_request("m", "0")
    assert [i for i, _ in refusals(link, sid)] == ["big", "big2"]
    assert windows_agree(link, sid)


# ------------------------------------------------------------------------------ HTTP/2 limits


def flood_link(**limits: int) -> Link:
    return Link(http2=Http2Limits(**limits))


@pytest.mark.parametrize(("limits", "frames", "reason"), [
    ({"max_settings_per_s": 3}, [frame(SETTINGS, 0, 0)] * 4, Http2Refusal.SETTINGS_FLOOD),
    ({"max_pings_per_s": 3}, [frame(PING, 0, 0, b"12345678")] * 4, Http2Refusal.PING_FLOOD),
    ({"max_empty_frames_per_s": 3}, [frame(DATA, 0, 1)] * 4, Http2Refusal.EMPTY_FRAMES),
])
def test_a_flood_gets_enhance_your_calm_and_nothing_of_it_is_forwarded(limits, frames, reason) -> None:
    link = flood_link(**limits)
    link.call(MODEL_INFER, [infer_request("m")], end=False)
    before = len(link.forwarded)
    violation = link.from_client(b"".join(frames))
    assert violation is not None and violation.flood is reason
    assert link.forwarded[before:] == b""
    assert isinstance(link.client_events[-1], h2.events.ConnectionTerminated)
    assert link.client_events[-1].error_code == 0xB
    assert link.conn.closed and link.total_inflight() == 0 and link.finished("m") == {"UNAVAILABLE": 1}


def test_a_rate_limit_is_per_second_of_the_time_passed_in() -> None:
    link = flood_link(max_pings_per_s=3)
    for _ in range(5):  # 3 per second, each second: never a flood
        for _ in range(3):
            assert link.from_client(frame(PING, 0, 0, b"12345678")) is None
        link.now_s += 1.0
    assert link.from_client(frame(PING, 0, 0, b"12345678") * 4) is not None


def test_rapid_reset_is_a_flood() -> None:
    link = flood_link(max_resets_per_s=5)
    for _ in range(5):
        sid = link.call(MODEL_INFER, [infer_request("m")], end=False)
        link.reset(sid)
    assert not link.violations and link.finished("m") == {CANCELLED: 5}
    sid = link.call(MODEL_INFER, [infer_request("m")], end=False)
    link.client.reset_stream(sid, 8)
    link.pump()
    assert [v.flood for v in link.violations] == [Http2Refusal.RAPID_RESET]
    assert link.total_inflight() == 0


def test_a_header_block_over_the_limit_is_refused_before_it_is_buffered() -> None:
    link = flood_link(max_header_block_bytes=1000)
    block = hpack.Encoder().encode([(b":path", MODEL_INFER), (b"x-big", b"v" * 600)])
    first, rest = block[:600], block[600:] + b"x" * 600
    assert link.from_client(frame(HEADERS, 0, 1, first)) is None
    violation = link.from_client(frame(CONTINUATION, END_HEADERS, 1, rest)[:12])  # only its frame header
    assert violation is not None and violation.flood is Http2Refusal.HEADER_BLOCK


def test_streams_past_max_concurrent_streams_are_refused_one_by_one() -> None:
    link = flood_link(max_concurrent_streams=2)
    assert link.client.remote_settings.max_concurrent_streams == 2  # Triton's SETTINGS, capped
    for _ in range(2):
        link.call(MODEL_INFER, [infer_request("m")], end=False)
    # A client that ignores the setting:
    link.client.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 100
    link.client.remote_settings.acknowledge()
    third = link.call(MODEL_INFER, [infer_request("m")], end=False)
    assert link.refusals == [Http2Refusal.CONCURRENT_STREAMS]
    assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == third and e.error_code == 7
               for e in link.client_events)
    assert link.triton_reset(third) and link.inflight("m") == 2 and not link.conn.closed


def test_graceful_goaway_refuses_new_streams_and_lets_open_ones_finish() -> None:
    link = Link()
    open_sid = link.call(MODEL_INFER, [infer_request("m")])
    link.conn.goaway()
    link._deliver()
    assert any(isinstance(e, h2.events.ConnectionTerminated) and e.last_stream_id == open_sid
               for e in link.client_events)
    # A client that opens one anyway (h2 would not): refused, reset at Triton, never counted.
    late = open_sid + 2
    assert link.conn.client_data(frame(HEADERS, END_HEADERS, late, literal_header_block(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", MODEL_INFER), (b":authority", b"t")])),
        link.now_s) is None
    refused = frame(RST_STREAM, 0, late, (7).to_bytes(4, "big"))  # REFUSED_STREAM: retry elsewhere
    assert link.conn.to_client == [refused]
    link.conn.to_client.clear()
    link.client_reads = False
    link._deliver()
    assert link.triton_reset(late) and link.inflight("m") == 1
    link.triton_answers(open_sid, message(b"r"))
    assert link.finished("m") == {OK: 1} and link.conn.open_streams == 0


# ------------------------------------------------------------------------------ garbage


def test_a_bad_preface_is_a_violation() -> None:
    link = Link(handshake=False)
    violation = link.from_client(b"GET / HTTP/1.1\r\n\r\n")
    assert violation is not None and violation.flood is None and "preface" in violation.error
    assert link.conn.closed and link.forwarded == b""


def test_truncated_frames_wait_for_the_rest() -> None:
    link = Link()
    sid = link.client.get_next_available_stream_id()
    link.client.send_headers(sid, [(b":method", b"POST"), (b":path", MODEL_INFER), (b":scheme", b"http"),
                                   (b":authority", b"t")])
    link.client.send_data(sid, infer_request("m"), end_stream=True)
    data = link.client.data_to_send()
    assert link.from_client(data[:5]) is None and link.from_client(data[5:20]) is None
    assert link.inflight("m") == 0
    assert link.from_client(data[20:]) is None and link.inflight("m") == 1


@pytest.mark.parametrize("garbage", [
    frame(CONTINUATION, END_HEADERS, 1, b"\x82"),            # CONTINUATION with no block open
    frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff"),  # not HPACK
    frame(HEADERS, 0x8 | END_HEADERS, 1, b"\xff"),           # padding longer than the frame
])
def test_malformed_frames_are_a_violation_that_ends_everything_open(garbage: bytes) -> None:
    link = Link()
    link.call(MODEL_STREAM_INFER, [infer_request("m", "1")], end=False)
    violation = link.from_client(garbage)
    assert violation is not None and violation.flood is None
    assert link.conn.closed and link.total_inflight() == 0 and not link.ledger.open


def opened(caps: InflightCaps | None = None) -> tuple[GrpcConnection, Ledger, ProxyStats, bytes]:
    """A connection with a preface, a unary call and a stream open; the bytes after them."""
    stats = ProxyStats()
    ledger = Ledger(stats)
    conn = GrpcConnection(GrpcRules(caps=caps, max_message_bytes=1 << 20), ledger, 0.0,
                          Http2Limits(max_resets_per_s=50, max_empty_frames_per_s=50))
    encoder = hpack.Encoder()
    head = PREFACE + frame(SETTINGS, 0, 0)
    for sid, path in ((1, MODEL_INFER), (3, MODEL_STREAM_INFER)):
        head += frame(HEADERS, END_HEADERS, sid, encoder.encode([(b":method", b"POST"), (b":path", path)]))
    head += frame(DATA, 0, 1, infer_request("m")) + frame(DATA, 0, 3, infer_request("m", "x") + infer_request("n"))
    assert conn.client_data(head, 0.0) is None
    return conn, ledger, stats, head


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.lists(st.binary(max_size=300), max_size=6), capped=st.booleans(), from_triton=st.booleans())
def test_any_bytes_never_raise_and_close_leaves_nothing_in_flight(garbage: list[bytes], capped: bool,
                                                                  from_triton: bool) -> None:
    conn, ledger, stats, _ = opened(InflightCaps(1) if capped else None)
    for i, chunk in enumerate(garbage):
        feed = conn.upstream_data if from_triton and i % 2 else conn.client_data
        result = feed(chunk, float(i))
        assert result is None or isinstance(result, Violation)
        conn.to_upstream.clear()
        conn.to_client.clear()
    conn.close(14, 10.0)
    assert not ledger.open
    assert all(m.inflight == 0 for m in stats.snapshot(10.0).models.values())


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_frames_with_random_fields_never_raise(data: st.DataObject) -> None:
    conn, ledger, stats, _ = opened(InflightCaps(1))
    for _ in range(data.draw(st.integers(1, 8))):
        ftype = data.draw(st.integers(0, 12))
        flags = data.draw(st.integers(0, 255))
        sid = data.draw(st.sampled_from([0, 1, 3, 5, 7, 2**31 - 1]))
        payload = data.draw(st.binary(max_size=64))
        feed = conn.upstream_data if data.draw(st.booleans()) else conn.client_data
        result = feed(frame(ftype, flags, sid, payload), 1.0)
        assert result is None or isinstance(result, Violation)
    conn.close(1, 2.0)
    assert not ledger.open and all(m.inflight == 0 for m in stats.snapshot(2.0).models.values())


def test_end_stream_frames_pass_through() -> None:
    # A zero-length DATA with END_STREAM is not an empty-frame flood.
    link = flood_link(max_empty_frames_per_s=1)
    for _ in range(3):
        sid = link.call(MODEL_INFER, [infer_request("m")], end=False)
        link.send(sid, b"", end=True)
    assert not link.violations and link.from_client(frame(RST_STREAM, 0, 99, b"\0\0\0\x08")) is None
    assert END_STREAM == 1


# ---- HPACK: decoded blocks remembered (_Direction.decode_block) ------------------------------

_HEADER_NAMES = st.sampled_from([b"x-a", b"x-b", b":path", b"grpc-status", b"content-type"])
_HEADER_LISTS = st.lists(st.lists(st.tuples(_HEADER_NAMES, st.sampled_from([b"0", b"1", b"22", b"v" * 40])),
                                  min_size=1, max_size=4), min_size=1, max_size=25)


def _decoding_direction() -> _Direction:
    return _Direction(CLIENT_TO_TRITON, 0)


def test_the_same_bytes_decode_to_what_the_table_holds_now() -> None:
    """0xbe is the first dynamic entry: x-a: 1, then x-a: 2 once that was inserted."""
    d = _decoding_direction()
    encoder = hpack.Encoder()
    assert d.decode_block(encoder.encode([(b"x-a", b"1")])) == [(b"x-a", b"1")]  # inserted
    assert encoder.encode([(b"x-a", b"1")]) == b"\xbe"
    assert d.decode_block(b"\xbe") == [(b"x-a", b"1")]
    assert d.decode_block(b"\xbe") == [(b"x-a", b"1")]  # remembered
    assert b"\xbe" in d.decoded
    d.decode_block(encoder.encode([(b"x-a", b"2")]))  # an insertion: the memory is emptied
    assert not d.decoded
    assert d.decode_block(b"\xbe") == [(b"x-a", b"2")]


@settings(max_examples=200, deadline=None)
@given(blocks=_HEADER_LISTS, table_size=st.sampled_from([0, 64, 128, 4096]))
def test_remembered_blocks_decode_as_a_full_decoder_does(blocks: list[list[tuple[bytes, bytes]]],
                                                         table_size: int) -> None:
    """Whatever the encoder inserts, evicts or resizes, each block decodes as hpack's own
    decoder, which decodes every block in full, says."""
    encoder, reference, d = hpack.Encoder(), hpack.Decoder(), _decoding_direction()
    encoder.header_table_size = table_size
    for headers in blocks + blocks:  # again: the second pass hits the memory
        block = encoder.encode(headers)
        assert d.decode_block(block) == list(reference.decode(block, raw=True))


def test_a_smaller_table_allowed_makes_the_next_block_checked_in_full() -> None:
    d = _decoding_direction()
    encoder = hpack.Encoder()
    block = encoder.encode([(b"x-a", b"1")])
    d.decode_block(block)
    d.decode_block(encoder.encode([(b"x-a", b"1")]))
    d.allow_table_size(0)  # the peer must now send a size update before using its table
    assert not d.decoded
    with pytest.raises(hpack.HPACKDecodingError):
        d.decode_block(b"\xbe")
