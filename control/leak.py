"""The reload leak watchdog: does memory at the same config keep rising across reloads?
Pure, time passed in; called from control/decide.py, as control/verify.py is.

A model that leaks at each load (a backend, a CUDA context, a cache that is never freed)
makes every reload of it cost memory for good, and a controller that reloads often turns
that into an out-of-memory kill of the whole Triton. So, per model (`policy.leak`):

- Sampling: after each reload of this model that worked, once `settle_s` has passed and
  no reload is in progress (this model's or any other's), one sample of Triton's memory
  is taken, keyed by the config that runs (instance count, profile): Triton's process
  memory (`Signals.memory.process_bytes`, resident memory of its processes) and GPU
  memory used (`Signals.gpu`, the fullest GPU; none without GPU data). Each must be
  fresh (`max_signal_age_s`) and measured after the settle; a config that changed since
  the reload skips the sample.
- Attribution: memory is process-wide (every model in Triton shares it). A sample is
  compared with the previous sample at the same config only when every reload that
  finished in between was this model's own (`Signals.memory.reloads_finished`, the
  pod-wide count, grew by as much as this model's own count). Otherwise the other
  reloads may own the change: the chain restarts at the new sample (never attributed,
  never a rise).
- A rise: the later sample exceeds the earlier by more than `min_growth_bytes` and by
  more than `min_growth_ratio` of the earlier. Process and GPU memory are judged apart.
  A return that does not rise ends the streak.
- Suspected: `min_reloads` rises in a row at one config, in either kind of memory. From
  then on decide blocks every change of this model (reason "leak-suspected"): each
  reload would leak again. Holds are unaffected; the proxy keeps serving.
- Cleared only by an operator: `leak.enabled: false` (a policy reload is taken live)
  forgets everything; turning it on again starts afresh. A sidecar restart does too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from tritonpilot.control.policy import ResolvedModelPolicy
from tritonpilot.control.signals import Signals

Number = float | int | str | None
Kind = Literal["process", "gpu"]
KINDS: tuple[Kind, ...] = ("process", "gpu")


@dataclass(frozen=True)
class Point:
    """One settled sample after a reload of this model."""

    at_s: float
    process_bytes: int | None
    gpu_bytes: int | None
    reloads_finished: int   # pod-wide, by at_s
    own_reloads: int        # this model's, by at_s

    def bytes_of(self, kind: Kind) -> int | None:
        return self.process_bytes if kind == "process" else self.gpu_bytes


@dataclass(frozen=True)
class History:
    """One config's samples: the last, and the rises in a row that led to it, per kind."""

    instances: int
    profile: str
    last: Point
    samples: int = 1
    process_rises: tuple[int, ...] = ()     # bytes each rise added, oldest first
    gpu_rises: tuple[int, ...] = ()

    def rises(self, kind: Kind) -> tuple[int, ...]:
        return self.process_rises if kind == "process" else self.gpu_rises


@dataclass(frozen=True)
class Awaiting:
    """A reload of this model whose settled sample is still to be taken."""

    finished_s: float
    instances: int
    profile: str


@dataclass(frozen=True)
class Suspicion:
    at_s: float
    instances: int
    profile: str
    kind: Kind
    rises: tuple[int, ...]       # bytes each rise added, oldest first
    first_bytes: int             # at the first of those returns' baseline
    last_bytes: int
    min_growth_bytes: int
    min_growth_ratio: float


@dataclass(frozen=True)
class LeakState:
    own_reloads: int = 0                  # this model's finished reloads seen
    seen_reload_s: float | None = None    # finished_s of the last one counted
    awaiting: Awaiting | None = None
    configs: tuple[History, ...] = ()
    suspected: Suspicion | None = None
    last_note: str | None = None          # the last sample's fate, for /status


def observe(ls: LeakState, signals: Signals, policy: ResolvedModelPolicy) -> LeakState:
    """Count this model's finished reloads, and take a settled sample when one is due."""
    p = policy.leak
    if not p.enabled:
        return LeakState() if ls != LeakState() else ls
    last = signals.last_reload
    if last is not None and last.finished_s != ls.seen_reload_s:
        ls = replace(ls, own_reloads=ls.own_reloads + 1, seen_reload_s=last.finished_s,
                     awaiting=Awaiting(last.finished_s, last.instances, last.profile) if last.ok else None)
    due = ls.awaiting
    if due is None or signals.now_s < due.finished_s + p.settle_s:
        return ls
    if signals.reload_pending or (signals.budget is not None and signals.budget.in_progress > 0):
        return ls  # a reload under way holds two copies: wait until it is over
    return _sample(replace(ls, awaiting=None), due, signals, policy)


def _sample(ls: LeakState, due: Awaiting, signals: Signals, policy: ResolvedModelPolicy) -> LeakState:
    p = policy.leak
    now_s, max_age_s = signals.now_s, policy.max_signal_age_s
    config = signals.config
    if config is None or now_s - config.at_s > max_age_s or config.instances != due.instances \
            or policy.live_profile(config.parameters) != due.profile:
        return replace(ls, last_note="skipped: the config changed before the sample")
    settled_s = due.finished_s + p.settle_s
    mem, gpu = signals.memory, signals.gpu
    if mem is None:
        return replace(ls, last_note="skipped: no memory data")
    fresh_mem = now_s - mem.at_s <= max_age_s and mem.at_s >= settled_s
    fresh_gpu = gpu is not None and now_s - gpu.at_s <= max_age_s and gpu.at_s >= settled_s
    point = Point(at_s=now_s, process_bytes=mem.process_bytes if fresh_mem else None,
                  gpu_bytes=gpu.memory_used_bytes if fresh_gpu and gpu is not None else None,
                  reloads_finished=mem.reloads_finished, own_reloads=ls.own_reloads)
    if point.process_bytes is None and point.gpu_bytes is None:
        return replace(ls, last_note="skipped: no memory data")
    old = next((h for h in ls.configs if (h.instances, h.profile) == (due.instances, due.profile)), None)
    others = ls.configs if old is None else tuple(h for h in ls.configs if h is not old)
    if old is None:
        history = History(due.instances, due.profile, last=point)
        note = "first sample at this config"
    else:
        other_reloads = ((point.reloads_finished - old.last.reloads_finished)
                         - (point.own_reloads - old.last.own_reloads))
        if other_reloads != 0:
            history = History(due.instances, due.profile, last=point, samples=old.samples + 1)
            note = f"not attributed: {other_reloads} reload(s) of other models since the last sample here"
        else:
            history = _compare(old, point, policy)
            note = "compared"
    ls = replace(ls, configs=others + (history,), last_note=note)
    if ls.suspected is None:
        ls = replace(ls, suspected=_suspect(history, policy, now_s))
    return ls


def _compare(old: History, point: Point, policy: ResolvedModelPolicy) -> History:
    p = policy.leak
    rises: dict[Kind, tuple[int, ...]] = {}
    for kind in KINDS:
        before, after = old.last.bytes_of(kind), point.bytes_of(kind)
        if before is None or after is None:
            rises[kind] = ()
            continue
        growth = after - before
        rose = growth > p.min_growth_bytes and growth > p.min_growth_ratio * before
        rises[kind] = old.rises(kind) + (growth,) if rose else ()
    return History(old.instances, old.profile, last=point, samples=old.samples + 1,
                   process_rises=rises["process"], gpu_rises=rises["gpu"])


def _suspect(history: History, policy: ResolvedModelPolicy, now_s: float) -> Suspicion | None:
    p = policy.leak
    for kind in KINDS:
        rises = history.rises(kind)
        last = history.last.bytes_of(kind)
        if len(rises) >= p.min_reloads and last is not None:
            return Suspicion(at_s=now_s, instances=history.instances, profile=history.profile, kind=kind,
                             rises=rises, first_bytes=last - sum(rises), last_bytes=last,
                             min_growth_bytes=p.min_growth_bytes, min_growth_ratio=p.min_growth_ratio)
    return None


def numbers(s: Suspicion) -> dict[str, Number]:
    """A blocked decision's numbers: which config, which memory, how much it grew."""
    return {"leak_instances": s.instances, "leak_profile": s.profile, "leak_memory": s.kind,
            "leak_rises": len(s.rises), "leak_growth_bytes": s.last_bytes - s.first_bytes,
            "leak_last_rise_bytes": s.rises[-1], "leak_first_bytes": s.first_bytes, "leak_last_bytes": s.last_bytes,
            "leak_min_growth_bytes": s.min_growth_bytes, "leak_since_s": s.at_s}


def why(s: Suspicion) -> str:
    mib = 1024 * 1024
    where = "Triton's process memory" if s.kind == "process" else "GPU memory"
    return (f"{where} at {s.instances} instance(s), profile {s.profile}, rose at each of the last {len(s.rises)} "
            f"returns to that config (+{', +'.join(f'{r / mib:.1f}' for r in s.rises)} MiB; "
            f"{s.first_bytes / mib:.1f} -> {s.last_bytes / mib:.1f} MiB), each past the threshold "
            f"({s.min_growth_bytes / mib:.1f} MiB, {s.min_growth_ratio:.0%}): every reload of this model is "
            f"blocked until leak.enabled is turned off and on (or the sidecar restarts)")


def status(ls: LeakState, policy: ResolvedModelPolicy, now_s: float) -> dict[str, Any]:
    """/status: whether a leak is suspected and why, and what each config's samples say."""
    s = ls.suspected
    return {
        "enabled": policy.leak.enabled,
        "suspected": None if s is None else {"why": why(s), "since_s": round(s.at_s, 3), **numbers(s)},
        "awaiting_sample": None if ls.awaiting is None else {
            "instances": ls.awaiting.instances, "profile": ls.awaiting.profile,
            "in_s": round(ls.awaiting.finished_s + policy.leak.settle_s - now_s, 3)},
        "last_sample": ls.last_note,
        "configs": [{"instances": h.instances, "profile": h.profile, "samples": h.samples,
                     "process_bytes": h.last.process_bytes, "gpu_bytes": h.last.gpu_bytes,
                     "process_rises_bytes": list(h.process_rises), "gpu_rises_bytes": list(h.gpu_rises)}
                    for h in ls.configs],
    }
