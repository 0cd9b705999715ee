"""Text handling: the WikiText row rebuild, calibration windows, data-free generation."""

from __future__ import annotations

import pytest
import torch

from liftedge.errors import CalibrationError, LiftedgeError
from liftedge.model import load_model
from liftedge.text import (
    GenerationConfig,
    calibration_tokens,
    describe_files,
    describe_generation,
    generate_calibration_tokens,
    protocol_text,
    read_text,
    tokenize,
)


def test_protocol_text_rebuilds_dataset_rows():
    # Raw file: a heading, a blank line, a paragraph, the final newline. The datasets rows are
    # [" = T = \n", "", " Para . \n"] (the empty string after the last "\n" is dropped).
    raw = " = T = \n\n Para . \n"
    assert protocol_text(raw) == " = T = \n" + "\n\n" + "" + "\n\n" + " Para . \n"
    # Whitespace-only lines become empty rows too.
    assert protocol_text("a\n  \nb\n") == "a\n\n\n\n\nb\n"
    # Same rows whether or not the file ends with a newline: no text is lost.
    assert protocol_text("a\nb") == protocol_text("a\nb\n")


def test_read_text_keeps_line_endings(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("x\r\ny\n".encode())
    assert read_text(path) == "x\r\ny\n"
    with pytest.raises(LiftedgeError, match="does not exist"):
        read_text(tmp_path / "missing.txt")


def test_calibration_tokens_deterministic_and_from_the_text(tiny_llama_dir, sample_text_file):
    tok = load_model(tiny_llama_dir).tokenizer
    a = calibration_tokens(tok, [sample_text_file], n_samples=4, seq_len=32, seed=1)
    b = calibration_tokens(tok, [sample_text_file], n_samples=4, seq_len=32, seed=1)
    c = calibration_tokens(tok, [sample_text_file], n_samples=4, seq_len=32, seed=2)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    info = describe_files([sample_text_file], 4, 32, seed=1)
    assert info["source"] == "files" and len(info["files"][0]["sha256"]) == 64
    stream = tokenize(tok, read_text(sample_text_file)).tolist()
    for row in a.tolist():  # every sample is a contiguous window of the token stream
        assert any(stream[i : i + 32] == row for i in range(len(stream) - 31))


def test_calibration_tokens_too_short_says_how_many(tiny_llama_dir, sample_text_file):
    tok = load_model(tiny_llama_dir).tokenizer
    have = tokenize(tok, read_text(sample_text_file)).numel()
    with pytest.raises(CalibrationError, match=rf"needs {64 * 1000} tokens .* only {have}"):
        calibration_tokens(tok, [sample_text_file], n_samples=64, seq_len=1000)


def test_generated_calibration_is_seeded_and_cached(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    a = generate_calibration_tokens(loaded, n_samples=3, seq_len=12, seed=5)
    assert a.shape == (3, 12)
    assert (a[:, 0] == describe_generation(loaded, 3, 12, 5)["start_token_id"]).all()
    assert torch.equal(a, generate_calibration_tokens(loaded, 3, 12, seed=5, use_cache=False))
    assert not torch.equal(a, generate_calibration_tokens(loaded, 3, 12, seed=6))


def test_generation_with_kv_cache_matches_full_forward(tiny_llama_dir):
    # At a tiny temperature sampling is argmax; the cached step-by-step logits must then pick
    # the same tokens as one full forward over the finished sequence (a wrong cache would not).
    loaded = load_model(tiny_llama_dir)
    cold = GenerationConfig(temperature=1e-4)
    seq = generate_calibration_tokens(loaded, 2, 16, seed=0, config=cold, use_cache=False)
    with torch.no_grad():
        logits = loaded.model(input_ids=seq).logits
    assert torch.equal(seq[:, 1:], logits[:, :-1].argmax(-1))
