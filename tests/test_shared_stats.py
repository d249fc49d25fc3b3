"""The shared-memory counters of `serve --workers N` (proxy/shared_stats.py), in memory:
one writer per row, the reader's sums, a dead worker's row retired, the slots full; a
spawned process attaches the table by its handle, and the table never has a name."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonpilot.proxy.limits import ConnectionsSnapshot
from tritonpilot.proxy.shared_stats import (
    MEMFD_NAME,
    SharedProxyStats,
    SharedStatsReader,
    SharedStatsTable,
    TableHandle,
)
from tritonpilot.proxy.stats import GRPC, HTTP, UNKNOWN_MODEL


@pytest.fixture
def table() -> Iterator[SharedStatsTable]:
    t = SharedStatsTable.create(rows=2, slots=6)
    yield t
    t.close()


def test_in_flight_is_the_exact_sum_of_the_rows_at_every_step(table: SharedStatsTable) -> None:
    a, b = SharedProxyStats(table, 0), SharedProxyStats(table, 1)
    reader = SharedStatsReader(table)
    a.model("m", 0.0).begin(0.0)
    a.model("m", 0.0, HTTP).begin(0.0)
    b.model("m", 0.0).begin(0.0)
    snap = reader.snapshot(1.0)
    assert snap.models["m"].inflight == 3
    assert snap.protocols[("m", GRPC)].inflight == 2 and snap.protocols[("m", HTTP)].inflight == 1
    a.model("m", 1.0).end(1.0, 0, 1.0)
    assert reader.snapshot(1.0).models["m"].inflight == 2  # no publish needed: the cells are live
    b.model("m", 1.0).end(1.0, 0, 1.0)
    a.model("m", 1.0, HTTP).end(1.0, 200, 1.0)
    assert reader.snapshot(2.0).models["m"].inflight == 0


def test_totals_sum_the_published_rows(table: SharedStatsTable) -> None:
    a, b = SharedProxyStats(table, 0), SharedProxyStats(table, 1)
    reader = SharedStatsReader(table)
    for stats, code in ((a, 0), (b, 14)):
        m = stats.model("m", 0.0)
        m.begin(0.0)
        m.end(0.5, code, 0.5)
    a.publish(1.0, ConnectionsSnapshot(open=2, refused_total={"max_connections": 1}, goaway_total={}))
    assert reader.snapshot(1.0).models["m"].started_total == 1  # b has not published yet
    b.publish(1.0, ConnectionsSnapshot(open=1, refused_total={"max_connections": 2}, goaway_total={}))
    m = reader.snapshot(1.0).models["m"]
    assert m.started_total == 2 and m.finished_total == {"OK": 1, "UNAVAILABLE": 1}
    assert m.latency_count == 2 and m.latency_bucket_counts[-1] == 2
    assert m.inflight_seconds == pytest.approx(1.0)
    assert m.inflight_peak == 2  # each worker's window peak, summed: their windows overlap
    conns = reader.connections()
    assert conns.open == 3 and conns.refused_total == {"max_connections": 3}


def test_the_integral_runs_on_to_now_with_the_live_count(table: SharedStatsTable) -> None:
    a = SharedProxyStats(table, 0)
    reader = SharedStatsReader(table)
    a.model("m", 0.0).begin(0.0)
    a.publish(1.0)
    assert reader.snapshot(3.0).models["m"].inflight_seconds == pytest.approx(3.0)


def test_a_retired_row_keeps_its_totals_and_clears_its_in_flight(table: SharedStatsTable) -> None:
    a = SharedProxyStats(table, 0)
    reader = SharedStatsReader(table)
    m = a.model("m", 0.0)
    m.begin(0.0)
    m.end(0.1, 0, 0.1)
    m.begin(0.2)
    m.begin(0.2)
    a.publish(0.5, ConnectionsSnapshot(open=1, refused_total={"idle": 1}, goaway_total={}))
    assert reader.snapshot(0.5).models["m"].inflight == 2
    reader.retire(0)  # the worker died with 2 calls open
    snap = reader.snapshot(1.0)
    assert snap.models["m"].inflight == 0
    assert snap.models["m"].started_total == 3 and snap.models["m"].finished_total == {"OK": 1}
    assert reader.connections().open == 0 and reader.connections().refused_total == {"idle": 1}
    # Its successor starts from zero in the same row; the sums go on from the retired base.
    successor = SharedProxyStats(table, 0)
    successor.model("m", 1.0).begin(1.0)
    successor.publish(1.5)
    snap = reader.snapshot(1.5)
    assert snap.models["m"].inflight == 1 and snap.models["m"].started_total == 4


def test_names_past_the_slots_or_too_long_count_as_the_unknown_model(table: SharedStatsTable) -> None:
    a = SharedProxyStats(table, 0)
    reader = SharedStatsReader(table)
    for name in ("m1", "m2", "m3", "m4", "m5"):  # 6 slots: 2 reserved for the unknown model, 4 names
        a.model(name, 0.0).begin(0.0)
    a.model("x" * 300, 0.0, HTTP).begin(0.0)
    snap = reader.snapshot(1.0)
    assert {m: s.inflight for m, s in snap.models.items()} == {"m1": 1, "m2": 1, "m3": 1, "m4": 1, UNKNOWN_MODEL: 2}
    assert snap.protocols[(UNKNOWN_MODEL, HTTP)].inflight == 1


def test_peaks_reset_by_their_reader(table: SharedStatsTable) -> None:
    a, b = SharedProxyStats(table, 0), SharedProxyStats(table, 1)
    reader = SharedStatsReader(table)
    for stats in (a, b):
        for _ in range(2):
            stats.model("m", 0.0).begin(0.0)
    assert reader.snapshot(0.1, reset_peaks=True).models["m"].inflight_peak == 4
    for stats in (a, b):
        stats.model("m", 0.2).end(0.2, 0, 0.2)
        stats.model("m", 0.2).end(0.2, 0, 0.2)
        stats.publish(0.3)
    assert reader.snapshot(0.4, reset_peaks=True).models["m"].inflight_peak <= 4
    assert reader.snapshot(0.5).models["m"].inflight_peak == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["a", "b"]), st.booleans()), max_size=60),
       st.integers(0, 1))
def test_in_flight_never_negative_and_exact_whatever_the_order(steps: list[tuple[int, str, bool]],
                                                                dies: int) -> None:
    table = SharedStatsTable.create(rows=2, slots=8)
    try:
        workers = [SharedProxyStats(table, 0), SharedProxyStats(table, 1)]
        reader = SharedStatsReader(table)
        truth = {(w, m): 0 for w in (0, 1) for m in ("a", "b")}
        for now, (w, model, up) in enumerate(steps):
            stats = workers[w].model(model, float(now))
            if up:
                stats.begin(float(now))
                truth[(w, model)] += 1
            else:
                stats.end(float(now), 0, 0.0)
                truth[(w, model)] = max(0, truth[(w, model)] - 1)
            snap = reader.snapshot(float(now))
            for m in ("a", "b"):
                got = snap.models[m].inflight if m in snap.models else 0
                assert got == truth[(0, m)] + truth[(1, m)] >= 0
        reader.retire(dies)
        snap = reader.snapshot(1000.0)
        for m in ("a", "b"):
            got = snap.models[m].inflight if m in snap.models else 0
            assert got == truth[(1 - dies, m)]
    finally:
        table.close()


def test_a_cap_compares_the_models_in_flight_over_every_worker(table: SharedStatsTable) -> None:
    a, b = SharedProxyStats(table, 0), SharedProxyStats(table, 1)
    reader = SharedStatsReader(table)
    a.model("m", 0.0).begin(0.0)
    a.model("m", 0.0, HTTP).begin(0.0)
    b.model("other", 0.0).begin(0.0)
    assert b.model("m", 0.0).inflight == 2  # b has none of m itself
    b.model("m", 0.0).begin(0.0)
    assert a.model("m", 0.0).inflight == 3
    reader.retire(0)  # a died: its calls are gone
    assert b.model("m", 0.0).inflight == 1
    SharedProxyStats(table, 0).model("x", 1.0).begin(1.0)  # the successor reuses a's slots for other names
    assert b.model("m", 1.0).inflight == 1


def test_an_idle_worker_publishes_only_what_changed(table: SharedStatsTable) -> None:
    a = SharedProxyStats(table, 0)
    reader = SharedStatsReader(table)
    idle = ConnectionsSnapshot(open=0, refused_total={}, goaway_total={})

    def seq() -> int:
        got = table.read_blob(0)
        assert got is not None
        return got[0]

    a.publish(0.0, idle)
    first = seq()
    a.publish(0.25, idle)
    assert seq() == first  # nothing changed: skipped
    m = a.model("m", 0.25)
    m.begin(0.3)
    a.publish(0.5, idle)
    in_flight = seq()
    assert in_flight > first
    a.publish(0.75, idle)
    assert seq() > in_flight  # in flight: its integral grows, every tick publishes
    m.end(0.8, 0, 0.5)
    a.publish(1.0, idle)
    ended = seq()
    assert seq() > in_flight
    a.publish(1.25, idle)
    assert seq() == ended
    a.publish(1.5, ConnectionsSnapshot(open=1, refused_total={}, goaway_total={}))
    assert seq() > ended  # a connection opened
    snap = reader.snapshot(10.0)
    assert snap.models["m"].started_total == 1 and snap.models["m"].inflight_seconds == pytest.approx(0.5)
    a.publish(1.75, ConnectionsSnapshot(open=1, refused_total={}, goaway_total={}), force=True)
    assert reader.snapshot(10.0).models["m"].inflight_seconds == pytest.approx(0.5)


def _begin_in_a_worker(handle: TableHandle, conn: Connection) -> None:
    """A spawned worker's part: one call of `m` in flight in row 1, then wait to be told to end it."""
    table = SharedStatsTable.attach(handle)
    stats = SharedProxyStats(table, 1)
    stats.model("m", 0.0).begin(0.0)
    conn.send("begun")
    conn.recv()
    stats.model("m", 1.0).end(1.0, 0, 1.0)
    table.close()


def table_maps(inode: int) -> list[str]:
    """This process's mappings of the file with that inode."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if MEMFD_NAME in line and int(line.split()[4]) == inode]


def test_a_spawned_process_attaches_by_the_handle_and_the_table_has_no_name() -> None:
    table = SharedStatsTable.create(rows=2, slots=6)
    inode = os.fstat(table.handle().fd).st_ino
    try:
        # Mapped, yet no name refers to it: nothing is left behind however the processes end.
        assert table_maps(inode) and all(line.endswith("(deleted)") for line in table_maps(inode))
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(target=_begin_in_a_worker, args=(table.handle(), theirs), daemon=True)
        child.start()
        theirs.close()
        try:
            assert ours.poll(60) and ours.recv() == "begun"
            reader = SharedStatsReader(table)
            assert reader.snapshot(0.5).models["m"].inflight == 1  # written by the other process
            ours.send("end")
            child.join(60)
            assert child.exitcode == 0
            assert reader.snapshot(1.0).models["m"].inflight == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(10)
    finally:
        table.close()
    assert table_maps(inode) == []  # unmapped here; the memory went with its last mapping
