"""`tritonpilot tune`: the plan, the recommendation (pure, tables), then real runs.

The real runs share one private Triton for the module serving `lin`, a scripted
Linear(4->3) written with the TorchScript runner. Its config.pbtxt sets
INFERENCE_MODE "false" (a flag the profiles manage, so the restore has something
to undo) and INTRA_OP_THREAD_COUNT "1" (one they don't, so it must survive every
reload). Every test that tunes checks Triton's own ModelConfig afterwards: the
original config is back. No timing assertions: 2 shared cores.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tritonpilot import cli
from tritonpilot.control.policy import parse_policy, resolve
from tritonpilot.ports import free_port
from tritonpilot.tools import tune as tn
from tritonpilot.tools.benchlib import LevelResult

MODEL = "lin"
ORIGINAL_PARAMETERS = {"INFERENCE_MODE": "false", "INTRA_OP_THREAD_COUNT": "1"}
SHORT = ["--measurement-interval-ms", "400", "--warmup-s", "0.3"]


# ------------------------------------------------------------------ pure: plan and options


def labels(combos: list[tn.Combination]) -> list[str]:
    return [c.label for c in combos]


def test_field_report_plan_runs_multi_instance_only_past_one_instance() -> None:
    assert labels(tn.plan(tn.FIELD_REPORT_PROFILES, [1, 2])) == [
        "defaults x1", "defaults x2", "inference-mode x1", "inference-mode x2",
        "all-flags x1", "all-flags x2", "multi-instance x2",
    ]
    assert [p.name for p in tn.skipped_profiles(tn.FIELD_REPORT_PROFILES, [1])] == ["multi-instance"]
    assert "multi-instance x1" not in labels(tn.plan(tn.FIELD_REPORT_PROFILES, [1]))


def test_field_report_profiles_are_the_reports_configurations() -> None:
    by_name = {p.name: dict(p.parameters) for p in tn.FIELD_REPORT_PROFILES}
    assert by_name["defaults"] == {}
    assert by_name["inference-mode"] == {"INFERENCE_MODE": "true"}
    assert by_name["all-flags"] == {
        "INFERENCE_MODE": "true", "ENABLE_JIT_EXECUTOR": "true", "ENABLE_JIT_PROFILING": "true",
        "ENABLE_TENSOR_FUSER": "true", "ENABLE_NVFUSER": "true", "DISABLE_OPTIMIZED_EXECUTION": "false",
    }
    assert by_name["multi-instance"] == {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "true"}
    errors, warnings = tn.flag_problems(tn.FIELD_REPORT_PROFILES)
    assert errors == []
    assert any("ENABLE_NVFUSER" in w for w in warnings)


@pytest.mark.parametrize(("text", "counts"), [("1,2,4", [1, 2, 4]), ("4, 1", [1, 4]), ("3", [3])])
def test_instances_parse(text: str, counts: list[int]) -> None:
    assert tn.parse_instances(text) == counts


@pytest.mark.parametrize("text", ["", "0,1", "1,x", "-1", "1,1", "1.5"])
def test_bad_instances_are_refused(text: str) -> None:
    with pytest.raises(tn.TuneError, match="--instances"):
        tn.parse_instances(text)


def test_profiles_file_problems_are_all_named() -> None:
    data = [
        {"name": "a", "parameters": {"INFERENCE_MODE": True}},  # unquoted YAML boolean
        {"name": "a", "parameters": {}, "instances": [1, 2]},  # repeated name, unknown key
        {"name": "b c", "parameters": {"INTRA_OP_THREAD_COUNT": 2}, "min_instances": 0},
    ]
    with pytest.raises(tn.TuneError) as raised:
        tn.parse_profiles(data, "p.yaml")
    text = str(raised.value)
    for expected in ["p.yaml: [0].parameters.INFERENCE_MODE: got True; must be a quoted string",
                     "p.yaml: [1].instances: unknown key", "p.yaml: [2].name: got 'b c'",
                     "p.yaml: [2].min_instances: got 0", "repeated: a"]:
        assert expected in text
    ok = tn.parse_profiles([{"name": "t", "parameters": {"INTRA_OP_THREAD_COUNT": 2}, "min_instances": 2}], "p")
    assert ok == (tn.TuneProfile("t", {"INTRA_OP_THREAD_COUNT": "2"}, 2),)


def test_flag_values_triton_would_refuse_are_errors_before_any_reload() -> None:
    profiles = [tn.TuneProfile("x", {"INFERENCE_MODE": "yes", "tritonpilot_generation": "3",
                                     "INTRA_OP_THREAD_COUNT": "four", "MY_KEY": "1"})]
    errors, warnings = tn.flag_problems(profiles)
    assert len(errors) == 3
    assert "INFERENCE_MODE='yes': Triton parses only true/on/1/false/off/0" in errors[0]
    assert "reserved" in errors[1] and "std::stoi" in errors[2]
    assert warnings == ["profile 'x': MY_KEY='1': not a PyTorch-backend flag; passed to the model as is"]


# ------------------------------------------------------------------ pure: the recommendation


def level(concurrency: int, throughput: float, p95_ms: float, errors: int = 0) -> LevelResult:
    return LevelResult(
        mode="concurrency", level=float(concurrency), window_s=1.0, windows=1, batch_size=1,
        count=int(throughput), errors={"UNAVAILABLE": errors} if errors else {}, offered_per_s=throughput,
        served_per_s=throughput, throughput_infer_per_s=throughput, p50_us=p95_ms * 800, p95_us=p95_ms * 1000,
        p99_us=p95_ms * 1100, mean_us=p95_ms * 850,
    )


PROFILES = {p.name: p for p in tn.FIELD_REPORT_PROFILES}


def result(profile: str, instances: int, *levels: LevelResult, status: str = "ok") -> tn.CombinationResult:
    return tn.CombinationResult(tn.Combination(PROFILES[profile], instances), status, tuple(levels))


# (concurrency 1, concurrency 4) per combination: throughput, p95 ms
FIELD = [
    result("defaults", 1, level(1, 80, 13), level(4, 82, 50)),
    result("inference-mode", 1, level(1, 90, 12), level(4, 92, 45)),
    result("defaults", 2, level(1, 85, 12), level(4, 150, 28)),
    result("multi-instance", 2, level(1, 88, 12), level(4, 170, 25)),
    result("inference-mode", 4, level(1, 88, 12), level(4, 175, 24)),  # +3 % over 2 instances
]


def test_best_profile_per_count_and_max_where_throughput_stops_improving() -> None:
    rec = tn.recommend(MODEL, FIELD, max_p95_us=None, min_gain_ratio=0.05, triton_url="127.0.0.1:8001")
    assert [(c.instances, c.profile.name, c.level.throughput_infer_per_s) for c in rec.per_count] == [
        (1, "inference-mode", 92), (2, "multi-instance", 170), (4, "inference-mode", 175)]
    assert (rec.min_instances, rec.max_instances) == (1, 2)
    assert "max_instances 2" in rec.reason and "4 instance(s) add no more than 5%" in rec.reason
    model = rec.policy["models"][MODEL]
    assert model["profiles"] == [
        {"name": "inference-mode", "instances": [1, 1], "parameters": {"INFERENCE_MODE": "true"}},
        {"name": "multi-instance", "instances": [2, None],
         "parameters": {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "true"}},
    ]
    resolved = resolve(parse_policy(rec.policy))[MODEL]
    assert [resolved.profile_for(n).name for n in (1, 2)] == ["inference-mode", "multi-instance"]


def test_a_smaller_gain_threshold_takes_the_larger_count() -> None:
    rec = tn.recommend(MODEL, FIELD, max_p95_us=None, min_gain_ratio=0.01)
    assert rec.max_instances == 4
    rules = rec.policy["models"][MODEL]["profiles"]
    # inference-mode comes back at 4 after multi-instance at 2: names must stay unique.
    assert [(r["name"], r["instances"]) for r in rules] == [
        ("inference-mode", [1, 1]), ("multi-instance", [2, 3]), ("inference-mode-from-4", [4, None])]
    parse_policy(rec.policy)


def test_the_p95_bound_and_errors_exclude_levels() -> None:
    results = [
        result("defaults", 1, level(1, 80, 13), level(4, 200, 50)),  # 200/s, but p95 over the bound
        result("inference-mode", 1, level(1, 90, 12), level(4, 300, 20, errors=3)),  # errors: never eligible
    ]
    rec = tn.recommend(MODEL, results, max_p95_us=30_000)
    assert [(c.profile.name, c.level.throughput_infer_per_s) for c in rec.per_count] == [("inference-mode", 90)]
    ranked = tn.ranking(results, 30_000)
    assert [(r.combination.profile.name, lv.throughput_infer_per_s) for r, lv in ranked] == [
        ("inference-mode", 90), ("defaults", 80)]


def test_no_level_within_the_bound_means_no_policy() -> None:
    failed = result("inference-mode", 2, status="failed")
    rec = tn.recommend(MODEL, [result("defaults", 1, level(1, 80, 13)), failed], max_p95_us=5_000)
    assert rec.policy is None and "no policy" in rec.reason
    rows = tn.ranking_rows([failed], None)
    assert rows == [["-", "inference-mode", "2", "-", "-", "-", "-", "-", "failed"]]


def test_ignored_flags_stay_out_of_the_policy() -> None:
    rec = tn.recommend(MODEL, [result("all-flags", 1, level(1, 80, 13))], max_p95_us=None)
    assert "ENABLE_NVFUSER" not in rec.policy["models"][MODEL]["profiles"][0]["parameters"]
    text = tn.policy_text(rec, ["header"])
    assert text.startswith("# header\n# at 1 instance(s): all-flags is best")
    assert yaml.safe_load(text) == rec.policy


def test_rounds_alternate_direction() -> None:
    combos = tn.plan(tn.FIELD_REPORT_PROFILES[:2], [1, 2])
    assert [(r, c.label) for r, c in tn.plan_rounds(combos, 3)] == [
        (1, "defaults x1"), (1, "defaults x2"), (1, "inference-mode x1"), (1, "inference-mode x2"),
        (2, "inference-mode x2"), (2, "inference-mode x1"), (2, "defaults x2"), (2, "defaults x1"),
        (3, "defaults x1"), (3, "defaults x2"), (3, "inference-mode x1"), (3, "inference-mode x2"),
    ]


def test_rounds_combine_to_the_median_per_level_and_keep_the_first_failure() -> None:
    a = tn.Combination(PROFILES["defaults"], 1)
    b = tn.Combination(PROFILES["inference-mode"], 1)
    runs = [
        tn.CombinationResult(a, "ok", (level(1, 80, 10), level(2, 100, 20)), reload_s=3.0),
        tn.CombinationResult(b, "failed", (), reload_s=1.0, error="load failed"),
        tn.CombinationResult(b, "ok", (level(1, 90, 11),), reload_s=4.0),
        tn.CombinationResult(a, "ok", (level(1, 60, 30), level(2, 110, 22)), reload_s=5.0),
        tn.CombinationResult(a, "ok", (level(1, 70, 12), level(2, 90, 21)), reload_s=4.0),
    ]
    combined = tn.combine_rounds([a, b], runs)
    assert [(r.combination, r.status, r.rounds, r.reload_s, r.error) for r in combined] == [
        (a, "ok", 3, 4.0, ""), (b, "failed", 1, 2.5, "load failed")]
    assert [(lv.level, lv.throughput_infer_per_s, lv.p95_us, lv.windows) for lv in combined[0].levels] == [
        (1.0, 70, 12_000, 3), (2.0, 100, 21_000, 3)]
    assert [lv.throughput_infer_per_s for lv in combined[1].levels] == [90]


def test_results_rows_cover_every_planned_level_even_after_a_failure() -> None:
    rows = tn.result_rows([FIELD[0], result("inference-mode", 2, status="failed")], [1, 4], max_p95_us=20_000)
    assert [(r["profile"], r["instances"], r["concurrency"], r["status"], r["within_p95_bound"]) for r in rows] == [
        ("defaults", 1, 1, "ok", "yes"), ("defaults", 1, 4, "ok", "no"),
        ("inference-mode", 2, 1, "failed", ""), ("inference-mode", 2, 4, "failed", "")]


# ------------------------------------------------------------------ CLI errors without a Triton


def tune_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["tune", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--instances", "1,zero"], "--instances '1,zero': expected comma-separated counts"),
        (["--concurrency-range", "4:1"], "--concurrency-range '4:1'"),
        (["--max-p95-ms", "0"], "--max-p95-ms 0: must be > 0"),
        (["--profiles", "/nonexistent/profiles.yaml"], "--profiles /nonexistent/profiles.yaml"),
        (["--instances", "1", "--profiles", "{dir}/multi.yaml"], "nothing to measure"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str],
                             message: str) -> None:
    (tmp_path / "multi.yaml").write_text("- {name: m, parameters: {}, min_instances: 2}\n")
    extra = [e.replace("{dir}", str(tmp_path)) for e in extra]
    code, _, err = tune_cli(capsys, "--triton", "127.0.0.1:1", "--model", "m", "--out", str(tmp_path / "o"), *extra)
    assert code == 2
    assert message in err


def test_unreachable_triton_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = tune_cli(capsys, "--triton", f"127.0.0.1:{free_port()}", "--model", "m",
                            "--out", str(tmp_path / "o"))
    assert code == 2
    assert "cannot reach Triton at 127.0.0.1:" in err
    assert not (tmp_path / "o" / "original-config.json").exists()


# ------------------------------------------------------------------ real Triton, real torch

torch = pytest.importorskip("torch")
grpcclient = pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One private Triton (explicit model control) serving `lin` through the runner.

    Module-scoped (conftest's triton_factory is per test): every test restores the
    config it found, and checks that it did, so they can share one start-up.
    """
    from tritonpilot.tools.embedded import EmbeddedTriton
    from tritonpilot.tools.runner import TensorSpec, write_model_dir

    base = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    torch.jit.script(torch.nn.Linear(4, 3)).save(str(base / "lin.pt"))
    write_model_dir(base / "repo", MODEL, base / "lin.pt", [TensorSpec("x", "FP32", (4,))],
                    [TensorSpec("y", "FP32", (3,))], max_batch_size=4, parameters=ORIGINAL_PARAMETERS)
    triton = EmbeddedTriton(base / "repo", load_models=[MODEL], log_path=base / "tritonserver.log",
                            startup_timeout_s=180.0)
    triton.start()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        yield {"triton": triton, "client": client, "original": live_config(client)}
    finally:
        client.close()
        triton.stop(timeout_s=5.0)


def live_config(client: Any) -> dict[str, Any]:
    return client.get_model_config(MODEL, as_json=True)["config"]


def assert_restored(served: dict[str, Any]) -> None:
    """Triton's own ModelConfig: the original, generation parameter gone, and READY."""
    config = live_config(served["client"])
    assert config == served["original"]
    assert config["instance_group"][0]["count"] == 1
    assert {k: v["string_value"] for k, v in config["parameters"].items()} == ORIGINAL_PARAMETERS
    assert served["client"].is_model_ready(MODEL)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_profiles(path: Path, profiles: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump(profiles, sort_keys=False))
    return path


@pytest.mark.triton
def test_tune_two_profiles_two_counts_two_levels(served: dict[str, Any], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    profiles = write_profiles(tmp_path / "profiles.yaml", [
        {"name": "plain", "parameters": {}},
        {"name": "inference", "parameters": {"INFERENCE_MODE": "true"}},
    ])
    out = tmp_path / "out"
    code, stdout, err = tune_cli(capsys, "--triton", served["triton"].grpc_url, "--model", MODEL,
                                 "--profiles", str(profiles), "--instances", "1,2", "--concurrency-range", "1:2",
                                 "--out", str(out), *SHORT)
    assert code == 0, err
    assert_restored(served)
    assert "original config of lin restored" in err

    # One perf_analyzer table per combination, then the ranked summary.
    assert stdout.count("Inferences/Second vs. Client p95 Batch Latency") == 4
    for head in ["=== plain x 1 instance(s)", "=== plain x 2 instance(s)", "=== inference x 1 instance(s)",
                 "=== inference x 2 instance(s)", "=== ranked: best throughput within the bound ==="]:
        assert head in stdout

    rows = read_rows(out / "results.csv")
    assert list(rows[0]) == tn.RESULT_FIELDS
    assert [(r["profile"], r["instances"], r["concurrency"]) for r in rows] == [
        (p, n, c) for p in ("plain", "inference") for n in ("1", "2") for c in ("1", "2")]
    assert all(r["status"] == "ok" and r["errors"] == "0" and float(r["throughput_infer_per_s"]) > 0
               and int(r["p95_us"]) > 0 for r in rows)
    assert {r["parameters"] for r in rows} == {"(no flags)", "INFERENCE_MODE=true"}

    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "original-config.json").read_text()) == served["original"]
    summary = (out / "summary.md").read_text()
    assert "## Ranked: best throughput within the bound" in summary and "Original config: restored." in summary

    assert cli.main(["check", str(out / "policy.yaml")]) == 0
    checked, check_err = capsys.readouterr()
    assert f"{out / 'policy.yaml'}: valid" in checked and f"model {MODEL}" in checked
    policy = yaml.safe_load((out / "policy.yaml").read_text())
    assert policy["triton"]["grpc"] == served["triton"].grpc_url
    names = {r["name"] for r in policy["models"][MODEL]["profiles"]}
    assert names and names <= {"plain", "inference"}


@pytest.mark.triton
def test_unknown_model_exits_2_and_changes_nothing(served: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = tune_cli(capsys, "--triton", served["triton"].grpc_url, "--model", "nope",
                            "--out", str(tmp_path / "o"))
    assert code == 2
    assert "model 'nope'" in err and "not found" in err
    assert_restored(served)


@pytest.mark.triton
def test_a_failed_reload_is_reported_the_run_goes_on_and_the_config_is_restored(
        served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # TRITONPILOT_REPORT_FLAGS is the runner's own boolean: tune passes unknown keys through
    # (with a warning), the runner refuses "maybe", so Triton fails the load mid-run.
    profiles = write_profiles(tmp_path / "profiles.yaml", [
        {"name": "bad", "parameters": {"TRITONPILOT_REPORT_FLAGS": "maybe"}},
        {"name": "good", "parameters": {"INFERENCE_MODE": "true"}},
    ])
    out = tmp_path / "out"
    code, stdout, err = tune_cli(capsys, "--triton", served["triton"].grpc_url, "--model", MODEL,
                                 "--profiles", str(profiles), "--instances", "1", "--concurrency-range", "1",
                                 "--out", str(out), *SHORT)
    assert code == 1
    assert "warning: profile 'bad': TRITONPILOT_REPORT_FLAGS='maybe': not a PyTorch-backend flag" in err
    assert "bad x1: failed: " in err and "failed to convert 'maybe' to boolean" in err
    assert_restored(served)

    rows = read_rows(out / "results.csv")
    assert [(r["profile"], r["status"]) for r in rows] == [("bad", "failed"), ("good", "ok")]
    assert "failed to convert 'maybe' to boolean" in rows[0]["error"]
    assert float(rows[1]["throughput_infer_per_s"]) > 0
    assert "=== good x 1 instance(s)" in stdout
    summary = (out / "summary.md").read_text()
    assert "## Failed or incomplete" in summary and "- bad x1: failed" in summary
    # The combinations that ran still make a policy.
    assert cli.main(["check", str(out / "policy.yaml")]) == 0


@pytest.mark.triton
def test_ctrl_c_stops_the_run_and_restores_the_config(served: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonpilot", "tune", "--triton", served["triton"].grpc_url, "--model", MODEL,
         "--profiles", "field-report", "--instances", "1,2", "--concurrency-range", "1:4",
         "--measurement-interval-ms", "5000", "--warmup-s", "0.3", "--out", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Interrupt once the first reload shows in Triton's config: tune is measuring then.
        deadline = time.monotonic() + 120
        while "tritonpilot_generation" not in live_config(served["client"]).get("parameters", {}):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "tune never reloaded the model"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "original config of lin restored" in stderr
    assert_restored(served)
    rows = read_rows(out / "results.csv")
    assert rows[0]["profile"] == "defaults" and rows[0]["status"] == "interrupted"
    assert not (out / "policy.yaml").exists()
    assert "**Interrupted (SIGINT)**" in (out / "summary.md").read_text()
