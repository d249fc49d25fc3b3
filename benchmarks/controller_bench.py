"""The controller benchmark (issue 3): open-loop low -> high -> low on the 20 ms model, three ways.

Each run gets a fresh embedded Triton with the `sleep` model (deploy/demo_models/sleep: 20 ms
per request, ~50/s per instance) and a `tritonpilot serve` process in front of it; the
load goes through that proxy, open loop with constant spacing (benchlib, as
perf_analyzer does by default):

- controller: the sidecar with a policy controlling `sleep` (1..max instances);
- static-1:   one instance, set by a config-override load, no controller;
- static-max: max instances, the same way.

While the load runs, Triton's own ModelConfig is read every 0.5 s: mean instances,
reconfigurations and the time from a step to the new count come from Triton, not from
tritonpilot. Per phase (after its transition window) it reports offered vs served,
p95, failures, mean instances; then the issue's targets for the controller, met or not.

`bash scripts/bench-controller` writes the "Controller" section of docs/benchmarks.md
(only the block between its markers) and, as JSON beside it, the per-phase figures and
Triton's config as a timeline of its changes (not every 0.5 s sample: that is ~200 KB).

Issue 10's variants: `--preset example` (the example policy's defaults), `--verify on|off`,
`--no-proxy` (the load to Triton's port, `serve --no-proxy`), `--record FILE` (for `tritonpilot
replay`); the controller run also reports the step response (step -> the reload's start, the
client's peak backlog, reconfigurations). `--scenario ceiling` (a CPU-burning model, closed loop,
static 1..max and the controller) and `--scenario bad-profile` (a profile that slows `sleep` 4x)
print their own block.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tritonclient.grpc.aio import InferenceServerClient

from tritonpilot.control.overrides import build_override, matches, read_state
from tritonpilot.control.policy import BUILTIN_PROFILES, parse_policy, resolve
from tritonpilot.ports import free_port
from tritonpilot.tools import benchlib
from tritonpilot.tools.benchlib import LevelResult

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "deploy" / "demo_models"
MODEL = "sleep"
MODES = ("controller", "static-1", "static-max")
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS_JSON = ROOT / "docs" / "benchmarks-controller.json"
SECTION = "## Controller"
BEGIN = "<!-- controller-bench:begin: written by scripts/bench-controller; edits inside are replaced -->"
END = "<!-- controller-bench:end -->"
MANAGED_KEYS = frozenset(k for p in BUILTIN_PROFILES for k in p.parameters)

# Target 0.7 in flight per instance (Knative aims at 70 % of a pod's capacity): at
# 1 in flight per instance, 0.7 of max capacity (~3 in flight on 4 instances) would
# sit on the 3/4 boundary, where one instance less saturates and queues. The down
# delay is short so that a 60 s phase shows the count coming back.
POLICY_TEMPLATE = """\
control:
  interval_s: 0.5
defaults:
  min_instances: 1
  max_instances: {max_instances}
  target_inflight_per_instance: {target}
  scale_up_delay_s: 3
  scale_down_delay_s: 5
  cooldown_s: 5
models:
  {model}: {{}}
"""


PRESETS = ("bench", "example")
ROUTE_PROXY = "through the sidecar's proxy"
ROUTE_NO_PROXY = "straight to Triton's gRPC port, no request through the proxy (the sidecar runs `--no-proxy`)"
VERIFY_CHOICES = ("default", "on", "off")


@dataclass(frozen=True)
class Settings:
    low_rate_per_s: float = 20.0    # ~0.4 of one instance's ~50/s
    high_rate_per_s: float = 140.0  # ~0.7 of 4 instances' ~200/s
    phase_s: float = 60.0
    transition_s: float = 10.0
    max_instances: int = 4
    target_inflight_per_instance: float = 0.7
    sample_interval_s: float = 0.5
    connections: int = 4
    timeout_s: float = 30.0
    modes: tuple[str, ...] = MODES
    # "bench": POLICY_TEMPLATE; "example": deploy/policy.example.yaml's defaults (only `models` set).
    preset: str = "bench"
    verify: str = "default"         # verify.enabled as the policy's default, or forced on / off
    no_proxy: bool = False          # the load straight to Triton's gRPC port; serve --no-proxy

    def phases(self) -> list[tuple[str, float, float]]:
        """(name, rate, seconds) in order."""
        return [("low", self.low_rate_per_s, self.phase_s), ("high", self.high_rate_per_s, self.phase_s),
                ("low again", self.low_rate_per_s, self.phase_s)]

    def policy_yaml(self) -> str:
        if self.preset == "example":
            text = f"models:\n  {MODEL}: {{}}\n"
            if self.max_instances != 4:
                text = f"defaults:\n  max_instances: {self.max_instances}\n" + text
        else:
            text = POLICY_TEMPLATE.format(max_instances=self.max_instances,
                                          target=self.target_inflight_per_instance, model=MODEL)
        if self.verify != "default":
            enabled = "true" if self.verify == "on" else "false"
            if "defaults:\n" in text:
                text = text.replace("defaults:\n", f"defaults:\n  verify: {{enabled: {enabled}}}\n", 1)
            else:
                text = f"defaults:\n  verify: {{enabled: {enabled}}}\n" + text
        return text


# --------------------------------------------------------------------------- analysis (pure)


@dataclass(frozen=True)
class ConfigSample:
    t_s: float                 # seconds since the load started
    instances: int | None      # None: Triton's config could not be read
    generation: int | None     # tritonpilot_generation: bumped by every reload tritonpilot makes
    flags: Mapping[str, str] = field(default_factory=dict)


def _in(samples: Sequence[ConfigSample], a_s: float, b_s: float) -> list[ConfigSample]:
    return [s for s in samples if a_s <= s.t_s < b_s and s.instances is not None]


def mean_instances(samples: Sequence[ConfigSample], a_s: float, b_s: float) -> float | None:
    inside = _in(samples, a_s, b_s)
    return sum(s.instances for s in inside) / len(inside) if inside else None  # type: ignore[misc]


def reconfigurations(samples: Sequence[ConfigSample], a_s: float, b_s: float) -> int:
    """Config changes Triton showed in [a, b): count or generation differs from the sample before."""
    known = [s for s in samples if s.instances is not None]
    changes = 0
    for prev, cur in zip(known, known[1:]):
        if a_s <= cur.t_s < b_s and (prev.instances, prev.generation) != (cur.instances, cur.generation):
            changes += 1
    return changes


def count_at(samples: Sequence[ConfigSample], t_s: float) -> int | None:
    """The count of the last sample before t."""
    before = [s for s in samples if s.t_s < t_s and s.instances is not None]
    return before[-1].instances if before else None


@dataclass(frozen=True)
class Step:
    before: int | None
    after: int | None            # the count the phase ends with
    first_change_s: float | None  # step -> the first sample with another count
    settled_s: float | None       # step -> the sample from which the count stays `after`


def step_times(samples: Sequence[ConfigSample], step_s: float, end_s: float) -> Step:
    before, inside = count_at(samples, step_s), _in(samples, step_s, end_s)
    if not inside:
        return Step(before, None, None, None)
    after = inside[-1].instances
    first = next((s.t_s - step_s for s in inside if s.instances != before), None)
    settled = None
    if after != before:
        for i, s in enumerate(inside):
            if all(x.instances == after for x in inside[i:]):
                settled = s.t_s - step_s
                break
    return Step(before, after, first, settled)


@dataclass(frozen=True)
class PhaseReport:
    name: str
    rate_per_s: float
    start_s: float
    end_s: float
    window_s: tuple[float, float]   # what the figures cover: after the transition
    offered_per_s: float
    served_per_s: float
    served_ratio: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    failures: int
    failures_by_code: Mapping[str, int]
    late: int
    mean_instances: float | None
    instance_seconds: float | None  # mean instances x window
    reconfigurations: int           # over the whole phase, transition included
    step: Step | None               # None for the first phase
    cpu_us_per_request: Mapping[str, float | None]
    # The whole phase, transition included: what the step itself cost.
    whole_served_ratio: float | None = None
    whole_p95_ms: float | None = None
    whole_failures: int | None = None


def phase_reports(settings: Settings, results: Sequence[LevelResult], samples: Sequence[ConfigSample],
                  whole: Sequence[LevelResult] | None = None) -> list[PhaseReport]:
    """results: each phase after its transition; whole: each whole phase (optional)."""
    out, t = [], 0.0
    for i, ((name, rate, seconds), r) in enumerate(zip(settings.phases(), results)):
        w = whole[i] if whole is not None else None
        start, end = t, t + seconds
        window = (start + settings.transition_s, end)
        mean = mean_instances(samples, *window)
        out.append(PhaseReport(
            name=name, rate_per_s=rate, start_s=start, end_s=end, window_s=window,
            offered_per_s=r.offered_per_s, served_per_s=r.served_per_s,
            served_ratio=r.served_per_s / r.offered_per_s if r.offered_per_s else None,
            p50_ms=_ms(r.p50_us), p95_ms=_ms(r.p95_us), p99_ms=_ms(r.p99_us),
            failures=r.error_count, failures_by_code=dict(r.errors), late=r.late,
            mean_instances=mean, instance_seconds=mean * (window[1] - window[0]) if mean is not None else None,
            reconfigurations=reconfigurations(samples, start, end),
            step=step_times(samples, start, end) if i > 0 else None,
            cpu_us_per_request=dict(r.cpu_us_per_request),
            whole_served_ratio=(w.served_per_s / w.offered_per_s if w.offered_per_s else None) if w else None,
            whole_p95_ms=_ms(w.p95_us) if w else None,
            whole_failures=w.error_count if w else None,
        ))
        t = end
    return out


def _ms(us: float | None) -> float | None:
    return us / 1000.0 if us is not None else None


@dataclass(frozen=True)
class RunReport:
    mode: str
    instances_at_start: int | None
    phases: list[PhaseReport]
    samples: list[ConfigSample]
    controller_decisions: list[dict[str, Any]] = field(default_factory=list)  # changes, from /status
    controller_reloads: dict[str, float] = field(default_factory=dict)       # tritonpilot_reloads_total
    backlog_peaks: list[int] = field(default_factory=list)  # per phase: most requests the client had outstanding
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # verify's verdicts, from /status


def step_to_change_s(run: RunReport, phase: PhaseReport) -> float | None:
    """From a phase's step to the controller's first change decided in it (the reload's start)."""
    return next((d["t_s"] - phase.start_s for d in run.controller_decisions
                 if phase.start_s <= d["t_s"] < phase.end_s and d["reason"] != "profile-mismatch"), None)


def step_lines(run: RunReport) -> list[str]:
    """The step response (issue 10): step -> reload start, peak client backlog, reconfigurations."""
    lines = ["| phase | step -> reload start s (target <= 1.5 at interval 1 s) | peak client backlog "
             "(requests outstanding) | reconfigurations (target 1) |", "|---|---:|---:|---:|"]
    for i, p in enumerate(run.phases):
        to_change = step_to_change_s(run, p) if i > 0 else None
        peak = run.backlog_peaks[i] if i < len(run.backlog_peaks) else None
        lines.append(f"| {p.name} | {_f(to_change, 2)} | {peak if peak is not None else 'n/a'} | "
                     f"{p.reconfigurations} |")
    return lines


class Backlog:
    """Requests the client has sent and not had answered, over time: benchlib's callers, counted."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.events: list[tuple[float, int]] = []  # (perf_counter s, outstanding after the change)

    def wrap(self, caller: Any) -> Any:
        backlog = self

        class Counted:
            async def __call__(self) -> str | None:
                backlog._move(+1)
                try:
                    return await caller()
                finally:
                    backlog._move(-1)

            async def close(self) -> None:
                await caller.close()

        return Counted()

    def _move(self, by: int) -> None:
        self.outstanding += by
        self.events.append((time.perf_counter(), self.outstanding))

    def peak(self, a_s: float, b_s: float) -> int:
        """The most outstanding at once in [a, b) (perf_counter seconds)."""
        return max((n for t, n in self.events if a_s <= t < b_s), default=0)


@dataclass(frozen=True)
class Target:
    what: str
    measured: str
    met: bool | None  # None: could not be judged (a run missing)


STEP_TARGET_S = 10.0


def judge(runs: Mapping[str, RunReport]) -> list[Target]:
    """The issue's targets for the controller, against its own figures and static-max's."""
    c = runs.get("controller")
    if c is None:
        return []
    smax = runs.get("static-max")
    targets = []
    ratios = [p.served_ratio for p in c.phases]
    targets.append(Target(">= 0.98 of the offered rate served in every phase",
                          ", ".join(f"{p.name} {_f(p.served_ratio, 3)}" for p in c.phases),
                          all(r is not None and r >= 0.98 for r in ratios)))
    if smax is not None:
        parts, ok = [], True
        for p, q in zip(c.phases, smax.phases):
            limit = 1.5 * q.p95_ms if q.p95_ms is not None else None
            good = p.p95_ms is not None and limit is not None and p.p95_ms <= limit
            ok = ok and good
            parts.append(f"{p.name} {_f(p.p95_ms, 1)} vs {_f(limit, 1)} ms")
        targets.append(Target("p95 <= 1.5 x static-max's p95 in every phase", "; ".join(parts), ok))
    else:
        targets.append(Target("p95 <= 1.5 x static-max's p95 in every phase", "static-max not run", None))
    failures = sum(p.failures for p in c.phases)
    targets.append(Target("0 failures", str(failures), failures == 0))
    steps = [(p.name, p.step) for p in c.phases if p.step is not None]
    parts, ok = [], True
    for name, s in steps:
        if s.after == s.before:
            parts.append(f"{name}: no change ({s.before})")
            ok = False
            continue
        good = s.settled_s is not None and s.settled_s <= STEP_TARGET_S
        ok = ok and good
        parts.append(f"{name}: {s.before} -> {s.after} serving after {_f(s.settled_s, 1)} s")
    targets.append(Target(f"step -> new count serving in <= {STEP_TARGET_S:g} s", "; ".join(parts), ok))
    most = max((p.reconfigurations for p in c.phases), default=0)
    targets.append(Target("at most one reconfiguration per phase",
                          ", ".join(f"{p.name} {p.reconfigurations}" for p in c.phases), most <= 1))
    lows = [p for p in c.phases if p.rate_per_s == min(q.rate_per_s for q in c.phases)]
    targets.append(Target("mean instances <= 1.5 at low load",
                          ", ".join(f"{p.name} {_f(p.mean_instances, 2)}" for p in lows),
                          all(p.mean_instances is not None and p.mean_instances <= 1.5 for p in lows)))
    if smax is not None:
        ci = sum(p.instance_seconds or 0.0 for p in c.phases)
        si = sum(p.instance_seconds or 0.0 for p in smax.phases)
        targets.append(Target("instance-seconds well under static-max's (measured windows)",
                              f"{ci:.0f} vs {si:.0f} ({_f(ci / si if si else None, 2)}x)", si > 0 and ci <= 0.75 * si))
    s1 = runs.get("static-1")
    if s1 is not None:
        high = max(s1.phases, key=lambda p: p.rate_per_s)
        fails = (high.served_ratio or 0) < 0.98 or high.failures > 0
        targets.append(Target("sanity: static-1 fails the high phase (else the load is too light)",
                              f"served {_f(high.served_ratio, 3)}, p95 {_f(high.p95_ms, 0)} ms, "
                              f"{high.failures} failures", fails))
    return targets


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- the report


def render_block(settings: Settings, runs: Mapping[str, RunReport], meta: Mapping[str, Any]) -> str:
    lines = [BEGIN, ""]
    lines += [f"Reproduce: `{meta['command']}` ({meta['duration_min']:.0f} min). "
              f"Ran {meta['date']} on {meta['machine']}.", ""]
    phase_text = ", ".join(f"{name} {rate:g}/s for {seconds:g} s" for name, rate, seconds in settings.phases())
    lines += [
        f"Open-loop load with constant spacing (benchlib, {settings.connections} connections, "
        f"{settings.timeout_s:g} s deadline) "
        f"{ROUTE_NO_PROXY if settings.no_proxy else ROUTE_PROXY} on the 20 ms `sleep` model "
        f"(~50/s per instance): {phase_text}. Figures per phase leave out its first "
        f"{settings.transition_s:g} s. Each run has a fresh Triton; instances are Triton's own ModelConfig, "
        f"read every {settings.sample_interval_s:g} s. static-1 / static-max: the count set by a "
        f"config-override load, no controller. Reconfigurations count every change of Triton's config "
        f"over the whole phase; step -> count is from the step to the first sample of the count the "
        f"phase ends with (and to the first change, when that came earlier). The last two columns cover "
        f"the whole phase, transition included: what the step itself cost.", "",
        "Controller policy:", "", "```yaml", settings.policy_yaml().rstrip(), "```", "",
        "| run | phase | offered/s | served/s | served / offered | p50 ms | p95 ms | failures | "
        "mean instances | reconfigurations | step -> count | whole phase: p95 ms | whole phase: failures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for mode, run in runs.items():
        for p in run.phases:
            step = "—"
            if p.step is not None and p.step.after != p.step.before:
                step = f"{p.step.before} -> {p.step.after} in {_f(p.step.settled_s, 1)} s"
                if p.step.first_change_s is not None and p.step.first_change_s != p.step.settled_s:
                    step += f" (first change {_f(p.step.first_change_s, 1)} s)"
            failures = str(p.failures) + (f" ({_codes(p.failures_by_code)})" if p.failures else "")
            whole_failures = "n/a" if p.whole_failures is None else str(p.whole_failures)
            lines.append(f"| {mode} | {p.name} | {p.offered_per_s:.1f} | {p.served_per_s:.1f} | "
                         f"{_f(p.served_ratio, 3)} | {_f(p.p50_ms, 1)} | {_f(p.p95_ms, 1)} | {failures} | "
                         f"{_f(p.mean_instances, 2)} | {p.reconfigurations} | {step} | {_f(p.whole_p95_ms, 1)} | "
                         f"{whole_failures} |")
    targets = judge(runs)
    if targets:
        lines += ["", "Targets for the controller (issue 3):", "",
                  "| target | measured | met |", "|---|---|---|"]
        for t in targets:
            lines.append(f"| {t.what} | {t.measured} | {'n/a' if t.met is None else ('yes' if t.met else '**no**')} |")
    controller = runs.get("controller")
    if controller is not None and controller.backlog_peaks:
        lines += ["", "Step response of the controller run (issue 10; the step -> reload start is the controller's "
                      "first change decided after the step):", ""] + step_lines(controller)
    if controller is not None and controller.verdicts:
        lines += ["", "Verify's verdicts: " + ", ".join(f"t={v['t_s']:.1f} s {v['verdict']}"
                                                       for v in controller.verdicts) + "."]
    if controller is not None and controller.controller_decisions:
        lines += ["", "The controller's changes (its /status; t from the load's start):", ""]
        for d in controller.controller_decisions:
            lines.append(f"- t={d['t_s']:.1f} s: {d['action']} {d['current_instances']} -> {d['decided_instances']} "
                         f"({d['profile']}), {d['reason']}, mean in flight {d['inflight_mean']}")
    late = {f"{m}/{p.name}": p.late for m, r in runs.items() for p in r.phases if p.late}
    if late:
        lines += ["", f"Sends that left later than their schedule allowed (client-side lag): "
                      f"{', '.join(f'{k} {v}' for k, v in late.items())}."]
    lines += ["", f"Per-phase figures and Triton's config timeline: `{RESULTS_JSON.relative_to(ROOT)}`.", "", END]
    return "\n".join(lines)


def _codes(codes: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))


def replace_block(text: str, block: str) -> str:
    """The document with the Controller section's generated block replaced (or added);
    everything else, other sections and hand-written notes in this one, stays."""
    if BEGIN.split(":")[0] in text and END in text:
        start = text.index(BEGIN.split(":")[0])
        line_start = text.rfind("\n", 0, start) + 1
        end = text.index(END, start) + len(END)
        return text[:line_start] + block + text[end:]
    if not text.strip():
        text = "# Benchmarks\n"
    if SECTION in text.splitlines():
        lines = text.splitlines()
        at = lines.index(SECTION) + 1
        return "\n".join(lines[:at] + ["", block] + lines[at:]) + ("\n" if text.endswith("\n") else "")
    return text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"


# --------------------------------------------------------------------------- running it


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model or platform.processor()}), shared with other work, no GPU"


class SidecarProcess:
    """`tritonpilot serve` on free ports, JSON logs to a file."""

    def __init__(self, triton_url: str, log_path: Path, policy: Path | None, extra: Sequence[str] = ()) -> None:
        self.url = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"
        self.log_path = log_path
        args = [sys.executable, "-m", "tritonpilot", "serve", "--triton", triton_url, "--listen", self.url,
                "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-format", "json",
                "--http-listen", "off"]  # gRPC only: the load is gRPC, and no fixed HTTP port to collide on
        if policy is not None:
            args += ["--policy", str(policy)]
        args += list(extra)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def wait_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonpilot serve exited with {self.proc.returncode}: see {self.log_path}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonpilot serve did not answer within {timeout_s} s: see {self.log_path}")
            await asyncio.sleep(0.1)

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/status")[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def set_static(url: str, instances: int, model: str = MODEL) -> None:
    """A config-override load with `instances` and that count's built-in profile, verified."""
    profile = next(p for p in BUILTIN_PROFILES if p.holds(instances))
    client = InferenceServerClient(url)
    try:
        live = (await client.get_model_config(model, as_json=True))["config"]
        override = build_override(live, instances, profile.parameters, MANAGED_KEYS, read_state(live).generation + 1)
        await client.load_model(model, config=json.dumps(override), client_timeout=120)
        config = (await client.get_model_config(model, as_json=True))["config"]
        if not matches(config, instances, profile.parameters, MANAGED_KEYS):
            raise RuntimeError(f"Triton's config does not show {instances} instances after the load: {config}")
    finally:
        await client.close()


async def sample_configs(url: str, t0: float, interval_s: float, out: list[ConfigSample],
                         stop: asyncio.Event, model: str = MODEL) -> None:
    client = InferenceServerClient(url)
    try:
        while not stop.is_set():
            at = time.perf_counter() - t0
            try:
                config = (await client.get_model_config(model, as_json=True, client_timeout=5))["config"]
            except Exception:  # noqa: BLE001 - a missed read is a gap in the samples, not a guess
                out.append(ConfigSample(at, None, None))
            else:
                state = read_state(config)
                out.append(ConfigSample(at, state.instances, state.generation,
                                        {k: v for k, v in state.parameters.items() if k in MANAGED_KEYS}))
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (time.perf_counter() - t0 - at)))
            except TimeoutError:
                pass
    finally:
        await client.close()


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.25)


async def poll_decisions(sidecar: SidecarProcess, seen: dict[float, dict[str, Any]], stop: asyncio.Event,
                         model: str = MODEL) -> None:
    """Every decision /status shows while the load runs (it keeps only the last 20)."""
    while not stop.is_set():
        try:
            status = await asyncio.to_thread(sidecar.status)
        except (OSError, ValueError):
            status = None
        for d in (status or {}).get("models", {}).get(model, {}).get("decisions", []):
            seen[d["now_s"]] = d
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except TimeoutError:
            pass


async def run_one(mode: str, settings: Settings, workdir: Path, log: Any, debug_logs: bool = False,
                  record: Path | None = None) -> RunReport:
    from tritonpilot.tools.embedded import EmbeddedTriton

    triton = EmbeddedTriton(MODELS_DIR, load_models=[MODEL], log_path=workdir / f"triton-{mode}.log",
                            startup_timeout_s=180.0)
    triton.start()
    sidecar = None
    try:
        policy = None
        if mode == "static-1":
            await set_static(triton.grpc_url, 1)
        elif mode == "static-max":
            await set_static(triton.grpc_url, settings.max_instances)
        else:
            policy = workdir / "policy.yaml"
            # DEBUG: every tick's hold and its numbers in the sidecar's log (--keep-logs).
            policy.write_text(("logging: {level: DEBUG}\n" if debug_logs else "") + settings.policy_yaml())
            resolve(parse_policy(yaml.safe_load(settings.policy_yaml())))  # fail early if invalid
        extra = ["--no-proxy"] if settings.no_proxy else []
        if record is not None and policy is not None:
            extra += ["--record", str(record)]
        sidecar = SidecarProcess(triton.grpc_url, workdir / f"sidecar-{mode}.log", policy, extra)
        await sidecar.wait_serving()
        client = InferenceServerClient(triton.grpc_url)

        async def settled() -> bool:
            config = (await client.get_model_config(MODEL, as_json=True))["config"]
            if policy is None:
                return True
            status = sidecar.status()["models"][MODEL]
            single = next(p for p in BUILTIN_PROFILES if p.holds(1))
            return status["pending_reload"] is None and matches(config, 1, single.parameters, MANAGED_KEYS)

        try:
            # With the controller: its first act gives the bare config.pbtxt the single profile.
            await wait_for(settled, 60.0, "the model to settle before the load")
            start_count = read_state((await client.get_model_config(MODEL, as_json=True))["config"]).instances
        finally:
            await client.close()
        load_url = triton.grpc_url if settings.no_proxy else sidecar.url
        inputs = await benchlib.prepare_inputs(load_url, MODEL, shapes={"INPUT0": (4,)})
        samples: list[ConfigSample] = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample_configs(triton.grpc_url, t0, settings.sample_interval_s, samples, stop))
        seen: dict[float, dict[str, Any]] = {}  # the controller's decisions by now_s: /status keeps the last 20
        poller = asyncio.create_task(poll_decisions(sidecar, seen, stop)) if policy is not None else None
        backlog = Backlog()
        make_callers = benchlib.make_callers
        benchlib.make_callers = lambda *a, **k: [backlog.wrap(c) for c in make_callers(*a, **k)]  # type: ignore[assignment]
        print(f"[{mode}] load: " + ", ".join(f"{n} {r:g}/s x {s:g} s" for n, r, s in settings.phases()),
              file=log, flush=True)
        phases = [(rate, seconds) for _, rate, seconds in settings.phases()]
        measured_windows, whole_windows, t = [], [], 0.0
        for _, seconds in phases:
            measured_windows.append((t + settings.transition_s, t + seconds))
            whole_windows.append((t, t + seconds))
            t += seconds
        try:
            # As benchlib.measure_rate_schedule, with each whole phase measured too.
            results = await benchlib.run_load(
                load_url, MODEL, benchlib.RateLoad((*phases, (0.0, 1.0)), settings.connections), inputs,
                measured_windows + whole_windows, timeout_s=settings.timeout_s,
                cpu_pids={"triton": triton.pid or 0, "sidecar": sidecar.proc.pid}, mode="phase",
                levels=[rate for rate, _ in phases] * 2)
        finally:
            benchlib.make_callers = make_callers  # type: ignore[assignment]
            stop.set()
            await sampler
            if poller is not None:
                await poller
        decisions, reloads, verdicts = [], {}, []
        if policy is not None:
            load_start_monotonic_s = _monotonic_at(t0)
            for d in sidecar.status()["models"][MODEL]["decisions"]:
                seen[d["now_s"]] = d
            for d in sorted(seen.values(), key=lambda d: d["now_s"]):
                t_s = d["now_s"] - load_start_monotonic_s
                load = d["numbers"].get("load_inflight_mean", d["numbers"].get("inflight_mean", float("nan")))
                if d["action"] in ("scale_up", "panic_up", "scale_down", "reprofile"):
                    decisions.append({"t_s": t_s, "action": d["action"], "reason": d["reason"],
                                      "current_instances": d["current_instances"],
                                      "decided_instances": d["decided_instances"], "profile": d["profile"],
                                      "inflight_mean": round(load, 2)})
                for v in d.get("verdicts", []):
                    verdicts.append({"t_s": t_s, "verdict": v, "decision": d["reason"]})
            reloads = _reload_counts(sidecar.get("/metrics")[1].decode())
        bounds = [(t0 + a, t0 + b) for a, b in whole_windows]
        report = RunReport(mode, start_count, phase_reports(settings, results[:len(phases)], samples,
                                                            results[len(phases):]), samples, decisions, reloads,
                           [backlog.peak(a, b) for a, b in bounds], verdicts)
        for p in report.phases:
            print(f"[{mode}] {p.name}: offered {p.offered_per_s:.1f}/s served {p.served_per_s:.1f}/s "
                  f"p95 {_f(p.p95_ms, 1)} ms failures {p.failures} mean instances {_f(p.mean_instances, 2)} "
                  f"reconfigurations {p.reconfigurations}", file=log, flush=True)
        return report
    finally:
        if sidecar is not None:
            sidecar.stop()
        triton.stop()


def _monotonic_at(perf_t0: float) -> float:
    """time.monotonic() at the moment perf_counter() read perf_t0 (the sidecar's clock is monotonic)."""
    return time.monotonic() - (time.perf_counter() - perf_t0)


def _reload_counts(metrics_text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["result"]: s.value for f in text_string_to_metric_families(metrics_text)
            for s in f.samples if s.name == "tritonpilot_reloads_total" and s.labels.get("model") == MODEL}


def config_timeline(samples: Sequence[ConfigSample]) -> list[dict[str, Any]]:
    """Triton's sampled config, kept where it changed (count, generation, flags, or a read
    that failed or came back) and at the last sample, so where sampling ended shows."""
    out: list[dict[str, Any]] = []
    prev: tuple[Any, ...] | None = None
    for s in samples:
        key = (s.instances, s.generation, tuple(sorted(s.flags.items())))
        if key != prev:
            out.append(asdict(s))
            prev = key
    if samples and out[-1]["t_s"] != samples[-1].t_s:
        out.append(asdict(samples[-1]))
    return out


def results_summary(settings: Settings, runs: Mapping[str, RunReport], meta: Mapping[str, Any]) -> dict[str, Any]:
    """What docs/benchmarks-controller.json keeps: per-phase figures and targets, and each
    run's config timeline instead of its every sample."""
    out_runs = {}
    for mode, r in runs.items():
        run = {k: v for k, v in asdict(r).items() if k != "samples"}
        run["config_samples"] = len(r.samples)
        run["config_samples_unread"] = sum(1 for s in r.samples if s.instances is None)
        run["config_timeline"] = config_timeline(r.samples)
        out_runs[mode] = run
    return {"meta": dict(meta), "settings": asdict(settings), "targets": [asdict(t) for t in judge(runs)],
            "runs": out_runs}


def write_results(settings: Settings, runs: Mapping[str, RunReport], meta: Mapping[str, Any],
                  doc: Path, results_json: Path) -> None:
    block = render_block(settings, runs, meta)
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else ""
    doc.write_text(replace_block(text, block))
    results_json.write_text(json.dumps(results_summary(settings, runs, meta), indent=1, default=str) + "\n")


# --------------------------------------------------------------------------- ceiling and a bad profile (issue 10)

# A model whose throughput stops growing with instances on this machine: each request burns
# BURN_MS of CPU (thread time, so contention stretches it in wall time). On 2 cores, past two
# busy instances nothing more is served.
BURN_MODEL = "burn"
BURN_CONFIG = """name: "burn"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
parameters [ { key: "BURN_MS", value { string_value: "%s" } } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""
BURN_PY = """import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.burn_s = float(config["parameters"]["BURN_MS"]["string_value"]) / 1000.0

    def execute(self, requests):
        responses = []
        for request in requests:
            end = time.thread_time() + self.burn_s  # CPU time, not wall time: contention stretches it
            while time.thread_time() < end:
                pass
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data)]))
        return responses
"""
# The bad profile: the `sleep` model reads SLEEP_MS from its parameters, so a profile that sets it
# to 80 makes each request 4x slower: two instances serve half of what one did.
BAD_PROFILE_POLICY = """control:
  interval_s: 1
defaults:
  max_instances: 2
  profiles:
    - name: single
      instances: [1, 1]
      parameters: {SLEEP_MS: "20"}
    - name: slow
      instances: [2, null]
      parameters: {SLEEP_MS: "80"}
models:
  sleep: {}
"""


def burn_repository(root: Path, burn_ms: float) -> Path:
    model = root / "models" / BURN_MODEL
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(BURN_CONFIG % f"{burn_ms:g}")
    (model / "1" / "model.py").write_text(BURN_PY)
    return root / "models"


@dataclass(frozen=True)
class ClosedRun:
    """One closed-loop run of a scenario: what the client got and what Triton ran."""

    mode: str
    seconds: float
    transition_s: float
    window_s: tuple[float, float]      # where throughput and p95 are measured
    served_per_s: float
    p95_ms: float | None
    failures: int
    mean_instances: float | None       # over the whole run after the transition
    instance_seconds: float | None     # mean instances x that span
    final_instances: int | None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)


async def run_closed(mode: str, model: str, models_dir: Path, seconds: float, window_s: tuple[float, float],
                     concurrency: int, workdir: Path, policy_yaml: str | None, static: int | None,
                     transition_s: float, log: Any) -> ClosedRun:
    """`concurrency` clients, each sending its next request when its last one is answered."""
    from tritonpilot.tools.embedded import EmbeddedTriton

    triton = EmbeddedTriton(models_dir, load_models=[model], log_path=workdir / f"triton-{mode}.log",
                            startup_timeout_s=180.0)
    triton.start()
    sidecar = None
    try:
        policy = None
        if static is not None:
            await set_static(triton.grpc_url, static, model)
        if policy_yaml is not None:
            policy = workdir / f"policy-{mode}.yaml"
            policy.write_text(policy_yaml)
            resolve(parse_policy(yaml.safe_load(policy_yaml)))
        sidecar = SidecarProcess(triton.grpc_url, workdir / f"sidecar-{mode}.log", policy)
        await sidecar.wait_serving()
        if policy is not None:
            await wait_for(lambda: _settled(sidecar, model), 60.0, "the controller's first reprofile")
        inputs = await benchlib.prepare_inputs(sidecar.url, model, shapes={"INPUT0": (4,)})
        samples: list[ConfigSample] = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample_configs(triton.grpc_url, t0, 0.5, samples, stop, model))
        seen: dict[float, dict[str, Any]] = {}
        poller = asyncio.create_task(poll_decisions(sidecar, seen, stop, model)) if policy is not None else None
        print(f"[{mode}] closed loop, {concurrency} clients for {seconds:g} s", file=log, flush=True)
        try:
            (result,) = await benchlib.run_load(sidecar.url, model, benchlib.ConcurrencyLoad(concurrency), inputs,
                                                [window_s], timeout_s=30.0)
            # run_load stops at the window's end: the run lasts until `seconds` only if the window ends there.
        finally:
            stop.set()
            await sampler
            if poller is not None:
                await poller
        decisions, verdicts = [], []
        if policy is not None:
            start = _monotonic_at(t0)
            for d in sidecar.status()["models"][model]["decisions"]:
                seen[d["now_s"]] = d
            for d in sorted(seen.values(), key=lambda d: d["now_s"]):
                if d["action"] in ("scale_up", "panic_up", "scale_down", "reprofile"):
                    decisions.append({"t_s": round(d["now_s"] - start, 1), "action": d["action"],
                                      "reason": d["reason"],
                                      "instances": f"{d['current_instances']} -> {d['decided_instances']}",
                                      "profile": d["profile"]})
                for v in d.get("verdicts", []):
                    verdicts.append({"t_s": round(d["now_s"] - start, 1), "verdict": v,
                                     "throughput_change_ratio": d["numbers"].get("verify_throughput_change_ratio"),
                                     "latency_change_ratio": d["numbers"].get("verify_latency_change_ratio")})
        mean = mean_instances(samples, transition_s, window_s[1])
        known = [x for x in samples if x.instances is not None]
        out = ClosedRun(mode=mode, seconds=seconds, transition_s=transition_s, window_s=window_s,
                        served_per_s=result.served_per_s,
                        p95_ms=_ms(result.p95_us), failures=result.error_count, mean_instances=mean,
                        instance_seconds=mean * (window_s[1] - transition_s) if mean is not None else None,
                        final_instances=known[-1].instances if known else None, decisions=decisions,
                        verdicts=verdicts)
        print(f"[{mode}] served {out.served_per_s:.1f}/s p95 {_f(out.p95_ms, 1)} ms mean instances "
              f"{_f(out.mean_instances, 2)} final {out.final_instances}", file=log, flush=True)
        return out
    finally:
        if sidecar is not None:
            sidecar.stop()
        triton.stop()


async def _settled(sidecar: SidecarProcess, model: str) -> bool:
    status = sidecar.status()["models"][model]
    return status["pending_reload"] is None and status["profile"] is not None


def ceiling_targets(runs: Mapping[str, ClosedRun], max_instances: int) -> list[Target]:
    """Issue 10: settle at or below the useful count, >= 0.95 of the best static throughput,
    fewer instance-seconds than static-max."""
    statics = {int(m.split("-")[1]): r for m, r in runs.items() if m.startswith("static-")}
    c = runs.get("controller")
    if c is None or not statics:
        return []
    best = max(r.served_per_s for r in statics.values())
    useful = min(n for n, r in statics.items() if r.served_per_s >= 0.95 * best)
    out = [Target(f"settles at or below the useful count ({useful}: the fewest static instances within 5 % of "
                  f"the best static throughput)", f"final {c.final_instances}",
                  c.final_instances is not None and c.final_instances <= useful),
           Target(">= 0.95 of the best static count's throughput (controller: its last window)",
                  f"{c.served_per_s:.1f}/s vs {best:.1f}/s ({c.served_per_s / best:.3f})",
                  c.served_per_s >= 0.95 * best)]
    smax = statics.get(max_instances)
    if smax is not None and smax.mean_instances is not None and c.mean_instances is not None:
        span_s = c.seconds - c.transition_s
        mine, theirs = c.mean_instances * span_s, smax.mean_instances * span_s
        out.append(Target(f"fewer instance-seconds than static-max (over the controller's {span_s:g} s)",
                          f"{mine:.0f} vs {theirs:.0f}", mine < theirs))
    return out


def run_scenario(args: argparse.Namespace) -> int:
    """--scenario ceiling | bad-profile: print a markdown block (and the raw figures as JSON)."""
    scenario = args.scenario
    seconds = args.phase_s if args.phase_s is not None else (90.0 if args.short else 180.0)
    transition_s = args.transition_s if args.transition_s is not None else 10.0
    meta = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "load_average_at_start": os.getloadavg(),
            "command": "bash scripts/bench-controller " + " ".join(_reproducible_args(sys.argv[1:]))}

    async def main() -> dict[str, ClosedRun]:
        runs: dict[str, ClosedRun] = {}
        with tempfile.TemporaryDirectory(prefix="tritonpilot-bench-scenario-") as tmp:
            workdir = Path(tmp) if args.keep_logs is None else args.keep_logs
            workdir.mkdir(parents=True, exist_ok=True)
            if scenario == "ceiling":
                models_dir = burn_repository(workdir, args.burn_ms)
                static_s = min(seconds, 60.0)
                for n in (range(1, args.max_instances + 1) if args.ceiling_statics is None
                          else [int(x) for x in args.ceiling_statics.split(",") if x.strip()]):
                    runs[f"static-{n}"] = await run_closed(
                        f"static-{n}", BURN_MODEL, models_dir, static_s, (transition_s, static_s),
                        args.concurrency, workdir, None, n, transition_s, sys.stderr)
                policy = f"models:\n  {BURN_MODEL}: {{}}\n"
                if args.max_instances != 4:
                    policy = f"defaults:\n  max_instances: {args.max_instances}\n" + policy
                runs["controller"] = await run_closed(
                    "controller", BURN_MODEL, models_dir, seconds, (seconds - 60.0, seconds), args.concurrency,
                    workdir, policy, None, transition_s, sys.stderr)
            else:
                runs["controller"] = await run_closed(
                    "controller", MODEL, MODELS_DIR, seconds, (transition_s, seconds), args.concurrency, workdir,
                    BAD_PROFILE_POLICY, None, transition_s, sys.stderr)
        return runs

    runs = asyncio.run(main())
    meta["load_average_at_end"] = os.getloadavg()
    lines = [f"Reproduce: `{meta['command']}`. Ran {meta['date']} on {meta['machine']}; load average at start "
             f"{meta['load_average_at_start'][0]:.1f}, at end {meta['load_average_at_end'][0]:.1f}.", "",
             "| run | served/s | p95 ms | failures | mean instances | final instances |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, r in runs.items():
        lines.append(f"| {mode} | {r.served_per_s:.1f} | {_f(r.p95_ms, 1)} | {r.failures} | "
                     f"{_f(r.mean_instances, 2)} | {r.final_instances} |")
    c = runs["controller"]
    changes = "; ".join(f"t={d['t_s']} s {d['action']} {d['instances']} ({d['profile']}), {d['reason']}"
                        for d in c.decisions)
    verdicts = "; ".join(f"t={v['t_s']} s {v['verdict']} (throughput {_f(v['throughput_change_ratio'], 2)}, "
                         f"latency {_f(v['latency_change_ratio'], 2)})" for v in c.verdicts)
    lines += ["", f"Controller changes: {changes}.", f"Verdicts: {verdicts or 'none'}."]
    if scenario == "ceiling":
        targets = ceiling_targets(runs, args.max_instances)
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t.what} | {t.measured} | {'yes' if t.met else '**no**'} |" for t in targets]
    print("\n".join(lines))
    if args.scenario_json is not None:
        args.scenario_json.write_text(json.dumps({"meta": meta, "runs": {m: asdict(r) for m, r in runs.items()}},
                                                 indent=1, default=str) + "\n")
    return 0


# --------------------------------------------------------------------------- command line


def configure(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--short", action="store_true",
                        help="a quick run: 25 s phases, 8 s transition (figures are noisier; targets may not hold)")
    parser.add_argument("--low-rate", type=float, default=d.low_rate_per_s,
                        help=f"requests/s (default {d.low_rate_per_s:g})")
    parser.add_argument("--high-rate", type=float, default=d.high_rate_per_s,
                        help=f"requests/s (default {d.high_rate_per_s:g})")
    parser.add_argument("--phase-s", type=float, help=f"seconds per phase (default {d.phase_s:g})")
    parser.add_argument("--transition-s", type=float, help=f"left out at each phase start (default {d.transition_s:g})")
    parser.add_argument("--max-instances", type=int, default=d.max_instances, help=f"default {d.max_instances}")
    parser.add_argument("--target-inflight", type=float, default=d.target_inflight_per_instance,
                        help="the controller's target_inflight_per_instance "
                             f"(default {d.target_inflight_per_instance:g})")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--preset", choices=PRESETS, default=d.preset,
                        help="the controller's policy: bench (the template above: interval 0.5 s, target 0.7, "
                             "short delays) or example (deploy/policy.example.yaml's defaults: only `models` set)")
    parser.add_argument("--verify", choices=VERIFY_CHOICES, default=d.verify,
                        help="verify.enabled: the policy's default, or forced on or off")
    parser.add_argument("--no-proxy", action="store_true",
                        help="send the load to Triton's gRPC port directly; the sidecar runs with --no-proxy")
    parser.add_argument("--scenario", choices=("phases", "ceiling", "bad-profile"), default="phases",
                        help="phases: low -> high -> low, open loop (the default); ceiling: the CPU-burning "
                             "`burn` model under a closed loop, static 1..max and the controller; bad-profile: "
                             "`sleep` with a profile for 2+ instances that makes it 4x slower (both print only)")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (scenarios; default 8)")
    parser.add_argument("--burn-ms", type=float, default=10.0, help="CPU per request of `burn` (default 10)")
    parser.add_argument("--scenario-json", type=Path, metavar="FILE", help="a scenario's raw figures")
    parser.add_argument("--ceiling-statics", metavar="N,N", help="ceiling: the static counts to run "
                                                                 "(default 1..max; empty: none)")
    parser.add_argument("--record", type=Path, metavar="FILE",
                        help="the controller's sidecar records its ticks here (serve --record), for tritonpilot replay")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose Controller section is written")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON, help="raw figures")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing files")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="keep Triton's and the sidecars' logs here (the controller's at DEBUG: every tick)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--modes {args.modes!r}: expected some of {', '.join(MODES)}")
    phase_s = args.phase_s if args.phase_s is not None else (25.0 if args.short else 60.0)
    transition_s = args.transition_s if args.transition_s is not None else (8.0 if args.short else 10.0)
    if transition_s >= phase_s:
        raise SystemExit(f"--transition-s {transition_s:g} leaves nothing of a {phase_s:g} s phase")
    return Settings(low_rate_per_s=args.low_rate, high_rate_per_s=args.high_rate, phase_s=phase_s,
                    transition_s=transition_s, max_instances=args.max_instances,
                    target_inflight_per_instance=args.target_inflight, modes=modes,
                    preset=getattr(args, "preset", "bench"), verify=getattr(args, "verify", "default"),
                    no_proxy=bool(getattr(args, "no_proxy", False)))


def run(args: argparse.Namespace) -> int:
    if getattr(args, "scenario", "phases") != "phases":
        return run_scenario(args)
    settings = settings_from_args(args)
    started = time.monotonic()
    shown = _reproducible_args(sys.argv[1:])
    command = "bash scripts/bench-controller" + (" " + " ".join(shown) if shown else "")
    meta: dict[str, Any] = {"command": command, "machine": machine(),
                            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                            "load_average_at_start": os.getloadavg()}

    async def main() -> dict[str, RunReport]:
        runs: dict[str, RunReport] = {}
        with tempfile.TemporaryDirectory(prefix="tritonpilot-bench-controller-") as tmp:
            workdir = Path(tmp)
            if args.keep_logs is not None:
                workdir = args.keep_logs
                workdir.mkdir(parents=True, exist_ok=True)
            for mode in settings.modes:
                runs[mode] = await run_one(mode, settings, workdir, sys.stderr, debug_logs=args.keep_logs is not None,
                                           record=getattr(args, "record", None))
        return runs

    runs = asyncio.run(main())
    meta["duration_min"] = (time.monotonic() - started) / 60
    meta["load_average_at_end"] = os.getloadavg()
    if args.no_write:
        print(render_block(settings, runs, meta))
    else:
        write_results(settings, runs, meta, args.doc, args.json)
        print(f"wrote {args.doc} (Controller section) and {args.json}", file=sys.stderr)
    for t in judge(runs):
        print(f"{'MET ' if t.met else ('N/A ' if t.met is None else 'MISS')} {t.what}: {t.measured}")
    return 0


def _reproducible_args(argv: Sequence[str]) -> list[str]:
    """The options that shape the figures (not where logs or files go)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--keep-logs", "--doc", "--json", "--record", "--scenario-json"):
            skip = "=" not in arg
            continue
        if name == "--no-write":
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-controller", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
