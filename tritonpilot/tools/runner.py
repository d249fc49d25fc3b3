"""`tritonpilot runner`: write a Triton model directory that serves a TorchScript
file through the TorchScript runner (deploy/torchscript_runner/model.py), a
Python-backend model with the libtorch backend's `parameters` semantics.

    DIR/NAME/config.pbtxt     backend "python", KIND_CPU x instances, I/O, parameters
    DIR/NAME/1/model.py       a copy of the runner
    DIR/NAME/1/model.pt       a copy of the TorchScript file

`write_model_dir` is the library entry point (tests, `tune`); `configure`/`run`
are the CLI. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import shutil
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tritonpilot import resources

# Inside the installed package (tritonpilot/deploy/torchscript_runner/model.py), a plain folder.
with resources.deploy_path(resources.RUNNER_MODEL) as _runner:
    RUNNER_SOURCE = _runner
VERSION = "1"
# Numeric types only: the runner hands tensors to torch (TYPE_STRING is libtorch's List[str]).
DTYPES = ("BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64")
# Accepted by the backend but without effect today; worth a warning.
IGNORED_KEYS = {"ENABLE_NVFUSER": "not read by the libtorch backend since 23.12 (nvfuser removed), nor by the runner"}
EXIT_USAGE = 2


class RunnerError(ValueError):
    """A bad argument: the CLI prints it and exits with code 2."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: NAME:DTYPE:DIMS, dims without the batch dimension."""

    name: str
    dtype: str  # "FP32", without the TYPE_ prefix
    dims: tuple[int, ...]


def parse_tensor_spec(text: str) -> TensorSpec:
    """'image:FP32:3,128,128' -> TensorSpec; -1 is a variable dimension."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise RunnerError(f"tensor spec {text!r}: expected NAME:DTYPE:DIMS, e.g. image:FP32:3,128,128")
    name, dtype, dims_text = parts
    dtype = dtype.upper().removeprefix("TYPE_")
    if dtype not in DTYPES:
        raise RunnerError(f"tensor spec {text!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        dims = tuple(int(d) for d in dims_text.split(","))
    except ValueError:
        raise RunnerError(
            f"tensor spec {text!r}: dims {dims_text!r} must be comma-separated integers, e.g. 3,128,128 or -1"
        ) from None
    if any(d == 0 or d < -1 for d in dims):
        raise RunnerError(f"tensor spec {text!r}: each dim must be a positive integer or -1, got {dims_text!r}")
    return TensorSpec(name, dtype, dims)


def parse_parameter(text: str) -> tuple[str, str]:
    """'INFERENCE_MODE=true' -> ('INFERENCE_MODE', 'true')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise RunnerError(f"parameter {text!r}: expected KEY=VALUE, e.g. INFERENCE_MODE=true")
    return key, value


@functools.cache
def load_runner_module() -> ModuleType:
    """The runner's own parsing, so a bad value fails here with Triton's message
    instead of at load time. Registered in sys.modules for its dataclasses."""
    spec = importlib.util.spec_from_file_location("tritonpilot_torchscript_runner", RUNNER_SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def check_parameters(parameters: Mapping[str, str]) -> list[str]:
    """Raise RunnerError for a value the backend would refuse; return warnings
    for keys that do nothing, or that could not be checked here."""
    if not parameters:
        return []
    try:
        runner = load_runner_module()
    except ModuleNotFoundError as exc:  # torch: the runner's parsing lives beside its torch code
        return [f"parameters not checked here: {exc.name} is missing; pip install 'tritonpilot[runner]' "
                "(the Python that Triton runs the model with needs torch too)"]
    # The keys the runner reads are the libtorch backend's (src/pt/model_state.cc), plus its own.
    known = {*runner.BOOL_KEYS, *runner.INT_KEYS, runner.REPORT_KEY}
    warnings = []
    for key in parameters:
        if key in IGNORED_KEYS:
            warnings.append(f"parameter {key}: {IGNORED_KEYS[key]}")
        elif key not in known:
            warnings.append(f"parameter {key}: not a libtorch backend key; the runner ignores it")
    if any(key in known for key in parameters):
        try:
            runner.parse_parameters({k: {"string_value": v} for k, v in parameters.items()})
        except runner.ParameterError as exc:
            raise RunnerError(f"parameters: {exc} (Triton would fail the model load)") from None
    return warnings


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_block(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.dims)
    return f"  {{ name: {_quote(spec.name)}, data_type: TYPE_{spec.dtype}, dims: [ {dims} ] }}"


def config_pbtxt(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch_size: int = 0,
    instances: int = 1,
    parameters: Mapping[str, str] | None = None,
    dynamic_batching: bool = False,
    max_queue_delay_us: int = 0,
) -> str:
    """The config.pbtxt text (protobuf text format, as Triton reads it)."""
    lines = [
        "# Written by `tritonpilot runner`: a TorchScript model served by the",
        "# tritonpilot runner (Python backend, libtorch `parameters` semantics).",
        f"name: {_quote(name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(_tensor_block(s) for s in inputs),
        "]",
        "output [",
        ",\n".join(_tensor_block(s) for s in outputs),
        "]",
        f"instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]",
    ]
    if dynamic_batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}")
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{ key: {_quote(key)} value {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def _validate(
    name: str, torchscript: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
    max_batch_size: int, instances: int, dynamic_batching: bool,
) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise RunnerError(f"model name {name!r}: must be a non-empty directory name")
    if not torchscript.is_file():
        raise RunnerError(f"TorchScript file not found: {torchscript}")
    if not zipfile.is_zipfile(torchscript):
        raise RunnerError(f"{torchscript} is not a TorchScript archive (torch.jit.save writes a zip file)")
    if not inputs or not outputs:
        raise RunnerError("at least one --input and one --output are needed")
    names = [s.name for s in (*inputs, *outputs)]
    if len(set(names)) != len(names):
        raise RunnerError(f"tensor names must be unique, got {names}")
    if max_batch_size < 0:
        raise RunnerError(f"--max-batch-size must be >= 0, got {max_batch_size}")
    if instances < 1:
        raise RunnerError(f"--instances must be >= 1, got {instances}")
    if dynamic_batching and max_batch_size == 0:
        raise RunnerError("--dynamic-batching needs --max-batch-size > 0")
    if not RUNNER_SOURCE.is_file():
        raise RunnerError(f"runner source missing from the installed package: {RUNNER_SOURCE} (reinstall tritonpilot)")


def write_model_dir(
    repository: Path | str,
    name: str,
    torchscript: Path | str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch_size: int = 0,
    instances: int = 1,
    parameters: Mapping[str, str] | None = None,
    dynamic_batching: bool = False,
    max_queue_delay_us: int = 0,
) -> Path:
    """Write (or overwrite) repository/name and return that directory.

    Raises RunnerError for a bad argument, before anything is written.
    """
    repository, torchscript = Path(repository), Path(torchscript)
    _validate(name, torchscript, inputs, outputs, max_batch_size, instances, dynamic_batching)
    check_parameters(parameters or {})
    model_dir = repository / name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RUNNER_SOURCE, version_dir / "model.py")
    if torchscript.resolve() != (version_dir / "model.pt").resolve():
        shutil.copyfile(torchscript, version_dir / "model.pt")
    text = config_pbtxt(
        name, inputs, outputs, max_batch_size=max_batch_size, instances=instances,
        parameters=parameters, dynamic_batching=dynamic_batching, max_queue_delay_us=max_queue_delay_us,
    )
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--torchscript", required=True, type=Path, metavar="FILE", help="a torch.jit.save file")
    parser.add_argument("--name", required=True, help="model name (the directory under --repository)")
    parser.add_argument("--repository", required=True, type=Path, metavar="DIR", help="model repository")
    parser.add_argument(
        "--input", dest="inputs", action="append", default=[], metavar="NAME:DTYPE:DIMS",
        help="e.g. image:FP32:3,128,128 (dims without the batch dim; -1 = variable); repeatable, in forward order",
    )
    parser.add_argument(
        "--output", dest="outputs", action="append", default=[], metavar="NAME:DTYPE:DIMS",
        help="e.g. restored:FP32:3,128,128; repeatable, in the order forward returns them",
    )
    parser.add_argument("--max-batch-size", type=int, default=0, metavar="N", help="0 = no batching (default)")
    parser.add_argument("--instances", type=int, default=1, metavar="N", help="KIND_CPU instance count (default 1)")
    parser.add_argument(
        "--dynamic-batching", action="store_true", help="let Triton merge requests (needs --max-batch-size > 0)"
    )
    parser.add_argument("--max-queue-delay-us", type=int, default=0, metavar="US", help="dynamic batcher delay")
    parser.add_argument(
        "--parameter", dest="parameters", action="append", default=[], metavar="KEY=VALUE",
        help="a libtorch backend parameter, e.g. INFERENCE_MODE=true; repeatable",
    )


def run(args: argparse.Namespace) -> int:
    try:
        inputs = [parse_tensor_spec(s) for s in args.inputs]
        outputs = [parse_tensor_spec(s) for s in args.outputs]
        parameters = dict(parse_parameter(p) for p in args.parameters)
        for warning in check_parameters(parameters):
            print(f"tritonpilot runner: warning: {warning}", file=sys.stderr)
        model_dir = write_model_dir(
            args.repository, args.name, args.torchscript, inputs, outputs,
            max_batch_size=args.max_batch_size, instances=args.instances, parameters=parameters,
            dynamic_batching=args.dynamic_batching, max_queue_delay_us=args.max_queue_delay_us,
        )
    except RunnerError as exc:
        print(f"tritonpilot runner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {model_dir} (config.pbtxt, {VERSION}/model.py, {VERSION}/model.pt)")
    return 0
