"""The supported model families and the quantization sites of a loaded model.

`FAMILIES` is the table of what liftedge knows about each supported `config.model_type`:
where its decoder blocks, embeddings and output head live. `list_sites` walks a model with
it: the embedding(s), then every linear layer of every decoder block in module order, then
the head. A head that shares its weight with the input embedding (tied) is listed with
`tied_to` set and is not a separate quantization unit: its owner is the embedding (in a
loaded pack, a head module exposing `tied_embedding` is tied to that module).
GPT-2's `Conv1D` stores its weight as [in, out]; its sites are marked `transposed` and
`site_weight` always returns [out, in].

This module does not load models (see `liftedge.model`) and does not quantize anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from liftedge.errors import ModelLoadError
from liftedge.types import Site


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its decoder blocks, embeddings and output head."""

    model_type: str
    blocks: str  # module path of the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # input embeddings, in the order they are listed as sites
    head: str  # the output projection to the vocabulary


_DECODER = dict(blocks="model.layers", embeddings=("model.embed_tokens",), head="lm_head")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", **_DECODER),
        Family("qwen2", **_DECODER),
        Family("qwen3", **_DECODER),
        Family("mistral", **_DECODER),
        Family("gemma3_text", **_DECODER),
        # GPT-2's learned position table (wpe) is an embedding too, and a site like wte.
        Family("gpt2", blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"),
               head="lm_head"),
        Family("gpt_neox", blocks="gpt_neox.layers", embeddings=("gpt_neox.embed_in",), head="lm_head"),
    )
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

# Module types whose `weight` is a quantizable matrix, and whether it is stored [in, out].
_LINEAR_TYPES: dict[type, bool] = {nn.Linear: False, Conv1D: True}


def family_of(model: nn.Module) -> Family:
    """The `Family` entry of a transformers model (by `config.model_type`)."""
    model = _unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ModelLoadError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")
    return FAMILIES[model_type]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The sub-module at dotted path `name`."""
    return _unwrap(model).get_submodule(name)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of `model`, in order."""
    return get_module(model, family_of(model).blocks)


def list_sites(model: nn.Module) -> list[Site]:
    """Every quantizable weight: embeddings, then each block's linears in module order, then the head."""
    model = _unwrap(model)
    family = family_of(model)
    sites = [_embedding_site(model, name) for name in family.embeddings]
    prefix = family.blocks
    for index, block in enumerate(decoder_blocks(model)):
        for sub_name, module in block.named_modules():
            transposed = _stored_transposed(module)
            if transposed is not None:
                sites.append(_linear_site(f"{prefix}.{index}.{sub_name}", module, index, transposed))
    sites.append(_head_site(model, family))
    return sites


def site_weight(model: nn.Module, site: Site) -> torch.Tensor:
    """The weight of `site` as [out_features, in_features] (a view; transposed for Conv1D)."""
    weight = get_module(model, site.name).weight.detach()
    return weight.t() if site.transposed else weight


@torch.no_grad()
def set_site_weight(model: nn.Module, site: Site, w: torch.Tensor) -> None:
    """Write `w` ([out, in]) into `site`'s weight in place; the inverse of `site_weight`."""
    if tuple(w.shape) != (site.out_features, site.in_features):
        raise ValueError(f"{site.name}: weight must be {(site.out_features, site.in_features)}, got {tuple(w.shape)}")
    target = get_module(model, site.name).weight
    target.copy_(w.t() if site.transposed else w)


def _unwrap(model):
    """Accept a `LoadedModel` where a module is expected."""
    return getattr(model, "model", model) if not isinstance(model, nn.Module) else model


def _table_shape(module: nn.Module) -> tuple[int, int]:
    """[rows, cols] of an embedding or head: its weight's, or a packed reference module's own."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    for rows, cols in (("num_embeddings", "embedding_dim"), ("out_features", "in_features")):
        if hasattr(module, rows):
            return getattr(module, rows), getattr(module, cols)
    owner = getattr(module, "tied_embedding", None)
    if owner is not None:
        return _table_shape(owner)
    raise ModelLoadError(f"{type(module).__name__} has neither a weight nor a table shape")


def _embedding_site(model: nn.Module, name: str) -> Site:
    rows, cols = _table_shape(get_module(model, name))
    return Site(name=name, kind="embedding", out_features=rows, in_features=cols)


def _stored_transposed(module: nn.Module) -> bool | None:
    """Whether a linear module stores [in, out]; None for modules that are not linear sites."""
    for cls, transposed in _LINEAR_TYPES.items():
        if isinstance(module, cls):
            return transposed
    return None


def _linear_site(name: str, module: nn.Module, block: int, transposed: bool) -> Site:
    rows, cols = module.weight.shape
    out_features, in_features = (cols, rows) if transposed else (rows, cols)
    return Site(name=name, kind="linear", out_features=out_features, in_features=in_features,
                block=block, transposed=transposed)


def _head_site(model: nn.Module, family: Family) -> Site:
    head = get_module(model, family.head)
    weight, owner = getattr(head, "weight", None), getattr(head, "tied_embedding", None)
    tied_to = next((e for e in family.embeddings if get_module(model, e) is owner
                    or (weight is not None and getattr(get_module(model, e), "weight", None) is weight)), None)
    rows, cols = _table_shape(head)
    return Site(name=family.head, kind="head", out_features=rows, in_features=cols, tied_to=tied_to)
