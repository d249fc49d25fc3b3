"""Load shedding: a cap on each model's requests in flight through the proxy.

A ModelInfer call whose model already has `cap` requests in flight is answered at once
with RESOURCE_EXHAUSTED and never reaches Triton: a client that is told "busy" now can
retry elsewhere, while one queued in Triton behind the backlog would only miss its
deadline. The check costs a dict lookup per request, and nothing when no cap is set
(the relay holds None then).

ModelStreamInfer requests count per request, as in-flight does: a request message past its
model's cap is cut out of the stream (Triton never sees it; the client gets its flow-control
window back) and answered on the stream with an error response carrying the same message,
as Triton reports a failed request there. So that a message can be cut out, the stream's
request DATA frames are taken whole and rewritten while a cap is set (grpc_core.py); with no
cap they pass verbatim. The answer goes out once Triton's response has started (its headers:
Triton sends them with its first response) or when Triton ends the stream. A stream on which
Triton holds no request and has not started a response ends at once with RESOURCE_EXHAUSTED
instead: there, headers for an answer to follow might never come.

On the HTTP port the same caps answer 429 (http_core.py); both protocols' requests of a
model count toward its one cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InflightCaps:
    """`default` for every model (None: no cap), `per_model` where a model has its own."""

    default: int | None = None
    per_model: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for model, cap in [("(default)", self.default), *self.per_model.items()]:
            if cap is not None and cap < 1:
                raise ValueError(f"max_inflight for {model}: got {cap}; must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.per_model)

    def cap(self, model: str) -> int | None:
        return self.per_model.get(model, self.default)


def refusal_message(model: str, cap: int) -> str:
    return (f"tritonpilot: model '{model}' has {cap} requests in flight, its cap "
            "(max_inflight); retry later or elsewhere")
