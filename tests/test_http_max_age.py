"""`--max-connection-age-s` on the HTTP/REST port, against a real Triton.

HTTP/1.1 has no GOAWAY; the relay's graceful close (proxy/http_relay.py) stands for it: once
a keep-alive connection is older than the age (+-10% jitter), requests in flight finish,
requests sent after that get 503 with `Connection: close`, and the proxy closes the
connection once nothing is owed. The client's next request, on a new connection, is served.
The slow request is a `gate` request (tests/proxy_models/gate), held until the test opens it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest
from proxy_support import Gates, SidecarThread, wait_until

from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.triton

AGE_S = 3.0  # jittered to 2.7..3.3 s: far longer than sending a request takes, even on a busy machine


def hostport(url: str) -> str:
    return url.split("://", 1)[-1]


def infer_request(gate: str | None = None) -> bytes:
    inputs = [{"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]
    if gate is not None:
        inputs.append({"name": "GATE", "shape": [1], "datatype": "BYTES", "data": [gate]})
    body = json.dumps({"inputs": inputs}).encode()
    return (b"POST /v2/models/gate/infer HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


READY_REQUEST = b"GET /v2/health/ready HTTP/1.1\r\nHost: proxy\r\n\r\n"


class Connection:
    """One keep-alive HTTP/1.1 connection over a plain socket; responses framed by Content-Length."""

    def __init__(self, url: str) -> None:
        host, port = hostport(url).rsplit(":", 1)
        self.opened_s = time.monotonic()
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body)."""
        status_line = self.file.readline()
        if not status_line:
            raise ConnectionError("closed by the proxy before a response")
        status = int(status_line.split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", "0")))
        return status, headers, body

    def still_open(self) -> bool:
        """Nothing to read, and no end of file: the proxy has neither answered nor closed."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self.sock.setblocking(True)
        return False  # bytes or the end of file

    def closed_by_proxy(self, timeout_s: float = 30.0) -> bool:
        """True once the proxy closed its end (end of file, or a reset) within timeout_s."""
        self.sock.settimeout(timeout_s)
        try:
            return self.file.read(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def goaways(sidecar: SidecarThread) -> float:
    return sidecar.metric("tritonpilot_connections_goaway_total", reason="max_age") or 0.0


@pytest.fixture
def aged_sidecar(gate_triton: EmbeddedTriton, sidecar_factory: Callable[..., SidecarThread]) -> SidecarThread:
    # A grace far past the test: what closes the connection is its last answer, not the grace.
    return sidecar_factory(gate_triton.grpc_url, triton_http=hostport(gate_triton.http_url),
                           max_connection_age_s=AGE_S, max_connection_age_grace_s=120.0)


def held_past_the_age(sidecar: SidecarThread, gates: Gates) -> tuple[Connection, str]:
    """A keep-alive connection that served one request, then holds a slow one while it
    passes its age: the proxy has said its graceful close, the request is still in flight."""
    assert sidecar.http_url is not None
    conn = Connection(sidecar.http_url)
    conn.send(READY_REQUEST)
    assert conn.response()[0] == 200
    gate = gates.new()
    conn.send(infer_request(gate))
    wait_until(lambda: gates.holding(gate), what="the slow request held in the model")
    wait_until(lambda: goaways(sidecar) >= 1, what="the connection's max age")
    assert time.monotonic() - conn.opened_s >= AGE_S * 0.9  # its age, not sooner
    assert conn.still_open()  # graceful: the request in flight is owed its answer
    return conn, gate


def test_an_aged_connection_finishes_its_request_in_flight_then_closes(aged_sidecar: SidecarThread,
                                                                       gates: Gates) -> None:
    sidecar = aged_sidecar
    conn, gate = held_past_the_age(sidecar, gates)
    try:
        gates.open(gate)
        status, headers, body = conn.response()
        assert status == 200
        assert json.loads(body)["outputs"][0]["data"] == [1.0, 2.0]
        assert headers.get("connection") == "close"  # the client knows not to send more here
        assert conn.closed_by_proxy()  # nothing more owed: the proxy closes it
    finally:
        conn.close()

    # The client's next request goes on a new connection, and is served.
    assert sidecar.http_url is not None
    fresh = Connection(sidecar.http_url)
    try:
        fresh.send(infer_request())
        status, _, body = fresh.response()
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [1.0, 2.0]
    finally:
        fresh.close()
    wait_until(lambda: sidecar.finished("gate") == {"200": 2}, what="both requests counted 200")


def test_a_request_sent_after_the_age_gets_503_with_connection_close(aged_sidecar: SidecarThread,
                                                                     gates: Gates) -> None:
    sidecar = aged_sidecar
    conn, gate = held_past_the_age(sidecar, gates)
    try:
        conn.send(infer_request())  # behind the slow one on the same connection (pipelined)
        gates.open(gate)
        assert conn.response()[0] == 200  # the request in flight at the age: served
        status, headers, body = conn.response()  # the one sent after it: never reaches Triton
        assert (status, headers.get("connection")) == (503, "close")
        assert "shutting down this connection" in json.loads(body)["error"]
        assert conn.closed_by_proxy()
    finally:
        conn.close()
    wait_until(lambda: sidecar.finished("gate") == {"200": 1}, what="the slow request counted")


def test_an_idle_keep_alive_connection_past_the_age_is_closed(aged_sidecar: SidecarThread) -> None:
    sidecar = aged_sidecar
    assert sidecar.http_url is not None
    conn = Connection(sidecar.http_url)
    try:
        conn.send(infer_request())
        assert conn.response()[0] == 200
        assert conn.closed_by_proxy()  # nothing owed: closed as soon as it is old enough
        assert time.monotonic() - conn.opened_s >= AGE_S * 0.9
    finally:
        conn.close()
    assert goaways(sidecar) == 1
    fresh = Connection(sidecar.http_url)
    try:
        fresh.send(READY_REQUEST)
        assert fresh.response()[0] == 200
    finally:
        fresh.close()
