"""Where liftedge keeps what it can recompute: downloaded models, calibration statistics.

The root is `$LIFTEDGE_CACHE` if set, else `$XDG_CACHE_HOME/liftedge`, else
`~/.cache/liftedge`. Entries are keyed by content hashes, so a stale entry is never read
for changed inputs; deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (created on first use)."""
    env = os.environ.get("LIFTEDGE_CACHE")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "liftedge"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_path(kind: str, key: str) -> Path:
    """A path for one cache entry of `kind` (a sub-folder) named by `key`."""
    folder = cache_root() / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / key


def sha256_file(path: str | os.PathLike, chunk_nbytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_nbytes):
            h.update(block)
    return h.hexdigest()


def sha256_text(*parts: str) -> str:
    """Hex SHA-256 of strings joined with a separator that cannot occur in them."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()
