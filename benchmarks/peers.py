"""tritonpilot side by side with the general proxies a user would put in front of Triton instead (issue 9).

Run it with `bash scripts/bench-peers` (about 10 minutes; --short: one round of 1 s windows).
One embedded Triton serves `fast` (returns at once, "~1 ms") and `sleep` (20 ms) from
deploy/demo_models. In front of it, all at once on free ports: tritonpilot (`serve`, 1 and
`--workers 2` relay processes), nginx (grpc_pass / proxy_pass, one worker) and HAProxy (h2 /
HTTP/1.1, one thread), each with keep-alive to Triton and logging off, and `uvloop-pipe`
(benchmarks/pipe_relay.py: tritonpilot's event loop and callbacks piping bytes, reading
nothing: what any relay built that way costs before it parses). The client is NVIDIA's
perf_analyzer (tritonclient 2.40.0), the same for every peer: gRPC and HTTP, `fast` at
concurrency 4 (saturation on 2 cores) and `sleep` at concurrency 1. Peers alternate within
each round, the order rotated every round, and the table gives medians over rounds of
per-round figures (ratios and added p50 are against direct in the same round).

CPU per request of a proxy: utime+stime (from /proc; the kernel's part, stime, also alone) of
its processes and their children over the whole perf_analyzer run, divided by the requests
Triton counted for the model over that run (its statistics API, read directly);
perf_analyzer's warm-up is thus included on both sides.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PA_VERSION = "2.40.0"
CACHE = ROOT / ".cache" / "perf_analyzer"
BEGIN, END = "<!-- peers-benchmark:begin -->", "<!-- peers-benchmark:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (model, concurrency): fast at saturation, sleep at concurrency 1.
CASES = [("fast", 4), ("sleep", 1)]
PROTOCOLS = ["grpc", "http"]


# ---------------------------------------------------------------- configs (pure)

def nginx_conf(tmp: str, grpc_listen: int, http_listen: int, triton_grpc: int, triton_http: int,
               as_root: bool) -> str:
    """nginx: one worker, gRPC with grpc_pass over HTTP/2, REST with proxy_pass over HTTP/1.1,
    keep-alive to Triton on both, no access log."""
    user = "user root;\n" if as_root else ""
    return f"""{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 0;
    keepalive_requests 1000000;
    upstream triton_grpc {{ server 127.0.0.1:{triton_grpc}; keepalive 32; keepalive_requests 1000000; }}
    upstream triton_http {{ server 127.0.0.1:{triton_http}; keepalive 32; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{grpc_listen} http2;
        http2_max_requests 1000000;
        location / {{ grpc_pass grpc://triton_grpc; }}
    }}
    server {{
        listen 127.0.0.1:{http_listen};
        location / {{
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def haproxy_cfg(grpc_listen: int, http_listen: int, triton_grpc: int, triton_http: int) -> str:
    """HAProxy: one thread, gRPC as h2 both ways, REST as HTTP/1.1, connections to Triton reused,
    no log."""
    return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    option http-keep-alive
    http-reuse always

frontend grpc_in
    bind 127.0.0.1:{grpc_listen} proto h2
    default_backend triton_grpc

backend triton_grpc
    server triton 127.0.0.1:{triton_grpc} proto h2

frontend http_in
    bind 127.0.0.1:{http_listen}
    default_backend triton_http

backend triton_http
    server triton 127.0.0.1:{triton_http}
"""


def parse_pa_csv(text: str) -> dict[str, float]:
    """perf_analyzer's -f CSV (one concurrency level): infer/s and p50 in us."""
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise ValueError("perf_analyzer CSV has no rows")
    row = rows[0]
    return {"infer_per_s": float(row["Inferences/Second"]), "p50_us": float(row["p50 latency"])}


def rotated(items: list[str], k: int) -> list[str]:
    k %= len(items) or 1
    return items[k:] + items[:k]


# ---------------------------------------------------------------- processes and CPU

def descendants(pid: int) -> list[int]:
    """pid and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_user_sys(pids: list[int]) -> tuple[float, float]:
    """(user, kernel) CPU seconds of the processes, reaped children's included."""
    user = kernel = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        user += int(fields[11]) + int(fields[13])  # utime cutime
        kernel += int(fields[12]) + int(fields[14])  # stime cstime
    return user / CLK_TCK, kernel / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime (+ reaped children's) of the processes, in seconds."""
    return sum(cpu_user_sys(pids))


@dataclass
class Peer:
    name: str
    grpc: str
    http: str
    root_pid: int | None  # None: direct (no proxy)
    note: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """(user, kernel) CPU seconds of the proxy's processes."""
        return cpu_user_sys(descendants(self.root_pid)) if self.root_pid else (0.0, 0.0)


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 30) -> None:
    import socket
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s:g} s")


@contextmanager
def _process(cmd: list[str], log: Path, ports: list[int], what: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        for port in ports:
            _wait_port(port, proc, what)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _apt_install(binary: str, package: str) -> str | None:
    """The binary's path, apt-installing the package if it is missing; None if that fails."""
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if found:
        return found
    cmd = ["apt-get", "install", "-y", package]
    if os.geteuid() != 0:
        return None
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)


def serve_has_workers() -> bool:
    out = subprocess.run([sys.executable, "-m", "tritonpilot", "serve", "--help"], capture_output=True,
                         text=True, check=False).stdout
    return "--workers" in out


# ---------------------------------------------------------------- perf_analyzer

def _site_packages() -> list[Path]:
    import site
    import sysconfig
    return [Path(p) for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()}]


def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """NVIDIA's perf_analyzer binary from the tritonclient 2.40.0 wheel and the environment it runs in."""
    libdir = CACHE / "lib"
    binary = CACHE / "bin" / "perf_analyzer"
    if not binary.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "bin").mkdir(exist_ok=True)
        member = f"tritonclient-{PA_VERSION}.data/data/bin/perf_analyzer"
        installed = None
        try:
            if importlib.metadata.version("tritonclient") == PA_VERSION:
                installed = next((Path(p) / "bin" / "perf_analyzer" for p in (sys.prefix,)
                                  if (Path(p) / "bin" / "perf_analyzer").exists()), None)
        except importlib.metadata.PackageNotFoundError:
            pass
        if installed:
            shutil.copy(installed, binary)
        else:
            _pip_download(f"tritonclient=={PA_VERSION}")
            wheel = next(CACHE.glob(f"tritonclient-{PA_VERSION}-*.whl"))
            with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(binary, "wb") as dst:
                shutil.copyfileobj(src, dst)
        binary.chmod(0o755)
    if not (libdir / "libcudart.so.12").exists():
        libdir.mkdir(parents=True, exist_ok=True)
        if not list(CACHE.glob("nvidia_cuda_runtime_cu12-*.whl")):
            _pip_download("nvidia-cuda-runtime-cu12")
        wheel = next(CACHE.glob("nvidia_cuda_runtime_cu12-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith("/libcudart.so.12"))
            with z.open(name) as src, open(libdir / "libcudart.so.12", "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not (libdir / "libb64.so.0d").exists():
        b64 = next((p for sp in _site_packages() for p in (sp / "nvidia_pytriton.libs").glob("libb64-*.so.0d")),
                   None)
        if b64 is None:
            raise SystemExit("libb64.so.0d not found: pip install nvidia-pytriton (tritonpilot[embedded])")
        shutil.copy(b64, libdir / "libb64.so.0d")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libdir), env.get("LD_LIBRARY_PATH")]))
    return binary, env


def _pip_download(spec: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(CACHE), spec]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def model_count(http_url: str, model: str) -> int:
    with urllib.request.urlopen(f"{http_url}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.load(r)
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def run_pa(pa: Path, env: dict[str, str], work: Path, tag: str, model: str, protocol: str, url: str,
           concurrency: int, interval_ms: int) -> dict[str, float]:
    out = work / f"{tag}.csv"
    cmd = [str(pa), "-m", model, "-u", url, "-i", protocol, "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-interval", str(interval_ms), "-s", "1000", "-r", "3", "--shape", "INPUT0:16",
           "-f", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    (work / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    return parse_pa_csv(out.read_text())


# ---------------------------------------------------------------- the run

def start_peers(stack: ExitStack, work: Path, triton, workers: list[int], only: set[str] | None) -> tuple[
        list[Peer], list[str]]:
    from tritonpilot.ports import free_ports
    tg, th = triton.grpc_port, triton.http_port
    peers = [Peer("direct", f"127.0.0.1:{tg}", f"127.0.0.1:{th}", None)]
    notes: list[str] = []

    def start(name: str, cmd: list[str], ports: list[int]) -> subprocess.Popen:
        """Run a peer listening on ports[0] (gRPC) and ports[1] (HTTP), and list it."""
        proc = stack.enter_context(_process(cmd, work / f"{name}.log", ports, name))
        peers.append(Peer(name, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", proc.pid))
        return proc

    def wanted(name: str) -> bool:
        return not only or name in only

    has_workers = serve_has_workers()
    for n in workers:
        name = f"tritonpilot-w{n}"
        if not wanted(name) and not wanted("tritonpilot"):
            continue
        if n > 1 and not has_workers:
            notes.append(f"{name}: skipped, `tritonpilot serve --help` has no --workers")
            continue
        g, h, m = free_ports(3)
        cmd = [sys.executable, "-m", "tritonpilot", "serve", "--triton", f"127.0.0.1:{tg}",
               "--triton-http", f"127.0.0.1:{th}", "--listen", f"127.0.0.1:{g}", "--http-listen", f"127.0.0.1:{h}",
               "--metrics-listen", f"127.0.0.1:{m}", "--log-level", "WARNING"]
        if has_workers:
            cmd += ["--workers", str(n)]
        _ready(f"http://127.0.0.1:{m}/readyz", start(name, cmd, [g, h, m]))
    if wanted("uvloop-pipe"):  # the floor: the same event loop, reading nothing
        g, h = free_ports(2)
        start("uvloop-pipe", [sys.executable, str(ROOT / "benchmarks" / "pipe_relay.py"), f"{g}:{tg}", f"{h}:{th}"],
              [g, h])
    for name, package in (("nginx", "nginx-light"), ("haproxy", "haproxy")):
        if not wanted(name):
            continue
        binary = _apt_install(name, package)
        if binary is None:
            notes.append(f"{name}: skipped, not installed and `apt-get install -y {package}` failed")
            continue
        g, h = free_ports(2)
        if name == "nginx":
            d = work / "nginx"
            d.mkdir()
            (d / "nginx.conf").write_text(nginx_conf(str(d), g, h, tg, th, os.geteuid() == 0))
            start(name, [binary, "-p", str(d), "-e", str(d / "nginx-error.log"), "-c", str(d / "nginx.conf")], [g, h])
        else:
            cfg = work / "haproxy.cfg"
            cfg.write_text(haproxy_cfg(g, h, tg, th))
            start(name, [binary, "-db", "-f", str(cfg)], [g, h])
    return peers, notes


def _ready(url: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonpilot serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"not ready: {url}")


def measure(peers: list[Peer], triton, pa: Path, env: dict[str, str], work: Path, rounds: int, interval_ms: int,
            log: Callable[[str], None]) -> list[dict]:
    from tritonpilot.tools.embedded import group_members
    samples = []
    for r in range(rounds):
        for model, conc in CASES:
            for protocol in PROTOCOLS:
                for name in rotated([p.name for p in peers], r):
                    peer = next(p for p in peers if p.name == name)
                    url = peer.grpc if protocol == "grpc" else peer.http
                    n0 = model_count(triton.http_url, model)
                    (u0, k0), t0 = peer.cpu_split(), cpu_seconds(group_members(triton.pid))
                    res = run_pa(pa, env, work, f"r{r}-{model}-{protocol}-{name}", model, protocol, url, conc,
                                 interval_ms)
                    (u1, k1), t1 = peer.cpu_split(), cpu_seconds(group_members(triton.pid))
                    n = model_count(triton.http_url, model) - n0
                    s = {"round": r, "model": model, "concurrency": conc, "protocol": protocol, "peer": name,
                         "requests": n, **res,
                         "cpu_us_per_req": (u1 + k1 - u0 - k0) / n * 1e6 if n and peer.root_pid else float("nan"),
                         "kernel_us_per_req": (k1 - k0) / n * 1e6 if n and peer.root_pid else float("nan"),
                         "triton_cpu_us_per_req": (t1 - t0) / n * 1e6 if n else float("nan")}
                    samples.append(s)
                    log(f"round {r + 1}/{rounds} {model} c{conc} {protocol:4} {name:15} {res['infer_per_s']:8.1f}/s "
                        f"p50 {res['p50_us']:7.0f} us  proxy cpu {s['cpu_us_per_req']:6.0f} us/req")
    return samples


def idle_cpu(peers: list[Peer], seconds: float) -> dict[str, float]:
    """Each proxy's CPU with no load at all (ms per s): its background work, e.g. tritonpilot's controller."""
    c0 = {p.name: p.cpu() for p in peers if p.root_pid}
    time.sleep(seconds)
    return {p.name: (p.cpu() - c0[p.name]) / seconds * 1000 for p in peers if p.root_pid}


def summarize(samples: list[dict]) -> list[dict]:
    """Per (model, protocol, peer): medians over rounds; ratio and added p50 against direct in the same round."""
    direct = {(s["round"], s["model"], s["protocol"]): s for s in samples if s["peer"] == "direct"}
    keys: list[tuple[str, int, str, str]] = []
    for s in samples:
        k = (s["model"], s["concurrency"], s["protocol"], s["peer"])
        if k not in keys:
            keys.append(k)
    order = {"direct": 0}
    keys.sort(key=lambda k: ([m for m, _ in CASES].index(k[0]), PROTOCOLS.index(k[2]), order.get(k[3], 1), k[3]))
    rows = []
    for model, conc, protocol, peer in keys:
        mine = [s for s in samples if (s["model"], s["protocol"], s["peer"]) == (model, protocol, peer)]
        ratio = [s["infer_per_s"] / direct[s["round"], model, protocol]["infer_per_s"] for s in mine]
        added = [s["p50_us"] - direct[s["round"], model, protocol]["p50_us"] for s in mine]
        rows.append({"model": model, "concurrency": conc, "protocol": protocol, "peer": peer,
                     "infer_per_s": statistics.median(s["infer_per_s"] for s in mine),
                     "ratio": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
                     "p50_us": statistics.median(s["p50_us"] for s in mine),
                     "added_p50_us": statistics.median(added),
                     "cpu_us_per_req": statistics.median(s["cpu_us_per_req"] for s in mine),
                     "kernel_us_per_req": statistics.median(s.get("kernel_us_per_req", float("nan")) for s in mine),
                     "triton_cpu_us_per_req": statistics.median(s["triton_cpu_us_per_req"] for s in mine),
                     "rounds": len(mine)})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | proto | peer | infer/s | ratio to direct (min..max) | p50 us | added p50 us "
             "| proxy CPU us/req | of which kernel | proxy idle CPU ms/s | Triton CPU us/req |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = "-" if r["peer"] == "direct" else f"{r['cpu_us_per_req']:.0f}"
        kernel = "-" if r["peer"] == "direct" else f"{r.get('kernel_us_per_req', float('nan')):.0f}"
        idle = "-" if r["peer"] == "direct" else f"{r.get('idle_cpu_ms_per_s', float('nan')):.1f}"
        rng = "" if r["peer"] == "direct" else f" ({r['ratio_min']:.3f}..{r['ratio_max']:.3f})"
        lines.append(f"| {r['model']} c{r['concurrency']} | {r['protocol']} | {r['peer']} | {r['infer_per_s']:.1f} | "
                     f"{r['ratio']:.3f}{rng} | {r['p50_us']:.0f} | {r['added_p50_us']:+.0f} | {cpu} | {kernel} | "
                     f"{idle} | {r['triton_cpu_us_per_req']:.0f} |")
    return lines


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """Issue 9's targets for each tritonpilot peer: (target, measured, met; None when nginx is absent)."""
    out: list[tuple[str, str, bool | None]] = []
    get = {(r["model"], r["protocol"], r["peer"]): r for r in rows}
    for tp in sorted({r["peer"] for r in rows if r["peer"].startswith("tritonpilot")}):
        for protocol in PROTOCOLS:
            ng = [get.get((m, protocol, "nginx")) for m, _ in CASES]
            mine = [get.get((m, protocol, tp)) for m, _ in CASES]
            if all(ng) and all(mine):
                parts = [f"{m}: {a['cpu_us_per_req']:.0f} vs {b['cpu_us_per_req']:.0f}"
                         for (m, _), a, b in zip(CASES, mine, ng)]
                met = all(a["cpu_us_per_req"] <= b["cpu_us_per_req"] for a, b in zip(mine, ng))
                out.append((f"{tp} {protocol}: CPU us/req <= nginx's", "; ".join(parts), met))
            elif all(mine):
                out.append((f"{tp} {protocol}: CPU us/req <= nginx's", "nginx not measured", None))
            f = get.get(("fast", protocol, tp))
            if f:
                out.append((f"{tp} {protocol}: fast c4 (saturation) >= 0.9 of direct", f"{f['ratio']:.3f}",
                            f["ratio"] >= 0.9))
            s = get.get(("sleep", protocol, tp))
            if s:
                out.append((f"{tp} {protocol}: sleep (20 ms) c1 >= 0.98 of direct, added p50 <= 0.3 ms",
                            f"{s['ratio']:.3f}, {s['added_p50_us'] / 1000:+.2f} ms",
                            s["ratio"] >= 0.98 and s["added_p50_us"] <= 300))
    return out


def write_doc(path: Path, command: str, rows: list[dict], notes: list[str], load: tuple[str, str],
              rounds: int, interval_ms: int) -> None:
    mark = {True: "yes", False: "**no**", None: "n/a"}
    lines = [BEGIN, "### Measured side by side", "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
             f"a {os.cpu_count()}-core machine "
             f"with no GPU (load average before: {load[0]}; after: {load[1]}). Client (perf_analyzer "
             f"{PA_VERSION}), proxies, Triton and its Python-backend models share those cores. "
             f"{rounds} round(s), peers alternating with the order rotated each round; each perf_analyzer run "
             f"is 3 windows of {interval_ms / 1000:g} s. Medians over rounds; ratio and added p50 are per round "
             "against direct in the same round.", "",
             "| target (issue 9) | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {mark[ok]} |" for t, m, ok in targets(rows)]
    lines += ["", *table(rows)]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += ["", END]
    text = path.read_text() if path.exists() else "# Benchmarks: tritonpilot beside general gRPC proxies\n\n"
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer --measurement-interval")
    parser.add_argument("--short", action="store_true", help="1 round of 1 s windows: a smoke run")
    parser.add_argument("--tritonpilot-workers", default="1,2",
                        help="comma-separated --workers values, one tritonpilot peer each (default 1,2)")
    parser.add_argument("--peers", default="", help="only these peers besides direct, comma-separated "
                        "(tritonpilot, tritonpilot-wN, uvloop-pipe, nginx, haproxy; default: all)")
    parser.add_argument("--idle-s", type=float, default=5.0,
                        help="seconds of no load over which each proxy's own background CPU is read first")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="'-': write no file")
    args = parser.parse_args(argv)
    if args.short:
        args.rounds, args.interval_ms = 1, 1000
    workers = [int(w) for w in args.tritonpilot_workers.split(",") if w.strip()]
    only = {p.strip() for p in args.peers.split(",") if p.strip()} or None
    command = "bash scripts/bench-peers" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))

    from tritonpilot.tools.embedded import EmbeddedTriton

    pa, env = perf_analyzer()
    work = Path(tempfile.mkdtemp(prefix="tritonpilot-peers-"))
    print(f"work dir {work}", file=sys.stderr)
    load0 = _load()
    with ExitStack() as stack:
        triton = stack.enter_context(EmbeddedTriton(ROOT / "deploy" / "demo_models", load_models=["fast", "sleep"],
                                                    log_path=work / "triton.log"))
        peers, notes = start_peers(stack, work, triton, workers, only)
        for n in notes:
            print("note:", n, file=sys.stderr)
        idle = idle_cpu(peers, args.idle_s)
        print("idle CPU ms/s: " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()), file=sys.stderr)
        samples = measure(peers, triton, pa, env, work, args.rounds, args.interval_ms,
                          lambda s: print(s, file=sys.stderr, flush=True))
    load1 = _load()
    (work / "samples.json").write_text(json.dumps(samples, indent=1))
    rows = summarize(samples)
    for r in rows:
        r["idle_cpu_ms_per_s"] = idle.get(r["peer"], float("nan"))
    print("\n".join(table(rows)))
    print()
    for t, m, ok in targets(rows):
        print(f"{'MET ' if ok else 'n/a ' if ok is None else 'MISS'} {t}: {m}")
    print(f"load average before {load0}, after {load1}; samples in {work / 'samples.json'}")
    if args.out != "-":
        write_doc(Path(args.out), command, rows, notes, (load0, load1), args.rounds, args.interval_ms)
    return 0


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    sys.exit(main())
