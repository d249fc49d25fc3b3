"""Run the real tritonserver from the nvidia-pytriton wheel, CPU-only if need be.

For the tests, the demo and `tritonpilot triton`. The wheel ships Triton 2.51
with its Python backend, but that backend needs the stub built for the running
Python beside `libtriton_python.so`, so a small writable backend tree is built
once per wheel and Python version in a cache dir (docs/triton-notes.md).

Triton runs in its own process group (with the Python-backend stub processes
it forks), so stopping it means stopping the group: nothing is left behind.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

import structlog
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonpilot.ports import free_ports

log = structlog.get_logger(__name__)

INSTALL_HINT = "pip install 'tritonpilot[embedded]'"
_DISTRIBUTION = "nvidia-pytriton"
_READY_POLL_S = 0.2
_LOG_TAIL_LINES = 40
# How Triton says a listening port is taken: "Socket '127.0.0.1:8001' already in use".
_PORT_TAKEN = re.compile(r"Socket '[^']*:(\d+)' already in use")
# How Triton says an endpoint failed after gRPC was up; it exits right after.
_ENDPOINT_FAILED = "failed to start"


class EmbeddedTritonError(RuntimeError):
    """Base of every error this module raises."""


class TritonNotInstalledError(EmbeddedTritonError):
    """The nvidia-pytriton wheel (the `embedded` extra) is missing or incomplete."""


class TritonStartError(EmbeddedTritonError):
    """tritonserver exited, or was not ready in time; the message holds its log tail."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # None: it was still running (timeout)


# --------------------------------------------------------------------------- wheel


@dataclass(frozen=True)
class TritonDistribution:
    """Where the wheel put tritonserver, its backends and its bundled libraries."""

    version: str
    server_dir: Path  # .../site-packages/pytriton/tritonserver
    libs_dir: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    def stub(self, python_version: str) -> Path:
        return self.server_dir / "python_backend_stubs" / python_version / "triton_python_backend_stub"


def find_distribution() -> TritonDistribution:
    """Locate the wheel without importing pytriton (its import is slow and unneeded)."""
    try:
        version = importlib.metadata.version(_DISTRIBUTION)
        spec = importlib.util.find_spec("pytriton")
    except importlib.metadata.PackageNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalledError(
            f"the embedded Triton needs the {_DISTRIBUTION} wheel, not installed for {sys.executable}: {INSTALL_HINT}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    dist = TritonDistribution(
        version=version,
        server_dir=package_dir / "tritonserver",
        libs_dir=package_dir.parent / "nvidia_pytriton.libs",
    )
    for needed in (dist.binary, dist.server_dir / "backends" / "python" / "libtriton_python.so", dist.libs_dir):
        if not needed.exists():
            raise TritonNotInstalledError(
                f"{_DISTRIBUTION} {version} is incomplete, {needed} is missing: {INSTALL_HINT}")
    return dist


def python_version() -> str:
    """The stub must match the Python whose libpython it embeds: ours."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def default_cache_dir() -> Path:
    override = os.environ.get("TRITONPILOT_CACHE_DIR")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritonpilot"


def backend_dir(dist: TritonDistribution, cache_dir: Path | None = None) -> Path:
    """The `--backend-directory` to use: a writable copy of the wheel's, plus our stub.

    Built once. Two processes may build at the same time (parallel test runs):
    each builds in its own temp dir and renames it into place; rename is atomic,
    the loser throws its copy away. The name carries a hash of the wheel's path
    because the tree links to that wheel's libraries.
    """
    pyver = python_version()
    stub = dist.stub(pyver)
    if not stub.exists():
        available = sorted(p.name for p in (dist.server_dir / "python_backend_stubs").iterdir())
        raise TritonNotInstalledError(
            f"{_DISTRIBUTION} {dist.version} has no Python-backend stub for Python {pyver} (it has {available})"
        )
    cache_dir = cache_dir or default_cache_dir()
    where = hashlib.sha256(str(dist.server_dir.resolve()).encode()).hexdigest()[:8]
    tree = cache_dir / f"triton-{dist.version}-py{pyver}-{where}"
    backends = tree / "pytriton" / "tritonserver" / "backends"
    if _tree_is_complete(backends):
        return backends
    if tree.exists():  # half-built by hand or its wheel was reinstalled: move it aside, build again
        _discard(tree)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{tree.name}.", dir=cache_dir))
    try:
        python_dir = staging / "pytriton" / "tritonserver" / "backends" / "python"
        python_dir.mkdir(parents=True)
        wheel_python_dir = dist.server_dir / "backends" / "python"
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(wheel_python_dir / name, python_dir / name)
        shutil.copy2(stub, python_dir / stub.name)
        # libtriton_python.so and the stub find their libraries through
        # RPATH $ORIGIN/../../../../nvidia_pytriton.libs, i.e. beside `pytriton/`.
        (staging / "nvidia_pytriton.libs").symlink_to(dist.libs_dir.resolve(), target_is_directory=True)
        try:
            os.rename(staging, tree)
            log.info("triton_backend_tree_built", path=str(tree), wheel_version=dist.version, python=pyver)
        except OSError:
            if not _tree_is_complete(backends):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return backends


def _tree_is_complete(backends: Path) -> bool:
    python_dir = backends / "python"
    libs = backends.parent.parent.parent / "nvidia_pytriton.libs"
    return ((python_dir / "triton_python_backend_stub").exists()
            and (python_dir / "libtriton_python.so").exists()
            and libs.is_dir())


def _discard(tree: Path) -> None:
    """Rename first, so no reader ever sees a tree being deleted."""
    trash = tree.with_name(f".trash-{tree.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(tree, trash)
    except OSError:
        return  # someone else moved it already
    shutil.rmtree(trash, ignore_errors=True)


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver, so the stubs run *this* Python with *its* packages.

    The stub embeds libpython: LD_LIBRARY_PATH picks ours rather than the system's.
    The first `python3` on PATH decides the stub's sys.prefix, hence its site-packages.
    """
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    bindir = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH", "")) if p)
    return env


def model_names(model_repository: Path) -> list[str]:
    """Every model directory in a repository: a dir with a config.pbtxt or a numbered version."""
    names = []
    for entry in sorted(model_repository.iterdir()):
        if not entry.is_dir() or entry.name.startswith((".", "_")):
            continue
        if (entry / "config.pbtxt").exists() or any(v.is_dir() and v.name.isdigit() for v in entry.iterdir()):
            names.append(entry.name)
    return names


# --------------------------------------------------------------------------- processes


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc.

    Not `killpg(pgid, 0)`: it also counts zombies, and here PID 1 may never
    reap the stubs that outlive tritonserver.
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


def _wait_group_empty(pgid: int, timeout_s: float) -> list[int]:
    """Poll until the group is empty or the time is up; returns who is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = group_members(pgid)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # Only while the group has live members: once empty its id may be reused.
    if group_members(pgid):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass


_libc: ctypes.CDLL | None = None


def _die_with_parent_fn() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM tritonserver if we die first.

    Covers what finalizers cannot: a test run killed hard (pytest-timeout's
    thread method calls os._exit). The kernel sends it when the *thread* that
    forked exits, so it is only used from the main thread, which lives as long
    as the process.
    """
    global _libc
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    if _libc is None:  # loaded here, in the parent: the child must only make the call
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc = _libc

    def set_pdeathsig() -> None:
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return set_pdeathsig


def _disabled(args: Sequence[str], flag: str) -> bool:
    """Whether `args` turn a boolean tritonserver flag off (`--flag=false` or `--flag false`)."""
    falsy = {"false", "0", "off", "no"}
    for i, arg in enumerate(args):
        if arg.startswith(flag + "=") and arg.split("=", 1)[1].lower() in falsy:
            return True
        if arg == flag and i + 1 < len(args) and args[i + 1].lower() in falsy:
            return True
    return False


def _client_host(host: str) -> str:
    """Where a client on this machine connects when the server binds `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# Instances still running at interpreter exit are stopped: nobody leaks a tritonserver.
_live: weakref.WeakSet[EmbeddedTriton] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for triton in list(_live):
        triton.kill()


# --------------------------------------------------------------------------- server


class EmbeddedTriton:
    """One tritonserver process (explicit model control) on loopback ports.

    >>> with EmbeddedTriton("tests/models", load_models=["fast"]) as triton:
    ...     client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)

    Ports left as None are picked free at construction and kept for the life of
    the object, so `restart()` comes back where clients expect it.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        load_models: Sequence[str] | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 60.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise EmbeddedTritonError(f"model_repository={str(model_repository)!r} is not a directory")
        self.load_models = list(model_names(self.model_repository) if load_models is None else load_models)
        self.host = host
        self.extra_args = tuple(extra_args)
        self.startup_timeout_s = startup_timeout_s
        # Which ports we chose ourselves: only those may be re-picked when taken.
        self._auto_ports = {"grpc": grpc_port is None, "http": http_port is None, "metrics": metrics_port is None}
        picked = iter(free_ports(3, host))  # three at once: never the same port twice
        self._ports = {
            "grpc": grpc_port or next(picked),
            "http": http_port or next(picked),
            "metrics": metrics_port or next(picked),
        }
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="tritonpilot-triton-")) / "tritonserver.log"
        self._log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where the current run's lines start in the log file

    # ---- addresses

    @property
    def grpc_port(self) -> int:
        return self._ports["grpc"]

    @property
    def http_port(self) -> int:
        return self._ports["http"]

    @property
    def metrics_port(self) -> int:
        return self._ports["metrics"]

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc and grpc channels take it."""
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self._log_path

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, backend_directory: Path) -> list[str]:
        args = [
            str(find_distribution().binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.load_models),
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
        ]
        return args + list(self.extra_args)

    # ---- lifecycle

    def start(self, wait: bool = True, attempts: int = 3) -> EmbeddedTriton:
        """Start tritonserver and (by default) wait until it and its models are ready.

        Two start-up failures are worth another try, up to `attempts` in all:
        a port we picked ourselves was taken by someone else before Triton bound
        it (fresh ones are picked), and a crash by a signal before it was ready
        (seen once under load here: gRPC's pthread_create failing with EAGAIN).
        Anything else (a model that fails to load) raises at once. On any
        failure nothing is left running.
        """
        if self.is_running():
            raise EmbeddedTritonError(f"tritonserver is already running (pid {self.pid})")
        backends = backend_dir(find_distribution())
        for attempt in range(1, attempts + 1):
            self._spawn(backends)
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except TritonStartError as error:
                self.stop()
                reason = self._retry_reason(error)
                if attempt == attempts or reason is None:
                    raise
                log.warning("triton_start_retry", attempt=attempt, reason=reason, ports=dict(self._ports))
            except BaseException:  # Ctrl-C while waiting: `with` never reaches __exit__ from __enter__
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _spawn(self, backends: Path) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as log_file:
            self._log_offset = log_file.tell()
            # The child keeps its own copy of the descriptor.
            self._proc = subprocess.Popen(
                self.command(backends),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=server_env(),
                cwd=str(self.model_repository),
                start_new_session=True,  # its own process group: the stubs join it
                preexec_fn=_die_with_parent_fn(),
            )
        _live.add(self)
        log.info(
            "triton_started",
            pid=self._proc.pid,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
            models=self.load_models,
            log_path=str(self._log_path),
        )

    def _retry_reason(self, error: TritonStartError) -> str | None:
        """Why a failed start is worth another try (re-picking taken ports), or None."""
        taken = {int(port) for port in _PORT_TAKEN.findall(self.log_tail(lines=10_000))}
        taken_names = [name for name, port in self._ports.items() if port in taken]
        if taken_names:
            if not all(self._auto_ports[name] for name in taken_names):
                return None  # a port the caller chose: theirs to fix
            others = {port for name, port in self._ports.items() if name not in taken_names}
            fresh = iter(port for port in free_ports(len(taken_names) + len(others), self.host)
                         if port not in others)
            for name in taken_names:
                self._ports[name] = next(fresh)
            return f"port taken: {', '.join(taken_names)}"
        if error.exit_code is not None and error.exit_code < 0:
            return f"crashed by signal {-error.exit_code}"
        return None

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server, every model in `load_models`, HTTP and metrics are up.

        HTTP and metrics count because Triton reports ready over gRPC before it
        binds them, and exits if one of their ports is taken. Raises
        TritonStartError with the log tail when the process exits first or the
        time runs out; never blocks past the timeout.
        """
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while True:
                if self._proc is None:
                    raise TritonStartError("tritonserver was never started")
                code = self._proc.poll()
                if code is not None:
                    raise TritonStartError(
                        f"tritonserver exited with code {code} before it was ready; "
                        f"log {self._log_path}:\n{self.log_tail()}",
                        exit_code=code,
                    )
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise TritonStartError(
                        f"tritonserver (pid {self.pid}) was not ready within {timeout_s:g} s "
                        f"(models {self.load_models}); log {self._log_path}:\n{self.log_tail()}"
                    )
                if self._is_ready(client, probe_timeout_s=max(0.1, min(2.0, left_s))):
                    log.info("triton_ready", pid=self.pid, grpc_url=self.grpc_url)
                    return
                time.sleep(_READY_POLL_S)
        finally:
            client.close()

    def _is_ready(self, client: grpcclient.InferenceServerClient, probe_timeout_s: float) -> bool:
        try:
            if not client.is_server_ready(client_timeout=probe_timeout_s):
                return False
            for name in self.load_models:
                if not client.is_model_ready(name, client_timeout=probe_timeout_s):
                    return False
        except InferenceServerException:
            return False  # not listening yet
        urls = []
        if not _disabled(self.extra_args, "--allow-http"):
            urls.append(f"{self.http_url}/v2/health/ready")
        if not _disabled(self.extra_args, "--allow-metrics"):
            urls.append(self.metrics_url)
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=probe_timeout_s) as response:
                    if response.status != 200:
                        return False
            except (OSError, urllib.error.URLError):
                return False
        # Another server on "our" HTTP port would answer too; Triton's own words decide.
        return _ENDPOINT_FAILED not in self.log_tail(lines=10_000)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop tritonserver and its stubs; SIGKILL whatever is left after `timeout_s`.

        SIGTERM goes to tritonserver alone: it then unloads its models, which
        stops their stubs in order (a stub signalled directly makes Triton log
        spurious errors). The group's SIGKILL then catches any straggler.
        """
        proc = self._proc
        if proc is None:
            return
        started = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        left = _wait_group_empty(proc.pid, max(0.0, timeout_s - (time.monotonic() - started)))
        forced = proc.poll() is None or bool(left)
        if forced:
            _signal_group(proc.pid, signal.SIGKILL)
        self._reap(proc)
        log.info(
            "triton_stopped",
            pid=proc.pid,
            exit_code=proc.returncode,
            forced=forced,
            took_s=round(time.monotonic() - started, 3),
        )

    def kill(self) -> None:
        """SIGKILL tritonserver and its stubs at once: the "Triton died" of tests."""
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        self._reap(proc)
        log.info("triton_killed", pid=proc.pid)

    def restart(self, wait: bool = True) -> EmbeddedTriton:
        """Stop (if running) and start again on the same ports."""
        self.stop()
        self._auto_ports = dict.fromkeys(self._auto_ports, False)  # clients know these ports now
        return self.start(wait=wait)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # cannot happen after SIGKILL, short of a kernel hang
            log.warning("triton_not_reaped", pid=proc.pid)
        left = _wait_group_empty(proc.pid, 5.0)
        if left:
            log.warning("triton_group_left_behind", pgid=proc.pid, pids=left)
        self._proc = None
        _live.discard(self)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines this run wrote to the log."""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EmbeddedTriton:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"EmbeddedTriton({str(self.model_repository)!r}, grpc_url={self.grpc_url!r}, {state})"


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", required=True, type=Path, help="Triton model repository")
    parser.add_argument(
        "--load-model",
        action="append",
        dest="load_models",
        metavar="NAME",
        help="model to load at start-up (repeatable; default: every model in the repository)",
    )
    parser.add_argument("--grpc-port", type=int, help="default: a free port")
    parser.add_argument("--http-port", type=int, help="default: a free port")
    parser.add_argument("--metrics-port", type=int, help="default: a free port")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--log-file", type=Path, help="tritonserver's log (default: a file in a temp dir)")
    parser.add_argument("--startup-timeout-s", type=float, default=120.0, help="default %(default)s")


def run(args: argparse.Namespace) -> int:
    """Start Triton, print where it is, serve until Ctrl-C or SIGTERM, stop cleanly."""
    stop_requested = threading.Event()
    starting = True

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()
        if starting:  # break out of the wait for READY; start() then stops what it began
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        triton = EmbeddedTriton(
            args.model_repository,
            load_models=args.load_models,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            log_path=args.log_file,
            startup_timeout_s=args.startup_timeout_s,
            host=args.host,
        )
        with triton:
            starting = False
            print(f"tritonserver pid {triton.pid} ready, models: {', '.join(triton.load_models) or '(none)'}")
            print(f"  grpc     {triton.grpc_url}")
            print(f"  http     {triton.http_url}")
            print(f"  metrics  {triton.metrics_url}")
            print(f"  log      {triton.log_path}")
            print("Ctrl-C to stop.", flush=True)
            while not stop_requested.wait(0.5):
                if not triton.is_running():
                    print(f"tritonserver exited; log {triton.log_path}:\n{triton.log_tail()}", file=sys.stderr)
                    return 1
        print("tritonserver stopped.", flush=True)
        return 0
    except EmbeddedTritonError as error:
        print(f"tritonpilot triton: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted before tritonserver was ready; stopped.", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
