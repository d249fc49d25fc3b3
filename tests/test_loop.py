"""The control loop as a timeline: a fake clock, fake sources, a fake Triton behind the real
actuator. No sleeping, no Triton process: `Controller.tick(now_s)` is driven by hand and
the actuator's reload tasks run on the test's event loop between ticks.

Then the pure override builder (control/overrides.py) the actuator sends to Triton.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tritonpilot.control.actuator import CONFIG_FAILURES, Actuator, ReloadOutcome, ReloadRequest, ReloadResult
from tritonpilot.control.decide import Action, Decision, Reason
from tritonpilot.control.loop import Controller
from tritonpilot.control.overrides import build_override, matches, read_state
from tritonpilot.control.policy import BUILTIN_PROFILES, GENERATION_PARAMETER, ResolvedModelPolicy, VerifyPolicy
from tritonpilot.control.triton import LoadFailed, LoadTimedOut, StatsSample, TritonError, TritonUnavailable
from tritonpilot.proxy.gpu import GpuSample as ProxyGpuSample
from tritonpilot.proxy.gpu import GpuSnapshot
from tritonpilot.proxy.stats import LATENCY_BUCKETS_S, ModelSnapshot, ProxySnapshot

MODEL = "m"
GIB = 1 << 30
SINGLE = {"INFERENCE_MODE": "true"}
MULTI = {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "true"}

POLICY = ResolvedModelPolicy(
    model=MODEL, min_instances=1, max_instances=4, target_inflight_per_instance=1.0, tolerance_ratio=0.25,
    scale_up_delay_s=5.0, scale_down_delay_s=30.0, panic_threshold_ratio=2.0, panic_window_s=1.0,
    max_step=4, cooldown_s=10.0, gpu_utilization_ceiling_ratio=0.95, gpu_memory_headroom_ratio=0.1,
    gpu_memory_headroom_bytes=0, profiles=BUILTIN_PROFILES, reload_strategy="full",
    failed_config_backoff_s=300.0, max_signal_age_s=5.0,
    # FakeTriton's throughput does not follow the instance count, so every scale-up would be
    # "no-gain" and reverted; tests/test_verify.py drives verification with one whose does.
    verify=VerifyPolicy(enabled=False),
)


def model_config(instances: int = 1, parameters: Mapping[str, str] | None = None,
                 kind: str = "KIND_CPU") -> dict[str, Any]:
    """A ModelConfig in the JSON form Triton's ModelConfig RPC returns (as_json=True)."""
    params = {"SLEEP_MS": "20", **(SINGLE if parameters is None else parameters)}
    return {
        "name": MODEL, "backend": "python", "max_batch_size": 0,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": ["-1"]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": ["-1"]}],
        "instance_group": [{"name": f"{MODEL}_0", "kind": kind, "count": instances}],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }


# ------------------------------------------------------------------------------ fakes


class FakeClock:
    def __init__(self, now_s: float = 0.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class FakeTriton:
    """Triton as TritonClient shows it: configs, readiness, loads, statistics.

    - `hold`: when set, loads wait for it (a reload stays pending until the test opens it);
      `gates[model]`: the same for one model's loads;
    - `reject`: config -> Triton's error message for a config it fails to load, or None;
    - `apply_loads`: False: Triton answers every load OK but keeps the old config;
    - `down`: every RPC fails as TritonUnavailable; `stats_error`: statistics fail alone;
    - `request_ns[model]`: the model's cumulative success.ns (tests advance it: Little's law);
    - `compute_ns_per_request`: compute time per completed request (0: none measured, so the
      offered load, arrival rate x service time, is not known and in-flight alone decides).
    """

    def __init__(self, configs: Mapping[str, dict[str, Any]]) -> None:
        self.configs = {name: copy.deepcopy(c) for name, c in configs.items()}
        self.loads: list[tuple[str, dict[str, Any]]] = []
        self.hold: asyncio.Event | None = None
        self.reject: Any = None
        self.down = False
        self.stats_error: TritonError | None = None
        self.load_error: TritonError | None = None
        self.success_count = 0
        self.gates: dict[str, asyncio.Event] = {}
        self.apply_loads = True
        self.request_ns: dict[str, int] = {}
        self.compute_ns_per_request = 0

    def _check_up(self, what: str) -> None:
        if self.down:
            raise TritonUnavailable(f"{what}: failed to connect to all addresses")

    async def get_config(self, model: str) -> dict[str, Any]:
        self._check_up(f"reading the config of {model!r}")
        if model not in self.configs:
            raise TritonError(f"reading the config of {model!r}: Request for unknown model (StatusCode.NOT_FOUND)")
        return copy.deepcopy(self.configs[model])

    async def is_model_ready(self, model: str) -> bool:
        self._check_up("ready")
        return model in self.configs

    async def load(self, model: str, config: dict[str, Any], timeout_s: float) -> None:
        self._check_up(f"loading {model!r}")
        self.loads.append((model, copy.deepcopy(config)))
        if self.hold is not None:
            await self.hold.wait()
        if model in self.gates:
            await self.gates[model].wait()
        if self.load_error is not None:
            raise self.load_error
        error = self.reject(config) if self.reject is not None else None
        if error:
            raise LoadFailed(error)  # the old config keeps serving, as in Triton
        if self.apply_loads:
            self.configs[model] = copy.deepcopy(config)

    async def statistics(self, model: str) -> StatsSample | None:
        self._check_up(f"reading statistics of {model!r}")
        if self.stats_error is not None:
            raise self.stats_error
        self.success_count += 10
        return StatsSample(inference_count=self.success_count, execution_count=self.success_count,
                           success_count=self.success_count, fail_count=0, queue_ns=self.success_count * 1000,
                           compute_infer_ns=self.success_count * self.compute_ns_per_request, last_inference_ms=0,
                           success_ns=self.request_ns.get(model, 0))


class FakeSources:
    """The proxy's counters for a load the test sets (`inflight[model]`: the mean in flight over
    the interval that ends at the next snapshot), a GPU reading, and Triton through FakeTriton."""

    def __init__(self, triton: FakeTriton) -> None:
        self.triton = triton
        self.inflight: dict[str, float] = {}
        self.gpu_snapshot: GpuSnapshot | None = None
        self.snapshot_error: Exception | None = None
        self._seconds: dict[str, float] = {}
        self._started: dict[str, int] = {}
        self._last_s: float | None = None
        # Requests started per second: by default in-flight / 20 ms (an open loop, no queue).
        self.arrival_per_s: Callable[[str], float] | None = None

    def proxy_snapshot(self, now_s: float) -> ProxySnapshot:
        if self.snapshot_error is not None:
            raise self.snapshot_error
        dt = now_s - self._last_s if self._last_s is not None else 0.0
        self._last_s = now_s
        models = {}
        for name, level in self.inflight.items():
            self._seconds[name] = self._seconds.get(name, 0.0) + level * dt
            rate = self.arrival_per_s(name) if self.arrival_per_s is not None else level * 50  # 20 ms requests
            self._started[name] = self._started.get(name, 0) + round(rate * dt)
            started = self._started[name]
            models[name] = ModelSnapshot(
                model=name, inflight=round(level), inflight_peak=round(level + 0.5),
                inflight_seconds=self._seconds[name], started_total=started, finished_total={"OK": started},
                latency_bucket_counts=(0,) * 5 + (started,) * (len(LATENCY_BUCKETS_S) - 4),
                latency_sum_s=started * 0.02, latency_count=started)
        return ProxySnapshot(now_s=now_s, models=models)

    def proxy_started(self, now_s: float) -> dict[str, int]:
        """Requests started so far (the loop's mark late in each interval)."""
        dt = now_s - self._last_s if self._last_s is not None else 0.0
        return {name: self._started.get(name, 0) + round(
                    (self.arrival_per_s(name) if self.arrival_per_s is not None else level * 50) * dt)
                for name, level in self.inflight.items()}

    def gpu(self) -> GpuSnapshot:
        if self.gpu_snapshot is not None:
            return self.gpu_snapshot
        return GpuSnapshot(now_s=self._last_s or 0.0, gpus=None, source="none", reason="no GPU here")

    async def live_config(self, model: str) -> Mapping[str, Any] | None:
        return await self.triton.get_config(model)

    async def triton_stats(self, model: str) -> StatsSample | None:
        return await self.triton.statistics(model)


class RecordingApplier:
    """An applier that only records what it is asked (for dry_run)."""

    def __init__(self) -> None:
        self.submitted: list[ReloadRequest] = []
        self.pending_asked = 0

    def pending(self, model: str) -> ReloadRequest | None:
        self.pending_asked += 1
        return None

    def submit(self, request: ReloadRequest) -> bool:
        self.submitted.append(request)
        return True

    def collect(self) -> list[ReloadResult]:
        return []

    async def close(self) -> None:
        pass


@dataclass
class Loop:
    """One controller over one model, the real actuator, a fake Triton and a fake clock.
    `expect(at=, inflight=, instances=)` ticks every interval up to `at` at that load and
    checks the count Triton's own config shows afterwards."""

    policy: ResolvedModelPolicy = POLICY
    config: dict[str, Any] = field(default_factory=model_config)
    dry_run: bool = False
    interval_s: float = 1.0
    applier: Any = None

    def __post_init__(self) -> None:
        self.clock = FakeClock()
        self.triton = FakeTriton({MODEL: self.config})
        self.sources = FakeSources(self.triton)
        self.actuator = Actuator(self.triton, timeout_s=60.0,  # type: ignore[arg-type]
                                 failed_config_backoff_s=self.policy.failed_config_backoff_s, clock=self.clock)
        self.registry = CollectorRegistry()
        self.controller = Controller({MODEL: self.policy}, self.sources, self.applier or self.actuator,
                                     interval_s=self.interval_s, dry_run=self.dry_run, registry=self.registry,
                                     clock=self.clock)
        self.decisions: list[Decision] = []

    @property
    def now_s(self) -> float:
        return self.clock.now_s

    async def tick(self, inflight: float) -> Decision:
        self.sources.inflight[MODEL] = inflight
        (decision,) = await self.controller.tick(self.clock.now_s)
        self.decisions.append(decision)
        await settle()  # reload tasks that can finish now do (collected at the next tick)
        return decision

    async def run(self, until: float, inflight: float) -> Decision:
        decision = None
        while self.clock.now_s <= until + 1e-9:
            decision = await self.tick(inflight)
            self.clock.now_s += self.interval_s
        assert decision is not None, f"no tick left before {until}"
        return decision

    async def expect(self, at: float, inflight: float, instances: int, action: Action | None = None,
                     reason: Reason | None = None) -> Decision:
        decision = await self.run(at, inflight)
        assert self.live_instances() == instances, (at, decision)
        if action is not None:
            assert decision.action is action, (at, decision)
        if reason is not None:
            assert decision.reason is reason, (at, decision)
        return decision

    def live_instances(self) -> int:
        return read_state(self.triton.configs[MODEL]).instances

    def live_parameters(self) -> dict[str, str]:
        return dict(read_state(self.triton.configs[MODEL]).parameters)

    def changes(self) -> list[Decision]:
        return [d for d in self.decisions if d.changes]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(self.registry).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))


async def settle(rounds: int = 20) -> None:
    """Let tasks on this loop run until they wait on something the test controls."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def scenario(coro_fn: Any) -> Any:
    """Run an async test body on a fresh event loop (no pytest-asyncio needed)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(coro_fn(*args, **kwargs))
    wrapper.__name__ = coro_fn.__name__
    wrapper.__doc__ = coro_fn.__doc__
    return wrapper


def policy(**overrides: Any) -> ResolvedModelPolicy:
    return replace(POLICY, **overrides)


def events(logs: Iterable[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# ------------------------------------------------------------------------------ timelines


@scenario
async def test_scale_up_only_after_the_load_lasts_the_up_delay() -> None:
    loop = Loop()
    # 1.6 in flight on 1 instance: above 1 x 1.25, below the panic line of 2.
    d = await loop.expect(at=0, inflight=1.6, instances=1, action=Action.HOLD, reason=Reason.NO_DATA)
    assert d.numbers["missing"] == "inflight"  # the first snapshot has nothing to compare with
    await loop.expect(at=5, inflight=1.6, instances=1, action=Action.HOLD, reason=Reason.WAITING_UP_DELAY)
    assert loop.triton.loads == []
    d = await loop.expect(at=6, inflight=1.6, instances=2, action=Action.SCALE_UP,
                          reason=Reason.INFLIGHT_ABOVE_TARGET)  # excess seen since 1, for 5 s at 6
    assert d.numbers["up_for_s"] == 5.0 and d.decided_instances == 2 and d.profile.name == "multi"
    # One load: the whole config, count and flags together, the generation bumped (a full reload).
    ((model, sent),) = loop.triton.loads
    assert model == MODEL and read_state(sent).instances == 2
    assert read_state(sent).parameters == {"SLEEP_MS": "20", **MULTI, GENERATION_PARAMETER: "1"}
    await loop.expect(at=30, inflight=1.6, instances=2, reason=Reason.WITHIN_BAND)
    assert len(loop.changes()) == 1


@scenario
async def test_load_then_quiet_goes_up_with_the_multi_profile_and_back_to_single() -> None:
    loop = Loop()
    # 8 >= 2 x 1 in flight since the first sample (1), for panic_window_s = 1 at 2.
    await loop.expect(at=2, inflight=8.0, instances=4, action=Action.PANIC_UP)
    assert loop.live_parameters() == {"SLEEP_MS": "20", **MULTI, GENERATION_PARAMETER: "1"}
    await loop.expect(at=20, inflight=8.0, instances=4, reason=Reason.AT_MAX)
    await loop.expect(at=50, inflight=1.0, instances=4, reason=Reason.WAITING_DOWN_DELAY)
    await loop.expect(at=51, inflight=1.0, instances=1, action=Action.SCALE_DOWN)  # 30 s after 21
    assert loop.live_parameters() == {"SLEEP_MS": "20", **SINGLE, GENERATION_PARAMETER: "2"}
    assert [(d.current_instances, d.decided_instances, d.profile.name) for d in loop.changes()] == [
        (1, 4, "multi"), (4, 1, "single")]


@scenario
async def test_a_bare_config_is_reprofiled_once_and_other_parameters_are_kept() -> None:
    loop = Loop(config=model_config(1, parameters={}))
    d = await loop.expect(at=1, inflight=0.5, instances=1, action=Action.REPROFILE,
                          reason=Reason.PROFILE_MISMATCH)
    assert d.current_profile is None and d.profile.name == "single"
    await loop.expect(at=60, inflight=0.5, instances=1, reason=Reason.WITHIN_BAND)
    assert loop.live_parameters() == {"SLEEP_MS": "20", **SINGLE, GENERATION_PARAMETER: "1"}
    assert len(loop.triton.loads) == 1


# ------------------------------------------------------------------------------ logs


@scenario
async def test_each_changing_decision_is_one_info_event_with_its_reason_and_numbers() -> None:
    loop = Loop()
    with capture_logs() as logs:
        await loop.run(until=30, inflight=1.6)
    (event,) = events(logs, "controller.decision")
    assert event["log_level"] == "info"
    assert (event["model"], event["action"], event["reason"]) == (MODEL, "scale_up", "inflight-above-target")
    assert (event["instances"], event["profile"]) == ("1 -> 2", "single -> multi")
    assert (event["strategy"], event["dry_run"], event["submitted"]) == ("full", False, True)
    # The numbers behind it: the load, the thresholds, how long the excess lasted.
    assert event["inflight_mean"] == 1.6 and event["ideal_instances"] == 1.6
    assert event["scale_up_above_inflight"] == 1.25 and event["up_for_s"] == 5.0
    (reload,) = events(logs, "controller.reload")
    assert (reload["log_level"], reload["result"], reload["instances"], reload["profile"]) == (
        "info", "ok", 2, "multi")
    # Everything else that tick said was a hold, at DEBUG.
    holds = events(logs, "controller.hold")
    assert len(holds) == 30 and {e["log_level"] for e in holds} == {"debug"}
    assert not [e for e in logs if e["log_level"] == "info" and e["event"] not in (
        "controller.decision", "controller.reload")]


# ------------------------------------------------------------------------------ dry run


@scenario
async def test_dry_run_decides_and_logs_but_never_submits() -> None:
    applier = RecordingApplier()
    loop = Loop(dry_run=True, applier=applier)
    with capture_logs() as logs:
        await loop.run(until=40, inflight=8.0)
    assert applier.submitted == [] and loop.triton.loads == []
    assert loop.live_instances() == 1
    # Nothing changed, so after each cooldown it decides the same again, and says so.
    ups = [d for d in loop.changes() if d.action is Action.PANIC_UP]
    assert [d.now_s for d in ups] == [2.0, 12.0, 22.0, 32.0]
    decisions = events(logs, "controller.decision")
    assert len(decisions) == 4 and all(e["dry_run"] is True and "submitted" not in e for e in decisions)
    assert decisions[0]["instances"] == "1 -> 4" and decisions[0]["reason"] == "panic"
    assert loop.metric("tritonpilot_decisions_total", model=MODEL, action="panic_up", reason="panic") == 4
    status = loop.controller.status()
    assert status["dry_run"] is True and status["models"][MODEL]["pending_reload"] is None
    assert status["models"][MODEL]["decisions"][-1]["action"] in ("blocked", "panic_up")


# ------------------------------------------------------------------------------ pending reloads


@scenario
async def test_a_pending_reload_blocks_further_changes_until_it_finishes() -> None:
    loop = Loop(policy=policy(max_step=1))
    loop.triton.hold = asyncio.Event()
    await loop.expect(at=2, inflight=8.0, instances=1, action=Action.PANIC_UP)  # to 2: max_step 1
    status = loop.controller.status()["models"][MODEL]
    assert status["pending_reload"] == {"instances": 2, "profile": "multi", "strategy": "full"}
    # Triton takes its time: the load stays wanted, but nothing else is sent meanwhile.
    d = await loop.expect(at=30, inflight=8.0, instances=1, action=Action.BLOCKED, reason=Reason.RELOAD_PENDING)
    assert d.numbers["wanted"] == "panic" and d.numbers["wanted_instances"] == 4  # before max_step
    assert len(loop.triton.loads) == 1
    assert {d.reason for d in loop.decisions[3:]} == {Reason.RELOAD_PENDING}
    loop.triton.hold.set()  # at 31
    await settle()
    # Collected at the next tick (31): it took 29 s, so the cooldown is 29 s, not 10.
    await loop.expect(at=31, inflight=8.0, instances=2, action=Action.BLOCKED, reason=Reason.COOLDOWN)
    assert loop.controller.status()["models"][MODEL]["pending_reload"] is None
    assert loop.controller.status()["models"][MODEL]["last_reload"]["duration_s"] == 29.0
    await loop.expect(at=59, inflight=8.0, instances=2, reason=Reason.COOLDOWN)
    await loop.expect(at=60, inflight=8.0, instances=3, action=Action.PANIC_UP)


# ------------------------------------------------------------------------------ failures


TRITONS_MESSAGE = ("load failed for model 'm': version 1 is at UNAVAILABLE state: Invalid argument: "
                   "failed to convert 'yes' to boolean")


def reject_multi(config: Mapping[str, Any]) -> str | None:
    return TRITONS_MESSAGE if "DISABLE_OPTIMIZED_EXECUTION" in config.get("parameters", {}) else None


@scenario
async def test_a_failed_reload_is_recorded_reported_and_not_retried_during_the_backoff() -> None:
    loop = Loop(policy=policy(failed_config_backoff_s=100.0))
    loop.triton.reject = reject_multi
    with capture_logs() as logs:
        await loop.expect(at=6, inflight=1.6, instances=1, action=Action.SCALE_UP)  # 1 -> 2, Triton refuses
        await loop.expect(at=7, inflight=1.6, instances=1)
    assert loop.metric("tritonpilot_reloads_total", model=MODEL, result="failed") == 1
    assert loop.metric("tritonpilot_reloads_total", model=MODEL, result="ok") is None
    assert loop.metric("tritonpilot_reload_duration_seconds_count", model=MODEL) == 1
    (reload,) = events(logs, "controller.reload")
    assert (reload["log_level"], reload["result"], reload["error"]) == ("warning", "failed", TRITONS_MESSAGE)
    last = loop.controller.status()["models"][MODEL]["last_reload"]
    assert (last["ok"], last["result"], last["instances"], last["profile"]) == (False, "failed", 2, "multi")
    assert last["error"] == TRITONS_MESSAGE and last["finished_s"] == 7.0
    # The same count and flags are not sent again during the backoff: the loop says why.
    d = await loop.expect(at=100, inflight=1.6, instances=1, action=Action.BLOCKED,
                          reason=Reason.FAILED_CONFIG_BACKOFF)
    assert d.numbers["wanted_instances"] == 2 and d.numbers["last_reload_ok"] == 0
    assert len(loop.triton.loads) == 1
    # After it, one more try (Triton still refuses), then quiet again.
    await loop.expect(at=120, inflight=1.6, instances=1, reason=Reason.FAILED_CONFIG_BACKOFF)
    assert len(loop.triton.loads) == 2
    assert loop.metric("tritonpilot_reloads_total", model=MODEL, result="failed") == 2
    # Triton's old config kept serving throughout.
    assert loop.live_parameters() == {"SLEEP_MS": "20", **SINGLE}


@scenario
async def test_a_decision_the_actuator_refuses_is_logged_at_debug_not_info() -> None:
    loop = Loop()
    loop.triton.reject = lambda config: TRITONS_MESSAGE  # Triton fails every load
    await loop.expect(at=6, inflight=1.6, instances=1, action=Action.SCALE_UP)  # to 2: fails
    await loop.expect(at=17, inflight=8.0, instances=1, action=Action.PANIC_UP)  # to 4: fails
    # decide remembers only the last failure (4), so it asks for 2 again; the actuator
    # still backs off from 2 and refuses: nothing changed, nothing worth INFO.
    with capture_logs() as logs:
        await loop.expect(at=28, inflight=1.6, instances=1, action=Action.SCALE_UP)
    (event,) = events(logs, "controller.decision")
    assert (event["log_level"], event["submitted"], event["instances"]) == ("debug", False, "1 -> 2")
    assert [read_state(c).instances for _, c in loop.triton.loads] == [2, 4]


@scenario
async def test_a_reload_that_found_triton_unavailable_is_retried_after_the_cooldown_not_backed_off() -> None:
    loop = Loop()
    loop.triton.load_error = TritonUnavailable("loading 'm': Socket closed")
    await loop.expect(at=2, inflight=8.0, instances=1, action=Action.PANIC_UP)
    loop.triton.load_error = None  # Triton is back
    await loop.expect(at=3, inflight=8.0, instances=1, action=Action.BLOCKED, reason=Reason.COOLDOWN)
    last = loop.controller.status()["models"][MODEL]["last_reload"]
    assert (last["ok"], last["result"], last["error"]) == (False, "unavailable", "loading 'm': Socket closed")
    assert loop.metric("tritonpilot_reloads_total", model=MODEL, result="unavailable") == 1
    # Nothing was wrong with the config: the same one goes again once the cooldown is over.
    await loop.expect(at=12, inflight=8.0, instances=4, action=Action.PANIC_UP)  # 2 + cooldown_s
    assert [read_state(c).instances for _, c in loop.triton.loads] == [4, 4]


@scenario
async def test_triton_errors_hold_with_no_data_and_the_loop_keeps_going() -> None:
    loop = Loop()
    await loop.expect(at=3, inflight=1.0, instances=1, reason=Reason.WITHIN_BAND)
    loop.triton.down = True
    with capture_logs() as logs:
        d = await loop.expect(at=20, inflight=8.0, instances=1, action=Action.HOLD, reason=Reason.NO_DATA)
    assert d.numbers["missing"] == "config" and d.current_instances is None
    assert loop.triton.loads == []  # no guess at the count, so no change
    # The lost config is logged once, not every tick.
    (lost,) = events(logs, "controller.model_config")
    assert lost["log_level"] == "warning" and "failed to connect" in lost["error"]
    status = loop.controller.status()["models"][MODEL]
    assert status["instances"] is None and "failed to connect" in status["config_error"]
    assert status["decisions"][-1]["reason"] == "no-data"
    loop.triton.down = False
    with capture_logs() as logs:
        await loop.expect(at=21, inflight=8.0, instances=1, reason=Reason.WAITING_UP_DELAY)
        await loop.expect(at=22, inflight=8.0, instances=4, action=Action.PANIC_UP)
    assert events(logs, "controller.model_config")[0]["error"] is None
    assert loop.controller.status()["models"][MODEL]["config_error"] is None


@scenario
async def test_statistics_errors_alone_still_let_it_decide() -> None:
    loop = Loop()
    loop.triton.compute_ns_per_request = 20_000_000
    loop.triton.stats_error = TritonError("reading statistics of 'm': boom (StatusCode.INTERNAL)")
    d = await loop.expect(at=6, inflight=1.6, instances=2, action=Action.SCALE_UP)
    assert "success_count" not in d.numbers
    loop.triton.stats_error = None
    d = await loop.run(until=8, inflight=1.6)
    assert d.numbers["success_count"] == 10 and d.numbers["compute_infer_ns_per_request"] == 20_000_000


@scenario
async def test_a_model_triton_does_not_know_is_no_data_and_the_others_go_on() -> None:
    clock = FakeClock()
    triton = FakeTriton({MODEL: model_config()})
    sources = FakeSources(triton)
    sources.inflight.update({MODEL: 8.0, "absent": 8.0})
    controller = Controller({"absent": policy(model="absent"), MODEL: POLICY}, sources,
                            Actuator(triton, clock=clock), clock=clock)  # type: ignore[arg-type]
    for _ in range(3):
        absent, present = await controller.tick(clock.now_s)
        await settle()
        clock.now_s += 1
    assert (absent.action, absent.reason) == (Action.HOLD, Reason.NO_DATA)
    assert "unknown model" in controller.status()["models"]["absent"]["config_error"]
    assert present.action is Action.PANIC_UP and read_state(triton.configs[MODEL]).instances == 4


@scenario
async def test_a_tick_reads_every_models_config_and_statistics_at_once() -> None:
    """Each read waits until all four are in flight: one after another, the tick would hang."""
    clock = FakeClock()
    triton = FakeTriton({MODEL: model_config(), "other": model_config()})
    sources = FakeSources(triton)
    in_flight: list[str] = []
    all_in = asyncio.Event()

    def concurrently(read: Any) -> Any:
        async def wrapped(model: str) -> Any:
            in_flight.append(model)
            if len(in_flight) == 4:
                all_in.set()
            await all_in.wait()
            return await read(model)
        return wrapped

    sources.live_config = concurrently(sources.live_config)  # type: ignore[method-assign]
    sources.triton_stats = concurrently(sources.triton_stats)  # type: ignore[method-assign]
    controller = Controller({MODEL: POLICY, "other": policy(model="other")}, sources,
                            Actuator(triton, clock=clock), clock=clock)  # type: ignore[arg-type]
    decisions = await asyncio.wait_for(controller.tick(clock.now_s), timeout=5.0)
    assert [d.current_instances for d in decisions] == [1, 1]
    assert sorted(in_flight) == [MODEL, MODEL, "other", "other"]


@scenario
async def test_run_survives_a_failing_tick_and_paces_itself_by_the_interval() -> None:
    clock = FakeClock()
    triton = FakeTriton({MODEL: model_config()})
    sources = FakeSources(triton)
    sources.inflight[MODEL] = 1.0
    slept: list[float] = []

    class Stop(Exception):
        pass

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now_s += seconds
        # Two sleeps an interval: to the arrivals' mark late in it, then to its end.
        sources.snapshot_error = RuntimeError("a bug in a source") if len(slept) in (4, 5) else None
        if len(slept) == 12:
            raise Stop

    registry = CollectorRegistry()
    controller = Controller({MODEL: POLICY}, sources, Actuator(triton, clock=clock), interval_s=0.5,  # type: ignore[arg-type]
                            registry=registry, clock=clock, sleep=fake_sleep)
    with capture_logs() as logs, pytest.raises(Stop):
        await controller.run()
    assert slept == [0.375, 0.125] * 6
    (failed,) = events(logs, "controller.tick_failed")
    assert failed["log_level"] == "error"
    # Six ticks, one failed before deciding: five decisions (the first is no-data).
    decided = sum(s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
                  if f.name == "tritonpilot_decisions" for s in f.samples if s.name.endswith("_total"))
    assert decided == 5


@scenario
async def test_the_arrivals_marked_late_in_the_interval_give_the_next_tick_its_recent_rate() -> None:
    loop = Loop()
    loop.triton.compute_ns_per_request = 20_000_000
    await loop.tick(0.5)  # 0.5 in flight of 20 ms requests: 25/s
    loop.clock.now_s = 1.0
    await loop.tick(0.5)
    assert "recent_arrival_per_s" in loop.decisions[-1].numbers  # the offered load is measured ...
    assert loop.decisions[-1].numbers["recent_arrival_per_s"] is None  # ... but no mark yet
    loop.clock.now_s = 1.75
    loop.controller.sample_arrivals(1.75)
    loop.clock.now_s = 2.0
    d = await loop.tick(0.5)
    assert d.numbers["offered_arrival_per_s"] == 25.0 and d.numbers["recent_arrival_per_s"] == 24.0  # 6 in 0.25 s
    loop.clock.now_s = 3.0
    d = await loop.tick(0.5)
    assert d.numbers["recent_arrival_per_s"] is None  # a mark from before the previous tick is not used


@scenario
async def test_stopping_the_loop_cancels_a_pending_reload_and_closes_its_sources() -> None:
    clock = FakeClock()
    triton = FakeTriton({MODEL: model_config()})
    triton.hold = asyncio.Event()  # Triton never answers this load
    sources = FakeSources(triton)
    sources.inflight[MODEL] = 8.0
    closed: list[str] = []

    async def close_sources() -> None:
        closed.append("sources")

    sources.close = close_sources  # type: ignore[attr-defined]
    actuator = Actuator(triton, clock=clock)  # type: ignore[arg-type]

    async def fake_sleep(seconds: float) -> None:
        clock.now_s += seconds
        await asyncio.sleep(0)

    controller = Controller({MODEL: POLICY}, sources, actuator, clock=clock, sleep=fake_sleep)
    run = asyncio.create_task(controller.run())
    for _ in range(10_000):
        if actuator.pending(MODEL) is not None:
            break
        await asyncio.sleep(0)
    assert actuator.pending(MODEL) is not None, "the loop never submitted the reload"
    reload_task = actuator._pending[MODEL].task
    run.cancel()  # what the sidecar does at shutdown
    await asyncio.gather(run, return_exceptions=True)
    assert run.cancelled() and reload_task.done() and reload_task.cancelled()
    assert closed == ["sources"]


@scenario
async def test_a_load_without_an_answer_is_verified_for_verify_timeout_s_then_reported_timeout() -> None:
    clock = FakeClock()
    triton = FakeTriton({MODEL: model_config()})
    triton.load_error = LoadTimedOut(f"loading {MODEL!r}: no answer within 60 s")  # and the config never changes
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now_s += seconds
        await asyncio.sleep(0)

    actuator = Actuator(triton, clock=clock, sleep=fake_sleep, verify_timeout_s=30.0)  # type: ignore[arg-type]
    request = ReloadRequest(model=MODEL, instances=2, profile="multi", parameters=MULTI,
                            managed_keys=frozenset(MULTI), strategy="full")
    assert actuator.submit(request)
    results: list[ReloadResult] = []
    for _ in range(10_000):
        results = actuator.collect()
        if results:
            break
        await asyncio.sleep(0)
    (result,) = results
    assert (result.ok, result.result, result.instances_before) == (False, "timeout", 1)
    assert result.error == f"loading {MODEL!r}: no answer within 60 s, and Triton's config or readiness did not " \
                           "show the change 30 s later"
    assert clock.now_s == pytest.approx(30.0) and set(slept) == {0.25}  # polled every 0.25 s of fake time
    assert not actuator.submit(request)  # "timeout" is backed off from like a failed load


# ------------------------------------------------------------------------------ every reload result


async def _one_reload(triton: FakeTriton, *, model: str = MODEL, stop_first: bool = False) -> ReloadResult:
    """One reload through the real actuator on fake time (verify polls take no real time)."""
    clock = FakeClock()

    async def fake_sleep(seconds: float) -> None:
        clock.now_s += seconds
        await asyncio.sleep(0)

    actuator = Actuator(triton, timeout_s=60.0, verify_timeout_s=30.0, clock=clock,  # type: ignore[arg-type]
                        sleep=fake_sleep)
    request = ReloadRequest(model=model, instances=2, profile="multi", parameters=MULTI,
                            managed_keys=frozenset(MULTI), strategy="full")
    assert actuator.submit(request)
    await settle()
    if stop_first:
        await actuator.close()  # what the controller does when the sidecar stops
    for _ in range(10_000):
        results = actuator.collect()
        if results:
            (result,) = results
            # The config itself is backed off from exactly when the result says something about it.
            assert actuator.in_backoff(request, clock.now_s) is (result.result in CONFIG_FAILURES)
            return result
        await asyncio.sleep(0)
    raise AssertionError("the reload never finished")


def _triton_that(setup: Callable[[FakeTriton], None]) -> FakeTriton:
    triton = FakeTriton({MODEL: model_config()})
    setup(triton)
    return triton


def _set(**attributes: Any) -> Callable[[FakeTriton], None]:
    return lambda triton: [setattr(triton, k, v) for k, v in attributes.items()] and None


# Each way a reload can end, the fake Triton behaviour that causes it, and what the error says.
RELOAD_ENDINGS = [
    ("ok", _set(), None, ""),
    ("failed", _set(reject=lambda config: TRITONS_MESSAGE), None, TRITONS_MESSAGE),
    ("failed", _set(), "absent", "Request for unknown model"),  # any other Triton error
    ("timeout", _set(load_error=LoadTimedOut(f"loading {MODEL!r}: no answer within 60 s"), apply_loads=False),
     None, "no answer within 60 s, and Triton's config or readiness did not show the change 30 s later"),
    ("unverified", _set(apply_loads=False), None,
     "Triton answered the load, but its config or readiness did not show the change within 30 s"),
    ("unavailable", _set(down=True), None, "failed to connect to all addresses"),
    ("cancelled", lambda triton: setattr(triton, "hold", asyncio.Event()), None,
     "the controller stopped while the reload was in flight"),
]


@pytest.mark.parametrize(("outcome", "setup", "model", "error"), RELOAD_ENDINGS,
                         ids=[f"{o}-{i}" for i, (o, *_) in enumerate(RELOAD_ENDINGS)])
def test_every_reload_result_is_produced_with_its_error(outcome: str, setup: Any, model: str | None,
                                                        error: str) -> None:
    triton = _triton_that(setup)
    result = asyncio.run(_one_reload(triton, model=model or MODEL, stop_first=outcome == "cancelled"))
    assert (result.result, result.ok) == (outcome, outcome == "ok")
    assert error in result.error and (result.error == "") is (outcome == "ok")
    if outcome == "ok":
        assert read_state(triton.configs[MODEL]).instances == 2 and result.instances_before == 1


def test_the_reload_results_listed_are_the_ones_produced() -> None:
    assert {o for o, *_ in RELOAD_ENDINGS} == set(ReloadOutcome)
    assert CONFIG_FAILURES == {ReloadOutcome.FAILED, ReloadOutcome.TIMEOUT, ReloadOutcome.UNVERIFIED}


@scenario
async def test_a_reload_that_never_shows_is_unverified_counted_and_backed_off_from() -> None:
    loop = Loop(policy=policy(failed_config_backoff_s=100.0))
    loop.triton.apply_loads = False  # Triton says OK, its config stays at one instance
    loop.actuator.verify_timeout_s = 0.0  # one look after the load
    with capture_logs() as logs:
        await loop.expect(at=2, inflight=8.0, instances=1, action=Action.PANIC_UP)  # to 4
        await loop.expect(at=3, inflight=8.0, instances=1, reason=Reason.COOLDOWN)
    assert loop.metric("tritonpilot_reloads_total", model=MODEL, result="unverified") == 1
    (reload,) = events(logs, "controller.reload")
    assert (reload["log_level"], reload["result"]) == ("warning", "unverified")
    assert loop.controller.status()["models"][MODEL]["last_reload"]["result"] == "unverified"
    # 4 instances with the multi profile is backed off from: after the cooldown, 3 is tried.
    d = await loop.expect(at=13, inflight=8.0, instances=1, action=Action.PANIC_UP)
    assert d.decided_instances == 3 and d.numbers["limited_by"] == "failed-config-backoff"
    assert [read_state(c).instances for _, c in loop.triton.loads] == [4, 3]


# ------------------------------------------------------------------------------ the reload budget


@dataclass
class Pod:
    """Several models behind one controller, the real actuator, a fake Triton and a fake clock;
    `load[model]` is each model's in flight, `starts` when each model's reloads were sent."""

    models: tuple[str, ...] = ("a", "b")
    max_concurrent_reloads: int = 1
    max_reloads_per_minute: int | None = 6

    def __post_init__(self) -> None:
        self.clock = FakeClock()
        self.triton = FakeTriton({name: model_config() for name in self.models})
        self.sources = FakeSources(self.triton)
        self.actuator = Actuator(self.triton, clock=self.clock)  # type: ignore[arg-type]
        self.registry = CollectorRegistry()
        self.controller = Controller({name: policy(model=name) for name in self.models}, self.sources,
                                     self.actuator, registry=self.registry, clock=self.clock,
                                     max_concurrent_reloads=self.max_concurrent_reloads,
                                     max_reloads_per_minute=self.max_reloads_per_minute)
        self.load: dict[str, float] = {name: 0.5 for name in self.models}
        self.decisions: list[dict[str, Decision]] = []
        self.starts: list[tuple[str, float]] = []

    async def run(self, until: float) -> dict[str, Decision]:
        while self.clock.now_s <= until + 1e-9:
            self.sources.inflight.update(self.load)
            sent = len(self.triton.loads)
            decisions = dict(zip(self.models, await self.controller.tick(self.clock.now_s)))
            self.decisions.append(decisions)
            await settle()  # the reload tasks started this tick send their loads
            self.starts += [(model, self.clock.now_s) for model, _ in self.triton.loads[sent:]]
            self.clock.now_s += 1.0
        return self.decisions[-1]

    def instances(self, model: str) -> int:
        return read_state(self.triton.configs[model]).instances

    def metric(self, name: str, **labels: str) -> float | None:
        text = generate_latest(self.registry).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text)
                for s in family.samples}.get((name, tuple(sorted(labels.items()))))


@scenario
async def test_two_models_wanting_a_reload_at_once_take_turns() -> None:
    pod = Pod()
    pod.triton.gates["a"] = asyncio.Event()  # a's reload stays in progress until the test opens it
    pod.load.update(a=8.0, b=8.0)
    d = await pod.run(until=2)  # both panic at 2: only a starts
    assert (d["a"].action, d["b"].action, d["b"].reason) == (Action.PANIC_UP, Action.BLOCKED, Reason.RELOAD_BUDGET)
    assert pod.starts == [("a", 2.0)]
    assert d["b"].numbers["wanted"] == "panic" and d["b"].numbers["wanted_instances"] == 4
    assert (d["b"].numbers["reloads_in_progress"], d["b"].numbers["max_concurrent_reloads"]) == (1, 1)
    assert d["b"].numbers["budget_limited_by"] == "max_concurrent_reloads"
    d = await pod.run(until=20)
    assert d["b"].reason is Reason.RELOAD_BUDGET and pod.starts == [("a", 2.0)]
    status = pod.controller.status()
    assert status["reload_budget"]["in_progress"] == 1 and status["reload_budget"]["waiting"] == ["b"]
    held = [e for e in status["models"]["b"]["decisions"] if e["reason"] == "reload-budget"]
    assert held and held[-1]["numbers"]["reloads_in_progress"] == 1
    pod.triton.gates["a"].set()  # a's reload finishes after the tick at 20, collected at 21
    await settle()
    d = await pod.run(until=21)
    assert d["b"].action is Action.PANIC_UP and pod.starts == [("a", 2.0), ("b", 21.0)]
    await pod.run(until=22)
    assert (pod.instances("a"), pod.instances("b")) == (4, 4)
    assert pod.metric("tritonpilot_decisions_total", model="b", action="blocked", reason="reload-budget") == 19
    assert pod.controller.status()["reload_budget"]["waiting"] == []


@scenario
async def test_the_model_that_waited_longest_for_the_budget_goes_next() -> None:
    pod = Pod(models=("a", "b", "c"))
    pod.triton.gates["b"] = asyncio.Event()
    pod.load.update(b=8.0, c=8.0)
    await pod.run(until=5)  # b starts at 2; c waits from 2
    pod.load["a"] = 8.0     # a wants from 7 on: it waits too, but after c
    await pod.run(until=10)
    assert pod.controller.status()["reload_budget"]["waiting"] == ["c", "a"]
    pod.triton.gates["b"].set()
    await settle()
    await pod.run(until=11)
    assert pod.starts == [("b", 2.0), ("c", 11.0)]  # not a, though a comes first in the policy
    await pod.run(until=12)
    assert pod.starts == [("b", 2.0), ("c", 11.0), ("a", 12.0)]


@scenario
async def test_the_reload_rate_cap_holds_over_any_60_s() -> None:
    pod = Pod(models=("a", "b", "c"), max_concurrent_reloads=3, max_reloads_per_minute=2)
    pod.load.update(a=8.0, b=8.0, c=8.0)
    d = await pod.run(until=2)
    assert pod.starts == [("a", 2.0), ("b", 2.0)]
    assert (d["c"].action, d["c"].reason) == (Action.BLOCKED, Reason.RELOAD_BUDGET)
    assert d["c"].numbers["budget_limited_by"] == "max_reloads_per_minute"
    assert (d["c"].numbers["reloads_last_minute"], d["c"].numbers["max_reloads_per_minute"]) == (2, 2)
    assert d["c"].numbers["budget_free_in_s"] == 60.0
    d = await pod.run(until=61)
    assert d["c"].reason is Reason.RELOAD_BUDGET and d["c"].numbers["budget_free_in_s"] == 1.0
    d = await pod.run(until=62)  # the starts at 2 have left the window (62 - 60, 62]
    assert d["c"].action is Action.PANIC_UP and pod.starts[-1] == ("c", 62.0)
    # Now all three change their minds at once: the cap still holds in every window.
    pod.load.update(a=0.2, b=0.2, c=0.2)
    await pod.run(until=300)
    times = [t for _, t in pod.starts]
    assert len(times) == 6 and all(sum(t - 60 < u <= t for u in times) <= 2 for t in times)
    assert all(pod.instances(m) == 1 for m in pod.models)


@scenario
async def test_stopping_with_a_reload_in_flight_reports_it_cancelled() -> None:
    loop = Loop()
    loop.triton.hold = asyncio.Event()
    await loop.expect(at=2, inflight=8.0, instances=1, action=Action.PANIC_UP)
    with capture_logs() as logs:
        await loop.controller.close()
    assert loop.metric("tritonpilot_reloads_total", model=MODEL, result="cancelled") == 1
    (reload,) = events(logs, "controller.reload")
    assert (reload["log_level"], reload["result"], reload["instances"]) == ("warning", "cancelled", 4)
    assert loop.controller.status()["models"][MODEL]["last_reload"]["result"] == "cancelled"


# ------------------------------------------------------------------------------ load inside Triton


@scenario
async def test_load_sent_straight_to_triton_scales_up_from_its_statistics() -> None:
    loop = Loop()
    # The proxy sees nothing; Triton's success.ns grows 3 s per second: 3 requests inside it on average.
    with capture_logs():
        for _ in range(8):
            loop.triton.request_ns[MODEL] = loop.triton.request_ns.get(MODEL, 0) + 3_000_000_000
            await loop.tick(0.0)
            loop.clock.now_s += 1
    ups = loop.changes()
    assert [(d.now_s, d.action, d.decided_instances) for d in ups] == [(6.0, Action.SCALE_UP, 3)]
    d = ups[0]
    assert (d.numbers["load_source"], d.numbers["load_inflight_mean"]) == ("triton", 3.0)
    assert d.numbers["triton_inflight_mean"] == 3.0 and d.numbers["inflight_mean"] == 0.0
    assert loop.live_instances() == 3


# ------------------------------------------------------------------------------ GPU memory


@scenario
async def test_gpu_memory_per_instance_is_learned_from_a_reload() -> None:
    loop = Loop(config=model_config(kind="KIND_GPU"))

    def gpu(used_gib: float) -> GpuSnapshot:
        sample = ProxyGpuSample(index=0, name="H100", utilization_ratio=0.5,
                                memory_used_bytes=int(used_gib * GIB), memory_total_bytes=80 * GIB)
        return GpuSnapshot(now_s=loop.now_s, gpus=(sample,), source="nvml")

    async def until(at: float, used_gib: float) -> None:
        while loop.now_s <= at:
            loop.sources.gpu_snapshot = gpu(used_gib)
            await loop.tick(1.6)
            loop.clock.now_s += 1

    await until(6, 10)  # up at 6 (a full reload), finished at once, collected at 7
    assert loop.live_instances() == 2
    # The old copy (1 instance) still drains beside the new one (2): 8 GiB more, not the 4 added.
    await until(12, 18)
    await until(16, 14)  # gone: one more instance, 4 GiB more; not learned before settle_s (10 s)
    assert loop.controller.status()["models"][MODEL]["memory_per_instance_bytes"] is None
    await until(17, 14)
    status = loop.controller.status()["models"][MODEL]
    assert status["memory_per_instance_bytes"] == 4 * GIB
    d = loop.decisions[-1]
    assert d.numbers["gpu_memory_used_bytes"] == 14 * GIB and d.numbers["memory_per_instance_bytes"] == 4 * GIB


# ------------------------------------------------------------------------------ status and metrics


@scenario
async def test_status_is_plain_json_with_policy_counts_profile_pending_and_decisions() -> None:
    loop = Loop(policy=policy(max_step=1))
    await loop.run(until=2, inflight=8.0)  # a panic up to 2 at 2, finished at once
    loop.triton.hold = asyncio.Event()
    await loop.run(until=13, inflight=8.0)  # collected at 3; the next step (to 3) is pending from 13
    status = json.loads(json.dumps(loop.controller.status()))  # no default=: only JSON types
    assert set(status) == {"dry_run", "interval_s", "models", "reload_budget"}
    assert (status["dry_run"], status["interval_s"]) == (False, 1.0)
    # Pod-wide: the reload to 3 in progress; two started within the last minute (2 and 13).
    assert status["reload_budget"] == {"in_progress": 1, "max_concurrent_reloads": 1, "started_last_minute": 2,
                                       "max_reloads_per_minute": 6, "waiting": []}
    m = status["models"][MODEL]
    assert set(m) == {"policy", "instances", "profile", "config_error", "pending_reload", "last_reload",
                      "memory_per_instance_bytes", "decisions", "verify", "gpus", "leak"}
    assert m["policy"]["max_instances"] == 4 and m["policy"]["target_inflight_per_instance"] == 1.0
    assert m["policy"]["scale_up_delay_s"] == 5.0 and m["policy"]["reload_strategy"] == "full"
    assert m["policy"]["profiles"] == [
        {"name": "single", "instances": [1, 1], "parameters": SINGLE},
        {"name": "multi", "instances": [2, None], "parameters": MULTI}]
    assert (m["instances"], m["profile"]) == (2, "multi")
    assert m["pending_reload"] == {"instances": 3, "profile": "multi", "strategy": "full"}
    assert m["last_reload"] == {"finished_s": 3.0, "duration_s": 0.0, "ok": True, "instances": 2,
                                "profile": "multi", "result": "ok", "error": None}
    changes = [d for d in m["decisions"] if d["action"] == "panic_up"]
    assert [(d["now_s"], d["current_instances"], d["decided_instances"], d["profile"], d["reason"])
            for d in changes] == [(2.0, 1, 2, "multi", "panic"), (13.0, 2, 3, "multi", "panic")]
    assert changes[0]["numbers"]["inflight_mean"] == 8.0 and changes[0]["numbers"]["panic_at_inflight"] == 2.0
    # Holds are kept only when they say something new: no run of identical entries.
    pairs = [(d["action"], d["reason"]) for d in m["decisions"]]
    assert all(a != b or a[0] == "panic_up" for a, b in zip(pairs, pairs[1:]))


@scenario
async def test_metrics_names_and_labels() -> None:
    loop = Loop()
    await loop.run(until=2, inflight=8.0)  # panic up to 4 at 2
    await loop.run(until=3, inflight=8.0)  # collected
    metrics = loop.metrics()
    assert metrics[("tritonpilot_model_instances", (("model", MODEL),))] == 4
    assert metrics[("tritonpilot_model_profile", (("model", MODEL), ("profile", "multi")))] == 1
    assert metrics[("tritonpilot_model_profile", (("model", MODEL), ("profile", "single")))] == 0
    assert metrics[("tritonpilot_reloads_total", (("model", MODEL), ("result", "ok")))] == 1
    assert metrics[("tritonpilot_reload_duration_seconds_count", (("model", MODEL),))] == 1
    assert metrics[("tritonpilot_decisions_total", (("action", "panic_up"), ("model", MODEL),
                                                    ("reason", "panic")))] == 1
    assert metrics[("tritonpilot_decisions_total", (("action", "hold"), ("model", MODEL),
                                                    ("reason", "no-data")))] == 1
    families = {f.name: f.type for f in text_string_to_metric_families(generate_latest(loop.registry).decode())
                if not f.name.endswith("_created")}
    assert families == {"tritonpilot_model_instances": "gauge", "tritonpilot_model_profile": "gauge",
                        "tritonpilot_reloads": "counter", "tritonpilot_reload_duration_seconds": "histogram",
                        "tritonpilot_decisions": "counter", "tritonpilot_verifications": "counter",
                        "tritonpilot_reload_leak_suspected": "gauge"}


def test_two_controllers_in_one_process_do_not_clash() -> None:
    triton = FakeTriton({MODEL: model_config()})
    # Each has a private registry unless given one: on a shared one the second would raise
    # "Duplicated timeseries", and each would export the other's numbers.
    first, second = (Controller({MODEL: POLICY}, FakeSources(triton), RecordingApplier()) for _ in range(2))
    first.metrics.instances.labels(model=MODEL).set(3)
    second.metrics.instances.labels(model=MODEL).set(1)
    assert [s.value for m in first.metrics.instances.collect() for s in m.samples] == [3]
    assert [s.value for m in second.metrics.instances.collect() for s in m.samples] == [1]


# ------------------------------------------------------------------------------ overrides


def test_build_override_changes_the_count_and_keeps_kind_gpus_and_everything_else() -> None:
    live = model_config(1, parameters={"INFERENCE_MODE": "true", "OTHER": "kept"}, kind="KIND_GPU")
    live["instance_group"] = [{"name": "a", "kind": "KIND_GPU", "count": 1, "gpus": [0, 1]},
                              {"name": "b", "kind": "KIND_GPU", "count": 1, "gpus": [2]}]
    live["dynamic_batching"] = {"max_queue_delay_microseconds": "100"}
    before = copy.deepcopy(live)
    out = build_override(live, 3, MULTI, {"INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION"}, generation=None)
    assert live == before  # the live config is not touched
    assert out["instance_group"] == [{"name": "a", "kind": "KIND_GPU", "count": 3, "gpus": [0, 1]},
                                     {"name": "b", "kind": "KIND_GPU", "count": 3, "gpus": [2]}]
    assert out["parameters"] == {"SLEEP_MS": {"string_value": "20"}, "OTHER": {"string_value": "kept"},
                                 "INFERENCE_MODE": {"string_value": "true"},
                                 "DISABLE_OPTIMIZED_EXECUTION": {"string_value": "true"}}
    assert {k: v for k, v in out.items() if k not in ("instance_group", "parameters")} == {
        k: v for k, v in before.items() if k not in ("instance_group", "parameters")}


def test_build_override_removes_managed_keys_the_new_profile_lacks_and_nothing_else() -> None:
    live = model_config(4, parameters={**MULTI, "ENABLE_CACHE_CLEANING": "true"})
    out = build_override(live, 1, SINGLE, {"INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION"}, generation=None)
    # ENABLE_CACHE_CLEANING is the operator's, not a profile's: it stays.
    assert read_state(out).parameters == {"SLEEP_MS": "20", "INFERENCE_MODE": "true", "ENABLE_CACHE_CLEANING": "true"}
    assert read_state(out).instances == 1


def test_build_override_generation_bump_or_keep() -> None:
    live = model_config(1)
    bumped = build_override(live, 2, MULTI, MULTI.keys(), generation=read_state(live).generation + 1)
    assert read_state(bumped).generation == 1 and bumped["parameters"][GENERATION_PARAMETER] == {"string_value": "1"}
    again = build_override(bumped, 1, SINGLE, MULTI.keys(), generation=read_state(bumped).generation + 1)
    assert read_state(again).generation == 2
    kept = build_override(again, 3, MULTI, MULTI.keys(), generation=None)  # in place: untouched
    assert kept["parameters"][GENERATION_PARAMETER] == {"string_value": "2"}
    assert GENERATION_PARAMETER not in build_override(live, 2, MULTI, MULTI.keys(), generation=None)["parameters"]


def test_build_override_edge_cases() -> None:
    with pytest.raises(ValueError, match="instances must be >= 1, got 0"):
        build_override(model_config(), 0, SINGLE, SINGLE.keys(), None)
    bare = {"name": MODEL, "backend": "python"}  # no instance_group, no parameters
    out = build_override(bare, 2, SINGLE, SINGLE.keys(), generation=1)
    assert out["instance_group"] == [{"kind": "KIND_AUTO", "count": 2}]
    assert read_state(out).parameters == {"INFERENCE_MODE": "true", GENERATION_PARAMETER: "1"}
    # Triton may hand back a parameter without a string_value: it is carried over as it was.
    odd = model_config()
    odd["parameters"]["EMPTY"] = {}
    assert build_override(odd, 1, SINGLE, SINGLE.keys(), None)["parameters"]["EMPTY"] == {}


def test_read_state_counts_and_generations() -> None:
    assert read_state({}).instances == 1 and read_state({}).generation == 0
    assert read_state({"instance_group": [{"kind": "KIND_CPU"}]}).instances == 1  # count omitted
    bad = model_config(parameters={GENERATION_PARAMETER: "x"})
    assert read_state(bad).generation == 0


def test_matches_checks_every_group_and_exactly_the_managed_flags() -> None:
    keys = {"INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION"}
    live = model_config(2, parameters={**MULTI, GENERATION_PARAMETER: "7", "OTHER": "x"})
    assert matches(live, 2, MULTI, keys)  # generation and unmanaged keys do not matter
    assert not matches(live, 3, MULTI, keys)
    assert not matches(live, 2, SINGLE, keys)  # DISABLE_OPTIMIZED_EXECUTION left over
    assert not matches(model_config(2, parameters=SINGLE), 2, MULTI, keys)  # one missing
    assert not matches(model_config(2, parameters={**MULTI, "INFERENCE_MODE": "false"}), 2, MULTI, keys)
    two_groups = model_config(2, parameters=MULTI)
    two_groups["instance_group"].append({"kind": "KIND_CPU", "count": 1})
    assert not matches(two_groups, 2, MULTI, keys)  # the second group did not take the count


flag_values = st.sampled_from(["true", "false", "1", "off"])
params_st = st.dictionaries(st.sampled_from(["INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION", "ENABLE_CACHE_CLEANING",
                                             "OTHER", GENERATION_PARAMETER]), flag_values, max_size=5)


@settings(max_examples=200, deadline=None)
@given(live_params=params_st, new_params=st.dictionaries(st.sampled_from(["INFERENCE_MODE",
                                                                          "DISABLE_OPTIMIZED_EXECUTION"]),
                                                         flag_values, max_size=2),
       extra_managed=st.sets(st.sampled_from(["INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION",
                                              "ENABLE_CACHE_CLEANING"])),
       live_count=st.integers(1, 8), count=st.integers(1, 8), bump=st.booleans())
def test_an_override_always_matches_what_it_was_built_for(live_params: dict[str, str], new_params: dict[str, str],
                                                           extra_managed: set[str], live_count: int, count: int,
                                                           bump: bool) -> None:
    live = model_config(live_count, parameters={k: v for k, v in live_params.items()
                                                 if k != GENERATION_PARAMETER or v.isdigit()})
    managed = set(new_params) | extra_managed
    generation = read_state(live).generation + 1 if bump else None
    out = build_override(live, count, new_params, managed, generation)
    assert matches(out, count, new_params, managed)
    # Unmanaged parameters survive untouched.
    owned = managed | {GENERATION_PARAMETER}
    unmanaged_before = {k: v for k, v in read_state(live).parameters.items() if k not in owned}
    unmanaged_after = {k: v for k, v in read_state(out).parameters.items() if k not in owned}
    assert unmanaged_after == unmanaged_before
    assert read_state(out).generation == (generation if bump else read_state(live).generation)
