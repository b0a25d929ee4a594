"""A model that accelerate spreads over devices quantizes exactly as the plain model (refquant.hf.dispatch).

accelerate replaces `module.forward` on the modules it hooks; insert_quantizers changes their class,
so without care the hooks would call the old forward and bypass the quantizers (only the weight
amaxes would agree). With one device we cannot split a model, but accelerate puts the same hooks on
the CPU: per-block hooks as dispatch_model over several GPUs attaches them, dispatch_model with a
disk offload, cpu_offload, hooks attached after the quantizers, hooks removed again. Each must give
the plain model's amaxes, logits and exported bytes; what cannot work must say why. The same for
MoE models (Qwen3-MoE's fused experts, gpt-oss's transposed ones), whose experts module holds its
3-D weights itself and counts the tokens each expert receives: the counts and the report's experts
without tokens must be the plain model's too.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import refquant as rq
from refquant.quant.quantizer import named_quantizers

accelerate = pytest.importorskip("accelerate")
from accelerate import cpu_offload, dispatch_model  # noqa: E402
from accelerate.hooks import ModelHook, add_hook_to_module, attach_align_device_hook_on_blocks, remove_hook_from_module  # noqa: E402
from conftest import expert_token_counts, folder_files, tiny_llama, tiny_moe, tiny_qwen3_moe

RECIPES = ("fp8_default-fp8_kv", "nvfp4_default-nvfp4_kv")  # calibrated K/V: the attention hook matters
BLOCKS = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head")
MOE = ("qwen3_moe", "gpt_oss")  # fused experts; transposed ones, expert 3 of each layer without tokens
MODELS = {"llama": tiny_llama, **{family: partial(tiny_moe, family) for family in MOE}}
HOWS = ("blocks", "dispatch", "dispatch-disk", "cpu_offload", "hooks-after-insert", "hooks-removed")
# for MoE: the hooks of a split over GPUs, disk and CPU offload, hooks attached after insertion
MOE_HOWS = ("blocks", "dispatch-disk", "cpu_offload", "hooks-after-insert")


def batches(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=generator) for _ in range(count)]


EVAL = batches(1, seed=7)[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=EVAL).logits


def spread(model: nn.Module, how: str, tmp_path) -> nn.Module:
    """Put accelerate's hooks on `model` as `how` says; returns it."""
    if how == "blocks":  # what dispatch_model over several GPUs attaches: a hook on every submodule with tensors
        attach_align_device_hook_on_blocks(
            model, execution_device={name: torch.device("cpu") for name in BLOCKS},
            offload={name: False for name in BLOCKS}, module_name="",
        )
    elif how == "dispatch":
        dispatch_model(model, {name: "cpu" for name in BLOCKS}, force_hooks=True)
    elif how == "dispatch-disk":  # layer 1 and lm_head offloaded: weights on meta, loaded by their hooks
        device_map = {name: "disk" if name in ("model.layers.1", "lm_head") else "cpu" for name in BLOCKS}
        dispatch_model(model, device_map, offload_dir=str(tmp_path / "offload"))
    elif how == "cpu_offload":  # every weight on meta
        cpu_offload(model, execution_device=torch.device("cpu"))
    elif how == "hooks-after-insert":
        rq.insert_quantizers(model)
        dispatch_model(model, {name: "cpu" for name in BLOCKS}, force_hooks=True)
    elif how == "hooks-removed":  # remove_hook_from_module leaves the old bound forward on the instance
        dispatch_model(model, {name: "cpu" for name in BLOCKS}, force_hooks=True)
        remove_hook_from_module(model, recurse=True)
    else:
        raise AssertionError(how)
    return model


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(model, recipe) -> what the plain model quantized with that recipe gives: amaxes, logits,
    exported files, expert token counts and the report's experts without tokens (computed once)."""
    results = {}

    def result(model_name: str, recipe: str) -> tuple:
        if (model_name, recipe) not in results:
            model = MODELS[model_name]()
            report = rq.quantize_model(model, rq.load_recipe(recipe), batches(), progress=False)
            folder = rq.export_checkpoint(model, tmp_path_factory.mktemp("plain") / recipe)
            results[model_name, recipe] = ({n: q.amax for n, q in named_quantizers(model) if q.is_enabled}, logits(model),
                                           folder_files(folder), expert_token_counts(model), report.experts_without_tokens)
        return results[model_name, recipe]

    return result


@pytest.mark.parametrize("model_name, how", [("llama", how) for how in HOWS]
                         + [(family, how) for family in MOE for how in MOE_HOWS])
@pytest.mark.parametrize("recipe", RECIPES)
def test_hooked_model_gives_the_plain_models_amax_logits_checkpoint_bytes_and_expert_counts(plain, model_name, recipe, how, tmp_path):
    amaxes, expected_logits, expected_files, token_counts, without_tokens = plain(model_name, recipe)
    model = spread(MODELS[model_name](), how, tmp_path)
    report = rq.quantize_model(model, rq.load_recipe(recipe), batches(), progress=False)

    quantizers = dict(named_quantizers(model))
    assert [n for n, q in quantizers.items() if q.is_enabled] == list(amaxes)
    for name, amax in amaxes.items():
        got = quantizers[name].amax
        assert got is not None, f"{name}: no amax (its forward was bypassed)"
        assert got.dtype == amax.dtype and torch.equal(bits(got), bits(amax)), name
    assert torch.equal(bits(logits(model)), bits(expected_logits))
    assert expert_token_counts(model) == token_counts and report.experts_without_tokens == without_tokens
    if model_name != "llama":
        assert len(token_counts) == 2 and all(counts is not None for counts in token_counts.values())
    folder = rq.export_checkpoint(model, tmp_path / "ckpt")
    assert folder_files(folder) == expected_files


def test_experts_without_tokens_of_the_split_models_are_there_to_compare(plain):
    """The lists the split models are held to are not empty where the model makes them so."""
    assert plain("gpt_oss", RECIPES[0])[4] == ["model.layers.0.mlp.experts.3", "model.layers.1.mlp.experts.3"]


def with_an_all_zero_expert(model):
    """`model` with expert 2 of layer 1 all zero: its weight amax is 0, so the export takes the
    amax from the weight (modelopt's fallback for an uncalibrated expert)."""
    with torch.no_grad():
        experts = model.model.layers[1].mlp.experts
        experts.gate_up_proj[2].zero_()
        experts.down_proj[2].zero_()
    return model


def test_offloaded_experts_export_an_expert_whose_amax_falls_back_to_its_weight_as_the_plain_model(tmp_path):
    """The fallback reads the expert's weight, which sits on the meta device while its layer is
    offloaded: it is loaded as the layer's hook loads it (NVFP4: an FP8 weight scale of 0 is refused)."""
    recipe = rq.load_recipe("nvfp4_default-nvfp4_kv")
    model = with_an_all_zero_expert(tiny_qwen3_moe())
    rq.quantize_model(model, recipe, batches(), progress=False)
    assert float(model.model.layers[1].mlp.experts.gate_up_proj_weight_quantizers[2].amax) == 0
    expected = folder_files(rq.export_checkpoint(model, tmp_path / "plain"))

    offloaded = spread(with_an_all_zero_expert(tiny_qwen3_moe()), "dispatch-disk", tmp_path)
    rq.quantize_model(offloaded, recipe, batches(), progress=False)
    assert offloaded.model.layers[1].mlp.experts.gate_up_proj.is_meta
    assert folder_files(rq.export_checkpoint(offloaded, tmp_path / "offloaded")) == expected


def test_hook_fix_reaches_the_attention_and_every_linear():
    """The issue's symptom, counted: with accelerate's per-block hooks every enabled quantizer of a
    calibrated-KV recipe gets an amax, the K/V ones included (before the fix only the weights did)."""
    model = spread(tiny_llama(), "blocks", None)
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches(), progress=False)
    enabled = [(n, q) for n, q in named_quantizers(model) if q.is_enabled]
    assert {n.rpartition(".")[2] for n, _ in enabled} >= {"k_bmm_quantizer", "v_bmm_quantizer", "input_quantizer"}
    assert all(q.is_calibrated for _, q in enabled)
    attention = model.model.layers[0].self_attn
    assert attention._old_forward.__func__ is type(attention).forward  # the hook calls the quantized forward


# --- what cannot work says why ------------------------------------------------------------------


def test_a_forward_replaced_on_the_instance_is_refused_before_anything_changes():
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.forward = lambda x: nn.functional.linear(x, q_proj.weight)
    with pytest.raises(ValueError, match=r"cannot quantize model\.layers\.0\.self_attn\.q_proj \(Linear\): its forward "
                       r"is replaced on the instance.*Remove the wrapper.*remove_hook_from_module"):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches(), progress=False)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # checked first


def test_an_accelerate_hook_around_a_foreign_forward_is_refused():
    model = tiny_llama()
    attention = model.model.layers[1].self_attn
    original = attention.forward
    attention.forward = lambda *args, **kwargs: original(*args, **kwargs)
    add_hook_to_module(attention, ModelHook())  # its _old_forward is the lambda, not LlamaAttention.forward
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn \(LlamaAttention\): accelerate's hook on it calls"):
        rq.insert_quantizers(model)


def test_weights_no_hook_of_their_own_layer_loads_are_refused():
    """preload_module_classes: the MLP's hook loads its children's weights; the linears have none."""
    model = cpu_offload(tiny_llama(), execution_device=torch.device("cpu"), preload_module_classes=["LlamaMLP"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight is on the meta device and no "
                       r"accelerate hook of its own layer loads it.*preload_module_classes"):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches(), progress=False)


def test_compress_weights_refuses_offloaded_weights(tmp_path):
    model = spread(tiny_llama(), "dispatch-disk", tmp_path)
    rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_cast_kv"), batches(), progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj \(and 6 more\) keeps its weight "
                       r"offloaded by accelerate.*rq\.load_checkpoint"):
        rq.compress_weights(model)


def test_the_weight_pass_loads_only_layers_whose_weight_quantizer_is_on(monkeypatch):
    """Calibration's pass over the weights loads an offloaded layer around its weight quantizer's
    call; a layer whose weight quantizer is off (lm_head, embed_tokens under fp8_default) is not
    loaded for it (a load of the largest tensors, for nothing)."""
    from refquant.hf import calibrate

    model = cpu_offload(tiny_llama(), execution_device=torch.device("cpu"))
    loaded = []
    original = calibrate.loaded_weights
    monkeypatch.setattr(calibrate, "loaded_weights", lambda module: loaded.append(module) or original(module))
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches(1), progress=False)
    enabled = {name.rsplit(".", 1)[0] for name, q in named_quantizers(model) if name.endswith(".weight_quantizer") and q.is_enabled}
    names = {module: name for name, module in model.named_modules()}
    assert {names[m] for m in loaded} == enabled and len(loaded) == len(enabled)
    assert "lm_head" not in enabled and "model.embed_tokens" not in enabled
