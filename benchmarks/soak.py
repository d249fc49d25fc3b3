"""Soak and faults, and HTTP/2 attacks, against `tritonpilot serve`: writes docs/reliability.md.

A benchmark, not a test (issue 8, item 7). Run it with `bash scripts/soak`:

    bash scripts/soak --minutes 15     # the soak (--minutes 2: a smoke run)
    bash scripts/soak --attacks        # the HTTP/2 attacks (--attack-seconds 5: a smoke run)

Soak: an embedded Triton (sleep, fast, decoupled, identity_fp32) with `tritonpilot serve` as a
subprocess in front of it (a policy file controlling `sleep`, rewritten by this script), and a
modest mixed load through the proxy, all on 127.0.0.1: unary ModelInfer on persistent channels,
ModelStreamInfer streams (decoupled included), a client that opens a new channel (a new TCP
connection) for every call and closes it, and a client that cancels its calls. Every call has a
deadline (5 s) and is wrapped in an outer asyncio timeout (deadline + 5 s) that counts it as hung.
Faults: the policy file rewritten every 30 s to force a reload of `sleep` (min_instances 2, then
max_instances 1, alternately), a SIGHUP every 60 s, tritonserver SIGKILLed and restarted once
(same ports) and frozen with SIGSTOP for 10 s once. The sidecar's RSS and open file descriptors
are read from /proc every second; after the warm-up a least-squares slope is fitted to per-minute
medians (slope_verdict).

Attacks: the same stack with `--max-connections`; each attack runs in its own process for
--attack-seconds while a normal client (one persistent channel, `sleep` and `fast` alternately)
measures its latency, a fresh-connection probe calls every 2 s, and Triton's readiness is asked
of Triton directly every second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# grpc core logs every GOAWAY at INFO otherwise: thousands of lines while Triton is down.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "models"
OUT = ROOT / "docs" / "reliability.md"
SOAK_BEGIN, SOAK_END = "<!-- soak:begin -->", "<!-- soak:end -->"
ATTACKS_BEGIN, ATTACKS_END = "<!-- attacks:begin -->", "<!-- attacks:end -->"

DEADLINE_S = 5.0
HUNG_AFTER_S = 5.0          # outer asyncio timeout = deadline + this: "hung"
LATE_SLACK_S = 1.0          # a status after deadline + this is "late" (not clean)
# The gRPC codes a client may retry, and the ones this load accepts as a clean failure.
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED")
WARMUP_RATIO = 0.2
# "flat": the fitted RSS growth is below 1% of the median RSS per 10 minutes (see slope_verdict).
RSS_FLAT_RATIO_PER_10MIN = 0.01
# "flat": the fitted FD growth is below 2 descriptors per 10 minutes.
FD_FLAT_PER_10MIN = 2.0
# The slopes are fitted to the medians of slices this long (see slope_verdict).
SLICE_S = 60.0


# ============================================================================ pure parts


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs and its standard error (nan when it has none)."""
    n = len(xs)
    if n != len(ys):
        raise ValueError("xs and ys differ in length")
    if n < 2:
        return float("nan"), float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return float("nan"), float("nan")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return slope, float("nan")
    intercept = my - slope * mx
    residual = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    return slope, math.sqrt(residual / (n - 2) / sxx)


def after_warmup(samples: Sequence[tuple[float, float]], warmup_ratio: float = WARMUP_RATIO
                 ) -> list[tuple[float, float]]:
    """The samples (t, value) after the first `warmup_ratio` of the time they span."""
    if not samples:
        return []
    t0, t1 = samples[0][0], samples[-1][0]
    cut = t0 + (t1 - t0) * warmup_ratio
    return [s for s in samples if s[0] >= cut]


def binned_medians(samples: Sequence[tuple[float, float]], bin_s: float) -> list[tuple[float, float]]:
    """(mean time, median value) of each `bin_s`-wide slice of the samples, counted from the first;
    a slice whose samples span less than half of `bin_s` (the ragged last one) is left out.

    Why medians: a burst (reconnects while Triton is down: dozens of descriptors for a few
    seconds, or a dip while its connections are gone) fills less than half a slice and leaves
    its median where it was, while a leak moves every later median up."""
    if not samples or bin_s <= 0:
        return []
    t0 = samples[0][0]
    slices: dict[int, list[tuple[float, float]]] = {}
    for t, v in samples:
        slices.setdefault(int((t - t0) // bin_s), []).append((t, v))
    out = []
    for _, part in sorted(slices.items()):
        if part[-1][0] - part[0][0] < bin_s / 2:
            continue
        out.append((sum(t for t, _ in part) / len(part), statistics.median(v for _, v in part)))
    return out


@dataclass(frozen=True)
class Slope:
    per_min: float       # units per minute (KiB or descriptors), fitted to the slices' medians
    stderr_per_min: float
    median: float
    first: float         # the first and the last slice's median
    last: float
    minutes: float       # the window the slope was fitted over
    threshold_per_min: float
    flat: bool
    raw_per_min: float = float("nan")  # the same fit to every sample, bursts included (shown, not judged)
    slices: int = 0
    slice_s: float = 0.0


def slope_verdict(samples: Sequence[tuple[float, float]], kind: str) -> Slope:
    """Fit value-per-minute to the samples after the warm-up; `kind` "rss" (KiB) or "fd".

    The fit is to the medians of one-minute slices (a tenth of the window when the window is
    shorter than 10 minutes), not to every sample: a burst shorter than half a slice moves no
    median, a leak moves them all (see binned_medians). Flat when the slope is below the
    threshold: for RSS 1% of the median RSS per 10 minutes (a leak that small takes more than
    16 hours to grow RSS by 10%, and is about what the allocator's own noise over a 15-minute
    window lets one resolve); for FDs 2 descriptors per 10 minutes (one leaked descriptor per
    ~thousand connections at the churn rate used). A negative slope is flat; fewer than 3
    slices is no verdict (not flat).
    """
    if kind == "rss":
        ratio, fixed = RSS_FLAT_RATIO_PER_10MIN / 10.0, 0.0
    elif kind == "fd":
        ratio, fixed = 0.0, FD_FLAT_PER_10MIN / 10.0
    else:
        raise ValueError(kind)
    window = after_warmup(samples)
    span_s = window[-1][0] - window[0][0] if window else 0.0
    slice_s = min(SLICE_S, span_s / 10.0)
    points = binned_medians(window, slice_s)
    if len(points) < 3:
        return Slope(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), span_s / 60.0,
                     float("nan"), False, slices=len(points), slice_s=slice_s)
    t0 = window[0][0]
    slope, stderr = fit_slope([(t - t0) / 60.0 for t, _ in points], [v for _, v in points])
    raw, _ = fit_slope([(t - t0) / 60.0 for t, _ in window], [v for _, v in window])
    median = statistics.median(v for _, v in window)
    threshold = median * ratio + fixed
    return Slope(slope, stderr, median, points[0][1], points[-1][1], span_s / 60.0, threshold,
                 flat=not math.isnan(slope) and slope < threshold, raw_per_min=raw, slices=len(points),
                 slice_s=slice_s)


def classify(code: str, elapsed_s: float, deadline_s: float = DEADLINE_S, slack_s: float = LATE_SLACK_S) -> str:
    """One call's outcome: "ok", a retryable code, "late:<code>" past deadline + slack,
    or "unclean:<code>" for any other status ("wrong" answers are classified by the caller)."""
    if code != "OK" and code not in RETRYABLE:
        return f"unclean:{code}"
    if elapsed_s > deadline_s + slack_s:
        return f"late:{code}"
    return "ok" if code == "OK" else code


def is_clean(outcome: str) -> bool:
    return outcome == "ok" or outcome in RETRYABLE or outcome == "cancelled_by_client"


def soak_verdict(outcomes: Counter[str], rss: Slope, fd: Slope) -> dict[str, bool]:
    """The soak's targets: every call ended cleanly before its deadline + slack, none hung,
    RSS and FDs flat."""
    return {
        "every call ok or a clean retryable status in time": all(is_clean(o) for o in outcomes if o != "hung"),
        "0 hung": outcomes.get("hung", 0) == 0,
        "RSS flat": rss.flat,
        "FDs flat": fd.flat,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of the values; nan when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def attack_verdict(baseline_p50: float, p50: float, failures: int, triton_not_ready: int,
                   max_ratio: float = 2.0) -> dict[str, bool]:
    return {"p50 within 2x": p50 <= max_ratio * baseline_p50, "normal client never failed": failures == 0,
            "Triton READY throughout": triton_not_ready == 0}


def counter_deltas(before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                   after: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    """Per label value (the first label), how much counter `name` grew."""
    out: dict[str, float] = {}
    for (sample, labels), value in after.items():
        if sample != name:
            continue
        grown = value - before.get((sample, labels), 0.0)
        if grown:
            out[",".join(v for _, v in labels) or "-"] = grown
    return out


# ============================================================================ process plumbing


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _proc_sample(pid: int) -> tuple[int, int]:
    """(RSS KiB, open descriptors) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sidecar:
    """`python -m tritonpilot serve` as a subprocess on free loopback ports, JSON logs in a file."""

    def __init__(self, triton_url: str, work: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        from tritonpilot.ports import free_port
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.log_path = work / "sidecar.log"
        self.cmd = [sys.executable, "-m", "tritonpilot", "serve", "--triton", triton_url, "--listen", self.url,
                    "--http-listen", "off",  # the soak's clients are gRPC
                    "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--log-format", "json", *extra]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(self.cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"tritonpilot serve exited with {self.proc.returncode}; log {self.log_path}")
            try:
                with urllib.request.urlopen(self.metrics_url + "/readyz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"tritonpilot serve not ready within {timeout_s:g} s; log {self.log_path}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return _scrape(self.metrics_url + "/metrics")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_events(self) -> Counter[str]:
        """warning/error/critical log events by "level event"."""
        events: Counter[str] = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line:
                    events["traceback (unstructured)"] += 1
                continue
            level = str(entry.get("level", "")).lower()
            if level in ("warning", "error", "critical", "exception"):
                events[f"{level} {entry.get('event')}"] += 1
        return events


# ============================================================================ memory tracing (--trace-memory)

# Written as sitecustomize.py into a folder put on the sidecar's PYTHONPATH (the sidecar alone:
# no product change). It starts tracemalloc at interpreter start (unless FRAMES is 0) and, every
# TRITONPILOT_MEMTRACE_EVERY_S from a daemon thread, appends one JSON line to samples.jsonl (RSS by
# kind of mapping, what tracemalloc traces, pymalloc's arenas, glibc's malloc, allocated blocks)
# and dumps a tracemalloc snapshot: enough to tell a Python-level leak from allocator high-water
# marks. docs/reliability.md ("Sidecar memory") shows what it found.
MEMTRACE_SITECUSTOMIZE = r'''
import os

_DIR = os.environ.get("TRITONPILOT_MEMTRACE_DIR")
if _DIR:
    import collections, ctypes, gc, json, re, sys, tempfile, threading, time, tracemalloc, traceback

    _FRAMES = int(os.environ.get("TRITONPILOT_MEMTRACE_FRAMES", "12"))
    if _FRAMES:  # 0: no tracemalloc, which leaves pymalloc's own statistics readable
        tracemalloc.start(_FRAMES)
    _T0 = time.monotonic()

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    def _mallinfo():
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = _Mallinfo2
            info = libc.mallinfo2()
            return {name: getattr(info, name) // 1024 for name, _ in _Mallinfo2._fields_}
        except (OSError, AttributeError):
            return {}

    def _smaps():
        """RSS KiB by kind of mapping: [heap] (glibc's brk heap), anonymous (pymalloc's arenas,
        glibc's mmapped chunks and other arenas, thread stacks), files (code), others."""
        out = collections.Counter()
        kind = "other"
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    path = parts[5] if len(parts) > 5 else ""
                    kind = ("heap" if path == "[heap]" else "anon" if not path else
                            "stack" if path.startswith("[stack") else "other" if path.startswith("[") else "file")
                elif first == "Rss:":
                    out[kind] += int(line.split()[1])
        return dict(out)

    def _pymalloc():
        # _debugmallocstats writes to fd 2 only, which is borrowed for a few ms; the sidecar's own
        # JSON log lines that land there meanwhile are written back after.
        with tempfile.TemporaryFile("w+") as tmp:
            saved = os.dup(2)
            try:
                sys.stderr.flush()
                os.dup2(tmp.fileno(), 2)
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            tmp.seek(0)
            text = tmp.read()
        logged = "".join(line for line in text.splitlines(True) if line.startswith("{"))
        if logged:
            os.write(2, logged.encode())
        out = {}
        for m in re.finditer(r"^# ([a-z ]+?)\s+=\s+([0-9,]+)$", text, re.M):
            out[m.group(1)] = int(m.group(2).replace(",", ""))
        return out

    def _sample(n):
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        # No census by type (gc.get_objects()): from a second thread it can take a reference to a
        # tuple the main thread is still building, which then fails with SystemError.
        gc.collect()
        traced, peak = tracemalloc.get_traced_memory()
        if _FRAMES:
            tracemalloc.take_snapshot().dump(os.path.join(_DIR, f"snapshot-{n:03d}.pickle"))
        line = {"n": n, "t_s": time.monotonic() - _T0, "rss_kib": rss, "smaps_kib": _smaps(),
                "traced_kib": traced // 1024, "traced_peak_kib": peak // 1024,
                "tracemalloc_overhead_kib": tracemalloc.get_tracemalloc_memory() // 1024,
                "allocated_blocks": sys.getallocatedblocks(), "pymalloc": {} if _FRAMES else _pymalloc(),
                "mallinfo2_kib": _mallinfo(),
                "threads": threading.active_count()}
        with open(os.path.join(_DIR, "samples.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")

    def _loop():
        every_s = float(os.environ.get("TRITONPILOT_MEMTRACE_EVERY_S", "60"))
        n = 0
        while True:
            time.sleep(every_s)
            n += 1
            try:
                _sample(n)
            except Exception:  # a diagnostic: never take the sidecar down
                with open(os.path.join(_DIR, "errors.txt"), "a") as f:
                    f.write(traceback.format_exc())

    threading.Thread(target=_loop, name="memtrace", daemon=True).start()
'''


def memtrace_env(work: Path, every_s: float, frames: int) -> dict[str, str]:
    """The sidecar's environment with the tracing sitecustomize.py on its PYTHONPATH."""
    site = work / "memtrace"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(MEMTRACE_SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    env["TRITONPILOT_MEMTRACE_DIR"] = str(site)
    env["TRITONPILOT_MEMTRACE_EVERY_S"] = f"{every_s:g}"
    env["TRITONPILOT_MEMTRACE_FRAMES"] = str(frames)
    return env


def memtrace_report(site: Path, first: int | None = None, top: int = 25) -> str:
    """What grew in the sidecar between sample `first` (default: the first after 20% of the run)
    and the last: RSS by mapping, tracemalloc, pymalloc, glibc, allocated blocks, and the
    allocation sites that grew most (tracemalloc, by line and by traceback)."""
    import tracemalloc
    rows = [json.loads(line) for line in (site / "samples.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) < 2:
        return f"{site}: fewer than 2 samples"
    if first is None:
        first = next(r["n"] for r in rows if r["t_s"] >= rows[-1]["t_s"] * WARMUP_RATIO)
    a = next(r for r in rows if r["n"] == first)
    b = rows[-1]
    out = [f"memtrace {site}: sample {a['n']} (t={a['t_s']:.0f} s) -> {b['n']} (t={b['t_s']:.0f} s)", "",
           "n t_s rss traced pymalloc_arenas(KiB) pymalloc_alloc pymalloc_avail glibc_inuse glibc_free glibc_mmap "
           "heap anon blocks"]
    for r in rows:
        pm, mi, sm = r["pymalloc"], r["mallinfo2_kib"], r["smaps_kib"]
        out.append(f"{r['n']} {r['t_s']:.0f} {r['rss_kib']} {r['traced_kib']} "
                   f"{pm.get('arenas allocated current', 0) * 1024} {pm.get('bytes in allocated blocks', 0) // 1024} "
                   f"{pm.get('bytes in available blocks', 0) // 1024} {mi.get('uordblks')} {mi.get('fordblks')} "
                   f"{mi.get('hblkhd')} {sm.get('heap')} {sm.get('anon')} {r['allocated_blocks']}")
    if not (site / f"snapshot-{a['n']:03d}.pickle").exists():
        return "\n".join(out)
    snap_a = tracemalloc.Snapshot.load(str(site / f"snapshot-{a['n']:03d}.pickle"))
    snap_b = tracemalloc.Snapshot.load(str(site / f"snapshot-{b['n']:03d}.pickle"))
    ignore = [tracemalloc.Filter(False, name) for name in
              (tracemalloc.__file__, str(site / "sitecustomize.py"), "<frozen importlib._bootstrap>")]
    snap_a, snap_b = snap_a.filter_traces(ignore), snap_b.filter_traces(ignore)
    out += ["", "tracemalloc, by line (size diff, count diff):"]
    out += [f"  {s.size_diff / 1024:+9.1f} KiB {s.count_diff:+7d}  {s.traceback[0]}"
            for s in snap_b.compare_to(snap_a, "lineno")[:top]]
    out += ["", "tracemalloc, by traceback (the 5 that grew most):"]
    for s in snap_b.compare_to(snap_a, "traceback")[:5]:
        out.append(f"  {s.size_diff / 1024:+9.1f} KiB {s.count_diff:+7d}")
        out += [f"      {frame}" for frame in s.traceback.format()[-12:]]
    return "\n".join(out)


# ============================================================================ the soak: load


@dataclass
class Tally:
    started_at: float
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)   # (kind, outcome)
    failures: list[tuple[float, str, str, str]] = field(default_factory=list)  # (t, kind, outcome, detail)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    max_elapsed_s: float = 0.0
    connections_opened: int = 0

    def add(self, kind: str, outcome: str, elapsed_s: float, detail: str = "") -> None:
        self.outcomes[kind, outcome] += 1
        self.max_elapsed_s = max(self.max_elapsed_s, elapsed_s)
        if outcome == "ok":
            self.latencies.setdefault(kind, []).append(elapsed_s)
        elif outcome != "cancelled_by_client":
            self.failures.append((time.monotonic() - self.started_at, kind, outcome, detail[:200]))


def _fp32_request(model: str, values: Sequence[float]) -> Any:
    import numpy as np
    from tritonclient.grpc import service_pb2
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[len(values)])
    request.raw_input_contents.append(np.asarray(values, dtype=np.float32).tobytes())
    return request


def _fp32_output(response: Any) -> list[float]:
    import numpy as np
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).tolist()


def _decoupled_request(n: int, request_id: str) -> Any:
    import numpy as np
    from tritonclient.grpc import service_pb2
    request = service_pb2.ModelInferRequest(model_name="decoupled", id=request_id)
    request.inputs.add(name="IN", datatype="INT32", shape=[1])
    request.raw_input_contents.append(np.asarray([n], dtype=np.int32).tobytes())
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


class Load:
    """The soak's clients, on one asyncio loop: each worker loops until `stop` is set."""

    def __init__(self, url: str, tally: Tally) -> None:
        self.url = url
        self.tally = tally
        self.stop = asyncio.Event()

    def channel(self, fresh: bool = False) -> Any:
        import grpc
        # A local subchannel pool: a fresh channel is a fresh TCP connection, never a shared one.
        options = [("grpc.use_local_subchannel_pool", 1)] if fresh else []
        if fresh:
            self.tally.connections_opened += 1
        return grpc.aio.insecure_channel(self.url, options=options)

    async def guarded(self, kind: str, call: Callable[[], Any]) -> None:
        """Run one call with its deadline inside; the outer timeout makes it "hung"."""
        import grpc
        started = time.monotonic()
        try:
            detail = await asyncio.wait_for(call(), DEADLINE_S + HUNG_AFTER_S)
            outcome = "ok" if detail is None else "wrong"
        except TimeoutError:
            outcome, detail = "hung", "outer timeout"
        except grpc.aio.AioRpcError as error:
            outcome = classify(error.code().name, time.monotonic() - started)
            detail = error.details() or ""
        except Exception as error:  # noqa: BLE001 - everything else is unclean, with its words
            outcome, detail = f"unclean:{type(error).__name__}", str(error)
        if outcome == "ok":
            outcome = classify("OK", time.monotonic() - started)
        self.tally.add(kind, outcome, time.monotonic() - started, detail or "")

    async def unary_worker(self, kind: str, model: str, pause_s: float) -> None:
        from tritonclient.grpc import service_pb2_grpc
        channel = self.channel()
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        i = 0
        while not self.stop.is_set():
            i += 1
            value = float(i % 1000)

            async def call(value: float = value) -> str | None:
                response = await stub.ModelInfer(_fp32_request(model, [value, 1.0]), timeout=DEADLINE_S)
                return None if _fp32_output(response) == [value, 1.0] else f"got {_fp32_output(response)}"
            await self.guarded(kind, call)
            await asyncio.sleep(pause_s)
        await channel.close()

    async def churn_worker(self, pause_s: float) -> None:
        """A new channel (TCP connection) per call, closed after it."""
        from tritonclient.grpc import service_pb2_grpc
        i = 0
        while not self.stop.is_set():
            i += 1
            model = "identity_fp32" if i % 2 else "fast"
            channel = self.channel(fresh=True)

            async def call(channel: Any = channel, model: str = model, value: float = float(i)) -> str | None:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                response = await stub.ModelInfer(_fp32_request(model, [value]), timeout=DEADLINE_S)
                return None if _fp32_output(response) == [value] else f"got {_fp32_output(response)}"
            try:
                await self.guarded("churn", call)
            finally:
                await channel.close()
            await asyncio.sleep(pause_s)

    async def cancel_worker(self, pause_s: float) -> None:
        """Calls to `sleep` cancelled by the client after a few ms (the relay sees RST_STREAM)."""
        import grpc
        from tritonclient.grpc import service_pb2_grpc
        channel = self.channel()
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while not self.stop.is_set():
            started = time.monotonic()
            call = stub.ModelInfer(_fp32_request("sleep", [1.0]), timeout=DEADLINE_S)
            await asyncio.sleep(random.uniform(0.001, 0.015))
            call.cancel()
            try:
                await asyncio.wait_for(call, DEADLINE_S + HUNG_AFTER_S)
                outcome = classify("OK", time.monotonic() - started)  # finished before the cancel
            except asyncio.CancelledError:
                outcome = "cancelled_by_client"
            except TimeoutError:
                outcome = "hung"
            except grpc.aio.AioRpcError as error:
                outcome = ("cancelled_by_client" if error.code() == grpc.StatusCode.CANCELLED
                           else classify(error.code().name, time.monotonic() - started))
            self.tally.add("cancel", outcome, time.monotonic() - started)
            await asyncio.sleep(pause_s)
        await channel.close()

    async def stream_worker(self, kind: str, per_stream: int, pause_s: float) -> None:
        """ModelStreamInfer: a stream of `per_stream` requests, one at a time, then closed.
        kind "stream": the `fast` model; kind "decoupled": N responses + the empty final one."""
        import numpy as np
        from tritonclient.grpc import service_pb2_grpc
        channel = self.channel()
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        s = 0
        while not self.stop.is_set():
            s += 1

            async def call(s: int = s) -> str | None:
                # The request-iterator style of tritonclient's stream_infer: the next request
                # is sent once the previous one is answered in full; the call's status is the
                # server's (grpc.aio's call.write() style instead reports a write that races the
                # server's trailers as INTERNAL "Internal error from Core").
                answered: asyncio.Queue[bool] = asyncio.Queue()
                expected: list[tuple[int, float]] = []  # (n, value) per request, in order

                async def requests() -> Any:
                    for r in range(per_stream):
                        if kind == "decoupled":
                            n = (s + r) % 4
                            expected.append((n, 0.0))
                            yield _decoupled_request(n, f"{s}-{r}")
                        else:
                            value = float(s * 100 + r)
                            expected.append((0, value))
                            yield _fp32_request("fast", [value])
                        if not await answered.get():
                            return

                def check(reply: Any, done: int, got: list[int]) -> tuple[str | None, bool, list[int]]:
                    """(problem, whether this response ends a request, the decoupled outputs so far)."""
                    if reply.error_message:
                        return f"error_message: {reply.error_message}", True, got
                    if done >= len(expected):
                        return "a response nobody asked for", True, got
                    if kind == "decoupled":
                        response = reply.infer_response
                        if response.raw_output_contents:
                            got = [*got, int(np.frombuffer(response.raw_output_contents[0], dtype=np.int32)[0])]
                        if not response.parameters["triton_final_response"].bool_param:
                            return None, False, got
                        n = expected[done][0]
                        return (None if got == list(range(n)) else f"decoupled n={n} got {got}"), True, []
                    value = expected[done][1]
                    output = _fp32_output(reply.infer_response)
                    return (None if output == [value] else f"got {output} for {value}"), True, got

                stream = stub.ModelStreamInfer(requests(), timeout=DEADLINE_S)
                done, problem, got = 0, None, list[int]()
                try:
                    async for reply in stream:  # raises AioRpcError on a non-OK status
                        if problem is not None:
                            continue
                        problem, ended, got = check(reply, done, got)
                        if ended:
                            done += 1
                            answered.put_nowait(problem is None)
                finally:
                    answered.put_nowait(False)  # the request iterator ends, rather than being closed mid-await
                if problem is None and done != per_stream:
                    problem = f"stream ended OK after {done} of {per_stream} answers"
                return problem

            await self.guarded(kind, call)
            await asyncio.sleep(pause_s)
        await channel.close()

    def workers(self, without: Sequence[str] = ()) -> list[Any]:
        """7 concurrent clients: 2 unary `sleep`, 1 unary `fast`, 1 churning connections,
        1 stream of `fast`, 1 decoupled stream, 1 that cancels; less those named in `without`."""
        kinds = ["unary_sleep", "unary_sleep", "unary_fast", "churn", "stream", "decoupled", "cancel"]
        return [w for k, w in zip(kinds, self._workers(), strict=True) if k not in without or w.close()]

    def _workers(self) -> list[Any]:
        return [
            self.unary_worker("unary_sleep", "sleep", 0.02),
            self.unary_worker("unary_sleep", "sleep", 0.02),
            self.unary_worker("unary_fast", "fast", 0.01),
            self.churn_worker(0.05),
            self.stream_worker("stream", 5, 0.05),
            self.stream_worker("decoupled", 3, 0.05),
            self.cancel_worker(0.25),
        ]


# ============================================================================ the soak: faults and sampling


WORKER_KINDS = ("unary_sleep", "unary_fast", "churn", "stream", "decoupled", "cancel")

SLEEP_POLICIES = {  # the policy's `sleep` entry, alternated every 30 s: each forces a reload
    "base": "{min_instances: 1, max_instances: 3}",
    "up": "{min_instances: 2, max_instances: 3}",     # below min: scale up to 2
    "down": "{min_instances: 1, max_instances: 1}",   # above max: scale down to 1
}


def policy_text(sleep_entry: str) -> str:
    return ("control: {interval_s: 1, max_concurrent_reloads: 1, max_reloads_per_minute: 6}\n"
            "models:\n"
            f"  sleep: {sleep_entry}\n")


def write_policy(path: Path, sleep_entry: str) -> None:
    """Atomically, as an editor or a ConfigMap swap would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(policy_text(sleep_entry))
    os.replace(tmp, path)


async def soak(args: argparse.Namespace) -> int:
    from tritonpilot.tools.embedded import EmbeddedTriton

    duration_s = args.minutes * 60.0
    work = Path(tempfile.mkdtemp(prefix="tritonpilot-soak-"))
    print(f"work dir {work}", file=sys.stderr, flush=True)
    policy = work / "policy.yaml"
    write_policy(policy, SLEEP_POLICIES["base"])
    triton = EmbeddedTriton(MODELS, load_models=["sleep", "fast", "decoupled", "identity_fp32"],
                            log_path=work / "triton.log", startup_timeout_s=120)
    triton.start()
    env = memtrace_env(work, args.trace_memory, args.trace_frames) if args.trace_memory else None
    sidecar = Sidecar(triton.grpc_url, work, "--policy", str(policy), env=env)
    events: list[tuple[float, str]] = []
    crash_logs: list[str] = []
    samples: list[tuple[float, int, int]] = []
    try:
        sidecar.wait_ready()
        metrics_before = sidecar.metrics()
        cpu_before = _cpu_s(sidecar.proc.pid)
        started = time.monotonic()
        tally = Tally(started_at=started)
        load = Load(triton.grpc_url if args.direct else sidecar.url, tally)

        def event(what: str) -> None:
            t = time.monotonic() - started
            events.append((t, what))
            print(f"[{t:7.1f} s] {what}", file=sys.stderr, flush=True)

        async def sampler() -> None:
            while not load.stop.is_set():
                rss, fds = _proc_sample(sidecar.proc.pid)
                samples.append((time.monotonic() - started, rss, fds))
                await asyncio.sleep(1.0)

        async def faults() -> None:
            kill_at, freeze_at = duration_s * 0.40, duration_s * 0.65
            killed = frozen = not args.faults
            next_policy, next_hup, toggle = 30.0, 60.0 + 15.0, 0
            while not load.stop.is_set():
                t = time.monotonic() - started
                if not triton.is_running():  # died by itself: restart it, as a supervisor would
                    code = triton._proc.poll() if triton._proc is not None else None
                    tail = [line for line in triton.log_tail(200).splitlines()
                            if "Signal (" in line or "terminate called" in line or "what():" in line]
                    event(f"tritonserver crashed (exit {code}; {' / '.join(tail[-3:]) or 'no signal logged'})")
                    crash_logs.append(triton.log_tail(60))
                    await asyncio.to_thread(triton.restart)
                    event(f"tritonserver ready again (pid {triton.pid})")
                    continue
                if args.faults and t >= next_policy:
                    entry = ("up", "down")[toggle % 2]
                    toggle += 1
                    write_policy(policy, SLEEP_POLICIES[entry])
                    event(f"policy file rewritten: sleep {SLEEP_POLICIES[entry]}")
                    next_policy += 30.0
                if args.faults and t >= next_hup:
                    sidecar.proc.send_signal(signal.SIGHUP)
                    event("SIGHUP to the sidecar")
                    next_hup += 60.0
                if not killed and t >= kill_at:
                    killed = True
                    event(f"SIGKILL tritonserver (pid {triton.pid}) and its stubs")
                    await asyncio.to_thread(triton.kill)
                    event("tritonserver dead; restarting on the same ports")
                    await asyncio.to_thread(triton.restart)
                    event(f"tritonserver ready again (pid {triton.pid})")
                if not frozen and t >= freeze_at:
                    frozen = True
                    pid = triton.pid
                    assert pid is not None
                    # tritonserver alone by default: its Python-backend stubs keep running, as they
                    # would if only the server hung; --freeze-group stops the stubs too.
                    stop = os.killpg if args.freeze_group else os.kill
                    what = "process group" if args.freeze_group else "process (not its stubs)"
                    event(f"SIGSTOP tritonserver's {what}, pid {pid}, for 10 s")
                    stop(pid, signal.SIGSTOP)
                    try:
                        await asyncio.sleep(10.0)
                    finally:
                        stop(pid, signal.SIGCONT)
                    event("SIGCONT")
                await asyncio.sleep(0.2)

        async def progress() -> None:
            while not load.stop.is_set():
                try:
                    await asyncio.wait_for(load.stop.wait(), 30.0)
                except TimeoutError:
                    pass
                total = sum(tally.outcomes.values())
                failed = sum(n for (_, o), n in tally.outcomes.items() if o not in ("ok", "cancelled_by_client"))
                rss, fds = samples[-1][1:] if samples else (0, 0)
                print(f"  {time.monotonic() - started:6.0f} s: {total} calls, {failed} not ok, "
                      f"sidecar RSS {rss} KiB, {fds} fds", file=sys.stderr, flush=True)

        async def timer() -> None:
            await asyncio.sleep(duration_s)
            load.stop.set()

        workers = load.workers(args.without or ())
        event(f"load starts: {len(workers)} workers, {args.minutes:g} min")
        tasks = [asyncio.create_task(c) for c in (*workers, sampler(), faults(), progress(), timer())]
        await asyncio.gather(*tasks)
        event("load stopped")
        await asyncio.sleep(3.0)  # let connections close, then one last sample
        rss, fds = _proc_sample(sidecar.proc.pid)
        settled = (time.monotonic() - started, rss, fds)
        metrics_after = sidecar.metrics()
        cpu_s = _cpu_s(sidecar.proc.pid) - cpu_before
        elapsed_s = time.monotonic() - started
    finally:
        sidecar_rc = sidecar.stop()
        triton.stop()
    log_events = sidecar.log_events()

    outcomes: Counter[str] = Counter()
    for (_, outcome), n in tally.outcomes.items():
        outcomes[outcome] += n
    rss_slope = slope_verdict([(t, r) for t, r, _ in samples], "rss")
    fd_slope = slope_verdict([(t, f) for t, _, f in samples], "fd")
    verdict = soak_verdict(outcomes, rss_slope, fd_slope)
    result = {
        "minutes": args.minutes, "elapsed_s": elapsed_s, "events": events, "outcomes_by_kind": {
            f"{k}|{o}": n for (k, o), n in sorted(tally.outcomes.items())},
        "outcomes": dict(outcomes), "failures": tally.failures, "max_elapsed_s": tally.max_elapsed_s,
        "latency_ms": {k: {"p50": percentile(v, 50) * 1000, "p99": percentile(v, 99) * 1000, "n": len(v)}
                       for k, v in sorted(tally.latencies.items())},
        "connections_opened": tally.connections_opened,
        "rss": rss_slope.__dict__, "fd": fd_slope.__dict__, "settled": settled,
        "samples": samples, "sidecar_cpu_s": cpu_s, "sidecar_rc": sidecar_rc, "verdict": verdict,
        "reloads": counter_deltas(metrics_before, metrics_after, "tritonpilot_reloads_total"),
        "policy_reloads": counter_deltas(metrics_before, metrics_after, "tritonpilot_policy_reloads_total"),
        "proxy_requests": counter_deltas(metrics_before, metrics_after, "tritonpilot_requests_total"),
        "log_events": dict(log_events), "work": str(work), "crash_logs": crash_logs,
        "direct": args.direct, "faults": args.faults,
    }
    (work / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    text = soak_markdown(result, args)
    print(text)
    _write_section(Path(args.out), SOAK_BEGIN, SOAK_END, text)
    print(f"wrote {args.out}; raw figures in {work / 'soak.json'}", file=sys.stderr)
    if args.trace_memory:
        print(memtrace_report(work / "memtrace"), file=sys.stderr)
    return 0 if all(verdict.values()) else 1


# ============================================================================ kills: proxy vs direct


async def _kill_cycles(route: str, cycles: int, trace_memory: float | None = None, trace_frames: int = 0
                       ) -> tuple[Counter[str], list[tuple[int, int]], Path]:
    """Stream, decoupled and unary clients in tight loops while tritonserver is SIGKILLed and
    restarted `cycles` times; outcomes by "kind outcome phase" (phase: when the call ended,
    relative to the kills: "up", or "down" from the kill until Triton is ready again), the
    sidecar's (RSS KiB, open fds) before each kill and at the end (each outage is a burst of
    refused calls and reconnects: what it leaves behind shows there), and the work folder."""
    from tritonpilot.tools.embedded import EmbeddedTriton

    work = Path(tempfile.mkdtemp(prefix=f"tritonpilot-kills-{route}-"))
    triton = EmbeddedTriton(MODELS, load_models=["fast", "decoupled"], log_path=work / "triton.log",
                            startup_timeout_s=120)
    triton.start()
    env = memtrace_env(work, trace_memory, trace_frames) if trace_memory else None
    sidecar = Sidecar(triton.grpc_url, work, env=env)
    down: list[tuple[float, float]] = []
    before_kill: list[tuple[int, int]] = []
    try:
        sidecar.wait_ready()
        tally = Tally(started_at=time.monotonic())
        load = Load(triton.grpc_url if route == "direct" else sidecar.url, tally)
        tasks = [asyncio.create_task(w) for w in (
            load.stream_worker("stream", 5, 0.0), load.stream_worker("stream", 5, 0.0),
            load.stream_worker("decoupled", 3, 0.0), load.stream_worker("decoupled", 3, 0.0),
            load.unary_worker("unary_fast", "fast", 0.0))]
        for _ in range(cycles):
            await asyncio.sleep(3.0)
            before_kill.append(_proc_sample(sidecar.proc.pid))
            killed_at = time.monotonic() - tally.started_at
            await asyncio.to_thread(triton.kill)
            await asyncio.to_thread(triton.restart)
            down.append((killed_at, time.monotonic() - tally.started_at))
        await asyncio.sleep(2.0)
        before_kill.append(_proc_sample(sidecar.proc.pid))
        load.stop.set()
        await asyncio.gather(*tasks)
    finally:
        sidecar.stop()
        triton.stop()
    by: Counter[str] = Counter()
    for (kind, outcome), n in tally.outcomes.items():
        if outcome == "ok":
            by[f"{kind} ok"] += n
    for t, kind, outcome, _ in tally.failures:
        phase = "down" if any(a <= t <= b for a, b in down) else "up"
        by[f"{kind} {outcome} {phase}"] += 1
    return by, before_kill, work


async def kills(args: argparse.Namespace) -> int:
    """The same clients and kill cycles through the sidecar, then straight to Triton."""
    results: dict[str, Counter[str]] = {}
    for route in args.kills_routes:
        results[route], samples, work = await _kill_cycles(route, args.kills, args.trace_memory,
                                                              args.trace_frames)
        if route == "proxy":
            print("sidecar RSS KiB / open fds before each kill and at the end: "
                  + ", ".join(f"{rss}/{fds}" for rss, fds in samples), file=sys.stderr)
            if args.trace_memory:
                print(memtrace_report(work / "memtrace"), file=sys.stderr)
    keys = sorted(set().union(*results.values()))
    names = {"proxy": "through the sidecar", "direct": "direct"}
    print(f"{args.kills} SIGKILL + restart cycles of tritonserver, 3 s of load between them\n")
    print("| kind outcome phase | " + " | ".join(names[r] for r in results) + " |\n|---" + "|---" * len(results) + "|")
    for key in keys:
        print(f"| {key} | " + " | ".join(str(results[r][key]) for r in results) + " |")
    return 0


def _fault_windows(events: list[tuple[float, str]]) -> list[tuple[str, float, float]]:
    """(name, from, to) of each fault, +10 s after it ends, to place the failures."""
    windows = []
    for i, (t, what) in enumerate(events):
        if what.startswith("SIGKILL"):
            end = next((t2 for t2, w2 in events[i:] if w2.startswith("tritonserver ready")), t)
            windows.append(("Triton killed -> ready + 10 s", t, end + 10))
        elif what.startswith("SIGSTOP"):
            end = next((t2 for t2, w2 in events[i:] if w2 == "SIGCONT"), t + 10)
            windows.append(("Triton frozen -> SIGCONT + 10 s", t, end + 10))
        elif what.startswith("tritonserver crashed"):
            end = next((t2 for t2, w2 in events[i:] if w2.startswith("tritonserver ready")), t)
            windows.append(("Triton crashed by itself -> ready + 10 s", t - 1.0, end + 10))
    return windows


def soak_markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    kinds = sorted({k.split("|")[0] for k in r["outcomes_by_kind"]})
    outcome_names = sorted(r["outcomes"], key=lambda o: (o != "ok", o))
    flags = "".join(f" {f}" for f, on in (("--direct", args.direct), ("--no-faults", not args.faults),
                                             ("--freeze-group", args.freeze_group)) if on)
    if args.without:
        flags += " --without " + " ".join(args.without)
    if args.trace_memory:
        flags += f" --trace-memory {args.trace_memory:g} --trace-frames {args.trace_frames}"
    lines = [SOAK_BEGIN, "## Soak and faults", "",
             f"Generated by `bash scripts/soak --minutes {args.minutes:g}{flags}` on {time.strftime('%Y-%m-%d')}, "
             f"a {os.cpu_count()}-core machine with no GPU, shared with other work; load, sidecar, tritonserver "
             f"and its Python-backend stubs all on these cores. {r['elapsed_s'] / 60:.1f} min of load.", "",
             "### Verdict", "", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in r["verdict"].items()]
    lines += ["", "### Calls by outcome", "",
              "| client | " + " | ".join(outcome_names) + " |", "|---" * (len(outcome_names) + 1) + "|"]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(str(r["outcomes_by_kind"].get(f"{kind}|{o}", 0))
                                                  for o in outcome_names) + " |")
    lines.append("| **all** | " + " | ".join(f"**{r['outcomes'][o]}**" for o in outcome_names) + " |")
    lat = ", ".join(f"{k} {v['p50']:.1f}/{v['p99']:.1f}" for k, v in r["latency_ms"].items())
    lines += ["", f"Successful calls' p50/p99 in ms: {lat}. The slowest call of all took "
              f"{r['max_elapsed_s']:.2f} s (deadline {DEADLINE_S:g} s, late after {DEADLINE_S + LATE_SLACK_S:g} s, "
              f"hung after {DEADLINE_S + HUNG_AFTER_S:g} s). The churn client opened {r['connections_opened']} "
              "connections.", ""]
    windows = _fault_windows(r["events"])
    placed: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for t, kind, outcome, detail in r["failures"]:
        where = next((name for name, a, b in windows if a <= t <= b), "outside the fault windows")
        placed[f"{where}: {outcome}"] += 1
        examples.setdefault(f"{where}: {outcome}", f"{kind}, t={t:.0f} s: {detail}")
    if placed:
        lines += ["Where the failures fell (one example each):", ""]
        lines += [f"- {key}: {n} (e.g. {examples[key]})" for key, n in sorted(placed.items())]
        lines.append("")
    rss, fd = r["rss"], r["fd"]
    lines += ["### Sidecar memory and descriptors", "",
              f"Sampled every second from /proc ({len(r['samples'])} samples). After the first {WARMUP_RATIO:.0%} "
              f"({rss['minutes']:.1f} min window) the samples are cut into {rss['slice_s']:.0f} s slices "
              f"({rss['slices']} of them) and the slope is fitted by least squares to the slices' medians, which a "
              "burst of a few seconds does not move and a leak does; the fit to every sample is shown beside it.", "",
              "| | first slice median | last slice median | median | slope /min (+- stderr) | every sample's "
              "slope /min | flat below /min | verdict |",
              "|---|---|---|---|---|---|---|---|",
              f"| RSS KiB | {rss['first']:.0f} | {rss['last']:.0f} | {rss['median']:.0f} | "
              f"{rss['per_min']:+.1f} (+- {rss['stderr_per_min']:.1f}) | {rss['raw_per_min']:+.1f} | "
              f"{rss['threshold_per_min']:.1f} | {'flat' if rss['flat'] else '**growing**'} |",
              f"| open fds | {fd['first']:.0f} | {fd['last']:.0f} | {fd['median']:.0f} | "
              f"{fd['per_min']:+.2f} (+- {fd['stderr_per_min']:.2f}) | {fd['raw_per_min']:+.2f} | "
              f"{fd['threshold_per_min']:.2f} | {'flat' if fd['flat'] else '**growing**'} |", "",
              f"3 s after the load stopped: RSS {r['settled'][1]} KiB, {r['settled'][2]} fds. Sidecar CPU over the "
              f"run: {r['sidecar_cpu_s']:.0f} s; it exited with {r['sidecar_rc']} on SIGTERM.", "",
              "### Faults injected (seconds from the start of the load)", ""]
    lines += [f"- {t:6.1f} s: {what}" for t, what in r["events"]]
    lines += ["", f"Controller reloads by result: {_kv(r['reloads'])}. Policy reloads by result: "
              f"{_kv(r['policy_reloads'])}. Proxy requests by model and code: {_kv(r['proxy_requests'])}.", "",
              f"Sidecar warnings/errors logged: {_kv(r['log_events']) or 'none'}.", "", SOAK_END]
    return "\n".join(lines)


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(d.items()))


def _write_section(path: Path, begin: str, end: str, text: str) -> None:
    old = path.read_text() if path.exists() else "# Reliability\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


# ============================================================================ attacks: the attacker process

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8

ATTACKS = ("rapid_reset", "continuation_flood", "settings_flood", "ping_flood", "empty_frames",
           "connection_flood", "slowloris_preface")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def request_block(port: int) -> bytes:
    """A ModelInfer request header block in never-indexed literals (no HPACK state touched)."""
    import hpack
    headers = [(b":method", b"POST"), (b":scheme", b"http"),
               (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
               (b":authority", f"127.0.0.1:{port}".encode()), (b"content-type", b"application/grpc"),
               (b"te", b"trailers")]
    return hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers])


class Attacker:
    """Raw-socket HTTP/2 attackers, bounded in connections per second and in time."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port = port
        self.until = time.monotonic() + seconds
        self.stats: Counter[str] = Counter()

    def connect(self, preface: bool = True) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.stats["connect_failed"] += 1
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats["connections"] += 1
        if preface and not self.send(sock, PREFACE + frame(SETTINGS, 0, 0)):
            return None
        return sock

    def send(self, sock: socket.socket, data: bytes) -> bool:
        try:
            sock.sendall(data)
            self.stats["bytes_sent"] += len(data)
            return True
        except OSError:
            self.stats["cut_while_sending"] += 1
            return False

    def drain(self, sock: socket.socket, wait_s: float = 2.0) -> None:
        """Read until the proxy closes; count its GOAWAY codes."""
        sock.settimeout(0.2)
        received = bytearray()
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                self.stats["closed_by_proxy"] += 1
                break
            received += data
        else:
            self.stats["still_open_after_flood"] += 1
        pos = 0
        while len(received) - pos >= 9:
            length = int.from_bytes(received[pos:pos + 3], "big")
            if len(received) - pos < 9 + length:
                break
            if received[pos + 3] == GOAWAY and length >= 8:
                code = int.from_bytes(received[pos + 13:pos + 17], "big")
                self.stats[f"goaway_code_{code:#x}"] += 1
            pos += 9 + length
        sock.close()

    def per_connection(self, build: Callable[[int], list[bytes]], conns_per_s: float) -> None:
        """Open a connection, send the flood in chunks, see the proxy close it; repeat."""
        i = 0
        while time.monotonic() < self.until:
            began = time.monotonic()
            sock = self.connect()
            if sock is not None:
                for chunk in build(i):
                    if not self.send(sock, chunk):
                        break
                    self.stats["chunks_sent"] += 1
                self.drain(sock)
            i += 1
            time.sleep(max(0.0, 1.0 / conns_per_s - (time.monotonic() - began)))

    def rapid_reset(self) -> None:
        block = request_block(self.port)
        cancel = CANCEL.to_bytes(4, "big")

        def build(_: int) -> list[bytes]:  # 1,500 HEADERS + RST_STREAM pairs, 100 per write
            pairs = [frame(HEADERS, END_HEADERS, sid, block) + frame(RST_STREAM, 0, sid, cancel)
                     for sid in range(1, 3001, 2)]
            return [b"".join(pairs[k:k + 100]) for k in range(0, len(pairs), 100)]
        self.per_connection(build, conns_per_s=3)

    def continuation_flood(self) -> None:
        unit = b"\x00\x05x-pad\x64" + b"a" * 100    # literal header field, 108 bytes
        chunk = (unit * (16384 // len(unit) + 1))[:16384 // len(unit) * len(unit)]
        block = request_block(self.port)

        def build(_: int) -> list[bytes]:  # a 256 KiB header block: past the 64 KiB limit
            return [frame(HEADERS, 0, 1, block)] + [frame(CONTINUATION, 0, 1, chunk) for _ in range(16)]
        self.per_connection(build, conns_per_s=10)

    def settings_flood(self) -> None:
        self.per_connection(lambda _: [frame(SETTINGS, 0, 0) * 50 for _ in range(6)], conns_per_s=10)

    def ping_flood(self) -> None:
        self.per_connection(lambda _: [b"".join(frame(PING, 0, 0, (k * 100 + j).to_bytes(8, "big"))
                                                for j in range(100)) for k in range(20)], conns_per_s=5)

    def empty_frames(self) -> None:
        block = request_block(self.port)
        self.per_connection(lambda _: [frame(HEADERS, END_HEADERS, 1, block)]
                            + [frame(DATA, 0, 1) * 50 for _ in range(6)], conns_per_s=10)

    def connection_flood(self, hold: int = 64, churn_per_s: float = 16) -> None:
        """Hold `hold` open connections (preface + SETTINGS sent) and replace some continuously;
        the proxy closes those past --max-connections at once."""
        open_socks: list[socket.socket] = []
        while time.monotonic() < self.until:
            while len(open_socks) < hold:
                sock = self.connect()
                if sock is not None:
                    open_socks.append(sock)
            time.sleep(0.25)
            alive = []
            for sock in open_socks:  # a closed one reads b"" (or resets)
                sock.setblocking(False)
                try:
                    data = sock.recv(65536)
                    if data == b"":
                        self.stats["closed_by_proxy"] += 1
                        sock.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    self.stats["closed_by_proxy"] += 1
                    sock.close()
                    continue
                alive.append(sock)
            for _ in range(min(len(alive), int(churn_per_s / 4))):
                alive.pop(random.randrange(len(alive))).close()
            open_socks = alive
        for sock in open_socks:
            sock.close()

    def slowloris_preface(self, count: int = 24) -> None:
        """`count` connections that send the preface one byte per second; reopened when closed."""
        conns: dict[socket.socket, int] = {}

        def drop(sock: socket.socket, counter: str) -> None:
            self.stats[counter] += 1
            sock.close()
            del conns[sock]

        while time.monotonic() < self.until:
            while len(conns) < count:
                sock = self.connect(preface=False)
                if sock is None:
                    break
                sock.setblocking(False)
                conns[sock] = 0
            for sock in list(conns):
                try:  # closed by the proxy meanwhile? (b"" or a reset)
                    if sock.recv(65536) == b"":
                        drop(sock, "closed_by_proxy")
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    drop(sock, "closed_by_proxy")
                    continue
                sent = conns[sock]
                if sent >= len(PREFACE):
                    drop(sock, "preface_completed")
                    continue
                try:
                    sock.send(PREFACE[sent:sent + 1])
                    conns[sock] = sent + 1
                except OSError:
                    drop(sock, "closed_by_proxy")
            time.sleep(1.0)
        for sock in conns:
            sock.close()


def attack_worker(kind: str, port: int, seconds: float) -> int:
    attacker = Attacker(port, seconds)
    getattr(attacker, kind)()
    print(json.dumps(dict(attacker.stats)), flush=True)
    return 0


# ============================================================================ attacks: the run


@dataclass
class Window:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"sleep": [], "fast": []})
    failures: list[str] = field(default_factory=list)
    fresh_ok: int = 0
    fresh_failed: list[str] = field(default_factory=list)
    triton_checks: int = 0
    triton_not_ready: list[str] = field(default_factory=list)


async def measure(sidecar_url: str, triton_url: str, seconds: float, attack: Callable[[], Any] | None
                  ) -> tuple[Window, Any]:
    """The normal client (one persistent channel, sleep and fast alternately), a fresh-connection
    probe every 2 s and Triton's readiness every 1 s, while `attack` (a coroutine factory) runs."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    window = Window()
    done = asyncio.Event()

    async def normal() -> None:
        async with grpc.aio.insecure_channel(sidecar_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            i = 0
            while not done.is_set():
                model = ("sleep", "fast")[i % 2]
                i += 1
                started = time.monotonic()
                try:
                    reply = await asyncio.wait_for(stub.ModelInfer(_fp32_request(model, [float(i)]),
                                                                   timeout=DEADLINE_S), DEADLINE_S + HUNG_AFTER_S)
                    if _fp32_output(reply) != [float(i)]:
                        window.failures.append(f"{model}: wrong answer")
                    else:
                        window.latencies[model].append(time.monotonic() - started)
                except grpc.aio.AioRpcError as error:
                    window.failures.append(f"{model}: {error.code().name}")
                except TimeoutError:
                    window.failures.append(f"{model}: hung")
                await asyncio.sleep(0.01)

    async def fresh() -> None:
        while not done.is_set():
            try:
                async with grpc.aio.insecure_channel(
                        sidecar_url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                    await stub.ModelInfer(_fp32_request("fast", [1.0]), timeout=DEADLINE_S)
                window.fresh_ok += 1
            except grpc.aio.AioRpcError as error:
                window.fresh_failed.append(error.code().name)
            await asyncio.sleep(2.0)

    async def triton_health() -> None:
        async with grpc.aio.insecure_channel(triton_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not done.is_set():
                window.triton_checks += 1
                try:
                    ready = (await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2)).ready
                    for model in ("sleep", "fast"):
                        ready = ready and (await stub.ModelReady(
                            service_pb2.ModelReadyRequest(name=model), timeout=2)).ready
                    if not ready:
                        window.triton_not_ready.append("not ready")
                except grpc.aio.AioRpcError as error:
                    window.triton_not_ready.append(error.code().name)
                await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(c) for c in (normal(), fresh(), triton_health())]
    if attack is not None:
        result = await attack()
    else:
        await asyncio.sleep(seconds)
        result = None
    done.set()
    await asyncio.gather(*tasks)
    return window, result


async def attacks(args: argparse.Namespace) -> int:
    from tritonpilot.tools.embedded import EmbeddedTriton

    work = Path(tempfile.mkdtemp(prefix="tritonpilot-attacks-"))
    print(f"work dir {work}", file=sys.stderr, flush=True)
    triton = EmbeddedTriton(MODELS, load_models=["sleep", "fast"], log_path=work / "triton.log",
                            startup_timeout_s=120)
    triton.start()
    sidecar = Sidecar(triton.grpc_url, work, "--max-connections", str(args.max_connections))
    rows: list[dict[str, Any]] = []
    try:
        sidecar.wait_ready()
        await measure(sidecar.url, triton.grpc_url, 3.0, None)  # warm the paths
        base, _ = await measure(sidecar.url, triton.grpc_url, args.attack_seconds, None)
        baseline = {m: percentile(v, 50) for m, v in base.latencies.items()}
        rows.append(_row("none (before)", base, baseline, {}, {}, None))
        print(f"baseline p50 ms: sleep {baseline['sleep'] * 1000:.2f}, fast {baseline['fast'] * 1000:.2f}",
              file=sys.stderr, flush=True)
        for kind in args.only or ATTACKS:
            before = sidecar.metrics()

            async def run_attacker(kind: str = kind) -> dict[str, Any]:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--attack-worker", kind, "--port", str(sidecar.port),
                    "--attack-seconds", str(args.attack_seconds), stdout=asyncio.subprocess.PIPE)
                out, _ = await asyncio.wait_for(proc.communicate(), args.attack_seconds + 60)
                return json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {"rc": proc.returncode}
            window, stats = await measure(sidecar.url, triton.grpc_url, args.attack_seconds, run_attacker)
            await asyncio.sleep(1.0)
            after = sidecar.metrics()
            http2 = counter_deltas(before, after, "tritonpilot_http2_refused_total")
            conns = counter_deltas(before, after, "tritonpilot_connections_refused_total")
            crashed = not triton.is_running()
            row = _row(kind, window, baseline, http2, conns, stats, crashed)
            rows.append(row)
            print(json.dumps(row, default=str), file=sys.stderr, flush=True)
            if crashed:
                print("tritonserver died during the attack; restarting it", file=sys.stderr, flush=True)
                await asyncio.to_thread(triton.restart)
            await asyncio.sleep(2.0)
        after_window, _ = await measure(sidecar.url, triton.grpc_url, args.attack_seconds, None)
        rows.append(_row("none (after)", after_window, baseline, {}, {}, None))
    finally:
        sidecar_rc = sidecar.stop()
        triton.stop()
    result = {"rows": rows, "sidecar_rc": sidecar_rc, "log_events": dict(sidecar.log_events()), "work": str(work),
              "max_connections": args.max_connections, "seconds": args.attack_seconds}
    (work / "attacks.json").write_text(json.dumps(result, indent=1, default=str))
    text = attacks_markdown(result)
    print(text)
    _write_section(Path(args.out), ATTACKS_BEGIN, ATTACKS_END, text)
    print(f"wrote {args.out}; raw figures in {work / 'attacks.json'}", file=sys.stderr)
    return 0 if all(all(r["verdict"].values()) for r in rows) else 1


def _row(name: str, w: Window, baseline: dict[str, float], http2: dict[str, float], conns: dict[str, float],
         stats: dict[str, Any] | None, crashed: bool = False) -> dict[str, Any]:
    p50 = {m: percentile(v, 50) for m, v in w.latencies.items()}
    verdict = attack_verdict(baseline["sleep"], p50["sleep"], len(w.failures), len(w.triton_not_ready))
    return {"attack": name, "p50_ms": {m: v * 1000 for m, v in p50.items()},
            "ratio": {m: p50[m] / baseline[m] for m in p50}, "calls": {m: len(v) for m, v in w.latencies.items()},
            "failures": Counter(w.failures), "fresh_ok": w.fresh_ok, "fresh_failed": Counter(w.fresh_failed),
            "triton_checks": w.triton_checks, "triton_not_ready": Counter(w.triton_not_ready),
            "http2_refused": http2, "connections_refused": conns, "attacker": stats, "triton_crashed": crashed,
            "verdict": verdict}


def attacks_markdown(r: dict[str, Any]) -> str:
    lines = [ATTACKS_BEGIN, "## HTTP/2 attacks", "",
             f"Generated by `bash scripts/soak --attacks` on {time.strftime('%Y-%m-%d')}, a {os.cpu_count()}-core "
             "machine with no GPU, shared with other work. The sidecar runs with its default HTTP/2 limits and "
             f"`--max-connections {r['max_connections']}`; each attack runs {r['seconds']:g} s in its own process "
             "(raw sockets on loopback) while the normal client calls `sleep` (20 ms) and `fast` alternately on one "
             "persistent channel, a fresh connection calls `fast` every 2 s, and Triton's ServerReady/ModelReady "
             "is asked of Triton directly every second. Target: `sleep` p50 within 2x of the unloaded run, no "
             "failed normal call, Triton READY throughout.", "",
             "| attack | sleep p50 ms (ratio) | fast p50 ms (ratio) | normal calls | failed | fresh conns ok/failed "
             "| Triton not ready | http2_refused | connections_refused | attacker saw | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        p, q = row["p50_ms"], row["ratio"]
        calls = sum(row["calls"].values())
        failed = sum(row["failures"].values())
        fresh_failed = sum(row["fresh_failed"].values())
        attacker = row["attacker"] or {}
        seen = ", ".join(f"{k} {v}" for k, v in sorted(attacker.items()) if k != "bytes_sent")
        met = all(row["verdict"].values())
        lines.append(
            f"| {row['attack']} | {p['sleep']:.2f} ({q['sleep']:.2f}x) | {p['fast']:.2f} ({q['fast']:.2f}x) | {calls} "
            f"| {failed}{' ' + _kv(dict(row['failures'])) if failed else ''} | {row['fresh_ok']}/{fresh_failed}"
            f"{' ' + _kv(dict(row['fresh_failed'])) if fresh_failed else ''} | "
            f"{sum(row['triton_not_ready'].values())}/{row['triton_checks']}"
            f"{' (tritonserver crashed)' if row['triton_crashed'] else ''} | {_kv(row['http2_refused']) or '-'} | "
            f"{_kv(row['connections_refused']) or '-'} | {seen or '-'} | {'yes' if met else '**no**'} |")
    lines += ["", f"Sidecar warnings/errors logged: {_kv(r['log_events']) or 'none'}. It exited with "
              f"{r['sidecar_rc']} on SIGTERM.", "", ATTACKS_END]
    return "\n".join(lines)


# ============================================================================ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="soak length (default 15; 2: a smoke run)")
    parser.add_argument("--attacks", action="store_true", help="run the HTTP/2 attacks instead of the soak")
    parser.add_argument("--attack-seconds", type=float, default=15.0, help="per attack (default 15)")
    parser.add_argument("--only", nargs="+", choices=ATTACKS, help="these attacks alone")
    parser.add_argument("--max-connections", type=int, default=32, help="the sidecar's, for the attacks")
    parser.add_argument("--direct", action="store_true",
                        help="soak: the load goes to Triton's own port, not through the proxy (a comparison)")
    parser.add_argument("--no-faults", dest="faults", action="store_false",
                        help="soak: no policy rewrites, SIGHUPs, kill or freeze (Triton crashes are still restarted)")
    parser.add_argument("--without", nargs="+", choices=WORKER_KINDS,
                        help="soak: leave these clients out (e.g. cancel)")
    parser.add_argument("--freeze-group", action="store_true",
                        help="soak: SIGSTOP tritonserver's whole process group (its stubs too), not the server alone")
    parser.add_argument("--kills", type=int, metavar="N",
                        help="instead of the soak: N SIGKILL+restart cycles of Triton under stream and unary "
                             "load, through the sidecar and then direct; prints outcomes side by side")
    parser.add_argument("--kills-routes", nargs="+", choices=("proxy", "direct"), default=["proxy", "direct"],
                        help="with --kills: through the sidecar, straight to Triton, or both (default)")
    parser.add_argument("--trace-memory", type=float, metavar="EVERY_S",
                        help="soak and --kills: sample the sidecar's memory (RSS by mapping, pymalloc, glibc, "
                             "tracemalloc) every EVERY_S seconds (a diagnostic: slower, more RSS); prints what grew")
    parser.add_argument("--trace-frames", type=int, default=12, metavar="N",
                        help="with --trace-memory: tracemalloc's frames per allocation (default 12; 0: no "
                             "tracemalloc, which leaves pymalloc's arena statistics readable)")
    parser.add_argument("--memtrace-report", metavar="DIR",
                        help="print what grew in a --trace-memory run's WORK/memtrace folder, and exit")
    parser.add_argument("--out", default=str(OUT), help="the document whose section is rewritten")
    parser.add_argument("--attack-worker", choices=ATTACKS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack_worker:
        return attack_worker(args.attack_worker, args.port, args.attack_seconds)
    if args.memtrace_report:
        print(memtrace_report(Path(args.memtrace_report)))
        return 0
    if args.kills:
        return asyncio.run(kills(args))
    return asyncio.run(attacks(args) if args.attacks else soak(args))


if __name__ == "__main__":
    sys.exit(main())
