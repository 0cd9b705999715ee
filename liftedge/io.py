"""Atomic outputs: nothing half-written, nothing clobbered, nothing of the user's destroyed.

Every artifact liftedge writes (packed models, reports, exported programs) goes through
`atomic_output_dir` or `atomic_write_*`: the content is built under a temporary name in
the destination's folder and renamed into place only when complete.

The rules that keep a user's files safe:
- a command claims its destination before the long work (`claim_output`): an exclusive lock
  (`.NAME.lock` beside it) held to the end, so two runs never write the same `-o`, and a
  snapshot of what is there;
- a non-empty destination is refused unless `force`, and `force` replaces only an output
  liftedge wrote (a folder holding the `.liftedge-output` marker), never another folder or
  file, and never an input of the same command (`inputs`: the model, the pack, text files);
- at commit the destination is checked again: if something appeared or changed there during
  the run, nothing is replaced and the new output is kept beside it under a clear name;
- an interrupted run (exception, Ctrl-C, SIGTERM via `liftedge.cli`) removes its temporary
  folder and lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from liftedge.errors import ArtifactError, LiftedgeError

# Written into every output folder liftedge creates; `--force` replaces only folders holding it.
OUTPUT_MARKER = ".liftedge-output"


def is_liftedge_output(path: Path) -> bool:
    """Whether `path` is a folder liftedge wrote (it holds the output marker)."""
    return path.is_dir() and (path / OUTPUT_MARKER).is_file()


def _snapshot(path: Path):
    """What is at `path` now, enough to notice a change: None when nothing is there."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() and not path.is_symlink() else None
    return (st.st_mode, st.st_ino, st.st_mtime_ns, entries)


def check_destination(path: Path, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a destination this run may not write: an input, a non-empty folder or a file
    without `force`, or (with `force`) anything liftedge did not write."""
    path = Path(path)
    check_not_an_input(path, inputs)
    if force and _in_cache(path):
        return  # liftedge's own cache entry
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        if not force:
            raise ArtifactError(f"{path} already exists and is not empty; pass --force to replace it")
        raise ArtifactError(f"{path} is not a folder liftedge wrote (--force replaces only liftedge's own "
                            "output folders); remove it yourself or choose another -o")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise ArtifactError(f"{path} already exists and is not empty; pass --force to replace it")
        if not is_liftedge_output(path):
            raise ArtifactError(f"{path} is not a folder liftedge wrote (no {OUTPUT_MARKER} marker in it): "
                                "--force replaces only liftedge's own outputs; remove it yourself or choose "
                                "another -o")
    if not os.access(path.parent if path.parent.exists() else _existing_parent(path), os.W_OK):
        raise ArtifactError(f"cannot write {path}: its folder is not writable")


def _existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def check_not_an_input(path: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output path that is, holds, or lies inside one of the command's inputs."""
    dest = Path(path).absolute().resolve()
    for given in inputs:
        src = Path(given).absolute().resolve()
        if dest == src or dest in src.parents or src in dest.parents:
            raise ArtifactError(f"-o {path} would overwrite an input of this command ({given}); "
                                "choose another output path")


@dataclass
class Claim:
    """A destination held by this run: its lock file (open, locked) and what was there at start."""

    path: Path
    lock: object
    before: object


_claims: dict[Path, Claim] = {}


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, force: bool = False,
                 inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Check and lock the destination for the whole run (before the long work starts)."""
    path = Path(path)
    key = path.absolute()
    if key in _claims:  # an inner writer of a claimed destination: the outer claim holds
        yield path
        return
    check_destination(path, force, inputs)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock_path = parent / f".{path.name}.lock"
        lock = open(lock_path, "a+")
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ArtifactError(f"another liftedge run is writing {path} (lock {lock_path}); wait for it or "
                            "choose another -o") from None
    _claims[key] = Claim(path, lock, _snapshot(path))
    try:
        yield path
    finally:
        del _claims[key]
        with contextlib.suppress(OSError):
            lock_path.unlink()
        lock.close()


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False, kind: str = "output",
                      inputs: Iterable[str | os.PathLike] = (), owned: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only if the block completes.

    `kind` goes into the output marker. `owned`: the path is liftedge's own (a cache entry),
    replaced whatever is there."""
    path = Path(path)
    if owned or _in_cache(path):
        with _build_and_publish(path, kind, check=None) as tmp:
            yield tmp
        return
    with claim_output(path, force, inputs):
        claim = _claims[path.absolute()]
        with _build_and_publish(path, kind, check=claim) as tmp:
            yield tmp


def _in_cache(path: Path) -> bool:
    from liftedge.cache import cache_root

    root = cache_root().absolute().resolve()
    return root in path.absolute().resolve().parents


@contextlib.contextmanager
def _build_and_publish(path: Path, kind: str, check: Claim | None) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, "written_by": "liftedge"}, sort_keys=True) + "\n")
        _publish_permissions(tmp)
        if check is not None and _snapshot(path) != check.before:
            kept = path.parent / f"{path.name}.liftedge-new-{os.getpid()}"
            tmp.rename(kept)
            raise ArtifactError(f"{path} changed while this run was writing it (something else wrote there); "
                                f"nothing was replaced. The new output is at {kept}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
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
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder; give a file name to write")
    if path.exists() and not path.is_file():
        raise ArtifactError(f"{path} is not a regular file; liftedge writes only files it can replace safely")
    if not force:
        check_destination(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
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
