"""Device profiles: every packaged file loads and validates; bad names, files and RAM are explained."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from liftedge.device import GIB, PLATFORM_RUNTIMES, known_device_names, list_devices, load_device
from liftedge.errors import LiftedgeError

DEVICES_DIR = Path(__file__).resolve().parent.parent / "devices"
NAMES = sorted(p.stem for p in DEVICES_DIR.glob("*.toml"))
GENERIC = ("android", "ios", "linux")


def test_the_requested_devices_are_all_there():
    required = {"android", "ios", "linux", "galaxy-a15", "galaxy-a25", "pixel-8a", "pixel-9-pro", "galaxy-s24-ultra",
                "oneplus-12", "redmi-note-13", "iphone-13", "iphone-15", "iphone-15-pro", "iphone-16-pro",
                "ipad-pro-m4", "raspberry-pi-5", "jetson-orin-nano"}
    assert required <= set(NAMES)
    assert known_device_names() == NAMES  # the packaged registry is exactly the folder


@pytest.mark.parametrize("name", NAMES)
def test_every_profile_loads_and_is_sane(name):
    profile = load_device(name, ram="6GiB") if name in GENERIC else load_device(name)
    assert profile.name == name
    assert profile.default_runtime == PLATFORM_RUNTIMES[profile.platform][0]  # android/linux -> executorch, ios -> coreml
    assert 0 < profile.app_usable_nbytes() < profile.ram_nbytes
    if profile.platform == "ios":
        assert profile.app_usable_nbytes(increased_memory_limit=True) >= profile.app_usable_nbytes()
    assert "neon" in profile.cpu_features


@pytest.mark.parametrize("name", NAMES)
def test_every_value_is_commented_with_its_source(name):
    # Each field line carries a comment, or the comment block just above it explains it.
    lines = (DEVICES_DIR / f"{name}.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line or lines[i - 1].lstrip().startswith("#") or line.startswith(("name", "display_name")), \
                f"{name}.toml line {i + 1} has no comment: {line!r}"


def test_list_devices_returns_all_sorted():
    profiles = list_devices()
    assert [p.name for p in profiles] == NAMES
    assert all(p.ram_nbytes is None for p in profiles if p.generic)


def test_ram_spans_budget_to_flagship():
    ram_gib = sorted(p.ram_nbytes / GIB for p in list_devices() if not p.generic)
    assert ram_gib[0] <= 4 and ram_gib[-1] >= 16


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(LiftedgeError, match=r"unknown device 'pixel-99'.*iphone-15.*pixel-8a"):
        load_device("pixel-99")


@pytest.mark.parametrize("name", GENERIC)
def test_generic_profile_needs_ram(name):
    with pytest.raises(LiftedgeError, match="--ram"):
        load_device(name)
    assert load_device(name, ram="6GB").ram_nbytes == 6 * 10**9


def test_ram_picks_a_variant_or_explains():
    assert load_device("ipad-pro-m4").ram_nbytes == 8 * GIB
    assert load_device("ipad-pro-m4", ram="16GB").ram_nbytes == 16 * GIB  # decimal GB finds the 16 GiB model
    with pytest.raises(LiftedgeError, match=r"comes with 8\.00 GiB, 16\.0 GiB.*generic 'ios'"):
        load_device("ipad-pro-m4", ram="12GB")
    with pytest.raises(LiftedgeError, match="size"):
        load_device("android", ram="lots")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "phone.toml"
    path.write_text(text)
    return path


def _valid_text() -> str:
    return (DEVICES_DIR / "pixel-8a.toml").read_text()


def test_a_profile_file_path_loads(tmp_path):
    assert load_device(str(_write(tmp_path, _valid_text()))).display_name == "Google Pixel 8a"


@pytest.mark.parametrize("old, new, field", [
    ("app_share = 0.55", "app_share = 1.5", "app_share"),
    ("app_share = 0.55", 'app_share = "half"', "app_share"),
    ('platform = "android"', 'platform = "symbian"', "platform"),
    ('default_runtime = "executorch"', 'default_runtime = "coreml"', "default_runtime"),
    ("bandwidth_gbps = 68.3", "bandwidth_gbps = 6.83", "bandwidth_gbps"),
    ("cores = 9", "cores = 0", "cores"),
    ("cores = 9", "cores = true", "cores"),
    ('"sve2"]', '"avx512"]', "features"),
    ("ram_gib = 8 ", "ram_gib = 6 ", "ram_variants_gib"),
    ("default_context = 2048", "default_context = 2048\ncolour = 'blue'", "unknown field"),
    ("cores = 9", "cores = 9\nfrequency_ghz = 3", "unknown field"),
    ("app_share = 0.55", "app_share = 0.55\napp_share_entitled = 0.7", "app_share_entitled"),
    ('type = "LPDDR5X"', 'type = "HBM3"', "type"),
])
def test_invalid_files_name_the_field(tmp_path, old, new, field):
    text = _valid_text()
    assert old in text
    with pytest.raises(LiftedgeError, match=field):
        load_device(str(_write(tmp_path, text.replace(old, new, 1))))


def test_missing_field_and_bad_toml(tmp_path):
    text = _valid_text().replace('soc = "Google Tensor G3"', "")
    with pytest.raises(LiftedgeError, match="missing field 'soc'"):
        load_device(str(_write(tmp_path, text)))
    with pytest.raises(LiftedgeError, match="not valid TOML"):
        load_device(str(_write(tmp_path, "name = ")))
    with pytest.raises(LiftedgeError, match="does not exist"):
        load_device(str(tmp_path / "nope.toml"))


def test_profiles_parse_with_plain_tomllib():
    # The files are plain TOML: other tools can read them without liftedge.
    for name in NAMES:
        assert tomllib.loads((DEVICES_DIR / f"{name}.toml").read_text())["name"] == name


def test_devices_command(capsys):
    from liftedge.commands import devices

    import argparse
    parser = argparse.ArgumentParser()
    devices.register(parser.add_subparsers())
    args = parser.parse_args(["devices", "--json"])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == NAMES
    pixel = next(r for r in rows if r["name"] == "pixel-8a")
    assert pixel["app_usable_nbytes"] == int(8 * GIB * 0.55)
    args = parser.parse_args(["devices"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "raspberry-pi-5" in table and "50% of --ram" in table and "coreml" in table
