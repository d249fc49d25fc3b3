"""tritonpilot bench: the pure accounting, then the engine and the CLI against a real Triton.

No timing assertions beyond physical bounds: the machine is 2 shared cores.
Windows are short so the file stays well under a minute.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tritonpilot import cli
from tritonpilot.ports import free_port
from tritonpilot.tools import bench, benchlib
from tritonpilot.tools.benchlib import BenchError, ConcurrencyLoad, LevelResult, RateLoad

MS = 1_000_000  # ns

# --------------------------------------------------------------------------- pure: accounting


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert benchlib.percentile(values, 50) == 50
    assert benchlib.percentile(values, 95) == 95
    assert benchlib.percentile(values, 99) == 99
    assert benchlib.percentile([7.0], 99) == 7
    assert benchlib.percentile([], 50) is None


def test_window_counts_requests_by_completion_and_errors_by_code() -> None:
    records = [
        # (scheduled, sent, done, code)
        (0, 0, 5 * MS, None),  # done before the window: not counted
        (8 * MS, 8 * MS, 12 * MS, None),  # sent before, done inside: counted, latency 4 ms
        (12 * MS, 12 * MS, 14 * MS, None),
        (14 * MS, 14 * MS, 15 * MS, "UNAVAILABLE"),
        (15 * MS, 15 * MS, 16 * MS, "UNAVAILABLE"),
        (16 * MS, 16 * MS, 17 * MS, "DEADLINE_EXCEEDED"),
        (18 * MS, 18 * MS, 25 * MS, None),  # done after the window: not counted
    ]
    r = benchlib.summarize_window(records, 10 * MS, 20 * MS, mode="concurrency", level=2, batch_size=4)
    assert r.count == 2
    assert r.errors == {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}
    assert r.error_count == 3
    assert r.served_per_s == pytest.approx(200)  # 2 in 10 ms
    assert r.throughput_infer_per_s == pytest.approx(800)  # x batch 4
    assert r.offered_per_s == pytest.approx(500)  # 5 sent inside the window
    assert (r.p50_us, r.p99_us) == (2000, 4000)
    assert r.mean_us == pytest.approx(3000)


def test_window_without_success_has_no_latency_rather_than_zero() -> None:
    r = benchlib.summarize_window([(0, 0, 1 * MS, "UNAVAILABLE")], 0, 10 * MS, mode="concurrency", level=1)
    assert r.count == 0 and r.p95_us is None and r.mean_us is None
    assert r.errors == {"UNAVAILABLE": 1}


def test_late_sends_are_counted_against_the_schedule() -> None:
    records = [(0, 0, 1 * MS, None), (10 * MS, 10 * MS + MS // 2, 12 * MS, None), (20 * MS, 25 * MS, 27 * MS, None)]
    r = benchlib.summarize_window(records, 0, 30 * MS, mode="request_rate", level=100,
                                  scheduled_in_window=3, late_tol_ns=1 * MS)
    assert r.late == 1
    assert r.offered_per_s == pytest.approx(100)


def test_cpu_per_request_from_process_seconds() -> None:
    records = [(i * MS, i * MS, i * MS + 1, None) for i in range(10)]
    r = benchlib.summarize_window(records, 0, 10 * MS, mode="concurrency", level=1,
                                  cpu_before={"triton": 1.0, "gone": 1.0}, cpu_after={"triton": 1.01, "gone": None})
    assert r.cpu_us_per_request["triton"] == pytest.approx(1000)  # 10 ms over 10 requests
    assert r.cpu_us_per_request["gone"] is None  # no data, never a guess


def _result(throughput: float, p95: float, errors: dict[str, int], count: int = 10, level: float = 1,
            mode: benchlib.Mode = "concurrency") -> LevelResult:
    return LevelResult(mode=mode, level=level, window_s=1, windows=1, batch_size=1, count=count,
                       errors=errors, offered_per_s=throughput, served_per_s=throughput,
                       throughput_infer_per_s=throughput, p50_us=p95 / 2, p95_us=p95, p99_us=p95, mean_us=p95 / 2,
                       cpu_s={"t": 0.1}, cpu_us_per_request={"t": 100.0},
                       percentiles_us={50: p95 / 2, 85: p95 * 0.85, 90: p95 * 0.9, 95: p95, 99: p95})


def test_windows_combine_to_medians_and_totals() -> None:
    combined = benchlib.combine_windows([_result(10, 300, {}), _result(30, 100, {"UNAVAILABLE": 1}),
                                         _result(20, 200, {"UNAVAILABLE": 2})])
    assert combined.throughput_infer_per_s == 20 and combined.p95_us == 200  # medians
    assert combined.count == 30 and combined.errors == {"UNAVAILABLE": 3} and combined.windows == 3  # totals
    assert combined.cpu_s["t"] == pytest.approx(0.3)
    assert combined.percentiles_us[90] == 180 and combined.latency_us(90) == 180


def test_window_reports_perf_analyzers_percentiles_and_any_asked_for() -> None:
    records = [(i * MS, i * MS, i * MS + (i + 1) * 1000, None) for i in range(100)]  # latencies 1..100 us
    r = benchlib.summarize_window(records, 0, 200 * MS, mode="concurrency", level=1, percentiles=[85])
    assert r.percentiles_us == {50: 50, 85: 85, 90: 90, 95: 95, 99: 99}
    assert r.latency_us(85) == 85 and r.latency_us(-1) == pytest.approx(50.5)  # -1: the mean

@pytest.mark.parametrize(
    ("phases", "a_s", "b_s"),
    [
        (((10.0, math.inf),), 0.0, 1.0),
        (((10.0, math.inf),), 0.35, 2.05),
        (((7.0, 1.0), (33.0, 2.0), (0.0, 1.0)), 0.0, 4.0),
        (((7.0, 1.0), (33.0, 2.0), (5.0, 1.0)), 0.5, 3.3),
        (((3.0, 0.5), (0.0, 0.5), (3.0, 1.0)), 0.2, 1.9),
    ],
)
def test_scheduled_count_matches_the_send_times(phases: tuple, a_s: float, b_s: float) -> None:
    load = RateLoad(phases)
    start = 1_000 * MS
    a, b = start + int(a_s * 1e9), start + int(b_s * 1e9)
    times = []
    for t in load.send_times_ns(start):
        if t >= start + 5 * 10**9:
            break
        times.append(t)
    assert load.scheduled_between(start, a, b) == sum(a <= t < b for t in times)


def test_send_times_are_evenly_spaced_and_restart_at_phase_boundaries() -> None:
    times = list(RateLoad(((4.0, 1.0), (2.0, 1.0), (0.0, 1.0))).send_times_ns(0))
    assert times == [0, 250 * MS, 500 * MS, 750 * MS, 1000 * MS, 1500 * MS]


# --------------------------------------------------------------------------- pure: inputs and options

SLEEP_META = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1"]}]}
BATCH_META = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "4"]},
                         {"name": "TEXT", "datatype": "BYTES", "shape": ["-1", "-1"]}]}


def test_inputs_replace_variable_dims_with_shape_option_or_one() -> None:
    (t,) = benchlib.inputs_from_metadata(SLEEP_META, {"max_batch_size": 0}).tensors
    assert (t.shape, t.data.dtype) == ((1,), np.float32)
    (t,) = benchlib.inputs_from_metadata(SLEEP_META, {}, shapes={"INPUT0": (16,)}).tensors
    assert t.shape == (16,)


def test_inputs_add_the_batch_dim_for_batching_models() -> None:
    prepared = benchlib.inputs_from_metadata(BATCH_META, {"max_batch_size": 8}, batch_size=3,
                                             shapes={"TEXT": (2,)})
    fp, text = prepared.tensors
    assert prepared.batch_size == 3
    assert fp.shape == (3, 4) and text.shape == (3, 2)
    assert text.data.dtype == np.object_ and isinstance(text.data.flat[0], bytes)
    assert len(prepared.request_bytes("batching")) > 0


def test_inputs_from_given_data_take_its_shape_and_tile_one_sample() -> None:
    (t,) = benchlib.inputs_from_metadata(SLEEP_META, {}, data={"INPUT0": [1, 2, 3]}).tensors
    assert t.shape == (3,) and t.data.tolist() == [1, 2, 3]
    prepared = benchlib.inputs_from_metadata({"inputs": BATCH_META["inputs"][:1]}, {"max_batch_size": 8},
                                             batch_size=2, data={"INPUT0": [1, 2, 3, 4]})
    assert prepared.tensors[0].data.tolist() == [[1, 2, 3, 4], [1, 2, 3, 4]]


@pytest.mark.parametrize(
    ("kwargs", "config", "message"),
    [
        ({"batch_size": 2}, {"max_batch_size": 0}, "does not batch"),
        ({"batch_size": 9}, {"max_batch_size": 8}, "max_batch_size 8"),
        ({"shapes": {"NOPE": (1,)}}, {}, "model's inputs are ['INPUT0']"),
        ({"shapes": {"INPUT0": (1, 2)}}, {}, "does not fit"),
        ({"data": {"INPUT0": [[1, 2], [3]]}}, {}, "INPUT0"),
    ],
)
def test_input_errors_name_the_option_and_what_is_allowed(kwargs: dict, config: dict, message: str) -> None:
    with pytest.raises(BenchError, match=re.escape(message)):
        benchlib.inputs_from_metadata(SLEEP_META, config, **kwargs)


def test_inputs_of_zeros_with_input_data_zero() -> None:
    fp, text = benchlib.inputs_from_metadata(BATCH_META, {"max_batch_size": 8}, batch_size=2, fill="zero").tensors
    assert fp.data.tolist() == [[0.0] * 4] * 2
    assert text.data.tolist() == [[b"0"], [b"0"]]


def test_ranges_include_their_end() -> None:
    assert bench.parse_range("1:4", "--concurrency-range", integer=True) == [1, 2, 3, 4]
    assert bench.parse_range("2:8:3", "--concurrency-range", integer=True) == [2, 5, 8]
    assert bench.parse_range("5", "--request-rate-range", integer=False) == [5]
    assert bench.parse_range("0.5:1.5:0.5", "--request-rate-range", integer=False) == [0.5, 1.0, 1.5]
    for bad in ("0:2", "3:1", "1:2:0", "a:b", "1.5:2", "1:0"):
        with pytest.raises(BenchError, match="--concurrency-range"):
            bench.parse_range(bad, "--concurrency-range", integer=True)


def test_rate_schedule_and_cpu_pid_options() -> None:
    assert benchlib.parse_rate_schedule("5:60,35:60,5:60") == ((5, 60), (35, 60), (5, 60))
    with pytest.raises(BenchError, match="RATE:SECONDS"):
        benchlib.parse_rate_schedule("5:60,35")
    assert bench.parse_cpu_pids([f"me={os.getpid()}", "bench=self"]) == {"me": os.getpid(), "bench": os.getpid()}
    with pytest.raises(BenchError, match="LABEL=PID"):
        bench.parse_cpu_pids(["1234"])


def test_read_cpu_of_this_process() -> None:
    assert benchlib.read_cpu_s(os.getpid()) > 0
    assert benchlib.read_cpu_s(2**22 + 7) is None


def test_summary_lines_are_perf_analyzers() -> None:
    text = bench.perf_analyzer_summary([_result(45.6667, 22381.4, {})])
    assert text.splitlines() == ["Inferences/Second vs. Client p95 Batch Latency",
                                 "Concurrency: 1, throughput: 45.6667 infer/sec, latency 22381 usec"]
    # --percentile N reports pN; -1 the average, perf_analyzer's own default.
    assert bench.perf_analyzer_summary([_result(10, 2000, {})], 85).splitlines() == [
        "Inferences/Second vs. Client p85 Batch Latency", "Concurrency: 1, throughput: 10 infer/sec, latency 1700 usec"]
    assert bench.perf_analyzer_summary([_result(10, 2000, {})], -1).splitlines()[0] == (
        "Inferences/Second vs. Client Average Batch Latency")


# perf_analyzer's -f CSV, read from perf_analyzer 2.40.0's own output (the tritonclient 2.40.0 wheel's binary)
# against tritonserver 2.51: `perf_analyzer -m fast -u HOST:PORT -i grpc --concurrency-range 1:2 -f FILE`,
# the same with --request-rate-range 100:200:100, and with --percentile=85.
PA_HEADER = "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency"  # noqa: E501
PA_RATE_HEADER = "Request Rate,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency"  # noqa: E501
PA_P85_HEADER = "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p85 latency,p90 latency,p95 latency,p99 latency"  # noqa: E501


def test_latency_report_header_is_perf_analyzers() -> None:
    assert ",".join(bench.latency_report_header("concurrency")) == PA_HEADER
    assert ",".join(bench.latency_report_header("concurrency", -1)) == PA_HEADER
    assert ",".join(bench.latency_report_header("request_rate")) == PA_RATE_HEADER
    assert ",".join(bench.latency_report_header("phase")) == PA_RATE_HEADER
    assert ",".join(bench.latency_report_header("concurrency", 85)) == PA_P85_HEADER


def test_latency_report_rows_sorted_by_throughput_with_unmeasured_columns_0(tmp_path: Path) -> None:
    path = tmp_path / "pa.csv"
    results = [_result(1778.8, 2367.9, {}, level=2), _result(2221.13, 681.2, {}, level=1),
               _result(0, 0, {"UNAVAILABLE": 3}, count=0, level=3)]
    results[2] = LevelResult(**{**results[2].__dict__, "p50_us": None, "p95_us": None, "p99_us": None,
                                "mean_us": None, "percentiles_us": {p: None for p in (50, 90, 95, 99)}})
    bench.write_latency_report(str(path), results)
    assert path.read_text().splitlines() == [
        PA_HEADER,
        "3,0,0,0,0,0,0,0,0,0,0,0,0",  # nothing succeeded: no latency to report
        "2,1778.8,0,1183,0,0,0,0,0,1183,2131,2367,2367",
        "1,2221.13,0,340,0,0,0,0,0,340,613,681,681",
    ]
    bench.write_latency_report(str(path), [_result(99.6222, 1000, {}, level=100, mode="request_rate"),
                                           _result(0.5, 1000, {}, level=0.5, mode="request_rate")])
    assert path.read_text().splitlines()[1:] == ["0.5,0.5,0,500,0,0,0,0,0,500,900,1000,1000",
                                                 "100,99.6222,0,500,0,0,0,0,0,500,900,1000,1000"]


# --------------------------------------------------------------------------- options: perf_analyzer's spellings


def parse(*argv: str) -> bench.Settings:
    return bench.settings(cli.build_parser("bench").parse_args(["bench", *argv]))


def test_perf_analyzer_spellings_give_the_same_settings(tmp_path: Path) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"INPUT0": [1.0, 2.0]}]}))
    report = str(tmp_path / "pa.csv")
    short = parse("-m", "fast", "-u", "10.0.0.1:8001", "-i", "grpc", "--concurrency-range", "1:4:2", "-p", "1000",
                  "--percentile", "85", "-b", "1", "--shape", "INPUT0:2", "--input-data", str(data), "-f", report)
    attached = parse("-mfast", "-u10.0.0.1:8001", "-igrpc", "--concurrency-range=1:4:2", "-p1000",
                     "--percentile=85", "-b1", "--shape=INPUT0:2", f"--input-data={data}", f"-f{report}")
    long = parse("--model", "fast", "--triton", "10.0.0.1:8001", "--protocol", "GRPC", "--concurrency-range", "1:4:2",
                 "--measurement-interval", "1000", "--percentile", "85", "--batch-size", "1", "--shape", "INPUT0:2",
                 "--input-data", str(data), "--latency-report-file", report)
    older = parse("--model", "fast", "--url", "grpc://10.0.0.1:8001", "--concurrency-range", "1:4:2",
                  "--measurement-interval-ms", "1000", "--percentile", "85", "--batch-size", "1", "--shape",
                  "INPUT0:2", "--input-data", str(data), "--latency-report-file", report)
    assert short == attached == long == older
    assert short.endpoints == (bench.Endpoint("10.0.0.1:8001", "10.0.0.1:8001"),)
    assert short.model == "fast" and short.window_s == 1.0 and short.percentile == 85
    assert short.loads == (ConcurrencyLoad(1), ConcurrencyLoad(3))
    assert short.shapes == {"INPUT0": (2,)} and short.data == {"INPUT0": [1.0, 2.0]}
    assert short.latency_report == report

    rate = parse("-m", "fast", "--request-rate-range", "10:20:10", "--request-distribution", "constant")
    assert rate.loads == (RateLoad(((10, math.inf),), 4), RateLoad(((20, math.inf),), 4))
    defaults = parse("-m", "fast")
    assert defaults.endpoints[0].url == "localhost:8001"  # perf_analyzer's gRPC default
    assert (defaults.loads, defaults.window_s, defaults.percentile, defaults.fill) == (
        (ConcurrencyLoad(1),), 5.0, 95, "random")
    assert parse("-m", "fast", "--input-data", "zero").fill == "zero"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-m", "fast", "-i", "http"], "HTTP is not supported by bench yet"),
        (["-m", "fast", "--protocol", "HTTP"], "HTTP is not supported by bench yet"),
        (["-m", "fast", "-u", "http://localhost:8000"], "HTTP is not supported by bench yet"),
        (["-m", "fast", "-i", "udp"], "expected grpc"),
        (["-m", "fast", "-u", "localhost"], "expected Triton's gRPC endpoint as HOST:PORT"),
        (["-m", "fast", "--triton", "localhost:99999"], "HOST:PORT"),
        (["-u", "localhost:8001"], "-m"),
        (["-m", "fast", "--concurrency-range", "0:2"], "needs 0 < START <= END"),
        (["-m", "fast", "--concurrency-range", "1:0"], "END 0"),
        (["-m", "fast", "--concurrency-range", "1.5"], "whole numbers only"),
        (["-m", "fast", "--request-rate-range", "fast"], "expected START:END[:STEP]"),
        (["-m", "fast", "--concurrency-range", "1", "--request-rate-range", "1"], "not allowed with"),
        (["-m", "fast", "--request-distribution", "poisson"], "poisson is not supported by bench yet"),
        (["-m", "fast", "-p", "0"], "must be > 0"),
        (["-m", "fast", "--measurement-interval", "1.5"], "expected a whole number"),
        (["-m", "fast", "--percentile", "100"], "1..99, or -1"),
        (["-m", "fast", "--percentile", "p95"], "1..99, or -1"),
        (["-m", "fast", "-b", "0"], "must be > 0"),
        (["-m", "fast", "--rate-schedule", "5:60,35"], "RATE:SECONDS"),
    ],
)
def test_bad_values_exit_2_with_a_message(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--label", "a", "--label", "b"], "--label given 2 times for 1 endpoint(s)"),
        (["-f", "/no/such/dir/pa.csv"], "no directory '/no/such/dir'"),
        (["--csv", "/no/such/dir/bench.csv"], "no directory"),
        (["--input-data", "/no/such/file.json"], "--input-data /no/such/file.json"),
        (["--rate-schedule", "5:1,10:1", "--transition-s", "1"], "leaves nothing of a 1 s phase"),
        (["--shape", "INPUT0"], "expected NAME:d1,d2"),
    ],
)
def test_option_conflicts_exit_2_before_connecting(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                   message: str) -> None:
    # Nothing listens there: 2 (not 1, unreachable) shows the options were refused before any connection.
    code, _, err = run_cli(capsys, "-m", "fast", "-u", f"127.0.0.1:{free_port()}", *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


# --------------------------------------------------------------------------- real Triton

PA_LINE = re.compile(r"^(Concurrency|Request Rate): ([\d.]+), throughput: ([\d.]+) infer/sec, latency (\d+) usec$",
                     re.M)
FAST = ["--measurement-interval-ms", "1000", "--warmup-s", "0.3"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.triton
def test_concurrency_levels_on_the_sleep_model_with_csv(triton, capsys, tmp_path) -> None:
    path = tmp_path / "bench.csv"
    code, out, err = run_cli(capsys, "--url", triton.grpc_url, "--model", "sleep", "--concurrency-range", "1:2",
                             "--csv", str(path), "--cpu-pid", f"triton={triton.pid}", *FAST)
    assert code == 0, err
    assert "Inferences/Second vs. Client p95 Batch Latency" in out
    levels = {int(float(m[1])): (float(m[2]), int(m[3])) for m in PA_LINE.findall(out)}
    assert set(levels) == {1, 2}
    # One instance sleeping 20 ms: at most 50/s whatever the concurrency; generous lower bounds.
    throughput_1, p95_1 = levels[1]
    assert 10 <= throughput_1 <= 60
    assert p95_1 >= 20_000
    assert 10 <= levels[2][0] <= 60

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.CSV_FIELDS + ["cpu_us_per_request_triton"]
    assert [r["level"] for r in rows] == ["1", "2"]
    assert all(r["errors"] == "0" and r["mode"] == "concurrency" for r in rows)
    assert float(rows[0]["throughput_infer_per_s"]) == pytest.approx(throughput_1, rel=1e-3)
    assert float(rows[0]["cpu_us_per_request_triton"]) > 0


@pytest.mark.triton
def test_perf_analyzer_command_line_writes_its_latency_report(triton, capsys, tmp_path) -> None:
    path = tmp_path / "pa.csv"
    code, out, err = run_cli(capsys, "-m", "fast", "-u", triton.grpc_url, "-i", "grpc", "--concurrency-range", "1:2",
                             "--measurement-interval", "1000", "-f", str(path))
    assert code == 0, err
    assert "Inferences/Second vs. Client p95 Batch Latency" in out
    lines = path.read_text().splitlines()
    assert lines[0] == PA_HEADER
    rows = list(csv.DictReader(lines))
    assert len(rows) == 2
    assert sorted(r["Concurrency"] for r in rows) == ["1", "2"]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    assert all(int(r["p50 latency"]) > 0 and int(r["Network+Server Send/Recv"]) > 0 for r in rows)
    assert all(r["Server Queue"] == r["Client Send"] == "0" for r in rows)  # not measured by bench
    throughputs = [float(r["Inferences/Second"]) for r in rows]
    assert throughputs == sorted(throughputs)  # perf_analyzer's order


@pytest.mark.triton
def test_request_rate_serves_a_low_offered_rate(triton) -> None:
    async def go() -> LevelResult:
        inputs = await benchlib.prepare_inputs(triton.grpc_url, "sleep")
        return await benchlib.measure_request_rate(triton.grpc_url, "sleep", 10, 2.0, inputs, warmup_s=0.3)

    r = asyncio.run(go())
    assert r.mode == "request_rate" and r.level == 10
    assert r.offered_per_s == pytest.approx(10, abs=0.5)  # counted from the schedule
    assert 7 <= r.served_per_s <= 13
    assert r.error_count == 0
    assert r.p50_us is not None and r.p50_us >= 20_000


@pytest.mark.triton
def test_rate_schedule_reports_each_phase(triton, capsys) -> None:
    code, out, err = run_cli(capsys, "--url", triton.grpc_url, "--model", "sleep",
                             "--rate-schedule", "5:1.5,20:1.5", "--transition-s", "0.5")
    assert code == 0, err
    assert [(m[0], m[1]) for m in PA_LINE.findall(out)] == [("Request Rate", "5"), ("Request Rate", "20")]
    phase_rows = [line.split() for line in out.splitlines() if re.match(r"^[12]\s+\d", line)]
    assert [row[1] for row in phase_rows] == ["5", "20"]
    offered = [float(row[2]) for row in phase_rows]
    assert offered == [pytest.approx(5, abs=1), pytest.approx(20, abs=1)]


@pytest.mark.triton
def test_compare_prints_both_endpoints_and_ratios(triton, capsys, tmp_path) -> None:
    report = tmp_path / "pa.csv"
    code, out, err = run_cli(capsys, "--triton", triton.grpc_url, "--compare", triton.grpc_url, "-m", "fast",
                             "--concurrency-range", "1", "--windows", "2", "-p", "500",
                             "--warmup-s", "0.2", "--label", "A", "--label", "B", "-f", str(report),
                             "--cpu-pid", f"triton={triton.pid}", "--cpu-pid", "bench=self")
    assert code == 0, err
    # -f: the first endpoint in FILE, the compared one in LABEL.FILE beside it.
    for path in (report, tmp_path / "B.pa.csv"):
        lines = path.read_text().splitlines()
        assert lines[0] == PA_HEADER and len(lines) == 2 and lines[1].startswith("1,")
    assert f"=== A ({triton.grpc_url}) ===" in out and f"=== B ({triton.grpc_url}) ===" in out
    assert out.count("Inferences/Second vs. Client p95 Batch Latency") == 2
    assert "=== B vs A (median of windows) ===" in out
    ratios = out.split("=== B vs A")[1].splitlines()
    assert ratios[1].split()[:2] == ["Concurrency", "throughput"]
    level, throughput_ratio, p50_delta, p95_ratio, _ = ratios[2].split()
    assert level == "1"
    assert 0.2 < float(throughput_ratio) < 5  # the same server twice: the same order of magnitude
    assert "cpu us/req triton" in out and "cpu us/req bench" in out
    # Alternation: A, B, A, B, as the progress lines on stderr show.
    assert re.findall(r"^\[(\w)\]", err, re.M) == ["A", "B", "A", "B"]


@pytest.mark.triton
def test_failures_are_counted_by_grpc_code(triton) -> None:
    async def go() -> LevelResult:
        inputs = await benchlib.prepare_inputs(triton.grpc_url, "sleep")
        # 5 ms deadline on a 20 ms model: every request times out on the client.
        return await benchlib.measure_concurrency(triton.grpc_url, "sleep", 1, 0.5, inputs, warmup_s=0.1,
                                                  timeout_s=0.005)

    r = asyncio.run(go())
    assert r.count == 0 and r.p95_us is None
    assert set(r.errors) == {"DEADLINE_EXCEEDED"} and r.error_count > 0


@pytest.mark.triton
@pytest.mark.parametrize("transport", ["raw", "tritonclient"])
def test_bytes_and_batching_models_on_both_transports(triton, transport) -> None:
    async def go(model: str, **kwargs) -> LevelResult:
        inputs = await benchlib.prepare_inputs(triton.grpc_url, model, **kwargs)
        return await benchlib.measure_concurrency(triton.grpc_url, model, 2, 0.4, inputs, warmup_s=0.1,
                                                  transport=transport)

    text = asyncio.run(go("identity_bytes", shapes={"INPUT0": (3,)}))
    assert text.count > 0 and text.error_count == 0
    batched = asyncio.run(go("batching", batch_size=4))
    assert batched.count > 0 and batched.error_count == 0
    assert batched.throughput_infer_per_s == pytest.approx(4 * batched.served_per_s)


@pytest.mark.triton
def test_unknown_model_exits_1_with_a_message(triton, capsys) -> None:
    code, out, err = run_cli(capsys, "-u", triton.grpc_url, "-m", "no_such_model")
    assert code == 1
    assert "no_such_model" in err and "NOT_FOUND" in err and "Traceback" not in err


@pytest.mark.triton
def test_an_option_the_model_refuses_exits_2(triton, capsys) -> None:
    code, out, err = run_cli(capsys, "-u", triton.grpc_url, "-m", "fast", "-b", "2")
    assert code == 2
    assert "--batch-size 2: the model does not batch" in err


@pytest.mark.triton
def test_a_level_where_every_request_failed_exits_1(triton, capsys, tmp_path) -> None:
    # 5 ms deadline on a 20 ms model: every request times out; the report is still written.
    path = tmp_path / "pa.csv"
    code, out, err = run_cli(capsys, "-u", triton.grpc_url, "-m", "sleep", "--timeout-s", "0.005", "-p", "500",
                             "--warmup-s", "0.1", "-f", str(path))
    assert code == 1
    assert "every request failed at" in err and "DEADLINE_EXCEEDED" in err
    assert path.read_text().splitlines()[1] == "1,0,0,0,0,0,0,0,0,0,0,0,0"


def test_unreachable_url_exits_1_with_a_message(capsys) -> None:
    url = f"127.0.0.1:{free_port()}"
    code, out, err = run_cli(capsys, "--url", url, "--model", "sleep")
    assert code == 1
    assert f"cannot reach Triton at {url}" in err and "Traceback" not in err
