"""proxy/sockets.py: the reachability log the relay shells share."""

from __future__ import annotations

from structlog.testing import capture_logs

from tritonpilot.proxy.sockets import Reachability


def test_an_outage_is_logged_when_it_starts_every_remind_s_and_when_it_ends() -> None:
    r = Reachability("relay", remind_s=30.0)
    with capture_logs() as logs:
        for t in (0.0, 1.0, 2.0, 29.0):  # four connections refused: one warning
            r.unreachable("down", t)
        r.unreachable("down", 31.0)  # a reminder, with the count so far
        r.reachable(40.0)
        r.reachable(41.0)  # up already: nothing
        r.unreachable("down again", 50.0)  # a new outage
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("relay.upstream_unreachable", "warning"), ("relay.upstream_still_unreachable", "warning"),
        ("relay.upstream_reachable", "info"), ("relay.upstream_unreachable", "warning")]
    assert (logs[1]["connections_refused"], logs[1]["down_s"]) == (5, 31.0)
    assert (logs[2]["connections_refused"], logs[2]["down_s"]) == (5, 40.0)
    assert logs[3]["reason"] == "down again" and r.refused == 1
