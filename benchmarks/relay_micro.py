"""The relay cores' CPU per request, in process: recorded byte streams replayed through them.

    python benchmarks/relay_micro.py [--calls 2000] [--rounds 7] [--profile grpc|http]
    python benchmarks/relay_micro.py --against OLD/grpc_core.py   # or OLD/http_core.py: A/B
    python benchmarks/relay_micro.py --against-tree OLD   # OLD/proxy: a copy of all of proxy/
    python benchmarks/relay_micro.py --grpc-reads FILE --http-reads FILE   # recorded reads
    python benchmarks/relay_micro.py --record-reads DIR    # record them from a real serve
    python benchmarks/relay_micro.py --idle-cpu [--rounds 3]
    python benchmarks/relay_micro.py --syscalls [--rounds 3] [--strace]

gRPC: the h2 library plays a gRPC client (the header fields grpc's C core sends) and Triton
(response headers, one message, trailers) for `--calls` unary ModelInfer calls on the
`fast` model, `--concurrency` of them open at a time as perf_analyzer keeps them; each
socket read the relay would see is recorded once. A round replays them through a fresh
`GrpcConnection` (client_data / upstream_data, what it writes cleared as the shell does).
HTTP: the same for HTTP/1.1 keep-alive `POST /v2/models/fast/infer` (JSON body) through
`HttpExchanges`. Reported: CPU µs per request (process time, so that other processes on a
busy machine count less), the median of the rounds (and min, max).
--against FILE: another version of grpc_core.py or http_core.py (a copy from before a
change; which one is told by its file name, grpc_core*.py or http_core*.py), replayed
in rounds interleaved with the current one, so that a noisy machine slows both alike.
--against-tree DIR: the same for a copy of the whole proxy/ package in DIR/proxy (changes
that span the core, wire.py, ledger.py and stats.py), imported under another name.

--record-reads DIR: the reads a real `serve --workers 1` sees, between perf_analyzer (fast,
concurrency 4) and an embedded Triton, recorded in the relay process (a sitecustomize that
wraps the shells' from_client / from_upstream) into DIR/grpc.pickle and DIR/http.pickle;
--grpc-reads / --http-reads FILE replay such a recording instead of the synthetic reads
(grpc's C core sends a WINDOW_UPDATE per call and one per connection that h2 does not).

--idle-cpu: `tritonpilot serve --workers 2` in front of a closed port, no clients: the CPU
(utime + stime from /proc) its whole process tree spends over 10 s, per round, after 5 s
of start-up.

--syscalls: end to end, `tritonpilot serve --workers 1` between perf_analyzer (fast model,
concurrency 4, as bash scripts/bench-peers runs it) and an embedded Triton: per request,
the relay's read-like and write-like syscalls (/proc/PID/io syscr, syscw), its voluntary
context switches (each one an event-loop sleep, so a wake-up after it) and its CPU, summed
over its process tree and threads; with --strace, one more run under `strace -c -f` for
the breakdown by syscall (strace slows the relay: more bytes wait per read there).

This isolates the cores' CPU from sockets, the event loop and a noisy machine; what it
leaves out (syscalls, wake-ups) is docs/relay-cost.md's strace section.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import importlib.util
import json
import os
import pickle
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import h2.config
import h2.connection
import h2.events
from tritonclient.grpc import service_pb2

from tritonpilot.ports import free_port
from tritonpilot.proxy.grpc_core import GrpcConnection, GrpcRules
from tritonpilot.proxy.http_core import HttpExchanges
from tritonpilot.proxy.ledger import Ledger
from tritonpilot.proxy.stats import HTTP, ProxyStats
from tritonpilot.proxy.wire import MODEL_INFER

# What grpc's C core (perf_analyzer, tritonclient.grpc) sends on each call.
_REQUEST_HEADERS = [(":method", "POST"), (":scheme", "http"), (":path", MODEL_INFER.decode()),
                    (":authority", "127.0.0.1:8001"), ("te", "trailers"), ("content-type", "application/grpc"),
                    ("user-agent", "grpc-c++/1.67.1 grpc-c/44.0.0 (linux; chttp2)"),
                    ("grpc-accept-encoding", "identity, deflate, gzip")]
_RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc"),
                     ("grpc-accept-encoding", "identity, deflate, gzip")]
_TRAILERS = [("grpc-status", "0")]

Reads = list[tuple[bool, bytes]]  # one connection's: (from the client?, the bytes of one socket read)
Recording = list[Reads]  # connections, replayed one after the other


@dataclass(frozen=True)
class Tree:
    """The classes a replay runs: the current proxy/, or a copy of an older one (--against-tree)."""
    GrpcConnection: type
    GrpcRules: type
    HttpExchanges: type
    Ledger: type
    ProxyStats: type


CURRENT = Tree(GrpcConnection, GrpcRules, HttpExchanges, Ledger, ProxyStats)


def _grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def record_grpc(calls: int, concurrency: int) -> Reads:
    """The reads a relay sees for `calls` unary ModelInfer calls, `concurrency` open at a time:
    each client read carries a call's HEADERS + DATA, each Triton read one call's response."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    request = _grpc_message(service_pb2.ModelInferRequest(
        model_name="fast", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
            name="INPUT0", datatype="FP32", shape=[1, 16])], raw_input_contents=[b"\x00" * 64]).SerializeToString())
    response = _grpc_message(service_pb2.ModelInferResponse(
        model_name="fast", model_version="1", outputs=[service_pb2.ModelInferResponse.InferOutputTensor(
            name="OUTPUT0", datatype="FP32", shape=[1, 16])], raw_output_contents=[b"\x00" * 64]).SerializeToString())
    reads: Reads = []

    def client_sends() -> None:
        data = client.data_to_send()
        if data:
            reads.append((True, data))
            for event in server.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    waiting.append(event.stream_id)

    def server_sends() -> None:
        data = server.data_to_send()
        if data:
            reads.append((False, data))
            for event in client.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        more = client.data_to_send()  # ACKs, window updates: in the client's next read
        if more:
            reads.append((True, more))
            server.receive_data(more)

    waiting: list[int] = []
    client.initiate_connection()
    client_sends()
    server.initiate_connection()
    server_sends()
    sent = answered = 0
    while answered < calls:
        while sent < calls and sent - answered < concurrency:
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, _REQUEST_HEADERS)
            client.send_data(sid, request, end_stream=True)
            client_sends()
            sent += 1
        sid = waiting.pop(0)
        server.send_headers(sid, _RESPONSE_HEADERS)
        server.send_data(sid, response)
        server.send_headers(sid, _TRAILERS, end_stream=True)
        server.acknowledge_received_data(len(request), sid)
        server_sends()
        answered += 1
    return reads


def replay_grpc(conns: Recording, tree: Tree = CURRENT) -> ProxyStats:
    stats = tree.ProxyStats()
    now = 0.0
    for reads in conns:
        conn = tree.GrpcConnection(tree.GrpcRules(), tree.Ledger(stats), now)
        to_upstream, to_client = conn.to_upstream, conn.to_client
        client_data, upstream_data = conn.client_data, conn.upstream_data
        for from_client, data in reads:
            now += 1e-5
            if from_client:
                violation = client_data(data, now)
            else:
                violation = upstream_data(data, now)
            if violation is not None:
                raise RuntimeError(violation)
            to_upstream.clear()
            to_client.clear()
    return stats


def record_http(calls: int) -> Reads:
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                   "data": [0.0] * 16}]}).encode()
    request = (b"POST /v2/models/fast/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
               b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    answer = json.dumps({"model_name": "fast", "model_version": "1", "outputs": [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}]}).encode()
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(answer)).encode() + b"\r\n\r\n" + answer)
    reads: Reads = []
    for _ in range(calls):
        reads += [(True, request), (False, response)]
    return reads


def replay_http(conns: Recording, tree: Tree = CURRENT) -> ProxyStats:
    stats = tree.ProxyStats()
    now = 0.0
    for reads in conns:
        core = tree.HttpExchanges(tree.Ledger(stats, HTTP))  # as http_relay's _Pair makes it, default rules
        for from_client, data in reads:
            now += 1e-5
            if from_client:
                core.client_data(data, now)
            else:
                core.upstream_data(data, now)
            core.take_upstream()
            core.take_client()
            if core.closed:
                raise RuntimeError(core.abort_reason)
    return stats


def _started(stats: ProxyStats) -> int:
    return sum(m.started_total for m in stats.snapshot(0.0).models.values())


def _finished(stats: ProxyStats) -> int:
    return sum(sum(m.finished_total.values()) for m in stats.snapshot(0.0).models.values())


def measure(name: str, conns: Recording, replay: Callable[[Recording], ProxyStats], rounds: int) -> float:
    calls = _started(replay(conns))  # a warm-up round that also counts the requests
    per_call_us = []
    for _ in range(rounds):
        start = time.process_time()
        replay(conns)
        per_call_us.append((time.process_time() - start) * 1e6 / calls)
    median = statistics.median(per_call_us)
    print(f"{name:5s} {median:7.1f} us/request  (median of {rounds}; min {min(per_call_us):.1f}, "
          f"max {max(per_call_us):.1f}; {calls} calls, {sum(map(len, conns))} reads)")
    return median


def _interleaved(name: str, conns: Recording, new: Callable[[Recording], ProxyStats],
                 old: Callable[[Recording], ProxyStats], rounds: int, label: str) -> None:
    """new and old, rounds interleaved, their order alternating: a noisy machine slows both alike."""
    calls = _started(new(conns))
    if _started(old(conns)) != calls:
        raise RuntimeError(f"{label}: the replays counted different requests")
    times: dict[str, list[float]] = {"new": [], "old": []}
    for i in range(rounds):
        order = [("new", new), ("old", old)]
        for which, replay in order if i % 2 == 0 else order[::-1]:
            start = time.process_time()
            replay(conns)
            times[which].append((time.process_time() - start) * 1e6 / calls)
    after, before = statistics.median(times["new"]), statistics.median(times["old"])
    low_after, low_before = min(times["new"]), min(times["old"])
    print(f"{name}  old {before:.1f} -> new {after:.1f} us/request ({(after - before) / before:+.1%}; "
          f"min {low_before:.1f} -> {low_after:.1f}, {(low_after - low_before) / low_before:+.1%}; medians of "
          f"{rounds} interleaved rounds, {calls} calls; old: {label})")


def against(path: str, conns: Recording, rounds: int) -> None:
    """The current core and the one in `path` (a grpc_core.py or an http_core.py)."""
    http = Path(path).name.startswith("http_core")
    spec = importlib.util.spec_from_file_location("relay_micro_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if http:
        tree = Tree(GrpcConnection, GrpcRules, module.HttpExchanges, Ledger, ProxyStats)
        _interleaved("http", conns, replay_http, lambda c: replay_http(c, tree), rounds, path)
    else:
        tree = Tree(module.GrpcConnection, module.GrpcRules, HttpExchanges, Ledger, ProxyStats)
        _interleaved("grpc", conns, replay_grpc, lambda c: replay_grpc(c, tree), rounds, path)


def load_tree(path: str) -> Tree:
    """A copy of the proxy package (path/proxy/*.py), imported as relay_micro_old.proxy: its
    modules import each other by that name, so that every one of them is the old one."""
    root = Path(tempfile.mkdtemp(prefix="relay-micro-tree-"))
    package = root / "relay_micro_old" / "proxy"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    for source in (Path(path) / "proxy").glob("*.py"):
        (package / source.name).write_text(re.sub(r"\btritonpilot\.proxy\b", "relay_micro_old.proxy",
                                                  source.read_text()))
    sys.path.insert(0, str(root))

    def module(name: str) -> ModuleType:
        return importlib.import_module(f"relay_micro_old.proxy.{name}")

    grpc_core, http_core = module("grpc_core"), module("http_core")
    return Tree(grpc_core.GrpcConnection, grpc_core.GrpcRules, http_core.HttpExchanges, module("ledger").Ledger,
                module("stats").ProxyStats)


def against_tree(path: str, grpc_conns: Recording, http_conns: Recording, rounds: int) -> None:
    tree = load_tree(path)
    _interleaved("grpc", grpc_conns, replay_grpc, lambda c: replay_grpc(c, tree), rounds, path)
    _interleaved("http", http_conns, replay_http, lambda c: replay_http(c, tree), rounds, path)


# Loaded into `serve` by --record-reads (a sitecustomize on its PYTHONPATH): what each core's
# client_data / upstream_data is handed, per connection, into $RELAY_MICRO_RECORD at exit.
_RECORDER = """
import atexit, os, pickle
from tritonpilot.proxy.grpc_core import GrpcConnection
from tritonpilot.proxy.http_core import HttpExchanges

_recorded = {"grpc": [], "http": []}
_left = [200000]


def _wrap(cls, protocol):
    client_data, upstream_data = cls.client_data, cls.upstream_data

    def reads(core):
        if "recorded_reads" not in core.__dict__:
            core.recorded_reads = []
            _recorded[protocol].append(core.recorded_reads)
        return core.recorded_reads

    def from_client(self, data, now_s):
        if _left[0] > 0:
            _left[0] -= 1
            reads(self).append((True, bytes(data)))
        return client_data(self, data, now_s)

    def from_upstream(self, data, now_s):
        if _left[0] > 0:
            _left[0] -= 1
            reads(self).append((False, bytes(data)))
        return upstream_data(self, data, now_s)

    cls.client_data, cls.upstream_data = from_client, from_upstream


_wrap(GrpcConnection, "grpc")
_wrap(HttpExchanges, "http")


@atexit.register
def _dump():
    for protocol, conns in _recorded.items():
        with open(os.path.join(os.environ["RELAY_MICRO_RECORD"], protocol + ".pickle"), "wb") as out:
            pickle.dump([c for c in conns if c], out)
"""


def record_reads(out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from contextlib import ExitStack

    import peers  # benchmarks/peers.py: perf_analyzer and the peers' start-up

    from tritonpilot.tools.embedded import EmbeddedTriton

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pa, env = peers.perf_analyzer()
    work = Path(tempfile.mkdtemp(prefix="tritonpilot-relay-micro-"))
    (work / "recorder").mkdir()
    (work / "recorder" / "sitecustomize.py").write_text(_RECORDER)
    with ExitStack() as stack:
        triton = stack.enter_context(EmbeddedTriton(peers.ROOT / "deploy" / "demo_models", load_models=["fast"],
                                                    log_path=work / "triton.log"))
        saved = dict(os.environ)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "recorder"), saved.get("PYTHONPATH")]))
        os.environ["RELAY_MICRO_RECORD"] = str(out)
        try:
            relay = peers.start_peers(stack, work, triton, [1], {"tritonpilot"})[0][1]
        finally:
            os.environ.clear()
            os.environ.update(saved)
        for protocol in ("grpc", "http"):
            peers.run_pa(pa, env, work, f"record-{protocol}", "fast", protocol,
                         relay.grpc if protocol == "grpc" else relay.http, 4, 2000)
    for protocol in ("grpc", "http"):  # the relay wrote them on its way out
        with open(out / f"{protocol}.pickle", "rb") as f:
            conns = pickle.load(f)
        print(f"{protocol}: {len(conns)} connections, {sum(map(len, conns))} reads -> {out / protocol}.pickle")


def load_reads(path: str) -> Recording:
    with open(path, "rb") as f:
        conns: Recording = pickle.load(f)
    return conns


def _tree(root: int) -> dict[int, float]:
    """`root` and its descendants: each one's utime + stime, in seconds."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: ppid
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        out[pid] = cpu.get(pid, 0.0)
        todo += children.get(pid, [])
    return out


def _tree_cpu_s(root: int) -> float:
    return sum(_tree(root).values())


def idle_cpu(rounds: int, window_s: float = 10.0) -> None:
    closed = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "tritonpilot", "serve", "--workers", "2", "--triton", f"127.0.0.1:{closed}",
         "--listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{free_port()}",
         "--metrics-listen", f"127.0.0.1:{free_port()}", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5.0)
        per_s = []
        for _ in range(rounds):
            before = _tree_cpu_s(serve.pid)
            time.sleep(window_s)
            per_s.append((_tree_cpu_s(serve.pid) - before) / window_s * 1e3)
        print(f"idle  {statistics.median(per_s):.1f} ms CPU/s  (median of {rounds} windows of {window_s:.0f} s: "
              + ", ".join(f"{x:.1f}" for x in per_s) + ")")
    finally:
        serve.terminate()
        serve.wait(30)


def _tree_counters(root: int) -> dict[str, float]:
    """syscr, syscw, voluntary switches and CPU seconds of `root`, its descendants and their threads."""
    tree = _tree(root)
    pids = list(tree)
    out = {"syscr": 0.0, "syscw": 0.0, "switches": 0.0, "cpu_s": sum(tree.values())}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("syscr", "syscw"):
                    out[key] += int(value)
            for task in Path(f"/proc/{pid}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        out["switches"] += int(line.split()[1])
        except OSError:
            continue
    return out


def syscalls(rounds: int, with_strace: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tempfile
    from contextlib import ExitStack

    import peers  # benchmarks/peers.py: perf_analyzer and the peers' start-up

    from tritonpilot.tools.embedded import EmbeddedTriton

    pa, env = peers.perf_analyzer()
    work = Path(tempfile.mkdtemp(prefix="tritonpilot-relay-micro-"))
    with ExitStack() as stack:
        triton = stack.enter_context(EmbeddedTriton(peers.ROOT / "deploy" / "demo_models", load_models=["fast"],
                                                    log_path=work / "triton.log"))
        relay = peers.start_peers(stack, work, triton, [1], {"tritonpilot"})[0][1]
        assert relay.root_pid is not None
        for protocol in ("grpc", "http"):
            url = relay.grpc if protocol == "grpc" else relay.http
            rows = []
            for r in range(rounds):
                n0, c0 = peers.model_count(triton.http_url, "fast"), _tree_counters(relay.root_pid)
                peers.run_pa(pa, env, work, f"{protocol}-{r}", "fast", protocol, url, 4, 2000)
                n = peers.model_count(triton.http_url, "fast") - n0
                c1 = _tree_counters(relay.root_pid)
                rows.append({k: (c1[k] - c0[k]) / n for k in c0})
            med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
            print(f"{protocol:4s} per request: {med['syscr']:.2f} read-like + {med['syscw']:.2f} write-like syscalls, "
                  f"{med['switches']:.2f} loop sleeps (voluntary switches), {med['cpu_s'] * 1e6:.0f} us CPU "
                  f"(medians of {rounds} perf_analyzer runs)")
            if with_strace:
                out = work / f"strace-{protocol}.txt"
                tracer = subprocess.Popen(["strace", "-c", "-f", "-qq", "-o", str(out)]
                                          + [a for p in _tree(relay.root_pid) for a in ("-p", str(p))])
                time.sleep(1.0)
                n0 = peers.model_count(triton.http_url, "fast")
                peers.run_pa(pa, env, work, f"{protocol}-strace", "fast", protocol, url, 4, 2000)
                n = peers.model_count(triton.http_url, "fast") - n0
                tracer.terminate()
                tracer.wait(30)
                print(f"{protocol:4s} under strace -c -f, per request ({n} requests):")
                for line in out.read_text().splitlines():
                    fields = line.split()
                    if len(fields) >= 5 and fields[3].isdigit():
                        print(f"    {fields[-1]:16s} {int(fields[3]) / n:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--profile", choices=("grpc", "http"), help="cProfile one replay instead")
    parser.add_argument("--against", metavar="FILE", help="A/B against another grpc_core.py or http_core.py")
    parser.add_argument("--idle-cpu", action="store_true", help="serve --workers 2's CPU while idle instead")
    parser.add_argument("--syscalls", action="store_true", help="syscalls and wake-ups per request, end to end")
    parser.add_argument("--strace", action="store_true", help="with --syscalls: a breakdown under strace -c")
    parser.add_argument("--against-tree", metavar="DIR", help="A/B against a copy of all of proxy/ in DIR/proxy")
    parser.add_argument("--record-reads", metavar="DIR", help="record a real serve's reads into DIR instead")
    parser.add_argument("--grpc-reads", metavar="FILE", help="replay these recorded gRPC reads (--record-reads)")
    parser.add_argument("--http-reads", metavar="FILE", help="replay these recorded HTTP reads (--record-reads)")
    args = parser.parse_args()
    if args.syscalls:
        syscalls(args.rounds, args.strace)
        return
    if args.idle_cpu:
        idle_cpu(args.rounds)
        return
    if args.record_reads:
        record_reads(args.record_reads)
        return
    grpc_reads = load_reads(args.grpc_reads) if args.grpc_reads else [record_grpc(args.calls, args.concurrency)]
    http_reads = load_reads(args.http_reads) if args.http_reads else [record_http(args.calls)]
    for name, conns, replay in (("grpc", grpc_reads, replay_grpc), ("http", http_reads, replay_http)):
        if (name == "grpc" and not args.grpc_reads or name == "http" and not args.http_reads) and \
                _finished(replay(conns)) != args.calls:
            raise RuntimeError(f"{name}: the replay did not count {args.calls} requests")
    if args.against:
        http = Path(args.against).name.startswith("http_core")
        against(args.against, http_reads if http else grpc_reads, args.rounds)
        return
    if args.against_tree:
        against_tree(args.against_tree, grpc_reads, http_reads, args.rounds)
        return
    if args.profile:
        conns, replay = (grpc_reads, replay_grpc) if args.profile == "grpc" else (http_reads, replay_http)
        calls = _started(replay(conns))
        profile = cProfile.Profile()
        profile.runcall(replay, conns)
        stats = pstats.Stats(profile).sort_stats("tottime")
        print(f"{stats.total_calls / calls:.0f} Python calls per request")  # type: ignore[attr-defined]
        stats.print_stats(20)
        return
    measure("grpc", grpc_reads, replay_grpc, args.rounds)
    measure("http", http_reads, replay_http, args.rounds)

if __name__ == "__main__":
    main()
