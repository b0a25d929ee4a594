"""The sensitivity run (refquant.hf.sensitivity): one unit quantized at a time ranks a unit made
costly on purpose first, restores every quantizer, and suggests recipe rules that the project's
own recipe loader reads and that switch exactly those quantizers off."""

from __future__ import annotations

import torch

import pytest

import refquant as rq
from refquant.hf.ptq import named_quantizers
from refquant.hf.sensitivity import measure_sensitivity, sensitivity_units, unit_patterns
from refquant.quant.recipe import RECIPES_DIR

transformers = pytest.importorskip("transformers")
from refquant.hf.models import CALIBRATION_TEXT, build_builtin_model, byte_tokenize, token_batches  # noqa: E402

RECIPE = "fp8_default-fp8_cast_kv"
SENSITIVE = "model.layers.2.mlp.down_proj"


def quantized_builtin_model(recipe: str = RECIPE):
    model = build_builtin_model()
    calib, eval_batch = token_batches(byte_tokenize(CALIBRATION_TEXT), num_batches=2, seq_len=64)
    report = rq.quantize_model(model, rq.load_recipe(recipe), calib, eval_batch=eval_batch, progress=False)
    return model, report, eval_batch


def make_sensitive(model) -> None:
    """Layer 2's down_proj clips hard when quantized: its input amax cut to a sixteenth."""
    quantizer = model.get_submodule(f"{SENSITIVE}.input_quantizer")
    quantizer.set_amax(quantizer.amax / 16)


@pytest.fixture(scope="module")
def sensitive_model():
    model, report, eval_batch = quantized_builtin_model()
    make_sensitive(model)
    return model, report, eval_batch


def test_units_are_decoder_blocks_or_single_layers(sensitive_model):
    model, _, _ = sensitive_model
    blocks = sensitivity_units(model, "block")
    assert list(blocks) == [f"model.layers.{i}" for i in range(4)]
    assert len(blocks["model.layers.2"]) == 7 * 2 + 2  # input + weight of 7 linears, K and V
    layers = sensitivity_units(model, "layer")
    assert layers[SENSITIVE] == [f"{SENSITIVE}.input_quantizer", f"{SENSITIVE}.weight_quantizer"]
    assert layers["model.layers.2.self_attn"] == ["model.layers.2.self_attn.k_bmm_quantizer", "model.layers.2.self_attn.v_bmm_quantizer"]
    assert len(layers) == 4 * 8


@pytest.mark.parametrize("granularity,first", [("block", "model.layers.2"), ("layer", SENSITIVE)])
def test_the_unit_made_sensitive_on_purpose_ranks_first(sensitive_model, granularity, first):
    model, _, eval_batch = sensitive_model
    result = measure_sensitivity(model, eval_batch, granularity=granularity, progress=False)
    assert result.rows[0].unit == first
    assert result.rows[0].mean_abs_logit_error > 1.5 * result.rows[1].mean_abs_logit_error
    errors = [row.mean_abs_logit_error for row in result.rows]
    assert errors == sorted(errors, reverse=True)
    assert result.keep == (1 if granularity == "block" else 3)
    assert f'quantizer_name = "{first}.*", enable = false' in result.suggested_rules


def test_the_per_quantizer_metrics_see_the_same_layer_clip(sensitive_model):
    model, _, eval_batch = sensitive_model
    from refquant.hf.quality import eval_logits
    from refquant.quant.metrics import collect_quantizer_errors

    with collect_quantizer_errors(model) as meter:
        eval_logits(model, eval_batch)
    clipped = {name: error.clipped for name, error in meter.results().items()}
    assert max(clipped, key=clipped.get) == f"{SENSITIVE}.input_quantizer" and clipped[f"{SENSITIVE}.input_quantizer"] > 0.01


def test_every_quantizer_is_restored_and_the_model_computes_the_same():
    model, _, eval_batch = quantized_builtin_model()
    configs = {name: q.config for name, q in named_quantizers(model)}
    amaxes = {name: q.amax.clone() for name, q in named_quantizers(model) if q.is_calibrated}
    with torch.no_grad():
        before = model(input_ids=eval_batch).logits
    measure_sensitivity(model, eval_batch, granularity="layer", progress=False)
    assert {name: q.config for name, q in named_quantizers(model)} == configs
    assert all(q.config is configs[name] for name, q in named_quantizers(model))
    assert all(torch.equal(q.amax, amaxes[name]) for name, q in named_quantizers(model) if q.is_calibrated)
    with torch.no_grad():
        assert torch.equal(model(input_ids=eval_batch).logits, before)


def paste_rules(recipe_name: str, rules: str, tmp_path):
    """The shipped recipe's file with `rules` pasted as the last items of its quant_cfg array."""
    text = (RECIPES_DIR / f"{recipe_name}.toml").read_text()
    head, _, tail = text.rpartition("]")
    path = tmp_path / "mine.toml"
    path.write_text(head + rules + "\n]" + tail)
    return path


@pytest.mark.parametrize("granularity,keep", [("block", 2), ("layer", 32)])
def test_suggested_rules_load_with_the_recipe_loader_and_switch_exactly_those_units_off(sensitive_model, tmp_path, granularity, keep):
    model, _, eval_batch = sensitive_model
    result = measure_sensitivity(model, eval_batch, granularity=granularity, keep=keep, progress=False)
    recipe = rq.load_recipe(paste_rules(RECIPE, result.suggested_rules, tmp_path))
    units = sensitivity_units(model, granularity)
    kept = {name for row in result.rows[:keep] for name in units[row.unit]}

    fresh = build_builtin_model()
    rq.insert_quantizers(fresh)
    rq.apply_recipe(fresh, recipe)
    reference = build_builtin_model()
    rq.insert_quantizers(reference)
    rq.apply_recipe(reference, rq.load_recipe(RECIPE))
    enabled = {name for name, q in named_quantizers(fresh) if q.is_enabled}
    enabled_before = {name for name, q in named_quantizers(reference) if q.is_enabled}
    assert enabled == enabled_before - kept and kept <= enabled_before
    if granularity == "layer":  # the attention unit (K/V) is named one quantizer at a time
        assert '"model.layers.0.self_attn.k_bmm_quantizer"' in result.suggested_rules


def test_patterns_fall_back_to_names_when_the_unit_glob_would_match_more():
    enabled = ["a.attn.q_proj.input_quantizer", "a.attn.k_bmm_quantizer", "a.attn.v_bmm_quantizer"]
    assert unit_patterns("a.attn.q_proj", enabled[:1], enabled) == ["a.attn.q_proj.*"]
    assert unit_patterns("a.attn", enabled[1:], enabled) == enabled[1:]
    assert unit_patterns("odd[0]", ["odd[0].weight_quantizer"], ["odd[0].weight_quantizer"]) == ["odd[[]0].*"]


def test_report_carries_the_ranking_in_json_and_table(sensitive_model):
    model, report, eval_batch = sensitive_model
    report.sensitivity = measure_sensitivity(model, eval_batch, progress=False)
    try:
        assert rq.PTQReport.from_json(report.to_json()) == report
        table = report.to_table()
        assert "sensitivity: one block quantized at a time" in table
        assert "add these rules at the end of the recipe's quant_cfg" in table and "model.layers.2.*" in table
    finally:
        report.sensitivity = None


def test_bad_input_is_a_clear_error(sensitive_model):
    model, _, eval_batch = sensitive_model
    with pytest.raises(ValueError, match="granularity='expert' is not known"):
        measure_sensitivity(model, eval_batch, granularity="expert", progress=False)
    with pytest.raises(ValueError, match="keep=5 must be an int from 0 to the number of units \\(4\\)"):
        measure_sensitivity(model, eval_batch, keep=5, progress=False)
    plain = build_builtin_model()
    rq.insert_quantizers(plain)
    with pytest.raises(ValueError, match="no enabled quantizer in LlamaForCausalLM: quantize it first"):
        measure_sensitivity(plain, eval_batch, progress=False)
