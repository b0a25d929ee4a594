"""Which parts of a quantized model cost the most: the model with one unit quantized at a time.

    report = quantize_model(model, recipe, calib_batches, eval_batch=batch)
    report.sensitivity = measure_sensitivity(model, batch, granularity="block")
    print(report.sensitivity_table())      # ranking, and recipe rules that keep the worst unquantized

A unit is a decoder block ("model.layers.3": every enabled quantizer under it) or, with
granularity "layer", one module's quantizers ("model.layers.3.mlp.down_proj": its input and
weight quantizers; "model.layers.3.self_attn": its K/V quantizers). For each unit, only that
unit's enabled quantizers stay on, with their calibrated amax, and the evaluation batch runs once;
its logits are compared with the original model's (every quantizer off, which is the original bit
for bit). One forward per unit and no copy of the model, so it scales to a 7B model on one GPU.
Every quantizer's config is restored afterwards, also on an error.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from torch import nn

from ..quant.quantizer import all_quantizers_off, named_quantizers, refuse_folded
from ..quant.recipe import QuantRule, rule_matches
from .quality import eval_logits, perplexity, quality_report
from .report import SensitivityReport, SensitivityRow

GRANULARITIES = ("block", "layer")
_INDEX = re.compile(r"^(.*?\.\d+)\.")  # the name up to its first numeric component: a block


def sensitivity_units(model: nn.Module, granularity: str = "block") -> dict[str, list[str]]:
    """{unit: names of its enabled quantizers}, in module order.

    "block": quantizers under the same first indexed module ("model.layers.3"); one that is under
    none (lm_head) forms a unit with its module's other quantizers. "layer": the quantizers of one
    module (a linear's input/weight/output quantizers; an attention's K/V quantizers).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not known; use 'block' (decoder blocks) or 'layer' (single layers).")
    units: dict[str, list[str]] = {}
    for name, quantizer in named_quantizers(model):
        if not quantizer.is_enabled:
            continue
        parent = name.rpartition(".")[0]
        block = _INDEX.match(name)
        unit = block.group(1) if granularity == "block" and block else parent
        units.setdefault(unit or "(model)", []).append(name)
    return units


def _glob_escape(name: str) -> str:
    """`name` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def unit_patterns(unit: str, members: list[str], enabled: list[str]) -> list[str]:
    """Recipe quantizer_name globs that, among the `enabled` quantizers, match exactly `members`:
    "UNIT.*" when it does, else each member's own name."""
    candidate = f"{_glob_escape(unit)}.*"
    rule = QuantRule(quantizer_name=candidate, enable=False)
    if {name for name in enabled if rule_matches(rule, name, None)} == set(members):
        return [candidate]
    return [_glob_escape(name) for name in members]


@contextmanager
def only_quantizers_on(model: nn.Module, names: set[str]) -> Iterator[None]:
    """Within the block only the quantizers named (if enabled) are on; on exit each quantizer gets
    back the exact config object it had (its amax is never touched)."""
    saved = [(name, quantizer, quantizer.config) for name, quantizer in named_quantizers(model)]
    try:
        for name, quantizer, config in saved:
            if config.enable and name not in names:
                quantizer.set_enabled(False)
        yield
    finally:
        for _, quantizer, config in saved:
            quantizer.config = config


def default_keep(units: int) -> int:
    """How many of the most costly units the suggestion keeps unquantized: a quarter, 1 to 3."""
    return max(1, min(3, math.ceil(units / 4)))


def suggest_rules(rows: list[SensitivityRow], keep: int, granularity: str) -> str:
    """quant_cfg items (TOML inline tables, one per line) with `enable = false` on the `keep` first
    rows' patterns, to paste as the last items of a recipe's quant_cfg array (a later rule wins)."""
    if keep <= 0:
        return ""
    lines = [f"    # refquant --sensitivity {granularity}: the {keep} most costly of {len(rows)} units stay unquantized"]
    for row in rows[:keep]:
        alone = f"alone: mean |logit error| {row.mean_abs_logit_error:.4g}"
        if row.perplexity is not None:
            alone += f", perplexity {row.perplexity:.4g}"
        for pattern in row.patterns:
            lines.append(f'    {{ quantizer_name = "{pattern}", enable = false }},  # {row.unit} {alone}')
    return "\n".join(lines)


def measure_sensitivity(
    model: nn.Module,
    eval_batch: Any,
    *,
    granularity: str = "block",
    keep: Optional[int] = None,
    progress: bool = True,
) -> SensitivityReport:
    """Quantize one unit at a time (sensitivity_units) on a calibrated `model` and compare its
    logits on `eval_batch` with the original's. Rows come sorted by mean absolute logit error, the
    largest first; `keep` (default: default_keep) of them go into the suggested recipe rules.
    Raises ValueError when no quantizer is enabled or `keep` is out of range."""
    refuse_folded(named_quantizers(model), "measure the sensitivity")  # its original logits need the master weights
    started = time.perf_counter()
    units = sensitivity_units(model, granularity)
    if not units:
        raise ValueError(
            f"no enabled quantizer in {type(model).__name__}: quantize it first "
            "(rq.quantize_model(model, recipe, calib_batches)), then measure the sensitivity."
        )
    if keep is None:
        keep = default_keep(len(units))
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= len(units):
        raise ValueError(f"keep={keep!r} must be an int from 0 to the number of units ({len(units)}).")
    enabled = [name for members in units.values() for name in members]
    with all_quantizers_off(model):
        original = eval_logits(model, eval_batch)
    iterator = units.items()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"sensitivity ({granularity})", unit=granularity, total=len(units), leave=False)
    rows = []
    for unit, members in iterator:
        with only_quantizers_on(model, set(members)):
            quality = quality_report(original, eval_logits(model, eval_batch), eval_batch)
        rows.append(SensitivityRow(
            unit=unit,
            patterns=unit_patterns(unit, members, enabled),
            quantizers=len(members),
            max_abs_logit_error=quality.max_abs_logit_error,
            mean_abs_logit_error=quality.mean_abs_logit_error,
            top1_agreement=quality.top1_agreement,
            perplexity=quality.perplexity_quantized,
        ))
    rows.sort(key=lambda row: -row.mean_abs_logit_error)
    return SensitivityReport(
        granularity=granularity,
        rows=rows,
        perplexity_original=perplexity(original, eval_batch),
        keep=keep,
        suggested_rules=suggest_rules(rows, keep, granularity),
        seconds=round(time.perf_counter() - started, 3),
    )
