"""Quantizers behind one interface, and `quantize_model` that applies one to a model's sites.

`QUANTIZERS` maps a method name ("rtn", "gptq", and the lead's "liftquant") to a
`QuantMethod` (its config class, whether it needs calibration statistics, a builder).
Each method lives in its own module and registers itself with `@register_quantizer`;
importing this package imports them all (`METHOD_MODULES`).

Which sites are quantized: by default every linear site inside a decoder block
(`default_sites`). Embeddings and the output head stay fp16 here (they are stored as ordinary
parameters by `liftedge.packed`); a plan may quantize them to "int" through
`liftedge.quantize.pipeline.quantize_streaming`. A per-site config map (site name -> config) quantizes
exactly the sites it names, each with its own config, which is how a plan assigns rates.

This package owns the methods and the site loop; statistics come from
`liftedge.calibrate`, storage is `liftedge.packed`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Mapping

import torch

from liftedge.progress import progress
from liftedge.quantize.base import (
    QUANTIZERS,
    IntConfig,
    QuantMethod,
    Quantizer,
    config_to_dict,
    get_method,
    make_quantizer,
    output_error,
    register_quantizer,
)
from liftedge.types import QuantizedTensor, Site

log = logging.getLogger(__name__)

# One entry per method module; importing a module registers its quantizer.
METHOD_MODULES = ("rtn", "gptq", "liftquant")
for _name in METHOD_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

from liftedge.quantize.gptq import GPTQConfig  # noqa: E402  (registered above)


def default_sites(model) -> list[Site]:
    """The sites quantized unless told otherwise: linear layers inside decoder blocks."""
    from liftedge.model import list_sites

    return [s for s in list_sites(model) if s.kind == "linear" and s.block is not None and s.tied_to is None]


def _site_configs(model, config: Any | Mapping[str, Any], sites: list[Site] | None) -> list[tuple[Site, Any]]:
    from liftedge.model import list_sites

    if isinstance(config, Mapping):
        by_name = {s.name: s for s in list_sites(model)}
        unknown = sorted(set(config) - set(by_name))
        if unknown:
            raise ValueError(f"config names unknown sites {unknown[:5]}; sites are e.g. {sorted(by_name)[:5]}")
        return [(by_name[name], config[name]) for name in sorted(config, key=list(by_name).index)]
    return [(s, config) for s in (sites if sites is not None else default_sites(model))]


def quantize_model(loaded, method: str, config: Any | Mapping[str, Any], stats: Mapping[str, Any] | None = None,
                   sites: list[Site] | None = None) -> dict[str, QuantizedTensor]:
    """Quantize the chosen sites of `loaded.model` with `method`; the model is not modified.

    `config` is one config for every site, or a map site name -> config (then exactly those
    sites are quantized). `stats` maps site name -> statistics (with `hessian`); required for
    methods that `needs_stats`. Returns site name -> QuantizedTensor, in model order.
    """
    from liftedge.model import site_weight

    entry = get_method(method)
    plan = _site_configs(loaded.model, config, sites)
    quantizers: dict[Any, Quantizer] = {}
    result: dict[str, QuantizedTensor] = {}
    for site, cfg in progress(plan, desc=f"quantize ({method})", total=len(plan), unit="site"):
        quantizer = quantizers.get(cfg) or quantizers.setdefault(cfg, make_quantizer(method, cfg))
        site_stats = None
        if entry.needs_stats:
            site_stats = (stats or {}).get(site.name)
            if site_stats is None:
                raise ValueError(f"method {method!r} needs calibration statistics; none for site {site.name}")
        with torch.no_grad():
            weight = site_weight(loaded.model, site).detach().to(torch.float32)
            result[site.name] = quantizer.quantize(weight, site_stats)
    log.info("quantized %d sites with %s", len(result), method)
    return result


__all__ = ["QUANTIZERS", "METHOD_MODULES", "GPTQConfig", "IntConfig", "QuantMethod", "Quantizer",
           "config_to_dict", "default_sites", "get_method", "make_quantizer", "output_error",
           "quantize_model", "register_quantizer"]
