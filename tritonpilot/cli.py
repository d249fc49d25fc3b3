"""The `tritonpilot` command: one subcommand per module.

Each module named in COMMANDS exposes `configure(parser)` and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `tritonpilot check`
never pays for grpc or torch. Exit statuses are tritonpilot.exits's, everywhere:
0 ok, 1 runtime failure, 2 usage error or invalid policy, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tritonpilot import __version__, exits

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("tritonpilot.sidecar.serve", "run the sidecar: gRPC proxy, metrics and controller"),
    "check": ("tritonpilot.sidecar.check", "validate a policy file and print the resolved policy per model"),
    "triton": ("tritonpilot.tools.embedded", "run the real tritonserver from the nvidia-pytriton wheel"),
    "bench": ("tritonpilot.tools.bench", "perf_analyzer-style load generator, with side-by-side --compare"),
    "runner": ("tritonpilot.tools.runner", "write a Triton model directory that serves a TorchScript file"),
    "tune": ("tritonpilot.tools.tune", "measure flag profiles x instance counts x concurrency on a live Triton"),
    "demo": ("tritonpilot.tools.demo", "embedded Triton + sidecar + a load ramp, printed as a timeline"),
    "replay": ("tritonpilot.tools.replay", "the decision core over a `serve --record` recording, per policy"),
}


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only the selected one imports its module for its options."""
    parser = argparse.ArgumentParser(prog="tritonpilot", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == selected:
            importlib.import_module(module_name).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return exits.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
