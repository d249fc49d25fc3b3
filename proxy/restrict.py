"""Triton's restricted protocols (`--grpc-restricted-protocol`), enforced at the proxy's door.

Triton's syntax and rules, as its own parser has them (server `src/command_line_parser.cc`,
`ParseRestrictedFeatureOption` and `ParseGenericConfigOption`; `src/restricted_features.h`):

- `GROUPS:KEY=VALUE`: GROUPS a comma-separated list of protocol groups, split at the first
  ':'; KEY runs to the first '=' after it, VALUE is the rest. None of the three may be empty.
- A group may appear in only one restriction.
- A call of a restricted group must carry the header `triton-grpc-protocol-KEY` with exactly
  VALUE (the first such header counts); without it Triton answers UNAVAILABLE, "This
  protocol is restricted, expecting header 'triton-grpc-protocol-KEY'" (`src/grpc/
  grpc_server.cc`, `infer_handler.cc`, `stream_infer_handler.cc`, Triton 2.51).

Which RPC is in which group is read from the same files (`restricted_keys_.Get(...)` at each
handler). The proxy answers a refused call itself, so it never reaches Triton.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tritonpilot.proxy.wire import HEALTH_CHECK, SERVICE

HEADER_PREFIX = "triton-grpc-protocol-"

# Client model control (RepositoryModelLoad/Unload, POST .../load|unload) is refused at the door on
# both ports unless allowed: what the client is told.
MODEL_CONTROL_REFUSAL = ("tritonpilot: model control is reserved for the tritonpilot controller, which owns "
                         "the model lifecycle; start the sidecar with --allow-client-model-control to let "
                         "clients load and unload models")


def _rpcs(*names: str) -> tuple[bytes, ...]:
    return tuple(SERVICE + name.encode() for name in names)


# Triton's groups, in its order (RESTRICTED_CATEGORY_NAMES), and the RPCs each covers.
GROUPS: dict[str, tuple[bytes, ...]] = {
    "health": (*_rpcs("ServerLive", "ServerReady", "ModelReady"), HEALTH_CHECK),
    "metadata": _rpcs("ServerMetadata", "ModelMetadata"),
    "inference": _rpcs("ModelInfer", "ModelStreamInfer"),
    "shared-memory": _rpcs("SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
                           "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
                           "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"),
    "model-config": _rpcs("ModelConfig"),
    "model-repository": _rpcs("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
    "statistics": _rpcs("ModelStatistics"),
    "trace": _rpcs("TraceSetting"),
    "logging": _rpcs("LogSettings"),
}

SYNTAX = "GROUPS:KEY=VALUE"


class RestrictionError(ValueError):
    """A restriction Triton itself would refuse to start with: `got <text>; <rule>`."""

    def __init__(self, text: str, rule: str) -> None:
        self.text = text
        self.rule = rule
        super().__init__(f"got {text!r}; {rule}")


@dataclass(frozen=True)
class Restriction:
    groups: tuple[str, ...]
    key: str
    value: str

    @property
    def header(self) -> str:
        return HEADER_PREFIX + self.key


def groups_text() -> str:
    return ", ".join(GROUPS)


def parse_restriction(text: str) -> Restriction:
    """One `GROUPS:KEY=VALUE`, split as Triton splits it. Raises RestrictionError."""
    colon = text.find(":")
    equals = text.find("=", colon + 1) if colon >= 0 else -1
    if colon < 0 or equals < 0 or colon == 0 or equals == colon + 1 or equals == len(text) - 1:
        raise RestrictionError(text, f"expected {SYNTAX}, GROUPS a comma-separated list of {groups_text()}")
    groups = tuple(text[:colon].split(","))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise RestrictionError(text, f"unknown protocol group {unknown[0]!r}; the groups are {groups_text()}")
    return Restriction(groups, text[colon + 1:equals], text[equals + 1:])


def parse_restrictions(texts: Iterable[str]) -> tuple[Restriction, ...]:
    """Every restriction, each group in one only (as Triton requires). Raises RestrictionError."""
    out: list[Restriction] = []
    seen: dict[str, str] = {}
    for text in texts:
        restriction = parse_restriction(text)
        for group in restriction.groups:
            if group in seen:
                raise RestrictionError(text, f"protocol group {group!r} is already restricted by {seen[group]!r}: "
                                             "a group can be in only one restriction")
            seen[group] = text
        out.append(restriction)
    return tuple(out)


class Door:
    """The restrictions by :path, for the relay: `refusal(path, headers)` per new call."""

    __slots__ = ("_by_path",)

    def __init__(self, restrictions: Sequence[Restriction]) -> None:
        # :path -> (header name, value, Triton's message)
        self._by_path: dict[bytes, tuple[bytes, bytes, str]] = {}
        for r in restrictions:
            message = f"This protocol is restricted, expecting header '{r.header}'"
            for group in r.groups:
                for path in GROUPS[group]:
                    self._by_path[path] = (r.header.encode(), r.value.encode(), message)

    def refusal(self, path: bytes, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Triton's message when this call lacks its group's header, else None."""
        rule = self._by_path.get(path)
        if rule is None:
            return None
        name, value, message = rule
        for k, v in headers:
            if k == name:
                return None if v == value else message
        return message
