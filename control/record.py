"""Recording the controller's ticks (`tritonpilot serve --record FILE`) and reading them back
(`tritonpilot replay`).

A recording is JSON lines, appended in the order things happened:

- `{"type": "header", "version": 1, "policy_path": ..., "max_bytes": ...}`: a controller
  started writing; each header begins a run, and a replay starts every model's `State`
  afresh there, as a new controller does;
- `{"type": "policy", "model": ..., "sha256": ..., "policy": {...}}`: the resolved policy a
  model is decided under, written before its first tick and again whenever it changes;
- `{"type": "tick", "now_s": ..., "model": ..., "policy_sha256": ..., "signals": {...},
  "decision": {...}}`: one model at one tick: every `Signals` field `decide` read (samples,
  live config, last reload, budget, with their times) and the decision it gave, in the
  order the loop decided the models (the budget order);
- `{"type": "observe", "now_s": ..., "model": ..., "before_bytes": ..., "after_bytes": ...,
  "instances_before": ..., "instances_after": ...}`: a finished reload the loop learned GPU
  memory per instance from (`decide.observe_reload`), the one change to `State` that does
  not come from `decide`. Bytes and instances are those on the model's own GPUs (the
  instance count times the GPUs its groups list), "after" sampled once the reload settled.

Floats are written as Python's repr, which reads back to the same float, so a replay under
the recorded policy feeds `decide` the very values the live controller saw.

The writer runs in the controller's tick (never the relay's path). It must not stop the
controller: an I/O error (or anything else) logs once and ends the recording. Size cap:
when the next line would take the file past `max_bytes`, it logs once and stops recording
(it does not rotate: a replay needs a run from its start, where every `State` begins
empty, so a rotated tail could not be replayed exactly).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any, Protocol

import structlog
from pydantic import BaseModel

from tritonpilot.control.decide import Decision
from tritonpilot.control.policy import ResolvedModelPolicy
from tritonpilot.control.signals import (
    GpuSample,
    InflightSample,
    LiveConfig,
    MemorySample,
    ReloadBudget,
    ReloadRecord,
    Signals,
    TritonSample,
)

log = structlog.get_logger(__name__)

RECORD_VERSION = 1
DEFAULT_MAX_BYTES = 100_000_000


# ---------------------------------------------------------------------------------------
# Values <-> JSON

def plain(value: Any) -> Any:
    """A dataclass, pydantic model, enum, mapping or sequence as plain JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset, set)):
        return [plain(v) for v in value]
    return value


def policy_json(policy: ResolvedModelPolicy) -> dict[str, Any]:
    out: dict[str, Any] = plain(policy)
    return out


def policy_sha256(policy: ResolvedModelPolicy) -> str:
    """The resolved policy's identity: a hash of its canonical JSON (the model name included)."""
    text = json.dumps(policy_json(policy), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "action": str(decision.action), "reason": str(decision.reason),
        "current_instances": decision.current_instances, "current_profile": decision.current_profile,
        "desired_instances": decision.desired_instances, "decided_instances": decision.decided_instances,
        "profile": decision.profile.name if decision.profile is not None else None,
        "strategy": decision.strategy, "numbers": plain(decision.numbers),
    }


_NESTED: dict[str, type] = {"inflight": InflightSample, "config": LiveConfig, "triton": TritonSample,
                            "gpu": GpuSample, "last_reload": ReloadRecord, "budget": ReloadBudget,
                            "memory": MemorySample}


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})


def signals_from_json(data: Mapping[str, Any]) -> Signals:
    """The `Signals` a tick line holds (the inverse of `plain(signals)`)."""
    names = {f.name for f in fields(Signals)}
    kwargs = {k: (_build(_NESTED[k], v) if k in _NESTED and v is not None else v)
              for k, v in data.items() if k in names}
    return Signals(**kwargs)


# ---------------------------------------------------------------------------------------
# Writing

class Recorder(Protocol):
    """What the control loop tells a recording. Never raises."""

    def tick(self, signals: Signals, policy: ResolvedModelPolicy, decision: Decision) -> None: ...

    def observe(self, model: str, now_s: float, before_bytes: int | None, after_bytes: int | None,
                instances_before: int, instances_after: int) -> None: ...

    def close(self) -> None: ...


class NullRecorder:
    """No recording (the default)."""

    def tick(self, signals: Signals, policy: ResolvedModelPolicy, decision: Decision) -> None:
        pass

    def observe(self, model: str, now_s: float, before_bytes: int | None, after_bytes: int | None,
                instances_before: int, instances_after: int) -> None:
        pass

    def close(self) -> None:
        pass


class RecordWriter:
    """Appends JSON lines to `path`, until it is closed, full, or an error stops it.

    Opening happens here, so a path that cannot be written is the caller's usage error
    (OSError); everything after that only logs.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, policy_path: str | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.policy_path = policy_path
        # Line-buffered: every line reaches the OS when written, so a killed sidecar leaves whole lines.
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", buffering=1)
        self._size = self._file.tell()
        self._hashes: dict[int, tuple[ResolvedModelPolicy, str]] = {}  # id -> (policy kept alive, sha256)
        self._written_policy: dict[str, str] = {}  # model -> sha256 of its last policy line
        self._write({"type": "header", "version": RECORD_VERSION, "policy_path": policy_path,
                     "max_bytes": max_bytes})

    @property
    def recording(self) -> bool:
        return self._file is not None

    def tick(self, signals: Signals, policy: ResolvedModelPolicy, decision: Decision) -> None:
        if self._file is None:
            return
        try:
            sha = self._sha(policy)
            if self._written_policy.get(policy.model) != sha:
                self._written_policy[policy.model] = sha
                self._write({"type": "policy", "model": policy.model, "sha256": sha, "policy": policy_json(policy)})
            self._write({"type": "tick", "now_s": signals.now_s, "model": decision.model, "policy_sha256": sha,
                         "signals": plain(signals), "decision": decision_json(decision)})
        except Exception as exc:  # noqa: BLE001 - a recording must never stop the controller
            self._fail(exc)

    def observe(self, model: str, now_s: float, before_bytes: int | None, after_bytes: int | None,
                instances_before: int, instances_after: int) -> None:
        if self._file is None:
            return
        try:
            self._write({"type": "observe", "now_s": now_s, "model": model, "before_bytes": before_bytes,
                         "after_bytes": after_bytes, "instances_before": instances_before,
                         "instances_after": instances_after})
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                log.error("record.failed", path=str(self.path), error=str(exc), recording="stopped")

    def _sha(self, policy: ResolvedModelPolicy) -> str:
        known = self._hashes.get(id(policy))
        if known is not None and known[0] is policy:
            return known[1]
        sha = policy_sha256(policy)
        self._hashes[id(policy)] = (policy, sha)
        return sha

    def _write(self, line: Mapping[str, Any]) -> None:
        if self._file is None:
            return  # full: the line that filled it closed the file
        text = json.dumps(line, separators=(",", ":"), default=_unknown) + "\n"
        size = len(text.encode())
        if self._size + size > self.max_bytes:
            log.warning("record.full", path=str(self.path), size_bytes=self._size, max_bytes=self.max_bytes,
                        recording="stopped")
            self.close()
            return
        self._file.write(text)
        self._size += size

    def _fail(self, exc: Exception) -> None:
        log.error("record.failed", path=str(self.path), error=f"{type(exc).__name__}: {exc}", recording="stopped")
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001, S110 - already reported; the file is given up
                pass


def _unknown(value: Any) -> Any:
    converted = plain(value)
    if converted is value:
        raise TypeError(f"not JSON: {type(value).__name__}")
    return converted


# ---------------------------------------------------------------------------------------
# Reading

@dataclass(frozen=True)
class Header:
    version: int
    policy_path: str | None


@dataclass(frozen=True)
class PolicyLine:
    model: str
    sha256: str
    policy: Mapping[str, Any]


@dataclass(frozen=True)
class Tick:
    now_s: float
    model: str
    policy_sha256: str
    signals: Signals
    decision: Mapping[str, Any]   # decision_json's form


@dataclass(frozen=True)
class Observe:
    now_s: float
    model: str
    before_bytes: int | None
    after_bytes: int | None
    instances_before: int
    instances_after: int


Entry = Header | PolicyLine | Tick | Observe


@dataclass
class Recording:
    entries: list[Entry]
    skipped_lines: int = 0   # not JSON or not a known line (e.g. a last line cut short)

    @property
    def ticks(self) -> list[Tick]:
        return [e for e in self.entries if isinstance(e, Tick)]


class RecordingError(Exception):
    """The file is not a recording this version can read."""


def read_recording(path: str | Path) -> Recording:
    """Every line of a recording, in order. Raises OSError, or RecordingError for a file
    with no header and no tick, or of a newer version."""
    entries: list[Entry] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            try:
                entry = _entry(json.loads(line))
            except (ValueError, TypeError, KeyError):
                entry = None
            if entry is None:
                skipped += 1 if line.strip() else 0
                continue
            if isinstance(entry, Header) and entry.version > RECORD_VERSION:
                raise RecordingError(f"{path}: recording version {entry.version}; this tritonpilot reads "
                                     f"up to {RECORD_VERSION}")
            entries.append(entry)
    if not any(isinstance(e, (Header, Tick)) for e in entries):
        raise RecordingError(f"{path}: not a tritonpilot recording (no header and no tick line)")
    return Recording(entries, skipped)


def _entry(data: Any) -> Entry | None:
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "header":
        return Header(int(data["version"]), data.get("policy_path"))
    if kind == "policy":
        return PolicyLine(data["model"], data["sha256"], data["policy"])
    if kind == "tick":
        return Tick(float(data["now_s"]), data["model"], data["policy_sha256"], signals_from_json(data["signals"]),
                    data["decision"])
    if kind == "observe":
        return Observe(float(data["now_s"]), data["model"], data["before_bytes"], data["after_bytes"],
                       int(data["instances_before"]), int(data["instances_after"]))
    return None


def iter_runs(recording: Recording) -> Iterator[list[Entry]]:
    """The recording split at each header: one list per controller run."""
    run: list[Entry] = []
    for entry in recording.entries:
        if isinstance(entry, Header) and run:
            yield run
            run = []
        run.append(entry)
    if run:
        yield run
