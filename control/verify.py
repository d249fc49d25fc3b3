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
  than `max_error_increase_ratio`, or throughput fell by more than `min_gain_ratio`.
  Reverted; after a scale-up the count before it becomes the ceiling.
- "improved": throughput rose, or latency fell, by at least `min_gain_ratio`. Kept.
- "no-gain" (scale-up only): neither, while the model was saturated before (at least one
  request in flight per instance). Reverted, and the count before it is the ceiling.
- "unchanged": neither, without saturation (or a scale-down that did no harm). Kept.
- "holds" (a step-down probe): the lower count serves the load as well as the highest
  did (no "worse" against that window). The next probe follows.

The ceiling (count, and the profile of the count above it): load-driven scale-ups do not
go past it until `ceiling_backoff_s` has passed or that profile changes; then the next
scale-up past it is one probe, verified like any other.

A jump of several instances that "improved" hides where the gain stopped: while the
load stays, one count down at a time is probed (reason "verify-probe"), each compared
with the window at the highest count, down to one above the count before the jump.
The lowest count that holds is kept, and is the ceiling: the first probe that does not
hold is reverted to it.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Pending:
    """A change waiting for its verdict."""

    kind: Kind
    from_instances: int
    to_instances: int
    changed_at_s: float
    before: Window   # for a probe: the window at the highest count


@dataclass(frozen=True)
class Probe:
    """Step-down probing after a jump that improved."""

    reference: Window  # after the jump, at the highest count
    bottom: int        # the lowest count to try: one above the count before the jump
    lowest_held: int


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
    kind: Literal["revert", "probe"]


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
    inflight_change = _change(before.inflight_mean, after.inflight_mean)
    arrival_change = _change(before.arrival_per_s, after.arrival_per_s)
    numbers.update(inflight_change_ratio=inflight_change, arrival_change_ratio=arrival_change)
    if not any(c is not None and abs(c) <= p.max_load_change_ratio + _EPSILON
               for c in (inflight_change, arrival_change)):
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
    worse = [why for why, bad in (
        ("latency", latency_change is not None and latency_change > p.max_p95_worsening_ratio + _EPSILON),
        ("errors", error_rise is not None and error_rise > p.max_error_increase_ratio + _EPSILON),
        ("throughput", tput_change is not None and tput_change < -p.min_gain_ratio - _EPSILON)) if bad]
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
    return _follow(vs, pending, verdict, numbers, after, policy, now_s)


def _follow(vs: VerifyState, pending: Pending, verdict: Verdict, numbers: dict[str, Number], after: Window,
            policy: ResolvedModelPolicy, now_s: float) -> tuple[VerifyState, tuple[Outcome, ...]]:
    """What a verdict leads to: a revert, a probe, a ceiling, or nothing."""
    vs = replace(vs, pending=None, want=None)
    then = "kept"
    if pending.kind == "probe" and vs.probe is not None:
        probe = vs.probe
        if verdict is Verdict.HOLDS:
            probe = replace(probe, lowest_held=pending.to_instances)
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
    elif verdict in REVERTING:
        vs, then = replace(vs, want=Want(pending.from_instances, "revert")), f"revert to {pending.from_instances}"
        if pending.kind == "up":
            vs, then = _learn(vs, pending.from_instances, policy, now_s), then + "; ceiling"
    elif verdict is Verdict.IMPROVED and pending.kind == "up" and pending.to_instances - pending.from_instances >= 2:
        probe = Probe(reference=after, bottom=pending.from_instances + 1, lowest_held=pending.to_instances)
        vs, then = replace(vs, probe=probe, want=Want(pending.to_instances - 1, "probe")), \
            f"probe {pending.to_instances - 1}"
    outcome = Outcome(verdict=verdict, at_s=now_s, kind=pending.kind, from_instances=pending.from_instances,
                      to_instances=pending.to_instances, then=then,
                      numbers={f"verify_{k}": v for k, v in numbers.items()})
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

def on_change(vs: VerifyState, kind: Kind | Literal["revert"] | None, from_instances: int, to_instances: int,
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
    want = vs.want if vs.want is not None and vs.want.instances != to_instances else None
    vs = replace(vs, want=want)
    if kind == "revert" or kind is None:
        return (replace(vs, last=outcomes[-1]) if outcomes else vs), outcomes
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
    vs = replace(vs, pending=Pending(kind=kind, from_instances=from_instances, to_instances=to_instances,
                                     changed_at_s=now_s, before=before))
    return (replace(vs, last=outcomes[-1]) if outcomes else vs), outcomes


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
