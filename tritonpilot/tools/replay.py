"""`tritonpilot replay FILE --policy P [--compare P2]`: the decision core over a recording
(`tritonpilot serve --record FILE`, control/record.py), per policy: the decision timeline,
the number of changes, instance-seconds and the time the load spent above the target.

Two ways to replay, chosen per policy:

- verbatim, when every tick of the recording was decided under this policy (the hash of each
  model's resolved policy matches): `decide` gets the recorded `Signals` as they are, with
  the replay's own `State` threaded through (and the recorded GPU-memory observations, the
  one change to `State` that does not come from `decide`). That reproduces the live decisions
  exactly, and the replay says whether it did (exit 1 when it did not: the decision core
  changed since the recording).
- simulated, for any other policy: the recorded live config, reload records and budget show
  what the *recorded* controller did, so the replay keeps its own: a change takes effect
  after a reload duration (the recorded one when the recorded controller started the same
  reload at the same tick, else the median of the model's recorded reloads, else of every
  model's, else at the next tick), with `reload_pending` until then and a `ReloadRecord`
  when it ends; the pod-wide budget counts the replay's own reloads under the recorded limits.

What a replay cannot know: how the load would have answered other counts (it replays the
same offered load: the recorded in-flight, Triton and GPU samples, so queueing that more
instances would have removed is still in the load); what GPU memory other counts would
have used; whether a reload Triton refused or timed out would have done so for this policy
(simulated reloads always succeed).

Metrics are sampled per tick: each tick weighs the time since the model's previous tick,
with the instance count the tick saw and the load of the window that ends there; "above
target" is load > instances x target_inflight_per_instance (the policy's own target).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tritonpilot import exits
from tritonpilot.control.decide import Decision, Reason, State, decide, observe_reload
from tritonpilot.control.policy import (
    PolicyError,
    ResolvedModelPolicy,
    load_policy,
    resolve,
)
from tritonpilot.control.record import (
    Entry,
    Header,
    Observe,
    PolicyLine,
    Recording,
    RecordingError,
    Tick,
    decision_json,
    iter_runs,
    policy_sha256,
    read_recording,
)
from tritonpilot.control.signals import RELOAD_RATE_WINDOW_S, LiveConfig, ReloadBudget, ReloadRecord, Signals

# What "the same decision" means when a verbatim replay is checked against the recording.
COMPARED = ("action", "reason", "current_instances", "desired_instances", "decided_instances", "profile", "strategy")


@dataclass(frozen=True)
class Replayed:
    """One model's replayed decision at one tick."""

    run: int                    # which controller run of the recording (each header starts one)
    t_s: float                  # since the run's first tick
    tick: Tick                  # as recorded
    decision: Decision          # as replayed
    instances: int | None       # the count decide saw (recorded, or simulated)
    load: float | None          # the larger of the recorded in-flight means (proxy's, Triton's)


@dataclass
class Totals:
    changes: int = 0
    instance_s: float = 0.0
    above_target_s: float = 0.0
    span_s: float = 0.0

    def add(self, other: Totals) -> None:
        self.changes += other.changes
        self.instance_s += other.instance_s
        self.above_target_s += other.above_target_s
        self.span_s += other.span_s


@dataclass
class Result:
    label: str
    verbatim: bool
    decisions: list[Replayed] = field(default_factory=list)
    mismatches: list[tuple[Replayed, Mapping[str, Any]]] = field(default_factory=list)
    totals: dict[str, Totals] = field(default_factory=dict)
    skipped_models: set[str] = field(default_factory=set)


# ---------------------------------------------------------------------------------------
# The replay (no I/O)

@dataclass(frozen=True)
class BudgetLimits:
    """The policy's control.max_concurrent_reloads and control.max_reloads_per_minute."""

    max_concurrent: int
    max_per_minute: int | None


def is_verbatim(recording: Recording, policies: Mapping[str, ResolvedModelPolicy],
                limits: BudgetLimits | None = None) -> bool:
    """Every tick decided under the very policy given: the same resolved policy (hash) and,
    when `limits` are given, the same reload budget limits."""
    shas = {name: policy_sha256(p) for name, p in policies.items()}
    ticks = recording.ticks
    return bool(ticks) and all(shas.get(t.model) == t.policy_sha256 and (
        limits is None or t.signals.budget is None
        or (t.signals.budget.max_concurrent, t.signals.budget.max_per_minute) == (
            limits.max_concurrent, limits.max_per_minute)) for t in ticks)


def replay(recording: Recording, policies: Mapping[str, ResolvedModelPolicy], label: str = "",
           limits: BudgetLimits | None = None) -> Result:
    """`limits`: the replayed policy's reload budget (None: the recorded one's)."""
    verbatim = is_verbatim(recording, policies, limits)
    result = Result(label=label, verbatim=verbatim,
                    skipped_models={t.model for t in recording.ticks if t.model not in policies})
    durations = _Durations(recording)
    for index, entries in enumerate(iter_runs(recording), start=1):
        if verbatim:
            _replay_verbatim(index, entries, policies, result)
        else:
            _Simulation(index, policies, durations, result, limits).run(entries)
    result.totals = totals(result.decisions, policies)
    return result


def _load(signals: Signals) -> float | None:
    means = [signals.inflight.inflight_mean] if signals.inflight is not None else []
    if signals.triton is not None and signals.triton.inflight_mean is not None:
        means.append(signals.triton.inflight_mean)
    return max(means) if means else None


def _replay_verbatim(run: int, entries: Sequence[Entry], policies: Mapping[str, ResolvedModelPolicy],
                     result: Result) -> None:
    states: dict[str, State] = {}
    first_s: float | None = None
    for entry in entries:
        if isinstance(entry, Observe) and entry.model in policies:
            states[entry.model] = observe_reload(states.get(entry.model, State()), entry.before_bytes,
                                                 entry.after_bytes, entry.instances_before, entry.instances_after)
        elif isinstance(entry, Tick) and entry.model in policies:
            first_s = entry.now_s if first_s is None else first_s
            decision, states[entry.model] = decide(entry.signals, policies[entry.model],
                                                   states.get(entry.model, State()))
            config = entry.signals.config
            replayed = Replayed(run, entry.now_s - first_s, entry, decision,
                                config.instances if config is not None else None, _load(entry.signals))
            result.decisions.append(replayed)
            ours = decision_json(decision)
            if any(ours[k] != entry.decision.get(k) for k in COMPARED):
                result.mismatches.append((replayed, entry.decision))


class _Durations:
    """Reload durations seen in the recording: each recorded reload (model, started at,
    instances, profile) -> how long it took, and the medians."""

    def __init__(self, recording: Recording) -> None:
        self.by_start: dict[tuple[str, float, int, str], float] = {}
        finished: dict[str, list[ReloadRecord]] = {}
        started: dict[str, list[tuple[float, int, str]]] = {}
        for tick in recording.ticks:
            last = tick.signals.last_reload
            seen = finished.setdefault(tick.model, [])
            if last is not None and last.ok and (not seen or seen[-1] != last):
                seen.append(last)
            d = tick.decision
            if d.get("action") in ("scale_up", "scale_down", "panic_up", "reprofile"):
                started.setdefault(tick.model, []).append((tick.now_s, d["decided_instances"], d["profile"]))
        for model, starts in started.items():
            for at_s, instances, profile in starts:
                done = next((r for r in finished.get(model, ()) if r.finished_s >= at_s
                             and r.instances == instances and r.profile == profile), None)
                if done is not None:
                    self.by_start[(model, at_s, instances, profile)] = done.duration_s
        self.median_by_model = {m: statistics.median(r.duration_s for r in rs) for m, rs in finished.items() if rs}
        every = [r.duration_s for rs in finished.values() for r in rs]
        self.median_all = statistics.median(every) if every else 0.0

    def of(self, model: str, at_s: float, instances: int, profile: str) -> float:
        exact = self.by_start.get((model, at_s, instances, profile))
        if exact is not None:
            return exact
        return self.median_by_model.get(model, self.median_all)


@dataclass
class _Pending:
    instances: int
    profile: str
    parameters: Mapping[str, str]
    started_s: float
    duration_s: float


@dataclass
class _SimModel:
    state: State = field(default_factory=State)
    instances: int | None = None                  # None: no config seen yet
    parameters: Mapping[str, str] | None = None   # the managed parameters applied; None: as recorded
    pending: _Pending | None = None
    last_reload: ReloadRecord | None = None
    budget_wait_since_s: float | None = None


class _Simulation:
    """One controller run replayed under another policy: its own config, reloads and budget."""

    def __init__(self, run: int, policies: Mapping[str, ResolvedModelPolicy], durations: _Durations,
                 result: Result, limits: BudgetLimits | None) -> None:
        self.run_index = run
        self.limits = limits
        self.policies = policies
        self.durations = durations
        self.result = result
        self.models: dict[str, _SimModel] = {}
        self.starts: list[float] = []
        self.first_s: float | None = None

    def run(self, entries: Sequence[Entry]) -> None:
        group: list[Tick] = []
        for entry in entries:
            if isinstance(entry, Tick) and group and entry.now_s != group[0].now_s:
                self._tick(group)
                group = []
            if isinstance(entry, Tick):
                if entry.model in self.policies:
                    group.append(entry)
            elif isinstance(entry, Observe) and entry.model in self.policies:
                m = self._model(entry.model)
                m.state = observe_reload(m.state, entry.before_bytes, entry.after_bytes, entry.instances_before,
                                         entry.instances_after)
            elif isinstance(entry, Header):
                continue
        if group:
            self._tick(group)

    def _model(self, name: str) -> _SimModel:
        return self.models.setdefault(name, _SimModel())

    def _tick(self, group: list[Tick]) -> None:
        now_s = group[0].now_s
        self.first_s = now_s if self.first_s is None else self.first_s
        for m in self.models.values():  # reloads that are over, collected as the loop does
            p = m.pending
            if p is not None and p.started_s + p.duration_s <= now_s + 1e-9:
                m.instances, m.parameters, m.pending = p.instances, p.parameters, None
                m.last_reload = ReloadRecord(finished_s=now_s, duration_s=p.duration_s, ok=True,
                                             instances=p.instances, profile=p.profile)
        self.starts = [t for t in self.starts if t > now_s - RELOAD_RATE_WINDOW_S]
        for tick in sorted(group, key=self._budget_key):  # stable: the rest keep the recorded order
            self._decide(tick, now_s)

    def _budget_key(self, tick: Tick) -> tuple[bool, float]:
        since = self._model(tick.model).budget_wait_since_s
        return (since is None, since if since is not None else 0.0)

    def _decide(self, tick: Tick, now_s: float) -> None:
        policy = self.policies[tick.model]
        m = self._model(tick.model)
        recorded = tick.signals
        config = self._config(m, recorded.config, policy)
        budget = recorded.budget
        if budget is not None:
            limits = self.limits or BudgetLimits(budget.max_concurrent, budget.max_per_minute)
            budget = ReloadBudget(in_progress=sum(s.pending is not None for s in self.models.values()),
                                  max_concurrent=limits.max_concurrent, recent_starts_s=tuple(self.starts),
                                  max_per_minute=limits.max_per_minute)
        signals = replace(recorded, config=config, reload_pending=m.pending is not None,
                          last_reload=m.last_reload, budget=budget)
        decision, m.state = decide(signals, policy, m.state)
        assert self.first_s is not None
        self.result.decisions.append(Replayed(self.run_index, now_s - self.first_s, tick, decision,
                                              config.instances if config is not None else None, _load(recorded)))
        if decision.reason is Reason.RELOAD_BUDGET:
            m.budget_wait_since_s = m.budget_wait_since_s if m.budget_wait_since_s is not None else now_s
        else:
            m.budget_wait_since_s = None
        if decision.changes and decision.decided_instances is not None and decision.profile is not None:
            m.pending = _Pending(decision.decided_instances, decision.profile.name, dict(decision.profile.parameters),
                                 now_s, self.durations.of(tick.model, now_s, decision.decided_instances,
                                                          decision.profile.name))
            self.starts.append(now_s)

    @staticmethod
    def _config(m: _SimModel, recorded: LiveConfig | None, policy: ResolvedModelPolicy) -> LiveConfig | None:
        """The recorded config (its time, the parameters nobody manages) with the replay's count
        and managed parameters; None where the recording had none (Triton did not answer)."""
        if recorded is None:
            return None
        if m.instances is None:
            m.instances = recorded.instances
        parameters = dict(recorded.parameters)
        if m.parameters is not None:
            parameters = {k: v for k, v in parameters.items() if k not in policy.managed_parameter_keys}
            parameters.update(m.parameters)
        return LiveConfig(at_s=recorded.at_s, instances=m.instances, parameters=parameters)


def totals(decisions: Sequence[Replayed], policies: Mapping[str, ResolvedModelPolicy]) -> dict[str, Totals]:
    out: dict[str, Totals] = {}
    previous: dict[tuple[int, str], float] = {}
    for r in decisions:
        model = r.tick.model
        t = out.setdefault(model, Totals())
        key = (r.run, model)
        dt = r.tick.now_s - previous[key] if key in previous else 0.0
        previous[key] = r.tick.now_s
        t.changes += int(r.decision.changes)
        t.span_s += dt
        if r.instances is not None:
            t.instance_s += r.instances * dt
            target = policies[model].target_inflight_per_instance
            if r.load is not None and r.load > r.instances * target:
                t.above_target_s += dt
    return out


def recorded_totals(recording: Recording) -> dict[str, Totals]:
    """The same figures for what the recorded controller did (its own policy's target)."""
    targets: dict[str, float] = {}
    for entry in recording.entries:
        if isinstance(entry, PolicyLine):
            targets[entry.sha256] = float(entry.policy["target_inflight_per_instance"])
    out: dict[str, Totals] = {}
    previous: dict[tuple[int, str], float] = {}
    for run, entries in enumerate(iter_runs(recording), start=1):
        for tick in (e for e in entries if isinstance(e, Tick)):
            t = out.setdefault(tick.model, Totals())
            key = (run, tick.model)
            dt = tick.now_s - previous[key] if key in previous else 0.0
            previous[key] = tick.now_s
            t.changes += int(tick.decision.get("action") in ("scale_up", "scale_down", "panic_up", "reprofile"))
            t.span_s += dt
            config, load = tick.signals.config, _load(tick.signals)
            if config is not None:
                t.instance_s += config.instances * dt
                target = targets.get(tick.policy_sha256)
                if target is not None and load is not None and load > config.instances * target:
                    t.above_target_s += dt
    return out


# ---------------------------------------------------------------------------------------
# The command

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recording", metavar="FILE", help="a recording written by `tritonpilot serve --record FILE`")
    parser.add_argument("--policy", required=True, metavar="P", help="the policy YAML to replay under")
    parser.add_argument("--compare", metavar="P2", help="a second policy, replayed over the same recording")
    parser.add_argument("--all", action="store_true",
                        help="print every tick (default: every change, and a hold or block when its reason changes)")


def run(args: argparse.Namespace) -> int:
    try:
        recording = read_recording(args.recording)
    except (OSError, RecordingError) as exc:
        print(f"tritonpilot replay: {exc}", file=sys.stderr)
        return exits.USAGE
    results: list[Result] = []
    for path in [args.policy] + ([args.compare] if args.compare else []):
        try:
            policy = load_policy(path)
            policies = resolve(policy)
        except (OSError, PolicyError) as exc:
            print(f"tritonpilot replay: invalid policy {path}:\n{exc}", file=sys.stderr)
            return exits.USAGE
        if not {t.model for t in recording.ticks} & set(policies):
            print(f"tritonpilot replay: {path} controls none of the recorded models "
                  f"({', '.join(sorted({t.model for t in recording.ticks}))})", file=sys.stderr)
            return exits.USAGE
        limits = BudgetLimits(policy.control.max_concurrent_reloads, policy.control.max_reloads_per_minute)
        results.append(replay(recording, policies, label=path, limits=limits))

    out = sys.stdout
    headers = [e for e in recording.entries if isinstance(e, Header)]
    recorded_under = sorted({h.policy_path for h in headers if h.policy_path})
    ticks = recording.ticks
    print(f"recording {args.recording}: {len(ticks)} decisions, {len(headers) or 1} run(s), models "
          f"{', '.join(sorted({t.model for t in ticks}))}; recorded under {', '.join(recorded_under) or '?'}"
          + (f"; {recording.skipped_lines} unreadable line(s) skipped" if recording.skipped_lines else ""), file=out)
    for result in results:
        print_result(result, every=args.all, file=out)
    print_summary(recorded_totals(recording), results, file=out)
    return exits.FAILURE if any(r.verbatim and r.mismatches for r in results) else exits.OK


def print_result(result: Result, every: bool = False, file: Any = None) -> None:
    file = file if file is not None else sys.stdout
    mode = ("verbatim: the policy the recording was made under, so the recorded signals are used as they are"
            if result.verbatim else "simulated: its own live config, reloads and budget (module docstring)")
    print(f"\n## {result.label} ({mode})", file=file)
    if result.skipped_models:
        print(f"   not in this policy, skipped: {', '.join(sorted(result.skipped_models))}", file=file)
    print(f"   {'t_s':>9}  {'model':<16} {'load':>6}  {'instances':<22} decision", file=file)
    last: dict[str, tuple[str, str]] = {}
    run = 0
    for r in result.decisions:
        d = r.decision
        if r.run != run:
            run = r.run
            if run > 1:
                print(f"   -- run {run} (a controller started again)", file=file)
        key = (str(d.action), str(d.reason))
        if every or d.changes or last.get(d.model) != key:
            print("   " + timeline_line(r), file=file)
        last[d.model] = key
    if result.verbatim:
        n, bad = len(result.decisions), len(result.mismatches)
        print(f"   decisions that reproduce the recording: {n - bad} of {n}", file=file)
        for replayed, recorded in result.mismatches[:10]:
            ours = decision_json(replayed.decision)
            print(f"   MISMATCH at {replayed.t_s:.1f} s {replayed.decision.model}: recorded "
                  f"{ {k: recorded.get(k) for k in COMPARED} } replayed { {k: ours[k] for k in COMPARED} }", file=file)
    for model, t in sorted(result.totals.items()):
        print(f"   {model}: {t.changes} change(s), {t.instance_s:.1f} instance-s, load above target "
              f"{t.above_target_s:.1f} s of {t.span_s:.1f} s", file=file)


def timeline_line(r: Replayed) -> str:
    d = r.decision
    load = f"{r.load:6.2f}" if r.load is not None and math.isfinite(r.load) else f"{'-':>6}"
    if d.changes:
        counts = f"{d.current_instances} -> {d.decided_instances} {d.profile.name if d.profile else '-'}"
    else:
        counts = f"{d.current_instances if d.current_instances is not None else '-'} {d.current_profile or '-'}"
    what = f"{d.action} {d.reason}"
    if "wanted_instances" in d.numbers:
        what += f" (wanted {d.numbers['wanted_instances']}: {d.numbers.get('wanted')})"
    return f"{r.t_s:9.1f}  {d.model:<16} {load}  {counts:<22} {what}"


def print_summary(recorded: Mapping[str, Totals], results: Sequence[Result], file: Any = None) -> None:
    file = file if file is not None else sys.stdout
    rows: list[tuple[str, Mapping[str, Totals]]] = [("as recorded", recorded)]
    rows += [(r.label + (" (verbatim)" if r.verbatim else " (simulated)"), r.totals) for r in results]
    width = max(len(label) for label, _ in rows)
    print("\n## summary (all models)", file=file)
    print(f"   {'':<{width}} {'changes':>8} {'instance-s':>11} {'above-target-s':>15}", file=file)
    for label, per_model in rows:
        total = Totals()
        for t in per_model.values():
            total.add(t)
        print(f"   {label:<{width}} {total.changes:>8} {total.instance_s:>11.1f} {total.above_target_s:>15.1f}",
              file=file)
