"""benchmarks/peers.py's pure parts: proxy configs, perf_analyzer CSV, summary and targets (no processes)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "peers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_peers", None)


def test_nginx_conf_one_worker_keepalive_no_log(peers):
    conf = peers.nginx_conf("/tmp/x", 1001, 1002, 2001, 2002, as_root=True)
    assert "worker_processes 1;" in conf
    assert "access_log off;" in conf
    assert "listen 127.0.0.1:1001 http2;" in conf
    assert "grpc_pass grpc://triton_grpc;" in conf
    assert "server 127.0.0.1:2001; keepalive 32;" in conf
    assert "server 127.0.0.1:2002; keepalive 32;" in conf
    assert 'proxy_set_header Connection "";' in conf and "proxy_http_version 1.1;" in conf
    assert conf.startswith("user root;")
    assert "user " not in peers.nginx_conf("/tmp/x", 1, 2, 3, 4, as_root=False)
    assert conf.count("{") == conf.count("}")


def test_haproxy_cfg_one_thread_h2(peers):
    cfg = peers.haproxy_cfg(1001, 1002, 2001, 2002)
    assert "nbthread 1" in cfg
    assert "bind 127.0.0.1:1001 proto h2" in cfg
    assert "server triton 127.0.0.1:2001 proto h2" in cfg
    assert "server triton 127.0.0.1:2002\n" in cfg
    assert "http-reuse always" in cfg
    assert "log" not in cfg.replace("http-keep-alive", "")


def test_parse_pa_csv(peers):
    text = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
            "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,"
            "p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait\n"
            "4,2885.7,10,500,20,5,300,5,3,1219,1400,1500,1800,1300,0,0\n")
    assert peers.parse_pa_csv(text) == {"infer_per_s": 2885.7, "p50_us": 1219.0}
    with pytest.raises(ValueError):
        peers.parse_pa_csv("Concurrency,Inferences/Second\n")


def test_rotated(peers):
    assert peers.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert peers.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def _sample(r, model, protocol, peer, ips, p50, cpu):
    return {"round": r, "model": model, "concurrency": 4 if model == "fast" else 1, "protocol": protocol,
            "peer": peer, "requests": 100, "infer_per_s": ips, "p50_us": p50, "cpu_us_per_req": cpu,
            "kernel_us_per_req": cpu / 4, "triton_cpu_us_per_req": 300.0}


def test_summary_and_targets(peers):
    samples = []
    for r in range(3):
        for protocol in ("grpc", "http"):
            samples += [_sample(r, "fast", protocol, "direct", 1000.0, 1000, float("nan")),
                        _sample(r, "fast", protocol, "tritonpilot-w1", 950.0 - r * 100, 1100, 100.0),
                        _sample(r, "fast", protocol, "nginx", 900.0, 1200, 120.0),
                        _sample(r, "sleep", protocol, "direct", 50.0, 21000, float("nan")),
                        _sample(r, "sleep", protocol, "tritonpilot-w1", 49.5, 21200, 400.0),
                        _sample(r, "sleep", protocol, "nginx", 49.0, 21300, 300.0)]
    rows = peers.summarize(samples)
    assert [(r["model"], r["protocol"], r["peer"]) for r in rows][:3] == [
        ("fast", "grpc", "direct"), ("fast", "grpc", "nginx"), ("fast", "grpc", "tritonpilot-w1")]
    tp = next(r for r in rows if (r["model"], r["protocol"], r["peer"]) == ("fast", "grpc", "tritonpilot-w1"))
    assert tp["ratio"] == pytest.approx(0.85) and tp["ratio_min"] == pytest.approx(0.75)
    assert tp["added_p50_us"] == 100
    assert math.isnan(rows[0]["cpu_us_per_req"])
    met = {t: ok for t, _, ok in peers.targets(rows)}
    assert met["tritonpilot-w1 grpc: CPU us/req <= nginx's"] is False  # 400 > 300 on sleep
    assert met["tritonpilot-w1 grpc: fast c4 (saturation) >= 0.9 of direct"] is False
    assert met["tritonpilot-w1 http: sleep (20 ms) c1 >= 0.98 of direct, added p50 <= 0.3 ms"] is True
    assert tp["kernel_us_per_req"] == 25.0  # the kernel's share of the CPU, a column of its own
    lines = peers.table(rows)
    assert lines[0].startswith("| model |") and len(lines) == 2 + len(rows)
    assert "| 100 | 25 |" in next(line for line in lines if "fast c4 | grpc | tritonpilot-w1" in line)


def test_targets_without_nginx(peers):
    samples = [_sample(0, m, p, peer, 10.0, 10, 1.0) for m in ("fast", "sleep") for p in ("grpc", "http")
               for peer in ("direct", "tritonpilot-w1")]
    met = {t: ok for t, _, ok in peers.targets(peers.summarize(samples))}
    assert met["tritonpilot-w1 grpc: CPU us/req <= nginx's"] is None


def test_write_doc_keeps_text_outside_markers(peers, tmp_path):
    samples = [_sample(0, m, p, peer, 10.0, 10, 1.0) for m in ("fast", "sleep") for p in ("grpc", "http")
               for peer in ("direct", "tritonpilot-w1")]
    rows = peers.summarize(samples)
    out = tmp_path / "doc.md"
    out.write_text(f"# Title\n\nintro\n\n{peers.BEGIN}\nold\n{peers.END}\n\n## Notes\nkept\n")
    peers.write_doc(out, "bash scripts/bench-peers", rows, ["a note"], ("1.0", "2.0"), 3, 2000)
    text = out.read_text()
    assert "intro" in text and "## Notes\nkept" in text and "old" not in text
    assert "- a note" in text and "`bash scripts/bench-peers`" in text
