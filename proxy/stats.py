"""Per-model live request statistics: written on the proxy's hot path, read as snapshots.

The relay calls `begin`/`end` once per request, so these are plain attribute
updates on one event-loop thread: no locks, no Prometheus objects. Exporters
(Prometheus, the controller) read immutable snapshots whenever they like.

Time is `time.monotonic()` seconds, passed in by the caller.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds in seconds, Prometheus-style (+Inf is implied as the last bucket).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

# gRPC status codes by number, for labels (grpc.StatusCode names, upper case).
GRPC_CODE_NAMES: dict[int, str] = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}

# Requests whose model could not be read (e.g. an unknown compression) count here.
UNKNOWN_MODEL = ""

# Model names come from clients: typos and garbage must not grow memory and metric series
# without bound. Past this many distinct names, new ones count as UNKNOWN_MODEL.
MAX_MODELS = 1000


@dataclass(frozen=True)
class ModelSnapshot:
    model: str
    inflight: int
    # Highest in-flight count since the previous `snapshot(reset_peaks=True)`.
    inflight_peak: int
    # Integral of in-flight over time, in request-seconds, since the proxy started.
    # Mean in-flight over a window = delta(inflight_seconds) / delta(now_s).
    inflight_seconds: float
    started_total: int
    # Finished requests by gRPC status code name ("OK", "UNAVAILABLE", ...).
    finished_total: dict[str, int]
    # Cumulative counts per LATENCY_BUCKETS_S bound, then +Inf (len = len(bounds) + 1).
    latency_bucket_counts: tuple[int, ...]
    latency_sum_s: float
    latency_count: int

    @property
    def errors_total(self) -> int:
        return sum(n for code, n in self.finished_total.items() if code != "OK")

    def latency_quantile_s(self, q: float) -> float | None:
        """Quantile estimated from the histogram (upper bound of the bucket that holds it)."""
        return quantile_from_buckets(self.latency_bucket_counts, q)


@dataclass(frozen=True)
class ProxySnapshot:
    now_s: float  # monotonic time the snapshot was taken
    models: dict[str, ModelSnapshot] = field(default_factory=dict)


def quantile_from_buckets(cumulative: tuple[int, ...], q: float,
                          bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> float | None:
    """Bucket upper bound holding quantile q of cumulative counts; None without data."""
    if not cumulative or cumulative[-1] == 0:
        return None
    rank = q * cumulative[-1]
    i = bisect.bisect_left(cumulative, rank)
    return bounds[i] if i < len(bounds) else bounds[-1]


class ModelStats:
    """Live counters of one model. Mutated only from the event-loop thread."""

    __slots__ = ("model", "inflight", "peak", "_inflight_seconds", "_last_change_s",
                 "started", "finished", "_buckets", "latency_sum_s", "latency_count")

    def __init__(self, model: str, now_s: float) -> None:
        self.model = model
        self.inflight = 0
        self.peak = 0
        self._inflight_seconds = 0.0
        self._last_change_s = now_s
        self.started = 0
        self.finished: dict[int, int] = {}
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # per bucket, not cumulative
        self.latency_sum_s = 0.0
        self.latency_count = 0

    def _advance(self, now_s: float) -> None:
        self._inflight_seconds += self.inflight * (now_s - self._last_change_s)
        self._last_change_s = now_s

    def begin(self, now_s: float) -> None:
        self._advance(now_s)
        self.inflight += 1
        self.started += 1
        if self.inflight > self.peak:
            self.peak = self.inflight

    def end(self, now_s: float, grpc_code: int, duration_s: float | None) -> None:
        """One request finished. duration_s is None where no latency applies (e.g. a stream
        closed with requests still unanswered)."""
        self._advance(now_s)
        if self.inflight > 0:
            self.inflight -= 1
        self.finished[grpc_code] = self.finished.get(grpc_code, 0) + 1
        if duration_s is not None:
            self._buckets[bisect.bisect_left(LATENCY_BUCKETS_S, duration_s)] += 1
            self.latency_sum_s += duration_s
            self.latency_count += 1

    def refused(self, grpc_code: int) -> None:
        """A request the proxy answered itself at once (e.g. shed): started and finished,
        never in flight, and no latency that would flatter the histogram."""
        self.started += 1
        self.finished[grpc_code] = self.finished.get(grpc_code, 0) + 1

    def snapshot(self, now_s: float, reset_peak: bool) -> ModelSnapshot:
        self._advance(now_s)
        cumulative, running = [], 0
        for n in self._buckets:
            running += n
            cumulative.append(running)
        snap = ModelSnapshot(
            model=self.model,
            inflight=self.inflight,
            inflight_peak=self.peak,
            inflight_seconds=self._inflight_seconds,
            started_total=self.started,
            finished_total={GRPC_CODE_NAMES.get(c, str(c)): n for c, n in self.finished.items()},
            latency_bucket_counts=tuple(cumulative),
            latency_sum_s=self.latency_sum_s,
            latency_count=self.latency_count,
        )
        if reset_peak:
            self.peak = self.inflight
        return snap


class ProxyStats:
    """All models' live counters. The relay asks `model(name)` once per request."""

    def __init__(self) -> None:
        self._models: dict[str, ModelStats] = {}

    def model(self, name: str, now_s: float) -> ModelStats:
        stats = self._models.get(name)
        if stats is None:
            if len(self._models) >= MAX_MODELS:
                name = UNKNOWN_MODEL
                stats = self._models.get(name)
            if stats is None:
                stats = self._models[name] = ModelStats(name, now_s)
        return stats

    def snapshot(self, now_s: float, reset_peaks: bool = False) -> ProxySnapshot:
        """A consistent copy of every model's counters. One reader (the controller) should own
        reset_peaks=True so that `inflight_peak` means "since my previous look"."""
        return ProxySnapshot(
            now_s=now_s,
            models={name: m.snapshot(now_s, reset_peaks) for name, m in self._models.items()},
        )
