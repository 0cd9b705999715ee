"""Sensitivity (liftedge.measure): predicted Δloss per site and option, validated against measured KL."""

from __future__ import annotations

import copy

import pytest
import torch

from liftedge.calibrate import collect_stats
from liftedge.errors import LiftedgeError
from liftedge.measure import (
    FP16_OPTION,
    TABLE_OPTIONS,
    measure_sensitivity,
    option_nbytes,
    option_rate,
    parse_menu,
    spearman,
)
from liftedge.model import list_sites, load_model, site_weight
from liftedge.packed import install_reference_modules
from liftedge.quantize.liftquant import LiftQuantConfig, LiftQuantQuantizer
from liftedge.types import Rate

MENU = ("12/8", "16/8", "12/4", "16/4")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import make_tiny_model_dir

    loaded = load_model(make_tiny_model_dir("llama", tmp_path_factory.mktemp("m")))
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, loaded.config.vocab_size, (8, 64), generator=g)
    held = torch.randint(0, loaded.config.vocab_size, (8, 64), generator=g)
    return loaded, calib, held


def _kl(ref_logits, logits) -> float:
    ref, got = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def test_predicted_error_ranks_sites_like_measured_kl(setup):
    loaded, calib, held = setup
    sens = measure_sensitivity(loaded, calib, menu=MENU, use_cache=False)
    stats = collect_stats(loaded, calib)
    sites = {s.name: s for s in list_sites(loaded.model)}
    with torch.no_grad():
        ref = loaded.model(held).logits
    predicted, measured = [], []
    for name, options in sens.table.items():
        if sites[name].kind != "linear":  # tables: tests/test_tables.py
            continue
        cheapest = min(options, key=lambda o: o.nbytes)
        qt = LiftQuantQuantizer(LiftQuantConfig(option_rate(cheapest.name))).quantize(
            site_weight(loaded.model, sites[name]).float(), stats[name])
        model = copy.deepcopy(loaded.model)
        install_reference_modules(model, {name: qt})
        with torch.no_grad():
            measured.append(_kl(ref, model(held).logits))
        predicted.append(cheapest.error)
    # The planner only needs the ranking (and rough scale) to be right. On this model the
    # Fisher estimate ranks the 14 sites with rho ~0.98 (held-out tokens, one site quantized
    # at a time); 0.8 leaves room for seed noise while failing any broken weighting.
    assert spearman(predicted, measured) >= 0.8
    # Second-order Taylor with the Fisher predicts the KL itself, not just its order: the
    # summed prediction is within 2x of the summed measurement (measured ratio ~0.9).
    assert 0.5 <= sum(predicted) / sum(measured) <= 2.0


def test_table_bytes_and_errors_are_consistent(setup):
    loaded, calib, _ = setup
    sens = measure_sensitivity(loaded, calib, menu=MENU, use_cache=False)
    sites = {s.name: s for s in list_sites(loaded.model)}
    stats = collect_stats(loaded, calib)
    for name, options in sens.table.items():
        if sites[name].kind != "linear":  # the embedding and head have table options (test_tables.py)
            assert {o.name for o in options} == {FP16_OPTION, *TABLE_OPTIONS}
            continue
        assert {o.name for o in options} == {FP16_OPTION, "lq-12-8", "lq-16-8", "lq-12-4", "lq-16-4"}
        by = {o.name: o for o in options}
        # every byte as the pack stores it
        qt = LiftQuantQuantizer(LiftQuantConfig(Rate(16, 8))).quantize(site_weight(loaded.model, sites[name]).float(),
                                                                     stats[name])
        assert by["lq-16-8"].nbytes == qt.nbytes == option_nbytes(sites[name], "lq-16-8")
        assert by[FP16_OPTION].nbytes == 2 * sites[name].numel
        # more bits, less error (4 bits vs 1.5 bits: a margin so wide noise cannot flip it)
        assert by["lq-16-4"].error < by["lq-12-8"].error
        assert by[FP16_OPTION].error < by["lq-16-4"].error
    assert sens.numel == {n: sites[n].numel for n in sens.table}


def test_cached_table_is_identical(setup):
    loaded, calib, _ = setup
    first = measure_sensitivity(loaded, calib, menu=MENU)
    second = measure_sensitivity(loaded, calib, menu=MENU)
    assert first.to_json() == second.to_json()


def test_linears_only_tables_of_the_previous_format_still_load(setup):
    # Format-2 tables (linear layers only, embeddings in the fixed bytes) are kept in
    # benchmarks/results; they load with the same entries, and unknown formats are refused.
    import json

    from liftedge.measure import LINEARS_ONLY_FORMAT, Sensitivity

    loaded, calib, _ = setup
    data = json.loads(measure_sensitivity(loaded, calib, menu=MENU).to_json())
    data["format"] = LINEARS_ONLY_FORMAT
    data["table"] = {k: v for k, v in data["table"].items() if ".layers." in k}
    old = Sensitivity.from_json(json.dumps(data))
    assert set(old.table) == set(data["table"]) and old.fixed_nbytes == data["fixed_nbytes"]
    data["format"] = "liftedge-sensitivity-1"
    with pytest.raises(LiftedgeError, match="not a liftedge-sensitivity-3 table"):
        Sensitivity.from_json(json.dumps(data))


def test_bad_menu_and_tokens_are_clear_errors(setup):
    loaded, calib, _ = setup
    with pytest.raises(LiftedgeError, match="not shipped"):
        parse_menu(["7/3"])
    with pytest.raises(LiftedgeError, match="not a rate"):
        parse_menu(["two bits"])
    with pytest.raises(LiftedgeError, match="unknown option"):
        option_rate("int3")
    with pytest.raises(LiftedgeError, match="calibration tokens"):
        measure_sensitivity(loaded, calib[:, :1], menu=MENU)


def test_measured_a_block_or_a_site_at_a_time_equals_one_pass(setup):
    """Memory follows a chunk of blocks, not the model (a 1B model's float64 sums for every site
    at once passed 20 GB), and a block larger than the budget is cut between its sites (an 8B
    block's sums are 2.4 GB): each site's statistics do not depend on which others are measured
    beside it, so block-per-chunk and site-per-chunk tables are the one-pass table, value for value."""
    from liftedge.measure import _sums_nbytes, planned_sites, site_chunks

    loaded, calib, _ = setup
    sites = planned_sites(loaded.model)
    blocks = {s.block for s in sites if s.block is not None}
    linears = [s for s in sites if s.block is not None]
    block_cost = max(sum(_sums_nbytes(s) for s in linears if s.block == b) for b in blocks)
    by_block = site_chunks(sites, block_cost)  # a budget of one block: one block per chunk
    by_site = site_chunks(sites, 1)  # a budget below any site: one site per chunk
    for chunks in (by_block, by_site):
        assert sorted(s.name for c in chunks for s in c) == sorted(s.name for s in sites)  # each once
        assert sum(all(s.block is None for s in c) for c in chunks) == 1  # embedding and head: one chunk
    assert len(by_block) == len(blocks) + 1
    assert len(by_site) == len(linears) + 1
    one = measure_sensitivity(loaded, calib, menu=MENU, use_cache=False)
    per_block = measure_sensitivity(loaded, calib, menu=MENU, use_cache=False, chunk_nbytes=block_cost)
    per_site = measure_sensitivity(loaded, calib, menu=MENU, use_cache=False, chunk_nbytes=1)
    assert one.table == per_block.table == per_site.table


def test_an_interrupted_measurement_resumes_from_its_last_chunk(setup, monkeypatch, tmp_path):
    """An 8B measurement on CPU takes hours: the chunks measured before an interruption are kept
    (beside the cache entry) and not measured again, and the resumed table is the uninterrupted
    one, value for value."""
    import liftedge.measure as measure

    loaded, calib, _ = setup
    monkeypatch.setenv("LIFTEDGE_CACHE", str(tmp_path))
    sites = measure.planned_sites(loaded.model)
    budget = max(sum(measure._sums_nbytes(s) for s in sites if s.block == b) for b in {s.block for s in sites})
    chunks = measure.site_chunks(sites, budget)  # one block per chunk, and the tables' chunk
    assert len(chunks) > 2
    whole = measure_sensitivity(loaded, calib, menu=MENU, use_cache=False, chunk_nbytes=budget)
    real, calls = measure.output_fisher, []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "output_fisher", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(loaded, calib, menu=MENU, chunk_nbytes=budget)
    assert not list(tmp_path.rglob("*[0-9a-f].json"))  # no table entry from an unfinished run
    partial = list(tmp_path.rglob("*.partial.json"))
    assert len(partial) == 1
    calls.clear()
    monkeypatch.setattr(measure, "output_fisher", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = measure_sensitivity(loaded, calib, menu=MENU, chunk_nbytes=budget)
    assert len(calls) == len(chunks) - 2  # the first two chunks were read, not measured
    assert resumed.table == whole.table
    assert not partial[0].exists()  # the finished table replaces it


def test_a_partial_table_of_another_model_is_ignored(setup, monkeypatch, tmp_path):
    """A partial file naming sites this model does not plan (or unreadable) is measured over."""
    import liftedge.measure as measure

    loaded, calib, _ = setup
    planned = {s.name for s in measure.planned_sites(loaded.model)}
    bad = tmp_path / "x.partial.json"
    bad.write_text('{"format": "%s", "table": {"no.such.site": [["fp16", 2, 0.0]]}}' % measure.SENSITIVITY_FORMAT)
    assert measure._read_partial(bad, planned) == {}
    bad.write_text("{not json")
    assert measure._read_partial(bad, planned) == {}
