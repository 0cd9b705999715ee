"""Atomic outputs: nothing half-written, nothing clobbered by a failed run.

Every artifact liftedge writes (packed models, reports, exported programs) goes through
`atomic_output_dir` or `atomic_write_*`: the content is built under a temporary name in
the destination's folder and renamed into place only when complete. An existing
non-empty destination is refused unless `force=True`, and even then it is replaced only
after the new content is complete, so an interrupted build leaves the old one intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from liftedge.errors import ArtifactError, LiftedgeError


def check_destination(path: Path, force: bool) -> None:
    if path.exists() and not force:
        nonempty = path.is_file() or any(path.iterdir())
        if nonempty:
            raise ArtifactError(f"{path} already exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only if the block completes."""
    path = Path(path)
    check_destination(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_permissions(tmp)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_permissions(root: Path) -> None:
    """Temporary files are created private (0600/0700); give outputs the usual umask modes."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, force: bool = True) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    if not force:
        check_destination(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj, force: bool = True) -> None:
    """Write `obj` as indented, key-sorted JSON (deterministic bytes) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), force=force)


def read_json_object(path: Path, error: type[LiftedgeError], missing: str, corrupt: str = "") -> dict:
    """Read a JSON object from `path`, raising `error` with `missing` if absent, else naming the problem.

    `corrupt` is appended to the invalid-JSON message (e.g. "; the pack is corrupt").
    """
    if not path.is_file():
        raise error(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}){corrupt}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, found {type(data).__name__}{corrupt}")
    return data
