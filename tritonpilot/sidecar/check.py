"""`tritonpilot check FILE`: validate a policy file and print what it resolves to per model.

Exit status: 0 valid (warnings are printed but do not fail, unless --strict), 2 invalid
(a usage error or an invalid policy, as everywhere in tritonpilot).
The resolved policy goes to stdout; warnings and errors to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from tritonpilot import exits, resources
from tritonpilot.control.policy import Policy, PolicyError, ResolvedModelPolicy, load_policy, policy_warnings, resolve


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", nargs="?", help="the policy YAML")
    parser.add_argument("--example", action="store_true",
                        help="check the example policy that ships with tritonpilot (its path is printed: copy it)")
    parser.add_argument("--strict", action="store_true", help="exit 2 on warnings too")


def run(args: argparse.Namespace) -> int:
    if (args.file is None) == (not args.example):
        print("tritonpilot check: give either a policy FILE or --example", file=sys.stderr)
        return exits.USAGE
    if args.example:
        with resources.deploy_path(resources.EXAMPLE_POLICY) as example:
            args.file = str(example)
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        count = len(exc.problems)
        print(f"{args.file}: invalid policy, {count} problem{'s' if count != 1 else ''}:", file=sys.stderr)
        print(exc, file=sys.stderr)
        return exits.USAGE
    print_policy(policy, args.file, sys.stdout)
    warnings = policy_warnings(policy)
    if warnings:
        print(f"{args.file}: {len(warnings)} warning{'s' if len(warnings) != 1 else ''}:", file=sys.stderr)
        for warning in warnings:
            print(f"  - {warning}", file=sys.stderr)
    return exits.USAGE if warnings and args.strict else exits.OK


def print_policy(policy: Policy, source: str, out: TextIO) -> None:
    c = policy.control
    print(f"{source}: valid", file=out)
    print(f"triton {policy.triton.grpc}, proxy listens on {policy.proxy.listen}, "
          f"metrics on {policy.metrics.listen}", file=out)
    print(f"control: every {_n(c.interval_s)}s, reload strategy {c.reload_strategy}, "
          f"reload timeout {_n(c.reload_timeout_s)}s, failed config backoff {_n(c.failed_config_backoff_s)}s"
          + (", DRY RUN (decides and logs, never reloads)" if c.dry_run else ""), file=out)
    per_minute = "unlimited" if c.max_reloads_per_minute is None else f"at most {c.max_reloads_per_minute}"
    print(f"reload budget, all models together: at most {c.max_concurrent_reloads} in progress, "
          f"{per_minute} started per minute", file=out)
    resolved = resolve(policy)
    if not resolved:
        print("no models under `models`: nothing is reloaded, every model is only proxied", file=out)
    for model in resolved.values():
        print(file=out)
        print_model(model, out)


def print_model(m: ResolvedModelPolicy, out: TextIO) -> None:
    target = m.target_inflight_per_instance
    print(f"model {m.model}", file=out)
    print(f"  instances {m.min_instances}..{m.max_instances}, target {_n(target)} in flight per instance; "
          f"up past n x {_n(target * (1 + m.tolerance_ratio))} in flight (tolerance {m.tolerance_ratio:.0%})",
          file=out)
    print(f"  up after {_n(m.scale_up_delay_s)}s, down after {_n(m.scale_down_delay_s)}s; panic at "
          f"{_n(m.panic_threshold_ratio)}x capacity for {_n(m.panic_window_s)}s; at most {m.max_step} "
          f"per step; cooldown >= {_n(m.cooldown_s)}s and >= the last reload's duration", file=out)
    print(f"  GPU: no new instance at >= {m.gpu_utilization_ceiling_ratio:.0%} utilization; keep "
          f"max({m.gpu_memory_headroom_ratio:.0%} of memory, {m.gpu_memory_headroom_bytes} bytes) free", file=out)
    v = m.verify
    if v.enabled:
        print(f"  verify each change: {_n(v.settle_s)}s settle, then {_n(v.window_s)}s against the window before; "
              f"a gain is >= {v.min_gain_ratio:.0%} throughput or latency", file=out)
        print(f"    reverted on p95 > +{v.max_p95_worsening_ratio:.0%}, failed share up > "
              f"{v.max_error_increase_ratio * 100:g} point(s), or no gain while saturated "
              f"(then a ceiling for {_n(v.ceiling_backoff_s)}s); "
              f"inconclusive when in flight and arrival both moved > {v.max_load_change_ratio:.0%}", file=out)
    else:
        print("  verify: off (changes are not judged, reverted or probed)", file=out)
    lk = m.leak
    if lk.enabled:
        print(f"  leak watchdog: {_n(lk.settle_s)}s after each reload, Triton's memory per config; "
              f"{lk.min_reloads} rises in a row at one config, each > {lk.min_growth_bytes} bytes and > "
              f"{lk.min_growth_ratio:.0%}, block every change of this model", file=out)
    else:
        print("  leak watchdog: off", file=out)
    print("  profile by count:", file=out)
    for count in range(m.min_instances, m.max_instances + 1):
        profile = m.profile_for(count)
        if profile is None:  # not in a validated policy; shown rather than hidden
            print(f"    {count}: (no rule)", file=out)
            continue
        flags = " ".join(f"{k}={v}" for k, v in profile.parameters.items()) or "(no flags)"
        print(f"    {count}: {profile.name}  {flags}", file=out)


def _n(value: float) -> str:
    """1.0 -> '1', 0.5 -> '0.5'."""
    return f"{value:g}"
