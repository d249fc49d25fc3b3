"""Hot policy reload: SIGHUP, or a change of the policy file, re-reads the policy.

- `diff_policies(old, new) -> PolicyDiff`: pure. What changed, split into what the
  running sidecar takes live and what needs a restart, and the config to run with
  (the new one, with every restart-needed field kept as it is running).
- `PolicyFileWatcher`: polls the file's resolved real path, inode, mtime and size, and
  hashes the content only when those moved. Polling, not inotify: a Kubernetes ConfigMap
  volume swaps a `..data` symlink to a new timestamped directory, so the watched name
  never changes while the file behind it does.
- `PolicyReloader`: one reload from start to end (load, diff, apply, count, log, report).
  Loading and applying are passed in: the composition root (serve.py) knows how a file
  becomes a config (flags and environment still win) and how the relay and the
  controller take it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from tritonpilot.control.policy import (
    Policy,
    PolicyError,
    ProxySection,
    ResolvedModelPolicy,
    policy_warnings,
    resolve,
)
from tritonpilot.sidecar.config import SidecarConfig

log = structlog.get_logger(__name__)

POLL_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Loaded:
    """What a policy file comes to: the sidecar's config (after flags and environment,
    which win over the file) and the policy itself (the controller's part)."""

    config: SidecarConfig
    policy: Policy


@dataclass(frozen=True)
class Change:
    key: str  # the policy key path, e.g. "proxy.max_inflight", "models.fast.max_instances"
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} changed from {_show(self.old)} to {_show(self.new)}"


@dataclass(frozen=True)
class PolicyDiff:
    live: tuple[Change, ...]     # applied without a restart
    restart: tuple[Change, ...]  # left as they were: they need a restart
    config: SidecarConfig        # the config to run with: new, but restart-needed fields kept


# SidecarConfig field -> its policy key. Fields the relay or the sidecar take live:
LIVE_CONFIG_KEYS: dict[str, str] = {
    "allow_client_model_control": "proxy.allow_client_model_control",
    "max_message_bytes": "proxy.max_message_bytes",
    "restricted_protocols": "proxy.restricted_protocols",
    "http_restricted_apis": "proxy.http_restricted_apis",
    "max_inflight": "proxy.max_inflight",
    "grace_period_s": "proxy.grace_period_s",  # read at shutdown
}
# ... and those that need a restart (listeners, connections made at start, files, logging).
RESTART_CONFIG_KEYS: dict[str, str] = {
    "triton": "triton.grpc",
    "triton_metrics_url": "triton.metrics_url",
    "triton_tls_ca": "triton.tls_ca",
    "listen": "proxy.listen",
    "http_listen": "proxy.http_listen",
    "triton_http": "triton.http",
    "workers": "proxy.workers",
    "metrics_listen": "metrics.listen",
    # The TLS files' contents are re-read on SIGHUP; their paths are fixed at start.
    "tls_cert": "proxy.tls.cert",
    "tls_key": "proxy.tls.key",
    "tls_client_ca": "proxy.tls.client_ca",
    "max_connections": "proxy.max_connections",
    "preface_timeout_s": "proxy.preface_timeout_s",
    "idle_timeout_s": "proxy.idle_timeout_s",
    "max_connection_age_s": "proxy.max_connection_age_s",
    "max_connection_age_grace_s": "proxy.max_connection_age_grace_s",
    "log_format": "logging.format",
    "log_level": "logging.level",
}
# The controller's settings (control.*), all taken at its next tick.
LIVE_CONTROL_KEYS = ("interval_s", "dry_run", "reload_strategy", "reload_timeout_s", "failed_config_backoff_s",
                     "max_signal_age_s", "max_concurrent_reloads", "max_reloads_per_minute")


def diff_policies(old: Loaded, new: Loaded) -> PolicyDiff:
    """What changed from `old` (running) to `new` (just loaded). Values given by a flag or
    the environment are the same in both, so a file change under them is no change."""
    live: list[Change] = []
    restart: list[Change] = []
    keep: dict[str, Any] = {}
    for f in fields(SidecarConfig):
        before, after = getattr(old.config, f.name), getattr(new.config, f.name)
        if f.name == "model_max_inflight":
            live += _model_caps(before, after)
            continue
        if before == after:
            continue
        if f.name in LIVE_CONFIG_KEYS:
            live.append(Change(LIVE_CONFIG_KEYS[f.name], before, after))
        else:  # listed above, a proxy.* key added since (connection limits), or not in the policy at all
            restart.append(Change(_restart_key(f.name), before, after))
            keep[f.name] = before
    for key in LIVE_CONTROL_KEYS:
        before, after = getattr(old.policy.control, key), getattr(new.policy.control, key)
        if before != after:
            live.append(Change(f"control.{key}", before, after))
    live += _model_changes(resolve(old.policy), resolve(new.policy))
    return PolicyDiff(tuple(live), tuple(restart), replace(new.config, **keep) if keep else new.config)


def _restart_key(name: str) -> str:
    if name in RESTART_CONFIG_KEYS:
        return RESTART_CONFIG_KEYS[name]
    return f"proxy.{name}" if name in ProxySection.model_fields else name


def _model_caps(before: Any, after: Any) -> list[Change]:
    return [Change(f"models.{name}.max_inflight", before.get(name), after.get(name))
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]


def _model_changes(before: dict[str, ResolvedModelPolicy], after: dict[str, ResolvedModelPolicy]) -> list[Change]:
    out: list[Change] = []
    for name in sorted(set(before) | set(after)):
        if name not in before:
            out.append(Change(f"models.{name}", None, "controlled"))
        elif name not in after:
            out.append(Change(f"models.{name}", "controlled", None))
        else:
            for f in fields(ResolvedModelPolicy):
                a, b = getattr(before[name], f.name), getattr(after[name], f.name)
                if a != b:
                    if f.name == "profiles":
                        a, b = _profiles(a), _profiles(b)
                    out.append(Change(f"models.{name}.{f.name}", a, b))
    return out


def _profiles(profiles: tuple[Any, ...]) -> list[str]:
    def bound(n: int | None) -> str:
        return "null" if n is None else str(n)

    return [f"{p.name} [{bound(p.instances[0])}, {bound(p.instances[1])}] "
            + ",".join(f"{k}={v}" for k, v in sorted(p.parameters.items())) for p in profiles]


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------
# Watching the file


@dataclass(frozen=True)
class _Seen:
    real_path: str
    inode: int
    mtime_ns: int
    size: int


class PolicyFileWatcher:
    """`changed()` is True once each time the file's content differs from the last seen.

    The name may be a symlink (chain): its real path is resolved on every poll, so a
    Kubernetes `..data` swap shows as a new real path even when mtime and size match.
    The content is read and hashed only when path, inode, mtime or size moved; a touch
    that leaves the content as it was does not fire. A missing or unreadable file does
    not fire either: the reload would only fail, and the next good content fires.
    """

    def __init__(self, path: str | Path, *, realpath: Callable[[str], str] = os.path.realpath,
                 stat: Callable[[str], os.stat_result] = os.stat,
                 read_bytes: Callable[[str], bytes] = lambda p: Path(p).read_bytes()) -> None:
        self.path = str(path)
        self._realpath = realpath
        self._stat = stat
        self._read = read_bytes
        self._seen: _Seen | None = None
        self._digest: str | None = None
        self.changed()  # the content the sidecar started with is the baseline

    def changed(self) -> bool:
        try:
            real = self._realpath(self.path)
            st = self._stat(real)
            seen = _Seen(real, st.st_ino, st.st_mtime_ns, st.st_size)
            if seen == self._seen:
                return False
            digest = hashlib.sha256(self._read(real)).hexdigest()
        except OSError:
            return False
        self._seen = seen
        fired = self._digest is not None and digest != self._digest
        self._digest = digest
        return fired


# ---------------------------------------------------------------------------------------
# One reload


@dataclass(frozen=True)
class ReloadSource:
    """What `tritonpilot serve --policy` hands the Sidecar to reload with."""

    path: str
    current: Loaded  # what the sidecar starts with
    load: Callable[[], Loaded]  # the file again, flags and environment still winning
    watcher: PolicyFileWatcher
    poll_interval_s: float = POLL_INTERVAL_S


class ReloadOutcome(StrEnum):
    OK = "ok"                # valid, and live changes applied
    UNCHANGED = "unchanged"  # valid, nothing that applies live changed (restart-needed ones may be listed)
    INVALID = "invalid"      # not valid: the running policy stays


class PolicyReloader:
    """Reloads `path` with `load` and hands a valid result to `apply(new, diff)`.
    `load` raises PolicyError (naming key paths) or ValueError for a file it can't use."""

    def __init__(self, path: str, current: Loaded, load: Callable[[], Loaded],
                 apply: Callable[[Loaded, PolicyDiff], None], *, registry: CollectorRegistry | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.current = current
        self._load = load
        self._apply = apply
        self._wall_clock = wall_clock
        self.reloads = Counter("tritonpilot_policy_reloads", "Policy reloads (SIGHUP or a change of the file), "
                               "by result.", ["result"], registry=registry if registry is not None
                               else CollectorRegistry())
        for outcome in ReloadOutcome:
            self.reloads.labels(str(outcome))
        self.last: dict[str, Any] | None = None

    def reload(self, trigger: str) -> ReloadOutcome:
        event: dict[str, Any] = {"file": self.path, "trigger": trigger}
        try:
            new = self._load()
        except PolicyError as exc:
            return self._done(ReloadOutcome.INVALID, event, problems=exc.problems)
        except ValueError as exc:
            return self._done(ReloadOutcome.INVALID, event, problems=[str(exc)])
        diff = diff_policies(self.current, new)
        event |= {"changes": [str(c) for c in diff.live],
                  "restart_needed": [f"needs a restart: {c}" for c in diff.restart]}
        for warning in policy_warnings(new.policy):
            log.warning("policy.warning", warning=warning)
        if diff.live:
            self._apply(Loaded(diff.config, new.policy), diff)
        self.current = Loaded(diff.config, new.policy)
        return self._done(ReloadOutcome.OK if diff.live else ReloadOutcome.UNCHANGED, event)

    def _done(self, outcome: ReloadOutcome, event: dict[str, Any], problems: list[str] | None = None) -> ReloadOutcome:
        self.reloads.labels(str(outcome)).inc()
        self.last = {"at": _iso(self._wall_clock()), "trigger": event["trigger"], "result": str(outcome),
                     "error": "\n".join(problems) if problems else None,
                     "changes": event.get("changes", []), "restart_needed": event.get("restart_needed", [])}
        if outcome is ReloadOutcome.INVALID:
            log.error("policy.reload", result=str(outcome), **event, problems=problems,
                      kept="the running policy")
        elif event.get("restart_needed"):
            log.warning("policy.reload", result=str(outcome), **event)
        else:
            log.info("policy.reload", result=str(outcome), **event)
        return outcome

    def status(self) -> dict[str, Any]:
        return {"file": self.path, "last": self.last}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
