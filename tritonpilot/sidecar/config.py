"""What the sidecar is configured with, and what it needs of a controller.

serve.py runs a Sidecar from a SidecarConfig; wiring.py builds both from a policy.
Both import this module, never each other's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tritonpilot.proxy.gpu import GpuSampler
from tritonpilot.proxy.stats import ProxyStats


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: got {value!r}; expected HOST:PORT with a port in 0..65535")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class SidecarConfig:
    triton: str = "127.0.0.1:8001"
    listen: str = "0.0.0.0:8101"
    metrics_listen: str = "127.0.0.1:9101"
    triton_metrics_url: str | None = None
    allow_client_model_control: bool = False
    max_message_bytes: int | None = None
    grace_period_s: float = 30.0
    connect_timeout_s: float = 1.0
    tcp_keepalive_s: float | None = 60.0
    gpu_interval_s: float = 1.0
    log_format: str = "console"
    log_level: str = "INFO"


class Controller(Protocol):
    """What the sidecar needs of the control plane (control/ provides it)."""

    async def run(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


# (stats, gpu sampler, registry) -> a controller, or None when there is nothing to control.
ControllerFactory = Callable[[ProxyStats, GpuSampler, Any], Controller | None]


