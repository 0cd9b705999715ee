"""Synthetic packs: a valid pack of a model shape at a given plan, written without quantizing.

Build, export and runtime costs depend only on shapes and the plan's formats, so measuring them
on an 8B shape needs a pack, not hours of LiftQuant. `write_synthetic_pack` writes one directly:
each "liftquant" site gets random signs, the shipped codebook M of its rate, seeded orthogonal
mixing factors (the inverses LiftQuant stores) and scales drawn around the values LiftQuant
finds on weights of RMS 1/sqrt(fan-in); each "int" table gets codes of a rounded Gaussian on
its group grid; every other tensor (fp16 sites, norms, tables kept fp16) is the seeded
heavy-tailed random weight of `liftedge.shapes`. The layer outputs keep unit scale, so the
model runs and verifies like a trained one; its text is meaningless, and quality cannot be
measured on it.

The weights file is streamed tensor by tensor (`liftedge.packed.write_weights_streaming`):
memory stays at the largest single tensor (the embedding table), whatever the model size.
Every tensor's values come from a generator seeded by (seed, tensor name): same model, plan and
seed -> same bytes. The manifest is `liftedge.packed.pack_manifest`'s, its quantizer recorded
as {"method": "synthetic", ...}, so `liftedge build PACK` reads it like any other pack.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from liftedge.errors import LiftedgeError
from liftedge.types import QuantizedTensor

SYNTHETIC_METHOD = "synthetic"
# Spread of the drawn scales (log-normal sigma): LiftQuant's per-row and per-block scales on
# real layers vary by tens of percent around their mean; the exact spread changes no cost.
SCALE_SPREAD = 0.1
# Spread of 1/s1 (the activation-aware input scale), normalised to geometric mean 1 as s1 is.
IN_SCALE_SPREAD = 0.3
# Int tables: a Gaussian over +-3 sigma of the grid, the range RTN's min-max grid spans on such data.
INT_GRID_SIGMAS = 3.0


def model_config(spec: str | os.PathLike):
    """The transformers config of a shape name or of a model folder's config.json (no weights read)."""
    from transformers import AutoConfig

    from liftedge.shapes import is_shape, shape_config

    if is_shape(str(spec)):
        return shape_config(str(spec))
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise LiftedgeError(f"{spec} is neither a known shape name nor a folder holding a config.json")
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if raw.get("auto_map"):
        raise LiftedgeError(f"{folder / 'config.json'} asks for remote code (auto_map); liftedge never runs it")
    return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)


def read_plan(plan) -> tuple[Any, dict[str, Any]]:
    """(Plan, the JSON recorded in the manifest) of a Plan, a PlanResult, their dicts or a plan file."""
    from liftedge.plan import Plan

    if isinstance(plan, (str, os.PathLike)):
        path = Path(plan)
        if not path.is_file():
            raise LiftedgeError(f"plan file {path} not found")
        plan = json.loads(path.read_text(encoding="utf-8"))
    if hasattr(plan, "plan") and hasattr(plan, "to_dict"):  # PlanResult
        return plan.plan, plan.to_dict()
    if isinstance(plan, Plan):
        return plan, {"plan": plan.to_dict()}
    if isinstance(plan, dict):
        inner = plan.get("plan", plan)
        return Plan.from_json(json.dumps(inner)), plan if "plan" in plan else {"plan": plan}
    raise LiftedgeError(f"not a plan: {type(plan).__name__}")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _lognormal(n: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(sigma * torch.randn(n, generator=gen))


def liftquant_spec(out_features: int, in_features: int, rate) -> QuantizedTensor:
    """The "liftquant" tensor of a layer at `rate`, on the meta device (shapes, dtypes, bytes)."""
    from liftedge.targets.reference import get_format
    from liftedge.whiten import kron_factors

    n1, n2 = kron_factors(in_features)
    meta = dict(D=rate.D, d=rate.d, in_features=in_features, out_features=out_features, n1=n1, n2=n2)
    specs = get_format("liftquant").tensor_specs(meta)
    return QuantizedTensor("liftquant", {f: torch.empty(s, dtype=dt, device="meta") for f, (dt, s) in specs.items()},
                           meta)


def int_spec(out_features: int, in_features: int, config) -> QuantizedTensor:
    """The "int" tensor of a table under `config` (IntConfig), on the meta device."""
    from liftedge.targets.reference import get_format

    meta = dict(bits=config.bits, group_size=min(config.group_size, in_features), in_features=in_features,
                out_features=out_features, symmetric=config.symmetric)
    specs = get_format("int").tensor_specs(meta)
    return QuantizedTensor("int", {f: torch.empty(s, dtype=dt, device="meta") for f, (dt, s) in specs.items()}, meta)


def _liftquant_field(field: str, meta: dict, rate, gen: torch.Generator) -> torch.Tensor:
    from liftedge import lattice
    from liftedge.bitpack import packed_row_nbytes
    from liftedge.targets.reference.liftquant import n_blocks
    from liftedge.whiten import orthogonal_factor

    out, n, d, D = meta["out_features"], meta["in_features"], meta["d"], meta["D"]
    nb = n_blocks(n, d)
    if field == "signs":
        width = nb * D
        signs = torch.randint(0, 256, (out, packed_row_nbytes(width, 1)), generator=gen, dtype=torch.uint8)
        if width % 8:  # bits past the row's width stay zero, as pack_signs leaves them
            signs[:, -1] &= (1 << (width % 8)) - 1
        return signs
    codebook = lattice.load_codebook(rate).to(torch.float32)
    if field == "codebook":
        return codebook.half()
    if field == "scale":
        # the lifted code S·M^T has per-entry variance sum_k M_jk^2; the least-squares row scale
        # undoes it so that the whitened row keeps unit RMS
        gain = codebook.pow(2).sum(1).mean().sqrt()
        return (_lognormal(out, SCALE_SPREAD, gen) / gain).half()
    if field == "in_scale":
        s = _lognormal(n, IN_SCALE_SPREAD, gen)
        return (s / torch.exp(torch.log(s).mean())).half()
    if field in ("mix1", "mix2"):
        size = meta["n1"] if field == "mix1" else meta["n2"]
        p, _ = orthogonal_factor(size, gen)
        return p.T.contiguous().half()  # the stored factor is P^-1 = P^T
    if field == "block_scale":
        # 1 / s2 = the RMS of the mixed weight over each block: 1/sqrt(fan-in) for unit-gain layers
        return (_lognormal(nb, SCALE_SPREAD, gen) / math.sqrt(n)).half()
    raise LiftedgeError(f"liftquant has no field {field!r}")


def _int_field(field: str, meta: dict, gen: torch.Generator) -> torch.Tensor:
    from liftedge.bitpack import pack_bits
    from liftedge.targets.reference.integer import n_groups

    bits, out, n = meta["bits"], meta["out_features"], meta["in_features"]
    maxq = (1 << bits) - 1
    ng = n_groups(n, meta["group_size"])
    if field == "scale":
        # the min-max step of a group of weights with RMS 1/sqrt(hidden) spanning +-3 sigma
        step = 2 * INT_GRID_SIGMAS / math.sqrt(n) / maxq
        return (step * _lognormal(out * ng, SCALE_SPREAD, gen)).reshape(out, ng).half()
    if field == "zero":
        return pack_bits(torch.full((out, ng), (maxq + 1) // 2, dtype=torch.uint8), bits)
    if field == "codes":
        rows = max(1, (1 << 22) // max(n, 1))  # ~4M codes at a time: bounded temporaries for any table
        parts = []
        for start in range(0, out, rows):
            z = torch.randn(min(rows, out - start), n, generator=gen)
            codes = torch.round(z * (maxq / (2 * INT_GRID_SIGMAS)) + (maxq + 1) // 2).clamp(0, maxq)
            parts.append(pack_bits(codes.to(torch.uint8), bits))
        return torch.cat(parts)
    raise LiftedgeError(f"int has no field {field!r}")


def _field_shapes(qt: QuantizedTensor) -> dict[str, tuple]:
    return {f: (t.dtype, tuple(t.shape)) for f, t in qt.tensors.items()}


def write_synthetic_pack(model: str | os.PathLike, plan, out: str | os.PathLike, *, seed: int = 0,
                         force: bool = False, real: dict[str, QuantizedTensor] | None = None) -> dict[str, Any]:
    """Write the pack of `model` (a shape name or a folder's config.json) at `plan` (a Plan,
    PlanResult, their JSON dicts or a `liftedge plan -o` file) to `out`; return its manifest.

    Sites the plan keeps at fp16 and every other parameter are the seeded random weights of
    `liftedge.shapes`; quantized sites are synthetic (see the module docstring), except those in
    `real`: tensors a real quantization produced at the plan's format for that site (e.g. the
    first blocks of the shape, quantized on a GPU), stored as given and recorded as such."""
    from liftedge.cache import sha256_file, sha256_text
    from liftedge.io import atomic_output_dir, atomic_write_json
    from liftedge.measure import FP16_OPTION, TABLE_CONFIGS, option_rate
    from liftedge.model import list_sites
    from liftedge.packed import MANIFEST_NAME, WEIGHTS_NAME, pack_manifest, write_weights_streaming
    from liftedge.shapes import _random_tensor, _write_tokenizer, meta_model

    config = model_config(model)
    family = config.model_type
    plan_obj, plan_record = read_plan(plan)
    meta = meta_model(config)
    sites = {s.name: s for s in list_sites(meta)}
    unknown = sorted(c.site for c in plan_obj.choices if c.site not in sites)
    if unknown:
        raise LiftedgeError(f"the plan is for another model: {', '.join(unknown[:3])} is not a layer of {model}")
    qtensors: dict[str, QuantizedTensor] = {}
    rates = {}
    for choice in plan_obj.choices:
        if choice.option == FP16_OPTION:
            continue
        site = sites[choice.site]
        if choice.option in TABLE_CONFIGS:
            qtensors[site.name] = int_spec(site.out_features, site.in_features, TABLE_CONFIGS[choice.option])
        else:
            rates[site.name] = option_rate(choice.option)
            qtensors[site.name] = liftquant_spec(site.out_features, site.in_features, rates[site.name])
    real = dict(real or {})
    for name, qt in real.items():
        spec = qtensors.get(name)
        if spec is None or qt.fmt != spec.fmt or _field_shapes(qt) != _field_shapes(spec) or (
                qt.fmt == "liftquant" and (qt.meta["D"], qt.meta["d"]) != (spec.meta["D"], spec.meta["d"])):
            raise LiftedgeError(f"the real tensors of {name} are not the plan's format for that layer "
                                f"({qt.fmt} {qt.meta} vs {None if spec is None else (spec.fmt, spec.meta)})")
        qtensors[name] = qt
    skip = {f"{name}.weight" for name in qtensors}
    params = {name: torch.empty(p.shape, dtype=torch.float16, device="meta")
              for name, p in meta.named_parameters(remove_duplicate=True) if name not in skip}
    fields = {f"{name}.{f}": (name, f) for name, qt in qtensors.items() for f in qt.tensors}
    tensors = {**{k: qtensors[s].tensors[f] for k, (s, f) in fields.items()}, **params}
    source = f"synthetic:{model if isinstance(model, str) and not Path(model).exists() else Path(model).absolute()}"
    method = {name: qt.fmt if name in real else SYNTHETIC_METHOD for name, qt in qtensors.items()}

    def produce(key: str) -> torch.Tensor:
        gen = _generator(seed, key)
        if key in fields:
            site, field = fields[key]
            qt = qtensors[site]
            if site in real:
                return qt.tensors[field].contiguous()
            if qt.fmt == "int":
                return _int_field(field, qt.meta, gen)
            return _liftquant_field(field, qt.meta, rates[site], gen)
        return _random_tensor(tuple(params[key].shape), key, gen)

    quantizer = {"method": SYNTHETIC_METHOD, "seed": seed,
                 "rates": sorted({f"{r.D}/{r.d}" for r in rates.values()}),
                 "note": "random signs and scales at the plan's formats: bytes and costs are real, quality is not",
                 **({"real_sites": sorted(real)} if real else {})}
    with atomic_output_dir(out, force=force) as tmp:
        config.save_pretrained(tmp)
        _write_tokenizer(tmp, config)
        from transformers import AutoTokenizer

        from liftedge.text import protocol_name

        tokenizer = AutoTokenizer.from_pretrained(str(tmp), trust_remote_code=False)
        spec_hash = sha256_text(source, json.dumps(plan_record, sort_keys=True, default=str), str(seed))
        manifest = pack_manifest(sites, qtensors, tensors, method=method,
                                 source={"path": source, "sha256": spec_hash, "family": family},
                                 protocol=protocol_name(tokenizer), quantizer=quantizer, calibration=None,
                                 plan=plan_record)
        write_weights_streaming(tmp / WEIGHTS_NAME, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()},
                                produce)
        manifest["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def prior_plan(model: str | os.PathLike, *, device: str | None = None, ram: str | None = None,
               lam: float | None = None, bits: float | None = None, runtime: str | None = None):
    """The plan `liftedge plan MODEL --sensitivity prior` makes (a PlanResult), from the config alone."""
    from liftedge.device import load_device
    from liftedge.measure import prior_sensitivity
    from liftedge.memory import ModelDims
    from liftedge.planner import BudgetRequest, make_plan
    from liftedge.shapes import meta_model

    config = model_config(model)
    request = BudgetRequest(device=load_device(device, ram) if device else None, runtime=runtime, lam=lam, bits=bits)
    return make_plan(prior_sensitivity(meta_model(config)), ModelDims.from_config(config), request)
