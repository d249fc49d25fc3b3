"""From a policy file to a running sidecar: the settings, and the controller it builds.

Only the composition root (tritonpilot serve, the demo, tests) imports this:
it is where proxy/ and control/ meet.
"""

from __future__ import annotations

from pathlib import Path

from tritonpilot.control.actuator import Actuator
from tritonpilot.control.loop import Controller, LiveSources
from tritonpilot.control.policy import Policy, load_policy, policy_warnings, resolve
from tritonpilot.control.procmem import TritonProcessMemory
from tritonpilot.control.record import Recorder
from tritonpilot.control.triton import TritonClient
from tritonpilot.sidecar.config import ControllerFactory, SidecarConfig


def sidecar_config(policy: Policy) -> SidecarConfig:
    return SidecarConfig(
        triton=policy.triton.grpc,
        listen=policy.proxy.listen,
        http_listen=policy.proxy.http_listen,
        triton_http=policy.triton.http,
        http_restricted_apis=policy.proxy.http_restricted_apis,
        workers=policy.proxy.workers,
        metrics_listen=policy.metrics.listen,
        triton_metrics_url=str(policy.triton.metrics_url) if policy.triton.metrics_url else None,
        allow_client_model_control=policy.proxy.allow_client_model_control,
        max_message_bytes=policy.proxy.max_message_bytes,
        restricted_protocols=policy.proxy.restricted_protocols,
        max_inflight=policy.proxy.max_inflight,
        model_max_inflight={name: o.max_inflight for name, o in policy.models.items() if o.max_inflight is not None},
        grace_period_s=policy.proxy.grace_period_s,
        tls_cert=policy.proxy.tls.cert if policy.proxy.tls else None,
        tls_key=policy.proxy.tls.key if policy.proxy.tls else None,
        tls_client_ca=policy.proxy.tls.client_ca if policy.proxy.tls else None,
        triton_tls_ca=policy.triton.tls_ca,
        max_connections=policy.proxy.max_connections,
        preface_timeout_s=policy.proxy.preface_timeout_s,
        idle_timeout_s=policy.proxy.idle_timeout_s,
        max_connection_age_s=policy.proxy.max_connection_age_s,
        max_connection_age_grace_s=policy.proxy.max_connection_age_grace_s,
        max_resets_per_s=policy.proxy.max_resets_per_s,
        max_header_block_bytes=policy.proxy.max_header_block_bytes,
        max_settings_per_s=policy.proxy.max_settings_per_s,
        max_pings_per_s=policy.proxy.max_pings_per_s,
        max_empty_frames_per_s=policy.proxy.max_empty_frames_per_s,
        max_concurrent_streams=policy.proxy.max_concurrent_streams,
        log_format=policy.logging.format,
        log_level=policy.logging.level,
    )


def sidecar_config_from_policy(path: str | Path) -> tuple[SidecarConfig, Policy]:
    """Raises control.policy.PolicyError with every problem, each naming its key."""
    policy = load_policy(path)
    return sidecar_config(policy), policy


def replace_controller_policy(controller: Controller, policy: Policy) -> None:
    """A reloaded policy into a running controller: its models and settings at its next tick,
    the actuator's timeouts for the reloads it starts from now on."""
    controller.replace_policies(resolve(policy), interval_s=policy.control.interval_s,
                                dry_run=policy.control.dry_run,
                                max_concurrent_reloads=policy.control.max_concurrent_reloads,
                                max_reloads_per_minute=policy.control.max_reloads_per_minute)
    if isinstance(controller.applier, Actuator):
        controller.applier.timeout_s = policy.control.reload_timeout_s
        controller.applier.failed_config_backoff_s = policy.control.failed_config_backoff_s


def controller_factory_from_policy(policy: Policy, triton_url: str | None = None,
                                   recorder: Recorder | None = None,
                                   triton_tls_ca: str | None = None) -> ControllerFactory:
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
        tls_ca = triton_tls_ca or (str(policy.triton.tls_ca) if policy.triton.tls_ca else None)
        triton = TritonClient(triton_url or policy.triton.grpc, rpc_timeout_s=min(5.0, policy.control.interval_s * 5),
                              tls_ca=tls_ca)
        actuator = Actuator(triton, timeout_s=policy.control.reload_timeout_s,
                            failed_config_backoff_s=policy.control.failed_config_backoff_s)
        grpc = triton_url or policy.triton.grpc
        # The leak watchdog's CPU source: Triton's processes, where this sidecar can see them.
        memory = TritonProcessMemory(int(grpc.rsplit(":", 1)[1]) if grpc.rsplit(":", 1)[-1].isdigit() else None)
        return Controller(policies, LiveSources(stats, gpu_sampler, triton, memory), actuator,
                          interval_s=policy.control.interval_s, dry_run=policy.control.dry_run, registry=registry,
                          max_concurrent_reloads=policy.control.max_concurrent_reloads,
                          max_reloads_per_minute=policy.control.max_reloads_per_minute, recorder=recorder)

    return factory
