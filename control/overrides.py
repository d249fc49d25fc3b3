"""Model-config overrides: what the controller sends with a load, built from the live config.

Pure functions on the JSON form of Triton's ModelConfig (as ModelConfig RPC
returns it with as_json=True, and as RepositoryModelLoad's `config` takes it).

Facts this relies on (docs/triton-notes.md, section 2):
- the override replaces the whole config, `parameters` included, so it is built
  from the live one and changes only what the controller owns;
- only `string_value` parameters are read by the PyTorch backend;
- a change besides instance_group/version_policy makes Triton load a new copy
  beside the old one and swap (a full reload); a count-only change takes the
  in-place path, which can block for minutes under load. Bumping
  GENERATION_PARAMETER with the count forces the full reload.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tritonpilot.control.policy import GENERATION_PARAMETER


@dataclass(frozen=True)
class LiveModelState:
    """What Triton's own config says the model runs now."""
    instances: int              # count of the first instance_group (see instance_count)
    parameters: dict[str, str]  # every string parameter
    generation: int             # GENERATION_PARAMETER, 0 when absent


def instance_count(config: Mapping[str, Any]) -> int:
    """Instances per group entry. Triton's count is per group (per listed GPU for
    KIND_GPU); the controller sets the same count on every group, so one number says it."""
    groups = config.get("instance_group") or [{}]
    return int(groups[0].get("count", 1) or 1)


def string_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in (config.get("parameters") or {}).items():
        if isinstance(value, Mapping) and "string_value" in value:
            out[key] = str(value["string_value"])
    return out


def read_state(config: Mapping[str, Any]) -> LiveModelState:
    params = string_parameters(config)
    try:
        generation = int(params.get(GENERATION_PARAMETER, "0"))
    except ValueError:
        generation = 0
    return LiveModelState(instance_count(config), params, generation)


def build_override(live: Mapping[str, Any], instances: int, parameters: Mapping[str, str],
                   managed_keys: Iterable[str], generation: int | None) -> dict[str, Any]:
    """The live config with the instance count and the profile's flags replaced.

    managed_keys: every flag key any profile of this model sets; those the new
    profile lacks are removed (so stepping back to one instance drops
    DISABLE_OPTIMIZED_EXECUTION). Other parameters, instance kinds and gpus stay.
    generation: written as GENERATION_PARAMETER to force a full reload; None keeps the
    live value untouched (an in-place, count-only update when only the count changes).
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    config = copy.deepcopy(dict(live))
    groups = config.get("instance_group") or [{"kind": "KIND_AUTO"}]
    config["instance_group"] = [{**group, "count": instances} for group in groups]
    params = dict(config.get("parameters") or {})
    for key in managed_keys:
        if key not in parameters:
            params.pop(key, None)
    for key, value in parameters.items():
        params[key] = {"string_value": str(value)}
    if generation is not None:
        params[GENERATION_PARAMETER] = {"string_value": str(generation)}
    config["parameters"] = params
    return config


def matches(config: Mapping[str, Any], instances: int, parameters: Mapping[str, str],
            managed_keys: Iterable[str]) -> bool:
    """Does Triton's config show this count and exactly this profile's managed flags?"""
    live = string_parameters(config)
    if any(instance_count({"instance_group": [g]}) != instances for g in config.get("instance_group") or [{}]):
        return False
    managed = {k: v for k, v in live.items() if k in set(managed_keys) | set(parameters)}
    return managed == {k: str(v) for k, v in parameters.items()}
