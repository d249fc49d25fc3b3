"""Limits on client connections: how many, how long to send the preface, how long idle,
how old.

- `ConnectionLimits`: the settings (None = off).
- `Tracked.step(observed, now, limits)`: the decision for one connection, with time passed
  in; no I/O, tested with numbers.
- `ConnectionGuard`: the asyncio shell. The relay asks it to `admit` each new connection
  and to `forget` it when it closes; one sweep per tick looks at every connection
  (`GuardedConnection`) and sends GOAWAY or closes. Nothing runs on the relay's hot path.
- `Http2Limits` + `FrameRate`: HTTP/2 abuse limits (floods of resets, SETTINGS, PINGs,
  empty frames; header block size; streams at once). These are checked by the relay per
  frame, as integer counts; the clock is read only when a count passes its limit. The
  guard counts what they refused.

Semantics follow grpc-go's server keepalive settings:
- max age (MaxConnectionAge): a graceful GOAWAY (NO_ERROR, last-stream-id = the highest
  stream seen); open streams finish, then the connection closes, or when the grace
  (MaxConnectionAgeGrace) is over. Each connection's age is jittered by +-10% so
  connections made together don't all reconnect together.
- idle (MaxConnectionIdle): no open stream, and no new one, for that long. Frames alone
  (keepalive PINGs, WINDOW_UPDATEs) do not count as activity, else a client with keepalive
  on would never be idle.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)

JITTER_RATIO = 0.1


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int | None = None
    preface_timeout_s: float | None = 10.0
    idle_timeout_s: float | None = None
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0

    def tick_s(self) -> float:
        """How often the guard looks: a quarter of the shortest limit, at most 1 s."""
        limits = [s for s in (self.preface_timeout_s, self.idle_timeout_s, self.max_connection_age_s,
                              self.max_connection_age_grace_s if self.max_connection_age_s else None) if s]
        return max(0.02, min([1.0, *(s / 4 for s in limits)]))


class Action(enum.Enum):
    NONE = "none"
    CLOSE_NO_PREFACE = "preface_timeout"  # refused: never sent the HTTP/2 preface in time
    GOAWAY_MAX_AGE = "max_age"
    GOAWAY_IDLE = "idle"
    CLOSE_DRAINED = "drained"              # after our GOAWAY, its last stream ended
    CLOSE_GRACE_EXPIRED = "grace_expired"  # after our GOAWAY, streams still open past the grace


class RefusedReason(enum.Enum):
    MAX_CONNECTIONS = "max_connections"
    PREFACE_TIMEOUT = "preface_timeout"


# ---- HTTP/2 abuse: floods on one connection --------------------------------------------

# What a limit the relay enforces per frame (`Http2Limits`) refused, in
# tritonpilot_http2_refused_total{reason}. All but CONCURRENT_STREAMS close the connection
# with GOAWAY ENHANCE_YOUR_CALM; CONCURRENT_STREAMS refuses the one stream (REFUSED_STREAM).
class Http2Refusal(enum.Enum):
    RAPID_RESET = "rapid_reset"          # client RST_STREAMs (CVE-2023-44487)
    HEADER_BLOCK = "header_block"        # one header block too large (CONTINUATION flood, CVE-2024-27316)
    SETTINGS_FLOOD = "settings_flood"    # SETTINGS Triton must acknowledge (CVE-2019-9515)
    PING_FLOOD = "ping_flood"            # PINGs Triton must answer (CVE-2019-9512)
    EMPTY_FRAMES = "empty_frames"        # DATA/HEADERS/CONTINUATION carrying nothing (CVE-2019-9518)
    CONCURRENT_STREAMS = "concurrent_streams"


# A limit that is off: never reached by a counter that adds 1 per frame.
UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Http2Limits:
    """Per client connection; None = off. Rates are frames per second, over windows of 1 s."""
    # Real clients cancel (deadlines, hedging): 1000/s on one connection is more than any
    # client reaches through the relay (~2-5k calls/s per core) short of cancelling nearly
    # every call, and far below the 10^5/s of a rapid-reset attack.
    max_resets_per_s: int | None = 1000
    # Encoded bytes of one HEADERS + CONTINUATION block; grpc servers refuse metadata past
    # 8-16 KiB anyway, so 64 KiB cuts no call Triton would serve.
    max_header_block_bytes: int | None = 64 * 1024
    # Non-ACK SETTINGS (each forces an ACK): clients send one at start, grpc's BDP
    # estimator a few more over a connection's life.
    max_settings_per_s: int | None = 100
    # Non-ACK PINGs (each forces an answer): keepalive pings come seconds apart; BDP pings
    # at most one per round trip while responses flow.
    max_pings_per_s: int | None = 1000
    # DATA of length 0 without END_STREAM, HEADERS/CONTINUATION with an empty fragment that
    # does not end the block: no client needs them.
    max_empty_frames_per_s: int | None = 100
    # Streams open at once; also advertised to the client in Triton's SETTINGS
    # (min of both). None: Triton's own setting, untouched.
    max_concurrent_streams: int | None = None

    @staticmethod
    def limit(value: int | None) -> int:
        return UNLIMITED if value is None else value


@dataclass(slots=True)
class FrameRate:
    """One kind of frame on one connection: more than `limit` of them within 1 s is a flood.

    The relay adds 1 to `count` per frame and calls `flooded(now)` only when `count`
    passes `limit`, so the clock is read once per `limit` frames, not per frame. A window
    starts at the connection's start and again at each `flooded` call that finds the
    previous one over: `limit + 1` frames inside one window are a flood (no false alarm:
    they did come within 1 s), and over time no more than `limit` per second pass.
    """
    limit: int
    window_start_s: float
    count: int = 0

    def flooded(self, now: float) -> bool:
        if now - self.window_start_s < 1.0:
            return True
        self.window_start_s = now
        self.count = 1
        return False


@dataclass(frozen=True)
class Observed:
    """What a connection looks like now."""
    preface_received: bool
    max_stream_id: int  # the highest client stream seen: grows with every new call
    open_streams: int


@dataclass(slots=True)
class Tracked:
    """The guard's record of one connection."""
    opened_s: float
    max_age_s: float | None  # this connection's own (jittered) age limit
    idle_since_s: float
    seen_stream_id: int = 0
    goaway_s: float | None = None

    @classmethod
    def new(cls, now: float, limits: ConnectionLimits, rng: random.Random) -> Tracked:
        age = limits.max_connection_age_s
        if age is not None:
            age *= 1.0 + rng.uniform(-JITTER_RATIO, JITTER_RATIO)
        return cls(opened_s=now, max_age_s=age, idle_since_s=now)

    def step(self, seen: Observed, now: float, limits: ConnectionLimits) -> Action:
        if self.goaway_s is not None:
            if seen.open_streams == 0:
                return Action.CLOSE_DRAINED
            if now - self.goaway_s >= limits.max_connection_age_grace_s:
                return Action.CLOSE_GRACE_EXPIRED
            return Action.NONE
        if not seen.preface_received:
            if limits.preface_timeout_s is not None and now - self.opened_s >= limits.preface_timeout_s:
                return Action.CLOSE_NO_PREFACE
            return Action.NONE
        if seen.open_streams or seen.max_stream_id != self.seen_stream_id:
            self.idle_since_s = now
            self.seen_stream_id = seen.max_stream_id
        if self.max_age_s is not None and now - self.opened_s >= self.max_age_s:
            self.goaway_s = now
            return Action.GOAWAY_MAX_AGE
        if limits.idle_timeout_s is not None and now - self.idle_since_s >= limits.idle_timeout_s:
            self.goaway_s = now
            return Action.GOAWAY_IDLE
        return Action.NONE


@dataclass(frozen=True)
class ConnectionsSnapshot:
    open: int
    refused_total: Mapping[str, int]  # by RefusedReason value
    goaway_total: Mapping[str, int]   # by Action value: max_age, idle
    http2_refused_total: Mapping[str, int] = field(default_factory=dict)  # by Http2Refusal value


class GuardedConnection(Protocol):
    """What the guard needs of a client connection (the relay's client protocol)."""

    def observe(self) -> Observed: ...

    def goaway(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Counts:
    refused: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in RefusedReason})
    goaway: dict[str, int] = field(default_factory=lambda: {Action.GOAWAY_MAX_AGE.value: 0,
                                                             Action.GOAWAY_IDLE.value: 0})
    http2: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in Http2Refusal})


class ConnectionGuard:
    def __init__(self, limits: ConnectionLimits, rng: random.Random | None = None) -> None:
        self.limits = limits
        self._rng = rng or random.Random()
        self._tracked: dict[GuardedConnection, Tracked] = {}
        self._counts = _Counts()
        self._task: asyncio.Task | None = None
        self._full = False

    @property
    def open(self) -> int:
        return len(self._tracked)

    def admit(self, conn: GuardedConnection, now: float) -> bool:
        """Track a new connection; False (counted) when the limit is reached: close it unread."""
        limit = self.limits.max_connections
        if limit is not None and len(self._tracked) >= limit:
            self._counts.refused[RefusedReason.MAX_CONNECTIONS.value] += 1
            if not self._full:
                self._full = True
                log.warning("relay.max_connections_reached", max_connections=limit)
            return False
        self._full = False
        self._tracked[conn] = Tracked.new(now, self.limits, self._rng)
        return True

    def forget(self, conn: GuardedConnection) -> None:
        self._tracked.pop(conn, None)

    def refused_http2(self, reason: Http2Refusal) -> None:
        """The relay refused a stream or closed a connection for this reason (counted)."""
        self._counts.http2[reason.value] += 1

    def snapshot(self) -> ConnectionsSnapshot:
        return ConnectionsSnapshot(open=len(self._tracked),
                                   refused_total=MappingProxyType(dict(self._counts.refused)),
                                   goaway_total=MappingProxyType(dict(self._counts.goaway)),
                                   http2_refused_total=MappingProxyType(dict(self._counts.http2)))

    def sweep(self, now: float) -> None:
        for conn, tracked in list(self._tracked.items()):
            action = tracked.step(conn.observe(), now, self.limits)
            if action is Action.NONE:
                continue
            if action in (Action.GOAWAY_MAX_AGE, Action.GOAWAY_IDLE):
                self._counts.goaway[action.value] += 1
                log.debug("relay.connection_goaway", reason=action.value,
                          age_s=round(now - tracked.opened_s, 3))
                conn.goaway()
                continue
            if action is Action.CLOSE_NO_PREFACE:
                self._counts.refused[RefusedReason.PREFACE_TIMEOUT.value] += 1
                log.debug("relay.connection_closed", reason=action.value,
                          preface_timeout_s=self.limits.preface_timeout_s)
            elif action is Action.CLOSE_GRACE_EXPIRED:
                log.info("relay.connection_closed", reason=action.value,
                         open_streams=conn.observe().open_streams,
                         grace_s=self.limits.max_connection_age_grace_s)
            self._tracked.pop(conn, None)
            conn.close()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="connection-guard")

    async def _run(self) -> None:
        tick_s = self.limits.tick_s()
        while True:
            await asyncio.sleep(tick_s)
            try:
                self.sweep(time.monotonic())
            except Exception as exc:  # a bug here must not stop the guard for every connection
                log.error("relay.connection_guard_failed", error=repr(exc))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
