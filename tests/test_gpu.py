"""GPU sources: the NVML sampler against a fake pynvml, the null sampler, and Triton's
metrics endpoint served by a real local HTTP server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import structlog
from aiohttp import web
from structlog.testing import capture_logs

from tritonpilot.proxy.gpu import (
    GpuSample,
    GpuSnapshot,
    NullGpuSampler,
    NvmlGpuSampler,
    TritonMetricsGpuSource,
    cuda_device_order,
    make_gpu_sampler,
    parse_triton_gpu_metrics,
)

GIB = 1024**3


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError (whose str() is NVML's message)."""


@dataclass
class FakeGpu:
    name: str
    utilization_percent: int
    memory_used_bytes: int
    memory_total_bytes: int
    # Raised by nvmlDeviceGetUtilizationRates while set, as a lost GPU would.
    error: Exception | None = None
    uuid: str = ""


@dataclass
class FakeNvml:
    """The slice of the pynvml module the sampler uses, with GPUs whose numbers tests set."""

    gpus: list[FakeGpu]
    init_error: Exception | None = None
    calls: list[str] = field(default_factory=list)
    NVMLError: type[Exception] = FakeNVMLError

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self.calls.append(f"handle {index}")
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> bytes:
        return handle.uuid.encode()  # as older nvidia-ml-py versions return it

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        if handle.error is not None:
            raise handle.error
        return SimpleNamespace(gpu=handle.utilization_percent, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(used=handle.memory_used_bytes, total=handle.memory_total_bytes,
                               free=handle.memory_total_bytes - handle.memory_used_bytes)


UUID0 = "GPU-0a1b2c3d-0000-4000-8000-000000000000"
UUID1 = "GPU-9f8e7d6c-1111-4111-8111-111111111111"


def two_gpus() -> FakeNvml:
    return FakeNvml(gpus=[
        FakeGpu("NVIDIA H100 80GB HBM3", 37, 10 * GIB, 80 * GIB, uuid=UUID0),
        FakeGpu("NVIDIA H100 80GB HBM3", 100, 79 * GIB, 80 * GIB, uuid=UUID1),
    ])


class FakeClock:
    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition with a generous deadline: the machine has 2 shared cores."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


# --- NVML sampler ------------------------------------------------------------------------

def test_nvml_sample_reports_every_gpu_with_ratio_and_bytes() -> None:
    nvml, clock = two_gpus(), FakeClock(1000.0)
    sampler = NvmlGpuSampler(1.0, nvml=nvml, clock=clock, env={})

    assert sampler.latest().gpus is None  # before any sample: no data, not zeros
    clock.now_s = 1001.5
    snapshot = sampler.sample()

    assert snapshot == GpuSnapshot(1001.5, (
        GpuSample(0, "NVIDIA H100 80GB HBM3", 0.37, 10 * GIB, 80 * GIB, UUID0),
        GpuSample(1, "NVIDIA H100 80GB HBM3", 1.0, 79 * GIB, 80 * GIB, UUID1),
    ), "nvml", cuda_uuids=(UUID0, UUID1), cuda_order="NVML order (CUDA_VISIBLE_DEVICES unset)")
    assert sampler.latest() == snapshot


def test_nvml_fetches_handles_once_and_shuts_down_once() -> None:
    nvml = two_gpus()
    sampler = NvmlGpuSampler(1.0, nvml=nvml)
    sampler.sample()
    sampler.sample()
    sampler.close()
    sampler.close()

    assert nvml.calls == ["init", "handle 0", "handle 1", "shutdown"]
    assert sampler.sample().gpus is None  # closed: no data rather than an NVML error


def test_nvml_error_on_one_gpu_gives_no_data_logged_once_per_kind() -> None:
    nvml = two_gpus()
    sampler = NvmlGpuSampler(1.0, nvml=nvml)
    nvml.gpus[1].error = FakeNVMLError("GPU is lost")

    with capture_logs() as logs:
        first = sampler.sample()
        second = sampler.sample()
        nvml.gpus[1].error = FakeNVMLError("Unknown Error")
        third = sampler.sample()
        nvml.gpus[1].error = None
        recovered = sampler.sample()
        nvml.gpus[1].error = FakeNVMLError("GPU is lost")
        again = sampler.sample()

    assert first.gpus is None and second.gpus is None and third.gpus is None
    assert first.reason == "GPU 1: FakeNVMLError: GPU is lost"
    assert recovered.gpus is not None and len(recovered.gpus) == 2
    assert again.gpus is None
    assert [(e["event"], e.get("kind")) for e in logs] == [
        ("gpu_sample_failed", "FakeNVMLError: GPU is lost"),
        ("gpu_sample_failed", "FakeNVMLError: Unknown Error"),
        ("gpu_sample_failed_recovered", None),
        # "GPU is lost" again: already logged once, so silent.
    ]
    assert logs[0]["log_level"] == "warning" and logs[0]["gpu"] == 1


def first_utilization(sampler: NvmlGpuSampler) -> float | None:
    gpus = sampler.latest().gpus
    return None if gpus is None else gpus[0].utilization_ratio


def test_nvml_run_loop_samples_until_cancelled() -> None:
    nvml = two_gpus()
    sampler = NvmlGpuSampler(0.001, nvml=nvml)

    async def scenario() -> None:
        task = asyncio.create_task(sampler.run())
        await wait_for(lambda: sampler.latest().gpus is not None)
        nvml.gpus[0].utilization_percent = 80
        await wait_for(lambda: first_utilization(sampler) == 0.8)
        nvml.gpus[0].error = FakeNVMLError("GPU is lost")
        await wait_for(lambda: sampler.latest().gpus is None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    sampler.close()
    assert nvml.calls[-1] == "shutdown"


def test_make_gpu_sampler_uses_nvml_when_it_initializes() -> None:
    with capture_logs() as logs:
        sampler = make_gpu_sampler(1.0, structlog.get_logger(), nvml=two_gpus())
    assert isinstance(sampler, NvmlGpuSampler)
    assert [(e["event"], e["gpus"]) for e in logs] == [("gpu_sampler_started", 2)]


def test_make_gpu_sampler_falls_back_to_null_when_nvml_init_fails() -> None:
    nvml = FakeNvml(gpus=[], init_error=FakeNVMLError("NVML Shared Library Not Found"))
    with capture_logs() as logs:
        sampler = make_gpu_sampler(1.0, structlog.get_logger(), nvml=nvml)
        for _ in range(3):
            snapshot = sampler.latest()

    assert isinstance(sampler, NullGpuSampler)
    assert snapshot.gpus is None and snapshot.source == "none"
    assert snapshot.reason == "NVML init failed: FakeNVMLError: NVML Shared Library Not Found"
    assert logs == [{"event": "gpu_sampler_unavailable", "log_level": "warning",
                     "reason": snapshot.reason, "fallback": "no GPU data"}]


def test_make_gpu_sampler_falls_back_to_null_when_nvml_sees_no_gpu() -> None:
    nvml = FakeNvml(gpus=[])
    with capture_logs() as logs:
        sampler = make_gpu_sampler(1.0, structlog.get_logger(), nvml=nvml)
    assert isinstance(sampler, NullGpuSampler)
    assert nvml.calls == ["init", "shutdown"]
    assert [e["reason"] for e in logs] == ["NVML sees no GPUs"]


def test_make_gpu_sampler_falls_back_to_null_when_pynvml_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with capture_logs() as logs:
        sampler = make_gpu_sampler(1.0, structlog.get_logger())
    assert isinstance(sampler, NullGpuSampler)
    assert len(logs) == 1 and logs[0]["reason"].startswith("pynvml not importable")


def test_make_gpu_sampler_on_this_machine_never_crashes() -> None:
    # The real pynvml: a null sampler here (no GPU), the NVML one on a GPU machine.
    with capture_logs() as logs:
        sampler = make_gpu_sampler(1.0, structlog.get_logger())
    try:
        assert len(logs) == 1
        if isinstance(sampler, NullGpuSampler):
            assert logs[0]["event"] == "gpu_sampler_unavailable"
        else:
            assert sampler.sample().gpus is not None
    finally:
        sampler.close()


def test_null_sampler_says_no_data_and_runs_until_cancelled() -> None:
    sampler = NullGpuSampler(reason="no GPU here", clock=FakeClock(5.0))
    assert sampler.latest() == GpuSnapshot(5.0, None, "none", "no GPU here")

    async def scenario() -> None:
        task = asyncio.create_task(sampler.run())
        await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    sampler.close()


# --- Triton's metrics endpoint -----------------------------------------------------------

# Trimmed from a GPU Triton 2.51's /metrics: two GPUs, plus model series to skip.
TRITON_GPU_METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="simple",version="1"} 12
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-aaaa"} 0.25
nv_gpu_utilization{gpu_uuid="GPU-bbbb"} 0.5
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-aaaa"} 85899345920
nv_gpu_memory_total_bytes{gpu_uuid="GPU-bbbb"} 85899345920
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-aaaa"} 1073741824
nv_gpu_memory_used_bytes{gpu_uuid="GPU-bbbb"} 2147483648
# HELP nv_gpu_power_usage GPU power usage in watts
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{gpu_uuid="GPU-aaaa"} 70.5
"""

# A CPU-only Triton exports model and CPU series only.
TRITON_CPU_METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="simple",version="1"} 12
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.125
"""


async def serve_text(pages: dict[str, str]) -> tuple[web.AppRunner, str]:
    """A real HTTP server on a free loopback port serving fixed pages; returns its base URL."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=pages[request.path])

    app = web.Application()
    for path in pages:
        app.router.add_get(path, page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def test_triton_metrics_source_reads_gpus_in_triton_order() -> None:
    async def scenario() -> tuple[GpuSnapshot, GpuSnapshot]:
        runner, base = await serve_text({"/metrics": TRITON_GPU_METRICS})
        try:
            source = TritonMetricsGpuSource(f"{base}/metrics", clock=FakeClock(7.0), env={})
            return await source.sample(), source.latest()
        finally:
            await runner.cleanup()

    snapshot, latest = run(scenario())  # type: ignore[misc]
    # Two GPUs and no CUDA_VISIBLE_DEVICES: which is CUDA device 0 is not known.
    assert snapshot == GpuSnapshot(7.0, (
        GpuSample(0, "GPU-aaaa", 0.25, 1 * GIB, 80 * GIB, "GPU-aaaa"),
        GpuSample(1, "GPU-bbbb", 0.5, 2 * GIB, 80 * GIB, "GPU-bbbb"),
    ), "triton-metrics", cuda_uuids=None, cuda_order=snapshot.cuda_order)
    assert "no CUDA order" in snapshot.cuda_order
    assert latest == snapshot


def test_triton_metrics_source_without_gpu_metrics_says_no_data() -> None:
    async def scenario() -> GpuSnapshot:
        runner, base = await serve_text({"/metrics": TRITON_CPU_METRICS})
        try:
            return await TritonMetricsGpuSource(f"{base}/metrics").sample()
        finally:
            await runner.cleanup()

    snapshot = run(scenario())
    assert isinstance(snapshot, GpuSnapshot)
    assert snapshot.gpus is None
    assert snapshot.reason == "Triton exports no nv_gpu_* metrics"


def test_triton_metrics_source_errors_give_no_data_logged_once() -> None:
    async def scenario() -> list[GpuSnapshot]:
        runner, base = await serve_text({"/metrics": TRITON_GPU_METRICS})
        try:
            source = TritonMetricsGpuSource(f"{base}/nope")
            return [await source.sample(), await source.sample()]
        finally:
            await runner.cleanup()

    with capture_logs() as logs:
        snapshots = run(scenario())
    assert [s.gpus for s in snapshots] == [None, None]  # type: ignore[attr-defined]
    assert "404" in snapshots[0].reason  # type: ignore[index]
    assert [e["event"] for e in logs] == ["gpu_sample_failed"]


def test_triton_metrics_source_unreachable_gives_no_data() -> None:
    async def scenario() -> GpuSnapshot:
        runner, base = await serve_text({})
        await runner.cleanup()  # the port is now closed: connection refused
        return await TritonMetricsGpuSource(f"{base}/metrics", timeout_s=5.0).sample()

    snapshot = run(scenario())
    assert isinstance(snapshot, GpuSnapshot) and snapshot.gpus is None
    assert snapshot.reason.startswith("ClientConnectorError")


def test_triton_metrics_source_run_loop_keeps_latest_fresh() -> None:
    clock = FakeClock(0.0)

    async def scenario() -> GpuSnapshot:
        runner, base = await serve_text({"/metrics": TRITON_GPU_METRICS})
        source = TritonMetricsGpuSource(f"{base}/metrics", interval_s=0.001, clock=clock)
        task = asyncio.create_task(source.run())
        try:
            await wait_for(lambda: source.latest().gpus is not None)
            # Not a single sample: the loop goes on, and latest() follows it.
            clock.now_s = 5.0
            await wait_for(lambda: source.latest().now_s == 5.0)
            return source.latest()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            source.close()
            await runner.cleanup()

    snapshot = run(scenario())
    assert isinstance(snapshot, GpuSnapshot) and snapshot.gpus is not None
    assert [g.name for g in snapshot.gpus] == ["GPU-aaaa", "GPU-bbbb"]


def test_parse_triton_gpu_metrics_rejects_a_gpu_missing_a_value() -> None:
    text = TRITON_GPU_METRICS.replace(
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-bbbb"} 2147483648\n', "")
    snapshot = parse_triton_gpu_metrics(text, now_s=1.0)
    assert snapshot.gpus is None
    assert snapshot.reason == "GPU GPU-bbbb: missing nv_gpu_memory_used_bytes"


# --- CUDA device ids -> UUIDs ------------------------------------------------------------

A, B, C = "GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-aaaa3333-0000"


@pytest.mark.parametrize(("uuids", "visible", "nvml_order", "want"), [
    # NVML: its order, or CUDA_VISIBLE_DEVICES' indices into it / UUIDs, in the order listed.
    ((A, B, C), None, True, (A, B, C)),
    ((A, B, C), "2,0", True, (C, A)),
    ((A, B, C), f"{B},{A}", True, (B, A)),
    ((A, B, C), "GPU-bbbb", True, (B,)),           # a prefix that names one GPU, as CUDA takes it
    ((A, B, C), "GPU-aaaa", True, None),           # ... and one that names two: unknown
    ((A, B, C), "3", True, None),                  # no such GPU
    ((A, B, C), "0,0", True, None),                # a repeat
    ((A, B, C), "MIG-aaaa1111/1/0", True, None),   # MIG: not a whole GPU
    ((A, B, C), "", True, None),
    # Triton's metrics: one GPU is device 0; several only through UUIDs naming all of them.
    ((A,), None, False, (A,)),
    ((A,), "1", False, (A,)),
    ((A, B), None, False, None),
    ((A, B), "1,0", False, None),                  # indices name nothing Triton exports
    ((A, B), f"{B},{A}", False, (B, A)),
    ((A, B), f"{B}", False, None),                 # not Triton's value: it exports two
])
def test_cuda_device_order_maps_cuda_ids_to_uuids_or_says_it_cannot(
        uuids: tuple[str, ...], visible: str | None, nvml_order: bool, want: tuple[str, ...] | None) -> None:
    order, how = cuda_device_order(uuids, visible, nvml_order)
    assert order == want, how
    assert how  # always says how it knew, or why not


def test_nvml_sampler_orders_by_cuda_visible_devices() -> None:
    sampler = NvmlGpuSampler(1.0, nvml=two_gpus(), env={"CUDA_VISIBLE_DEVICES": "1"})
    snapshot = sampler.sample()
    assert [g.uuid for g in snapshot.gpus or ()] == [UUID0, UUID1]  # NVML still sees both
    assert (snapshot.cuda_uuids, snapshot.cuda_order) == ((UUID1,), "CUDA_VISIBLE_DEVICES")


def test_triton_metrics_are_mapped_to_cuda_ids_through_cuda_visible_devices() -> None:
    snapshot = parse_triton_gpu_metrics(TRITON_GPU_METRICS, 1.0, "GPU-bbbb,GPU-aaaa")
    assert snapshot.cuda_uuids == ("GPU-bbbb", "GPU-aaaa")
    assert [(g.index, g.uuid) for g in snapshot.gpus or ()] == [(0, "GPU-aaaa"), (1, "GPU-bbbb")]
