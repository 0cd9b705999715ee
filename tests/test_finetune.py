"""End-to-end fine-tuning (liftedge.finetune): the loss, the frozen signs, the kept/discarded rule."""

from __future__ import annotations

import copy

import torch

from liftedge import lattice
from liftedge.bitpack import pack_signs, unpack_signs, unpack_signs_torch
from liftedge.finetune import FinetuneConfig, coarse_kl, finetune, teacher_topk
from liftedge.model import list_sites, load_model
from liftedge.packed import install_reference_modules
from liftedge.quantize.liftquant import LiftQuantConfig
from liftedge.quantize.pipeline import quantize_streaming


def test_torch_unpack_equals_numpy_unpack():
    signs = torch.where(torch.rand(7, 29, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    packed = pack_signs(signs)
    assert torch.equal(unpack_signs_torch(packed, 29), unpack_signs(packed, 29))
    assert torch.equal(unpack_signs_torch(packed, 29), signs)


def test_coarse_kl_is_zero_for_the_teacher_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g)
    top = torch.log_softmax(logits, -1).topk(8, dim=-1)
    # The teacher against itself: only float rounding remains.
    assert abs(float(coarse_kl(logits, top.indices, top.values))) < 1e-6
    other = logits + torch.randn(2, 5, 50, generator=g)
    kl = float(coarse_kl(other, top.indices, top.values))
    # The coarsened KL is a lower bound of the full KL (data processing), and positive.
    full = float(torch.nn.functional.kl_div(torch.log_softmax(other, -1), torch.log_softmax(logits, -1),
                                            log_target=True, reduction="none").sum(-1).mean())
    assert 0 < kl <= full + 1e-6


def _quantized(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    tokens = torch.randint(0, loaded.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    rate = lattice.shipped_rates()[0]
    configs = {s.name: LiftQuantConfig(rate) for s in list_sites(loaded.model) if s.kind == "linear" and s.block is not None}
    teacher = teacher_topk(loaded.model, tokens, k=16)
    qtensors, _ = quantize_streaming(loaded, tokens, configs)
    return loaded, tokens, teacher, qtensors


def test_finetune_lowers_kl_keeps_signs_and_leaves_decoded_weights(tiny_llama_dir):
    loaded, tokens, teacher, qtensors = _quantized(tiny_llama_dir)
    new, record = finetune(loaded.model, qtensors, tokens, teacher, FinetuneConfig(epochs=3, lr_transform=1e-3,
                                                                                    lr_scale=1e-3))
    # The cheapest rate leaves a random tiny model far from its teacher: three epochs at these
    # rates must lower the calibration KL, or the training loop is broken.
    assert record["kept"] and record["kl_after"] < record["kl_before"], record
    for name, qt in qtensors.items():
        assert torch.equal(new[name].tensors["signs"], qt.tensors["signs"]), name  # signs are frozen
    assert any(not torch.equal(new[n].tensors["scale"], qtensors[n].tensors["scale"]) for n in qtensors)
    # The model is left holding the fine-tuned decoded weights: it equals the reference
    # modules of the returned tensors up to float32 summation order.
    reference = copy.deepcopy(loaded.model)
    install_reference_modules(reference, new)
    with torch.no_grad():
        a, b = reference(tokens).logits, loaded.model(tokens).logits
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_finetune_that_does_not_pay_is_discarded(tiny_llama_dir):
    loaded, tokens, teacher, qtensors = _quantized(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    # Learning rates this large wreck the factors: the KL rises and the result is dropped.
    new, record = finetune(loaded.model, qtensors, tokens, teacher, FinetuneConfig(lr_transform=10.0, lr_scale=10.0))
    assert not record["kept"] and record["kl_after"] >= record["kl_before"], record
    assert new is qtensors
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())


def test_finetune_is_deterministic(tiny_llama_dir):
    runs = []
    for _ in range(2):
        loaded, tokens, teacher, qtensors = _quantized(tiny_llama_dir)
        new, _ = finetune(loaded.model, qtensors, tokens, teacher, FinetuneConfig(lr_transform=1e-3, lr_scale=1e-3))
        runs.append(new)
    assert all(torch.equal(runs[0][n].tensors[k], runs[1][n].tensors[k]) for n in runs[0] for k in runs[0][n].tensors)


def test_quantize_cli_finetunes_on_request_and_records_it(tiny_llama_dir, sample_text_file, tmp_path, capsys):
    from liftedge.cli import main
    from liftedge.packed import read_manifest, read_quantized

    first = lattice.shipped_rates()[0]
    rate = f"{first.D}/{first.d}"
    common = ["quantize", str(tiny_llama_dir), "--method", "liftquant", "--rate", rate, "--calib", str(sample_text_file),
              "--samples", "4", "--seq-len", "32", "--epochs", "1"]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    assert main([*common, "--finetune-epochs", "3", "--finetune-lr-transform", "1e-3", "--finetune-lr-scale", "1e-3",
                 "-o", str(tmp_path / "tuned")]) == 0
    record = read_manifest(tmp_path / "tuned")["quantizer"]["finetune"]
    assert record["config"]["epochs"] == 3 and record["config"]["lr_scale"] == 1e-3
    # As in the library test above: at the cheapest rate three epochs must lower the KL.
    assert record["kept"] and record["kl_after"] < record["kl_before"], record
    assert "finetune" not in read_manifest(tmp_path / "plain")["quantizer"]
    plain, tuned = read_quantized(tmp_path / "plain"), read_quantized(tmp_path / "tuned")
    assert plain.keys() == tuned.keys()
    # Same blocks, then only the float factors trained: signs equal, some scales moved.
    assert all(torch.equal(plain[n].tensors["signs"], tuned[n].tensors["signs"]) for n in plain)
    assert any(not torch.equal(plain[n].tensors["scale"], tuned[n].tensors["scale"]) for n in plain)

    capsys.readouterr()
    assert main([*common, "--finetune-epochs", "-1", "-o", str(tmp_path / "bad")]) == 2
    assert "--finetune-epochs must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
