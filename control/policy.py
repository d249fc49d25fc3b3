"""The policy file: what the sidecar controls and within which bounds.

One YAML file (`tritonpilot serve --policy FILE`, `tritonpilot check FILE`). The keys
of issue 3 are fixed because operators script against them; the rest are ours.

Public surface:
- `load_policy(path) -> Policy` and `parse_policy(data, source) -> Policy`: validate
  everything and raise one `PolicyError` listing every problem as
  `key.path: got <value>; <what is allowed>`;
- `policy_warnings(policy) -> list[str]`: what is legal but likely a mistake;
- `resolve(policy) -> dict[model, ResolvedModelPolicy]`: defaults merged with each
  model's overrides, the form the decision core (control/decide.py) reads.

Validation runs in two passes: pydantic checks each value on its own (types, ranges,
unknown keys), then `_semantic_problems` checks what needs several values at once
(min <= max, profile coverage, flags across models). Flag values are also checked on
the raw YAML when the first pass fails, so one run shows as many problems as it can.
Facts about the flags: docs/triton-notes.md.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from tritonpilot.proxy.restrict import RestrictionError, parse_restriction, parse_restrictions

# ---------------------------------------------------------------------------------------
# PyTorch-backend flags (values are Triton `parameters` string_values)

BOOLEAN_FLAGS: frozenset[str] = frozenset({
    "INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION", "ENABLE_NVFUSER", "ENABLE_JIT_EXECUTOR",
    "ENABLE_JIT_PROFILING", "ENABLE_TENSOR_FUSER", "DISABLE_CUDNN", "ENABLE_WEIGHT_SHARING",
    "ENABLE_CACHE_CLEANING",
})
# Parsed with std::stoi and applied once per server process: the first model that sets them wins.
THREAD_COUNT_FLAGS: frozenset[str] = frozenset({"INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT"})
KNOWN_FLAGS: frozenset[str] = BOOLEAN_FLAGS | THREAD_COUNT_FLAGS
# Process-global torch JIT/fuser switches, set on every execute when the key is present:
# two models with different values overwrite each other's setting all the time.
PROCESS_GLOBAL_FLAGS: frozenset[str] = frozenset({
    "ENABLE_JIT_EXECUTOR", "ENABLE_JIT_PROFILING", "ENABLE_TENSOR_FUSER",
})
# The parameter the actuator bumps with each change so Triton takes a full reload.
GENERATION_PARAMETER = "tritonpilot_generation"

_TRUE_WORDS = ("true", "on", "1")
_FALSE_WORDS = ("false", "off", "0")
# std::stoi: optional leading whitespace and sign, then digits; anything after is ignored.
_STOI_PREFIX = re.compile(r"\s*([+-]?\d+)")
_INT32_MAX = 2**31 - 1


def parse_flag_bool(value: str) -> bool | None:
    """The boolean Triton reads from a flag value, or None where Triton would fail the load."""
    word = value.lower()  # Triton lower-cases and compares; no trimming
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    return None


def parse_flag_int(value: str) -> int | None:
    """The integer std::stoi reads from a flag value ("4x" -> 4), or None where it throws."""
    match = _STOI_PREFIX.match(value)
    if match is None:
        return None
    number = int(match.group(1))
    return number if -2**31 <= number <= _INT32_MAX else None


def _same_flag_value(key: str, a: str | None, b: str | None) -> bool:
    """Whether Triton would read the same setting from two values (None: key absent)."""
    if a is None or b is None:
        return a is b
    if key in BOOLEAN_FLAGS:
        return parse_flag_bool(a) == parse_flag_bool(b)
    if key in THREAD_COUNT_FLAGS:
        return parse_flag_int(a) == parse_flag_int(b)
    return a == b


# ---------------------------------------------------------------------------------------
# Field types

def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise PydanticCustomError("host_port", "must be HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:8001")
    return value


def _check_http_url(value: str) -> str:
    if not re.match(r"https?://[^/\s]+", value):
        raise PydanticCustomError("http_url", "must be an http:// or https:// URL, e.g. http://127.0.0.1:8002/metrics")
    return value


def _instances_range(value: Any) -> tuple[int, int | None]:
    """`instances: [lo, hi]`, hi null for no upper bound."""
    shape = "must be [lo, hi] with integers 1 <= lo <= hi (hi null for no upper bound)"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PydanticCustomError("instances_range", shape)
    lo, hi = value
    if not _is_int(lo) or lo < 1 or not (hi is None or _is_int(hi)):
        raise PydanticCustomError("instances_range", shape)
    if hi is not None and lo > hi:
        raise PydanticCustomError("instances_range", "lo must be <= hi (write [lo, null] for no upper bound)")
    return (lo, hi)


def _restriction(value: str) -> str:
    try:
        parse_restriction(value)
    except RestrictionError as exc:
        raise PydanticCustomError("restricted_protocol", "{rule}", {"rule": exc.rule}) from None
    return value


def _restrictions(value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        parse_restrictions(value)
    except RestrictionError as exc:
        raise PydanticCustomError("restricted_protocols", "{rule}", {"rule": exc.rule}) from None
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parameters_as_strings(value: Any) -> Any:
    """Triton reads only string_value; an unquoted integer can only mean its digits, so it
    is taken as a string. Unquoted booleans are refused later (YAML reads yes/on as true)."""
    if isinstance(value, dict):
        return {k: (str(v) if _is_int(v) else v) for k, v in value.items()}
    return value


HostPort = Annotated[StrictStr, AfterValidator(_check_host_port)]
HttpUrl = Annotated[StrictStr, AfterValidator(_check_http_url)]
Count = Annotated[StrictInt, Field(ge=1)]
PositiveSeconds = Annotated[StrictFloat, Field(gt=0)]
Seconds = Annotated[StrictFloat, Field(ge=0)]
FilePath = Annotated[StrictStr, Field(min_length=1)]  # read (and checked) by `serve` at start
Bytes = Annotated[StrictInt, Field(ge=0)]
ProfileName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
InstancesRange = Annotated[tuple[int, int | None], BeforeValidator(_instances_range)]
Parameters = Annotated[dict[StrictStr, StrictStr], BeforeValidator(_parameters_as_strings)]
ReloadStrategy = Literal["full", "update", "auto"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------------------
# The file's sections

class Profile(_Frozen):
    """A flag profile rule: at an instance count in `instances`, run with `parameters`."""

    name: ProfileName
    instances: InstancesRange
    # PyTorch-backend `parameters` string_values this profile sets. Do not mutate.
    parameters: Parameters = Field(default_factory=dict)

    def holds(self, count: int) -> bool:
        lo, hi = self.instances
        return lo <= count and (hi is None or count <= hi)


# INFERENCE_MODE alone at one instance; past one, DISABLE_OPTIMIZED_EXECUTION too (issue 3).
BUILTIN_PROFILES: tuple[Profile, ...] = (
    Profile(name="single", instances=(1, 1), parameters={"INFERENCE_MODE": "true"}),
    Profile(name="multi", instances=(2, None),
            parameters={"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "true"}),
)


def _unique_names(profiles: tuple[Profile, ...]) -> tuple[Profile, ...]:
    names = [p.name for p in profiles]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PydanticCustomError("profile_names", "profile names must be unique; repeated: {dup}",
                                  {"dup": ", ".join(dup)})
    return profiles


Profiles = Annotated[tuple[Profile, ...], Field(min_length=1), AfterValidator(_unique_names)]


class TritonSection(_Frozen):
    grpc: HostPort = "127.0.0.1:8001"
    http: HostPort = "127.0.0.1:8000"  # Triton's HTTP/REST port, where proxy.http_listen relays to
    # Triton's Prometheus endpoint: GPU data when NVML is not visible to the sidecar.
    metrics_url: HttpUrl | None = None
    # Triton serves TLS: the sidecar connects with TLS and verifies Triton's certificate
    # against this PEM CA file (null: plaintext to Triton).
    tls_ca: FilePath | None = None


class TlsSection(_Frozen):
    """TLS on the client port; the files are re-read on SIGHUP."""

    cert: FilePath  # PEM certificate (chain)
    key: FilePath   # its PEM private key
    client_ca: FilePath | None = None  # set: clients must present a certificate it signed (mTLS)


def _http_listen(value: str) -> str:
    return value if value == "off" else _check_host_port(value)


class ProxySection(_Frozen):
    listen: HostPort = "0.0.0.0:8101"
    # The HTTP/REST port ("off": none), relayed to triton.http.
    http_listen: Annotated[StrictStr, AfterValidator(_http_listen)] = "0.0.0.0:8100"
    # Relay processes sharing the client ports (serve --workers); the controller runs once.
    workers: Annotated[StrictInt, Field(ge=1, le=256)] = 1
    # Refuse larger request messages; null = no limit (Triton's own limit still applies).
    max_message_bytes: Annotated[StrictInt, Field(ge=1, le=_INT32_MAX)] | None = None
    # Clients' RepositoryModelLoad/Unload would fight the controller, so refused by default.
    allow_client_model_control: StrictBool = False
    # On SIGTERM, how long open calls may finish before they are closed.
    grace_period_s: Seconds = 30.0
    tls: TlsSection | None = None  # null: plaintext clients
    # Client connections (null: off): past max_connections, new ones are closed unread; one
    # that has not sent the HTTP/2 preface (and finished TLS) within preface_timeout_s is
    # closed; one with no call for idle_timeout_s, or older than max_connection_age_s
    # (+-10% jitter), gets a graceful GOAWAY, and is closed max_connection_age_grace_s later
    # if calls are still open.
    max_connections: Count | None = None
    preface_timeout_s: PositiveSeconds | None = 10.0
    idle_timeout_s: PositiveSeconds | None = None
    max_connection_age_s: PositiveSeconds | None = None
    max_connection_age_grace_s: Seconds = 30.0
    # HTTP/2 abuse limits per client connection (null: off). Past a rate (frames within 1 s)
    # or the header block size, the client gets GOAWAY ENHANCE_YOUR_CALM and is closed;
    # streams past max_concurrent_streams get REFUSED_STREAM, and the client is told
    # min(Triton's, this) in Triton's SETTINGS.
    max_resets_per_s: Count | None = 1000
    max_header_block_bytes: Annotated[StrictInt, Field(ge=1, le=_INT32_MAX)] | None = 65536
    max_settings_per_s: Count | None = 100
    max_pings_per_s: Count | None = 1000
    max_empty_frames_per_s: Count | None = 100
    max_concurrent_streams: Annotated[StrictInt, Field(ge=1, le=_INT32_MAX)] | None = None
    # Triton's --grpc-restricted-protocol rules ("GROUPS:KEY=VALUE"), enforced by the proxy.
    restricted_protocols: Annotated[tuple[Annotated[StrictStr, AfterValidator(_restriction)], ...],
                                    AfterValidator(_restrictions)] = ()
    # Triton's --http-restricted-api rules ("APIS:KEY=VALUE", the same groups), on the HTTP port.
    http_restricted_apis: Annotated[tuple[Annotated[StrictStr, AfterValidator(_restriction)], ...],
                                    AfterValidator(_restrictions)] = ()
    # Every model's cap on requests in flight through the proxy (null: no cap);
    # models.<name>.max_inflight overrides it.
    max_inflight: Count | None = None


class MetricsSection(_Frozen):
    listen: HostPort = "127.0.0.1:9101"


class ControlSection(_Frozen):
    interval_s: PositiveSeconds = 1.0
    dry_run: StrictBool = False  # decide and log, never reload
    # full: every change loads a new copy beside the old one (about 2x memory meanwhile);
    # update: count-only changes take Triton's in-place path (can block under load);
    # auto: full where the GPU memory headroom holds two copies, else update.
    reload_strategy: ReloadStrategy = "full"
    # How long the load RPC waits for Triton's answer. Without one, the reload is verified
    # from Triton's config for up to 30 s more, then reported "timeout" and backed off from.
    reload_timeout_s: PositiveSeconds = 120.0
    # After a failed load, that exact config (count + profile) is not retried for this long.
    failed_config_backoff_s: Seconds = 300.0
    # A signal older than this is "no data". Must be >= interval_s.
    max_signal_age_s: PositiveSeconds = 5.0
    # The pod-wide reload budget, across all models: reloads in progress at once, and
    # reloads started in any 60 s (null: unlimited). A change held by it is "reload-budget".
    max_concurrent_reloads: Count = 1
    max_reloads_per_minute: Count | None = 6


class VerifySettings(_Frozen):
    """`verify`: after each load-driven change, compare a window before with a window after
    (control/verify.py); revert what did not help, remember the useful ceiling.

    On by default (issue 10): a step-down probe waits for a steady load and is not tried when
    the offered load needs the count, and a revert whose load is gone is dropped, so the
    controller benchmark's step no longer pays for it (docs/benchmarks.md, Controller)."""

    enabled: StrictBool = True
    # After the reload finished, wait this long before the after-window starts (warm-up).
    settle_s: Seconds = 10.0
    # Length of the after-window (and the most of the before-window that counts).
    window_s: PositiveSeconds = 20.0
    # A gain smaller than this (throughput up, or latency down, as a ratio) is noise; so is a loss.
    min_gain_ratio: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.1
    # p95 (or Triton's mean latency without the proxy) may grow by at most this ratio.
    max_p95_worsening_ratio: Annotated[StrictFloat, Field(ge=0)] = 0.25
    # The share of requests that fail may rise by at most this (absolute: 0.01 = one point).
    max_error_increase_ratio: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.01
    # The windows compare only when the in-flight mean or the arrival rate moved by at most this.
    max_load_change_ratio: Annotated[StrictFloat, Field(ge=0)] = 0.25
    # A learned ceiling holds this long (or until the profile above it changes), then one probe.
    ceiling_backoff_s: Seconds = 600.0


class VerifyOverride(_Frozen):
    """`models.<name>.verify`: any `defaults.verify` key; absent keys come from the defaults."""

    enabled: StrictBool | None = None
    settle_s: Seconds | None = None
    window_s: PositiveSeconds | None = None
    min_gain_ratio: Annotated[StrictFloat, Field(ge=0, lt=1)] | None = None
    max_p95_worsening_ratio: Annotated[StrictFloat, Field(ge=0)] | None = None
    max_error_increase_ratio: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    max_load_change_ratio: Annotated[StrictFloat, Field(ge=0)] | None = None
    ceiling_backoff_s: Seconds | None = None


class LeakSettings(_Frozen):
    """`leak`: the reload leak watchdog (control/leak.py). After each reload, once settled,
    Triton's memory is sampled per config (count, profile); memory at the same config that
    rises at each of `min_reloads` returns in a row stops this model's reconfiguration."""

    enabled: StrictBool = True
    # After a reload finished, wait this long before taking its memory sample.
    settle_s: Seconds = 10.0
    # Rises in a row (returns to the same config, each higher than the one before) that make a leak.
    min_reloads: Count = 3
    # A rise counts when it exceeds both: this many bytes, and this ratio of the memory before it.
    min_growth_bytes: Bytes = 67_108_864
    min_growth_ratio: Annotated[StrictFloat, Field(ge=0)] = 0.0


class LeakOverride(_Frozen):
    """`models.<name>.leak`: any `defaults.leak` key; absent keys come from the defaults."""

    enabled: StrictBool | None = None
    settle_s: Seconds | None = None
    min_reloads: Count | None = None
    min_growth_bytes: Bytes | None = None
    min_growth_ratio: Annotated[StrictFloat, Field(ge=0)] | None = None


class LoggingSection(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["console", "json"] = "console"


class ModelSettings(_Frozen):
    """`defaults`: every controlled model's settings unless it overrides them."""

    min_instances: Count = 1
    max_instances: Count = 4
    # Requests in flight per instance to aim for (Knative's target x 0.7 is this number:
    # use a value below 1 to keep headroom for bursts).
    target_inflight_per_instance: Annotated[StrictFloat, Field(gt=0)] = 1.0
    # Width of the band above the target that is tolerated before scaling up: at n
    # instances, scale up once in-flight exceeds n x target x (1 + tolerance_ratio).
    tolerance_ratio: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.25
    scale_up_delay_s: Seconds = 5.0
    scale_down_delay_s: Seconds = 60.0
    # Panic: in-flight >= this x (instances x target) scales up without the up delay.
    panic_threshold_ratio: Annotated[StrictFloat, Field(gt=1)] = 2.0
    # How long the panic condition must hold first (0 = the first tick that sees it).
    panic_window_s: Seconds = 1.0
    max_step: Count = 4  # most instances added or removed by one decision
    # Quiet time after each change: at least this, and at least the last reload's duration.
    cooldown_s: Seconds = 10.0
    # No new instance while the GPU is this busy: more instances would only queue on it.
    gpu_utilization_ceiling_ratio: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.95
    # GPU memory kept free after any reload: the larger of ratio x total and bytes.
    gpu_memory_headroom_ratio: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.1
    gpu_memory_headroom_bytes: Bytes = 0
    # The first rule whose range holds the count wins.
    profiles: Profiles = BUILTIN_PROFILES
    verify: Annotated[VerifySettings, BeforeValidator(_empty_as_default)] = VerifySettings()
    leak: Annotated[LeakSettings, BeforeValidator(_empty_as_default)] = LeakSettings()


class ModelOverride(_Frozen):
    """`models.<name>`: any `defaults` key; absent (or null) keys come from `defaults`. Plus
    max_inflight, the proxy's cap, whose default is `proxy.max_inflight`."""

    min_instances: Count | None = None
    max_instances: Count | None = None
    target_inflight_per_instance: Annotated[StrictFloat, Field(gt=0)] | None = None
    tolerance_ratio: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    scale_up_delay_s: Seconds | None = None
    scale_down_delay_s: Seconds | None = None
    panic_threshold_ratio: Annotated[StrictFloat, Field(gt=1)] | None = None
    panic_window_s: Seconds | None = None
    max_step: Count | None = None
    cooldown_s: Seconds | None = None
    gpu_utilization_ceiling_ratio: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    gpu_memory_headroom_ratio: Annotated[StrictFloat, Field(ge=0, lt=1)] | None = None
    gpu_memory_headroom_bytes: Bytes | None = None
    profiles: Profiles | None = None
    verify: VerifyOverride | None = None  # merged key by key over defaults.verify
    leak: LeakOverride | None = None  # merged key by key over defaults.leak
    # This model's cap on requests in flight through the proxy (else proxy.max_inflight).
    max_inflight: Count | None = None


def _empty_as_default(value: Any) -> Any:
    # `models:` with nothing under it, or `name:` with no keys, is YAML null.
    return {} if value is None else value


class Policy(_Frozen):
    """The whole file. Every section may be omitted; models not under `models` are
    proxied and never reloaded."""

    triton: Annotated[TritonSection, BeforeValidator(_empty_as_default)] = TritonSection()
    proxy: Annotated[ProxySection, BeforeValidator(_empty_as_default)] = ProxySection()
    metrics: Annotated[MetricsSection, BeforeValidator(_empty_as_default)] = MetricsSection()
    control: Annotated[ControlSection, BeforeValidator(_empty_as_default)] = ControlSection()
    logging: Annotated[LoggingSection, BeforeValidator(_empty_as_default)] = LoggingSection()
    defaults: Annotated[ModelSettings, BeforeValidator(_empty_as_default)] = ModelSettings()
    models: Annotated[dict[StrictStr, Annotated[ModelOverride, BeforeValidator(_empty_as_default)]],
                      BeforeValidator(_empty_as_default)] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelOverride]) -> dict[str, ModelOverride]:
        bad = [name for name in models if not name or "/" in name]
        if bad:
            raise PydanticCustomError("model_name", "model names must be non-empty and contain no '/'; got {bad}",
                                      {"bad": bad})
        return models


# ---------------------------------------------------------------------------------------
# What the decision core reads

@dataclass(frozen=True)
class VerifyPolicy:
    """One model's `verify` keys, defaults merged with its overrides (`VerifySettings`)."""

    enabled: bool = True
    settle_s: float = 10.0
    window_s: float = 20.0
    min_gain_ratio: float = 0.1
    max_p95_worsening_ratio: float = 0.25
    max_error_increase_ratio: float = 0.01
    max_load_change_ratio: float = 0.25
    ceiling_backoff_s: float = 600.0


@dataclass(frozen=True)
class LeakPolicy:
    """One model's `leak` keys, defaults merged with its overrides (`LeakSettings`)."""

    enabled: bool = True
    settle_s: float = 10.0
    min_reloads: int = 3
    min_growth_bytes: int = 67_108_864
    min_growth_ratio: float = 0.0


@dataclass(frozen=True)
class ResolvedModelPolicy:
    """One controlled model's policy, defaults merged with its overrides.

    Field meanings are those of `ModelSettings` / `ControlSection`; the decision core
    (control/decide.py) documents how each is used.
    """

    model: str
    min_instances: int
    max_instances: int
    target_inflight_per_instance: float
    tolerance_ratio: float
    scale_up_delay_s: float
    scale_down_delay_s: float
    panic_threshold_ratio: float
    panic_window_s: float
    max_step: int
    cooldown_s: float
    gpu_utilization_ceiling_ratio: float
    gpu_memory_headroom_ratio: float
    gpu_memory_headroom_bytes: int
    profiles: tuple[Profile, ...]
    reload_strategy: ReloadStrategy = "full"
    failed_config_backoff_s: float = 300.0
    max_signal_age_s: float = 5.0
    verify: VerifyPolicy = VerifyPolicy()
    leak: LeakPolicy = LeakPolicy()

    def profile_for(self, count: int) -> Profile | None:
        """The first rule whose range holds the count (None only in an unvalidated policy)."""
        return next((p for p in self.profiles if p.holds(count)), None)

    @property
    def managed_parameter_keys(self) -> frozenset[str]:
        """Keys any profile of this model sets. Applying a profile sets its keys and removes
        the other managed keys; the model's other parameters are left alone."""
        return frozenset(k for p in self.profiles for k in p.parameters)

    def parameters_match(self, profile: Profile, live: Mapping[str, str]) -> bool:
        """Whether a live config's parameters already run `profile` (as Triton reads them)."""
        return all(_same_flag_value(k, profile.parameters.get(k), live.get(k))
                   for k in self.managed_parameter_keys)

    def live_profile(self, live: Mapping[str, str]) -> str | None:
        """The name of the first profile the live parameters match, or None."""
        return next((p.name for p in self.profiles if self.parameters_match(p, live)), None)


def resolve(policy: Policy) -> dict[str, ResolvedModelPolicy]:
    """Each model under `models`, its keys taken from its override or else `defaults`."""
    return {name: _resolve_one(policy, name, override) for name, override in policy.models.items()}


def _resolve_one(policy: Policy, name: str, override: ModelOverride) -> ResolvedModelPolicy:
    merged = {key: (getattr(override, key) if getattr(override, key) is not None else getattr(policy.defaults, key))
              for key in ModelSettings.model_fields}
    own_verify = override.verify.model_dump(exclude_none=True) if override.verify is not None else {}
    merged["verify"] = VerifyPolicy(**(policy.defaults.verify.model_dump() | own_verify))
    own_leak = override.leak.model_dump(exclude_none=True) if override.leak is not None else {}
    merged["leak"] = LeakPolicy(**(policy.defaults.leak.model_dump() | own_leak))
    return ResolvedModelPolicy(
        model=name, **merged,
        reload_strategy=policy.control.reload_strategy,
        failed_config_backoff_s=policy.control.failed_config_backoff_s,
        max_signal_age_s=policy.control.max_signal_age_s,
    )


def _source(policy: Policy, model: str, key: str) -> str:
    """The key path a model's resolved value came from."""
    return f"models.{model}.{key}" if getattr(policy.models[model], key) is not None else f"defaults.{key}"


# ---------------------------------------------------------------------------------------
# Loading and errors

class PolicyError(Exception):
    """An invalid policy. `problems` holds one `key.path: got <value>; <allowed>` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a policy must not."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; PolicyError lists every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), [f"{path}: cannot read the policy file: {exc.strerror or exc}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(str(path), [_yaml_problem(path, exc)]) from None
    return parse_policy(data, str(path))


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")


def parse_policy(data: object, source: str = "<policy>") -> Policy:
    """Validate already-parsed YAML (None = an empty file)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise PolicyError(source, [f"(top level): got {_show(data)}; must be a mapping of sections "
                                   f"({', '.join(Policy.model_fields)})"])
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        problems = [_pydantic_problem(err) for err in _root_causes(exc.errors())]
        raw_errors, _ = _raw_flag_problems(data)  # flag values inside lists pydantic rejected
        raise PolicyError(source, _dedup(problems + raw_errors + _errors_beyond(data, exc))) from None
    errors, _ = _semantic_problems(policy)
    if errors:
        raise PolicyError(source, errors)
    return policy


def _root_causes(errors: list[Any]) -> list[Any]:
    """pydantic also says a list is too short when one of its items failed: drop that echo."""
    locs = [tuple(e["loc"]) for e in errors]
    return [e for e in errors
            if not (e["type"] == "too_short"
                    and any(len(loc) > len(e["loc"]) and loc[:len(e["loc"])] == tuple(e["loc"]) for loc in locs))]


def _errors_beyond(data: dict, exc: ValidationError, rounds: int = 5) -> list[str]:
    """The cross-value errors of the rest of the file: prune what failed (so defaults
    apply there), validate again, and keep the errors that do not touch a pruned key."""
    pruned: list[str] = []
    for _ in range(rounds):
        for err in exc.errors():
            pruned.append(_path(_prune_loc(tuple(err["loc"]))))
            data = _pruned_copy(data, tuple(err["loc"]))
        try:
            policy = Policy.model_validate(data)
        except ValidationError as again:
            exc = again
            continue
        errors, _ = _semantic_problems(policy)
        return [e for e in errors if not any(path in e for path in pruned)]
    return []


def _prune_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    # Removing a list item would renumber the rest, so the whole list goes.
    for i, part in enumerate(loc):
        if isinstance(part, int):
            return loc[:i]
    return loc


def _pruned_copy(data: dict, loc: tuple[str | int, ...]) -> dict:
    """A copy of data without the key at loc (shallow copies along the path)."""
    loc = _prune_loc(loc)
    if not loc:
        return data
    head, rest = loc[0], loc[1:]
    if head not in data:
        return data
    out = dict(data)
    if not rest:
        del out[head]
    elif isinstance(out[head], dict):
        out[head] = _pruned_copy(out[head], rest)
    else:
        del out[head]
    return out


def policy_warnings(policy: Policy) -> list[str]:
    """Legal but likely mistakes, in the same `key.path: got ...; ...` form."""
    return _semantic_problems(policy)[1]


def _dedup(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


# pydantic error type -> what is allowed, from the error's context.
_ALLOWED: dict[str, str] = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "literal_error": "must be one of {expected}",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "too_short": "must have at least {min_length} item(s)",
    "string_pattern_mismatch": "must match {pattern} (letters, digits, '_', '.', '-')",
}


def _pydantic_problem(err: Mapping[str, Any]) -> str:
    loc = tuple(err["loc"])
    path = _path(loc)
    kind = err["type"]
    if kind == "missing":
        return f"{path}: missing; required"
    if kind == "extra_forbidden":
        return f"{path}: got {_show(err['input'])}; {_unknown_key_hint(loc)}"
    if kind == "string_type" and len(loc) >= 2 and loc[-2] == "parameters":
        return (f"{path}: got {_show(err['input'])}; must be a quoted string such as \"true\": "
                "Triton reads only string_value, and YAML reads unquoted yes/no/on/off as booleans")
    template = _ALLOWED.get(kind)
    if template is None:  # our own PydanticCustomError messages are already phrased as rules
        allowed = err["msg"]
    else:
        allowed = template.format(**{k: v for k, v in (err.get("ctx") or {}).items()})
    return f"{path}: got {_show(err['input'])}; {allowed}"


def _unknown_key_hint(loc: tuple[str | int, ...]) -> str:
    allowed = _allowed_keys(loc[:-1])
    if not allowed:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown key; {hint}allowed here: {', '.join(allowed)}"


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    """The keys the model at `loc` accepts, found by walking the annotations."""
    model: type[BaseModel] | None = Policy
    skip = 0  # loc parts that are list indexes or dict keys
    for part in loc:
        if skip:
            skip -= 1
            continue
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        model, skip = _model_inside(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _model_inside(annotation: Any) -> tuple[type[BaseModel] | None, int]:
    """The pydantic model inside an annotation and how many container levels wrap it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, 0
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _model_inside(args[0])
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found = _model_inside(arg)
            if found[0] is not None:
                return found
        return None, 0
    if origin in (list, tuple, dict):
        inner, depth = _model_inside(args[-1] if origin is dict else args[0])
        return inner, depth + 1
    return None, 0


# ---------------------------------------------------------------------------------------
# Semantic checks (several values at once)

@dataclass(frozen=True)
class _ProfileSource:
    path: str  # e.g. "defaults.profiles" or "models.m.profiles"
    profiles: tuple[Profile, ...]
    models: tuple[str, ...]  # the controlled models that use these rules


def _profile_sources(policy: Policy) -> list[_ProfileSource]:
    inheriting = tuple(m for m, o in policy.models.items() if o.profiles is None)
    # The defaults are checked even when no model uses them: they are what a new model gets.
    sources = [_ProfileSource("defaults.profiles", policy.defaults.profiles, inheriting)]
    sources += [_ProfileSource(f"models.{m}.profiles", o.profiles, (m,))
                for m, o in policy.models.items() if o.profiles is not None]
    return sources


def _semantic_problems(policy: Policy) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    control = policy.control
    if control.max_signal_age_s < control.interval_s:
        errors.append(f"control.max_signal_age_s: got {control.max_signal_age_s}; must be >= control.interval_s "
                      f"({control.interval_s}), or every tick would see no data")
    sources = _profile_sources(policy)
    for source in sources:
        for i, profile in enumerate(source.profiles):
            for key, value in profile.parameters.items():
                e, w = _flag_problems(f"{source.path}[{i}].parameters.{key}", key, value)
                errors += e
                warnings += w
        warnings += _shadowed_rules(source)
    errors += _range_problems(policy)
    errors += _thread_count_conflicts(policy, sources)
    warnings += _process_global_conflicts(policy)
    warnings += _cap_below_scaling(policy)
    if not policy.models:
        warnings.append("models: got {}; no model is controlled: the sidecar only proxies "
                        "(list models under `models` to tune them)")
    return _dedup(errors), _dedup(warnings)


def _flag_problems(path: str, key: str, value: str) -> tuple[list[str], list[str]]:
    """One `parameters` entry on its own: can Triton read it, and is it a flag we know?"""
    if key == GENERATION_PARAMETER:
        return [f"{path}: got {value!r}; {GENERATION_PARAMETER} is reserved: tritonpilot sets it on "
                "every reload to force a full reload"], []
    if key in BOOLEAN_FLAGS:
        if parse_flag_bool(value) is None:
            return [f"{path}: got {value!r}; Triton parses only true/on/1/false/off/0 (case-insensitive) "
                    "and would fail the load"], []
        if key == "ENABLE_NVFUSER":
            return [], [f"{path}: got {value!r}; ENABLE_NVFUSER was removed in Triton 23.12 and is ignored since"]
        return [], []
    if key in THREAD_COUNT_FLAGS:
        number = parse_flag_int(value)
        if number is None:
            return [f"{path}: got {value!r}; must be an integer: Triton parses it with std::stoi and "
                    "would fail the load"], []
        if number <= 0:
            return [], [f"{path}: got {value!r}; values <= 0 leave torch's thread pool as it is"]
        prefix = _STOI_PREFIX.match(value)
        assert prefix is not None  # parse_flag_int read a number, so the prefix matched
        if prefix.end() != len(value):
            return [], [f"{path}: got {value!r}; std::stoi reads it as {number} and ignores the rest"]
        return [], []
    close = difflib.get_close_matches(key, sorted(KNOWN_FLAGS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return [], [f"{path}: got {value!r}; {key} is not a PyTorch-backend flag ({hint}known: "
                f"{', '.join(sorted(KNOWN_FLAGS))}); it is passed to the model as is"]


def _raw_flag_problems(data: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Flag-value checks on raw YAML, for when the structure did not validate."""
    errors: list[str] = []
    warnings: list[str] = []
    for path, profiles in _raw_profile_lists(data):
        for i, profile in enumerate(profiles):
            params = profile.get("parameters") if isinstance(profile, dict) else None
            if not isinstance(params, dict):
                continue
            for key, value in params.items():
                if isinstance(key, str) and isinstance(value, str):
                    e, w = _flag_problems(f"{path}[{i}].parameters.{key}", key, value)
                    errors += e
                    warnings += w
    return errors, warnings


def _raw_profile_lists(data: Mapping[str, Any]) -> Iterator[tuple[str, list]]:
    defaults = data.get("defaults")
    if isinstance(defaults, dict) and isinstance(defaults.get("profiles"), list):
        yield "defaults.profiles", defaults["profiles"]
    models = data.get("models")
    if isinstance(models, dict):
        for name, override in models.items():
            if isinstance(override, dict) and isinstance(override.get("profiles"), list):
                yield f"models.{name}.profiles", override["profiles"]


def _range_problems(policy: Policy) -> list[str]:
    """min <= max, and every count in [min, max] has a profile rule: for the defaults, then
    for each model where one of those keys is its own (else the defaults' check said it)."""
    d = policy.defaults
    errors = _count_problems("defaults", d.min_instances, d.max_instances, d.profiles,
                             "defaults.min_instances", "defaults.max_instances", "defaults.profiles")
    for name, resolved in resolve(policy).items():
        override = policy.models[name]
        bounds_own = override.min_instances is not None or override.max_instances is not None
        if not bounds_own and override.profiles is None:
            continue
        lo_path, hi_path, profiles_path = (_source(policy, name, k)
                                           for k in ("min_instances", "max_instances", "profiles"))
        if resolved.min_instances > resolved.max_instances and not bounds_own:
            continue  # inherited min > max: reported once, at the defaults
        errors += _count_problems(f"models.{name}", resolved.min_instances, resolved.max_instances,
                                  resolved.profiles, lo_path, hi_path, profiles_path)
    return errors


def _count_problems(owner: str, lo: int, hi: int, profiles: tuple[Profile, ...],
                    lo_path: str, hi_path: str, profiles_path: str) -> list[str]:
    if lo > hi:
        for_owner = "" if lo_path.startswith(owner + ".") and hi_path.startswith(owner + ".") else f" for {owner}"
        return [f"{lo_path}: got {lo}; must be <= {hi_path} ({hi}){for_owner}"]
    uncovered = [n for n in range(lo, hi + 1) if not any(p.holds(n) for p in profiles)]
    if not uncovered:
        return []
    used_by = "" if profiles_path.startswith(owner + ".") else f" (used by {owner})"
    return [f"{profiles_path}{used_by}: got rules covering {_covered(profiles)}; instance counts "
            f"{_ranges(uncovered)} in [{lo}, {hi}] ({lo_path}, {hi_path}) match no rule; "
            "every count in [min_instances, max_instances] needs one (the first rule whose range holds it wins)"]


def _covered(profiles: tuple[Profile, ...]) -> str:
    return ", ".join(f"{p.name} [{p.instances[0]}, {'null' if p.instances[1] is None else p.instances[1]}]"
                     for p in profiles)


def _ranges(counts: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    runs: list[list[int]] = []
    for n in counts:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _shadowed_rules(source: _ProfileSource) -> list[str]:
    """A rule whose every count an earlier rule already takes never wins."""
    out = []
    for i, profile in enumerate(source.profiles):
        lo, hi = profile.instances
        earlier = source.profiles[:i]
        # Counts past every finite bound behave alike, so checking up to there is enough.
        top = max([lo] + [b for p in source.profiles[: i + 1] for b in p.instances if b is not None]) + 1
        counts = range(lo, (hi if hi is not None else top) + 1)
        if earlier and all(any(p.holds(n) for p in earlier) for n in counts):
            out.append(f"{source.path}[{i}].instances: got {_show(list(profile.instances))}; rule "
                       f"{profile.name!r} never wins: earlier rules take every count it holds")
    return out


def _cap_below_scaling(policy: Policy) -> list[str]:
    """The controller scales up only past n x target x (1 + tolerance) in flight, and the proxy
    never lets in-flight pass the cap: a cap below that at max_instances hides the load it needs."""
    warnings = []
    for name, resolved in resolve(policy).items():
        own = policy.models[name].max_inflight
        cap = own if own is not None else policy.proxy.max_inflight
        if cap is None:
            continue
        needed = math.ceil(resolved.max_instances * resolved.target_inflight_per_instance
                           * (1 + resolved.tolerance_ratio))
        if cap < needed:
            path = f"models.{name}.max_inflight" if own is not None else "proxy.max_inflight"
            warnings.append(f"{path}: got {cap}; below models.{name}'s max_instances x target_inflight_per_instance "
                            f"x (1 + tolerance_ratio) = {needed}: in flight never passes the cap, so the "
                            f"controller may never scale {name} up to max_instances; use >= {needed}")
    return warnings


def _thread_count_conflicts(policy: Policy, sources: list[_ProfileSource]) -> list[str]:
    """INTRA/INTER_OP_THREAD_COUNT are applied once per server process (the first model to
    load wins), so two different values among the controlled models cannot both hold."""
    errors = []
    for key in sorted(THREAD_COUNT_FLAGS):
        first: tuple[str, int] | None = None
        for source in sources:
            if not source.models:
                continue  # unused defaults can't conflict with anything loaded
            for i, profile in enumerate(source.profiles):
                value = profile.parameters.get(key)
                number = parse_flag_int(value) if value is not None else None
                if number is None:
                    continue
                path = f"{source.path}[{i}].parameters.{key}"
                if first is None:
                    first = (path, number)
                elif number != first[1]:
                    errors.append(f"{path}: got {value!r}; must equal {first[1]} as set at {first[0]}: Triton "
                                  f"applies {key} once per server process (the first model loaded wins), so a "
                                  "different value never takes effect")
    return errors


def _process_global_conflicts(policy: Policy) -> list[str]:
    """Controlled models that can run with different values of a process-global JIT flag
    (absent counts as a value: it leaves whatever another model set) overwrite each other."""
    resolved = resolve(policy)
    warnings = []
    for key in sorted(PROCESS_GLOBAL_FLAGS):
        values = {name: _reachable_values(r, key) for name, r in resolved.items()}
        distinct = {v for vs in values.values() for v in vs}
        if len(values) < 2 or len(distinct) < 2:
            continue  # with two models and two values, some pair of models differs
        path, value = next((f"{s.path}[{i}].parameters.{key}", p.parameters[key])
                           for s in _profile_sources(policy) if s.models
                           for i, p in enumerate(s.profiles) if key in p.parameters)
        per_model = ", ".join(f"models.{name}: {_describe(vs)}" for name, vs in sorted(values.items()))
        warnings.append(f"{path}: got {value!r}; the controlled models run {key} with different values "
                        f"({per_model}), and it is process-global in libtorch: models in one Triton overwrite "
                        "each other's setting on every execute; give every model the same value")
    return warnings


def _reachable_values(resolved: ResolvedModelPolicy, key: str) -> set[bool | None]:
    """The values of a boolean flag a model can run with, over the counts it can have."""
    out: set[bool | None] = set()
    for count in range(resolved.min_instances, resolved.max_instances + 1):
        profile = resolved.profile_for(count)
        if profile is not None:
            out.add(_bool_or_none(profile.parameters.get(key)))
    return out


def _bool_or_none(value: str | None) -> bool | None:
    return None if value is None else parse_flag_bool(value)


def _describe(values: set[bool | None]) -> str:
    words = sorted("unset" if v is None else str(v).lower() for v in values)
    return "/".join(words)


__all__ = [
    "BOOLEAN_FLAGS", "BUILTIN_PROFILES", "ControlSection", "GENERATION_PARAMETER", "KNOWN_FLAGS",
    "LeakOverride", "LeakPolicy", "LeakSettings", "LoggingSection", "MetricsSection", "ModelOverride",
    "ModelSettings", "PROCESS_GLOBAL_FLAGS", "Policy",
    "PolicyError", "Profile", "ProxySection", "ResolvedModelPolicy", "THREAD_COUNT_FLAGS", "TritonSection",
    "VerifyOverride", "VerifyPolicy", "VerifySettings", "load_policy", "parse_flag_bool", "parse_flag_int",
    "parse_policy", "policy_warnings", "resolve",
]
