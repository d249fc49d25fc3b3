"""GPU guards per model: a model's guards read only the GPUs its instances run on.

The pure part (control/gpus.py: instance_group -> CUDA ids -> UUIDs) as tables, then
timelines through the real Controller (tests/test_loop.py's fakes) with two GPUs, one busy
and one idle, sampled by the real NVML sampler over a fake pynvml, or parsed from Triton's
metrics: the model on the idle GPU scales, the one on the busy GPU is held with that GPU's
numbers, a KIND_CPU model never looks at a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from test_gpu import FakeGpu, FakeNvml
from test_loop import POLICY, FakeClock, FakeSources, FakeTriton, model_config, scenario, settle

from tritonpilot.control.actuator import Actuator
from tritonpilot.control.decide import Action, Decision, Reason
from tritonpilot.control.gpus import ModelGpus, gpu_sample, memory_used_bytes, model_gpus, select
from tritonpilot.control.loop import Controller
from tritonpilot.control.overrides import read_state
from tritonpilot.control.signals import GpuSample as GpuSignal
from tritonpilot.proxy.gpu import GpuSample, GpuSnapshot, NvmlGpuSampler, parse_triton_gpu_metrics

GIB = 1 << 30
BUSY, IDLE = "GPU-b0b0b0b0-0000-4000-8000-000000000000", "GPU-1d1e1d1e-1111-4111-8111-111111111111"


def gpu_config(*gpus: int, kind: str = "KIND_GPU") -> dict[str, Any]:
    config = model_config(kind=kind)
    if gpus:
        config["instance_group"] = [{**config["instance_group"][0], "gpus": list(gpus)}]
    return config


# ------------------------------------------------------------------------------ the pure part

@pytest.mark.parametrize(("groups", "want"), [
    ([{"kind": "KIND_CPU", "count": 2}], ModelGpus("cpu")),
    ([{"kind": "KIND_GPU", "count": 1, "gpus": [1]}], ModelGpus("listed", (1,), 1)),
    ([{"kind": "KIND_GPU", "gpus": [2, 0]}, {"kind": "KIND_GPU", "gpus": [2]}], ModelGpus("listed", (0, 2), 3)),
    ([{"kind": "KIND_CPU"}, {"kind": "KIND_GPU", "gpus": [1]}], ModelGpus("listed", (1,), 1)),
    ([{"count": 1}], ModelGpus("all", (), 0, 1, "KIND_AUTO without gpus")),  # kind omitted: proto3's default
    ([{"kind": "KIND_MODEL"}], ModelGpus("all", (), 1, 0, "KIND_MODEL")),
    ([], ModelGpus("all", why="no instance_group")),
])
def test_model_gpus_reads_instance_group(groups: list[dict[str, Any]], want: ModelGpus) -> None:
    assert model_gpus({"instance_group": groups}) == want


def snapshot(cuda_uuids: tuple[str, ...] | None, how: str = "test") -> GpuSnapshot:
    return GpuSnapshot(5.0, (GpuSample(0, "H100", 1.0, 70 * GIB, 80 * GIB, BUSY),
                             GpuSample(1, "H100", 0.1, 10 * GIB, 80 * GIB, IDLE)),
                       "nvml", cuda_uuids=cuda_uuids, cuda_order=how)


@pytest.mark.parametrize(("gpus", "cuda", "scope", "uuids"), [
    (ModelGpus("listed", (1,), 1), (BUSY, IDLE), "listed", (IDLE,)),
    (ModelGpus("listed", (0,), 1), (IDLE, BUSY), "listed", (IDLE,)),     # CUDA's order is not NVML's
    (ModelGpus("listed", (0,), 1), (IDLE,), "listed", (IDLE,)),          # Triton sees one GPU of two
    (ModelGpus("listed", (1,), 1), (IDLE,), "unmapped", (BUSY, IDLE)),   # an id past Triton's GPUs
    (ModelGpus("listed", (1,), 1), None, "unmapped", (BUSY, IDLE)),      # order unknown: every GPU
    (ModelGpus("all", (), 0, 1, "x"), (IDLE,), "all", (IDLE,)),          # all of Triton's, not NVML's
    (ModelGpus("all", (), 0, 1, "x"), None, "all", (BUSY, IDLE)),
    (None, (BUSY, IDLE), "unmapped", (BUSY, IDLE)),                      # config not read yet
    (ModelGpus("cpu"), None, "cpu", ()),
])
def test_select_maps_cuda_ids_to_uuids_and_never_leaves_out_a_gpu_it_cannot_rule_out(
        gpus: ModelGpus | None, cuda: tuple[str, ...] | None, scope: str, uuids: tuple[str, ...]) -> None:
    chosen = select(snapshot(cuda), gpus)
    assert chosen is not None and (chosen.scope, chosen.uuids) == (scope, uuids), chosen


def test_gpu_sample_merges_only_the_chosen_gpus() -> None:
    snap = snapshot((BUSY, IDLE))
    idle = gpu_sample(snap, select(snap, ModelGpus("listed", (1,), 1)), now_s=5.0)
    assert idle == GpuSignal(at_s=5.0, utilization_ratio=0.1, memory_used_bytes=10 * GIB,
                             memory_total_bytes=80 * GIB, uuids=(IDLE,), scope="listed")
    both = gpu_sample(snap, select(snap, ModelGpus("listed", (0, 1), 2)), now_s=5.0)
    assert both is not None and (both.utilization_ratio, both.memory_used_bytes) == (1.0, 70 * GIB)
    assert memory_used_bytes(snap, (BUSY, IDLE)) == 80 * GIB and memory_used_bytes(snap, ("GPU-gone",)) is None
    # No GPU data: None for a GPU model, "no GPU" (not "no data") for a CPU one.
    empty = replace(snap, gpus=None)
    assert gpu_sample(empty, select(empty, ModelGpus("listed", (1,), 1)), 5.0) is None
    cpu = gpu_sample(empty, select(empty, ModelGpus("cpu")), 6.0)
    assert cpu is not None and (cpu.scope, cpu.at_s, cpu.utilization_ratio) == ("cpu", 6.0, None)


# ------------------------------------------------------------------------------ timelines

class Pod:
    """Several models behind one controller (the real actuator, a fake Triton), all sharing
    the GPUs that `sample(now_s)` reports at each tick."""

    def __init__(self, configs: Mapping[str, dict[str, Any]]) -> None:
        self.clock = FakeClock()
        self.triton = FakeTriton({name: {**config, "name": name} for name, config in configs.items()})
        self.sources = FakeSources(self.triton)
        self.sample: Callable[[float], GpuSnapshot] | None = None
        self.controller = Controller({name: replace(POLICY, model=name) for name in configs}, self.sources,
                                     Actuator(self.triton, clock=self.clock),  # type: ignore[arg-type]
                                     registry=CollectorRegistry(), clock=self.clock,
                                     max_concurrent_reloads=len(configs))
        self.decisions: dict[str, list[Decision]] = {name: [] for name in configs}

    async def run(self, until: float, **inflight: float) -> None:
        self.sources.inflight.update(inflight)
        while self.clock.now_s <= until + 1e-9:
            if self.sample is not None:
                self.sources.gpu_snapshot = self.sample(self.clock.now_s)
            for decision in await self.controller.tick(self.clock.now_s):
                self.decisions[decision.model].append(decision)
            await settle()
            self.clock.now_s += 1.0

    def instances(self, name: str) -> int:
        return read_state(self.triton.configs[name]).instances

    def last(self, name: str) -> Decision:
        return self.decisions[name][-1]


def busy_and_idle_nvml() -> FakeNvml:
    # NVML index 0: busy and nearly full; index 1: idle.
    return FakeNvml(gpus=[FakeGpu("NVIDIA H100 80GB HBM3", 100, 70 * GIB, 80 * GIB, uuid=BUSY),
                          FakeGpu("NVIDIA H100 80GB HBM3", 5, 10 * GIB, 80 * GIB, uuid=IDLE)])


@scenario
async def test_a_busy_neighbour_gpu_holds_only_the_model_that_runs_on_it() -> None:
    pod = Pod({"on_idle": gpu_config(1), "on_busy": gpu_config(0), "anywhere": gpu_config(),
               "cpu": gpu_config(kind="KIND_CPU")})
    nvml = busy_and_idle_nvml()
    sampler = NvmlGpuSampler(1.0, nvml=nvml, clock=pod.clock, env={})
    pod.sample = lambda now_s: sampler.sample()
    await pod.run(until=8, on_idle=1.6, on_busy=1.6, anywhere=1.6, cpu=1.6)  # each wants 2 from 6

    assert pod.instances("on_idle") == 2
    up = next(d for d in pod.decisions["on_idle"] if d.changes)
    assert (up.now_s, up.action, up.numbers["gpu_utilization_ratio"]) == (6.0, Action.SCALE_UP, 0.05)
    assert (up.numbers["gpu_scope"], up.numbers["gpu_uuids"]) == ("listed", IDLE)

    # Held with its own GPU's numbers, not a merge of the pod's.
    assert pod.instances("on_busy") == 1
    held = pod.last("on_busy")
    assert (held.action, held.reason, held.numbers["wanted_instances"]) == (Action.BLOCKED, Reason.GPU_BOUND, 2)
    assert (held.numbers["gpu_utilization_ratio"], held.numbers["gpu_memory_used_bytes"]) == (1.0, 70 * GIB)
    assert (held.numbers["gpu_scope"], held.numbers["gpu_uuids"]) == ("listed", BUSY)

    # A group that lists no GPU runs on every one of Triton's: the busy one holds it.
    assert pod.instances("anywhere") == 1 and pod.last("anywhere").reason is Reason.GPU_BOUND
    assert pod.last("anywhere").numbers["gpu_scope"] == "all"

    # KIND_CPU: no GPU guard at all.
    assert pod.instances("cpu") == 2
    assert pod.last("cpu").numbers["gpu"] == "not-used"
    assert "gpu_utilization_ratio" not in pod.last("cpu").numbers

    gpus = pod.controller.status()["models"]["on_busy"]["gpus"]
    assert gpus == {"scope": "listed", "uuids": [BUSY], "why": "NVML order (CUDA_VISIBLE_DEVICES unset)"}

    # Once its GPU calms down, the held model goes too.
    nvml.gpus[0].utilization_percent = 40
    await pod.run(until=10)
    assert pod.instances("on_busy") == 2


@scenario
async def test_cuda_visible_devices_decides_which_gpu_config_id_0_is() -> None:
    # Triton runs with CUDA_VISIBLE_DEVICES=1,0: its device 0 is NVML's 1 (idle).
    pod = Pod({"zero": gpu_config(0), "one": gpu_config(1)})
    sampler = NvmlGpuSampler(1.0, nvml=busy_and_idle_nvml(), clock=pod.clock, env={"CUDA_VISIBLE_DEVICES": "1,0"})
    pod.sample = lambda now_s: sampler.sample()
    await pod.run(until=8, zero=1.6, one=1.6)
    assert (pod.instances("zero"), pod.instances("one")) == (2, 1)
    assert pod.last("one").numbers["gpu_uuids"] == BUSY


TRITON_METRICS = f"""\
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{{gpu_uuid="{BUSY}"}} 0.99
nv_gpu_utilization{{gpu_uuid="{IDLE}"}} 0.05
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{{gpu_uuid="{BUSY}"}} {80 * GIB}
nv_gpu_memory_total_bytes{{gpu_uuid="{IDLE}"}} {80 * GIB}
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{{gpu_uuid="{BUSY}"}} {70 * GIB}
nv_gpu_memory_used_bytes{{gpu_uuid="{IDLE}"}} {10 * GIB}
"""


@scenario
async def test_triton_metrics_are_mapped_by_gpu_uuid_the_same_way() -> None:
    pod = Pod({"zero": gpu_config(0), "one": gpu_config(1)})
    # Triton's CUDA_VISIBLE_DEVICES, given to the sidecar: device 0 is the idle GPU.
    visible = f"{IDLE[:12]},{BUSY[:12]}"  # prefixes, as CUDA accepts them
    pod.sample = lambda now_s: parse_triton_gpu_metrics(TRITON_METRICS, now_s, visible)
    await pod.run(until=8, zero=1.6, one=1.6)
    assert (pod.instances("zero"), pod.instances("one")) == (2, 1)
    held = pod.last("one")
    assert (held.reason, held.numbers["gpu_utilization_ratio"], held.numbers["gpu_uuids"]) == (
        Reason.GPU_BOUND, 0.99, BUSY)


@scenario
async def test_without_a_known_cuda_order_every_gpu_counts_and_the_numbers_say_why() -> None:
    pod = Pod({"zero": gpu_config(0), "one": gpu_config(1)})
    pod.sample = lambda now_s: parse_triton_gpu_metrics(TRITON_METRICS, now_s)  # two GPUs, no order
    await pod.run(until=8, zero=1.6, one=1.6)
    # Which one is device 0 cannot be known from Triton's metrics: both are held by the busy GPU.
    assert (pod.instances("zero"), pod.instances("one")) == (1, 1)
    for name in ("zero", "one"):
        assert (pod.last(name).reason, pod.last(name).numbers["gpu_scope"]) == (Reason.GPU_BOUND, "unmapped")
    assert "no CUDA order" in pod.controller.status()["models"]["zero"]["gpus"]["why"]


@scenario
async def test_bytes_per_instance_come_from_the_models_own_gpus_once_the_old_copy_is_gone() -> None:
    pod = Pod({"m": gpu_config(1)})
    nvml = busy_and_idle_nvml()
    nvml.gpus[0].utilization_percent = 10
    sampler = NvmlGpuSampler(1.0, nvml=nvml, clock=pod.clock, env={})
    pod.sample = lambda now_s: sampler.sample()
    await pod.run(until=6, m=1.6)  # up to 2 at 6, a full reload, collected at 7
    assert pod.instances("m") == 2
    # The neighbour GPU fills up meanwhile; on the model's GPU the old copy (4 GiB) drains beside the new (8).
    nvml.gpus[0].memory_used_bytes = 78 * GIB
    nvml.gpus[1].memory_used_bytes = 18 * GIB
    await pod.run(until=12)
    nvml.gpus[1].memory_used_bytes = 14 * GIB  # the old copy is gone
    await pod.run(until=16)
    assert pod.controller.status()["models"]["m"]["memory_per_instance_bytes"] is None  # 7 + settle_s (10)
    await pod.run(until=17)
    assert pod.controller.status()["models"]["m"]["memory_per_instance_bytes"] == 4 * GIB
