"""`serve --workers N`: N relay processes sharing the client ports.

The parent (serve.py's Sidecar) keeps the controller, the metrics listener, the GPU sampler
and the policy reloader; it reads the workers' counters from shared memory
(proxy/shared_stats.py). Each worker is a spawned process (not forked: the parent runs
uvloop and grpc threads) that relays its own connections on its own uvloop, listening on
the same ports with SO_REUSEPORT, so the kernel spreads new connections over them.

- Ports: the parent binds each client port itself first (SO_REUSEPORT, not listening: the
  kernel gives it no connection), which reserves the port and resolves port 0, and keeps
  it bound until it stops.
- Messages, parent -> worker, over a Pipe each: the reloaded config (live relay settings,
  applied to open connections too; logged by each worker as `worker.reconfigured`), a TLS
  reload (`worker.tls_reloaded`). SIGHUP goes to the parent alone (workers ignore it): it
  reloads the policy and the TLS files and sends them on. What needs a restart in one
  process (listeners, connection and HTTP/2 limits: sidecar/reload.py) needs one here too.
  A worker restarted later starts with the reloaded config and reads the TLS files as they
  are then. Worker -> parent:
  "ready" once it listens.
- The parent's death, even by SIGKILL: each worker's pipe reads end of file, and the worker
  drains (open calls finish within the grace period) and exits. The shared table has no
  name (proxy/shared_stats.py): nothing is left behind.
- SIGTERM: the parent sends SIGTERM to every worker; each drains within the grace
  period as a single-process sidecar does, publishes its last counts and exits 0.
- A worker that dies is logged and restarted after a backoff (0.5 s, doubling to 10 s
  while it keeps dying within 10 s of its start); its in-flight cells are cleared and its
  last published totals kept before its successor starts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import structlog

from tritonpilot.logs import configure_logging
from tritonpilot.proxy.http_relay import HttpRelay, HttpRelayOptions
from tritonpilot.proxy.limits import ConnectionsSnapshot
from tritonpilot.proxy.metrics import summed_connections
from tritonpilot.proxy.relay import Relay, RelayOptions
from tritonpilot.proxy.restrict import parse_restrictions
from tritonpilot.proxy.shared_stats import (
    PUBLISH_PERIOD_S,
    SharedProxyStats,
    SharedStatsReader,
    SharedStatsTable,
    TableHandle,
)
from tritonpilot.proxy.shedding import InflightCaps
from tritonpilot.proxy.stats import ProxyStats
from tritonpilot.proxy.tls import ALPN_HTTP1, ServerTls, TlsError, upstream_context
from tritonpilot.sidecar.config import (
    HTTP_OFF,
    SidecarConfig,
    connection_limits,
    http2_limits,
    parse_host_port,
    tls_files,
)

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

log = structlog.get_logger(__name__)

RESTART_BACKOFF_S = (0.5, 10.0)  # first delay, cap
STABLE_AFTER_S = 10.0            # a worker that ran this long restarts after the first delay again
READY_TIMEOUT_S = 60.0


class RelaySet:
    """The client-facing relays one process runs: gRPC, and HTTP/REST unless off."""

    def __init__(self, config: SidecarConfig, stats: ProxyStats) -> None:
        host, port = parse_host_port(config.triton, "--triton")
        # Raises TlsError (naming the option) for files that can't be used: run() checks first.
        self.tls = ServerTls(tls_files(config)) if config.tls_cert else None
        upstream_ssl = upstream_context(config.triton_tls_ca) if config.triton_tls_ca else None
        # What both relays take alike: the front door's rules and the connection settings.
        common: dict[str, Any] = dict(
            allow_client_model_control=config.allow_client_model_control,
            max_message_bytes=config.max_message_bytes,
            connect_timeout_s=config.connect_timeout_s,
            tcp_keepalive_s=config.tcp_keepalive_s,
            limits=connection_limits(config),
            max_inflight=InflightCaps(config.max_inflight, dict(config.model_max_inflight)))
        self.relay = Relay(RelayOptions(
            upstream_host=host, upstream_port=port, **common,
            http2=http2_limits(config),
            server_ssl=self.tls.listener if self.tls else None,
            upstream_ssl=upstream_ssl,
            restricted_protocols=parse_restrictions(config.restricted_protocols)), stats)
        # The HTTP/REST port: the same front door, its own listener and connection guard.
        self.http_tls = ServerTls(tls_files(config), alpn=(ALPN_HTTP1,)) if config.tls_cert else None
        self.http_relay: HttpRelay | None = None
        if config.proxy_enabled and config.http_listen != HTTP_OFF:
            hhost, hport = parse_host_port(config.triton_http, "--triton-http")
            self.http_relay = HttpRelay(HttpRelayOptions(
                upstream_host=hhost, upstream_port=hport, **common,
                max_head_bytes=config.max_header_block_bytes or (1 << 30),
                server_ssl=self.http_tls.listener if self.http_tls else None,
                restricted_apis=parse_restrictions(config.http_restricted_apis)), stats)

    def connections(self) -> ConnectionsSnapshot:
        guards = [self.relay.guard] + ([self.http_relay.guard] if self.http_relay else [])
        return summed_connections([g.snapshot() for g in guards])

    def reconfigure(self, config: SidecarConfig) -> None:
        """A reloaded policy's live settings (open connections take them too)."""
        live: dict[str, Any] = dict(allow_client_model_control=config.allow_client_model_control,
                                    max_message_bytes=config.max_message_bytes,
                                    max_inflight=InflightCaps(config.max_inflight, dict(config.model_max_inflight)))
        self.relay.reconfigure(**live, restricted_protocols=parse_restrictions(config.restricted_protocols))
        if self.http_relay is not None:
            self.http_relay.reconfigure(**live, restricted_apis=parse_restrictions(config.http_restricted_apis))

    def reload_tls(self) -> None:
        """Raises TlsError, leaving the previous certificate in place."""
        if self.tls is not None:
            self.tls.reload()
        if self.http_tls is not None:
            self.http_tls.reload()

    async def shutdown(self, grace_period_s: float) -> None:
        # Both ports drain side by side, within the one grace period.
        drains = [self.relay.shutdown(grace_period_s)]
        if self.http_relay is not None:
            drains.append(self.http_relay.shutdown(grace_period_s))
        await asyncio.gather(*drains)


# ------------------------------------------------------------------------------ the worker process


@dataclass(frozen=True)
class WorkerSpec:
    config: SidecarConfig
    row: int
    table: TableHandle  # its descriptor travels with the pickled spec
    grpc_port: int | None  # None: no gRPC listener (--no-proxy is not run with workers)
    http_port: int | None


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """The spawned worker's entry point."""
    import uvloop

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent forwards what a SIGHUP means
    configure_logging(spec.config.log_format, spec.config.log_level)
    structlog.contextvars.bind_contextvars(worker=spec.row)
    uvloop.run(_worker(spec, conn))


async def _worker(spec: WorkerSpec, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    table = SharedStatsTable.attach(spec.table)
    stats = SharedProxyStats(table, spec.row)
    config = spec.config
    relays = RelaySet(config, stats)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_message() -> None:
        nonlocal config
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the parent is gone: drain and exit
            loop.remove_reader(conn.fileno())
            stop.set()
            return
        if kind == "reconfigure":
            config, changes = payload
            relays.reconfigure(config)
            # Each worker says it took the reload: the parent's policy.reload says what was sent.
            log.info("worker.reconfigured", changes=list(changes))
        elif kind == "reload_tls":
            try:
                relays.reload_tls()
            except TlsError as exc:
                log.error("worker.tls_reload_failed", error=str(exc), kept="the previous certificate")
                return
            log.info("worker.tls_reloaded")

    host, _ = parse_host_port(config.listen, "--listen")
    if spec.grpc_port is not None:
        await relays.relay.start(host, spec.grpc_port, reuse_port=True)
    if relays.http_relay is not None and spec.http_port is not None:
        hhost, _ = parse_host_port(config.http_listen, "--http-listen")
        await relays.http_relay.start(hhost, spec.http_port, reuse_port=True)
    loop.add_reader(conn.fileno(), on_message)
    conn.send(("ready", os.getpid()))

    async def publish() -> None:
        # An idle worker skips publications that would say nothing new (SharedProxyStats.publish).
        while True:
            stats.publish(time.monotonic(), relays.connections())
            await asyncio.sleep(PUBLISH_PERIOD_S)

    publisher = asyncio.create_task(publish())
    await stop.wait()
    log.info("worker.stopping", grace_period_s=config.grace_period_s)
    await relays.shutdown(config.grace_period_s)
    publisher.cancel()
    await asyncio.gather(publisher, return_exceptions=True)
    stats.publish(time.monotonic(), relays.connections(), force=True)
    try:
        loop.remove_reader(conn.fileno())
    except (ValueError, OSError):
        pass
    log.info("worker.stopped")


# ------------------------------------------------------------------------------ the parent's pool


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind host:port with SO_REUSEPORT without listening: the port is ours (port 0: a free
    one) while the workers listen on it. Raises OSError when another program holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Worker:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.started_s = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()


class WorkerPool:
    """The parent's side: spawns, watches, restarts, reconfigures and stops the workers."""

    def __init__(self, config: SidecarConfig) -> None:
        import multiprocessing

        self.config = config
        count = self.count = config.workers
        self.table = SharedStatsTable.create(rows=count)
        self.reader = SharedStatsReader(self.table)
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * count
        self._backoff_s = [RESTART_BACKOFF_S[0]] * count
        self._reserved: list[socket.socket] = []
        self._ports: tuple[int | None, int | None] = (None, None)
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self.restarts = 0

    @property
    def pids(self) -> list[int | None]:
        return [w.process.pid if w is not None else None for w in self._workers]

    async def start(self) -> tuple[int | None, int | None]:
        """Reserve the ports, start every worker, wait until each listens: (grpc port, http port)."""
        config = self.config
        grpc_port = http_port = None
        if config.proxy_enabled:
            host, port = parse_host_port(config.listen, "--listen")
            self._reserved.append(reserve_port(host, port))
            grpc_port = self._reserved[-1].getsockname()[1]
            if config.http_listen != HTTP_OFF:
                hhost, hport = parse_host_port(config.http_listen, "--http-listen")
                self._reserved.append(reserve_port(hhost, hport))
                http_port = self._reserved[-1].getsockname()[1]
        self._ports = (grpc_port, http_port)
        for row in range(self.count):
            self._spawn(row)
        try:
            await asyncio.wait_for(asyncio.gather(*[w.ready for w in self._workers if w is not None]),
                                   READY_TIMEOUT_S)
        except BaseException:
            await self.shutdown(0.0)
            raise
        return grpc_port, http_port

    def _spawn(self, row: int) -> None:
        loop = asyncio.get_running_loop()
        parent_end, child_end = self._context.Pipe()
        spec = WorkerSpec(self.config, row, self.table.handle(), *self._ports)
        process = self._context.Process(target=worker_main, args=(spec, child_end), name=f"tritonpilot-worker-{row}",
                                        daemon=True)
        process.start()
        child_end.close()
        worker = _Worker(process, parent_end)
        self._workers[row] = worker

        def on_message() -> None:
            try:
                kind, payload = parent_end.recv()
            except (EOFError, OSError):
                loop.remove_reader(parent_end.fileno())
                return
            if kind == "ready" and not worker.ready.done():
                worker.ready.set_result(payload)
                log.info("workers.worker_ready", worker=row, pid=payload)

        loop.add_reader(parent_end.fileno(), on_message)
        loop.add_reader(process.sentinel, self._on_exit, row, worker)

    def _on_exit(self, row: int, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        worker.process.join(0)
        code = worker.process.exitcode
        if not worker.ready.done():
            worker.ready.set_exception(OSError(f"relay worker {row} exited with {code} before it listened"))
        if self._stopping:
            return
        lived_s = time.monotonic() - worker.started_s
        if lived_s >= STABLE_AFTER_S:
            self._backoff_s[row] = RESTART_BACKOFF_S[0]
        delay_s = self._backoff_s[row]
        self._backoff_s[row] = min(delay_s * 2, RESTART_BACKOFF_S[1])
        # Cleared now, before its successor starts: its calls are gone, its totals are kept.
        self._close(worker)
        self.reader.retire(row)
        self._workers[row] = None
        log.error("workers.worker_died", worker=row, pid=worker.process.pid, exit_code=code,
                  lived_s=round(lived_s, 1), restart_in_s=delay_s)
        task = asyncio.create_task(self._restart(row, delay_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, row: int, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if self._stopping:
            return
        self.restarts += 1
        self._spawn(row)

    def _close(self, worker: _Worker) -> None:
        try:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        except (ValueError, OSError):
            pass
        worker.conn.close()

    def _send(self, message: tuple[str, Any]) -> None:
        for worker in self._workers:
            if worker is None:
                continue
            try:
                worker.conn.send(message)
            except OSError:  # it is dying: its successor starts with the current config
                pass

    def reconfigure(self, config: SidecarConfig, changes: Sequence[str] = ()) -> None:
        """A reloaded policy's config to every worker (`changes`: what changed, for their logs)."""
        self.config = config  # a restarted worker starts with it
        self._send(("reconfigure", (config, tuple(changes))))

    def reload_tls(self) -> None:
        self._send(("reload_tls", None))

    def connections(self) -> ConnectionsSnapshot:
        return self.reader.connections()

    async def poll(self) -> None:
        """Fold the workers' publications (peaks) as they come."""
        while True:
            self.reader.poll()
            await asyncio.sleep(PUBLISH_PERIOD_S)

    async def shutdown(self, grace_period_s: float) -> None:
        """SIGTERM to every worker; each drains within the grace period. Stragglers are killed."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = [w for w in self._workers if w is not None]
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + grace_period_s + 10.0
        while any(w.process.is_alive() for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in workers:
            if worker.process.is_alive():
                log.error("workers.worker_killed", worker=self._workers.index(worker), pid=worker.process.pid,
                          reason="still running past the grace period")
                worker.process.kill()
                worker.process.join(5)
            try:
                asyncio.get_running_loop().remove_reader(worker.process.sentinel)
            except (ValueError, OSError):
                pass
            self._close(worker)
        self.reader.poll()  # their last publications stay readable until the table closes
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        codes = [w.process.exitcode for w in workers]
        log.info("workers.stopped", exit_codes=codes)

    def close(self) -> None:
        self.table.close()
