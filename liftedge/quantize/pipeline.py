"""Streaming LiftQuant over a whole model: block by block, resumable.

For each decoder block i, in order:
1. the full-precision block runs on the full-precision stream x_fp, giving the targets;
2. statistics H = E[x x^T] of its linear inputs are taken on the *quantized* stream x_q
   (so each block is coded for the inputs it will really see, as GPTQ does);
3. each of its sites is coded with its own `LiftQuantConfig` (a per-site rate map);
4. optionally the block is corrected (`liftedge.correct`); a correction that does not
   lower the block's output error is discarded;
5. the block's decoded (dequantized) weights are swapped in, the quantized block runs on
   x_q, and both streams move on.

Memory: a model loaded from safetensors is a private memory map of the file
(`liftedge.pages`). Its weights are never written to (decoded weights are new tensors), and
after each block the pages read so far are given back, so only the block at work is
resident. With `keep_decoded` (the default) `loaded.model` ends as the quantized model in
float, which costs a whole decoded model in memory by the end; without, each block's float
weights come back once the quantized stream has passed it and `loaded.model` ends as it
began. The two streams are carried one batch at a time (`stream.advance_block`) and share
their tensors until they differ. Peak memory is then about one block's weights and working
set plus two copies of one block's input activations, stored in fp16 (`STREAM_STORAGE`).

The decoded weight equals the lift-project layer's output map (`targets/reference/liftquant.py`,
tested to 1e-5). After each block its quantized tensors are saved to `checkpoint_dir`; a
rerun with the same inputs replays finished blocks from there (forward passes only) and
continues where it stopped, with identical results because every random choice is seeded
per block.

The token embedding and an untied head may be quantized too ("int", round-to-nearest, before
the blocks; block 0 then sees the quantized rows). This module owns the loop. Coding a layer is `liftquant.py`, training a block `correct.py`,
storing the result `liftedge.packed`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from liftedge.calibrate import _Accumulator, _hooked, results
from liftedge.correct import (
    CorrectionConfig,
    TrainableLift,
    correct_block,
    installed,
    module_bias,
)
from liftedge.heap import map_large_allocations, release_memory
from liftedge.model import decoder_blocks, get_module, list_sites, site_weight
from liftedge.pages import release_clean_pages
from liftedge.progress import progress
from liftedge.quantize.base import IntConfig, make_quantizer
from liftedge.quantize.liftquant import LiftQuantConfig, LiftQuantQuantizer
from liftedge.stream import (
    BlockInputs,
    advance_block,
    capture_block_inputs,
    forward_block,
)
from liftedge.targets.reference import dequantize
from liftedge.types import QuantizedTensor, Site
from liftedge.upcast import compute_dtype

log = logging.getLogger(__name__)


@dataclass
class StreamReport:
    """What happened per block: correction losses, whether correction was kept, seconds."""

    blocks: list[dict] = field(default_factory=list)


# The carried streams (block inputs and targets) are stored in fp16 and computed in the
# model's dtype: two streams of 64 x 512 SmolLM2 states take 75 MB instead of 150 MB. The
# rounding (relative 2^-11 per block) is far below the quantization error being corrected;
# a batch that overflows fp16 stays in the model's dtype (`stream.narrow`).
STREAM_STORAGE = torch.float16

def _release_weights(model: nn.Module) -> int:
    """Give back the pages of the memory-mapped weights read so far (values unchanged)."""
    return release_clean_pages(model.parameters())


@torch.no_grad()
def _block_stats(model, block, i, x_q: BlockInputs, sites: list[Site]) -> dict:
    accs = {s.name: _Accumulator(s.in_features) for s in sites}
    with _hooked(model, sites, accs):
        for k in range(len(x_q.hidden)):  # outputs dropped batch by batch: only the hooks' sums matter
            forward_block(block, x_q, i, k)
    return results(accs)


def _checkpoint_path(checkpoint_dir: Path | None, i: int) -> Path | None:
    return None if checkpoint_dir is None else checkpoint_dir / f"block-{i:04d}.safetensors"


def _save_checkpoint(path: Path, qts: dict[str, QuantizedTensor], record: dict) -> None:
    tensors = {f"{name}::{k}": v.contiguous() for name, qt in qts.items() for k, v in qt.tensors.items()}
    meta = {"sites": json.dumps({n: {"fmt": qt.fmt, "meta": qt.meta} for n, qt in qts.items()}, sort_keys=True),
            "record": json.dumps(record, sort_keys=True)}
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # same folder: the rename is atomic


def _load_checkpoint(path: Path) -> tuple[dict[str, QuantizedTensor], dict]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    sites = json.loads(meta["sites"])
    qts = {name: QuantizedTensor(info["fmt"], {k.split("::", 1)[1]: v for k, v in tensors.items()
                                               if k.split("::", 1)[0] == name}, info["meta"])
           for name, info in sites.items()}
    return qts, json.loads(meta["record"])


def _code_block(model, block_sites, stats, configs) -> dict[str, QuantizedTensor]:
    # Each site's statistics are let go once it is coded (the caller keeps no reference).
    return {s.name: LiftQuantQuantizer(configs[s.name]).quantize(site_weight(model, s), stats.pop(s.name))
            for s in block_sites}


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def _decoded(model, sites: list[Site], qts: dict[str, QuantizedTensor], *, keep: bool):
    """Inside the `with`, the sites' weights hold their decoded values; after it, the float
    ones again, unless `keep`.

    The decoded weight is a new tensor swapped in, not written over the float one: the float
    weights are pages of the memory-mapped checkpoint, and a write would turn each page into
    private memory that stays resident to the end of the run.
    """
    params = [get_module(model, s.name).weight for s in sites]
    floats = [p.data for p in params]
    dtype = compute_dtype(model)  # a narrow mapped model computes in float32: decoded weights are float32 too
    try:
        for p, s in zip(params, sites):
            w = dequantize(qts[s.name]).to(device=p.device, dtype=dtype)
            p.data = (w.t() if s.transposed else w).contiguous()
        yield
    finally:
        if not keep:
            for p, f in zip(params, floats):
                p.data = f


def _correct(model, block, i, block_sites, qts, x_q, targets, cfg: CorrectionConfig):
    layers = {s.name: TrainableLift(qts[s.name], module_bias(model, s.name), cfg.sign_margin).to(_device(model))
              for s in block_sites}
    with installed(model, layers):
        history = correct_block(block, i, layers, x_q, targets, cfg)
    if history["loss_after"] < history["loss_before"]:
        return {name: layer.export() for name, layer in layers.items()}, {**history, "kept": True}
    return qts, {**history, "kept": False}


def quantize_streaming(loaded, tokens: torch.Tensor, configs: dict[str, LiftQuantConfig | IntConfig],
                       correction: CorrectionConfig | None = None, *, checkpoint_dir: Path | None = None,
                       batch_size: int = 4, keep_decoded: bool = True,
                       ) -> tuple[dict[str, QuantizedTensor], StreamReport]:
    """Quantize every site named in `configs`, block by block.

    Linear sites of decoder blocks take a `LiftQuantConfig`. The token embedding and an
    untied output head may take an `IntConfig` ("int" format, round-to-nearest: a table's
    rows have no calibration statistics to exploit); a head tied to the embedding follows
    the embedding's format and cannot be named. GPT-2's position table (wpe) stays fp16.
    Returns the packed tensors per site and a per-block report. With `keep_decoded`,
    `loaded.model` ends holding the decoded weights of its quantized sites (new tensors: the
    float model as loaded is not written to); without, it ends as it began, each block
    holding its decoded weights only while it carries the quantized stream, and the run
    needs about one block's weights instead of a whole decoded model in memory.
    """
    model = loaded.model
    tables = _table_configs(model, configs)
    configs = {k: v for k, v in configs.items() if k not in {s.name for s in tables}}
    sites = [s for s in list_sites(model) if s.name in configs and s.kind == "linear" and s.block is not None]
    unknown = set(configs) - {s.name for s in sites}
    if unknown:
        raise ValueError(f"LiftQuant applies to decoder-block linear sites; not such: {sorted(unknown)[:5]}")
    bad = sorted(n for n, c in configs.items() if not isinstance(c, LiftQuantConfig))
    if bad:
        raise ValueError(f"decoder-block linear sites take a LiftQuantConfig; {bad[:3]} got another config")
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    blocks = decoder_blocks(model)
    map_large_allocations()
    release_memory()  # what tokenizing the calibration text left in the heap: ~55 MB on WikiText-2 valid
    x_fp = capture_block_inputs(model, tokens, batch_size, storage=STREAM_STORAGE)
    table_qts = _quantize_tables(model, tables)
    if any(s.kind == "embedding" for s in tables):  # block 0 sees the quantized embedding's rows
        with _decoded(model, list(tables), table_qts, keep=keep_decoded):
            x_q = capture_block_inputs(model, tokens, batch_size, storage=STREAM_STORAGE)
    else:  # the same tensors: advance_block replaces them batch by batch, never writes into them
        x_q = x_fp.with_hidden(list(x_fp.hidden))
    _release_weights(model)  # the embedding rows looked up
    result, report = _stream(model, blocks, sites, configs, correction, checkpoint_dir, x_fp, x_q, keep_decoded)
    return {**table_qts, **result}, report


def _table_configs(model, configs) -> dict[Site, IntConfig]:
    """The embedding / head entries of `configs`, checked: token embedding or untied head, IntConfig."""
    by_name = {s.name: s for s in list_sites(model)}
    token_embedding = model.get_input_embeddings()
    out = {}
    for name, cfg in configs.items():
        site = by_name.get(name)
        if site is None or site.kind == "linear":
            continue
        if site.tied_to is not None:
            raise ValueError(f"{name} is tied to {site.tied_to}: quantize {site.tied_to} and the head follows it")
        if site.kind == "embedding" and model.get_submodule(name) is not token_embedding:
            raise ValueError(f"{name} is a position table; only the token embedding and the head are quantized "
                             "(position tables stay fp16)")
        if not isinstance(cfg, IntConfig):
            raise ValueError(f"{name} ({site.kind}) takes an IntConfig (int8/int4 round-to-nearest), "
                             f"got {type(cfg).__name__}")
        out[site] = cfg
    return out


@torch.no_grad()
def _quantize_tables(model, tables: dict[Site, IntConfig]) -> dict[str, QuantizedTensor]:
    """RTN-quantize the embedding / head tables (a tied head follows the embedding)."""
    return {site.name: make_quantizer("rtn", cfg).quantize(site_weight(model, site).float(), None)
            for site, cfg in tables.items()}


def _stream(model, blocks, sites, configs, correction, checkpoint_dir, x_fp, x_q, keep_decoded):
    result: dict[str, QuantizedTensor] = {}
    report = StreamReport()
    for i in progress(range(len(blocks)), desc="LiftQuant", unit="block"):
        started = time.perf_counter()
        block_sites = [s for s in sites if s.block == i]
        advance_block(blocks[i], x_fp, i)  # the full-precision outputs replace its inputs
        targets = list(x_fp.hidden)
        ckpt = _checkpoint_path(checkpoint_dir, i)
        if ckpt is not None and ckpt.is_file():
            qts, record = _load_checkpoint(ckpt)
            record["resumed"] = True
        else:
            qts, record = _quantize_block(model, blocks[i], i, block_sites, configs, x_q, targets, correction)
            record["seconds"] = round(time.perf_counter() - started, 3)
            if not any("seconds" in b for b in report.blocks):
                _print_estimate(i, len(blocks), record["seconds"])
            if ckpt is not None:
                _save_checkpoint(ckpt, qts, record)
        with _decoded(model, block_sites, qts, keep=keep_decoded):
            advance_block(blocks[i], x_q, i)
        result.update(qts)
        report.blocks.append({"block": i, **record})
        release_memory()
        _release_weights(model)
    return result, report


def _print_estimate(i: int, nblocks: int, seconds: float) -> None:
    """After the first block quantized in this run: how long the rest will take at its pace
    (blocks of one model have the same shapes, so the first one is a fair sample)."""
    left = nblocks - i - 1
    if left > 0:
        print(f"LiftQuant: block {i + 1} of {nblocks} took {seconds:.0f} s; the {left} left will take about "
              f"{_duration(seconds * left)}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


def _quantize_block(model, block, i, block_sites, configs, x_q, targets, correction):
    if not block_sites:  # a rate map may leave whole blocks in float: nothing to measure
        return {}, {}
    # The statistics are not kept into the correction: ~17 MB less at the block's peak.
    qts = _code_block(model, block_sites, _block_stats(model, block, i, x_q, block_sites), configs)
    record: dict = {}
    if correction is not None and block_sites:
        qts, record = _correct(model, block, i, block_sites, qts, x_q, targets, correction)
    return qts, record
