"""The controller benchmark's arithmetic and report (pure): what it says about Triton's config
samples, how it judges the issue's targets, and that it only rewrites its own block of
docs/benchmarks.md. The benchmark itself runs for ~11 min: `bash scripts/bench-controller`."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from controller_bench import (
    BEGIN,
    END,
    Backlog,
    ClosedRun,
    ConfigSample,
    RunReport,
    Settings,
    ceiling_targets,
    config_timeline,
    configure,
    judge,
    mean_instances,
    phase_reports,
    reconfigurations,
    render_block,
    replace_block,
    results_summary,
    settings_from_args,
    step_lines,
    step_times,
    step_to_change_s,
)

from tritonpilot.tools.benchlib import LevelResult

SETTINGS = Settings(phase_s=60.0, transition_s=10.0)


def samples(*spans: tuple[float, float, int, int], every_s: float = 0.5) -> list[ConfigSample]:
    """(from_s, to_s, instances, generation) spans, one sample every `every_s`."""
    out = []
    for a, b, n, g in spans:
        t = a
        while t < b - 1e-9:
            out.append(ConfigSample(t, n, g))
            t += every_s
    return out


def level(rate: float, served: float, p95_ms: float, errors: dict[str, int] | None = None) -> LevelResult:
    return LevelResult(mode="phase", level=rate, window_s=50.0, windows=1, batch_size=1, count=int(served * 50),
                       errors=errors or {}, offered_per_s=rate, served_per_s=served, throughput_infer_per_s=served,
                       p50_us=p95_ms * 900, p95_us=p95_ms * 1000, p99_us=p95_ms * 1100, mean_us=p95_ms * 900)


CONTROLLER_SAMPLES = samples((0, 64, 1, 1), (64, 127, 4, 2), (127, 180, 1, 3))


def test_mean_instances_reconfigurations_and_step_times_from_triton_samples() -> None:
    s = CONTROLLER_SAMPLES
    assert mean_instances(s, 10, 60) == 1.0
    assert mean_instances(s, 70, 120) == 4.0
    assert mean_instances(s, 130, 180) == 1.0
    assert mean_instances(s, 120, 130) == pytest.approx((14 * 4 + 6 * 1) / 20)  # 4 until 127
    assert mean_instances(s, 500, 600) is None
    assert [reconfigurations(s, a, b) for a, b in ((0, 60), (60, 120), (120, 180))] == [0, 1, 1]
    up = step_times(s, 60, 120)
    assert (up.before, up.after, up.first_change_s, up.settled_s) == (1, 4, 4.0, 4.0)
    down = step_times(s, 120, 180)
    assert (down.before, down.after, down.settled_s) == (4, 1, 7.0)


def test_a_two_step_descent_is_two_reconfigurations_and_settles_at_the_last() -> None:
    s = samples((0, 60, 4, 5), (60, 66, 4, 5), (66, 74, 2, 6), (74, 120, 1, 7))
    assert reconfigurations(s, 60, 120) == 2
    step = step_times(s, 60, 120)
    assert (step.before, step.after, step.first_change_s, step.settled_s) == (4, 1, 6.0, 14.0)


def test_a_reload_at_the_same_count_is_a_reconfiguration_and_gaps_are_not_counts() -> None:
    s = samples((0, 10, 1, 1), (10, 20, 1, 2))
    s.insert(5, ConfigSample(2.4, None, None))  # a failed read
    assert reconfigurations(s, 0, 20) == 1
    assert mean_instances(s, 0, 20) == 1.0
    flat = step_times(samples((0, 20, 4, 1)), 10, 20)
    assert (flat.before, flat.after, flat.first_change_s, flat.settled_s) == (4, 4, None, None)


def runs(controller_levels: list[LevelResult], controller_samples: list[ConfigSample]) -> dict[str, RunReport]:
    def run(mode: str, levels: list[LevelResult], s: list[ConfigSample]) -> RunReport:
        return RunReport(mode, s[0].instances, phase_reports(SETTINGS, levels, s), s)

    return {
        "controller": run("controller", controller_levels, controller_samples),
        "static-1": run("static-1", [level(20, 20, 24), level(140, 47, 25000, {"DEADLINE_EXCEEDED": 900}),
                                     level(20, 46, 29000)], samples((0, 180, 1, 1))),
        "static-max": run("static-max", [level(20, 20, 25), level(140, 140, 38), level(20, 20, 25)],
                          samples((0, 180, 4, 1))),
    }


def test_judge_marks_each_target_met_or_not() -> None:
    good = runs([level(20, 20, 25), level(140, 139, 40), level(20, 20, 26)], CONTROLLER_SAMPLES)
    targets = {t.what: t for t in judge(good)}
    assert all(t.met for t in targets.values()), targets
    assert targets["step -> new count serving in <= 10 s"].measured == (
        "high: 1 -> 4 serving after 4.0 s; low again: 4 -> 1 serving after 7.0 s")
    assert targets["mean instances <= 1.5 at low load"].measured == "low 1.00, low again 1.00"

    bad = runs([level(20, 20, 25), level(140, 130, 80, {"UNAVAILABLE": 3}), level(20, 20, 26)],
               samples((0, 66, 1, 1), (66, 75, 2, 2), (75, 140, 4, 3), (140, 150, 2, 4), (150, 180, 1, 5)))
    targets = {t.what: t for t in judge(bad)}
    missed = {what for what, t in targets.items() if not t.met}
    assert missed == {">= 0.98 of the offered rate served in every phase",
                      "p95 <= 1.5 x static-max's p95 in every phase", "0 failures",
                      "step -> new count serving in <= 10 s", "at most one reconfiguration per phase",
                      "mean instances <= 1.5 at low load"}
    assert targets["at most one reconfiguration per phase"].measured == "low 0, high 2, low again 2"
    assert targets["sanity: static-1 fails the high phase (else the load is too light)"].met


def test_the_report_block_and_only_it_is_replaced_in_the_document() -> None:
    block = render_block(SETTINGS, runs([level(20, 20, 25), level(140, 139, 40), level(20, 20, 26)],
                                        CONTROLLER_SAMPLES),
                         {"command": "bash scripts/bench-controller", "duration_min": 11.2, "date": "d",
                          "machine": "m"})
    assert block.startswith(BEGIN) and block.endswith(END)
    assert "| controller | high | 140.0 | 139.0 | 0.993 |" in block
    assert "| 1 -> 4 in 4.0 s |" in block and "target_inflight_per_instance: 0.7" in block

    created = replace_block("", block)
    assert created.startswith("# Benchmarks\n") and "\n## Controller\n\n" + BEGIN in created

    other = "# Benchmarks\n\n## Proxy\n\nproxy figures\n"
    with_ours = replace_block(other, block)
    assert with_ours.startswith(other.rstrip("\n")) and with_ours.endswith(END + "\n")

    notes = with_ours.replace(END + "\n", END + "\n\nHand-written notes.\n\n## Later\n\nmore\n")
    again = replace_block(notes, block.replace("139.0", "138.0"))
    assert "138.0" in again and "139.0" not in again
    assert again.count(BEGIN) == 1 and "Hand-written notes." in again and "## Proxy\n\nproxy figures" in again
    assert again.endswith("## Later\n\nmore\n")

    heading_only = "# Benchmarks\n\n## Controller\n\nnotes first\n\n## Proxy\n\nx\n"
    placed = replace_block(heading_only, block)
    assert placed.index(BEGIN) < placed.index("notes first") < placed.index("## Proxy")


def test_the_json_keeps_a_config_timeline_of_changes_not_every_sample() -> None:
    s = samples((0, 64, 1, 1), (64, 127, 4, 2)) + [ConfigSample(127.0, None, None)] \
        + samples((127.5, 180, 1, 3))
    timeline = config_timeline(s)
    assert [(e["t_s"], e["instances"], e["generation"]) for e in timeline] == [
        (0, 1, 1), (64, 4, 2), (127.0, None, None), (127.5, 1, 3), (179.5, 1, 3)]
    summary = results_summary(SETTINGS, runs([level(20, 20, 25), level(140, 139, 40), level(20, 20, 26)], s),
                              {"date": "d"})
    controller = summary["runs"]["controller"]
    assert "samples" not in controller and controller["config_samples"] == len(s)
    assert controller["config_samples_unread"] == 1 and controller["config_timeline"] == timeline
    assert controller["phases"][1]["reconfigurations"] == 1  # judged from every sample, before shortening


def test_options() -> None:
    parser = argparse.ArgumentParser()
    configure(parser)
    short = settings_from_args(parser.parse_args(["--short"]))
    assert (short.phase_s, short.transition_s) == (25.0, 8.0)
    full = settings_from_args(parser.parse_args([]))
    assert (full.phase_s, full.transition_s, full.low_rate_per_s, full.high_rate_per_s) == (60.0, 10.0, 20.0, 140.0)
    assert full.modes == ("controller", "static-1", "static-max")
    with pytest.raises(SystemExit, match="--modes"):
        settings_from_args(parser.parse_args(["--modes", "controller,dynamic"]))
    with pytest.raises(SystemExit, match="leaves nothing"):
        settings_from_args(parser.parse_args(["--phase-s", "10", "--transition-s", "10"]))


def test_presets_and_verify_shape_the_controllers_policy() -> None:
    example = Settings(preset="example")
    assert example.policy_yaml() == "models:\n  sleep: {}\n"  # deploy/policy.example.yaml's defaults
    assert Settings(preset="example", max_instances=3, verify="off").policy_yaml() == (
        "defaults:\n  verify: {enabled: false}\n  max_instances: 3\nmodels:\n  sleep: {}\n")
    bench_on = Settings(verify="on").policy_yaml()
    assert "defaults:\n  verify: {enabled: true}\n  min_instances: 1" in bench_on and "interval_s: 0.5" in bench_on
    parser = argparse.ArgumentParser()
    configure(parser)
    s = settings_from_args(parser.parse_args(["--preset", "example", "--verify", "on", "--no-proxy", "--short"]))
    assert (s.preset, s.verify, s.no_proxy, s.phase_s) == ("example", "on", True, 25.0)


def test_the_step_response_reads_the_first_change_after_each_step_and_the_backlog() -> None:
    run = runs([level(20, 20, 25), level(140, 139, 40), level(20, 20, 26)], CONTROLLER_SAMPLES)["controller"]
    decisions = [{"t_s": -1.5, "reason": "profile-mismatch"}, {"t_s": 60.8, "reason": "step"},
                 {"t_s": 125.0, "reason": "inflight-below-target"}]
    run = RunReport(run.mode, 1, run.phases, run.samples, decisions, {}, [3, 250, 12])
    assert step_to_change_s(run, run.phases[1]) == pytest.approx(0.8)
    assert step_to_change_s(run, run.phases[2]) == pytest.approx(5.0)
    lines = step_lines(run)
    assert lines[2].startswith("| low | n/a | 3 | 0 |") and lines[3] == "| high | 0.80 | 250 | 1 |"


def test_the_backlog_counts_outstanding_requests_and_their_peak() -> None:
    backlog = Backlog()

    class Call:
        async def __call__(self) -> None:
            assert backlog.outstanding == 1

        async def close(self) -> None:
            pass

    asyncio.run(backlog.wrap(Call())())
    assert backlog.outstanding == 0 and [n for _, n in backlog.events] == [1, 0]
    backlog.events = [(1.0, 1), (2.0, 5), (3.0, 2), (9.0, 7)]
    assert backlog.peak(0.0, 5.0) == 5 and backlog.peak(5.0, 8.0) == 0


def test_ceiling_targets_take_the_useful_count_from_the_static_runs() -> None:
    def closed(mode: str, served: float, mean: float, final: int, seconds: float = 60.0) -> ClosedRun:
        return ClosedRun(mode=mode, seconds=seconds, transition_s=10.0, window_s=(10.0, seconds), served_per_s=served,
                         p95_ms=50.0, failures=0, mean_instances=mean, instance_seconds=None, final_instances=final)
    statics = {"static-1": closed("static-1", 90, 1, 1), "static-2": closed("static-2", 160, 2, 2),
               "static-3": closed("static-3", 158, 3, 3), "static-4": closed("static-4", 155, 4, 4)}
    good = ceiling_targets({**statics, "controller": closed("controller", 156, 2.6, 2, seconds=180.0)}, 4)
    assert [t.met for t in good] == [True, True, True] and "useful count (2" in good[0].what
    assert good[2].measured == "442 vs 680"
    bad = ceiling_targets({**statics, "controller": closed("controller", 150, 3.9, 4, seconds=180.0)}, 4)
    assert [t.met for t in bad] == [False, False, True]
