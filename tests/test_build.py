"""`liftedge build`: plan -> quantize -> pack -> lower -> verify, end to end on a tiny model.

The runtimes are real (ExecuTorch's and ONNX Runtime's Python runtimes, Core ML's saved
package read back); the checks are the build's own verification plus what a user sees:
the report, the files, the atomic output, the reuse of the cached pack.
"""

from __future__ import annotations

import json

import pytest

from liftedge.cli import main

QUICK = ["--samples", "4", "--seq-len", "64", "--menu", "12/8", "16/8", "12/4", "--no-correct", "--max-context", "96"]


def _build(model, text, out, *args) -> int:
    return main(["build", str(model), "--calib", str(text), *QUICK, "-o", str(out), *args])


@pytest.mark.parametrize("target, runtime", [("android", None), ("android", "onnxruntime"), ("ios", None)])
def test_build_for_a_device_writes_a_verified_artifact(tiny_llama_dir, sample_text_file, tmp_path, target, runtime,
                                                       capsys):
    out = tmp_path / "out"
    args = ["--target", target, "--bits", "3"] + (["--runtime", runtime] if runtime else [])
    assert _build(tiny_llama_dir, sample_text_file, out, *args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == (runtime or {"android": "executorch", "ios": "coreml"}[target])
    from liftedge.commands.build import verification_records

    records = verification_records(report["verification"])
    assert records and all(r["passed"] and r["greedy_tokens_equal"] for r in records)
    assert report["pack"]["plan"]["plan"]["derived"]["bits_per_weight"] <= 3.0
    # an app needs the tokenizer beside the model, whatever the runtime
    assert (out / "tokenizer.json").is_file() and "tokenizer.json" in report["artifacts"]["tokenizer"]
    # every site of the plan is in the lowering report
    assert set(report["sites"]) >= set(report["pack"]["site_formats"])
    assert "wrote" in capsys.readouterr().out


def test_second_runtime_reuses_the_pack_and_failures_leave_nothing(tiny_llama_dir, sample_text_file, tmp_path,
                                                                   capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert _build(tiny_llama_dir, sample_text_file, first, "--target", "android", "--lambda", "0.3",
                  "--runtime", "onnxruntime") == 0
    capsys.readouterr()
    assert _build(tiny_llama_dir, sample_text_file, second, "--target", "android", "--lambda", "0.3",
                  "--runtime", "onnxruntime") == 0
    assert "reusing the quantized pack" in capsys.readouterr().out
    # an existing artifact is not replaced without --force, and is left intact
    before = sorted(p.name for p in first.iterdir())
    assert _build(tiny_llama_dir, sample_text_file, first, "--target", "android", "--lambda", "0.3") == 2
    assert sorted(p.name for p in first.iterdir()) == before
    # a budget that cannot fit fails before anything is written
    assert _build(tiny_llama_dir, sample_text_file, tmp_path / "c", "--target", "android", "--ram", "300MB") == 2
    assert not (tmp_path / "c").exists()
    assert "needs at least" in capsys.readouterr().err


def test_stock_only_executorch_build_from_the_cli(tiny_lq_pack, tmp_path, et_kernel_cache, monkeypatch):
    """`--no-custom-ops --no-llm-attention`: a program with no operator outside stock ExecuTorch
    (no liftedge kernel library, no LLM custom ops) for a runtime that has neither; verified,
    and the report says what the app needs: nothing beyond the stock runtime."""
    monkeypatch.setenv("LIFTEDGE_CACHE", str(et_kernel_cache))
    out = tmp_path / "out"
    assert main(["build", str(tiny_lq_pack), "--target", "android", "--ram", "8GB", "--max-context", "96", "--seq-len", "64",
                 "--no-custom-ops", "--no-llm-attention", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["custom_ops"] is False and report["options"]["llm_attention"] is False
    assert report["verification"]["passed"] and report["attention"]["lowering"] == "stock operators"
    assert report["runtime"]["kernel_library"]["needed"] is False and report["runtime"]["llm_ops"]["needed"] is False
    assert not any(k.startswith(("liftedge.", "llama.")) for k in report["operators"])
