"""Reference token embedding and tied output head over one stored (possibly quantized) table.

`TableEmbedding(qt, embed_scale)` looks rows up in a stored table of any format that decodes
rows on their own (`Format.dequantize_rows`: "fp16", "int"): it gathers the stored rows of
the ids and decodes only those, so the float32 table is never materialised.
`TiedHead(embedding, bias)` is the output head of a model whose head shares the embedding's
weight: logits = x @ W^T with W the embedding module's own stored table (one stored copy),
decoded per call in chunks of `registry.DECODE_CHUNK_ROWS` rows so that no float32 copy of the
whole table is held either. An untied quantized head is an ordinary linear site (`make_module`).

This module owns those two modules; the table's byte layout belongs to its format's module.
"""

from __future__ import annotations

import torch
from torch import nn

from liftedge.targets.reference.registry import get_format, matmul_rows, stored_buffer
from liftedge.types import QuantizedTensor

class TableEmbedding(nn.Module):
    """ids [...] -> rows [..., hidden] float32 of a stored table, decoded on lookup.

    `embed_scale` (Gemma 3 multiplies the looked-up rows by sqrt(hidden)) is applied after
    decoding, as the original module does. The stored fields are buffers `q_<field>`.
    """

    def __init__(self, qt: QuantizedTensor, embed_scale: float | None = None):
        super().__init__()
        self.fmt, self.meta = qt.fmt, dict(qt.meta)
        self.num_embeddings, self.embedding_dim = qt.meta["out_features"], qt.meta["in_features"]
        self._fields = tuple(qt.tensors)
        for field, tensor in qt.tensors.items():  # shared, not copied (`stored_buffer`)
            self.register_buffer(f"q_{field}", stored_buffer(tensor))
        self.embed_scale = None if embed_scale is None else float(embed_scale)

    def stored(self) -> QuantizedTensor:
        """The stored table as a QuantizedTensor (the buffers themselves, not copies)."""
        return QuantizedTensor(self.fmt, {f: getattr(self, f"q_{f}") for f in self._fields}, self.meta)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = get_format(self.fmt).dequantize_rows(self.stored(), ids).to(ids.device)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"


class TiedHead(nn.Module):
    """x [..., hidden] -> logits [..., vocab] over the table of `embedding` (stored once)."""

    def __init__(self, embedding: TableEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        self._embedding = [embedding]  # not a submodule: the table is registered on its owner only
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())

    @property
    def tied_embedding(self) -> TableEmbedding:
        """The embedding whose table this head reads (`liftedge.sites` reads tying from it)."""
        return self._embedding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul_rows(x, self._embedding[0].stored())
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"tied to the embedding table (fmt={self._embedding[0].fmt})"
