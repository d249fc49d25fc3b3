"""`tritonpilot serve`: the sidecar process, and the one place that wires proxy and control.

Start-up -> serve -> graceful shutdown, as uvicorn does it:
1. the relay listens; the GPU sampler and the metrics listener start; the
   controller starts when the policy names models;
2. SIGTERM/SIGINT: stop accepting, GOAWAY to every client, let open calls and
   streams finish within the grace period, then close the rest, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import structlog
import uvloop
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tritonpilot import exits
from tritonpilot.logs import configure_logging
from tritonpilot.proxy.gpu import GpuSampler, NullGpuSampler, TritonMetricsGpuSource, make_gpu_sampler
from tritonpilot.proxy.http import MetricsServer
from tritonpilot.proxy.limits import ConnectionsSnapshot
from tritonpilot.proxy.metrics import ConnectionCollector, ProxyCollector, new_registry
from tritonpilot.proxy.restrict import SYNTAX, RestrictionError, groups_text, parse_restrictions
from tritonpilot.proxy.stats import ProxyStats, StatsSource
from tritonpilot.proxy.tls import TlsError, server_context, upstream_context
from tritonpilot.sidecar.config import (
    HTTP_OFF,
    ControllerFactory,
    SidecarConfig,
    parse_host_port,
    tls_files,
)
from tritonpilot.sidecar.workers import RelaySet, WorkerPool

if TYPE_CHECKING:
    from tritonpilot.control.record import RecordWriter
    from tritonpilot.sidecar.reload import Loaded, PolicyDiff, ReloadSource

log = structlog.get_logger(__name__)

RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                     ("grpc.max_reconnect_backoff_ms", 2000)]
# serve --record: about 15 hours of one model at one tick a second (~1.8 KB a line).
DEFAULT_RECORD_MAX_BYTES = 100_000_000


class Sidecar:
    def __init__(self, config: SidecarConfig, controller_factory: ControllerFactory | None = None,
                 policy_source: ReloadSource | None = None) -> None:
        self.config = config
        # --workers N: relay processes share the client ports and count in shared memory;
        # this process keeps the controller, metrics and reloads. 1: the relays run here.
        self.pool: WorkerPool | None = None
        self.relays: RelaySet | None = None
        self.stats: StatsSource
        connections: Callable[[], ConnectionsSnapshot]
        if config.workers > 1 and config.proxy_enabled:
            self.pool = WorkerPool(config)
            self.stats, connections = self.pool.reader, self.pool.connections
        else:
            self.stats = local_stats = ProxyStats()
            self.relays = relays = RelaySet(config, local_stats)
            connections = relays.connections
        self.gpu: GpuSampler = make_gpu_sampler(config.gpu_interval_s, log)
        if isinstance(self.gpu, NullGpuSampler) and config.triton_metrics_url:
            self.gpu = TritonMetricsGpuSource(config.triton_metrics_url, interval_s=config.gpu_interval_s)
        collectors: list[Any] = [ProxyCollector(self.stats, self.gpu), ConnectionCollector(connections)]
        self.registry = new_registry(collectors)
        self.controller = controller_factory(self.stats, self.gpu, self.registry) if controller_factory else None
        self.policy_source = policy_source
        self.reloader = None
        if policy_source is not None:  # SIGHUP and a change of the file reload the policy
            from tritonpilot.sidecar.reload import PolicyReloader
            self.reloader = PolicyReloader(policy_source.path, policy_source.current, policy_source.load,
                                           self._apply_policy, registry=self.registry)
        mhost, mport = parse_host_port(config.metrics_listen, "--metrics-listen")
        self.metrics = MetricsServer(mhost, mport, self.registry, self._triton_ready,
                                     self.status if self.controller or self.reloader else None)
        # /readyz must notice Triton's return within seconds, not after grpc's default
        # reconnect backoff (up to 120 s): cap it.
        if config.triton_tls_ca:
            with open(config.triton_tls_ca, "rb") as ca:
                credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
            self._channel = grpc.aio.secure_channel(config.triton, credentials, options=RECONNECT_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(config.triton, options=RECONNECT_OPTIONS)
        self._tasks: list[asyncio.Task] = []
        self.port: int | None = None
        self.http_port: int | None = None
        self.stopping = asyncio.Event()

    async def _triton_ready(self) -> tuple[bool, str]:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        try:
            reply = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            return False, f"Triton at {self.config.triton} is unreachable: {exc.code().name} {exc.details()}"
        if not reply.ready:
            return False, f"Triton at {self.config.triton} is up but not ready"
        return True, f"Triton at {self.config.triton} is ready"

    async def start(self) -> None:
        host, port = parse_host_port(self.config.listen, "--listen")
        if self.pool is not None:
            self.port, self.http_port = await self.pool.start()
            self._tasks.append(asyncio.create_task(self.pool.poll(), name="workers-poll"))
        elif self.relays is not None:
            if self.config.proxy_enabled:  # --no-proxy: controller and metrics only, no client listener
                self.port = await self.relays.relay.start(host, port)
            if self.relays.http_relay is not None:
                hhost, hport = parse_host_port(self.config.http_listen, "--http-listen")
                self.http_port = await self.relays.http_relay.start(hhost, hport)
        await self.metrics.start()
        self._tasks.append(asyncio.create_task(self.gpu.run(), name="gpu-sampler"))
        if self.controller is not None:
            self._tasks.append(asyncio.create_task(self.controller.run(), name="controller"))
        if self.policy_source is not None:
            self._tasks.append(asyncio.create_task(self._watch_policy(), name="policy-watcher"))
        log.info("sidecar.started", listen=f"{host}:{self.port}" if self.port is not None else None,
                 triton=self.config.triton,
                 http_listen=f"{self.config.http_listen.rpartition(':')[0]}:{self.http_port}"
                 if self.http_port is not None else None, triton_http=self.config.triton_http,
                 metrics=f"{self.config.metrics_listen.rpartition(':')[0]}:{self.metrics.port}",
                 controller=self.controller is not None, workers=self.config.workers if self.pool else 1)

    async def shutdown(self) -> None:
        log.info("sidecar.stopping", grace_period_s=self.config.grace_period_s)
        # The controller stops first: no reload should start while clients drain.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pool is not None:
            await self.pool.shutdown(self.config.grace_period_s)
        elif self.relays is not None:
            await self.relays.shutdown(self.config.grace_period_s)
        self.gpu.close()
        await self.metrics.stop()
        await self._channel.close()
        if self.pool is not None:
            self.pool.close()
        log.info("sidecar.stopped")

    def reload_tls(self) -> None:
        """SIGHUP: new client connections use the certificate files as they are now; open ones
        keep theirs. Files that can't be used leave the previous certificate in place."""
        if not self.config.tls_cert:
            return
        try:
            if self.relays is not None:
                self.relays.reload_tls()
            else:  # the workers reload theirs; read the files here first, to log a failure once
                server_context(tls_files(self.config))
        except TlsError as exc:
            log.error("sidecar.tls_reload_failed", error=str(exc), kept="the previous certificate")
            return
        if self.pool is not None:
            self.pool.reload_tls()
        log.info("sidecar.tls_reloaded", cert=self.config.tls_cert, client_ca=self.config.tls_client_ca)

    def on_sighup(self) -> None:
        """SIGHUP: re-read the TLS files (when TLS is on) and the policy (when there is one)."""
        self.reload_tls()
        self.reload_policy("sighup")

    def reload_policy(self, trigger: str) -> None:
        if self.reloader is None:
            return
        try:
            self.reloader.reload(trigger)
        except Exception:  # a bug in applying must not take the sidecar down: it keeps serving
            log.exception("policy.reload_failed", file=self.reloader.path, trigger=trigger)

    async def _watch_policy(self) -> None:
        assert self.policy_source is not None
        source = self.policy_source
        while True:
            await asyncio.sleep(source.poll_interval_s)
            if source.watcher.changed():
                self.reload_policy("file")

    def _apply_policy(self, new: Loaded, diff: PolicyDiff) -> None:
        """A valid reloaded policy: the relay swaps what it takes live (open connections too),
        the controller takes its models and settings at its next tick."""
        from tritonpilot.control.policy import resolve
        from tritonpilot.sidecar.wiring import controller_factory_from_policy, replace_controller_policy

        config = new.config
        if self.pool is not None:
            self.pool.reconfigure(config, [str(c) for c in diff.live])
        elif self.relays is not None:
            self.relays.reconfigure(config)
        self.config = config  # grace_period_s is read at shutdown
        if self.controller is not None:
            replace_controller_policy(self.controller, new.policy)  # type: ignore[arg-type]
        elif resolve(new.policy):  # started with no model to control: the first ones start it
            self.controller = controller_factory_from_policy(new.policy, triton_url=config.triton,
                                                            triton_tls_ca=config.triton_tls_ca)(
                self.stats, self.gpu, self.registry)
            if self.controller is not None:
                self._tasks.append(asyncio.create_task(self.controller.run(), name="controller"))

    def status(self) -> dict[str, Any]:
        """/status: the controller's, and the last policy reload."""
        out = self.controller.status() if self.controller is not None else {"models": {}}
        if self.reloader is not None:
            out["policy_reload"] = self.reloader.status()
        return out

    async def serve(self) -> bool:
        """Run until SIGTERM/SIGINT, then shut down gracefully. False when the controller died."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if self.config.tls_cert or self.reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, self.on_sighup)
        await self.start()
        # A controller that dies is a bug worth stopping for, not a silent half-sidecar.
        waiters = [asyncio.create_task(self.stopping.wait()), *[t for t in self._tasks if t.get_name() == "controller"]]
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        healthy = True
        for task in done:
            if task is not waiters[0]:
                healthy = False
                log.error("sidecar.controller_failed",
                          error="cancelled" if task.cancelled() else repr(task.exception()))
        waiters[0].cancel()
        await self.shutdown()
        return healthy


ENV_PREFIX = "TRITONPILOT_"


def env_name(dest: str) -> str:
    """--metrics-listen -> TRITONPILOT_METRICS_LISTEN."""
    return ENV_PREFIX + dest.upper()


def configure(parser: argparse.ArgumentParser) -> None:
    d = SidecarConfig()
    parser.add_argument("--policy", metavar="FILE", help="the policy YAML; options and environment override it")
    parser.add_argument("--triton", metavar="HOST:PORT", help=f"Triton's gRPC address (default {d.triton})")
    parser.add_argument("--triton-metrics-url", metavar="URL",
                        help="Triton's /metrics, read for GPU figures when NVML is absent (default: none)")
    parser.add_argument("--listen", metavar="HOST:PORT", help=f"where clients connect (default {d.listen})")
    parser.add_argument("--http-listen", metavar="HOST:PORT",
                        help=f"where HTTP/REST clients connect (default {d.http_listen}; {HTTP_OFF}: no HTTP port)")
    parser.add_argument("--triton-http", metavar="HOST:PORT",
                        help=f"Triton's HTTP/REST address (default {d.triton_http})")
    parser.add_argument("--no-proxy", action="store_true", default=None,
                        help="no client listener (neither gRPC nor HTTP): the controller and metrics alone "
                             "(clients stay on Triton's ports)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help=f"/metrics, /healthz, /readyz, /status (default {d.metrics_listen})")
    parser.add_argument("--allow-client-model-control", action="store_true", default=None,
                        help="let clients call RepositoryModelLoad/Unload (refused by default)")
    parser.add_argument("--max-message-bytes", type=int, metavar="N",
                        help="refuse larger request messages (default: no limit)")
    parser.add_argument("--restricted-protocol", action="append", metavar=SYNTAX,
                        help="as Triton's --grpc-restricted-protocol: calls of these protocol groups "
                             f"({groups_text()}) need the header triton-grpc-protocol-KEY: VALUE, else the "
                             "proxy answers UNAVAILABLE as Triton would; repeatable (default: none; the "
                             "environment variable takes several, separated by whitespace)")
    parser.add_argument("--http-restricted-api", action="append", metavar=SYNTAX,
                        help="as Triton's --http-restricted-api: HTTP requests of these groups need the header "
                             "KEY: VALUE, else the proxy answers 403 as Triton would; repeatable (default: none; "
                             "the environment variable takes several, separated by whitespace)")
    parser.add_argument("--max-inflight", type=int, metavar="N",
                        help="per model, requests in flight past which ModelInfer calls get RESOURCE_EXHAUSTED "
                             "at once; the policy's models.<name>.max_inflight overrides it (default: no cap)")
    parser.add_argument("--grace-period-s", type=float, metavar="S",
                        help=f"drain time on SIGTERM (default {d.grace_period_s:g})")
    parser.add_argument("--tcp-keepalive-s", type=float, metavar="S",
                        help=f"TCP keepalive idle time (default {d.tcp_keepalive_s:g})")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="PEM certificate (chain) of the client port: clients then speak TLS with ALPN h2; "
                             "re-read with --tls-key and --tls-client-ca on SIGHUP (default: plaintext)")
    parser.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="FILE",
                        help="PEM CA certificate(s): clients must present a certificate one of them signed "
                             "(mTLS; default: no client certificate asked)")
    parser.add_argument("--triton-tls-ca", metavar="FILE",
                        help="Triton serves TLS: connect to it with TLS and verify its certificate against this "
                             "PEM CA (default: plaintext to Triton)")
    parser.add_argument("--max-connections", type=int, metavar="N",
                        help="client connections past N are closed at once, unread, and counted "
                             "(default: no limit; 0: no limit)")
    parser.add_argument("--preface-timeout-s", type=float, metavar="S",
                        help="close a client connection that has not finished its TLS handshake and sent the "
                             f"HTTP/2 preface within S (default {d.preface_timeout_s:g}; 0: off)")
    parser.add_argument("--idle-timeout-s", type=float, metavar="S",
                        help="GOAWAY and close a client connection with no call open or started for S; gRPC "
                             "clients reconnect on their next call (default: off; 0: off)")
    parser.add_argument("--max-connection-age-s", type=float, metavar="S",
                        help="GOAWAY a client connection older than S (+-10%% jitter): its open calls finish, "
                             "then it closes and the client reconnects (default: off; 0: off)")
    parser.add_argument("--max-connection-age-grace-s", type=float, metavar="S",
                        help="after such a GOAWAY (age or idle), calls still open past S are closed "
                             f"(default {d.max_connection_age_grace_s:g})")
    calm = "GOAWAY ENHANCE_YOUR_CALM and close the client connection"
    parser.add_argument("--max-resets-per-s", type=int, metavar="N",
                        help=f"{calm} past N RST_STREAMs from it within 1 s (rapid reset; "
                             f"default {d.max_resets_per_s}; 0: off)")
    parser.add_argument("--max-header-block-bytes", type=int, metavar="N",
                        help=f"{calm} when one header block (HEADERS + CONTINUATION) passes N bytes, before "
                             f"buffering or forwarding more (default {d.max_header_block_bytes}; 0: off)")
    parser.add_argument("--max-settings-per-s", type=int, metavar="N",
                        help=f"{calm} past N SETTINGS frames from it within 1 s "
                             f"(default {d.max_settings_per_s}; 0: off)")
    parser.add_argument("--max-pings-per-s", type=int, metavar="N",
                        help=f"{calm} past N PINGs from it within 1 s (default {d.max_pings_per_s}; 0: off)")
    parser.add_argument("--max-empty-frames-per-s", type=int, metavar="N",
                        help=f"{calm} past N empty frames from it within 1 s: DATA without END_STREAM, "
                             f"HEADERS/CONTINUATION not ending the block (default {d.max_empty_frames_per_s}; 0: off)")
    parser.add_argument("--max-concurrent-streams", type=int, metavar="N",
                        help="calls open at once per client connection: the client is told min(Triton's, N), "
                             "streams past N get REFUSED_STREAM, which gRPC clients retry "
                             "(default: Triton's own; 0: off)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="relay processes sharing the client ports (SO_REUSEPORT), each on its own event loop; "
                             "the controller and /metrics stay in the parent and sum their counts "
                             f"(default {d.workers})")
    parser.add_argument("--record", metavar="FILE",
                        help="append every controller tick (each model's signals, decision and policy hash) to "
                             "FILE as JSON lines, for `tritonpilot replay` (default: no recording)")
    parser.add_argument("--record-max-bytes", type=int, metavar="N",
                        help=f"stop recording (with a log line) before FILE passes N bytes "
                             f"(default {DEFAULT_RECORD_MAX_BYTES})")
    parser.add_argument("--log-format", choices=["json", "console"], help=f"(default {d.log_format})")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help=f"(default {d.log_level})")
    for action in parser._actions:
        if action.dest != "help":
            action.help = f"{action.help}; env {env_name(action.dest)}"
    parser.epilog = (f"Every option can also be set with an environment variable named {ENV_PREFIX}<OPTION> "
                     "(e.g. TRITONPILOT_METRICS_LISTEN=0.0.0.0:9101; true/false for flags). "
                     "Precedence: option > environment > policy file > default.")


def option_parser() -> argparse.ArgumentParser:
    """serve's options on their own, for reading the environment against them."""
    parser = argparse.ArgumentParser(add_help=False)
    configure(parser)
    return parser


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def apply_environment(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      environ: Mapping[str, str]) -> argparse.Namespace:
    """Fill each option not given on the command line from TRITONPILOT_<OPTION>, converted
    and checked as the option itself would be. Raises ValueError naming the variable."""
    values = vars(args).copy()
    for action in parser._actions:
        name = env_name(action.dest)
        if action.dest == "help" or values.get(action.dest) is not None or name not in environ:
            continue
        text = environ[name].strip()
        if isinstance(action, argparse._AppendAction):
            values[action.dest] = text.split()
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError(f"{name}: got {text!r}; expected true or false")
            values[action.dest] = text.lower() in _TRUE
            continue
        try:
            value = action.type(text) if callable(action.type) else text
        except ValueError:
            kind = getattr(action.type, "__name__", "value")
            raise ValueError(f"{name}: got {text!r}; expected a {kind}") from None
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{name}: got {text!r}; expected one of {', '.join(map(str, action.choices))}")
        values[action.dest] = value
    return argparse.Namespace(**values)


_OPTION_FIELDS = ("triton", "triton_metrics_url", "listen", "http_listen", "triton_http", "metrics_listen",
                  "allow_client_model_control",
                  "max_message_bytes", "max_inflight", "grace_period_s", "tcp_keepalive_s", "log_format", "log_level",
                  "tls_cert", "tls_key", "tls_client_ca", "triton_tls_ca", "max_connections", "preface_timeout_s",
                  "idle_timeout_s", "max_connection_age_s", "max_connection_age_grace_s", "max_resets_per_s",
                  "max_header_block_bytes", "max_settings_per_s", "max_pings_per_s", "max_empty_frames_per_s",
                  "max_concurrent_streams", "workers")


def config_from_args(args: argparse.Namespace, base: SidecarConfig) -> SidecarConfig:
    """Options (already merged with the environment) override the policy file's values."""
    overrides = {field: getattr(args, field) for field in _OPTION_FIELDS if getattr(args, field, None) is not None}
    if getattr(args, "restricted_protocol", None) is not None:
        overrides["restricted_protocols"] = tuple(args.restricted_protocol)
    if getattr(args, "http_restricted_api", None) is not None:
        overrides["http_restricted_apis"] = tuple(args.http_restricted_api)
    config = replace(base, **overrides)
    if getattr(args, "no_proxy", None):
        config = replace(config, proxy_enabled=False)
    for what, value in (("--triton", config.triton), ("--listen", config.listen),
                        ("--metrics-listen", config.metrics_listen), ("--triton-http", config.triton_http)):
        parse_host_port(value, what)
    if config.http_listen != HTTP_OFF:
        try:
            parse_host_port(config.http_listen, "--http-listen")
        except ValueError as exc:
            raise ValueError(f"{exc} or {HTTP_OFF}") from None
    if config.max_message_bytes is not None and config.max_message_bytes < 1:
        raise ValueError(f"--max-message-bytes: got {config.max_message_bytes}; must be >= 1")
    if config.max_inflight is not None and config.max_inflight < 1:
        raise ValueError(f"--max-inflight: got {config.max_inflight}; must be >= 1")
    try:
        parse_restrictions(config.restricted_protocols)
    except RestrictionError as exc:
        raise ValueError(f"--restricted-protocol: {exc}") from None
    try:
        parse_restrictions(config.http_restricted_apis)
    except RestrictionError as exc:
        raise ValueError(f"--http-restricted-api: {exc}") from None
    if config.workers < 1:
        raise ValueError(f"--workers: got {config.workers}; must be >= 1")
    if config.grace_period_s < 0:
        raise ValueError(f"--grace-period-s: got {config.grace_period_s:g}; must be >= 0")
    config = _connection_limits_checked(config)
    _check_tls(config)
    return config


def policy_loader(args: argparse.Namespace) -> Callable[[], Loaded]:
    """Reads the policy file again as run() read it at start: the options and environment
    in `args` still win over it. Raises PolicyError or ValueError as run() would refuse it."""

    def load() -> Loaded:
        from tritonpilot.sidecar.reload import Loaded
        from tritonpilot.sidecar.wiring import sidecar_config_from_policy

        base, policy = sidecar_config_from_policy(args.policy)
        return Loaded(config_from_args(args, base), policy)

    return load


# Options where 0 means "off" (None in SidecarConfig).
_OFF_AT_ZERO = {"max_connections": "--max-connections", "preface_timeout_s": "--preface-timeout-s",
                "idle_timeout_s": "--idle-timeout-s", "max_connection_age_s": "--max-connection-age-s",
                "max_resets_per_s": "--max-resets-per-s", "max_header_block_bytes": "--max-header-block-bytes",
                "max_settings_per_s": "--max-settings-per-s", "max_pings_per_s": "--max-pings-per-s",
                "max_empty_frames_per_s": "--max-empty-frames-per-s",
                "max_concurrent_streams": "--max-concurrent-streams"}


def _connection_limits_checked(config: SidecarConfig) -> SidecarConfig:
    off: dict[str, Any] = {}
    for name, option in _OFF_AT_ZERO.items():
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"{option}: got {value:g}; must be >= 0 (0: off)")
        if value == 0:
            off[name] = None
    if config.max_connection_age_grace_s < 0:
        raise ValueError(f"--max-connection-age-grace-s: got {config.max_connection_age_grace_s:g}; must be >= 0")
    return replace(config, **off) if off else config


def _check_tls(config: SidecarConfig) -> None:
    """Load the certificates once at start: missing, unreadable or mismatched files are a usage
    error (TlsError, a ValueError) naming the option, before anything listens."""
    if config.tls_cert and not config.tls_key:
        raise ValueError("--tls-key (proxy.tls.key): required with --tls-cert")
    if config.tls_key and not config.tls_cert:
        raise ValueError("--tls-cert (proxy.tls.cert): required with --tls-key")
    if config.tls_client_ca and not config.tls_cert:
        raise ValueError("--tls-client-ca (proxy.tls.client_ca): needs --tls-cert and --tls-key (mTLS is TLS)")
    if config.tls_cert:
        server_context(tls_files(config))
    if config.triton_tls_ca:
        upstream_context(config.triton_tls_ca)


def record_writer(args: argparse.Namespace, has_policy: bool) -> RecordWriter | None:
    """--record FILE: the writer, opened now, so a path that can't be written is a usage error."""
    path, max_bytes = getattr(args, "record", None), getattr(args, "record_max_bytes", None)
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"--record-max-bytes: got {max_bytes}; must be >= 1")
    if not path:
        return None
    if not has_policy:
        raise ValueError("--record: needs --policy (without one there is no controller to record)")
    from tritonpilot.control.record import RecordWriter
    try:
        return RecordWriter(path, max_bytes=max_bytes or DEFAULT_RECORD_MAX_BYTES,
                            policy_path=os.path.abspath(args.policy))
    except OSError as exc:
        raise ValueError(f"--record: cannot append to {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    try:
        args = apply_environment(option_parser(), args, os.environ)
    except ValueError as exc:
        print(f"tritonpilot serve: {exc}", file=sys.stderr)
        return exits.USAGE
    base, policy, watcher = SidecarConfig(), None, None
    if args.policy:
        from tritonpilot.sidecar.reload import PolicyFileWatcher
        watcher = PolicyFileWatcher(args.policy)  # before the read: a change in between is not missed
        from tritonpilot.control.policy import PolicyError  # the composition root may know both planes
        from tritonpilot.sidecar.wiring import sidecar_config_from_policy
        try:
            base, policy = sidecar_config_from_policy(args.policy)
        except PolicyError as exc:
            print(f"tritonpilot serve: invalid policy {args.policy}:\n{exc}", file=sys.stderr)
            return exits.USAGE
    try:
        config = config_from_args(args, base)
    except ValueError as exc:
        print(f"tritonpilot serve: {exc}", file=sys.stderr)
        return exits.USAGE
    try:
        recorder = record_writer(args, policy is not None)
    except ValueError as exc:
        print(f"tritonpilot serve: {exc}", file=sys.stderr)
        return exits.USAGE
    factory: ControllerFactory | None = None
    if policy is not None:
        from tritonpilot.sidecar.wiring import controller_factory_from_policy
        factory = controller_factory_from_policy(policy, triton_url=config.triton, recorder=recorder,
                                                 triton_tls_ca=config.triton_tls_ca)
    source = None
    if policy is not None and watcher is not None:
        from tritonpilot.sidecar.reload import Loaded, ReloadSource
        source = ReloadSource(args.policy, Loaded(config, policy), policy_loader(args), watcher)
    configure_logging(config.log_format, config.log_level)

    async def main() -> bool:
        return await Sidecar(config, factory, source).serve()

    try:
        healthy = uvloop.run(main())
    except OSError as exc:  # e.g. the listen port is taken
        print(f"tritonpilot serve: {exc}", file=sys.stderr)
        return exits.FAILURE
    return exits.OK if healthy else exits.FAILURE
