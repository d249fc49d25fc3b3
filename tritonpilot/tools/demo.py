"""`tritonpilot demo`: an embedded Triton, the sidecar in front of it, and a load ramp.

1. The proxy's cost: the same closed-loop load direct and through the sidecar in
   alternating windows (perf_analyzer's table, then the ratios), on a model that
   returns at once, the case where a proxy shows most.
2. The controller: a model that sleeps 20 ms per request (a GPU kernel's
   stand-in) under 1, then 8, then 1 concurrent clients, through the sidecar. A
   timeline shows load, in flight, instances and profile (read from Triton's own
   config, not from tritonpilot) and throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import tritonclient.grpc.aio as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from tritonpilot import resources
from tritonpilot.ports import free_port
from tritonpilot.tools.bench import Endpoint, EndpointResults, print_report
from tritonpilot.tools.benchlib import ConcurrencyLoad, make_callers, measure_alternating, prepare_inputs
from tritonpilot.tools.embedded import EmbeddedTriton

CONTROLLED, UNCONTROLLED = "sleep", "fast"

POLICY = """\
triton: {{grpc: "{triton}"}}
proxy: {{listen: "127.0.0.1:{listen}"}}
metrics: {{listen: "127.0.0.1:{metrics}"}}
control: {{interval_s: 0.5}}
defaults:
  min_instances: 1
  max_instances: 4
  target_inflight_per_instance: 1
  scale_up_delay_s: 3
  scale_down_delay_s: {down}
  cooldown_s: 3
models:
  {model}: {{}}
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", action="store_true", help="shorter phases (about a minute in all)")
    parser.add_argument("--skip-proxy-bench", action="store_true", help="only the controller part")
    parser.add_argument("--workdir", help="keep the policy, logs and model repository here")


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tritonpilot-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# tritonpilot demo (logs in {workdir})\n", flush=True)
    # The demo's Python-backend models ship in the wheel (the tests use them too).
    with resources.deploy_path(resources.DEMO_MODELS) as models, \
            EmbeddedTriton(models, load_models=[CONTROLLED, UNCONTROLLED], log_path=workdir / "triton.log") as triton:
        listen, http_listen, metrics = free_port(), free_port(), free_port()
        policy = workdir / "policy.yaml"
        policy.write_text(POLICY.format(triton=triton.grpc_url, listen=listen, metrics=metrics,
                                        model=CONTROLLED, down=8 if args.short else 15))
        with open(workdir / "sidecar.log", "w") as sidecar_log:
            sidecar = subprocess.Popen([sys.executable, "-m", "tritonpilot", "serve", "--policy", str(policy),
                                        "--http-listen", f"127.0.0.1:{http_listen}",
                                        "--triton-http", f"127.0.0.1:{triton.http_port}"],
                                       stdout=sidecar_log, stderr=subprocess.STDOUT)
            try:
                proxy_url = f"127.0.0.1:{listen}"
                metrics_url = f"http://127.0.0.1:{metrics}"
                _wait_http(f"{metrics_url}/readyz", 30)
                print(f"Triton (embedded, CPU only) at {triton.grpc_url}; tritonpilot at {proxy_url} (gRPC) and "
                      f"http://127.0.0.1:{http_listen} (HTTP/REST), metrics and /status at {metrics_url}\n",
                      flush=True)
                if not args.skip_proxy_bench:
                    asyncio.run(_proxy_bench(triton, proxy_url, sidecar.pid, args.short))
                asyncio.run(_ramp(triton.grpc_url, proxy_url, metrics_url, args.short))
            finally:
                sidecar.terminate()
                sidecar.wait(30)
    print(f"\nDone. The sidecar's decisions: grep controller {workdir / 'sidecar.log'}")
    return 0


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"tritonpilot demo: the sidecar did not become ready at {url}")
        time.sleep(0.2)


async def _proxy_bench(triton: EmbeddedTriton, proxy_url: str, sidecar_pid: int, short: bool) -> None:
    print(f"## 1. The proxy's cost: model '{UNCONTROLLED}' (returns at once), direct vs proxied, "
          "alternating windows\n", flush=True)
    inputs = await prepare_inputs(triton.grpc_url, UNCONTROLLED)
    triton_pid = triton.pid
    assert triton_pid is not None, "called inside the EmbeddedTriton context: tritonserver is running"
    cpu = {"triton": triton_pid, "proxy": sidecar_pid}
    urls = [triton.grpc_url, proxy_url]
    levels: list[list] = [[], []]
    for concurrency in (1, 4):
        results = await measure_alternating(urls, UNCONTROLLED, ConcurrencyLoad(concurrency), inputs,
                                            window_s=2.0 if short else 4.0, windows=2 if short else 3,
                                            warmup_s=0.5, cpu_pids=cpu)
        for k, r in enumerate(results):
            levels[k].append(r)
    report = [EndpointResults(Endpoint("direct", urls[0]), levels[0]),
              EndpointResults(Endpoint("proxied", urls[1]), levels[1])]
    print_report(report, list(cpu), sys.stdout)
    sys.stdout.flush()


async def _ramp(triton_url: str, proxy_url: str, metrics_url: str, short: bool) -> None:
    phases = [(1, 12), (8, 25), (1, 30)] if short else [(1, 20), (8, 40), (1, 45)]
    print(f"## 2. The controller: model '{CONTROLLED}' (20 ms per request), clients "
          + " -> ".join(f"{c} for {s} s" for c, s in phases) + "\n", flush=True)
    inputs = await prepare_inputs(proxy_url, CONTROLLED)
    callers = make_callers(proxy_url, CONTROLLED, inputs, max(c for c, _ in phases), "raw", 30.0)
    wanted = {"clients": 0}
    latencies: list[float] = []
    failures: list[str] = []

    async def worker(k: int) -> None:
        while True:
            if k >= wanted["clients"]:
                await asyncio.sleep(0.02)
                continue
            t0 = time.perf_counter()
            code = await callers[k]()
            if code is None:
                latencies.append(time.perf_counter() - t0)
            else:
                failures.append(code)

    admin = grpcclient.InferenceServerClient(triton_url)
    workers = [asyncio.create_task(worker(k)) for k in range(len(callers))]
    print(f"{'t_s':>5}  {'clients':>7}  {'in_flight':>9}  {'instances':>9}  {'flags':<52}  "
          f"{'infer/s':>7}  {'p95_ms':>6}  failed", flush=True)
    start = time.monotonic()
    try:
        for clients, seconds in phases:
            wanted["clients"] = clients
            phase_end = time.monotonic() + seconds
            while time.monotonic() < phase_end:
                latencies.clear()
                t0 = time.monotonic()
                await asyncio.sleep(2.5)
                window = time.monotonic() - t0
                instances, flags = await _live(admin)
                inflight = await asyncio.to_thread(_inflight, metrics_url)
                done = sorted(latencies)
                p95 = done[int(0.95 * (len(done) - 1))] * 1000 if done else float("nan")
                print(f"{time.monotonic() - start:5.1f}  {clients:7d}  {inflight:9.0f}  {instances:9d}  "
                      f"{flags:<52}  {len(done) / window:7.1f}  {p95:6.1f}  {len(failures)}", flush=True)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for c in callers:
            await c.close()
        await admin.close()
    print(f"\n{len(failures)} failed requests" + (f": {sorted(set(failures))}" if failures else ""))


async def _live(admin: grpcclient.InferenceServerClient) -> tuple[int, str]:
    """Instances and PyTorch flags as Triton's own ModelConfig says."""
    config = (await admin.get_model_config(CONTROLLED, as_json=True))["config"]
    params = {k: v.get("string_value") for k, v in (config.get("parameters") or {}).items()}
    flags = ",".join(f"{k}={v}" for k, v in sorted(params.items())
                     if k in ("INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION"))
    return int(config["instance_group"][0]["count"]), flags or "-"


def _inflight(metrics_url: str) -> float:
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=2) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "tritonpilot_inflight_requests":
            for sample in family.samples:
                if sample.labels.get("model") == CONTROLLED:
                    return sample.value
    return 0.0


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace(short=True, skip_proxy_bench=False, workdir=os.environ.get("WORKDIR"))))
