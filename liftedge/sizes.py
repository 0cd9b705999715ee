"""Byte sizes as people type them (`--ram 6GB`, `--budget 1.5GiB`) and as liftedge prints them.

Owns `parse_size` and `format_size`; nothing else. Units, decided once here:

- `B`                  bytes (also a plain integer: `4096` is 4096 bytes)
- `KB MB GB TB`        decimal, powers of 1000 (what storage and RAM vendors print)
- `KiB MiB GiB TiB`    binary, powers of 1024
- `K M G T` (bare)     binary, powers of 1024, as `dd`, `docker`, `sort -S` and `numfmt --from=iec`
                       read them; `KiB/MiB/GiB` mean the same thing and are unambiguous.

Case does not matter (`4gb`, `4Gb` and `4GB` are all 4 × 10^9 bytes; nobody asks for bits
here). A decimal point is allowed (`3.5G`, `1.5TB`); the result is rounded down to whole bytes.
Zero, negative and unparseable sizes are refused with a message that shows valid forms.
Note that a phone sold with "8 GB" of RAM carries 8 GiB of DRAM: device profiles store
binary sizes, so `--ram 8GB` (8 × 10^9) is ~7% below the hardware and errs on the safe side.
"""

from __future__ import annotations

import math
import re

from liftedge.errors import LiftedgeError

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}

_SIZE_RE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-zA-Z]*)\s*$")

EXAMPLES = "4096, 512MB, 512M, 3.5G, 4GB, 4GiB, 1.5T"
# For the help text of every option that takes a size (--ram, --budget).
SIZE_HELP = "bytes, or with a unit: 6GB = 6×10^9; 6G = 6GiB = 6×2^30; 512MB, 512M, 1.5T"


def parse_size(text: str | int) -> int:
    """Parse a byte size such as "4GB" (4 × 10^9), "4GiB" or "4G" (4 × 2^30), "512MB" → bytes.

    Plain integers (or int arguments) are bytes. Raises `LiftedgeError` for garbage, zero or
    negative sizes, naming the accepted forms.
    """
    if isinstance(text, bool):
        raise LiftedgeError(f"a size must be a number of bytes or a string like {EXAMPLES}")
    if isinstance(text, int):
        return _positive(text, str(text))
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise LiftedgeError(
            f"cannot read {text!r} as a size; write a number with an optional unit, e.g. {EXAMPLES} "
            f"(KB/MB/GB/TB are powers of 1000; K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024)"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value):
        raise LiftedgeError(f"size {text!r} is too large")
    return _positive(math.floor(value), text)


def _positive(nbytes: int, text: str) -> int:
    if nbytes <= 0:
        raise LiftedgeError(f"a size must be positive (at least 1 byte), got {text!r}")
    return nbytes


_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_size(nbytes: int) -> str:
    """Format bytes with binary units and 3 significant digits: 1536 → "1.50 KiB", 100 → "100 B".

    `parse_size(format_size(n))` is within 0.5% of n (the printed form is rounded).
    """
    if nbytes < 0:
        return "-" + format_size(-nbytes)
    for unit, scale in _BINARY:
        if nbytes >= scale:
            value = nbytes / scale
            digits = 2 if value < 10 else 1 if value < 100 else 0
            return f"{value:.{digits}f} {unit}"
    return f"{int(nbytes)} B"
