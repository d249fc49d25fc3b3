"""The TorchScript runner: libtorch-backend flag semantics on a real Triton, real torch.

Pure parts first (parsing, naming conventions, the CLI), then one private
Triton for the module: a scripted Linear served by the runner, reloaded with
config overrides the way `tune` will do it. The runner logs the torch state it
sees inside its guards on every execute (TRITONPILOT_REPORT_FLAGS), and the
tests read those lines, and the load-time lines, from Triton's own log file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # 2 shared cores: Triton and its stubs need them more

from tritonpilot.tools import runner as runner_cli  # noqa: E402
from tritonpilot.tools.runner import RunnerError, TensorSpec, parse_tensor_spec, write_model_dir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNNER = runner_cli.load_runner_module()
MODEL = "lin"
REPORT = RUNNER.REPORT_PREFIX


# ------------------------------------------------------------------ pure parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("On", True), ("1", True), ("false", False), ("OFF", False), ("0", False)],
)
def test_bool_values_as_backend_common(text: str, expected: bool) -> None:
    assert RUNNER.parse_bool_value(text) is expected


@pytest.mark.parametrize("text", ["yes", "no", "", " true", "2", "enabled"])
def test_other_bool_values_fail_with_tritons_message(text: str) -> None:
    with pytest.raises(RUNNER.ParameterError, match=f"^failed to convert '{text}' to boolean$"):
        RUNNER.parse_bool_value(text)


@pytest.mark.parametrize(("text", "expected"), [("4", 4), ("4x", 4), ("  -2", -2), ("+7", 7), ("08", 8)])
def test_int_values_follow_stoi(text: str, expected: int) -> None:
    assert RUNNER.parse_int_value(text) == expected


@pytest.mark.parametrize("text", ["x4", "", "-", " "])
def test_non_numbers_fail_with_tritons_message(text: str) -> None:
    with pytest.raises(RUNNER.ParameterError, match=f"^failed to convert '{text}' to integral number$"):
        RUNNER.parse_int_value(text)


def test_defaults_and_log_lines_follow_the_backend() -> None:
    flags = RUNNER.parse_parameters({})
    assert (flags.optimized_execution, flags.inference_mode, flags.cudnn, flags.cache_cleaning) == (
        True, True, True, False)
    assert (flags.jit_profiling, flags.jit_executor, flags.tensor_fuser) == (None, None, None)
    assert RUNNER.load_log_lines(flags, "m", 1, 2) == [
        "Optimized execution is enabled for model instance 'm'",
        "Cache Cleaning is disabled for model instance 'm'",
        "Inference Mode is enabled for model instance 'm'",
        "cuDNN is enabled for model instance 'm'",
    ]


def test_first_bad_key_in_backend_order_is_reported() -> None:
    params = {"INFERENCE_MODE": {"string_value": "maybe"}, "ENABLE_CACHE_CLEANING": {"string_value": "nah"}}
    with pytest.raises(RUNNER.ParameterError, match="'nah'"):
        RUNNER.parse_parameters(params)


def test_enable_nvfuser_is_ignored_like_a_current_backend() -> None:
    assert RUNNER.parse_parameters({"ENABLE_NVFUSER": {"string_value": "banana"}}) == RUNNER.BackendFlags()


@pytest.mark.parametrize(
    ("config_names", "forward_args", "positions"),
    [
        (["b", "a"], ["a", "b"], [1, 0]),  # forward argument names
        (["IN__1", "IN__0"], ["a", "b"], [1, 0]),  # <name>__<index>
        (["first", "second"], ["a", "b"], [0, 1]),  # config order
    ],
)
def test_input_naming_conventions(config_names: list[str], forward_args: list[str], positions: list[int]) -> None:
    assert RUNNER.input_positions(config_names, forward_args) == positions


def test_output_naming_conventions() -> None:
    assert RUNNER.output_positions(["OUT__1", "OUT__0"]) == [1, 0]
    assert RUNNER.output_positions(["OUT__x", "OUT__0"]) == [0, 1]


# ------------------------------------------------------------------ CLI


def test_tensor_spec_parsing() -> None:
    assert parse_tensor_spec("image:fp32:3,128,128") == TensorSpec("image", "FP32", (3, 128, 128))
    assert parse_tensor_spec("ids:TYPE_INT64:-1") == TensorSpec("ids", "INT64", (-1,))
    for bad in ["image", "image:FP33:3", "image:FP32:3,x", "image:FP32:0", "image:STRING:1"]:
        with pytest.raises(RunnerError):
            parse_tensor_spec(bad)


def _scripted_linear(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.script(torch.nn.Linear(4, 3)).save(str(path))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tritonpilot", "runner", *args],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=120,
    )  # fmt: skip


def test_cli_writes_a_model_directory(tmp_path: Path) -> None:
    pt = _scripted_linear(tmp_path / "lin.pt")
    result = _cli(
        "--torchscript", str(pt), "--name", "m", "--repository", str(tmp_path / "repo"),
        "--input", "x:FP32:4", "--output", "y:FP32:3", "--max-batch-size", "4", "--instances", "2",
        "--parameter", "INFERENCE_MODE=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    model_dir = tmp_path / "repo" / "m"
    assert (model_dir / "1" / "model.pt").read_bytes() == pt.read_bytes()
    assert (model_dir / "1" / "model.py").read_text() == runner_cli.RUNNER_SOURCE.read_text()
    config = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 4" in config
    assert "kind: KIND_CPU, count: 2" in config
    assert 'parameters { key: "INFERENCE_MODE" value { string_value: "false" } }' in config


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input", "x:FP32"], "expected NAME:DTYPE:DIMS"),
        (["--input", "x:FP32:4", "--parameter", "INFERENCE_MODE=yes"], "failed to convert 'yes' to boolean"),
        (["--input", "x:FP32:4", "--instances", "0"], "--instances must be >= 1"),
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path: Path, extra: list[str], message: str) -> None:
    pt = _scripted_linear(tmp_path / "lin.pt")
    result = _cli(
        "--torchscript", str(pt), "--name", "m", "--repository", str(tmp_path), "--output", "y:FP32:3", *extra,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "m").exists()


def test_cli_missing_torchscript_exits_2(tmp_path: Path) -> None:
    result = _cli(
        "--torchscript", str(tmp_path / "nope.pt"), "--name", "m", "--repository", str(tmp_path),
        "--input", "x:FP32:4", "--output", "y:FP32:3",
    )  # fmt: skip
    assert result.returncode == 2
    assert "TorchScript file not found" in result.stderr


# ------------------------------------------------------------------ real Triton

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A private Triton serving `lin` (Linear 4->3) through the runner.

    max_batch_size 2 with a long queue delay: two concurrent single-row requests
    are merged into one execute at once (the batch is full), and a 2-row
    request never waits.
    """
    embedded = pytest.importorskip("tritonpilot.tools.embedded")
    base = tmp_path_factory.mktemp("runner")
    pt = _scripted_linear(base / "lin.pt")
    repository = base / "repo"
    write_model_dir(
        repository, MODEL, pt, [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (3,))],
        max_batch_size=2, dynamic_batching=True, max_queue_delay_us=5_000_000,
        parameters={"TRITONPILOT_REPORT_FLAGS": "true"},
    )  # fmt: skip
    # Module-scoped (conftest's triton_factory is per test): one start-up, five tests.
    triton = embedded.EmbeddedTriton(
        repository, load_models=[MODEL], log_path=base / "tritonserver.log", startup_timeout_s=180.0
    )
    triton.start()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        yield {"triton": triton, "client": client, "module": torch.jit.load(str(pt)), "repository": repository}
    finally:
        client.close()
        # A failed load leaves Triton waiting on a stub at shutdown; no need to wait long.
        triton.stop(timeout_s=3.0)


def _infer(client: Any, model: str, name: str, array: np.ndarray, output: str) -> np.ndarray:
    tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return client.infer(model, [tensor]).as_numpy(output)


def _log_messages(log_path: Path, offset: int = 0) -> list[str]:
    """Triton writes `I... file:line] "<message>"`, the message JSON-escaped."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", errors="replace")
    messages = []
    for line in text.splitlines():
        start = line.find('] "')
        if start >= 0:
            try:
                messages.append(json.loads(line[start + 2 :]))
            except json.JSONDecodeError:
                continue
    return messages


def _reports(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(m.split("': ", 1)[1]) for m in _log_messages(log_path) if m.startswith(REPORT)]


def _next_report(log_path: Path, before: int, timeout_s: float = 20.0) -> dict[str, Any]:
    """The stub's log lines reach the file a moment after the response."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports = _reports(log_path)
        if len(reports) > before:
            return reports[-1]
        time.sleep(0.1)
    raise AssertionError(f"no new '{REPORT}' line in {log_path}")


def _run_and_report(served: dict[str, Any], action: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    log_path = served["triton"].log_path
    before = len(_reports(log_path))
    result = action()
    return result, _next_report(log_path, before)


def _expected(served: dict[str, Any], x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return served["module"](torch.from_numpy(x)).numpy()


def _reload_with(served: dict[str, Any], parameters: dict[str, str]) -> int:
    """Reload `lin` with a config override (the whole config: parameters replaced),
    as `tune` does. Returns the log offset where the reload's lines start."""
    client = served["client"]
    config = client.get_model_config(MODEL, as_json=True)["config"]
    config["parameters"] = {k: {"string_value": v} for k, v in parameters.items()}
    offset = served["triton"].log_path.stat().st_size
    client.load_model(MODEL, config=json.dumps(config))
    return offset


DEFAULT_STATE = {
    "optimized_execution": True,
    "inference_mode": True,
    "grad_enabled": False,
    "cudnn": True,
    "jit_profiling_mode": True,
    "jit_profiling_executor": True,
    "tensor_fuser": True,
    "intra_op_threads": 1,  # the runner's default: one pool per instance process
    "output_is_inference": True,
}


@pytest.mark.triton
def test_defaults_outputs_and_load_lines(served: dict[str, Any]) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y, report = _run_and_report(served, lambda: _infer(served["client"], MODEL, "x", x, "y"))
    np.testing.assert_allclose(y, _expected(served, x), rtol=1e-6)
    assert {k: report[k] for k in DEFAULT_STATE} == DEFAULT_STATE
    assert (report["requests"], report["batch_size"]) == (1, 2)
    messages = _log_messages(served["triton"].log_path)
    for line in RUNNER.load_log_lines(RUNNER.BackendFlags(), MODEL, 1, 1):
        assert line in messages


@pytest.mark.triton
def test_two_requests_run_as_one_batch(served: dict[str, Any]) -> None:
    rows = [np.full((1, 4), 1.5, np.float32), np.arange(4, dtype=np.float32).reshape(1, 4)]
    results: list[Any] = [None, None]
    done = threading.Barrier(3, timeout=30)

    def send(i: int) -> None:
        client = grpcclient.InferenceServerClient(served["triton"].grpc_url)
        try:
            results[i] = _infer(client, MODEL, "x", rows[i], "y")
        finally:
            client.close()
            done.wait()

    def both() -> None:
        for i in range(2):
            threading.Thread(target=send, args=(i,), daemon=True).start()
        done.wait()

    _, report = _run_and_report(served, both)
    assert (report["requests"], report["batch_size"]) == (2, 2)
    assert all(r is not None for r in results), results  # a failed send leaves None
    for row, result in zip(rows, results):
        np.testing.assert_allclose(result, _expected(served, row), rtol=1e-6)


@pytest.mark.triton
def test_every_flag_takes_effect_inside_the_runner(served: dict[str, Any]) -> None:
    # Mixed case and "2x" check the parsing in Triton; ENABLE_NVFUSER is not read.
    offset = _reload_with(
        served,
        {
            "DISABLE_OPTIMIZED_EXECUTION": "TRUE",
            "INFERENCE_MODE": "Off",
            "DISABLE_CUDNN": "1",
            "ENABLE_JIT_PROFILING": "false",
            "ENABLE_JIT_EXECUTOR": "0",
            "ENABLE_TENSOR_FUSER": "OFF",
            "ENABLE_CACHE_CLEANING": "on",
            "ENABLE_WEIGHT_SHARING": "true",
            "INTRA_OP_THREAD_COUNT": "2x",
            "INTER_OP_THREAD_COUNT": "3",
            "ENABLE_NVFUSER": "banana",
            "TRITONPILOT_REPORT_FLAGS": "true",
        },
    )
    x = np.ones((2, 4), np.float32)
    y, report = _run_and_report(served, lambda: _infer(served["client"], MODEL, "x", x, "y"))
    np.testing.assert_allclose(y, _expected(served, x), rtol=1e-6)
    assert {k: report[k] for k in DEFAULT_STATE} == {
        "optimized_execution": False,
        "inference_mode": False,
        "grad_enabled": False,  # NoGrad still applies, as in the backend
        "cudnn": False,
        "jit_profiling_mode": False,
        "jit_profiling_executor": False,
        "tensor_fuser": False,
        "intra_op_threads": 2,
        "output_is_inference": False,
    }
    assert report["inter_op_threads"] == 3
    messages = _log_messages(served["triton"].log_path, offset)
    for line in [
        "Optimized execution is disabled for model instance 'lin'",
        "Cache Cleaning is enabled for model instance 'lin'",
        "Inference Mode is disabled for model instance 'lin'",
        "cuDNN is disabled for model instance 'lin'",
        "Tensor fuser is disabled for model instance 'lin'",
        "Weight sharing is enabled for model instance 'lin'",
        "Jit profiling is disabled for model instance 'lin'",
        "Jit executor is disabled for model instance 'lin'",
        "Intra op thread count is set to 2 for model instance 'lin'",
        "Inter op thread count is set to 3 for model instance 'lin'",
    ]:
        assert line in messages
    assert not any("NvFuser" in m for m in messages)


@pytest.mark.triton
def test_bad_boolean_fails_the_load_with_tritons_message(served: dict[str, Any]) -> None:
    with pytest.raises(InferenceServerException) as raised:
        _reload_with(served, {"INFERENCE_MODE": "yes"})
    assert "failed to convert 'yes' to boolean" in str(raised.value)
    assert "load failed for model 'lin'" in str(raised.value)
    # As with any failed reload, the previous version keeps serving.
    assert served["client"].is_model_ready(MODEL)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_infer(served["client"], MODEL, "x", x, "y"), _expected(served, x), rtol=1e-6)


@pytest.mark.triton
def test_example_restoration_cnn_builds_and_serves(served: dict[str, Any]) -> None:
    repository: Path = served["repository"]
    script = REPO_ROOT / "benchmarks" / "build_restoration_cnn.py"
    built = subprocess.run(
        [sys.executable, str(script), "--repository", str(repository), "--name", "cnn"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    served["client"].load_model("cnn")
    image = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    restored = _infer(served["client"], "cnn", "image", image, "restored")
    assert restored.shape == (1, 3, 128, 128)
    module = torch.jit.load(str(repository / "cnn" / "1" / "model.pt"))
    with torch.inference_mode():
        expected = module(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(restored, expected, rtol=1e-5, atol=1e-6)
