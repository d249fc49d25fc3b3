"""The proxy over time: the in-flight gauge under held load, Triton killed and restarted
under load, Triton unreachable, and SIGTERM with calls and streams open."""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from proxy_support import (
    HEALTH_SERVING,
    SidecarThread,
    can_connect,
    fp32_inputs,
    gate_inputs,
    health_check,
    http_status,
    outcome,
    scrape,
    wait_until,
)
from tritonclient.grpc import service_pb2

from tritonpilot.ports import free_port
from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.triton


def inflight_metric(metrics_url: str, model: str) -> float | None:
    return scrape(metrics_url + "/metrics").get(("tritonpilot_inflight_requests", (("model", model),)))


# ------------------------------------------------------------------------------ the in-flight gauge


@pytest.mark.parametrize("n", [1, 5, 32])
def test_inflight_gauge_reads_exactly_n_held_unary_calls(gate_triton: EmbeddedTriton, sidecar_factory, gates,
                                                        n: int) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url)
    client = grpcclient.InferenceServerClient(sidecar.url)
    gate = gates.new()
    done: queue.Queue = queue.Queue()
    for i in range(n):
        client.async_infer("gate", gate_inputs(gate, [float(i)]), request_id=str(i),
                           callback=lambda result, error: done.put((result, error)))
    # One held in the model, the rest queued in Triton: all in flight, none can finish.
    wait_until(lambda: sidecar.inflight("gate") == n, what=f"{n} calls in flight")
    assert inflight_metric(sidecar.metrics_url, "gate") == n
    assert sidecar.model("gate").inflight_peak == n
    assert done.empty()

    gates.open(gate)
    results = [done.get(timeout=60) for _ in range(n)]
    assert [e for _, e in results] == [None] * n
    assert sorted(int(r.get_response().id) for r, _ in results) == list(range(n))
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    assert inflight_metric(sidecar.metrics_url, "gate") == 0
    assert sidecar.finished("gate") == {"OK": n}
    client.close()


class Stream:
    """A tritonclient ModelStreamInfer stream whose responses land in a queue."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def get(self, n: int, timeout_s: float = 60.0) -> list[tuple[Any, Any]]:
        return [self.responses.get(timeout=timeout_s) for _ in range(n)]

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def test_inflight_gauge_counts_stream_requests_until_their_response(
        gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url)
    stream = Stream(sidecar.url)
    gate = gates.new()
    for i in range(5):
        stream.client.async_stream_infer("gate", gate_inputs(gate, [float(i)]), request_id=str(i))
    wait_until(lambda: sidecar.inflight("gate") == 5, what="5 stream requests in flight")
    assert inflight_metric(sidecar.metrics_url, "gate") == 5
    gates.open(gate)
    responses = stream.get(5)
    assert [e for _, e in responses] == [None] * 5
    # Each response ended its request while the stream is still open.
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0 with the stream open")
    assert sidecar.finished("gate") == {"OK": 5}
    stream.close()


def test_decoupled_request_with_large_responses_counts_until_its_final_one(
        gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    # 256 KiB responses: the final flag sits past the first bytes of a message that is
    # mostly tensor data, and the relay must still read it.
    sidecar = sidecar_factory(gate_triton.grpc_url)
    stream = Stream(sidecar.url)
    gate = gates.new()
    data = np.arange(64 * 1024, dtype=np.float32)
    stream.client.async_stream_infer("gate_decoupled", gate_inputs(gate, data.tolist()), request_id="big")
    (first, error), = stream.get(1)
    assert error is None and first.as_numpy("OUTPUT0").tolist() == data.tolist()
    assert first.get_response().parameters["triton_final_response"].bool_param is False
    assert sidecar.inflight("gate_decoupled") == 1
    gates.open(gate)
    (last, error), = stream.get(1)
    assert error is None and last.get_response().parameters["triton_final_response"].bool_param is True
    wait_until(lambda: sidecar.inflight("gate_decoupled") == 0, what="in flight back to 0 after the final response")
    assert sidecar.finished("gate_decoupled") == {"OK": 1}
    stream.close()


def test_stream_error_responses_end_their_own_request(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    # Triton's in-stream errors carry the request id but no model name, and (the model not
    # being decoupled) come in request order, after the responses of earlier requests.
    sidecar = sidecar_factory(gate_triton.grpc_url)
    stream = Stream(sidecar.url)
    first, second = gates.new(), gates.new()
    stream.client.async_stream_infer("gate", gate_inputs(first), request_id="held-1")
    stream.client.async_stream_infer("no_such_model", gate_inputs(None), request_id="bad-model")
    stream.client.async_stream_infer("gate", fp32_inputs(np.ones(2, dtype=np.float32), name="WRONG"),
                                     request_id="bad-input")
    stream.client.async_stream_infer("gate", gate_inputs(second), request_id="held-2")
    wait_until(lambda: sidecar.inflight("gate") == 3 and sidecar.inflight("no_such_model") == 1,
               what="4 requests in flight")
    gates.open(first)
    responses = stream.get(3)
    assert responses[0][0].get_response().id == "held-1"
    assert [e.message() for _, e in responses[1:]] == [
        "Request for unknown model: 'no_such_model' is not found",
        "unexpected inference input 'WRONG' for model 'gate'"]
    wait_until(lambda: sidecar.finished("no_such_model") == {"UNKNOWN": 1}, what="the unknown model's request to end")
    wait_until(lambda: sidecar.finished("gate") == {"OK": 1, "UNKNOWN": 1}, what="held-1 and bad-input to end")
    assert sidecar.inflight("gate") == 1  # held-2 is still held: the errors ended their own requests
    gates.open(second)
    assert stream.get(1)[0][0].get_response().id == "held-2"
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    assert sidecar.finished("gate") == {"OK": 2, "UNKNOWN": 1}
    stream.close()


def test_gzip_stream_requests_count_for_their_model(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url)
    client = grpcclient.InferenceServerClient(sidecar.url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), compression_algorithm="gzip")
    gate = gates.new()
    for i in range(3):
        client.async_stream_infer("gate", gate_inputs(gate, [float(i)] * 300), request_id=str(i))
    wait_until(lambda: sidecar.inflight("gate") == 3, what="3 compressed stream requests in flight")
    gates.open(gate)
    assert [responses.get(timeout=60)[1] for _ in range(3)] == [None] * 3
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    assert set(sidecar.snapshot().models) == {"gate"}
    assert sidecar.finished("gate") == {"OK": 3}
    client.stop_stream()
    client.close()


def decoupled_inputs(n: int) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([n], dtype=np.int32))
    return [inp]


def test_decoupled_request_counts_until_final_flag_or_stream_end(sidecar: SidecarThread) -> None:
    stream = Stream(sidecar.url)
    # With the empty final response asked for, the final flag ends the request.
    stream.client.async_stream_infer("decoupled", decoupled_inputs(3), request_id="flagged",
                                     enable_empty_final_response=True)
    assert len(stream.get(4)) == 4
    wait_until(lambda: sidecar.model("decoupled") and sidecar.model("decoupled").finished_total == {"OK": 1},
               what="the flagged request to finish")
    assert sidecar.inflight("decoupled") == 0
    # Without it, no response says "last": the request counts while the stream is open.
    stream.client.async_stream_infer("decoupled", decoupled_inputs(2), request_id="unflagged")
    assert len(stream.get(2)) == 2
    time.sleep(0.5)  # give a wrong decrement the chance to show
    assert sidecar.inflight("decoupled") == 1
    stream.close()
    wait_until(lambda: sidecar.inflight("decoupled") == 0, what="in flight back to 0 at the stream's end")
    assert sidecar.finished("decoupled") == {"OK": 2}


class CompressingUpstream:
    """A gRPC server in Triton's place whose ModelStreamInfer answers each request with a
    gzip-compressed non-final response, then (once released) the final one: a Triton
    started with response compression, and a decoupled model."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4), compression=grpc.Compression.Gzip)
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=service_pb2.ModelInferRequest.FromString,
            response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelStreamInfer": handler})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _stream(self, requests, context):
        for request in requests:
            for final in (False, True):
                if final:
                    self.release.wait(30)
                response = service_pb2.ModelStreamInferResponse()
                response.infer_response.model_name = request.model_name
                response.infer_response.id = request.id
                response.infer_response.parameters["triton_final_response"].bool_param = final
                # Worth compressing, and inside the peek.
                response.infer_response.parameters["padding"].string_param = "x" * 300
                yield response

    def stop(self) -> None:
        self.release.set()
        self.server.stop(grace=None)


def test_compressed_stream_responses_are_read(sidecar_factory) -> None:
    upstream = CompressingUpstream()
    try:
        sidecar = sidecar_factory(f"127.0.0.1:{upstream.port}")
        stream = Stream(sidecar.url)  # its requests go uncompressed
        stream.client.async_stream_infer("decoupled", decoupled_inputs(1), request_id="r1")
        (result, error), = stream.get(1)
        assert error is None and result.get_response().parameters["triton_final_response"].bool_param is False
        time.sleep(0.3)  # give a wrong decrement the chance to show
        assert sidecar.inflight("decoupled") == 1  # the first response said "not final"
        upstream.release.set()
        (result, error), = stream.get(1)
        assert result.get_response().parameters["triton_final_response"].bool_param is True
        wait_until(lambda: sidecar.inflight("decoupled") == 0, what="in flight back to 0 after the final response")
        assert sidecar.finished("decoupled") == {"OK": 1}
        stream.close()
    finally:
        upstream.stop()


# ------------------------------------------------------------------------------ Triton killed, restarted


def test_triton_killed_under_load_then_restarted(triton_factory, sidecar_factory) -> None:
    triton = triton_factory(load_models=["sleep"])
    sidecar = sidecar_factory(triton.grpc_url)
    deadline_s = 5.0
    stop = threading.Event()
    outcomes: list[tuple[float, float, str]] = []  # (started, took, code)
    lock = threading.Lock()

    def load() -> None:
        client = grpcclient.InferenceServerClient(sidecar.url)
        data = np.ones(4, dtype=np.float32)
        while not stop.is_set():
            started = time.monotonic()
            r = outcome(lambda: client.infer("sleep", fp32_inputs(data), client_timeout=deadline_s))
            with lock:
                outcomes.append((started, time.monotonic() - started, "OK" if r.ok else r.code))
            if not r.ok:
                time.sleep(0.05)
        client.close()

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: sum(o[2] == "OK" for o in outcomes) >= 20, what="load to run")
        kill_started = time.monotonic()
        triton.kill()
        killed_at = time.monotonic()  # Triton and its stubs are gone (reaped)
        wait_until(lambda: sum(o[0] > killed_at for o in outcomes) >= 8, what="calls after the kill to fail")

        with lock:
            during = [o for o in outcomes if o[0] < killed_at < o[0] + o[1] or o[0] < kill_started < o[0] + o[1]]
            after = [o for o in outcomes if o[0] >= killed_at]
        # Calls open at the kill either got their answer or UNAVAILABLE; later ones UNAVAILABLE;
        # all well inside their deadline. (4 workers in a closed loop: some call is always open.)
        assert during and all(code in ("OK", "StatusCode.UNAVAILABLE") for _, _, code in during), during
        assert after and all(code == "StatusCode.UNAVAILABLE" for _, _, code in after), after
        assert max(took for _, took, _ in during + after) < deadline_s
        # The proxy itself stays up: health SERVING, alive, not ready.
        assert health_check(sidecar.url) == ("OK", HEALTH_SERVING)
        assert http_status(sidecar.metrics_url + "/healthz") == 200
        assert http_status(sidecar.metrics_url + "/readyz") == 503
        message = outcome(lambda: grpcclient.InferenceServerClient(sidecar.url).is_server_live()).message
        assert "unreachable" in message and triton.grpc_url.split(":")[1] in message

        recovered_at = time.monotonic()
        triton.restart()
        wait_until(lambda: any(o[0] > recovered_at and o[2] == "OK" for o in outcomes), timeout_s=60,
                   what="calls to succeed again after the restart")
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    # /readyz asks Triton over the sidecar's own grpc channel, which retries with backoff.
    wait_until(lambda: http_status(sidecar.metrics_url + "/readyz") == 200, timeout_s=60, interval_s=0.2,
               what="/readyz to say ready again")
    assert sidecar.inflight("sleep") == 0
    finished = sidecar.finished("sleep")
    assert finished["OK"] >= 21 and finished.get("UNAVAILABLE", 0) >= 1


def test_triton_unreachable_fails_fast_and_health_still_answers(sidecar_factory) -> None:
    closed_port = free_port()  # nothing listens there
    sidecar = sidecar_factory(f"127.0.0.1:{closed_port}")
    client = grpcclient.InferenceServerClient(sidecar.url)
    for call in (lambda: client.is_server_live(client_timeout=10),
                 lambda: client.infer("identity_fp32", fp32_inputs(np.ones(2, dtype=np.float32)), client_timeout=10)):
        started = time.monotonic()
        failed = outcome(call)
        assert time.monotonic() - started < 5.0
        assert failed.code == "StatusCode.UNAVAILABLE"
        assert f"127.0.0.1:{closed_port} is unreachable" in failed.message
    client.close()

    async def many_at_once() -> list[Any]:
        aio = aioclient.InferenceServerClient(sidecar.url)
        try:
            return await asyncio.gather(*(aio.is_model_ready("identity_fp32", client_timeout=10) for _ in range(20)),
                                        return_exceptions=True)
        finally:
            await aio.close()

    # A large request too: refused at once, not after its upload.
    started = time.monotonic()
    big = outcome(lambda: grpcclient.InferenceServerClient(sidecar.url).infer(
        "identity_fp32", fp32_inputs(np.ones(4 * 1024 * 1024, dtype=np.float32)), client_timeout=30))
    assert big.code == "StatusCode.UNAVAILABLE" and time.monotonic() - started < 10.0

    started = time.monotonic()
    failures = asyncio.run(many_at_once())
    assert time.monotonic() - started < 5.0
    assert [f.status() if hasattr(f, "status") else repr(f) for f in failures] == ["StatusCode.UNAVAILABLE"] * 20
    # The refused inferences are counted under their model, as operators need to see.
    refused = sidecar.snapshot().models["identity_fp32"]
    assert (refused.finished_total, refused.inflight) == ({"UNAVAILABLE": 2}, 0)
    assert health_check(sidecar.url) == ("OK", HEALTH_SERVING)
    assert http_status(sidecar.metrics_url + "/healthz") == 200
    assert http_status(sidecar.metrics_url + "/readyz") == 503


def test_triton_unreachable_stream_calls_end_unavailable_never_internal(sidecar_factory) -> None:
    """grpc.aio clients race a stream call's status against their own first write: answered at
    once, a few in a hundred ended INTERNAL "Internal error from Core". The refusal is held
    (local.STREAM_ANSWER_HOLD_S) so that every one ends with the retryable UNAVAILABLE. And
    streams the client opened before it saw our GOAWAY are retried by the client on a fresh
    connection, never cut off uncounted: each call is counted exactly once."""
    from tritonclient.grpc import service_pb2_grpc

    sidecar = sidecar_factory(f"127.0.0.1:{free_port()}")  # nothing listens there
    workers, per_worker = 8, 60

    async def worker() -> list[str]:
        codes = []
        async with grpc.aio.insecure_channel(sidecar.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for i in range(per_worker):
                answered: asyncio.Queue[bool] = asyncio.Queue()

                async def requests(i: int = i, answered: asyncio.Queue[bool] = answered) -> Any:
                    for r in range(3):  # the next request waits for an answer, as clients do
                        yield service_pb2.ModelInferRequest(model_name="identity_fp32", id=f"{i}-{r}")
                        if not await answered.get():
                            return

                try:
                    async for _ in stub.ModelStreamInfer(requests(), timeout=10):
                        answered.put_nowait(True)
                    codes.append("OK")
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code().name if error.code() != grpc.StatusCode.INTERNAL
                                 else f"INTERNAL: {error.details()}")
                finally:
                    answered.put_nowait(False)
        return codes

    async def run() -> list[str]:
        return [c for codes in await asyncio.gather(*(worker() for _ in range(workers))) for c in codes]

    codes = asyncio.run(run())
    assert {c: codes.count(c) for c in set(codes)} == {"UNAVAILABLE": workers * per_worker}
    refused = sidecar.snapshot().models["identity_fp32"]
    assert (refused.finished_total, refused.inflight) == ({"UNAVAILABLE": workers * per_worker}, 0)


# ------------------------------------------------------------------------------ SIGTERM


def test_sigterm_lets_open_calls_and_streams_finish_then_exits_0(
        gate_triton: EmbeddedTriton, serve_factory, gates) -> None:
    grace_s = 60.0
    serve = serve_factory(gate_triton.grpc_url, "--grace-period-s", str(grace_s))
    gate = gates.new()
    stream = Stream(serve.url)
    for i in range(2):
        stream.client.async_stream_infer("gate", gate_inputs(gate, [float(i)]), request_id=f"s{i}")
    unary = grpcclient.InferenceServerClient(serve.url)
    done: queue.Queue = queue.Queue()
    for i in range(3):
        unary.async_infer("gate", gate_inputs(gate, [float(10 + i)]), request_id=f"u{i}",
                          callback=lambda result, error: done.put((result, error)))
    wait_until(lambda: inflight_metric(serve.metrics_url, "gate") == 5, what="5 calls in flight")

    serve.proc.send_signal(signal.SIGTERM)
    terminated_at = time.monotonic()
    # No new connections, while the open ones go on.
    wait_until(lambda: not can_connect(serve.port), what="the listener to close")
    assert serve.proc.poll() is None
    # A new call on a connection that is still open is refused too, at once.
    started = time.monotonic()
    refused = outcome(lambda: unary.is_server_live(client_timeout=20))
    assert refused.code == "StatusCode.UNAVAILABLE" and time.monotonic() - started < 10

    gates.open(gate)
    unary_results = [done.get(timeout=60) for _ in range(3)]
    assert [e for _, e in unary_results] == [None] * 3
    assert sorted(r.get_response().id for r, _ in unary_results) == ["u0", "u1", "u2"]
    stream_results = stream.get(2)
    assert [e for _, e in stream_results] == [None, None]
    assert sorted(r.get_response().id for r, _ in stream_results) == ["s0", "s1"]
    stream.close()  # the stream ends: nothing is open any more

    assert serve.proc.wait(timeout=grace_s) == 0
    assert time.monotonic() - terminated_at < grace_s
    log = serve.log()
    assert "sidecar.stopping" in log and "sidecar.stopped" in log
    assert "relay.shutdown_grace_expired" not in log
    unary.close()


def test_sigterm_grace_expires_with_a_call_still_held(gate_triton: EmbeddedTriton, serve_factory, gates) -> None:
    grace_s = 2.0
    serve = serve_factory(gate_triton.grpc_url, "--grace-period-s", str(grace_s))
    gate = gates.new()
    client = grpcclient.InferenceServerClient(serve.url)
    done: queue.Queue = queue.Queue()
    client.async_infer("gate", gate_inputs(gate), callback=lambda result, error: done.put((result, error)))
    wait_until(lambda: inflight_metric(serve.metrics_url, "gate") == 1, what="the call in flight")
    serve.proc.send_signal(signal.SIGTERM)
    terminated_at = time.monotonic()
    assert serve.proc.wait(timeout=30) == 0
    assert grace_s - 0.5 <= time.monotonic() - terminated_at < grace_s + 10
    result, error = done.get(timeout=30)
    assert result is None and error.status() == "StatusCode.UNAVAILABLE"
    assert "relay.shutdown_grace_expired" in serve.log()
    client.close()
