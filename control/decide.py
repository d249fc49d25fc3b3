"""The decision core: one model, one tick, `decide(signals, policy, state) -> (decision, state)`.

Pure: time comes in `signals.now_s`; no I/O, clocks or logging here, so tests run
timelines in no time. The loop keeps one `State` per model and feeds each decision
to the actuator (and the log) when `decision.changes`.

How a decision is made (every threshold is a policy key, control/policy.py):

1. No data -> hold. Without a fresh live config (the current count) or a fresh
   in-flight measurement (the proxy's or Triton's), the decision is HOLD "no-data"
   and the delay clocks restart: an excess we did not see cannot be said to have lasted.
2. Load -> desired count. The load is the larger of the two in-flight means over the
   window: the proxy's (its exact count of the requests it relays) and Triton's
   (Little's law on Triton's own statistics, control/signals.py), so requests that
   reach Triton without the proxy count too; a missing or stale one is left out.
   Panic (step 3) reads only the proxy's count: Triton's figure lags and comes in
   bursts (a request's time is added when it completes), so without the proxy (or
   when it sees less) a rise waits for the up delay.
   `ideal = load / target_inflight_per_instance`
   (instances needed to hold the target); `desired = ceil(ideal)` clamped to
   [min_instances, max_instances]. At `n` instances the tolerated band is
   `n - 1 < ideal <= n x (1 + tolerance_ratio)`:
   - up is wanted only above the band, to `desired` (which lands inside the new band);
   - down is wanted when `desired < n`, i.e. n - 1 instances would already hold the
     target, to the highest `desired` of the last scale_down_delay_s, counting only
     samples whose window lies inside the down streak: the sample that starts the
     streak averages the load before it with the load after, so after a step from
     high to low load it would ask for a count between the two and the way down
     would take two steps;
   - inside the band nothing is wanted: a steady load settles. The band is wider
     than one instance, so the count that an up or down lands on is a fixed point
     for that load (in-flight that stays constant; in-flight that grows with
     queueing at the lower count flaps only if the queue adds more than the
     tolerance, with a period of at least scale_down_delay_s).
2b. The offered load (Little's law on the arrivals, issue 10): with the proxy's arrival
   rate (requests started per second) and a service time (Triton's compute_infer time per
   request, the last one measured), `offered_ideal = arrival_rate x service_s / target`,
   the instances the load needs before any queue builds. Without either, only in-flight counts.
   - Step up: the loop marks the proxy's arrivals once more late in each interval
     (control/loop.py), so a tick also knows the rate of its window's last part. When that
     rate's need is >= panic_threshold_ratio x n (the same line as panic), the whole window's
     need is above the band (a burst inside the last slice alone is no step), and the proxy has
     more than n x target in flight right now (a burst that is already over is no step), the
     decision is PANIC_UP "step" at once: no up delay, no panic window, so a step is met at
     the first tick after it (the next one when it came too late in the window). The count
     serves the new rate and drains, within max(cooldown_s, the last reload's duration), the
     queue the step leaves: what is in flight now beyond that rate's need, plus
     (rate - n / service_s) x the last reload's duration (what queues while the reload runs),
     so the count after the step is reached in one move.
   - Way down: the down condition holds only while the offered need is below n as well, and
     each sample of the down streak contributes the offered need (a backlog that drains
     keeps in-flight high for a while; the arrivals already show the new load), never below
     the latest sample's in-flight need (a queue that lasts at this count is load). So a step
     down is one move to the steady need.
3. Delays, in elapsed seconds of `now_s` (not ticks): up once the up condition has
   held for `scale_up_delay_s`, down once the down condition has held for
   `scale_down_delay_s`. Panic: in-flight >= panic_threshold_ratio x (n x target)
   for `panic_window_s` scales up without the up delay. A count outside
   [min, max] (e.g. from config.pbtxt) is corrected at once.
4. The profile follows from the count (the first rule holding it). A change of count,
   of profile, or both, is one decision; a live profile that differs from the one for
   the current count is a REPROFILE at the same count.
5. Gates, which turn a wanted change into BLOCKED (the clocks keep running):
   a reload pending -> "reload-pending"; a change still waiting for its verdict
   (step 8) -> "verifying" (bounds always pass; panic and step pass unless a step-down probe
   or a retry is being verified, and the verification it interrupts is "inconclusive"); inside
   the cooldown -> "cooldown". The cooldown follows each change and each finished
   reload, and lasts max(cooldown_s, the last measured reload duration).
6. Step and guards, which may shrink the change or block it:
   - a load-driven scale-up (in-flight, panic or step) stops at a learned ceiling (step 8) -> "ceiling";
   - at most `max_step` instances per decision;
   - no new instance while GPU utilization >= gpu_utilization_ceiling_ratio -> "gpu-bound";
   - GPU memory: after the reload, free memory must stay >= the headroom, where a full
     reload briefly adds a whole new copy (count x bytes per instance) and an in-place
     update adds only the new instances. Bytes per instance are learned from reloads
     (`observe_reload`: memory on the model's GPUs before the reload against a sample
     taken verify.settle_s after it finished, when a full reload's old copy is gone,
     over the instances added on them); before that, only today's headroom can be checked. The largest
     count that fits is taken, else "memory-headroom";
   - the count + profile of a reload that failed less than failed_config_backoff_s ago
     is skipped (the next count toward the current one is tried), else
     "failed-config-backoff".
   Strategy: "full" always; "update" for count-only changes (a profile change needs a
   full reload); "auto" full when the memory headroom holds two copies, else update.
   Without GPU data the GPU guards cannot apply and the numbers say so.
   The GPU figures are those of the model's own GPUs (`signals.gpu`, chosen by
   control/gpus.py from its instance_group; numbers gpu_scope, gpu_uuids): the busiest
   one's utilization, the fullest one's memory, so a busy neighbour GPU does not hold
   it. A KIND_CPU model has no GPU guard (numbers: gpu "not-used").
7. The pod-wide reload budget (`signals.budget`, shared by every model; the loop
   fills it): a change that would start a reload while max_concurrent_reloads are in
   progress, or while max_reloads_per_minute started in the last 60 s (a sliding
   window), is BLOCKED "reload-budget"; it goes once a reload finishes or the oldest
   start leaves the window (numbers: reloads_in_progress, reloads_last_minute, the
   limits, budget_limited_by, budget_free_in_s). Last, so only a change that would
   otherwise start a reload waits for the budget.
8. Verify after acting (`policy.verify`, control/verify.py has the rules): each
   load-driven count change is judged once its reload finished, settle_s passed and a
   window_s window after it is complete, against the window before it: "improved",
   "unchanged", "no-gain", "worse", "inconclusive", or "holds" for a step-down probe.
   The verdict rides on that tick's decision (`verdicts`, numbers `verify_*`). A
   "no-gain" or "worse" verdict asks for the count before the change, reason
   "verify-revert" (a jump of several asks for one above the count before it first,
   reason "verify-retry"); a jump of several instances that "improved" asks for one count
   down at a time, reason "verify-probe". A probe waits until the load has been steady
   for verify.settle_s and carries the load it will be judged against, and is not tried
   when the offered need (2b) does not fit the lower count: probing then ends at the
   lowest count that held (numbers probe_waits, probe_ends). A revert whose load is gone
   (the last tick's load moved past max_load_change_ratio from the window its verdict
   judged) is dropped, verdict "inconclusive". These wants go through every gate and
   guard above like any change; a load-driven change of the count ends the probing.
   Reverts are not verified again.
9. The leak watchdog (`policy.leak`, control/leak.py has the rules): after each reload
   of this model, once settled, Triton's memory (`signals.memory`, process resident
   memory, and `signals.gpu`) is sampled per config (count, profile); a sample is
   compared with the last one at the same config only when no other model reloaded in
   between. Memory that rose by more than the threshold at `min_reloads` returns in a
   row marks the model leak-suspected: from then on every wanted change, bounds and
   panic included, is BLOCKED "leak-suspected" (numbers `leak_*`), before any other
   gate, until `leak.enabled` is turned off.

Every decision carries `numbers`: the measurements and thresholds behind it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal, Protocol, TypeVar

from tritonpilot.control import leak, verify
from tritonpilot.control.policy import Profile, ResolvedModelPolicy
from tritonpilot.control.signals import RELOAD_RATE_WINDOW_S, GpuSample, LiveConfig, ReloadBudget, Signals

Number = float | int | str | None
Strategy = Literal["full", "update"]
# ceil(2.0000000001) must stay 2: in-flight means are float sums.
_EPSILON = 1e-9


class Action(StrEnum):
    HOLD = "hold"               # nothing wanted
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    PANIC_UP = "panic_up"       # up without the up delay
    REPROFILE = "reprofile"     # same count, the profile the count calls for
    BLOCKED = "blocked"         # a change was wanted; a gate or guard refused it


CHANGE_ACTIONS: frozenset[Action] = frozenset({Action.SCALE_UP, Action.SCALE_DOWN, Action.PANIC_UP,
                                               Action.REPROFILE})


class Reason(StrEnum):
    NO_DATA = "no-data"
    WITHIN_BAND = "within-band"
    AT_MAX = "at-max"
    AT_MIN = "at-min"
    WAITING_UP_DELAY = "waiting-up-delay"
    WAITING_DOWN_DELAY = "waiting-down-delay"
    INFLIGHT_ABOVE_TARGET = "inflight-above-target"
    INFLIGHT_BELOW_TARGET = "inflight-below-target"
    PANIC = "panic"
    STEP = "step"                    # the offered load (arrival rate x service time) jumped: up at once
    BELOW_MIN = "below-min"
    ABOVE_MAX = "above-max"
    PROFILE_MISMATCH = "profile-mismatch"
    RELOAD_PENDING = "reload-pending"
    COOLDOWN = "cooldown"
    GPU_BOUND = "gpu-bound"
    MEMORY_HEADROOM = "memory-headroom"
    FAILED_CONFIG_BACKOFF = "failed-config-backoff"
    RELOAD_BUDGET = "reload-budget"
    VERIFYING = "verifying"          # a change waits for its verdict (control/verify.py)
    VERIFY_REVERT = "verify-revert"  # undo a change whose verdict was no-gain or worse
    VERIFY_PROBE = "verify-probe"    # one count down after a jump, while throughput holds
    VERIFY_RETRY = "verify-retry"    # a jump of several that lost: one above where it started is tried
    CEILING = "ceiling"              # a learned ceiling holds the count
    LEAK_SUSPECTED = "leak-suspected"  # memory kept rising across reloads (control/leak.py)


@dataclass(frozen=True)
class State:
    """What one model's decisions remember between ticks. Start with `State()`."""

    up_since_s: float | None = None        # the up condition has held since
    down_since_s: float | None = None      # the down condition has held since
    down_from_s: float | None = None       # the streak's first sample ended here: later windows saw only the streak
    down_needs: tuple[tuple[float, int], ...] = ()  # (sample at_s, desired) of the streak's samples since then
    panic_since_s: float | None = None     # the panic condition has held since
    service_s: float | None = None         # Triton's compute time per request, the last one measured
    changed_at_s: float | None = None      # the last decision that changed something
    memory_per_instance_bytes: float | None = None  # learned by observe_reload
    verify: verify.VerifyState = verify.VerifyState()  # windows, the change being verified, the ceiling
    leak: leak.LeakState = leak.LeakState()  # memory samples per config after reloads, a suspected leak


@dataclass(frozen=True)
class Decision:
    """One model's decision at one tick. Counts: current (Triton says), desired (the
    load asks, clamped to [min, max]), decided (to apply; = current unless `changes`)."""

    model: str
    now_s: float
    action: Action
    reason: Reason
    current_instances: int | None
    current_profile: str | None      # the policy profile the live parameters match, if any
    desired_instances: int | None
    decided_instances: int | None
    profile: Profile | None          # the profile for decided_instances
    strategy: Strategy | None        # how to reload, when `changes`
    numbers: Mapping[str, Number] = field(default_factory=dict)
    verdicts: tuple[verify.Outcome, ...] = ()  # verdicts given at this tick (step 8)

    @property
    def changes(self) -> bool:
        return self.action in CHANGE_ACTIONS


def decide(signals: Signals, policy: ResolvedModelPolicy, state: State) -> tuple[Decision, State]:
    """One model's decision at `signals.now_s` and the state for its next tick (the
    module docstring has the rules, in the order they apply here)."""
    config = _fresh(signals.config, signals.now_s, policy.max_signal_age_s)
    measured = _measured_load(signals, policy)
    vs, outcomes = verify.observe(state.verify, signals, policy, config.instances if config is not None else None,
                                  measured.inflight_mean if measured is not None else None)
    state = replace(state, verify=vs, leak=leak.observe(state.leak, signals, policy))
    decision, state = _decide(signals, policy, state)
    outcomes += decision.verdicts
    if not outcomes:
        return decision, state
    numbers = dict(decision.numbers)
    for outcome in outcomes:
        numbers.update(outcome.numbers)
    numbers["verdict"] = str(outcomes[-1].verdict)
    return replace(decision, numbers=numbers, verdicts=outcomes), state


def _decide(signals: Signals, policy: ResolvedModelPolicy, state: State) -> tuple[Decision, State]:
    now_s = signals.now_s
    numbers = _signal_numbers(signals, policy, state)
    config = _fresh(signals.config, now_s, policy.max_signal_age_s)
    inflight = _measured_load(signals, policy)
    if config is None or inflight is None:
        numbers["missing"] = ",".join(name for name, v in (("config", config), ("inflight", inflight)) if v is None)
        current = config.instances if config is not None else None
        decision = _decision(policy, now_s, Action.HOLD, Reason.NO_DATA, config, None, current, None, numbers)
        return decision, replace(state, up_since_s=None, down_since_s=None, down_from_s=None, down_needs=(),
                                 panic_since_s=None)

    current = config.instances
    state = _remember_service(state, signals, policy)
    offered = _offered(signals, policy, state, current)
    load = _load(inflight.inflight_mean, inflight.panic_inflight_mean, current, policy, inflight.source, offered)
    state = _track(state, load, current, inflight, policy, now_s)
    numbers.update(_load_numbers(load, current, policy, state, now_s))

    action, reason, target = _wanted(load, state, policy, current, config, now_s)
    action, reason, target, state = _verify_wants(action, reason, target, state, current, policy, numbers, now_s)
    if action is Action.HOLD:
        return _decision(policy, now_s, action, reason, config, load.desired, current, None, numbers), state

    if state.leak.suspected is not None:  # every reload would leak again: bounds and panic included
        return _blocked(policy, now_s, Reason.LEAK_SUSPECTED, config, load.desired, numbers, reason, target), state
    if signals.reload_pending:
        return _blocked(policy, now_s, Reason.RELOAD_PENDING, config, load.desired, numbers, reason, target), state
    if _verifying_holds(state.verify.pending, reason):
        numbers.update(verify.pending_numbers(state.verify, policy, signals))
        return _blocked(policy, now_s, Reason.VERIFYING, config, load.desired, numbers, reason, target), state
    cooldown_left_s = _cooldown_end_s(signals, policy, state) - now_s
    if cooldown_left_s > 0:
        numbers["cooldown_left_s"] = cooldown_left_s
        return _blocked(policy, now_s, Reason.COOLDOWN, config, load.desired, numbers, reason, target), state
    ceiling = state.verify.ceiling
    if ceiling is not None and reason in _LOAD_UP and target > ceiling.instances:
        numbers.update(verify.ceiling_numbers(ceiling, now_s))
        if ceiling.instances <= current:
            return _blocked(policy, now_s, Reason.CEILING, config, load.desired, numbers, reason, target), state
        target, numbers["limited_by"] = ceiling.instances, "ceiling"

    stepped = _step(current, target, policy.max_step)
    if stepped != target:
        numbers["limited_by"] = "max_step"
    # min_instances is the operator's floor, so only load-driven growth waits for the GPU.
    if stepped > current and reason is not Reason.BELOW_MIN and _gpu_bound(signals.gpu, now_s, policy):
        return _blocked(policy, now_s, Reason.GPU_BOUND, config, load.desired, numbers, reason, stepped), state

    plan = _plan(current, stepped, config, signals, policy, state, numbers)
    if isinstance(plan, Reason):
        return _blocked(policy, now_s, plan, config, load.desired, numbers, reason, stepped), state
    decided, strategy = plan
    if _over_budget(signals.budget, now_s, numbers):
        return _blocked(policy, now_s, Reason.RELOAD_BUDGET, config, load.desired, numbers, reason, decided), state
    decision = _decision(policy, now_s, action, reason, config, load.desired, decided, strategy, numbers)
    since = state.down_since_s if reason is Reason.INFLIGHT_BELOW_TARGET else min(
        (t for t in (state.up_since_s, state.panic_since_s) if t is not None), default=None)
    vs, outcomes = verify.on_change(state.verify, _VERIFY_KIND.get(reason), current, decided, since,
                                    signals.last_reload.finished_s if signals.last_reload is not None else None,
                                    policy, now_s)
    decision = replace(decision, verdicts=outcomes)
    new_state = replace(state, changed_at_s=now_s, verify=vs)
    if decided < current:  # the next step down waits a whole delay again
        new_state = replace(new_state, down_since_s=None, down_from_s=None, down_needs=())
    return decision, new_state


def observe_reload(state: State, before_bytes: int | None, after_bytes: int | None,
                   instances_before: int, instances_after: int) -> State:
    """Learn GPU memory per instance from a finished reload: GPU memory used before it
    started and after it settled (after a full reload, once the old copy is gone).

    Measurements that cannot say anything (no GPU data, same count, memory that went the
    wrong way because something else moved) leave the estimate as it was; a new one is
    averaged with the old, so one noisy reading does not dominate.
    """
    if before_bytes is None or after_bytes is None or instances_after == instances_before:
        return state
    per_instance = (after_bytes - before_bytes) / (instances_after - instances_before)
    if per_instance <= 0:
        return state
    old = state.memory_per_instance_bytes
    return replace(state, memory_per_instance_bytes=per_instance if old is None else (old + per_instance) / 2)


# ---------------------------------------------------------------------------------------
# Steps of `decide`

_LOAD_UP: frozenset[Reason] = frozenset({Reason.INFLIGHT_ABOVE_TARGET, Reason.PANIC, Reason.STEP})
_BOUNDS: frozenset[Reason] = frozenset({Reason.BELOW_MIN, Reason.ABOVE_MAX})
_VERIFY_KIND: dict[Reason, verify.Kind | Literal["revert", "retry"]] = {
    Reason.INFLIGHT_ABOVE_TARGET: "up", Reason.PANIC: "up", Reason.STEP: "up", Reason.INFLIGHT_BELOW_TARGET: "down",
    Reason.VERIFY_PROBE: "probe", Reason.VERIFY_REVERT: "revert", Reason.VERIFY_RETRY: "retry"}


def _verify_wants(action: Action, reason: Reason, target: int, state: State, current: int,
                  policy: ResolvedModelPolicy, numbers: dict[str, Number],
                  now_s: float) -> tuple[Action, Reason, int, State]:
    """A revert or a probe verification asks for takes the place of what the load asks,
    except a bound, and except a scale-down past a probe (nothing left to probe). A probe
    waits while the load is not steady (control/verify.py, probe_gate)."""
    vs = state.verify
    want = vs.want
    if want is None or reason in _BOUNDS:
        return action, reason, target, state
    done = want.instances == current or not policy.min_instances <= want.instances <= policy.max_instances
    overtaken = want.kind == "probe" and action is Action.SCALE_DOWN and target <= want.instances
    if done or overtaken:
        probe = None if want.kind == "probe" else vs.probe
        return action, reason, target, replace(state, verify=replace(vs, want=None, probe=probe))
    waits, probe_numbers, vs = verify.probe_gate(vs, policy, current)
    numbers.update(probe_numbers)
    state = replace(state, verify=vs)
    if waits == "need-above-probe":  # the load needs the lowest count that held: probing ends there
        numbers.update(probe_ends="need-above-probe", probe_instances=want.instances)
        vs = verify.end_probing(vs, policy, now_s)
        return action, reason, target, replace(state, verify=vs)
    if waits is not None:
        numbers.update(probe_waits=waits, probe_instances=want.instances)
        return action, reason, target, state
    wanted = Action.SCALE_UP if want.instances > current else Action.SCALE_DOWN
    reason = {"revert": Reason.VERIFY_REVERT, "retry": Reason.VERIFY_RETRY}.get(want.kind, Reason.VERIFY_PROBE)
    return wanted, reason, want.instances, state


def _verifying_holds(pending: verify.Pending | None, reason: Reason) -> bool:
    """Whether a change waiting for its verdict holds this one (module docstring, step 5)."""
    if pending is None or reason in _BOUNDS:
        return False
    return not (reason in (Reason.PANIC, Reason.STEP) and pending.kind != "probe" and not pending.retry)

class _Timed(Protocol):
    @property
    def at_s(self) -> float: ...  # read-only: the samples are frozen dataclasses


_Sample = TypeVar("_Sample", bound=_Timed)


def _fresh(sample: _Sample | None, now_s: float, max_age_s: float) -> _Sample | None:
    """The sample, unless it is missing or older than max_age_s (then: no data)."""
    if sample is None or now_s - sample.at_s > max_age_s:
        return None
    return sample


@dataclass(frozen=True)
class _Measured:
    """The in-flight load the decision uses, over the window (at_s - window_s, at_s]."""
    at_s: float
    window_s: float
    inflight_mean: float                # the larger of the proxy's and Triton's
    panic_inflight_mean: float | None   # the proxy's alone; None: no proxy sample
    source: str                         # "proxy" or "triton": whose mean it is


def _measured_load(signals: Signals, policy: ResolvedModelPolicy) -> _Measured | None:
    """The larger of the fresh in-flight means (module docstring, step 2); None if neither."""
    proxy = _fresh(signals.inflight, signals.now_s, policy.max_signal_age_s)
    triton = _fresh(signals.triton, signals.now_s, policy.max_signal_age_s)
    triton_mean = triton.inflight_mean if triton is not None else None
    if proxy is not None and (triton is None or triton_mean is None or proxy.inflight_mean >= triton_mean):
        return _Measured(proxy.at_s, proxy.window_s, proxy.inflight_mean, proxy.inflight_mean, "proxy")
    if triton is None or triton_mean is None:
        return None
    return _Measured(triton.at_s, triton.window_s, triton_mean,
                     proxy.inflight_mean if proxy is not None else None, "triton")


@dataclass(frozen=True)
class _Offered:
    """The offered load (module docstring, step 2b): Little's law on the proxy's arrivals."""
    arrival_per_s: float          # requests the proxy saw start per second over the window
    recent_arrival_per_s: float | None  # over the window's last part (the loop samples it)
    service_s: float              # Triton's compute time per request
    ideal: float                  # arrival x service / target: instances the load needs, no queue
    desired: int                  # ceil(ideal), clamped to [min, max]
    step_ideal: float             # the latest arrival rate's need plus draining the backlog
    step_desired: int             # ceil(step_ideal), clamped
    backlog: float                # requests expected queued once a reload now has finished
    step: bool                    # a step: up at once to step_desired


def _remember_service(state: State, signals: Signals, policy: ResolvedModelPolicy) -> State:
    """Keep the last measured service time: a window without completions has none of its own."""
    triton = _fresh(signals.triton, signals.now_s, policy.max_signal_age_s)
    if triton is None or triton.compute_infer_ns_per_request is None or triton.compute_infer_ns_per_request <= 0:
        return state
    return replace(state, service_s=triton.compute_infer_ns_per_request / 1e9)


def _offered(signals: Signals, policy: ResolvedModelPolicy, state: State, current: int) -> _Offered | None:
    """The need from the arrival rate and the service time; None without either."""
    proxy = _fresh(signals.inflight, signals.now_s, policy.max_signal_age_s)
    service_s = state.service_s
    if proxy is None or proxy.request_rate_per_s is None or service_s is None:
        return None
    target = policy.target_inflight_per_instance
    arrival = max(0.0, proxy.request_rate_per_s)
    recent = None if proxy.recent_rate_per_s is None else max(0.0, proxy.recent_rate_per_s)
    ideal = arrival * service_s / target
    rate = recent if recent is not None else arrival
    # A step is seen by its arrivals before a queue has built: at least panic_threshold_ratio x
    # this count's capacity at the target still arriving at the end of the window, the window as a
    # whole above the band (a burst inside one short slice is not a step), and this count's
    # instances holding more than their target right now.
    step = (rate * service_s / target >= current * policy.panic_threshold_ratio - _EPSILON
            and ideal > current * (1 + policy.tolerance_ratio) + _EPSILON
            and proxy.inflight_now > current * target + _EPSILON)
    # Size the move to serve the new rate and to drain, within the quiet time after it, what is
    # queued now plus what queues while the reload runs (the current count, one request per
    # instance at a time, serves current / service_s per second meanwhile).
    last = signals.last_reload
    reload_s = last.duration_s if last is not None else 0.0
    backlog = max(0.0, proxy.inflight_now - rate * service_s) + max(0.0, rate - current / service_s) * reload_s
    drain_s = max(policy.cooldown_s, reload_s)
    extra_per_s = backlog / drain_s if drain_s > 0 else (math.inf if backlog > 0 else 0.0)
    step_ideal = (rate + extra_per_s) * service_s / target
    step_desired = _clamp(step_ideal, policy)
    return _Offered(arrival_per_s=arrival, recent_arrival_per_s=recent, service_s=service_s, ideal=ideal,
                    desired=_clamp(ideal, policy), step_ideal=step_ideal, step_desired=step_desired,
                    backlog=backlog, step=step and step_desired > current)


def _clamp(ideal: float, policy: ResolvedModelPolicy) -> int:
    """ceil(ideal), at least 1, within [min, max]."""
    unclamped = max(1, math.ceil(ideal - _EPSILON)) if math.isfinite(ideal) else policy.max_instances
    return min(policy.max_instances, max(policy.min_instances, unclamped))


@dataclass(frozen=True)
class _Load:
    ideal: float       # instances that would hold in-flight per instance at the target
    unclamped: int     # ceil(ideal), at least 1
    desired: int       # unclamped, clamped to [min, max]
    above_band: bool   # ideal > n x (1 + tolerance): up is wanted
    panic: bool        # the proxy's in-flight >= panic_threshold_ratio x n x target
    inflight_mean: float = 0.0
    source: str = "proxy"
    offered: _Offered | None = None  # the need from the arrivals; None: not measured

    @property
    def steady_need(self) -> int:
        """One sample's need for the way down: the offered load's where measured (a backlog
        that drains lifts in-flight, not the load), else the in-flight one."""
        return self.offered.desired if self.offered is not None else self.desired


def _load(inflight_mean: float, panic_inflight_mean: float | None, current: int, policy: ResolvedModelPolicy,
          source: str = "proxy", offered: _Offered | None = None) -> _Load:
    ideal = max(0.0, inflight_mean) / policy.target_inflight_per_instance
    unclamped = max(1, math.ceil(ideal - _EPSILON))
    desired = _clamp(ideal, policy)
    target = policy.target_inflight_per_instance
    panic_ideal = None if panic_inflight_mean is None else max(0.0, panic_inflight_mean) / target
    return _Load(
        ideal=ideal, unclamped=unclamped, desired=desired,
        above_band=ideal > current * (1 + policy.tolerance_ratio) + _EPSILON,
        panic=panic_ideal is not None and panic_ideal >= current * policy.panic_threshold_ratio - _EPSILON,
        inflight_mean=inflight_mean, source=source, offered=offered,
    )


def _track(state: State, load: _Load, current: int, inflight: _Measured, policy: ResolvedModelPolicy,
           now_s: float) -> State:
    """Advance the clocks: each condition's start while it holds, None once it breaks;
    and, while down holds, the needs of its samples (see `_down_target`)."""
    up = load.above_band and load.desired > current
    panic = up and load.panic
    # Down while the in-flight need and, where measured, the offered need are below the count.
    down = load.desired < current and (load.offered is None or load.offered.desired < current)
    needs: tuple[tuple[float, int], ...]
    if not down:
        down_from_s, needs = None, ()
    elif state.down_since_s is None or state.down_from_s is None:
        down_from_s, needs = inflight.at_s, ()  # this sample's window began before the streak
    else:
        down_from_s = state.down_from_s
        # Only needs below the current count: a count changed by someone else makes higher ones meaningless.
        needs = tuple((at_s, n) for at_s, n in state.down_needs
                      if n < current and at_s >= now_s - policy.scale_down_delay_s - _EPSILON)
        if inflight.at_s - inflight.window_s >= down_from_s - _EPSILON and inflight.at_s > down_from_s:
            needs += ((inflight.at_s, load.steady_need),)
    return replace(
        state,
        up_since_s=_since(state.up_since_s, up, now_s),
        panic_since_s=_since(state.panic_since_s, panic, now_s),
        down_since_s=_since(state.down_since_s, down, now_s),
        down_from_s=down_from_s,
        down_needs=needs,
    )


def _down_target(state: State, load: _Load) -> int:
    """The highest need among the down streak's samples of the last scale_down_delay_s
    (each window wholly inside the streak; the offered load's need where measured), and at
    least this sample's in-flight need (a queue that lasts at this count is load)."""
    return max(max((n for _, n in state.down_needs), default=load.steady_need), load.desired)


def _since(since_s: float | None, holds: bool, now_s: float) -> float | None:
    if not holds:
        return None
    return now_s if since_s is None else since_s


def _lasted(since_s: float | None, delay_s: float, now_s: float) -> bool:
    return since_s is not None and now_s - since_s >= delay_s


def _wanted(load: _Load, state: State, policy: ResolvedModelPolicy, current: int, config: LiveConfig,
            now_s: float) -> tuple[Action, Reason, int]:
    """What the load and the bounds ask for, before gates and guards."""
    if current < policy.min_instances:
        return Action.SCALE_UP, Reason.BELOW_MIN, max(policy.min_instances, load.desired)
    if current > policy.max_instances:
        return Action.SCALE_DOWN, Reason.ABOVE_MAX, policy.max_instances
    if load.offered is not None and load.offered.step:
        return Action.PANIC_UP, Reason.STEP, load.offered.step_desired
    if _lasted(state.panic_since_s, policy.panic_window_s, now_s):
        return Action.PANIC_UP, Reason.PANIC, load.desired
    if _lasted(state.up_since_s, policy.scale_up_delay_s, now_s):
        return Action.SCALE_UP, Reason.INFLIGHT_ABOVE_TARGET, load.desired
    if _lasted(state.down_since_s, policy.scale_down_delay_s, now_s):
        return Action.SCALE_DOWN, Reason.INFLIGHT_BELOW_TARGET, _down_target(state, load)
    wanted_profile = policy.profile_for(current)
    if wanted_profile is not None and not policy.parameters_match(wanted_profile, config.parameters):
        return Action.REPROFILE, Reason.PROFILE_MISMATCH, current
    if state.up_since_s is not None:
        return Action.HOLD, Reason.WAITING_UP_DELAY, current
    if state.down_since_s is not None:
        return Action.HOLD, Reason.WAITING_DOWN_DELAY, current
    if load.above_band and current >= policy.max_instances:
        return Action.HOLD, Reason.AT_MAX, current
    if load.unclamped < current <= policy.min_instances:
        return Action.HOLD, Reason.AT_MIN, current
    return Action.HOLD, Reason.WITHIN_BAND, current


def _cooldown_end_s(signals: Signals, policy: ResolvedModelPolicy, state: State) -> float:
    """Quiet until max(cooldown_s, last reload's duration) after the last change and
    after the last finished reload."""
    last = signals.last_reload
    length_s = max(policy.cooldown_s, last.duration_s if last is not None else 0.0)
    ends = [t + length_s for t in (state.changed_at_s, last.finished_s if last is not None else None)
            if t is not None]
    return max(ends, default=-math.inf)


def _step(current: int, target: int, max_step: int) -> int:
    return max(current - max_step, min(current + max_step, target))


def _gpu_bound(gpu: GpuSample | None, now_s: float, policy: ResolvedModelPolicy) -> bool:
    gpu = _fresh(gpu, now_s, policy.max_signal_age_s)
    return (gpu is not None and gpu.utilization_ratio is not None
            and gpu.utilization_ratio >= policy.gpu_utilization_ceiling_ratio)


def _candidates(current: int, target: int) -> range:
    """Counts to try, the asked-for one first, then each one step closer to current."""
    if target > current:
        return range(target, current, -1)
    if target < current:
        return range(target, current)
    return range(current, current + 1)  # same count: a profile change


def _plan(current: int, target: int, config: LiveConfig, signals: Signals, policy: ResolvedModelPolicy,
          state: State, numbers: dict[str, Number]) -> tuple[int, Strategy] | Reason:
    """The first candidate count (and a reload strategy) that no guard refuses, else why not."""
    gpu = _fresh(signals.gpu, signals.now_s, policy.max_signal_age_s)
    skipped: list[Reason] = []
    for count in _candidates(current, target):
        profile = policy.profile_for(count)
        if profile is None:
            continue  # only in an unvalidated policy
        if _in_failed_backoff(signals, policy, count, profile):
            skipped.append(Reason.FAILED_CONFIG_BACKOFF)
            continue
        profile_changes = not policy.parameters_match(profile, config.parameters)
        for strategy in _strategies(policy, profile_changes):
            if _fits(strategy, current, count, gpu, policy, state, numbers):
                if skipped:
                    numbers["limited_by"] = str(skipped[0])
                return count, strategy
        skipped.append(Reason.MEMORY_HEADROOM)
    return Reason.MEMORY_HEADROOM if Reason.MEMORY_HEADROOM in skipped or not skipped else skipped[0]


def _in_failed_backoff(signals: Signals, policy: ResolvedModelPolicy, count: int, profile: Profile) -> bool:
    last = signals.last_reload
    return (last is not None and not last.ok and signals.now_s < last.finished_s + policy.failed_config_backoff_s
            and last.instances == count and last.profile == profile.name)


def _strategies(policy: ResolvedModelPolicy, profile_changes: bool) -> tuple[Strategy, ...]:
    if profile_changes or policy.reload_strategy == "full":
        return ("full",)  # flags only change by loading a new copy
    if policy.reload_strategy == "update":
        return ("update",)
    return ("full", "update")  # auto: full where two copies fit


def _fits(strategy: Strategy, current: int, count: int, gpu: GpuSample | None, policy: ResolvedModelPolicy,
          state: State, numbers: dict[str, Number]) -> bool:
    """Would GPU memory keep its headroom through this reload?"""
    if gpu is None or gpu.memory_used_bytes is None or gpu.memory_total_bytes is None:
        return True  # no GPU data: nothing to check against (numbers say gpu no-data)
    headroom = _headroom_bytes(gpu.memory_total_bytes, policy)
    per_instance = state.memory_per_instance_bytes
    new_instances = count if strategy == "full" else max(0, count - current)
    if new_instances == 0:
        return True  # an in-place scale-down only frees memory
    added = 0.0 if per_instance is None else new_instances * per_instance  # unknown: today's headroom only
    numbers["memory_added_bytes"] = added  # of the last reload checked
    return gpu.memory_used_bytes + added <= gpu.memory_total_bytes - headroom


def _over_budget(budget: ReloadBudget | None, now_s: float, numbers: dict[str, Number]) -> bool:
    """Would one more reload now break the pod-wide budget? The numbers say how full it is."""
    if budget is None:
        return False
    started = budget.started_in_window(now_s)
    numbers.update(reloads_in_progress=budget.in_progress, max_concurrent_reloads=budget.max_concurrent,
                   reloads_last_minute=len(started), max_reloads_per_minute=budget.max_per_minute)
    if budget.in_progress >= budget.max_concurrent:
        numbers["budget_limited_by"] = "max_concurrent_reloads"
        return True
    if budget.max_per_minute is not None and len(started) >= budget.max_per_minute:
        numbers["budget_limited_by"] = "max_reloads_per_minute"
        # The next start is allowed once enough of the window's starts have left it.
        numbers["budget_free_in_s"] = started[len(started) - budget.max_per_minute] + RELOAD_RATE_WINDOW_S - now_s
        return True
    return False


def _headroom_bytes(total_bytes: int, policy: ResolvedModelPolicy) -> float:
    return max(policy.gpu_memory_headroom_ratio * total_bytes, float(policy.gpu_memory_headroom_bytes))


# ---------------------------------------------------------------------------------------
# Building decisions and their numbers

def _decision(policy: ResolvedModelPolicy, now_s: float, action: Action, reason: Reason, config: LiveConfig | None,
              desired: int | None, decided: int | None, strategy: Strategy | None,
              numbers: dict[str, Number]) -> Decision:
    return Decision(
        model=policy.model, now_s=now_s, action=action, reason=reason,
        current_instances=config.instances if config is not None else None,
        current_profile=policy.live_profile(config.parameters) if config is not None else None,
        desired_instances=desired, decided_instances=decided,
        profile=policy.profile_for(decided) if decided is not None else None,
        strategy=strategy, numbers=numbers,
    )


def _blocked(policy: ResolvedModelPolicy, now_s: float, reason: Reason, config: LiveConfig, desired: int,
             numbers: dict[str, Number], wanted: Reason, wanted_instances: int) -> Decision:
    """A wanted change refused: the numbers keep what was wanted and why."""
    numbers["wanted"] = str(wanted)
    numbers["wanted_instances"] = wanted_instances
    return _decision(policy, now_s, Action.BLOCKED, reason, config, desired, config.instances, None, numbers)


def _signal_numbers(signals: Signals, policy: ResolvedModelPolicy, state: State) -> dict[str, Number]:
    out: dict[str, Number] = {}
    if signals.inflight is not None:
        s = signals.inflight
        out.update(inflight_mean=s.inflight_mean, inflight_max=s.inflight_max, inflight_now=s.inflight_now,
                   request_rate_per_s=s.request_rate_per_s, latency_p95_s=s.latency_p95_s,
                   inflight_age_s=signals.now_s - s.at_s)
    if signals.triton is not None:
        t = signals.triton
        out.update(success_count=t.success_count, fail_count=t.fail_count,
                   queue_ns_per_request=t.queue_ns_per_request,
                   compute_infer_ns_per_request=t.compute_infer_ns_per_request,
                   triton_inflight_mean=t.inflight_mean, triton_age_s=signals.now_s - t.at_s)
    gpu = _fresh(signals.gpu, signals.now_s, policy.max_signal_age_s)
    if gpu is None:
        out["gpu"] = "no-data"
    elif gpu.scope == "cpu":
        out["gpu"] = "not-used"  # KIND_CPU instances only: no GPU guard
    else:
        out.update(gpu_utilization_ratio=gpu.utilization_ratio, gpu_memory_used_bytes=gpu.memory_used_bytes,
                   gpu_memory_total_bytes=gpu.memory_total_bytes, gpu_scope=gpu.scope,
                   gpu_uuids=",".join(gpu.uuids))
        if gpu.memory_total_bytes is not None:
            out["gpu_memory_headroom_bytes"] = _headroom_bytes(gpu.memory_total_bytes, policy)
    out["memory_per_instance_bytes"] = state.memory_per_instance_bytes
    if signals.memory is not None and signals.memory.process_bytes is not None:
        out["triton_process_bytes"] = signals.memory.process_bytes
    if state.leak.suspected is not None:
        out.update(leak.numbers(state.leak.suspected))
    if signals.last_reload is not None:
        out["last_reload_duration_s"] = signals.last_reload.duration_s
        out["last_reload_ok"] = int(signals.last_reload.ok)
    return out


def _load_numbers(load: _Load, current: int, policy: ResolvedModelPolicy, state: State,
                  now_s: float) -> dict[str, Number]:
    target = policy.target_inflight_per_instance
    out: dict[str, Number] = {
        "load_inflight_mean": load.inflight_mean,
        "load_source": load.source,
        "ideal_instances": load.ideal,
        "target_inflight_per_instance": target,
        "capacity_inflight": current * target,
        "scale_up_above_inflight": current * target * (1 + policy.tolerance_ratio),
        "scale_down_at_or_below_inflight": (current - 1) * target,
        "panic_at_inflight": current * target * policy.panic_threshold_ratio,
    }
    offered = load.offered
    if offered is not None:
        out.update(offered_arrival_per_s=offered.arrival_per_s, recent_arrival_per_s=offered.recent_arrival_per_s,
                   service_s=offered.service_s, offered_ideal_instances=offered.ideal,
                   offered_desired_instances=offered.desired,
                   step_at_ideal_instances=current * policy.panic_threshold_ratio)
        if offered.step:
            out.update(step_ideal_instances=offered.step_ideal, step_backlog=offered.backlog)
    for name, since in (("up_for_s", state.up_since_s), ("down_for_s", state.down_since_s),
                        ("panic_for_s", state.panic_since_s)):
        if since is not None:
            out[name] = now_s - since
    return out
