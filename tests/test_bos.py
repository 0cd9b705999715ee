"""The text protocol follows the tokenizer's BOS setting (issue 17 §1).

A tokenizer that adds BOS (Llama 3's template post-processor, Gemma's `add_bos_token`) means the
model was trained on text after BOS: every eval window, calibration sample and verification
prompt must start with it. A tokenizer that adds none (SmolLM2, GPT-2, GPT-NeoX, Qwen) must see
exactly the token streams it saw before this protocol existed, so published numbers do not move.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from liftedge.cli import main
from liftedge.evaluate import evaluate
from liftedge.model import load_model
from liftedge.text import bos_id, calibration_tokens, protocol_name, protocol_text, read_text, tokenize, with_bos
from liftedge.verify import prompt_ids


@pytest.fixture(scope="module")
def bos_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a tokenizer that adds BOS by a template post-processor (as Llama 3)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bos_llama")
    for item in tiny_llama_dir.iterdir():
        if item.is_file():
            shutil.copy(item, path / item.name)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)  # bos_token is <|endoftext|>, in the vocabulary
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", bos)])
    tok.save_pretrained(path)
    return path


def test_bos_follows_the_tokenizer(tiny_llama_dir, bos_llama_dir):
    plain = load_model(tiny_llama_dir).tokenizer
    assert bos_id(plain) is None and protocol_name(plain) == "no-bos"
    tok = load_model(bos_llama_dir).tokenizer
    assert bos_id(tok) == tok.bos_token_id and protocol_name(tok) == "bos"
    assert with_bos([5, 6], tok) == [bos_id(tok), 5, 6]
    assert with_bos([bos_id(tok), 5], tok) == [bos_id(tok), 5]  # never doubled
    assert with_bos([5, 6], plain) == [5, 6]


def _old_recipe(tokenizer, path, n, length, seed):
    """Calibration windows exactly as cut before the BOS protocol (aligned, seeded shift)."""
    ids = tokenize(tokenizer, read_text(path))
    gen = torch.Generator().manual_seed(seed)
    n_windows = ids.numel() // length
    shift = int(torch.randint(0, ids.numel() - n_windows * length + 1, (1,), generator=gen))
    windows = ids[shift: shift + n_windows * length].view(n_windows, length)
    return windows[torch.randperm(n_windows, generator=gen)[:n]]


def test_calibration_without_bos_is_unchanged(tiny_llama_dir, sample_text_file):
    tok = load_model(tiny_llama_dir).tokenizer
    new = calibration_tokens(tok, [sample_text_file], n_samples=4, seq_len=32, seed=3)
    assert torch.equal(new, _old_recipe(tok, sample_text_file, 4, 32, 3))


def test_calibration_samples_start_with_bos(bos_llama_dir, sample_text_file):
    tok = load_model(bos_llama_dir).tokenizer
    samples = calibration_tokens(tok, [sample_text_file], n_samples=4, seq_len=32, seed=3)
    assert samples.shape == (4, 32)
    assert (samples[:, 0] == bos_id(tok)).all()
    # After BOS: 31 consecutive tokens of the text, the windows of the no-BOS recipe at width 31.
    assert torch.equal(samples[:, 1:], _old_recipe(tok, sample_text_file, 4, 31, 3))


def test_eval_windows_start_with_bos_and_score_every_text_token(bos_llama_dir):
    loaded = load_model(bos_llama_dir)
    bos = bos_id(loaded.tokenizer)
    ids = torch.randint(0, 320, (2 * 15 + 3,), generator=torch.Generator().manual_seed(0))
    result = evaluate(loaded.model, ids, ctx=16, bos=bos)
    total = 0.0
    for w in range(2):
        window = torch.cat([torch.tensor([bos]), ids[w * 15: (w + 1) * 15]])
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(window[None]).logits[0].double(), -1)
        total -= sum(float(logp[t, window[t + 1]]) for t in range(15))
    assert result.tokens_scored == 30 and result.windows == 2  # ctx - 1 per window, as without BOS
    assert result.nll == pytest.approx(total / 30, rel=1e-6)  # float32 vs float64 log-softmax


def test_eval_json_names_the_protocol(tiny_llama_dir, bos_llama_dir, sample_text_file, capsys):
    for folder, expect in ((tiny_llama_dir, False), (bos_llama_dir, True)):
        assert main(["eval", str(folder), "--text", str(sample_text_file), "--ctx", "32", "--windows", "1",
                     "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["bos"] is expect
        assert ("starts with BOS" in report["protocol"]) is expect


def test_verification_prompt_starts_with_bos(tiny_llama_dir, bos_llama_dir):
    plain = load_model(tiny_llama_dir).tokenizer
    tok = load_model(bos_llama_dir).tokenizer
    assert prompt_ids(tok) == [bos_id(tok), *prompt_ids(plain)]


@pytest.fixture(scope="module")
def config_bos_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama whose tokenizer_config.json says `add_bos_token: true` while its
    tokenizer.json template adds nothing (as Llama 2 / Gemma exports can be): transformers 5
    reads only the template, liftedge follows the config."""
    path = tmp_path_factory.mktemp("config_bos")
    for item in tiny_llama_dir.iterdir():
        if item.is_file():
            shutil.copy(item, path / item.name)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    return path


def test_tokenizer_config_add_bos_token_is_followed(config_bos_dir, sample_text_file):
    from transformers import AutoTokenizer

    assert bos_id(AutoTokenizer.from_pretrained(config_bos_dir)) is None  # what transformers alone does
    tok = load_model(config_bos_dir).tokenizer
    assert bos_id(tok) == tok.bos_token_id and protocol_name(tok) == "bos"
    samples = calibration_tokens(tok, [sample_text_file], 3, 16, seed=0)
    assert (samples[:, 0] == tok.bos_token_id).all()


@pytest.mark.parametrize("folder", ["bos_llama_dir", "config_bos_dir", "tiny_llama_dir"])
def test_pack_manifest_and_report_name_the_protocol(folder, request, tmp_path):
    """The pack records the protocol, its saved tokenizer keeps it (transformers drops
    `add_bos_token` from a saved tokenizer_config.json; the template carries it) and the
    build report repeats it."""
    from liftedge.lowering import pack_summary
    from liftedge.packed import load_packed, read_manifest, save_packed

    loaded = load_model(request.getfixturevalue(folder))
    expected = protocol_name(loaded.tokenizer)
    assert expected == ("no-bos" if folder == "tiny_llama_dir" else "bos")
    save_packed(tmp_path / "pack", loaded, {}, method="fp16", calibration={"source": "none"})
    assert read_manifest(tmp_path / "pack")["protocol"] == expected
    assert protocol_name(load_packed(tmp_path / "pack").tokenizer) == expected
    assert pack_summary(tmp_path / "pack")["protocol"] == expected
