"""Prometheus export of the proxy's live statistics and the GPU sampler.

A custom collector builds every series at scrape time from snapshots, so the relay's hot
path never touches a Prometheus object. Scrapes must run on the event-loop thread that
owns `ProxyStats` (the aiohttp handler in proxy/http.py does): taking a snapshot
advances its in-flight integral.

Other components (the controller) register their own collectors in the same
`CollectorRegistry`; `new_registry` builds one from any number of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from tritonpilot.proxy.gpu import GpuSampler, GpuSnapshot
from tritonpilot.proxy.limits import ConnectionsSnapshot
from tritonpilot.proxy.stats import LATENCY_BUCKETS_S, UNKNOWN_MODEL, ProxySnapshot, StatsSource

# Prometheus label values may be empty, but an empty model label reads as "no label";
# requests whose model could not be read are exported under this name instead.
UNKNOWN_MODEL_LABEL = "_unknown"

# Upper bounds as Prometheus writes them ("0.0005", ..., "+Inf"), computed once.
_LE_LABELS: tuple[str, ...] = tuple(floatToGoString(b) for b in LATENCY_BUCKETS_S) + ("+Inf",)


def model_label(model: str) -> str:
    return UNKNOWN_MODEL_LABEL if model == UNKNOWN_MODEL else model


def new_registry(collectors: Iterable[Collector]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one, which would also
    export process metrics from whichever thread scrapes) holding these collectors."""
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


class ProxyCollector(Collector):
    """tritonpilot_* series for in-flight requests, request counts, latency and GPUs."""

    def __init__(self, stats: StatsSource, gpu_sampler: GpuSampler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stats = stats
        self._gpu_sampler = gpu_sampler
        self._clock = clock

    def describe(self) -> Iterator[Metric]:
        # Names without samples: lets the registry reject a clash with another
        # collector at register time without taking a snapshot.
        return iter(_proxy_families() + _gpu_families())

    def collect(self) -> Iterator[Metric]:
        # Never reset peaks here: the controller owns "peak since my previous look".
        proxy = self._stats.snapshot(self._clock(), reset_peaks=False)
        yield from proxy_families(proxy)
        yield from gpu_families(self._gpu_sampler.latest())


def _proxy_families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily,
                               HistogramMetricFamily]:
    return (
        GaugeMetricFamily("tritonpilot_inflight_requests",
                          "Requests in flight through the proxy now, per model and protocol "
                          "(grpc, http); sum over protocol for a model's load.",
                          labels=["model", "protocol"]),
        CounterMetricFamily("tritonpilot_requests_started",
                            "Requests the proxy has started forwarding, per model and protocol.",
                            labels=["model", "protocol"]),
        CounterMetricFamily("tritonpilot_requests",
                            "Requests finished, per model, protocol and code (gRPC status name; "
                            "HTTP status, 499 client closed first, 502 Triton closed first).",
                            labels=["model", "code", "protocol"]),
        HistogramMetricFamily("tritonpilot_request_duration_seconds",
                              "Request latency seen by the proxy, per model and protocol.",
                              labels=["model", "protocol"]),
    )


def _gpu_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        # gpu: the sampler's index (NVML's, or the order of Triton's /metrics); uuid: the GPU's
        # UUID, as Triton's own nv_gpu_* series carry it in gpu_uuid.
        GaugeMetricFamily("tritonpilot_gpu_utilization_ratio",
                          "GPU utilization, 0..1, per GPU.", labels=["gpu", "uuid"]),
        GaugeMetricFamily("tritonpilot_gpu_memory_used_bytes",
                          "GPU memory used, per GPU.", labels=["gpu", "uuid"]),
        GaugeMetricFamily("tritonpilot_gpu_memory_total_bytes",
                          "GPU memory in total, per GPU.", labels=["gpu", "uuid"]),
    )


def proxy_families(snapshot: ProxySnapshot) -> list[Metric]:
    inflight, started, finished, duration = _proxy_families()
    for name, protocol in sorted(snapshot.protocols):
        model = snapshot.protocols[(name, protocol)]
        label = model_label(name)
        inflight.add_metric([label, protocol], model.inflight)
        started.add_metric([label, protocol], model.started_total)
        for code in sorted(model.finished_total):
            finished.add_metric([label, code, protocol], model.finished_total[code])
        duration.add_metric(
            [label, protocol],
            buckets=list(zip(_LE_LABELS, model.latency_bucket_counts, strict=True)),
            sum_value=model.latency_sum_s,
        )
    return [inflight, started, finished, duration]


def gpu_families(snapshot: GpuSnapshot) -> list[Metric]:
    """GPU gauges; none at all when the sampler has no data, so a dashboard shows a gap
    instead of a made-up zero."""
    if snapshot.gpus is None:
        return []
    utilization, used, total = _gpu_families()
    for gpu in snapshot.gpus:
        label = [str(gpu.index), gpu.uuid]
        utilization.add_metric(label, gpu.utilization_ratio)
        used.add_metric(label, gpu.memory_used_bytes)
        total.add_metric(label, gpu.memory_total_bytes)
    return [utilization, used, total]


class ConnectionCollector(Collector):
    """tritonpilot_connections* series: client connections open now, and those the
    connection limits refused or sent away (proxy/limits.py), summed over the listeners
    given (the gRPC port's and the HTTP port's guards)."""

    def __init__(self, *snapshots: Callable[[], ConnectionsSnapshot]) -> None:
        self._snapshots = snapshots

    def describe(self) -> Iterator[Metric]:
        return iter(_connection_families())

    def collect(self) -> Iterator[Metric]:
        yield from connection_families(summed_connections([take() for take in self._snapshots]))


def summed_connections(snapshots: list[ConnectionsSnapshot]) -> ConnectionsSnapshot:
    def add(maps: list[Mapping[str, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in maps:
            for key, n in m.items():
                out[key] = out.get(key, 0) + n
        return out
    if len(snapshots) == 1:
        return snapshots[0]
    return ConnectionsSnapshot(open=sum(s.open for s in snapshots),
                               refused_total=add([s.refused_total for s in snapshots]),
                               goaway_total=add([s.goaway_total for s in snapshots]),
                               http2_refused_total=add([s.http2_refused_total for s in snapshots]))


def _connection_families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily,
                                     CounterMetricFamily]:
    return (
        GaugeMetricFamily("tritonpilot_connections", "Client connections open now."),
        CounterMetricFamily("tritonpilot_connections_refused",
                            "Client connections closed by a limit before serving them, per reason "
                            "(max_connections, preface_timeout).", labels=["reason"]),
        CounterMetricFamily("tritonpilot_connections_goaway",
                            "Client connections sent a graceful GOAWAY by a limit, per reason "
                            "(max_age, idle).", labels=["reason"]),
        CounterMetricFamily("tritonpilot_http2_refused",
                            "What the HTTP/2 abuse limits refused, per reason: client connections closed "
                            "with GOAWAY ENHANCE_YOUR_CALM (rapid_reset, header_block, settings_flood, "
                            "ping_flood, empty_frames) and streams refused (concurrent_streams).",
                            labels=["reason"]),
    )


def connection_families(snapshot: ConnectionsSnapshot) -> list[Metric]:
    open_now, refused, goaway, http2 = _connection_families()
    open_now.add_metric([], snapshot.open)
    for reason in sorted(snapshot.refused_total):
        refused.add_metric([reason], snapshot.refused_total[reason])
    for reason in sorted(snapshot.goaway_total):
        goaway.add_metric([reason], snapshot.goaway_total[reason])
    for reason in sorted(snapshot.http2_refused_total):
        http2.add_metric([reason], snapshot.http2_refused_total[reason])
    return [open_now, refused, goaway, http2]
