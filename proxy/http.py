"""The metrics listener: /healthz, /readyz, /metrics and /status over HTTP (aiohttp).

It runs on the proxy's event loop, not in a thread of its own: scrapes then read
`ProxyStats` from the thread that owns it, and a scrape costs no lock on the hot path.
It knows nothing about Triton: readiness and status come from callables the
composition root passes in.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

_log = structlog.get_logger(__name__)

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
StatusProvider = Callable[[], dict[str, Any]]

# Status values may hold enums, paths or dataclass reprs: a readable string beats a 500.
_json_dumps = functools.partial(json.dumps, default=str)


class MetricsServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready_check: ReadyCheck, status_provider: StatusProvider | None = None,
                 ready_timeout_s: float = 5.0) -> None:
        self._host = host
        self._requested_port = port
        self._registry = registry
        self._ready_check = ready_check
        self._status_provider = status_provider
        # A probe must answer even when the check hangs (e.g. Triton stopped answering
        # mid-RPC): past this, not ready.
        self._ready_timeout_s = ready_timeout_s
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for). Valid after start()."""
        if self._port is None:
            raise RuntimeError("MetricsServer.port read before start()")
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        # No access log: Prometheus and kubelet probes would fill it with routine lines.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = _bound_port(runner)
        _log.info("metrics_listener_started", host=self._host, port=self._port)

    async def stop(self) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()
        _log.info("metrics_listener_stopped", port=self._port)

    async def _healthz(self, _request: web.Request) -> web.Response:
        # Alive means this event loop answers; Triton's state is /readyz's business.
        return web.Response(text="ok")

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, reason = await self._check_ready()
        return web.Response(status=200 if ready else 503, text=reason)

    async def _check_ready(self) -> tuple[bool, str]:
        try:
            return await asyncio.wait_for(self._ready_check(), self._ready_timeout_s)
        except TimeoutError:
            return False, f"ready check did not answer within {self._ready_timeout_s} s"
        except Exception as exc:  # noqa: BLE001 - a failing check means "not ready", not a 500
            _log.warning("ready_check_failed", error=f"{type(exc).__name__}: {exc}")
            return False, f"ready check failed: {type(exc).__name__}: {exc}"

    async def _metrics(self, request: web.Request) -> web.Response:
        # Synchronous on purpose: collectors read ProxyStats, owned by this loop's thread.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self._registry), headers={"Content-Type": content_type})

    async def _status(self, _request: web.Request) -> web.Response:
        if self._status_provider is None:
            return web.json_response({"error": "no status provider: the controller is off"},
                                     status=404)
        try:
            status = self._status_provider()
        except Exception as exc:  # noqa: BLE001 - report it to the caller, keep serving
            _log.warning("status_provider_failed", error=f"{type(exc).__name__}: {exc}")
            return web.json_response({"error": f"status failed: {type(exc).__name__}: {exc}"},
                                     status=500)
        return web.json_response(status, dumps=_json_dumps)


def _bound_port(runner: web.AppRunner) -> int:
    # addresses holds one (host, port, ...) tuple per bound socket; all share the port.
    return int(runner.addresses[0][1])
