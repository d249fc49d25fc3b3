"""GPU utilization and memory per GPU, sampled in the background and read as snapshots.

Three sources share one small interface (`run()`, `latest()`, `close()`):
- `NvmlGpuSampler`: NVML through the `pynvml` module (nvidia-ml-py), the first choice;
- `TritonMetricsGpuSource`: Triton's own Prometheus endpoint, for when NVML is not
  visible to the sidecar (e.g. Triton in another container) but Triton sees the GPUs;
- `NullGpuSampler`: no GPU data at all, as on CPU-only machines.

"No data" is `GpuSnapshot.gpus is None`, never zeros or a stale guess: the controller
must be able to tell "GPU idle" from "we don't know".
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

_log = structlog.get_logger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class GpuSample:
    index: int  # NVML device index; for Triton's metrics, the order Triton lists the GPUs in
    name: str  # NVML: device name; Triton's metrics: the GPU UUID
    utilization_ratio: float  # 0..1
    memory_used_bytes: int
    memory_total_bytes: int


@dataclass(frozen=True)
class GpuSnapshot:
    now_s: float  # monotonic time the sample was taken
    gpus: tuple[GpuSample, ...] | None  # None: no data (never a guess)
    source: str  # "nvml", "triton-metrics", "none"
    reason: str = ""  # why there is no data; empty when there is


class GpuSampler(Protocol):
    """What the metrics exporter and the controller need from any GPU source."""

    async def run(self) -> None: ...

    def latest(self) -> GpuSnapshot: ...

    def close(self) -> None: ...


class _OncePerKind:
    """Logs a failure the first time each kind is seen, so a GPU that stays broken does
    not flood the log every interval; logs recovery (a change) once."""

    def __init__(self, event: str, **context: Any) -> None:
        self._event = event
        self._context = context
        self._seen: set[str] = set()
        self._failing = False

    def failed(self, kind: str, **fields: Any) -> None:
        self._failing = True
        if kind not in self._seen:
            self._seen.add(kind)
            _log.warning(self._event, kind=kind, **self._context, **fields)

    def ok(self) -> None:
        if self._failing:
            self._failing = False
            _log.info(self._event + "_recovered", **self._context)


def _error_kind(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class NullGpuSampler:
    """The GPU sampler where there are no GPU data: always says "no data"."""

    def __init__(self, reason: str = "no GPU source", clock: Clock = time.monotonic) -> None:
        self._reason = reason
        self._clock = clock

    async def run(self) -> None:
        # Nothing to sample, but stay alive like the real samplers until cancelled,
        # so the composition root can treat every sampler the same.
        await asyncio.Event().wait()

    def latest(self) -> GpuSnapshot:
        return GpuSnapshot(now_s=self._clock(), gpus=None, source="none", reason=self._reason)

    def close(self) -> None:
        pass


class NvmlGpuSampler:
    """Samples every GPU NVML sees, every interval_s.

    The constructor initializes NVML and raises whatever nvmlInit raises; use
    `make_gpu_sampler` to get the null sampler instead where NVML is unusable.
    `nvml` is the pynvml module, or a fake with the same functions in tests.
    """

    def __init__(self, interval_s: float, nvml: ModuleType | Any | None = None,
                 clock: Clock = time.monotonic) -> None:
        if nvml is None:
            import pynvml  # noqa: PLC0415 - optional at import time of this module
            nvml = pynvml
        self._nvml: ModuleType | Any = nvml
        self._interval_s = interval_s
        self._clock = clock
        # NVML is thread-safe, but a sample running in a worker thread must not race
        # nvmlShutdown in close(), nor another sample.
        self._lock = threading.Lock()
        self._closed = False
        self._nvml.nvmlInit()
        try:
            self.device_count: int = int(self._nvml.nvmlDeviceGetCount())
        except BaseException:
            # Half-initialized is worse than failed: leave no NVML session behind.
            self._nvml.nvmlShutdown()
            raise
        self._handles: dict[int, Any] = {}
        self._names: dict[int, str] = {}
        self._errors = _OncePerKind("gpu_sample_failed", source="nvml")
        self._latest = GpuSnapshot(now_s=clock(), gpus=None, source="nvml",
                                   reason="not sampled yet")

    async def run(self) -> None:
        """Sample until cancelled. Each sample runs in a worker thread: NVML calls are
        usually fast, but on a GPU in a bad state (Xid, fallen off the bus) they can block
        for seconds, and this loop shares the event loop with the proxy's hot path."""
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self._interval_s)

    def latest(self) -> GpuSnapshot:
        return self._latest

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:  # noqa: BLE001 - shutting down: nothing left to protect
                _log.warning("nvml_shutdown_failed", error=_error_kind(exc))

    def sample(self) -> GpuSnapshot:
        """One blocking sample of every GPU, also kept as `latest()`."""
        with self._lock:
            self._latest = self._sample_locked()
            return self._latest

    def _sample_locked(self) -> GpuSnapshot:
        # Any GPU failing makes the whole sample "no data": a maximum or a total over
        # only the GPUs that answered would be a guess.
        now_s = self._clock()
        if self._closed:
            return GpuSnapshot(now_s, None, "nvml", reason="sampler closed")
        gpus: list[GpuSample] = []
        for index in range(self.device_count):
            try:
                gpus.append(self._sample_gpu(index))
            except Exception as exc:  # noqa: BLE001 - any NVML failure means no data, not a crash
                kind = _error_kind(exc)
                self._errors.failed(kind, gpu=index)
                return GpuSnapshot(now_s, None, "nvml", reason=f"GPU {index}: {kind}")
        self._errors.ok()
        return GpuSnapshot(now_s, tuple(gpus), "nvml")

    def _sample_gpu(self, index: int) -> GpuSample:
        nvml = self._nvml
        handle = self._handles.get(index)
        if handle is None:
            # Handles and names are fixed for the life of the NVML session: fetch once.
            handle = self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
        name = self._names.get(index)
        if name is None:
            raw = nvml.nvmlDeviceGetName(handle)
            # Older nvidia-ml-py versions return bytes.
            name = self._names[index] = raw.decode() if isinstance(raw, bytes) else str(raw)
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuSample(
            index=index,
            name=name,
            utilization_ratio=utilization.gpu / 100.0,  # NVML reports percent
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
        )


def make_gpu_sampler(interval_s: float, log: Any, nvml: ModuleType | Any | None = None,
                     clock: Clock = time.monotonic) -> NvmlGpuSampler | NullGpuSampler:
    """The NVML sampler where NVML works, else the null sampler, with one warning saying why.

    `nvml` defaults to importing pynvml; tests pass a fake module."""
    if nvml is None:
        try:
            import pynvml  # noqa: PLC0415 - its absence is an expected case
        except ImportError as exc:
            return _null_with_warning(log, f"pynvml not importable: {exc}", clock)
        nvml = pynvml
    try:
        sampler = NvmlGpuSampler(interval_s, nvml=nvml, clock=clock)
    except Exception as exc:  # noqa: BLE001 - whatever breaks NVML, the sidecar still serves
        return _null_with_warning(log, f"NVML init failed: {_error_kind(exc)}", clock)
    if sampler.device_count == 0:
        sampler.close()
        return _null_with_warning(log, "NVML sees no GPUs", clock)
    log.info("gpu_sampler_started", source="nvml", gpus=sampler.device_count,
             interval_s=interval_s)
    return sampler


def _null_with_warning(log: Any, reason: str, clock: Clock) -> NullGpuSampler:
    log.warning("gpu_sampler_unavailable", reason=reason, fallback="no GPU data")
    return NullGpuSampler(reason=reason, clock=clock)


# Triton's GPU metrics (Triton 2.x): utilization is already a 0..1 ratio.
_TRITON_UTILIZATION = "nv_gpu_utilization"
_TRITON_MEMORY_USED = "nv_gpu_memory_used_bytes"
_TRITON_MEMORY_TOTAL = "nv_gpu_memory_total_bytes"
_TRITON_GPU_METRICS = (_TRITON_UTILIZATION, _TRITON_MEMORY_USED, _TRITON_MEMORY_TOTAL)


def parse_triton_gpu_metrics(text: str, now_s: float) -> GpuSnapshot:
    """GPU data from Triton's Prometheus text; no data where Triton exports none (CPU-only
    Triton, or GPU metrics turned off) or a GPU lacks one of the three values."""
    values: dict[str, dict[str, float]] = {name: {} for name in _TRITON_GPU_METRICS}
    order: list[str] = []  # GPU UUIDs in Triton's order, which becomes the index
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in values:
                continue
            uuid = sample.labels.get("gpu_uuid", "")
            values[sample.name][uuid] = float(sample.value)
            if uuid not in order:
                order.append(uuid)
    if not order:
        return GpuSnapshot(now_s, None, "triton-metrics",
                           reason="Triton exports no nv_gpu_* metrics")
    gpus: list[GpuSample] = []
    for index, uuid in enumerate(order):
        missing = [name for name in _TRITON_GPU_METRICS if uuid not in values[name]]
        if missing:
            return GpuSnapshot(now_s, None, "triton-metrics",
                               reason=f"GPU {uuid}: missing {', '.join(missing)}")
        gpus.append(GpuSample(
            index=index,
            name=uuid,
            utilization_ratio=values[_TRITON_UTILIZATION][uuid],
            memory_used_bytes=int(values[_TRITON_MEMORY_USED][uuid]),
            memory_total_bytes=int(values[_TRITON_MEMORY_TOTAL][uuid]),
        ))
    return GpuSnapshot(now_s, tuple(gpus), "triton-metrics")


class TritonMetricsGpuSource:
    """GPU data scraped from Triton's metrics endpoint (e.g. http://127.0.0.1:8002/metrics).

    `sample()` scrapes once; `run()` scrapes every interval_s so this is a GpuSampler too.
    Triton refreshes its GPU metrics about every second (--metrics-interval-ms), so a
    shorter interval only repeats values."""

    def __init__(self, metrics_url: str, interval_s: float = 1.0, timeout_s: float = 2.0,
                 clock: Clock = time.monotonic) -> None:
        self._url = metrics_url
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._errors = _OncePerKind("gpu_sample_failed", source="triton-metrics", url=metrics_url)
        self._latest = GpuSnapshot(clock(), None, "triton-metrics", reason="not sampled yet")

    async def sample(self, session: aiohttp.ClientSession | None = None) -> GpuSnapshot:
        """One scrape. Pass a session to reuse its connection; without one a temporary
        session is made."""
        if session is None:
            async with aiohttp.ClientSession(timeout=self._timeout) as temporary:
                return await self._sample(temporary)
        return await self._sample(session)

    async def _sample(self, session: aiohttp.ClientSession) -> GpuSnapshot:
        try:
            async with session.get(self._url, timeout=self._timeout) as response:
                response.raise_for_status()
                text = await response.text()
            snapshot = parse_triton_gpu_metrics(text, self._clock())
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            # ValueError: text that is not Prometheus exposition format.
            kind = _error_kind(exc)
            self._errors.failed(kind)
            snapshot = GpuSnapshot(self._clock(), None, "triton-metrics", reason=kind)
        else:
            self._errors.ok()
        self._latest = snapshot
        return snapshot

    async def run(self) -> None:
        """Scrape until cancelled, over one session so the connection is kept alive."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            while True:
                await self._sample(session)
                await asyncio.sleep(self._interval_s)

    def latest(self) -> GpuSnapshot:
        return self._latest

    def close(self) -> None:
        # The session belongs to run() and closes when run() is cancelled.
        pass
