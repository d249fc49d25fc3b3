"""TorchScript runner: serves `model.pt` from Triton's Python backend with the
libtorch (PyTorch) backend's `parameters` semantics.

Why: the Triton in the nvidia-pytriton wheel has no libtorch backend, so on CPU
machines nothing honours INFERENCE_MODE, DISABLE_OPTIMIZED_EXECUTION, ... This
file reproduces what triton-inference-server/pytorch_backend does with them
(src/pt/model_state.cc ParseParameters, src/pt/model_instance_state.cc Execute,
src/libtorch.cc ModelInstanceExecute; parsing from backend/src/backend_common.cc):

- keys, defaults, parsing and error texts as in the backend: booleans are
  true/on/1 or false/off/0 (case-insensitive), anything else fails the load with
  "failed to convert '<v>' to boolean"; integers follow std::stoi ("4x" -> 4,
  "x" -> "failed to convert 'x' to integral number");
- the INFO lines at load, same texts, same order, only when the config has a
  `parameters` map (the backend logs nothing otherwise);
- per execute: graph-executor optimize, InferenceMode guard, cuDNN, then the
  JIT/fuser switches only if their key was given, then NoGrad, then forward;
- ENABLE_NVFUSER is ignored, as in a current backend (the key is not read
  since pytorch_backend PR #119, "Remove nvfuser implementation", 23.12).

Where the Python backend differs from libtorch, and what we do:
- every instance is its own stub process, so "process-global" torch state
  (JIT switches, thread pools) is per instance here; models never overwrite
  each other's JIT settings as they do inside one libtorch process;
- ENABLE_WEIGHT_SHARING is parsed and logged but cannot share across processes;
- ENABLE_CACHE_CLEANING is parsed and logged; on CPU it is a no-op (the
  backend only empties the CUDA cache for GPU instances);
- intra-op threads default to 1 (not all cores) unless INTRA_OP_THREAD_COUNT
  is set: N instances are N processes, and N pools of all cores would
  oversubscribe the CPU, which libtorch's one shared pool does not;
- TYPE_STRING and Dict inputs are not supported (the load fails, saying so).

TRITONPILOT_REPORT_FLAGS "true" adds one INFO log line per execute with the
torch state observed inside the guards, right before forward (see
`observe_torch_state`). A log line, not an extra output tensor, because it
needs no change to the model's inputs/outputs (a config override that only
edits `parameters` keeps working) and a test can read it from Triton's own log
file, with no mocks.
"""

import json
import os
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside a Triton stub (tests, tools): pure parts only
    pb_utils = None

# One knob per key the backend reads (src/pt/model_state.cc).
BOOL_KEYS = (
    "DISABLE_OPTIMIZED_EXECUTION",
    "ENABLE_CACHE_CLEANING",
    "INFERENCE_MODE",
    "DISABLE_CUDNN",
    "ENABLE_TENSOR_FUSER",
    "ENABLE_WEIGHT_SHARING",
    "ENABLE_JIT_PROFILING",
    "ENABLE_JIT_EXECUTOR",
)
INT_KEYS = ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT")
REPORT_KEY = "TRITONPILOT_REPORT_FLAGS"
REPORT_PREFIX = "tritonpilot runner flags"
DEFAULT_INTRA_OP_THREADS = 1
MODEL_FILENAME = "model.pt"

# Model-config data types the backend maps to torch (libtorch_utils.cc
# ModelConfigDataTypeToTorchType). TYPE_STRING is valid there, not here.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "TYPE_BOOL": torch.bool,
    "TYPE_UINT8": torch.uint8,
    "TYPE_INT8": torch.int8,
    "TYPE_INT16": torch.int16,
    "TYPE_INT32": torch.int32,
    "TYPE_INT64": torch.int64,
    "TYPE_FP16": torch.float16,
    "TYPE_FP32": torch.float32,
    "TYPE_FP64": torch.float64,
}
TRITON_DTYPE_NAMES = {v: k[len("TYPE_"):] for k, v in TORCH_DTYPES.items()}


class ParameterError(ValueError):
    """A `parameters` value the backend would refuse; the message is Triton's."""


# ---------------------------------------------------------------- parsing


def parse_bool_value(value: str) -> bool:
    """backend_common.cc ParseBoolValue."""
    lowered = value.lower()
    if lowered in ("true", "on", "1"):
        return True
    if lowered in ("false", "off", "0"):
        return False
    raise ParameterError(f"failed to convert '{value}' to boolean")


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def parse_int_value(value: str) -> int:
    """backend_common.cc ParseIntValue, i.e. std::stoi: leading whitespace,
    an optional sign, then as many digits as there are; the rest is ignored."""
    text = value.lstrip(" \t\n\v\f\r")
    sign = ""
    if text[:1] in ("+", "-"):
        sign, text = text[0], text[1:]
    digits = ""
    for ch in text:
        if ch not in string.digits:
            break
        digits += ch
    if not digits:
        raise ParameterError(f"failed to convert '{value}' to integral number")
    number = int(sign + digits)
    if not _INT32_MIN <= number <= _INT32_MAX:
        # std::out_of_range is not caught by the backend (the server would
        # abort); failing the load is the closest safe behaviour.
        raise ParameterError(f"failed to convert '{value}' to integral number (out of range)")
    return number


def _string_value(params: dict[str, Any], key: str) -> str | None:
    """GetParameterValue: only `string_value` is read; None = key absent."""
    if key not in params:
        return None
    entry = params[key]
    if isinstance(entry, dict):
        return str(entry.get("string_value", ""))
    return str(entry)


@dataclass(frozen=True)
class BackendFlags:
    """The model-level settings ParseParameters produces. None = key not given
    (the backend leaves torch untouched for those)."""

    optimized_execution: bool = True
    cache_cleaning: bool = False
    inference_mode: bool = True  # the backend default since 23.06
    cudnn: bool = True
    tensor_fuser: bool | None = None
    weight_sharing: bool | None = None
    jit_profiling: bool | None = None
    jit_executor: bool | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    report_flags: bool = False


def parse_parameters(params: dict[str, Any]) -> BackendFlags:
    """Parse every key the way ParseParameters does; raises ParameterError."""

    def get_bool(key: str) -> bool | None:
        raw = _string_value(params, key)
        return None if raw is None else parse_bool_value(raw)

    def get_int(key: str) -> int | None:
        raw = _string_value(params, key)
        return None if raw is None else parse_int_value(raw)

    # Same order as the backend, so the first bad key is the one reported.
    disable_opt = get_bool("DISABLE_OPTIMIZED_EXECUTION")
    cache_cleaning = get_bool("ENABLE_CACHE_CLEANING")
    inference_mode = get_bool("INFERENCE_MODE")
    disable_cudnn = get_bool("DISABLE_CUDNN")
    tensor_fuser = get_bool("ENABLE_TENSOR_FUSER")
    weight_sharing = get_bool("ENABLE_WEIGHT_SHARING")
    jit_profiling = get_bool("ENABLE_JIT_PROFILING")
    jit_executor = get_bool("ENABLE_JIT_EXECUTOR")
    intra = get_int("INTRA_OP_THREAD_COUNT")
    inter = get_int("INTER_OP_THREAD_COUNT")
    report = get_bool(REPORT_KEY)
    return BackendFlags(
        optimized_execution=not bool(disable_opt),
        cache_cleaning=bool(cache_cleaning),
        inference_mode=True if inference_mode is None else inference_mode,
        cudnn=not bool(disable_cudnn),
        tensor_fuser=tensor_fuser,
        weight_sharing=weight_sharing,
        jit_profiling=jit_profiling,
        jit_executor=jit_executor,
        intra_op_threads=intra,
        inter_op_threads=inter,
        report_flags=bool(report),
    )


def _on_off(value: bool) -> str:
    return "enabled" if value else "disabled"


def load_log_lines(flags: BackendFlags, model_name: str, intra_now: int, inter_now: int) -> list[str]:
    """The INFO lines ParseParameters logs, in its order. Thread counts are the
    values torch reports after setting them, as in the backend."""
    suffix = f" for model instance '{model_name}'"
    lines = [
        f"Optimized execution is {_on_off(flags.optimized_execution)}{suffix}",
        f"Cache Cleaning is {_on_off(flags.cache_cleaning)}{suffix}",
        f"Inference Mode is {_on_off(flags.inference_mode)}{suffix}",
        f"cuDNN is {_on_off(flags.cudnn)}{suffix}",
    ]
    if flags.tensor_fuser is not None:
        lines.append(f"Tensor fuser is {_on_off(flags.tensor_fuser)}{suffix}")
    if flags.weight_sharing is not None:
        lines.append(f"Weight sharing is {_on_off(flags.weight_sharing)}{suffix}")
    if flags.jit_profiling is not None:
        lines.append(f"Jit profiling is {_on_off(flags.jit_profiling)}{suffix}")
    if flags.jit_executor is not None:
        lines.append(f"Jit executor is {_on_off(flags.jit_executor)}{suffix}")
    if flags.intra_op_threads is not None and flags.intra_op_threads > 0:
        lines.append(f"Intra op thread count is set to {intra_now}{suffix}")
    if flags.inter_op_threads is not None and flags.inter_op_threads > 0:
        lines.append(f"Inter op thread count is set to {inter_now}{suffix}")
    return lines


# ---------------------------------------------------------------- torch state


class _Once:
    """std::call_once: thread counts are set by the first model that asks."""

    def __init__(self) -> None:
        self._done = False
        self._lock = threading.Lock()

    def __call__(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self._done:
                self._done = True
                fn()


_intra_once = _Once()
_inter_once = _Once()


def _set_interop_threads(count: int) -> None:
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:  # the backend swallows c10::Error here too
        pass


def apply_thread_counts(flags: BackendFlags) -> None:
    """Once per process, as the backend's std::call_once; see module doc for the default."""
    intra, inter = flags.intra_op_threads, flags.inter_op_threads
    if intra is not None and intra > 0:
        _intra_once(lambda: torch.set_num_threads(intra))
    else:
        torch.set_num_threads(DEFAULT_INTRA_OP_THREADS)
    if inter is not None and inter > 0:
        _inter_once(lambda: _set_interop_threads(inter))


def apply_execute_flags(flags: BackendFlags) -> None:
    """What Execute sets before forward, besides the InferenceMode/NoGrad guards."""
    torch._C._set_graph_executor_optimize(flags.optimized_execution)
    torch.backends.cudnn.enabled = flags.cudnn
    if flags.jit_profiling is not None:
        torch._C._jit_set_profiling_mode(flags.jit_profiling)
    if flags.jit_executor is not None:
        torch._C._jit_set_profiling_executor(flags.jit_executor)
    if flags.tensor_fuser is not None:
        torch._C._jit_set_texpr_fuser_enabled(flags.tensor_fuser)


def _read_switch(setter: Callable[[bool], bool]) -> bool:
    """torch has setters that return the old value but no getters for these."""
    old = setter(True)
    setter(old)
    return old


def observe_torch_state() -> dict[str, Any]:
    """The torch state as forward will see it; read inside the guards."""
    return {
        "optimized_execution": torch._C._get_graph_executor_optimize(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "cudnn": torch.backends.cudnn.enabled,
        "jit_profiling_mode": _read_switch(torch._C._jit_set_profiling_mode),
        "jit_profiling_executor": _read_switch(torch._C._jit_set_profiling_executor),
        "tensor_fuser": torch._C._jit_texpr_fuser_enabled(),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
    }


# ---------------------------------------------------------------- I/O mapping


def _named_index(name: str) -> int | None:
    """<name>__<index>: the index, or None. Empty index -> 0, like std::atoi."""
    pos = name.find("__")
    if pos < 0:
        return None
    suffix = name[pos + 2:]
    if not all(ch in string.digits for ch in suffix):
        return None
    return int(suffix) if suffix else 0


def input_positions(config_names: list[str], forward_args: list[str]) -> list[int]:
    """Forward position of each config input (GetNamingConvention/AddInputToMap):
    forward argument names, else <name>__<index>, else config order."""
    if all(name in forward_args for name in config_names):
        return [forward_args.index(name) for name in config_names]
    indices = [_named_index(name) for name in config_names]
    named = [index for index in indices if index is not None]
    if len(named) == len(indices):
        return named
    return list(range(len(config_names)))


def output_positions(config_names: list[str]) -> list[int]:
    """<name>__<index> if every output follows it, else config order."""
    indices = [_named_index(name) for name in config_names]
    named = [index for index in indices if index is not None]
    if len(named) == len(indices):
        return named
    return list(range(len(config_names)))


def split_outputs(result: Any) -> list[torch.Tensor]:
    """Tensor or tuple of tensors, as Execute accepts (List[str] is not supported here)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, tuple) and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise TypeError(
        "output must be of type Tensor, List[str] or Tuple containing one of "
        "these two types. It should not be a List / Dictionary of Tensors or a Scalar"
    )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    config_dtype: str  # "TYPE_FP32"
    position: int  # forward argument / output index


# ---------------------------------------------------------------- the model


class TritonPythonModel:
    """Triton Python-backend entry points: initialize / execute / finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        try:
            self.flags = parse_parameters(config.get("parameters", {}) or {})
        except ParameterError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        apply_thread_counts(self.flags)
        if "parameters" in config:  # the backend logs only when the map exists
            for line in load_log_lines(
                self.flags, self.model_name, torch.get_num_threads(), torch.get_num_interop_threads()
            ):
                pb_utils.Logger.log_info(line)
        if self.flags.report_flags:
            pb_utils.Logger.log_info(f"Torch flags are reported per execute for model instance '{self.model_name}'")
        path = os.path.join(args["model_repository"], args["model_version"], MODEL_FILENAME)
        self.module: torch.jit.ScriptModule | None = self._load(path)  # None once finalized
        self.inputs, self.outputs = self._io_specs(config)
        self.execute_count = 0

    def _loaded_module(self) -> torch.jit.ScriptModule:
        if self.module is None:
            raise pb_utils.TritonModelException(f"model instance '{self.model_name}' is finalized")
        return self.module

    def _load(self, path: str) -> torch.jit.ScriptModule:
        if not os.path.exists(path):
            raise pb_utils.TritonModelException(
                f"unable to find '{path}' for model instance '{self.model_name}'"
            )
        # The backend loads under the InferenceMode guard too.
        try:
            with torch.inference_mode(self.flags.inference_mode):
                return torch.jit.load(path, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any torch error fails the load
            raise pb_utils.TritonModelException(f"failed to load model '{self.model_name}': {exc}") from None

    def _io_specs(self, config: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
        # torch types ScriptModule.forward as a plain callable; on a loaded module it is a ScriptMethod.
        forward = cast("torch._C.ScriptMethod", self._loaded_module().forward)
        arguments = forward.schema.arguments
        forward_args = [a.name for a in arguments][1:]  # drop self
        config_inputs = config.get("input", [])
        config_outputs = config.get("output", [])
        if not config_inputs:
            raise pb_utils.TritonModelException(
                "model configuration must contain at least one input, none were specified."
            )
        if not config_outputs:
            raise pb_utils.TritonModelException(
                "model configuration must contain at least one output, none were specified."
            )
        if len(forward_args) != len(config_inputs):
            raise pb_utils.TritonModelException(
                f"unable to load model '{self.model_name}', configuration expects "
                f"{len(config_inputs)} inputs, model provides {len(forward_args)}"
            )
        for io, kind in [(io, "input") for io in config_inputs] + [(io, "output") for io in config_outputs]:
            if io["data_type"] not in TORCH_DTYPES:
                raise pb_utils.TritonModelException(
                    f"unsupported datatype {io['data_type']} for {kind} '{io['name']}' "
                    f"for model '{self.model_name}' (the tritonpilot runner takes numeric tensors only)"
                )
        in_names = [io["name"] for io in config_inputs]
        out_names = [io["name"] for io in config_outputs]
        inputs = [
            TensorSpec(io["name"], io["data_type"], pos)
            for io, pos in zip(config_inputs, input_positions(in_names, forward_args))
        ]
        outputs = [
            TensorSpec(io["name"], io["data_type"], pos)
            for io, pos in zip(config_outputs, output_positions(out_names))
        ]
        return inputs, outputs

    def execute(self, requests: list[Any]) -> list[Any]:
        # Without batching every request runs alone; with it, Triton's dynamic
        # batcher has already grouped them and we run the group as one batch.
        if self.max_batch_size > 0:
            return self._run_batch(requests)
        responses = []
        for request in requests:
            responses.extend(self._run_batch([request]))
        return responses

    def _run_batch(self, requests: list[Any]) -> list[Any]:
        try:
            with torch.inference_mode(self.flags.inference_mode):
                args, batch_sizes = self._gather_inputs(requests)
            outputs, state = self._forward(args)
            per_request = self._scatter_outputs(outputs, batch_sizes)
        except Exception as exc:  # noqa: BLE001 - every request gets the error
            error = pb_utils.TritonError(f"PyTorch execute failure: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        finally:
            self._clear_cache()
        if state is not None:
            state.update(
                requests=len(requests), batch_size=sum(batch_sizes), execute=self.execute_count, pid=os.getpid()
            )
            pb_utils.Logger.log_info(
                f"{REPORT_PREFIX} for model instance '{self.model_name}': {json.dumps(state, sort_keys=True)}"
            )
        return [pb_utils.InferenceResponse(output_tensors=tensors) for tensors in per_request]

    def _gather_inputs(self, requests: list[Any]) -> tuple[list[torch.Tensor], list[int]]:
        per_input: list[list[torch.Tensor]] = [[] for _ in self.inputs]
        for request in requests:
            for i, spec in enumerate(self.inputs):
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                per_input[i].append(torch.from_dlpack(tensor.to_dlpack()))
        if self.max_batch_size > 0:
            batch_sizes = [int(t.shape[0]) for t in per_input[0]]
            merged = [parts[0] if len(parts) == 1 else torch.cat(parts, dim=0) for parts in per_input]
        else:
            batch_sizes = [1]
            merged = [parts[0] for parts in per_input]
        args: list[torch.Tensor] = [torch.empty(0)] * len(self.inputs)
        for spec, tensor in zip(self.inputs, merged):
            args[spec.position] = tensor
        return args, batch_sizes

    def _forward(self, args: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, Any] | None]:
        self.execute_count += 1
        apply_execute_flags(self.flags)
        with torch.inference_mode(self.flags.inference_mode), torch.no_grad():
            state = observe_torch_state() if self.flags.report_flags else None
            results = split_outputs(self._loaded_module()(*args))
        if state is not None:
            state["output_is_inference"] = all(t.is_inference() for t in results)
        return results, state

    def _scatter_outputs(self, results: list[torch.Tensor], batch_sizes: list[int]) -> list[list[Any]]:
        per_request: list[list[Any]] = [[] for _ in batch_sizes]
        for spec in self.outputs:
            if spec.position >= len(results):
                raise ValueError(
                    f"The output {spec.name} in the model configuration refers to an output "
                    f"index which doesn't exist. This model has {len(results)} outputs"
                )
            tensor = results[spec.position]
            expected = TORCH_DTYPES[spec.config_dtype]
            if tensor.dtype != expected:
                raise ValueError(
                    f"configuration expects datatype TYPE_{TRITON_DTYPE_NAMES[expected]} for output "
                    f"'{spec.name}', model provides TYPE_{TRITON_DTYPE_NAMES.get(tensor.dtype, tensor.dtype)}"
                )
            if tensor.dim() == 0:
                raise ValueError(f"output '{spec.name}' is a scalar which is not supported.")
            parts = torch.split(tensor, batch_sizes, dim=0) if self.max_batch_size > 0 else [tensor]
            for i, part in enumerate(parts):
                per_request[i].append(pb_utils.Tensor(spec.name, part.contiguous().numpy()))
        return per_request

    def _clear_cache(self) -> None:
        # The backend empties the CUDA cache only for GPU instances; the runner
        # always runs on CPU, so ENABLE_CACHE_CLEANING has nothing to clean.
        if self.flags.cache_cleaning and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def finalize(self) -> None:
        self.module = None

