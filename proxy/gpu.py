"""GPU utilization and memory per GPU, sampled in the background and read as snapshots.

Three sources share one small interface (`run()`, `latest()`, `close()`):
- `NvmlGpuSampler`: NVML through the `pynvml` module (nvidia-ml-py), the first choice;
- `TritonMetricsGpuSource`: Triton's own Prometheus endpoint, for when NVML is not
  visible to the sidecar (e.g. Triton in another container) but Triton sees the GPUs;
- `NullGpuSampler`: no GPU data at all, as on CPU-only machines.

"No data" is `GpuSnapshot.gpus is None`, never zeros or a stale guess: the controller
must be able to tell "GPU idle" from "we don't know".

GPUs are known by UUID, which NVML and Triton's metrics (label gpu_uuid) share. A model
config names GPUs by CUDA device id inside Triton instead; `cuda_device_order` says which
UUID each id is, where that can be known (its docstring has the rule and its limits).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
    # NVML device index; for Triton's metrics, the order its /metrics lists the GPUs in,
    # which is no CUDA device id (see `cuda_device_order`).
    index: int
    name: str  # NVML: device name; Triton's metrics: the GPU UUID
    utilization_ratio: float  # 0..1
    memory_used_bytes: int
    memory_total_bytes: int
    uuid: str = ""  # "GPU-..." as NVML, nvidia-smi and Triton's gpu_uuid label write it


@dataclass(frozen=True)
class GpuSnapshot:
    now_s: float  # monotonic time the sample was taken
    gpus: tuple[GpuSample, ...] | None  # None: no data (never a guess)
    source: str  # "nvml", "triton-metrics", "none"
    reason: str = ""  # why there is no data; empty when there is
    # The UUIDs of the GPUs Triton uses, in CUDA device-id order: entry i is the GPU a model
    # config's instance_group `gpus: [i]` means. None: that order is not known (`cuda_order` says why).
    cuda_uuids: tuple[str, ...] | None = None
    cuda_order: str = ""  # how cuda_uuids was known, or why it was not


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


def _text(raw: object) -> str:
    # Older nvidia-ml-py versions return bytes.
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def cuda_visible_devices(env: Mapping[str, str] | None = None) -> str | None:
    """CUDA_VISIBLE_DEVICES from the environment (None: unset), read once by each sampler."""
    return (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")


def cuda_device_order(uuids: Sequence[str], visible: str | None,
                      nvml_order: bool) -> tuple[tuple[str, ...] | None, str]:
    """The UUIDs of the GPUs Triton uses in CUDA device-id order, and how that was known;
    (None, why) where it cannot be known. Never a guess: a caller that gets None must treat
    every GPU as possibly the model's.

    `uuids`: every GPU the source sees, in NVML index order when `nvml_order`, else (Triton's
    metrics) in the order of its /metrics, which is no order at all: Triton adds its GPUs in
    CUDA order, but prometheus-cpp writes a family's series from a hash map. `visible`:
    CUDA_VISIBLE_DEVICES as Triton has it (the sidecar's own: set it to Triton's value).

    - CUDA_VISIBLE_DEVICES of GPU UUIDs ("GPU-8932f937-...", or a prefix that names one GPU,
      as CUDA accepts): that list, in its order, is CUDA's. Works with either source.
    - CUDA_VISIBLE_DEVICES of indices, with NVML: those NVML indices, in that order. CUDA
      reads the indices in its own enumeration order, which is NVML's (PCI bus order) with
      CUDA_DEVICE_ORDER=PCI_BUS_ID, and in practice on machines whose GPUs are all alike.
      With Triton's metrics, indices name nothing it exports: unknown.
    - Unset, with NVML: NVML's order, with the same proviso.
    - Triton's metrics with one GPU: CUDA device 0 (Triton exports exactly the GPUs CUDA
      shows it). With several and CUDA_VISIBLE_DEVICES unset (or of indices): unknown.
    - Anything else (MIG entries, an entry that names no GPU or several, duplicates, a mix):
      unknown, rather than CUDA's rule of cutting the list at the first bad entry.
    """
    if not nvml_order and len(uuids) == 1:
        return tuple(uuids), "Triton's only GPU"
    if visible is None:
        if nvml_order:
            return tuple(uuids), "NVML order (CUDA_VISIBLE_DEVICES unset)"
        return None, "Triton's metrics list its GPUs in no CUDA order; set CUDA_VISIBLE_DEVICES to Triton's (UUIDs)"
    entries = [e.strip() for e in visible.split(",")] if visible.strip() else []
    order: list[str] = []
    for entry in entries:
        if entry.upper().startswith("GPU-"):
            found = [u for u in uuids if u.lower().startswith(entry.lower())]
        elif entry.isdecimal() and nvml_order:
            found = [uuids[int(entry)]] if int(entry) < len(uuids) else []
        else:
            return None, f"CUDA_VISIBLE_DEVICES entry {entry!r} cannot be told apart here"
        if len(found) != 1 or found[0] in order:
            return None, f"CUDA_VISIBLE_DEVICES entry {entry!r} names {len(found)} GPU(s) seen here, or a repeat"
        order.append(found[0])
    if not order:
        return None, "CUDA_VISIBLE_DEVICES is empty"
    if not nvml_order and len(order) != len(uuids):
        # Triton exports exactly the GPUs CUDA shows it: a different count is another value than Triton's.
        return None, f"CUDA_VISIBLE_DEVICES names {len(order)} GPU(s), Triton exports {len(uuids)}"
    return tuple(order), "CUDA_VISIBLE_DEVICES"


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
                 clock: Clock = time.monotonic, env: Mapping[str, str] | None = None) -> None:
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
        self._visible = cuda_visible_devices(env)
        self._handles: dict[int, Any] = {}
        self._names: dict[int, str] = {}
        self._uuids: dict[int, str] = {}
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
        order, how = cuda_device_order([g.uuid for g in gpus], self._visible, nvml_order=True)
        return GpuSnapshot(now_s, tuple(gpus), "nvml", cuda_uuids=order, cuda_order=how)

    def _sample_gpu(self, index: int) -> GpuSample:
        nvml = self._nvml
        handle = self._handles.get(index)
        if handle is None:
            # Handles and names are fixed for the life of the NVML session: fetch once.
            handle = self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
        name = self._names.get(index)
        if name is None:
            name = self._names[index] = _text(nvml.nvmlDeviceGetName(handle))
        uuid = self._uuids.get(index)
        if uuid is None:
            uuid = self._uuids[index] = _text(nvml.nvmlDeviceGetUUID(handle))
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuSample(
            index=index,
            name=name,
            utilization_ratio=utilization.gpu / 100.0,  # NVML reports percent
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            uuid=uuid,
        )


def make_gpu_sampler(interval_s: float, log: Any, nvml: ModuleType | Any | None = None,
                     clock: Clock = time.monotonic,
                     env: Mapping[str, str] | None = None) -> NvmlGpuSampler | NullGpuSampler:
    """The NVML sampler where NVML works, else the null sampler, with one warning saying why.

    `nvml` defaults to importing pynvml; tests pass a fake module, and `env` for os.environ."""
    if nvml is None:
        try:
            import pynvml  # noqa: PLC0415 - its absence is an expected case
        except ImportError as exc:
            return _null_with_warning(log, f"pynvml not importable: {exc}", clock)
        nvml = pynvml
    try:
        sampler = NvmlGpuSampler(interval_s, nvml=nvml, clock=clock, env=env)
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


def parse_triton_gpu_metrics(text: str, now_s: float, cuda_visible_devices: str | None = None) -> GpuSnapshot:
    """GPU data from Triton's Prometheus text; no data where Triton exports none (CPU-only
    Triton, or GPU metrics turned off) or a GPU lacks one of the three values.
    `cuda_visible_devices`: Triton's, for `cuda_device_order`."""
    values: dict[str, dict[str, float]] = {name: {} for name in _TRITON_GPU_METRICS}
    order: list[str] = []  # GPU UUIDs in the order /metrics lists them, which becomes the index
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
            uuid=uuid,
        ))
    cuda, how = cuda_device_order(order, cuda_visible_devices, nvml_order=False)
    return GpuSnapshot(now_s, tuple(gpus), "triton-metrics", cuda_uuids=cuda, cuda_order=how)


class TritonMetricsGpuSource:
    """GPU data scraped from Triton's metrics endpoint (e.g. http://127.0.0.1:8002/metrics).

    `sample()` scrapes once; `run()` scrapes every interval_s so this is a GpuSampler too.
    Triton refreshes its GPU metrics about every second (--metrics-interval-ms), so a
    shorter interval only repeats values."""

    def __init__(self, metrics_url: str, interval_s: float = 1.0, timeout_s: float = 2.0,
                 clock: Clock = time.monotonic, env: Mapping[str, str] | None = None) -> None:
        self._url = metrics_url
        self._visible = cuda_visible_devices(env)
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
            snapshot = parse_triton_gpu_metrics(text, self._clock(), self._visible)
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
