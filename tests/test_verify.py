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
        # Little's law for the compute time: the busy instances (no more than are in flight) over
        # the completions; a count past the useful one stretches each request, as contention does.
        busy = min(self.instances, s.inflight)
        compute_ns = busy / s.throughput_per_s * 1e9 if s.throughput_per_s > 0 else 2e7
        triton = TritonSample(at_s=self.now_s, window_s=1.0, success_count=done, fail_count=round(s.failed_per_s),
                              queue_ns_per_request=1e6, compute_infer_ns_per_request=compute_ns,
                              inflight_mean=s.inflight)
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


def test_probing_stops_where_the_offered_load_needs_the_count_that_held() -> None:
    # 3 useful instances serve 150/s of 20 ms requests: 3 busy. A probe to 2 could only lose,
    # so it is not tried: 3 held, and it is the ceiling.
    sim = VSim(closed_loop(clients=8, useful=3))
    sim.run(until=200)
    assert [c for _, _, c, _ in sim.changes()] == [4, 3]
    assert [(v, then) for _, v, then in sim.verdicts()] == [(Verdict.IMPROVED, "probe 3"), (Verdict.HOLDS, "probe 2")]
    ended = [d for d in sim.decisions if "probe_ends" in d.numbers]
    assert ended[0].numbers["probe_ends"] == "need-above-probe" and ended[0].numbers["probe_need_instances"] == 3.0
    assert sim.instances == 3 and sim.state.verify.ceiling.instances == 3 and sim.state.verify.probe is None


def test_a_panic_jump_whose_top_count_the_load_needs_is_not_probed() -> None:
    sim = VSim(closed_loop(clients=8, useful=4))  # 200/s x 20 ms: 4 busy at 4
    sim.run(until=200)
    assert [c for _, _, c, _ in sim.changes()] == [4]
    assert [v for _, v, _ in sim.verdicts()] == [Verdict.IMPROVED]
    assert sim.instances == 4 and sim.state.verify.ceiling is None  # 4 is max_instances: nothing to hold


def open_loop(rate_per_s: float, service_s: float = 0.02, p95_s: Callable[[int], float] | None = None) -> World:
    """Requests arriving at a fixed rate: in flight is what the count's queue makes of it."""
    def serving(n: int) -> Serving:
        busy = rate_per_s * service_s
        served = min(rate_per_s, n / service_s)
        inflight = busy if busy < n else 10 * n  # a queue that grows: far more in flight
        return Serving(inflight, rate_per_s, served, p95_s(n) if p95_s is not None else service_s)
    return serving


def test_issue_10_no_probe_down_while_the_steps_load_needs_the_top_count() -> None:
    # The controller benchmark's high phase: 140/s of 20 ms requests at target 0.7 need 4
    # (2.8 busy / 0.7); at 3 the p95 would grow. The jump's verdict is improved, but the probe
    # to 3 is not tried: probing ends with 4 kept, and nothing is reverted after the load drops.
    pol = replace(VERIFYING, target_inflight_per_instance=0.7)
    p95 = {1: 5.0, 2: 2.0, 3: 0.04, 4: 0.023}
    sim = VSim(open_loop(20.0), policy=pol)
    sim.run(until=20)
    sim.run(until=80, world=open_loop(140.0, p95_s=lambda n: p95[n]))
    assert [(c, r) for _, _, c, r in sim.changes()] == [(4, Reason.STEP)]
    ended = [d for d in sim.decisions if "probe_ends" in d.numbers]
    assert len(ended) == 1 and ended[0].numbers["probe_need_instances"] == pytest.approx(4.0)
    sim.run(until=200, world=open_loop(20.0))
    assert [(c, r) for _, _, c, r in sim.changes()] == [(4, Reason.STEP), (1, Reason.INFLIGHT_BELOW_TARGET)]


def test_issue_10_at_target_1_the_in_flight_need_keeps_the_top_count_too() -> None:
    # The same step at target 1: 140/s x 20 ms of compute is 2.8, but a request spends 22.4 ms in
    # flight (the proxy, gRPC, the backend): 3.14 in flight at 4, below saturation, needs 4.
    def world(n: int) -> Serving:
        if n == 1:
            return Serving(10.0, 140, 50, 5.0)
        return Serving(140 * 0.0224, 140, 140, 0.023 if n == 4 else 0.04)

    earlier = ReloadRecord(finished_s=-100.0, duration_s=2.8, ok=True, instances=1, profile="single")
    sim = VSim(open_loop(20.0), reload_s=2.8, last_reload=earlier)  # sizes the step for its queue: 4
    sim.run(until=20)
    sim.run(until=100, world=world)
    assert [(c, r) for _, _, c, r in sim.changes()] == [(4, Reason.STEP)]
    ended = next(d for d in sim.decisions if "probe_ends" in d.numbers)
    assert ended.numbers["probe_need_instances"] == pytest.approx(3.136)


def test_a_probe_waits_until_the_load_has_been_steady_for_the_settling_window() -> None:
    def busy(n: int) -> Serving:  # 100/s of 20 ms requests: one instance queues, two serve them
        return Serving(3.0, 100, 50, 0.1) if n == 1 else Serving(2.0, 100, 100, 0.02)

    def fewer(n: int) -> Serving:  # 55/s
        return Serving(1.1, 55, 55, 0.02)

    sim = VSim(busy)
    sim.run(until=28)
    assert sim.changes() == [(0.0, 1, 3, Reason.STEP)]
    # The clients slow down for the after-window's last 5 s: the window as a whole still compares
    # with the one before (arrivals -11 %), so the jump "improved"; but the load has not been
    # steady for 10 s, so the probe waits ...
    sim.run(until=33, world=fewer)
    assert [(v, then) for _, v, then in sim.verdicts()] == [(Verdict.IMPROVED, "probe 2")]
    sim.run(until=42, world=busy)  # ... also once it is back (the tick at 34 on), for 10 s
    waiting = [d.numbers.get("probe_waits") for d in sim.decisions if d.now_s >= 33]
    assert set(waiting) == {"settling"} and sim.instances == 3
    sim.run(until=80, world=busy)
    probes = [t for t, _, c, r in sim.changes() if r is Reason.VERIFY_PROBE]
    assert probes == [43.0] and sim.changes()[-1][2] == 2
    # ... and judged against the window at 3 (arrivals 88.75/s): it holds, the ceiling is 2.
    assert [v for _, v, _ in sim.verdicts()] == [Verdict.IMPROVED, Verdict.HOLDS]


def test_a_steady_load_that_moved_since_the_jump_renews_the_probes_reference() -> None:
    def busy(n: int) -> Serving:
        return Serving(3.0, 100, 50, 0.1) if n == 1 else Serving(2.0, 100, 100, 0.02)

    sim = VSim(busy)
    sim.run(until=23)
    sim.run(until=60, world=lambda n: Serving(1.1, 55, 55, 0.02))  # from 24 on: steady at 55/s
    d = next(d for d in sim.decisions if d.reason is Reason.VERIFY_PROBE)
    assert d.numbers["probe_reference"] == "renewed" and d.numbers["probe_need_instances"] == pytest.approx(1.1)


def test_a_revert_whose_load_is_gone_is_dropped_and_the_verdict_is_inconclusive() -> None:
    def world(n: int) -> Serving:  # as in the p95 test: the second instance doubles p95
        return Serving(1.5, 50, 50, 0.03 if n == 1 else 0.06)
    sim = VSim(world)
    sim.run(until=37)
    assert sim.changes() == [(5.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET)]
    # The after-window's last tick (38) already has another load: "worse" at the old load says
    # nothing about this one, so nothing is undone.
    sim.run(until=45, world=lambda n: Serving(0.3, 10, 10, 0.03))
    assert [(v, then) for _, v, then in sim.verdicts()] == [
        (Verdict.WORSE, "revert to 1; ceiling"), (Verdict.INCONCLUSIVE, "kept; revert to 1 dropped")]
    d = the_verdict(sim, Verdict.INCONCLUSIVE)
    assert d.numbers["verify_inconclusive_because"] == "load changed before the revert"
    assert d.numbers["verify_arrival_change_ratio"] < -0.25 and d.numbers["verdict"] == "inconclusive"
    assert sim.changes() == [(5.0, 1, 2, Reason.INFLIGHT_ABOVE_TARGET)] and sim.state.verify.want is None
    assert sim.state.verify.ceiling is None  # learned from the verdict dropped with it


def test_a_jump_that_lost_retries_one_above_where_it_started() -> None:
    # A CPU-bound model on 2 cores: 2 instances serve most, 4 fight over the cores and serve less
    # than 1 did. 8 clients panic 1 -> 4; that is worse than 1, so 2 is tried against the window
    # at 1: better, kept, and the ceiling (the load still asks for 4).
    served = {1: 100.0, 2: 140.0, 3: 110.0, 4: 75.0}
    sim = VSim(lambda n: Serving(8.0, served[n], served[n], 8.0 / served[n]))
    sim.run(until=120)
    assert [(c, r) for _, _, c, r in sim.changes()] == [(4, Reason.PANIC), (2, Reason.VERIFY_RETRY)]
    assert [(v, then) for _, v, then in sim.verdicts()] == [(Verdict.WORSE, "retry 2"),
                                                              (Verdict.IMPROVED, "kept; ceiling")]
    kept = the_verdict(sim, Verdict.IMPROVED)
    assert (kept.numbers["verify_throughput_before_per_s"], kept.numbers["verify_throughput_after_per_s"]) == (
        100, 140)  # judged against the window before the jump
    assert sim.instances == 2 and sim.state.verify.ceiling.instances == 2
    assert sim.decisions[-1].reason is Reason.CEILING
    # Had 2 lost too, it goes back to 1, the ceiling.
    served[2] = 80.0
    sim = VSim(lambda n: Serving(8.0, served[n], served[n], 8.0 / served[n]))
    sim.run(until=120)
    assert [c for _, _, c, _ in sim.changes()] == [4, 2, 1] and sim.state.verify.ceiling.instances == 1


def test_a_scale_down_after_a_drain_is_not_worse_for_its_fewer_completions() -> None:
    # Without the proxy (no arrival rate): the down streak's first seconds at 4 still complete a
    # drained backlog, 150/s, while in flight is already low; at 1 the same low load completes 20/s.
    # The lower count keeps up (0.4 in flight on 1), so fewer completions are the load's.
    before = verify.Window(span_s=10.0, instances=4, inflight_mean=0.45, arrival_per_s=None, triton_per_s=150.0,
                           proxy_per_s=None, p95_s=None, triton_latency_s=0.022, queue_ns_per_request=None,
                           error_ratio=0.0)
    after = replace(before, span_s=20.0, instances=1, inflight_mean=0.42, triton_per_s=20.0, triton_latency_s=0.021)
    verdict, numbers = verify.judge("down", before, after, VERIFYING.verify)
    assert verdict is Verdict.UNCHANGED and numbers["throughput_change_ratio"] < -0.8
    # ... but a lower count that queues did lose throughput: worse.
    busier = replace(before, inflight_mean=0.9)
    queued = replace(after, inflight_mean=1.05)
    assert verify.judge("down", busier, queued, VERIFYING.verify)[0] is Verdict.WORSE


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
            assert o.numbers and (o.verdict not in verify.REVERTING or o.then.startswith(("revert", "retry")))


# --- the loop: metric and /status --------------------------------------------------------

def with_useful_instances(loop: Loop, useful: int) -> Loop:
    """FakeTriton completes 50 requests per second per instance, up to `useful` instances."""
    done = {"count": 0, "compute_ns": 0}

    async def statistics(model: str) -> StatsSample:
        n = read_state(loop.triton.configs[model]).instances
        done["count"] += 50 * min(n, useful)
        done["compute_ns"] += n * 10**9  # each of n instances busy for the second (the useful ones' share)
        return StatsSample(inference_count=done["count"], execution_count=done["count"],
                           success_count=done["count"], fail_count=0, queue_ns=done["count"] * 1000,
                           compute_infer_ns=done["compute_ns"], last_inference_ms=0)

    loop.triton.statistics = statistics  # type: ignore[method-assign]
    # A closed loop: requests start as others complete.
    loop.sources.arrival_per_s = lambda model: 50.0 * min(read_state(loop.triton.configs[model]).instances, useful)
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
    # 1 -> 4 (panic) gained nothing; 2 was retried against the window at 1, gained nothing either.
    assert loop.metric("tritonpilot_verifications_total", model=MODEL, verdict="no-gain") == 2
    assert loop.metric("tritonpilot_decisions_total", model=MODEL, action="scale_down", reason="verify-retry") == 1
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
    out = capsys.readouterr().out  # on by default (issue 10)
    assert "verify each change: 10s settle, then 20s against the window before; a gain is >= 10%" in out
    assert "reverted on p95 > +25%, failed share up > 1 point(s)" in out and "ceiling for 600s" in out
    opted_out = tmp_path / "verify.yaml"
    opted_out.write_text(EXAMPLE.read_text().replace("    enabled: true                # judge",
                                                      "    enabled: false               # judge"))
    assert main(["check", str(opted_out)]) == 0
    assert "verify: off (changes are not judged, reverted or probed)" in capsys.readouterr().out


def test_verify_is_on_by_default() -> None:
    assert resolve(parse_policy({"models": {"m": None}}))["m"].verify.enabled is True
    assert VerifyPolicy().enabled is True
