"""The controller end to end on a real Triton: what Triton's own ModelConfig shows, not
what tritonpilot claims.

1. `tritonpilot serve --policy` (a real process) in front of a private Triton with the
   20 ms `sleep` model: load through the proxy at concurrency 1, then 8, then 1. The
   count reaches >= 3 within 20 s of the step up, every observation above one instance
   carries DISABLE_OPTIMIZED_EXECUTION "true", it comes back to one instance with
   INFERENCE_MODE only, and no client request fails. /status and /metrics show it.
2. A profile whose flag value Triton rejects, applied to a TorchScript runner model (the
   Python `sleep` model ignores PyTorch flags): the model keeps serving, the controller
   keeps running and reports Triton's refusal.
3. `tritonpilot serve --no-proxy`, with clients sent straight to Triton: the controller
   reads the load from Triton's own statistics (Little's law) and scales the model up.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import uvloop
from proxy_support import WAIT_S, scrape, wait_until

from tritonpilot.control.actuator import Actuator
from tritonpilot.control.loop import Controller, LiveSources
from tritonpilot.control.overrides import read_state
from tritonpilot.control.policy import PolicyError, Profile, ResolvedModelPolicy, parse_policy
from tritonpilot.control.triton import TritonClient
from tritonpilot.sidecar.serve import Sidecar, SidecarConfig
from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SLEEP_POLICY = """\
control:
  interval_s: 0.5
defaults:
  min_instances: 1
  max_instances: 4
  target_inflight_per_instance: 1
  scale_up_delay_s: 2
  scale_down_delay_s: 4
  cooldown_s: 2
  verify: {enabled: true}
models:
  sleep: {}
"""


# ------------------------------------------------------------------------------ helpers


@dataclass(frozen=True)
class Observation:
    at_s: float
    instances: int
    parameters: dict[str, str]


class ConfigWatcher:
    """Reads Triton's own ModelConfig every `interval_s` in a thread and keeps every answer."""

    def __init__(self, url: str, model: str, interval_s: float = 0.1) -> None:
        self.model = model
        self.interval_s = interval_s
        self.observations: list[Observation] = []
        self.errors: list[str] = []
        self._client = grpcclient.InferenceServerClient(url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="config-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                config = self._client.get_model_config(self.model, as_json=True, client_timeout=10)["config"]
            except Exception as exc:  # noqa: BLE001 - recorded, the test decides
                self.errors.append(repr(exc))
            else:
                state = read_state(config)
                self.observations.append(Observation(time.monotonic(), state.instances, dict(state.parameters)))
            self._stop.wait(self.interval_s)

    def latest(self) -> Observation | None:
        return self.observations[-1] if self.observations else None

    def since(self, at_s: float) -> list[Observation]:
        return [o for o in self.observations if o.at_s >= at_s]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        self._client.close()


class LoadWorkers:
    """N threads, each with its own gRPC client, infer in a closed loop while their index is
    below `level`. Every outcome is counted; nothing is retried."""

    def __init__(self, url: str, model: str, inputs: Callable[[], list[grpcclient.InferInput]],
                 workers: int, output: str) -> None:
        self.level = 0
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, url, model, inputs, output),
                                          name=f"load-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def _run(self, index: int, url: str, model: str, inputs: Callable[[], list[grpcclient.InferInput]],
             output: str) -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            while not self._stop.is_set():
                if index >= self.level:
                    self._stop.wait(0.02)
                    continue
                try:
                    result = client.infer(model, inputs(), client_timeout=60)
                    assert result.as_numpy(output) is not None
                except Exception as exc:  # noqa: BLE001 - a failure is what the test counts
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    with self._lock:
                        self.ok += 1
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WAIT_S)


def sleep_inputs() -> list[grpcclient.InferInput]:
    data = np.ones(4, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def flags(parameters: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in parameters.items() if k in ("INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION")}


# ------------------------------------------------------------------------------ 1 -> 8 -> 1


@pytest.mark.timeout(300)
def test_concurrency_1_8_1_scales_up_with_multi_flags_and_back_to_single_without_a_failure(
        triton_factory: Callable[..., EmbeddedTriton], serve_factory: Callable[..., Any], tmp_path: Path) -> None:
    triton = triton_factory(load_models=["sleep"])
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(SLEEP_POLICY)
    serve = serve_factory(triton.grpc_url, "--policy", str(policy_path))
    watcher = ConfigWatcher(triton.grpc_url, "sleep")
    load = LoadWorkers(serve.url, "sleep", sleep_inputs, workers=8, output="OUTPUT0")
    try:
        # config.pbtxt has no flags: the controller first gives the model its single profile.
        wait_until(lambda: (o := watcher.latest()) and o.instances == 1 and flags(o.parameters) == {
            "INFERENCE_MODE": "true"}, what="the single profile at start", interval_s=0.1)
        load.level = 1
        wait_until(lambda: load.ok >= 50, what="traffic at concurrency 1", interval_s=0.1)
        time.sleep(2.0)  # let the controller see a steady low load: it must not scale here
        assert watcher.latest().instances == 1, serve.log()

        load.level = 8
        step_up_s = time.monotonic()
        up = wait_until(lambda: next((o for o in watcher.since(step_up_s) if o.instances >= 3), None),
                        timeout_s=20.0, interval_s=0.05, what=">= 3 instances in Triton's config within 20 s")
        reached_s = up.at_s - step_up_s
        # Let the scale-up finish (max 4) so the step down starts from a settled count.
        wait_until(lambda: load.ok > 0 and get_json(serve.metrics_url + "/status")["models"]["sleep"][
            "pending_reload"] is None, what="no reload pending at concurrency 8", interval_s=0.2)
        time.sleep(1.0)
        high = watcher.latest().instances

        load.level = 1
        step_down_s = time.monotonic()
        down = wait_until(lambda: next((o for o in watcher.since(step_down_s) if o.instances == 1), None),
                          # The step down waits for the step up's verdict (settle + window, ~40 s).
                          timeout_s=90.0, interval_s=0.05, what="1 instance again after the step down")
        time.sleep(1.0)  # a little traffic at the new count
        ok_before_stop = load.ok
        verdicts = {dict(labels)["verdict"]: value for (name, labels), value in
                    scrape(serve.metrics_url + "/metrics").items()
                    if name == "tritonpilot_verifications_total" and dict(labels).get("model") == "sleep"}
    finally:
        load.stop()
        watcher.stop()

    log = serve.log()
    assert load.failures == [], (load.failures[:5], log[-4000:])
    assert ok_before_stop > 200
    assert watcher.errors == []
    assert reached_s <= 20.0 and high >= 3
    # 1 -> 4 instances at 8 clients of 20 ms each: the step up was verified and kept.
    assert verdicts.get("improved", 0) >= 1, (verdicts, log[-4000:])
    # Every observation above one instance runs the multi profile; at one, single.
    for o in watcher.observations:
        if o.instances > 1:
            assert flags(o.parameters) == {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "true"}, o
    assert flags(down.parameters) == {"INFERENCE_MODE": "true"}, down
    assert down.parameters["SLEEP_MS"] == "20" and down.parameters["INIT_SLEEP_MS"] == "0"  # kept
    assert max(o.instances for o in watcher.observations) <= 4

    # The sidecar's own account agrees (once it has verified and collected the last reload).
    status = wait_until(lambda: (s := get_json(serve.metrics_url + "/status")["models"]["sleep"])[
        "pending_reload"] is None and s["last_reload"]["instances"] == 1 and s, interval_s=0.2,
        what="the controller to record the reload back to 1")
    assert status["instances"] == 1 and status["profile"] == "single"
    assert status["last_reload"]["ok"] is True and status["last_reload"]["result"] == "ok"
    assert status["last_reload"]["instances"] == 1 and status["last_reload"]["profile"] == "single"
    changes = [d for d in status["decisions"] if d["action"] in ("scale_up", "panic_up", "scale_down")]
    ups = [d for d in changes if d["action"] in ("scale_up", "panic_up")]
    downs = [d for d in changes if d["action"] == "scale_down"]
    assert ups and ups[0]["current_instances"] == 1 and ups[0]["decided_instances"] >= 3
    assert ups[0]["profile"] == "multi" and ups[0]["reason"] in ("panic", "step", "inflight-above-target")
    assert downs and downs[-1]["decided_instances"] == 1 and downs[-1]["reason"] == "inflight-below-target"
    assert downs[-1]["numbers"]["inflight_mean"] < 2
    metrics = scrape(serve.metrics_url + "/metrics")
    reloads_ok = metrics[("tritonpilot_reloads_total", (("model", "sleep"), ("result", "ok")))]
    assert reloads_ok >= 3  # the single profile, up, down
    assert ("tritonpilot_reloads_total", (("model", "sleep"), ("result", "failed"))) not in metrics
    assert metrics[("tritonpilot_reload_duration_seconds_count", (("model", "sleep"),))] == reloads_ok
    assert metrics[("tritonpilot_model_instances", (("model", "sleep"),))] == 1
    assert metrics[("tritonpilot_model_profile", (("model", "sleep"), ("profile", "single")))] == 1
    assert metrics[("tritonpilot_model_profile", (("model", "sleep"), ("profile", "multi")))] == 0
    # One log event per change, with its reason.
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    decided = [e for e in events if e.get("event") == "controller.decision"]
    assert len(decided) == reloads_ok and all(e["submitted"] for e in decided)
    assert any(e["instances"].startswith("1 -> ") and e["profile"] == "single -> multi" for e in decided)


# ------------------------------------------------------------------------------ a flag Triton rejects


class ControlledSidecar:
    """A Sidecar with a given controller factory, on its own uvloop thread, on free ports."""

    def __init__(self, config: SidecarConfig, factory: Any) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sidecar", daemon=True)
        self.thread.start()

        async def start() -> Sidecar:
            sidecar = Sidecar(config, factory)
            await sidecar.start()
            return sidecar

        self.sidecar: Sidecar = self.call(start())
        self.url = f"127.0.0.1:{self.sidecar.port}"
        self.metrics_url = f"http://127.0.0.1:{self.sidecar.metrics.port}"

    def call(self, coro: Any, timeout_s: float = WAIT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        try:
            self.call(self.sidecar.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT_S)


@pytest.fixture
def runner_model(tmp_path: Path) -> Path:
    """A model repository with `lin`: a scripted Linear(4 -> 3) served by the TorchScript runner,
    whose config.pbtxt sets no PyTorch flags."""
    torch = pytest.importorskip("torch")
    from tritonpilot.tools.runner import TensorSpec, write_model_dir

    pt = tmp_path / "lin.pt"
    torch.manual_seed(0)
    torch.jit.script(torch.nn.Linear(4, 3)).save(str(pt))
    repository = tmp_path / "repo"
    write_model_dir(repository, "lin", pt, [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (3,))])
    return repository


def lin_inputs() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("x", [4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return [tensor]


BAD_PROFILE = {"INFERENCE_MODE": "yes"}  # Triton: "failed to convert 'yes' to boolean"


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_flag_value_triton_rejects_keeps_the_model_serving_and_the_controller_reporting(
        triton_factory: Callable[..., EmbeddedTriton], runner_model: Path) -> None:
    # The policy file would refuse this profile: build the resolved policy directly.
    with pytest.raises(PolicyError, match="INFERENCE_MODE: got 'yes'"):
        parse_policy({"models": {"lin": {"profiles": [
            {"name": "bad", "instances": [1, None], "parameters": BAD_PROFILE}]}}})
    policy = ResolvedModelPolicy(
        model="lin", min_instances=1, max_instances=2, target_inflight_per_instance=1.0, tolerance_ratio=0.25,
        scale_up_delay_s=2.0, scale_down_delay_s=60.0, panic_threshold_ratio=2.0, panic_window_s=1.0,
        max_step=4, cooldown_s=2.0, gpu_utilization_ceiling_ratio=0.95, gpu_memory_headroom_ratio=0.1,
        gpu_memory_headroom_bytes=0, reload_strategy="full", failed_config_backoff_s=300.0, max_signal_age_s=5.0,
        profiles=(Profile.model_construct(name="bad", instances=(1, None), parameters=BAD_PROFILE),),
    )
    triton = triton_factory(runner_model, load_models=["lin"])
    def factory(stats: Any, gpu: Any, registry: Any) -> Controller:
        client = TritonClient(triton.grpc_url, rpc_timeout_s=5.0)
        return Controller({"lin": policy}, LiveSources(stats, gpu, client), Actuator(client, timeout_s=60.0),
                          interval_s=0.5, registry=registry)

    sidecar = ControlledSidecar(SidecarConfig(triton=triton.grpc_url, listen="127.0.0.1:0", http_listen="off",
                                              metrics_listen="127.0.0.1:0", grace_period_s=5.0), factory)
    load = LoadWorkers(sidecar.url, "lin", lin_inputs, workers=1, output="y")
    load.level = 1
    try:
        failed = ("tritonpilot_reloads_total", (("model", "lin"), ("result", "failed")))
        wait_until(lambda: scrape(sidecar.metrics_url + "/metrics").get(failed), timeout_s=90.0, interval_s=0.25,
                   what="the controller to report the refused reload")
        status = get_json(sidecar.metrics_url + "/status")["models"]["lin"]
        ok_at_failure = load.ok
        decisions_before = _decisions_total(sidecar.metrics_url)
        # The controller keeps deciding: a cooldown as long as the failed load took, then it
        # still wants that profile but will not send it again during the backoff.
        later = wait_until(lambda: (s := get_json(sidecar.metrics_url + "/status")["models"]["lin"])[
            "decisions"][-1]["reason"] == "failed-config-backoff" and s, interval_s=0.25,
            what="a decision blocked by the failed config's backoff")
        assert _decisions_total(sidecar.metrics_url) >= decisions_before + 4
        wait_until(lambda: load.ok >= ok_at_failure + 20, what="inference to go on after the failure")
        metrics = scrape(sidecar.metrics_url + "/metrics")
        ready = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            live = read_state(ready.get_model_config("lin", as_json=True)["config"])
            assert ready.is_model_ready("lin")
        finally:
            ready.close()
    finally:
        load.stop()
        sidecar.stop()
        triton.stop(timeout_s=3.0)  # a failed load leaves a stub Triton would wait for

    assert load.failures == [], load.failures[:5]
    assert ok_at_failure > 0 and load.ok >= ok_at_failure + 20
    last = status["last_reload"]
    assert (last["ok"], last["result"], last["instances"], last["profile"]) == (False, "failed", 1, "bad")
    assert "failed to convert 'yes' to boolean" in last["error"] and "load failed for model 'lin'" in last["error"]
    assert status["pending_reload"] is None
    assert later["decisions"][-1]["action"] == "blocked"
    assert later["decisions"][-1]["numbers"]["last_reload_ok"] == 0
    assert later["decisions"][-1]["numbers"]["wanted"] == "profile-mismatch"
    assert metrics[failed] == 1  # not retried during the backoff
    assert ("tritonpilot_reloads_total", (("model", "lin"), ("result", "ok"))) not in metrics
    # Triton kept the config it had: no flag, one instance.
    assert live.instances == 1 and "INFERENCE_MODE" not in live.parameters


def _decisions_total(metrics_url: str) -> float:
    return sum(v for (name, labels), v in scrape(metrics_url + "/metrics").items()
               if name == "tritonpilot_decisions_total" and ("model", "lin") in labels)


# ------------------------------------------------------------------------------ --no-proxy


@pytest.mark.timeout(180)
def test_no_proxy_scales_up_on_load_sent_straight_to_triton(
        triton_factory: Callable[..., EmbeddedTriton], serve_factory: Callable[..., Any], tmp_path: Path) -> None:
    triton = triton_factory(load_models=["sleep"])
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(SLEEP_POLICY)
    serve = serve_factory(triton.grpc_url, "--policy", str(policy_path), "--no-proxy")
    with pytest.raises(ConnectionRefusedError):  # no client listener
        socket.create_connection(("127.0.0.1", serve.port), timeout=2).close()
    watcher = ConfigWatcher(triton.grpc_url, "sleep")
    load = LoadWorkers(triton.grpc_url, "sleep", sleep_inputs, workers=8, output="OUTPUT0")  # not via the proxy
    try:
        # The first reload (the single profile) is a full reload: Triton's counters restart at zero.
        wait_until(lambda: (o := watcher.latest()) and flags(o.parameters) == {"INFERENCE_MODE": "true"},
                   what="the single profile at start", interval_s=0.1)
        load.level = 8
        step_up_s = time.monotonic()
        up = wait_until(lambda: next((o for o in watcher.since(step_up_s) if o.instances >= 2), None),
                        timeout_s=30.0, interval_s=0.05, what=">= 2 instances in Triton's config within 30 s")
        status = wait_until(lambda: (s := get_json(serve.metrics_url + "/status")["models"]["sleep"])[
            "pending_reload"] is None and s["last_reload"]["instances"] >= 2 and s, interval_s=0.2,
            what="the controller to record the scale-up")
    finally:
        load.stop()
        watcher.stop()

    assert load.failures == [], (load.failures[:5], serve.log()[-4000:])
    assert up.at_s - step_up_s <= 30.0
    ups = [d for d in status["decisions"] if d["action"] in ("scale_up", "panic_up")]
    assert ups and ups[0]["current_instances"] == 1 and ups[0]["decided_instances"] >= 2, status["decisions"]
    numbers = ups[0]["numbers"]
    # The proxy saw nothing; Triton's own statistics carried the load (8 clients, one 20 ms instance).
    assert numbers["inflight_mean"] == 0 and numbers["load_source"] == "triton", numbers
    assert numbers["triton_inflight_mean"] == numbers["load_inflight_mean"] > 2, numbers
    assert numbers["queue_ns_per_request"] > 0
    # Without the proxy's count there is no panic: the up delay applied.
    assert ups[0]["reason"] == "inflight-above-target" and numbers["up_for_s"] >= 2
    for entry in status["decisions"]:  # no negative or runaway value through the reloads' resets
        value = entry["numbers"].get("triton_inflight_mean")
        assert value is None or 0 <= value <= 16, entry
    assert status["last_reload"]["result"] == "ok"
