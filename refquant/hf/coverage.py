"""How much of a model's weight a PTQ run quantized: the linear weights (every nn.Linear, lm_head
included) and the expert weights (the 3-D parameters of MoE experts modules), counted in
parameters. A recipe that asks for quantized weights but leaves most of them untouched (experts
refquant cannot place quantizers in, a pattern that matches too little) gets a warning."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from dataclasses_json import DataClassJsonMixin
from torch import nn

from .experts import is_quant_experts

MOSTLY_UNTOUCHED = 0.5  # warn when less than this share of the weight parameters ended quantized


@dataclass
class WeightCoverage(DataClassJsonMixin):
    """Parameters of linear and expert weights, and how many of them ended quantized.

    unquantized: the largest unquantized weights, layer indices collapsed ("model.layers.*.mlp.
    experts.gate_up_proj") -> parameters, the largest first (at most 5)."""

    linear_params: int = 0
    linear_quantized: int = 0
    expert_params: int = 0
    expert_quantized: int = 0
    unquantized: dict[str, int] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return self.linear_params + self.expert_params

    @property
    def quantized(self) -> int:
        return self.linear_quantized + self.expert_quantized

    @property
    def share(self) -> float:
        return self.quantized / self.params if self.params else 0.0

    def text(self) -> str:
        def part(quantized: int, total: int, what: str) -> str:
            share = f"{100 * quantized / total:.1f}%" if total else "-"
            return f"{share} of {what} weight parameters ({quantized:,} of {total:,})"

        text = "quantized: " + part(self.linear_quantized, self.linear_params, "linear")
        if self.expert_params:
            text += ", " + part(self.expert_quantized, self.expert_params, "expert")
        return text


def _is_experts_like(name: str, module: nn.Module) -> bool:
    return hasattr(module, "num_experts") or name.rsplit(".", 1)[-1] in ("experts", "local_experts")


def weight_coverage(model: nn.Module) -> WeightCoverage:
    """Count `model`'s linear and expert weight parameters and the quantized ones among them.

    A linear's weight counts as quantized when its weight quantizer is on; an expert's slice of a
    fused experts weight when that expert's weight quantizer is on (gpt-oss: the whole weight with
    the projection's quantizer). 3-D parameters of other experts-like modules (a `num_experts`
    attribute, or named experts) count as expert weights that stayed unquantized.
    """
    coverage = WeightCoverage()
    unquantized: Counter = Counter()

    def untouched(name: str, params: int) -> None:
        unquantized[re.sub(r"\.\d+(?=\.|$)", ".*", name)] += params

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            params = module.weight.numel()
            quantizer = getattr(module, "weight_quantizer", None)
            coverage.linear_params += params
            if quantizer is not None and quantizer.is_enabled:
                coverage.linear_quantized += params
            else:
                untouched(f"{name}.weight", params)
        elif is_quant_experts(module):
            for projection in module._refquant_layout.projections:
                weight = getattr(module, projection)
                _, quantizers = module.projection_quantizers(projection)
                per_expert = weight.numel() // weight.shape[0]
                enabled = ([q.is_enabled for q in quantizers] if isinstance(quantizers, nn.ModuleList)
                           else [quantizers.is_enabled] * weight.shape[0])
                coverage.expert_params += weight.numel()
                coverage.expert_quantized += per_expert * sum(enabled)
                if not all(enabled):
                    untouched(f"{name}.{projection}", per_expert * enabled.count(False))
        elif _is_experts_like(name, module):
            for parameter_name, parameter in module.named_parameters(recurse=False):
                if parameter.dim() == 3:
                    coverage.expert_params += parameter.numel()
                    untouched(f"{name}.{parameter_name}", parameter.numel())
    coverage.unquantized = dict(unquantized.most_common(5))
    return coverage


def coverage_warning(coverage: WeightCoverage, recipe_name: str) -> str | None:
    """The warning for a recipe that asks for quantized weights when most stayed unquantized."""
    if not coverage.params or coverage.share >= MOSTLY_UNTOUCHED:
        return None
    largest = ", ".join(f"{name} ({params:,})" for name, params in coverage.unquantized.items())
    return (
        f"recipe {recipe_name} asks for quantized weights, but only {100 * coverage.share:.1f}% of the model's "
        f"linear and expert weight parameters ({coverage.quantized:,} of {coverage.params:,}) ended quantized; "
        f"the largest unquantized: {largest}. Check the recipe's patterns against the model's module names "
        "(python3 -m refquant quantize --show-disabled lists every quantizer)."
    )
