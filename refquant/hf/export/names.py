"""Checkpoint names as the hub checkpoint spells them: transformers' load-time renames, reversed
the way modelopt 0.47's export reverses them for a quantized state dict
(modelopt/torch/export/quant_aware_conversion.py, called by unified_export_hf.py).

transformers 5 may rename weights when it loads a checkpoint (its conversion mapping): Mixtral's
`block_sparse_moe.experts.{i}.w1/w3/w2` become `mlp.experts.gate_up_proj` / `down_proj`, GraniteMoE's
`input_linear` becomes `experts.gate_up_proj`, and so on. save_pretrained undoes that; modelopt's
export switches transformers' own undo off (it fails on 0-d scales) and applies its own:

  - each reversed WeightRenaming becomes a regex rename of every key (the scales of a layer share
    its prefix, so they follow);
  - each reversed experts converter (one that splits a 3-D tensor back into per-expert weights)
    becomes a rename of the per-expert leaf: modelopt's export already wrote the experts one by
    one as `experts.{i}.gate_proj` / `up_proj` / `down_proj`, which map to the hub's leaves in order
    (Mixtral: w1, w3, w2);
  - the renames run on tensor keys and on hf_quant_config's module names (exclude_modules,
    quantized_layers keys); converter-derived renames first, then the WeightRenamings in reverse
    order; a child model's rename whose target namespace already exists is dropped.

What modelopt cannot reverse (another kind of converter, a scoped converter, a 3-D experts tensor
left unexpanded under a converter) makes it keep the in-memory names for tensors and config alike,
with a warning; refquant does the same. A dense fused weight that modelopt splits back (a converter
of Chunk operations only) is not implemented here and raises.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

# modelopt splits a fused experts weight into these per-expert parts, in this order.
FUSED_EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj")}
_LEAF_SUFFIXES = (".weight", ".weight_scale", ".weight_scale_2", ".weight_scale_inv", ".input_scale", ".bias")
_SENTINEL = ".\x00refquant-module-name"  # appended to module names so container renames match


class Unreversible(Exception):
    """modelopt cannot reverse this conversion: it keeps the in-memory names."""


@dataclass(frozen=True)
class Rename:
    """re.sub(pattern, replacement) on a key; with scope prefixes only under the first that
    matches (stripped before, put back after), as transformers scopes a sub-model's transform."""

    pattern: re.Pattern
    replacement: str
    scope_prefixes: tuple[str, ...] = ()

    def apply(self, key: str) -> str:
        if not self.scope_prefixes:
            return self.pattern.sub(self.replacement, key)
        for prefix in self.scope_prefixes:
            if key.startswith(prefix):
                return prefix + self.pattern.sub(self.replacement, key[len(prefix):])
        return key


@dataclass(frozen=True)
class CheckpointNames:
    """The renames of one model: `tensor(key)` for tensor keys, `module(name)` for config module
    names (prefix wildcards kept); identity when the model has none."""

    renames: tuple[Rename, ...]
    expert_leaves: tuple[str, ...]  # in-memory 3-D experts leaves a converter reverses

    def tensor(self, key: str) -> str:
        for rename in self.renames:
            key = rename.apply(key)
        return key

    def module(self, name: str) -> str:
        base, wildcard = name, ""
        if name.endswith(".*"):
            base, wildcard = name[:-2], ".*"
        elif name.endswith("*"):
            base, wildcard = name[:-1], "*"
        return self.tensor(base + _SENTINEL).removesuffix(_SENTINEL) + wildcard

    def check_expanded(self, keys: list[str], shapes: Callable[[str], int]) -> None:
        """modelopt's guard: under an experts converter, a stacked 3-D experts tensor left in the
        state dict cannot be renamed per expert, so the in-memory names are kept (Unreversible)."""
        if not self.expert_leaves:
            return
        fused = re.compile(r"\.experts\.(?:" + "|".join(map(re.escape, self.expert_leaves)) + r")(?:\.|$)")
        for key in keys:
            if fused.search(key) or (".experts." in key and shapes(key) >= 3):
                raise Unreversible(f"experts not expanded ({key})")


IDENTITY = CheckpointNames((), ())


def checkpoint_names(model: nn.Module, written_per_expert: set[str] = frozenset()) -> CheckpointNames:
    """The renames modelopt applies to `model`'s exported names; IDENTITY when there are none or
    when modelopt would keep the in-memory names (a warning says why, as modelopt's does).
    written_per_expert: the state_dict keys of 3-D experts parameters the export writes expert by
    expert (they are not in the checkpoint under their own names)."""
    try:
        names = _checkpoint_names(model)
        if names.expert_leaves:
            state = model.state_dict()
            remaining = [key for key in state if key not in written_per_expert]
            names.check_expanded(remaining, lambda key: state[key].dim())
        return names
    except Unreversible as reason:
        warnings.warn(
            f"checkpoint names: transformers' conversion mapping of {type(model).__name__} cannot be "
            f"reversed ({reason}); the checkpoint keeps the in-memory names, as modelopt's export does."
        )
        return IDENTITY


def _conversions(model: nn.Module) -> list:
    conversions = getattr(model, "_weight_conversions", None)  # what from_pretrained applied
    if conversions is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
        except ImportError:
            return []
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    return list(conversions or [])


def _checkpoint_names(model: nn.Module) -> CheckpointNames:
    conversions = _conversions(model)
    if not conversions:
        return IDENTITY
    from transformers.core_model_loading import Chunk, SplitModulelist, WeightConverter, WeightRenaming

    renamings: list[Rename] = []
    leaf_renames: list[Rename] = []
    expert_leaves: list[str] = []
    for conversion in conversions:
        reverse = conversion.reverse_transform()
        if isinstance(reverse, WeightRenaming):
            scope = _scope_prefixes(reverse)
            for pattern, replacement in zip(_as_list(reverse.source_patterns), _as_list(reverse.target_patterns)):
                renamings.append(Rename(re.compile(pattern), replacement, scope))
        elif isinstance(reverse, WeightConverter):
            if _scope_prefixes(reverse):
                raise Unreversible(f"a scoped converter (scope {getattr(reverse, 'scope_prefix', None)!r})")
            operations = list(reverse.operations)
            if any(isinstance(op, SplitModulelist) for op in operations):
                leaf_renames += _expert_leaf_renames(reverse)
                expert_leaves.append(_leaf(_as_list(reverse.source_patterns)[0]))
            elif operations and all(isinstance(op, Chunk) for op in operations):
                raise ValueError(
                    f"{type(model).__name__}: transformers fuses {_as_list(reverse.target_patterns)} into "
                    f"{_as_list(reverse.source_patterns)} when it loads this family, and modelopt's export "
                    "splits the quantized tensor back; refquant does not implement that split. Quantize "
                    "another family, or load the model with the fused names as its checkpoint's."
                )
            else:
                raise Unreversible(f"converter operations {[type(op).__name__ for op in operations]}")
        else:
            raise Unreversible(f"conversion {type(reverse).__name__}")
    renamings = _without_shadowed(model, renamings)
    return CheckpointNames(tuple(leaf_renames + renamings[::-1]), tuple(expert_leaves))


def _scope_prefixes(reverse) -> tuple[str, ...]:
    """Where a sub-model's transform applies: "base.scope." then "scope." ("" matches all);
    () for a transform of the root model."""
    scope = getattr(reverse, "scope_prefix", None)
    if scope is None:
        return ()
    scope_dot = f"{scope}." if scope else ""
    base = getattr(reverse, "base_model_prefix", None) or ""
    candidates = [f"{base}." + scope_dot if base else scope_dot, scope_dot]
    return tuple(dict.fromkeys(candidates))


def _without_shadowed(model: nn.Module, renames: list[Rename]) -> list[Rename]:
    """modelopt's _drop_shadowed_prefix_renames: a rename that is not confined to a scope and
    maps some module `a` to an existing module `a.<more>` would capture that namespace too; drop it."""
    names = {name for name, _ in model.named_modules() if name}
    probe = ".\x00refquant-probe"
    kept = []
    for rename in renames:
        if rename.scope_prefixes and all(rename.scope_prefixes):
            kept.append(rename)
            continue
        shadowed = False
        for name in names:
            mapped = rename.pattern.sub(rename.replacement, name + probe)
            if mapped.endswith(probe):
                parent = mapped[: -len(probe)]
                if parent in names and parent.startswith(name + "."):
                    shadowed = True
                    break
        if not shadowed:
            kept.append(rename)
    return kept


def _expert_leaf_renames(reverse) -> list[Rename]:
    source_leaf = _leaf(_as_list(reverse.source_patterns)[0])
    hub_leaves = [_leaf(target) for target in _as_list(reverse.target_patterns)]
    parts = FUSED_EXPERT_PARTS.get(source_leaf, (source_leaf,))
    if len(parts) != len(hub_leaves):
        raise Unreversible(f"experts converter parts {list(parts)} vs hub leaves {hub_leaves}")
    return [Rename(re.compile(rf"(\.experts\.\d+\.){re.escape(part)}\b"), rf"\g<1>{hub}")
            for part, hub in zip(parts, hub_leaves)]


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _leaf(pattern: str) -> str:
    """The leaf module name of a conversion pattern: ".experts.*.w1.weight" -> "w1"."""
    for suffix in _LEAF_SUFFIXES:
        if pattern.endswith(suffix):
            pattern = pattern[: -len(suffix)]
            break
    return pattern.rstrip(".*").rsplit(".", 1)[-1]


def renamed_quant_config(hf_quant_config: dict, names: CheckpointNames) -> dict:
    """hf_quant_config with exclude_modules and quantized_layers' keys renamed (a copy)."""
    if names is IDENTITY:
        return hf_quant_config
    quantization = dict(hf_quant_config["quantization"])
    if quantization.get("exclude_modules"):
        quantization["exclude_modules"] = [names.module(name) for name in quantization["exclude_modules"]]
    if isinstance(quantization.get("quantized_layers"), dict) and quantization["quantized_layers"]:
        quantization["quantized_layers"] = {names.module(k): v for k, v in quantization["quantized_layers"].items()}
    return {**hf_quant_config, "quantization": quantization}

