"""`liftedge plan` and the planner: budgets from devices, λ, bits and sizes; refusals that say what would fit."""

from __future__ import annotations

import json
import re

import pytest

from liftedge.cli import main
from liftedge.device import load_device
from liftedge.errors import BudgetError, LiftedgeError
from liftedge.measure import FP16_OPTION, Sensitivity
from liftedge.memory import ModelDims
from liftedge.plan import Option
from liftedge.planner import BudgetRequest, make_plan, plan_configs
from liftedge.sizes import parse_size

CALIB = ["--samples", "4", "--seq-len", "64", "--menu", "12/8", "16/8", "12/4", "16/4"]


def _plan_cli(capsys, model_dir, text, *args) -> tuple[int, str, str]:
    code = main(["plan", str(model_dir), "--calib", str(text), *CALIB, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_for_a_phone_shows_every_budget_term(tiny_llama_dir, sample_text_file, capsys):
    code, out, _ = _plan_cli(capsys, tiny_llama_dir, sample_text_file, "--target", "android", "--ram", "4GB")
    assert code == 0
    for term in ("app-usable RAM", "runtime overhead (executorch: 54.0 MiB measured + 150 MiB app estimate)", "KV cache (2048 tokens, 16-bit)",
                 "activations", "tokenizer tables", "unquantized tables", "weight budget", "λ =", "bits/weight"):
        assert term in out
    # one row per linear layer of the decoder blocks (2 blocks x 7 for the tiny Llama)
    assert len(re.findall(r"^model\.layers\.\d+\.", out, flags=re.M)) == 14


def test_budget_too_small_states_the_ram_that_fits(tiny_llama_dir, sample_text_file, capsys):
    code, _, err = _plan_cli(capsys, tiny_llama_dir, sample_text_file, "--target", "android", "--ram", "300MB")
    assert code == 2
    m = re.search(r"needs at least ([\d.]+ \w+) of RAM", err)
    assert m, err
    # the stated minimum is enough: planning with it succeeds
    need = m.group(1).replace(" ", "")
    ram = str(int(parse_size(need) * 1.01))  # the message rounds to 3 digits
    code, out, _ = _plan_cli(capsys, tiny_llama_dir, sample_text_file, "--target", "android", "--ram", ram)
    assert code == 0 and "weight budget" in out


def test_plan_json_and_budget_sources(tiny_llama_dir, sample_text_file, capsys, tmp_path):
    out_file = tmp_path / "plan.json"
    code, out, _ = _plan_cli(capsys, tiny_llama_dir, sample_text_file, "--lambda", "0.5", "--json", "-o", str(out_file))
    assert code == 0
    data = json.loads(out)
    assert data == json.loads(out_file.read_text())
    plan = data["plan"]
    assert plan["derived"]["total_nbytes"] <= plan["budget_nbytes"]
    assert plan["derived"]["lam"] <= 0.5
    code, _, err = _plan_cli(capsys, tiny_llama_dir, sample_text_file, "--lambda", "0.5", "--bits", "3")
    assert code == 2 and "give one budget" in err
    code, _, err = _plan_cli(capsys, tiny_llama_dir, sample_text_file, "--target", "marsphone", "--ram", "4GB")
    assert code == 2 and "unknown device" in err
    code, _, err = _plan_cli(capsys, tiny_llama_dir, sample_text_file, "--ram", "4GB")
    assert code == 2 and "--target" in err


def _table() -> Sensitivity:
    # two sites with a rate-distortion menu; bytes and errors chosen so the optimum is known
    opts = lambda k: [Option("lq-12-8", 100 * k, 9.0 * k), Option("lq-12-4", 200 * k, 2.0 * k),  # noqa: E731
                      Option(FP16_OPTION, 1000 * k, 0.0)]
    return Sensitivity(table={"a": opts(1), "b": opts(2)}, numel={"a": 500, "b": 1000}, fixed_nbytes=50)


def test_bits_and_size_budgets_are_never_exceeded():
    dims = ModelDims(layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8, intermediate=16, vocab=16)
    sens = _table()
    plan = make_plan(sens, dims, BudgetRequest(weights_budget=50 + 200 + 400)).plan
    assert plan.options_by_site() == {"a": "lq-12-4", "b": "lq-12-4"}
    assert plan.total_nbytes == 650
    plan = make_plan(sens, dims, BudgetRequest(weights_budget=50 + 200 + 399)).plan
    # 649 bytes: a at 1.5 bits + b at 3 bits (error 9 + 4) beats the reverse (2 + 18)
    assert plan.options_by_site() == {"a": "lq-12-8", "b": "lq-12-4"} and plan.total_nbytes <= 649
    with pytest.raises(BudgetError, match="below the smallest plan"):
        make_plan(sens, dims, BudgetRequest(bits=1.0))
    assert plan_configs(make_plan(sens, dims, BudgetRequest(lam=1.0)).plan) == {}
    with pytest.raises(LiftedgeError, match="give a budget"):
        BudgetRequest()


def test_device_budget_refusal_names_the_minimum_ram():
    dims = ModelDims(layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8, intermediate=16, vocab=16)
    sens = _table()
    with pytest.raises(BudgetError, match=r"needs at least .* of RAM"):
        make_plan(sens, dims, BudgetRequest(device=load_device("android", "100MB")))
    result = make_plan(sens, dims, BudgetRequest(device=load_device("android", "4GB")))
    assert result.plan.options_by_site() == {"a": FP16_OPTION, "b": FP16_OPTION}  # room for everything
    assert result.memory.weight_budget_nbytes + sens.fixed_nbytes == result.plan.budget_nbytes


def test_explicit_budget_with_a_device_checks_its_memory():
    dims = ModelDims(layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8, intermediate=16, vocab=16)
    sens = _table()
    # a generic profile without RAM only picks the runtime: the plan follows --lambda
    result = make_plan(sens, dims, BudgetRequest(device=load_device("android", require_ram=False), lam=0.0))
    assert result.memory is None and result.plan.options_by_site() == {"a": "lq-12-8", "b": "lq-12-8"}
    # with RAM that cannot hold even that plan, the refusal names the RAM needed
    with pytest.raises(BudgetError, match=r"needs at least .* of RAM"):
        make_plan(sens, dims, BudgetRequest(device=load_device("android", "100MB"), lam=0.0))
    with pytest.raises(LiftedgeError, match="generic profile"):
        load_device("android")


def _head_table(fp16_nbytes: int, int8_nbytes: int) -> Sensitivity:
    """A tied embedding/head table ("embed", options fp16 / int8 / int4) and one linear site."""
    return Sensitivity(table={"embed": [Option(FP16_OPTION, fp16_nbytes, 0.0), Option("int8-g64", int8_nbytes, 1.0),
                                        Option("int4-g32", 10, 5.0)],
                              "a": [Option("lq-12-8", 10, 3.0), Option(FP16_OPTION, 100, 0.0)]},
                       numel={"embed": 1000, "a": 100}, fixed_nbytes=0)


def test_onnxruntime_integer_head_gets_the_cast_bytes():
    # ONNX Runtime casts an fp16 head to float32 per call (vocab x hidden x 4 bytes charged by
    # the memory model); an integer head runs in MatMulNBits without it, so a plan with one
    # gets those bytes for weights (its runtime peak had been over-predicted by the cast).
    dims = ModelDims(layers=1, hidden=1024, heads=8, kv_heads=8, head_dim=128, intermediate=2048, vocab=50000)
    req = BudgetRequest(device=load_device("android", "4GB"), runtime="onnxruntime")
    charged = make_plan(_head_table(1, 1), dims, req).memory  # fp16 head affordable and exact: cast charged
    cast, budget = charged.head_cast_nbytes, charged.weight_budget_nbytes
    assert cast == 50000 * 1024 * 4
    # int8 fits only without the cast; fp16 not even with it: the int8 plan (error 1) beats int4 (error 5)
    result = make_plan(_head_table(budget + 1, budget + cast // 2), dims, req)
    assert result.plan.options_by_site() == {"embed": "int8-g64", "a": FP16_OPTION}
    assert result.memory.head_cast_nbytes == 0 and result.memory.weight_budget_nbytes == budget + cast
    assert result.plan.budget_nbytes == budget + cast
    # an affordable fp16 head (error 0) is kept, with the cast charged
    result = make_plan(_head_table(budget - 100, budget + cast // 2), dims, req)
    assert result.plan.options_by_site()["embed"] == FP16_OPTION and result.memory.head_cast_nbytes == cast
    # a budget only an integer head fits is not refused for the cast it does not need
    small = make_plan(_head_table(budget + 1, budget + cast - 100), dims, req)
    assert small.plan.options_by_site()["embed"] == "int8-g64"
    # ExecuTorch casts nothing either way
    et = make_plan(_head_table(budget + 1, budget + cast // 2), dims, BudgetRequest(device=req.device,
                                                                                     runtime="executorch"))
    assert et.memory.head_cast_nbytes == 0


def test_onnxruntime_charges_the_largest_sign_unpack():
    # ONNX Runtime's stock operators unpack a lift-project layer's signs on every call (4.5
    # bytes per stored sign bit, the largest layer's alive in its arena): the plan charges its
    # own largest layer's unpack and fits the weights in what is left; ExecuTorch charges none.
    dims = ModelDims(layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8, intermediate=16, vocab=16)
    device = load_device("android", "4GB")
    et = make_plan(_table(), dims, BudgetRequest(device=device, runtime="executorch")).memory
    room = et.weight_budget_nbytes + _table().fixed_nbytes  # what the two sites may use on ExecuTorch
    numel = 10**8  # site "a": 10^8 weights at 1.5 sign bits (lq-12-8) unpack to 675 MB
    sens = Sensitivity(table={"a": [Option("lq-12-8", room - 400, 1.0), Option(FP16_OPTION, 10**12, 0.0)],
                              "b": [Option("lq-12-8", 100, 9.0), Option("lq-12-4", 200, 2.0)]},
                       numel={"a": numel, "b": 1000}, fixed_nbytes=50)
    result = make_plan(sens, dims, BudgetRequest(device=device, runtime="executorch"))
    assert result.plan.options_by_site() == {"a": "lq-12-8", "b": "lq-12-4"} and result.memory.sign_unpack_nbytes == 0
    with pytest.raises(BudgetError, match=r"to unpack its largest layer's signs.*needs at least .* of RAM") as refused:
        make_plan(sens, dims, BudgetRequest(device=device, runtime="onnxruntime"))  # 675 MB over ExecuTorch's room
    # the stated minimum RAM is enough (the refusal counts the unpack of the smallest plan)
    enough = load_device("android", str(refused.value.min_ram_nbytes))
    assert make_plan(sens, dims, BudgetRequest(device=enough, runtime="onnxruntime")).memory.sign_unpack_nbytes > 0
    roomy = make_plan(sens, dims, BudgetRequest(device=load_device("android", "8GB"), runtime="onnxruntime")).memory
    assert roomy.sign_unpack_nbytes == int(numel * 12 / 8 * 4.5)
    assert "sign unpack of the largest lift-project layer (onnxruntime)" in [label for label, _, _ in roomy.terms()]
