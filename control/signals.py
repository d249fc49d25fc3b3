"""What the decision core sees of one model at one tick: plain, timestamped values.

The I/O edges (the statistics sources, the actuator, the loop) fill a `Signals` per
model per tick; `control.decide.decide` reads nothing else. Conventions:

- Times are monotonic seconds (`time.monotonic()`, as the proxy's snapshots use),
  passed in; `Signals.now_s` is "now" for the decision.
- Each source's values come together with the time they were measured (`at_s`).
  A source that could not measure gives None: "no data", never zeros or a guess.
  Zero traffic is data (mean in flight 0.0), not None.
- A value older than the policy's `max_signal_age_s` counts as no data.

Two pure helpers turn cumulative counters into these samples, so the sources stay
thin: `inflight_sample` (from two `proxy.stats.ModelSnapshot`s) and `triton_sample`
(from two cumulative `TritonCounters`, handling the reset a full reload or a Triton
restart causes).

The load seen inside Triton is Little's law on its cumulative statistics: the total
time requests spent in Triton (`inference_stats` success.ns + fail.ns) grows by the
mean number of requests inside it times the elapsed time. Triton adds a request's
time when it completes, so over windows shorter than a request this lags and comes
in bursts; the proxy's own count is exact (control/decide.py says how they combine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tritonpilot.proxy.stats import ModelSnapshot, quantile_from_buckets


@dataclass(frozen=True)
class InflightSample:
    """The proxy's view of one model over the window (at_s - window_s, at_s]."""

    at_s: float
    window_s: float
    inflight_now: int         # requests in flight at at_s
    inflight_mean: float      # time-weighted mean over the window: the load signal
    inflight_max: int         # peak over the window
    request_rate_per_s: float | None = None  # requests started per second over the window
    latency_p95_s: float | None = None       # of requests finished in the window; None if none
    # The window's own cumulative latency bucket counts (proxy.stats.LATENCY_BUCKETS_S, then +Inf):
    # windows add up, so control/verify.py takes a p95 over many ticks. None: not measured.
    latency_bucket_counts: tuple[int, ...] | None = None
    error_count: int | None = None           # requests finished in the window with a code other than OK
    # Requests started per second over the window's last part, (at_s - recent_window_s, at_s]: the
    # loop reads the proxy's counters once more inside each interval, so a step that came late in
    # the window shows at its full rate (control/decide.py, step 2b). None: not measured.
    recent_rate_per_s: float | None = None
    recent_window_s: float | None = None


@dataclass(frozen=True)
class TritonSample:
    """Deltas of Triton's statistics for one model over the window ending at at_s."""

    at_s: float
    window_s: float
    success_count: int
    fail_count: int
    queue_ns_per_request: float | None          # None when no request finished in the window
    compute_infer_ns_per_request: float | None
    # Mean requests inside Triton over the window (Little's law on success.ns + fail.ns);
    # None: not measured.
    inflight_mean: float | None = None


@dataclass(frozen=True)
class LiveConfig:
    """What Triton's own ModelConfig says the model runs (read at at_s)."""

    at_s: float
    instances: int                     # the instance count Triton reports
    parameters: Mapping[str, str]      # every string parameter of the live config


@dataclass(frozen=True)
class GpuSample:
    """The GPU(s) the model runs on. Any field may be None: that part has no data.

    Which GPUs (control/gpus.py): `scope` "listed" (its instance_group's `gpus`, mapped to
    UUIDs), "all" (it may run on any of Triton's GPUs), "unmapped" (it lists GPUs, but which
    UUIDs those indices are is not known: every GPU counts), "cpu" (KIND_CPU only: no GPU,
    every value None)."""

    at_s: float
    utilization_ratio: float | None     # 0..1; the busiest of the model's GPUs
    memory_used_bytes: int | None       # of the GPU with the least memory free
    memory_total_bytes: int | None
    uuids: tuple[str, ...] = ()         # the GPUs this sample covers
    scope: str = "all"

    @property
    def memory_free_bytes(self) -> int | None:
        if self.memory_used_bytes is None or self.memory_total_bytes is None:
            return None
        return self.memory_total_bytes - self.memory_used_bytes


@dataclass(frozen=True)
class MemorySample:
    """Triton's own memory at at_s, for the leak watchdog (control/leak.py). None: no data.

    `process_bytes` is the resident memory of Triton's processes (tritonserver and the
    processes in its session: the Python backend's stubs and whatever they start), read
    from /proc where the sidecar can see them. `reloads_finished` is the pod-wide count
    of reloads (every model, any result) the controller had seen finish by at_s: memory
    is process-wide, so a change is only put down to one model when no other reloaded."""

    at_s: float
    process_bytes: int | None
    reloads_finished: int = 0
    source: str = "none"  # "procfs", or "none" with no data


@dataclass(frozen=True)
class ReloadRecord:
    """The model's most recent finished reload (whatever started it)."""

    finished_s: float
    duration_s: float   # from the load request to verified (or failed)
    ok: bool
    instances: int      # what it tried to load
    profile: str


@dataclass(frozen=True)
class Signals:
    """Everything `decide` may look at for one model at one tick."""

    now_s: float
    inflight: InflightSample | None
    config: LiveConfig | None
    triton: TritonSample | None = None
    gpu: GpuSample | None = None        # None: no GPU data (e.g. a CPU-only Triton)
    reload_pending: bool = False        # a reload of this model is in flight
    last_reload: ReloadRecord | None = None
    budget: ReloadBudget | None = None  # the pod-wide reload budget; None: unlimited
    memory: MemorySample | None = None  # Triton's process memory (leak watchdog); None: no data


# A sliding window, as asyncio-throttle's Throttler keeps one, with time passed in.
RELOAD_RATE_WINDOW_S = 60.0


@dataclass(frozen=True)
class ReloadBudget:
    """The pod-wide reload budget at one moment: reloads of every model count against it."""

    in_progress: int                         # reloads in flight, all models together
    max_concurrent: int                      # control.max_concurrent_reloads
    recent_starts_s: tuple[float, ...] = ()  # when reloads started (any model), at least the last window's
    max_per_minute: int | None = None        # control.max_reloads_per_minute; None: unlimited

    def started_in_window(self, now_s: float) -> tuple[float, ...]:
        """The starts inside the rate window (now - 60 s, now], oldest first."""
        return tuple(sorted(t for t in self.recent_starts_s if now_s - RELOAD_RATE_WINDOW_S < t <= now_s))


# ---------------------------------------------------------------------------------------
# Helpers for the sources: cumulative counters -> samples (pure)

def inflight_sample(prev: ModelSnapshot | None, prev_s: float, cur: ModelSnapshot | None,
                    now_s: float) -> InflightSample | None:
    """The window between two snapshots of one model's proxy statistics.

    `inflight_max` is the snapshot's peak, which means "over the window" when the caller
    takes its snapshots with reset_peaks=True. A model the proxy has not seen yet has no
    traffic (zeros), which is data; one first seen inside the window (prev None, cur set)
    started from zero there. None only when time did not advance.
    """
    window_s = now_s - prev_s
    if window_s <= 0:
        return None
    if cur is None:
        return InflightSample(at_s=now_s, window_s=window_s, inflight_now=0, inflight_mean=0.0,
                              inflight_max=0, request_rate_per_s=0.0, latency_p95_s=None, error_count=0)
    base_seconds = prev.inflight_seconds if prev is not None else 0.0
    base_started = prev.started_total if prev is not None else 0
    base_buckets = prev.latency_bucket_counts if prev is not None else (0,) * len(cur.latency_bucket_counts)
    window_buckets = tuple(c - b for c, b in zip(cur.latency_bucket_counts, base_buckets))
    return InflightSample(
        at_s=now_s, window_s=window_s, inflight_now=cur.inflight,
        inflight_mean=max(0.0, (cur.inflight_seconds - base_seconds) / window_s),
        inflight_max=cur.inflight_peak,
        request_rate_per_s=(cur.started_total - base_started) / window_s,
        latency_p95_s=quantile_from_buckets(window_buckets, 0.95),
        latency_bucket_counts=window_buckets,
        error_count=cur.errors_total - (prev.errors_total if prev is not None else 0),
    )


@dataclass(frozen=True)
class TritonCounters:
    """Cumulative inference statistics of one model, as Triton's ModelStatistics has them."""

    success_count: int
    fail_count: int
    queue_ns: int           # inference_stats.queue.ns
    compute_infer_ns: int   # inference_stats.compute_infer.ns
    success_ns: int = 0     # inference_stats.success.ns: total time of the requests that succeeded
    fail_ns: int = 0        # inference_stats.fail.ns

    def went_down_from(self, prev: TritonCounters) -> bool:
        """Some counter is lower than before: Triton restarted them (a full reload, a restart)."""
        return any(getattr(self, f) < getattr(prev, f) for f in (
            "success_count", "fail_count", "queue_ns", "compute_infer_ns", "success_ns", "fail_ns"))


def triton_sample(prev: TritonCounters | None, cur: TritonCounters, prev_s: float,
                  now_s: float) -> TritonSample | None:
    """Deltas between two reads. A full reload or a Triton restart restarts the counters at
    zero: when any counter went down, the current values are the delta since the restart
    (which lies inside the window), so a reset gives neither a negative value nor the
    whole history as one spike.

    `inflight_mean` is Little's law: the growth of the total request time (success.ns +
    fail.ns) over the window's length, the mean number of requests inside Triton.
    """
    window_s = now_s - prev_s
    if prev is None or window_s <= 0:
        return None
    base = TritonCounters(0, 0, 0, 0) if cur.went_down_from(prev) else prev
    success = cur.success_count - base.success_count
    request_ns = (cur.success_ns - base.success_ns) + (cur.fail_ns - base.fail_ns)
    return TritonSample(
        at_s=now_s, window_s=window_s, success_count=success,
        fail_count=cur.fail_count - base.fail_count,
        queue_ns_per_request=(cur.queue_ns - base.queue_ns) / success if success else None,
        compute_infer_ns_per_request=(cur.compute_infer_ns - base.compute_infer_ns) / success if success else None,
        inflight_mean=request_ns / 1e9 / window_s,
    )
