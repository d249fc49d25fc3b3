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

    def phases(self) -> list[tuple[str, float, float]]:
        """(name, rate, seconds) in order."""
        return [("low", self.low_rate_per_s, self.phase_s), ("high", self.high_rate_per_s, self.phase_s),
                ("low again", self.low_rate_per_s, self.phase_s)]

    def policy_yaml(self) -> str:
        return POLICY_TEMPLATE.format(max_instances=self.max_instances, target=self.target_inflight_per_instance,
                                      model=MODEL)


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
        f"{settings.timeout_s:g} s deadline) through the sidecar's proxy on the 20 ms `sleep` model "
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

    def __init__(self, triton_url: str, log_path: Path, policy: Path | None) -> None:
        self.url = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"
        self.log_path = log_path
        args = [sys.executable, "-m", "tritonpilot", "serve", "--triton", triton_url, "--listen", self.url,
                "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-format", "json"]
        if policy is not None:
            args += ["--policy", str(policy)]
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


async def set_static(url: str, instances: int) -> None:
    """A config-override load with `instances` and that count's built-in profile, verified."""
    profile = next(p for p in BUILTIN_PROFILES if p.holds(instances))
    client = InferenceServerClient(url)
    try:
        live = (await client.get_model_config(MODEL, as_json=True))["config"]
        override = build_override(live, instances, profile.parameters, MANAGED_KEYS, read_state(live).generation + 1)
        await client.load_model(MODEL, config=json.dumps(override), client_timeout=120)
        config = (await client.get_model_config(MODEL, as_json=True))["config"]
        if not matches(config, instances, profile.parameters, MANAGED_KEYS):
            raise RuntimeError(f"Triton's config does not show {instances} instances after the load: {config}")
    finally:
        await client.close()


async def sample_configs(url: str, t0: float, interval_s: float, out: list[ConfigSample],
                         stop: asyncio.Event) -> None:
    client = InferenceServerClient(url)
    try:
        while not stop.is_set():
            at = time.perf_counter() - t0
            try:
                config = (await client.get_model_config(MODEL, as_json=True, client_timeout=5))["config"]
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


async def run_one(mode: str, settings: Settings, workdir: Path, log: Any, debug_logs: bool = False) -> RunReport:
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
        sidecar = SidecarProcess(triton.grpc_url, workdir / f"sidecar-{mode}.log", policy)
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
        inputs = await benchlib.prepare_inputs(sidecar.url, MODEL, shapes={"INPUT0": (4,)})
        samples: list[ConfigSample] = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample_configs(triton.grpc_url, t0, settings.sample_interval_s, samples, stop))
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
                sidecar.url, MODEL, benchlib.RateLoad((*phases, (0.0, 1.0)), settings.connections), inputs,
                measured_windows + whole_windows, timeout_s=settings.timeout_s,
                cpu_pids={"triton": triton.pid or 0, "sidecar": sidecar.proc.pid}, mode="phase",
                levels=[rate for rate, _ in phases] * 2)
        finally:
            stop.set()
            await sampler
        decisions, reloads = [], {}
        if policy is not None:
            load_start_monotonic_s = _monotonic_at(t0)
            decisions = [
                {"t_s": d["now_s"] - load_start_monotonic_s, "action": d["action"],
                 "reason": d["reason"], "current_instances": d["current_instances"],
                 "decided_instances": d["decided_instances"], "profile": d["profile"],
                 "inflight_mean": round(d["numbers"].get("inflight_mean", float("nan")), 2)}
                for d in sidecar.status()["models"][MODEL]["decisions"]
                if d["action"] in ("scale_up", "panic_up", "scale_down", "reprofile")]
            reloads = _reload_counts(sidecar.get("/metrics")[1].decode())
        report = RunReport(mode, start_count, phase_reports(settings, results[:len(phases)], samples,
                                                            results[len(phases):]), samples, decisions, reloads)
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
                    target_inflight_per_instance=args.target_inflight, modes=modes)


def run(args: argparse.Namespace) -> int:
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
                runs[mode] = await run_one(mode, settings, workdir, sys.stderr, debug_logs=args.keep_logs is not None)
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
        if name in ("--keep-logs", "--doc", "--json"):
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
