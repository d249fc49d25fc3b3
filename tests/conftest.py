"""Shared fixtures: real tritonservers on free loopback ports.

- `triton`: ONE server for the whole session with every model in tests/models
  loaded. Share it, never stop, kill or reload it; a test that does any of that
  takes its own from `triton_factory`.
- `triton_factory(...)`: private servers for one test, stopped at its teardown
  (also when it fails), with the same arguments as EmbeddedTriton.
- `free_port`: a free loopback TCP port.
- `models_dir`: tests/models (each model is described in its config.pbtxt).

Tests that use a Triton fixture get the `triton` marker automatically
(`-m "not triton"` skips them); mark them explicitly too, for the reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tritonpilot.ports import free_port as _free_port
from tritonpilot.tools.embedded import EmbeddedTriton

MODELS_DIR = Path(__file__).parent / "models"
# Seven Python-backend models take 3-15 s to load here; leave room for a busy machine.
STARTUP_TIMEOUT_S = 180.0
_TRITON_FIXTURES = {"triton", "triton_factory", "_triton_session"}

log = structlog.get_logger(__name__)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _TRITON_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.triton)


@pytest.fixture
def free_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS_DIR


@pytest.fixture(scope="session")
def _triton_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    log_path = tmp_path_factory.mktemp("triton-session") / "tritonserver.log"
    with EmbeddedTriton(MODELS_DIR, log_path=log_path, startup_timeout_s=STARTUP_TIMEOUT_S) as triton:
        yield triton


@pytest.fixture
def triton(_triton_session: EmbeddedTriton) -> EmbeddedTriton:
    """The shared server. If an earlier test broke it, it comes back on the same ports."""
    if not _triton_session.is_running():
        log.warning("session_triton_restarted", log_path=str(_triton_session.log_path))
        _triton_session.restart()
    return _triton_session


@pytest.fixture
def triton_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedTriton]]:
    """make(model_repository=tests/models, load_models=None (all), start=True, **EmbeddedTriton kwargs)."""
    made: list[EmbeddedTriton] = []

    def make(
        model_repository: str | Path = MODELS_DIR,
        load_models: list[str] | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> EmbeddedTriton:
        kwargs.setdefault("log_path", tmp_path / f"tritonserver-{len(made)}.log")
        kwargs.setdefault("startup_timeout_s", STARTUP_TIMEOUT_S)
        triton = EmbeddedTriton(model_repository, load_models=load_models, **kwargs)
        made.append(triton)
        if start:
            triton.start()
        return triton

    yield make
    for triton in made:
        triton.stop()


# ------------------------------------------------------------------------------ the proxy
# Fixtures for the proxy tests (tests/test_proxy_*.py); helpers in tests/proxy_support.py.

from proxy_support import PROXY_MODELS_DIR, Gates, ServeProcess, SidecarThread, sidecar_config  # noqa: E402


@pytest.fixture
def sidecar_factory() -> Iterator[Callable[..., SidecarThread]]:
    """make(triton_url, **SidecarConfig fields): a Sidecar in this process, on its own uvloop
    loop in a thread, on free loopback ports; stopped (gracefully) at teardown."""
    made: list[SidecarThread] = []

    def make(triton_url: str, **config: Any) -> SidecarThread:
        sidecar = SidecarThread(sidecar_config(triton_url, **config))
        made.append(sidecar)
        return sidecar

    yield make
    for sidecar in made:
        sidecar.stop()


@pytest.fixture
def sidecar(triton: EmbeddedTriton, sidecar_factory: Callable[..., SidecarThread]) -> SidecarThread:
    """A fresh sidecar (fresh stats) in front of the shared `triton`."""
    return sidecar_factory(triton.grpc_url)


@pytest.fixture(scope="session")
def _gate_triton_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    log_path = tmp_path_factory.mktemp("triton-gate") / "tritonserver.log"
    with EmbeddedTriton(PROXY_MODELS_DIR, load_models=["gate", "gate_decoupled"], log_path=log_path,
                        startup_timeout_s=STARTUP_TIMEOUT_S) as triton:
        yield triton


@pytest.fixture
def gate_triton(_gate_triton_session: EmbeddedTriton) -> EmbeddedTriton:
    """A second shared server with the models of tests/proxy_models: `gate` holds requests until
    the test opens their gate, `gate_decoupled` holds the final response of each request.
    Use with `gates`; don't stop or reload it."""
    if not _gate_triton_session.is_running():
        _gate_triton_session.restart()
    return _gate_triton_session


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Gates]:
    """Gate files for this test; all opened at teardown so nothing stays held in Triton."""
    directory = tmp_path / "gates"
    directory.mkdir()
    g = Gates(directory)
    yield g
    g.open_all()


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """make(triton_url, *extra CLI args): `tritonpilot serve` as a real process on free ports
    (the HTTP port too; `--triton-http` in the extra args relays it to a Triton), up and
    answering /healthz when returned; killed at teardown if still running."""
    made: list[ServeProcess] = []

    def make(triton_url: str, *extra_args: str) -> ServeProcess:
        proc = ServeProcess(triton_url, _free_port(), _free_port(), tmp_path / f"serve-{len(made)}.log", *extra_args,
                            http_port=_free_port())
        made.append(proc)
        proc.wait_serving()
        return proc

    yield make
    for proc in made:
        proc.stop()
