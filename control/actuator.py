"""Applying decisions: one reload at a time per model, never blocking the control loop.

A reload is a task: read the live config, build the override, load it, then
verify from Triton's own config that the count and flags took and the model is
READY. The loop submits and later collects results; it never awaits the RPC.

- A failed load leaves the old model serving (Triton does this). The exact
  (count, flags) that failed is not tried again for `failed_config_backoff_s`.
- The load RPC waits up to `timeout_s` (control.reload_timeout_s) for Triton's
  answer. Without one, Triton may still finish the load, so the reload is verified
  like any other, for up to `verify_timeout_s` more. Triton itself is not asked to stop.

Every reload ends with one `ReloadOutcome` (`tritonpilot_reloads_total{result}`):
- "ok": Triton's own config shows the count and flags and the model is READY (also
  when the load RPC had no answer in time but the change showed within verify_timeout_s).
- "failed": Triton refused or failed to load the config (INVALID_ARG and the like; the
  old model keeps serving), or another error (a bug: the error says so).
- "timeout": no answer to the load within timeout_s, and verify_timeout_s more of
  checking did not show the change (e.g. an in-place update blocked under load).
- "unverified": Triton answered the load, but within verify_timeout_s its config or
  readiness did not show the change.
- "unavailable": Triton did not answer at all (down, restarting, a connection lost):
  nothing is known about the config, so it is not backed off from.
- "cancelled": the controller stopped (sidecar shutdown) while the reload was in
  flight; Triton may still complete a load it had begun.
"failed", "timeout" and "unverified" say something about the config itself: that
exact (count, flags) is backed off from for failed_config_backoff_s (CONFIG_FAILURES).
- Strategy "full" bumps a generation parameter with every change so Triton
  loads the new copy beside the old and swaps (no blocking, no dropped
  requests, briefly two copies in memory); "update" changes the count only
  (in place: no second copy, but it can block under load; triton-facts.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from tritonpilot.control.overrides import build_override, matches, read_state
from tritonpilot.control.triton import LoadFailed, LoadTimedOut, TritonClient, TritonError, TritonUnavailable

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class ReloadRequest:
    model: str
    instances: int
    profile: str
    parameters: Mapping[str, str]
    managed_keys: frozenset[str]
    strategy: str  # "full" | "update"

    @property
    def key(self) -> tuple:
        return (self.model, self.instances, tuple(sorted(self.parameters.items())))


class ReloadOutcome(StrEnum):
    """How a reload ended (the module docstring says when each happens)."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    UNVERIFIED = "unverified"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"


# Results that say something about the config itself: it is not sent again for a while.
# The others ("unavailable": Triton did not answer; "cancelled") say nothing about it.
CONFIG_FAILURES: frozenset[ReloadOutcome] = frozenset({ReloadOutcome.FAILED, ReloadOutcome.UNVERIFIED,
                                                       ReloadOutcome.TIMEOUT})


@dataclass(frozen=True)
class ReloadResult:
    request: ReloadRequest
    ok: bool
    result: ReloadOutcome
    duration_s: float
    error: str = ""
    instances_before: int | None = None


@dataclass
class _Pending:
    request: ReloadRequest
    started_s: float
    task: asyncio.Task


@dataclass
class Actuator:
    client: TritonClient
    timeout_s: float = 120.0
    failed_config_backoff_s: float = 300.0
    verify_timeout_s: float = 30.0
    clock: Clock = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # between verify polls; tests pass a fake
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _backoff_until: dict[tuple, float] = field(default_factory=dict)

    def pending(self, model: str) -> ReloadRequest | None:
        p = self._pending.get(model)
        return p.request if p else None

    def in_backoff(self, request: ReloadRequest, now_s: float) -> bool:
        return self._backoff_until.get(request.key, float("-inf")) > now_s

    def submit(self, request: ReloadRequest) -> bool:
        """Start a reload unless one is pending for the model or this config failed lately."""
        now = self.clock()
        if request.model in self._pending or self.in_backoff(request, now):
            return False
        task = asyncio.get_running_loop().create_task(self._reload(request), name=f"reload-{request.model}")
        self._pending[request.model] = _Pending(request, now, task)
        return True

    def collect(self) -> list[ReloadResult]:
        """Results of reloads that have finished since the last call."""
        done = []
        for model, p in list(self._pending.items()):
            if not p.task.done():
                continue
            del self._pending[model]
            if p.task.cancelled():
                result = ReloadResult(p.request, False, ReloadOutcome.CANCELLED, self.clock() - p.started_s,
                                      error="the controller stopped while the reload was in flight")
            elif p.task.exception() is not None:  # a bug: report it, keep running
                result = ReloadResult(p.request, False, ReloadOutcome.FAILED, self.clock() - p.started_s,
                                      error=repr(p.task.exception()))
            else:
                result = p.task.result()
            if result.result in CONFIG_FAILURES:
                self._backoff_until[p.request.key] = self.clock() + self.failed_config_backoff_s
            done.append(result)
        return done

    async def close(self) -> None:
        for p in self._pending.values():
            p.task.cancel()
        await asyncio.gather(*(p.task for p in self._pending.values()), return_exceptions=True)

    async def _reload(self, request: ReloadRequest) -> ReloadResult:
        started = self.clock()

        def result(kind: ReloadOutcome, error: str = "", before: int | None = None) -> ReloadResult:
            return ReloadResult(request, kind is ReloadOutcome.OK, kind, self.clock() - started, error, before)

        try:
            live = await self.client.get_config(request.model)
            state = read_state(live)
            generation = state.generation + 1 if request.strategy == "full" else None
            override = build_override(live, request.instances, request.parameters,
                                      request.managed_keys, generation)
            no_answer: str | None = None
            try:
                await self.client.load(request.model, override, self.timeout_s)
            except LoadTimedOut as exc:
                no_answer = str(exc)  # Triton may still finish it (in-place updates block under load): verify
            if not await self._verify(request):
                if no_answer is not None:
                    return result(ReloadOutcome.TIMEOUT, f"{no_answer}, and Triton's config or readiness did not "
                                  f"show the change {self.verify_timeout_s:g} s later", state.instances)
                return result(ReloadOutcome.UNVERIFIED, "Triton answered the load, but its config or readiness "
                              f"did not show the change within {self.verify_timeout_s:g} s", state.instances)
            return result(ReloadOutcome.OK, before=state.instances)
        except LoadFailed as exc:
            return result(ReloadOutcome.FAILED, str(exc))
        except TritonUnavailable as exc:
            return result(ReloadOutcome.UNAVAILABLE, str(exc))
        except TritonError as exc:
            return result(ReloadOutcome.FAILED, str(exc))

    async def _verify(self, request: ReloadRequest) -> bool:
        """Triton's own config shows the count and flags, and the model is READY."""
        deadline = self.clock() + self.verify_timeout_s
        while True:
            try:
                config = await self.client.get_config(request.model)
                if matches(config, request.instances, request.parameters, request.managed_keys) \
                        and await self.client.is_model_ready(request.model):
                    return True
            except TritonUnavailable:
                pass
            if self.clock() >= deadline:
                return False
            await self.sleep(0.25)
