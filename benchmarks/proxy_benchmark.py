"""The proxy's cost, measured side by side: writes the "Proxy" section of docs/benchmarks.md.

Run it with `bash scripts/bench-proxy` (about 6 minutes; --short for a quick look).
An embedded Triton serves `sleep` (20 ms per request, 4 instances) and `fast`
(returns at once); `tritonpilot serve` runs in front of it as its own process.
Each level runs `tritonpilot bench --compare` (direct and proxied in alternating
windows, CPU of both server processes read from /proc) and the targets of
issue 2 are checked from its CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import tritonclient.grpc as grpcclient

from tritonpilot.ports import free_port
from tritonpilot.tools.embedded import EmbeddedTriton

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- proxy-benchmark:begin -->", "<!-- proxy-benchmark:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="1 window of 2 s per level: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    windows, interval_ms = (1, 2000) if args.short else (3, 5000)
    work = Path(tempfile.mkdtemp(prefix="tritonpilot-proxy-bench-"))
    with EmbeddedTriton(ROOT / "tests" / "models", load_models=["fast", "sleep"],
                        log_path=work / "triton.log") as triton:
        admin = grpcclient.InferenceServerClient(triton.grpc_url)
        config = admin.get_model_config("sleep", as_json=True)["config"]
        config["instance_group"][0]["count"] = 4
        admin.load_model("sleep", config=json.dumps(config))
        listen, metrics = free_port(), free_port()
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "tritonpilot", "serve", "--triton", triton.grpc_url,
             "--listen", f"127.0.0.1:{listen}", "--http-listen", "off", "--metrics-listen", f"127.0.0.1:{metrics}"],
            stdout=open(work / "sidecar.log", "w"), stderr=subprocess.STDOUT)
        try:
            _wait_ready(f"http://127.0.0.1:{metrics}/readyz")
            runs = [("sleep", "1:8:1"), ("fast", "1:8:1")]
            outputs = []
            for model, levels in runs:
                csv_path = work / f"{model}.csv"
                cmd = ["tritonpilot", "bench", "--url", triton.grpc_url, "--compare", f"127.0.0.1:{listen}",
                       "--model", model, "--concurrency-range", levels, "--windows", str(windows),
                       "--measurement-interval-ms", str(interval_ms), "--warmup-s", "1",
                       "--cpu-pid", f"triton={triton.pid}", "--cpu-pid", f"proxy={sidecar.pid}",
                       "--csv", str(csv_path)]
                print("$", " ".join(cmd), file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, "-m", "tritonpilot", *cmd[1:]], check=True,
                                     capture_output=True, text=True).stdout
                print(out, flush=True)
                outputs.append((model, levels, out, _rows(csv_path)))
        finally:
            sidecar.terminate()
            sidecar.wait(30)
    _write(Path(args.out), outputs, windows, interval_ms, args.short)
    return 0


def _wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"sidecar not ready at {url}")


def _rows(path: Path) -> dict[tuple[str, int], dict[str, str]]:
    with open(path) as f:
        return {(r["endpoint"], int(float(r["level"]))): r for r in csv.DictReader(f)}


def _f(row: dict[str, str], key: str) -> float:
    return float(row[key]) if row.get(key) not in (None, "") else float("nan")


def _targets(outputs) -> list[tuple[str, str, bool]]:
    """(target, measured, met) from the CSVs."""
    sleep = next(r for m, _, _, r in outputs if m == "sleep")
    fast = next(r for m, _, _, r in outputs if m == "fast")
    levels = sorted({lvl for _, lvl in sleep})
    ratios = [_f(sleep["proxied", lvl], "throughput_infer_per_s") / _f(sleep["direct", lvl], "throughput_infer_per_s")
              for lvl in levels]
    added = [(_f(sleep["proxied", lvl], "p50_us") - _f(sleep["direct", lvl], "p50_us")) / 1000 for lvl in levels]
    cpu = [(_f(r["proxied", lvl], "cpu_us_per_request_proxy"), _f(r["proxied", lvl], "cpu_us_per_request_triton"))
           for r in (sleep, fast) for lvl in sorted({lv for _, lv in r})]
    cpu_ratio = sorted(p / t for p, t in cpu if t > 0)
    sat = max(sorted({lvl for _, lvl in fast}), key=lambda lvl: _f(fast["direct", lvl], "throughput_infer_per_s"))
    fast_ratio = _f(fast["proxied", sat], "throughput_infer_per_s") / _f(fast["direct", sat], "throughput_infer_per_s")
    return [
        ("proxy CPU per request <= tritonserver's (proxied runs, every level)",
         f"proxy/triton {cpu_ratio[0]:.2f} .. {cpu_ratio[-1]:.2f} (median {cpu_ratio[len(cpu_ratio) // 2]:.2f})",
         cpu_ratio[-1] <= 1.0),
        ("20 ms model, concurrency 1-8: >= 0.98 of direct throughput",
         "min " + f"{min(ratios):.3f} (" + ", ".join(f"c{lvl}: {r:.3f}" for lvl, r in zip(levels, ratios)) + ")",
         min(ratios) >= 0.98),
        ("20 ms model, concurrency 1-8: added p50 <= 0.5 ms",
         "max " + f"{max(added):+.2f} ms (" + ", ".join(f"c{lvl}: {a:+.2f}" for lvl, a in zip(levels, added)) + ")",
         max(added) <= 0.5),
        ("~1 ms model at saturation: >= 0.8 of direct throughput",
         f"{fast_ratio:.3f} at concurrency {sat} (direct's best level)", fast_ratio >= 0.8),
    ]


def _write(path: Path, outputs, windows: int, interval_ms: int, short: bool) -> None:
    lines = [BEGIN, "## Proxy", "",
             f"Generated by `bash scripts/bench-proxy{' --short' if short else ''}` on {time.strftime('%Y-%m-%d')}, "
             f"a {_cpus()}-core machine with no GPU; client, proxy, Triton and the "
             "Python-backend model processes all share those cores, so every figure is a median of alternating "
             f"windows ({windows} x {interval_ms / 1000:g} s per level and endpoint), and ratios are read side by "
             "side, never across runs.", "",
             "| target (issue 2) | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in _targets(outputs)]
    for model, levels, out, _ in outputs:
        lines += ["", f"### `{model}`, concurrency {levels}", "", "```", out.rstrip(), "```"]
    lines += ["", END]
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + "\n".join(lines) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)


def _cpus() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
