"""Sensitivity: the predicted effect on the model of storing each site with each menu option.

For a linear site with weight W, the Fisher diagonal of its outputs F_j = E_t[(dℓ_t/dy_tj)^2]
(ℓ_t the next-token loss of token t) and the input second moments weighted by how strongly
each token's loss reacts, H_g = Σ_t |g_t|² x_t x_tᵀ / Σ_t |g_t|² (`output_fisher`), a weight
error ΔW raises the expected loss by about

    Δℓ ≈ ½ Σ_j F_j (ΔW H_g ΔW^T)_jj        (second-order Taylor, Fisher for the Hessian)

so errors of different sites are in the same unit (nats per token) and add up, which is what
the knapsack in `liftedge.plan` needs. ΔW is measured with the real codec (LiftQuant with its
whitening, without intra-block correction, which lowers every option's error by a similar
factor) on `rows` output rows drawn at random, extrapolated with the Fisher weights of all rows.
"fp16" (keep the layer unquantized) is always an option, its error the fp16 rounding error.

The token embedding and an untied output head are sites too, with the options "fp16",
"int8-g64" and "int4-g32" (`TABLE_OPTIONS`, round-to-nearest "int"): the head's error goes
through the logits with the same formula (its input the final hidden state), the lookup's
through the first block's input (the embedding is a linear layer over one-hot inputs, so its
H_g is diagonal over the vocabulary), and a tied table pays both. GPT-2's position table
stays fp16 (fixed bytes).

The menu (`DEFAULT_MENU`) is the shipped rates whose encoding is fast (≤ 20 signs per block:
exhaustive coding cost grows as 2^D), spanning 1.5 to 4 bits per weight.

This module owns the menu, the option names ("lq-24-10", "fp16", "int8-g64"), the measurement and its
cache; the solver is `liftedge.plan`, byte budgets `liftedge.memory`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from liftedge.cache import cache_path, sha256_text
from liftedge.errors import LiftedgeError
from liftedge.plan import Option
from liftedge.quantize.base import IntConfig
from liftedge.progress import progress
from liftedge.types import Rate, Site

log = logging.getLogger(__name__)

SENSITIVITY_FORMAT = "liftedge-sensitivity-3"
# Tables of the previous format list the linear layers only (embeddings in `fixed_nbytes`);
# they still load and plan, with the tables kept fp16 (benchmarks/results keeps such tables).
LINEARS_ONLY_FORMAT = "liftedge-sensitivity-2"
FP16_OPTION = "fp16"
DEFAULT_MENU = ("12/8", "14/8", "16/8", "18/8", "24/10", "20/8", "16/6", "11/4", "12/4", "13/4", "14/4",
                "15/4", "16/4")
# Rows coded per site and option: 128 rows of ~600-1500 inputs give the output error to a
# few percent (rows are i.i.d. draws of the same codec), at 1/4 to 1/12 of a full layer's cost.
DEFAULT_ROWS = 128


# The integer options of embedding tables and the output head (round-to-nearest, asymmetric):
# "int8-g64" is 8-bit codes in groups of 64 along the hidden dimension (8.375 bits/weight with
# the fp16 scale and 8-bit zero point), "int4-g32" 4-bit codes in groups of 32 (4.625). The
# group sizes are powers of two (ONNX Runtime's MatMulNBits needs that) that divide the usual
# hidden sizes (576 = 9 x 64 = 18 x 32 for SmolLM2); a ragged last group is padded by the targets.
TABLE_CONFIGS: dict[str, IntConfig] = {"int8-g64": IntConfig(bits=8, group_size=64),
                                       "int4-g32": IntConfig(bits=4, group_size=32)}
TABLE_OPTIONS: tuple[str, ...] = tuple(TABLE_CONFIGS)


def option_name(rate: Rate) -> str:
    return f"lq-{rate.D}-{rate.d}"


def option_rate(name: str) -> Rate | None:
    """The LiftQuant rate of an option name; None for "fp16" and the integer table options."""
    if name == FP16_OPTION or name in TABLE_OPTIONS:
        return None
    try:
        kind, D, d = name.split("-")
        if kind != "lq":
            raise ValueError
        return Rate(int(D), int(d))
    except ValueError:
        raise LiftedgeError(f"unknown option {name!r} (expected 'fp16', 'lq-D-d' or one of "
                            f"{', '.join(TABLE_OPTIONS)})") from None


def option_config(name: str, *, seed: int = 0):
    """The quantizer config of an option: LiftQuantConfig (lq-D-d), IntConfig (table options), None (fp16)."""
    from liftedge.quantize.liftquant import LiftQuantConfig

    if name in TABLE_OPTIONS:
        return TABLE_CONFIGS[name]
    rate = option_rate(name)
    return None if rate is None else LiftQuantConfig(rate, seed=seed)


def option_code_bits(name: str) -> float:
    """Code bits per weight of an option, before scales: D/d, the integer width, or 16 for fp16."""
    if name in TABLE_OPTIONS:
        return float(TABLE_CONFIGS[name].bits)
    rate = option_rate(name)
    return 16.0 if rate is None else rate.D / rate.d


def parse_menu(menu: Iterable[str]) -> tuple[Rate, ...]:
    """Rates "D/d" -> shipped `Rate`s (an unknown rate is an error naming the shipped ones)."""
    from liftedge import lattice

    shipped = {(r.D, r.d): r for r in lattice.shipped_rates()}
    rates = []
    for text in menu:
        try:
            D, d = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise LiftedgeError(f"menu entry {text!r} is not a rate D/d") from None
        if (D, d) not in shipped:
            raise LiftedgeError(f"rate {text} is not shipped; shipped: {', '.join(f'{r.D}/{r.d}' for r in shipped.values())}")
        rates.append(shipped[(D, d)])
    return tuple(sorted(set(rates), key=lambda r: (r.D / r.d, r.D)))


def option_nbytes(site: Site, option: str) -> int:
    """Stored bytes of `site` under `option`, exactly as the pack stores it."""
    from liftedge.quantize.liftquant import lq_nbytes

    if option in TABLE_OPTIONS:
        return int_nbytes(site, TABLE_CONFIGS[option])
    rate = option_rate(option)
    return site.numel * 2 if rate is None else lq_nbytes(site.out_features, site.in_features, rate)


def int_nbytes(site: Site, config) -> int:
    """Bytes of the "int" fields RTN stores for `site` with `config` (its group capped at the row)."""
    from liftedge.targets.reference import get_format

    meta = dict(bits=config.bits, group_size=min(config.group_size, site.in_features), symmetric=config.symmetric,
                in_features=site.in_features, out_features=site.out_features)
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in get_format("int").tensor_specs(meta).values())


@dataclass
class Sensitivity:
    """The error table of a model: per site, its options (bytes, predicted Δloss)."""

    table: dict[str, list[Option]]
    numel: dict[str, int]
    fixed_nbytes: int          # bytes stored outside the sites (position tables, norms, biases), fp16
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {"format": SENSITIVITY_FORMAT, "meta": self.meta, "fixed_nbytes": self.fixed_nbytes,
                "numel": self.numel, "table": _table_json(self.table)}
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Sensitivity":
        data = json.loads(text)
        if data.get("format") not in (SENSITIVITY_FORMAT, LINEARS_ONLY_FORMAT):
            raise LiftedgeError(f"not a {SENSITIVITY_FORMAT} table")
        return cls(table=_table_from_json(data["table"]), numel={k: int(v) for k, v in data["numel"].items()},
                   fixed_nbytes=int(data["fixed_nbytes"]), meta=data["meta"])


def _table_json(table: dict[str, list[Option]]) -> dict[str, list[list]]:
    return {s: [[o.name, o.nbytes, o.error] for o in opts] for s, opts in table.items()}


def _table_from_json(table: dict[str, list[list]]) -> dict[str, list[Option]]:
    return {s: [Option(str(n), int(b), float(e)) for n, b, e in opts] for s, opts in table.items()}


# ---------------------------------------------------------------- a prior, for models without weights

# Predicted loss per weight and unit of codec MSE, by the role of a linear layer, relative to q_proj:
# the medians over SmolLM2-135M's 30 blocks and 13 rates of its measured table
# (benchmarks/results/smollm2_sensitivity.v2.json, error / (numel x codec MSE of the rate)).
# The token embedding and the head were not in that table: treated like an average linear layer.
PRIOR_ROLE_WEIGHTS = {"q_proj": 1.00, "k_proj": 4.28, "v_proj": 2.51, "o_proj": 1.11, "gate_proj": 0.75,
                      "up_proj": 1.10, "down_proj": 1.10}
PRIOR_DEFAULT_WEIGHT = 1.5


def _prior_weight(site: Site) -> float:
    role = site.name.rsplit(".", 1)[-1]
    return PRIOR_ROLE_WEIGHTS.get(role, PRIOR_DEFAULT_WEIGHT)


def _int_mse(bits: int) -> float:
    """MSE per weight of an optimal b-bit scalar quantizer of N(0,1), high-rate (Panter-Dite)."""
    return math.sqrt(3.0) * math.pi / 2.0 * 4.0 ** (-bits)


def prior_sensitivity(model, *, menu: Iterable[str] = DEFAULT_MENU, tables: bool = True) -> Sensitivity:
    """An error table from shapes alone (`model` may live on the `meta` device): each option's
    error is numel x the codec's MSE on N(0,1) x the role's prior weight. Plans the byte budget
    exactly; the ranking of layers is a prior, not this model's measurement."""
    from liftedge.lattice.menu import menu_entry

    rates = parse_menu(menu)
    sites = planned_sites(model, tables=tables)
    mse = {option_name(r): float(menu_entry(r)["mse_20k_blocks"]) for r in rates}
    table: dict[str, list[Option]] = {}
    for s in sites:
        options = [FP16_OPTION, *TABLE_OPTIONS] if s.kind != "linear" else [FP16_OPTION, *mse]
        table[s.name] = [Option(o, option_nbytes(s, o), 0.0 if o == FP16_OPTION else
                                s.numel * _prior_weight(s) * (mse[o] if o in mse else _int_mse(TABLE_CONFIGS[o].bits)))
                         for o in options]
    return Sensitivity(table=table, numel={s.name: s.numel for s in sites}, fixed_nbytes=fixed_nbytes(model, sites),
                       meta={"menu": [f"{r.D}/{r.d}" for r in rates], "tables": list(TABLE_OPTIONS) if tables else [],
                             "source": "prior", "unit": "prior: numel x codec MSE x role weight (relative, not nats)"})


def planned_sites(model, *, tables: bool = True) -> list[Site]:
    """The sites a plan chooses for, in model order: the token embedding (owner of a tied head)
    and an untied head when `tables`, and the linear layers of the decoder blocks.

    Position tables (GPT-2's wpe) are not planned: they stay fp16 (small, and every target
    adds them in float).
    """
    from liftedge.model import get_module, list_sites

    token_embedding = getattr(model, "model", model).get_input_embeddings()
    out = []
    for s in list_sites(model):
        if s.kind == "linear":
            keep = s.block is not None and s.tied_to is None
        elif s.kind == "embedding":
            keep = tables and get_module(model, s.name) is token_embedding
        else:
            keep = tables and s.tied_to is None
        if keep:
            out.append(s)
    return out


def fixed_nbytes(model, sites: list[Site]) -> int:
    """Bytes of every parameter outside `sites`' weights, at fp16, tied ones once (as packed)."""
    skip = {f"{s.name}.weight" for s in sites}
    return sum(p.numel() * (2 if p.is_floating_point() else p.element_size())
               for name, p in model.named_parameters(remove_duplicate=True) if name not in skip)


# ---------------------------------------------------------------- Fisher of site outputs


@dataclass
class OutputFisher:
    """Per site: F_j = E_t[g_tj^2] (g = dℓ_t/dy_t) and H_g = Σ_t |g_t|² x_t x_tᵀ / Σ_t |g_t|²."""

    diag: torch.Tensor     # [out]
    hessian: torch.Tensor  # [in, in], inputs weighted by how much their token's loss reacts


def output_fisher(model, tokens: torch.Tensor, sites: list[Site]) -> dict[str, OutputFisher]:
    """The Fisher statistics of every site's outputs over the tokens (one backward pass per row).

    Modelling g_tj^2 ≈ u_j v_t (a channel factor times a token factor) gives
    E_t[g_tj^2 (δw_j · x_t)^2] ≈ F_j δw_jᵀ H_g δw_j: the error of a row is weighted by its
    channel's Fisher and measured on the tokens whose loss reacts most. Tokens differ a lot
    there (attention sinks, for instance, take large gradients through the keys and values
    while their inputs are atypical), which plain E[x xᵀ] would miss.
    """
    from liftedge.model import get_module

    device = next(model.parameters()).device
    lookups = [s for s in sites if s.kind == "embedding"]
    sites = [s for s in sites if s.kind != "embedding"]
    diag = {s.name: torch.zeros(s.out_features, dtype=torch.float64, device=device) for s in sites}
    # float32 Grams (each adds one product per sequence: a handful of roundings of 2^-24), which
    # at 8B halves the largest one, the down projection's [14336, 14336], to 0.8 GB
    gram = {s.name: torch.zeros(s.in_features, s.in_features, dtype=torch.float32, device=device) for s in sites}
    weight = {s.name: 0.0 for s in sites}
    lookup = _LookupFisher(lookups, device)
    handles, count = [], 0

    def hook_for(name: str):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])

            def grad_hook(g: torch.Tensor) -> None:
                g2 = g.detach().double().pow(2).reshape(-1, g.shape[-1])
                diag[name].add_(g2.sum(0))
                v = g2.sum(1)
                gram[name].addmm_((x * v.float()[:, None]).T, x)
                weight[name] += float(v.sum())

            output.register_hook(grad_hook)
        return forward_hook

    for s in sites:
        handles.append(get_module(model, s.name).register_forward_hook(hook_for(s.name)))
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for row in progress(tokens, desc="fisher", unit="seq"):
            ids = row[None]
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            loss.backward()
            lookup.add(ids[0], embeds.grad[0])
            count += ids.shape[1] - 1
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    out = {name: OutputFisher(diag=(diag[name] / max(count, 1)).float().cpu(),
                              hessian=gram.pop(name).div_(max(weight[name], 1e-30)).cpu())  # in place
           for name in diag}
    out.update(lookup.result(model, count))
    return out


class _LookupFisher:
    """The token embedding seen as a linear layer over one-hot inputs (out = hidden, in = vocab).

    Its output is the looked-up row, whose loss gradient g_t is the gradient of the model's
    `inputs_embeds`. F_j = E_t[g_tj^2] as for any site; the one-hot inputs make H_g diagonal:
    H_vv = Σ_{t: id_t = v} |g_t|² / Σ_t |g_t|² (stored as a vector [vocab]), so a table error
    ΔE costs ½ Σ_v H_vv Σ_j F_j ΔE_vj² (`lookup_error`). A scaled embedding (Gemma 3 multiplies
    rows by sqrt(hidden)) has its scale² folded into F, so ΔE is in stored units.
    """

    def __init__(self, sites: list[Site], device):
        if len(sites) > 1:
            raise LiftedgeError(f"only the token embedding is measured, got {[s.name for s in sites]}")
        self.site = sites[0] if sites else None
        if self.site is not None:
            self.diag = torch.zeros(self.site.in_features, dtype=torch.float64, device=device)
            self.tokens = torch.zeros(self.site.out_features, dtype=torch.float64, device=device)

    def add(self, ids: torch.Tensor, grad: torch.Tensor | None) -> None:
        if self.site is None or grad is None:
            return
        g2 = grad.detach().double().pow(2)
        self.diag.add_(g2.sum(0))
        self.tokens.index_add_(0, ids.to(self.tokens.device), g2.sum(1))

    def result(self, model, count: int) -> dict[str, OutputFisher]:
        if self.site is None:
            return {}
        from liftedge.model import get_module

        scale = getattr(get_module(model, self.site.name), "embed_scale", None)
        factor = 1.0 if scale is None else float(scale) ** 2
        return {self.site.name: OutputFisher(diag=(self.diag * factor / max(count, 1)).float().cpu(),
                                             hessian=(self.tokens / max(float(self.tokens.sum()), 1e-30)).float().cpu())}


# ---------------------------------------------------------------- per-site errors


def _sample_rows(out_features: int, rows: int, seed: int) -> torch.Tensor:
    if out_features <= rows:
        return torch.arange(out_features)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(out_features, generator=g)[:rows].sort().values


def weighted_output_error(dw: torch.Tensor, hessian: torch.Tensor, fisher_rows: torch.Tensor) -> float:
    """½ Σ_j F_j (ΔW H ΔW^T)_jj for the rows of ΔW."""
    per_row = ((dw @ hessian) * dw).sum(1).double()
    return 0.5 * float((per_row * fisher_rows.double()).sum())


def site_errors(weight: torch.Tensor, stats, fisher_stats: "OutputFisher", rates: tuple[Rate, ...], rows: int,
                seed: int) -> dict[str, float]:
    """Predicted Δloss of one site for fp16 and every rate (rows sampled, Fisher-extrapolated).

    The codec sees the calibration statistics `stats` (as it will when quantizing); the
    error is weighted by the Fisher statistics.
    """
    from liftedge.quantize.liftquant import LiftQuantConfig, LiftQuantQuantizer
    from liftedge.targets.reference import get_format

    w = weight.detach().float()
    fisher = fisher_stats.diag.to(w.device)
    idx = _sample_rows(w.shape[0], rows, seed).to(w.device)
    total_f, sample_f = float(fisher.double().sum()), float(fisher[idx].double().sum())
    extrapolate = total_f / sample_f if sample_f > 0 else w.shape[0] / len(idx)
    h = fisher_stats.hessian.float().to(w.device)
    errors = {FP16_OPTION: weighted_output_error(w.half().float() - w, h, fisher)}
    ws, fs = w[idx].contiguous(), fisher[idx]
    for rate in rates:
        qt = LiftQuantQuantizer(LiftQuantConfig(rate, seed=seed)).quantize(ws, stats)
        dw = get_format(qt.fmt).dequantize(qt).float().to(ws.device) - ws
        errors[option_name(rate)] = extrapolate * weighted_output_error(dw, h, fs)
    return errors


def lookup_error(dw: torch.Tensor, fisher_stats: "OutputFisher", rows: slice = slice(None)) -> float:
    """½ Σ_v H_vv Σ_j F_j ΔE_vj² for a table error ΔE [vocab, hidden] (see `_LookupFisher`);
    `dw` may be the table's `rows` only (the sum over those rows)."""
    per_row = dw.double().pow(2) @ fisher_stats.diag.double().to(dw.device)
    return 0.5 * float((per_row * fisher_stats.hessian[rows].double().to(dw.device)).sum())


# Rows of a table measured at once: every option's error is a sum over rows (round-to-nearest
# groups lie within a row), so the table is measured in slices. 4096 rows of an 8B model's
# 4096-wide table are 64 MiB per float32 temporary, where the whole table would be 2.1 GB each.
TABLE_ROWS_PER_SLICE = 4096


def table_errors(weight: torch.Tensor, lookup: "OutputFisher | None", head: "OutputFisher | None",
                 *, rows_per_slice: int = TABLE_ROWS_PER_SLICE) -> dict[str, float]:
    """Predicted Δloss of a table [rows, hidden] stored as fp16 and as each of `TABLE_OPTIONS`.

    `lookup` weighs its error as the token embedding's (through the first block's input),
    `head` as the output head's (through the logits, the linear-site formula on every row);
    a tied table is both, and the two add up like the errors of separate sites. The integer
    options are quantized exactly as the pack will be (round-to-nearest, every row), a slice of
    `rows_per_slice` rows at a time so that memory follows the slice, not the table.
    """
    from liftedge.quantize import make_quantizer
    from liftedge.targets.reference import dequantize

    quantizers = {name: make_quantizer("rtn", config) for name, config in TABLE_CONFIGS.items()}
    errors = dict.fromkeys((FP16_OPTION, *TABLE_OPTIONS), 0.0)
    head_h = None if head is None else head.hessian.float().to(weight.device)
    for start in range(0, weight.shape[0], rows_per_slice):
        w = weight[start:start + rows_per_slice].detach().float()
        rows = slice(start, start + w.shape[0])
        for name in errors:
            if name == FP16_OPTION:
                dw = w.half().float() - w
            else:
                dw = dequantize(quantizers[name].quantize(w, None)).to(w.device) - w
            if lookup is not None:
                errors[name] += lookup_error(dw, lookup, rows)
            if head is not None:
                errors[name] += weighted_output_error(dw, head_h, head.diag[rows].to(w.device))
            del dw
    return errors


# Float32 [in, in] sums held at once while measuring (a Fisher Gram and a Hessian per site):
# 2 GiB keeps two 1B/3B decoder blocks per chunk; an 8B block (2.4 GB, 1.6 of it the down
# projection's two [14336, 14336] sums) is measured in two parts. A small model is one chunk.
CHUNK_NBYTES = 2 << 30


def _sums_nbytes(site: Site) -> int:
    """Bytes of the float32 [in, in] sums measuring a linear site holds (its H and Fisher Gram)."""
    return 2 * 4 * site.in_features ** 2 if site.kind == "linear" else 0


def _packed(items: list, cost, budget: int, alone=lambda prev, item: False) -> list[list]:
    """`items` in order, cut greedily into runs whose `cost` sums stay within `budget` (an item
    larger than the budget is a run alone); `alone(prev, item)` forces a cut between two items."""
    runs: list[list] = []
    used = 0
    for item in items:
        if not runs or alone(runs[-1][-1], item) or used + cost(item) > budget:
            runs.append([])
            used = 0
        runs[-1].append(item)
        used += cost(item)
    return runs


def site_chunks(sites: list[Site], budget: int) -> list[list[Site]]:
    """`sites` in order, cut so that each chunk's [in, in] float32 sums (two per linear site)
    stay within `budget` bytes: whole decoder blocks where they fit, else a block's sites in
    runs that do (a site larger than the budget is a chunk alone). Sites outside the blocks
    (embedding, head) form a chunk of their own."""
    blocks: dict[Any, list[Site]] = {}
    for s in sites:
        blocks.setdefault(s.block, []).append(s)
    units = [(block, part) for block, members in blocks.items()
             for part in (_packed(members, _sums_nbytes, budget) if block is not None else [members])]
    runs = _packed(units, lambda unit: sum(map(_sums_nbytes, unit[1])), budget,
                   alone=lambda prev, unit: prev[0] is None or unit[0] is None)
    return [[s for _, part in run for s in part] for run in runs]


def measure_sensitivity(loaded, tokens: torch.Tensor, *, menu: Iterable[str] = DEFAULT_MENU, rows: int = DEFAULT_ROWS,
                        fisher_samples: int = 8, seed: int = 0, use_cache: bool = True,
                        tables: bool = True, chunk_nbytes: int = CHUNK_NBYTES) -> Sensitivity:
    """The error table of every planned site of `loaded` (cached by content hash).

    `tokens` [n, L] are calibration sequences: all of them give H (`liftedge.calibrate`),
    the first `fisher_samples` the Fisher diagonal (one backward pass each). With `tables`
    the token embedding and an untied head are planned too (fp16 or `TABLE_OPTIONS`; a tied
    head's error counts against its embedding's options); without, they are fixed fp16 bytes.
    """
    from liftedge.calibrate import collect_stats
    from liftedge.heap import map_large_allocations, release_memory
    from liftedge.model import list_sites, site_weight

    rates = parse_menu(menu)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise LiftedgeError("sensitivity needs calibration tokens [samples, length >= 2]")
    model = loaded.model
    tokens = tokens.to(next(model.parameters()).device)  # measured where the model is (cpu or cuda)
    sites = planned_sites(model, tables=tables)
    path = _cache_file(loaded, tokens, sites, rates, rows, fisher_samples, seed) if use_cache else None
    if path is not None and path.is_file():
        log.info("sensitivity read from cache %s", path)
        return Sensitivity.from_json(path.read_text())
    planned = {s.name for s in sites}
    tied_heads = [s for s in list_sites(model) if s.tied_to in planned]
    tied = {s.tied_to: s.name for s in tied_heads}  # embedding -> its tied head
    partial = None if path is None else path.with_name(path.stem + ".partial.json")
    table = _read_partial(partial, planned)
    if table:
        log.info("sensitivity resumed: %d of %d sites read from %s", len(table), len(sites), partial)
    chunks = site_chunks(sites, chunk_nbytes)
    if partial is not None and len(chunks) > 1:
        log.info("sensitivity in %d chunks, each kept once measured: an interrupted run resumes from them", len(chunks))
    map_large_allocations()  # each chunk's freed sums go back to the OS (`liftedge.heap`)
    for chunk in chunks:
        if all(s.name in table for s in chunk):
            continue
        # Statistics and Fisher of this chunk's sites only (each site's sums do not depend on
        # which other sites are hooked, so the table equals a one-pass measurement), then freed:
        # memory follows the chunk, not the model.
        linears = [s for s in chunk if s.kind == "linear"]
        # Not cached per chunk: the table is (at 8B the chunks' sums would be tens of GB on disk).
        stats = collect_stats(loaded, tokens, linears, use_cache=False) if linears else {}
        names = {s.name for s in chunk}
        fisher = output_fisher(model, tokens[:fisher_samples], chunk + [s for s in tied_heads if s.tied_to in names])
        for s in progress(chunk, desc="sensitivity", unit="site"):
            if s.kind == "linear":
                errors = site_errors(site_weight(model, s), stats[s.name], fisher[s.name], rates, rows, seed)
            else:
                head = fisher[s.name] if s.kind == "head" else fisher.get(tied.get(s.name))
                errors = table_errors(site_weight(model, s), fisher[s.name] if s.kind == "embedding" else None, head)
            table[s.name] = [Option(name, option_nbytes(s, name), err) for name, err in errors.items()]
        del stats, fisher
        release_memory()
        if partial is not None:
            _write_partial(partial, table)
    result = Sensitivity(table=table, numel={s.name: s.numel for s in sites}, fixed_nbytes=fixed_nbytes(model, sites),
                         meta={"menu": [f"{r.D}/{r.d}" for r in rates], "rows": rows, "fisher_samples": fisher_samples,
                               "tables": list(TABLE_OPTIONS) if tables else [],
                               "seed": seed, "tokens": list(tokens.shape), "source_hash": getattr(loaded, "source_hash", None),
                               "unit": "predicted increase of the next-token loss (nats/token)"})
    if path is not None:
        from liftedge.io import atomic_write_bytes

        atomic_write_bytes(path, result.to_json().encode())
        partial.unlink(missing_ok=True)
    return result


# A measurement of a few-billion-parameter model on CPU takes hours (each chunk is a forward
# and backward pass of the whole model): the sites measured so far are kept beside the cache
# entry, keyed like it, after every chunk, and an interrupted run goes on from there. A site's
# options depend only on the inputs of the key, not on which chunk measured them.


def _write_partial(partial, table: dict[str, list[Option]]) -> None:
    from liftedge.io import atomic_write_bytes

    data = {"format": SENSITIVITY_FORMAT, "table": _table_json(table)}
    atomic_write_bytes(partial, (json.dumps(data) + "\n").encode())


def _read_partial(partial, planned: set[str]) -> dict[str, list[Option]]:
    """The sites a previous run measured (none if there is no such file, or one that cannot
    be read or names a site this model does not plan: it is measured again)."""
    if partial is None or not partial.is_file():
        return {}
    try:
        data = json.loads(partial.read_text())
        if data.get("format") != SENSITIVITY_FORMAT or not set(data["table"]) <= planned:
            raise ValueError("another table")
        return _table_from_json(data["table"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring %s (%s); measuring from the start", partial, exc)
        return {}


def _cache_file(loaded, tokens, sites, rates, rows, fisher_samples, seed):
    source_hash = getattr(loaded, "source_hash", None)
    if not source_hash:
        return None
    tokens_hash = hashlib.sha256(tokens.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()
    from liftedge.calibrate import STATS_FORMAT  # how the sums are kept (bumped with their dtype)

    key = sha256_text(SENSITIVITY_FORMAT, STATS_FORMAT, source_hash, tokens_hash, str(tuple(tokens.shape)),
                      ";".join(s.name for s in sites), ";".join(f"{r.D}/{r.d}" for r in rates),
                      str(rows), str(fisher_samples), str(seed))
    return cache_path("sensitivity", f"{key}.json")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0
