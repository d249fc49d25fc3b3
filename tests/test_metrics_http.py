"""The Prometheus collector (parsed back from its text output) and the metrics listener
(a real aiohttp server on a free port, asked by a real HTTP client)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tritonpilot.proxy.gpu import GpuSample, GpuSnapshot, NullGpuSampler
from tritonpilot.proxy.http import MetricsServer
from tritonpilot.proxy.metrics import ProxyCollector, new_registry
from tritonpilot.proxy.stats import LATENCY_BUCKETS_S, ProxyStats

GIB = 1024**3
OK, INVALID_ARGUMENT, UNAVAILABLE = 0, 3, 14


class FixedGpuSampler:
    """A GPU sampler whose snapshot the test sets."""

    def __init__(self, snapshot: GpuSnapshot) -> None:
        self.snapshot = snapshot

    async def run(self) -> None:
        await asyncio.Event().wait()

    def latest(self) -> GpuSnapshot:
        return self.snapshot

    def close(self) -> None:
        pass


TWO_GPUS = GpuSnapshot(50.0, (
    GpuSample(0, "NVIDIA H100", 0.37, 10 * GIB, 80 * GIB, "GPU-aaaa"),
    GpuSample(1, "NVIDIA H100", 1.0, 79 * GIB, 80 * GIB, "GPU-bbbb"),
), "nvml")


def drive_stats() -> ProxyStats:
    """A timeline by hand: model "resnet" gets 5 requests (3 finish: 2 OK, 1 UNAVAILABLE;
    2 still in flight); one request whose model could not be read fails without latency."""
    stats = ProxyStats()
    resnet = stats.model("resnet", now_s=10.0)
    for _ in range(5):
        resnet.begin(now_s=10.0)
    resnet.end(now_s=10.003, grpc_code=OK, duration_s=0.003)  # bucket le=0.005
    resnet.end(now_s=10.02, grpc_code=OK, duration_s=0.02)  # le=0.02: bounds are inclusive
    resnet.end(now_s=10.5, grpc_code=UNAVAILABLE, duration_s=45.0)  # only +Inf
    unknown = stats.model("", now_s=11.0)
    unknown.begin(now_s=11.0)
    unknown.end(now_s=11.0, grpc_code=INVALID_ARGUMENT, duration_s=None)
    return stats


def scrape(collector: Collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from the collector's Prometheus text."""
    text = generate_latest(new_registry([collector])).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_collector_exports_inflight_counts_and_started() -> None:
    samples = scrape(ProxyCollector(drive_stats(), FixedGpuSampler(TWO_GPUS), clock=lambda: 12.0))

    grpc = ("protocol", "grpc")
    assert samples[("tritonpilot_inflight_requests", (("model", "resnet"), grpc))] == 2
    assert samples[("tritonpilot_inflight_requests", (("model", "_unknown"), grpc))] == 0
    assert samples[("tritonpilot_requests_started_total", (("model", "resnet"), grpc))] == 5
    assert samples[("tritonpilot_requests_started_total", (("model", "_unknown"), grpc))] == 1
    finished = {labels: value for (name, labels), value in samples.items()
                if name == "tritonpilot_requests_total"}
    assert finished == {
        (("code", "OK"), ("model", "resnet"), grpc): 2,
        (("code", "UNAVAILABLE"), ("model", "resnet"), grpc): 1,
        (("code", "INVALID_ARGUMENT"), ("model", "_unknown"), grpc): 1,
    }


def test_each_protocol_has_its_series_and_the_controller_reads_their_sum() -> None:
    stats = ProxyStats()
    grpc, http = stats.model("m", 0.0), stats.model("m", 0.0, protocol="http")
    grpc.begin(0.0)
    http.begin(1.0)
    http.begin(1.0)
    http.end(2.0, 200, 1.0)
    http.end(2.0, 503, 1.0)
    assert grpc.inflight == http.inflight == 1  # the model's, over both: what a cap compares
    samples = scrape(ProxyCollector(stats, NullGpuSampler(), clock=lambda: 4.0))
    inflight = {labels: v for (name, labels), v in samples.items() if name == "tritonpilot_inflight_requests"}
    assert inflight == {(("model", "m"), ("protocol", "grpc")): 1, (("model", "m"), ("protocol", "http")): 0}
    codes = {labels: v for (name, labels), v in samples.items() if name == "tritonpilot_requests_total"}
    assert codes == {(("code", "200"), ("model", "m"), ("protocol", "http")): 1,
                     (("code", "503"), ("model", "m"), ("protocol", "http")): 1}
    summed = stats.snapshot(4.0, reset_peaks=True).models["m"]
    # 1 x (1-0) + 3 x (2-1) + 1 x (4-2) request-seconds; the peak of the sum, not a sum of peaks.
    assert (summed.inflight, summed.inflight_peak, summed.inflight_seconds) == (1, 3, 6.0)
    assert (summed.started_total, summed.finished_total, summed.errors_total) == (3, {"200": 1, "503": 1}, 1)
    assert summed.latency_count == 2


def test_collector_exports_the_latency_histogram_bucket_by_bucket() -> None:
    samples = scrape(ProxyCollector(drive_stats(), FixedGpuSampler(TWO_GPUS)))

    def bucket(model: str, le: str) -> float:
        return samples[("tritonpilot_request_duration_seconds_bucket",
                        (("le", le), ("model", model), ("protocol", "grpc")))]

    assert [bucket("resnet", le) for le in ("0.0025", "0.005", "0.01", "0.02", "0.035",
                                            "30.0", "+Inf")] == [0, 1, 1, 2, 2, 2, 3]
    les = [labels[0][1] for (name, labels) in samples
           if name == "tritonpilot_request_duration_seconds_bucket"
           and ("model", "resnet") in labels]
    assert len(les) == len(LATENCY_BUCKETS_S) + 1
    resnet = (("model", "resnet"), ("protocol", "grpc"))
    assert samples[("tritonpilot_request_duration_seconds_count", resnet)] == 3
    assert samples[("tritonpilot_request_duration_seconds_sum", resnet)] == pytest.approx(45.023)
    # The unknown-model request had no latency: an empty histogram, not a made-up one.
    assert bucket("_unknown", "+Inf") == 0
    assert samples[("tritonpilot_request_duration_seconds_count", (("model", "_unknown"), ("protocol", "grpc")))] == 0


def test_collector_exports_gpus_when_there_are_data() -> None:
    samples = scrape(ProxyCollector(ProxyStats(), FixedGpuSampler(TWO_GPUS)))
    gpu_samples = {key: value for key, value in samples.items() if "_gpu_" in key[0]}
    # uuid: the same value as Triton's gpu_uuid label, so the two can be joined.
    a, b = (("gpu", "0"), ("uuid", "GPU-aaaa")), (("gpu", "1"), ("uuid", "GPU-bbbb"))
    assert gpu_samples == {
        ("tritonpilot_gpu_utilization_ratio", a): 0.37,
        ("tritonpilot_gpu_utilization_ratio", b): 1.0,
        ("tritonpilot_gpu_memory_used_bytes", a): 10 * GIB,
        ("tritonpilot_gpu_memory_used_bytes", b): 79 * GIB,
        ("tritonpilot_gpu_memory_total_bytes", a): 80 * GIB,
        ("tritonpilot_gpu_memory_total_bytes", b): 80 * GIB,
    }


def test_collector_exports_no_gpu_series_without_data() -> None:
    samples = scrape(ProxyCollector(drive_stats(), NullGpuSampler("no GPU here")))
    assert not [name for name, _ in samples if "_gpu_" in name]
    assert ("tritonpilot_inflight_requests", (("model", "resnet"), ("protocol", "grpc"))) in samples


def test_collector_reads_live_stats_at_each_scrape_and_never_resets_peaks() -> None:
    stats = ProxyStats()
    model = stats.model("m", now_s=0.0)
    collector = ProxyCollector(stats, NullGpuSampler(), clock=lambda: 1.0)
    model.begin(now_s=0.0)
    model.begin(now_s=0.0)
    m = (("model", "m"), ("protocol", "grpc"))
    assert scrape(collector)[("tritonpilot_inflight_requests", m)] == 2
    model.end(now_s=0.5, grpc_code=OK, duration_s=0.5)
    assert scrape(collector)[("tritonpilot_inflight_requests", m)] == 1
    # The controller's "peak since my previous look" survives any number of scrapes.
    assert stats.snapshot(now_s=2.0, reset_peaks=True).models["m"].inflight_peak == 2


class ControllerLikeCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("tritonpilot_model_instances", "Instances.", labels=["model"])
        family.add_metric(["resnet"], 3)
        yield family


def test_registry_holds_the_proxy_collector_beside_another() -> None:
    registry = new_registry([ProxyCollector(drive_stats(), NullGpuSampler()),
                             ControllerLikeCollector()])
    names = {family.name for family in
             text_string_to_metric_families(generate_latest(registry).decode())}
    assert {"tritonpilot_inflight_requests", "tritonpilot_model_instances"} <= names
    # describe() lets the registry refuse a second exporter of the same names.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(ProxyCollector(ProxyStats(), NullGpuSampler()))


# --- The HTTP listener ------------------------------------------------------------------

class Readiness:
    """A ready check the test flips, as Triton's ServerReady would."""

    def __init__(self) -> None:
        self.answer: tuple[bool, str] = (False, "triton not ready: connection refused")
        self.error: Exception | None = None
        self.hang = False

    async def __call__(self) -> tuple[bool, str]:
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        return self.answer


async def get(session: aiohttp.ClientSession, url: str,
              headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with session.get(url, headers=headers) as response:
        return response.status, response.headers["Content-Type"], await response.text()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def with_server(scenario: Any, readiness: Readiness, status_provider: Any = None,
                      ready_timeout_s: float = 5.0) -> Any:
    registry = new_registry([ProxyCollector(drive_stats(), FixedGpuSampler(TWO_GPUS))])
    server = MetricsServer("127.0.0.1", 0, registry, readiness, status_provider,
                           ready_timeout_s=ready_timeout_s)
    await server.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            return await scenario(session, f"http://127.0.0.1:{server.port}")
    finally:
        await server.stop()


def test_healthz_answers_ok_while_triton_is_not_ready() -> None:
    async def scenario(session: aiohttp.ClientSession, base: str) -> tuple[int, str, str]:
        return await get(session, f"{base}/healthz")

    status, _, body = run(with_server(scenario, Readiness()))
    assert (status, body) == (200, "ok")


def test_readyz_follows_the_ready_check_with_its_reason() -> None:
    readiness = Readiness()

    async def scenario(session: aiohttp.ClientSession, base: str) -> list[tuple[int, str]]:
        answers = []
        for answer in [(False, "triton not ready: connection refused"), (True, "triton ready")]:
            readiness.answer = answer
            status, _, body = await get(session, f"{base}/readyz")
            answers.append((status, body))
        readiness.error = RuntimeError("channel closed")
        status, _, body = await get(session, f"{base}/readyz")
        answers.append((status, body))
        return answers

    assert run(with_server(scenario, readiness)) == [
        (503, "triton not ready: connection refused"),
        (200, "triton ready"),
        (503, "ready check failed: RuntimeError: channel closed"),
    ]


def test_readyz_answers_503_when_the_check_hangs() -> None:
    readiness = Readiness()
    readiness.hang = True

    async def scenario(session: aiohttp.ClientSession, base: str) -> tuple[int, str, str]:
        return await get(session, f"{base}/readyz")

    status, _, body = run(with_server(scenario, readiness, ready_timeout_s=0.05))
    assert (status, body) == (503, "ready check did not answer within 0.05 s")


def test_metrics_serves_prometheus_text() -> None:
    async def scenario(session: aiohttp.ClientSession, base: str) -> list[tuple[int, str, str]]:
        return [await get(session, f"{base}/metrics"),
                await get(session, f"{base}/metrics",
                          headers={"Accept": "application/openmetrics-text; version=1.0.0"})]

    (status, content_type, body), (om_status, om_type, om_body) = run(
        with_server(scenario, Readiness()))
    assert status == 200 and content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    assert samples[("tritonpilot_inflight_requests", (("model", "resnet"), ("protocol", "grpc")))] == 2
    assert samples[("tritonpilot_gpu_utilization_ratio", (("gpu", "1"), ("uuid", "GPU-bbbb")))] == 1.0
    # Prometheus asking for OpenMetrics gets it.
    assert om_status == 200 and om_type.startswith("application/openmetrics-text")
    assert om_body.rstrip().endswith("# EOF")


def test_status_serves_the_provider_json_or_a_json_error() -> None:
    calls = []

    def status_provider() -> dict[str, Any]:
        calls.append(1)
        if len(calls) > 1:
            raise KeyError("resnet")
        return {"models": {"resnet": {"instances": 2, "profile": "multi"}}}

    async def scenario(session: aiohttp.ClientSession, base: str) -> list[tuple[int, Any]]:
        answers = []
        for _ in range(2):
            async with session.get(f"{base}/status") as response:
                answers.append((response.status, await response.json()))
        return answers

    assert run(with_server(scenario, Readiness(), status_provider)) == [
        (200, {"models": {"resnet": {"instances": 2, "profile": "multi"}}}),
        (500, {"error": "status failed: KeyError: 'resnet'"}),
    ]

    async def without_provider(session: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
        async with session.get(f"{base}/status") as response:
            return response.status, await response.json()

    status, body = run(with_server(without_provider, Readiness()))
    assert status == 404 and "no status provider" in body["error"]


def test_unknown_path_is_404_and_stop_closes_the_port() -> None:
    async def scenario() -> tuple[int, type[BaseException] | None]:
        server = MetricsServer("127.0.0.1", 0, new_registry([]), Readiness())
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as session:
            status, _, _ = await get(session, f"{base}/nope")
        await server.stop()
        await server.stop()  # idempotent
        # A new session: a pooled keep-alive connection could fail differently.
        async with aiohttp.ClientSession() as session:
            try:
                await get(session, f"{base}/healthz")
            except aiohttp.ClientConnectorError as exc:
                return status, type(exc)
        return status, None

    assert run(scenario()) == (404, aiohttp.ClientConnectorError)


def test_port_before_start_is_an_error() -> None:
    server = MetricsServer("127.0.0.1", 0, new_registry([]), Readiness())
    with pytest.raises(RuntimeError, match="before start"):
        _ = server.port
