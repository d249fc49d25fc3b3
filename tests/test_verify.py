"""Verify after acting (control/verify.py through control/decide.py), as timelines against a
world whose throughput and latency follow the instance count, and as a Hypothesis property;
then the loop: the verdict metric and /status, with a fake Triton behind the real actuator."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_decide import POLICY, PROPERTY_SETTINGS
from test_loop import MODEL, Loop, scenario
from test_policy import EXAMPLE, problems_of

from tritonpilot.cli import main
from tritonpilot.control import verify
from tritonpilot.control.decide import Action, Decision, Reason, State, decide
from tritonpilot.control.overrides import read_state
from tritonpilot.control.policy import Profile, ResolvedModelPolicy, VerifyPolicy, load_policy, parse_policy, resolve
from tritonpilot.control.signals import InflightSample, LiveConfig, ReloadRecord, Signals, TritonSample
from tritonpilot.control.triton import StatsSample
from tritonpilot.control.verify import Verdict
from tritonpilot.proxy.stats import LATENCY_BUCKETS_S

# Defaults as shipped: settle 10 s, window 20 s, gain 10 %, p95 +25 %, load +-25 %, ceiling 600 s.
VERIFYING = replace(POLICY, verify=VerifyPolicy(enabled=True))


@dataclass(frozen=True)
class Serving:
    """What the clients see at one instance count over one second."""

    inflight: float           # mean requests in flight
    arrival_per_s: float      # requests started per second
    throughput_per_s: float   # completed per second
    p95_s: float
    failed_per_s: float = 0.0


World = Callable[[int], Serving]


def closed_loop(clients: float, useful: int, service_s: float = 0.02) -> World:
    """`clients` requests always in flight; instances past `useful` add nothing (a busy GPU)."""
    def serving(n: int) -> Serving:
        throughput = min(n, useful, clients) / service_s
        return Serving(clients, throughput, throughput, clients / throughput)
    return serving


def buckets(count: int, latency_s: float) -> tuple[int, ...]:
    """Cumulative bucket counts of `count` requests that each took latency_s."""
    return tuple(count if latency_s <= bound else 0 for bound in LATENCY_BUCKETS_S) + (count,)


@dataclass
class VSim:
    """The loop around `decide`: a fake Triton whose reloads take reload_s and whose clients
    are served as `world` says for the live count (proxy samples and Triton's counters)."""

    world: World
    policy: ResolvedModelPolicy = VERIFYING
    instances: int = 1
    reload_s: float = 3.0
    now_s: float = 0.0
    state: State = field(default_factory=State)
    last_reload: ReloadRecord | None = None
    decisions: list[Decision] = field(default_factory=list)
    ceilings: list[verify.Ceiling | None] = field(default_factory=list)  # in force before each tick
    _pending: tuple[float, int, Profile] | None = None

    def tick(self) -> Decision:
        if self._pending is not None and self._pending[0] <= self.now_s:
            finished_s, count, profile = self._pending
            self._pending = None
            self.instances = count
            self.last_reload = ReloadRecord(finished_s=finished_s, duration_s=self.reload_s, ok=True,
                                            instances=count, profile=profile.name)
        s = self.world(self.instances)
        done = round(s.throughput_per_s)
        inflight = InflightSample(at_s=self.now_s, window_s=1.0, inflight_now=round(s.inflight),
                                  inflight_mean=s.inflight, inflight_max=math.ceil(s.inflight),
                                  request_rate_per_s=s.arrival_per_s, latency_p95_s=s.p95_s,
                                  latency_bucket_counts=buckets(done, s.p95_s), error_count=round(s.failed_per_s))
        triton = TritonSample(at_s=self.now_s, window_s=1.0, success_count=done, fail_count=round(s.failed_per_s),
                              queue_ns_per_request=1e6, compute_infer_ns_per_request=2e7, inflight_mean=s.inflight)
        profile = self.policy.profile_for(self.instances)
        signals = Signals(now_s=self.now_s, inflight=inflight, triton=triton,
                          config=LiveConfig(self.now_s, self.instances, dict(profile.parameters)),
                          reload_pending=self._pending is not None, last_reload=self.last_reload)
        self.ceilings.append(self.state.verify.ceiling)
        decision, self.state = decide(signals, self.policy, self.state)
        if decision.changes:
            self._pending = (self.now_s + self.reload_s, decision.decided_instances, decision.profile)
        self.decisions.append(decision)
        return decision

    def run(self, until: float, world: World | None = None) -> Decision:
        self.world = world or self.world
        decision = None
        while self.now_s <= until + 1e-9:
            decision = self.tick()
            self.now_s += 1.0
        assert decision is not None
        return decision

    def changes(self) -> list[tuple[float, int | None, int | None, Reason]]:
        return [(d.now_s, d.current_instances, d.decided_instances, d.reason) for d in self.decisions if d.changes]

    def verdicts(self) -> list[tuple[float, Verdict, str]]:
        return [(d.now_s, o.verdict, o.then) for d in self.decisions for o in d.verdicts]


def the_verdict(sim: VSim, verdict: Verdict) -> Decision:
    (decision,) = [d for d in sim.decisions if any(o.verdict is verdict for o in d.verdicts)]
    return decision


# --- timelines ---------------------------------------------------------------------------

def test_a_scale_up_that_raises_throughput_is_improved_and_kept() -> None:
    sim = VSim(closed_loop(clients=1.5, useful=4))  # 1.5 in flight: up after 5 s, below panic
    sim.run(until=100)
    assert sim.changes() == [(5.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET)]
    # The reload finished at 8; settled at 18; the after-window (18, 38] is complete at 38.
    assert sim.verdicts() == [(38.0, Verdict.IMPROVED, "kept")]
    n = the_verdict(sim, Verdict.IMPROVED).numbers
    assert (n["verify_throughput_before_per_s"], n["verify_throughput_after_per_s"]) == (50, 75)
    assert n["verify_throughput_source"] == "triton" and n["verify_latency_kind"] == "proxy-p95"
    assert n["verify_inflight_mean_before"] == n["verify_inflight_mean_after"] == 1.5
    assert n["verdict"] == "improved" and n["verify_error_ratio_after"] == 0
    assert sim.instances == 2 and sim.state.verify.ceiling is None


def test_a_saturated_scale_up_without_gain_is_reverted_and_the_ceiling_holds_until_its_backoff() -> None:
    sim = VSim(closed_loop(clients=1.5, useful=1))  # a second instance adds nothing
    sim.run(until=40)
    assert sim.changes() == [(5.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET), (38.0, 2, 1, Reason.VERIFY_REVERT)]
    revert = the_verdict(sim, Verdict.NO_GAIN)
    assert revert.action is Action.SCALE_DOWN and revert.reason is Reason.VERIFY_REVERT
    assert revert.numbers["verify_saturated_before"] == 1
    assert revert.numbers["verify_throughput_change_ratio"] == 0.0
    assert sim.state.verify.ceiling.instances == 1 and sim.state.verify.ceiling.profile == "multi"
    # The load still asks for 2: held at the ceiling, with its numbers, until 38 + 600.
    d = sim.run(until=637)
    assert (d.action, d.reason, d.decided_instances) == (Action.BLOCKED, Reason.CEILING, 1)
    assert d.numbers["wanted_instances"] == 2 and d.numbers["ceiling_instances"] == 1
    assert d.numbers["ceiling_left_s"] == 1.0
    assert len(sim.changes()) == 2
    # Then one probe, verified like any other: no gain again, back to 1, a new ceiling.
    sim.run(until=700)
    assert sim.changes()[2:] == [(638.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET), (671.0, 2, 1, Reason.VERIFY_REVERT)]
    assert [v for _, v, _ in sim.verdicts()] == [Verdict.NO_GAIN, Verdict.NO_GAIN]
    assert sim.state.verify.ceiling.until_s == 671.0 + 600


def test_a_ceiling_ends_when_the_profile_above_it_changes() -> None:
    sim = VSim(closed_loop(clients=1.5, useful=1))
    sim.run(until=45)
    assert sim.state.verify.ceiling is not None
    other = Profile(name="multi", instances=(2, None), parameters={"INFERENCE_MODE": "false"})
    sim.policy = replace(sim.policy, profiles=(sim.policy.profiles[0], other))
    sim.run(until=46)
    assert sim.state.verify.ceiling is None and sim.decisions[-1].reason is Reason.COOLDOWN  # not "ceiling"
    sim.run(until=60)
    assert sim.changes()[-1] == (51.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET)  # the revert's reload ended at 41


def test_a_scale_up_after_which_p95_got_worse_is_reverted() -> None:
    def world(n: int) -> Serving:  # same load and throughput; the second instance doubles p95
        return Serving(1.5, 50, 50, 0.03 if n == 1 else 0.06)
    sim = VSim(world)
    sim.run(until=45)
    assert sim.changes() == [(5.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET), (38.0, 2, 1, Reason.VERIFY_REVERT)]
    d = the_verdict(sim, Verdict.WORSE)
    assert d.numbers["verify_worse_in"] == "latency"
    assert (d.numbers["verify_latency_before_s"], d.numbers["verify_latency_after_s"]) == (0.035, 0.075)
    assert sim.instances == 1


def test_a_scale_up_after_which_more_requests_failed_is_reverted() -> None:
    sim = VSim(lambda n: Serving(1.5, 50, 50, 0.03, failed_per_s=0 if n == 1 else 5))
    sim.run(until=45)
    d = the_verdict(sim, Verdict.WORSE)
    assert d.numbers["verify_worse_in"] == "errors" and d.numbers["verify_error_ratio_after"] > 0.01
    assert sim.instances == 1


def test_a_load_that_changed_between_the_windows_is_inconclusive_and_nothing_is_undone() -> None:
    sim = VSim(closed_loop(clients=1.5, useful=1))
    sim.run(until=12)
    sim.run(until=45, world=closed_loop(clients=0.4, useful=1))  # clients left during the after-window
    ((at, verdict, then),) = sim.verdicts()
    assert (verdict, then) == (Verdict.INCONCLUSIVE, "kept")
    n = the_verdict(sim, Verdict.INCONCLUSIVE).numbers
    assert n["verify_inconclusive_because"] == "load changed between the windows"
    assert n["verify_inflight_change_ratio"] < -0.25 and n["verify_arrival_change_ratio"] < -0.25
    assert sim.changes() == [(5.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET)]
    sim.run(until=80)  # the lower load's own down delay: 60 s from its first tick at 13
    assert sim.changes()[-1] == (73.0, 2, 1, Reason.INFLIGHT_BELOW_TARGET)


def test_while_a_change_waits_for_its_verdict_the_load_waits_too() -> None:
    sim = VSim(closed_loop(clients=3, useful=4), instances=2)
    sim.run(until=12)
    sim.run(until=50, world=closed_loop(clients=4.5, useful=4))  # more than 3 hold, from 13
    held = [d for d in sim.decisions if d.reason is Reason.VERIFYING]
    assert held and held[0].now_s == 18.0 and held[0].numbers["wanted"] == "inflight-above-target"
    assert held[0].numbers["verifying"] == "up" and held[0].numbers["verify_window_ends_in_s"] == 20.0
    assert [(v, then) for _, v, then in sim.verdicts()] == [(Verdict.INCONCLUSIVE, "kept")]
    # The verdict came at 38; the up waited for it, then went at once.
    assert sim.changes() == [(5.0, 2, 3, Reason.INFLIGHT_ABOVE_TARGET), (38.0, 3, 4, Reason.INFLIGHT_ABOVE_TARGET)]


def test_a_panic_jump_is_probed_down_to_the_lowest_count_that_serves_as_well() -> None:
    sim = VSim(closed_loop(clients=8, useful=2))  # 8 clients; past 2 instances nothing more is served
    sim.run(until=200)
    assert [(c, r) for _, _, c, r in sim.changes()] == [
        (4, Reason.PANIC), (3, Reason.VERIFY_PROBE), (2, Reason.VERIFY_PROBE)]
    assert [(v, then) for _, v, then in sim.verdicts()] == [
        (Verdict.IMPROVED, "probe 3"), (Verdict.HOLDS, "probe 2"), (Verdict.HOLDS, "kept; ceiling")]
    holds = [d for d in sim.decisions if any(o.verdict is Verdict.HOLDS for o in d.verdicts)]
    # Each probe is compared with the window at the highest count, not with the one before it.
    assert all(d.numbers["verify_throughput_before_per_s"] == 100 for d in holds)
    assert sim.instances == 2 and sim.state.verify.ceiling.instances == 2
    # 8 in flight on 2 instances is a panic, yet the ceiling holds it (and the probes were not undone).
    d = sim.decisions[-1]
    assert (d.action, d.reason, d.numbers["wanted"]) == (Action.BLOCKED, Reason.CEILING, "panic")


def test_a_probe_that_loses_throughput_is_reverted_to_the_lowest_count_that_held() -> None:
    sim = VSim(closed_loop(clients=8, useful=3))
    sim.run(until=200)
    assert [c for _, _, c, _ in sim.changes()] == [4, 3, 2, 3]
    assert [(v, then) for _, v, then in sim.verdicts()] == [
        (Verdict.IMPROVED, "probe 3"), (Verdict.HOLDS, "probe 2"), (Verdict.WORSE, "revert to 3; ceiling")]
    assert sim.changes()[-1][3] is Reason.VERIFY_REVERT
    assert sim.instances == 3 and sim.state.verify.ceiling.instances == 3


def test_a_panic_jump_that_keeps_its_gain_down_the_line_keeps_the_top_count() -> None:
    sim = VSim(closed_loop(clients=8, useful=4))
    sim.run(until=200)
    assert [c for _, _, c, _ in sim.changes()] == [4, 3, 4]
    assert [v for _, v, _ in sim.verdicts()] == [Verdict.IMPROVED, Verdict.WORSE]
    assert sim.instances == 4 and sim.state.verify.ceiling is None  # 4 is max_instances: nothing to hold


def test_without_throughput_before_a_change_its_verdict_is_inconclusive_at_once() -> None:
    sim = VSim(lambda n: Serving(1.5, 0.0, 0.0, 0.03))  # in flight, but nothing completes
    d = sim.run(until=5)
    assert d.changes and [o.verdict for o in d.verdicts] == [Verdict.INCONCLUSIVE]
    assert d.numbers["verify_inconclusive_because"] == "no completed requests measured before the change"
    assert sim.state.verify.pending is None


def test_verify_off_changes_nothing_and_keeps_no_state() -> None:
    sim = VSim(closed_loop(clients=1.5, useful=1), policy=replace(POLICY, verify=VerifyPolicy(enabled=False)))
    sim.run(until=200)
    assert sim.changes() == [(5.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET)] and sim.verdicts() == []
    assert sim.state.verify == verify.VerifyState()


# --- a property --------------------------------------------------------------------------

@PROPERTY_SETTINGS
@given(clients=st.lists(st.tuples(st.sampled_from([0.5, 1.5, 3.0, 8.0]), st.integers(5, 120)), min_size=1,
                        max_size=6),
       useful=st.integers(1, 4), start=st.integers(1, 4), reload_s=st.sampled_from([1.0, 3.0]))
def test_no_load_driven_change_passes_a_ceiling_in_force(clients: list[tuple[float, int]], useful: int,
                                                          start: int, reload_s: float) -> None:
    sim = VSim(closed_loop(clients[0][0], useful), instances=start, reload_s=reload_s,
               policy=replace(VERIFYING, verify=VerifyPolicy(enabled=True, settle_s=3.0, window_s=5.0,
                                                          ceiling_backoff_s=100.0)))
    for level, seconds in clients:
        sim.run(until=sim.now_s + seconds, world=closed_loop(level, useful))
    for ceiling, d in zip(sim.ceilings, sim.decisions):
        if ceiling is not None and d.now_s < ceiling.until_s and d.reason in (Reason.PANIC,
                                                                             Reason.INFLIGHT_ABOVE_TARGET):
            assert d.decided_instances <= max(ceiling.instances, d.current_instances), (ceiling, d)
    # Every verdict has its numbers, and a revert always follows a reverting verdict at once or later.
    for d in sim.decisions:
        for o in d.verdicts:
            assert o.numbers and (o.verdict not in verify.REVERTING or o.then.startswith("revert"))


# --- the loop: metric and /status --------------------------------------------------------

def with_useful_instances(loop: Loop, useful: int) -> Loop:
    """FakeTriton completes 50 requests per second per instance, up to `useful` instances."""
    done = {"count": 0}

    async def statistics(model: str) -> StatsSample:
        n = read_state(loop.triton.configs[model]).instances
        done["count"] += 50 * min(n, useful)
        return StatsSample(inference_count=done["count"], execution_count=done["count"],
                           success_count=done["count"], fail_count=0, queue_ns=done["count"] * 1000,
                           compute_infer_ns=done["count"] * 20_000_000, last_inference_ms=0)

    loop.triton.statistics = statistics  # type: ignore[method-assign]
    return loop


@scenario
async def test_the_loop_counts_verdicts_and_shows_the_last_one_and_the_ceiling() -> None:
    policy = replace(POLICY, verify=VerifyPolicy(enabled=True, settle_s=2.0, window_s=5.0))
    loop = with_useful_instances(Loop(policy=replace(policy, scale_down_delay_s=30.0)), useful=2)
    await loop.run(until=120, inflight=8.0)
    assert loop.live_instances() == 2
    assert loop.metric("tritonpilot_verifications_total", model=MODEL, verdict="improved") == 1
    assert loop.metric("tritonpilot_verifications_total", model=MODEL, verdict="holds") == 2
    status = loop.controller.status()["models"][MODEL]
    v = status["verify"]
    assert v["last_verdict"]["verdict"] == "holds" and v["last_verdict"]["instances"] == "3 -> 2"
    assert v["last_verdict"]["numbers"]["verify_throughput_after_per_s"] == 100.0
    assert v["ceiling"]["instances"] == 2 and v["ceiling"]["profile_above"] == "multi"
    assert v["verifying"] is None and v["probing"] is None
    assert status["policy"]["verify"]["window_s"] == 5.0
    logged = [d for d in status["decisions"] if d.get("verdicts")]
    assert [d["verdicts"] for d in logged] == [["improved"], ["holds"], ["holds"]]
    assert status["decisions"][-1]["reason"] == "ceiling"


@scenario
async def test_the_loop_reverts_a_scale_up_without_gain() -> None:
    policy = replace(POLICY, verify=VerifyPolicy(enabled=True, settle_s=2.0, window_s=5.0))
    loop = with_useful_instances(Loop(policy=policy), useful=1)
    await loop.run(until=60, inflight=8.0)
    assert loop.live_instances() == 1
    assert loop.metric("tritonpilot_verifications_total", model=MODEL, verdict="no-gain") == 1
    assert loop.metric("tritonpilot_decisions_total", model=MODEL, action="scale_down", reason="verify-revert") == 1
    assert loop.controller.status()["models"][MODEL]["verify"]["ceiling"]["instances"] == 1


# --- the policy keys ---------------------------------------------------------------------

def test_the_verify_keys_merge_key_by_key_and_errors_name_them() -> None:
    (example,) = resolve(load_policy(EXAMPLE)).values()
    assert example.verify == VerifyPolicy()  # the example shows the defaults
    policy = parse_policy({"defaults": {"verify": {"window_s": 30, "ceiling_backoff_s": 60}},
                           "models": {"a": {"verify": {"settle_s": 5}}, "b": None,
                                      "c": {"verify": {"enabled": False}}}})
    a, b, c = (resolve(policy)[m].verify for m in "abc")
    assert (a.settle_s, a.window_s, a.ceiling_backoff_s) == (5, 30, 60)
    assert (b.settle_s, b.window_s) == (10, 30) and c.enabled is False and c.window_s == 30
    for text, expected in [
        ("defaults: {verify: {window_s: 0}}", "defaults.verify.window_s: got 0; must be > 0"),
        ("defaults: {verify: {min_gain_ratio: 1}}", "defaults.verify.min_gain_ratio: got 1; must be < 1"),
        ("models: {m: {verify: {max_error_increase_ratio: 2}}}",
         "models.m.verify.max_error_increase_ratio: got 2; must be <= 1"),
        ("models: {m: {verify: {settle: 3}}}", "models.m.verify.settle: got 3; unknown key; did you mean settle_s?"),
        ("defaults: {verify: {enabled: maybe}}", "defaults.verify.enabled: got 'maybe'; must be true or false"),
    ]:
        problems = problems_of(text)
        assert any(expected in p for p in problems), problems
    empty = parse_policy({"defaults": {"verify": None}, "models": {"m": {"verify": None}}})  # `verify:` alone
    assert resolve(empty)["m"].verify == VerifyPolicy()


def test_check_prints_the_verify_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["check", str(EXAMPLE)]) == 0
    assert "verify: off (changes are not judged, reverted or probed)" in capsys.readouterr().out  # the default
    opted_in = tmp_path / "verify.yaml"
    opted_in.write_text(EXAMPLE.read_text().replace("    enabled: false               # opt in",
                                                     "    enabled: true                # opt in"))
    assert main(["check", str(opted_in)]) == 0
    out = capsys.readouterr().out
    assert "verify each change: 10s settle, then 20s against the window before; a gain is >= 10%" in out
    assert "reverted on p95 > +25%, failed share up > 1 point(s)" in out and "ceiling for 600s" in out
