"""`serve --workers N`: relay processes sharing the client ports, counting in shared memory.

With 2 workers and N held requests over many connections (gRPC and HTTP), the in-flight
gauge reads exactly N, then 0; a worker killed under load loses only its own connections
and the gauge comes back to the truth; SIGTERM lets the calls open on every worker finish.
SIGHUP reloads the policy into every worker, on the connections already open, none dropped;
an invalid file keeps the running policy. A parent killed with SIGKILL leaves neither a
worker nor a shared-memory file behind."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from proxy_support import ServeProcess, SidecarThread, gate_inputs, scrape, wait_until
from tls_support import Pem, common_name, issue, make_ca, needs_openssl

from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = pytest.mark.triton

# Each client its own TCP connection: grpc would otherwise share one subchannel per target.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def hostport(url: str) -> str:
    return url.split("://", 1)[-1]


def gate_body(gate: str) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]},
                                  {"name": "GATE", "shape": [1], "datatype": "BYTES", "data": [gate]}]}).encode()


class HttpCall:
    """One HTTP/1.1 request on its own connection, answered (or failed) in a thread."""

    def __init__(self, url: str, gate: str) -> None:
        host, port = url.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        body = gate_body(gate)
        self.sock.sendall(b"POST /v2/models/gate/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.result: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
            self.result.put(data.split(b"\r\n", 1)[0] if data else b"closed")
        except OSError as exc:
            self.result.put(f"error {exc}".encode())
        finally:
            self.sock.close()

    def outcome(self) -> str:
        line = self.result.get(timeout=60)
        return "ok" if line.startswith(b"HTTP/1.1 200") else line.decode(errors="replace")


class GrpcCall:
    def __init__(self, url: str, gate: str, i: int) -> None:
        self.client = grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION)
        self.result: queue.Queue = queue.Queue()
        self.client.async_infer("gate", gate_inputs(gate, [float(i)]), request_id=str(i),
                                callback=lambda result, error: self.result.put(error))

    def outcome(self) -> str:
        error = self.result.get(timeout=60)
        self.client.close()
        return "ok" if error is None else str(error.status())


def held_calls(sidecar: SidecarThread, gate: str, n: int) -> list[Any]:
    """n calls held by the gate, alternately gRPC and HTTP, each on its own connection."""
    assert sidecar.http_url is not None
    return [GrpcCall(sidecar.url, gate, i) if i % 2 == 0 else HttpCall(sidecar.http_url, gate) for i in range(n)]


def inflight_metric(sidecar: SidecarThread) -> float:
    samples = scrape(sidecar.metrics_url + "/metrics")
    return samples.get(("tritonpilot_inflight_requests", (("model", "gate"),)), 0.0)


def per_worker(sidecar: SidecarThread) -> list[int]:
    """Requests of `gate` in flight on each worker now (its row of the shared table)."""
    pool = sidecar.sidecar.pool
    assert pool is not None
    return [sum(n for (model, _), n in row.items() if model == "gate") for row in pool.reader.cells()]


@pytest.fixture
def workers_sidecar(gate_triton: EmbeddedTriton, sidecar_factory: Callable[..., SidecarThread]) -> SidecarThread:
    return sidecar_factory(gate_triton.grpc_url, triton_http=hostport(gate_triton.http_url), workers=2)


@pytest.mark.parametrize("n", [1, 8, 24])
def test_in_flight_is_exact_across_two_workers_then_zero(workers_sidecar: SidecarThread, gates, n: int) -> None:
    sidecar = workers_sidecar
    gate = gates.new()
    calls = held_calls(sidecar, gate, n)
    wait_until(lambda: sidecar.inflight("gate") == n, what=f"{n} calls in flight")
    assert inflight_metric(sidecar) == n
    time.sleep(0.3)  # a publication later: held, not drifting
    assert sidecar.inflight("gate") == n and sum(per_worker(sidecar)) == n
    if n >= 8:
        assert all(k > 0 for k in per_worker(sidecar)), per_worker(sidecar)  # the kernel spread them
    gates.open(gate)
    assert [c.outcome() for c in calls] == ["ok"] * n
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    assert inflight_metric(sidecar) == 0
    n_grpc = (n + 1) // 2
    want = {"OK": n_grpc, **({"200": n - n_grpc} if n > 1 else {})}
    wait_until(lambda: sidecar.finished("gate") == want, what=f"finished {want}")  # totals lag a publication
    assert sidecar.model("gate").started_total == n  # type: ignore[union-attr]


def test_a_killed_worker_loses_only_its_connections_and_is_restarted(workers_sidecar: SidecarThread,
                                                                    gates) -> None:
    sidecar = workers_sidecar
    pool = sidecar.sidecar.pool
    assert pool is not None
    gate = gates.new()
    n = 24
    calls = held_calls(sidecar, gate, n)
    wait_until(lambda: sidecar.inflight("gate") == n, what=f"{n} calls in flight")
    victim_calls, survivors = per_worker(sidecar)
    assert victim_calls > 0 and survivors > 0
    victim = pool.pids[0]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    # The gauge comes back to the truth: only the survivor's calls are still open.
    wait_until(lambda: sidecar.inflight("gate") == survivors, what=f"in flight back to the truth, {survivors}")
    wait_until(lambda: pool.pids[0] not in (None, victim), what="the worker restarted")
    gates.open(gate)
    outcomes = [c.outcome() for c in calls]
    failed = [o for o in outcomes if o != "ok"]
    assert len(failed) == victim_calls, outcomes
    assert all(o in ("StatusCode.UNAVAILABLE", "closed") or o.startswith("error") for o in failed), failed
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")
    assert pool.restarts == 1
    # The restarted worker serves: fresh calls over fresh connections all pass.
    wait_until(lambda: all(w is not None and w.ready.done() for w in pool._workers), what="the successor ready")
    fresh = held_calls(sidecar, gates.new(), 8)
    gates.open_all()
    assert [c.outcome() for c in fresh] == ["ok"] * 8
    wait_until(lambda: sidecar.inflight("gate") == 0, what="in flight back to 0")


def test_sigterm_lets_open_calls_on_every_worker_finish_then_exits_0(gate_triton: EmbeddedTriton, serve_factory,
                                                                    gates) -> None:
    proc = serve_factory(gate_triton.grpc_url, "--workers", "2", "--triton-http", hostport(gate_triton.http_url),
                         "--grace-period-s", "30")
    gate = gates.new()
    n = 16
    assert proc.http_url is not None
    calls = [GrpcCall(proc.url, gate, i) if i % 2 == 0 else HttpCall(proc.http_url, gate) for i in range(n)]

    def gauge() -> float:
        return scrape(proc.metrics_url + "/metrics").get(("tritonpilot_inflight_requests", (("model", "gate"),)), 0)

    wait_until(lambda: gauge() == n, what=f"{n} calls in flight")
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # the workers are draining: the calls are still held
    assert proc.proc.poll() is None
    gates.open(gate)
    assert [c.outcome() for c in calls] == ["ok"] * n
    assert proc.proc.wait(60) == 0
    log = proc.log()
    assert log.count('"event": "worker.stopped"') == 2, log


def test_a_cap_holds_over_both_workers(gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url, triton_http=hostport(gate_triton.http_url), workers=2,
                              max_inflight=4)
    gate = gates.new()
    calls = held_calls(sidecar, gate, 16)
    # Checked against the shared sum: at most workers - 1 over, when two check at the same instant.
    wait_until(lambda: sidecar.inflight("gate") >= 4, what="the cap reached")
    time.sleep(0.5)
    admitted = sidecar.inflight("gate")
    assert 4 <= admitted <= 5
    gates.open(gate)
    outcomes = [c.outcome() for c in calls]
    assert outcomes.count("ok") == admitted
    assert sorted(set(outcomes) - {"ok"}) in (["StatusCode.RESOURCE_EXHAUSTED"], ["HTTP/1.1 429 Too Many Requests"],
                                              ["HTTP/1.1 429 Too Many Requests", "StatusCode.RESOURCE_EXHAUSTED"])


def test_a_reloaded_setting_reaches_every_worker(workers_sidecar: SidecarThread, gates) -> None:
    sidecar = workers_sidecar
    pool = sidecar.sidecar.pool
    assert pool is not None

    async def reconfigure() -> None:
        pool.reconfigure(replace(sidecar.config, max_inflight=2))
    sidecar.call(reconfigure())
    time.sleep(0.3)  # the message is read on each worker's loop
    gate = gates.new()
    calls = held_calls(sidecar, gate, 12)
    wait_until(lambda: sidecar.inflight("gate") >= 2, what="the new cap reached")
    time.sleep(0.5)
    admitted = sidecar.inflight("gate")
    assert 2 <= admitted <= 3
    gates.open(gate)
    assert [c.outcome() for c in calls].count("ok") == admitted


# ------------------------------------------------------------------------------ processes, as /proc shows them


def worker_pids(parent: int) -> list[int]:
    """The relay workers `parent` spawned (not multiprocessing's resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def two_workers(proc: ServeProcess) -> list[int]:
    def found() -> list[int] | None:
        pids = worker_pids(proc.proc.pid)
        return pids if len(pids) == 2 else None
    return wait_until(found, what="two workers")


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (the workers of a dead parent are reparented)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def client_ports(pids: list[int], port: int) -> dict[int, set[int]]:
    """Per worker: the client ports of the established connections it holds on `port`."""
    out: dict[int, set[int]] = {}
    for pid in pids:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
        ports = set()
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    ports.add(int(remote.rsplit(":", 1)[1], 16))
        out[pid] = ports
    return out


def holder(pids: list[int], port: int, client_port: int) -> int:
    """The worker holding the connection from `client_port`."""
    def find() -> int | None:
        return next((pid for pid, ports in client_ports(pids, port).items() if client_port in ports), None)
    return wait_until(find, what=f"the worker holding the connection from port {client_port}")


def events(proc: ServeProcess, name: str) -> list[dict[str, Any]]:
    """The JSON log events of that name, the parent's and the workers' (they share the file)."""
    found = []
    for line in proc.log().splitlines():
        if line.startswith("{") and f'"event": "{name}"' in line:
            found.append(json.loads(line))
    return found


# ------------------------------------------------------------------------------ SIGHUP


POLICY = """\
control: {{interval_s: 1.0, dry_run: true}}
models:
  gate: {{max_instances: 1{extra}}}
"""


def write_policy(path: Path, text: str) -> None:
    """Whole or not at all: the sidecar's file watcher never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reloads(proc: ServeProcess) -> dict[str, float]:
    return {dict(labels)["result"]: value for (name, labels), value in scrape(proc.metrics_url + "/metrics").items()
            if name == "tritonpilot_policy_reloads_total"}


def gauge(proc: ServeProcess) -> float:
    return scrape(proc.metrics_url + "/metrics").get(("tritonpilot_inflight_requests", (("model", "gate"),)), 0.0)


def hold_one_by_one(proc: ServeProcess, clients: list[grpcclient.InferenceServerClient],
                    gate: str) -> list[queue.Queue]:
    """One call held by `gate` on each client's connection, sent one after the other, each
    once the one before was refused or admitted: no two workers check a cap at the same instant."""
    return [held_call(proc, client, gate, i) for i, client in enumerate(clients)]


def held_call(proc: ServeProcess, client: grpcclient.InferenceServerClient, gate: str, i: int) -> queue.Queue:
    """Its error (None: OK) arrives in the queue; returned once refused or in flight."""
    before = gauge(proc)
    done: queue.Queue = queue.Queue()
    client.async_infer("gate", gate_inputs(gate, [float(i)]), request_id=str(i),
                       callback=lambda result, error: done.put(error))
    wait_until(lambda: not done.empty() or gauge(proc) > before, what=f"call {i} refused or admitted")
    return done


def outcomes_now(results: list[queue.Queue]) -> list[str]:
    """What the calls answered so far: their status, or "held"."""
    out = []
    for done in results:
        if done.empty():
            out.append("held")
        else:
            error = done.queue[0]
            out.append("ok" if error is None else str(error.status()))
    return out


class GateStream:
    """A ModelStreamInfer stream to `gate` (without a GATE input: answered at once), held open."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        self.sent = 0

    def roundtrip(self) -> None:
        self.sent += 1
        self.client.async_stream_infer("gate", gate_inputs(None, [float(self.sent)]), request_id=str(self.sent))
        result, error = self.responses.get(timeout=60)
        assert error is None, error
        assert result.get_response().id == str(self.sent)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def test_sighup_reloads_a_cap_into_every_worker_on_open_connections(gate_triton: EmbeddedTriton, serve_factory,
                                                                   gates, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write_policy(policy, POLICY.format(extra=""))
    proc = serve_factory(gate_triton.grpc_url, "--workers", "2", "--triton-http", hostport(gate_triton.http_url),
                         "--policy", str(policy), "--grace-period-s", "5")
    workers = two_workers(proc)
    port = int(proc.url.rsplit(":", 1)[1])

    # Connections until each worker holds at least 3 (the kernel spreads them by a hash of the
    # client's address); each call is answered at once. No cap yet.
    clients: list[grpcclient.InferenceServerClient] = []
    while min(len(p) for p in client_ports(workers, port).values()) < 3:
        assert len(clients) < 64, client_ports(workers, port)
        client = grpcclient.InferenceServerClient(proc.url, channel_args=OWN_CONNECTION)
        client.infer("gate", gate_inputs(None), client_timeout=30)
        clients.append(client)
    stream = GateStream(proc.url)
    try:
        stream.roundtrip()
        before = client_ports(workers, port)
        assert sum(len(p) for p in before.values()) == len(clients) + 1  # one connection each, the stream's too

        # A cap of 1 on `gate`, then SIGHUP; the file watcher may see the change first: either
        # way one reload applies it (ok) and the other finds nothing new (unchanged).
        write_policy(policy, POLICY.format(extra=", max_inflight: 1"))
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(proc) == {"ok": 1.0, "unchanged": 1.0, "invalid": 0.0},
                   what="the SIGHUP and the watcher's reloads")
        taken = wait_until(lambda: len(e := events(proc, "worker.reconfigured")) == 2 and e,
                           what="both workers to take the reload")
        assert all(e["changes"] == ["models.gate.max_inflight changed from None to 1"] for e in taken)
        assert sorted(e["worker"] for e in taken) == [0, 1]

        # On the connections opened before the reload, whichever worker holds them: one call
        # is admitted, every other one refused (each worker holds 3 or more of them).
        gate = gates.new()
        results = hold_one_by_one(proc, clients, gate)
        got = outcomes_now(results)
        assert got.count("held") == 1 and gauge(proc) == 1
        assert got.count("StatusCode.RESOURCE_EXHAUSTED") == len(clients) - 1, got
        refusal = next(done.queue[0] for done in results if not done.empty())
        assert "max_inflight" in refusal.message()
        gates.open(gate)
        wait_until(lambda: outcomes_now(results).count("ok") == 1, what="the admitted call to finish")
        wait_until(lambda: gauge(proc) == 0, what="nothing in flight")

        # An invalid file: refused by both reloads, the cap kept in every worker.
        write_policy(policy, POLICY.format(extra=", max_inflght: 5"))
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(proc)["invalid"] == 2.0, what="the invalid reloads")
        with urllib.request.urlopen(proc.metrics_url + "/status", timeout=10) as reply:
            last = json.loads(reply.read())["policy_reload"]["last"]
        assert last["result"] == "invalid" and "models.gate.max_inflght" in last["error"]
        assert reloads(proc) == {"ok": 1.0, "unchanged": 1.0, "invalid": 2.0}
        gate = gates.new()
        results = hold_one_by_one(proc, clients, gate)
        assert outcomes_now(results).count("held") == 1, outcomes_now(results)
        gates.open(gate)
        wait_until(lambda: outcomes_now(results).count("ok") == 1, what="the admitted call to finish")
        assert len(events(proc, "worker.reconfigured")) == 2

        # The cap lifted: every worker admits them all again.
        write_policy(policy, POLICY.format(extra=""))
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(events(proc, "worker.reconfigured")) == 4, what="both workers to take the reload")
        gate = gates.new()
        results = hold_one_by_one(proc, clients, gate)
        assert outcomes_now(results) == ["held"] * len(clients)
        gates.open(gate)
        wait_until(lambda: outcomes_now(results) == ["ok"] * len(clients), what="every call to finish")

        # Not one connection dropped or made again, no worker restarted; the stream still works.
        stream.roundtrip()
        assert client_ports(workers, port) == before
        assert worker_pids(proc.proc.pid) == workers and proc.proc.poll() is None
    finally:
        stream.close()
        for client in clients:
            client.close()
    assert not events(proc, "workers.worker_died")


@needs_openssl
def test_sighup_rereads_the_certificate_in_every_worker(gate_triton: EmbeddedTriton, serve_factory,
                                                      tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    first, second = issue(ca, tmp_path, "proxy-a", 1001), issue(ca, tmp_path, "proxy-b", 1002)
    live = Pem(tmp_path / "live.pem", tmp_path / "live.key")
    for src, dst in ((first.cert, live.cert), (first.key, live.key)):
        dst.write_bytes(src.read_bytes())
    proc = serve_factory(gate_triton.grpc_url, "--workers", "2", "--http-listen", "off",
                         "--tls-cert", str(live.cert), "--tls-key", str(live.key))
    workers = two_workers(proc)
    port = int(proc.url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.set_alpn_protocols(["h2"])
    kept: list[ssl.SSLSocket] = []

    def names_per_worker() -> dict[int, set[str]]:
        """Open TLS connections until each worker holds one: the certificate each worker served."""
        served: dict[int, set[str]] = {pid: set() for pid in workers}
        while not all(served.values()):
            assert len(kept) < 64, served
            sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                       server_hostname="127.0.0.1")
            kept.append(sock)
            name = common_name(sock.getpeercert())
            served[holder(workers, port, sock.getsockname()[1])].add(name)
        return served

    try:
        assert names_per_worker() == {pid: {"proxy-a"} for pid in workers}
        for src, dst in ((second.cert, live.cert), (second.key, live.key)):
            dst.write_bytes(src.read_bytes())
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(events(proc, "worker.tls_reloaded")) == 2, what="both workers to reload")
        for sock in kept:
            sock.close()
        kept.clear()
        assert names_per_worker() == {pid: {"proxy-b"} for pid in workers}

        # Files that can't be used: the parent refuses them once, and no worker is told.
        live.cert.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: events(proc, "sidecar.tls_reload_failed"), what="the failed reload in the log")
        for sock in kept:
            sock.close()
        kept.clear()
        assert names_per_worker() == {pid: {"proxy-b"} for pid in workers}
        assert len(events(proc, "worker.tls_reloaded")) == 2 and not events(proc, "worker.tls_reload_failed")
        assert worker_pids(proc.proc.pid) == workers
    finally:
        for sock in kept:
            sock.close()


# ------------------------------------------------------------------------------ the parent killed


def test_a_killed_parent_leaves_no_worker_and_no_shared_memory_file(gate_triton: EmbeddedTriton, serve_factory,
                                                                   gates) -> None:
    proc = serve_factory(gate_triton.grpc_url, "--workers", "2", "--triton-http", hostport(gate_triton.http_url),
                         "--grace-period-s", "30")
    workers = two_workers(proc)
    # The table every worker maps has no name: nothing in /dev/shm to outlive them.
    for pid in workers:
        table = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "tritonpilot-stats" in line]
        assert table and all(line.endswith("(deleted)") for line in table), table
    gate = gates.new()
    assert proc.http_url is not None
    call = HttpCall(proc.http_url, gate)
    wait_until(lambda: gates.holding(gate), what="the call held in the model")

    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(30)
    # Each worker reads the end of its pipe and drains: the open call finishes, then they exit.
    gates.open(gate)
    assert call.outcome() == "ok"
    wait_until(lambda: all(exited(pid) for pid in workers), what="the workers to exit")
    assert len(events(proc, "worker.stopped")) == 2
