"""Client connection limits: max age (graceful GOAWAY, calls finish, clients reconnect), idle
timeout, the preface deadline and the connection cap, each counted in /metrics.

The decision for one connection (limits.Tracked.step) is tested with numbers first; then
the real thing, through a sidecar in front of a real Triton."""

from __future__ import annotations

import queue
import random
import socket
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from proxy_support import H2GrpcClient, fp32_inputs, gate_inputs, wait_until

from tritonpilot.proxy.limits import Action, ConnectionLimits, Observed, Tracked
from tritonpilot.tools.embedded import EmbeddedTriton

# ------------------------------------------------------------------------------ the decision, in numbers

ACTIVE = Observed(preface_received=True, max_stream_id=1, open_streams=1)
QUIET = Observed(preface_received=True, max_stream_id=1, open_streams=0)
SILENT = Observed(preface_received=False, max_stream_id=0, open_streams=0)


def tracked(limits: ConnectionLimits, at: float = 0.0) -> Tracked:
    return Tracked.new(at, limits, random.Random(7))


def test_preface_deadline_closes_a_silent_connection_and_only_that() -> None:
    limits = ConnectionLimits(preface_timeout_s=10.0)
    t = tracked(limits)
    assert t.step(SILENT, 9.9, limits) is Action.NONE
    assert t.step(SILENT, 10.0, limits) is Action.CLOSE_NO_PREFACE
    assert tracked(limits).step(QUIET, 500.0, limits) is Action.NONE  # spoke in time: no other limit set
    off = ConnectionLimits(preface_timeout_s=None)
    assert tracked(off).step(SILENT, 1e6, off) is Action.NONE


def test_max_age_is_jittered_within_ten_percent() -> None:
    limits = ConnectionLimits(preface_timeout_s=None, max_connection_age_s=100.0)
    rng = random.Random(1)
    ages = [Tracked.new(0.0, limits, rng).max_age_s for _ in range(500)]
    assert all(90.0 <= a <= 110.0 for a in ages if a is not None)
    assert max(ages) - min(ages) > 10.0  # spread, not one value  # type: ignore[operator]


def test_max_age_goaway_then_close_when_drained_or_after_the_grace() -> None:
    limits = ConnectionLimits(max_connection_age_s=100.0, max_connection_age_grace_s=30.0)
    t = tracked(limits)
    assert t.max_age_s is not None
    assert t.step(ACTIVE, t.max_age_s - 0.1, limits) is Action.NONE
    assert t.step(ACTIVE, t.max_age_s, limits) is Action.GOAWAY_MAX_AGE
    assert t.step(ACTIVE, t.max_age_s + 29.0, limits) is Action.NONE  # calls still finishing
    assert t.step(QUIET, t.max_age_s + 29.5, limits) is Action.CLOSE_DRAINED

    t = tracked(limits)
    assert t.max_age_s is not None
    assert t.step(ACTIVE, t.max_age_s, limits) is Action.GOAWAY_MAX_AGE
    assert t.step(ACTIVE, t.max_age_s + 30.0, limits) is Action.CLOSE_GRACE_EXPIRED


def test_idle_counts_from_the_last_call_and_ignores_bare_frames() -> None:
    limits = ConnectionLimits(idle_timeout_s=60.0)
    t = tracked(limits)
    assert t.step(ACTIVE, 50.0, limits) is Action.NONE      # a call open: not idle
    assert t.step(QUIET, 100.0, limits) is Action.NONE      # idle since 50 at most
    assert t.step(QUIET, 110.0, limits) is Action.GOAWAY_IDLE
    t = tracked(limits)
    assert t.step(QUIET, 59.0, limits) is Action.NONE
    # A call that came and went between two looks (max stream id moved) resets the clock.
    assert t.step(Observed(True, 3, 0), 70.0, limits) is Action.NONE
    assert t.step(Observed(True, 3, 0), 129.0, limits) is Action.NONE
    assert t.step(Observed(True, 3, 0), 130.0, limits) is Action.GOAWAY_IDLE
    assert t.step(Observed(True, 3, 0), 131.0, limits) is Action.CLOSE_DRAINED


# ------------------------------------------------------------------------------ through a real sidecar

# Answered by Triton itself (the proxy's own health answer ends with a RST_STREAM that the h2
# client would trip over on its next read).
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"


def metric(sidecar, name: str, **labels: str) -> float:
    return sidecar.metric(name, **labels) or 0.0


def open_connections(sidecar) -> float:
    return metric(sidecar, "tritonpilot_connections")


def pair_ids(sidecar) -> set[int]:
    async def ids() -> set[int]:
        return {id(p) for p in sidecar.sidecar.relays.relay.pairs}
    return sidecar.call(ids())


def closed_by_peer(sock: socket.socket, timeout_s: float = 30.0) -> bool:
    """Read until the peer closes; True when it did within timeout_s."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        pass
    return True


@pytest.mark.triton
def test_max_age_sends_goaway_lets_the_open_call_finish_and_the_client_reconnects(
        gate_triton: EmbeddedTriton, sidecar_factory, gates) -> None:
    sidecar = sidecar_factory(gate_triton.grpc_url, max_connection_age_s=2.0, max_connection_age_grace_s=60.0)
    client = grpcclient.InferenceServerClient(sidecar.url)
    gate = gates.new()
    done: queue.Queue = queue.Queue()
    client.async_infer("gate", gate_inputs(gate), request_id="held",
                       callback=lambda result, error: done.put((result, error)))
    wait_until(lambda: gates.holding(gate), what="the call held in the model")
    first = pair_ids(sidecar)
    assert len(first) == 1
    wait_until(lambda: metric(sidecar, "tritonpilot_connections_goaway_total", reason="max_age") >= 1,
               what="the max-age GOAWAY")
    assert done.empty()  # GOAWAY is graceful: the held call is still running

    gates.open(gate)
    result, error = done.get(timeout=60)
    assert error is None and result.get_response().id == "held"
    # The next call goes on a new connection; the old one closed once drained.
    assert client.infer("gate", gate_inputs(None), request_id="next", client_timeout=30).get_response().id == "next"
    wait_until(lambda: first.isdisjoint(pair_ids(sidecar)), what="the aged connection to close")
    assert sidecar.finished("gate") == {"OK": 2}
    client.close()
    wait_until(lambda: open_connections(sidecar) == 0, what="no connection open")


@pytest.mark.triton
def test_idle_connection_gets_goaway_and_grpc_clients_reconnect(triton: EmbeddedTriton, sidecar_factory) -> None:
    sidecar = sidecar_factory(triton.grpc_url, idle_timeout_s=1.0)
    raw = H2GrpcClient(sidecar.url)
    assert raw.call(SERVER_LIVE, b"").grpc_status == 0
    with pytest.raises(ConnectionError, match="GOAWAY 0"):  # NO_ERROR, from the idle timeout
        raw._read_once()
        while True:
            raw._read_once()
    assert closed_by_peer(raw.sock)
    assert metric(sidecar, "tritonpilot_connections_goaway_total", reason="idle") >= 1

    client = grpcclient.InferenceServerClient(sidecar.url)
    data = np.array([1.0], dtype=np.float32)
    assert client.infer("fast", fp32_inputs(data), client_timeout=30).as_numpy("OUTPUT0").tolist() == [1.0]
    wait_until(lambda: metric(sidecar, "tritonpilot_connections_goaway_total", reason="idle") >= 2,
               what="the client's connection to go idle too")
    assert client.infer("fast", fp32_inputs(data), client_timeout=30).as_numpy("OUTPUT0").tolist() == [1.0]
    client.close()


@pytest.mark.triton
@pytest.mark.parametrize("sent", [b"", b"PRI * HTTP/2.0\r\n"], ids=["nothing", "half-a-preface"])
def test_preface_deadline_closes_a_client_that_does_not_speak_http2(triton: EmbeddedTriton, sidecar_factory,
                                                                   sent: bytes) -> None:
    sidecar = sidecar_factory(triton.grpc_url, preface_timeout_s=1.0)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", sidecar.sidecar.port), timeout=10) as sock:
        sock.sendall(sent)
        assert closed_by_peer(sock)
    assert time.monotonic() - started >= 0.5  # closed by the deadline, not at once
    assert metric(sidecar, "tritonpilot_connections_refused_total", reason="preface_timeout") == 1
    # A client that does speak is served (and not counted).
    assert H2GrpcClient(sidecar.url).call(SERVER_LIVE, b"").grpc_status == 0


@pytest.mark.triton
def test_connections_past_the_cap_are_closed_unread_and_counted(triton: EmbeddedTriton, sidecar_factory) -> None:
    sidecar = sidecar_factory(triton.grpc_url, max_connections=2)
    kept = [H2GrpcClient(sidecar.url) for _ in range(2)]
    for client in kept:
        assert client.call(SERVER_LIVE, b"").grpc_status == 0
    assert open_connections(sidecar) == 2

    with socket.create_connection(("127.0.0.1", sidecar.sidecar.port), timeout=10) as third:
        assert closed_by_peer(third)
    assert metric(sidecar, "tritonpilot_connections_refused_total", reason="max_connections") == 1
    # The two admitted go on.
    for client in kept:
        assert client.call(SERVER_LIVE, b"").grpc_status == 0
    assert open_connections(sidecar) == 2

    kept[0].close()
    kept[0].sock.close()
    wait_until(lambda: open_connections(sidecar) == 1, what="a slot to free up")
    replacement = H2GrpcClient(sidecar.url)
    assert replacement.call(SERVER_LIVE, b"").grpc_status == 0
    assert metric(sidecar, "tritonpilot_connections_refused_total", reason="max_connections") == 1
    for client in (kept[1], replacement):
        client.close()
        client.sock.close()
