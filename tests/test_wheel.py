"""tritonpilot as a user installs it: a wheel built from this checkout, installed with its
extras into a fresh virtual environment, every command run from a folder outside the checkout.

One fresh venv serves the whole module (building it takes a minute or two: torch and the
embedded tritonserver are large). Nothing here imports the checkout's code into the fresh
venv: a file the wheel forgot fails here even when the checkout's tests pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from proxy_support import wait_until

from tritonpilot.ports import free_port
from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "embedded,runner,tune"
INSTALL_TIMEOUT_S = 900
# What commands read at run time: it must be inside the wheel.
PACKAGE_DATA = [
    "tritonpilot/py.typed",
    "tritonpilot/deploy/policy.example.yaml",
    "tritonpilot/deploy/torchscript_runner/model.py",
    "tritonpilot/deploy/demo_models/fast/config.pbtxt",
    "tritonpilot/deploy/demo_models/fast/1/model.py",
    "tritonpilot/deploy/demo_models/sleep/config.pbtxt",
    "tritonpilot/deploy/demo_models/sleep/1/model.py",
    "tritonpilot/deploy/kubernetes/base/grafana/tritonpilot-dashboard.json",
]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    home: Path  # a folder outside the checkout, readable by everyone: the commands' cwd

    @property
    def tritonpilot(self) -> str:
        return str(self.venv / "bin" / "tritonpilot")

    def run(self, *args: str, timeout_s: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        return subprocess.run([self.tritonpilot, *args], cwd=self.home, env=env, capture_output=True,
                              text=True, timeout=timeout_s, **kwargs)  # type: ignore[call-overload]


def _build_wheel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO_ROOT)], check=True, timeout=300, cwd=out)
    (wheel,) = out.glob("tritonpilot-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    # Not pytest's tmp_path: its folders are private to root, and one test runs as another user.
    home = Path(tempfile.mkdtemp(prefix="tritonpilot-user-"))
    home.chmod(0o755)
    try:
        wheel = _build_wheel(home / "dist")
        venv = home / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[{EXTRAS}]"],
                       check=True, timeout=INSTALL_TIMEOUT_S, cwd=home)
        yield Installed(wheel, venv, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_the_wheel_has_one_top_level_package_and_its_data() -> None:
    with tempfile.TemporaryDirectory() as out:
        wheel = _build_wheel(Path(out))
        names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"tritonpilot"}, sorted(top)
    for path in PACKAGE_DATA:
        assert path in names, f"{path} is not in the wheel"
    assert "tritonpilot/proxy/relay.py" in names and "tritonpilot/control/decide.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tritonpilot/benchmarks")]


def test_version(installed: Installed) -> None:
    result = installed.run("--version")
    assert result.returncode == 0, result.stderr
    version = installed.wheel.name.split("-")[1]
    assert result.stdout.strip() == f"tritonpilot {version}"


def test_check_on_the_shipped_example(installed: Installed) -> None:
    result = installed.run("check", "--example")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    # The example comes from the installed package, not from the checkout.
    assert first.startswith(str(installed.venv)) and first.endswith("policy.example.yaml: valid"), first
    assert "profile by count" in result.stdout


def test_runner_writes_a_model_directory_from_a_torchscript_file(installed: Installed) -> None:
    torch = pytest.importorskip("torch")
    model_file = installed.home / "linear.pt"
    torch.jit.script(torch.nn.Linear(4, 3)).save(str(model_file))
    repository = installed.home / "repository"
    result = installed.run("runner", "--torchscript", str(model_file), "--name", "linear",
                           "--repository", str(repository), "--input", "x:FP32:4", "--output", "y:FP32:3",
                           "--parameter", "INFERENCE_MODE=true")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # torch is there: the flag values were checked
    assert (repository / "linear" / "1" / "model.pt").read_bytes() == model_file.read_bytes()
    shipped = installed.venv.glob("lib/python*/site-packages/tritonpilot/deploy/torchscript_runner/model.py")
    assert (repository / "linear" / "1" / "model.py").read_text() == next(shipped).read_text()
    assert 'key: "INFERENCE_MODE"' in (repository / "linear" / "config.pbtxt").read_text()
    # A value libtorch would refuse is a usage error, before anything is written.
    bad = installed.run("runner", "--torchscript", str(model_file), "--name", "bad",
                        "--repository", str(repository), "--input", "x:FP32:4", "--output", "y:FP32:3",
                        "--parameter", "INFERENCE_MODE=perhaps")
    assert bad.returncode == 2 and "failed to convert 'perhaps' to boolean" in bad.stderr
    assert not (repository / "bad").exists()


def test_demo_short(installed: Installed) -> None:
    result = installed.run("demo", "--short", timeout_s=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "## 1. The proxy's cost" in result.stdout
    assert "## 2. The controller" in result.stdout


def _as_unprivileged_user() -> list[str]:
    """A prefix that runs a command as 'nobody' when we are root; empty otherwise."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop to an unprivileged user")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_serve_as_an_unprivileged_user_in_front_of_an_embedded_triton(installed: Installed) -> None:
    """What the container does (its image could not be built here: no engine), done the same way:
    the wheel's install, no root, configured by the environment, in front of a real Triton."""
    listen, http_listen, metrics = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HOME": str(installed.home), "TRITONPILOT_LISTEN": f"127.0.0.1:{listen}",
            "TRITONPILOT_HTTP_LISTEN": f"127.0.0.1:{http_listen}",
            "TRITONPILOT_METRICS_LISTEN": f"127.0.0.1:{metrics}", "TRITONPILOT_LOG_FORMAT": "json"}
    log_path = installed.home / "serve.log"
    with EmbeddedTriton(REPO_ROOT / "deploy" / "demo_models", load_models=["fast"],
                        log_path=installed.home / "triton.log") as triton:
        env["TRITONPILOT_TRITON"] = triton.grpc_url
        env["TRITONPILOT_TRITON_HTTP"] = f"127.0.0.1:{triton.http_port}"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([*_as_unprivileged_user(), installed.tritonpilot, "serve"], env=env,
                                    cwd=installed.home, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT)
        try:
            def ready() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=5) as reply:
                        return reply.status == 200
                except (urllib.error.URLError, OSError):
                    return False
            wait_until(ready, timeout_s=60, interval_s=0.2, what="the unprivileged sidecar to be ready")
            import tritonclient.grpc as grpcclient
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{listen}")
            assert client.is_model_ready("fast")
            # The HTTP/REST port too: its parser (httptools) comes with the wheel's dependencies.
            with urllib.request.urlopen(f"http://127.0.0.1:{http_listen}/v2/models/fast/ready", timeout=10) as reply:
                assert reply.status == 200
            uid = int(Path(f"/proc/{proc.pid}/status").read_text().split("Uid:")[1].split()[0])
            assert uid == (65534 if os.geteuid() == 0 else os.geteuid())
        finally:
            proc.terminate()
            assert proc.wait(60) == 0, log_path.read_text()
