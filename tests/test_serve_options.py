"""`tritonpilot serve` options: flag > TRITONPILOT_* environment > policy file > default,
and the same exit statuses as every subcommand (2 for a bad value wherever it came from)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from proxy_support import wait_until

from tritonpilot import cli
from tritonpilot.sidecar import serve
from tritonpilot.sidecar.config import SidecarConfig
from tritonpilot.sidecar.wiring import sidecar_config_from_policy


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser("serve").parse_args(["serve", *argv])


def _resolve(argv: tuple[str, ...], environ: dict[str, str], policy: Path | None = None) -> SidecarConfig:
    args = serve.apply_environment(serve.option_parser(), _parse(*argv), environ)
    base = sidecar_config_from_policy(args.policy)[0] if args.policy else (
        sidecar_config_from_policy(policy)[0] if policy else SidecarConfig())
    return serve.config_from_args(args, base)


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text('triton: {grpc: "policy-host:1"}\n'
                    'proxy: {listen: "127.0.0.1:1001", allow_client_model_control: true, grace_period_s: 7}\n'
                    'metrics: {listen: "127.0.0.1:1002"}\n')
    return path


def test_every_option_has_its_environment_variable_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    dests = [a.dest for a in serve.option_parser()._actions]
    assert len(dests) == 35
    for dest in dests:
        assert f"env {serve.env_name(dest)}" in text, dest
    assert "Precedence: option > environment > policy file > default." in text


def test_precedence_flag_over_environment_over_policy_over_default(policy: Path) -> None:
    env = {"TRITONPILOT_TRITON": "env-host:2", "TRITONPILOT_GRACE_PERIOD_S": "3"}
    # default: nothing anywhere
    assert _resolve((), {}) == SidecarConfig()
    # policy only
    config = _resolve(("--policy", str(policy)), {})
    assert (config.triton, config.listen, config.grace_period_s) == ("policy-host:1", "127.0.0.1:1001", 7.0)
    assert config.allow_client_model_control is True
    # environment over policy
    config = _resolve(("--policy", str(policy)), env)
    assert (config.triton, config.listen, config.grace_period_s) == ("env-host:2", "127.0.0.1:1001", 3.0)
    # flag over environment
    config = _resolve(("--policy", str(policy), "--triton", "flag-host:3"), env)
    assert (config.triton, config.grace_period_s) == ("flag-host:3", 3.0)


def test_no_proxy_from_the_flag_or_the_environment() -> None:
    assert SidecarConfig().proxy_enabled is True and _resolve((), {}).proxy_enabled is True
    assert _resolve(("--no-proxy",), {}).proxy_enabled is False
    assert _resolve((), {"TRITONPILOT_NO_PROXY": "true"}).proxy_enabled is False
    assert _resolve((), {"TRITONPILOT_NO_PROXY": "false"}).proxy_enabled is True


def test_workers_from_the_flag_or_the_environment() -> None:
    assert SidecarConfig().workers == 1 and _resolve((), {}).workers == 1
    assert _resolve(("--workers", "3"), {}).workers == 3
    assert _resolve((), {"TRITONPILOT_WORKERS": "2"}).workers == 2
    assert _resolve(("--workers", "4"), {"TRITONPILOT_WORKERS": "2"}).workers == 4


def test_the_http_port_options_from_flags_the_environment_or_off() -> None:
    default = _resolve((), {})
    assert (default.http_listen, default.triton_http, default.http_restricted_apis) == (
        "0.0.0.0:8100", "127.0.0.1:8000", ())
    config = _resolve(("--http-listen", "127.0.0.1:18100", "--triton-http", "triton:18000",
                       "--http-restricted-api", "inference:k=v"), {})
    assert (config.http_listen, config.triton_http, config.http_restricted_apis) == (
        "127.0.0.1:18100", "triton:18000", ("inference:k=v",))
    config = _resolve((), {"TRITONPILOT_HTTP_LISTEN": "off", "TRITONPILOT_TRITON_HTTP": "h:1",
                           "TRITONPILOT_HTTP_RESTRICTED_API": "health:a=b metadata:c=d"})
    assert (config.http_listen, config.triton_http, config.http_restricted_apis) == (
        "off", "h:1", ("health:a=b", "metadata:c=d"))
    with pytest.raises(ValueError, match="--http-listen: got 'nowhere'; expected HOST:PORT .* or off"):
        _resolve(("--http-listen", "nowhere"), {})
    with pytest.raises(ValueError, match="--triton-http: got 'x'"):
        _resolve(("--triton-http", "x"), {})
    with pytest.raises(ValueError, match="--http-restricted-api: got 'bogus:k=v'; unknown protocol group"):
        _resolve(("--http-restricted-api", "bogus:k=v"), {})


def test_the_policy_file_itself_can_come_from_the_environment(policy: Path) -> None:
    config = _resolve((), {"TRITONPILOT_POLICY": str(policy)})
    assert config.triton == "policy-host:1"


def test_a_flag_set_false_in_the_environment_overrides_the_policy(policy: Path) -> None:
    for text, want in (("false", False), ("0", False), ("TRUE", True), ("on", True)):
        config = _resolve(("--policy", str(policy)), {"TRITONPILOT_ALLOW_CLIENT_MODEL_CONTROL": text})
        assert config.allow_client_model_control is want, text


@pytest.mark.parametrize(("name", "value", "message"), [
    ("TRITONPILOT_GRACE_PERIOD_S", "soon", "TRITONPILOT_GRACE_PERIOD_S: got 'soon'; expected a float"),
    ("TRITONPILOT_MAX_MESSAGE_BYTES", "1.5", "TRITONPILOT_MAX_MESSAGE_BYTES: got '1.5'; expected a int"),
    ("TRITONPILOT_LOG_FORMAT", "xml", "TRITONPILOT_LOG_FORMAT: got 'xml'; expected one of json, console"),
    ("TRITONPILOT_ALLOW_CLIENT_MODEL_CONTROL", "maybe", "expected true or false"),
    ("TRITONPILOT_LISTEN", "nowhere", "--listen: got 'nowhere'; expected HOST:PORT"),
    ("TRITONPILOT_MAX_MESSAGE_BYTES", "0", "--max-message-bytes: got 0; must be >= 1"),
    ("TRITONPILOT_WORKERS", "0", "--workers: got 0; must be >= 1"),
    ("TRITONPILOT_WORKERS", "two", "TRITONPILOT_WORKERS: got 'two'; expected a int"),
])
def test_a_bad_environment_value_exits_2_naming_the_variable(
        name: str, value: str, message: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    assert cli.main(["serve"]) == 2
    assert message in capsys.readouterr().err


def test_an_invalid_policy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("control: {interval_s: 0}\n")
    assert cli.main(["serve", "--policy", str(bad)]) == 2
    assert "control.interval_s: got 0" in capsys.readouterr().err


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tritonpilot {version('tritonpilot')}"


def test_serve_configured_only_by_environment_listens_where_it_says(tmp_path: Path, free_port: int) -> None:
    """A container sets TRITONPILOT_* and runs `tritonpilot serve` with no options.
    Triton need not be up: /healthz answers and /readyz says Triton is unreachable."""
    from tritonpilot.ports import free_port as another_port
    metrics_port, triton_port = free_port, another_port()
    env = {**os.environ, "TRITONPILOT_LISTEN": f"127.0.0.1:{another_port()}",
           "TRITONPILOT_HTTP_LISTEN": f"127.0.0.1:{another_port()}",
           "TRITONPILOT_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
           "TRITONPILOT_TRITON": f"127.0.0.1:{triton_port}", "TRITONPILOT_LOG_FORMAT": "json"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "tritonpilot", "serve"], env=env, cwd=tmp_path,
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def ready_body() -> str | None:
            assert proc.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=2):
                    pass
            except OSError:
                return None
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.read().decode()
            return "ready?"
        body = wait_until(ready_body, what="serve to answer on the metrics port from the environment")
        assert f"127.0.0.1:{triton_port}" in body  # the Triton address came from TRITONPILOT_TRITON
        started = [json.loads(line) for line in log_path.read_text().splitlines()
                   if line.startswith("{") and '"sidecar.started"' in line]
        assert started and started[0]["listen"] == env["TRITONPILOT_LISTEN"]
        assert started[0]["http_listen"] == env["TRITONPILOT_HTTP_LISTEN"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_http_port_and_workers_come_from_the_policy_under_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text('triton: {http: "triton-host:18000"}\n'
                    'proxy: {http_listen: "off", workers: 3, http_restricted_apis: ["model-repository:k=v"]}\n')
    config = _resolve(("--policy", str(path)), {})
    assert (config.http_listen, config.triton_http, config.workers, config.http_restricted_apis) == (
        "off", "triton-host:18000", 3, ("model-repository:k=v",))
    config = _resolve(("--policy", str(path), "--http-listen", "127.0.0.1:18100"), {"TRITONPILOT_WORKERS": "2"})
    assert (config.http_listen, config.workers) == ("127.0.0.1:18100", 2)


@pytest.mark.parametrize(("text", "key"), [
    ('proxy: {http_listen: "nowhere"}', "proxy.http_listen"),
    ("proxy: {workers: 0}", "proxy.workers"),
    ('proxy: {http_restricted_apis: ["nosuchgroup:k=v"]}', "proxy.http_restricted_apis"),
    ('triton: {http: "host"}', "triton.http"),
])
def test_bad_http_and_worker_keys_name_their_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 text: str, key: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text + "\n")
    assert cli.main(["check", str(path)]) == 2
    assert key in capsys.readouterr().err
