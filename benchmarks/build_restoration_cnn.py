"""Build a small image-restoration CNN, like the field report's license-plate
restoration model, and write its Triton model directory with the TorchScript runner.

    python benchmarks/build_restoration_cnn.py --repository DIR \
        [--name license_plate_restoration] [--instances 1] [--parameter KEY=VALUE ...]

The network is a conv encoder/decoder with a residual output: 1x3x128x128 in,
1x3x128x128 out. The weights are random (fixed seed): what matters for tuning
is the shape of the work (convolutions at 128, 64 and 32 pixels), not the
quality of the restoration. One inference takes about 12 ms on one
CPU core, so instance counts and flags show up in the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from tritonpilot.tools.runner import (  # noqa: E402
    EXIT_USAGE,
    RunnerError,
    TensorSpec,
    check_parameters,
    parse_parameter,
    write_model_dir,
)

DEFAULT_NAME = "license_plate_restoration"
IMAGE_DIMS = (3, 128, 128)
SEED = 20231227
MAX_BATCH_SIZE = 8


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True))


class RestorationCNN(nn.Module):
    """Encoder 128->64->32 px, a bottleneck, decoder back to 128 px, plus the input."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.encoder = nn.Sequential(_conv(3, width), _conv(width, 2 * width, 2), _conv(2 * width, 4 * width, 2))
        self.bottleneck = _conv(4 * width, 4 * width)
        self.decoder = nn.Sequential(_up(4 * width, 2 * width), _up(2 * width, width))
        self.head = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        residual = self.head(self.decoder(self.bottleneck(self.encoder(image))))
        return torch.clamp(image + residual, 0.0, 1.0)


def build_scripted(seed: int = SEED) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    return torch.jit.script(RestorationCNN().eval())


def build(
    repository: Path, name: str = DEFAULT_NAME, instances: int = 1, parameters: dict[str, str] | None = None
) -> Path:
    """Script the model, save it beside the model directory, write the directory."""
    repository.mkdir(parents=True, exist_ok=True)
    scripted_path = repository / f".{name}.pt"
    build_scripted().save(str(scripted_path))
    try:
        return write_model_dir(
            repository,
            name,
            scripted_path,
            inputs=[TensorSpec("image", "FP32", IMAGE_DIMS)],
            outputs=[TensorSpec("restored", "FP32", IMAGE_DIMS)],
            max_batch_size=MAX_BATCH_SIZE,
            instances=instances,
            parameters=parameters,
        )
    finally:
        scripted_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True, type=Path, metavar="DIR")
    parser.add_argument("--name", default=DEFAULT_NAME)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--parameter", dest="parameters", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        parameters = dict(parse_parameter(p) for p in args.parameters)
        for warning in check_parameters(parameters):
            print(f"warning: {warning}", file=sys.stderr)
        model_dir = build(args.repository, args.name, args.instances, parameters)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {model_dir}: input image FP32 [-1,3,128,128], output restored FP32 [-1,3,128,128]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
