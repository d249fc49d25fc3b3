"""HTTP/2 abuse limits per client connection: rapid reset, header block size (CONTINUATION
flood), SETTINGS / PING / empty-frame floods, and streams open at once.

The rate rule (limits.FrameRate) and the SETTINGS rewrite are tested with numbers and bytes
first; then each limit against a sidecar in front of a real Triton, with the frames written
by the test: the limit fires (GOAWAY ENHANCE_YOUR_CALM, the connection closes), the metric
counts it, other connections keep working, and real gRPC clients below the limits are not cut."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import grpc
import hpack
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from proxy_support import H2GrpcClient, fp32_inputs, scrape, wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tritonpilot.control.policy import ProxySection
from tritonpilot.proxy.grpc_core import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    _capped_setting,
    frame,
)
from tritonpilot.proxy.limits import UNLIMITED, FrameRate, Http2Limits
from tritonpilot.sidecar.config import SidecarConfig
from tritonpilot.tools.embedded import EmbeddedTriton

ENHANCE_YOUR_CALM, REFUSED_STREAM, CANCEL = 0xB, 0x7, 0x8
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# ------------------------------------------------------------------------------ the rate rule, in numbers


def first_flood(limit: int, times_s: list[float], start_s: float = 0.0) -> int | None:
    """Frames at these times through the relay's check (limits.FrameRate): the index of the
    frame that is a flood, or None."""
    rate = FrameRate(limit, start_s)
    for i, now in enumerate(times_s):
        rate.count += 1
        if rate.count > rate.limit and rate.flooded(now):
            return i
    return None


@pytest.mark.parametrize(("limit", "times_s", "want"), [
    (3, [0.1, 0.2, 0.3], None),                 # at the limit: fine
    (3, [0.1, 0.2, 0.3, 0.4], 3),               # one more within 1 s: the 4th is the flood
    (3, [0.1, 0.2, 0.3, 1.5], None),            # ... not when the window is over
    (3, [0.1, 0.2, 0.3, 1.5, 1.6, 1.7, 1.8], 6),  # a new window from 1.5: 1.5..1.8 is 4 in 1 s
    (3, [0.1, 0.2, 0.3, 1.5, 1.6, 1.7, 2.6], None),
    (1, [0.0, 0.99], 1),
    (1, [0.0, 1.0, 2.0, 3.0, 4.0], None),       # steady at the limit: never
])
def test_more_than_the_limit_within_one_second_is_a_flood(limit: int, times_s: list[float],
                                                          want: int | None) -> None:
    assert first_flood(limit, times_s) == want


def test_a_steady_rate_over_the_limit_is_caught_and_one_under_it_never_is() -> None:
    for rate_per_s, limit in ((101.0, 100), (150.0, 100), (1000.0, 100)):
        times = [i / rate_per_s for i in range(int(rate_per_s * 30))]
        assert first_flood(limit, times) is not None, rate_per_s
    times = [i / 99.0 for i in range(99 * 30)]
    assert first_flood(100, times) is None


def test_the_clock_is_read_once_per_limit_frames() -> None:
    reads = 0
    rate = FrameRate(100, 0.0)
    for i in range(10_000):  # 99 frames per second, just under the limit
        rate.count += 1
        if rate.count > rate.limit:
            reads += 1
            assert not rate.flooded(i / 99.0)
    assert reads <= 10_000 // 100 + 1


def test_off_is_a_limit_no_counter_reaches() -> None:
    assert Http2Limits.limit(None) == UNLIMITED > 10**18
    assert Http2Limits.limit(5) == 5


def test_defaults_agree_across_the_layers() -> None:
    limits, config, policy = Http2Limits(), SidecarConfig(), ProxySection()
    for name in ("max_resets_per_s", "max_header_block_bytes", "max_settings_per_s", "max_pings_per_s",
                 "max_empty_frames_per_s", "max_concurrent_streams"):
        assert getattr(limits, name) == getattr(config, name) == getattr(policy, name), name


def setting(key: int, value: int) -> bytes:
    return key.to_bytes(2, "big") + value.to_bytes(4, "big")


def test_max_concurrent_streams_is_capped_in_triton_s_settings() -> None:
    key = SETTINGS_MAX_CONCURRENT_STREAMS
    window = setting(0x4, 65535)
    # Triton's higher value is rewritten in place: same length.
    capped = _capped_setting(window + setting(key, 1000), key, 10)
    assert capped == window + setting(key, 10)
    # Triton's lower value stands, and the payload is the same object (forwarded as it was).
    payload = window + setting(key, 5)
    assert _capped_setting(payload, key, 10) is payload
    # Absent (unlimited): added.
    assert _capped_setting(window, key, 10) == window + setting(key, 10)
    assert _capped_setting(b"", key, 10) == setting(key, 10)
    # Repeated: the last one counts for the peer; every copy is capped.
    assert _capped_setting(setting(key, 50) + setting(key, 70), key, 10) == setting(key, 10) * 2


# ------------------------------------------------------------------------------ through a real sidecar


def request_block(port: int, path: str = MODEL_INFER) -> bytes:
    """A request header block in literal fields only, so no HPACK table is touched."""
    encoder = hpack.Encoder()
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
               (b":authority", f"127.0.0.1:{port}".encode()), (b"content-type", b"application/grpc"),
               (b"te", b"trailers")]
    return encoder.encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers])


class RawClient:
    """A client connection speaking frames the test writes; a thread reads what comes back
    until the proxy closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.received = bytearray()
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send(PREFACE + frame(SETTINGS, 0, 0))

    def _read(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self.received += data
        except OSError:
            pass
        self.closed.set()

    def send(self, *frames: bytes) -> bool:
        """False when the proxy has closed (or is dropping) the connection."""
        try:
            self.sock.sendall(b"".join(frames))
        except OSError:
            return False
        return True

    def frames(self) -> Iterator[tuple[int, int, int, bytes]]:
        data, pos = bytes(self.received), 0
        while len(data) - pos >= 9:
            length = int.from_bytes(data[pos:pos + 3], "big")
            if len(data) - pos < 9 + length:
                break
            yield (data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
                   data[pos + 9:pos + 9 + length])
            pos += 9 + length

    def goaway_code(self) -> int | None:
        """Wait for the proxy to close; the error code of its last GOAWAY."""
        assert self.closed.wait(30), "the proxy did not close the connection"
        codes = [int.from_bytes(p[4:8], "big") for t, _, _, p in self.frames() if t == GOAWAY]
        return codes[-1] if codes else None

    def resets(self) -> dict[int, int]:
        """The first RST_STREAM's code per stream: frames Triton still sends on a stream the proxy
        refused reach the client too, which ignores them (RFC 9113, 5.1)."""
        codes: dict[int, int] = {}
        for t, _, sid, p in self.frames():
            if t == RST_STREAM:
                codes.setdefault(sid, int.from_bytes(p[:4], "big"))
        return codes

    def close(self) -> None:
        self.sock.close()


def refused(metrics_url: str, reason: str) -> float:
    return scrape(metrics_url + "/metrics").get(("tritonpilot_http2_refused_total", (("reason", reason),)), 0.0)


def infer_ok(url: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    data = np.array([1.5], dtype=np.float32)
    assert client.infer("fast", fp32_inputs(data), client_timeout=30).as_numpy("OUTPUT0").tolist() == [1.5]
    client.close()


SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"


def flood_frames(kind: str, port: int, count: int) -> list[bytes]:
    block = request_block(port)
    if kind == "rapid_reset":
        return [frame(HEADERS, END_HEADERS, sid, block) + frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big"))
                for sid in range(1, 2 * count, 2)]
    if kind == "settings_flood":
        return [frame(SETTINGS, 0, 0)] * count
    if kind == "ping_flood":
        return [frame(PING, 0, 0, i.to_bytes(8, "big")) for i in range(count)]
    if kind == "empty_data":
        return [frame(HEADERS, END_HEADERS, 1, block)] + [frame(DATA, 0, 1)] * count
    if kind == "empty_continuation":
        return [frame(HEADERS, 0, 1, block)] + [frame(CONTINUATION, 0, 1)] * count
    raise ValueError(kind)


FLOODS = {  # test name: (sidecar option set low, reason counted)
    "rapid_reset": ("max_resets_per_s", "rapid_reset"),
    "settings_flood": ("max_settings_per_s", "settings_flood"),
    "ping_flood": ("max_pings_per_s", "ping_flood"),
    "empty_data": ("max_empty_frames_per_s", "empty_frames"),
    "empty_continuation": ("max_empty_frames_per_s", "empty_frames"),
}


@pytest.mark.triton
@pytest.mark.parametrize("kind", list(FLOODS))
def test_a_flood_gets_goaway_enhance_your_calm_and_other_connections_go_on(
        triton: EmbeddedTriton, sidecar_factory, kind: str) -> None:
    option, reason = FLOODS[kind]
    sidecar = sidecar_factory(triton.grpc_url, **{option: 20})
    bystander = H2GrpcClient(sidecar.url)  # opened before, used after: its connection is not touched
    assert bystander.call(SERVER_LIVE, b"").grpc_status == 0

    attacker = RawClient(sidecar.sidecar.port)
    attacker.send(*flood_frames(kind, attacker.port, 200))  # 200 in far less than a second
    assert attacker.goaway_code() == ENHANCE_YOUR_CALM
    attacker.close()
    assert refused(sidecar.metrics_url, reason) == 1
    others = {r for _, r in FLOODS.values()} - {reason}
    assert all(refused(sidecar.metrics_url, r) == 0 for r in others)

    assert bystander.call(SERVER_LIVE, b"").grpc_status == 0
    infer_ok(sidecar.url)
    bystander.close()


@pytest.mark.triton
@pytest.mark.parametrize("kind", list(FLOODS))
def test_the_same_frames_under_the_limit_pass(triton: EmbeddedTriton, sidecar_factory, kind: str) -> None:
    option, reason = FLOODS[kind]
    sidecar = sidecar_factory(triton.grpc_url, **{option: 20})
    client = RawClient(sidecar.sidecar.port)
    # With the preface's SETTINGS: 16 <= 20. Triton itself (grpc's max_ping_strikes) closes a
    # connection that PINGs more than twice with no call running: one PING here.
    client.send(*flood_frames(kind, client.port, 1 if kind == "ping_flood" else 15))
    if kind == "empty_continuation":
        client.send(frame(CONTINUATION, END_HEADERS, 1))  # nothing else may come inside a block
    # A ping through the proxy and back says every frame before it was read.
    client.send(frame(PING, 0, 0, b"lastping"))
    wait_until(lambda: any(t == PING and p == b"lastping" for t, _, _, p in client.frames()), what="the PING ACK")
    assert not client.closed.is_set()
    assert refused(sidecar.metrics_url, reason) == 0
    client.close()


@pytest.mark.triton
def test_a_grpc_client_cancelling_many_calls_at_once_is_not_cut(triton_factory, sidecar_factory) -> None:
    """Default limits: a burst of 300 calls cancelled as soon as they start, one connection.
    Its own Triton: tritonserver 2.51 itself sometimes dies (SIGSEGV) under such bursts, also
    without the proxy in front (seen in about 1 of 5 bursts), and must not take the shared one."""
    triton = triton_factory(load_models=["fast"])
    sidecar = sidecar_factory(triton.grpc_url)
    channel = grpc.insecure_channel(sidecar.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="fast")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.array([2.0], dtype=np.float32).tobytes())
    del tensor
    futures: list[Future] = []
    for _ in range(300):
        call = stub.ModelInfer.future(request, timeout=30)
        call.cancel()
        futures.append(call)
    for call in futures:
        assert call.cancelled() or call.exception() is not None or call.result() is not None
    assert refused(sidecar.metrics_url, "rapid_reset") == 0
    crashed = "tritonserver crashed under the cancel burst (its own bug, seen without the proxy too)"
    try:
        reply = stub.ModelInfer(request, timeout=30)  # the same connection still serves
    except grpc.RpcError:
        time.sleep(1.0)  # the crashed process's exit can trail its dropped connection
        if not triton.is_running():
            pytest.xfail(crashed)
        raise
    assert np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).tolist() == [2.0]
    assert refused(sidecar.metrics_url, "rapid_reset") == 0
    assert wait_until(lambda: sidecar.finished("fast"), what="calls counted").get("OK", 0) >= 1
    channel.close()


@pytest.mark.triton
def test_a_ten_megabyte_header_block_is_cut_at_the_limit_without_growing_memory(
        triton: EmbeddedTriton, serve_factory) -> None:
    """Default limits, `tritonpilot serve` as a process: its RSS is read from /proc."""
    serve = serve_factory(triton.grpc_url)
    infer_ok(serve.url)  # warm: the first call and the first scrape allocate what any would
    assert refused(serve.metrics_url, "header_block") == 0

    def rss_bytes() -> int:
        with open(f"/proc/{serve.proc.pid}/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return kib * 1024

    before = rss_bytes()
    attacker = RawClient(serve.port)
    # Header fields of 100 bytes, literal without indexing, cut into 16 KiB frames: 10 MB in all.
    unit = b"\x00\x05x-pad\x64" + b"a" * 100
    stream = unit * (16384 // len(unit) + 2)
    block = request_block(serve.port)
    sent = 0
    attacker.send(frame(HEADERS, 0, 1, block))
    while sent < 10 * 1024 * 1024:
        offset = sent % len(unit)
        if not attacker.send(frame(CONTINUATION, 0, 1, stream[offset:offset + 16384])):
            break
        sent += 16384
    assert attacker.goaway_code() == ENHANCE_YOUR_CALM
    attacker.close()
    grown = rss_bytes() - before
    assert grown < 4 * 1024 * 1024, f"RSS grew by {grown} bytes"
    assert refused(serve.metrics_url, "header_block") == 1
    infer_ok(serve.url)


@pytest.mark.triton
def test_streams_past_max_concurrent_streams_are_refused_and_the_client_is_told(
        triton: EmbeddedTriton, sidecar_factory) -> None:
    sidecar = sidecar_factory(triton.grpc_url, max_concurrent_streams=2)
    # What the client hears in Triton's SETTINGS.
    told = H2GrpcClient(sidecar.url)
    assert told.call(SERVER_LIVE, b"").grpc_status == 0
    assert told.conn.remote_settings.max_concurrent_streams == 2
    told.close()

    # A client that ignores it: three calls open (headers, no message yet), the third refused.
    client = RawClient(sidecar.sidecar.port)
    block = request_block(client.port)
    client.send(*(frame(HEADERS, END_HEADERS, sid, block) for sid in (1, 3, 5)))
    wait_until(lambda: client.resets().get(5) == REFUSED_STREAM, what="stream 5 refused")
    assert 1 not in client.resets() and 3 not in client.resets()
    assert refused(sidecar.metrics_url, "concurrent_streams") == 1
    # Once one ends, a new one is taken.
    client.send(frame(RST_STREAM, 0, 1, CANCEL.to_bytes(4, "big")), frame(HEADERS, END_HEADERS, 7, block),
                frame(PING, 0, 0, b"lastping"))
    wait_until(lambda: any(t == PING and p == b"lastping" for t, _, _, p in client.frames()), what="the PING ACK")
    assert 7 not in client.resets()
    assert refused(sidecar.metrics_url, "concurrent_streams") == 1
    assert not client.closed.is_set()
    client.close()

    # Real gRPC clients stay within it: 8 calls at once on one connection all succeed.
    grpc_client = grpcclient.InferenceServerClient(sidecar.url)
    results: list = []
    done = threading.Semaphore(0)

    def callback(result, error) -> None:
        results.append((result, error))
        done.release()

    for i in range(8):
        grpc_client.async_infer("fast", fp32_inputs(np.array([float(i)], dtype=np.float32)), callback=callback)
    for _ in range(8):
        assert done.acquire(timeout=30)
    assert sorted(r.as_numpy("OUTPUT0").tolist()[0] for r, e in results if e is None) == [float(i) for i in range(8)]
    grpc_client.close()
