"""Files that ship inside the wheel (the deploy/ folder, installed as tritonpilot.deploy).

Commands find them here, never through a path into a checkout, so they work the
same from a clone, an editable install and a wheel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

PACKAGE = "tritonpilot.deploy"


def deploy_file(relative: str) -> Traversable:
    """deploy/<relative> as shipped, e.g. 'policy.example.yaml'."""
    return resources.files(PACKAGE).joinpath(*relative.split("/"))


@contextlib.contextmanager
def deploy_path(relative: str) -> Iterator[Path]:
    """A real filesystem path for deploy/<relative> (a file or a folder) while the block runs.

    Installed wheels are plain folders, so this is the file itself; from a zip import
    it would be a temporary copy.
    """
    with resources.as_file(deploy_file(relative)) as path:
        yield Path(path)


EXAMPLE_POLICY = "policy.example.yaml"
RUNNER_MODEL = "torchscript_runner/model.py"
DEMO_MODELS = "demo_models"
GRAFANA_DASHBOARD = "kubernetes/base/grafana/tritonpilot-dashboard.json"
