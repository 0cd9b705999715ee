"""The on/off switch of an optional fast search path (the compiled CPU kernel, `kernel`; the fused
CUDA kernel, `fused`): an environment variable turns it off for a process, `disabled()` for a
block (benchmarks and tests of the torch reference). This module owns only that switch.
"""

from __future__ import annotations

import contextlib
import os


class FastPath:
    """On unless `env` is "0" or a `disabled()` block is running."""

    def __init__(self, env: str):
        self.env = env
        self._on = True

    def enabled(self) -> bool:
        return self._on and os.environ.get(self.env, "1") != "0"

    @contextlib.contextmanager
    def disabled(self):
        """Run the torch reference inside this block."""
        old, self._on = self._on, False
        try:
            yield
        finally:
            self._on = old
