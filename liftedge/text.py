"""Text in, token ids out: evaluation text, calibration samples, data-free calibration.

Owns: reading plain-text files byte-exactly, the standard WikiText perplexity row rebuild
(`protocol_text`), cutting calibration samples (N x L token windows, seeded) from the text a
user names, and generating calibration samples from the model itself when the user names
none. Does not own: running the model for statistics (`calibrate`) or scoring (`evaluate`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from liftedge.cache import cache_path, sha256_file, sha256_text
from liftedge.errors import CalibrationError, LiftedgeError

log = logging.getLogger(__name__)

# Bumped whenever the generated-token recipe changes, so stale cache entries are never read.
_GENERATION_FORMAT = "1"


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file, with line endings exactly as stored (no newline translation)."""
    path = Path(path)
    if not path.is_file():
        raise LiftedgeError(f"text file {path} does not exist (give a plain UTF-8 text file)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise LiftedgeError(f"text file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.replace("\x00", "").strip():
        raise CalibrationError(f"text file {path} holds no text (empty, blank or NUL bytes only)")
    return text


def protocol_text(raw: str) -> str:
    """The standard WikiText perplexity text: the Hugging Face dataset rows joined by blank lines.

    `datasets`' wikitext-2-raw-v1 has one row per line of the raw file (the final empty line
    dropped), non-blank rows keeping their newline and blank rows empty; published numbers
    tokenize `"\\n\\n".join(rows)`. A file without a final newline keeps its last line as a
    row (the `[:-1]` of the published recipe only drops the empty piece after the final "\\n").
    """
    lines = raw.split("\n")
    if lines[-1] == "":
        lines.pop()
    rows = [line + "\n" if line.strip() else "" for line in lines]
    return "\n\n".join(rows)


def bos_id(tokenizer) -> int | None:
    """The BOS id this tokenizer puts in front of text by its own setting, or None.

    Follows the tokenizer, not a family list: `add_bos_token` in its config, a template
    post-processor (Llama 3) or GGUF's `tokenizer.ggml.add_bos_token` all show up as the
    first id of an encoding with special tokens. Models whose tokenizer adds BOS were
    trained with it and are measured, calibrated and verified with it; the others
    (SmolLM2, GPT-2, GPT-NeoX, Qwen) without.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer that cannot encode with special tokens adds none
        return None
    return int(bos) if ids and int(ids[0]) == int(bos) else None


def protocol_name(tokenizer) -> str:
    """How text is fed to this model: "bos" (each window/sample starts with BOS) or "no-bos"."""
    return "bos" if bos_id(tokenizer) is not None else "no-bos"


def follow_tokenizer_config(tokenizer, tokenizer_config: dict) -> None:
    """Make `tokenizer` add BOS exactly when its tokenizer_config.json says `add_bos_token`.

    transformers 5 drops that flag when a tokenizer.json is present and follows the
    tokenizer.json post-processor alone, so a folder whose config asks for BOS (Llama 2,
    Gemma exports) but whose tokenizer.json has no template would lose it. Setting the flag
    on the tokenizer rewrites its template, so a pack saved from it keeps the same protocol.
    """
    wanted = tokenizer_config.get("add_bos_token")
    if not isinstance(wanted, bool) or (bos_id(tokenizer) is not None) == wanted:
        return
    if wanted and getattr(tokenizer, "bos_token_id", None) is None:
        log.warning("tokenizer_config.json asks for a BOS token but names none; text is used without BOS")
        return
    if not isinstance(getattr(type(tokenizer), "add_bos_token", None), property):
        log.warning("this tokenizer cannot be told add_bos_token=%s; following its own template", wanted)
        return
    tokenizer.add_bos_token = wanted
    log.info("tokenizer_config.json sets add_bos_token=%s: the tokenizer now follows it", wanted)


def with_bos(ids: Sequence[int], tokenizer) -> list[int]:
    """`ids` with the tokenizer's BOS in front where the model expects one (never doubled)."""
    bos = bos_id(tokenizer)
    ids = [int(i) for i in ids]
    if bos is None or (ids and ids[0] == bos):
        return ids
    return [bos, *ids]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as one LongTensor [T], without BOS or any other special token."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(
    tokenizer, paths: Sequence[str | os.PathLike], n_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens from the named files, as LongTensor [n, L].

    The files are joined by blank lines and tokenized once; the stream is cut into aligned
    non-overlapping windows (after a seeded shift smaller than one window) and `n_samples` of
    them are drawn without replacement. Disjoint windows keep any token from counting twice
    in the statistics; the draw is deterministic per seed. Where the tokenizer adds BOS,
    each window holds `seq_len - 1` text tokens after BOS, as the model saw text in training.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    if not paths:
        raise CalibrationError("no calibration text files were given")
    text = "\n\n".join(read_text(p) for p in paths)
    ids = tokenize(tokenizer, text)
    bos = bos_id(tokenizer)
    width = seq_len - 1 if bos is not None else seq_len
    needed = n_samples * width
    if ids.numel() < needed:
        names = ", ".join(str(p) for p in paths)
        raise CalibrationError(
            f"calibration needs {needed} tokens ({n_samples} samples x {width} text tokens) but "
            f"{names} gave only {ids.numel()}; give more text or fewer/shorter samples"
        )
    gen = torch.Generator().manual_seed(seed)
    n_windows = ids.numel() // width
    shift = int(torch.randint(0, ids.numel() - n_windows * width + 1, (1,), generator=gen))
    windows = ids[shift : shift + n_windows * width].view(n_windows, width)
    chosen = torch.randperm(n_windows, generator=gen)[:n_samples]
    samples = windows[chosen].clone()
    if bos is not None:
        samples = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), samples], dim=1)
    return samples


def describe_files(paths: Sequence[str | os.PathLike], n_samples: int, seq_len: int, seed: int = 0,
                   tokenizer=None) -> dict[str, Any]:
    """What a report should record about calibration from the user's files (JSON-able)."""
    return {
        "source": "files",
        "protocol": protocol_name(tokenizer) if tokenizer is not None else None,
        "files": [{"path": str(p), "sha256": sha256_file(p)} for p in paths],
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seed": seed,
    }


@dataclass(frozen=True)
class GenerationConfig:
    """How data-free calibration text is sampled from the model.

    Temperature 1.0 samples the model's own distribution (what its layers see in use);
    lower values collapse into repetitive text whose statistics miss most directions.
    Each sample starts from the BOS token (EOS where there is no BOS).
    """

    temperature: float = 1.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def start_token_id(tokenizer, model=None) -> int:
    """The token data-free samples start from: BOS, else EOS (tokenizer, then model config)."""
    candidates = [getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    if model is not None:
        cfg = model.config
        candidates += [getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None)]
    for tid in candidates:
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    raise CalibrationError("the model has no BOS or EOS token to start data-free calibration from; give --calib text")


def describe_generation(loaded, n_samples: int, seq_len: int, seed: int = 0,
                        config: GenerationConfig = GenerationConfig()) -> dict[str, Any]:
    """What a report should record about data-free calibration (JSON-able)."""
    return {
        "source": "generated",
        "protocol": protocol_name(loaded.tokenizer),
        "method": "temperature sampling from the model itself, batched with a KV cache",
        "start_token_id": start_token_id(loaded.tokenizer, loaded.model),
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seed": seed,
        **asdict(config),
    }


def generate_calibration_tokens(loaded, n_samples: int, seq_len: int, seed: int = 0,
                                config: GenerationConfig = GenerationConfig(), *,
                                use_cache: bool = True) -> torch.Tensor:
    """Data-free calibration: `n_samples` sequences of `seq_len` tokens sampled from the model.

    Deterministic per seed (one CPU generator drives every draw). Cached on disk by model
    hash and recipe, since sampling a long text token by token is slow.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    info = describe_generation(loaded, n_samples, seq_len, seed, config)
    source_hash = getattr(loaded, "source_hash", None)
    path = None
    if use_cache and source_hash:
        key = sha256_text(_GENERATION_FORMAT, source_hash, repr(sorted(info.items())))
        path = cache_path("calib", f"{key}.safetensors")
        if path.is_file():
            from safetensors.torch import load_file

            log.info("data-free calibration tokens read from cache %s", path)
            return load_file(path)["tokens"]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n_samples, config.batch_size):
        b = min(config.batch_size, n_samples - start)
        batches.append(_sample_batch(loaded.model, info["start_token_id"], b, seq_len, config.temperature, gen))
    tokens = torch.cat(batches)
    if path is not None:
        _save_tokens(tokens, path)
    return tokens


@torch.no_grad()
def _sample_batch(model, start_id: int, batch: int, seq_len: int, temperature: float,
                  gen: torch.Generator) -> torch.Tensor:
    device = next(model.parameters()).device
    out = torch.full((batch, seq_len), start_id, dtype=torch.long)
    step_ids = out[:, :1].to(device)
    cache_kwargs: dict[str, Any] = {}
    for t in range(1, seq_len):
        res = model(input_ids=step_ids, use_cache=True, **cache_kwargs)
        cache_kwargs = _cache_kwargs(res)
        probs = torch.softmax(res.logits[:, -1].float().cpu() / temperature, dim=-1)
        out[:, t] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        step_ids = out[:, t : t + 1].to(device)
    return out


def _cache_kwargs(output) -> dict[str, Any]:
    """The KV cache of a model output, under the argument name this transformers version uses
    (`cache` from 5.2x on, `past_key_values` before)."""
    if getattr(output, "cache", None) is not None:
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


def _save_tokens(tokens: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"tokens": tokens.contiguous()}, str(tmp))
    os.replace(tmp, path)
