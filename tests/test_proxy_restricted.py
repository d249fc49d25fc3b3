"""Triton's restricted protocols, enforced at the proxy's door: for each protocol group, a call
without the header gets what a Triton started with the same restriction answers (code and
message), a call with it passes; a refused call never reaches Triton; client model control,
once allowed, can be restricted too; bad rules are refused as Triton refuses them."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from proxy_support import SidecarThread, fp32_inputs, outcome, wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tritonpilot.control.policy import PolicyError, parse_policy
from tritonpilot.proxy.restrict import GROUPS, RestrictionError, parse_restrictions
from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.triton

MODEL = "identity_fp32"
# One rule per group, each with its own header, so a test can tell them apart.
RULES = {group: (f"k-{group}", f"v-{group}") for group in GROUPS}
RESTRICTIONS = tuple(f"{group}:{key}={value}" for group, (key, value) in RULES.items())


def header(group: str) -> dict[str, str]:
    key, value = RULES[group]
    return {f"triton-grpc-protocol-{key}": value}


def _stream_infer(client: grpcclient.InferenceServerClient, headers: dict[str, str] | None) -> Any:
    """One ModelStreamInfer request on the client's channel (tritonclient's own stream API
    reports a stream refused at once as "no current stream", not as the status)."""
    data = np.ones(3, dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[data.tobytes()])
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[3])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(client._channel)  # the client's own channel
    try:
        replies = list(stub.ModelStreamInfer(iter([request]), timeout=10.0,
                                             metadata=list((headers or {}).items())))
    except grpc.RpcError as exc:
        raise InferenceServerException(exc.details(), status=str(exc.code())) from None
    return [(r.error_message, r.infer_response.model_name) for r in replies]


# group -> calls of that group, each (client, headers) -> result
CALLS: dict[str, list[Callable[[grpcclient.InferenceServerClient, dict[str, str] | None], Any]]] = {
    "health": [lambda c, h: c.is_server_live(headers=h), lambda c, h: c.is_model_ready(MODEL, headers=h)],
    "metadata": [lambda c, h: c.get_server_metadata(headers=h).name,
                 lambda c, h: c.get_model_metadata(MODEL, headers=h).name],
    "inference": [lambda c, h: c.infer(MODEL, fp32_inputs(np.ones(3, dtype=np.float32)),
                                       headers=h).as_numpy("OUTPUT0").tolist(),
                  _stream_infer],
    "shared-memory": [lambda c, h: len(c.get_system_shared_memory_status(headers=h).regions),
                      lambda c, h: c.unregister_system_shared_memory("none", headers=h)],
    "model-config": [lambda c, h: c.get_model_config(MODEL, headers=h).config.name],
    "model-repository": [lambda c, h: [m.name for m in c.get_model_repository_index(headers=h).models]],
    "statistics": [lambda c, h: len(c.get_inference_statistics(MODEL, headers=h).model_stats)],
    "trace": [lambda c, h: sorted(c.get_trace_settings(headers=h).settings)],
    "logging": [lambda c, h: sorted(c.get_log_settings(headers=h).settings)],
}


def _health_v1(url: str, metadata: dict[str, str] | None) -> tuple[str, str | None]:
    with grpc.insecure_channel(url) as channel:
        method = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
        try:
            method(b"", timeout=10.0, metadata=list((metadata or {}).items()))
            return "OK", None
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()


@pytest.fixture(scope="module")
def restricted_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    """A Triton with every group restricted. Its health is restricted too, so readiness is
    polled here with the header (EmbeddedTriton's own wait asks without)."""
    from conftest import MODELS_DIR, STARTUP_TIMEOUT_S

    triton = EmbeddedTriton(MODELS_DIR, load_models=[MODEL],
                            log_path=tmp_path_factory.mktemp("restricted") / "tritonserver.log",
                            extra_args=[f"--grpc-restricted-protocol={r}" for r in RESTRICTIONS])
    triton.start(wait=False)
    try:
        client = grpcclient.InferenceServerClient(triton.grpc_url)

        def ready() -> bool:
            if not triton.is_running():
                raise AssertionError(f"tritonserver exited:\n{triton.log_tail()}")
            try:
                return client.is_model_ready(MODEL, headers=header("health"), client_timeout=2.0)
            except InferenceServerException:
                return False
        wait_until(ready, timeout_s=STARTUP_TIMEOUT_S, interval_s=0.2, what="the restricted Triton")
        client.close()
        yield triton
    finally:
        triton.stop()


def _both(direct_url: str, proxied_url: str, call, headers: dict[str, str] | None):
    direct = grpcclient.InferenceServerClient(direct_url)
    proxied = grpcclient.InferenceServerClient(proxied_url)
    try:
        return outcome(lambda: call(direct, headers)), outcome(lambda: call(proxied, headers))
    finally:
        direct.close()
        proxied.close()


@pytest.mark.parametrize("group", list(GROUPS))
def test_each_group_is_refused_as_triton_refuses_it_and_passes_with_its_header(
        group: str, restricted_triton: EmbeddedTriton, sidecar_factory) -> None:
    sidecar = sidecar_factory(restricted_triton.grpc_url, restricted_protocols=RESTRICTIONS,
                              allow_client_model_control=True)
    want = f"This protocol is restricted, expecting header 'triton-grpc-protocol-{RULES[group][0]}'"
    other = next(g for g in GROUPS if g != group)
    for call in CALLS[group]:
        for headers in (None, header(other)):  # no header, or another group's
            d, p = _both(restricted_triton.grpc_url, sidecar.url, call, headers)
            assert (d.ok, d.code, d.message) == (False, "StatusCode.UNAVAILABLE", want)
            assert (p.ok, p.code, p.message) == (d.ok, d.code, d.message)
        d, p = _both(restricted_triton.grpc_url, sidecar.url, call, header(group))
        assert p == d  # what Triton answers with the header, error or not: never the restriction
        assert p.message is None or "restricted" not in p.message
    wrong = {next(iter(header(group))): "wrong value"}
    d, p = _both(restricted_triton.grpc_url, sidecar.url, CALLS[group][0], wrong)
    assert (p.code, p.message) == (d.code, d.message) == ("StatusCode.UNAVAILABLE", want)


def test_grpc_health_check_is_in_the_health_group(restricted_triton: EmbeddedTriton, sidecar_factory) -> None:
    """grpc.health.v1 Check is answered by the proxy itself, behind the same door."""
    sidecar = sidecar_factory(restricted_triton.grpc_url, restricted_protocols=RESTRICTIONS)
    want = ("UNAVAILABLE", "This protocol is restricted, expecting header 'triton-grpc-protocol-k-health'")
    assert _health_v1(restricted_triton.grpc_url, None) == want
    assert _health_v1(sidecar.url, None) == want
    assert _health_v1(sidecar.url, header("health"))[0] == "OK"


def test_a_refused_call_never_reaches_triton(triton: EmbeddedTriton, sidecar_factory) -> None:
    """In front of an unrestricted Triton: the proxy alone refuses, and Triton counts nothing."""
    sidecar: SidecarThread = sidecar_factory(triton.grpc_url, restricted_protocols=("inference:key=value",))
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    proxied = grpcclient.InferenceServerClient(sidecar.url)
    data = np.ones(3, dtype=np.float32)

    def inferences() -> int:
        stats = direct.get_inference_statistics(MODEL).model_stats[0]
        return stats.inference_stats.success.count + stats.inference_stats.fail.count

    try:
        before = inferences()
        for _ in range(3):
            refused = outcome(lambda: proxied.infer(MODEL, fp32_inputs(data)))
            assert (refused.code, refused.message) == (
                "StatusCode.UNAVAILABLE", "This protocol is restricted, expecting header 'triton-grpc-protocol-key'")
        with pytest.raises(InferenceServerException):
            _stream_infer(proxied, None)
        time.sleep(0.5)  # nothing to wait for: give a stray request the time to be counted
        assert inferences() == before
        assert proxied.infer(MODEL, fp32_inputs(data), headers={"triton-grpc-protocol-key": "value"}) is not None
        wait_until(lambda: inferences() == before + 1, what="the admitted request in Triton's statistics")
        # Other groups pass without any header.
        assert proxied.get_model_config(MODEL).config.name == MODEL
    finally:
        direct.close()
        proxied.close()


def test_model_control_stays_refused_unless_allowed_and_can_be_restricted(
        triton: EmbeddedTriton, sidecar_factory) -> None:
    rule = ("model-repository:admin=yes",)
    want_restricted = ("StatusCode.UNAVAILABLE",
                       "This protocol is restricted, expecting header 'triton-grpc-protocol-admin'")
    admin = {"triton-grpc-protocol-admin": "yes"}

    refusing = sidecar_factory(triton.grpc_url, restricted_protocols=rule)
    client = grpcclient.InferenceServerClient(refusing.url)
    try:
        o = outcome(lambda: client.load_model(MODEL))
        assert (o.code, o.message) == want_restricted  # the door speaks first
        o = outcome(lambda: client.load_model(MODEL, headers=admin))
        assert o.code == "StatusCode.PERMISSION_DENIED" and "--allow-client-model-control" in o.message
    finally:
        client.close()

    allowing = sidecar_factory(triton.grpc_url, restricted_protocols=rule, allow_client_model_control=True)
    client = grpcclient.InferenceServerClient(allowing.url)
    try:
        o = outcome(lambda: client.unload_model("no_such_model"))
        assert (o.code, o.message) == want_restricted
        o = outcome(lambda: client.load_model(MODEL))
        assert (o.code, o.message) == want_restricted
        client.load_model(MODEL, headers=admin)  # reloads the shared server's model: same files, same config
        assert client.is_model_ready(MODEL)
    finally:
        client.close()


# ------------------------------------------------------------------------------ the rules themselves


@pytest.mark.parametrize(("text", "problem"), [
    ("health", "expected GROUPS:KEY=VALUE"),
    ("health:key", "expected GROUPS:KEY=VALUE"),
    (":key=value", "expected GROUPS:KEY=VALUE"),
    ("health:=value", "expected GROUPS:KEY=VALUE"),
    ("health:key=", "expected GROUPS:KEY=VALUE"),
    ("healthz:key=value", "unknown protocol group 'healthz'"),
    ("health,,metadata:key=value", "unknown protocol group ''"),
])
def test_bad_rules_are_refused_naming_the_groups(text: str, problem: str) -> None:
    with pytest.raises(RestrictionError) as error:
        parse_restrictions([text])
    assert problem in str(error.value)
    assert "health, metadata, inference, shared-memory, model-config, model-repository, statistics, trace, " \
           "logging" in str(error.value)


def test_rules_split_as_triton_splits_them() -> None:
    (r,) = parse_restrictions(["inference,health:my-key=a=b:c"])
    assert (r.groups, r.key, r.value, r.header) == (("inference", "health"), "my-key", "a=b:c",
                                                    "triton-grpc-protocol-my-key")
    with pytest.raises(RestrictionError, match="already restricted"):
        parse_restrictions(["health:a=1", "metadata,health:b=2"])


def test_serve_exits_2_on_a_bad_rule_naming_the_option_and_the_groups() -> None:
    proc = subprocess.run([sys.executable, "-m", "tritonpilot", "serve", "--restricted-protocol", "health:k=v",
                           "--restricted-protocol", "helth:k=v"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--restricted-protocol: got 'helth:k=v'; unknown protocol group 'helth'" in proc.stderr
    assert "health, metadata, inference, shared-memory" in proc.stderr


def test_policy_rules_are_checked_naming_the_key() -> None:
    policy = parse_policy({"proxy": {"restricted_protocols": ["inference:k=v"]}})
    assert policy.proxy.restricted_protocols == ("inference:k=v",)
    with pytest.raises(PolicyError) as error:
        parse_policy({"proxy": {"restricted_protocols": ["inference:k=v", "trace:k", "inference:x=y"]}})
    problems = error.value.problems
    assert any(p.startswith("proxy.restricted_protocols[1]: got 'trace:k'; expected GROUPS:KEY=VALUE")
               for p in problems), problems
    with pytest.raises(PolicyError) as error:
        parse_policy({"proxy": {"restricted_protocols": ["inference:k=v", "inference:x=y"]}})
    assert any(p.startswith("proxy.restricted_protocols: got ") and "already restricted" in p
               for p in error.value.problems), error.value.problems
