"""From a policy file to a running sidecar: the settings, and the controller it builds.

Only the composition root (tritonpilot serve, the demo, tests) imports this:
it is where proxy/ and control/ meet.
"""

from __future__ import annotations

from pathlib import Path

from tritonpilot.control.actuator import Actuator
from tritonpilot.control.loop import Controller, LiveSources
from tritonpilot.control.policy import Policy, load_policy, policy_warnings, resolve
from tritonpilot.control.triton import TritonClient
from tritonpilot.sidecar.config import ControllerFactory, SidecarConfig


def sidecar_config(policy: Policy) -> SidecarConfig:
    return SidecarConfig(
        triton=policy.triton.grpc,
        listen=policy.proxy.listen,
        metrics_listen=policy.metrics.listen,
        triton_metrics_url=str(policy.triton.metrics_url) if policy.triton.metrics_url else None,
        allow_client_model_control=policy.proxy.allow_client_model_control,
        max_message_bytes=policy.proxy.max_message_bytes,
        grace_period_s=policy.proxy.grace_period_s,
        log_format=policy.logging.format,
        log_level=policy.logging.level,
    )


def sidecar_config_from_policy(path: str | Path) -> tuple[SidecarConfig, Policy]:
    """Raises control.policy.PolicyError with every problem, each naming its key."""
    policy = load_policy(path)
    return sidecar_config(policy), policy


def controller_factory_from_policy(policy: Policy, triton_url: str | None = None) -> ControllerFactory:
    """A factory the Sidecar calls with its stats, GPU sampler and registry. No models under
    `models` -> no controller: everything is proxied, nothing reloaded."""

    def factory(stats, gpu_sampler, registry) -> Controller | None:
        import structlog

        log = structlog.get_logger("tritonpilot.sidecar.wiring")
        for warning in policy_warnings(policy):
            log.warning("policy.warning", warning=warning)
        policies = resolve(policy)
        if not policies:
            return None
        triton = TritonClient(triton_url or policy.triton.grpc, rpc_timeout_s=min(5.0, policy.control.interval_s * 5))
        actuator = Actuator(triton, timeout_s=policy.control.reload_timeout_s,
                            failed_config_backoff_s=policy.control.failed_config_backoff_s)
        return Controller(policies, LiveSources(stats, gpu_sampler, triton), actuator,
                          interval_s=policy.control.interval_s, dry_run=policy.control.dry_run, registry=registry)

    return factory
