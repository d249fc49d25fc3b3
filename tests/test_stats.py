"""proxy.stats: the hot-path counters and their snapshots (pure, no I/O)."""

from tritonpilot.proxy import stats as stats_mod
from tritonpilot.proxy.stats import UNKNOWN_MODEL, ProxyStats


def test_inflight_integral_peak_and_codes() -> None:
    s = ProxyStats()
    m = s.model("resnet", 0.0)
    m.begin(0.0)
    m.begin(1.0)          # 2 in flight from t=1
    m.end(3.0, 0, 3.0)    # 1 in flight from t=3
    snap = s.snapshot(4.0, reset_peaks=True).models["resnet"]
    # 1 x (1-0) + 2 x (3-1) + 1 x (4-3) request-seconds
    assert (snap.inflight, snap.inflight_peak, snap.inflight_seconds) == (1, 2, 6.0)
    assert snap.finished_total == {"OK": 1} and snap.latency_count == 1
    assert s.snapshot(4.0).models["resnet"].inflight_peak == 1  # reset to the current count
    m.end(5.0, 14, None)
    assert s.snapshot(5.0).models["resnet"].finished_total == {"OK": 1, "UNAVAILABLE": 1}


def test_distinct_model_names_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(stats_mod, "MAX_MODELS", 3)
    s = ProxyStats()
    for name in ("a", "b", "c", "typo-1", "typo-2"):
        s.model(name, 0.0).begin(0.0)
    models = s.snapshot(1.0).models
    assert sorted(models) == ["", "a", "b", "c"]
    assert models[UNKNOWN_MODEL].started_total == 2
