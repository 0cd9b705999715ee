"""The sub-commands of `liftedge`; each module exposes `register(subparsers)`.

Shared here: `claimed_output`, which every command that writes a folder wraps its work in.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Iterator


def command_inputs(args: argparse.Namespace) -> list[Path]:
    """The files and folders a command reads (model or pack, calibration text): never an output."""
    paths = [Path(args.model)] if getattr(args, "model", None) and Path(args.model).exists() else []
    return paths + [Path(p) for p in (getattr(args, "calib", None) or [])]


@contextlib.contextmanager
def claimed_output(args: argparse.Namespace) -> Iterator[None]:
    """Check and lock `args.output` for the whole command (`liftedge.io.claim_output`)."""
    from liftedge.io import claim_output

    with claim_output(args.output, getattr(args, "force", False), inputs=command_inputs(args)):
        yield
