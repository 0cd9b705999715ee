"""Perplexity protocol and KL divergence, against hand computations; the `eval` command."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from liftedge.cli import main
from liftedge.errors import LiftedgeError
from liftedge.evaluate import evaluate
from liftedge.model import load_model
from liftedge.text import protocol_text, read_text, tokenize


class Bigram(nn.Module):
    """A model whose next-token logits depend only on the current token: table[id]."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))
        self.config = SimpleNamespace()

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


TABLE = [[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]


def _hand_logp(prev: int, nxt: int) -> float:
    row = TABLE[prev]
    return row[nxt] - math.log(sum(math.exp(v) for v in row))


def test_perplexity_matches_hand_computation():
    ids = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1, 1])  # ctx 4: windows [0 1 2 2] [1 0 2 1], tail [1] dropped
    result = evaluate(Bigram(TABLE), ids, ctx=4)
    pairs = [(0, 1), (1, 2), (2, 2), (1, 0), (0, 2), (2, 1)]  # first token of each window: context only
    nll = -sum(_hand_logp(a, b) for a, b in pairs) / len(pairs)
    assert (result.tokens_scored, result.windows, result.ctx, result.kl) == (6, 2, 4, None)
    # float32 log-softmax against float64 hand arithmetic: ~1e-7 relative.
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-6)
    first = evaluate(Bigram(TABLE), ids, ctx=4, windows=1)  # a fixed prefix of windows
    assert first.nll == pytest.approx(-sum(_hand_logp(a, b) for a, b in pairs[:3]) / 3, rel=1e-6)


def test_kl_matches_hand_computation():
    other = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.0, 0.0]]
    ids = torch.tensor([0, 1, 2, 0])
    result = evaluate(Bigram(other), ids, ctx=4, reference=Bigram(TABLE))

    def probs(row):
        z = sum(math.exp(v) for v in row)
        return [math.exp(v) / z for v in row]

    kl = 0.0
    for prev in (0, 1, 2):
        p, q = probs(TABLE[prev]), probs(other[prev])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert result.kl == pytest.approx(kl / 3, rel=1e-5)  # float32 sums over 3 entries


def test_tiny_llama_nll_equals_explicit_log_softmax(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    ids = torch.randint(0, 320, (2 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    result = evaluate(model, ids, ctx=16)
    total = 0.0
    for w in range(2):
        window = ids[w * 16 : (w + 1) * 16]
        with torch.no_grad():
            logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
        total -= sum(float(logp[t, window[t + 1]]) for t in range(15))
    assert result.tokens_scored == 30
    assert result.nll == pytest.approx(total / 30, rel=1e-6)  # float32 vs float64 log-softmax


def test_kl_zero_for_itself_positive_when_perturbed(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    ids = torch.randint(0, 320, (64,), generator=torch.Generator().manual_seed(1))
    assert evaluate(model, ids, ctx=32, reference=model).kl == 0.0  # identical logits: exact zero
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        w = perturbed.model.layers[0].mlp.down_proj.weight
        w += 0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    kl = evaluate(perturbed, ids, ctx=32, reference=model).kl
    # A random model's near-uniform outputs move little, but far above float32 noise (~1e-7).
    assert kl > 1e-5


def test_evaluate_refuses_bad_windows(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    ids = torch.arange(40) % 320
    with pytest.raises(LiftedgeError, match="gives 40 tokens; one window of --ctx 64 needs 64"):
        evaluate(model, ids, ctx=64)
    with pytest.raises(LiftedgeError, match="between 1 and 2"):
        evaluate(model, ids, ctx=16, windows=3)


def test_evaluate_refuses_ctx_beyond_learned_positions():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2"))  # 256 learned positions
    with pytest.raises(LiftedgeError, match="exceeds this model's 256 learned positions"):
        evaluate(gpt2, torch.zeros(600, dtype=torch.long), ctx=512)


def test_eval_command_json(tiny_llama_dir, sample_text_file, capsys):
    argv = ["eval", str(tiny_llama_dir), "--text", str(sample_text_file), "--ctx", "32", "--windows", "2"]
    assert main([*argv, "--reference", str(tiny_llama_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    loaded = load_model(tiny_llama_dir)
    ids = tokenize(loaded.tokenizer, protocol_text(read_text(sample_text_file)))
    expected = evaluate(loaded.model, ids, ctx=32, windows=2)
    assert report["ppl"] == pytest.approx(expected.ppl, rel=1e-6)  # same computation, same order
    assert report["kl"] == 0.0 and report["tokens_scored"] == 62 and report["windows"] == 2
    assert report["bits_per_weight"] == 16
    assert report["nbytes"] == 2 * sum(p.numel() for p in loaded.model.parameters())
    assert "fp16" in report["weights"]
    assert main(argv) == 0 and "ppl" in capsys.readouterr().out


def test_eval_command_missing_text(tiny_llama_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_llama_dir), "--text", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err


def test_eval_command_on_a_pack_uses_its_source_as_reference(tiny_llama_dir, sample_text_file, tmp_path, capsys):
    from liftedge.packed import load_packed, read_manifest, save_packed
    from liftedge.quantize import IntConfig, quantize_model

    loaded = load_model(tiny_llama_dir)
    qts = quantize_model(loaded, "rtn", IntConfig(bits=2, group_size=32))
    pack_dir = tmp_path / "pack"
    save_packed(pack_dir, loaded, qts, method="rtn", quantizer={"method": "rtn"}, calibration={"source": "none"})
    argv = ["eval", str(pack_dir), "--text", str(sample_text_file), "--ctx", "32", "--windows", "2", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    totals = read_manifest(pack_dir)["totals"]
    assert report["reference"] == str(tiny_llama_dir)
    assert (report["bits_per_weight"], report["nbytes"]) == (totals["bits_per_weight"], totals["nbytes"])
    ids = tokenize(loaded.tokenizer, protocol_text(read_text(sample_text_file)))
    expected = evaluate(load_packed(pack_dir), ids, ctx=32, windows=2, reference=loaded)
    assert report["kl"] == pytest.approx(expected.kl, rel=1e-6)  # same computation, same order
    assert report["kl"] > 1e-5  # 2-bit weights move the distribution far above float32 noise


# The shared data folder sits beside the checkout (as in CI); LIFTEDGE_WIKITEXT names another copy.
WIKI_TEST = os.environ.get("LIFTEDGE_WIKITEXT", str(Path(__file__).resolve().parents[2]
                                                     / "shared/data/wikitext-2-raw/wiki.test.raw"))


@pytest.mark.slow
def test_smollm2_protocol_token_count_and_first_windows():
    # data/MODELS.md: 148 windows / 302,956 scored tokens at ctx 2048; the first 40 windows give
    # perplexity 20.38 (quoted to 2 decimals, hence the 0.01 tolerance). ~15 min on 2 CPU cores.
    if not Path(WIKI_TEST).is_file():
        pytest.skip(f"{WIKI_TEST} is not on this machine")
    loaded = load_model("default")
    ids = tokenize(loaded.tokenizer, protocol_text(read_text(WIKI_TEST)))
    assert ids.numel() // 2048 == 148 and 148 * 2047 == 302_956
    result = evaluate(loaded.model, ids, ctx=2048, windows=40)
    assert result.ppl == pytest.approx(20.38, abs=0.01)
