"""Verify after acting: did a change help? Pure, time passed in; called from control/decide.py.

After each load-driven change of the instance count, once the new config serves and
`verify.settle_s` has passed, a window of `verify.window_s` after the change is compared
with the window before it (the ticks of the streak that asked for the change, at most
`window_s`, none from before the last reload finished):

- throughput: completed requests per second. Triton's success count when both windows
  have it (it also sees requests that bypass the proxy; counters restarted by a full
  reload are handled by control/signals.py), else the proxy's finished requests;
- latency: the proxy's p95 over the window (its latency buckets add up over ticks),
  else Triton's mean request time (success.ns + fail.ns per request);
- errors: the share of requests that failed (Triton's fail count or the proxy's non-OK
  codes, whichever is larger); queue time per request is reported, not judged (adding
  instances on a busy GPU moves time from the queue into compute);
- load: the in-flight mean and the arrival rate (requests the proxy saw start per second).

Verdicts (`Verdict`), in the order they are tested:
- "inconclusive": no throughput measured in a window, or the load moved: neither the
  in-flight mean nor the arrival rate stayed within `max_load_change_ratio` (a closed
  loop of clients keeps its in-flight count, an open loop its rate). Nothing is undone.
  Also a change superseded by another (panic, a bound) before its verdict.
- "worse": p95 grew by more than `max_p95_worsening_ratio`, the failed share rose by more
  than `max_error_increase_ratio`, or throughput fell by more than `min_gain_ratio` (after a
  load-driven scale-down only while the lower count queues: at least one in flight per instance).
  Reverted (a jump of several: retried one above, below); after a scale-up the count before it
  becomes the ceiling.
- "improved": throughput rose, or latency fell, by at least `min_gain_ratio`. Kept.
- "no-gain" (scale-up only): neither, while the model was saturated before (at least one
  request in flight per instance). Reverted, and the count before it is the ceiling.
- "unchanged": neither, without saturation (or a scale-down that did no harm). Kept.
- "holds" (a step-down probe): the lower count serves the load as well as the highest
  did (no "worse" against that window). The next probe follows.

A jump of several instances that was "worse" or "no-gain" may still have gained up to a
count between: instead of the full revert, one above the count before the jump is tried
(reason "verify-retry"), judged against the window before the jump like a scale-up. Kept
(not worse, not without gain) it is the ceiling; otherwise it is reverted to the count before
the jump, which becomes the ceiling. Panic and step wait while a retry is verified.

The ceiling (count, and the profile of the count above it): load-driven scale-ups do not
go past it until `ceiling_backoff_s` has passed or that profile changes; then the next
scale-up past it is one probe, verified like any other.

A jump of several instances that "improved" hides where the gain stopped: one count
down at a time is probed (reason "verify-probe"), each compared with the window at the
highest count, down to one above the count before the jump. The lowest count that holds
is kept, and is the ceiling: the first probe that does not hold is reverted to it.
Not while a step's load lasts (`probe_gate`): a probe waits until the load has been steady
for `settle_s` (no tick of that window away from its load by more than
`max_load_change_ratio`) and carries the load the probe will be judged against (still at
the highest count, a steady load that moved becomes the new reference). It is not tried
at all when the offered load's need, arrival rate x the least compute time per request
measured (before the jump included: a CPU-bound model's contention inflates it at the
higher counts) over the target, needs more than the lower count, or, unless every instance is
busy (completions x compute time per request), the in-flight mean does (it holds a request's
whole time, not only its compute): probing ends there.

A revert is for the load its verdict judged: when the last tick's load moved past
`max_load_change_ratio` from that window before the revert was done (the load dropped
while it waited, or in the window's last tick), it is dropped, and the change's verdict
becomes "inconclusive" (with the ceiling learned from it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal

from tritonpilot.control.policy import ResolvedModelPolicy, VerifyPolicy
from tritonpilot.control.signals import Signals
from tritonpilot.proxy.stats import quantile_from_buckets

Number = float | int | str | None
Kind = Literal["up", "down", "probe"]
_EPSILON = 1e-9


class Verdict(StrEnum):
    IMPROVED = "improved"
    UNCHANGED = "unchanged"
    HOLDS = "holds"
    NO_GAIN = "no-gain"
    WORSE = "worse"
    INCONCLUSIVE = "inconclusive"


REVERTING: frozenset[Verdict] = frozenset({Verdict.NO_GAIN, Verdict.WORSE})
# Instances busy (completions x compute time per request) at this share of the count: saturated.
SATURATED_RATIO = 0.9


@dataclass(frozen=True)
class Tick:
    """One tick's measurements, as verification adds them up."""

    at_s: float
    window_s: float
    instances: int
    inflight_mean: float                  # the load decide used (the larger of proxy and Triton)
    arrival_per_s: float | None = None    # requests the proxy saw start per second
    triton_completed: int | None = None
    triton_failed: int | None = None
    triton_request_s: float | None = None  # total time of the window's requests inside Triton
    triton_queue_ns: float | None = None
    triton_compute_ns: float | None = None  # compute time of the window's completed requests
    proxy_completed: int | None = None
    proxy_errors: int | None = None
    buckets: tuple[int, ...] | None = None  # the window's cumulative latency bucket counts


@dataclass(frozen=True)
class Window:
    """Ticks added up. Rates are per second over the ticks' total length."""

    span_s: float
    instances: int
    inflight_mean: float
    arrival_per_s: float | None
    triton_per_s: float | None
    proxy_per_s: float | None
    p95_s: float | None
    triton_latency_s: float | None
    queue_ns_per_request: float | None
    error_ratio: float | None
    service_s: float | None = None  # Triton's compute time per completed request


@dataclass(frozen=True)
class Pending:
    """A change waiting for its verdict."""

    kind: Kind
    from_instances: int
    to_instances: int
    changed_at_s: float
    before: Window   # for a probe: the window at the highest count
    retry: bool = False  # one count above a jump that was worse, judged against the window before the jump


@dataclass(frozen=True)
class Probe:
    """Step-down probing after a jump that improved."""

    reference: Window  # after the jump, at the highest count
    bottom: int        # the lowest count to try: one above the count before the jump
    lowest_held: int
    service_s: float | None = None  # the least compute time per request measured (before the jump included)


@dataclass(frozen=True)
class Ceiling:
    instances: int
    profile: str                            # the profile of instances + 1, which did not help
    parameters: tuple[tuple[str, str], ...]
    learned_s: float
    until_s: float


@dataclass(frozen=True)
class Want:
    """A change verification asks for: undo one, or probe one count down."""

    instances: int
    kind: Literal["revert", "probe", "retry"]
    after: Window | None = None  # a revert: the window its verdict judged (the load it is valid for)
    verdict: Outcome | None = None  # a revert: the verdict that asked for it
    before: Window | None = None    # a retry: the window before the jump, to judge it against


@dataclass(frozen=True)
class Outcome:
    """One verdict, with its numbers (keys prefixed verify_), for the log, /status and the metric."""

    verdict: Verdict
    at_s: float
    kind: Kind
    from_instances: int
    to_instances: int
    then: str                                # what follows: kept, revert to N, probe N, ...
    numbers: Mapping[str, Number]


@dataclass(frozen=True)
class VerifyState:
    ticks: tuple[Tick, ...] = ()
    pending: Pending | None = None
    want: Want | None = None
    probe: Probe | None = None
    ceiling: Ceiling | None = None
    last: Outcome | None = None


# ---------------------------------------------------------------------------------------
# Collecting and adding up

def tick_of(signals: Signals, inflight_mean: float, instances: int, max_age_s: float) -> Tick:
    now_s = signals.now_s
    proxy = signals.inflight if signals.inflight is not None and now_s - signals.inflight.at_s <= max_age_s else None
    triton = signals.triton if signals.triton is not None and now_s - signals.triton.at_s <= max_age_s else None
    window_s = proxy.window_s if proxy is not None else triton.window_s if triton is not None else 0.0
    buckets = proxy.latency_bucket_counts if proxy is not None else None
    return Tick(
        at_s=now_s, window_s=window_s, instances=instances, inflight_mean=inflight_mean,
        arrival_per_s=proxy.request_rate_per_s if proxy is not None else None,
        triton_completed=triton.success_count if triton is not None else None,
        triton_failed=triton.fail_count if triton is not None else None,
        triton_request_s=(triton.inflight_mean * triton.window_s
                          if triton is not None and triton.inflight_mean is not None else None),
        triton_queue_ns=(triton.queue_ns_per_request * triton.success_count
                         if triton is not None and triton.queue_ns_per_request is not None else None),
        triton_compute_ns=(triton.compute_infer_ns_per_request * triton.success_count
                           if triton is not None and triton.compute_infer_ns_per_request is not None else None),
        proxy_completed=buckets[-1] if buckets else None,
        proxy_errors=proxy.error_count if proxy is not None else None,
        buckets=buckets,
    )


def summarize(ticks: tuple[Tick, ...]) -> Window | None:
    span_s = sum(t.window_s for t in ticks)
    if not ticks or span_s <= 0:
        return None

    def total(name: str) -> Any:
        values = [getattr(t, name) for t in ticks]
        return None if any(v is None for v in values) else sum(values)

    def rate(name: str) -> float | None:
        value = total(name)
        return None if value is None else value / span_s

    triton_done, proxy_done = total("triton_completed"), total("proxy_completed")
    triton_failed, request_s = total("triton_failed"), total("triton_request_s")
    buckets = None
    if all(t.buckets for t in ticks) and len({len(t.buckets or ()) for t in ticks}) == 1:
        buckets = tuple(map(sum, zip(*(t.buckets or () for t in ticks))))
    done = triton_done if triton_done is not None else proxy_done
    errors = max((e for e in (triton_failed, total("proxy_errors")) if e is not None), default=None)
    queue_ns = total("triton_queue_ns")
    compute_ns = total("triton_compute_ns")
    arrival = [t.arrival_per_s for t in ticks]
    return Window(
        span_s=span_s, instances=ticks[-1].instances,
        inflight_mean=sum(t.inflight_mean * t.window_s for t in ticks) / span_s,
        arrival_per_s=(None if any(a is None for a in arrival)
                       else sum((a or 0.0) * t.window_s for a, t in zip(arrival, ticks)) / span_s),
        triton_per_s=rate("triton_completed"), proxy_per_s=rate("proxy_completed"),
        p95_s=quantile_from_buckets(buckets, 0.95) if buckets else None,
        triton_latency_s=(request_s / (triton_done + triton_failed)
                          if request_s is not None and triton_done and triton_failed is not None else None),
        queue_ns_per_request=queue_ns / triton_done if queue_ns is not None and triton_done else None,
        error_ratio=errors / (done + errors) if errors is not None and done is not None and done + errors else None,
        service_s=compute_ns / 1e9 / triton_done if compute_ns is not None and triton_done else None,
    )


def _throughput(before: Window, after: Window) -> tuple[float, float, str] | None:
    if before.triton_per_s is not None and after.triton_per_s is not None and before.triton_per_s > 0:
        return before.triton_per_s, after.triton_per_s, "triton"
    if before.proxy_per_s is not None and after.proxy_per_s is not None and before.proxy_per_s > 0:
        return before.proxy_per_s, after.proxy_per_s, "proxy"
    return None


def _latency(before: Window, after: Window) -> tuple[float, float, str] | None:
    if before.p95_s is not None and after.p95_s is not None:
        return before.p95_s, after.p95_s, "proxy-p95"
    if before.triton_latency_s is not None and after.triton_latency_s is not None:
        return before.triton_latency_s, after.triton_latency_s, "triton-mean"
    return None


def _change(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before <= _EPSILON:
        return None
    return (after - before) / before


# ---------------------------------------------------------------------------------------
# Judging

def load_moved(before: Window, after: Window, p: VerifyPolicy) -> tuple[bool, float | None, float | None]:
    """Whether two windows' loads differ: neither the in-flight mean nor the arrival rate stayed
    within max_load_change_ratio (a closed loop keeps its in-flight, an open loop its rate)."""
    inflight_change = _change(before.inflight_mean, after.inflight_mean)
    arrival_change = _change(before.arrival_per_s, after.arrival_per_s)
    moved = not any(c is not None and abs(c) <= p.max_load_change_ratio + _EPSILON
                    for c in (inflight_change, arrival_change))
    return moved, inflight_change, arrival_change


def judge(kind: Kind, before: Window, after: Window, p: VerifyPolicy) -> tuple[Verdict, dict[str, Number]]:
    """The verdict on one change (module docstring), with the numbers behind it."""
    numbers: dict[str, Number] = {
        "inflight_mean_before": before.inflight_mean, "inflight_mean_after": after.inflight_mean,
        "arrival_per_s_before": before.arrival_per_s, "arrival_per_s_after": after.arrival_per_s,
        "queue_ns_per_request_before": before.queue_ns_per_request,
        "queue_ns_per_request_after": after.queue_ns_per_request,
        "error_ratio_before": before.error_ratio, "error_ratio_after": after.error_ratio,
        "window_before_s": before.span_s, "window_after_s": after.span_s,
    }
    throughput = _throughput(before, after)
    if throughput is None:
        numbers["inconclusive_because"] = "no completed requests measured in both windows"
        return Verdict.INCONCLUSIVE, numbers
    tput_before, tput_after, source = throughput
    tput_change = _change(tput_before, tput_after)
    numbers.update(throughput_before_per_s=tput_before, throughput_after_per_s=tput_after,
                   throughput_source=source, throughput_change_ratio=tput_change)
    moved, inflight_change, arrival_change = load_moved(before, after, p)
    numbers.update(inflight_change_ratio=inflight_change, arrival_change_ratio=arrival_change)
    if moved:
        numbers["inconclusive_because"] = "load changed between the windows"
        return Verdict.INCONCLUSIVE, numbers
    latency = _latency(before, after)
    latency_change = _change(latency[0], latency[1]) if latency is not None else None
    if latency is not None:
        numbers.update(latency_before_s=latency[0], latency_after_s=latency[1], latency_kind=latency[2],
                       latency_change_ratio=latency_change)
    error_rise = (after.error_ratio - before.error_ratio
                  if after.error_ratio is not None and before.error_ratio is not None else None)
    numbers["error_ratio_increase"] = error_rise
    # After a load-driven scale-down, fewer completions are the load's doing unless the lower count
    # queues (in flight at least one per instance): a drain before the change inflates the window
    # before, and without the proxy's arrival rate the windows still compare by in-flight.
    lower_keeps_up = kind == "down" and after.inflight_mean < after.instances - _EPSILON
    worse = [why for why, bad in (
        ("latency", latency_change is not None and latency_change > p.max_p95_worsening_ratio + _EPSILON),
        ("errors", error_rise is not None and error_rise > p.max_error_increase_ratio + _EPSILON),
        ("throughput", tput_change is not None and tput_change < -p.min_gain_ratio - _EPSILON
         and not lower_keeps_up)) if bad]
    if worse:
        numbers["worse_in"] = ",".join(worse)
        return Verdict.WORSE, numbers
    if kind == "probe":
        return Verdict.HOLDS, numbers
    gained = ((tput_change is not None and tput_change >= p.min_gain_ratio - _EPSILON)
              or (latency_change is not None and latency_change <= -p.min_gain_ratio + _EPSILON))
    if gained:
        return Verdict.IMPROVED, numbers
    saturated = before.inflight_mean >= before.instances - _EPSILON
    numbers["saturated_before"] = int(saturated)
    if kind == "up" and saturated:
        return Verdict.NO_GAIN, numbers
    return Verdict.UNCHANGED, numbers


# ---------------------------------------------------------------------------------------
# One tick: record, expire the ceiling, judge a pending change

def observe(vs: VerifyState, signals: Signals, policy: ResolvedModelPolicy, current: int | None,
            inflight_mean: float | None) -> tuple[VerifyState, tuple[Outcome, ...]]:
    """Record this tick and, when its after-window is complete, give the pending change its verdict."""
    p = policy.verify
    now_s = signals.now_s
    if not p.enabled:
        return (VerifyState(), ()) if vs != VerifyState() else (vs, ())
    ticks = vs.ticks
    if current is not None and inflight_mean is not None:
        ticks = ticks + (tick_of(signals, inflight_mean, current, policy.max_signal_age_s),)
    # Kept: enough for a before-window and an after-window that is being filled.
    ticks = tuple(t for t in ticks if t.at_s > now_s - 2 * p.window_s - _EPSILON)
    vs = replace(vs, ticks=ticks)
    if vs.ceiling is not None and not ceiling_holds(vs.ceiling, policy, now_s):
        vs = replace(vs, ceiling=None)
    pending = vs.pending
    dropped = None if signals.reload_pending else _drop_stale_revert(vs, current, p)
    if dropped is not None:
        vs, outcome = dropped
        return vs, (outcome,)
    if pending is None or current is None or now_s <= pending.changed_at_s:
        return vs, ()
    last = signals.last_reload
    if signals.reload_pending:
        return vs, ()
    if last is None or last.finished_s < pending.changed_at_s or not last.ok or current != pending.to_instances:
        # Not applied (dry run, refused, failed, or changed by someone else): nothing to judge.
        return replace(vs, pending=None, want=None, probe=None), ()
    settled_s = last.finished_s + p.settle_s
    after_ticks = tuple(t for t in ticks if t.at_s - t.window_s >= settled_s - _EPSILON
                        and t.instances == pending.to_instances)
    after = summarize(after_ticks)
    if after is None or after.span_s < p.window_s - _EPSILON:
        return vs, ()
    verdict, numbers = judge(pending.kind, pending.before, after, p)
    vs, outcomes = _follow(vs, pending, verdict, numbers, after, policy, now_s)
    dropped = _drop_stale_revert(vs, current, p)  # the window's last tick already saw another load
    if dropped is not None:
        vs, outcome = dropped
        outcomes += (outcome,)
    return vs, outcomes


def _drop_stale_revert(vs: VerifyState, current: int | None,
                       p: VerifyPolicy) -> tuple[VerifyState, Outcome] | None:
    """A revert not done yet whose load is gone: the last tick's load moved past
    max_load_change_ratio from the window its verdict judged. What was worse at that load says
    nothing about this one, so the revert is dropped and the change's verdict is inconclusive."""
    want, ticks = vs.want, vs.ticks
    if (want is None or want.kind != "revert" or want.after is None or want.verdict is None or not ticks
            or current is None or current == want.instances):
        return None
    now = summarize(ticks[-1:])
    if now is None:
        return None
    moved, inflight_change, arrival_change = load_moved(want.after, now, p)
    if not moved:
        return None
    v = want.verdict
    outcome = Outcome(verdict=Verdict.INCONCLUSIVE, at_s=ticks[-1].at_s, kind=v.kind, from_instances=v.from_instances,
                      to_instances=v.to_instances, then=f"kept; revert to {want.instances} dropped",
                      numbers={"verify_inconclusive_because": "load changed before the revert",
                               "verify_reverting_for": str(v.verdict),
                               "verify_inflight_change_ratio": inflight_change,
                               "verify_arrival_change_ratio": arrival_change})
    ceiling = vs.ceiling if vs.ceiling is None or vs.ceiling.learned_s != v.at_s else None  # learned from it
    return replace(vs, want=None, ceiling=ceiling, last=outcome), outcome


def probe_gate(vs: VerifyState, policy: ResolvedModelPolicy,
               current: int) -> tuple[str | None, dict[str, Number], VerifyState]:
    """Why a wanted step-down probe must wait (None: it may go), with the numbers.

    Not while a step's load lasts: only once the load has been steady for settle_s (no tick of
    that window away from the window's load, max_load_change_ratio) and carries the load the
    probe is judged against (the window at the highest count; still at that count, the steady
    window replaces it), and the load's need fits the lower count ("need-above-probe": probing
    ends): the offered load's (arrival rate x the least compute time per request measured, over
    the target), and below saturation (completions x compute time per request < 0.9 x count:
    not every instance busy) the in-flight one too."""
    want, probe, p = vs.want, vs.probe, policy.verify
    if want is None or want.kind != "probe" or probe is None or not vs.ticks:
        return None, {}, vs
    now_s = vs.ticks[-1].at_s
    settling = tuple(t for t in vs.ticks if t.at_s > now_s - max(p.settle_s, _EPSILON))
    recent = summarize(settling)
    if recent is None or recent.span_s < p.settle_s - _EPSILON or any(t.instances != current for t in settling):
        return "settling", {}, vs
    if any(load_moved(recent, one, p)[0] for one in (summarize((t,)) for t in settling) if one is not None):
        return "settling", {}, vs
    moved, inflight_change, arrival_change = load_moved(probe.reference, recent, p)
    numbers: dict[str, Number] = {"probe_inflight_change_ratio": inflight_change,
                                  "probe_arrival_change_ratio": arrival_change}
    if moved and current == probe.reference.instances:
        probe = replace(probe, reference=recent)  # the load moved, steady again: judge against this
        vs = replace(vs, probe=probe)
        numbers["probe_reference"] = "renewed"
    elif moved:
        return "load-moved", numbers, vs
    target = policy.target_inflight_per_instance
    service_s = _least(probe.service_s, recent.service_s)
    arrival = recent.arrival_per_s if recent.arrival_per_s is not None else recent.triton_per_s
    need = arrival * service_s / target if service_s is not None and arrival is not None else None
    # Below saturation in-flight is the load too (a request's whole time, not only its compute).
    # Saturated (Little's law on the completions: every instance busy, as when contention
    # stretches each request), a queue holds in-flight up whatever the count: the offered need alone.
    busy = recent.triton_per_s * recent.service_s if recent.triton_per_s and recent.service_s else None
    saturated = (busy >= SATURATED_RATIO * current if busy is not None
                 else recent.inflight_mean >= current * target - _EPSILON)
    numbers["probe_saturated"] = int(saturated)
    if not saturated:
        need = max(need or 0.0, recent.inflight_mean / target)
    if need is not None:
        numbers.update(probe_need_instances=need, probe_service_s=service_s)
        if math.ceil(need - _EPSILON) > want.instances:
            return "need-above-probe", numbers, vs
    return None, numbers, vs


def end_probing(vs: VerifyState, policy: ResolvedModelPolicy, now_s: float) -> VerifyState:
    """Stop probing: the lowest count that held is kept, and is the ceiling."""
    probe = vs.probe
    vs = replace(vs, want=None, probe=None)
    return vs if probe is None else _learn(vs, probe.lowest_held, policy, now_s)


def _least(*values: float | None) -> float | None:
    return min((v for v in values if v is not None), default=None)


def _follow(vs: VerifyState, pending: Pending, verdict: Verdict, numbers: dict[str, Number], after: Window,
            policy: ResolvedModelPolicy, now_s: float) -> tuple[VerifyState, tuple[Outcome, ...]]:
    """What a verdict leads to: a revert, a probe, a ceiling, or nothing."""
    vs = replace(vs, pending=None, want=None)
    then = "kept"
    if pending.kind == "probe" and vs.probe is not None:
        probe = vs.probe
        if verdict is Verdict.HOLDS:
            probe = replace(probe, lowest_held=pending.to_instances, service_s=_least(probe.service_s, after.service_s))
            if pending.to_instances - 1 >= probe.bottom:
                vs, then = replace(vs, probe=probe, want=Want(pending.to_instances - 1, "probe")), \
                    f"probe {pending.to_instances - 1}"
            else:
                vs, then = _learn(replace(vs, probe=None), probe.lowest_held, policy, now_s), "kept; ceiling"
        elif verdict in REVERTING:
            vs = _learn(replace(vs, probe=None), probe.lowest_held, policy, now_s)
            vs, then = replace(vs, want=Want(probe.lowest_held, "revert")), f"revert to {probe.lowest_held}; ceiling"
        else:
            vs, then = replace(vs, probe=None), "kept; probing ends"
    elif verdict in REVERTING and pending.kind == "up" and pending.to_instances - pending.from_instances >= 2:
        # A jump of several that lost may still have gained up to a count between: one above
        # where it started is tried, against the same window before the jump.
        retry = pending.from_instances + 1
        vs, then = replace(vs, want=Want(retry, "retry", before=pending.before)), f"retry {retry}"
    elif verdict in REVERTING:
        vs, then = replace(vs, want=Want(pending.from_instances, "revert")), f"revert to {pending.from_instances}"
        if pending.kind == "up":
            vs, then = _learn(vs, pending.from_instances, policy, now_s), then + "; ceiling"
    elif pending.retry:
        # Better than before the jump, and the jump's top was worse: past this count nothing gained.
        vs, then = _learn(vs, pending.to_instances, policy, now_s), "kept; ceiling"
    elif verdict is Verdict.IMPROVED and pending.kind == "up" and pending.to_instances - pending.from_instances >= 2:
        probe = Probe(reference=after, bottom=pending.from_instances + 1, lowest_held=pending.to_instances,
                      service_s=_least(pending.before.service_s, after.service_s))
        vs, then = replace(vs, probe=probe, want=Want(pending.to_instances - 1, "probe")), \
            f"probe {pending.to_instances - 1}"
    outcome = Outcome(verdict=verdict, at_s=now_s, kind=pending.kind, from_instances=pending.from_instances,
                      to_instances=pending.to_instances, then=then,
                      numbers={f"verify_{k}": v for k, v in numbers.items()})
    if vs.want is not None and vs.want.kind == "revert":
        vs = replace(vs, want=replace(vs.want, after=after, verdict=outcome))
    return replace(vs, last=outcome), (outcome,)


def _learn(vs: VerifyState, instances: int, policy: ResolvedModelPolicy, now_s: float) -> VerifyState:
    """Remember `instances` as the ceiling (not at or past max_instances: nothing to hold back there)."""
    above = policy.profile_for(instances + 1)
    if instances >= policy.max_instances or above is None:
        return vs
    return replace(vs, ceiling=Ceiling(instances=instances, profile=above.name,
                                       parameters=tuple(sorted(above.parameters.items())), learned_s=now_s,
                                       until_s=now_s + policy.verify.ceiling_backoff_s))


def ceiling_holds(ceiling: Ceiling, policy: ResolvedModelPolicy, now_s: float) -> bool:
    """Until its backoff ends, and while the count above it still runs the profile that was tried."""
    above = policy.profile_for(ceiling.instances + 1)
    return (now_s < ceiling.until_s and above is not None and above.name == ceiling.profile
            and tuple(sorted(above.parameters.items())) == ceiling.parameters)


def ceiling_numbers(ceiling: Ceiling, now_s: float) -> dict[str, Number]:
    return {"ceiling_instances": ceiling.instances, "ceiling_profile": ceiling.profile,
            "ceiling_left_s": ceiling.until_s - now_s}


# ---------------------------------------------------------------------------------------
# A change was decided

def on_change(vs: VerifyState, kind: Kind | Literal["revert", "retry"] | None, from_instances: int, to_instances: int,
              since_s: float | None, last_reload_s: float | None, policy: ResolvedModelPolicy,
              now_s: float) -> tuple[VerifyState, tuple[Outcome, ...]]:
    """Start verifying a change (kind None: not verified, e.g. a bound or a profile fix).

    The before-window: this count's ticks of the last window_s, none from before the last
    reload finished, and for a load-driven change none from before its streak began."""
    p = policy.verify
    if not p.enabled:
        return vs, ()
    outcomes: tuple[Outcome, ...] = ()
    if vs.pending is not None:  # superseded before its verdict
        outcomes = (_inconclusive(vs.pending, now_s, "superseded by another change"),)
        vs = replace(vs, pending=None, probe=None if kind != "probe" else vs.probe)
    retry_before = vs.want.before if kind == "retry" and vs.want is not None else None
    want = vs.want if vs.want is not None and vs.want.instances != to_instances else None
    if kind in ("up", "down") and want is not None and want.kind == "probe":
        want = None  # the load moved the count while a probe waited: probing ends
        vs = replace(vs, probe=None)
    vs = replace(vs, want=want)

    def done(vs: VerifyState) -> tuple[VerifyState, tuple[Outcome, ...]]:
        return (replace(vs, last=outcomes[-1]) if outcomes else vs), outcomes

    if kind == "retry" and retry_before is not None:
        vs = replace(vs, pending=Pending(kind="up", from_instances=to_instances - 1, to_instances=to_instances,
                                         changed_at_s=now_s, before=retry_before, retry=True))
    if kind is None or kind == "revert" or kind == "retry":
        return done(vs)
    if kind == "probe" and vs.probe is not None:
        before: Window | None = vs.probe.reference
    else:
        before = summarize(tuple(
            t for t in vs.ticks
            if t.instances == from_instances and t.at_s > now_s - p.window_s - _EPSILON
            and (last_reload_s is None or t.at_s - t.window_s >= last_reload_s - _EPSILON)
            and (since_s is None or t.at_s >= since_s - _EPSILON)))
    if before is None or not (before.triton_per_s or before.proxy_per_s):
        # Nothing to compare with: say so now rather than wait for a window that cannot tell.
        outcome = Outcome(verdict=Verdict.INCONCLUSIVE, at_s=now_s, kind=kind, from_instances=from_instances,
                          to_instances=to_instances, then="kept",
                          numbers={"verify_inconclusive_because": "no completed requests measured before the change"})
        return replace(vs, probe=None, last=outcome), outcomes + (outcome,)
    return done(replace(vs, pending=Pending(kind=kind, from_instances=from_instances, to_instances=to_instances,
                                            changed_at_s=now_s, before=before)))


def _inconclusive(pending: Pending, now_s: float, because: str) -> Outcome:
    return Outcome(verdict=Verdict.INCONCLUSIVE, at_s=now_s, kind=pending.kind,
                   from_instances=pending.from_instances, to_instances=pending.to_instances, then="kept",
                   numbers={"verify_inconclusive_because": because})


def pending_numbers(vs: VerifyState, policy: ResolvedModelPolicy, signals: Signals) -> dict[str, Number]:
    """While a change waits for its verdict: which, and how far its after-window is."""
    pending = vs.pending
    if pending is None:
        return {}
    out: dict[str, Number] = {"verifying": pending.kind, "verifying_instances": pending.to_instances}
    last = signals.last_reload
    if last is not None and last.finished_s >= pending.changed_at_s:
        out["verify_window_ends_in_s"] = last.finished_s + policy.verify.settle_s + policy.verify.window_s \
            - signals.now_s
    return out


def status(vs: VerifyState, now_s: float) -> dict[str, Any]:
    """/status: the last verdict, the ceiling in force, what is being verified or probed."""
    last = vs.last
    ceiling = vs.ceiling
    return {
        "last_verdict": None if last is None else {
            "verdict": str(last.verdict), "at_s": round(last.at_s, 3), "kind": last.kind,
            "instances": f"{last.from_instances} -> {last.to_instances}", "then": last.then,
            "numbers": dict(last.numbers)},
        "ceiling": None if ceiling is None else {
            "instances": ceiling.instances, "profile_above": ceiling.profile,
            "learned_s": round(ceiling.learned_s, 3), "expires_in_s": round(ceiling.until_s - now_s, 3)},
        "verifying": None if vs.pending is None else {
            "kind": vs.pending.kind, "instances": f"{vs.pending.from_instances} -> {vs.pending.to_instances}",
            "changed_at_s": round(vs.pending.changed_at_s, 3)},
        "probing": None if vs.probe is None else {"lowest_held": vs.probe.lowest_held, "bottom": vs.probe.bottom},
        "wants": None if vs.want is None else {"instances": vs.want.instances, "kind": vs.want.kind},
    }
