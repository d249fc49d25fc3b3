"""`tritonpilot bench`: a perf_analyzer-style load generator, with side-by-side --compare.

    tritonpilot bench -m MODEL [-u|--triton HOST:PORT] [-i grpc] [--concurrency-range START:END:STEP |
                      --request-rate-range START:END:STEP | --rate-schedule RATE:S,...] [-p MS] [--percentile N]
                      [-b N] [--shape NAME:DIMS] [--input-data random|zero|FILE] [-f FILE] [--compare HOST:PORT]

It takes NVIDIA perf_analyzer's spellings for what the two share (-m, -u, -i, -b, -p/--measurement-interval,
--concurrency-range, --request-rate-range, --request-distribution constant, --percentile, --shape, --input-data,
-f), so a perf_analyzer command line mostly runs as is, and keeps its own extras (--compare and --label, the
--rate-schedule phases, --cpu-pid, --windows, --csv). `--triton` is the Triton endpoint's name across the
project's commands (serve, tune); `-u` and `--url` are the same option. gRPC only: `-i http` is a usage error.

`-f FILE` writes perf_analyzer's latency report CSV with its exact header (read off perf_analyzer 2.40's
output against Triton 2.51); LATENCY_REPORT_HELP (also in --help) says which columns bench measures and which
it writes as 0. `--csv FILE` is bench's own, fuller CSV.

Exit status: 0 done, 1 the run failed (Triton unreachable, the model missing, every request of a level failed,
a report not written), 2 usage error (argparse's own, or an option the model does not accept), 130 interrupted.

The engine lives in tritonpilot.tools.benchlib (used by tune, demo and the controller
benchmark too); this module is the command line and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tritonpilot.tools import benchlib
from tritonpilot.tools.benchlib import (
    DEFAULT_PERCENTILES,
    BenchError,
    BenchFailure,
    ConcurrencyLoad,
    Fill,
    LevelResult,
    Load,
    RateLoad,
    Transport,
)

DEFAULT_LABELS = ("direct", "proxied")
DEFAULT_TRITON = "localhost:8001"  # perf_analyzer's default for gRPC
DEFAULT_PERCENTILE = 95  # bench's summary latency; perf_analyzer's default (-1) is the average

LATENCY_REPORT_HELP = """\
-f/--latency-report-file FILE: perf_analyzer's CSV, one row per level, rows in order of increasing
Inferences/Second as perf_analyzer sorts them. Header (pN latency columns: 50, 90, 95, 99 and --percentile N):
  Concurrency|Request Rate,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,
  Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,
  p95 latency,p99 latency
Measured by bench: the level, Inferences/Second (successful inferences per second, x batch size),
  Network+Server Send/Recv (the mean client latency in usec: perf_analyzer's formula with the parts bench
  does not measure taken as 0) and the pN latency columns (usec, nearest rank; 0 when no request succeeded).
Written as 0, not measured: Client Send and Client Recv (the default raw transport sends pre-serialized
  requests and does not decode the responses) and the Server Queue/Compute columns (bench does not read
  Triton's statistics): 0 is what perf_analyzer's formulas give for parts that are unknown.
--rate-schedule phases are Request Rate rows.
  With --compare, the second endpoint's rows go to LABEL.FILE (e.g. proxied.report.csv) beside FILE.
Summary lines on stdout: perf_analyzer's, at the --percentile latency (default 95; -1: the average, as
  perf_analyzer's own default)."""


@dataclass(frozen=True)
class Endpoint:
    label: str
    url: str


@dataclass(frozen=True)
class EndpointResults:
    endpoint: Endpoint
    levels: list[LevelResult]


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, checked: what the options mean, whichever spelling gave them."""

    endpoints: tuple[Endpoint, ...]
    model: str
    loads: tuple[Load, ...]  # one per level; empty with --rate-schedule
    phases: tuple[tuple[float, float], ...]  # --rate-schedule (rate, seconds), else empty
    window_s: float
    warmup_s: float
    windows: int
    transition_s: float
    percentile: int  # 1..99, or -1 for the mean
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    batch_size: int = 1
    fill: Fill = "random"
    data: Mapping[str, Any] | None = None
    seed: int = 0
    timeout_s: float = 30.0
    connections: int = 4
    transport: Transport = "raw"
    cpu_pids: Mapping[str, int] = field(default_factory=dict)
    csv: str | None = None
    latency_report: str | None = None


# --------------------------------------------------------------------------- options


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser raising BenchError: argparse prints the message and exits 2."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except BenchError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _number(kind: type[int] | type[float], low: float, strict: bool) -> Callable[[str], Any]:
    bound = f"> {low:g}" if strict else f">= {low:g}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise BenchError(f"{text!r}: expected {'a whole number' if kind is int else 'a number'} {bound}") from None
        if not (value > low if strict else value >= low) or not math.isfinite(value):
            raise BenchError(f"{text!r}: must be {bound}")
        return value

    return _checked(parse)


def parse_endpoint(text: str) -> str:
    """Triton's gRPC endpoint as HOST:PORT (a grpc:// prefix is dropped)."""
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        raise BenchError(f"{text!r}: HTTP is not supported by bench yet; give Triton's gRPC endpoint "
                         "(HOST:PORT, port 8001 by default)")
    address = rest if sep and scheme.lower() == "grpc" else text
    host, colon, port = address.rpartition(":")
    if not colon or not host or "/" in address or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BenchError(f"{text!r}: expected Triton's gRPC endpoint as HOST:PORT, e.g. 127.0.0.1:8001")
    return f"{host}:{port}"


def parse_protocol(text: str) -> str:
    """perf_analyzer's -i: bench speaks gRPC only."""
    if text.lower() == "grpc":
        return "grpc"
    if text.lower() == "http":
        raise BenchError("HTTP is not supported by bench yet: use -i grpc with Triton's gRPC endpoint "
                         "(port 8001 by default)")
    raise BenchError(f"{text!r}: expected grpc (bench does not support HTTP yet)")


def parse_percentile(text: str) -> int:
    """perf_analyzer's --percentile: a whole number in 1..99, or -1 for the average."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value != -1 and not 0 < value < 100:
        raise BenchError(f"{text!r}: expected a whole number in 1..99, or -1 for the average latency")
    return value


def parse_request_distribution(text: str) -> str:
    if text.lower() == "constant":
        return "constant"
    if text.lower() == "poisson":
        raise BenchError("poisson is not supported by bench yet: its open loop sends at constant spacing")
    raise BenchError(f"{text!r}: expected constant")


def parse_range(text: str, option: str, integer: bool) -> list[float]:
    """perf_analyzer's START:END[:STEP], END included."""
    where = f"{option} {text!r}".strip()
    parts = text.split(":")
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError
        nums = [float(p) for p in parts]
    except ValueError:
        raise BenchError(f"{where}: expected START:END[:STEP]") from None
    start = nums[0]
    end = nums[1] if len(nums) > 1 else start
    step = nums[2] if len(nums) > 2 else 1.0
    if integer and any(n != int(n) for n in nums):
        raise BenchError(f"{where}: whole numbers only")
    if len(nums) > 1 and end == 0:
        raise BenchError(f"{where}: END 0 (search until a latency threshold) is not supported by bench; "
                         "give the last level")
    if start <= 0 or end < start or step <= 0:
        raise BenchError(f"{where}: needs 0 < START <= END and STEP > 0")
    levels, k = [], 0
    while (v := start + k * step) <= end + 1e-9:
        levels.append(int(v) if integer else round(v, 9))
        k += 1
    return levels


def _range_type(integer: bool) -> Callable[[str], Any]:
    return _checked(lambda text: parse_range(text, "", integer))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (f"{LATENCY_REPORT_HELP}\n\nExit status: 0 done, 1 the run failed (Triton unreachable, "
                     "model missing, every request of a level failed, a report not written), 2 usage error, "
                     "130 interrupted.")
    positive_int = _number(int, 0, strict=True)
    positive = _number(float, 0, strict=True)
    not_negative = _number(float, 0, strict=False)

    where = parser.add_argument_group("endpoint and model (perf_analyzer's -m, -u, -i)")
    where.add_argument("--triton", "-u", "--url", dest="triton", type=_checked(parse_endpoint),
                       default=DEFAULT_TRITON, metavar="HOST:PORT",
                       help=f"Triton's (or a proxy's) gRPC endpoint (default {DEFAULT_TRITON})")
    where.add_argument("-m", "--model", dest="model", required=True, metavar="MODEL", help="model name")
    where.add_argument("-i", "--protocol", dest="protocol", type=_checked(parse_protocol), default="grpc",
                       metavar="grpc", help="grpc, the only one bench speaks (perf_analyzer's default is http)")

    load = parser.add_argument_group("load (perf_analyzer's measurement options, and bench's)")
    kind = load.add_mutually_exclusive_group()
    kind.add_argument("--concurrency-range", type=_range_type(integer=True), metavar="START:END[:STEP]",
                      help="closed loop, N requests in flight (default 1:1)")
    kind.add_argument("--request-rate-range", type=_range_type(integer=False), metavar="START:END[:STEP]",
                      help="open loop, constant spacing, requests/s")
    kind.add_argument("--rate-schedule", type=_checked(benchlib.parse_rate_schedule), metavar="RATE:SECONDS,...",
                      help="open loop through phases in one run, e.g. 5:60,35:60,5:60; reports each phase")
    load.add_argument("--request-distribution", type=_checked(parse_request_distribution), default="constant",
                      metavar="constant", help="open-loop spacing: constant only (poisson is not supported yet)")
    load.add_argument("-p", "--measurement-interval", "--measurement-interval-ms", dest="measurement_interval_ms",
                      type=positive_int, default=5000, metavar="MS",
                      help="measurement window in milliseconds (default 5000)")
    load.add_argument("--percentile", type=_checked(parse_percentile), default=DEFAULT_PERCENTILE, metavar="N",
                      help=f"latency percentile of the summary lines, 1..99, -1 for the average "
                           f"(default {DEFAULT_PERCENTILE}); -f gets a pN column too")
    load.add_argument("--warmup-s", type=not_negative, default=1.0, metavar="S",
                      help="load before each level's first window (default 1)")
    load.add_argument("--windows", type=positive_int, default=None, metavar="N",
                      help="windows per level; the median is reported (default 1, 3 with --compare)")
    load.add_argument("--transition-s", type=not_negative, default=0.0, metavar="S",
                      help="--rate-schedule: seconds at the start of each phase left out of its figures")
    load.add_argument("--timeout-s", type=positive, default=30.0, metavar="S",
                      help="deadline of each request (default 30)")
    load.add_argument("--connections", type=positive_int, default=4, metavar="N",
                      help="open-loop modes: channels the sends are spread over (default 4)")
    load.add_argument("--transport", choices=("raw", "tritonclient"), default="raw",
                      help="raw: pre-serialized requests on grpc.aio (least client CPU, default); "
                           "tritonclient: its asyncio InferenceServerClient.infer")

    data = parser.add_argument_group("input data (perf_analyzer's -b, --shape, --input-data)")
    data.add_argument("-b", "--batch-size", dest="batch_size", type=positive_int, default=1, metavar="N",
                      help="batch size for models with max_batch_size > 0 (default 1)")
    data.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2",
                      help="dims for an input with -1 dims (without the batch dim); others get 1")
    data.add_argument("--input-data", default="random", metavar="random|zero|FILE",
                      help="random (default), zero, or a JSON file: input name -> values, or perf_analyzer's "
                           "{\"data\": [{...}]} (its first entry)")
    data.add_argument("--seed", type=int, default=0, help="seed of the random input data")

    out = parser.add_argument_group("reports, and bench's A/B comparison")
    out.add_argument("-f", "--latency-report-file", dest="latency_report", metavar="FILE",
                     help="perf_analyzer's latency report CSV (columns below)")
    out.add_argument("--csv", metavar="FILE", help="bench's own CSV: one row per endpoint and level, all figures")
    out.add_argument("--compare", type=_checked(parse_endpoint), metavar="HOST:PORT",
                     help="same load against a second endpoint, alternating windows")
    out.add_argument("--label", action="append", default=[],
                     help="endpoint names, in --triton, --compare order (default: direct, proxied)")
    out.add_argument("--cpu-pid", action="append", default=[], metavar="LABEL=PID",
                     help="report CPU us per request of this process over each window "
                          "(repeatable; PID 'self': the bench)")


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
    urls = [args.triton] + ([args.compare] if args.compare else [])
    if len(args.label) > len(urls):
        raise BenchError(f"--label given {len(args.label)} times for {len(urls)} endpoint(s)")
    defaults = DEFAULT_LABELS if args.compare else (args.triton,)
    labels = list(args.label) + list(defaults[len(args.label) : len(urls)])
    if len(set(labels)) != len(labels):
        raise BenchError(f"--label: endpoint names must differ, got {labels}")
    return [Endpoint(label, url) for label, url in zip(labels, urls)]


def _output_file(path: str | None, option: str) -> str | None:
    """Checked before the run, so a typo does not cost the whole measurement."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise BenchError(f"{option} {path}: is a directory")
    if not p.parent.is_dir():
        raise BenchError(f"{option} {path}: no directory {str(p.parent)!r}")
    return path


def settings(args: argparse.Namespace) -> Settings:
    """The options, checked together, before anything connects (BenchError: a usage error)."""
    eps = endpoints(args)
    windows = args.windows if args.windows is not None else (3 if args.compare else 1)
    phases: tuple[tuple[float, float], ...] = args.rate_schedule or ()
    for _, seconds in phases:
        if args.transition_s >= seconds:
            raise BenchError(f"--transition-s {args.transition_s:g} leaves nothing of a {seconds:g} s phase "
                             "of --rate-schedule to measure")
    loads: tuple[Load, ...] = ()
    if args.request_rate_range:
        loads = tuple(RateLoad(((rate, math.inf),), args.connections) for rate in args.request_rate_range)
    elif not phases:
        loads = tuple(ConcurrencyLoad(int(n)) for n in (args.concurrency_range or [1]))
    fill: Fill = "random"
    data = None
    if args.input_data in ("random", "zero"):
        fill = args.input_data
    else:
        data = benchlib.load_input_data(args.input_data)
    if args.compare and args.latency_report and len(eps) > 1:
        _output_file(str(_compare_report_path(args.latency_report, eps[1].label)), "-f")
    return Settings(
        endpoints=tuple(eps), model=args.model, loads=loads, phases=phases,
        window_s=args.measurement_interval_ms / 1000, warmup_s=args.warmup_s, windows=windows,
        transition_s=args.transition_s, percentile=args.percentile,
        shapes=benchlib.parse_shape_option(args.shape), batch_size=args.batch_size, fill=fill, data=data,
        seed=args.seed, timeout_s=args.timeout_s, connections=args.connections, transport=args.transport,
        cpu_pids=parse_cpu_pids(args.cpu_pid), csv=_output_file(args.csv, "--csv"),
        latency_report=_output_file(args.latency_report, "-f/--latency-report-file"),
    )


# --------------------------------------------------------------------------- formatting


def _num(x: float | None, digits: int = 6) -> str:
    """C++ ostream's default (6 significant digits), as perf_analyzer prints throughput."""
    return "-" if x is None else f"{x:.{digits}g}"


def _us(x: float | None) -> str:
    return "-" if x is None else str(int(round(x)))


def _level_name(r: LevelResult) -> str:
    return f"{r.level:g}"


def _latency_name(percentile: int) -> str:
    return "Average" if percentile == -1 else f"p{percentile}"


def perf_analyzer_summary(results: Sequence[LevelResult], percentile: int = DEFAULT_PERCENTILE) -> str:
    lines = [f"Inferences/Second vs. Client {_latency_name(percentile)} Batch Latency"]
    for r in results:
        head = "Concurrency" if r.mode == "concurrency" else "Request Rate"
        lines.append(f"{head}: {_level_name(r)}, throughput: {_num(r.throughput_infer_per_s)} infer/sec, "
                     f"latency {_us(r.latency_us(percentile))} usec")
    return "\n".join(lines)


def _errors_text(errors: Mapping[str, int]) -> str:
    return ",".join(f"{code}={n}" for code, n in sorted(errors.items())) or "0"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), *(fmt(r) for r in rows)]).rstrip()


def detail_table(results: Sequence[LevelResult], cpu_labels: Sequence[str],
                 percentile: int = DEFAULT_PERCENTILE) -> str:
    if not results:
        return ""
    open_loop = results[0].mode != "concurrency"
    phases = results[0].mode == "phase"
    extra = [percentile] if percentile not in (-1, 50, 95, 99) else []
    header = ["Phase"] if phases else []
    header += ["Concurrency" if not open_loop else "Request Rate"]
    header += ["offered/s", "served/s"] if open_loop else []
    header += ["infer/s", "p50 us", "p95 us", "p99 us", *(f"p{p} us" for p in extra), "mean us", "count", "errors"]
    header += ["late"] if open_loop else []
    header += [f"cpu us/req {label}" for label in cpu_labels]
    rows = []
    for i, r in enumerate(results, 1):
        row = [str(i)] if phases else []
        row += [_level_name(r)]
        row += [_num(r.offered_per_s, 4), _num(r.served_per_s, 4)] if open_loop else []
        row += [_num(r.throughput_infer_per_s), _us(r.p50_us), _us(r.p95_us), _us(r.p99_us),
                *(_us(r.latency_us(p)) for p in extra), _us(r.mean_us), str(r.count), _errors_text(r.errors)]
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


def print_report(all_results: Sequence[EndpointResults], cpu_labels: Sequence[str], out: TextIO,
                 percentile: int = DEFAULT_PERCENTILE) -> None:
    several = len(all_results) > 1
    for er in all_results:
        if several:
            print(f"=== {er.endpoint.label} ({er.endpoint.url}) ===", file=out)
        print(perf_analyzer_summary(er.levels, percentile), file=out)
        print(file=out)
        print(detail_table(er.levels, cpu_labels, percentile), file=out)
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
        raise BenchFailure(f"--csv {path}: {e}") from None


# perf_analyzer's latency report (-f): the columns between the level and the latency percentiles.
LATENCY_REPORT_COLUMNS = (
    "Inferences/Second", "Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
    "Server Compute Infer", "Server Compute Output", "Client Recv",
)


def report_percentiles(percentile: int) -> list[int]:
    """perf_analyzer's pN columns: 50, 90, 95, 99 and --percentile's, in increasing order, once each."""
    return sorted({*DEFAULT_PERCENTILES, percentile} - {-1})


def latency_report_header(mode: str, percentile: int = DEFAULT_PERCENTILE) -> list[str]:
    first = "Concurrency" if mode == "concurrency" else "Request Rate"
    return [first, *LATENCY_REPORT_COLUMNS, *(f"p{p} latency" for p in report_percentiles(percentile))]


def _whole_us(x: float | None) -> str:
    """perf_analyzer's nanoseconds / 1000 in integer arithmetic: truncated; 0 when there is no figure."""
    return "0" if x is None else str(int(x))


def latency_report_rows(results: Sequence[LevelResult], percentile: int = DEFAULT_PERCENTILE) -> list[list[str]]:
    rows = []
    # perf_analyzer sorts its rows by increasing infer/sec (not by level).
    for r in sorted(results, key=lambda r: r.throughput_infer_per_s):
        level = str(int(r.level)) if r.mode == "concurrency" else _num(r.level)
        not_measured = ["0"] * 4  # Server Queue, Compute Input, Compute Infer, Compute Output
        rows.append([level, _num(r.throughput_infer_per_s), "0", _whole_us(r.mean_us), *not_measured, "0",
                     *(_whole_us(r.latency_us(p)) for p in report_percentiles(percentile))])
    return rows


def _compare_report_path(path: str, label: str) -> Path:
    p = Path(path)
    return p.with_name(f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}.{p.name}")


def write_latency_report(path: str, results: Sequence[LevelResult], percentile: int = DEFAULT_PERCENTILE) -> None:
    mode = results[0].mode if results else "concurrency"
    lines = [latency_report_header(mode, percentile), *latency_report_rows(results, percentile)]
    try:
        with open(path, "w") as f:
            f.writelines(",".join(cells) + "\n" for cells in lines)
    except OSError as e:
        raise BenchFailure(f"-f {path}: {e}") from None


def _progress(label: str, k: int, windows: int, r: LevelResult) -> None:
    """One line per window on stderr: stdout stays the report."""
    head = "concurrency" if r.mode == "concurrency" else "rate"
    print(f"[{label}] {head} {_level_name(r)} window {k + 1}/{windows}: "
          f"{_num(r.throughput_infer_per_s, 4)} infer/s, p95 {_us(r.p95_us)} us, errors {r.error_count}",
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- running


async def measure(s: Settings) -> list[EndpointResults]:
    eps = s.endpoints
    percentiles = [s.percentile] if s.percentile > 0 else []
    inputs = await benchlib.prepare_inputs(eps[0].url, s.model, shapes=s.shapes, batch_size=s.batch_size,
                                           data=s.data, seed=s.seed, fill=s.fill, timeout_s=min(s.timeout_s, 10))
    for ep in eps[1:]:  # the same model must answer there too, before any load runs
        await benchlib.fetch_model(ep.url, s.model, timeout_s=min(s.timeout_s, 10))

    if s.phases:
        all_results = []
        for ep in eps:
            print(f"[{ep.label}] {len(s.phases)} phases, {sum(sec for _, sec in s.phases):g} s",
                  file=sys.stderr, flush=True)
            levels = await benchlib.measure_rate_schedule(
                ep.url, s.model, s.phases, inputs, transition_s=s.transition_s, timeout_s=s.timeout_s,
                cpu_pids=s.cpu_pids, transport=s.transport, connections=s.connections, percentiles=percentiles)
            all_results.append(EndpointResults(ep, levels))
        return all_results
    per_ep: list[list[LevelResult]] = [[] for _ in eps]
    for load in s.loads:
        medians = await benchlib.measure_alternating(
            [ep.url for ep in eps], s.model, load, inputs, window_s=s.window_s, windows=s.windows,
            warmup_s=s.warmup_s, timeout_s=s.timeout_s, cpu_pids=s.cpu_pids, transport=s.transport,
            on_window=lambda k, i, r: _progress(eps[i].label, k, s.windows, r), percentiles=percentiles)
        for i, m in enumerate(medians):
            per_ep[i].append(m)
    return [EndpointResults(ep, levels) for ep, levels in zip(eps, per_ep)]


def failed_levels(all_results: Sequence[EndpointResults]) -> list[str]:
    """Levels where requests were sent and none succeeded: nothing was measured there."""
    return [f"{er.endpoint.label} {r.mode.replace('_', ' ')} {_level_name(r)}: {_errors_text(r.errors)}"
            for er in all_results for r in er.levels if r.count == 0 and r.error_count > 0]


async def _bench(s: Settings) -> int:
    all_results = await measure(s)
    cpu_labels = list(s.cpu_pids)
    print_report(all_results, cpu_labels, sys.stdout, s.percentile)
    if s.csv:
        write_csv(s.csv, all_results, cpu_labels)
    if s.latency_report:
        write_latency_report(s.latency_report, all_results[0].levels, s.percentile)
        for er in all_results[1:]:
            write_latency_report(str(_compare_report_path(s.latency_report, er.endpoint.label)), er.levels,
                                 s.percentile)
    failed = failed_levels(all_results)
    if failed:
        print("tritonpilot bench: error: every request failed at " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_bench(settings(args)))
    except BenchError as e:
        print(f"tritonpilot bench: error: {e}", file=sys.stderr)
        return e.exit_code
