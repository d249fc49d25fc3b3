"""The ledger: request events in, per-model counts (proxy/stats.py) out, for both protocols.

A protocol core (grpc_core.py, http_core.py) says what happened to requests; the ledger of
its connection is the one place where a model's in-flight count goes up or down:

- `started(model, now_s)` -> a Ticket: +1 in flight; the ticket is the request's.
- `ended(ticket, code, now_s)`: -1 in flight, counted under `code`, with its latency.
- `refused(model, code)`: answered by the proxy at once; never in flight.
- `at_cap(model, cap_of, now_s)`: the model is at its cap: counted as refused with the
  protocol's shed code (gRPC RESOURCE_EXHAUSTED, HTTP 429), never in flight.
- `lost(code, now_s)`: the connection is gone: every ticket still open ends with `code`.

A code is the protocol's own, an int either way: gRPC's status, or the HTTP status (499
client gone, 502 Triton gone or not speaking HTTP); stats.code_name labels it by the
ledger's `protocol`. Both protocols' requests of one model share its in-flight count, so a
cap compares the model's requests by both.

Why the counts can neither go negative nor get stuck: a ticket is in `open` from
`started` until its first end, and only a ticket taken out of `open` decrements (a second
end of the same ticket does nothing). `lost` ends whatever is still in `open`, so when a
connection closes, its requests leave the gauge whatever its core remembered.

Time is passed in (monotonic seconds). Tickets are plain objects, one per request, not per
frame; the calls are plain method calls on the event loop's thread, no locks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from tritonpilot.proxy.stats import GRPC, HTTP, ModelStats, ProxyStats
from tritonpilot.proxy.wire import GRPC_RESOURCE_EXHAUSTED

# What a request past its model's cap is answered and counted with: HTTP's "Too Many
# Requests", the status gRPC's RESOURCE_EXHAUSTED maps to (Triton's own "too busy", a full
# queue, is UNAVAILABLE / 503: the proxy's shedding stays apart from Triton's in the metrics).
HTTP_TOO_MANY_REQUESTS = 429
_SHED_CODES = {GRPC: GRPC_RESOURCE_EXHAUSTED, HTTP: HTTP_TOO_MANY_REQUESTS}


class Ticket:
    """One request in flight: its model's counters and when its latency started."""

    __slots__ = ("stats", "since_s")

    def __init__(self, stats: ModelStats, since_s: float) -> None:
        self.stats = stats
        self.since_s = since_s

    @property
    def model(self) -> str:
        return self.stats.model

    def __lt__(self, other: Ticket) -> bool:  # the older request first
        return self.since_s < other.since_s


class Ledger:
    """The requests of one connection. `protocol` names who feeds it ("grpc", "http")."""

    __slots__ = ("_model", "open", "protocol", "shed_code")

    def __init__(self, stats: ProxyStats, protocol: str = GRPC) -> None:
        self.protocol = protocol
        self.shed_code = _SHED_CODES[protocol]
        # ProxyStats.model keeps its gRPC signature; other protocols name themselves (the
        # keyword their ProxyStats takes, bound once: a C call, no Python frame per request),
        # gRPC's default call stays the cheapest.
        self._model: Callable[[str, float], ModelStats] = (
            stats.model if protocol == GRPC else functools.partial(stats.model, protocol=protocol))
        self.open: set[Ticket] = set()

    def started(self, model: str, now_s: float, since_s: float | None = None) -> Ticket:
        """A request for `model` is in flight from now; its latency counts from `since_s`
        (default now: e.g. a unary call's headers came before the message that named it)."""
        if since_s is None:
            since_s = now_s
        stats = self._model(model, since_s)
        stats.begin(now_s)
        ticket = Ticket(stats, since_s)
        self.open.add(ticket)
        return ticket

    def ended(self, ticket: Ticket, code: int, now_s: float, timed: bool = True) -> None:
        """The request is over with `code` (gRPC status; HTTP status). timed=False: no latency
        applies (a stream closed with the request unanswered). A second end does nothing."""
        try:
            self.open.remove(ticket)
        except KeyError:
            return
        ticket.stats.end(now_s, code, now_s - ticket.since_s if timed else None)

    def at_cap(self, model: str, cap_of: Callable[[str], int | None], now_s: float) -> tuple[str, int] | None:
        """(model, cap) when `model` already has `cap` requests in flight (by every protocol),
        counted as refused with `shed_code` (RESOURCE_EXHAUSTED; HTTP 429); None (nothing
        counted) when it may start. `cap_of(model)` is the model's cap or None
        (shedding.InflightCaps.cap). A model past MAX_MODELS counts under the stats' own name
        for it, and its cap is that name's."""
        stats = self._model(model, now_s)
        cap = cap_of(stats.model)
        if cap is None or stats.inflight < cap:
            return None
        stats.refused(self.shed_code)
        return stats.model, cap

    def refused(self, model: str, code: int, now_s: float) -> None:
        """A request the proxy answered itself at once: started and finished, never in flight."""
        self._model(model, now_s).refused(code)

    def lost(self, code: int, now_s: float) -> int:
        """The connection is gone: end every open request with `code`, untimed. Returns how
        many were still open (0 when the core had ended each itself)."""
        tickets, self.open = self.open, set()
        for ticket in tickets:
            ticket.stats.end(now_s, code, None)
        return len(tickets)
