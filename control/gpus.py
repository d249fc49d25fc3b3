"""Which GPUs a model's GPU guards read: the ones its instances run on, by UUID (pure).

A model's live config says where its instances run (instance_group: `kind`, `gpus`), in
CUDA device ids as Triton sees them. The GPU snapshot (proxy/gpu.py) knows GPUs by UUID
and, where it can be known, which UUID each CUDA id is (`GpuSnapshot.cuda_uuids`, the rule
is `proxy.gpu.cuda_device_order`). So:

- KIND_CPU groups only: no GPU; the sample says so (scope "cpu") and no GPU guard applies.
- KIND_GPU (or KIND_AUTO) groups listing `gpus`: those ids, mapped to UUIDs (scope "listed").
- A group listing none, or KIND_MODEL (the model places itself): every GPU Triton uses
  (scope "all"): the CUDA-ordered list where known, else every GPU the source sees.
- Ids that cannot be mapped (the order is unknown, or an id past Triton's GPUs): every GPU
  the source sees, scope "unmapped": a busy neighbour may then block, but nothing the
  model runs on is ever left out.

`gpu_sample` merges the chosen GPUs as the guards read them: the busiest one's utilization
and the fullest one's memory. `memory_used_bytes` sums them, for learning bytes per instance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tritonpilot.control.signals import GpuSample
from tritonpilot.proxy.gpu import GpuSnapshot


@dataclass(frozen=True)
class ModelGpus:
    """Where a model's instances run, from its live config's instance_group."""

    kind: Literal["cpu", "listed", "all"]
    indices: tuple[int, ...] = ()   # "listed": CUDA device ids inside Triton
    listed_per_count: int = 0       # instances per unit of the count on the listed GPUs (KIND_MODEL: 1)
    unlisted_groups: int = 0        # GPU groups listing no GPU: one instance per count on each GPU
    why: str = ""                   # for "all": which group made it so


@dataclass(frozen=True)
class Selection:
    """The GPUs one model's guards read, at one snapshot."""

    uuids: tuple[str, ...]
    scope: Literal["listed", "all", "unmapped", "cpu"]
    why: str                  # how the UUIDs were found (or why not), for the log and /status
    instances_per_count: int  # instances on these GPUs per unit of the instance count


def model_gpus(config: Mapping[str, Any]) -> ModelGpus:
    """Parse the instance_group of a ModelConfig in the JSON form Triton returns it in (kind
    omitted is KIND_AUTO, proto3's default; Triton's live configs have it filled in)."""
    groups = config.get("instance_group") or []
    if not groups:
        return ModelGpus("all", why="no instance_group")
    indices: list[int] = []
    listed_per_count = unlisted = 0
    whys: list[str] = []
    for group in groups:
        kind = group.get("kind") or "KIND_AUTO"
        if kind == "KIND_CPU":
            continue
        gpus = [int(g) for g in group.get("gpus") or []]
        if kind == "KIND_MODEL":
            listed_per_count += 1
            whys.append("KIND_MODEL")
        elif not gpus:
            unlisted += 1
            whys.append(f"{kind} without gpus")
        else:
            listed_per_count += len(gpus)
            indices += gpus
    if not whys and not indices:
        return ModelGpus("cpu")
    if whys:
        return ModelGpus("all", tuple(sorted(set(indices))), listed_per_count, unlisted, ", ".join(whys))
    return ModelGpus("listed", tuple(sorted(set(indices))), listed_per_count)


def select(snapshot: GpuSnapshot, gpus: ModelGpus | None) -> Selection | None:
    """The model's GPUs in this snapshot; None where there is no GPU data (a CPU model is
    never None: it needs none). `gpus` None: the config was not read yet, so every GPU."""
    if gpus is not None and gpus.kind == "cpu":
        return Selection((), "cpu", "KIND_CPU", 0)
    if not snapshot.gpus:
        return None
    seen = tuple(g.uuid for g in snapshot.gpus)
    triton = snapshot.cuda_uuids if snapshot.cuda_uuids is not None else seen
    if gpus is None:
        return Selection(seen, "unmapped", "config not read", 1)
    per_count = gpus.listed_per_count + gpus.unlisted_groups * len(triton)
    if gpus.kind == "all":
        if snapshot.cuda_uuids is None:
            return Selection(seen, "all", f"{gpus.why}; every GPU seen ({snapshot.cuda_order})", per_count)
        return Selection(triton, "all", f"{gpus.why}; Triton's GPUs ({snapshot.cuda_order})", per_count)
    cuda = snapshot.cuda_uuids
    if cuda is None:
        return Selection(seen, "unmapped", snapshot.cuda_order, per_count)
    past = [i for i in gpus.indices if i >= len(cuda)]
    if past:
        return Selection(seen, "unmapped", f"GPU {past[0]} listed, Triton has {len(cuda)}", per_count)
    return Selection(tuple(cuda[i] for i in gpus.indices), "listed", snapshot.cuda_order, per_count)


def gpu_sample(snapshot: GpuSnapshot, selection: Selection | None, now_s: float) -> GpuSample | None:
    """The selected GPUs as one sample: the busiest one's utilization, the fullest one's memory."""
    if selection is None:
        return None
    if selection.scope == "cpu":
        # From the config, which is as fresh as the tick.
        return GpuSample(at_s=now_s, utilization_ratio=None, memory_used_bytes=None, memory_total_bytes=None,
                         uuids=(), scope="cpu")
    chosen = [g for g in snapshot.gpus or () if g.uuid in selection.uuids]
    if not chosen:
        return None
    fullest = min(chosen, key=lambda g: g.memory_total_bytes - g.memory_used_bytes)
    return GpuSample(at_s=snapshot.now_s, utilization_ratio=max(g.utilization_ratio for g in chosen),
                     memory_used_bytes=fullest.memory_used_bytes, memory_total_bytes=fullest.memory_total_bytes,
                     uuids=selection.uuids, scope=selection.scope)


def memory_used_bytes(snapshot: GpuSnapshot, uuids: tuple[str, ...]) -> int | None:
    """GPU memory used on these GPUs together; None unless every one of them has data."""
    used = {g.uuid: g.memory_used_bytes for g in snapshot.gpus or ()}
    if not uuids or any(u not in used for u in uuids):
        return None
    return sum(used[u] for u in uuids)
