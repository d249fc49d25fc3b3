"""tritonpilot: a sidecar that tunes NVIDIA Triton's instance counts and PyTorch-backend flags while it serves."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tritonpilot")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
