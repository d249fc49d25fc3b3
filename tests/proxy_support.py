"""Helpers for the proxy tests: a Sidecar on its own event loop, `tritonpilot serve` as a
process, gates that hold requests in Triton, raw gRPC and HTTP/2 clients.

The fixtures that use these live in conftest.py; the tests compare what a client
gets through the proxy with what it gets from Triton directly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import uvloop
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tritonpilot.proxy.stats import ModelSnapshot, ProxySnapshot
from tritonpilot.sidecar.serve import Sidecar, SidecarConfig

PROXY_MODELS_DIR = Path(__file__).parent / "proxy_models"

T = TypeVar("T")

# A shared 2-core machine: wait for conditions, never for a fixed time.
WAIT_S = 30.0


def wait_until(condition: Callable[[], T], timeout_s: float = WAIT_S, interval_s: float = 0.02,
               what: str = "condition") -> T:
    """Poll until condition() is truthy and return it; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last value {value!r})")
        time.sleep(interval_s)


# ------------------------------------------------------------------------------ the sidecar


class SidecarThread:
    """A Sidecar running on a uvloop loop in a daemon thread, on free loopback ports.

    Its stats belong to its loop, so they are read there (`snapshot()`).
    """

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sidecar", daemon=True)
        self.thread.start()

        async def make() -> Sidecar:
            sidecar = Sidecar(config)
            await sidecar.start()
            return sidecar

        self.sidecar: Sidecar = self.call(make())
        self.url = f"127.0.0.1:{self.sidecar.port}"
        # The HTTP/REST port: host:port, as tritonclient.http takes it (None when off).
        self.http_url = f"127.0.0.1:{self.sidecar.http_port}" if self.sidecar.http_port is not None else None
        self.metrics_url = f"http://127.0.0.1:{self.sidecar.metrics.port}"
        self._stopped = False

    def call(self, coro: Any, timeout_s: float = WAIT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def snapshot(self) -> ProxySnapshot:
        async def snap() -> ProxySnapshot:
            return self.sidecar.stats.snapshot(time.monotonic())
        return self.call(snap())

    def model(self, name: str) -> ModelSnapshot | None:
        return self.snapshot().models.get(name)

    def inflight(self, name: str) -> int:
        m = self.model(name)
        return m.inflight if m is not None else 0

    def finished(self, name: str) -> dict[str, int]:
        m = self.model(name)
        return dict(m.finished_total) if m is not None else {}

    def metric(self, sample: str, **labels: str) -> float | None:
        """One sample from /metrics, or None when it is not there; series with a `protocol`
        label are summed over it unless `protocol` is given (scrape())."""
        return scrape(self.metrics_url + "/metrics").get((sample, tuple(sorted(labels.items()))))

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.sidecar.shutdown(), timeout_s=self.config.grace_period_s + WAIT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT_S)
            if not self.thread.is_alive():
                self.loop.close()


def sidecar_config(triton_url: str, **overrides: Any) -> SidecarConfig:
    """Free ports for every listener (the HTTP port too: pass triton_http to relay it to a Triton)."""
    base: dict[str, Any] = dict(triton=triton_url, listen="127.0.0.1:0", http_listen="127.0.0.1:0",
                                metrics_listen="127.0.0.1:0", grace_period_s=5.0)
    base.update(overrides)
    return SidecarConfig(**base)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample, sorted labels): value}. A sample with a `protocol` label (the per-model series)
    is there as exported and also summed over protocol, under its labels without it, as
    PromQL's `sum without (protocol)` would give it."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    summed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
            if "protocol" in s.labels:
                key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "protocol")))
                summed[key] = summed.get(key, 0.0) + s.value
    return {**summed, **out}


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ------------------------------------------------------------------------------ `tritonpilot serve`


class ServeProcess:
    """`python -m tritonpilot serve` on free ports, JSON logs in a file."""

    def __init__(self, triton_url: str, listen_port: int, metrics_port: int, log_path: Path,
                 *extra_args: str, http_port: int | None = None) -> None:
        self.port = listen_port
        self.url = f"127.0.0.1:{listen_port}"
        # The HTTP port: a free one, or off; extra_args may say otherwise (the last one wins).
        self.http_url = f"127.0.0.1:{http_port}" if http_port is not None else None
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tritonpilot", "serve", "--triton", triton_url,
                 "--listen", self.url, "--metrics-listen", f"127.0.0.1:{metrics_port}",
                 "--http-listen", self.http_url or "off", "--log-format", "json", *extra_args],
                cwd=log_path.parent, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)

    def wait_serving(self) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonpilot serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return http_status(self.metrics_url + "/healthz") == 200
            except OSError:
                return False
        wait_until(up, what="tritonpilot serve to listen", interval_s=0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT_S)


# ------------------------------------------------------------------------------ gates


class Gates:
    """Gate files for the `gate` model (tests/proxy_models/gate): a request carrying a
    gate's path is held in Triton until the gate is opened."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._made: list[str] = []

    def new(self) -> str:
        path = str(self.directory / f"gate-{len(self._made)}")
        self._made.append(path)
        return path

    @staticmethod
    def open(path: str) -> None:
        Path(path).touch()

    @staticmethod
    def holding(path: str) -> bool:
        """The model is executing (holding) a request of this gate."""
        return os.path.exists(path + ".held")

    @staticmethod
    def saw_cancel(path: str) -> bool:
        return os.path.exists(path + ".cancelled")

    def open_all(self) -> None:
        for path in self._made:
            self.open(path)


def gate_inputs(gate: str | None, values: list[float] | None = None) -> list[grpcclient.InferInput]:
    data = np.array(values if values is not None else [1.0, 2.0, 3.0], dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", list(data.shape), "FP32")]
    inputs[0].set_data_from_numpy(data)
    if gate is not None:
        g = grpcclient.InferInput("GATE", [1], "BYTES")
        g.set_data_from_numpy(np.array([gate.encode()], dtype=np.object_))
        inputs.append(g)
    return inputs


def fp32_inputs(values: np.ndarray, name: str = "INPUT0", dtype: str = "FP32") -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput(name, list(values.shape), dtype)
    inp.set_data_from_numpy(values)
    return [inp]


# ------------------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class Outcome:
    """What a call came back with, comparable between direct and proxied calls."""
    ok: bool
    value: Any = None
    code: str | None = None
    message: str | None = None


def outcome(call: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(True, call())
    except InferenceServerException as exc:
        return Outcome(False, code=exc.status(), message=exc.message())
    except grpc.RpcError as exc:
        return Outcome(False, code=exc.code().name, message=exc.details())


def raw_unary(channel: grpc.Channel, path: str, payload: bytes, timeout_s: float = 10.0,
              metadata: list[tuple[str, Any]] | None = None) -> tuple[str, str | None, bytes | None]:
    """(status code name, details, response bytes) of a unary call with raw bytes."""
    method = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        reply = method(payload, timeout=timeout_s, metadata=metadata)
        return "OK", None, reply
    except grpc.RpcError as exc:
        return exc.code().name, exc.details(), None


def raw_stream(channel: grpc.Channel, path: str, payloads: list[bytes],
               timeout_s: float = 10.0) -> tuple[str, str | None, list[bytes]]:
    """(status code name, details, response messages) of a bidi call with raw bytes."""
    method = channel.stream_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    replies: list[bytes] = []
    try:
        for reply in method(iter(payloads), timeout=timeout_s):
            replies.append(reply)
        return "OK", None, replies
    except grpc.RpcError as exc:
        return exc.code().name, exc.details(), replies


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def health_check(url: str) -> tuple[str, bytes | None]:
    with grpc.insecure_channel(url) as channel:
        code, _, reply = raw_unary(channel, HEALTH_CHECK, b"", timeout_s=10.0)
    return code, reply


def can_connect(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ a hand-driven HTTP/2 client


@dataclass
class H2Reply:
    headers: dict[bytes, bytes]
    trailers: dict[bytes, bytes]
    messages: list[bytes]
    reset: int | None = None  # RST_STREAM error code, when the stream was reset

    @property
    def grpc_status(self) -> int | None:
        raw = self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))
        return int(raw) if raw is not None else None


class H2GrpcClient:
    """gRPC over a plain socket with the h2 library, for what grpcio never sends: padded or
    tiny DATA frames, PRIORITY, a small header table, resets mid-message."""

    def __init__(self, url: str, header_table_size: int | None = None, trickle: bool = False) -> None:
        import h2.config
        import h2.connection

        host, port = url.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        if header_table_size is not None:
            self.conn.update_settings({0x1: header_table_size})
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.trickle = trickle  # send byte by byte, so the peer reads frames in the smallest pieces
        self.authority = url.encode()
        self.replies: dict[int, H2Reply] = {}
        self.done: set[int] = set()
        self.pings_acked = 0
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.trickle:
            for i in range(len(data)):
                self.sock.sendall(data[i:i + 1])
                time.sleep(0.0005)
        elif data:
            self.sock.sendall(data)

    def start(self, path: str, metadata: list[tuple[bytes, bytes]] = (), priority: bool = False) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                   (b":authority", self.authority), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                   *metadata]
        self.conn.send_headers(stream_id, headers, priority_weight=200 if priority else None)
        self.replies[stream_id] = H2Reply({}, {}, [])
        self._flush()
        return stream_id

    def send(self, stream_id: int, message: bytes, frame_bytes: int | None = None, pad_length: int | None = None,
             end_stream: bool = True, cut_at: int | None = None) -> None:
        """One gRPC message, cut into DATA frames of frame_bytes (all of it in one by default);
        with cut_at, only its first cut_at bytes (prefix included) and no END_STREAM."""
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        if cut_at is not None:
            body, end_stream = body[:cut_at], False
        step = frame_bytes or len(body)
        for i in range(0, len(body), step):
            last = i + step >= len(body)
            while self.conn.local_flow_control_window(stream_id) < step + (pad_length or 0) + 1:
                self._read_once()
            self.conn.send_data(stream_id, body[i:i + step], end_stream=end_stream and last, pad_length=pad_length)
            self._flush()

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, 0x8)  # CANCEL
        self.done.add(stream_id)
        self._flush()

    def ping(self) -> None:
        self.conn.ping(b"tp-ping!")
        self._flush()

    def _read_once(self) -> None:
        import h2.events

        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        for event in self.conn.receive_data(data):
            sid = getattr(event, "stream_id", None)
            reply = self.replies.get(sid) if sid is not None else None
            if isinstance(event, h2.events.ResponseReceived) and reply is not None:
                reply.headers = dict(event.headers)
            elif isinstance(event, h2.events.TrailersReceived) and reply is not None:
                reply.trailers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if reply is not None:
                    reply.messages.append(event.data)  # joined and split into messages at the end
            elif isinstance(event, h2.events.StreamEnded):
                self.done.add(sid)
            elif isinstance(event, h2.events.StreamReset):
                if reply is not None:
                    reply.reset = event.error_code
                self.done.add(sid)
            elif isinstance(event, h2.events.PingAckReceived):
                self.pings_acked += 1
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise ConnectionError(f"GOAWAY {event.error_code}")
        self._flush()

    def wait(self, stream_id: int) -> H2Reply:
        while stream_id not in self.done:
            self._read_once()
        reply = self.replies[stream_id]
        body, messages = b"".join(reply.messages), []
        while len(body) >= 5:
            n = int.from_bytes(body[1:5], "big")
            messages.append(body[5:5 + n])
            body = body[5 + n:]
        reply.messages = messages
        return reply

    def call(self, path: str, message: bytes, **send_options: Any) -> H2Reply:
        metadata = send_options.pop("metadata", ())
        priority = send_options.pop("priority", False)
        stream_id = self.start(path, metadata, priority)
        self.send(stream_id, message, **send_options)
        return self.wait(stream_id)

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except OSError:
            pass
        self.sock.close()
