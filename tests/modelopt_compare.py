"""refquant against modelopt 0.47 itself, on tiny seeded models of the common decoder families,
dense and mixture-of-experts.

    result = compare_family("qwen3_moe", "fp8_default-fp8_kv")   # a FamilyComparison
    assert result.ok, result.summary()

For one family and one recipe: the family's model is built once from a tiny config with seeded
weights (bf16) and copied for each tool; both get the same calibration batches; one is quantized
with `rq.quantize_model`, the other with modelopt's `mtq.quantize` (the recipe's quant_cfg, a
forward loop over the batches); then both are compared:

  quantizers  the set of quantizer names, each one's enabled flag and amax (bits and dtype;
              modelopt's constant-amax quantizers count as 448);
  logits      the quantized models' logits on an evaluation batch, bit for bit (not on a CPU for
              NVFP4 recipes: modelopt's NVFP4 fake quant is a Triton kernel);
  export      rq.export_checkpoint against modelopt's export_hf_checkpoint: every tensor's name,
              dtype, shape and bytes, hf_quant_config.json, config.json key by key (its
              quantization_config included).

A family is one entry of FAMILIES: its transformers model class, a tiny config and the attention
implementation; MOE_FAMILIES names those with experts. Families refquant refuses (a module type
modelopt quantizes with rules refquant does not implement) are in UNSUPPORTED_FAMILIES, with the
words the error must contain.

Used by tests/test_modelopt_families.py (the matrix, CPU and CUDA), tests/test_experts.py,
tests/test_placement.py, scripts/compare_families.py (every family and recipe, CPU or GPU, a table
and JSON) and scripts/compare_modelopt.py (the built-in model). Needs nvidia-modelopt 0.47.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

import refquant as rq
from refquant.hf.export import read_checkpoint_tensors

# refquant's recipe names -> modelopt 0.47's (renamed "*-kv_*"); None: not shipped by modelopt,
# built from its units (see modelopt_quant_cfg).
MODELOPT_RECIPES = {
    "fp8_default-fp8_cast_kv": "general/ptq/fp8_default-kv_fp8_cast",
    "nvfp4_default-fp8_cast_kv": "general/ptq/nvfp4_default-kv_fp8_cast",
    "nvfp4_default-nvfp4_cast_kv": "general/ptq/nvfp4_default-kv_nvfp4_cast",
    "fp8_default-fp8_kv": "general/ptq/fp8_default-kv_fp8",
    "nvfp4_default-fp8_kv": "general/ptq/nvfp4_default-kv_fp8",
    "nvfp4_default-nvfp4_kv": None,
}
FP8_RECIPES = ("fp8_default-fp8_cast_kv", "fp8_default-fp8_kv")
NVFP4_RECIPES = ("nvfp4_default-fp8_cast_kv", "nvfp4_default-nvfp4_cast_kv", "nvfp4_default-fp8_kv", "nvfp4_default-nvfp4_kv")
RECIPES = FP8_RECIPES + NVFP4_RECIPES
KV_PATTERN = "*[kv]_bmm_quantizer"
VOCAB = 300  # calibration_batches draws ids 3..258


def modelopt_quant_cfg(recipe: str) -> dict:
    """The quant_cfg modelopt uses for `recipe`. nvfp4_default-nvfp4_kv is the NVFP4 body with the
    calibrated kv_nvfp4 unit in the KV slot: nvfp4_default-kv_nvfp4_cast with its KV entry's cfg
    replaced by the unit's (docs/modelopt_behaviour.md §7.5)."""
    from modelopt.recipe import load_recipe
    from modelopt.torch.opt.config_loader import load_config

    name = MODELOPT_RECIPES[recipe]
    with contextlib.redirect_stdout(io.StringIO()):  # modelopt prints what it loads
        if name is not None:
            return load_recipe(name).quantize.model_dump()
        config = load_recipe("general/ptq/nvfp4_default-kv_nvfp4_cast").quantize.model_dump()
        (unit,) = load_config("configs/ptq/units/kv_nvfp4")
    entries = [e for e in config["quant_cfg"] if e["quantizer_name"] == KV_PATTERN]
    assert len(entries) == 1, entries
    entries[0]["cfg"] = unit.cfg.model_dump()
    assert entries[0]["cfg"]["use_constant_amax"] is False
    return config


def calibration_batches(seed: int, count: int, batch: int, seq: int) -> list[torch.Tensor]:
    """`count` batches of random byte-token ids [batch, seq] (ids 3..258), from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (batch, seq), generator=generator) for _ in range(count)]


def default_batches(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(calibration batches, evaluation batch) of a comparison with model seed `seed`: 2 batches
    and 1 batch of 2 x 16 token ids, drawn from seed + 1 and seed + 2."""
    return calibration_batches(seed + 1, 2, 2, 16), calibration_batches(seed + 2, 1, 2, 16)[0]


# --- the families ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A decoder family as the matrix builds it: `model_class` (a transformers class name) from
    `config_class(**config)`, in `attn_implementation`."""

    model_class: str
    config_class: str
    config: dict
    attn_implementation: str = "sdpa"


# hidden 64, 2 layers, 4 query heads and 2 KV heads of 16 (NVFP4 blocks of 16 along head_dim)
DENSE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
# the same attention, 4 experts with top-2 routing in every layer (unless a family says otherwise)
MOE = dict(DENSE, intermediate_size=64, head_dim=16)
# MLA: RoPE on qk_rope_head_dim; it expands the latent into one K and V per query head, so
# num_key_value_heads must equal num_attention_heads (with fewer, the attention repeats the
# expanded heads again and fails)
MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, head_dim=8,
           num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
           topk_group=1, moe_intermediate_size=32)

DENSE_FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "LlamaConfig", dict(DENSE, head_dim=16)),
    "mistral": Family("MistralForCausalLM", "MistralConfig", dict(DENSE, head_dim=16, sliding_window=8)),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", dict(DENSE)),
    # lm_head tied to a plain nn.Embedding (both get quantizers, both are excluded)
    "qwen2_tied": Family("Qwen2ForCausalLM", "Qwen2Config", dict(DENSE, tie_word_embeddings=True)),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3Config", dict(DENSE, head_dim=16)),
    "phi3": Family("Phi3ForCausalLM", "Phi3Config", dict(DENSE, pad_token_id=0)),
    "gemma": Family("GemmaForCausalLM", "GemmaConfig", dict(DENSE, head_dim=16)),
    # eager: Gemma2's attention logit softcapping
    "gemma2": Family("Gemma2ForCausalLM", "Gemma2Config", dict(DENSE, head_dim=16, **SLIDING), "eager"),
    "gemma3": Family("Gemma3ForCausalLM", "Gemma3TextConfig", dict(DENSE, head_dim=16, **SLIDING)),
    "granite": Family("GraniteForCausalLM", "GraniteConfig", dict(
        DENSE, embedding_multiplier=12.0, attention_multiplier=0.25, residual_multiplier=0.22, logits_scaling=8.0)),
    "olmo2": Family("Olmo2ForCausalLM", "Olmo2Config", dict(DENSE, pad_token_id=0)),
    # nn.LayerNorm, whose input modelopt quantizes (refquant.hf.placement)
    "phi": Family("PhiForCausalLM", "PhiConfig", dict(DENSE)),
    "starcoder2": Family("Starcoder2ForCausalLM", "Starcoder2Config", dict(DENSE)),
    # nn.LayerNorm, and a learned position embedding that subclasses nn.Embedding with its own forward
    "opt": Family("OPTForCausalLM", "OPTConfig", dict(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64)),
    # transformers' Conv1D (weight [in, out]), which modelopt turns into an nn.Linear; nn.LayerNorm
    "gpt2": Family("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    # nn.LayerNorm; the checkpoint names its head `embed_out` (transformers' rename, reversed)
    "gpt_neox": Family("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128)),
    # MLA, every layer dense (first_k_dense_replace = num_hidden_layers): no experts
    "deepseek_v3_dense": Family("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(DENSE, **MLA, first_k_dense_replace=2)),
}

# Eager attention for the MoE families; their experts run in transformers' eager loop once quantized.
MOE_FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        MOE, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2), "eager"),
    # top-4 of 8: a token's output sums four experts, so the order of the sum shows in the bits
    "qwen3_moe_top4": Family("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        MOE, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=4), "eager"),
    # a shared expert with its sigmoid shared_expert_gate (an nn.Linear)
    "qwen2_moe": Family("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        MOE, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2), "eager"),
    # checkpoint names block_sparse_moe.experts.{i}.w1/w2/w3 (transformers' renames, reversed)
    "mixtral": Family("MixtralForCausalLM", "MixtralConfig", dict(MOE, num_local_experts=4, num_experts_per_tok=2), "eager"),
    "olmoe": Family("OlmoeForCausalLM", "OlmoeConfig", dict(MOE, num_experts=4, num_experts_per_tok=2), "eager"),
    # transposed experts (x @ W[i] + b[i]), one quantizer per projection for all experts
    "gpt_oss": Family("GptOssForCausalLM", "GptOssConfig", dict(
        MOE, num_local_experts=4, num_experts_per_tok=2, **SLIDING), "eager"),
    # MLA; one dense layer, then one MoE layer with a shared expert
    "deepseek_v3": Family("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(MOE, **MLA, first_k_dense_replace=1), "eager"),
    "granitemoe": Family("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(MOE, num_local_experts=4, num_experts_per_tok=2), "eager"),
    "ernie4_5_moe": Family("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeConfig", dict(
        MOE, moe_intermediate_size=32, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0), "eager"),
}
FAMILIES: dict[str, Family] = {**DENSE_FAMILIES, **MOE_FAMILIES}

# Families refquant refuses, with the words its error must contain.
UNSUPPORTED_FAMILIES: dict[str, tuple[Family, tuple[str, ...]]] = {
    # modelopt rewrites FalconAttention's source (its attention does not go through transformers'
    # attention interface)
    "falcon": (
        Family("FalconForCausalLM", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
        ("FalconAttention", "cannot place K/V quantizers"),
    ),
    # experts modelopt quantizes with wrappers of its own (Llama4TextExperts, DbrxFFN)
    "llama4": (
        Family("Llama4ForCausalLM", "Llama4TextConfig", dict(
            MOE, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64, interleave_moe_layer_step=1)),
        ("Llama4TextExperts", "Llama 4", "would be left unquantized"),
    ),
    "dbrx": (
        Family("DbrxForCausalLM", "DbrxConfig", dict(
            vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0), ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2))),
        ("DbrxFFN", "DBRX", "would be left unquantized"),
    ),
}


def _family(name: str) -> Family:
    if name in FAMILIES:
        return FAMILIES[name]
    if name in UNSUPPORTED_FAMILIES:
        return UNSUPPORTED_FAMILIES[name][0]
    raise ValueError(f"unknown family {name!r}; the families are {', '.join(FAMILIES)} (and, refused, {', '.join(UNSUPPORTED_FAMILIES)})")


def seeded_model(family: Family, seed: int = 0):
    """A new model of `family` with weights drawn by transformers' own initializer under
    torch.manual_seed(seed), in bf16 and eval mode, on the CPU (the caller's random state is left
    as it was)."""
    import transformers

    config = getattr(transformers, family.config_class)(**family.config)
    config._attn_implementation = family.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, family.model_class)(config)
    model = model.to(torch.bfloat16).eval()
    model.config.architectures = [family.model_class]  # modelopt's export reads it
    return model


@lru_cache(maxsize=48)
def _seeded_model(name: str, seed: int):
    return seeded_model(_family(name), seed)


def build_model(name: str, seed: int = 0, device: str = "cpu"):
    """A fresh copy of family `name`'s tiny model with weights drawn by transformers' own
    initializer under torch.manual_seed(seed), in bf16 and eval mode, on `device`. The seeded
    model is built once and copied (the caller's random state is left as it was)."""
    return copy.deepcopy(_seeded_model(name, seed)).to(device)


def never_route_to_expert_3(family: str):
    """The family's seeded model, with expert 3 of every MoE layer out of the routers' reach
    (a -1e4 selection bias: DeepSeek-V3's e_score_correction_bias, gpt-oss's router bias)."""
    model = build_model(family)
    with torch.no_grad():
        for layer in model.model.layers:
            if family == "deepseek_v3" and hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias[3] = -1e4
            elif family == "gpt_oss":
                layer.mlp.router.bias[3] = -1e4
    return model


# --- comparing ------------------------------------------------------------------------------------
def quantizer_table(model) -> dict:
    """{quantizer name: (enabled, amax on the CPU or None)} for refquant's and modelopt's quantizers."""
    from modelopt.torch.quantization.nn import TensorQuantizer as ModeloptQuantizer

    table = {}
    for name, module in model.named_modules():
        if isinstance(module, (rq.TensorQuantizer, ModeloptQuantizer)):
            if getattr(module, "_use_constant_amax", False):
                amax = torch.tensor(448.0)  # modelopt's _get_amax; its .amax property is None
            else:
                amax = module.amax if module.is_enabled else getattr(module, "_amax", None)
            table[name] = (bool(module.is_enabled), None if amax is None else amax.detach().cpu())
    return table


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_bytes(a), _bytes(b))


def compare_quantizers(rq_model, mo_model) -> dict:
    """Names only one side has, enabled flags and amaxes that differ; "ok" when none do."""
    ours, theirs = quantizer_table(rq_model), quantizer_table(mo_model)
    result = {
        "only_refquant": sorted(set(ours) - set(theirs)),
        "only_modelopt": sorted(set(theirs) - set(ours)),
        "enabled_mismatch": [],
        "amax_mismatch": [],
    }
    for name in sorted(set(ours) & set(theirs)):
        (on_a, amax_a), (on_b, amax_b) = ours[name], theirs[name]
        if on_a != on_b:
            result["enabled_mismatch"].append(name)
        if on_a and on_b and not (amax_a is None and amax_b is None):
            if amax_a is None or amax_b is None or not same_bits(amax_a, amax_b):
                result["amax_mismatch"].append(f"{name}: refquant {amax_a} vs modelopt {amax_b}")
    result["compared"] = len(set(ours) & set(theirs))
    result["enabled"] = sum(on for on, _ in ours.values())
    both_enabled = [n for n in set(ours) & set(theirs) if ours[n][0] and theirs[n][0]]
    result["amax_compared"] = len(both_enabled)
    result["expert_amax_compared"] = sum(".experts." in n for n in both_enabled)
    result["ok"] = not any(result[k] for k in ("only_refquant", "only_modelopt", "enabled_mismatch", "amax_mismatch"))
    return result


def logits_of(model, batch) -> torch.Tensor:
    """The model's logits on `batch` (input ids), as fp32 on the CPU."""
    with torch.no_grad():
        return model(input_ids=batch.to(next(model.parameters()).device)).logits.detach().float().cpu()


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    differ = a != b
    return {
        "identical": bool(not differ.any()),
        "elements": a.numel(),
        "differing": int(differ.sum()),
        "max_abs_diff": float((a - b).abs().max()),
    }


def compare_fake_quant_ops(rq_model, mo_model, batch) -> dict:
    """Each enabled quantizer of both models applied to the same tensor (what refquant's quantizer
    received in one forward): elements that differ, weights and activations apart. Separates
    per-operation differences from their spread through the network."""
    ours = {n: q for n, q in rq_model.named_modules() if isinstance(q, rq.TensorQuantizer) and q.is_enabled}
    theirs = dict(mo_model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args) -> None:  # returns None: the quantizer's input stays as it was
            if name not in captured:  # a quantizer called more than once (an experts' shared input): its first input
                captured[name] = args[0].detach().clone()

        return hook

    hooks = [q.register_forward_pre_hook(capture(name)) for name, q in ours.items()]
    try:
        logits_of(rq_model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    totals = {"weights": [0, 0], "activations": [0, 0]}
    worst: list[tuple[int, str]] = []
    with torch.no_grad():
        for name, x in captured.items():
            a, b = ours[name](x), theirs[name](x)
            differing = int((a != b).sum())
            kind = "weights" if "weight_quantizer" in name else "activations"
            totals[kind][0] += differing
            totals[kind][1] += x.numel()
            if differing:
                worst.append((differing, name))
    return {
        "weight_elements_differing": totals["weights"][0],
        "weight_elements": totals["weights"][1],
        "activation_elements_differing": totals["activations"][0],
        "activation_elements": totals["activations"][1],
        "quantizers_with_differences": [f"{name}: {count}" for count, name in sorted(worst, reverse=True)[:8]],
    }


def compare_exports(ours: Path, theirs: Path) -> dict:
    """Two checkpoint folders: tensors by name (dtype, shape, bytes), hf_quant_config.json, and
    config.json key by key."""
    a, b = read_checkpoint_tensors(ours), read_checkpoint_tensors(theirs)
    mismatched = []
    for key in sorted(set(a) & set(b)):
        if not same_bits(a[key], b[key]):
            differing = None
            if a[key].shape == b[key].shape and a[key].dtype == b[key].dtype:
                differing = int((_bytes(a[key]) != _bytes(b[key])).sum())
            mismatched.append(
                f"{key}: refquant {a[key].dtype}{tuple(a[key].shape)} vs modelopt {b[key].dtype}{tuple(b[key].shape)}"
                + (f", {differing} bytes differ" if differing is not None else "")
            )
    hf_a, hf_b = (json.loads((d / "hf_quant_config.json").read_text()) for d in (ours, theirs))
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    config_diff = sorted(k for k in set(config_a) | set(config_b) if config_a.get(k) != config_b.get(k))
    result = {
        "tensors": len(b),
        "only_refquant": sorted(set(a) - set(b)),
        "only_modelopt": sorted(set(b) - set(a)),
        "mismatched": mismatched,
        "equal": len(set(a) & set(b)) - len(mismatched),
        "weight_scales": sum(key.endswith("weight_scale") for key in b),
        "expert_weight_scales": sum(key.endswith("weight_scale") and ".experts." in key for key in b),
        "hf_quant_config_equal": hf_a == hf_b,
        "hf_quant_config": {"refquant": hf_a, "modelopt": hf_b} if hf_a != hf_b else None,
        "config_json_keys_differ": config_diff,
        "files_refquant": sorted(p.name for p in ours.iterdir()),
        "files_modelopt": sorted(p.name for p in theirs.iterdir()),
    }
    result["ok"] = not (result["only_refquant"] or result["only_modelopt"] or mismatched or config_diff) and result["hf_quant_config_equal"]
    return result


@contextlib.contextmanager
def attention_registry_kept():
    """Within the block modelopt may run forwards; on exit transformers' ALL_ATTENTION_FUNCTIONS is
    as it was. modelopt's _QuantAttention.forward restores the attention function it swapped by
    writing it back into the registry, which leaves a local entry ("sdpa") for the rest of the
    process (refquant's own swap removes it, and refquant's tests expect the registry as it was)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    saved = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(saved)


def _modelopt_quiet():
    """modelopt's prints and warnings swallowed, the attention registry kept."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(attention_registry_kept())
    return stack


def quantize_with_modelopt(model, recipe: str, batches: list[torch.Tensor]) -> None:
    """mtq.quantize(model, the recipe's quant_cfg, a forward loop over `batches`), in place."""
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device

    def forward_loop(model):
        for batch in batches:
            model(input_ids=batch.to(device))

    with _modelopt_quiet():
        mtq.quantize(model, modelopt_quant_cfg(recipe), forward_loop)


def export_with_modelopt(model, folder: Path) -> None:
    """modelopt's export_hf_checkpoint (it changes the model: fused amaxes, packed weights)."""
    from modelopt.torch.export import export_hf_checkpoint

    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]  # modelopt's export reads it
    with _modelopt_quiet():
        export_hf_checkpoint(model, export_dir=folder)


@dataclass
class FamilyComparison:
    """One family under one recipe, refquant against modelopt. logits is None where not compared
    (logits_skipped says why); ok: every compared part is equal."""

    family: str
    recipe: str
    device: str
    flavor: str
    backend: str
    quantizers: dict
    export: dict
    logits: Optional[dict] = None
    logits_skipped: Optional[str] = None
    fake_quant_ops: Optional[dict] = None
    seconds: float = 0.0
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        self.ok = self.quantizers["ok"] and self.export["ok"] and (self.logits is None or self.logits["identical"])

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self) -> dict:
        """The matrix cells: amax equal a/b, logits, export tensors equal a/b, configs equal."""
        q, x, lg = self.quantizers, self.export, self.logits
        amax_equal = q["amax_compared"] - len(q["amax_mismatch"])
        return {
            "family": self.family,
            "recipe": self.recipe,
            "quantizers": "same" if q["ok"] else "DIFF",
            "amax_equal": f"{amax_equal}/{q['amax_compared']}",
            "logits": "n/a" if lg is None else "identical" if lg["identical"] else f"max diff {lg['max_abs_diff']:.4g}",
            "tensors_equal": f"{x['equal']}/{x['tensors']}",
            "configs_equal": x["hf_quant_config_equal"] and not x["config_json_keys_differ"],
            "seconds": self.seconds,
            "ok": self.ok,
        }

    def summary(self) -> str:
        """What differs, as text (empty lists left out)."""
        lines = [f"{self.family} / {self.recipe} ({self.device}, {self.backend}): {'equal' if self.ok else 'DIFFERENT'}"]
        for part, details in (("quantizers", self.quantizers), ("export", self.export)):
            for key, value in details.items():
                if isinstance(value, list) and value and key not in ("files_refquant", "files_modelopt"):
                    lines.append(f"  {part}.{key}: {value[:6]}{' ...' if len(value) > 6 else ''}")
        if self.export.get("hf_quant_config"):
            lines.append(f"  export.hf_quant_config: {self.export['hf_quant_config']}")
        if self.logits is not None and not self.logits["identical"]:
            lines.append(f"  logits: {self.logits}")
        return "\n".join(lines)


def compare_family(
    family: str,
    recipe: str,
    *,
    device: str = "cpu",
    backend: str = "reference",
    seed: int = 0,
    batches: Optional[list[torch.Tensor]] = None,
    eval_batch: Optional[torch.Tensor] = None,
    build: Optional[Callable[[], torch.nn.Module]] = None,
    workdir: Optional[Path] = None,
    fake_quant_ops: bool = False,
) -> FamilyComparison:
    """Quantize and export family `family` with `recipe` by refquant and by modelopt, and compare
    (see the module docstring).

    refquant's flavor follows the device ("modelopt-cpu" on a CPU, "modelopt-cuda" on a GPU);
    `backend` is refquant's ("reference" or "compiled"). Default batches: default_batches(seed).
    build: makes the model instead of build_model(family, seed); called twice, it must give the
    same weights each time. workdir: the two checkpoints are kept there as
    `{family}-{recipe}-refquant` and `-modelopt` (default: a temporary folder, removed).
    fake_quant_ops: also apply both models' quantizers to the same tensors (compare_fake_quant_ops),
    where logits are compared."""
    started = time.perf_counter()
    torch_device = torch.device(device)
    flavor = "modelopt-cuda" if torch_device.type == "cuda" else "modelopt-cpu"
    default_calibration, default_eval = default_batches(seed)
    batches = default_calibration if batches is None else batches
    eval_batch = default_eval if eval_batch is None else eval_batch
    build = build or (lambda: build_model(family, seed))

    with attention_registry_kept(), contextlib.ExitStack() as stack:
        folder = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        rq_model = build().to(device)
        rq.quantize_model(rq_model, rq.load_recipe(recipe), batches, backend=backend, flavor=flavor, progress=False)
        mo_model = build().to(device)
        quantize_with_modelopt(mo_model, recipe, batches)
        logits = ops = skipped = None
        if torch_device.type == "cpu" and "nvfp4" in recipe:
            skipped = "modelopt's NVFP4 fake quant needs a GPU"
        else:
            logits = compare_logits(logits_of(rq_model, eval_batch), logits_of(mo_model, eval_batch))
            if fake_quant_ops:
                ops = compare_fake_quant_ops(rq_model, mo_model, eval_batch)
        quantizers = compare_quantizers(rq_model, mo_model)

        ours, theirs = folder / f"{family}-{recipe}-refquant", folder / f"{family}-{recipe}-modelopt"
        rq.export_checkpoint(rq_model, ours)
        export_with_modelopt(mo_model, theirs)
        export = compare_exports(ours, theirs)
    return FamilyComparison(family, recipe, device, flavor, backend, quantizers, export, logits, skipped, ops,
                            round(time.perf_counter() - started, 2))


def refusal_of(family: str, recipe: str) -> Optional[str]:
    """The ValueError text rq.quantize_model raises for an unsupported family (None: no error)."""
    model = build_model(family)
    try:
        rq.quantize_model(model, rq.load_recipe(recipe), calibration_batches(1, 1, 1, 8), progress=False)
    except ValueError as error:
        return str(error)
    return None


def matrix_table(results: list[FamilyComparison]) -> str:
    """The matrix as a markdown table, one row per family and recipe."""
    lines = ["| family | recipe | quantizers | amax equal | logits | tensors equal | configs | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        r = result.row()
        lines.append(
            f"| {r['family']} | {r['recipe']} | {r['quantizers']} | {r['amax_equal']} | {r['logits']} | "
            f"{r['tensors_equal']} | {'same' if r['configs_equal'] else 'DIFF'} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)
