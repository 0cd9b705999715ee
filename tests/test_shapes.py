"""Phone-sized shapes without weights (issue 20): configs, the meta-device model, the prior plan,
and the random-weight checkpoint of a tiny variant."""

from __future__ import annotations

import json

import pytest

from liftedge.cli import main
from liftedge.shapes import SHAPES, parameter_count, shape_config, write_checkpoint

# Published parameter counts (model cards): Llama-3.2-1B 1.24B, 3B 3.21B, Qwen3-4B 4.02B, Llama-3.1-8B 8.03B.
PUBLISHED = {"llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "qwen3-4b": 4.02e9, "llama-3.1-8b": 8.03e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shapes_have_the_published_size(name):
    # the model cards round to two decimals of a billion: 0.5% covers that rounding
    assert parameter_count(name) == pytest.approx(PUBLISHED[name], rel=5e-3)


def test_plan_of_an_8b_shape_reads_no_weights_and_names_the_ram_it_needs(capsys):
    assert main(["plan", "llama-3.1-8b", "--target", "android", "--ram", "8GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # the plan fills the device's budget exactly (the solver's guarantee) with sub-4-bit rates
    derived = plan["plan"]["derived"]
    assert derived["bits_per_weight"] < 4.0
    assert plan["plan"]["budget_nbytes"] >= derived["total_nbytes"] > 0.99 * plan["plan"]["budget_nbytes"]
    assert main(["plan", "llama-3.1-8b", "--target", "android", "--ram", "4GB"]) == 2
    assert "it needs at least" in capsys.readouterr().err


def test_tiny_checkpoint_loads_in_transformers_and_liftedge(tmp_path):
    from liftedge.model import load_model

    folder = write_checkpoint("llama-3.2-1b-tiny", tmp_path / "m", seed=0)
    loaded = load_model(folder)
    assert loaded.model.config.num_hidden_layers == SHAPES["llama-3.2-1b-tiny"]["num_hidden_layers"]
    w = loaded.model.model.layers[0].mlp.down_proj.weight
    # heavy tails: Student-t(4) has excess kurtosis 6 (a Gaussian 0); the outlier columns add more
    z = (w - w.mean()) / w.std()
    assert float((z ** 4).mean()) > 5.0
    # deterministic per seed
    again = write_checkpoint("llama-3.2-1b-tiny", tmp_path / "m2", seed=0)
    assert (folder / "part-001.safetensors").read_bytes() == (again / "part-001.safetensors").read_bytes()


def test_big_shape_configs_build_in_transformers():
    for name in PUBLISHED:
        config = shape_config(name)
        assert config.model_type in ("llama", "qwen3")
