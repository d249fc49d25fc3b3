"""The load-generating engine behind `tritonpilot bench`, usable as a library.

Closed loop (`measure_concurrency`: N workers, each sends its next request when
the last one answers), open loop (`measure_request_rate`: constant spacing, as
perf_analyzer does by default, requests never wait for earlier ones), phases of
open-loop rates (`measure_rate_schedule`) and A/B alternation between two
endpoints (`measure_alternating`).

Accounting follows perf_analyzer: a request belongs to the window in which it
*completed*; throughput and latency come from the successful ones. In open loop
the window's offered rate counts the sends *scheduled* inside it, so offered vs
served shows whether the server keeps up.

Open-loop sends follow an absolute schedule (t0 + k/rate) rather than
asyncio-throttle: its Throttler is a sliding-window limiter that polls every
10 ms, so Throttler(1, 1/rate) tops out near 100 requests/s and
Throttler(rate, 1 s) sends each second's requests in one burst (measured here).
A schedule also makes the offered count exact and lateness measurable.

Inputs are prepared once (`prepare_inputs`) and the request is serialized once
per run: on 2 shared cores the client's own CPU would otherwise be part of
what we measure.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import grpc
import numpy as np
from tritonclient.grpc import InferInput, service_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, triton_to_np_dtype

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# No message-size limit: a bench must be able to send what the model accepts.
_MAX_MESSAGE_BYTES = 2**31 - 1

Transport = Literal["raw", "tritonclient"]
Fill = Literal["random", "zero"]  # data of the inputs not given by the user (perf_analyzer's --input-data)
Mode = Literal["concurrency", "request_rate", "phase"]
# The latency percentiles perf_analyzer always reports (its -f CSV has a column for each).
DEFAULT_PERCENTILES = (50, 90, 95, 99)


class BenchError(Exception):
    """A usage error the user can fix (a bad option, or one the model does not accept): a message, no
    traceback; `tritonpilot bench` exits with `exit_code` 2."""

    exit_code = 2


class BenchFailure(BenchError):
    """The run could not be done (Triton unreachable, the model missing, a report not written): exit 1."""

    exit_code = 1


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str  # Triton's name: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]  # full shape sent, batch dimension included when the model batches
    data: np.ndarray

    def raw_bytes(self) -> bytes:
        if self.datatype == "BYTES":
            serialized = serialize_byte_tensor(self.data)
            return serialized.item() if serialized.size > 0 else b""
        return self.data.tobytes()


@dataclass(frozen=True)
class PreparedInputs:
    """One request's tensors, built once and reused for every request of a run."""

    tensors: tuple[InputTensor, ...]
    batch_size: int = 1  # inferences per request: throughput counts these, as perf_analyzer does

    def infer_inputs(self) -> list[InferInput]:
        inputs = []
        for t in self.tensors:
            infer_input = InferInput(t.name, list(t.shape), t.datatype)
            infer_input.set_data_from_numpy(t.data)
            inputs.append(infer_input)
        return inputs

    def request_bytes(self, model: str, model_version: str = "") -> bytes:
        """The serialized ModelInferRequest, the same message tritonclient's infer() builds."""
        request = service_pb2.ModelInferRequest(model_name=model, model_version=model_version)
        for t in self.tensors:
            request.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
            request.raw_input_contents.append(t.raw_bytes())
        return request.SerializeToString()


def parse_shape_option(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`NAME:d1,d2` (perf_analyzer's --shape: dims without the batch dimension)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            parsed = tuple(int(d) for d in dims.split(",")) if sep and name else ()
        except ValueError:
            parsed = ()
        if not parsed or any(d <= 0 for d in parsed):
            raise BenchError(f"--shape {value!r}: expected NAME:d1,d2,... with positive integers")
        shapes[name] = parsed
    return shapes


def _zero_tensor(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        return np.full(shape, b"0", dtype=np.object_)  # a one-character string of '0' per element
    if datatype == "BF16":
        raise BenchError("BF16 inputs need --input-data FILE (numpy has no bfloat16)")
    return np.zeros(shape, dtype=triton_to_np_dtype(datatype))


def _random_tensor(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        # Short printable strings, like perf_analyzer's random BYTES data.
        flat = [bytes(rng.integers(97, 123, size=8, dtype=np.uint8)) for _ in range(math.prod(shape))]
        return np.array(flat, dtype=np.object_).reshape(shape)
    if datatype == "BF16":
        raise BenchError("BF16 inputs need --input-data (numpy has no bfloat16)")
    dtype = np.dtype(triton_to_np_dtype(datatype))
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        # Small non-negative values: integer inputs are often indices or lengths.
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.random(size=shape).astype(dtype)


def _given_tensor(name: str, datatype: str, shape: tuple[int, ...], values: Any) -> np.ndarray:
    """User data: a nested list taken as is, a flat one reshaped; one sample is tiled over the batch."""
    if isinstance(values, Mapping):  # perf_analyzer's {"content": [...], "shape": [...]}
        values = values.get("content", values.get("b64", []))
    if datatype == "BYTES":
        array = np.array([str(v).encode() if not isinstance(v, bytes) else v for v in np.ravel(values)],
                         dtype=np.object_)
    else:
        try:
            array = np.asarray(values, dtype=triton_to_np_dtype(datatype)).ravel()
        except (ValueError, TypeError) as e:
            raise BenchError(f"input {name}: values are not {datatype}: {e}") from None
    size = math.prod(shape)
    if array.size != size and size % max(array.size, 1) == 0 and array.size > 0:
        array = np.tile(array, size // array.size)
    if array.size != size:
        raise BenchError(f"input {name}: {array.size} values given, shape {list(shape)} needs {size}")
    return array.reshape(shape)


def _dims_from_data(name: str, dims: list[int], values: Any) -> list[int]:
    """Variable dims of one sample, read off the data given for it (as perf_analyzer does)."""
    if isinstance(values, Mapping):
        if "shape" in values:
            return [int(d) for d in values["shape"]]
        values = values.get("content", [])
    try:
        nested = np.shape(values)
    except ValueError:  # ragged nested lists
        raise BenchError(f"input {name}: the nested lists given are ragged") from None
    if len(nested) == len(dims) and all(d in (-1, n) for d, n in zip(dims, nested)):
        return list(nested)
    count = int(np.size(values))
    fixed = math.prod(d for d in dims if d != -1)
    if dims.count(-1) == 1 and fixed > 0 and count % fixed == 0:
        return [count // fixed if d == -1 else d for d in dims]
    raise BenchError(f"input {name}: cannot tell dims {dims} from {count} values; give --shape {name}:...")


def inputs_from_metadata(
    metadata: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 1,
    data: Mapping[str, Any] | None = None,
    seed: int = 0,
    fill: Fill = "random",
) -> PreparedInputs:
    """Build one request from ModelMetadata/ModelConfig as JSON (tritonclient's as_json=True).

    Inputs without `data` get random values, or zeros with fill="zero".
    """
    shapes = shapes or {}
    data = data or {}
    max_batch_size = int(config.get("max_batch_size", 0))
    if batch_size < 1:
        raise BenchError(f"--batch-size {batch_size}: must be >= 1")
    if max_batch_size == 0 and batch_size != 1:
        raise BenchError(f"--batch-size {batch_size}: the model does not batch (max_batch_size 0)")
    if max_batch_size > 0 and batch_size > max_batch_size:
        raise BenchError(f"--batch-size {batch_size}: above the model's max_batch_size {max_batch_size}")
    known = {i["name"] for i in metadata.get("inputs", [])}
    for name in [*shapes, *data]:
        if name not in known:
            raise BenchError(f"input {name!r} given, the model's inputs are {sorted(known)}")
    rng = np.random.default_rng(seed)
    tensors = []
    for spec in metadata.get("inputs", []):
        name, datatype = spec["name"], spec["datatype"]
        dims = [int(d) for d in spec.get("shape", [])]
        if max_batch_size > 0:
            dims = dims[1:]  # metadata lists the batch dimension as -1 first
        if name in shapes:
            given = tuple(shapes[name])
            if len(given) != len(dims) or any(d != -1 and d != g for d, g in zip(dims, given)):
                raise BenchError(f"--shape {name}:{','.join(map(str, given))} does not fit the model's dims {dims}")
            dims = list(given)
        elif name in data and -1 in dims:
            dims = _dims_from_data(name, dims, data[name])
        sample = tuple(1 if d == -1 else d for d in dims)
        shape = (batch_size, *sample) if max_batch_size > 0 else sample
        if name in data:
            array = _given_tensor(name, datatype, shape, data[name])
        elif fill == "zero":
            array = _zero_tensor(datatype, shape)
        else:
            array = _random_tensor(datatype, shape, rng)
        tensors.append(InputTensor(name, datatype, shape, array))
    return PreparedInputs(tuple(tensors), batch_size if max_batch_size > 0 else 1)


def load_input_data(path: str | Path) -> dict[str, Any]:
    """A JSON object of name -> list, or perf_analyzer's {"data": [{name: ...}, ...]} (first entry)."""
    if Path(path).is_dir():
        raise BenchError(f"--input-data {path}: a directory of per-input files is not supported by bench; "
                         "give a JSON file, 'random' or 'zero'")
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"--input-data {path}: {e}") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("data"), list) and loaded["data"]:
        loaded = loaded["data"][0]
    if not isinstance(loaded, Mapping):
        raise BenchError(f"--input-data {path}: expected a JSON object of input name -> values")
    return dict(loaded)


def _status_name(e: InferenceServerException) -> str:
    status = e.status() or "UNKNOWN"
    return str(status).removeprefix("StatusCode.")


async def fetch_model(url: str, model: str, timeout_s: float = 10.0) -> tuple[dict, dict]:
    """(metadata, config) as JSON dicts; BenchError with Triton's own words when it cannot."""
    client = InferenceServerClient(url)
    try:
        metadata = await client.get_model_metadata(model, as_json=True, client_timeout=timeout_s)
        config = await client.get_model_config(model, as_json=True, client_timeout=timeout_s)
    except InferenceServerException as e:
        code = _status_name(e)
        if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            raise BenchFailure(f"cannot reach Triton at {url}: {code}: {e.message()}") from None
        raise BenchFailure(f"model {model!r} at {url}: {code}: {e.message()}") from None
    finally:
        await client.close()
    return metadata, config.get("config", config)


async def prepare_inputs(
    url: str,
    model: str,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 1,
    data: Mapping[str, Any] | None = None,
    seed: int = 0,
    timeout_s: float = 10.0,
    fill: Fill = "random",
) -> PreparedInputs:
    metadata, config = await fetch_model(url, model, timeout_s)
    return inputs_from_metadata(metadata, config, shapes=shapes, batch_size=batch_size, data=data, seed=seed,
                                fill=fill)


# --------------------------------------------------------------------------- transports


class Caller(Protocol):
    async def __call__(self) -> str | None:
        """Send one request; None on success, else the gRPC status code name."""

    async def close(self) -> None: ...


def channel_options() -> list[tuple[str, Any]]:
    # A local subchannel pool gives each channel its own TCP connection (grpc
    # otherwise shares one between channels of equal target and options), so N
    # workers are N connections, as N perf_analyzer clients would be.
    return [
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),
    ]


class RawCaller:
    """Pre-serialized request bytes on a plain grpc.aio channel; the response is not parsed.

    The cheapest client: Triton's answer to ModelInfer is a gRPC status, so success
    needs no decoding, and the bench's CPU stays out of what it measures.
    """

    def __init__(self, url: str, payload: bytes, timeout_s: float | None) -> None:
        self._channel = grpc.aio.insecure_channel(url, options=channel_options())
        self._infer = self._channel.unary_unary(MODEL_INFER_METHOD)  # bytes in, bytes out
        self._payload = payload
        self._timeout_s = timeout_s

    async def __call__(self) -> str | None:
        try:
            await self._infer(self._payload, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return None

    async def close(self) -> None:
        await self._channel.close()


class TritonClientCaller:
    """tritonclient's asyncio client with the same InferInput objects every time."""

    def __init__(self, url: str, model: str, inputs: PreparedInputs, timeout_s: float | None) -> None:
        self._client = InferenceServerClient(url, channel_args=channel_options())
        self._model = model
        self._inputs = inputs.infer_inputs()
        self._timeout_s = timeout_s

    async def __call__(self) -> str | None:
        try:
            await self._client.infer(self._model, self._inputs, client_timeout=self._timeout_s)
        except InferenceServerException as e:
            return _status_name(e)
        return None

    async def close(self) -> None:
        await self._client.close()


def make_callers(
    url: str, model: str, inputs: PreparedInputs, count: int, transport: Transport, timeout_s: float | None
) -> list[Caller]:
    if transport == "raw":
        payload = inputs.request_bytes(model)
        return [RawCaller(url, payload, timeout_s) for _ in range(count)]
    if transport == "tritonclient":
        return [TritonClientCaller(url, model, inputs, timeout_s) for _ in range(count)]
    raise BenchError(f"transport {transport!r}: expected 'raw' or 'tritonclient'")


# --------------------------------------------------------------------------- CPU from /proc

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def read_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads) in seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime_ticks, stime_ticks = int(fields[11]), int(fields[12])
    return (utime_ticks + stime_ticks) / _CLOCK_TICKS_PER_S


def read_cpu_all(pids: Mapping[str, int]) -> dict[str, float | None]:
    return {label: read_cpu_s(pid) for label, pid in pids.items()}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LevelResult:
    """One load level (or phase) measured over one window, or the median of several."""

    mode: Mode
    level: float  # workers (concurrency) or offered requests/s (rate, phase)
    window_s: float  # measured seconds (sum over windows)
    windows: int
    batch_size: int
    count: int  # successful requests completed inside the window(s)
    errors: Mapping[str, int]  # failed requests by gRPC code name
    offered_per_s: float  # concurrency: requests sent per s; rate: sends scheduled per s
    served_per_s: float  # successful requests completed per s
    throughput_infer_per_s: float  # served_per_s * batch_size (perf_analyzer's infer/sec)
    p50_us: float | None  # latencies of successful requests; None when there were none
    p95_us: float | None
    p99_us: float | None
    mean_us: float | None
    late: int = 0  # open loop: sends that left later than their schedule allows
    cpu_s: Mapping[str, float | None] = field(default_factory=dict)  # per labelled process
    cpu_us_per_request: Mapping[str, float | None] = field(default_factory=dict)
    # percentile -> latency (us): DEFAULT_PERCENTILES and any asked for; None when nothing succeeded
    percentiles_us: Mapping[int, float | None] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def latency_us(self, percentile: int) -> float | None:
        """The latency at `percentile` (1..99), or the mean for -1 (perf_analyzer's --percentile)."""
        if percentile == -1:
            return self.mean_us
        if percentile in self.percentiles_us:
            return self.percentiles_us[percentile]
        known = {50: self.p50_us, 95: self.p95_us, 99: self.p99_us}
        if percentile in known:
            return known[percentile]
        raise KeyError(f"p{percentile} was not measured")


# (scheduled_ns, sent_ns, done_ns, code or None)
Record = tuple[int, int, int, str | None]


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest rank, as perf_analyzer reports: a latency some request really had."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def late_tolerance_ns(rate_per_s: float) -> int:
    # Timers on a busy 2-core box wake ~1 ms late routinely; a tenth of the
    # spacing is where lateness starts to change the offered load.
    return int(max(1e-3, 0.1 / rate_per_s) * 1e9) if rate_per_s > 0 else int(1e-3 * 1e9)


def summarize_window(
    records: Sequence[Record],
    start_ns: int,
    end_ns: int,
    *,
    mode: Mode,
    level: float,
    batch_size: int = 1,
    scheduled_in_window: int | None = None,
    late_tol_ns: int = 0,
    cpu_before: Mapping[str, float | None] | None = None,
    cpu_after: Mapping[str, float | None] | None = None,
    percentiles: Sequence[int] = (),
) -> LevelResult:
    """Pure: the window [start_ns, end_ns) from request records.

    Latency percentiles: DEFAULT_PERCENTILES and `percentiles` (1..99), in `percentiles_us`.
    """
    window_s = max((end_ns - start_ns) / 1e9, 1e-9)
    latencies_us: list[float] = []
    errors: Counter[str] = Counter()
    sent = late = 0
    for scheduled, sent_at, done, code in records:
        if start_ns <= scheduled < end_ns:
            sent += 1
            if sent_at - scheduled > late_tol_ns:
                late += 1
        if not start_ns <= done < end_ns:
            continue
        if code is None:
            latencies_us.append((done - sent_at) / 1e3)
        else:
            errors[code] += 1
    latencies_us.sort()
    count = len(latencies_us)
    completed = count + sum(errors.values())
    cpu_s = _cpu_deltas(cpu_before or {}, cpu_after or {})
    offered = (scheduled_in_window if scheduled_in_window is not None else sent) / window_s
    return LevelResult(
        mode=mode,
        level=level,
        window_s=window_s,
        windows=1,
        batch_size=batch_size,
        count=count,
        errors=dict(errors),
        offered_per_s=offered,
        served_per_s=count / window_s,
        throughput_infer_per_s=count * batch_size / window_s,
        p50_us=percentile(latencies_us, 50),
        p95_us=percentile(latencies_us, 95),
        p99_us=percentile(latencies_us, 99),
        mean_us=statistics.fmean(latencies_us) if latencies_us else None,
        late=late,
        cpu_s=cpu_s,
        cpu_us_per_request={k: (v * 1e6 / completed if v is not None and completed else None)
                            for k, v in cpu_s.items()},
        percentiles_us={p: percentile(latencies_us, p) for p in sorted({*DEFAULT_PERCENTILES, *percentiles})},
    )


def _cpu_deltas(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for label, b in before.items():
        a = after.get(label)
        out[label] = a - b if a is not None and b is not None else None
    return out


def _median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def combine_windows(results: Sequence[LevelResult]) -> LevelResult:
    """Rates and latencies: the median over windows; counts, errors and CPU seconds: totals."""
    if not results:
        raise ValueError("no windows to combine")
    if len(results) == 1:
        return results[0]
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    labels = list(results[0].cpu_s)
    cpu_s: dict[str, float | None] = {}
    for label in labels:
        parts = [r.cpu_s.get(label) for r in results]
        cpu_s[label] = None if any(p is None for p in parts) else sum(p for p in parts if p is not None)
    first = results[0]
    return replace(
        first,
        window_s=sum(r.window_s for r in results),
        windows=sum(r.windows for r in results),
        count=sum(r.count for r in results),
        errors=dict(errors),
        offered_per_s=statistics.median(r.offered_per_s for r in results),
        served_per_s=statistics.median(r.served_per_s for r in results),
        throughput_infer_per_s=statistics.median(r.throughput_infer_per_s for r in results),
        p50_us=_median_or_none([r.p50_us for r in results]),
        p95_us=_median_or_none([r.p95_us for r in results]),
        p99_us=_median_or_none([r.p99_us for r in results]),
        mean_us=_median_or_none([r.mean_us for r in results]),
        late=sum(r.late for r in results),
        cpu_s=cpu_s,
        cpu_us_per_request={label: _median_or_none([r.cpu_us_per_request.get(label) for r in results])
                            for label in labels},
        percentiles_us={p: _median_or_none([r.percentiles_us.get(p) for r in results])
                         for p in first.percentiles_us},
    )


# --------------------------------------------------------------------------- load shapes


@dataclass(frozen=True)
class ConcurrencyLoad:
    concurrency: int


@dataclass(frozen=True)
class RateLoad:
    """Open loop: piecewise-constant rates, `phases` of (requests/s, seconds); the last one lasts until stopped."""

    phases: tuple[tuple[float, float], ...]
    connections: int = 4  # channels the sends are spread over, round robin

    def send_times_ns(self, start_ns: int) -> Iterator[int]:
        """Constant spacing inside each phase; a phase starts on its boundary, not on the last send."""
        phase_start = start_ns
        for i, (rate, seconds) in enumerate(self.phases):
            last = i == len(self.phases) - 1
            phase_end = math.inf if last else phase_start + int(seconds * 1e9)
            if rate > 0:
                k = 0
                while (t := phase_start + int(k * 1e9 / rate)) < phase_end:
                    yield t
                    k += 1
            elif last:
                return
            phase_start = int(phase_end)

    def scheduled_between(self, start_ns: int, a_ns: int, b_ns: int) -> int:
        """How many sends the schedule puts in [a_ns, b_ns): the offered load, exactly."""
        n = 0
        phase_start = start_ns
        for i, (rate, seconds) in enumerate(self.phases):
            last = i == len(self.phases) - 1
            phase_end = math.inf if last else phase_start + int(seconds * 1e9)
            lo, hi = max(a_ns, phase_start), min(b_ns, phase_end)
            if rate > 0 and hi > lo:
                n += _sends_before(hi, phase_start, rate) - _sends_before(lo, phase_start, rate)
            if last:
                break
            phase_start = int(phase_end)
        return n


def _sends_before(t_ns: float, phase_start_ns: int, rate: float) -> int:
    """Number of k >= 0 with phase_start + int(k*1e9/rate) < t (matches send_times_ns)."""
    if t_ns <= phase_start_ns:
        return 0
    k = math.ceil((t_ns - phase_start_ns) * rate / 1e9)
    # Adjust for integer truncation in send_times_ns.
    while k > 0 and phase_start_ns + int((k - 1) * 1e9 / rate) >= t_ns:
        k -= 1
    while phase_start_ns + int(k * 1e9 / rate) < t_ns:
        k += 1
    return k


Load = ConcurrencyLoad | RateLoad


# --------------------------------------------------------------------------- the driver


async def _closed_loop(call: Caller, records: list[Record], stop: asyncio.Event) -> None:
    now = time.perf_counter_ns
    while not stop.is_set():
        sent = now()
        code = await call()
        records.append((sent, sent, now(), code))


async def _open_loop(
    callers: Sequence[Caller], records: list[Record], times: Iterator[int], stop: asyncio.Event
) -> set[asyncio.Task]:
    now = time.perf_counter_ns
    inflight: set[asyncio.Task] = set()

    async def one(call: Caller, scheduled: int) -> None:
        sent = now()
        code = await call()
        records.append((scheduled, sent, now(), code))

    for i, scheduled in enumerate(times):
        delay_ns = scheduled - now()
        if delay_ns > 50_000_000:
            # Long gaps (low rates) must still end promptly when the run stops.
            try:
                await asyncio.wait_for(stop.wait(), delay_ns / 1e9)
            except TimeoutError:
                pass
        elif delay_ns > 0:
            await asyncio.sleep(delay_ns / 1e9)
        if stop.is_set():
            break
        task = asyncio.create_task(one(callers[i % len(callers)], scheduled))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    return inflight


async def _sample_cpu_at(offsets_ns: Sequence[int], start_ns: int, pids: Mapping[str, int]) -> list[dict]:
    samples = []
    for offset in offsets_ns:
        delay = (start_ns + offset - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        samples.append(read_cpu_all(pids))
    return samples


async def run_load(
    url: str,
    model: str,
    load: Load,
    inputs: PreparedInputs,
    windows_s: Sequence[tuple[float, float]],
    *,
    timeout_s: float | None = 30.0,
    cpu_pids: Mapping[str, int] | None = None,
    transport: Transport = "raw",
    mode: Mode | None = None,
    levels: Sequence[float] | None = None,
    percentiles: Sequence[int] = (),
) -> list[LevelResult]:
    """Run `load` from t=0 to the end of the last window, then summarize each window.

    `windows_s` are (start, end) offsets in seconds from the load's start; what
    comes before the first window is warm-up. In-flight requests are given
    `timeout_s` to finish after the load stops, then cancelled: they completed
    after every window, so they change nothing reported.
    """
    if not windows_s:
        raise ValueError("at least one window")
    pids = dict(cpu_pids or {})
    workers = load.concurrency if isinstance(load, ConcurrencyLoad) else load.connections
    if workers < 1:
        raise BenchError(f"{'concurrency' if isinstance(load, ConcurrencyLoad) else 'connections'} must be >= 1")
    callers = make_callers(url, model, inputs, workers, transport, timeout_s)
    records: list[Record] = []
    stop = asyncio.Event()
    bounds_ns = sorted({int(s * 1e9) for w in windows_s for s in w})
    start_ns = time.perf_counter_ns()
    try:
        if isinstance(load, ConcurrencyLoad):
            tasks = [asyncio.create_task(_closed_loop(c, records, stop)) for c in callers]
            sender = None
        else:
            tasks = []
            sender = asyncio.create_task(_open_loop(callers, records, load.send_times_ns(start_ns), stop))
        samples = await _sample_cpu_at(bounds_ns, start_ns, pids)
        stop.set()
        if sender is not None:
            tasks = list(await sender)
        await _drain(tasks, timeout_s)
    finally:
        stop.set()
        await asyncio.gather(*(c.close() for c in callers), return_exceptions=True)

    cpu_at = dict(zip(bounds_ns, samples))
    results = []
    for i, (a, b) in enumerate(windows_s):
        a_ns, b_ns = start_ns + int(a * 1e9), start_ns + int(b * 1e9)
        kind: Mode
        scheduled: int | None
        if isinstance(load, ConcurrencyLoad):
            kind, level, scheduled, tol = "concurrency", float(load.concurrency), None, 0
        else:
            rate = _rate_at(load, a)
            kind = "request_rate" if len(load.phases) == 1 else "phase"
            level, scheduled, tol = rate, load.scheduled_between(start_ns, a_ns, b_ns), late_tolerance_ns(rate)
        results.append(
            summarize_window(
                records, a_ns, b_ns,
                mode=mode or kind, level=levels[i] if levels else level, batch_size=inputs.batch_size,
                scheduled_in_window=scheduled, late_tol_ns=tol,
                cpu_before=cpu_at[int(a * 1e9)], cpu_after=cpu_at[int(b * 1e9)], percentiles=percentiles,
            )
        )
    return results


def _rate_at(load: RateLoad, offset_s: float) -> float:
    t = 0.0
    for rate, seconds in load.phases:
        if offset_s < t + seconds:
            return rate
        t += seconds
    return load.phases[-1][0]


async def _drain(tasks: Sequence[asyncio.Task], timeout_s: float | None) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=(timeout_s or 30.0) + 1.0)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def consecutive_windows(warmup_s: float, window_s: float, windows: int) -> list[tuple[float, float]]:
    return [(warmup_s + k * window_s, warmup_s + (k + 1) * window_s) for k in range(windows)]


# --------------------------------------------------------------------------- the public measures


async def measure_concurrency(
    url: str,
    model: str,
    concurrency: int,
    window_s: float,
    inputs: PreparedInputs,
    *,
    warmup_s: float = 1.0,
    windows: int = 1,
    timeout_s: float | None = 30.0,
    cpu_pids: Mapping[str, int] | None = None,
    transport: Transport = "raw",
    percentiles: Sequence[int] = (),
) -> LevelResult:
    """Closed loop: `concurrency` workers, one connection each; the median over `windows`."""
    results = await run_load(
        url, model, ConcurrencyLoad(concurrency), inputs, consecutive_windows(warmup_s, window_s, windows),
        timeout_s=timeout_s, cpu_pids=cpu_pids, transport=transport, percentiles=percentiles,
    )
    return combine_windows(results)


async def measure_request_rate(
    url: str,
    model: str,
    rate_per_s: float,
    window_s: float,
    inputs: PreparedInputs,
    *,
    warmup_s: float = 1.0,
    windows: int = 1,
    timeout_s: float | None = 30.0,
    cpu_pids: Mapping[str, int] | None = None,
    transport: Transport = "raw",
    connections: int = 4,
    percentiles: Sequence[int] = (),
) -> LevelResult:
    """Open loop at a constant spacing of 1/rate; the median over `windows`."""
    if rate_per_s <= 0:
        raise BenchError(f"request rate {rate_per_s}: must be > 0")
    results = await run_load(
        url, model, RateLoad(((rate_per_s, math.inf),), connections), inputs,
        consecutive_windows(warmup_s, window_s, windows),
        timeout_s=timeout_s, cpu_pids=cpu_pids, transport=transport, percentiles=percentiles,
    )
    return combine_windows(results)


def parse_rate_schedule(text: str) -> tuple[tuple[float, float], ...]:
    """`rate:seconds,rate:seconds,...`, e.g. "5:60,35:60,5:60"."""
    phases = []
    for part in text.split(","):
        rate, sep, seconds = part.strip().partition(":")
        try:
            phase = (float(rate), float(seconds))
        except ValueError:
            phase = (-1.0, -1.0)
        if not sep or phase[0] < 0 or phase[1] <= 0:
            raise BenchError(f"--rate-schedule {text!r}: expected RATE:SECONDS,... (rate >= 0, seconds > 0), "
                             f"got {part!r}")
        phases.append(phase)
    return tuple(phases)


async def measure_rate_schedule(
    url: str,
    model: str,
    phases: Sequence[tuple[float, float]],
    inputs: PreparedInputs,
    *,
    transition_s: float = 0.0,
    timeout_s: float | None = 30.0,
    cpu_pids: Mapping[str, int] | None = None,
    transport: Transport = "raw",
    connections: int = 4,
    percentiles: Sequence[int] = (),
) -> list[LevelResult]:
    """One open-loop run through the phases; each phase measured after its first `transition_s`."""
    windows: list[tuple[float, float]] = []
    t = 0.0
    for _rate, seconds in phases:
        if transition_s >= seconds:
            raise BenchError(f"transition {transition_s}s leaves nothing of a {seconds}s phase to measure")
        windows.append((t + transition_s, t + seconds))
        t += seconds
    # A trailing zero-rate phase keeps the schedule finite after the last window.
    load = RateLoad((*tuple(phases), (0.0, 1.0)), connections)
    return await run_load(
        url, model, load, inputs, windows, timeout_s=timeout_s, cpu_pids=cpu_pids, transport=transport,
        mode="phase", levels=[rate for rate, _ in phases], percentiles=percentiles,
    )


async def measure_alternating(
    urls: Sequence[str],
    model: str,
    load: Load,
    inputs: PreparedInputs,
    *,
    window_s: float,
    windows: int,
    warmup_s: float = 1.0,
    timeout_s: float | None = 30.0,
    cpu_pids: Mapping[str, int] | None = None,
    transport: Transport = "raw",
    on_window: Callable[[int, int, LevelResult], None] | None = None,
    percentiles: Sequence[int] = (),
) -> list[LevelResult]:
    """The same load against each URL in turn (A, B, A, B, ...), `windows` times each.

    Alternating spreads slow drifts of a shared machine (other jobs, thermal)
    over both endpoints instead of charging them all to one. Returns the
    median per URL, in the order given.
    """
    if len(urls) == 1:
        # Nothing to alternate with: consecutive windows after one warm-up.
        results = await run_load(
            urls[0], model, load, inputs, consecutive_windows(warmup_s, window_s, windows),
            timeout_s=timeout_s, cpu_pids=cpu_pids, transport=transport, percentiles=percentiles,
        )
        for k, result in enumerate(results):
            if on_window is not None:
                on_window(k, 0, result)
        return [combine_windows(results)]
    per_url: list[list[LevelResult]] = [[] for _ in urls]
    for k in range(windows):
        for i, url in enumerate(urls):
            (result,) = await run_load(
                url, model, load, inputs, [(warmup_s, warmup_s + window_s)],
                timeout_s=timeout_s, cpu_pids=cpu_pids, transport=transport, percentiles=percentiles,
            )
            per_url[i].append(result)
            if on_window is not None:
                on_window(k, i, result)
    return [combine_windows(rs) for rs in per_url]
