"""The HTTP/REST port, against a real Triton: every REST endpoint answers through the proxy
what Triton answers directly (raw bytes compared), tritonclient.http (sync and aio) works
through it, the edge cases of HTTP/1.1 (pipelining, chunked bodies, a client gone
mid-body, a 64 MB body, garbage) cost nothing but their own connection, and requests in
flight are counted exactly, per model, with protocol "http"."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from proxy_support import SidecarThread, http_status, wait_until
from tritonclient.utils import InferenceServerException

from tritonpilot.ports import free_port
from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.triton


def hostport(url: str) -> str:
    return url.removeprefix("http://")


@pytest.fixture
def http_sidecar(triton: EmbeddedTriton, sidecar_factory: Callable[..., SidecarThread]) -> SidecarThread:
    """A sidecar whose HTTP port relays to the shared `triton`'s HTTP port."""
    return sidecar_factory(triton.grpc_url, triton_http=hostport(triton.http_url))


# ------------------------------------------------------------------------------ raw HTTP/1.1


class Raw:
    """HTTP/1.1 over a plain socket: requests as bytes, responses read back as raw bytes."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        host, port = hostport(url).rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: bytes = b"GET") -> bytes:
        """One response (interim 1xx ones included), byte for byte."""
        out = b""
        while True:
            head = self._line()
            if not head:
                raise ConnectionError(f"closed after {out!r}")
            status = int(head.split(b" ", 2)[1])
            headers: dict[bytes, bytes] = {}
            out += head
            while True:
                line = self._line()
                out += line
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if status < 200:
                continue
            # Triton 2.51 sends a body after HEAD (its 405 JSON error), framed like any other.
            if status in (204, 304):
                return out
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size_line = self._line()
                    out += size_line
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        while (line := self._line()) not in (b"\r\n", b""):
                            out += line
                        return out + line
                    out += self.file.read(size + 2)
            if b"content-length" in headers:
                return out + self.file.read(int(headers[b"content-length"]))
            return out + self.file.read()  # until the close

    def _line(self) -> bytes:
        return self.file.readline(1 << 20)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError, OSError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    all_headers = dict(headers or {})
    if body or method == "POST":
        all_headers.setdefault("Content-Length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(url: str, data: bytes, methods: list[bytes] | None = None) -> list[bytes]:
    raw = Raw(url)
    try:
        raw.send(data)
        return [raw.response(m) for m in (methods or [data.split(b" ", 1)[0]])]
    finally:
        raw.close()


def both(triton: EmbeddedTriton, sidecar: SidecarThread, data: bytes,
         methods: list[bytes] | None = None) -> list[bytes]:
    direct = exchange(triton.http_url, data, methods)
    assert sidecar.http_url is not None
    proxied = exchange(sidecar.http_url, data, methods)
    assert proxied == direct
    return direct


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


def infer_json(values: list[float], model: str = "identity_fp32", binary_output: bool = False) -> bytes:
    body: dict[str, Any] = {"inputs": [{"name": "INPUT0", "shape": [len(values)], "datatype": "FP32", "data": values}]}
    if binary_output:
        body["outputs"] = [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]
    return json.dumps(body).encode()


def infer_binary(values: np.ndarray) -> tuple[bytes, int]:
    """The binary tensor extension: a JSON header, then the tensor's raw bytes."""
    header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [int(values.size)], "datatype": "FP32",
                                     "parameters": {"binary_data_size": int(values.nbytes)}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    return header + values.tobytes(), len(header)


# ------------------------------------------------------------------------------ transparency


def test_every_rest_endpoint_answers_byte_for_byte_as_triton(triton: EmbeddedTriton, http_sidecar) -> None:
    binary, header_length = infer_binary(np.arange(8, dtype=np.float32))
    gz = gzip.compress(infer_json([1.0, 2.0]))
    cases = [
        request("GET", "/v2/health/live"), request("GET", "/v2/health/ready"), request("GET", "/v2"),
        request("HEAD", "/v2"), request("GET", "/no/such/path"),
        request("GET", "/v2/models/identity_fp32"), request("GET", "/v2/models/identity_fp32/versions/1"),
        request("GET", "/v2/models/identity_fp32/ready"), request("GET", "/v2/models/identity_fp32/config"),
        request("GET", "/v2/models/no_such_model/config"), request("GET", "/v2/models/fa%73t/ready"),
        request("POST", "/v2/models/identity_fp32/infer", infer_json([1.0, 2.5, -3.0])),
        request("POST", "/v2/models/identity_fp32/versions/1/infer", infer_json([4.0], binary_output=True)),
        request("POST", "/v2/models/identity_fp32/infer", binary,
                {"Inference-Header-Content-Length": str(header_length), "Content-Type": "application/octet-stream"}),
        request("POST", "/v2/models/identity_fp32/infer", gz, {"Content-Encoding": "gzip"}),
        request("POST", "/v2/models/identity_fp32/infer", infer_json([1.0]), {"Accept-Encoding": "gzip"}),
        request("POST", "/v2/models/identity_fp32/infer", b"{not json"),
        request("POST", "/v2/models/no_such_model/infer", infer_json([1.0])),
        request("POST", "/v2/models/identity_fp32/generate", json.dumps({"INPUT0": [1.0, 2.0]}).encode()),
        request("POST", "/v2/models/decoupled/generate_stream", json.dumps({"IN": [3]}).encode()),
        request("POST", "/v2/models/decoupled/generate_stream", json.dumps({"IN": "x"}).encode()),
        request("GET", "/v2/models/stats"), request("GET", "/v2/models/identity_fp32/stats"),
        request("POST", "/v2/repository/index", b"{}"),
        request("GET", "/v2/systemsharedmemory/status"), request("GET", "/v2/cudasharedmemory/status"),
        request("POST", "/v2/systemsharedmemory/region/tp_none/unregister", b""),
        request("GET", "/v2/trace/setting"), request("GET", "/v2/models/identity_fp32/trace/setting"),
        request("GET", "/v2/logging"), request("GET", "/v2/repository/models/fast/load"),
    ]
    answers = [both(triton, http_sidecar, case)[0] for case in cases]
    statuses = [status_of(a) for a in answers]
    assert statuses[:3] == [200, 200, 200] and statuses[4] == 404
    assert statuses[11:16] == [200, 200, 200, 200, 200]
    assert json.loads(body_of(answers[11]))["outputs"][0]["data"] == [1.0, 2.5, -3.0]
    assert b"Inference-Header-Content-Length" in answers[13]
    assert b"text/event-stream" in answers[19] and answers[19].count(b"data: ") == 3
    # Writes that set what is set already: the same answer both ways.
    logging = json.loads(body_of(answers[-2]))
    setting = json.dumps({"log_verbose_level": logging["log_verbose_level"]}).encode()
    both(triton, http_sidecar, request("POST", "/v2/logging", setting))
    # Requests that did not infer count nowhere; the inference ones count under their model.
    snapshot = http_sidecar.snapshot()
    assert set(snapshot.models) == {"identity_fp32", "no_such_model", "decoupled"}
    assert snapshot.protocols[("identity_fp32", "http")].finished_total == {"200": 6, "500": 1}
    assert snapshot.protocols[("decoupled", "http")].finished_total == {"200": 1, "500": 1}
    assert snapshot.models["no_such_model"].finished_total == {"404": 1}
    assert all(m.inflight == 0 for m in snapshot.models.values())


def test_system_shared_memory_register_infer_unregister(triton: EmbeddedTriton, http_sidecar) -> None:
    import tritonclient.utils.shared_memory as shm

    region = shm.create_shared_memory_region("tp_http_region", "/tritonpilot_http_test", 64)
    proxied = httpclient.InferenceServerClient(http_sidecar.http_url)
    try:
        data = np.arange(16, dtype=np.float32)
        shm.set_shared_memory_region(region, [data])
        proxied.register_system_shared_memory("tp_http_region", "/tritonpilot_http_test", 64)
        status = both(triton, http_sidecar, request("GET", "/v2/systemsharedmemory/region/tp_http_region/status"))[0]
        assert b'"key":"/tritonpilot_http_test"' in status
        inp = httpclient.InferInput("INPUT0", [16], "FP32")
        inp.set_shared_memory("tp_http_region", 64)
        np.testing.assert_array_equal(proxied.infer("identity_fp32", [inp]).as_numpy("OUTPUT0"), data)
        again = request("POST", "/v2/systemsharedmemory/region/tp_http_region/register",
                        json.dumps({"key": "/tritonpilot_http_test", "offset": 0, "byte_size": 64}).encode())
        assert status_of(both(triton, http_sidecar, again)[0]) == 400  # already registered: Triton's error
        proxied.unregister_system_shared_memory("tp_http_region")
    finally:
        try:
            proxied.unregister_system_shared_memory("tp_http_region")
        finally:
            proxied.close()
            shm.destroy_shared_memory_region(region)


def test_pipelined_requests_come_back_in_order(triton: EmbeddedTriton, http_sidecar) -> None:
    requests = [request("GET", "/v2/health/live"), request("POST", "/v2/models/identity_fp32/infer", infer_json([7.0])),
                request("HEAD", "/v2/health/ready"), request("GET", "/v2/models/identity_fp32/config"),
                request("POST", "/v2/models/fast/infer", infer_json([1.0], model="fast"))]
    methods = [r.split(b" ", 1)[0] for r in requests]
    # Triton itself answers only the first of these when they come pipelined (it drops what
    # follows a request without a body); through the proxy, each gets what it gets alone.
    alone = [exchange(triton.http_url, r)[0] for r in requests]
    assert http_sidecar.http_url is not None
    assert exchange(http_sidecar.http_url, b"".join(requests), methods) == alone
    assert [status_of(a) for a in alone] == [200, 200, 405, 200, 200]
    # A refused request inside a pipeline gets its answer in its place.
    assert http_sidecar.http_url is not None
    refused = exchange(http_sidecar.http_url, request("GET", "/v2/health/live")
                       + request("POST", "/v2/repository/models/fast/unload", b"{}")
                       + request("POST", "/v2/models/fast/infer", infer_json([1.0], model="fast")),
                       [b"GET", b"POST", b"POST"])
    assert [status_of(a) for a in refused] == [200, 403, 200]


def test_chunked_request_bodies_and_expect_100_continue(triton: EmbeddedTriton, http_sidecar) -> None:
    body = infer_json([1.0, 2.0, 3.0])
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    data = request("POST", "/v2/models/identity_fp32/infer", headers={"Transfer-Encoding": "chunked"}
                   ).replace(b"Content-Length: 0\r\n", b"") + chunked + b"0\r\n\r\n"
    direct = both(triton, http_sidecar, data)[0]
    assert status_of(direct) == 200
    expect = request("POST", "/v2/models/identity_fp32/infer", body, {"Expect": "100-continue"})
    answer = both(triton, http_sidecar, expect)[0]
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    # Sent byte by byte, a chunked request still passes.
    assert http_sidecar.http_url is not None
    raw = Raw(http_sidecar.http_url)
    try:
        for i in range(len(data)):
            raw.send(data[i:i + 1])
        assert raw.response(b"POST") == direct
    finally:
        raw.close()


def test_a_64_mb_body_passes_as_directly(triton: EmbeddedTriton, http_sidecar) -> None:
    values = np.arange(16 * 1024 * 1024 - 64, dtype=np.float32)  # 64 MiB less a little: under Triton's cap
    body, header_length = infer_binary(values)
    data = request("POST", "/v2/models/identity_fp32/infer", body,
                   {"Inference-Header-Content-Length": str(header_length)})
    assert http_sidecar.http_url is not None
    proxied = exchange(http_sidecar.http_url, data)[0]
    assert status_of(proxied) == 200
    out = np.frombuffer(proxied[-values.nbytes:], dtype=np.float32)
    np.testing.assert_array_equal(out, values)
    # Past Triton's own cap: Triton's error, the same both ways.
    big = request("POST", "/v2/models/identity_fp32/infer", b"x" * (64 * 1024 * 1024 + 16))
    assert exchange(http_sidecar.http_url, big) == exchange(triton.http_url, big)


def test_tritonclient_http_sync_and_aio_through_the_proxy(triton: EmbeddedTriton, http_sidecar) -> None:
    assert http_sidecar.http_url is not None
    values = np.linspace(-1, 1, 32, dtype=np.float32)
    results = []
    for url in (hostport(triton.http_url), http_sidecar.http_url):
        client = httpclient.InferenceServerClient(url)
        try:
            assert client.is_server_live() and client.is_model_ready("identity_fp32")
            inp = httpclient.InferInput("INPUT0", [32], "FP32")
            inp.set_data_from_numpy(values, binary_data=True)
            out = client.infer("identity_fp32", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0")],
                               request_compression_algorithm="gzip", response_compression_algorithm="deflate")
            results.append((client.get_server_metadata(), client.get_model_config("identity_fp32"),
                            out.as_numpy("OUTPUT0").tolist()))
            with pytest.raises(InferenceServerException, match="no_such_model"):
                client.infer("no_such_model", [inp])
        finally:
            client.close()
    assert results[0] == results[1] and results[1][2] == values.tolist()

    async def aio(url: str) -> list[float]:
        client = aiohttpclient.InferenceServerClient(url)
        try:
            inp = aiohttpclient.InferInput("INPUT0", [32], "FP32")
            inp.set_data_from_numpy(values)
            outs = await asyncio.gather(*[client.infer("identity_fp32", [inp]) for _ in range(8)])
            return [o.as_numpy("OUTPUT0").tolist() for o in outs][0]
        finally:
            await client.close()
    assert asyncio.run(aio(http_sidecar.http_url)) == values.tolist()


# ------------------------------------------------------------------------------ bad input


def test_garbage_and_oversized_heads_get_a_clean_4xx_or_a_close(triton: EmbeddedTriton, http_sidecar) -> None:
    url = http_sidecar.http_url
    assert url is not None
    for data in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /v2 HTTP/1.1\r\nBad Header\r\n\r\n",
                 b"POST /v2/models/fast/infer HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"POST /v2/models/fast/infer HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256))):
        raw = Raw(url, timeout_s=10)
        try:
            raw.send(data)
            answer = raw.response()
            assert status_of(answer) == 400 and b'{"error":"tritonpilot: ' in answer, answer
            assert raw.closed_by_peer()
        finally:
            raw.close()
    raw = Raw(url, timeout_s=10)
    try:
        raw.send(b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * (80 * 1024) + b"\r\n\r\n")
        assert status_of(raw.response()) == 431 and raw.closed_by_peer()
    finally:
        raw.close()
    # A bad chunk size after the head went to Triton: the connection closes, nothing hangs.
    raw = Raw(url, timeout_s=10)
    try:
        raw.send(b"POST /v2/models/fast/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert raw.closed_by_peer()
    finally:
        raw.close()
    # The port still serves, and nothing is left in flight.
    assert status_of(exchange(url, request("GET", "/v2/health/live"))[0]) == 200
    wait_until(lambda: http_sidecar.inflight("fast") == 0, what="nothing left in flight")


def test_a_client_gone_mid_body_ends_its_request(triton: EmbeddedTriton, http_sidecar) -> None:
    url = http_sidecar.http_url
    assert url is not None
    raw = Raw(url)
    raw.send(b"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
    wait_until(lambda: http_sidecar.inflight("identity_fp32") == 1, what="the request to count")
    raw.close()
    wait_until(lambda: http_sidecar.inflight("identity_fp32") == 0, what="the request to end")
    assert http_sidecar.finished("identity_fp32") == {"499": 1}
    # A body shorter than its Content-Length, then a half-close: the connection closes, no hang.
    raw = Raw(url, timeout_s=10)
    try:
        raw.send(b"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}")
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.closed_by_peer()
    finally:
        raw.close()
    wait_until(lambda: http_sidecar.inflight("identity_fp32") == 0, what="the request to end")
    assert exchange(url, request("POST", "/v2/models/identity_fp32/infer", infer_json([1.0])))[0].startswith(
        b"HTTP/1.1 200 OK")


# ------------------------------------------------------------------------------ counting


def gate_body(gate: str | None) -> bytes:
    inputs: list[dict[str, Any]] = [{"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]
    if gate is not None:
        inputs.append({"name": "GATE", "shape": [1], "datatype": "BYTES", "data": [gate]})
    return json.dumps({"inputs": inputs}).encode()


@pytest.mark.parametrize("n", [1, 5, 32])
def test_inflight_is_exact_for_n_held_requests_then_zero(gate_triton: EmbeddedTriton, sidecar_factory, gates,
                                                        n: int) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url, triton_http=hostport(gate_triton.http_url))
    gate = gates.new()
    conns = [Raw(sidecar.http_url) for _ in range(n)]
    try:
        for raw in conns:
            raw.send(request("POST", "/v2/models/gate/infer", gate_body(gate)))
        wait_until(lambda: sidecar.inflight("gate") == n, what=f"{n} requests in flight")
        assert sidecar.metric("tritonpilot_inflight_requests", model="gate", protocol="http") == n
        assert sidecar.metric("tritonpilot_inflight_requests", model="gate", protocol="grpc") is None
        time.sleep(0.2)
        assert sidecar.inflight("gate") == n  # held, not drifting
        gates.open(gate)
        answers = [raw.response(b"POST") for raw in conns]
    finally:
        for raw in conns:
            raw.close()
    assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    assert sidecar.finished("gate") == {"200": n}
    assert sidecar.metric("tritonpilot_requests_total", model="gate", code="200", protocol="http") == n


def test_grpc_and_http_requests_of_one_model_add_up(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    import tritonclient.grpc as grpcclient
    from proxy_support import gate_inputs

    sidecar = sidecar_factory(gate_triton.grpc_url, triton_http=hostport(gate_triton.http_url), max_inflight=3)
    gate = gates.new()
    grpc_client = grpcclient.InferenceServerClient(sidecar.url)
    results: list[Any] = []
    held = threading.Thread(target=lambda: results.append(grpc_client.infer("gate", gate_inputs(gate))))
    held.start()
    conns = [Raw(sidecar.http_url) for _ in range(3)]
    try:
        wait_until(lambda: sidecar.inflight("gate") == 1, what="the gRPC call to count")
        for raw in conns[:2]:
            raw.send(request("POST", "/v2/models/gate/infer", gate_body(gate)))
        wait_until(lambda: sidecar.inflight("gate") == 3, what="both protocols to count")
        # The cap is the model's, over both protocols: the next HTTP request is shed with 429.
        conns[2].send(request("POST", "/v2/models/gate/infer", gate_body(gate)))
        shed = conns[2].response(b"POST")
        assert status_of(shed) == 429
        assert json.loads(body_of(shed)) == {
            "error": "tritonpilot: model 'gate' has 3 requests in flight, its cap (max_inflight); "
                     "retry later or elsewhere"}
        gates.open(gate)
        assert all(status_of(raw.response(b"POST")) == 200 for raw in conns[:2])
    finally:
        for raw in conns:
            raw.close()
        held.join(30)
        grpc_client.close()
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    snapshot = sidecar.snapshot()
    assert snapshot.models["gate"].finished_total == {"OK": 1, "200": 2, "429": 1}


# ------------------------------------------------------------------------------ the front door


def test_client_model_control_is_refused_unless_allowed(triton: EmbeddedTriton, sidecar_factory) -> None:
    http_url = hostport(triton.http_url)
    refusing = sidecar_factory(triton.grpc_url, triton_http=http_url)
    for action in ("load", "unload"):
        for path in (f"/v2/repository/models/fast/{action}", f"/v2/repository/models_repo/models/fast/{action}"):
            answer = exchange(refusing.http_url, request("POST", path, b"{}"))[0]
            assert status_of(answer) == 403 and b"Content-Type: application/json" in answer
            assert "--allow-client-model-control" in json.loads(body_of(answer))["error"]
    client = httpclient.InferenceServerClient(refusing.http_url)
    try:
        with pytest.raises(InferenceServerException, match="model control is reserved"):
            client.unload_model("fast")
    finally:
        client.close()
    assert triton.is_running() and exchange(triton.http_url, request("GET", "/v2/models/fast/ready"))[0].startswith(
        b"HTTP/1.1 200")
    allowing = sidecar_factory(triton.grpc_url, triton_http=http_url, allow_client_model_control=True)
    unknown = request("POST", "/v2/repository/models/no_such_model/load", b"{}")
    assert exchange(allowing.http_url, unknown) == exchange(triton.http_url, unknown)


def test_restricted_apis_answer_as_triton_does(triton_factory, sidecar_factory) -> None:
    rule = "inference,model-config:tp-key=secret"  # not health: EmbeddedTriton's readiness probe uses it
    restricted = triton_factory(load_models=["fast"], extra_args=[f"--http-restricted-api={rule}"])
    open_triton = triton_factory(load_models=["fast"])
    sidecar = sidecar_factory(open_triton.grpc_url, triton_http=hostport(open_triton.http_url),
                              http_restricted_apis=(rule,))
    cases = [request("GET", "/v2/models/fast/config"), request("POST", "/v2/models/fast/infer", infer_json([1.0])),
             request("POST", "/v2/models/fast/generate_stream", b"{}"),
             request("GET", "/v2/models/fast/versions/1/config", headers={"tp-key": "wrong"})]
    for case in cases:
        want = exchange(restricted.http_url, case)[0]
        assert status_of(want) == 403
        assert exchange(sidecar.http_url, case)[0] == want
    allowed = request("GET", "/v2/models/fast/config", headers={"TP-Key": "secret"})
    assert exchange(sidecar.http_url, allowed) == exchange(restricted.http_url, allowed)
    assert status_of(exchange(sidecar.http_url, request("GET", "/v2/models/fast"))[0]) == 200  # metadata: open


def test_triton_unreachable_answers_503_at_once(sidecar_factory) -> None:
    port = free_port()
    sidecar = sidecar_factory(f"127.0.0.1:{free_port()}", triton_http=f"127.0.0.1:{port}")
    started = time.monotonic()
    raw = Raw(sidecar.http_url, timeout_s=10)
    try:
        raw.send(request("POST", "/v2/models/fast/infer", infer_json([1.0])))
        answer = raw.response(b"POST")
        assert status_of(answer) == 503 and b"Connection: close" in answer
        assert f"127.0.0.1:{port} is unreachable" in json.loads(body_of(answer))["error"]
        assert raw.closed_by_peer()
    finally:
        raw.close()
    assert time.monotonic() - started < 5
    assert sidecar.finished("fast") == {"503": 1} and sidecar.inflight("fast") == 0


def test_triton_killed_under_http_load_then_restarted(triton_factory, sidecar_factory) -> None:
    triton = triton_factory(load_models=["sleep"])
    sidecar = sidecar_factory(triton.grpc_url, triton_http=hostport(triton.http_url))
    stop = threading.Event()
    outcomes: list[tuple[float, float, str]] = []
    lock = threading.Lock()

    def load() -> None:
        client: httpclient.InferenceServerClient | None = None
        inp = httpclient.InferInput("INPUT0", [4], "FP32")
        inp.set_data_from_numpy(np.ones(4, dtype=np.float32))
        while not stop.is_set():
            started = time.monotonic()
            try:
                client = client or httpclient.InferenceServerClient(sidecar.http_url, network_timeout=10.0)
                client.infer("sleep", [inp])
                code = "200"
            except InferenceServerException as exc:
                code = str(exc.status())
            except Exception as exc:  # noqa: BLE001 - a closed connection, as a client sees it
                code = type(exc).__name__
                client = None
            with lock:
                outcomes.append((started, time.monotonic() - started, code))
            if code != "200":
                time.sleep(0.05)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: sum(o[2] == "200" for o in outcomes) >= 20, what="load to run")
        triton.kill()
        killed_at = time.monotonic()
        wait_until(lambda: sum(o[0] > killed_at + 0.5 for o in outcomes) >= 8, what="calls after the kill to fail")
        with lock:
            after = [o for o in outcomes if o[0] > killed_at + 0.5]
        assert all(code != "200" for _, _, code in after) and max(took for _, took, _ in after) < 5, after
        assert http_status(sidecar.metrics_url + "/healthz") == 200
        restarted_at = time.monotonic()
        triton.restart()
        wait_until(lambda: any(o[0] > restarted_at and o[2] == "200" for o in outcomes), timeout_s=60,
                   what="calls to succeed again after the restart")
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    wait_until(lambda: sidecar.inflight("sleep") == 0, what="nothing left in flight")
    finished = sidecar.finished("sleep")
    assert finished["200"] >= 21 and finished.get("503", 0) >= 1, finished


def test_sigterm_drains_the_http_port(gate_triton: EmbeddedTriton, serve_factory, gates) -> None:
    proc = serve_factory(gate_triton.grpc_url, "--triton-http", hostport(gate_triton.http_url))
    gate = gates.new()
    held = Raw(proc.http_url)
    try:
        held.send(request("POST", "/v2/models/gate/infer", gate_body(gate)))
        wait_until(lambda: gates.holding(gate), what="Triton to hold the request")
        import signal
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        gates.open(gate)
        assert status_of(held.response(b"POST")) == 200  # the open request finished
        assert held.closed_by_peer()
    finally:
        held.close()
    assert proc.proc.wait(30) == 0


def test_tls_and_mtls_on_the_http_port(triton: EmbeddedTriton, sidecar_factory, tmp_path) -> None:
    import ssl

    from tls_support import OPENSSL, issue, make_ca

    if OPENSSL is None:
        pytest.skip("the openssl command makes the test certificates")
    ca = make_ca(tmp_path / "ca")
    server, client = issue(ca, tmp_path, "proxy", 1001), issue(ca, tmp_path, "client", 2001)
    sidecar = sidecar_factory(triton.grpc_url, triton_http=hostport(triton.http_url), tls_cert=str(server.cert),
                              tls_key=str(server.key), tls_client_ca=str(ca.cert))
    host, port = sidecar.http_url.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            tls.sendall(request("POST", "/v2/models/identity_fp32/infer", infer_json([5.0])))
            reply = b""
            while b'"data":[5.0]' not in reply:
                chunk = tls.recv(65536)
                assert chunk, reply
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK")
    # Without a client certificate the handshake fails: mTLS holds on this port too.
    bare = ssl.create_default_context(cafile=str(ca.cert))
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with bare.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(request("GET", "/v2/health/live"))
                assert tls.recv(1024) == b""  # TLS 1.3: the refusal arrives on the first read
                raise ConnectionError("closed")


def test_connection_limits_apply_to_the_http_port(triton: EmbeddedTriton, sidecar_factory) -> None:
    sidecar = sidecar_factory(triton.grpc_url, triton_http=hostport(triton.http_url), max_connections=1,
                              idle_timeout_s=0.5, preface_timeout_s=0.5)
    first = Raw(sidecar.http_url, timeout_s=10)
    try:
        first.send(request("GET", "/v2/health/live"))
        assert status_of(first.response()) == 200
        second = Raw(sidecar.http_url, timeout_s=10)  # over --max-connections: closed unread
        try:
            assert second.closed_by_peer()
        finally:
            second.close()
        started = time.monotonic()
        assert first.closed_by_peer()  # idle: closed between requests
        assert time.monotonic() - started < 5
    finally:
        first.close()
    silent = Raw(sidecar.http_url, timeout_s=10)  # never sends a request head: the preface timeout
    try:
        assert silent.closed_by_peer()
    finally:
        silent.close()
    assert sidecar.metric("tritonpilot_connections_refused_total", reason="max_connections") >= 1
    assert sidecar.metric("tritonpilot_connections_goaway_total", reason="idle") >= 1
    assert sidecar.metric("tritonpilot_connections_refused_total", reason="preface_timeout") >= 1


def test_a_body_over_max_message_bytes_gets_413(triton: EmbeddedTriton, sidecar_factory) -> None:
    sidecar = sidecar_factory(triton.grpc_url, triton_http=hostport(triton.http_url), max_message_bytes=100)
    big = request("POST", "/v2/models/identity_fp32/infer", infer_json([1.0] * 40))
    small = request("POST", "/v2/models/identity_fp32/infer", infer_json([1.0]))
    answers = exchange(sidecar.http_url, big + small, [b"POST", b"POST"])  # the connection stays usable
    assert [status_of(a) for a in answers] == [413, 200]
    assert "larger than max" in json.loads(body_of(answers[0]))["error"]
