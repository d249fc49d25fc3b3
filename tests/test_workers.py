"""`serve --workers N`: relay processes sharing the client ports, counting in shared memory.

With 2 workers and N held requests over many connections (gRPC and HTTP), the in-flight
gauge reads exactly N, then 0; a worker killed under load loses only its own connections
and the gauge comes back to the truth; SIGTERM lets the calls open on every worker finish."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from proxy_support import SidecarThread, gate_inputs, scrape, wait_until

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
