"""The `genai_config.json` written beside `model.onnx`, so onnxruntime-genai can drive it.

The I/O names are the ones `graph` emits (per-layer `past_key_values.%d.key/value` in,
`present.%d.key/value` out); `past_present_share_buffer` is false because the graph
concatenates past and new keys (present grows by the step's length). Families onnxruntime-genai
knows by name keep their type; the others (gpt2, whose genai type expects a combined KV cache,
and gpt_neox, which it does not know) use its generic `decoder` type, which drives exactly
this graph form. `context_length` and `search.max_length` are the context the artifact was
built for (the memory plan's), never the model's `max_position_embeddings`: an app must not
grow the KV cache past the budget. BOS/EOS/PAD come from the tokenizer
(`liftedge.lowering.special_tokens`), and a chat template kept in `chat_template.jinja` is
also written into the folder's `tokenizer_config.json`, where onnxruntime-genai's tokenizer
reads it.

This module owns that file and the template; running onnxruntime-genai is `genai_runner`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from liftedge.targets.onnxruntime.graph import Shapes

# Model types whose onnxruntime-genai implementation takes our per-layer cache graph as is
# (checked with onnxruntime-genai 0.18.0); every other family is written as "decoder".
NATIVE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
GENERIC_TYPE = "decoder"


def genai_type(model_type: str) -> str:
    return model_type if model_type in NATIVE_TYPES else GENERIC_TYPE


def genai_config(config, shapes: Shapes, filename: str, tokens: dict[str, Any], context: int) -> dict[str, Any]:
    """The genai_config.json content; `tokens` is `liftedge.lowering.special_tokens(pack)`."""
    eos = tokens["eos_token_ids"]
    return {
        "model": {
            "bos_token_id": tokens["bos_token_id"] if tokens["bos_token_id"] is not None else eos[0],
            "context_length": int(context),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": shapes.head_dim,
                "hidden_size": shapes.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": shapes.heads,
                "num_hidden_layers": shapes.layers,
                "num_key_value_heads": shapes.kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tokens["pad_token_id"],
            "type": genai_type(config.model_type),
            "vocab_size": shapes.vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": int(context), "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0},
    }


def embed_chat_template(out: Path, template: str | None) -> bool:
    """Write `template` into `out/tokenizer_config.json` (if it lacks one); True if written."""
    path = out / "tokenizer_config.json"
    if template is None or not path.is_file():
        return False
    data = json.loads(path.read_text())
    if isinstance(data.get("chat_template"), str):
        return False
    data["chat_template"] = template
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return True
