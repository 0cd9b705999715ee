"""Bytes read per decoded token, and the bandwidth bound on decode speed they imply.

One decode step streams every weight it multiplies by once (all linear layers and the head),
reads one row of each table it only gathers from (the embedding), and reads the KV cache of
the positions it attends to. `decode_read_nbytes` is that sum; `pte_weight_nbytes` and
`onnx_weight_nbytes` find the weight part of a `.pte` / `.onnx` file. The bound is
bandwidth / bytes: no kernel can decode faster than memory can deliver its operands.
It ignores activations (kilobytes per token) and assumes nothing stays in cache across
tokens (true once the weights exceed the last-level cache by far, as any LLM's do).

This module does arithmetic only; bandwidths come from `liftedge.device` (a phone's profile)
and `liftedge.profile.host` (this machine, measured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def decode_read_nbytes(weight_nbytes: int, *, gathered_table_nbytes: int = 0, gathered_row_nbytes: int = 0,
                       head_reads_table: bool = False, kv_cache_nbytes: int = 0) -> int:
    """Bytes one decode step reads.

    `weight_nbytes` counts every stored weight of the program; a table of
    `gathered_table_nbytes` that is only gathered from costs one row (`gathered_row_nbytes`)
    instead, unless the head multiplies by it too (`head_reads_table`: tied embeddings).
    """
    table_read = gathered_table_nbytes if head_reads_table else 0
    return int(weight_nbytes - gathered_table_nbytes + gathered_row_nbytes + table_read + kv_cache_nbytes)


def pte_weight_nbytes(pte_nbytes: int, vocab: int, hidden: int, tied: bool, table_itemsize: int = 2) -> int:
    """Weight bytes a `.pte` decode step reads, from the file size: the program is almost all
    constant data; its embedding table (fp16 in liftedge builds) is gathered, one fp32 row out."""
    table = vocab * hidden * table_itemsize
    return decode_read_nbytes(pte_nbytes, gathered_table_nbytes=table, gathered_row_nbytes=hidden * 4,
                              head_reads_table=tied)


def onnx_weight_nbytes(path: str | Path) -> int:
    """Initializer bytes an `.onnx` decode step reads: all, except large tables consumed only by Gather."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    gathered = 0
    for t in model.graph.initializer:
        numel = int(np.prod(t.dims)) if t.dims else 1
        nbytes = numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += nbytes
        if users.get(t.name) == {"Gather"} and len(t.dims) == 2 and t.dims[0] > 1000:
            gathered += nbytes  # an embedding lookup reads one row
    return decode_read_nbytes(total, gathered_table_nbytes=gathered)


@dataclass(frozen=True)
class Bound:
    """The decode-speed bound of one memory system for one artifact."""

    label: str                  # "Pixel 8a (LPDDR5X, spec)" or "this machine (measured)"
    bandwidth_gbps: float
    bandwidth_source: str       # spec / measured / estimate
    read_nbytes_per_token: int
    tokens_per_s: float
    measured_tokens_per_s: float | None = None  # only where the artifact ran on this memory system

    @property
    def efficiency(self) -> float | None:
        """Measured / bound (None where nothing was measured on this memory system)."""
        if self.measured_tokens_per_s is None:
            return None
        return self.measured_tokens_per_s / self.tokens_per_s

    def to_dict(self) -> dict:
        return asdict(self) | {"efficiency": self.efficiency}


def make_bound(label: str, bandwidth_gbps: float, source: str, read_nbytes: int,
               measured: float | None = None) -> Bound:
    return Bound(label, float(bandwidth_gbps), source, int(read_nbytes),
                 bandwidth_gbps * 1e9 / read_nbytes, measured)
