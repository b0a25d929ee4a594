"""Test support: a seeded tiny model of a transformers family, quantized by modelopt 0.47 and by
refquant in the same process, and everything compared (the approach of scripts/compare_modelopt.py,
whose comparison functions this reuses).

    result = compare_with_modelopt("qwen3_moe", "fp8_default-fp8_kv", tmp_path)
    assert result.ok, result.summary()

The same seeded bf16 model is built twice; both get the same calibration batches; one is quantized
with mtq.quantize (the recipe's modelopt quant_cfg) and exported with export_hf_checkpoint, the
other with rq.quantize_model and rq.export_checkpoint. Compared: every quantizer's name, enabled
flag and amax bits; the logits bit for bit (skipped for NVFP4 recipes on a CPU: modelopt's NVFP4
fake quant is a Triton kernel); every exported tensor's name, dtype, shape and bytes;
hf_quant_config.json and config.json.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from compare_modelopt import (  # noqa: E402  (scripts/compare_modelopt.py)
    calibration_batches,
    compare_exports,
    compare_logits,
    compare_quantizers,
    logits_of,
    modelopt_quant_cfg,
    same_bits,  # for the tests, with the rest
)

VOCAB = 300
# hidden 64, 2 layers, 4 heads of 16 (2 KV heads), 4 experts, top-2: a few seconds per comparison.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
# Per family: the config keys that give 4 experts (top-2) in every layer, and any the family needs.
MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=8),
    "deepseek_v3": dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        head_dim=8, num_key_value_heads=4),  # MLA: RoPE on qk_rope_head_dim, no GQA
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "ernie4_5_moe": dict(moe_intermediate_size=32, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                         moe_layer_start_index=0),
}
FP8_RECIPES = ("fp8_default-fp8_cast_kv", "fp8_default-fp8_kv")
NVFP4_RECIPES = ("nvfp4_default-fp8_cast_kv", "nvfp4_default-nvfp4_cast_kv", "nvfp4_default-fp8_kv", "nvfp4_default-nvfp4_kv")


def family_config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**COMMON, **MOE_FAMILIES[family], **overrides})


def build_model(family: str, *, seed: int = 0, attn_implementation: str = "eager", config=None):
    """The seeded tiny model of `family` (a key of MOE_FAMILIES, or pass `config`), bf16, eval."""
    from transformers import AutoModelForCausalLM

    config = config if config is not None else family_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    return model.eval()


def default_batches(seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(calibration batches, evaluation batch): token ids [2, 16], 2 batches."""
    return calibration_batches(seed, 2, 2, 16), calibration_batches(seed + 1, 1, 2, 16)[0]


@dataclass
class Comparison:
    """What compare_with_modelopt found (each part as scripts/compare_modelopt.py reports it)."""

    family: str
    recipe: str
    quantizers: dict
    logits: Optional[dict]  # None: not compared (NVFP4 on a CPU)
    export: dict
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.quantizers["ok"] and self.export["ok"] and (self.logits is None or self.logits["identical"])

    def row(self) -> str:
        """family | recipe | amax equal a/b | logits | exported tensors equal a/b | configs."""
        q, x = self.quantizers, self.export
        amax = f"{q['compared'] - len(q['amax_mismatch']) - len(q['enabled_mismatch'])}/{q['compared']}"
        if q["only_refquant"] or q["only_modelopt"]:
            amax += f" (+{len(q['only_refquant'])} refquant-only, {len(q['only_modelopt'])} modelopt-only)"
        logits = "n/a (CPU)" if self.logits is None else "identical" if self.logits["identical"] else (
            f"max diff {self.logits['max_abs_diff']:.3g}")
        bad = len(x["mismatched"]) + len(x["only_modelopt"])
        tensors = f"{x['tensors'] - bad}/{x['tensors']}" + (f" (+{len(x['only_refquant'])} refquant-only)" if x["only_refquant"] else "")
        configs = "equal" if x["hf_quant_config_equal"] and not x["config_json_keys_differ"] else (
            f"DIFF hf_quant_config={x['hf_quant_config_equal']} config.json keys {x['config_json_keys_differ']}")
        return f"| {self.family} | {self.recipe} | {amax} | {logits} | {tensors} | {configs} |"

    def summary(self) -> str:
        q, x = self.quantizers, self.export
        parts = [self.row()]
        for key in ("only_refquant", "only_modelopt", "enabled_mismatch", "amax_mismatch"):
            if q[key]:
                parts.append(f"quantizers {key}: {q[key][:6]}")
        for key in ("only_refquant", "only_modelopt", "mismatched"):
            if x[key]:
                parts.append(f"export {key}: {x[key][:6]}")
        if self.logits is not None and not self.logits["identical"]:
            parts.append(f"logits: {self.logits}")
        return "\n".join(parts + self.notes)


@contextmanager
def attention_registry_kept():
    """modelopt's quantized attention puts its sdpa (or other non-eager) function back into
    transformers' ALL_ATTENTION_FUNCTIONS as a local entry after each forward; later code (and
    refquant's tests) expect the registry as it was, so it is restored afterwards."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    saved = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(saved)


def quantize_with_modelopt(model, recipe: str, batches: list[torch.Tensor]) -> None:
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device

    def forward_loop(m):
        for batch in batches:
            m(input_ids=batch.to(device))

    with warnings.catch_warnings(), attention_registry_kept():
        warnings.simplefilter("ignore")
        mtq.quantize(model, modelopt_quant_cfg(recipe), forward_loop)


def export_with_modelopt(model, out_dir: Path) -> None:
    from modelopt.torch.export import export_hf_checkpoint

    model.config.architectures = [type(model).__name__]  # modelopt's export reads it
    with warnings.catch_warnings(), attention_registry_kept():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=out_dir)  # changes the model (packed weights)


def compare_with_modelopt(
    family: str,
    recipe: str,
    workdir: Path,
    *,
    build: Optional[Callable[[], torch.nn.Module]] = None,
    batches: Optional[list[torch.Tensor]] = None,
    eval_batch: Optional[torch.Tensor] = None,
    backend: str = "reference",
    device: str = "cpu",
) -> Comparison:
    """Quantize and export the same seeded model with modelopt and with refquant; compare.

    build: makes the model (default: build_model(family)); it is called twice and must give the
    same weights each time. Logits are compared for FP8 recipes, and for NVFP4 ones on a GPU
    (device "cuda": both models there, refquant with flavor "modelopt-cuda").
    """
    import refquant as rq

    build = build or (lambda: build_model(family))
    if batches is None or eval_batch is None:
        batches, eval_batch = default_batches()
    flavor = "modelopt-cuda" if torch.device(device).type == "cuda" else "modelopt-cpu"
    theirs = build().to(device)
    quantize_with_modelopt(theirs, recipe, batches)
    ours = build().to(device)
    rq.quantize_model(ours, rq.load_recipe(recipe), batches, backend=backend, flavor=flavor, progress=False)

    logits = None
    if "nvfp4" not in recipe or torch.device(device).type == "cuda":
        with attention_registry_kept():
            logits = compare_logits(logits_of(ours, eval_batch), logits_of(theirs, eval_batch))
    quantizers = compare_quantizers(ours, theirs)

    ours_dir, theirs_dir = Path(workdir) / f"{family}-{recipe}-refquant", Path(workdir) / f"{family}-{recipe}-modelopt"
    rq.export_checkpoint(ours, ours_dir)
    export_with_modelopt(theirs, theirs_dir)
    return Comparison(family, recipe, quantizers, logits, compare_exports(ours_dir, theirs_dir))


def main(argv=None) -> int:
    """Every family of MOE_FAMILIES x every shipped recipe against modelopt; prints the table.

        python3 tests/modelopt_compare.py                 # CPU: NVFP4 logits not compared
        python3 tests/modelopt_compare.py --device cuda   # GPU: every recipe's logits too
    """
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=list(MOE_FAMILIES), choices=list(MOE_FAMILIES))
    parser.add_argument("--recipes", nargs="*", default=list(FP8_RECIPES + NVFP4_RECIPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="reference", choices=("reference", "compiled"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"refquant vs modelopt, device {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, "
          f"backend {args.backend}")
    print("| family | recipe | amax equal | logits | exported tensors equal | configs |\n| --- | --- | --- | --- | --- | --- |")
    failed = 0
    with tempfile.TemporaryDirectory() as workdir:
        for family in args.families:
            for recipe in args.recipes:
                result = compare_with_modelopt(family, recipe, Path(workdir), backend=args.backend, device=args.device)
                print(result.row() if result.ok else result.summary(), flush=True)
                failed += not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
