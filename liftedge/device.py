"""Device profiles: read, validate and look up the TOML files in `devices/`.

Owns `DeviceProfile` (what liftedge knows about a phone, tablet or board), `load_device` and
`list_devices`. It does not decide how memory is split between weights, KV cache and
activations (that is `liftedge.memory`) nor which runtime lowers the model (the targets).

A profile file has top-level keys `name` (= the file stem), `display_name`, `platform`,
`default_runtime`, `default_context`, `soc`, optional `generic`, and tables `[memory]` and `[cpu]`
(see `devices/pixel-8a.toml` for a commented example). Unknown keys are errors, so a typo
cannot silently fall back to a default. Generic profiles (`android`, `ios`) have no RAM of their
own: `load_device("android", ram="6GB")`. Real devices list their RAM variants; `ram=` picks
one (within 8%, so "8GB" finds the 8 GiB model).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liftedge.errors import LiftedgeError
from liftedge.sizes import format_size, parse_size

GIB = 2**30

# platform -> runtimes that can serve it (the first is the usual default)
PLATFORM_RUNTIMES: dict[str, tuple[str, ...]] = {
    "android": ("executorch", "onnxruntime"),
    "ios": ("coreml", "executorch", "onnxruntime"),
    "linux": ("executorch", "onnxruntime"),
}
MEMORY_TYPES = ("LPDDR4", "LPDDR4X", "LPDDR5", "LPDDR5X", "LPDDR5T", "DDR4", "DDR5")
BANDWIDTH_SOURCES = ("spec", "measured", "estimate")
CPU_FEATURES = ("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme")
# How far --ram may be from a listed RAM variant and still select it: "8GB" (8e9) is 6.9%
# below 8 GiB, the usual mix-up of decimal and binary units.
RAM_MATCH_TOLERANCE = 0.08
# A stated bandwidth must agree with data rate × bus width to this fraction (catches typos;
# measured figures are exempt since they are expected to be lower than the product).
BANDWIDTH_CHECK_TOLERANCE = 0.03


@dataclass(frozen=True)
class DeviceProfile:
    """What liftedge knows about one device (or one generic platform, once given its RAM)."""

    name: str
    display_name: str
    platform: str
    default_runtime: str
    default_context: int
    soc: str
    generic: bool
    ram_nbytes: int | None
    ram_variants_nbytes: tuple[int, ...]
    app_share: float
    app_share_entitled: float | None
    memory_type: str
    bus_width_bits: int | None
    data_rate_mtps: int | None
    bandwidth_gbps: float
    bandwidth_source: str
    cpu_cores: int
    cpu_isa: str
    cpu_features: tuple[str, ...]
    source: str = ""

    def usable_share(self, increased_memory_limit: bool = False) -> float:
        """Share of total RAM one app may hold; iOS's entitlement raises it where known."""
        if increased_memory_limit and self.app_share_entitled is not None:
            return self.app_share_entitled
        return self.app_share

    def app_usable_nbytes(self, increased_memory_limit: bool = False) -> int:
        """Bytes one app can hold before the OS kills it (share × RAM)."""
        if self.ram_nbytes is None:
            raise LiftedgeError(f"device profile {self.name!r} is generic: give its RAM with --ram (e.g. --ram 6GB)")
        return int(self.ram_nbytes * self.usable_share(increased_memory_limit))

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9

    def with_ram(self, ram: int | str) -> "DeviceProfile":
        """This profile with its RAM set: any size for a generic profile, a listed variant otherwise."""
        ram_nbytes = parse_size(ram)
        if self.generic:
            return dataclasses.replace(self, ram_nbytes=ram_nbytes)
        for variant in self.ram_variants_nbytes:
            if abs(ram_nbytes - variant) <= RAM_MATCH_TOLERANCE * variant:
                return dataclasses.replace(self, ram_nbytes=variant)
        variants = ", ".join(format_size(v) for v in self.ram_variants_nbytes)
        raise LiftedgeError(
            f"{self.display_name} comes with {variants}, not {format_size(ram_nbytes)}; pass one of those "
            f"or use the generic {self.platform!r} profile with --ram"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, plus the derived app-usable bytes where the RAM is known."""
        out = dataclasses.asdict(self)
        out["ram_variants_nbytes"] = list(self.ram_variants_nbytes)
        out["cpu_features"] = list(self.cpu_features)
        out["app_usable_nbytes"] = None if self.ram_nbytes is None else self.app_usable_nbytes()
        return out


# ---------------------------------------------------------------- validation helpers

def _take(table: dict, key: str, kind: type | tuple, where: str, required: bool = True):
    if key not in table:
        if required:
            raise LiftedgeError(f"{where}: missing field {key!r}")
        return None
    value = table.pop(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise LiftedgeError(f"{where}: field {key!r} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                        list: "a list", dict: "a table"}.get(k, k.__name__) for k in kinds)


def _check(ok: bool, where: str, key: str, rule: str, value) -> None:
    if not ok:
        raise LiftedgeError(f"{where}: field {key!r} must be {rule}, got {value!r}")


def _no_extra(table: dict, where: str, allowed: str) -> None:
    if table:
        raise LiftedgeError(f"{where}: unknown field(s) {sorted(table)}; allowed: {allowed}")


def _parse_ram(mem: dict, w: str, generic: bool) -> dict:
    ram_gib = _take(mem, "ram_gib", (int, float), w, required=not generic)
    variants = _take(mem, "ram_variants_gib", list, w, required=False)
    if generic:
        _check(ram_gib is None and not variants, w, "ram_gib", "absent in a generic profile (RAM comes from --ram)", ram_gib)
        return dict(ram_nbytes=None, ram_variants_nbytes=())
    _check(0 < ram_gib <= 1024, w, "ram_gib", "in (0, 1024]", ram_gib)
    variants = variants or [ram_gib]
    _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1024 for v in variants),
           w, "ram_variants_gib", "a list of sizes in GiB in (0, 1024]", variants)
    _check(ram_gib in variants, w, "ram_variants_gib", f"a list that includes ram_gib={ram_gib}", variants)
    return dict(ram_nbytes=int(ram_gib * GIB), ram_variants_nbytes=tuple(int(v * GIB) for v in variants))


def _parse_memory(mem: dict, where: str, generic: bool, platform: str) -> dict:
    w = f"{where} [memory]"
    allowed = ", ".join(("ram_gib", "ram_variants_gib", "app_share", "app_share_entitled", "type",
                         "bus_width_bits", "data_rate_mtps", "bandwidth_gbps", "bandwidth_source"))
    ram = _parse_ram(mem, w, generic)
    share = _take(mem, "app_share", (int, float), w)
    _check(0 < share <= 1, w, "app_share", "in (0, 1]", share)
    entitled = _take(mem, "app_share_entitled", (int, float), w, required=platform == "ios")
    if entitled is not None:
        _check(platform == "ios", w, "app_share_entitled", "set only for platform 'ios'", entitled)
        _check(share <= entitled <= 1, w, "app_share_entitled", f"in [app_share={share}, 1]", entitled)
    mtype = _take(mem, "type", str, w)
    _check(mtype in MEMORY_TYPES, w, "type", f"one of {MEMORY_TYPES}", mtype)
    bus = _take(mem, "bus_width_bits", int, w, required=False)
    _check(bus is None or bus in (16, 32, 64, 128, 256, 512), w, "bus_width_bits", "16/32/64/128/256/512", bus)
    rate = _take(mem, "data_rate_mtps", int, w, required=False)
    _check(rate is None or 400 <= rate <= 20000, w, "data_rate_mtps", "in [400, 20000] MT/s", rate)
    bandwidth = _take(mem, "bandwidth_gbps", (int, float), w)
    _check(0 < bandwidth <= 2000, w, "bandwidth_gbps", "in (0, 2000] GB/s", bandwidth)
    source = _take(mem, "bandwidth_source", str, w)
    _check(source in BANDWIDTH_SOURCES, w, "bandwidth_source", f"one of {BANDWIDTH_SOURCES}", source)
    if bus and rate and source != "measured":
        product = rate * bus / 8 / 1000
        _check(abs(bandwidth - product) <= BANDWIDTH_CHECK_TOLERANCE * product, w, "bandwidth_gbps",
               f"data_rate_mtps × bus_width_bits / 8 = {product:.1f} GB/s (within 3%)", bandwidth)
    _no_extra(mem, w, allowed)
    return dict(
        **ram, app_share=float(share), app_share_entitled=None if entitled is None else float(entitled),
        memory_type=mtype, bus_width_bits=bus, data_rate_mtps=rate,
        bandwidth_gbps=float(bandwidth), bandwidth_source=source,
    )


def _parse_cpu(cpu: dict, where: str) -> dict:
    w = f"{where} [cpu]"
    cores = _take(cpu, "cores", int, w)
    _check(1 <= cores <= 256, w, "cores", "in [1, 256]", cores)
    isa = _take(cpu, "isa", str, w)
    _check(isa.startswith("armv"), w, "isa", "an Arm ISA name such as 'armv8.2-a'", isa)
    features = _take(cpu, "features", list, w)
    _check(all(f in CPU_FEATURES for f in features) and len(set(features)) == len(features), w, "features",
           f"distinct names from {CPU_FEATURES}", features)
    _no_extra(cpu, w, "cores, isa, features")
    return dict(cpu_cores=cores, cpu_isa=isa, cpu_features=tuple(f for f in CPU_FEATURES if f in features))


def profile_from_dict(data: dict, where: str, expected_name: str | None = None) -> DeviceProfile:
    """Validate a parsed TOML document into a `DeviceProfile`; errors name the field."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    name = _take(data, "name", str, where)
    _check(expected_name is None or name == expected_name, where, "name", f"the file name {expected_name!r}", name)
    display = _take(data, "display_name", str, where)
    platform = _take(data, "platform", str, where)
    _check(platform in PLATFORM_RUNTIMES, where, "platform", f"one of {tuple(PLATFORM_RUNTIMES)}", platform)
    runtime = _take(data, "default_runtime", str, where)
    _check(runtime in PLATFORM_RUNTIMES[platform], where, "default_runtime",
           f"one of {PLATFORM_RUNTIMES[platform]} for platform {platform!r}", runtime)
    context = _take(data, "default_context", int, where)
    _check(16 <= context <= 1 << 20, where, "default_context", "in [16, 1048576] tokens", context)
    soc = _take(data, "soc", str, where)
    generic = bool(_take(data, "generic", bool, where, required=False))
    memory = _parse_memory(_take(data, "memory", dict, where), where, generic, platform)
    cpu = _parse_cpu(_take(data, "cpu", dict, where), where)
    _no_extra(data, where, "name, display_name, platform, default_runtime, default_context, soc, generic, [memory], [cpu]")
    return DeviceProfile(name=name, display_name=display, platform=platform, default_runtime=runtime,
                         default_context=context, soc=soc, generic=generic, **memory, **cpu, source=where)


# ---------------------------------------------------------------- lookup

def _device_files() -> dict[str, Any]:
    root = importlib.resources.files("liftedge.devices")
    files = (entry for entry in root.iterdir() if entry.name.endswith(".toml"))
    named = {entry.name[: -len(".toml")]: entry for entry in files}
    return {name: named[name] for name in sorted(named)}


def _read(entry, where: str, expected_name: str | None) -> DeviceProfile:
    try:
        data = tomllib.loads(entry.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise LiftedgeError(f"{where}: not valid TOML ({exc})") from exc
    return profile_from_dict(data, where, expected_name)


def known_device_names() -> list[str]:
    return list(_device_files())


def load_device(name_or_path: str | Path, ram: int | str | None = None, *, require_ram: bool = True) -> DeviceProfile:
    """Load a profile by name (a file in `devices/`) or from a TOML path, with RAM set if given.

    A generic profile needs `ram`; a real device takes `ram` to pick one of its RAM variants.
    Unknown names raise `LiftedgeError` listing the known ones.
    """
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or path.exists() or "/" in text:
        if not path.is_file():
            raise LiftedgeError(f"device profile file {text} does not exist")
        profile = _read(path, str(path), expected_name=None)
    else:
        files = _device_files()
        if text not in files:
            raise LiftedgeError(f"unknown device {text!r}; known devices: {', '.join(files)} (or a path to a .toml profile)")
        profile = _read(files[text], f"devices/{text}.toml", expected_name=text)
    if ram is not None:
        return profile.with_ram(ram)
    if profile.generic and require_ram:
        raise LiftedgeError(f"device {profile.name!r} is a generic profile: give the phone's RAM with --ram (e.g. --ram 6GB)")
    return profile


def list_devices() -> list[DeviceProfile]:
    """Every packaged profile (generic ones without RAM), sorted by name."""
    return [_read(entry, f"devices/{name}.toml", expected_name=name) for name, entry in _device_files().items()]
