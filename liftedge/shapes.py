"""Shape-true stand-ins for the models people want on phones, without their weights.

Owns the configurations of public model shapes (Llama-3.2-1B/3B, Qwen3-4B, Llama-3.1-8B, from
their published config.json, plus `-tiny` variants of the same structure for tests), building
such a model on the `meta` device (every shape and byte count, no memory), and writing a
checkpoint of seeded random weights in the Hugging Face layout for runs that need real tensors.

Every cost liftedge plans (bytes, KV cache, activations) depends only on shapes; quality does
not, and cannot be measured on these models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from liftedge.errors import LiftedgeError

# Published config.json fields that decide every size (hidden, layers, heads, vocabulary, tying).
_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "llama-3.2-3b": {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "qwen3-4b": {"model_type": "qwen3", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "max_position_embeddings": 40960, "hidden_size": 2560, "intermediate_size": 9728,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "vocab_size": 151936, "tie_word_embeddings": True, "bos_token_id": 151643,
                 "eos_token_id": 151645},
    "llama-3.1-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "tie_word_embeddings": False},
}
# Same structure (family, GQA ratio, tying), sizes small enough for tests.
for _name, _cfg in list(SHAPES.items()):
    SHAPES[f"{_name}-tiny"] = {**_cfg, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2 if _name != "llama-3.2-3b" else 1,
                               "head_dim": 32, "vocab_size": 512, "max_position_embeddings": 2048,
                               "bos_token_id": 1, "eos_token_id": 2}


def is_shape(spec: str) -> bool:
    return str(spec) in SHAPES


def shape_config(name: str):
    """The transformers config of a shape (a `LiftedgeError` naming the known ones otherwise)."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise LiftedgeError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    fields = dict(SHAPES[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def meta_model(config) -> torch.nn.Module:
    """The model of `config` on the `meta` device: every module and shape, no weight memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def parameter_count(name: str) -> int:
    model = meta_model(shape_config(name))
    return sum(p.numel() for p in model.parameters())


def write_checkpoint(name: str, out: str | Path, seed: int = 0, layers: int | None = None) -> Path:
    """A Hugging Face folder of `name` with seeded random weights, one safetensors shard per tensor
    group so that memory stays at one group (an 8B model never has to be held at once).
    `layers` keeps only the first decoder blocks (every per-block cost is the full model's).

    Weights are heavy-tailed (Student-t, 4 degrees of freedom) with a few outlier input
    channels per matrix (x8), as trained LLMs have; scaled by 1/sqrt(fan-in) so activations stay
    bounded. fp16, as released checkpoints are."""
    from safetensors.torch import save_file

    config = shape_config(name)
    if layers is not None:
        if not 1 <= layers <= config.num_hidden_layers:
            raise LiftedgeError(f"{name} has {config.num_hidden_layers} decoder blocks; layers={layers} asked for")
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = meta_model(config)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_name, last_group = None, None
    for pname, param in model.named_parameters(remove_duplicate=True):
        group = _group_of(pname)
        if group != last_group:  # parameters come in model order: a group is done when the next starts
            if shard:
                save_file(shard, str(out / shard_name), metadata={"format": "pt"})
            shard, last_group = {}, group
            shard_name = f"part-{len(set(weight_map.values())):03d}.safetensors"
        shard[pname] = _random_tensor(tuple(param.shape), pname, gen)
        weight_map[pname] = shard_name
    if shard:
        save_file(shard, str(out / shard_name), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                  indent=1, sort_keys=True))
    config.save_pretrained(out)
    _write_tokenizer(out, config)
    return out


def _group_of(pname: str) -> str:
    parts = pname.split(".")
    if "layers" in parts:
        return f"block-{int(parts[parts.index('layers') + 1]):03d}"
    return "other"


def _random_tensor(shape: tuple[int, ...], name: str, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms: near one
        return (1.0 + 0.02 * torch.randn(shape, generator=gen)).to(torch.float16)
    rows, cols = shape
    out = torch.empty(shape, dtype=torch.float16)
    step = max(1, (1 << 22) // cols)  # ~4M values at a time: bounded temporaries for any shape
    for start in range(0, rows, step):
        # t(4) has variance 2; dividing by sqrt(2 x fan-in) gives unit-variance outputs for unit inputs
        out[start:start + step] = (_student_t((min(step, rows - start), cols), gen) / math.sqrt(2.0 * cols)).half()
    if "embed" not in name and "lm_head" not in name:
        outliers = torch.randperm(cols, generator=gen)[: max(1, cols // 256)]
        out[:, outliers] *= 8.0
    return out


def _student_t(shape: tuple[int, ...], gen: torch.Generator, dof: float = 4.0) -> torch.Tensor:
    """Student-t samples from one generator: normal / sqrt(chi2 / dof)."""
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((*shape, int(dof)), generator=gen).pow(2).sum(-1)
    return z / torch.sqrt(chi2 / dof)


def _write_tokenizer(out: Path, config) -> None:
    """A byte-level BPE tokenizer trained on a fixed text, with exactly the model's vocabulary.

    Training reaches a few hundred tokens; the rest of the vocabulary is filled with pieces no
    merge produces (distinct strings of the byte alphabet), so that every id the model can
    predict is a token: a runner that maps generated pieces back to ids (ExecuTorch's
    TextLLMRunner) then sees the same ids as the reference."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocab = min(400, config.vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "A shape-true model with random weights: its bytes and speed are real, its text is not. " * 20
    tok.train_from_iterator([text], trainer=trainer)
    data = json.loads(tok.to_str())
    pieces = data["model"]["vocab"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    i = 0
    while len(pieces) < config.vocab_size:  # base-256 numerals in the byte alphabet, 3+ characters
        digits, n = [], i
        while True:
            digits.append(alphabet[n % len(alphabet)])
            n //= len(alphabet)
            if n == 0 and len(digits) >= 3:
                break
        piece = "".join(reversed(digits))
        if piece not in pieces:
            pieces[piece] = len(pieces)
        i += 1
    tok = Tokenizer.from_str(json.dumps(data))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
