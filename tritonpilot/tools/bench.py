"""`tritonpilot bench`: a perf_analyzer-style load generator, with side-by-side --compare.

The engine lives in tritonpilot.tools.benchlib (used by tune, demo and the controller
benchmark too); this module is the command line and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from tritonpilot.tools import benchlib
from tritonpilot.tools.benchlib import BenchError, ConcurrencyLoad, LevelResult, Load, RateLoad

DEFAULT_LABELS = ("direct", "proxied")


@dataclass(frozen=True)
class Endpoint:
    label: str
    url: str


@dataclass(frozen=True)
class EndpointResults:
    endpoint: Endpoint
    levels: list[LevelResult]


# --------------------------------------------------------------------------- options


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="Triton (or proxy) gRPC endpoint, HOST:PORT")
    parser.add_argument("--model", required=True, help="model name")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency-range", metavar="START:END[:STEP]",
                      help="closed loop, N requests in flight (default 1:1)")
    load.add_argument("--request-rate-range", metavar="START:END[:STEP]",
                      help="open loop, constant spacing, requests/s")
    load.add_argument("--rate-schedule", metavar="RATE:SECONDS,...",
                      help="open loop through phases in one run, e.g. 5:60,35:60,5:60; reports each phase")
    parser.add_argument("--measurement-interval-ms", type=int, default=5000, help="window length (default 5000)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="load before each level's first window (default 1)")
    parser.add_argument("--windows", type=int, default=None,
                        help="windows per level; the median is reported (default 1, 3 with --compare)")
    parser.add_argument("--transition-s", type=float, default=0.0,
                        help="--rate-schedule: seconds at the start of each phase left out of its figures")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2",
                        help="dims for an input with -1 dims (without the batch dim); others get 1")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size for models with max_batch_size > 0")
    parser.add_argument("--input-data", metavar="FILE", help="JSON object: input name -> list of values")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline of each request (default 30)")
    parser.add_argument("--connections", type=int, default=4,
                        help="open-loop modes: channels the sends are spread over (default 4)")
    parser.add_argument("--transport", choices=("raw", "tritonclient"), default="raw",
                        help="raw: pre-serialized requests on grpc.aio (least client CPU, default); "
                             "tritonclient: its asyncio InferenceServerClient.infer")
    parser.add_argument("--compare", metavar="URL2", help="same load against a second endpoint, alternating windows")
    parser.add_argument("--label", action="append", default=[], help="endpoint names, in --url, --compare order")
    parser.add_argument("--cpu-pid", action="append", default=[], metavar="LABEL=PID",
                        help="report CPU us per request of this process over each window (repeatable; PID 'self': the bench)")
    parser.add_argument("--csv", metavar="FILE", help="write one row per endpoint and level")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input data")


def parse_range(text: str, option: str, integer: bool) -> list[float]:
    """perf_analyzer's START:END[:STEP], END included."""
    parts = text.split(":")
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError
        nums = [float(p) for p in parts]
    except ValueError:
        raise BenchError(f"{option} {text!r}: expected START:END[:STEP]") from None
    start = nums[0]
    end = nums[1] if len(nums) > 1 else start
    step = nums[2] if len(nums) > 2 else 1.0
    if integer and any(n != int(n) for n in nums):
        raise BenchError(f"{option} {text!r}: whole numbers only")
    if start <= 0 or end < start or step <= 0:
        raise BenchError(f"{option} {text!r}: needs 0 < START <= END and STEP > 0")
    levels, k = [], 0
    while (v := start + k * step) <= end + 1e-9:
        levels.append(int(v) if integer else round(v, 9))
        k += 1
    return levels


def parse_cpu_pids(values: Sequence[str]) -> dict[str, int]:
    pids: dict[str, int] = {}
    for value in values:
        label, sep, pid = value.partition("=")
        if pid == "self":  # the bench's own cost, to see how much of the machine the client takes
            pid = str(os.getpid())
        if not sep or not label or not pid.isdigit():
            raise BenchError(f"--cpu-pid {value!r}: expected LABEL=PID (PID may be 'self')")
        if benchlib.read_cpu_s(int(pid)) is None:
            raise BenchError(f"--cpu-pid {value!r}: no process {pid} in /proc")
        pids[label] = int(pid)
    return pids


def endpoints(args: argparse.Namespace) -> list[Endpoint]:
    urls = [args.url] + ([args.compare] if args.compare else [])
    if len(args.label) > len(urls):
        raise BenchError(f"--label given {len(args.label)} times for {len(urls)} endpoint(s)")
    defaults = DEFAULT_LABELS if args.compare else (args.url,)
    labels = list(args.label) + list(defaults[len(args.label) : len(urls)])
    if len(set(labels)) != len(labels):
        raise BenchError(f"--label: endpoint names must differ, got {labels}")
    return [Endpoint(label, url) for label, url in zip(labels, urls)]


# --------------------------------------------------------------------------- formatting


def _num(x: float | None, digits: int = 6) -> str:
    """C++ ostream's default (6 significant digits), as perf_analyzer prints throughput."""
    return "-" if x is None else f"{x:.{digits}g}"


def _us(x: float | None) -> str:
    return "-" if x is None else str(int(round(x)))


def _level_name(r: LevelResult) -> str:
    return f"{r.level:g}"


def perf_analyzer_summary(results: Sequence[LevelResult]) -> str:
    lines = ["Inferences/Second vs. Client p95 Batch Latency"]
    for r in results:
        head = "Concurrency" if r.mode == "concurrency" else "Request Rate"
        lines.append(f"{head}: {_level_name(r)}, throughput: {_num(r.throughput_infer_per_s)} infer/sec, "
                     f"latency {_us(r.p95_us)} usec")
    return "\n".join(lines)


def _errors_text(errors: Mapping[str, int]) -> str:
    return ",".join(f"{code}={n}" for code, n in sorted(errors.items())) or "0"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), *(fmt(r) for r in rows)]).rstrip()


def detail_table(results: Sequence[LevelResult], cpu_labels: Sequence[str]) -> str:
    if not results:
        return ""
    open_loop = results[0].mode != "concurrency"
    phases = results[0].mode == "phase"
    header = ["Phase"] if phases else []
    header += ["Concurrency" if not open_loop else "Request Rate"]
    header += ["offered/s", "served/s"] if open_loop else []
    header += ["infer/s", "p50 us", "p95 us", "p99 us", "mean us", "count", "errors"]
    header += ["late"] if open_loop else []
    header += [f"cpu us/req {label}" for label in cpu_labels]
    rows = []
    for i, r in enumerate(results, 1):
        row = [str(i)] if phases else []
        row += [_level_name(r)]
        row += [_num(r.offered_per_s, 4), _num(r.served_per_s, 4)] if open_loop else []
        row += [_num(r.throughput_infer_per_s), _us(r.p50_us), _us(r.p95_us), _us(r.p99_us), _us(r.mean_us),
                str(r.count), _errors_text(r.errors)]
        row += [str(r.late)] if open_loop else []
        row += [_us(r.cpu_us_per_request.get(label)) for label in cpu_labels]
        rows.append(row)
    return text_table(header, rows)


def _ratio(b: float | None, a: float | None) -> str:
    return "-" if a is None or b is None or a == 0 else f"{b / a:.3f}"


def ratio_table(a: EndpointResults, b: EndpointResults) -> str:
    head = "Concurrency" if a.levels and a.levels[0].mode == "concurrency" else "Request Rate"
    header = [head, f"throughput {b.endpoint.label}/{a.endpoint.label}", "p50 delta us", "p95 ratio", "p99 ratio"]
    rows = []
    for ra, rb in zip(a.levels, b.levels):
        delta = None if ra.p50_us is None or rb.p50_us is None else rb.p50_us - ra.p50_us
        rows.append([_level_name(ra), _ratio(rb.throughput_infer_per_s, ra.throughput_infer_per_s),
                     "-" if delta is None else f"{delta:+.0f}", _ratio(rb.p95_us, ra.p95_us),
                     _ratio(rb.p99_us, ra.p99_us)])
    return text_table(header, rows)


def print_report(all_results: Sequence[EndpointResults], cpu_labels: Sequence[str], out: TextIO) -> None:
    several = len(all_results) > 1
    for er in all_results:
        if several:
            print(f"=== {er.endpoint.label} ({er.endpoint.url}) ===", file=out)
        print(perf_analyzer_summary(er.levels), file=out)
        print(file=out)
        print(detail_table(er.levels, cpu_labels), file=out)
        print(file=out)
    if several:
        a, b = all_results[0], all_results[1]
        print(f"=== {b.endpoint.label} vs {a.endpoint.label} (median of windows) ===", file=out)
        print(ratio_table(a, b), file=out)
        print(file=out)


CSV_FIELDS = [
    "endpoint", "url", "mode", "phase", "level", "windows", "window_s", "batch_size",
    "offered_per_s", "served_per_s", "throughput_infer_per_s",
    "p50_us", "p95_us", "p99_us", "mean_us", "count", "errors", "errors_by_code", "late",
]


def csv_rows(all_results: Sequence[EndpointResults], cpu_labels: Sequence[str]) -> tuple[list[str], list[dict]]:
    fields = CSV_FIELDS + [f"cpu_us_per_request_{label}" for label in cpu_labels]
    rows = []
    for er in all_results:
        for i, r in enumerate(er.levels, 1):
            row = {
                "endpoint": er.endpoint.label, "url": er.endpoint.url, "mode": r.mode,
                "phase": i if r.mode == "phase" else "", "level": f"{r.level:g}", "windows": r.windows,
                "window_s": f"{r.window_s:.3f}", "batch_size": r.batch_size,
                "offered_per_s": f"{r.offered_per_s:.3f}", "served_per_s": f"{r.served_per_s:.3f}",
                "throughput_infer_per_s": f"{r.throughput_infer_per_s:.3f}",
                "p50_us": _us(r.p50_us), "p95_us": _us(r.p95_us), "p99_us": _us(r.p99_us), "mean_us": _us(r.mean_us),
                "count": r.count, "errors": r.error_count, "errors_by_code": _errors_text(r.errors), "late": r.late,
            }
            for label in cpu_labels:
                v = r.cpu_us_per_request.get(label)
                row[f"cpu_us_per_request_{label}"] = "" if v is None else f"{v:.1f}"
            rows.append(row)
    return fields, rows


def write_csv(path: str, all_results: Sequence[EndpointResults], cpu_labels: Sequence[str]) -> None:
    fields, rows = csv_rows(all_results, cpu_labels)
    try:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    except OSError as e:
        raise BenchError(f"--csv {path}: {e}") from None


def _progress(label: str, k: int, windows: int, r: LevelResult) -> None:
    """One line per window on stderr: stdout stays the report."""
    head = "concurrency" if r.mode == "concurrency" else "rate"
    print(f"[{label}] {head} {_level_name(r)} window {k + 1}/{windows}: "
          f"{_num(r.throughput_infer_per_s, 4)} infer/s, p95 {_us(r.p95_us)} us, errors {r.error_count}",
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- running


async def _bench(args: argparse.Namespace) -> int:
    eps = endpoints(args)
    cpu_pids = parse_cpu_pids(args.cpu_pid)
    shapes = benchlib.parse_shape_option(args.shape)
    data = benchlib.load_input_data(args.input_data) if args.input_data else None
    windows = args.windows if args.windows is not None else (3 if args.compare else 1)
    window_s = args.measurement_interval_ms / 1000
    if windows < 1 or window_s <= 0 or args.warmup_s < 0 or args.timeout_s <= 0:
        raise BenchError("--windows, --measurement-interval-ms and --timeout-s must be > 0, --warmup-s >= 0")
    if args.connections < 1:
        raise BenchError("--connections must be >= 1")

    inputs = await benchlib.prepare_inputs(eps[0].url, args.model, shapes=shapes, batch_size=args.batch_size,
                                           data=data, seed=args.seed, timeout_s=min(args.timeout_s, 10))
    for ep in eps[1:]:  # the same model must answer there too, before any load runs
        await benchlib.fetch_model(ep.url, args.model, timeout_s=min(args.timeout_s, 10))

    common = dict(timeout_s=args.timeout_s, cpu_pids=cpu_pids, transport=args.transport)
    if args.rate_schedule:
        phases = benchlib.parse_rate_schedule(args.rate_schedule)
        all_results = []
        for ep in eps:
            print(f"[{ep.label}] {len(phases)} phases, {sum(s for _, s in phases):g} s", file=sys.stderr, flush=True)
            levels = await benchlib.measure_rate_schedule(
                ep.url, args.model, phases, inputs, transition_s=args.transition_s,
                connections=args.connections, **common)
            all_results.append(EndpointResults(ep, levels))
    else:
        loads = _loads(args)
        per_ep: list[list[LevelResult]] = [[] for _ in eps]
        for load in loads:
            medians = await benchlib.measure_alternating(
                [ep.url for ep in eps], args.model, load, inputs, window_s=window_s, windows=windows,
                warmup_s=args.warmup_s, on_window=lambda k, i, r: _progress(eps[i].label, k, windows, r), **common)
            for i, m in enumerate(medians):
                per_ep[i].append(m)
        all_results = [EndpointResults(ep, levels) for ep, levels in zip(eps, per_ep)]

    print_report(all_results, list(cpu_pids), sys.stdout)
    if args.csv:
        write_csv(args.csv, all_results, list(cpu_pids))
    return 0


def _loads(args: argparse.Namespace) -> list[Load]:
    if args.request_rate_range:
        rates = parse_range(args.request_rate_range, "--request-rate-range", integer=False)
        return [RateLoad(((rate, math.inf),), args.connections) for rate in rates]
    levels = parse_range(args.concurrency_range or "1:1", "--concurrency-range", integer=True)
    return [ConcurrencyLoad(int(n)) for n in levels]


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_bench(args))
    except BenchError as e:
        print(f"tritonpilot bench: error: {e}", file=sys.stderr)
        return 2
