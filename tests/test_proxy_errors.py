"""Errors through the proxy: Triton's errors come back unchanged, deadlines and cancels reach
Triton, model control is refused unless allowed, and garbage (random messages, non-HTTP/2
bytes, broken frames) costs only the connection that sent it."""

from __future__ import annotations

import asyncio
import functools
import queue
import random
import socket
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from proxy_support import (
    HEALTH_SERVING,
    SidecarThread,
    fp32_inputs,
    gate_inputs,
    health_check,
    outcome,
    raw_stream,
    raw_unary,
    wait_until,
)
from structlog.testing import capture_logs
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tritonpilot.proxy.relay import PREFACE
from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.triton

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
MODEL_CONTROL = ("RepositoryModelLoad", "RepositoryModelUnload")


def same_error(triton: EmbeddedTriton, sidecar: SidecarThread, call) -> tuple[str, str]:
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    proxied = grpcclient.InferenceServerClient(sidecar.url)
    try:
        d, p = outcome(lambda: call(direct)), outcome(lambda: call(proxied))
    finally:
        direct.close()
        proxied.close()
    assert not d.ok, f"expected an error, Triton answered {d.value!r}"
    assert (p.code, p.message) == (d.code, d.message)
    return d.code, d.message


# ------------------------------------------------------------------------------ Triton's errors


def test_inference_errors_are_triton_s_own(triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    data = np.ones(4, dtype=np.float32)
    code, message = same_error(triton, sidecar, lambda c: c.infer("no_such_model", fp32_inputs(data)))
    assert code == "StatusCode.NOT_FOUND" and "no_such_model" in message
    code, message = same_error(triton, sidecar, lambda c: c.infer("identity_fp32", fp32_inputs(data, name="WRONG")))
    assert code == "StatusCode.INVALID_ARGUMENT" and "WRONG" in message
    code, message = same_error(triton, sidecar, lambda c: c.infer(
        "identity_fp32", fp32_inputs(np.ones(4, dtype=np.int32), dtype="INT32")))
    assert code == "StatusCode.INVALID_ARGUMENT" and "INT32" in message
    code, message = same_error(triton, sidecar, lambda c: c.infer(
        "batching", fp32_inputs(np.ones((2, 5), dtype=np.float32))))  # dims are [4]
    assert code == "StatusCode.INVALID_ARGUMENT" and "shape" in message
    code, message = same_error(triton, sidecar, lambda c: c.infer(
        "batching", fp32_inputs(np.ones((9, 4), dtype=np.float32))))  # max_batch_size 8
    assert code == "StatusCode.INVALID_ARGUMENT" and "batch" in message

    def byte_size_mismatch(c: grpcclient.InferenceServerClient):
        inp = grpcclient.InferInput("INPUT0", [5], "FP32")
        inp.set_data_from_numpy(np.ones(5, dtype=np.float32))
        inp._input.shape[:] = [6]  # says 6 elements, carries 5
        return c.infer("identity_fp32", [inp])
    code, message = same_error(triton, sidecar, byte_size_mismatch)
    assert code == "StatusCode.INVALID_ARGUMENT"
    # Each failed ModelInfer ended with Triton's code in the proxy's count.
    snap = sidecar.snapshot().models
    assert snap["no_such_model"].finished_total == {"NOT_FOUND": 1}
    assert snap["identity_fp32"].finished_total == {"INVALID_ARGUMENT": 3}
    assert snap["batching"].finished_total == {"INVALID_ARGUMENT": 2}
    assert all(m.inflight == 0 for m in snap.values())


def test_deadline_exceeded_reaches_triton(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url)
    results = {}
    for name, url in (("direct", gate_triton.grpc_url), ("proxied", sidecar.url)):
        gate = gates.new()
        client = grpcclient.InferenceServerClient(url)
        started = time.monotonic()
        results[name] = outcome(functools.partial(client.infer, "gate", gate_inputs(gate), client_timeout=2.0))
        took_s = time.monotonic() - started
        client.close()
        assert 2.0 <= took_s < 10.0
        assert gates.holding(gate)  # Triton was executing it when the deadline passed
        # Triton saw the call end: the held request noticed it was cancelled.
        wait_until(functools.partial(gates.saw_cancel, gate), what=f"Triton to see the {name} deadline pass")
    assert results["proxied"] == results["direct"]
    assert results["direct"].code == "StatusCode.DEADLINE_EXCEEDED"
    assert sidecar.inflight("gate") == 0
    assert sidecar.finished("gate") == {"DEADLINE_EXCEEDED": 1}


def test_client_cancel_cancels_the_upstream_call(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url)

    async def cancel_one(url: str, gate: str) -> None:
        client = aioclient.InferenceServerClient(url)
        try:
            task = asyncio.create_task(client.infer("gate", gate_inputs(gate)))
            await asyncio.to_thread(wait_until, lambda: gates.holding(gate), what="Triton to execute the call")
            if url == sidecar.url:
                assert sidecar.inflight("gate") == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(wait_until, lambda: gates.saw_cancel(gate), what="Triton to see the cancel")
        finally:
            await client.close()

    asyncio.run(cancel_one(gate_triton.grpc_url, gates.new()))
    gate = gates.new()
    asyncio.run(cancel_one(sidecar.url, gate))
    # The gate is still closed: only the cancel can have ended it, in the proxy too.
    assert sidecar.inflight("gate") == 0
    assert sidecar.finished("gate") == {"CANCELLED": 1}
    assert sidecar.metric("tritonpilot_requests_total", model="gate", code="CANCELLED") == 1
    assert not (gates.directory / gate.rsplit("/", 1)[-1]).exists()


def test_cancelled_stream_cancels_its_held_requests(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url)
    gate = gates.new()

    async def run() -> None:
        client = aioclient.InferenceServerClient(sidecar.url)
        hold = asyncio.Event()

        async def requests():
            yield {"model_name": "gate", "inputs": gate_inputs(gate), "request_id": "held"}
            await hold.wait()  # keep the stream open

        async def consume():
            async for _ in client.stream_infer(requests()):
                pass

        task = asyncio.create_task(consume())
        try:
            await asyncio.to_thread(wait_until, lambda: gates.holding(gate), what="Triton to execute the request")
            assert sidecar.inflight("gate") == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(wait_until, lambda: gates.saw_cancel(gate), what="Triton to see the cancel")
        finally:
            await client.close()

    asyncio.run(run())
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    assert sidecar.finished("gate") == {"CANCELLED": 1}


# ------------------------------------------------------------------------------ model control


def test_model_control_is_refused_with_a_reason(triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    client = grpcclient.InferenceServerClient(sidecar.url)
    for call in (lambda: client.unload_model("fast"), lambda: client.load_model("fast"),
                 lambda: client.load_model("fast", config='{"backend": "python"}')):
        refused = outcome(call)
        assert refused.code == "StatusCode.PERMISSION_DENIED"
        assert "controller" in refused.message and "--allow-client-model-control" in refused.message
    # Refused means refused: the model is still there, and the connection still serves.
    assert grpcclient.InferenceServerClient(triton.grpc_url).is_model_ready("fast")
    assert client.is_model_ready("fast")
    client.close()


def test_model_control_passes_when_allowed(triton_factory, sidecar_factory) -> None:
    triton = triton_factory(load_models=["fast"])
    sidecar = sidecar_factory(triton.grpc_url, allow_client_model_control=True)
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    proxied = grpcclient.InferenceServerClient(sidecar.url)
    proxied.unload_model("fast")
    wait_until(lambda: not direct.is_model_ready("fast"), what="fast to unload")
    proxied.load_model("fast")
    assert direct.is_model_ready("fast")
    d, p = outcome(lambda: direct.load_model("no_such_model")), outcome(lambda: proxied.load_model("no_such_model"))
    assert p == d and not d.ok
    direct.close()
    proxied.close()


# ------------------------------------------------------------------------------ sizes


def test_64_mb_input_passes_and_comes_back_equal(sidecar: SidecarThread) -> None:
    data = np.random.default_rng(7).random(16 * 1024 * 1024, dtype=np.float32)  # 64 MiB
    client = grpcclient.InferenceServerClient(sidecar.url)
    result = client.infer("identity_fp32", fp32_inputs(data), client_timeout=120)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    client.close()
    assert sidecar.finished("identity_fp32") == {"OK": 1}


def test_message_size_limit_when_configured(triton: EmbeddedTriton, sidecar_factory) -> None:
    sidecar = sidecar_factory(triton.grpc_url, max_message_bytes=1_000_000)
    client = grpcclient.InferenceServerClient(sidecar.url)
    small = np.ones(1000, dtype=np.float32)
    big = np.ones(1_000_000, dtype=np.float32)
    refused = outcome(lambda: client.infer("identity_fp32", fp32_inputs(big)))
    assert refused.code == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in refused.message
    # The same connection goes on serving.
    assert client.infer("identity_fp32", fp32_inputs(small)).as_numpy("OUTPUT0").tolist() == small.tolist()
    assert sidecar.finished("identity_fp32") == {"RESOURCE_EXHAUSTED": 1, "OK": 1}
    assert sidecar.inflight("identity_fp32") == 0
    client.close()


def test_message_size_limit_on_a_stream_ends_the_stream(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url, max_message_bytes=100_000)
    gate = gates.new()
    client = grpcclient.InferenceServerClient(sidecar.url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("gate", gate_inputs(gate), request_id="held")
    wait_until(lambda: gates.holding(gate), what="Triton to hold the first request")
    client.async_stream_infer("gate", gate_inputs(None, [0.0] * 100_000), request_id="too-big")
    result, error = responses.get(timeout=30)
    assert result is None and error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in error.message()
    # Triton's side of the stream was reset: the held request saw its cancel.
    wait_until(lambda: gates.saw_cancel(gate), what="Triton to see the stream reset")
    assert sidecar.inflight("gate") == 0
    assert sidecar.finished("gate") == {"RESOURCE_EXHAUSTED": 2}
    client.stop_stream()
    client.close()


# ------------------------------------------------------------------------------ garbage


def test_random_bytes_to_every_method(triton_factory, sidecar_factory) -> None:
    # A private Triton: a random message may parse, and then it would change settings.
    triton = triton_factory(load_models=["identity_fp32"])
    sidecar = sidecar_factory(triton.grpc_url)
    rng = random.Random(2)
    payloads = [b"", b"\xff", b"\x0a\xff\xff\xff\xff\x0f", *(rng.randbytes(n) for n in (1, 3, 17, 64, 300, 5000))]
    seen: dict[str, set[str]] = {}
    with grpc.insecure_channel(triton.grpc_url) as direct, grpc.insecure_channel(sidecar.url) as proxied:
        for method in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{method.name}"
            for payload in payloads:
                if method.client_streaming:
                    d = raw_stream(direct, path, [payload])
                    p = raw_stream(proxied, path, [payload])
                else:
                    p = raw_unary(proxied, path, payload)
                    if method.name in MODEL_CONTROL:
                        assert p[0] == "PERMISSION_DENIED"
                        continue
                    d = raw_unary(direct, path, payload)
                assert parsed(method, p) == parsed(method, d), f"{method.name} with {payload!r}"
                code = d[0]
                if code == "OK" and method.client_streaming:  # errors come as messages on the stream
                    if any(service_pb2.ModelStreamInferResponse.FromString(r).error_message for r in d[2]):
                        code = "error in the stream"
                seen.setdefault(method.name, set()).add(code)
            # The proxy is still up and serving after each method's garbage.
            assert service_pb2_grpc.GRPCInferenceServiceStub(proxied).ServerLive(
                service_pb2.ServerLiveRequest(), timeout=10).live
    # Unparseable bytes are an error for every method.
    for method in SERVICE.methods:
        assert seen.get(method.name, {"PERMISSION_DENIED"}) - {"OK"}, f"{method.name} never failed: {seen}"
    assert health_check(sidecar.url) == ("OK", HEALTH_SERVING)


def parsed(method, result: tuple) -> tuple:
    """A raw call's result with its response(s) parsed: map fields have no fixed byte order."""
    code, details, reply = result
    message_type = getattr(service_pb2, method.output_type.name)
    if isinstance(reply, list):
        return code, details, [message_type.FromString(r) for r in reply]
    return code, details, message_type.FromString(reply) if reply is not None else None


def read_until_closed(sock: socket.socket, timeout_s: float = 15.0) -> bytes:
    """Everything the peer sends until it closes; fails if it keeps the connection open."""
    sock.settimeout(timeout_s)
    received = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the proxy kept the connection open; it sent {received[:200]!r}")


def h2_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + stream_id.to_bytes(4, "big") + payload


SETTINGS_FRAME = h2_frame(4, 0, 0)
HEADERS, CONTINUATION, END_HEADERS, END_STREAM = 1, 9, 0x4, 0x1

GARBAGE = {
    "http/1.1": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "truncated preface, then other bytes": PREFACE[:10] + b"\r\n\r\nHELLO\r\n\r\n" + b"x" * 100,
    "bogus HPACK index": PREFACE + SETTINGS_FRAME + h2_frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"),
    "truncated HPACK block": PREFACE + SETTINGS_FRAME + h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x40\x85ab"),
    "CONTINUATION out of nowhere": PREFACE + SETTINGS_FRAME + h2_frame(CONTINUATION, END_HEADERS, 1, b"\x82"),
    "HEADERS with padding longer than the frame": PREFACE + SETTINGS_FRAME + h2_frame(HEADERS, END_HEADERS | 0x8, 1,
                                                                                    b"\xff\x82"),
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbage_closes_only_its_connection(sidecar: SidecarThread, garbage: str) -> None:
    host, port = sidecar.url.split(":")
    with grpc.insecure_channel(sidecar.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live  # an open, healthy connection
        with capture_logs() as logs:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(GARBAGE[garbage])
                read_until_closed(sock)
            errors = wait_until(lambda: [e for e in logs if e["event"] == "relay.connection_error"],
                                what="the relay to log the bad connection")
        assert errors[0]["log_level"] == "warning" and errors[0]["error"]
        # The healthy connection still serves, and so does a new one.
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
    assert health_check(sidecar.url) == ("OK", HEALTH_SERVING)
    assert grpcclient.InferenceServerClient(sidecar.url).is_server_ready()


def test_truncated_preface_then_end_of_input_closes(sidecar: SidecarThread) -> None:
    host, port = sidecar.url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(PREFACE[:12])
        sock.shutdown(socket.SHUT_WR)
        read_until_closed(sock)
    assert health_check(sidecar.url) == ("OK", HEALTH_SERVING)
