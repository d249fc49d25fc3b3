"""What the deploy tests need to know of the sidecar: its options and its image's environment."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sidecar_options() -> argparse.ArgumentParser:
    """`tritonpilot serve`'s options, as serve reads the environment against them."""
    from tritonpilot.sidecar.serve import option_parser

    return option_parser()


def image_environment() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage: the defaults every container of the image starts with."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if not words:
            continue
        if words[0].upper() == "FROM":
            env = {}
        elif words[0].upper() == "ENV" and len(words) == 2:
            for token in shlex.split(words[1]):
                name, sep, value = token.partition("=")
                assert sep, f"Dockerfile: ENV {words[1]!r}: only the NAME=VALUE form is read here"
                env[name] = value
    return env
