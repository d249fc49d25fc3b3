"""What the sidecar is configured with, and what it needs of a controller.

serve.py runs a Sidecar from a SidecarConfig; wiring.py builds both from a policy.
Both import this module, never each other's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tritonpilot.proxy.gpu import GpuSampler
from tritonpilot.proxy.limits import ConnectionLimits, Http2Limits
from tritonpilot.proxy.stats import StatsSource
from tritonpilot.proxy.tls import TlsFiles

# --http-listen off: no HTTP/REST port.
HTTP_OFF = "off"


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: got {value!r}; expected HOST:PORT with a port in 0..65535")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class SidecarConfig:
    triton: str = "127.0.0.1:8001"
    listen: str = "0.0.0.0:8101"
    # The HTTP/REST port (proxy/http_relay.py) and Triton's HTTP port; HTTP_OFF: no HTTP port.
    http_listen: str = "0.0.0.0:8100"
    triton_http: str = "127.0.0.1:8000"
    # False (--no-proxy): no client listener, only the controller and metrics; clients stay on Triton's ports.
    proxy_enabled: bool = True
    metrics_listen: str = "127.0.0.1:9101"
    triton_metrics_url: str | None = None
    allow_client_model_control: bool = False
    max_message_bytes: int | None = None
    # Triton's GROUPS:KEY=VALUE restrictions, enforced by the proxy (proxy/restrict.py).
    restricted_protocols: tuple[str, ...] = ()
    # Triton's --http-restricted-api GROUPS:KEY=VALUE, enforced on the HTTP port.
    http_restricted_apis: tuple[str, ...] = ()
    # Requests in flight per model past which the proxy sheds (proxy/shedding.py); None: no cap.
    max_inflight: int | None = None
    model_max_inflight: Mapping[str, int] = field(default_factory=dict)
    grace_period_s: float = 30.0
    connect_timeout_s: float = 1.0
    tcp_keepalive_s: float | None = 60.0
    # TLS on the client port (cert + key; client_ca: mTLS) and to Triton (its CA); None = plaintext.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    triton_tls_ca: str | None = None
    # Client connection limits (proxy/limits.py); None = off.
    max_connections: int | None = None
    preface_timeout_s: float | None = 10.0
    idle_timeout_s: float | None = None
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0
    # HTTP/2 abuse limits per client connection (proxy/limits.py Http2Limits); None = off.
    max_resets_per_s: int | None = 1000
    max_header_block_bytes: int | None = 65536
    max_settings_per_s: int | None = 100
    max_pings_per_s: int | None = 1000
    max_empty_frames_per_s: int | None = 100
    max_concurrent_streams: int | None = None
    gpu_interval_s: float = 1.0
    # Relay processes sharing the client ports (sidecar/workers.py); 1: the relays run in this process.
    workers: int = 1
    log_format: str = "console"
    log_level: str = "INFO"


class Controller(Protocol):
    """What the sidecar needs of the control plane (control/ provides it)."""

    async def run(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


# (stats, gpu sampler, registry) -> a controller, or None when there is nothing to control.
ControllerFactory = Callable[[StatsSource, GpuSampler, Any], Controller | None]


def connection_limits(config: SidecarConfig) -> ConnectionLimits:
    return ConnectionLimits(max_connections=config.max_connections, preface_timeout_s=config.preface_timeout_s,
                            idle_timeout_s=config.idle_timeout_s, max_connection_age_s=config.max_connection_age_s,
                            max_connection_age_grace_s=config.max_connection_age_grace_s)


def http2_limits(config: SidecarConfig) -> Http2Limits:
    return Http2Limits(max_resets_per_s=config.max_resets_per_s, max_header_block_bytes=config.max_header_block_bytes,
                       max_settings_per_s=config.max_settings_per_s, max_pings_per_s=config.max_pings_per_s,
                       max_empty_frames_per_s=config.max_empty_frames_per_s,
                       max_concurrent_streams=config.max_concurrent_streams)


def tls_files(config: SidecarConfig) -> TlsFiles:
    assert config.tls_cert is not None and config.tls_key is not None
    return TlsFiles(cert=config.tls_cert, key=config.tls_key, client_ca=config.tls_client_ca)


