"""`liftedge eval`: perplexity (standard protocol) and KL of a model or a packed model.

Argument handling and printing only; the work is `text.protocol_text`, `evaluate.evaluate`
and the loaders (`model.load_model`, `packed.load_packed`, imported when needed).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACK_FORMAT = "liftedge-pack"
# A float model is reported at the size it would be shipped unquantized: fp16.
FLOAT_BITS_PER_WEIGHT = 16


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity and KL divergence of a model or packed model on a text",
        description="Standard perplexity protocol: the text's rows are rebuilt as the Hugging Face "
                    "WikiText dataset has them, joined by blank lines, tokenized once without BOS and "
                    "cut into non-overlapping windows of --ctx tokens (tail dropped); every token but "
                    "the first of each window is scored. KL(P_ref || P_model) is averaged over the same "
                    "tokens.",
    )
    p.add_argument("model", metavar="MODEL_OR_PACK",
                   help="a Hugging Face folder, a .gguf file, 'default', or a liftedge pack folder")
    p.add_argument("--text", required=True, type=Path, help="plain-text file to score (e.g. wiki.test.raw)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=None, help="score only the first N windows (default: all)")
    p.add_argument("--reference", default=None,
                   help="reference model for KL (default for a pack: its source model; none for a float model)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _load_subject(spec: str):
    """(loaded model, weight size fields, default reference spec) for MODEL_OR_PACK."""
    from liftedge.packed import is_pack

    if is_pack(spec):
        from liftedge.packed import load_packed, read_manifest

        manifest = read_manifest(spec)
        totals = manifest["totals"]
        sizes = {"bits_per_weight": totals["bits_per_weight"], "nbytes": totals["nbytes"],
                 "weights": "liftedge pack (manifest totals: bits_per_weight over the decoder "
                            "linears, nbytes of every stored weight)"}
        return load_packed(spec), sizes, _source_spec(manifest["source"]["path"]), manifest["source"].get("sha256")
    from liftedge.model import load_model

    loaded = load_model(spec)
    nparams = sum(p.numel() for p in loaded.model.parameters())
    sizes = {"bits_per_weight": FLOAT_BITS_PER_WEIGHT, "nbytes": 2 * nparams,
             "weights": "float model, counted as fp16 storage (2 bytes per parameter)"}
    return loaded, sizes, None, None


def _source_spec(path: str) -> str:
    """The `load_model` argument for a manifest's source path ("default:NAME" -> "default")."""
    return "default" if str(path).startswith("default:") else str(path)


def _load_reference(spec: str | None, expected_sha256: str | None):
    """The reference model; the pack's recorded source must still be the model it was made from."""
    if spec is None:
        return None
    from liftedge.errors import LiftedgeError
    from liftedge.model import load_model

    if expected_sha256 and spec != "default" and not Path(spec).exists():
        raise LiftedgeError(f"the pack's source model {spec} is not there any more; pass --reference MODEL "
                            "to compute KL against it")
    reference = load_model(spec)
    if expected_sha256 and expected_sha256 != reference.source_hash:
        raise LiftedgeError(f"{spec} is not the model this pack was quantized from (its SHA-256 differs from "
                            "the one the pack recorded); pass --reference MODEL to compare against it anyway")
    return reference


def evaluate_file(spec: str, text_path: Path, ctx: int, windows: int | None,
                  reference_spec: str | None) -> dict[str, Any]:
    """Everything `liftedge eval` reports, as a JSON-able dict."""
    from liftedge.evaluate import evaluate
    from liftedge.text import bos_id, protocol_name, protocol_text, read_text, tokenize

    raw = read_text(text_path)  # fail on a bad path before loading any model
    loaded, sizes, default_ref, source_sha256 = _load_subject(spec)
    reference_spec = reference_spec or default_ref
    reference = _load_reference(reference_spec, source_sha256 if reference_spec == default_ref else None)
    ids = tokenize(loaded.tokenizer, protocol_text(raw))
    result = evaluate(loaded.model, ids, ctx=ctx, windows=windows,
                      reference=reference.model if reference is not None else None,
                      bos=bos_id(loaded.tokenizer))
    bos_words = {"bos": "each window starts with BOS (the tokenizer adds one)",
                 "no-bos": "no BOS (the tokenizer adds none)"}[protocol_name(loaded.tokenizer)]
    return {"model": str(spec), "text": str(text_path), "reference": reference_spec,
            "protocol": f"wikitext rows joined by blank lines, non-overlapping windows, {bos_words}",
            "bos": protocol_name(loaded.tokenizer) == "bos",
            **result.to_dict(), **sizes}


def run(args: argparse.Namespace) -> int:
    report = evaluate_file(args.model, args.text, args.ctx, args.windows, args.reference)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"model     {report['model']}")
    print(f"text      {report['text']}  ({report['windows']} windows x {report['ctx']} tokens, "
          f"{report['tokens_scored']} scored)")
    print(f"ppl       {report['ppl']:.4f}")
    if report["kl"] is not None:
        print(f"kl        {report['kl']:.6f} nats/token vs {report['reference']}")
    print(f"weights   {report['bits_per_weight']:.3f} bits/weight, {report['nbytes']} bytes ({report['weights']})")
    return 0
