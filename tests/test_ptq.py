"""The PTQ flow on tiny transformers models of each supported family: where the quantizers go and
what they are named (docs/modelopt_behaviour.md §7.5, §9), what max calibration stores (§6), that
constant-amax K/V is never calibrated (§5), and what the report says."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import refquant as rq
from refquant.hf.ptq import max_calibrate, named_quantizers
from refquant.quant.quantizer import QuantizerConfig
from conftest import require_modelopt

transformers = pytest.importorskip("transformers")

VOCAB = 128
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_model(family: str, attn_implementation: str = "sdpa", layers: int = 1, dtype=torch.float32, seed: int = 0):
    """A seeded tiny causal LM: hidden 64, 4 query heads / 2 KV heads of head_dim 16 (GQA)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  attn_implementation=attn_implementation)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config_class(**common))
    return model.to(dtype).eval()


def token_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def modeling_module(model: nn.Module):
    return sys.modules[type(model).__module__]


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


# --- insertion --------------------------------------------------------------------------------
def expected_quantizer_names(layers: int) -> set[str]:
    names = {f"lm_head.{q}" for q in ("input_quantizer", "weight_quantizer", "output_quantizer")}
    names |= {f"model.embed_tokens.{q}" for q in ("input_quantizer", "weight_quantizer", "output_quantizer")}
    for i in range(layers):
        for linear in LINEARS:
            names |= {f"model.layers.{i}.{linear}.{q}" for q in ("input_quantizer", "weight_quantizer", "output_quantizer")}
        names |= {f"model.layers.{i}.self_attn.{q}_bmm_quantizer" for q in "qkvp"}
    return names


@pytest.mark.parametrize("family", FAMILIES)
def test_insert_quantizers_names_are_modelopts_and_start_disabled(family):
    model = tiny_model(family, layers=2)
    names = rq.insert_quantizers(model)
    assert set(names) == expected_quantizer_names(2)
    assert all(not quantizer.is_enabled for _, quantizer in named_quantizers(model))
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, type(tiny_model(family).model.layers[0].self_attn))  # still the model's class
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_insert_quantizers_is_idempotent_and_keeps_weights_and_amax():
    model = tiny_model("llama")
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    first = rq.insert_quantizers(model)
    quantizer = model.model.layers[0].self_attn.q_proj.weight_quantizer
    quantizer.set_amax(torch.tensor(1.5))
    second = rq.insert_quantizers(model, flavor="modelopt-cuda")
    assert first == second
    assert model.model.layers[0].self_attn.q_proj.weight_quantizer is quantizer
    assert float(quantizer.amax) == 1.5 and quantizer.flavor == "modelopt-cuda"
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_model_without_linear_layers_is_rejected():
    with pytest.raises(ValueError, match="no quantizable layers in Sequential"):
        rq.insert_quantizers(nn.Sequential(nn.Embedding(8, 4), nn.ReLU()))


class HandRolledAttention(nn.Module):
    """An attention that does its own math instead of calling transformers' attention interface."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def test_attention_that_cannot_be_hooked_fails_clearly_and_changes_nothing():
    model = nn.Sequential(HandRolledAttention())
    with pytest.raises(ValueError, match=r"cannot place K/V quantizers in 0 \(.*HandRolledAttention\).*attention interface"):
        rq.insert_quantizers(model)
    assert type(model[0].qkv) is nn.Linear  # checked before any layer was converted


# --- K/V placement (docs/modelopt_behaviour.md §9) --------------------------------------------
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_quantizers_see_post_rope_keys_before_gqa_repetition(family, attn_implementation, monkeypatch):
    model = tiny_model(family, attn_implementation)
    rq.insert_quantizers(model)
    attention = model.model.layers[0].self_attn
    for name in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer"):
        getattr(attention, name).set_config(QuantizerConfig(format="fp8", use_constant_amax=True))

    modeling = modeling_module(model)
    rope_calls = []
    original_rope = modeling.apply_rotary_pos_emb

    def recording_rope(q, k, *args, **kwargs):
        q_out, k_out = original_rope(q, k, *args, **kwargs)
        rope_calls.append((k, k_out, q_out))
        return q_out, k_out

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", recording_rope)
    seen = {}
    for name in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer"):
        getattr(attention, name).register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    v_proj_out = {}
    attention.v_proj.register_forward_hook(lambda m, args, out: v_proj_out.__setitem__("v", out))

    ids = token_ids(2, 12)
    with torch.no_grad():
        model(input_ids=ids)
    (key_before_rope, key_after_rope, query_after_rope), = rope_calls
    k_in, k_out = seen["k_bmm_quantizer"]
    assert k_in.shape == (2, 2, 12, 16)  # [batch, kv_heads, seq, head_dim]: before GQA repetition
    assert torch.equal(k_in, key_after_rope)
    assert not torch.equal(k_in, key_before_rope)
    assert torch.equal(seen["q_bmm_quantizer"][0], query_after_rope)
    expected_v = v_proj_out["v"].view(2, 12, -1, 16).transpose(1, 2)
    assert torch.equal(seen["v_bmm_quantizer"][0], expected_v)
    assert torch.equal(k_out, rq.fp8_fake_quant(k_in, 448.0))  # and they quantize what they see
    # the swap is undone: the modeling file and the registry are as before
    assert modeling.eager_attention_forward.__module__ == modeling.__name__
    assert "sdpa" not in transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS._local_mapping


def test_kv_quantizers_see_the_whole_cache_when_decoding():
    model = tiny_model("llama")
    rq.insert_quantizers(model)
    attention = model.model.layers[0].self_attn
    attention.k_bmm_quantizer.set_config(QuantizerConfig(format="fp8", use_constant_amax=True))
    shapes = []
    attention.k_bmm_quantizer.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        past = model(input_ids=token_ids(1, 8), use_cache=True).past_key_values
        model(input_ids=token_ids(1, 1, seed=3), past_key_values=past, use_cache=True)
    assert shapes == [(1, 2, 8, 16), (1, 2, 9, 16)]


# --- recipes on each family (docs/modelopt_behaviour.md §7.5) ---------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_enables_exactly_the_quantizers_spec_7_5_lists(family):
    model = tiny_model(family)
    report = rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_cast_kv"), [token_ids(2, 16)], progress=False)
    enabled = {row.name for row in report.quantizers if row.enabled}
    expected = {f"model.layers.0.{linear}.{q}" for linear in LINEARS for q in ("input_quantizer", "weight_quantizer")}
    expected |= {"model.layers.0.self_attn.k_bmm_quantizer", "model.layers.0.self_attn.v_bmm_quantizer"}
    assert enabled == expected
    formats = {row.name: row.format for row in report.quantizers if row.enabled}
    assert formats["model.layers.0.self_attn.k_bmm_quantizer"] == "fp8"
    assert formats["model.layers.0.mlp.down_proj.weight_quantizer"] == "nvfp4"


# --- calibration (docs/modelopt_behaviour.md §6) ----------------------------------------------
def unquantized_statistics(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """max|input| of every linear and max|post-RoPE key| / max|value| per attention, over all
    batches, measured on a model without quantizers."""
    stats: dict[str, torch.Tensor] = {}

    def keep_max(key: str, tensor: torch.Tensor) -> None:
        local = tensor.detach().abs().amax()
        stats[key] = local if key not in stats else torch.maximum(stats[key], local)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda m, args, name=name: keep_max(f"{name}.input_quantizer", args[0]))
        # V is v_proj's output, only reshaped (docs/modelopt_behaviour.md §9)
        if name.endswith("self_attn.v_proj"):
            attention = name.rpartition(".")[0]
            module.register_forward_hook(lambda m, args, out, a=attention: keep_max(f"{a}.v_bmm_quantizer", out))
    modeling = modeling_module(model)
    original_rope = modeling.apply_rotary_pos_emb
    calls = []

    def recording_rope(q, k, *args, **kwargs):
        q_out, k_out = original_rope(q, k, *args, **kwargs)
        calls.append(k_out)
        return q_out, k_out

    modeling.apply_rotary_pos_emb = recording_rope
    try:
        with torch.no_grad():
            for batch in batches:
                calls.clear()
                model(input_ids=batch)
                for layer, key in enumerate(calls):
                    keep_max(f"model.layers.{layer}.self_attn.k_bmm_quantizer", key)
    finally:
        modeling.apply_rotary_pos_emb = original_rope
    return stats


@pytest.mark.parametrize("recipe", ["nvfp4_default-fp8_cast_kv", "fp8_default-fp8_kv"])
def test_max_calibration_stores_max_abs_of_unquantized_tensors(recipe):
    model = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    batches = [token_ids(2, 16, seed=s) for s in (1, 2, 3)]
    expected = unquantized_statistics(copy.deepcopy(model), batches)
    rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    checked = 0
    for name, quantizer in named_quantizers(model):
        if not quantizer.is_enabled or quantizer.config.use_constant_amax:
            continue
        if name.endswith("weight_quantizer"):
            weight = model.get_submodule(name.rpartition(".")[0]).weight
            want = weight.detach().abs().amax()
        else:
            want = expected[name]
        # same value and dtype (bf16 for a bf16 model), docs/modelopt_behaviour.md §6.2
        assert quantizer.amax.dtype == torch.bfloat16 and torch.equal(quantizer.amax, want), name
        checked += 1
    assert checked == (28 if recipe.startswith("nvfp4") else 32)  # 2 layers x 7 linears x 2 (+ 2 x k/v)


def test_calibration_runs_in_eval_mode_and_restores_the_models_mode():
    """modelopt's calibrate: model.eval() for the forwards (no dropout), then model.train(was)."""
    batches = [token_ids(2, 16, seed=s) for s in (1, 2)]
    recipe = rq.load_recipe("fp8_default-fp8_kv")
    evaluated = tiny_model("llama", layers=2)
    rq.quantize_model(evaluated, recipe, batches, progress=False)
    for mode in ("train", "mixed"):
        model = tiny_model("llama", layers=2)
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.5  # in training mode the attention would drop
        if mode == "train":
            model.train()
        else:
            model.model.layers[1].train()  # the root in eval, one layer left training
        seen = []
        hook = model.model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(module.training))
        rq.quantize_model(model, recipe, batches, progress=False)
        hook.remove()
        assert seen and not any(seen), mode  # every calibration forward ran in eval mode
        amaxes = {name: q.amax for name, q in named_quantizers(model) if q.is_enabled and not q.config.use_constant_amax}
        theirs = dict(named_quantizers(evaluated))
        assert all(torch.equal(amax, theirs[name].amax) for name, amax in amaxes.items()), mode
        assert [m.training for m in model.modules()] == [mode == "train"] * len(list(model.modules())), mode


def test_calibration_computes_no_logits_where_no_quantizer_watches_the_head(monkeypatch):
    """The calibration forwards ask the model for the last position's logits alone where the
    output head has no enabled quantizer (its input is the hidden states either way): the same
    amaxes as with every position's logits; every position's where the head's input quantizer is
    on, or where a batch carries labels."""
    from refquant.hf import calibrate

    batches = [token_ids(2, 16, seed=s) for s in (1, 2)]
    recipe = rq.load_recipe("fp8_default-fp8_kv")
    model, every_position = tiny_model("llama", layers=2), tiny_model("llama", layers=2)
    positions = []
    for m in (model, every_position):
        m.lm_head.register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    rq.quantize_model(model, recipe, batches, progress=False)
    assert positions == [1, 1]
    positions.clear()
    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "_unwatched_logits", lambda model: {})
        rq.quantize_model(every_position, recipe, batches, progress=False)
    assert positions == [16, 16]
    theirs = dict(named_quantizers(every_position))
    amaxes = [(name, q.amax) for name, q in named_quantizers(model) if q.amax is not None]
    assert amaxes and all(torch.equal(amax, theirs[name].amax) for name, amax in amaxes)
    positions.clear()
    watched = tiny_model("llama")
    watched.lm_head.register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    rq.insert_quantizers(watched)
    watched.lm_head.input_quantizer.set_config(QuantizerConfig(format="fp8"))
    max_calibrate(watched, batches, progress=False)
    assert positions == [16, 16]
    positions.clear()
    labelled = tiny_model("llama")
    labelled.lm_head.register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    rq.quantize_model(labelled, recipe, [{"input_ids": b, "labels": b} for b in batches], progress=False)
    assert positions == [16, 16]


def test_weights_calibrate_without_any_forward():
    model = tiny_model("llama")
    rq.insert_quantizers(model)
    model.lm_head.weight_quantizer.set_config(QuantizerConfig(format="fp8"))
    model.model.layers[0].mlp.up_proj.weight_quantizer.set_config(QuantizerConfig(format="nvfp4"))
    assert max_calibrate(model, [], progress=False) == (0, 0)
    assert torch.equal(model.lm_head.weight_quantizer.amax, model.lm_head.weight.abs().amax())
    up_proj = model.model.layers[0].mlp.up_proj
    assert torch.equal(up_proj.weight_quantizer.amax, up_proj.weight.abs().amax())


def test_activation_quantizers_without_calibration_data_are_an_error():
    model = tiny_model("llama")
    rq.insert_quantizers(model)
    model.model.layers[0].mlp.up_proj.input_quantizer.set_config(QuantizerConfig(format="fp8"))
    with pytest.raises(ValueError, match="gave no batch.*up_proj.input_quantizer"):
        max_calibrate(model, [], progress=False)


def test_calibration_with_known_amax_per_tensor_and_per_channel_over_batches():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    weight = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.25, 0.0, -7.0, 3.0]])
    with torch.no_grad():
        model[0].weight.copy_(weight)
    rq.insert_quantizers(model)
    model[0].input_quantizer.set_config(QuantizerConfig(format="fp8"))
    model[0].weight_quantizer.set_config(QuantizerConfig(format="fp8", axis=0))
    model[0].output_quantizer.set_config(QuantizerConfig(format="nvfp4"))
    inputs = [torch.tensor([[1.0, -3.0, 2.0, 0.0]]), torch.tensor([[0.5, 0.5, -2.5, 1.0]])]
    report = rq.quantize_model(model, None, [{"input": x} for x in inputs], progress=False)
    assert float(model[0].input_quantizer.amax) == 3.0  # max over both batches
    assert model[0].weight_quantizer.amax.flatten().tolist() == [2.0, 7.0]  # per row, keep-dims [2, 1]
    # the output statistic is of the unquantized product (quantization is off while collecting)
    assert float(model[0].output_quantizer.amax) == max(float((x @ weight.T).abs().max()) for x in inputs)
    row = report.row("0.weight_quantizer")
    assert row.amax == 7.0 and row.amax_shape == [2, 1] and row.amax_source == "calibrated"


# --- constant-amax K/V (docs/modelopt_behaviour.md §5) ----------------------------------------
@pytest.mark.parametrize("recipe,kv_format", [("nvfp4_default-fp8_cast_kv", "fp8"), ("nvfp4_default-nvfp4_cast_kv", "nvfp4")])
def test_constant_amax_kv_is_never_calibrated_and_quantizes_with_448(recipe, kv_format):
    model = tiny_model("qwen3")
    report = rq.quantize_model(model, rq.load_recipe(recipe), [token_ids(2, 16)], progress=False)
    attention = model.model.layers[0].self_attn
    for name in ("k_bmm_quantizer", "v_bmm_quantizer"):
        quantizer = getattr(attention, name)
        assert not quantizer.is_calibrated and float(quantizer.amax) == 448.0
        assert report.row(f"model.layers.0.self_attn.{name}").amax_source == "constant"
    assert not any("bmm_quantizer._amax" in key for key in model.state_dict())
    seen = []
    attention.k_bmm_quantizer.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(input_ids=token_ids(1, 8))
    k_in, k_out = seen[0]
    want = rq.fp8_fake_quant(k_in, 448.0) if kv_format == "fp8" else rq.nvfp4_fake_quant(k_in, torch.tensor(448.0))
    assert torch.equal(k_out, want)


# --- the report -------------------------------------------------------------------------------
def test_report_rows_totals_unmatched_rules_and_quality():
    model = tiny_model("mistral", layers=2)
    original = copy.deepcopy(model)
    eval_batch = {"input_ids": token_ids(1, 24, seed=9), "attention_mask": torch.ones(1, 24, dtype=torch.int64)}
    report = rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_cast_kv"), [token_ids(2, 16)], eval_batch=eval_batch, progress=False)

    assert report.recipe == "fp8_default-fp8_cast_kv" and report.algorithm == "max"
    assert report.calib_batches == 1 and report.calib_tokens == 32
    assert len(report.quantizers) == len(expected_quantizer_names(2))
    assert report.totals["enabled"] == 2 * 16 and report.totals["quantized_linears"] == 14
    assert report.totals["quantized_kv"] == 4 and report.totals["constant"] == 4 and report.totals["calibrated"] == 28
    assert report.row("lm_head.weight_quantizer").enabled is False
    unmatched = "\n".join(report.unmatched_rules)
    assert "'*router*'" in unmatched and "'*lm_head*'" not in unmatched and "nn.Embedding" not in unmatched

    with torch.no_grad():
        want = original(**eval_batch).logits.float()
        got = model(**eval_batch).logits.float()
    quality = report.quality
    assert quality.max_abs_logit_error == float((got - want).abs().max()) > 0
    assert quality.mean_abs_logit_error == pytest.approx(float((got - want).abs().mean()))
    cross_entropy = F.cross_entropy(want[0, :-1], eval_batch["input_ids"][0, 1:])
    assert quality.perplexity_original == pytest.approx(math.exp(float(cross_entropy)), rel=1e-6)
    assert quality.perplexity_quantized > 1 and 0 <= quality.top1_agreement <= 1

    data = json.loads(report.to_json())
    assert data["recipe"] == "fp8_default-fp8_cast_kv" and data["quality"]["eval_tokens"] == 24
    assert {"name", "format", "enabled", "amax", "amax_source"} <= set(data["quantizers"][0])
    assert rq.PTQReport.from_json(report.to_json()) == report
    table = report.to_table()
    assert "model.layers.1.self_attn.k_bmm_quantizer" in table and "constant" in table
    assert "model.layers.*.self_attn.q_bmm_quantizer  x2" in table and "perplexity" in table


def test_recipe_that_enables_nothing_is_an_error():
    recipe = rq.load_recipe("fp8_default-fp8_cast_kv")
    only_disable = type(recipe)(**{**recipe.__dict__, "quant_cfg": recipe.quant_cfg[:1]})
    with pytest.raises(ValueError, match="enables none of its"):
        rq.quantize_model(tiny_model("llama"), only_disable, [token_ids(1, 8)], progress=False)


def test_enabled_p_bmm_quantizer_is_refused_at_the_forward():
    model = tiny_model("llama")
    rq.insert_quantizers(model)
    model.model.layers[0].self_attn.p_bmm_quantizer.set_config(QuantizerConfig(format="fp8"))
    with pytest.raises(ValueError, match="p_bmm_quantizer is enabled, but refquant does not quantize the softmax"):
        model(input_ids=token_ids(1, 4))


# --- against modelopt itself (CI installs it; tests/test_modelopt_families.py has every family) --
MODELOPT_NAMES = {"fp8_default-fp8_kv": "general/ptq/fp8_default-kv_fp8", "fp8_default-fp8_cast_kv": "general/ptq/fp8_default-kv_fp8_cast"}


@pytest.mark.parametrize("recipe", sorted(MODELOPT_NAMES))
def test_same_quantizers_amax_and_logits_as_modelopt_on_cpu(recipe):
    """modelopt's FP8 fake quant runs on CPU (its NVFP4 needs a GPU: scripts/compare_modelopt.py)."""
    require_modelopt()
    import warnings

    import modelopt.torch.quantization as mtq
    from modelopt.recipe import load_recipe as modelopt_recipe
    from modelopt.torch.quantization.nn import TensorQuantizer as ModeloptQuantizer

    batches = [token_ids(2, 16, seed=s) for s in (1, 2)]
    for family in FAMILIES:
        ours, theirs = tiny_model(family, dtype=torch.bfloat16), tiny_model(family, dtype=torch.bfloat16)
        rq.quantize_model(ours, rq.load_recipe(recipe), batches, progress=False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            mtq.quantize(theirs, modelopt_recipe(MODELOPT_NAMES[recipe]).quantize.model_dump(),
                         lambda model: [model(input_ids=batch) for batch in batches])
        their_quantizers = {n: m for n, m in theirs.named_modules() if isinstance(m, ModeloptQuantizer)}
        our_quantizers = dict(named_quantizers(ours))
        assert set(our_quantizers) == set(their_quantizers), family
        for name, quantizer in our_quantizers.items():
            theirs_q = their_quantizers[name]
            assert quantizer.is_enabled == theirs_q.is_enabled, name
            if quantizer.is_enabled and not quantizer.config.use_constant_amax:
                assert quantizer.amax.dtype == theirs_q._amax.dtype and torch.equal(quantizer.amax, theirs_q._amax), name
            if quantizer.config.use_constant_amax:
                assert theirs_q._use_constant_amax and not hasattr(theirs_q, "_amax"), name
        eval_ids = token_ids(1, 16, seed=7)
        with torch.no_grad():
            assert torch.equal(ours(input_ids=eval_ids).logits, theirs(input_ids=eval_ids).logits), family
