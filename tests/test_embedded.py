"""The embedded Triton and the test models, against the real tritonserver.

Processes are checked by pid and process group, never by name: other test
runs on this machine have their own tritonservers.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonpilot.tools import embedded
from tritonpilot.tools.embedded import (
    EmbeddedTriton,
    TritonNotInstalledError,
    TritonStartError,
    backend_dir,
    find_distribution,
    group_members,
)

MODELS_DIR = Path(__file__).parent / "models"
MODEL_NAMES = ("batching", "decoupled", "fast", "identity_bytes", "identity_fp32", "sequence", "sleep")
RPC_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def client(triton: EmbeddedTriton) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    yield c
    c.close()


def infer(
    client: grpcclient.InferenceServerClient, model: str, data: np.ndarray, datatype: str, **kwargs: object
) -> np.ndarray:
    """One unary ModelInfer with INPUT0 = data; returns OUTPUT0."""
    inp = grpcclient.InferInput("INPUT0", list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    result = client.infer(model, [inp], client_timeout=RPC_TIMEOUT_S, **kwargs)
    return result.as_numpy("OUTPUT0")


def alive(pid: int) -> bool:
    """Running, i.e. not gone and not a zombie (PID 1 here may never reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (a path unique to one test)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if text.encode() in f.read() and alive(int(entry.name)):
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def copy_model(name: str, repo: Path, edit: Callable[[str], str] = lambda text: text) -> None:
    shutil.copytree(MODELS_DIR / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / name / "config.pbtxt"
    config.write_text(edit(config.read_text()))


# --------------------------------------------------------------------------- the shared server


@pytest.mark.triton
def test_every_model_is_ready(triton: EmbeddedTriton, client: grpcclient.InferenceServerClient) -> None:
    assert triton.is_running()
    assert sorted(triton.load_models) == sorted(MODEL_NAMES)
    assert client.is_server_ready(client_timeout=RPC_TIMEOUT_S)
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index(as_json=True)["models"]}
    for name in MODEL_NAMES:
        assert client.is_model_ready(name, client_timeout=RPC_TIMEOUT_S), name
        assert index[name] == "READY"


@pytest.mark.triton
def test_urls_answer(triton: EmbeddedTriton) -> None:
    assert re.fullmatch(r"127\.0\.0\.1:\d+", triton.grpc_url)
    with urllib.request.urlopen(f"{triton.http_url}/v2/health/ready", timeout=RPC_TIMEOUT_S) as response:
        assert response.status == 200
    with urllib.request.urlopen(triton.metrics_url, timeout=RPC_TIMEOUT_S) as response:
        assert b"nv_inference_request_success" in response.read()
    assert triton.log_path.exists()


@pytest.mark.triton
@pytest.mark.parametrize("model", ["identity_fp32", "fast", "sleep"])
def test_numeric_identity(client: grpcclient.InferenceServerClient, model: str) -> None:
    data = np.arange(7, dtype=np.float32) - 2.5
    np.testing.assert_array_equal(infer(client, model, data, "FP32"), data)


@pytest.mark.triton
def test_bytes_identity(client: grpcclient.InferenceServerClient) -> None:
    data = np.array([b"", b"hello", b"\x00\xffbinary", "żółw".encode()], dtype=np.object_)
    out = infer(client, "identity_bytes", data, "BYTES")
    assert out.tolist() == data.tolist()


@pytest.mark.triton
def test_batching_doubles(client: grpcclient.InferenceServerClient) -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(infer(client, "batching", data, "FP32"), data * 2)


@pytest.mark.triton
def test_batching_concurrent_requests_each_get_their_own_answer(triton: EmbeddedTriton) -> None:
    # Concurrent requests may be merged into one batch; each must get its own rows back.
    def one(i: int) -> bool:
        c = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            data = np.full((1, 4), i, dtype=np.float32)
            return bool(np.array_equal(infer(c, "batching", data, "FP32"), data * 2))
        finally:
            c.close()

    results: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: results.append(one(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RPC_TIMEOUT_S)
    assert results == [True] * 8


@pytest.mark.triton
def test_sequence_sums_per_correlation_id(client: grpcclient.InferenceServerClient) -> None:
    # Random ids: the shared server may see other tests' sequences.
    a, b = random.sample(range(1, 2**48), 2)

    def step(seq: int, value: int, start: bool = False, end: bool = False) -> int:
        data = np.array([[value]], dtype=np.int32)
        out = infer(client, "sequence", data, "INT32", sequence_id=seq, sequence_start=start, sequence_end=end)
        return int(out.reshape(-1)[0])

    assert step(a, 1, start=True) == 1
    assert step(b, 100, start=True) == 100
    assert step(a, 2) == 3
    assert step(b, 5) == 105
    assert step(a, 3, end=True) == 6
    assert step(b, 1, end=True) == 106
    assert step(a, 7, start=True, end=True) == 7  # a new sequence starts from zero


@pytest.mark.triton
@pytest.mark.parametrize("n", [3, 0])
def test_decoupled_sends_n_responses_then_final(triton: EmbeddedTriton, n: int) -> None:
    responses: queue.Queue[tuple[object, object]] = queue.Queue()
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        c.start_stream(callback=lambda result, error: responses.put((result, error)))
        inp = grpcclient.InferInput("IN", [1], "INT32")
        inp.set_data_from_numpy(np.array([n], dtype=np.int32))
        c.async_stream_infer("decoupled", [inp], request_id="r1", enable_empty_final_response=True)
        values = []
        while True:
            result, error = responses.get(timeout=RPC_TIMEOUT_S)
            assert error is None, error
            response = result.get_response()  # type: ignore[attr-defined]
            if response.parameters["triton_final_response"].bool_param:
                assert not response.outputs  # the final flag comes alone
                break
            values.append(int(result.as_numpy("OUT")[0]))  # type: ignore[attr-defined]
        assert values == list(range(n))
    finally:
        c.stop_stream()
        c.close()


@pytest.mark.triton
def test_sleep_model_takes_its_time(client: grpcclient.InferenceServerClient) -> None:
    # A lower bound only: a busy machine may be slower, never faster.
    started = time.monotonic()
    for _ in range(3):
        infer(client, "sleep", np.zeros(4, dtype=np.float32), "FP32")
    assert time.monotonic() - started >= 3 * 0.020


# --------------------------------------------------------------------------- private servers


@pytest.mark.triton
def test_sleep_parameters_follow_a_config_override(triton_factory: Callable[..., EmbeddedTriton]) -> None:
    """The controller's path: load with a full config whose `parameters` changed."""
    triton = triton_factory(load_models=["sleep"])
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        config = c.get_model_config("sleep", as_json=True)["config"]
        config["parameters"]["SLEEP_MS"] = {"string_value": "300"}
        config["parameters"]["INIT_SLEEP_MS"] = {"string_value": "500"}
        started = time.monotonic()
        c.load_model("sleep", config=json.dumps(config), client_timeout=120)
        assert time.monotonic() - started >= 0.5
        started = time.monotonic()
        infer(c, "sleep", np.zeros(1, dtype=np.float32), "FP32")
        assert time.monotonic() - started >= 0.3
    finally:
        c.close()


@pytest.mark.triton
def test_no_models_then_explicit_load(triton_factory: Callable[..., EmbeddedTriton]) -> None:
    triton = triton_factory(load_models=[])
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        assert not c.is_model_ready("fast")
        c.load_model("fast", client_timeout=120)
        data = np.ones(2, dtype=np.float32)
        np.testing.assert_array_equal(infer(c, "fast", data, "FP32"), data)
    finally:
        c.close()


@pytest.mark.triton
def test_kill_then_restart_on_the_same_ports(triton_factory: Callable[..., EmbeddedTriton]) -> None:
    triton = triton_factory(load_models=["fast"])
    urls = (triton.grpc_url, triton.http_url, triton.metrics_url)
    first_pid = triton.pid
    assert first_pid is not None
    group = group_members(first_pid)
    assert first_pid in group and len(group) >= 2  # tritonserver and the stub of "fast"

    triton.kill()
    assert not triton.is_running() and triton.pid is None
    assert not [pid for pid in group if alive(pid)]
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException):
            c.is_server_live(client_timeout=5)
    finally:
        c.close()

    triton.restart()
    assert (triton.grpc_url, triton.http_url, triton.metrics_url) == urls
    assert triton.pid not in (None, first_pid)
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        data = np.arange(3, dtype=np.float32)
        np.testing.assert_array_equal(infer(c, "fast", data, "FP32"), data)
    finally:
        c.close()


@pytest.mark.triton
def test_stop_leaves_no_process_of_this_instance(triton_factory: Callable[..., EmbeddedTriton]) -> None:
    triton = triton_factory(load_models=["fast", "sleep", "decoupled"])
    pid = triton.pid
    assert pid is not None
    group = group_members(pid)
    assert len(group) >= 4  # tritonserver and one stub per model
    triton.stop()
    assert not triton.is_running()
    assert not [p for p in group if alive(p)]
    assert group_members(pid) == []
    triton.stop()  # idempotent


@pytest.mark.triton
def test_context_manager_stops_when_the_body_fails(tmp_path: Path) -> None:
    triton = EmbeddedTriton(MODELS_DIR, load_models=["fast"], log_path=tmp_path / "t.log", startup_timeout_s=180)
    with pytest.raises(RuntimeError, match="boom"):
        with triton:
            group = group_members(triton.pid or 0)
            raise RuntimeError("boom")
    assert group and not [p for p in group if alive(p)]


@pytest.mark.triton
def test_a_model_that_fails_to_load_is_a_clear_error(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model("fast", repo)
    (repo / "fast" / "1" / "model.py").write_text("raise ImportError('broken on purpose')\n")
    triton = EmbeddedTriton(repo, log_path=tmp_path / "t.log", startup_timeout_s=180)
    with pytest.raises(TritonStartError, match="exited with code") as caught:
        triton.start()
    assert caught.value.exit_code not in (None, 0)
    assert "broken on purpose" in str(caught.value)  # the log tail says why
    assert not triton.is_running()
    assert processes_mentioning(str(repo)) == []


@pytest.mark.triton
def test_startup_timeout_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model("sleep", repo, lambda text: text.replace('key: "INIT_SLEEP_MS", value { string_value: "0" }',
                                                         'key: "INIT_SLEEP_MS", value { string_value: "60000" }'))
    assert "60000" in (repo / "sleep" / "config.pbtxt").read_text()
    triton = EmbeddedTriton(repo, log_path=tmp_path / "t.log", startup_timeout_s=3)
    with pytest.raises(TritonStartError, match="not ready within 3 s") as caught:
        triton.start()
    assert caught.value.exit_code is None
    assert not triton.is_running()
    assert processes_mentioning(str(repo)) == []


@pytest.mark.triton
def test_a_port_picked_for_us_but_taken_is_picked_again(tmp_path: Path) -> None:
    import socket

    triton = EmbeddedTriton(MODELS_DIR, load_models=["fast"], log_path=tmp_path / "t.log", startup_timeout_s=180)
    taken = triton.http_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with triton:
            assert triton.http_port != taken
            with urllib.request.urlopen(f"{triton.http_url}/v2/health/ready", timeout=30) as r:
                assert r.status == 200


@pytest.mark.triton
def test_a_port_the_caller_chose_but_taken_is_an_error(tmp_path: Path, free_port: int) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", free_port))
        squatter.listen()
        triton = EmbeddedTriton(
            MODELS_DIR, load_models=["fast"], grpc_port=free_port, log_path=tmp_path / "t.log", startup_timeout_s=180
        )
        with pytest.raises(TritonStartError, match=f"{free_port}' already in use"):
            triton.start()
    assert not triton.is_running()


# --------------------------------------------------------------------------- CLI


@pytest.mark.triton
def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    log_file = tmp_path / "cli-triton.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonpilot", "triton", "--model-repository", str(MODELS_DIR),
         "--load-model", "fast", "--log-file", str(log_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
    server_pid = None
    try:
        printed = []
        deadline = time.monotonic() + 180
        while not printed or "Ctrl-C" not in printed[-1]:
            assert proc.poll() is None, f"exited early: {proc.stderr.read() if proc.stderr else ''}"
            try:
                printed.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no 'Ctrl-C' line within 180 s; got {printed}")
        text = "".join(printed)
        server_pid = int(re.search(r"tritonserver pid (\d+)", text).group(1))  # type: ignore[union-attr]
        grpc_url = re.search(r"grpc\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        assert str(log_file) in text
        c = grpcclient.InferenceServerClient(grpc_url)
        try:
            assert c.is_model_ready("fast", client_timeout=RPC_TIMEOUT_S)
        finally:
            c.close()
        group = group_members(server_pid)
        assert server_pid in group

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not [p for p in group if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server_pid is not None and group_members(server_pid):
            os.killpg(server_pid, signal.SIGKILL)


@pytest.mark.triton
def test_cli_sigterm_while_starting_stops_what_it_began(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model("sleep", repo, lambda text: text.replace('string_value: "0"', 'string_value: "60000"'))
    log_file = tmp_path / "cli-triton.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonpilot", "triton", "--model-repository", str(repo), "--log-file", str(log_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        # Loading has begun (the model's initialize() now sleeps 60 s).
        while not (log_file.exists() and "loading: sleep" in log_file.read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert processes_mentioning(str(repo))  # what the check below must find gone: tritonserver, its stub
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert "interrupted" in (proc.stderr.read() if proc.stderr else "")
        assert processes_mentioning(str(repo)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- no server needed


def test_backend_tree_is_built_once_even_by_racing_builders(tmp_path: Path) -> None:
    dist = find_distribution()
    barrier = threading.Barrier(6)
    results: list[Path] = []

    def build() -> None:
        barrier.wait()
        results.append(backend_dir(dist, cache_dir=tmp_path))

    threads = [threading.Thread(target=build) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and len(set(results)) == 1
    python_dir = results[0] / "python"
    assert os.access(python_dir / "triton_python_backend_stub", os.X_OK)
    assert (python_dir / "libtriton_python.so").exists()
    assert (results[0].parents[2] / "nvidia_pytriton.libs").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].parents[2].name]  # no staging dirs left


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_DISTRIBUTION", "nvidia-pytriton-not-installed")
    with pytest.raises(TritonNotInstalledError, match=re.escape("pip install 'tritonpilot[embedded]'")):
        find_distribution()


def test_model_names_lists_model_dirs_only(tmp_path: Path) -> None:
    for name in ("b_model", "a_model"):
        (tmp_path / name / "1").mkdir(parents=True)
    (tmp_path / "b_model" / "config.pbtxt").write_text("")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.md").write_text("")
    assert embedded.model_names(tmp_path) == ["a_model", "b_model"]
    assert embedded.model_names(MODELS_DIR) == sorted(MODEL_NAMES)


def test_free_ports_are_distinct() -> None:
    """Triton refuses to start when two of its ports are the same; free_port twice in a row can
    return the same port (it happened), free_ports never does."""
    from tritonpilot.ports import free_ports
    for _ in range(20):
        ports = free_ports(8)
        assert len(set(ports)) == 8 and all(1 <= p <= 65535 for p in ports)
