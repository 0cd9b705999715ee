"""Per-site calibration statistics, accumulated in one streaming pass and cached on disk.

Owns: `SiteStats` (the input second moment H = E[x x^T] of one linear or head site and the
number of tokens behind it), `collect_stats` (one pass block by block through `stream`,
hooks on each block's linear layers, the head fed by the final norm), and the content-hashed
cache under `cache_path("stats", ...)`. Does not own: choosing the text (`text`) or using
the statistics (quantizers, sensitivity measurement). Embeddings get no statistics: their
input is a token id, not a vector.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from liftedge.cache import cache_path, sha256_text
from liftedge.model import list_sites
from liftedge.progress import progress
from liftedge.stream import advance_block, capture_block_inputs, decoder_blocks, final_norm
from liftedge.types import Site

log = logging.getLogger(__name__)

# Bumped whenever what is stored (or how it is computed) changes.
STATS_FORMAT = "1"

# Products x^T x are formed in float32 over at most this many tokens, then added into a
# float64 accumulator: float32 sums of a few thousand terms lose ~1e-6 relative, the float64
# running sum keeps that from growing with the calibration size, and float32 matmuls are
# several times faster than float64 ones on CPU.
_CHUNK_TOKENS = 2048


@dataclass
class SiteStats:
    """Input statistics of one site over the calibration tokens."""

    hessian: torch.Tensor  # [in, in] float32, E[x x^T]
    nsamples: int  # tokens accumulated


class _Accumulator:
    """Running sum of x x^T (float64) and token count for one site."""

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def add_product(self, product: torch.Tensor, ntokens: int) -> None:
        self.sum += product
        self.count += ntokens

    def result(self) -> SiteStats:
        if self.count == 0:
            raise RuntimeError("a site received no calibration tokens")
        return SiteStats(hessian=(self.sum / self.count).float(), nsamples=self.count)


def second_moment_sum(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum over tokens of x x^T as float64, token count) for activations [..., in]."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _CHUNK_TOKENS):
        chunk = x[start : start + _CHUNK_TOKENS]
        total += (chunk.T @ chunk).double()
    return total.cpu(), x.shape[0]


def collect_stats(loaded, tokens: torch.Tensor, sites: list[Site] | None = None, *,
                  batch_size: int = 8, use_cache: bool = True) -> dict[str, SiteStats]:
    """H = E[x x^T] and the token count for every linear and head site, keyed by site name.

    One streaming pass: block 0's inputs are captured, then each block runs on the carried
    hidden states with hooks on its linear layers, and its outputs become the next block's
    inputs; the head's input is the final norm of the last block's output. Peak memory is
    the model plus one block's activations. Results are cached by content hash.
    """
    model = loaded.model
    sites = [s for s in (sites if sites is not None else list_sites(model)) if s.kind in ("linear", "head")]
    path = _cache_file(loaded, tokens, sites) if use_cache else None
    if path is not None and path.is_file():
        log.info("calibration statistics read from cache %s", path)
        return load_stats(path)
    with _eval_mode(model):
        stats = _stream_stats(model, tokens, sites, batch_size)
    if path is not None:
        save_stats(stats, path)
        log.info("calibration statistics cached at %s", path)
    return stats


@torch.no_grad()
def _stream_stats(model: nn.Module, tokens: torch.Tensor, sites: list[Site], batch_size: int) -> dict[str, SiteStats]:
    accs = {s.name: _Accumulator(s.in_features) for s in sites}
    by_block: dict[int, list[Site]] = {}
    for s in sites:
        if s.kind == "linear":
            by_block.setdefault(s.block, []).append(s)
    inputs = capture_block_inputs(model, tokens, batch_size)
    blocks = decoder_blocks(model)
    # Blocks past the last hooked one are run only when the head's input is wanted.
    end = len(blocks) if any(s.kind == "head" for s in sites) else max(by_block, default=-1) + 1
    for i in progress(range(end), desc="calibration statistics", unit="block"):
        with _hooked(model, by_block.get(i, []), accs):
            advance_block(blocks[i], inputs, i)
    norm = final_norm(model)
    for s in sites:
        if s.kind == "head":
            for h in inputs.hidden:
                accs[s.name].add_product(*second_moment_sum(norm(h)))
    return {name: acc.result() for name, acc in accs.items()}


@contextlib.contextmanager
def _hooked(model: nn.Module, sites: list[Site], accs: dict[str, _Accumulator]):
    """Forward hooks that add each site's input product to its accumulator.

    Sites fed by the same tensor (q/k/v, gate/up) share one product per forward call.
    """
    # Holding the last input alive means no later tensor can reuse its identity.
    last: list = [None, None, -1]

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0]
            if last[0] is not x or last[2] != x._version:
                last[0], last[1], last[2] = x, second_moment_sum(x), x._version
            accs[name].add_product(*last[1])
        return hook

    handles = [model.get_submodule(s.name).register_forward_hook(hook_for(s.name)) for s in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        last.clear()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off while collecting (statistics must not depend on a random mask)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def stats_key(source_hash: str, tokens: torch.Tensor, sites: list[Site], dtype: torch.dtype) -> str:
    """Content hash of everything the statistics depend on (weights, tokens, sites, dtype)."""
    tokens_hash = hashlib.sha256(tokens.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()
    site_list = ";".join(f"{s.name}:{s.kind}:{s.in_features}" for s in sites)
    return sha256_text(STATS_FORMAT, source_hash, str(dtype), str(tuple(tokens.shape)), tokens_hash, site_list)


def _cache_file(loaded, tokens: torch.Tensor, sites: list[Site]) -> Path | None:
    source_hash = getattr(loaded, "source_hash", None)
    if not source_hash:
        log.info("model has no source hash: calibration statistics are not cached")
        return None
    dtype = next(loaded.model.parameters()).dtype
    return cache_path("stats", f"{stats_key(source_hash, tokens, sites, dtype)}.safetensors")


def save_stats(stats: dict[str, SiteStats], path: Path) -> None:
    """Write statistics as safetensors (hessians as tensors, token counts in the metadata)."""
    from safetensors.torch import save_file

    tensors = {name: s.hessian.contiguous() for name, s in stats.items()}
    meta = {"format": STATS_FORMAT, "nsamples": json.dumps({n: s.nsamples for n, s in stats.items()})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_stats(path: Path) -> dict[str, SiteStats]:
    """Read statistics written by `save_stats`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        nsamples = json.loads(f.metadata()["nsamples"])
        return {name: SiteStats(hessian=f.get_tensor(name), nsamples=int(nsamples[name])) for name in f.keys()}
