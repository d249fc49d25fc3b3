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
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import grpc
import structlog
import uvloop
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tritonpilot import exits
from tritonpilot.logs import configure_logging
from tritonpilot.proxy.gpu import GpuSampler, NullGpuSampler, TritonMetricsGpuSource, make_gpu_sampler
from tritonpilot.proxy.http import MetricsServer
from tritonpilot.proxy.metrics import ProxyCollector, new_registry
from tritonpilot.proxy.relay import Relay, RelayOptions
from tritonpilot.proxy.stats import ProxyStats
from tritonpilot.sidecar.config import ControllerFactory, SidecarConfig, parse_host_port

log = structlog.get_logger(__name__)

RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


class Sidecar:
    def __init__(self, config: SidecarConfig, controller_factory: ControllerFactory | None = None) -> None:
        self.config = config
        self.stats = ProxyStats()
        host, port = parse_host_port(config.triton, "--triton")
        self.relay = Relay(RelayOptions(
            upstream_host=host, upstream_port=port,
            allow_client_model_control=config.allow_client_model_control,
            max_message_bytes=config.max_message_bytes,
            connect_timeout_s=config.connect_timeout_s,
            tcp_keepalive_s=config.tcp_keepalive_s), self.stats)
        self.gpu: GpuSampler = make_gpu_sampler(config.gpu_interval_s, log)
        if isinstance(self.gpu, NullGpuSampler) and config.triton_metrics_url:
            self.gpu = TritonMetricsGpuSource(config.triton_metrics_url, interval_s=config.gpu_interval_s)
        collectors: list[Any] = [ProxyCollector(self.stats, self.gpu)]
        self.registry = new_registry(collectors)
        self.controller = controller_factory(self.stats, self.gpu, self.registry) if controller_factory else None
        mhost, mport = parse_host_port(config.metrics_listen, "--metrics-listen")
        self.metrics = MetricsServer(mhost, mport, self.registry, self._triton_ready,
                                     self.controller.status if self.controller else None)
        # /readyz must notice Triton's return within seconds, not after grpc's default
        # reconnect backoff (up to 120 s): cap it.
        self._channel = grpc.aio.insecure_channel(config.triton, options=RECONNECT_OPTIONS)
        self._tasks: list[asyncio.Task] = []
        self.port: int | None = None
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
        self.port = await self.relay.start(host, port)
        await self.metrics.start()
        self._tasks.append(asyncio.create_task(self.gpu.run(), name="gpu-sampler"))
        if self.controller is not None:
            self._tasks.append(asyncio.create_task(self.controller.run(), name="controller"))
        log.info("sidecar.started", listen=f"{host}:{self.port}", triton=self.config.triton,
                 metrics=f"{self.config.metrics_listen.rpartition(':')[0]}:{self.metrics.port}",
                 controller=self.controller is not None)

    async def shutdown(self) -> None:
        log.info("sidecar.stopping", grace_period_s=self.config.grace_period_s)
        # The controller stops first: no reload should start while clients drain.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.relay.shutdown(self.config.grace_period_s)
        self.gpu.close()
        await self.metrics.stop()
        await self._channel.close()
        log.info("sidecar.stopped")

    async def serve(self) -> bool:
        """Run until SIGTERM/SIGINT, then shut down gracefully. False when the controller died."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
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
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help=f"/metrics, /healthz, /readyz, /status (default {d.metrics_listen})")
    parser.add_argument("--allow-client-model-control", action="store_true", default=None,
                        help="let clients call RepositoryModelLoad/Unload (refused by default)")
    parser.add_argument("--max-message-bytes", type=int, metavar="N",
                        help="refuse larger request messages (default: no limit)")
    parser.add_argument("--grace-period-s", type=float, metavar="S",
                        help=f"drain time on SIGTERM (default {d.grace_period_s:g})")
    parser.add_argument("--tcp-keepalive-s", type=float, metavar="S",
                        help=f"TCP keepalive idle time (default {d.tcp_keepalive_s:g})")
    parser.add_argument("--log-format", choices=["json", "console"], help=f"(default {d.log_format})")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help=f"(default {d.log_level})")
    for action in parser._actions:
        if action.dest != "help":
            action.help = f"{action.help}; env {env_name(action.dest)}"
    parser.epilog = (f"Every option can also be set with an environment variable named {ENV_PREFIX}<OPTION> "
                     "(e.g. TRITONPILOT_METRICS_LISTEN=0.0.0.0:9101; true/false for flags). "
                     "Precedence: option > environment > policy file > default.")


def _options() -> argparse.ArgumentParser:
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


_OPTION_FIELDS = ("triton", "triton_metrics_url", "listen", "metrics_listen", "allow_client_model_control",
                  "max_message_bytes", "grace_period_s", "tcp_keepalive_s", "log_format", "log_level")


def config_from_args(args: argparse.Namespace, base: SidecarConfig) -> SidecarConfig:
    """Options (already merged with the environment) override the policy file's values."""
    overrides = {field: getattr(args, field) for field in _OPTION_FIELDS if getattr(args, field, None) is not None}
    config = replace(base, **overrides)
    for what, value in (("--triton", config.triton), ("--listen", config.listen),
                        ("--metrics-listen", config.metrics_listen)):
        parse_host_port(value, what)
    if config.max_message_bytes is not None and config.max_message_bytes < 1:
        raise ValueError(f"--max-message-bytes: got {config.max_message_bytes}; must be >= 1")
    if config.grace_period_s < 0:
        raise ValueError(f"--grace-period-s: got {config.grace_period_s:g}; must be >= 0")
    return config


def run(args: argparse.Namespace) -> int:
    try:
        args = apply_environment(_options(), args, os.environ)
    except ValueError as exc:
        print(f"tritonpilot serve: {exc}", file=sys.stderr)
        return exits.USAGE
    base, policy = SidecarConfig(), None
    if args.policy:
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
    factory: ControllerFactory | None = None
    if policy is not None:
        from tritonpilot.sidecar.wiring import controller_factory_from_policy
        factory = controller_factory_from_policy(policy, triton_url=config.triton)
    configure_logging(config.log_format, config.log_level)

    async def main() -> bool:
        return await Sidecar(config, factory).serve()

    try:
        healthy = uvloop.run(main())
    except OSError as exc:  # e.g. the listen port is taken
        print(f"tritonpilot serve: {exc}", file=sys.stderr)
        return exits.FAILURE
    return exits.OK if healthy else exits.FAILURE
