"""Record and replay (control/record.py, tritonpilot/tools/replay.py).

1. Exactness: a recording made by the real Controller (fake clock, fake sources, a fake
   Triton behind the real actuator: tests/test_loop.py's fakes), replayed under the policy
   it was recorded under, gives the very decisions the live controller took, tick by tick,
   numbers and all, through budget waits, a failed reload, no-data ticks and a learned
   memory estimate.
2. Another policy is simulated: its own counts, reloads and budget over the same load.
3. The writer never stops the controller: full -> one log line, an I/O error -> one log line.
4. The real thing: `tritonpilot serve --record` in front of a real Triton, then
   `tritonpilot replay` shows the decisions the sidecar logged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from proxy_support import WAIT_S, wait_until
from structlog.testing import capture_logs
from test_loop import FakeClock, FakeSources, FakeTriton, model_config, settle

from tritonpilot import cli
from tritonpilot.control.actuator import Actuator
from tritonpilot.control.decide import Action, Decision, Reason
from tritonpilot.control.loop import Controller
from tritonpilot.control.overrides import read_state
from tritonpilot.control.policy import load_policy, resolve
from tritonpilot.control.record import RecordWriter, decision_json, policy_sha256, read_recording
from tritonpilot.proxy.gpu import GpuSample as ProxyGpuSample
from tritonpilot.proxy.gpu import GpuSnapshot
from tritonpilot.tools import replay as replay_tool

GIB = 1 << 30

POLICY_YAML = """\
control:
  interval_s: 1
  max_concurrent_reloads: 1
  max_reloads_per_minute: 4
defaults:
  min_instances: 1
  max_instances: 4
  target_inflight_per_instance: 1
  scale_up_delay_s: 5
  scale_down_delay_s: 20
  cooldown_s: 10
models:
  a: {}
  b: {}
"""


def scenario(coro_fn: Any) -> Any:
    """Run an async test body on a fresh event loop, fixtures and all."""
    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(coro_fn(*args, **kwargs))
    return wrapper


def write_policy(tmp_path: Path, text: str = POLICY_YAML, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class Recorded:
    """Two models behind one recording controller, as tests/test_loop.py's Pod."""

    def __init__(self, policy_path: Path, record_path: Path, **writer: Any) -> None:
        policy = load_policy(policy_path)
        self.policies = resolve(policy)
        self.clock = FakeClock()
        # KIND_GPU: a KIND_CPU model has no GPU signal, and this timeline learns GPU memory.
        self.triton = FakeTriton({name: {**model_config(kind="KIND_GPU"), "name": name} for name in self.policies})
        self.sources = FakeSources(self.triton)
        self.actuator = Actuator(self.triton, clock=self.clock)  # type: ignore[arg-type]
        self.writer = RecordWriter(record_path, policy_path=str(policy_path), **writer)
        self.controller = Controller(self.policies, self.sources, self.actuator, registry=CollectorRegistry(),
                                     clock=self.clock, max_concurrent_reloads=policy.control.max_concurrent_reloads,
                                     max_reloads_per_minute=policy.control.max_reloads_per_minute,
                                     recorder=self.writer)
        self.decisions: list[Decision] = []

    async def run(self, until: float, **load: float) -> None:
        self.sources.inflight.update(load)
        while self.clock.now_s <= until + 1e-9:
            self.decisions += await self.controller.tick(self.clock.now_s)
            await settle()
            self.clock.now_s += 1.0

    def gpu(self, used_gib: float) -> None:
        sample = ProxyGpuSample(index=0, name="H100", utilization_ratio=0.5, memory_used_bytes=int(used_gib * GIB),
                                memory_total_bytes=80 * GIB)
        self.sources.gpu_snapshot = GpuSnapshot(now_s=self.clock.now_s, gpus=(sample,), source="nvml")


async def a_busy_recording(tmp_path: Path) -> tuple[Recorded, Path, Path]:
    """A timeline with budget waits, a refused reload, Triton down for a while, GPU memory."""
    policy_path, record_path = write_policy(tmp_path), tmp_path / "rec.jsonl"
    pod = Recorded(policy_path, record_path)
    pod.gpu(10)
    pod.triton.gates["a"] = asyncio.Event()
    with capture_logs():
        await pod.run(until=4, a=8.0, b=8.0)        # both panic at 2: a starts, b waits for the budget
        pod.gpu(30)
        pod.triton.gates["a"].set()
        await pod.run(until=20)                     # a finishes, b goes
        pod.gpu(30)                                 # a sample taken after a settled: memory learned
        await pod.run(until=60, a=1.5, b=1.5)       # down after 20 s: a to 2, b waits its turn
        pod.triton.down = True
        await pod.run(until=64)                     # no data
        pod.triton.down = False
        await pod.run(until=90, a=0.3, b=0.3)       # down to 1 at 85 and 86
        pod.triton.reject = lambda config: ("b refused" if config["name"] == "b"
                                            and read_state(config).instances == 2 else None)
        await pod.run(until=130, a=8.0, b=1.6)      # a: panic held by the cooldown; b: 2 refused, backed off
        await pod.controller.close()
    return pod, policy_path, record_path


@scenario
async def test_replaying_under_the_recorded_policy_reproduces_every_decision_exactly(tmp_path: Path) -> None:
    pod, policy_path, record_path = await a_busy_recording(tmp_path)
    live = pod.decisions
    # The timeline is as busy as intended (else the test would prove little).
    reasons = {d.reason for d in live}
    assert {Reason.RELOAD_BUDGET, Reason.NO_DATA, Reason.FAILED_CONFIG_BACKOFF, Reason.COOLDOWN} <= reasons, reasons
    assert sum(d.changes for d in live) >= 4
    recording = read_recording(record_path)
    assert any(e.__class__.__name__ == "Observe" for e in recording.entries)
    assert any("memory_per_instance_bytes" in d.numbers and d.numbers["memory_per_instance_bytes"] for d in live)

    result = replay_tool.replay(recording, resolve(load_policy(policy_path)))
    assert result.verbatim and result.mismatches == []
    # (Controller.tick returns the decisions in policy order; they were taken in budget order.)
    by_tick = {(d.model, d.now_s): d for d in live}
    assert len(by_tick) == len(live) == len(result.decisions)
    for replayed in result.decisions:
        decided = by_tick[(replayed.tick.model, replayed.tick.now_s)]
        assert decision_json(replayed.decision) == decision_json(decided), (decided.model, decided.now_s)
    # ... and the recording holds the live decisions as they were.
    assert {(t.model, t.now_s): t.decision for t in recording.ticks} == {
        key: decision_json(d) for key, d in by_tick.items()}


@scenario
async def test_the_replay_command_prints_the_timeline_and_says_it_reproduced_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pod, policy_path, record_path = await a_busy_recording(tmp_path)
    assert cli.main(["replay", str(record_path), "--policy", str(policy_path)]) == 0
    out = capsys.readouterr().out
    n = len(pod.decisions)
    assert f"decisions that reproduce the recording: {n} of {n}" in out
    changes = [line for line in out.splitlines() if " -> " in line]
    assert len(changes) == sum(d.changes for d in pod.decisions)
    assert any("a" in line.split() and "1 -> 4 multi" in line and "panic_up panic" in line for line in changes)
    assert "reload-budget (wanted 4: panic)" in out
    assert f"recorded under {policy_path}" in out


@scenario
async def test_another_policy_is_simulated_over_the_same_load(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    pod, policy_path, record_path = await a_busy_recording(tmp_path)
    capped = write_policy(tmp_path, POLICY_YAML.replace("max_instances: 4", "max_instances: 2")
                          .replace("max_concurrent_reloads: 1", "max_concurrent_reloads: 2"), "capped.yaml")
    recording = read_recording(record_path)
    policy = load_policy(capped)
    policies = resolve(policy)
    limits = replay_tool.BudgetLimits(policy.control.max_concurrent_reloads, policy.control.max_reloads_per_minute)
    result = replay_tool.replay(recording, policies, limits=limits)
    assert not result.verbatim
    ups = [r for r in result.decisions if r.decision.changes and r.tick.now_s < 10]
    # Two reloads at once are allowed now: both models go up at 2, to the cap of 2.
    assert [(r.decision.model, r.tick.now_s, r.decision.decided_instances) for r in ups] == [
        ("a", 2.0, 2), ("b", 2.0, 2)]
    # The simulated count follows the replay's own decisions, once the reload would be over: b's
    # recorded reloads took no time (the fake Triton answers at once), so at the next tick.
    assert all(r.instances is None or r.instances <= 2 for r in result.decisions)
    assert [r.instances for r in result.decisions if r.decision.model == "b" and r.tick.now_s in (2.0, 3.0)] == [1, 2]
    t_rec, t_cap = replay_tool.recorded_totals(recording), result.totals
    assert sum(t.instance_s for t in t_cap.values()) < sum(t.instance_s for t in t_rec.values())

    # A policy that decides as the recorded one did early on: a's reload to 4 at 2 is the recorded
    # one, which took 3 s (held at the gate until 5), so it is pending until then.
    nudged = resolve(load_policy(write_policy(tmp_path, POLICY_YAML.replace("defaults:\n", "defaults:\n"
                                                                           "  tolerance_ratio: 0.3\n"), "n.yaml")))
    early = [(r.tick.now_s, r.instances, r.decision.action, r.decision.reason)
             for r in replay_tool.replay(recording, nudged).decisions if r.decision.model == "a" and r.tick.now_s <= 6]
    assert early[2:] == [(2.0, 1, Action.PANIC_UP, Reason.PANIC), (3.0, 1, Action.BLOCKED, Reason.RELOAD_PENDING),
                         (4.0, 1, Action.BLOCKED, Reason.RELOAD_PENDING), (5.0, 4, Action.HOLD, Reason.AT_MAX),
                         (6.0, 4, Action.HOLD, Reason.AT_MAX)]

    assert cli.main(["replay", str(record_path), "--policy", str(policy_path), "--compare", str(capped)]) == 0
    out = capsys.readouterr().out
    assert f"## {policy_path} (verbatim" in out and f"## {capped} (simulated" in out
    summary = out.split("## summary")[1].splitlines()
    assert [line.split()[:2] for line in summary[2:5]] == [
        ["as", "recorded"], [str(policy_path), "(verbatim)"], [str(capped), "(simulated)"]]


def test_replay_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_path = write_policy(tmp_path)
    assert cli.main(["replay", str(tmp_path / "missing.jsonl"), "--policy", str(policy_path)]) == 2
    junk = tmp_path / "junk.jsonl"
    junk.write_text("hello\n")
    assert cli.main(["replay", str(junk), "--policy", str(policy_path)]) == 2
    assert "not a tritonpilot recording" in capsys.readouterr().err


@scenario
async def test_a_full_recording_stops_with_one_log_line_and_the_controller_goes_on(tmp_path: Path) -> None:
    policy_path, record_path = write_policy(tmp_path), tmp_path / "rec.jsonl"
    with capture_logs() as logs:
        pod = Recorded(policy_path, record_path, max_bytes=20_000)
        await pod.run(until=30, a=8.0, b=0.5)
    full = [e for e in logs if e["event"] == "record.full"]
    assert len(full) == 1 and full[0]["max_bytes"] == 20_000
    assert record_path.stat().st_size <= 20_000
    assert len(pod.decisions) == 62  # every tick decided
    lines = record_path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # whole lines only
    # What it holds replays exactly (it is the start of the run).
    result = replay_tool.replay(read_recording(record_path), pod.policies)
    assert result.verbatim and not result.mismatches and 0 < len(result.decisions) < 62


class BrokenFile:
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        raise OSError(28, "No space left on device")


@scenario
async def test_an_io_error_logs_once_and_stops_recording_never_the_controller(tmp_path: Path) -> None:
    pod = Recorded(write_policy(tmp_path), tmp_path / "rec.jsonl")
    with capture_logs() as logs:
        await pod.run(until=0, a=8.0)
        pod.writer._file = BrokenFile()  # type: ignore[assignment]
        await pod.run(until=10)
        await pod.controller.close()
    failed = [e for e in logs if e["event"] == "record.failed"]
    assert len(failed) == 1 and "No space left on device" in failed[0]["error"]
    assert not pod.writer.recording and len(pod.decisions) == 22
    assert [(d.model, d.now_s, d.action) for d in pod.decisions if d.changes] == [("a", 2.0, Action.PANIC_UP)]
    assert [json.loads(line)["type"] for line in (tmp_path / "rec.jsonl").read_text().splitlines()] == [
        "header", "policy", "tick", "policy", "tick"]  # the first tick, then nothing


def test_the_policy_hash_names_the_resolved_policy(tmp_path: Path) -> None:
    one = resolve(load_policy(write_policy(tmp_path)))
    again = resolve(load_policy(write_policy(tmp_path, POLICY_YAML.replace("interval_s: 1", "interval_s: 2"),
                                             "other.yaml")))
    assert policy_sha256(one["a"]) == policy_sha256(again["a"])  # interval_s is not decide's
    changed = resolve(load_policy(write_policy(tmp_path, POLICY_YAML.replace("cooldown_s: 10", "cooldown_s: 11"),
                                               "third.yaml")))
    assert policy_sha256(one["a"]) != policy_sha256(changed["a"]) and policy_sha256(one["a"]) != policy_sha256(
        one["b"])


def test_serve_record_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["serve", "--record", str(tmp_path / "r.jsonl")]) == 2
    assert "--record: needs --policy" in capsys.readouterr().err
    monkeypatch.setenv("TRITONPILOT_RECORD", str(tmp_path / "r.jsonl"))
    assert cli.main(["serve"]) == 2
    assert "--record: needs --policy" in capsys.readouterr().err
    monkeypatch.delenv("TRITONPILOT_RECORD")
    policy_path = write_policy(tmp_path)
    assert cli.main(["serve", "--policy", str(policy_path), "--record", str(tmp_path / "no" / "r.jsonl")]) == 2
    assert "--record: cannot append to" in capsys.readouterr().err
    assert cli.main(["serve", "--policy", str(policy_path), "--record", str(tmp_path / "r.jsonl"),
                     "--record-max-bytes", "0"]) == 2
    assert "--record-max-bytes: got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real Triton

SLEEP_POLICY = """\
control:
  interval_s: 0.5
defaults:
  min_instances: 1
  max_instances: 4
  target_inflight_per_instance: 1
  scale_up_delay_s: 2
  scale_down_delay_s: 4
  cooldown_s: 2
models:
  sleep: {}
"""


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_serve_records_and_replay_shows_the_decisions_the_sidecar_logged(
        triton_factory: Callable[..., Any], serve_factory: Callable[..., Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from test_controller_e2e import LoadWorkers, get_json, sleep_inputs

    # A private Triton: the controller reloads the model, which the shared `triton` must never see.
    triton = triton_factory(load_models=["sleep"])
    policy_path = write_policy(tmp_path, SLEEP_POLICY)
    record_path = tmp_path / "rec.jsonl"
    serve = serve_factory(triton.grpc_url, "--policy", str(policy_path), "--record", str(record_path))
    load = LoadWorkers(serve.url, "sleep", sleep_inputs, workers=6, output="OUTPUT0")
    try:
        load.level = 6
        wait_until(lambda: (s := get_json(serve.metrics_url + "/status")["models"]["sleep"])["instances"] >= 3
                   and s["pending_reload"] is None, timeout_s=60.0, interval_s=0.2, what="a scale-up")
        load.level = 0
        time.sleep(1.0)
    finally:
        load.stop()
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(WAIT_S) == 0, serve.log()[-3000:]
    events = [json.loads(line) for line in serve.log().splitlines() if line.startswith("{")]
    logged = [(e["model"], e["action"], e["reason"], e["instances"], e["profile"].split(" -> ")[1])
              for e in events if e.get("event") == "controller.decision"]
    assert len(logged) >= 2, serve.log()[-3000:]  # the single profile at start, then up

    capsys.readouterr()
    assert cli.main(["replay", str(record_path), "--policy", str(policy_path)]) == 0
    out = capsys.readouterr().out
    n = len(read_recording(record_path).ticks)
    assert n > 10 and f"decisions that reproduce the recording: {n} of {n}" in out, out
    replayed = []
    for line in out.splitlines():
        if " -> " in line:  # t_s model load current -> decided profile action reason
            f = line.split()
            replayed.append((f[1], f[7], f[8], f"{f[3]} -> {f[5]}", f[6]))
    assert replayed == logged, out
