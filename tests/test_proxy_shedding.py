"""Load shedding: a per-model cap on requests in flight through the proxy. Past the cap a
ModelInfer call gets RESOURCE_EXHAUSTED at once, naming the model and the cap, counts under
that code, and never reaches Triton; a ModelStreamInfer request gets the same message as an
error response on its stream, and never reaches Triton either; the in-flight gauge never
passes the cap."""

from __future__ import annotations

import queue
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from proxy_support import SidecarThread, fp32_inputs, gate_inputs, outcome, wait_until

from tritonpilot.control.policy import PolicyError, parse_policy, policy_warnings
from tritonpilot.proxy.shedding import InflightCaps
from tritonpilot.sidecar.wiring import sidecar_config_from_policy
from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.triton


def triton_inferences(triton: EmbeddedTriton, model: str) -> int:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        stats = client.get_inference_statistics(model).model_stats[0].inference_stats
        return stats.success.count + stats.fail.count
    finally:
        client.close()


def shed_metric(sidecar: SidecarThread, model: str) -> float | None:
    return sidecar.metric("tritonpilot_requests_total", model=model, code="RESOURCE_EXHAUSTED")


@pytest.mark.parametrize(("cap", "extra"), [(1, 1), (3, 4)])
def test_past_the_cap_calls_are_shed_at_once_and_never_reach_triton(
        gate_triton: EmbeddedTriton, sidecar_factory, gates, cap: int, extra: int) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url, max_inflight=cap)
    # Two connections: the cap is the model's, across every client.
    clients = [grpcclient.InferenceServerClient(sidecar.url) for _ in range(2)]
    gate = gates.new()
    before = triton_inferences(gate_triton, "gate")
    done: queue.Queue = queue.Queue()
    try:
        for i in range(cap + extra):
            clients[i % 2].async_infer("gate", gate_inputs(gate, [float(i)]), request_id=str(i),
                                       callback=lambda result, error: done.put((result, error)))
        # The refused ones come back while the admitted ones are still held in Triton.
        refused = [done.get(timeout=60) for _ in range(extra)]
        for result, error in refused:
            assert result is None and error is not None
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert error.message() == (f"tritonpilot: model 'gate' has {cap} requests in flight, its cap "
                                       "(max_inflight); retry later or elsewhere")
        wait_until(lambda: sidecar.inflight("gate") == cap, what=f"{cap} calls in flight")
        assert done.empty()
        assert shed_metric(sidecar, "gate") == extra
        assert sidecar.model("gate").inflight_peak == cap  # the gauge never passed the cap
        assert sidecar.metric("tritonpilot_inflight_requests", model="gate") == cap

        gates.open(gate)
        admitted = [done.get(timeout=60) for _ in range(cap)]
        assert [e for _, e in admitted] == [None] * cap
        wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
        assert sidecar.finished("gate") == {"OK": cap, "RESOURCE_EXHAUSTED": extra}
        assert sidecar.model("gate").started_total == cap + extra
        assert sidecar.model("gate").inflight_peak == cap
        # Triton executed exactly the admitted calls.
        wait_until(lambda: triton_inferences(gate_triton, "gate") == before + cap,
                   what="Triton's statistics to count the admitted calls")
        assert triton_inferences(gate_triton, "gate") == before + cap
        # Below the cap again: calls pass.
        assert clients[0].infer("gate", gate_inputs(None)).as_numpy("OUTPUT0").tolist() == [1.0, 2.0, 3.0]
    finally:
        for client in clients:
            client.close()


def test_a_model_s_own_cap_overrides_the_default(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url, max_inflight=100, model_max_inflight={"gate": 1})
    client = grpcclient.InferenceServerClient(sidecar.url)
    gate = gates.new()
    done: queue.Queue = queue.Queue()
    try:
        client.async_infer("gate", gate_inputs(gate), callback=lambda result, error: done.put((result, error)))
        wait_until(lambda: sidecar.inflight("gate") == 1, what="one call in flight")
        shed = outcome(lambda: client.infer("gate", gate_inputs(gate)))
        assert shed.code == "StatusCode.RESOURCE_EXHAUSTED" and "has 1 requests in flight" in shed.message
        gates.open(gate)
        assert done.get(timeout=60)[1] is None
    finally:
        client.close()


def test_other_models_and_other_calls_are_not_capped(triton: EmbeddedTriton, sidecar_factory) -> None:
    sidecar = sidecar_factory(triton.grpc_url, model_max_inflight={"gate": 1})
    client = grpcclient.InferenceServerClient(sidecar.url)
    try:
        data = np.ones(3, dtype=np.float32)
        done: queue.Queue = queue.Queue()
        for _ in range(8):
            client.async_infer("identity_fp32", fp32_inputs(data), callback=lambda result, error: done.put(error))
        assert [done.get(timeout=60) for _ in range(8)] == [None] * 8
        assert client.is_server_ready()
        assert sidecar.finished("identity_fp32") == {"OK": 8}
    finally:
        client.close()


def test_stream_requests_count_toward_the_cap_of_unary_calls(
        gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    """Stream requests are in flight: they take their share of the cap unary calls see."""
    sidecar = sidecar_factory(gate_triton.grpc_url, max_inflight=2)
    stream = grpcclient.InferenceServerClient(sidecar.url)
    unary = grpcclient.InferenceServerClient(sidecar.url)
    responses: queue.Queue = queue.Queue()
    gate = gates.new()
    try:
        stream.start_stream(callback=lambda result, error: responses.put(error))
        for i in range(2):
            stream.async_stream_infer("gate", gate_inputs(gate, [float(i)]), request_id=str(i))
        wait_until(lambda: sidecar.inflight("gate") == 2, what="2 stream requests in flight")
        shed = outcome(lambda: unary.infer("gate", gate_inputs(gate)))
        assert shed.code == "StatusCode.RESOURCE_EXHAUSTED"
        gates.open(gate)
        assert [responses.get(timeout=60) for _ in range(2)] == [None, None]
    finally:
        stream.stop_stream()
        stream.close()
        unary.close()


def stream_results(responses: queue.Queue, n: int) -> tuple[list[str], list[str]]:
    """(ids answered OK, error messages) of the next n stream responses."""
    ok: list[str] = []
    errors: list[str] = []
    for _ in range(n):
        result, error = responses.get(timeout=60)
        if error is None:
            ok.append(result.get_response().id)
        else:
            errors.append(error.message())
    return sorted(ok), errors


@pytest.mark.parametrize(("cap", "extra"), [(1, 1), (2, 3)])
def test_stream_requests_past_the_cap_are_answered_on_the_stream_and_never_reach_triton(
        gate_triton: EmbeddedTriton, sidecar_factory, gates, cap: int, extra: int) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url, max_inflight=cap)
    client = grpcclient.InferenceServerClient(sidecar.url)
    responses: queue.Queue = queue.Queue()
    gate = gates.new()
    before = triton_inferences(gate_triton, "gate")
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        for i in range(cap + extra):
            client.async_stream_infer("gate", gate_inputs(gate, [float(i)]), request_id=str(i))
        wait_until(lambda: shed_metric(sidecar, "gate") == extra, what=f"{extra} stream requests shed")
        assert sidecar.inflight("gate") == cap
        assert sidecar.model("gate").inflight_peak == cap  # the gauge never passed the cap
        gates.open(gate)
        ok, errors = stream_results(responses, cap + extra)
        assert ok == sorted(str(i) for i in range(cap))
        assert errors == [f"tritonpilot: model 'gate' has {cap} requests in flight, its cap "
                          "(max_inflight); retry later or elsewhere"] * extra
        wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
        assert sidecar.finished("gate") == {"OK": cap, "RESOURCE_EXHAUSTED": extra}
        assert sidecar.model("gate").inflight_peak == cap
        wait_until(lambda: triton_inferences(gate_triton, "gate") == before + cap,
                   what="Triton's statistics to count the admitted requests")
        # The stream goes on: below the cap, requests pass again (flow control held up).
        client.async_stream_infer("gate", gate_inputs(None), request_id="after")
        assert stream_results(responses, 1) == (["after"], [])
        assert triton_inferences(gate_triton, "gate") == before + cap + 1
    finally:
        client.stop_stream()
        client.close()


def test_a_stream_triton_holds_nothing_of_is_refused_at_once(
        gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    """Triton holds no request of this stream and sends no headers before its first response,
    so a per-request answer could wait forever: the stream ends RESOURCE_EXHAUSTED at once,
    without the client half-closing it."""
    sidecar = sidecar_factory(gate_triton.grpc_url, max_inflight=1)
    unary = grpcclient.InferenceServerClient(sidecar.url)
    stream = grpcclient.InferenceServerClient(sidecar.url)
    held: queue.Queue = queue.Queue()
    responses: queue.Queue = queue.Queue()
    gate = gates.new()
    before = triton_inferences(gate_triton, "gate")
    try:
        unary.async_infer("gate", gate_inputs(gate), callback=lambda result, error: held.put(error))
        wait_until(lambda: sidecar.inflight("gate") == 1, what="the model's one slot taken")
        stream.start_stream(callback=lambda result, error: responses.put((result, error)))
        stream.async_stream_infer("gate", gate_inputs(gate, [0.0]), request_id="0")
        result, error = responses.get(timeout=60)  # the stream stays open on the client's side
        assert result is None and error is not None
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert error.message() == ("tritonpilot: model 'gate' has 1 requests in flight, its cap "
                                   "(max_inflight); retry later or elsewhere")
        gates.open(gate)
        assert held.get(timeout=60) is None
        wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
        assert sidecar.finished("gate") == {"OK": 1, "RESOURCE_EXHAUSTED": 1}
        assert triton_inferences(gate_triton, "gate") == before + 1
        assert stream.is_server_ready()  # the stream's connection goes on
    finally:
        stream.stop_stream()
        stream.close()
        unary.close()


# ------------------------------------------------------------------------------ configuration


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        InflightCaps(0)
    assert not InflightCaps().enabled
    caps = InflightCaps(4, {"m": 2})
    assert (caps.cap("m"), caps.cap("other")) == (2, 4)


def test_policy_keys_are_parsed_and_checked_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("proxy: {max_inflight: 16}\nmodels: {a: {max_inflight: 40}, b: {}}\n")
    config, _ = sidecar_config_from_policy(path)
    assert (config.max_inflight, dict(config.model_max_inflight)) == (16, {"a": 40})
    for data, problem in [({"proxy": {"max_inflight": 0}}, "proxy.max_inflight: got 0; must be >= 1"),
                          ({"models": {"m": {"max_inflight": -2}}}, "models.m.max_inflight: got -2; must be >= 1"),
                          ({"models": {"m": {"max_inflight": "x"}}},
                           "models.m.max_inflight: got 'x'; must be an integer"),
                          ({"proxy": {"max_inflight": 1.5}}, "proxy.max_inflight: got 1.5; must be an integer")]:
        with pytest.raises(PolicyError) as error:
            parse_policy(data)
        assert problem in error.value.problems, error.value.problems


def test_a_cap_that_would_hide_load_from_the_controller_is_warned_about() -> None:
    # max_instances 4 x target 1 x (1 + 0.25) = 5: the controller needs to see more than 4 in flight.
    policy = parse_policy({"proxy": {"max_inflight": 4}, "models": {"m": {}, "n": {"max_inflight": 5}}})
    warnings = policy_warnings(policy)
    assert any(w.startswith("proxy.max_inflight: got 4; below models.m's") and "use >= 5" in w for w in warnings)
    assert not any("models.n" in w for w in warnings)


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--max-inflight", "0"], {}, "--max-inflight: got 0; must be >= 1"),
    ([], {"TRITONPILOT_MAX_INFLIGHT": "many"}, "TRITONPILOT_MAX_INFLIGHT: got 'many'; expected a int"),
])
def test_serve_exits_2_on_a_bad_cap(args: list[str], env: dict[str, str], message: str) -> None:
    import os
    proc = subprocess.run([sys.executable, "-m", "tritonpilot", "serve", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})
    assert proc.returncode == 2
    assert message in proc.stderr
