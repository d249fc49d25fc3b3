"""The reload leak watchdog (control/leak.py through control/decide.py): timelines where a
model goes up and down with its load and Triton's memory follows a script; then the loop
(the metric, /status and the log, with fake sources); then once on a real Triton with a
model that leaks at each load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_decide import POLICY
from test_loop import MODEL, Loop, events, policy, scenario
from test_policy import EXAMPLE, problems_of

from tritonpilot.control import leak
from tritonpilot.control.actuator import Actuator
from tritonpilot.control.decide import Action, Decision, Reason, State, decide
from tritonpilot.control.loop import Controller, LiveSources
from tritonpilot.control.policy import LeakPolicy, ResolvedModelPolicy, VerifyPolicy, load_policy, parse_policy, resolve
from tritonpilot.control.procmem import TritonProcessMemory
from tritonpilot.control.record import plain, signals_from_json
from tritonpilot.control.signals import GpuSample, InflightSample, LiveConfig, MemorySample, ReloadRecord, Signals
from tritonpilot.control.triton import TritonClient
from tritonpilot.proxy.gpu import NullGpuSampler
from tritonpilot.proxy.stats import ProxyStats

MIB = 1 << 20
GIB = 1 << 30
# Up after 2 s, down after 10 s, settle 5 s; verification off: this is about memory.
LEAKY_POLICY = replace(POLICY, scale_up_delay_s=2.0, scale_down_delay_s=10.0, cooldown_s=5.0,
                       verify=VerifyPolicy(enabled=False),
                       leak=LeakPolicy(settle_s=5.0, min_reloads=3, min_growth_bytes=64 * MIB))

Memory = Callable[["LSim"], int | None]  # Triton's process bytes now, from what has happened


@dataclass
class LSim:
    """`decide` around a model whose reloads take reload_s, and a Triton whose memory
    `memory` says; `other_reloads` counts other models' reloads (the pod-wide count)."""

    memory: Memory
    gpu: Memory = lambda sim: None  # GPU memory used; None: no GPU data
    policy: ResolvedModelPolicy = LEAKY_POLICY
    instances: int = 1
    reload_s: float = 3.0
    now_s: float = 0.0
    loads: int = 0            # this model's finished reloads
    other_reloads: int = 0
    state: State = field(default_factory=State)
    last_reload: ReloadRecord | None = None
    decisions: list[Decision] = field(default_factory=list)
    _pending: tuple[float, int] | None = None

    def tick(self, load: float) -> Decision:
        if self._pending is not None and self._pending[0] <= self.now_s:
            finished_s, self.instances = self._pending
            self._pending = None
            self.loads += 1
            profile = self.policy.profile_for(self.instances)
            assert profile is not None
            self.last_reload = ReloadRecord(finished_s=finished_s, duration_s=self.reload_s, ok=True,
                                            instances=self.instances, profile=profile.name)
        profile = self.policy.profile_for(self.instances)
        assert profile is not None
        gpu_bytes = self.gpu(self)
        signals = Signals(
            now_s=self.now_s,
            inflight=InflightSample(at_s=self.now_s, window_s=1.0, inflight_now=round(load), inflight_mean=load,
                                    inflight_max=round(load)),
            config=LiveConfig(at_s=self.now_s, instances=self.instances, parameters=dict(profile.parameters)),
            reload_pending=self._pending is not None, last_reload=self.last_reload,
            gpu=None if gpu_bytes is None else GpuSample(at_s=self.now_s, utilization_ratio=0.1,
                                                         memory_used_bytes=gpu_bytes, memory_total_bytes=80 * GIB),
            memory=MemorySample(at_s=self.now_s, process_bytes=self.memory(self),
                                reloads_finished=self.loads + self.other_reloads, source="procfs"))
        decision, self.state = decide(signals, self.policy, self.state)
        self.decisions.append(decision)
        if decision.changes:
            assert decision.decided_instances is not None
            self._pending = (self.now_s + self.reload_s, decision.decided_instances)
        self.now_s += 1.0
        return decision

    def run(self, seconds: float, load: float) -> Decision:
        decision = None
        end_s = self.now_s + seconds
        while self.now_s < end_s - 1e-9:
            decision = self.tick(load)
        assert decision is not None
        return decision

    def cycle(self, between: Callable[[LSim], None] | None = None) -> None:
        """High load (3 in flight: up to 3 instances) for 30 s, then 0.5 (down to 1) for 30 s."""
        self.run(30, 3.0)
        if between is not None:
            between(self)
        self.run(30, 0.5)

    def changes(self) -> list[Decision]:
        return [d for d in self.decisions if d.changes]

    def blocked_by_leak(self) -> list[Decision]:
        return [d for d in self.decisions if d.reason is Reason.LEAK_SUSPECTED]


def leaking(per_load_bytes: int, base: int = GIB) -> Memory:
    return lambda sim: base + sim.instances * 200 * MIB + sim.loads * per_load_bytes


# ------------------------------------------------------------------------------ timelines


def test_memory_rising_at_three_returns_to_the_same_config_stops_reconfiguration() -> None:
    sim = LSim(memory=leaking(100 * MIB))
    for _ in range(3):
        sim.cycle()
    # Samples at (3, multi) and at (1, single) after each reload: the first is a baseline,
    # and every return since came back 200 MiB higher (two loads of 100 MiB in between).
    assert sim.state.leak.suspected is None, "only two returns so far"
    sim.run(30, 3.0)  # the fourth time at 3 instances: the third rise
    suspected = sim.state.leak.suspected
    assert suspected is not None
    assert (suspected.instances, suspected.profile, suspected.kind) == (3, "multi", "process")
    assert suspected.rises == (200 * MIB,) * 3
    assert suspected.last_bytes - suspected.first_bytes == 600 * MIB
    changes = len(sim.changes())
    sim.run(60, 0.5)  # the load falls: the way down is blocked, numbers and all
    assert len(sim.changes()) == changes and sim.instances == 3
    blocked = sim.decisions[-1]
    assert (blocked.action, blocked.reason) == (Action.BLOCKED, Reason.LEAK_SUSPECTED)
    assert blocked.numbers["wanted"] == str(Reason.INFLIGHT_BELOW_TARGET)
    assert blocked.numbers["leak_rises"] == 3 and blocked.numbers["leak_growth_bytes"] == 600 * MIB
    assert blocked.numbers["leak_instances"] == 3 and blocked.numbers["leak_memory"] == "process"
    assert "rose at each of the last 3 returns" in leak.why(suspected)


def test_bounds_and_panic_are_blocked_too_and_turning_the_watchdog_off_lets_them_go() -> None:
    sim = LSim(memory=leaking(100 * MIB))
    for _ in range(4):
        sim.cycle()
    assert sim.state.leak.suspected is not None and sim.instances == 3
    sim.policy = replace(sim.policy, max_instances=2)  # a policy reload: 3 is now above max
    decision = sim.run(3, 3.0)
    assert (decision.action, decision.reason) == (Action.BLOCKED, Reason.LEAK_SUSPECTED)
    assert decision.numbers["wanted"] == str(Reason.ABOVE_MAX)
    sim.policy = replace(sim.policy, leak=replace(sim.policy.leak, enabled=False))
    decision = sim.tick(3.0)
    assert (decision.action, decision.reason) == (Action.SCALE_DOWN, Reason.ABOVE_MAX)
    assert sim.state.leak == leak.LeakState()


def test_flat_memory_never_suspects_however_often_it_reloads() -> None:
    sim = LSim(memory=leaking(0))
    for _ in range(8):
        sim.cycle()
    assert len(sim.changes()) == 16 and not sim.blocked_by_leak()
    assert sim.state.leak.suspected is None
    assert {(h.instances, h.samples) for h in sim.state.leak.configs} == {(1, 8), (3, 8)}


def test_noise_and_growth_below_the_threshold_never_suspect() -> None:
    noise = [0, 40, -30, 55, 10, -45, 60, 5, -20, 50, 0, 35, -10, 60, 20, -60]

    def noisy(sim: LSim) -> int:  # +-60 MiB of noise plus 25 MiB per load: 50 MiB per return
        return GIB + sim.loads * 25 * MIB + noise[sim.loads % len(noise)] * MIB
    sim = LSim(memory=noisy)
    for _ in range(8):
        sim.cycle()
    assert len(sim.changes()) == 16 and sim.state.leak.suspected is None and not sim.blocked_by_leak()


def test_a_rise_must_also_pass_the_ratio() -> None:
    ratio = replace(LEAKY_POLICY, leak=replace(LEAKY_POLICY.leak, min_growth_ratio=0.5))
    sim = LSim(memory=leaking(100 * MIB), policy=ratio)  # 200 MiB per return on >= 1.6 GiB: under 50 %
    for _ in range(6):
        sim.cycle()
    assert sim.state.leak.suspected is None


def test_other_models_reloads_in_between_are_not_attributed() -> None:
    def other_model_leaks(sim: LSim) -> None:  # another model reloads (and leaks) each cycle
        sim.other_reloads += 1
    sim = LSim(memory=lambda s: GIB + s.other_reloads * 300 * MIB)
    for _ in range(6):
        sim.cycle(between=other_model_leaks)
    assert sim.state.leak.suspected is None and not sim.blocked_by_leak()
    assert sim.state.leak.last_note is not None and sim.state.leak.last_note.startswith("not attributed")


def test_one_foreign_reload_restarts_the_count_then_a_real_leak_is_still_found() -> None:
    sim = LSim(memory=leaking(100 * MIB))
    sim.cycle()
    sim.cycle()
    sim.cycle(between=lambda s: setattr(s, "other_reloads", s.other_reloads + 1))
    sim.run(30, 3.0)
    assert sim.state.leak.suspected is None, "the chain at 3 instances restarted at the foreign reload"
    sim.run(30, 0.5)
    sim.cycle()
    sim.cycle()
    assert sim.state.leak.suspected is not None


def test_no_memory_data_is_no_sample_and_never_a_suspicion() -> None:
    sim = LSim(memory=lambda s: None)
    for _ in range(5):
        sim.cycle()
    assert sim.state.leak.configs == () and sim.state.leak.last_note == "skipped: no memory data"


def test_gpu_memory_is_watched_as_well() -> None:
    """GPU memory used (the model's fullest GPU) rising at each return is a leak too."""
    sim = LSim(memory=lambda s: GIB, gpu=lambda s: 8 * GIB + s.loads * 300 * MIB)
    for _ in range(4):
        sim.cycle()
    suspected = sim.state.leak.suspected
    assert suspected is not None and suspected.kind == "gpu" and suspected.rises == (600 * MIB,) * 3


def test_the_memory_sample_is_recorded_and_read_back() -> None:
    signals = Signals(now_s=5.0, inflight=None, config=None,
                      memory=MemorySample(at_s=4.5, process_bytes=123 * MIB, reloads_finished=7, source="procfs"))
    assert signals_from_json(plain(signals)) == signals


def test_leak_keys_merge_key_by_key_and_errors_name_the_key() -> None:
    resolved = resolve(parse_policy({"defaults": {"leak": {"min_reloads": 4}},
                                     "models": {"a": {}, "b": {"leak": {"enabled": False, "min_growth_bytes": 1}}}}))
    assert resolved["a"].leak == LeakPolicy(min_reloads=4)
    assert resolved["b"].leak == LeakPolicy(enabled=False, min_reloads=4, min_growth_bytes=1)
    assert any("models.a.leak.min_reloads" in p for p in problems_of("models: {a: {leak: {min_reloads: 0}}}"))
    shipped = resolve(load_policy(EXAMPLE))
    assert all(p.leak.enabled for p in shipped.values())


# ------------------------------------------------------------------------------ the loop


class MemorySources:
    """test_loop's fake sources plus Triton's process memory: 100 MiB more per load."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    async def process_memory(self) -> tuple[int | None, str]:
        return GIB + 100 * MIB * len(self.loop.triton.loads), "procfs"


@scenario
async def test_the_loop_raises_the_metric_says_why_in_status_and_logs_it_once() -> None:
    loop = Loop(policy=policy(scale_down_delay_s=10.0, cooldown_s=5.0,
                              leak=LeakPolicy(settle_s=2.0, min_reloads=2, min_growth_bytes=64 * MIB)))
    loop.sources.process_memory = MemorySources(loop).process_memory  # type: ignore[attr-defined]
    with capture_logs() as logs:
        for _ in range(3):
            await loop.run(loop.now_s + 25, 3.0)
            await loop.run(loop.now_s + 25, 0.5)
        await loop.run(loop.now_s + 25, 3.0)
    assert loop.metric("tritonpilot_reload_leak_suspected", model=MODEL) == 1.0
    loads = len(loop.triton.loads)
    await loop.run(loop.now_s + 30, 0.5)
    assert len(loop.triton.loads) == loads, "no reload once suspected"
    assert loop.decisions[-1].reason is Reason.LEAK_SUSPECTED
    status = loop.controller.status()["models"][MODEL]["leak"]
    assert status["suspected"]["leak_rises"] == 2 and "returns to that config" in status["suspected"]["why"]
    assert status["suspected"]["leak_growth_bytes"] == 400 * MIB
    (event,) = events(logs, "controller.leak_suspected")
    assert event["log_level"] == "warning" and event["model"] == MODEL
    loop.controller.replace_policies({MODEL: replace(loop.policy, leak=LeakPolicy(enabled=False))},
                                     interval_s=1.0, dry_run=False, max_concurrent_reloads=1,
                                     max_reloads_per_minute=6)
    await loop.run(loop.now_s + 2, 0.5)
    assert loop.metric("tritonpilot_reload_leak_suspected", model=MODEL) == 0.0
    assert loop.controller.status()["models"][MODEL]["leak"]["suspected"] is None


@scenario
async def test_without_a_memory_source_the_loop_has_no_data_and_the_gauge_is_0() -> None:
    loop = Loop(policy=policy(scale_down_delay_s=10.0, cooldown_s=5.0))
    for _ in range(3):
        await loop.run(loop.now_s + 25, 3.0)
        await loop.run(loop.now_s + 25, 0.5)
    assert loop.metric("tritonpilot_reload_leak_suspected", model=MODEL) == 0.0
    assert loop.controller.status()["models"][MODEL]["leak"]["last_sample"] == "skipped: no memory data"


# ------------------------------------------------------------------------------ a real Triton

LEAK_MODELS = Path(__file__).parent / "leak_models"


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("model", ["leaky", "fast"])
def test_a_model_that_leaks_at_each_load_is_caught_on_a_real_triton(model: str,
                                                                     triton_factory: Callable[..., Any]) -> None:
    """A real Triton 2.51 (CPU-only) with `leaky`, which at each load of an instance leaves a
    helper process in Triton's session holding 48 MiB (tests/leak_models/leaky/1/model.py
    says why a helper process: the Python backend's stubs exit at unload). The real
    controller, actuator and /proc source (control/procmem.py); the policy flips between
    one and two instances (bounds), so each return to a count follows two real reloads.
    The memory is real; only the reason the model reloads is forced. The same with `fast`,
    which does not leak: as many reloads, and no suspicion."""
    repository = LEAK_MODELS if model == "leaky" else Path(__file__).parent / "models"
    triton = triton_factory(repository, load_models=[model])
    asyncio.run(_leak_on_real_triton(triton, model))


async def _leak_on_real_triton(triton: Any, model: str) -> None:
    base = replace(LEAKY_POLICY, model=model, cooldown_s=0.5,
                   leak=LeakPolicy(settle_s=1.0, min_reloads=2, min_growth_bytes=64 * MIB))
    one, two = replace(base, min_instances=1, max_instances=1), replace(base, min_instances=2, max_instances=2)
    client = TritonClient(triton.grpc_url, rpc_timeout_s=5.0)
    memory = TritonProcessMemory(int(triton.grpc_url.rsplit(":", 1)[1]))
    assert memory.read()[0] is not None, memory.read()
    controller = Controller({model: two}, LiveSources(ProxyStats(), NullGpuSampler(), client, memory),
                            Actuator(client, timeout_s=60.0), interval_s=0.5, max_reloads_per_minute=None)
    m = controller.models[model]
    try:
        deadline = time.monotonic() + 150
        # A leak at two instances shows after 5 reloads; 7 let `fast` return three times to each count.
        while (m.state.leak.suspected is None and time.monotonic() < deadline
               and (m.state.leak.own_reloads < 7 or m.state.leak.awaiting is not None)):
            await controller.tick(time.monotonic())
            wanted = m.policy.min_instances
            # Once the reload to the wanted count is sampled, flip to the other count.
            if (m.config is not None and m.config.instances == wanted and m.state.leak.awaiting is None
                    and controller.applier.pending(model) is None and m.last_reload is not None
                    and m.last_reload.instances == wanted):
                controller.replace_policies({model: one if wanted == 2 else two}, interval_s=0.5, dry_run=False,
                                            max_concurrent_reloads=1, max_reloads_per_minute=None)
            await asyncio.sleep(0.5)
        suspected = m.state.leak.suspected
        report = controller.status()["models"][model]["leak"]
        if model == "fast":
            assert suspected is None, report
            assert sorted(c["samples"] for c in report["configs"]) == [3, 4], report
            return
        assert suspected is not None, report
        assert suspected.kind == "process" and len(suspected.rises) == 2
        # Each return follows two loads: 1 + 2 instances' helpers, 3 x 48 MiB.
        assert all(r > 100 * MIB for r in suspected.rises), suspected
        instances = m.config.instances if m.config is not None else None
        controller.replace_policies({model: one if instances == 2 else two}, interval_s=0.5, dry_run=False,
                                    max_concurrent_reloads=1, max_reloads_per_minute=None)
        for _ in range(4):
            (decision,) = await controller.tick(time.monotonic())
            await asyncio.sleep(0.5)
        assert (decision.action, decision.reason) == (Action.BLOCKED, Reason.LEAK_SUSPECTED)
        assert controller.applier.pending(model) is None
        assert controller.status()["models"][model]["leak"]["suspected"]["why"]
    finally:
        await controller.close()
