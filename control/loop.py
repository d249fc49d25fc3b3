"""The control loop: collect signals -> decide (pure) -> apply (actuator), once per interval.

Knative's shape: sources collect, `decide` decides, the actuator scales; this
file only moves values between them, logs what changed and keeps /status.
Every collaborator is passed in, and `tick(now_s)` is the whole loop body, so
tests drive it with a fake clock and fake sources and never sleep.

The reload budget is pod-wide, so the loop keeps it: reloads in flight (all models)
and the times reloads started, given to each model's `decide` as `Signals.budget`.
Within a tick the models decide one after another, the one that has waited longest
for the budget first, and each sees the reloads the ones before it started. (It is a
sliding-window limiter like asyncio-throttle's Throttler, but checked, not awaited:
the Throttler sleeps until a slot frees and reads time.monotonic itself, while a tick
must never wait, a held change must be a decision that says so, and tests run on a
fake clock.)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tritonpilot.control import leak, verify
from tritonpilot.control.actuator import CONFIG_FAILURES, ReloadRequest, ReloadResult
from tritonpilot.control.decide import Decision, Reason, State, decide, observe_reload
from tritonpilot.control.gpus import ModelGpus, Selection, gpu_sample, memory_used_bytes, model_gpus, select
from tritonpilot.control.overrides import read_state
from tritonpilot.control.policy import ResolvedModelPolicy
from tritonpilot.control.procmem import TritonProcessMemory
from tritonpilot.control.record import NullRecorder, Recorder
from tritonpilot.control.signals import (
    RELOAD_RATE_WINDOW_S,
    GpuSample,
    InflightSample,
    LiveConfig,
    MemorySample,
    ReloadBudget,
    ReloadRecord,
    Signals,
    TritonCounters,
    TritonSample,
    inflight_sample,
    triton_sample,
)
from tritonpilot.control.triton import StatsSample, TritonError
from tritonpilot.proxy.gpu import GpuSnapshot
from tritonpilot.proxy.stats import ProxySnapshot

log = structlog.get_logger(__name__)

# Where inside each interval the loop marks the proxy's arrivals (Controller.sample_arrivals).
RECENT_AT_RATIO = 0.75


class Sources(Protocol):
    """Where the loop reads the world. Each read may fail (None = no data).
    An optional `async close()` is called when the loop stops."""

    def proxy_snapshot(self, now_s: float) -> ProxySnapshot: ...

    def gpu(self) -> GpuSnapshot: ...

    async def live_config(self, model: str) -> Mapping[str, Any] | None: ...

    async def triton_stats(self, model: str) -> StatsSample | None: ...


class Applier(Protocol):
    """The actuator as the loop uses it (control.actuator.Actuator)."""

    def pending(self, model: str) -> ReloadRequest | None: ...

    def submit(self, request: ReloadRequest) -> bool: ...

    def collect(self) -> list[ReloadResult]: ...

    async def close(self) -> None:
        """Cancel pending reloads (Triton still finishes or refuses a load it has begun)."""


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        # A private registry by default: two controllers in one process (tests) must not clash.
        reg = registry if registry is not None else CollectorRegistry()
        self.instances = Gauge("tritonpilot_model_instances", "Instances per model, as Triton's config says.",
                               ["model"], registry=reg)
        self.profile = Gauge("tritonpilot_model_profile", "1 for the profile each model runs now.",
                             ["model", "profile"], registry=reg)
        self.reloads = Counter("tritonpilot_reloads", "Reloads finished, by result.", ["model", "result"],
                               registry=reg)
        self.reload_duration = Histogram("tritonpilot_reload_duration_seconds", "Reload request to verified.",
                                         ["model"], buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300),
                                         registry=reg)
        self.decisions = Counter("tritonpilot_decisions", "Decisions per tick, by action and reason.",
                                 ["model", "action", "reason"], registry=reg)
        self.verifications = Counter("tritonpilot_verifications", "Verdicts on changes (control/verify.py).",
                                     ["model", "verdict"], registry=reg)
        self.leak_suspected = Gauge("tritonpilot_reload_leak_suspected",
                                    "1 while memory at the same config kept rising across reloads of the model "
                                    "(control/leak.py): its reconfiguration is stopped.", ["model"], registry=reg)


@dataclass(frozen=True)
class _Settling:
    """A finished reload, waiting for a GPU sample taken once its old copy is gone (a full
    reload frees the old copy only after it has drained): bytes per instance are learned
    from that sample, not from one taken as the reload finished."""
    finished_s: float
    before_bytes: int
    gpus: Selection
    instances_before: int
    instances_after: int


@dataclass
class _ModelLoop:
    """What the loop keeps per controlled model between ticks."""
    policy: ResolvedModelPolicy
    state: State = field(default_factory=State)
    prev_counters: TritonCounters | None = None
    prev_counters_s: float | None = None
    config: LiveConfig | None = None
    last_reload: ReloadRecord | None = None  # what decide sees: the last reload that worked or failed
    last_reload_report: dict[str, Any] | None = None  # /status: the last one whatever its result
    memory_before_bytes: int | None = None  # used on the model's GPUs together, when its reload was submitted
    memory_gpus: Selection | None = None    # those GPUs, from the tick that submitted it
    settling: _Settling | None = None       # a finished reload whose GPU memory is not learned from yet
    gpus: ModelGpus | None = None           # where its instances run, from its last live config
    gpu_selection: Selection | None = None  # the GPUs its guards read at the last tick
    decisions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    config_error: str | None = None
    budget_wait_since_s: float | None = None  # held by the reload budget since (first in line next)


class Controller:
    def __init__(self, policies: Mapping[str, ResolvedModelPolicy], sources: Sources, applier: Applier,
                 *, interval_s: float = 1.0, dry_run: bool = False, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 max_concurrent_reloads: int = 1, max_reloads_per_minute: int | None = 6,
                 recorder: Recorder | None = None) -> None:
        self.models = {name: _ModelLoop(p) for name, p in policies.items()}
        self.recorder: Recorder = recorder if recorder is not None else NullRecorder()  # serve --record
        self.max_concurrent_reloads = max_concurrent_reloads
        self.max_reloads_per_minute = max_reloads_per_minute
        self._reload_starts: deque[float] = deque()  # when submitted reloads started, the last window's
        self._reloads_finished = 0  # every model's, any result: the leak watchdog's attribution
        self.sources = sources
        self.applier = applier
        self.interval_s = interval_s
        self.dry_run = dry_run
        self.clock = clock
        self.sleep = sleep
        self.metrics = ControllerMetrics(registry)
        self._prev_snapshot: ProxySnapshot | None = None
        self._arrival_marks: tuple[float, dict[str, int]] | None = None  # sample_arrivals: (at_s, started per model)
        self._staged: tuple[dict[str, ResolvedModelPolicy], dict[str, Any]] | None = None  # replace_policies

    async def run(self) -> None:
        log.info("controller.started", models=sorted(self.models), interval_s=self.interval_s, dry_run=self.dry_run)
        try:
            while True:
                started = self.clock()
                try:
                    await self.tick(started)
                except Exception:  # one bad tick must not stop the controller
                    log.exception("controller.tick_failed")
                # One more look at the proxy's arrivals late in the interval: the next tick then
                # knows the rate of the interval's last part (a step within one tick, decide.py 2b).
                await self.sleep(max(0.0, RECENT_AT_RATIO * self.interval_s - (self.clock() - started)))
                try:
                    self.sample_arrivals(self.clock())
                except Exception:  # the next tick then has no recent rate: no data, not a stop
                    log.exception("controller.arrivals_failed")
                await self.sleep(max(0.0, self.interval_s - (self.clock() - started)))
        finally:
            # Stopped (the sidecar cancels this task): no reload task or channel outlives it.
            await self.close()

    async def close(self) -> None:
        await self.applier.close()
        # Reloads cut short by the stop are reported ("cancelled"): Triton may still finish them.
        for result in self.applier.collect():
            self._finished(result, self.clock())
        close_sources = getattr(self.sources, "close", None)
        if close_sources is not None:
            await close_sources()
        self.recorder.close()

    def sample_arrivals(self, now_s: float) -> None:
        """Mark each model's count of started requests now (sources without `proxy_started`
        have none): the next tick's sample gets the arrival rate since this mark."""
        read = getattr(self.sources, "proxy_started", None)
        if read is None:
            return
        self._arrival_marks = (now_s, dict(read(now_s)))

    def _with_recent_rate(self, name: str, inflight: InflightSample | None, snapshot: ProxySnapshot,
                          prev_s: float | None) -> InflightSample | None:
        mark = self._arrival_marks
        if inflight is None or mark is None or prev_s is None or not prev_s < mark[0] < snapshot.now_s:
            return inflight
        model = snapshot.models.get(name)
        started_now = model.started_total if model is not None else 0
        window_s = snapshot.now_s - mark[0]
        return replace(inflight, recent_rate_per_s=max(0, started_now - mark[1].get(name, 0)) / window_s,
                       recent_window_s=window_s)

    async def tick(self, now_s: float) -> list[Decision]:
        self._take_staged_policies()
        for result in self.applier.collect():
            self._finished(result, now_s)
        snapshot = self.sources.proxy_snapshot(now_s)
        prev = self._prev_snapshot
        self._prev_snapshot = snapshot
        gpus = self.sources.gpu()
        memory = await self._memory(now_s)
        # Each model's config and statistics are two RPCs: read them all at once, so a tick
        # takes one round trip, not two per model.
        reads = await asyncio.gather(*(
            asyncio.gather(self._live_config(name, m, now_s), self._triton(name, m, now_s))
            for name, m in self.models.items()))
        read = {name: r for name, r in zip(self.models, reads)}
        decisions: dict[str, Decision] = {}
        for name in self._budget_order():
            m = self.models[name]
            config, triton = read[name]
            inflight = (inflight_sample(prev.models.get(name), prev.now_s, snapshot.models.get(name), now_s)
                        if prev is not None else None)
            inflight = self._with_recent_rate(name, inflight, snapshot, prev.now_s if prev is not None else None)
            self._learn_memory(name, m, gpus, now_s)
            gpu = self._model_gpu(name, m, gpus, now_s)
            signals = Signals(now_s=now_s, inflight=inflight, config=config, triton=triton, gpu=gpu,
                              reload_pending=self.applier.pending(name) is not None, last_reload=m.last_reload,
                              budget=self._budget(now_s), memory=memory)
            suspected_before = m.state.leak.suspected
            decision, m.state = decide(signals, m.policy, m.state)
            self._leak_watch(name, m, suspected_before)
            self.recorder.tick(signals, m.policy, decision)
            decisions[name] = decision
            self._record(m, decision, inflight)
            if decision.reason is Reason.RELOAD_BUDGET:
                m.budget_wait_since_s = m.budget_wait_since_s if m.budget_wait_since_s is not None else now_s
            else:
                m.budget_wait_since_s = None
            if decision.changes and self._apply(m, decision, gpus):
                self._reload_starts.append(now_s)
        return [decisions[name] for name in self.models]

    def replace_policies(self, policies: Mapping[str, ResolvedModelPolicy], *, interval_s: float, dry_run: bool,
                         max_concurrent_reloads: int, max_reloads_per_minute: int | None) -> None:
        """A reloaded policy, taken at the start of the next tick, never inside one (a tick reads
        Triton for the models it began with). Models kept keep their state (delays, cooldowns,
        history); models added start fresh; models removed are no longer decided for (a reload
        of theirs already in flight still finishes and is counted)."""
        self._staged = (dict(policies), {"interval_s": interval_s, "dry_run": dry_run,
                                         "max_concurrent_reloads": max_concurrent_reloads,
                                         "max_reloads_per_minute": max_reloads_per_minute})

    def _take_staged_policies(self) -> None:
        if self._staged is None:
            return
        (policies, settings), self._staged = self._staged, None
        for name, m in self.models.items():
            # Gauges of a model no longer controlled, or of a profile it no longer has, would
            # show their last value forever.
            kept = {p.name for p in policies[name].profiles} if name in policies else set()
            for profile in (p.name for p in m.policy.profiles if p.name not in kept):
                _remove_labels(self.metrics.profile, name, profile)
            if name not in policies:
                _remove_labels(self.metrics.instances, name)
                _remove_labels(self.metrics.leak_suspected, name)
        models = {}
        for name, policy in policies.items():
            models[name] = self.models.get(name) or _ModelLoop(policy)
            models[name].policy = policy
        added, removed = sorted(set(models) - set(self.models)), sorted(set(self.models) - set(models))
        self.models = models
        for key, value in settings.items():
            setattr(self, key, value)
        log.info("controller.policy_replaced", models=sorted(models), added=added, removed=removed, **settings)

    async def _memory(self, now_s: float) -> MemorySample:
        """Triton's process memory (sources without `process_memory` have none), with the
        pod-wide count of finished reloads the leak watchdog attributes changes by."""
        read = getattr(self.sources, "process_memory", None)
        process_bytes, source = (await read()) if read is not None else (None, "none")
        return MemorySample(at_s=now_s, process_bytes=process_bytes, reloads_finished=self._reloads_finished,
                            source=source if process_bytes is not None else "none")

    def _leak_watch(self, name: str, m: _ModelLoop, before: leak.Suspicion | None) -> None:
        suspected = m.state.leak.suspected
        self.metrics.leak_suspected.labels(name).set(0 if suspected is None else 1)
        if suspected is not None and before is None:
            log.warning("controller.leak_suspected", model=name, why=leak.why(suspected),
                        **_loggable(leak.numbers(suspected)))
        elif suspected is None and before is not None:
            log.info("controller.leak_cleared", model=name)

    def _budget_order(self) -> list[str]:
        """Models that wait for the reload budget first, longest wait first; then the rest in order."""
        def key(name: str) -> tuple[bool, float]:
            since = self.models[name].budget_wait_since_s
            return (since is None, since if since is not None else 0.0)

        return sorted(self.models, key=key)  # stable: the rest keep their order

    def _budget(self, now_s: float) -> ReloadBudget:
        while self._reload_starts and self._reload_starts[0] <= now_s - RELOAD_RATE_WINDOW_S:
            self._reload_starts.popleft()
        in_progress = sum(self.applier.pending(name) is not None for name in self.models)
        return ReloadBudget(in_progress=in_progress, max_concurrent=self.max_concurrent_reloads,
                            recent_starts_s=tuple(self._reload_starts), max_per_minute=self.max_reloads_per_minute)

    async def _live_config(self, name: str, m: _ModelLoop, now_s: float) -> LiveConfig | None:
        error: str | None
        try:
            config = await self.sources.live_config(name)
        except TritonError as exc:
            config, error = None, str(exc)
        else:
            error = None if config is not None else "no config"
        if error != m.config_error:  # log a change of state once, not every tick
            (log.warning if error else log.info)("controller.model_config", model=name, error=error)
            m.config_error = error
        if config is None:
            m.config = None
            return None
        live = read_state(config)
        m.gpus = model_gpus(config)
        m.config = LiveConfig(at_s=now_s, instances=live.instances, parameters=live.parameters)
        self.metrics.instances.labels(name).set(live.instances)
        current = m.policy.live_profile(live.parameters)
        for p in m.policy.profiles:
            self.metrics.profile.labels(name, p.name).set(1 if p.name == current else 0)
        return m.config

    async def _triton(self, name: str, m: _ModelLoop, now_s: float) -> TritonSample | None:
        try:
            stats = await self.sources.triton_stats(name)
        except TritonError:
            stats = None
        if stats is None:
            return None
        counters = TritonCounters(stats.success_count, stats.fail_count, stats.queue_ns, stats.compute_infer_ns,
                                  stats.success_ns, stats.fail_ns)
        sample = (triton_sample(m.prev_counters, counters, m.prev_counters_s, now_s)
                  if m.prev_counters_s is not None else None)
        m.prev_counters, m.prev_counters_s = counters, now_s
        return sample

    def _model_gpu(self, name: str, m: _ModelLoop, snapshot: GpuSnapshot, now_s: float) -> GpuSample | None:
        """The GPU signal of this model: only the GPUs its instances run on (control/gpus.py)."""
        selection = select(snapshot, m.gpus)
        old = m.gpu_selection
        if selection is not None and (old is None or (old.uuids, old.scope) != (selection.uuids, selection.scope)):
            # The first is in /status; a change (a new config, GPUs coming or going) is news.
            (log.debug if old is None else log.info)("controller.model_gpus", model=name, scope=selection.scope,
                                                      uuids=",".join(selection.uuids), why=selection.why)
        m.gpu_selection = selection if selection is not None else old
        return gpu_sample(snapshot, selection, now_s)

    def _learn_memory(self, name: str, m: _ModelLoop, snapshot: GpuSnapshot, now_s: float) -> None:
        """Bytes per instance from the model's GPUs: memory before its reload against a sample
        taken verify.settle_s after it finished (by then a full reload's old copy is gone)."""
        settling = m.settling
        if settling is None or not snapshot.gpus or snapshot.now_s < settling.finished_s + m.policy.verify.settle_s:
            return
        after = memory_used_bytes(snapshot, settling.gpus.uuids)
        if after is None:
            return  # one of its GPUs has no data now: wait for a sample that has them all
        m.settling = None
        per_count = settling.gpus.instances_per_count
        before_n, after_n = settling.instances_before * per_count, settling.instances_after * per_count
        old = m.state.memory_per_instance_bytes
        m.state = observe_reload(m.state, settling.before_bytes, after, before_n, after_n)
        self.recorder.observe(name, now_s, settling.before_bytes, after, before_n, after_n)
        if m.state.memory_per_instance_bytes != old:
            log.info("controller.gpu_memory_per_instance", model=name, before_bytes=settling.before_bytes,
                     after_bytes=after, instances=f"{before_n} -> {after_n}", gpus=",".join(settling.gpus.uuids),
                     memory_per_instance_bytes=m.state.memory_per_instance_bytes)

    def _apply(self, m: _ModelLoop, decision: Decision, gpus: GpuSnapshot) -> bool:
        """Submit the decision's reload (log it in a dry run); whether a reload started."""
        assert decision.decided_instances is not None and decision.profile is not None
        event = dict(model=decision.model, action=str(decision.action), reason=str(decision.reason),
                     instances=f"{decision.current_instances} -> {decision.decided_instances}",
                     profile=f"{decision.current_profile} -> {decision.profile.name}",
                     strategy=decision.strategy, dry_run=self.dry_run, **_loggable(decision.numbers))
        if self.dry_run:
            log.info("controller.decision", **event)
            return False
        request = ReloadRequest(model=decision.model, instances=decision.decided_instances,
                                profile=decision.profile.name, parameters=dict(decision.profile.parameters),
                                managed_keys=m.policy.managed_parameter_keys,
                                strategy=decision.strategy or "full")
        submitted = self.applier.submit(request)
        # A refused submit (that config is backed off from) changes nothing, and it comes
        # again after every cooldown: not worth INFO.
        (log.info if submitted else log.debug)("controller.decision", **event, submitted=submitted)
        if submitted:
            selection = m.gpu_selection
            m.memory_gpus = selection
            m.memory_before_bytes = memory_used_bytes(gpus, selection.uuids) if selection is not None else None
            m.settling = None  # its sample would now include this reload too
        return submitted

    def _finished(self, result: ReloadResult, now_s: float) -> None:
        m = self.models.get(result.request.model)
        name = result.request.model
        self.metrics.reloads.labels(name, str(result.result)).inc()
        self._reloads_finished += 1
        self.metrics.reload_duration.labels(name).observe(result.duration_s)
        if m is None:
            return
        record = ReloadRecord(finished_s=now_s, duration_s=result.duration_s, ok=result.ok,
                              instances=result.request.instances, profile=result.request.profile)
        m.last_reload_report = {**asdict(record), "result": str(result.result), "error": result.error or None}
        # A reload Triton never answered says nothing about the config: decide would back off
        # from it as failed, so it keeps the previous record and retries after the cooldown.
        if result.ok or result.result in CONFIG_FAILURES:
            m.last_reload = record
        (log.info if result.ok else log.warning)(
            "controller.reload", model=name, result=str(result.result), instances=result.request.instances,
            profile=result.request.profile, duration_s=round(result.duration_s, 3), error=result.error or None)
        if (result.ok and result.instances_before is not None and m.memory_before_bytes is not None
                and m.memory_gpus is not None):
            m.settling = _Settling(now_s, m.memory_before_bytes, m.memory_gpus, result.instances_before,
                                   result.request.instances)  # learned from by _learn_memory
        m.memory_before_bytes = m.memory_gpus = None

    def _record(self, m: _ModelLoop, decision: Decision, inflight: InflightSample | None) -> None:
        self.metrics.decisions.labels(decision.model, str(decision.action), str(decision.reason)).inc()
        for outcome in decision.verdicts:
            self.metrics.verifications.labels(decision.model, str(outcome.verdict)).inc()
            log.info("controller.verdict", model=decision.model, verdict=str(outcome.verdict), kind=outcome.kind,
                     instances=f"{outcome.from_instances} -> {outcome.to_instances}", then=outcome.then,
                     **_loggable(outcome.numbers))
        if not decision.changes:
            log.debug("controller.hold", model=decision.model, action=str(decision.action),
                      reason=str(decision.reason), **_loggable(decision.numbers))
        entry = {"now_s": round(decision.now_s, 3), "action": str(decision.action), "reason": str(decision.reason),
                 "current_instances": decision.current_instances, "decided_instances": decision.decided_instances,
                 "profile": decision.profile.name if decision.profile else decision.current_profile,
                 "numbers": dict(decision.numbers)}
        if decision.verdicts:
            entry["verdicts"] = [str(o.verdict) for o in decision.verdicts]
        # Keep the history readable: record changes and blocks always, holds only when new.
        last = m.decisions[-1] if m.decisions else None
        if (decision.changes or decision.verdicts or last is None
                or (last["action"], last["reason"]) != (entry["action"], entry["reason"])):
            m.decisions.append(entry)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dry_run": self.dry_run, "interval_s": self.interval_s, "models": {}}
        now_s = self.clock()
        budget = self._budget(now_s)
        out["reload_budget"] = {"in_progress": budget.in_progress, "max_concurrent_reloads": budget.max_concurrent,
                                "started_last_minute": len(budget.started_in_window(now_s)),
                                "max_reloads_per_minute": budget.max_per_minute,
                                "waiting": [n for n in self._budget_order()
                                            if self.models[n].budget_wait_since_s is not None]}
        for name, m in self.models.items():
            pending = self.applier.pending(name)
            out["models"][name] = {
                "policy": {k: v for k, v in asdict(m.policy).items() if k != "profiles"}
                | {"profiles": [p.model_dump() for p in m.policy.profiles]},
                "instances": m.config.instances if m.config else None,
                "profile": m.policy.live_profile(m.config.parameters) if m.config else None,
                "config_error": m.config_error,
                "pending_reload": ({"instances": pending.instances, "profile": pending.profile,
                                    "strategy": pending.strategy} if pending else None),
                "last_reload": m.last_reload_report,
                "memory_per_instance_bytes": m.state.memory_per_instance_bytes,
                "gpus": ({"scope": m.gpu_selection.scope, "uuids": list(m.gpu_selection.uuids),
                          "why": m.gpu_selection.why} if m.gpu_selection is not None else None),
                "verify": verify.status(m.state.verify, now_s),
                "leak": leak.status(m.state.leak, m.policy, now_s),
                "decisions": list(m.decisions),
            }
        return out


def _remove_labels(metric: Gauge, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never set
        pass


def _loggable(numbers: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in numbers.items()}


class LiveSources:
    """The real sources: the proxy's stats in-process, the GPU sampler, Triton over gRPC,
    and Triton's process memory from /proc where visible (control/procmem.py; None: not read)."""

    def __init__(self, stats, gpu_sampler, triton, process_memory: TritonProcessMemory | None = None) -> None:
        self._stats = stats
        self._gpu = gpu_sampler
        self._triton = triton
        self._process_memory = process_memory
        self._memory_reason: str | None = None

    async def process_memory(self) -> tuple[int | None, str]:
        if self._process_memory is None:
            return None, "not read"
        # A pass over /proc: off the event loop the relay shares.
        value, source = await asyncio.to_thread(self._process_memory.read)
        reason = None if value is not None else source
        if reason != self._memory_reason:  # log a change of state once
            (log.warning if reason else log.info)("controller.process_memory", source=source, error=reason)
            self._memory_reason = reason
        return value, source

    def proxy_snapshot(self, now_s: float) -> ProxySnapshot:
        snap = self._stats.snapshot(time.monotonic(), reset_peaks=True)
        return ProxySnapshot(now_s=now_s, models=snap.models)

    def proxy_started(self, now_s: float) -> dict[str, int]:
        """Requests started so far per model (peaks left alone: they belong to the tick's snapshot)."""
        snap = self._stats.snapshot(time.monotonic(), reset_peaks=False)
        return {name: m.started_total for name, m in snap.models.items()}

    def gpu(self) -> GpuSnapshot:
        return self._gpu.latest()

    async def live_config(self, model: str) -> Mapping[str, Any] | None:
        return await self._triton.get_config(model)

    async def triton_stats(self, model: str) -> StatsSample | None:
        return await self._triton.statistics(model)

    async def close(self) -> None:
        await self._triton.close()
