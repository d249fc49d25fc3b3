"""The pure parts of benchmarks/soak.py: the slope fit, the flat/growing verdict (robust to
reconnect bursts, not to leaks), how a call's status is classified, the per-attack verdict and the
counter deltas. No Triton, no sockets."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
_spec = importlib.util.spec_from_file_location("soak_benchmark", _PATH)
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak_benchmark"] = soak  # dataclasses look their module up while the class is made
_spec.loader.exec_module(soak)


def test_fit_slope_recovers_a_line_and_its_error_is_zero() -> None:
    xs = [0.0, 1.0, 2.0, 3.0, 4.0]
    slope, stderr = soak.fit_slope(xs, [3.0 + 2.5 * x for x in xs])
    assert slope == pytest.approx(2.5)
    assert stderr == pytest.approx(0.0, abs=1e-12)


def test_fit_slope_of_noise_around_flat_is_near_zero_with_an_error() -> None:
    xs = [float(i) for i in range(100)]
    ys = [100.0 + (1.0 if i % 2 else -1.0) for i in range(100)]
    slope, stderr = soak.fit_slope(xs, ys)
    assert abs(slope) < 0.01
    assert stderr > 0


def test_fit_slope_without_spread_is_nan() -> None:
    assert all(math.isnan(v) for v in soak.fit_slope([1.0], [2.0]))
    assert all(math.isnan(v) for v in soak.fit_slope([1.0, 1.0, 1.0], [2.0, 3.0, 4.0]))
    with pytest.raises(ValueError):
        soak.fit_slope([1.0, 2.0], [1.0])


def test_the_warm_up_is_cut_by_time_not_by_count() -> None:
    samples = [(float(t), float(t)) for t in range(0, 101)]
    kept = soak.after_warmup(samples, 0.2)
    assert kept[0][0] == 20.0 and kept[-1][0] == 100.0
    assert soak.after_warmup([], 0.2) == []


def rss_samples(kib_per_min: float, base_kib: float = 100_000.0, minutes: int = 15) -> list[tuple[float, float]]:
    return [(float(s), base_kib + kib_per_min * s / 60.0 + (50.0 if s % 7 == 0 else 0.0))
            for s in range(0, minutes * 60)]


def test_rss_flat_below_one_percent_per_ten_minutes_growing_above() -> None:
    # 100 MB RSS: the threshold is 1,000 KiB per 10 min = 100 KiB/min.
    flat = soak.slope_verdict(rss_samples(20.0), "rss")
    assert flat.flat and flat.per_min == pytest.approx(20.0, abs=2.0)
    assert flat.threshold_per_min == pytest.approx(flat.median * 0.01 / 10)
    assert flat.minutes == pytest.approx(12.0, abs=0.1)  # 15 min less the 20% warm-up
    growing = soak.slope_verdict(rss_samples(300.0), "rss")
    assert not growing.flat and growing.per_min == pytest.approx(300.0, abs=2.0)
    assert soak.slope_verdict(rss_samples(-500.0), "rss").flat  # shrinking is not a leak


def test_fd_verdict_and_too_few_samples() -> None:
    steady = [(float(s), 40.0 + (s % 3)) for s in range(600)]
    assert soak.slope_verdict(steady, "fd").flat
    leaking = [(float(s), 40.0 + s / 60.0) for s in range(600)]  # one descriptor per minute
    assert not soak.slope_verdict(leaking, "fd").flat
    assert not soak.slope_verdict([(0.0, 1.0), (1.0, 1.0)], "fd").flat
    with pytest.raises(ValueError):
        soak.slope_verdict(steady, "bogus")


def test_binned_medians_leave_out_the_ragged_last_slice() -> None:
    samples = [(float(s), float(s // 60)) for s in range(150)]  # 2.5 minutes: 0, 1, then half a slice of 2
    points = soak.binned_medians(samples, 60.0)
    assert [v for _, v in points] == [0.0, 1.0]
    assert points[0][0] == pytest.approx(29.5)
    assert soak.binned_medians([], 60.0) == []
    assert len(soak.binned_medians(samples[:-1], 60.0)) == 2  # 29 s of the third slice: less than half


# The 15-minute soak of 2026-11-30: 25 descriptors throughout, and every time Triton was down a
# reconnect burst of up to 55 for ~12 s, more of them late in the run (Triton crashed at will).
BURSTS_S = (62, 153, 255, 360, 405, 476, 575, 612, 700, 755, 790, 817, 855)


def fd_samples(leak_per_min: float = 0.0, minutes: int = 15, base: int = 25,
               dips: bool = False) -> list[tuple[float, float]]:
    out = []
    for s in range(minutes * 60):
        fds = base + math.floor(leak_per_min * s / 60.0)
        burst = next((b for b in BURSTS_S if b <= s < b + 12), None)
        if burst is not None:  # the burst itself, or (dips) a gap while Triton's connections are gone
            fds += -4 if dips else 30 - abs(s - burst - 6) * 4
        out.append((float(s), float(fds)))
    return out


def test_reconnect_bursts_alone_are_flat_though_every_sample_s_slope_says_growing() -> None:
    fd = soak.slope_verdict(fd_samples(), "fd")
    assert fd.raw_per_min > fd.threshold_per_min  # what the old rule judged: "growing"
    assert fd.flat and fd.per_min == pytest.approx(0.0)
    assert (fd.first, fd.last, fd.slices, fd.slice_s) == (25.0, 25.0, 12, 60.0)
    assert soak.slope_verdict(fd_samples(dips=True), "fd").flat  # fewer descriptors while Triton is down


@pytest.mark.parametrize("leak_per_min", [1.0, 0.25])
def test_a_steady_descriptor_leak_is_growing_with_or_without_bursts(leak_per_min: float) -> None:
    for dips in (False, True):
        fd = soak.slope_verdict(fd_samples(leak_per_min, dips=dips), "fd")
        assert not fd.flat, (leak_per_min, dips)
        assert fd.per_min == pytest.approx(leak_per_min, rel=0.3)


def rss_staircase(step_kib: float, every_s: int, until_s: int = 15 * 60, minutes: int = 15
                  ) -> list[tuple[float, float]]:
    """RSS that jumps by step_kib every every_s seconds until until_s, then stays."""
    return [(float(s), 100_000.0 + step_kib * (min(s, until_s) // every_s)) for s in range(minutes * 60)]


def test_an_rss_staircase_that_keeps_climbing_is_growing() -> None:
    # +600 KiB every 3 minutes = 200 KiB/min on 100 MB (threshold 100 KiB/min).
    rss = soak.slope_verdict(rss_staircase(600.0, 180), "rss")
    assert not rss.flat and rss.per_min == pytest.approx(200.0, rel=0.25)


def test_an_rss_staircase_that_stops_in_the_warm_up_is_flat() -> None:
    rss = soak.slope_verdict(rss_staircase(600.0, 30, until_s=150), "rss")  # 3 MB in the first 2.5 minutes
    assert rss.flat and rss.per_min == pytest.approx(0.0)


@pytest.mark.parametrize(("code", "elapsed", "want"), [
    ("OK", 0.02, "ok"),
    ("UNAVAILABLE", 0.001, "UNAVAILABLE"),
    ("DEADLINE_EXCEEDED", 5.01, "DEADLINE_EXCEEDED"),
    ("DEADLINE_EXCEEDED", 6.5, "late:DEADLINE_EXCEEDED"),
    ("OK", 6.5, "late:OK"),
    ("RESOURCE_EXHAUSTED", 0.0, "RESOURCE_EXHAUSTED"),
    ("CANCELLED", 0.0, "CANCELLED"),
    ("INTERNAL", 0.1, "unclean:INTERNAL"),
    ("UNKNOWN", 0.1, "unclean:UNKNOWN"),
])
def test_classify(code: str, elapsed: float, want: str) -> None:
    assert soak.classify(code, elapsed, deadline_s=5.0, slack_s=1.0) == want


def test_soak_verdict() -> None:
    flat = soak.slope_verdict(rss_samples(0.0), "rss")
    fd = soak.slope_verdict([(float(s), 40.0) for s in range(600)], "fd")
    clean = Counter({"ok": 100, "UNAVAILABLE": 5, "DEADLINE_EXCEEDED": 2, "cancelled_by_client": 3})
    assert all(soak.soak_verdict(clean, flat, fd).values())
    for bad, target in (("hung", "0 hung"), ("unclean:INTERNAL", "every call ok or a clean retryable status in time"),
                        ("late:OK", "every call ok or a clean retryable status in time"),
                        ("wrong", "every call ok or a clean retryable status in time")):
        verdict = soak.soak_verdict(clean + Counter({bad: 1}), flat, fd)
        assert not verdict[target], bad
        assert sum(not ok for ok in verdict.values()) == 1, bad


def test_percentile_and_attack_verdict() -> None:
    assert soak.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert soak.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert soak.percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert math.isnan(soak.percentile([], 50))
    assert all(soak.attack_verdict(0.021, 0.040, 0, 0).values())
    assert soak.attack_verdict(0.021, 0.043, 0, 0) == {
        "p50 within 2x": False, "normal client never failed": True, "Triton READY throughout": True}
    assert not soak.attack_verdict(0.021, 0.021, 1, 0)["normal client never failed"]
    assert not soak.attack_verdict(0.021, 0.021, 0, 2)["Triton READY throughout"]


def test_counter_deltas() -> None:
    name = "tritonpilot_http2_refused_total"
    before = {(name, (("reason", "ping_flood"),)): 2.0, ("other_total", ()): 5.0}
    after = {(name, (("reason", "ping_flood"),)): 7.0, (name, (("reason", "rapid_reset"),)): 1.0,
             (name, (("reason", "settings_flood"),)): 0.0, ("other_total", ()): 9.0}
    assert soak.counter_deltas(before, after, name) == {"ping_flood": 5.0, "rapid_reset": 1.0}


def test_policy_text_is_a_valid_policy_for_each_entry(tmp_path: Path) -> None:
    from tritonpilot.control.policy import load_policy

    for entry in soak.SLEEP_POLICIES.values():
        path = tmp_path / "policy.yaml"
        soak.write_policy(path, entry)
        policy = load_policy(path)
        assert "sleep" in policy.models
