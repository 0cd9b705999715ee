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
STATS_FORMAT = "2"

# Products x^T x are formed in float32 over at most this many tokens (a matmul's own sums of a
# few thousand terms lose ~1e-6 relative) and added into a float32 running sum, as GPTQ's
# reference code keeps H. Each addition rounds by at most 2^-24 of the sum: k chunks add up to
# ~6e-8 * k relative (1e-6 for the default 64 x 512 tokens, 3e-5 at a million tokens), far
# below the sampling error of E[x x^T] from that many tokens and the 1% damping GPTQ adds. A
# float64 sum would hold twice the bytes: 1.6 GB for an 8B down projection, [14336, 14336],
# which with its float32 result made the largest allocation of quantizing an 8B block.
_CHUNK_TOKENS = 2048


@dataclass
class SiteStats:
    """Input statistics of one site over the calibration tokens."""

    hessian: torch.Tensor  # [in, in] float32, E[x x^T]
    nsamples: int  # tokens accumulated


class _Accumulator:
    """Running sum of x x^T (float32, on the inputs' device) and token count for one site.

    A site whose every input is the input of an earlier site (k and v after q, up after gate)
    is an `alias` of that site's accumulator: equal sums, kept once.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.alias: "_Accumulator | None" = None

    def add(self, x: torch.Tensor) -> None:
        """Add x x^T over the tokens of activations x [..., in], one chunk of tokens at a time.

        Each chunk's product goes straight into the sum (`addmm_`): no product and no per-call
        total is held beside it (for an 8B down projection, [14336, 14336], each would be 0.8 GB)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self.sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], _CHUNK_TOKENS):
            chunk = x[start : start + _CHUNK_TOKENS]
            self.sum.addmm_(chunk.T, chunk)
        self.count += x.shape[0]

    def result(self) -> SiteStats:
        """H = sum / count (float32, on the CPU). The accumulator is spent: the division is in place."""
        if self.count == 0:
            raise RuntimeError("a site received no calibration tokens")
        hessian = self.sum.div_(self.count).cpu()
        self.sum = None
        return SiteStats(hessian=hessian, nsamples=self.count)


def results(accs: dict[str, _Accumulator]) -> dict[str, SiteStats]:
    """Every accumulator's statistics; an alias gets its own copy of its source's."""
    own = {id(acc): acc.result() for acc in accs.values() if acc.alias is None}
    out = {}
    for name, acc in accs.items():
        stats = own[id(acc.alias if acc.alias is not None else acc)]
        out[name] = stats if acc.alias is None else SiteStats(hessian=stats.hessian.clone(), nsamples=stats.nsamples)
    return out


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
                accs[s.name].add(norm(h))
    return results(accs)


@contextlib.contextmanager
def _hooked(model: nn.Module, sites: list[Site], accs: dict[str, _Accumulator]):
    """Forward hooks that add each site's input product to its accumulator.

    Sites fed by the same tensor (q/k/v, gate/up) are found on the first call: a site that
    meets, before it has any tokens, exactly the input its predecessor has just taken as its
    first becomes that accumulator's alias, and later calls skip it. Computed once, stored once.
    """
    # (the input, its version, the accumulator that took it); holding the input alive means no
    # later tensor can reuse its identity
    last: list = [None, -1, None]

    def hook_for(name: str):
        def hook(module, args, output):
            x, acc = args[0], accs[name]
            same = last[0] is x and last[1] == x._version
            if same and acc.alias is last[2]:
                return
            if same and acc.alias is None and acc.count == 0 and last[2].alias is None \
                    and last[2].count == x.numel() // x.shape[-1]:
                acc.alias = last[2]
                return
            if acc.alias is not None:
                raise RuntimeError(f"{name} was fed the input of another site on the first calibration call, "
                                   "but not on this one")
            acc.add(x)
            last[0], last[1], last[2] = x, x._version, acc
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
