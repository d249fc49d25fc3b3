"""deploy/kubernetes: the base and every overlay render offline (`kubectl kustomize`), every
rendered object is valid against the Kubernetes API's JSON schemas (tests/k8s_schemas/), and
the objects agree with each other and with the sidecar: ConfigMap names after kustomize's hash
suffixes, Service selectors and target ports, probe ports, the HPA's target and metric, the
policy the sidecar reads (resolved by the sidecar's own option code) and every metric name
the adapter rules, the HPA and the Grafana dashboard use (collected from the sidecar's real
Prometheus registry)."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_support import image_environment, sidecar_options

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (the test extra) validates the rendered objects")
referencing = pytest.importorskip("referencing")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
BASE = K8S / "base"
DASHBOARD = BASE / "grafana" / "tritonpilot-dashboard.json"
SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"
TARGETS = [BASE, *sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: the kustomizations cannot be "
                                                           "rendered (`kubectl kustomize` renders them offline)")
K8S_VERSIONS = sorted(p.name for p in (SCHEMAS / "kubernetes").glob("v*-local-strict"))
# Kinds outside the Kubernetes API: schema file by (apiVersion, kind).
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): SCHEMAS / "monitoring.coreos.com" / "podmonitor-monitoring-v1.json",
}
SIDECAR, TRITON = "tritonpilot", "tritonserver"
# The files the wheel ships from deploy/kubernetes (package data in pyproject.toml).
SHIPPED_SUFFIXES = {".yaml", ".json", ".md"}


def target_id(path: Path) -> str:
    return path.relative_to(K8S).as_posix()


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=TARGETS, ids=target_id)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the kustomizations cannot be rendered (`kubectl kustomize`)")
    return copy.deepcopy(list(render(request.param)))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = of_kind(objects, kind)
    return found


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------------
# What the sidecar really is: its options, its image's environment, its metrics




def option_env_names() -> set[str]:
    from tritonpilot.sidecar.serve import env_name

    return {env_name(a.dest) for a in sidecar_options()._actions if a.dest != "help"}




def effective_sidecar_config(args: list[str], environ: dict[str, str], policy_file: Path | None) -> Any:
    """What `tritonpilot serve ARGS` would run with, by the sidecar's own code: flags over
    environment over the policy file over defaults. `policy_file` is the host copy of the
    file the resolved --policy names (None: the test found none and the caller asserts)."""
    from tritonpilot.sidecar.config import SidecarConfig
    from tritonpilot.sidecar.serve import apply_environment, config_from_args
    from tritonpilot.sidecar.wiring import sidecar_config_from_policy

    parser = sidecar_options()
    parsed, unknown = parser.parse_known_args(args)
    assert not unknown, f"not options of `tritonpilot serve`: {unknown}"
    parsed = apply_environment(parser, parsed, environ)
    base = SidecarConfig()
    if parsed.policy is not None:
        assert policy_file is not None and policy_file.is_file(), f"the policy {parsed.policy} is not mounted"
        base, _ = sidecar_config_from_policy(policy_file)
    return parsed, config_from_args(parsed, base)


def check_policy(path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tritonpilot", "check", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"tritonpilot check {path}:\n{result.stdout}{result.stderr}"


@functools.cache
def exported_metric_names() -> frozenset[str]:
    """Every series name the sidecar's /metrics can carry: its registry, built as the sidecar
    builds it (ProxyCollector plus the controller's metrics), collected."""
    from tritonpilot.control.loop import ControllerMetrics
    from tritonpilot.proxy.gpu import GpuSample, GpuSnapshot
    from tritonpilot.proxy.metrics import ProxyCollector, new_registry
    from tritonpilot.proxy.stats import ProxyStats

    class OneGpu:  # GPU families exist only while there is GPU data
        def latest(self) -> GpuSnapshot:
            return GpuSnapshot(0.0, (GpuSample(0, "GPU-test", 0.5, 1, 2),), "test")

        async def run(self) -> None: ...

        def close(self) -> None: ...

    registry = new_registry([ProxyCollector(ProxyStats(), OneGpu(), clock=lambda: 0.0)])
    ControllerMetrics(registry)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}
    names = {family.name + s for family in registry.collect() for s in suffixes.get(family.type, ("",))}
    assert "tritonpilot_inflight_requests" in names and "tritonpilot_decisions_total" in names, names
    return frozenset(names)


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan", "Inf", "NaN"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana variable query, or a
    prometheus-adapter query template) selects."""
    expr = re.sub(r"<<[^>]*>>", " ", expr)  # prometheus-adapter templates
    expr = re.sub(r"\blabel_values\(\s*([^,()]*?)\s*,\s*\w+\s*\)", r" \1 ", expr)  # Grafana
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", " ", expr)  # Grafana variables
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"(?<![\w:.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        if match.group(0) in _PROMQL_WORDS or expr[match.end():].lstrip().startswith("("):
            continue  # a keyword, or a function or aggregation
        names.add(match.group(0))
    return names


def assert_exported(names: set[str], where: str) -> None:
    """Names the sidecar exports, or Triton's own (nv_*)."""
    unknown = sorted(n for n in names if not n.startswith("nv_") and n not in exported_metric_names())
    assert not unknown, f"{where}: the sidecar exports no {unknown}; it exports {sorted(exported_metric_names())}"


def test_promql_metric_names() -> None:
    assert promql_metric_names('histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{m=~"$model"}'
                               '[$__rate_interval])))') == {"a_bucket"}
    assert promql_metric_names("sum(x) by (pod) / on (pod) group_left y * 1e6 > bool 0.5") == {"x", "y"}
    assert promql_metric_names('label_values(up{job="a"}, instance)') == {"up"}
    assert promql_metric_names("sum(avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)") == set()


# ---------------------------------------------------------------------------------------
# Files


def test_layout_and_shipped_files() -> None:
    assert {p.name for p in K8S.iterdir()} == {"base", "overlays", "README.md"}, "pod.yaml/hpa.yaml are replaced"
    assert {p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")} >= {"dev", "production"}
    junk = [p for p in K8S.rglob("*") if p.is_file() and p.suffix not in SHIPPED_SUFFIXES]
    assert not junk, f"deploy/ ships as package data: {junk}"


def repository_json_files() -> list[str]:
    """The repository's JSON files: git's view (tracked or not ignored), else a walk that
    leaves out hidden and build folders."""
    git = shutil.which("git")
    if git is not None:
        listed = subprocess.run([git, "ls-files", "--cached", "--others", "--exclude-standard", "*.json"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        if listed.returncode == 0:
            return listed.stdout.split()
    skip = {"__pycache__", "build", "dist", "node_modules"}
    return [p.relative_to(REPO).as_posix() for p in REPO.rglob("*.json")
            if not any(part.startswith(".") or part in skip for part in p.relative_to(REPO).parts)]


def test_the_dashboard_json_exists_once() -> None:
    dashboards = sorted(path for path in repository_json_files()
                        if (REPO / path).is_file() and '"panels"' in (REPO / path).read_text(errors="replace"))
    assert dashboards == ["deploy/kubernetes/base/grafana/tritonpilot-dashboard.json"]


def test_policy_is_valid() -> None:
    check_policy(BASE / "policy.yaml")


# ---------------------------------------------------------------------------------------
# Rendering and schemas


@functools.cache
def schema_validator(version: str, api_version: str, kind: str) -> Any:
    from referencing import Registry, Resource

    if (api_version, kind) in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[(api_version, kind)].read_text())
        return jsonschema.validators.validator_for(schema)(schema)
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # apps/v1 -> apps-v1
    directory = SCHEMAS / "kubernetes" / version
    path = directory / f"{kind.lower()}-{group_version}.json"
    assert path.is_file(), f"no schema for {api_version} {kind} in {directory}: vendor it (tests/k8s_schemas/README.md)"
    schema = json.loads(path.read_text())
    definitions = Resource.from_contents(json.loads((directory / "_definitions.json").read_text()))
    registry = definitions @ Registry()
    return jsonschema.validators.validator_for(schema)(schema, registry=registry)


def schema_errors(obj: dict[str, Any], version: str) -> list[str]:
    validator = schema_validator(version, obj["apiVersion"], obj["kind"])
    errors = []
    for error in validator.iter_errors(obj):
        best = jsonschema.exceptions.best_match([error, *error.context]) if error.context else error
        errors.append(f"{obj['kind']}/{obj['metadata']['name']} at {'.'.join(map(str, best.absolute_path))}: "
                      f"{best.message[:300]}")
    return errors


@needs_kubectl
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_match_the_api_schemas(objects: list[dict[str, Any]], version: str) -> None:
    assert objects
    problems = [e for obj in objects for e in schema_errors(obj, version)]
    assert not problems, "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_schemas_are_strict(version: str) -> None:
    """The validation above really runs: an unknown or mistyped field is an error."""
    objects = list(copy.deepcopy(render(BASE)))
    deployment = one(objects, "Deployment")
    containers(deployment)[SIDECAR]["securityContext"]["runAsNonRot"] = True
    assert any("runAsNonRot" in e for e in schema_errors(deployment, version))
    service = one(objects, "Service")
    service["spec"]["ports"][0]["port"] = "8101"
    assert schema_errors(service, version)
    podmonitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
                  "spec": {"selector": {}, "podMetricsEndpoints": [{"prot": "metrics"}]}}
    assert schema_errors(podmonitor, version)


# ---------------------------------------------------------------------------------------
# References between the objects


@needs_kubectl
def test_config_map_references_exist(objects: list[dict[str, Any]]) -> None:
    config_maps = {o["metadata"]["name"]: o for o in of_kind(objects, "ConfigMap")}
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        refs = [(v["configMap"]["name"], [i["key"] for i in v["configMap"].get("items", [])])
                for v in pod.get("volumes", []) if "configMap" in v]
        refs += [(s["configMap"]["name"], [i["key"] for i in s["configMap"].get("items", [])])
                 for v in pod.get("volumes", []) if "projected" in v for s in v["projected"]["sources"]
                 if "configMap" in s]
        for c in pod["containers"] + pod.get("initContainers", []):
            refs += [(e["configMapRef"]["name"], []) for e in c.get("envFrom", []) if "configMapRef" in e]
            refs += [(e["valueFrom"]["configMapKeyRef"]["name"], [e["valueFrom"]["configMapKeyRef"]["key"]])
                     for e in c.get("env", []) if "configMapKeyRef" in e.get("valueFrom", {})]
        assert refs
        for name, keys in refs:
            assert name in config_maps, f"{deployment['metadata']['name']} uses ConfigMap {name}; " \
                                        f"the render has {sorted(config_maps)}"
            assert set(keys) <= set(config_maps[name].get("data", {})), (name, keys)


@needs_kubectl
def test_policy_config_map_is_hashed_and_is_the_policy_file(objects: list[dict[str, Any]]) -> None:
    (policy,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("tritonpilot-policy-")]
    assert policy["data"] == {"policy.yaml": (BASE / "policy.yaml").read_text()}


@needs_kubectl
def test_deployment_selects_its_pods(objects: list[dict[str, Any]]) -> None:
    for deployment in of_kind(objects, "Deployment"):
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))


def container_port(container: dict[str, Any], port: int | str) -> int | None:
    """The number a port reference (name or number) resolves to in this container, if any."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    return None


def pod_port(deployment: dict[str, Any], port: int | str) -> tuple[str, int] | None:
    for name, c in containers(deployment).items():
        number = container_port(c, port)
        if number is not None:
            return name, number
    return None


@needs_kubectl
def test_services_select_pods_and_target_their_ports(objects: list[dict[str, Any]]) -> None:
    deployments = of_kind(objects, "Deployment")
    for service in of_kind(objects, "Service"):
        targets = [d for d in deployments if selects(service["spec"]["selector"], pod_labels(d))]
        assert targets, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for d in targets:
                target = port.get("targetPort", port["port"])
                assert pod_port(d, target) is not None, (service["metadata"]["name"], port)


@needs_kubectl
def test_probes_use_ports_of_their_container(objects: list[dict[str, Any]]) -> None:
    for deployment in of_kind(objects, "Deployment"):
        for name, c in containers(deployment).items():
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                action = next(probe[a] for a in ("httpGet", "tcpSocket", "grpc", "exec") if a in probe)
                if "port" in action:
                    assert container_port(c, action["port"]) is not None, f"{name}.{kind}: port {action['port']}"


@needs_kubectl
def test_disruption_budgets_and_pod_monitors_select_pods(objects: list[dict[str, Any]]) -> None:
    deployments = of_kind(objects, "Deployment")
    for obj in of_kind(objects, "PodDisruptionBudget") + of_kind(objects, "PodMonitor"):
        targets = [d for d in deployments if selects(obj["spec"]["selector"]["matchLabels"], pod_labels(d))]
        assert targets, f"{obj['kind']} {obj['metadata']['name']} selects no pods"
        for endpoint in obj["spec"].get("podMetricsEndpoints", []):
            assert all(pod_port(d, endpoint["port"]) for d in targets), endpoint
    for monitor in of_kind(objects, "PodMonitor"):
        scraped = {pod_port(d, e["port"]) for d in deployments for e in monitor["spec"]["podMetricsEndpoints"]}
        assert (SIDECAR, 9101) in scraped and (TRITON, 8002) in scraped, scraped


def adapter_rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rules = []
    for cm in of_kind(objects, "ConfigMap"):
        text = cm.get("data", {}).get("config.yaml")
        if text is not None:
            rules += yaml.safe_load(text)["rules"]
    return rules


def adapter_metric_names(rule: dict[str, Any]) -> set[str]:
    """The names a prometheus-adapter rule serves: its series' names through name.matches/as."""
    pattern = re.compile(rule.get("name", {}).get("matches", "^(.*)$"))
    replacement = rule.get("name", {}).get("as", "${1}" if pattern.groups else "$0")
    go_to_python = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", replacement)
    return {pattern.sub(go_to_python, series) for series in promql_metric_names(rule["seriesQuery"])
            if pattern.search(series)}


@needs_kubectl
def test_autoscaler_targets_the_deployment_on_an_adapter_metric(objects: list[dict[str, Any]]) -> None:
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    deployments = {d["metadata"]["name"] for d in of_kind(objects, "Deployment")}
    served = {name for rule in adapter_rules(objects) for name in adapter_metric_names(rule)}
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment") and ref["name"] in deployments, ref
        pod_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        assert pod_metrics, "the HPA scales on the sidecar's Pods metric"
        assert pod_metrics <= served, f"HPA metrics {pod_metrics}; the adapter rules serve {served}"
        assert_exported(pod_metrics, f"HPA {hpa['metadata']['name']}")
        # Its pods are not pinned by the manifest: the HPA owns the replica count.
        assert all("replicas" not in d["spec"] for d in of_kind(objects, "Deployment")
                   if d["metadata"]["name"] == ref["name"])


@needs_kubectl
def test_adapter_rules_expose_inflight_per_pod(objects: list[dict[str, Any]]) -> None:
    rules = adapter_rules(objects)
    if not of_kind(objects, "HorizontalPodAutoscaler"):
        assert not rules, "adapter rules without an HPA"
        return
    for rule in rules:
        assert set(rule) >= {"seriesQuery", "resources", "name", "metricsQuery"}, rule
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for field in ("seriesQuery", "metricsQuery"):
            assert_exported(promql_metric_names(rule[field]), f"adapter rule {field}")
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    assert "tritonpilot_inflight_requests" in {n for r in rules for n in adapter_metric_names(r)}


# ---------------------------------------------------------------------------------------
# The pod: Triton, and the sidecar as its options resolve


def triton_flags(container: dict[str, Any]) -> dict[str, str]:
    command = container.get("command", []) + container.get("args", [])
    assert command[0] == "tritonserver", command
    return dict(arg[2:].split("=", 1) for arg in command[1:])


@needs_kubectl
def test_triton_container(objects: list[dict[str, Any]]) -> None:
    triton = containers(one(objects, "Deployment"))[TRITON]
    flags = triton_flags(triton)
    assert flags["model-control-mode"] == "explicit" and flags["model-repository"] == "/models"
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"triton-http": int(flags["http-port"]), "triton-grpc": int(flags["grpc-port"]),
                     "triton-metrics": int(flags["metrics-port"])}
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"] >= 300
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    resources = triton["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"].get("nvidia.com/gpu", 1) == 1
    assert any(m["mountPath"] == "/models" for m in triton["volumeMounts"])


@needs_kubectl
def test_sidecar_security_and_gpu(objects: list[dict[str, Any]]) -> None:
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = containers(deployment)[SIDECAR]
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    for name, c in containers(deployment).items():
        assert c["resources"]["requests"] and c["resources"]["limits"], f"{name}: requests and limits"
        assert {"livenessProbe", "readinessProbe"} <= set(c), f"{name}: liveness and readiness"
    # Only Triton gets a GPU; the sidecar none, and no NVML: GPU data from Triton's metrics.
    assert not any("nvidia.com/gpu" in sidecar["resources"].get(k, {}) for k in ("requests", "limits"))
    env = {e["name"]: e.get("value") for e in sidecar.get("env", [])}
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "void"


def mounted_file(deployment: dict[str, Any], container: dict[str, Any], path: str,
                 config_maps: dict[str, dict[str, Any]]) -> str | None:
    """The text a container sees at `path` when a ConfigMap volume provides it."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" not in volume:
            continue
        data = config_maps[volume["configMap"]["name"]]["data"]
        keys = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])} or {k: k for k in data}
        if "subPath" in mount:
            if path == mount["mountPath"]:
                return data[keys[mount["subPath"]]]
        elif path.startswith(mount["mountPath"].rstrip("/") + "/"):
            relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
            if relative in keys:
                return data[keys[relative]]
    return None


def prestop_sleep_s(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


@needs_kubectl
def test_sidecar_options_agree_with_the_pod(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    deployment = one(objects, "Deployment")
    sidecar, triton = containers(deployment)[SIDECAR], containers(deployment)[TRITON]
    config_maps = {o["metadata"]["name"]: o for o in of_kind(objects, "ConfigMap")}
    assert "command" not in sidecar, "the image's ENTRYPOINT (`tritonpilot serve`) runs"
    container_env = {e["name"]: e["value"] for e in sidecar.get("env", []) if "value" in e}
    unknown = sorted(n for n in container_env if n.startswith("TRITONPILOT_") and n not in option_env_names())
    assert not unknown, f"no such option of `tritonpilot serve`: {unknown}"
    environ = {**image_environment(), **container_env}

    parsed = sidecar_options().parse_known_args(sidecar.get("args", []))[0]
    policy_path = parsed.policy or environ.get("TRITONPILOT_POLICY")
    text = mounted_file(deployment, sidecar, policy_path, config_maps) if policy_path else None
    assert text is not None, f"the sidecar's policy {policy_path} comes from no ConfigMap volume"
    host_copy = tmp_path / "policy.yaml"
    host_copy.write_text(text)
    check_policy(host_copy)
    _, config = effective_sidecar_config(sidecar.get("args", []), environ, host_copy)

    flags = triton_flags(triton)
    host, _, port = config.triton.rpartition(":")
    assert host in {"127.0.0.1", "localhost"} and int(port) == int(flags["grpc-port"]), config.triton
    url = urlsplit(config.triton_metrics_url or "")
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", int(flags["metrics-port"]), "/metrics"), \
        "no NVML in the sidecar: its GPU data must come from Triton's metrics endpoint"
    host, _, port = config.triton_http.rpartition(":")
    assert host in {"127.0.0.1", "localhost"} and int(port) == int(flags["http-port"]), config.triton_http
    for address, port_name in ((config.listen, "grpc"), (config.http_listen, "http"),
                               (config.metrics_listen, "metrics")):
        host, _, port = address.rpartition(":")
        assert host == "0.0.0.0", f"{address}: unreachable from outside the container"
        assert container_port(sidecar, port_name) == int(port), (address, port_name)
    metrics_port = int(config.metrics_listen.rpartition(":")[2])
    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        probe = sidecar[kind]["httpGet"]
        assert probe["path"] == path and container_port(sidecar, probe["port"]) == metrics_port, (kind, probe)
    # Shutdown: the sidecar drains within the pod's grace period, while Triton still serves.
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drained = prestop_sleep_s(sidecar) + config.grace_period_s
    assert drained <= prestop_sleep_s(triton) < grace, (drained, prestop_sleep_s(triton), grace)


@needs_kubectl
def test_overlays_differ_as_intended() -> None:
    dev = list(render(K8S / "overlays" / "dev"))
    production = list(render(K8S / "overlays" / "production"))
    assert one(dev, "Deployment")["spec"]["replicas"] == 1
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "PodMonitor"):
        assert not of_kind(dev, kind) and len(of_kind(production, kind)) == 1, kind
    assert one(production, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


# ---------------------------------------------------------------------------------------
# The Grafana dashboard


def dashboard_queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        if node.get("type") == "query" and "query" in node:  # a templating variable
            query = node["query"]
            yield query["query"] if isinstance(query, dict) else query
        for value in node.values():
            yield from dashboard_queries(value)
    elif isinstance(node, list):
        for value in node:
            yield from dashboard_queries(value)


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(dashboard_queries(dashboard))
    assert queries
    used: set[str] = set()
    for query in queries:
        names = promql_metric_names(query)
        assert names, f"no metric in {query!r}"
        assert_exported(names, f"dashboard query {query!r}")
        used |= names
    wanted = {"tritonpilot_inflight_requests", "tritonpilot_model_instances", "tritonpilot_model_profile",
              "tritonpilot_reloads_total", "tritonpilot_reload_duration_seconds_bucket", "tritonpilot_decisions_total",
              "tritonpilot_gpu_utilization_ratio", "tritonpilot_gpu_memory_used_bytes",
              "tritonpilot_requests_total", "tritonpilot_request_duration_seconds_bucket"}
    assert wanted <= used, f"no panel for {sorted(wanted - used)}"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for p in panels)
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert (variable["name"], variable["query"]) == ("datasource", "prometheus")


@needs_kubectl
def test_dashboard_config_map(objects: list[dict[str, Any]]) -> None:
    (config_map,) = [o for o in of_kind(objects, "ConfigMap") if "tritonpilot-dashboard.json" in o.get("data", {})]
    assert config_map["metadata"]["name"] == "tritonpilot-dashboard"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"]["tritonpilot-dashboard.json"] == DASHBOARD.read_text()
