"""The sub-commands of `liftedge`; each module exposes `register(subparsers)`.

Shared here: `claimed_output`, which every command that writes a folder wraps its work in, and
`check_calibration_arguments`, which checks the calibration options against the model's config
before any weight is loaded.
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


def check_calibration_arguments(args: argparse.Namespace) -> None:
    """--samples / --seq-len / --menu / --device / --context checked in a second, before the model loads."""
    from liftedge.errors import LiftedgeError
    from liftedge.model import peek_max_positions

    if getattr(args, "samples", 1) < 1:
        raise LiftedgeError(f"--samples must be at least 1, got {args.samples}")
    if getattr(args, "seq_len", 2) < 2:
        raise LiftedgeError(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    for rate in getattr(args, "menu", None) or ():
        check_shipped_rate(rate, "--menu")
    if getattr(args, "device", None) is not None:
        from liftedge.quantize.save import torch_device

        torch_device(args.device)
    positions = peek_max_positions(args.model)
    if positions is None:
        return
    if getattr(args, "seq_len", 0) > positions:
        raise LiftedgeError(f"--seq-len {args.seq_len} is beyond the {positions} positions {args.model} was "
                            f"configured for; use --seq-len {positions} or less")
    context = getattr(args, "context", None) or getattr(args, "max_context", None)
    if context and context > positions:
        raise LiftedgeError(f"a context of {context} tokens is beyond the {positions} positions {args.model} was "
                            f"configured for; use --context {positions} or less")


def check_shipped_rate(text: str, flag: str = "--rate") -> None:
    """A LiftQuant rate D/d that liftedge ships a codebook for (else name the nearest shipped)."""
    from liftedge.errors import LiftedgeError
    from liftedge.lattice.menu import shipped_rates
    from liftedge.types import Rate

    try:
        rate = Rate.parse(text)
    except ValueError as exc:
        raise LiftedgeError(f"{flag} {text}: {exc}") from None
    shipped = shipped_rates()
    if rate not in shipped:
        nearest = sorted(shipped, key=lambda r: abs(r.D / r.d - rate.D / rate.d))[:3]
        raise LiftedgeError(f"{flag} {text}: no codebook is shipped for this rate; nearest shipped: "
                            + ", ".join(f"{r} ({r.D / r.d:.3f} bits)" for r in nearest))
