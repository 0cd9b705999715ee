"""Progress bars for long work (stderr, tqdm); silent when LIFTEDGE_NO_PROGRESS is set."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap `iterable` in a progress bar on stderr."""
    disable = bool(os.environ.get("LIFTEDGE_NO_PROGRESS"))
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True)
