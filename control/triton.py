"""The controller's edge to Triton: model config, model control and statistics over gRPC.

Errors are sorted the Kopf way: TritonUnavailable is temporary (retry next
tick), LoadFailed is about this config (back off from it), anything else is a bug.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException


class TritonError(Exception):
    pass


class TritonUnavailable(TritonError):
    """Triton did not answer (down, restarting, deadline): try again later."""


class LoadTimedOut(TritonUnavailable):
    """The load RPC outlived its timeout; Triton may still complete it (verify)."""


class LoadFailed(TritonError):
    """Triton refused or failed to load a config; the old model keeps serving."""


@dataclass(frozen=True)
class StatsSample:
    """Cumulative counters of one model as Triton reports them. They restart at zero
    after a full reload, so consumers take deltas and treat a decrease as a reset."""
    inference_count: int
    execution_count: int
    success_count: int
    fail_count: int
    queue_ns: int
    compute_infer_ns: int
    last_inference_ms: int
    success_ns: int = 0     # total time of the requests that succeeded (inference_stats.success.ns)
    fail_ns: int = 0        # and of those that failed: with success_ns, Little's law for the load


_UNAVAILABLE_CODES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}


def _wrap(exc: InferenceServerException, what: str) -> TritonError:
    status = str(exc.status() or "")
    message = f"{what}: {exc.message()}"
    if status in _UNAVAILABLE_CODES:
        return TritonUnavailable(message)
    return TritonError(f"{message} ({status})")


def _int(d: dict[str, Any], *path: str) -> int:
    for key in path:
        d = d.get(key) or {}
    return int(d) if not isinstance(d, dict) else 0


# grpc's default reconnect backoff grows to 120 s: after a Triton restart the controller
# would be blind for up to two minutes. channel_args replaces tritonclient's defaults,
# so its unlimited message sizes are restated (its keepalive defaults are grpc's own).
CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class TritonClient:
    def __init__(self, url: str, rpc_timeout_s: float = 10.0, tls_ca: str | None = None) -> None:
        """tls_ca: the CA file of a Triton that serves TLS (--grpc-use-ssl); None = plaintext."""
        self.url = url
        self.rpc_timeout_s = rpc_timeout_s
        self._client = grpcclient.InferenceServerClient(url, ssl=tls_ca is not None, root_certificates=tls_ca,
                                                        channel_args=CHANNEL_ARGS)

    async def close(self) -> None:
        await self._client.close()

    async def get_config(self, model: str) -> dict[str, Any]:
        try:
            reply = await self._client.get_model_config(model, as_json=True, client_timeout=self.rpc_timeout_s)
        except InferenceServerException as exc:
            raise _wrap(exc, f"reading the config of {model!r}") from exc
        return reply["config"]

    async def is_model_ready(self, model: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(model, client_timeout=self.rpc_timeout_s))
        except InferenceServerException as exc:
            raise _wrap(exc, f"asking whether {model!r} is ready") from exc

    async def load(self, model: str, config: dict[str, Any], timeout_s: float) -> None:
        """Load with a config override. Blocks until Triton answers (a full reload returns
        when the new copy serves; an in-place update can take minutes under load)."""
        try:
            await self._client.load_model(model, config=json.dumps(config), client_timeout=timeout_s)
        except InferenceServerException as exc:
            if str(exc.status() or "") == "StatusCode.DEADLINE_EXCEEDED":
                raise LoadTimedOut(f"loading {model!r}: no answer within {timeout_s:g} s") from exc
            if str(exc.status() or "") in _UNAVAILABLE_CODES:
                raise TritonUnavailable(f"loading {model!r}: {exc.message()}") from exc
            raise LoadFailed(exc.message() or str(exc)) from exc

    async def statistics(self, model: str) -> StatsSample | None:
        """None when Triton has no statistics for the model (e.g. not loaded)."""
        try:
            reply = await self._client.get_inference_statistics(model, as_json=True,
                                                               client_timeout=self.rpc_timeout_s)
        except InferenceServerException as exc:
            error = _wrap(exc, f"reading statistics of {model!r}")
            if isinstance(error, TritonUnavailable):
                raise error from exc
            return None
        stats = reply.get("model_stats") or []
        if not stats:
            return None
        s = stats[0]
        return StatsSample(
            inference_count=_int(s, "inference_count"),
            execution_count=_int(s, "execution_count"),
            success_count=_int(s, "inference_stats", "success", "count"),
            fail_count=_int(s, "inference_stats", "fail", "count"),
            queue_ns=_int(s, "inference_stats", "queue", "ns"),
            compute_infer_ns=_int(s, "inference_stats", "compute_infer", "ns"),
            last_inference_ms=_int(s, "last_inference"),
            success_ns=_int(s, "inference_stats", "success", "ns"),
            fail_ns=_int(s, "inference_stats", "fail", "ns"),
        )
