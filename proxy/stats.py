"""Per-model live request statistics: written on the proxy's hot path, read as snapshots.

The relays call `begin`/`end` once per request, so these are plain attribute
updates on one event-loop thread: no locks, no Prometheus objects. Exporters
(Prometheus, the controller) read immutable snapshots whenever they like.

Requests arrive by two protocols, gRPC (relay.py) and HTTP/REST (http_relay.py). Each
(model, protocol) pair has its own `ModelStats`; every protocol's stats of one model
share that model's in-flight count (`ModelStats.inflight`, what the load-shedding caps
read), its peak and its integral. Snapshots carry both views:
`ProxySnapshot.models` sums each model over its protocols (what the controller reads),
`ProxySnapshot.protocols` holds each (model, protocol) pair (what /metrics exports, with
a `protocol` label).

Time is `time.monotonic()` seconds, passed in by the caller.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

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

# The protocols a request can come by (the `protocol` label).
GRPC = "grpc"
HTTP = "http"

# HTTP requests are labelled with their HTTP status as a string ("200", "404", ...), and
# these two where no status came back: the client closed first (nginx's 499), Triton
# closed first or sent something that is not HTTP (502, what a proxy answers for that).
HTTP_CLIENT_CLOSED = 499
HTTP_UPSTREAM_FAILED = 502

# Requests whose model could not be read (e.g. an unknown compression) count here.
UNKNOWN_MODEL = ""

# Model names come from clients: typos and garbage must not grow memory and metric series
# without bound. Past this many distinct names, new ones count as UNKNOWN_MODEL.
MAX_MODELS = 1000


def code_name(protocol: str, code: int) -> str:
    """The `code` label: gRPC's status name, or the HTTP status as a string."""
    if protocol == HTTP:
        return str(code)
    return GRPC_CODE_NAMES.get(code, str(code))


def is_error_code(name: str) -> bool:
    """gRPC OK and HTTP 1xx-3xx are successes; every other code an error."""
    if name == "OK":
        return False
    return not (len(name) == 3 and name.isdigit() and 100 <= int(name) < 400)


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
    # Finished requests by code name: gRPC's ("OK", "UNAVAILABLE", ...), HTTP's ("200", "503", ...).
    finished_total: dict[str, int]
    # Cumulative counts per LATENCY_BUCKETS_S bound, then +Inf (len = len(bounds) + 1).
    latency_bucket_counts: tuple[int, ...]
    latency_sum_s: float
    latency_count: int
    # "grpc" or "http" for one protocol's share; "" for a model summed over its protocols.
    protocol: str = ""

    @property
    def errors_total(self) -> int:
        return sum(n for code, n in self.finished_total.items() if is_error_code(code))

    def latency_quantile_s(self, q: float) -> float | None:
        """Quantile estimated from the histogram (upper bound of the bucket that holds it)."""
        return quantile_from_buckets(self.latency_bucket_counts, q)


@dataclass(frozen=True)
class ProxySnapshot:
    now_s: float  # monotonic time the snapshot was taken
    # Per model, summed over protocols.
    models: dict[str, ModelSnapshot] = field(default_factory=dict)
    # Per (model, protocol).
    protocols: dict[tuple[str, str], ModelSnapshot] = field(default_factory=dict)


def quantile_from_buckets(cumulative: tuple[int, ...], q: float,
                          bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> float | None:
    """Bucket upper bound holding quantile q of cumulative counts; None without data."""
    if not cumulative or cumulative[-1] == 0:
        return None
    rank = q * cumulative[-1]
    i = bisect.bisect_left(cumulative, rank)
    return bounds[i] if i < len(bounds) else bounds[-1]


class _Load:
    """Requests in flight, their peak and their integral over time."""

    __slots__ = ("inflight", "peak", "seconds", "last_change_s")

    def __init__(self, now_s: float) -> None:
        self.inflight = 0
        self.peak = 0
        self.seconds = 0.0
        self.last_change_s = now_s

    def advance(self, now_s: float) -> None:
        self.seconds += self.inflight * (now_s - self.last_change_s)
        self.last_change_s = now_s


class ModelStats:
    """Live counters of one model by one protocol. Mutated only from the event-loop thread."""

    __slots__ = ("model", "protocol", "load", "own", "started", "finished", "_buckets",
                 "latency_sum_s", "latency_count")

    def __init__(self, model: str, now_s: float, protocol: str = GRPC, load: _Load | None = None) -> None:
        self.model = model
        self.protocol = protocol
        self.load = load if load is not None else _Load(now_s)  # the model's, over all protocols
        self.own = _Load(now_s)                                 # this protocol's share
        self.started = 0
        self.finished: dict[int, int] = {}
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # per bucket, not cumulative
        self.latency_sum_s = 0.0
        self.latency_count = 0

    @property
    def inflight(self) -> int:
        """The model's requests in flight by every protocol: what a cap (shedding.py) compares."""
        return self.load.inflight

    # begin and end do the _Load arithmetic inline (advance, then +1 with the peak / -1 never
    # below 0) for the model's and the protocol's load: as method calls it cost 6-16% of the
    # gRPC core's time per request (docs/relay-cost.md).
    def begin(self, now_s: float) -> None:
        load = self.load
        load.seconds += load.inflight * (now_s - load.last_change_s)
        load.last_change_s = now_s
        inflight = load.inflight = load.inflight + 1
        if inflight > load.peak:
            load.peak = inflight
        own = self.own
        own.seconds += own.inflight * (now_s - own.last_change_s)
        own.last_change_s = now_s
        inflight = own.inflight = own.inflight + 1
        if inflight > own.peak:
            own.peak = inflight
        self.started += 1

    def end(self, now_s: float, grpc_code: int, duration_s: float | None) -> None:
        """One request finished with `grpc_code` (for HTTP: the HTTP status). duration_s is None
        where no latency applies (e.g. a stream closed with requests still unanswered)."""
        load = self.load
        load.seconds += load.inflight * (now_s - load.last_change_s)
        load.last_change_s = now_s
        if load.inflight > 0:
            load.inflight -= 1
        own = self.own
        own.seconds += own.inflight * (now_s - own.last_change_s)
        own.last_change_s = now_s
        if own.inflight > 0:
            own.inflight -= 1
        finished = self.finished
        finished[grpc_code] = finished.get(grpc_code, 0) + 1
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
        self.own.advance(now_s)
        cumulative, running = [], 0
        for n in self._buckets:
            running += n
            cumulative.append(running)
        snap = ModelSnapshot(
            model=self.model,
            inflight=self.own.inflight,
            inflight_peak=self.own.peak,
            inflight_seconds=self.own.seconds,
            started_total=self.started,
            finished_total={code_name(self.protocol, c): n for c, n in self.finished.items()},
            latency_bucket_counts=tuple(cumulative),
            latency_sum_s=self.latency_sum_s,
            latency_count=self.latency_count,
            protocol=self.protocol,
        )
        if reset_peak:
            self.own.peak = self.own.inflight
        return snap


def _summed(model: str, load: _Load, parts: list[ModelSnapshot]) -> ModelSnapshot:
    finished: dict[str, int] = {}
    for part in parts:
        for code, n in part.finished_total.items():
            finished[code] = finished.get(code, 0) + n
    return ModelSnapshot(
        model=model,
        inflight=load.inflight,
        inflight_peak=load.peak,
        inflight_seconds=load.seconds,
        started_total=sum(p.started_total for p in parts),
        finished_total=finished,
        latency_bucket_counts=tuple(map(sum, zip(*(p.latency_bucket_counts for p in parts), strict=True))),
        latency_sum_s=sum(p.latency_sum_s for p in parts),
        latency_count=sum(p.latency_count for p in parts),
    )


class StatsSource(Protocol):
    """What readers (the controller, /metrics) need: ProxyStats in one process, or
    shared_stats.SharedStatsReader summing the relay workers' counters."""

    def snapshot(self, now_s: float, reset_peaks: bool = False) -> ProxySnapshot: ...


class ProxyStats:
    """All models' live counters. The relays ask `model(name, now_s, protocol)` once per request."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelStats] = {}
        self._loads: dict[str, _Load] = {}

    def model(self, name: str, now_s: float, protocol: str = GRPC) -> ModelStats:
        stats = self._models.get((name, protocol))
        if stats is None:
            if name not in self._loads and len(self._loads) >= MAX_MODELS:
                name = UNKNOWN_MODEL
                stats = self._models.get((name, protocol))
            if stats is None:
                load = self._loads.get(name)
                if load is None:
                    load = self._loads[name] = _Load(now_s)
                stats = self._models[(name, protocol)] = self._new_model(name, now_s, protocol, load)
        return stats

    def _new_model(self, name: str, now_s: float, protocol: str, load: _Load) -> ModelStats:
        """A new pair's counters; shared_stats.py's worker stats also publish them."""
        return ModelStats(name, now_s, protocol, load)

    def snapshot(self, now_s: float, reset_peaks: bool = False) -> ProxySnapshot:
        """A consistent copy of every model's counters. One reader (the controller) should own
        reset_peaks=True so that `inflight_peak` means "since my previous look"."""
        protocols = {key: m.snapshot(now_s, reset_peaks) for key, m in self._models.items()}
        parts: dict[str, list[ModelSnapshot]] = {}
        for (name, _), snap in protocols.items():
            parts.setdefault(name, []).append(snap)
        models = {}
        for name, load in self._loads.items():
            load.advance(now_s)
            models[name] = _summed(name, load, parts.get(name, []))
            if reset_peaks:
                load.peak = load.inflight
        return ProxySnapshot(now_s=now_s, models=models, protocols=protocols)
