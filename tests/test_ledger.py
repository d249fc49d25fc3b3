"""The ledger (proxy/ledger.py): request events in, per-model counts out; the one place where
in-flight moves. Tables for each event, and a property: whatever order events come in, in
flight never goes negative, equals the tickets open, and is 0 once the connection is lost."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tritonpilot.proxy.ledger import Ledger
from tritonpilot.proxy.shedding import InflightCaps
from tritonpilot.proxy.stats import GRPC, HTTP, HTTP_CLIENT_CLOSED, MAX_MODELS, UNKNOWN_MODEL, ProxyStats

CANCELLED, RESOURCE_EXHAUSTED, UNAVAILABLE = 1, 8, 14


def model(stats: ProxyStats, name: str, now_s: float = 10.0):
    return stats.snapshot(now_s).models[name]


def test_started_then_ended_counts_one_request_with_its_latency() -> None:
    stats = ProxyStats()
    ledger = Ledger(stats)
    ticket = ledger.started("m", 1.0, since_s=0.5)
    assert model(stats, "m").inflight == 1 and ledger.open == {ticket}
    ledger.ended(ticket, 0, 1.25)
    snap = model(stats, "m")
    assert (snap.inflight, snap.started_total, snap.finished_total) == (0, 1, {"OK": 1})
    assert snap.latency_count == 1 and snap.latency_sum_s == pytest.approx(0.75)  # from since_s
    assert not ledger.open


def test_an_untimed_end_adds_no_latency() -> None:
    stats = ProxyStats()
    ledger = Ledger(stats)
    ledger.ended(ledger.started("m", 1.0), CANCELLED, 2.0, timed=False)
    assert model(stats, "m").latency_count == 0 and model(stats, "m").finished_total == {"CANCELLED": 1}


def test_a_second_end_of_a_ticket_does_nothing() -> None:
    stats = ProxyStats()
    ledger = Ledger(stats)
    first, second = ledger.started("m", 1.0), ledger.started("m", 1.0)
    ledger.ended(first, 0, 2.0)
    ledger.ended(first, 0, 2.0)
    assert model(stats, "m").inflight == 1 and model(stats, "m").finished_total == {"OK": 1}
    ledger.ended(second, 0, 2.0)
    assert model(stats, "m").inflight == 0


def test_lost_ends_every_open_request_untimed() -> None:
    stats = ProxyStats()
    ledger = Ledger(stats)
    tickets = [ledger.started(name, 1.0) for name in ("a", "a", "b")]
    ledger.ended(tickets[0], 0, 1.5)
    assert ledger.lost(UNAVAILABLE, 2.0) == 2
    assert model(stats, "a").finished_total == {"OK": 1, "UNAVAILABLE": 1}
    assert model(stats, "b").finished_total == {"UNAVAILABLE": 1}
    assert model(stats, "a").inflight == model(stats, "b").inflight == 0
    assert model(stats, "a").latency_count == 1  # only the one that ended itself
    ledger.ended(tickets[2], 0, 3.0)  # the core ending it afterwards changes nothing
    assert ledger.lost(UNAVAILABLE, 3.0) == 0 and model(stats, "b").finished_total == {"UNAVAILABLE": 1}


def test_refused_is_started_and_finished_never_in_flight() -> None:
    stats = ProxyStats()
    ledger = Ledger(stats)
    ledger.refused("m", 7, 1.0)
    snap = model(stats, "m")
    assert (snap.inflight, snap.inflight_peak, snap.started_total, snap.finished_total) == (
        0, 0, 1, {"PERMISSION_DENIED": 1})


def test_at_cap_refuses_only_at_the_cap_and_counts_the_refusal() -> None:
    stats = ProxyStats()
    ledger = Ledger(stats)
    caps = InflightCaps(default=2, per_model={"small": 1})
    assert ledger.at_cap("m", caps.cap, 1.0) is None
    ledger.started("m", 1.0)
    assert ledger.at_cap("m", caps.cap, 1.0) is None
    ledger.started("m", 1.0)
    assert ledger.at_cap("m", caps.cap, 1.0) == ("m", 2)
    assert model(stats, "m").finished_total == {"RESOURCE_EXHAUSTED": 1}
    assert model(stats, "m").inflight == 2 and model(stats, "m").started_total == 3
    ledger.started("small", 1.0)
    assert ledger.at_cap("small", caps.cap, 1.0) == ("small", 1)
    assert ledger.at_cap("uncapped", InflightCaps(per_model={"m": 1}).cap, 1.0) is None


def test_past_max_models_a_new_name_counts_and_is_capped_as_the_unknown_model() -> None:
    stats = ProxyStats()
    ledger = Ledger(stats)
    for i in range(MAX_MODELS):
        ledger.refused(f"m{i}", 0, 1.0)
    ledger.started("one-too-many", 1.0)
    assert model(stats, UNKNOWN_MODEL).inflight == 1
    assert ledger.at_cap("another", InflightCaps(1).cap, 1.0) == (UNKNOWN_MODEL, 1)


def test_another_protocol_names_itself_to_the_stats() -> None:
    seen: list[tuple[str, str]] = []

    class Stats(ProxyStats):
        def model(self, name, now_s, protocol="grpc"):  # the keyword an HTTP relay's stats take
            seen.append((name, protocol))
            return super().model(name, now_s)

    ledger = Ledger(Stats(), protocol="http")
    ledger.ended(ledger.started("m", 1.0), 0, 2.0)
    assert seen == [("m", "http")]
    assert Ledger(ProxyStats()).protocol == "grpc"


def test_an_http_ledger_counts_http_statuses_and_sheds_with_429() -> None:
    stats = ProxyStats()
    ledger = Ledger(stats, protocol=HTTP)
    ledger.ended(ledger.started("m", 1.0), 200, 1.5)
    open_one = ledger.started("m", 2.0)
    assert ledger.at_cap("m", InflightCaps(1).cap, 2.0) == ("m", 1)
    assert ledger.lost(HTTP_CLIENT_CLOSED, 3.0) == 1 and ledger.open == set()
    ledger.ended(open_one, 200, 4.0)  # too late: lost ended it
    snap = stats.snapshot(5.0).protocols[("m", HTTP)]
    assert (snap.inflight, snap.started_total, snap.latency_count) == (0, 3, 1)
    assert snap.finished_total == {"200": 1, "429": 1, "499": 1}
    assert ("m", GRPC) not in stats.snapshot(5.0).protocols


def test_both_protocols_share_a_models_in_flight_and_its_cap() -> None:
    stats = ProxyStats()
    grpc, http = Ledger(stats), Ledger(stats, protocol=HTTP)
    cap = InflightCaps(2).cap
    grpc.started("m", 1.0)
    http.started("m", 1.0)
    assert http.at_cap("m", cap, 1.0) == ("m", 2) and grpc.at_cap("m", cap, 1.0) == ("m", 2)
    http.lost(HTTP_CLIENT_CLOSED, 2.0)
    assert model(stats, "m").inflight == 1 and grpc.at_cap("m", cap, 2.0) is None
    assert model(stats, "m").finished_total == {"429": 1, "RESOURCE_EXHAUSTED": 1, "499": 1}


def test_a_protocol_without_a_shed_code_is_refused_at_once() -> None:
    with pytest.raises(KeyError):
        Ledger(ProxyStats(), protocol="smtp")


# (operation, model index) sequences: start a request, end one of the open ones (possibly a
# second time), refuse one, or lose the connection.
events = st.lists(st.tuples(st.sampled_from(["start", "end", "end_again", "refuse", "lost"]),
                            st.integers(0, 2)), max_size=60)


@given(events)
def test_in_flight_is_never_negative_and_always_the_tickets_open(ops: list[tuple[str, int]]) -> None:
    stats = ProxyStats()
    ledger = Ledger(stats)
    names = ["a", "b", "c"]
    ended = []
    now = 0.0
    for op, i in ops:
        now += 0.01
        if op == "start":
            ledger.started(names[i], now)
        elif op == "end" and ledger.open:
            ticket = sorted(ledger.open, key=id)[i % len(ledger.open)]
            ledger.ended(ticket, 0, now, timed=bool(i % 2))
            ended.append(ticket)
        elif op == "end_again" and ended:
            ledger.ended(ended[i % len(ended)], 0, now)
        elif op == "refuse":
            ledger.refused(names[i], RESOURCE_EXHAUSTED, now)
        elif op == "lost":
            ledger.lost(UNAVAILABLE, now)
        snap = stats.snapshot(now).models
        for name in names:
            inflight = snap[name].inflight if name in snap else 0
            assert inflight == sum(1 for t in ledger.open if t.model == name) >= 0
    ledger.lost(UNAVAILABLE, now + 1)
    assert all(m.inflight == 0 for m in stats.snapshot(now + 1).models.values())
    for m in stats.snapshot(now + 1).models.values():
        assert m.started_total == sum(m.finished_total.values())  # every request ended exactly once
