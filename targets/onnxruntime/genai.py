"""The `genai_config.json` written beside `model.onnx`, so onnxruntime-genai can drive it.

The I/O names are the ones `graph` emits; `past_present_share_buffer` is false because the
graph concatenates past and new keys (present grows by the step's length). This module owns
that file and the tokenizer files copied next to it; it does not check that onnxruntime-genai
is installed (it is not a dependency).
"""

from __future__ import annotations

from typing import Any

from liftedge.targets.onnxruntime.graph import Shapes



def genai_config(config, shapes: Shapes, filename: str) -> dict[str, Any]:
    eos = config.eos_token_id
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": int(getattr(config, "max_position_embeddings", 2048)),
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
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
            "type": config.model_type,
            "vocab_size": shapes.vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": int(getattr(config, "max_position_embeddings", 2048)), "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0},
    }
