"""Through the proxy, every RPC of inference.GRPCInferenceService answers what Triton answers
directly: each test asks the same Triton both ways and compares."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from google.protobuf import json_format
from proxy_support import (
    HEALTH_SERVING,
    H2GrpcClient,
    Outcome,
    SidecarThread,
    fp32_inputs,
    gate_inputs,
    health_check,
    outcome,
    raw_unary,
    wait_until,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.triton

MODELS = ("batching", "decoupled", "fast", "identity_bytes", "identity_fp32", "sequence", "sleep")


@pytest.fixture
def clients(triton: EmbeddedTriton, sidecar: SidecarThread):
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    proxied = grpcclient.InferenceServerClient(sidecar.url)
    yield direct, proxied
    direct.close()
    proxied.close()


def both(clients, call: Callable[[grpcclient.InferenceServerClient], Any]) -> tuple[Outcome, Outcome]:
    direct, proxied = clients
    return outcome(lambda: call(direct)), outcome(lambda: call(proxied))


def assert_same(clients, call: Callable[[grpcclient.InferenceServerClient], Any]) -> Outcome:
    d, p = both(clients, call)
    assert p == d
    return d


# ------------------------------------------------------------------------------ server and models


def test_health_and_metadata_rpcs_answer_as_triton_does(clients) -> None:
    assert assert_same(clients, lambda c: c.is_server_live()).value is True
    assert assert_same(clients, lambda c: c.is_server_ready()).value is True
    meta = assert_same(clients, lambda c: c.get_server_metadata(as_json=True))
    assert meta.value["name"] == "triton" and meta.value["version"]
    for model in MODELS:
        assert assert_same(clients, lambda c, model=model: c.is_model_ready(model)).value is True
        metadata = assert_same(clients, lambda c, model=model: c.get_model_metadata(model, as_json=True))
        assert metadata.value["name"] == model
        config = assert_same(clients, lambda c, model=model: c.get_model_config(model, as_json=True))
        assert config.value["config"]["name"] == model
    # A model that isn't there: same answer (ready=False), same error.
    assert assert_same(clients, lambda c: c.is_model_ready("no_such_model")).value is False
    missing = assert_same(clients, lambda c: c.get_model_metadata("no_such_model"))
    assert not missing.ok and missing.code == "StatusCode.NOT_FOUND"
    missing = assert_same(clients, lambda c: c.get_model_config("no_such_model"))
    assert not missing.ok and missing.code == "StatusCode.NOT_FOUND"


def test_repository_index_statistics_trace_and_log_settings_are_the_same(clients) -> None:
    index = assert_same(clients, lambda c: c.get_model_repository_index(as_json=True))
    assert {m["name"] for m in index.value["models"]} >= set(MODELS)
    # No inference runs in between, so the counters too must be equal.
    stats = assert_same(clients, lambda c: c.get_inference_statistics(as_json=True))
    assert {m["name"] for m in stats.value["model_stats"]} >= set(MODELS)
    one = assert_same(clients, lambda c: c.get_inference_statistics("identity_fp32", as_json=True))
    assert [m["name"] for m in one.value["model_stats"]] == ["identity_fp32"]
    assert not assert_same(clients, lambda c: c.get_inference_statistics("no_such_model")).ok
    trace = assert_same(clients, lambda c: c.get_trace_settings(as_json=True))
    assert "trace_level" in trace.value["settings"]
    assert assert_same(clients, lambda c: c.get_trace_settings(model_name="identity_fp32", as_json=True)).ok
    logs = assert_same(clients, lambda c: c.get_log_settings(as_json=True))
    assert "log_verbose_level" in logs.value["settings"]
    # Writes: setting what is already set changes nothing, and answers the same both ways.
    current = {k: next(iter(v.values())) for k, v in logs.value["settings"].items()
               if k != "log_file"}  # Triton refuses to move its log file over the network
    assert assert_same(clients, lambda c: c.update_log_settings(current, as_json=True)).value == logs.value
    assert assert_same(clients, lambda c: c.update_trace_settings(
        model_name="identity_fp32", settings={"trace_rate": trace.value["settings"]["trace_rate"]["value"][0]},
        as_json=True)).ok


def test_system_shared_memory_register_status_unregister(clients) -> None:
    direct, proxied = clients
    region = shm.create_shared_memory_region("tp_region", "/tritonpilot_proxy_test", 64)
    try:
        data = np.arange(16, dtype=np.float32)
        shm.set_shared_memory_region(region, [data])
        proxied.register_system_shared_memory("tp_region", "/tritonpilot_proxy_test", 64)
        status = assert_same(clients, lambda c: c.get_system_shared_memory_status(as_json=True))
        assert status.value["regions"]["tp_region"]["key"] == "/tritonpilot_proxy_test"
        assert status.value["regions"]["tp_region"]["byte_size"] == "64"
        # The region serves an inference through the proxy.
        inp = grpcclient.InferInput("INPUT0", [16], "FP32")
        inp.set_shared_memory("tp_region", 64)
        result = proxied.infer("identity_fp32", [inp])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
        # Registering twice: the same error both ways.
        again = assert_same(clients, lambda c: c.register_system_shared_memory(
            "tp_region", "/tritonpilot_proxy_test", 64))
        assert not again.ok and again.code == "StatusCode.ALREADY_EXISTS"
        proxied.unregister_system_shared_memory("tp_region")
        assert assert_same(clients, lambda c: c.get_system_shared_memory_status(as_json=True)).value == {}
        bad_key = assert_same(clients, lambda c: c.register_system_shared_memory("tp_bad", "/tritonpilot_no_such", 64))
        assert not bad_key.ok
    finally:
        for client in clients:
            try:
                client.unregister_system_shared_memory("tp_region")
            except Exception:  # noqa: BLE001 - cleanup only
                pass
        shm.destroy_shared_memory_region(region)


def test_cuda_shared_memory_answers_as_triton_does(clients) -> None:
    # A CPU-only Triton: status and a bogus registration answer the same both ways.
    assert_same(clients, lambda c: c.get_cuda_shared_memory_status(as_json=True))
    bogus = assert_same(clients, lambda c: c.register_cuda_shared_memory("tp_cuda", b"\x00" * 64, 0, 64))
    assert not bogus.ok
    assert_same(clients, lambda c: c.unregister_cuda_shared_memory("tp_cuda"))


# ------------------------------------------------------------------------------ inference


def test_unary_infer_numeric_bytes_and_batching(clients, sidecar: SidecarThread) -> None:
    data = np.linspace(-1, 1, 1000, dtype=np.float32)
    r = assert_same(clients, lambda c: c.infer("identity_fp32", fp32_inputs(data)).as_numpy("OUTPUT0").tolist())
    assert r.value == data.tolist()

    strings = np.array([b"", b"hello", "\u00e9t\u00e9".encode(), bytes(range(256))], dtype=np.object_)
    inp = grpcclient.InferInput("INPUT0", [4], "BYTES")
    inp.set_data_from_numpy(strings)
    r = assert_same(clients, lambda c: c.infer("identity_bytes", [inp]).as_numpy("OUTPUT0").tolist())
    assert r.value == strings.tolist()

    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    r = assert_same(clients, lambda c: c.infer("batching", fp32_inputs(batch)).as_numpy("OUTPUT0").tolist())
    assert r.value == (batch * 2).tolist()

    # The whole response (id, parameters, outputs) is the same, not just the tensor.
    d, p = both(clients, lambda c: c.infer("identity_fp32", fp32_inputs(data), request_id="req-7").get_response(
        as_json=True))
    assert p == d and d.value["id"] == "req-7"

    snap = sidecar.snapshot().models
    for model in ("identity_fp32", "identity_bytes", "batching"):
        assert snap[model].inflight == 0
        assert snap[model].finished_total == {"OK": snap[model].started_total}
    assert snap["identity_fp32"].started_total == 2


def stream_results(url: str, requests: list[dict[str, Any]], timeout_s: float = 30.0) -> list[Any]:
    """Send requests on one ModelStreamInfer stream; collect (outputs, final flag) or errors in
    order until every request got its final response."""
    client = grpcclient.InferenceServerClient(url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for request in requests:
            client.async_stream_infer(**request)
        results, finals = [], 0
        while finals < len(requests):
            result, error = got.get(timeout=timeout_s)
            if error is not None:
                results.append(("error", error.status(), error.message()))
                finals += 1
                continue
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param \
                if "triton_final_response" in response.parameters else None
            outputs = {o.name: result.as_numpy(o.name).tolist() for o in response.outputs}
            results.append((response.model_name, response.id, outputs, final))
            if final is not False:
                finals += 1
        return results
    finally:
        client.stop_stream()
        client.close()


def by_request(results: list[Any]) -> dict[str, list[Any]]:
    """Stream results per request id, in order: responses of different requests interleave freely."""
    grouped: dict[str, list[Any]] = {}
    for model, request_id, outputs, final in results:
        assert model == "decoupled"
        grouped.setdefault(request_id, []).append((outputs, final))
    return grouped


def decoupled_request(n: int, request_id: str) -> dict[str, Any]:
    inp = grpcclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([n], dtype=np.int32))
    return dict(model_name="decoupled", inputs=[inp], request_id=request_id, enable_empty_final_response=True)


def test_stream_infer_decoupled_responses_and_final_flags(triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    requests = [decoupled_request(3, "a"), decoupled_request(0, "b"), decoupled_request(2, "c")]
    direct = by_request(stream_results(triton.grpc_url, requests))
    proxied = by_request(stream_results(sidecar.url, requests))
    assert proxied == direct
    # 3 + 0 + 2 data responses, each request closed by an empty final one.
    assert direct == {
        "a": [({"OUT": [0]}, False), ({"OUT": [1]}, False), ({"OUT": [2]}, False), ({}, True)],
        "b": [({}, True)],
        "c": [({"OUT": [0]}, False), ({"OUT": [1]}, False), ({}, True)],
    }
    # The final flags ended each request in the proxy's count.
    m = wait_until(lambda: sidecar.model("decoupled"), what="decoupled stats")
    assert m.started_total == 3 and m.finished_total == {"OK": 3}
    wait_until(lambda: sidecar.inflight("decoupled") == 0, what="decoupled in flight back to 0")


def test_stream_infer_decoupled_many_interleaved_requests(triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    requests = [decoupled_request(n, f"req-{i}") for i, n in enumerate((40, 1, 25, 0, 60, 7))]
    direct = by_request(stream_results(triton.grpc_url, requests))
    proxied = by_request(stream_results(sidecar.url, requests))
    assert proxied == direct
    assert {rid: len(responses) for rid, responses in direct.items()} == {
        "req-0": 41, "req-1": 2, "req-2": 26, "req-3": 1, "req-4": 61, "req-5": 8}
    wait_until(lambda: sidecar.inflight("decoupled") == 0, what="decoupled in flight back to 0")
    assert sidecar.finished("decoupled") == {"OK": 6}


def sequence_request(sequence_id: int, value: int, start: bool = False, end: bool = False) -> dict[str, Any]:
    inp = grpcclient.InferInput("INPUT0", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return dict(model_name="sequence", inputs=[inp], sequence_id=sequence_id, sequence_start=start,
                sequence_end=end, request_id=str(value))


def test_stream_infer_sequence_start_and_end(triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    def run(url: str, sequence_id: int) -> list[Any]:
        first = stream_results(url, [sequence_request(sequence_id, 5, start=True), sequence_request(sequence_id, 7),
                                     sequence_request(sequence_id, 30, end=True)])
        # Once it has ended, a new sequence with the same id starts from zero again.
        return first + stream_results(url, [sequence_request(sequence_id, 2, start=True, end=True)])

    direct = run(triton.grpc_url, 4242)
    proxied = run(sidecar.url, 4243)
    assert [r[2]["OUTPUT0"] for r in direct] == [[[5]], [[12]], [[42]], [[2]]]
    assert proxied == direct
    assert sidecar.model("sequence").finished_total == {"OK": 4}
    # A request outside any sequence: the same error both ways, in-stream.
    lost = [sequence_request(0, 1)]
    lost_direct = stream_results(triton.grpc_url, lost)
    assert [r[0] for r in lost_direct] == ["error"], lost_direct
    assert stream_results(sidecar.url, lost) == lost_direct


# ------------------------------------------------------------------------------ metadata and compression


def test_request_metadata_goes_through_and_response_metadata_comes_back(
        triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    def call(url: str, model: str, metadata: list[tuple[str, Any]]) -> tuple[Any, ...]:
        with grpc.insecure_channel(url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                reply, rpc = stub.ModelMetadata.with_call(
                    service_pb2.ModelMetadataRequest(name=model), metadata=metadata, timeout=10)
                return ("OK", json_format.MessageToDict(reply), tuple(rpc.initial_metadata()),
                        tuple(rpc.trailing_metadata()))
            except grpc.RpcError as exc:
                return (exc.code().name, exc.details(), tuple(exc.initial_metadata()), tuple(exc.trailing_metadata()))

    metadata = [("x-tritonpilot-test", "yes"), ("x-trace-bin", b"\x00\x01\xff"), ("x-long", "v" * 4000)]
    outcomes = {}
    for model in ("identity_fp32", "no_such_model"):
        direct, proxied = call(triton.grpc_url, model, metadata), call(sidecar.url, model, metadata)
        assert proxied == direct
        outcomes[model] = direct[0]
    assert outcomes == {"identity_fp32": "OK", "no_such_model": "NOT_FOUND"}
    # Metadata over gRPC's limit, in HEADERS + CONTINUATION frames: refused the same way.
    too_big = [("x-big", "v" * 40_000)]
    direct, proxied = call(triton.grpc_url, "identity_fp32", too_big), call(sidecar.url, "identity_fp32", too_big)
    # (The details quote the grpc-timeout header, whose digits differ from call to call.)
    assert proxied[0] == direct[0] == "RESOURCE_EXHAUSTED"
    assert proxied[1].split(" (")[0] == direct[1].split(" (")[0] == "received metadata size exceeds hard limit"


def test_gzip_request_passes_and_its_model_is_still_counted(clients, sidecar: SidecarThread) -> None:
    data = np.arange(4096, dtype=np.float32)  # compressible, and longer than the relay's peek
    for algorithm in ("gzip", "deflate"):
        r = assert_same(clients, lambda c, algorithm=algorithm: c.infer(
            "identity_fp32", fp32_inputs(data), compression_algorithm=algorithm).as_numpy("OUTPUT0").tolist())
        assert r.value == data.tolist()
    snap = sidecar.snapshot().models
    assert snap["identity_fp32"].finished_total == {"OK": 2}
    assert "" not in snap  # the model name was read from inside the compressed message


def test_gzip_request_counts_in_flight_for_its_model(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url)
    client = grpcclient.InferenceServerClient(sidecar.url)
    gate = gates.new()
    got: queue.Queue = queue.Queue()
    client.async_infer("gate", gate_inputs(gate), callback=lambda result, error: got.put((result, error)),
                       compression_algorithm="gzip")
    wait_until(lambda: sidecar.inflight("gate") == 1, what="the gzip request in flight for 'gate'")
    gates.open(gate)
    result, error = got.get(timeout=30)
    assert error is None and result.as_numpy("OUTPUT0").tolist() == [1.0, 2.0, 3.0]
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    client.close()


def test_concurrent_calls_from_many_threads_come_back_right(sidecar: SidecarThread) -> None:
    shared = grpcclient.InferenceServerClient(sidecar.url)  # one connection, many streams at once
    failures: list[str] = []

    def worker(k: int) -> None:
        own = grpcclient.InferenceServerClient(sidecar.url)
        for i in range(40):
            client = shared if i % 2 else own
            data = np.full(1 + (k * 40 + i) % 700, k * 1000 + i, dtype=np.float32)
            try:
                out = client.infer("identity_fp32", fp32_inputs(data), request_id=f"{k}-{i}",
                                   headers={"x-worker": str(k)}, client_timeout=60)
                if out.get_response().id != f"{k}-{i}" or out.as_numpy("OUTPUT0").tolist() != data.tolist():
                    failures.append(f"{k}-{i}: wrong answer")
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(f"{k}-{i}: {exc!r}")
        own.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    shared.close()
    assert failures == []
    assert sidecar.finished("identity_fp32") == {"OK": 320}
    assert sidecar.model("identity_fp32").inflight == 0


def test_health_check_is_answered_by_the_proxy(sidecar: SidecarThread, sidecar_factory) -> None:
    # Triton answers Health/Check too: in front of a gRPC server with no services, where the
    # call would come back UNIMPLEMENTED, only the proxy can have said SERVING.
    bare = grpc.server(ThreadPoolExecutor(max_workers=2))
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        assert health_check(f"127.0.0.1:{port}")[0] == "UNIMPLEMENTED"
        assert health_check(sidecar_factory(f"127.0.0.1:{port}").url) == ("OK", HEALTH_SERVING)
    finally:
        bare.stop(grace=None)
    assert health_check(sidecar.url) == ("OK", HEALTH_SERVING)
    # ... and the connection stays usable for Triton's RPCs afterwards.
    with grpc.insecure_channel(sidecar.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            method = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)
            assert method(b"", timeout=10) == HEALTH_SERVING
            assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live


def test_health_watch_is_refused_and_unknown_methods_answer_as_triton_does(
        triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    with grpc.insecure_channel(sidecar.url) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as refused:
            list(watch(b"", timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "Health/Check" in refused.value.details()
    for path in ("/inference.GRPCInferenceService/NoSuchMethod", "/no.such.Service/Method",
                 "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        with grpc.insecure_channel(triton.grpc_url) as d, grpc.insecure_channel(sidecar.url) as p:
            assert raw_unary(p, path, b"\x0a\x00") == raw_unary(d, path, b"\x0a\x00")


def test_many_calls_on_one_connection_keep_hpack_in_step(clients) -> None:
    # Varied metadata makes both encoders insert and evict dynamic-table entries.
    direct, proxied = clients
    data = np.arange(8, dtype=np.float32)
    for i in range(200):
        headers = {f"x-key-{i % 17}": f"value-{i}" * (1 + i % 5)}
        result = proxied.infer("identity_fp32", fp32_inputs(data), request_id=str(i), headers=headers)
        assert result.get_response().id == str(i)
        if i % 50 == 0:
            assert not proxied.is_model_ready("no_such_model", headers=headers)
    assert json.dumps(proxied.get_server_metadata(as_json=True)) == json.dumps(direct.get_server_metadata(as_json=True))


# ------------------------------------------------------------------------------ frames grpcio never sends


def infer_request_bytes(model: str, data: np.ndarray, request_id: str = "") -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32")
    tensor.shape.extend(data.shape)
    request.raw_input_contents.append(data.tobytes())
    return request.SerializeToString()


def h2_session(url: str) -> list[Any]:
    """A scripted session of odd but valid HTTP/2: what each call came back with."""
    client = H2GrpcClient(url, header_table_size=96)  # Triton's encoder must evict all the time
    data = np.arange(300, dtype=np.float32)
    seen: list[Any] = []
    try:
        infer = "/inference.GRPCInferenceService/ModelInfer"
        for i in range(12):
            metadata = [(f"x-churn-{i}".encode(), f"value-{i}".encode() * 3)]
            # Whole frames with PRIORITY, 7-byte frames, or a padded frame (grpc-core refuses those).
            reply = client.call(infer, infer_request_bytes("identity_fp32", data, f"r{i}"), metadata=metadata,
                                priority=i % 3 == 0, frame_bytes=7 if i % 3 == 1 else None,
                                pad_length=10 if i % 3 == 2 else None)
            if reply.messages:
                response = service_pb2.ModelInferResponse.FromString(reply.messages[0])
                output = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
                seen.append((reply.grpc_status, reply.reset, response.id, output.tolist() == data.tolist()))
            else:
                seen.append((reply.grpc_status, reply.reset))
        reply = client.call("/inference.GRPCInferenceService/ModelMetadata",
                            service_pb2.ModelMetadataRequest(name="no_such_model").SerializeToString())
        seen.append((reply.grpc_status, {**reply.headers, **reply.trailers}.get(b"grpc-message")))
        client.ping()
        # A request reset halfway through its message: the connection goes on.
        stream_id = client.start(infer)
        client.send(stream_id, infer_request_bytes("identity_fp32", data, "reset"), cut_at=600)
        client.reset(stream_id)
        reply = client.call("/inference.GRPCInferenceService/ServerLive",
                            service_pb2.ServerLiveRequest().SerializeToString(), frame_bytes=1)
        seen.append((reply.grpc_status, service_pb2.ServerLiveResponse.FromString(reply.messages[0]).live))
        seen.append(("pings acked", client.pings_acked))
    finally:
        client.close()
    return seen


def test_padded_fragmented_prioritized_frames_and_a_tiny_header_table(
        triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    direct = h2_session(triton.grpc_url)
    proxied = h2_session(sidecar.url)
    assert proxied == direct
    # grpc-core refuses padded DATA frames (RST_STREAM PROTOCOL_ERROR): so does Triton behind the proxy.
    assert direct[:12] == [(None, 1) if i % 3 == 2 else (0, None, f"r{i}", True) for i in range(12)]
    assert direct[12][0] == 5 and b"no_such_model" in direct[12][1]
    assert direct[13] == (0, True) and direct[14] == ("pings acked", 1)
    # The model name was read through 7-byte frames and padding. A padded call ends with Triton's
    # reset or, as grpc-core sometimes sends after it, INTERNAL trailers. The call reset before
    # its first 1024 bytes arrived was never counted.
    wait_until(lambda: sidecar.inflight("identity_fp32") == 0, what="in flight back to 0")
    finished = sidecar.finished("identity_fp32")
    assert finished.pop("OK") == 8
    assert set(finished) <= {"CANCELLED", "INTERNAL"} and sum(finished.values()) == 4


def test_a_call_sent_byte_by_byte(triton: EmbeddedTriton, sidecar: SidecarThread) -> None:
    data = np.arange(50, dtype=np.float32)
    client = H2GrpcClient(sidecar.url, trickle=True)  # preface, SETTINGS, HEADERS, DATA: one byte per send
    try:
        reply = client.call("/inference.GRPCInferenceService/ModelInfer", infer_request_bytes("identity_fp32", data))
    finally:
        client.close()
    assert reply.grpc_status == 0
    response = service_pb2.ModelInferResponse.FromString(reply.messages[0])
    assert np.frombuffer(response.raw_output_contents[0], dtype=np.float32).tolist() == data.tolist()
    assert sidecar.finished("identity_fp32") == {"OK": 1}
