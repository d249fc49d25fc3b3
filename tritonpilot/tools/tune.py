"""`tritonpilot tune`: flag profiles x instance counts x concurrency, measured on a live Triton.

    tritonpilot tune --triton HOST:PORT --model NAME [--profiles FILE|field-report]
        [--instances 1,2,4] [--concurrency-range 1:4] [--max-p95-ms X] --out DIR

For each (profile, instance count) the model is reloaded through the controller's
actuator (strategy "full": a new copy beside the old, verified from Triton's own
config and READY), then each concurrency level is measured with the bench engine
(closed loop, perf_analyzer's accounting). The original config, read before the
first reload, is loaded back at the end, also after an error or Ctrl-C/SIGTERM;
it is saved to DIR/original-config.json first, so it can be restored by hand if
Triton is gone by then.

Which combinations run: every profile at every --instances count at or above the
profile's `min_instances` (1 unless the profile says otherwise). The built-in
`multi-instance` profile has min_instances 2: DISABLE_OPTIMIZED_EXECUTION is the
field report's remedy for several instances sharing one device, so it is not
measured at one instance. Profiles with no count left are listed as skipped.
Order: profile by profile, counts ascending. With --rounds N the whole plan runs N
times, every other round backwards, and each level keeps the median over the rounds:
on a shared machine, load that comes and goes would otherwise be charged to whichever
profile happened to run then.

Flags the profiles set are the "managed" keys: applying a profile sets its keys
and removes the other managed keys, so `defaults` really runs without them. Other
parameters of the live config are kept as they are.

Outputs in DIR: results.csv (one row per combination and concurrency level),
chart.png, policy.yaml (the recommended controller policy, validated with
control.policy before it is written), summary.md, original-config.json.

Exit status: 0 done; 1 done, but a combination failed, the restore failed or no
level met the p95 bound (no policy); 2 a usage error or a Triton/model that
cannot be tuned (nothing was changed); 130 interrupted (the config is restored).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import signal
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from tritonpilot.control.policy import (
    BOOLEAN_FLAGS,
    GENERATION_PARAMETER,
    KNOWN_FLAGS,
    THREAD_COUNT_FLAGS,
    PolicyError,
    parse_flag_bool,
    parse_flag_int,
    parse_policy,
    policy_warnings,
)
from tritonpilot.tools.bench import detail_table, parse_range, perf_analyzer_summary, text_table
from tritonpilot.tools.benchlib import BenchError, LevelResult

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FIELD_REPORT = "field-report"
# Used only to weigh the progress bar's ETA before the first reload is timed.
RELOAD_ESTIMATE_S = 5.0
# How long a reload may take (Triton answers when the new copy serves).
DEFAULT_RELOAD_TIMEOUT_S = 180.0
# A larger count must beat the best smaller one by this much to raise max_instances.
DEFAULT_MIN_GAIN_RATIO = 0.05
# Read by no backend since 23.12; left out of the recommended policy (check would warn).
IGNORED_FLAGS = frozenset({"ENABLE_NVFUSER"})


class TuneError(Exception):
    """A problem the user can fix before anything changes: printed, exit code 2."""


# ------------------------------------------------------------------------------ profiles


@dataclass(frozen=True)
class TuneProfile:
    name: str
    parameters: Mapping[str, str]  # PyTorch-backend `parameters` string_values
    min_instances: int = 1  # measured only at counts >= this
    note: str = ""

    def flags_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.parameters.items()) or "(no flags)"


# The field report's four configurations (issue 4).
FIELD_REPORT_PROFILES: tuple[TuneProfile, ...] = (
    TuneProfile("defaults", {}, note="no flags set: the backend's defaults (INFERENCE_MODE is true since 23.06)"),
    TuneProfile("inference-mode", {"INFERENCE_MODE": "true"}),
    TuneProfile(
        "all-flags",
        {
            "INFERENCE_MODE": "true",
            "ENABLE_JIT_EXECUTOR": "true",
            "ENABLE_JIT_PROFILING": "true",
            "ENABLE_TENSOR_FUSER": "true",
            "ENABLE_NVFUSER": "true",
            "DISABLE_OPTIMIZED_EXECUTION": "false",
        },
        note="every optimization flag on; ENABLE_NVFUSER is ignored by backends since 23.12",
    ),
    TuneProfile(
        "multi-instance",
        {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "true"},
        min_instances=2,
        note="the field report's remedy for several instances: measured at counts > 1 only",
    ),
)

_PROFILE_KEYS = ("name", "parameters", "min_instances")


def parse_profiles(data: object, source: str) -> tuple[TuneProfile, ...]:
    """A YAML list of {name, parameters, min_instances?}; TuneError names every problem."""
    if not isinstance(data, list) or not data:
        raise TuneError(f"{source}: got {repr(data)}; expected a non-empty list of "
                        "{name, parameters, min_instances (optional)}")
    problems: list[str] = []
    profiles: list[TuneProfile] = []
    for i, item in enumerate(data):
        where = f"{source}: [{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: got {repr(item)}; expected a mapping with name and parameters")
            continue
        for key in item:
            if key not in _PROFILE_KEYS:
                problems.append(f"{where}.{key}: unknown key; allowed: {', '.join(_PROFILE_KEYS)}")
        name = item.get("name")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_.-" for c in name):
            problems.append(f"{where}.name: got {repr(name)}; must be letters, digits, '_', '.', '-'")
            name = f"profile-{i}"
        raw = item.get("parameters") or {}
        parameters: dict[str, str] = {}
        if not isinstance(raw, dict):
            problems.append(f"{where}.parameters: got {repr(raw)}; expected a mapping KEY: \"value\"")
            raw = {}
        for key, value in raw.items():
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # an unquoted integer can only mean its digits
            if not isinstance(key, str) or not isinstance(value, str):
                problems.append(f"{where}.parameters.{key}: got {repr(value)}; must be a quoted string such as "
                                "\"true\": Triton reads only string_value, and YAML reads yes/no/on/off as booleans")
                continue
            parameters[key] = value
        min_instances = item.get("min_instances", 1)
        if not isinstance(min_instances, int) or isinstance(min_instances, bool) or min_instances < 1:
            problems.append(f"{where}.min_instances: got {repr(min_instances)}; must be an integer >= 1")
            min_instances = 1
        profiles.append(TuneProfile(name, parameters, min_instances))
    names = [p.name for p in profiles]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"{source}: profile names must be unique; repeated: {', '.join(repeated)}")
    if problems:
        raise TuneError("\n  ".join(["invalid profiles:", *problems]))
    return tuple(profiles)


def load_profiles(spec: str) -> tuple[TuneProfile, ...]:
    """`field-report` or a YAML file."""
    if spec == FIELD_REPORT:
        return FIELD_REPORT_PROFILES
    path = Path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TuneError(f"--profiles {spec}: {exc.strerror or exc} (or give '{FIELD_REPORT}')") from None
    except yaml.YAMLError as exc:
        raise TuneError(f"--profiles {spec}: not valid YAML: {exc}") from None
    return parse_profiles(data, spec)


def flag_problems(profiles: Sequence[TuneProfile]) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the flag values: a value Triton would refuse is an error
    here, before anything is reloaded; a key no backend reads is a warning."""
    errors: list[str] = []
    warnings: list[str] = []
    for p in profiles:
        for key, value in p.parameters.items():
            where = f"profile {p.name!r}: {key}={value!r}"
            if key == GENERATION_PARAMETER:
                errors.append(f"{where}: {GENERATION_PARAMETER} is reserved (the actuator sets it on every reload)")
            elif key in BOOLEAN_FLAGS and parse_flag_bool(value) is None:
                errors.append(f"{where}: Triton parses only true/on/1/false/off/0 (case-insensitive) "
                              "and would fail the load")
            elif key in THREAD_COUNT_FLAGS and parse_flag_int(value) is None:
                errors.append(f"{where}: must be an integer (std::stoi); Triton would fail the load")
            elif key in IGNORED_FLAGS:
                warnings.append(f"{where}: ignored by the libtorch backend since 23.12 (nvfuser removed)")
            elif key in THREAD_COUNT_FLAGS:
                warnings.append(f"{where}: thread counts are set once per server process; a reload "
                                "does not change them")
            elif key not in KNOWN_FLAGS:
                warnings.append(f"{where}: not a PyTorch-backend flag; passed to the model as is")
    return errors, warnings


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Combination:
    profile: TuneProfile
    instances: int

    @property
    def label(self) -> str:
        return f"{self.profile.name} x{self.instances}"


def plan(profiles: Sequence[TuneProfile], counts: Sequence[int]) -> list[Combination]:
    """Profile by profile, counts ascending, each count >= the profile's min_instances."""
    return [Combination(p, n) for p in profiles for n in sorted(counts) if n >= p.min_instances]


def skipped_profiles(profiles: Sequence[TuneProfile], counts: Sequence[int]) -> list[TuneProfile]:
    return [p for p in profiles if not any(n >= p.min_instances for n in counts)]


def parse_instances(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    parts = [s.strip() for s in text.split(",")]
    if not all(s.isdigit() for s in parts) or any(int(s) < 1 for s in parts):
        raise TuneError(f"--instances {text!r}: expected comma-separated counts >= 1, e.g. 1,2,4")
    counts = [int(s) for s in parts]
    if len(set(counts)) != len(counts):
        raise TuneError(f"--instances {text!r}: a count is repeated")
    return sorted(counts)


def parse_triton_url(text: str) -> str:
    host, sep, port = text.removeprefix("grpc://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise TuneError(f"--triton {text!r}: expected Triton's gRPC endpoint as HOST:PORT, e.g. 127.0.0.1:8001")
    return f"{host}:{port}"


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class CombinationResult:
    combination: Combination
    status: str  # "ok", or the actuator's result ("failed", "unverified", ...), or "interrupted"
    levels: tuple[LevelResult, ...] = ()
    reload_s: float | None = None
    error: str = ""
    rounds: int = 1  # how many rounds measured it (combine_rounds)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def plan_rounds(combinations: Sequence[Combination], rounds: int) -> list[tuple[int, Combination]]:
    """(round, combination) in run order: odd rounds run the plan backwards, so a
    machine that slowly gets busier or quieter weighs on every combination alike."""
    order: list[tuple[int, Combination]] = []
    for r in range(1, rounds + 1):
        order += [(r, c) for c in (combinations if r % 2 else list(reversed(combinations)))]
    return order


def combine_rounds(combinations: Sequence[Combination],
                   runs: Sequence[CombinationResult]) -> list[CombinationResult]:
    """One result per combination (plan order) from its rounds: per concurrency level the
    median of the rounds' rates and latencies (benchlib.combine_windows), the median
    reload time; "ok" only if every round was, else the first other status and error."""
    from tritonpilot.tools.benchlib import combine_windows

    out = []
    for c in combinations:
        mine = [r for r in runs if r.combination == c]
        if not mine:
            continue
        by_level: dict[float, list[LevelResult]] = {}
        for r in mine:
            for lv in r.levels:
                by_level.setdefault(lv.level, []).append(lv)
        levels = tuple(combine_windows(by_level[k]) for k in sorted(by_level))
        bad = next((r for r in mine if not r.ok), None)
        reloads = [r.reload_s for r in mine if r.reload_s is not None]
        out.append(CombinationResult(
            c, "ok" if bad is None else bad.status, levels,
            statistics.median(reloads) if reloads else None, "" if bad is None else bad.error,
            rounds=sum(1 for r in mine if r.levels)))
    return out


def within_bound(level: LevelResult, max_p95_us: float | None) -> bool:
    """No errors, some latency, and p95 within the bound (no bound: any)."""
    if level.error_count or level.p95_us is None or level.count == 0:
        return False
    return max_p95_us is None or level.p95_us <= max_p95_us


def best_level(result: CombinationResult, max_p95_us: float | None) -> LevelResult | None:
    """The level with the highest throughput within the bound (first of equals)."""
    eligible = [lv for lv in result.levels if within_bound(lv, max_p95_us)]
    return max(eligible, key=lambda lv: lv.throughput_infer_per_s, default=None)


def ranking(results: Sequence[CombinationResult],
            max_p95_us: float | None) -> list[tuple[CombinationResult, LevelResult | None]]:
    """Best in-bound throughput first; combinations with none (or that failed) last, in run order."""
    scored = [(r, best_level(r, max_p95_us)) for r in results]
    with_best = sorted(((r, lv) for r, lv in scored if lv is not None), key=lambda s: -s[1].throughput_infer_per_s)
    return with_best + [s for s in scored if s[1] is None]


@dataclass(frozen=True)
class CountChoice:
    instances: int
    profile: TuneProfile
    level: LevelResult


@dataclass(frozen=True)
class Recommendation:
    """The policy to write (None when no level met the bound) and how it was chosen."""

    policy: dict[str, Any] | None
    per_count: tuple[CountChoice, ...]  # the best profile at each count with an in-bound level
    min_instances: int | None
    max_instances: int | None
    reason: str


def best_per_count(results: Sequence[CombinationResult], max_p95_us: float | None) -> list[CountChoice]:
    """At each count, the profile whose best in-bound level has the highest throughput
    (ties: the profile listed first)."""
    choices: dict[int, CountChoice] = {}
    for r in results:
        level = best_level(r, max_p95_us)
        if level is None:
            continue
        n = r.combination.instances
        if n not in choices or level.throughput_infer_per_s > choices[n].level.throughput_infer_per_s:
            choices[n] = CountChoice(n, r.combination.profile, level)
    return [choices[n] for n in sorted(choices)]


def choose_max_instances(choices: Sequence[CountChoice], min_gain_ratio: float) -> int:
    """Walk the counts upwards; a count becomes the max only if it beats the best so far
    by more than min_gain_ratio. Where throughput stops improving, the max stays put."""
    chosen = choices[0]
    for c in choices[1:]:
        if c.level.throughput_infer_per_s > chosen.level.throughput_infer_per_s * (1 + min_gain_ratio):
            chosen = c
    return chosen.instances


def profile_rules(choices: Sequence[CountChoice], max_instances: int) -> list[dict[str, Any]]:
    """Policy profile rules: count c_i's best profile holds [c_i, c_{i+1} - 1], the last
    one [c_k, null]; neighbours with the same profile merge. Counts between measured
    ones take the profile of the measured count below. A profile that comes back after
    another gets a suffixed name (policy names are unique)."""
    kept = [c for c in choices if c.instances <= max_instances]
    rules: list[dict[str, Any]] = []
    for i, c in enumerate(kept):
        hi = kept[i + 1].instances - 1 if i + 1 < len(kept) else None
        if rules and rules[-1]["_profile"] == c.profile.name:
            rules[-1]["instances"][1] = hi
            continue
        rules.append({"_profile": c.profile.name, "instances": [c.instances, hi],
                      "parameters": {k: v for k, v in c.profile.parameters.items() if k not in IGNORED_FLAGS}})
    names: set[str] = set()
    out = []
    for rule in rules:
        name = rule.pop("_profile")
        if name in names:
            name = f"{name}-from-{rule['instances'][0]}"
        names.add(name)
        out.append({"name": name, **rule})
    return out


def recommend(model: str, results: Sequence[CombinationResult], max_p95_us: float | None,
              min_gain_ratio: float = DEFAULT_MIN_GAIN_RATIO, triton_url: str | None = None) -> Recommendation:
    """Pure: the recommended controller policy from measured results."""
    choices = best_per_count(results, max_p95_us)
    bound = "" if max_p95_us is None else f" with p95 <= {max_p95_us / 1000:g} ms"
    if not choices:
        return Recommendation(None, (), None, None,
                              f"no level of any combination ran without errors{bound}: no policy to recommend")
    lo = choices[0].instances
    hi = choose_max_instances(choices, min_gain_ratio)
    best = {c.instances: c.level.throughput_infer_per_s for c in choices}
    past = [n for n in best if n > hi]
    reason = (f"max_instances {hi}: {best[hi]:.1f} infer/s{bound}"
              + (f"; {', '.join(str(n) for n in past)} instance(s) add no more than {min_gain_ratio:.0%}"
                 if past else "; the largest count measured"))
    policy: dict[str, Any] = {}
    if triton_url is not None:
        policy["triton"] = {"grpc": triton_url}
    policy["models"] = {model: {"min_instances": lo, "max_instances": hi, "profiles": profile_rules(choices, hi)}}
    return Recommendation(policy, tuple(choices), lo, hi, reason)


def policy_text(rec: Recommendation, header: Sequence[str]) -> str:
    """The YAML with its reasoning as comments; raises PolicyError if control.policy refuses it."""
    assert rec.policy is not None
    parse_policy(rec.policy, "the recommended policy")
    lines = [f"# {line}" if line else "#" for line in header]
    for c in rec.per_count:
        lines.append(f"# at {c.instances} instance(s): {c.profile.name} is best, "
                     f"{c.level.throughput_infer_per_s:.1f} infer/s at concurrency {c.level.level:g} "
                     f"(p95 {_ms(c.level.p95_us)} ms)")
    lines.append(f"# {rec.reason}")
    body = yaml.safe_dump(rec.policy, sort_keys=False, default_flow_style=None)
    return "\n".join(lines) + "\n" + body


# ------------------------------------------------------------------------------ reports


RESULT_FIELDS = [
    "profile", "instances", "parameters", "status", "reload_s", "concurrency", "rounds", "windows", "window_s",
    "throughput_infer_per_s", "p50_us", "p95_us", "p99_us", "mean_us", "count", "errors", "errors_by_code",
    "within_p95_bound", "error",
]


def _us(x: float | None) -> str:
    return "" if x is None else str(int(round(x)))


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x / 1000:.1f}"


def result_rows(results: Sequence[CombinationResult], concurrency: Sequence[int],
                max_p95_us: float | None) -> list[dict[str, Any]]:
    """One row per combination and level; a combination that never measured a level
    still has one row per planned level, with its status and error."""
    rows = []
    for r in results:
        c = r.combination
        base = {"profile": c.profile.name, "instances": c.instances, "parameters": c.profile.flags_text(),
                "status": r.status, "reload_s": "" if r.reload_s is None else f"{r.reload_s:.2f}", "error": r.error}
        measured = {int(lv.level): lv for lv in r.levels}
        for n in concurrency:
            lv = measured.get(n)
            row = {**base, "concurrency": n}
            if lv is not None:
                row.update({
                    "rounds": r.rounds, "windows": lv.windows, "window_s": f"{lv.window_s:.3f}",
                    "throughput_infer_per_s": f"{lv.throughput_infer_per_s:.3f}",
                    "p50_us": _us(lv.p50_us), "p95_us": _us(lv.p95_us), "p99_us": _us(lv.p99_us),
                    "mean_us": _us(lv.mean_us), "count": lv.count, "errors": lv.error_count,
                    "errors_by_code": ",".join(f"{k}={v}" for k, v in sorted(lv.errors.items())),
                    "within_p95_bound": "yes" if within_bound(lv, max_p95_us) else "no",
                })
            rows.append({k: row.get(k, "") for k in RESULT_FIELDS})
    return rows


def write_results_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def ranking_rows(results: Sequence[CombinationResult], max_p95_us: float | None) -> list[list[str]]:
    rows = []
    rank = 0
    for r, lv in ranking(results, max_p95_us):
        c = r.combination
        if lv is None:
            why = r.status if not r.ok else "none within the bound"
            rows.append(["-", c.profile.name, str(c.instances), "-", "-", "-", "-", "-", why])
            continue
        rank += 1
        rows.append([str(rank), c.profile.name, str(c.instances), f"{lv.throughput_infer_per_s:.1f}",
                     f"{lv.level:g}", _ms(lv.p50_us), _ms(lv.p95_us), _ms(lv.p99_us), ""])
    return rows


RANKING_HEADER = ["rank", "profile", "instances", "best infer/s", "at concurrency", "p50 ms", "p95 ms", "p99 ms",
                  "note"]
LEVEL_HEADER = ["concurrency", "infer/s", "p50 ms", "p95 ms", "p99 ms", "requests", "errors"]


def level_rows(levels: Sequence[LevelResult]) -> list[list[str]]:
    return [[f"{lv.level:g}", f"{lv.throughput_infer_per_s:.1f}", _ms(lv.p50_us), _ms(lv.p95_us), _ms(lv.p99_us),
             str(lv.count), str(lv.error_count)] for lv in levels]


_TEXT_COLUMNS = ("profile", "note", "parameters")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Text columns left-aligned, numbers right-aligned."""
    align = ["---" if i == 0 or h in _TEXT_COLUMNS else "--:" for i, h in enumerate(header)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_chart(path: Path, model: str, results: Sequence[CombinationResult], max_p95_us: float | None) -> None:
    """Throughput vs concurrency (a line per profile x count) and p95 in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = list(dict.fromkeys(r.combination.profile.name for r in results))
    counts = sorted({r.combination.instances for r in results})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(profiles)}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    fig, (ax_tp, ax_p95) = plt.subplots(1, 2, figsize=(13, 5.2))
    for r in results:
        levels = [lv for lv in r.levels if lv.count > 0]
        if not levels:
            continue
        c = r.combination
        k = counts.index(c.instances)
        style = dict(color=colors[c.profile.name], linestyle=styles[k % len(styles)], marker=markers[k % len(markers)],
                     label=f"{c.profile.name} x{c.instances}")
        xs = [lv.level for lv in levels]
        ax_tp.plot(xs, [lv.throughput_infer_per_s for lv in levels], **style)
        ax_p95.plot(xs, [(lv.p95_us or 0) / 1000 for lv in levels], **style)
    if max_p95_us is not None:
        ax_p95.axhline(max_p95_us / 1000, color="grey", linestyle="--", linewidth=1, label="p95 bound")
    ax_tp.set(title="Throughput", xlabel="concurrency (requests in flight)", ylabel="infer/s")
    ax_p95.set(title="p95 latency", xlabel="concurrency (requests in flight)", ylabel="ms")
    for ax in (ax_tp, ax_p95):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if ax_p95.lines:
        ax_p95.legend(fontsize=8, loc="upper left", title="profile x instances", title_fontsize=8)
    else:
        ax_tp.text(0.5, 0.5, "no level measured", ha="center", va="center", transform=ax_tp.transAxes)
    fig.suptitle(f"tritonpilot tune: {model}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class TuneOptions:
    url: str
    model: str
    profiles: tuple[TuneProfile, ...]
    counts: tuple[int, ...]
    concurrency: tuple[int, ...]
    max_p95_us: float | None
    window_s: float
    warmup_s: float
    windows: int
    rounds: int
    batch_size: int
    reload_timeout_s: float
    min_gain_ratio: float
    out: Path
    profiles_source: str

    @property
    def combinations(self) -> list[Combination]:
        return plan(self.profiles, self.counts)

    @property
    def managed_keys(self) -> frozenset[str]:
        return frozenset(k for p in self.profiles for k in p.parameters)

    def level_s(self) -> float:
        return self.warmup_s + self.windows * self.window_s


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("Combinations: every profile at every --instances count >= its min_instances "
                     "(built-in multi-instance: 2).\nExit status: 0 done, 1 done with failures or no "
                     "recommendation, 2 usage/unreachable, 130 interrupted.")
    parser.add_argument("--triton", required=True, metavar="HOST:PORT", help="Triton's gRPC endpoint")
    parser.add_argument("--model", required=True, help="the model to tune (loaded, explicit model control)")
    parser.add_argument("--profiles", default=FIELD_REPORT, metavar="FILE|field-report",
                        help="YAML list of {name, parameters, min_instances?}, or the built-in field report's "
                             "four configurations (default)")
    parser.add_argument("--instances", default="1,2,4", metavar="N,N,...", help="instance counts (default 1,2,4)")
    parser.add_argument("--concurrency-range", default="1:4", metavar="START:END[:STEP]",
                        help="closed-loop requests in flight (default 1:4)")
    parser.add_argument("--max-p95-ms", type=float, metavar="MS",
                        help="latency bound: a level counts only if its p95 is within it (default: no bound)")
    parser.add_argument("--measurement-interval-ms", type=int, default=5000, metavar="MS",
                        help="window length (default 5000)")
    parser.add_argument("--warmup-s", type=float, default=2.0, metavar="S",
                        help="load before each level's window (default 2)")
    parser.add_argument("--windows", type=int, default=1, metavar="N",
                        help="windows per level, the median is kept (default 1)")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="run the whole plan this many times, every other round backwards, and keep the "
                             "median per level: spreads a shared machine's drift over all combinations (default 1)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="for models with max_batch_size > 0 (default 1)")
    parser.add_argument("--reload-timeout-s", type=float, default=DEFAULT_RELOAD_TIMEOUT_S, metavar="S",
                        help=f"per reload (default {DEFAULT_RELOAD_TIMEOUT_S:g})")
    parser.add_argument("--min-gain-ratio", type=float, default=DEFAULT_MIN_GAIN_RATIO, metavar="R",
                        help="a larger count raises the recommended max_instances only if it beats the best "
                             f"smaller one by more than this (default {DEFAULT_MIN_GAIN_RATIO:g})")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the results go")


def options_from_args(args: argparse.Namespace) -> TuneOptions:
    url = parse_triton_url(args.triton)
    counts = parse_instances(args.instances)
    try:
        concurrency = [int(n) for n in parse_range(args.concurrency_range, "--concurrency-range", integer=True)]
    except BenchError as exc:
        raise TuneError(str(exc)) from None
    if args.max_p95_ms is not None and not args.max_p95_ms > 0:
        raise TuneError(f"--max-p95-ms {args.max_p95_ms:g}: must be > 0")
    if args.measurement_interval_ms <= 0 or args.windows < 1 or args.rounds < 1 or args.warmup_s < 0:
        raise TuneError("--measurement-interval-ms, --windows and --rounds must be > 0, --warmup-s >= 0")
    if args.batch_size < 1 or args.reload_timeout_s <= 0 or args.min_gain_ratio < 0:
        raise TuneError("--batch-size and --reload-timeout-s must be > 0, --min-gain-ratio >= 0")
    profiles = load_profiles(args.profiles)
    errors, _ = flag_problems(profiles)
    if errors:
        raise TuneError("\n  ".join(["profiles Triton would refuse:", *errors]))
    if not plan(profiles, counts):
        raise TuneError(f"nothing to measure: no profile runs at --instances {args.instances} "
                        f"(min_instances: {', '.join(f'{p.name} {p.min_instances}' for p in profiles)})")
    return TuneOptions(
        url=url, model=args.model, profiles=profiles, counts=tuple(counts), concurrency=tuple(concurrency),
        max_p95_us=None if args.max_p95_ms is None else args.max_p95_ms * 1000,
        window_s=args.measurement_interval_ms / 1000, warmup_s=args.warmup_s, windows=args.windows,
        rounds=args.rounds,
        batch_size=args.batch_size, reload_timeout_s=args.reload_timeout_s, min_gain_ratio=args.min_gain_ratio,
        out=args.out, profiles_source=args.profiles,
    )


# ------------------------------------------------------------------------------ running


@dataclass
class Session:
    """What a run has done so far; the restore and the reports read it."""

    runs: list[CombinationResult] = field(default_factory=list)  # one per (round, combination) run
    results: list[CombinationResult] = field(default_factory=list)  # per combination, rounds combined
    touched: bool = False  # a reload was submitted: the original config must go back
    interrupted: str | None = None  # the signal's name
    aborted: str | None = None  # why the run stopped early (Triton gone)
    restore_error: str | None = None
    restored: bool = False


class Ui:
    """The progress bar (stderr) and the report (stdout). When both are the same
    terminal, report text goes through the bar's console so the bar stays below it."""

    def __init__(self, total_s: float, out: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._out = out if out is not None else sys.stdout  # read now: tests swap sys.stdout
        self.console = Console(stderr=True, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, redirect_stdout=False, redirect_stderr=False,
        )
        self.total_s = total_s
        self.task = self.progress.add_task("starting", total=total_s)
        self._shared_tty = self.console.is_terminal and self._out.isatty()

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def step(self, description: str, advance_s: float = 0.0) -> None:
        self.progress.update(self.task, description=description, advance=advance_s)

    def note(self, text: str) -> None:
        """A line on stderr, above the bar."""
        self.progress.console.print(text, markup=False, highlight=False)

    def report(self, text: str) -> None:
        if self._shared_tty:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self._out, flush=True)


async def _preflight(client: Any, opts: TuneOptions) -> tuple[Any, dict[str, Any]]:
    """Inputs for the bench and the original config; TuneError when the model can't be tuned."""
    from tritonpilot.control.triton import TritonError, TritonUnavailable
    from tritonpilot.tools import benchlib

    try:
        inputs = await benchlib.prepare_inputs(opts.url, opts.model, batch_size=opts.batch_size, timeout_s=10.0)
    except BenchError as exc:
        raise TuneError(str(exc)) from None
    try:
        original = await client.get_config(opts.model)
        ready = await client.is_model_ready(opts.model)
    except TritonUnavailable as exc:
        raise TuneError(f"cannot reach Triton at {opts.url}: {exc}") from None
    except TritonError as exc:
        raise TuneError(f"model {opts.model!r} at {opts.url}: {exc}") from None
    if not ready:
        raise TuneError(f"model {opts.model!r} at {opts.url} is not READY; load it first")
    return inputs, original


async def _reload(actuator: Any, opts: TuneOptions, combination: Combination) -> Any:
    from tritonpilot.control.actuator import ReloadRequest

    request = ReloadRequest(model=opts.model, instances=combination.instances, profile=combination.profile.name,
                            parameters=dict(combination.profile.parameters), managed_keys=opts.managed_keys,
                            strategy="full")
    if not actuator.submit(request):
        raise RuntimeError(f"the actuator refused {combination.label} (a reload is pending)")
    while True:
        for result in actuator.collect():
            if result.request.model == opts.model:
                return result
        await asyncio.sleep(0.1)


async def _measure_all(opts: TuneOptions, inputs: Any, actuator: Any, session: Session, ui: Ui) -> None:
    from tritonpilot.tools import benchlib

    order = plan_rounds(opts.combinations, opts.rounds)
    for i, (round_, combination) in enumerate(order, 1):
        head = f"[{i}/{len(order)}] {combination.label}"
        if opts.rounds > 1:
            head += f" (round {round_}/{opts.rounds})"
        ui.step(f"{head}: reloading")
        session.touched = True
        try:
            reload = await _reload(actuator, opts, combination)
        except asyncio.CancelledError:
            session.runs.append(CombinationResult(combination, "interrupted", error="during the reload"))
            raise
        ui.step(f"{head}: reloaded", RELOAD_ESTIMATE_S)
        if not reload.ok:
            session.runs.append(CombinationResult(combination, reload.result, (), reload.duration_s, reload.error))
            ui.note(f"{head}: reload {reload.result} after {reload.duration_s:.1f} s: {reload.error}")
            ui.step(f"{head}: skipped", len(opts.concurrency) * opts.level_s())
            if reload.result == "unavailable":
                session.aborted = f"Triton became unavailable during {combination.label}: {reload.error}"
                return
            continue
        ui.note(f"{head} ({combination.profile.flags_text()}): reloaded in {reload.duration_s:.1f} s")
        levels: list[LevelResult] = []
        try:
            for n in opts.concurrency:
                ui.step(f"{head}: concurrency {n}")
                levels.append(await benchlib.measure_concurrency(
                    opts.url, opts.model, n, opts.window_s, inputs, warmup_s=opts.warmup_s, windows=opts.windows))
                ui.step(f"{head}: concurrency {n}", opts.level_s())
        except asyncio.CancelledError:
            session.runs.append(CombinationResult(combination, "interrupted", tuple(levels), reload.duration_s))
            raise
        result = CombinationResult(combination, "ok", tuple(levels), reload.duration_s)
        session.runs.append(result)
        ui.report(_combination_report(result, round_ if opts.rounds > 1 else None))


def _combination_report(result: CombinationResult, round_: int | None = None) -> str:
    c = result.combination
    in_round = "" if round_ is None else f" (round {round_})"
    return "\n".join([f"=== {c.profile.name} x {c.instances} instance(s){in_round}: {c.profile.flags_text()} ===",
                      perf_analyzer_summary(result.levels), "", detail_table(result.levels, []), ""])


async def _restore(client: Any, opts: TuneOptions, original: Mapping[str, Any]) -> str | None:
    """Load the original config back and check Triton shows it; the error text, or None."""
    from tritonpilot.control.overrides import instance_count, string_parameters
    from tritonpilot.control.triton import TritonError

    try:
        await client.load(opts.model, dict(original), opts.reload_timeout_s)
        live = await client.get_config(opts.model)
        ready = await client.is_model_ready(opts.model)
    except TritonError as exc:
        return str(exc)
    if (instance_count(live), string_parameters(live)) != (instance_count(original), string_parameters(original)):
        return (f"Triton shows {instance_count(live)} instance(s) and {string_parameters(live)} "
                f"after the restore, not {instance_count(original)} and {string_parameters(original)}")
    return None if ready else "the model is not READY after the restore"


@contextmanager
def _interrupts(loop: asyncio.AbstractEventLoop, work: asyncio.Task, session: Session) -> Iterator[None]:
    """SIGINT/SIGTERM cancel the measurements (not the restore that follows)."""
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        def handler(sig: signal.Signals = sig) -> None:
            if session.interrupted is None:
                session.interrupted = sig.name
                work.cancel()
        try:
            previous = signal.getsignal(sig)
            loop.add_signal_handler(sig, handler)
            installed.append((sig, previous))
        except (ValueError, RuntimeError, NotImplementedError):
            pass  # not the main thread: asyncio.run's own SIGINT handling cancels us instead
    try:
        yield
    finally:
        for sig, previous in installed:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous)


async def tune(opts: TuneOptions, ui: Ui, session: Session) -> None:
    """Measure every combination into `session`, then restore. TuneError before any change."""
    from tritonpilot.control.actuator import Actuator
    from tritonpilot.control.triton import TritonClient

    client = TritonClient(opts.url, rpc_timeout_s=10.0)
    # No backoff: each combination is tried once anyway.
    actuator = Actuator(client=client, timeout_s=opts.reload_timeout_s, failed_config_backoff_s=0.0)
    original = None
    try:
        inputs, original = await _preflight(client, opts)
        (opts.out / "original-config.json").write_text(json.dumps(original, indent=2) + "\n")
        ui.start()
        rounds = f" x {opts.rounds} rounds" if opts.rounds > 1 else ""
        ui.note(f"tune {opts.model} at {opts.url}: {len(opts.combinations)} combinations x "
                f"{len(opts.concurrency)} levels{rounds}, about {ui.total_s / 60:.1f} min")
        work = asyncio.create_task(_measure_all(opts, inputs, actuator, session, ui))
        with _interrupts(asyncio.get_running_loop(), work, session):
            try:
                await work
            except asyncio.CancelledError:
                if session.interrupted is None:
                    session.interrupted = "SIGINT"  # asyncio.run's handler cancelled us
                    raise
    finally:
        await actuator.close()
        if session.touched and original is not None:
            ui.step("restoring the original config")
            session.restore_error = await _restore(client, opts, original)
            session.restored = session.restore_error is None
        session.results = combine_rounds(opts.combinations, session.runs)
        ui.step("done" if session.interrupted is None else f"interrupted ({session.interrupted})")
        ui.stop()
        await client.close()


def _write_outputs(opts: TuneOptions,
                   session: Session) -> tuple[Recommendation | None, list[str], list[str]]:
    """results.csv, chart.png, policy.yaml, summary.md; returns the recommendation, the problems
    (the run is incomplete) and the warnings (an optional part missing; the rest was written)."""
    problems: list[str] = []
    warnings: list[str] = []
    out = opts.out
    write_results_csv(out / "results.csv", result_rows(session.results, opts.concurrency, opts.max_p95_us))
    try:
        write_chart(out / "chart.png", opts.model, session.results, opts.max_p95_us)
    except ImportError as exc:
        warnings.append(f"chart.png not written: matplotlib is missing ({exc}); pip install 'tritonpilot[tune]'")
    rec = None
    policy_path = out / "policy.yaml"
    policy_path.unlink(missing_ok=True)  # never leave an older run's policy beside these results
    if session.interrupted is None and session.aborted is None:
        rec = recommend(opts.model, session.results, opts.max_p95_us, opts.min_gain_ratio, opts.url)
        if rec.policy is None:
            problems.append(rec.reason)
        else:
            header = [f"Recommended by `tritonpilot tune` for model {opts.model} at {opts.url}, "
                      f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
                      "From results.csv beside this file; best throughput "
                      + ("without a p95 bound" if opts.max_p95_us is None
                         else f"within p95 <= {opts.max_p95_us / 1000:g} ms") + ", errors excluded.",
                      "Check it: tritonpilot check policy.yaml", ""]
            try:
                policy_path.write_text(policy_text(rec, header))
            except PolicyError as exc:  # a bug in recommend(): say so rather than write it
                problems.append(f"the recommended policy does not validate, not written:\n{exc}")
                rec = None
    (out / "summary.md").write_text(summary_markdown(opts, session, rec))
    return rec, problems, warnings


def summary_markdown(opts: TuneOptions, session: Session, rec: Recommendation | None) -> str:
    bound = "none" if opts.max_p95_us is None else f"p95 <= {opts.max_p95_us / 1000:g} ms"
    lines = [
        f"# tritonpilot tune: {opts.model}",
        "",
        f"- Triton: {opts.url}; {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- profiles: {opts.profiles_source}; instances: {', '.join(map(str, opts.counts))}; "
        f"concurrency: {', '.join(map(str, opts.concurrency))}",
        f"- each level: {opts.warmup_s:g} s warm-up, then {opts.windows} x {opts.window_s:g} s "
        f"window(s) (median kept); batch size {opts.batch_size}"
        + (f"; {opts.rounds} rounds, every other one backwards, median per level" if opts.rounds > 1 else ""),
        f"- latency bound: {bound}",
        "",
        "| profile | min instances | parameters |",
        "|---|--:|---|",
        *(f"| {p.name} | {p.min_instances} | {p.flags_text()} |" for p in opts.profiles),
        "",
    ]
    skipped = skipped_profiles(opts.profiles, opts.counts)
    if skipped:
        lines += [f"Skipped (no --instances count >= their min_instances): {', '.join(p.name for p in skipped)}.", ""]
    if session.interrupted:
        lines += [f"**Interrupted ({session.interrupted})** after {len(session.runs)} of "
                  f"{len(opts.combinations) * opts.rounds} runs: partial results, no policy.", ""]
    if session.aborted:
        lines += [f"**Stopped early:** {session.aborted}", ""]
    lines += ["## Ranked: best throughput within the bound", "",
              markdown_table(RANKING_HEADER, ranking_rows(session.results, opts.max_p95_us)), ""]
    if rec is not None and rec.policy is not None:
        lines += ["## Recommended policy (policy.yaml)", ""]
        lines += [f"- at {c.instances} instance(s): **{c.profile.name}**, {c.level.throughput_infer_per_s:.1f} "
                  f"infer/s at concurrency {c.level.level:g}" for c in rec.per_count]
        lines += [f"- {rec.reason}", "", "```yaml", yaml.safe_dump(rec.policy, sort_keys=False,
                                                                    default_flow_style=None).rstrip(), "```", ""]
    elif rec is not None:
        lines += ["## Recommended policy", "", rec.reason, ""]
    failed = [r for r in session.results if not r.ok]
    if failed:
        lines += ["## Failed or incomplete", ""]
        lines += [f"- {r.combination.label}: {r.status}" + (f": {r.error}" if r.error else "") for r in failed]
        lines += [""]
    restore = ("restored" if session.restored else
               f"**not restored**: {session.restore_error}; see original-config.json" if session.touched else
               "untouched (nothing was reloaded)")
    lines += [f"Original config: {restore}.", "", "## Per combination", ""]
    for r in session.results:
        c = r.combination
        lines += [f"### {c.profile.name} x {c.instances} instance(s)", "",
                  f"{c.profile.flags_text()}; reload {'-' if r.reload_s is None else f'{r.reload_s:.1f} s'}; "
                  f"status {r.status}" + (f"; median of {r.rounds} rounds" if r.rounds > 1 else ""), ""]
        if r.levels:
            lines += [markdown_table(LEVEL_HEADER, level_rows(r.levels)), ""]
    lines += ["![throughput and p95 by concurrency](chart.png)", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
        opts.out.mkdir(parents=True, exist_ok=True)
    except TuneError as exc:
        print(f"tritonpilot tune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"tritonpilot tune: error: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    _, warnings = flag_problems(opts.profiles)
    for warning in warnings:
        print(f"tritonpilot tune: warning: {warning}", file=sys.stderr)
    combos = opts.combinations
    total_s = opts.rounds * len(combos) * (RELOAD_ESTIMATE_S + len(opts.concurrency) * opts.level_s())
    ui = Ui(total_s)
    session = Session()
    try:
        asyncio.run(tune(opts, ui, session))
    except KeyboardInterrupt:
        # Only where our own handler could not be installed; the restore already ran.
        session.interrupted = session.interrupted or "SIGINT"
    except TuneError as exc:
        print(f"tritonpilot tune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug or an unexpected Triton answer: the restore has run; keep what we have
        session.aborted = f"unexpected error: {exc!r}"
    rec, problems, output_warnings = _write_outputs(opts, session)
    ranked = text_table(RANKING_HEADER, ranking_rows(session.results, opts.max_p95_us))
    ui.report("=== ranked: best throughput within the bound ===\n"
              + "\n".join(line.rstrip() for line in ranked.splitlines()) + "\n")
    if rec is not None and rec.policy is not None:
        ui.report("recommended: " + "; ".join(f"{c.instances} -> {c.profile.name}" for c in rec.per_count
                                             if c.instances <= (rec.max_instances or 0)) + f"; {rec.reason}")
        for warning in policy_warnings(parse_policy(rec.policy)):
            print(f"tritonpilot tune: policy warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(f"tritonpilot tune: {problem}", file=sys.stderr)
    for warning in output_warnings:
        print(f"tritonpilot tune: warning: {warning}", file=sys.stderr)
    failed = [r for r in session.results if not r.ok]
    for r in failed:
        print(f"tritonpilot tune: {r.combination.label}: {r.status}" + (f": {r.error}" if r.error else ""),
              file=sys.stderr)
    if session.aborted:
        print(f"tritonpilot tune: error: {session.aborted}", file=sys.stderr)
    if session.touched:
        if session.restored:
            print(f"tritonpilot tune: original config of {opts.model} restored", file=sys.stderr)
        else:
            print(f"tritonpilot tune: error: the original config was NOT restored: {session.restore_error}; "
                  f"it is in {opts.out / 'original-config.json'}", file=sys.stderr)
    print(f"tritonpilot tune: wrote {', '.join(sorted(p.name for p in opts.out.iterdir()))} in {opts.out}",
          file=sys.stderr)
    if session.interrupted:
        return EXIT_INTERRUPTED
    if failed or session.aborted or not session.restored or rec is None or rec.policy is None or problems:
        return EXIT_INCOMPLETE
    return EXIT_OK
