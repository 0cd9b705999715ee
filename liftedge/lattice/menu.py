"""The shipped menu of trained mapping matrices (package data) and how it is read and written.

Layout of `liftedge/lattice/codebooks/`:

| file                  | content                                                          |
|-----------------------|------------------------------------------------------------------|
| `lq-D-d.safetensors`  | one tensor "M", float32 [d, D]; metadata {"rate": "D/d"}         |
| `menu.json`           | {"format": 1, "rates": {"D/d": training metadata + measured MSE}} |

A rate is shipped iff it has an entry in `menu.json` and its safetensors file exists. The
entries are written by `save_codebook` (used by `liftedge lattice train`), so every shipped
matrix comes out of `liftedge.lattice.train`. This module stores and loads; it does not train.
Importable with torch and safetensors only.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liftedge.errors import LiftedgeError
from liftedge.io import atomic_write_json
from liftedge.types import Rate

CODEBOOK_DIR = Path(__file__).resolve().parent / "codebooks"
MENU_FILE = "menu.json"
MENU_FORMAT = 1


def read_menu(folder: Path = CODEBOOK_DIR) -> dict[str, dict]:
    """The per-rate entries of `folder/menu.json` ({} when absent)."""
    path = Path(folder) / MENU_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("format") != MENU_FORMAT:
        raise LiftedgeError(f"{path} has format {data.get('format')!r}; this liftedge reads format {MENU_FORMAT}")
    return data["rates"]


def _rates_in(folder: Path) -> list[Rate]:
    folder = Path(folder)
    rates = [Rate.parse(name) for name in read_menu(folder)]
    rates = [r for r in rates if (folder / f"{r.slug}.safetensors").exists()]
    return sorted(rates, key=lambda r: (r.bits_per_weight, r.D))


@lru_cache(maxsize=None)
def _shipped() -> tuple[Rate, ...]:
    return tuple(_rates_in(CODEBOOK_DIR))


def shipped_rates() -> list[Rate]:
    """Rates with a shipped matrix, sorted by bits per weight (then D)."""
    return list(_shipped())


def load_codebook(rate: Rate, folder: Path | None = None) -> torch.Tensor:
    """M [d, D] float32 of a shipped (or `folder`) rate; LiftedgeError listing the available ones."""
    folder = Path(folder) if folder is not None else CODEBOOK_DIR
    available = _shipped() if folder == CODEBOOK_DIR else _rates_in(folder)
    if rate not in available:
        names = ", ".join(r.name for r in available) or "none"
        raise LiftedgeError(f"no trained matrix for {rate} in {folder}; available rates: {names}")
    M = load_file(str(folder / f"{rate.slug}.safetensors"))["M"]
    if tuple(M.shape) != (rate.d, rate.D):
        raise LiftedgeError(f"{folder / rate.slug}.safetensors holds M {tuple(M.shape)}, expected {(rate.d, rate.D)}")
    return M.float().contiguous()


def menu_entry(rate: Rate, folder: Path | None = None) -> dict:
    """The metadata recorded for `rate` in menu.json."""
    entries = read_menu(Path(folder) if folder is not None else CODEBOOK_DIR)
    if rate.name not in entries:
        raise LiftedgeError(f"{rate} is not in the menu; available: {', '.join(entries) or 'none'}")
    return entries[rate.name]


def save_codebook(rate: Rate, M: torch.Tensor, meta: dict, folder: Path = CODEBOOK_DIR) -> Path:
    """Write `lq-D-d.safetensors` and add/replace the rate's entry in `menu.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rate.slug}.safetensors"
    save_file({"M": M.detach().float().cpu().contiguous()}, str(path), metadata={"rate": rate.name})
    entries = read_menu(folder)
    entries[rate.name] = meta
    atomic_write_json(folder / MENU_FILE, {"format": MENU_FORMAT, "rates": entries})
    if folder == CODEBOOK_DIR:
        _shipped.cache_clear()
    return path


def remove_rate(rate: Rate, folder: Path = CODEBOOK_DIR) -> None:
    """Drop a rate from the menu and delete its matrix."""
    folder = Path(folder)
    entries = read_menu(folder)
    entries.pop(rate.name, None)
    atomic_write_json(folder / MENU_FILE, {"format": MENU_FORMAT, "rates": entries})
    (folder / f"{rate.slug}.safetensors").unlink(missing_ok=True)
    _shipped.cache_clear()
