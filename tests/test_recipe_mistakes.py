"""Recipe mistakes that used to pass silently: a typo that quantizes nothing (or the wrong thing),
imports that are read again and again or nest without end, and `recipes show --toml` output that
does not load back.

A rule that matches no quantizer is an error when it is most likely a typo (one edit of a word
makes it match) or when the recipe then quantizes no weight; the shipped recipes' rules for other
families (routers, vision towers, ...) match nothing on most models and must stay silent.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import refquant as rq
from refquant.cli import main
from refquant.quant import recipe as recipe_module
from refquant.quant.quantizer import named_quantizers
from refquant.quant.recipe import Recipe, apply_recipe, load_recipe, recipe_to_toml, shipped_recipes

transformers = pytest.importorskip("transformers")

BATCH = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))


def tiny_model(family: str = "llama", **overrides):
    config = transformers.AutoConfig.for_model(
        family, **{**dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=64), **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def recipe_with(tmp_path: Path, *rules: str, body: str = "w4a4_nvfp4_nvfp4") -> Recipe:
    """base_disable_all, the given rules (TOML inline tables), then default_disabled_quantizers."""
    items = ['{ import = "base_disable_all" }', *rules, '{ import = "kv_fp8_cast" }', '{ import = "default_disabled_quantizers" }']
    if body:
        items.insert(1, f'{{ import = "{body}" }}')
    return load_recipe(write(tmp_path, "mine.toml", "quant_cfg = [\n    " + ",\n    ".join(items) + ",\n]\n"))


NVFP4 = 'cfg = { import = "numerics/nvfp4" }'


# --- a rule that matches nothing ----------------------------------------------------------------


def test_a_misspelt_weight_rule_that_quantizes_no_weight_is_an_error_that_says_did_you_mean(tmp_path):
    recipe = recipe_with(tmp_path, f'{{ quantizer_name = "*wieght_quantizer", {NVFP4} }}',
                         f'{{ quantizer_name = "*input_quantizer", {NVFP4} }}', body="")
    with pytest.raises(ValueError) as error:
        rq.quantize_model(tiny_model(), recipe, [BATCH], progress=False)
    message = str(error.value)
    assert "quantizer_name='*wieght_quantizer'" in message and "matched no quantizer" in message
    assert "Did you mean '*weight_quantizer'?" in message and "quantizes no weight" in message


def test_the_misspelt_recipe_exits_non_zero_on_the_command_line_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe_with(tmp_path, f'{{ quantizer_name = "*wieght_quantizer", {NVFP4} }}',
                f'{{ quantizer_name = "*input_quantizer", {NVFP4} }}', body="")
    code = main(["quantize", "--recipe", "mine.toml", "--out", "ckpt", "--calib-batches", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Did you mean '*weight_quantizer'?" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("rule, suggestion", [
    # an enabling rule one edit away, while the weights are quantized: the inputs would silently stay bf16
    (f'{{ quantizer_name = "*input_quantzer", {NVFP4} }}', "*input_quantizer"),
    (f'{{ quantizer_name = "*self_attn.q_porj.input_quantizer", {NVFP4} }}', "*self_attn.q_proj.input_quantizer"),
    # a disabling rule one edit away from quantizers that stay enabled
    ('{ quantizer_name = "*down_prj*", enable = false }', "*down_proj*"),
])
def test_a_rule_one_edit_away_from_the_model_names_is_an_error_that_says_did_you_mean(tmp_path, rule, suggestion):
    recipe = recipe_with(tmp_path, rule)
    with pytest.raises(ValueError, match=f"Did you mean '{suggestion.replace('*', '[*]')}'\\?"):
        rq.quantize_model(tiny_model(), recipe, [BATCH], progress=False)


def test_an_enabling_rule_for_another_family_is_a_warning_when_weights_are_quantized(tmp_path):
    recipe = recipe_with(tmp_path, f'{{ quantizer_name = "*block_sparse_moe.experts*", {NVFP4} }}')
    with pytest.warns(UserWarning, match=r"quantizer_name='\*block_sparse_moe\.experts\*'\) enables quantizers but matched none"):
        report = rq.quantize_model(tiny_model(), recipe, [BATCH], progress=False)
    assert report.totals["quantized_linears"] == 14


def test_an_enabling_rule_that_matches_nothing_in_a_recipe_that_quantizes_no_weight_is_an_error(tmp_path):
    recipe = recipe_with(tmp_path, '{ quantizer_name = "*Linear*", cfg = { import = "numerics/fp8" } }', body="")
    with pytest.raises(ValueError, match=r"'\*Linear\*'\) enables quantizers but matched none.*quantizes no weight"):
        rq.quantize_model(tiny_model(), recipe, [BATCH], progress=False)


def test_an_enabling_rule_for_another_family_is_a_notice_when_only_expert_weights_are_quantized(tmp_path):
    """Fused experts' weight quantizers are `...weight_quantizers.N`: a recipe that enables only
    them quantizes weights, so an enabling rule for another family is a notice, not an error."""
    recipe = recipe_with(tmp_path, f'{{ quantizer_name = "*experts*weight_quantizer", {NVFP4} }}',
                         f'{{ quantizer_name = "*block_sparse_moe.experts*", {NVFP4} }}', body="")
    model = tiny_model("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    rq.insert_quantizers(model)
    notices = recipe_module.check_application(apply_recipe(model, recipe), model)
    assert len(notices) == 1 and "'*block_sparse_moe.experts*') enables quantizers but matched none" in notices[0]
    assert any(name.endswith("experts.down_proj_weight_quantizers.3") and q.is_enabled
               for name, q in named_quantizers(model))


def test_a_disabling_rule_for_another_family_passes_silently(tmp_path):
    recipe = recipe_with(tmp_path, '{ quantizer_name = "*experts.*.w1*", enable = false }')
    model = tiny_model()
    rq.insert_quantizers(model)
    assert recipe_module.check_application(apply_recipe(model, recipe), model) == []


# The families the shipped recipes must fit without an error (transformers' configs, 2 layers).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma", "gemma2",
            "gemma3_text", "olmo2", "qwen3_next", "granite", "deepseek_v3", "gpt_oss", "starcoder2", "phi", "gpt2",
            "opt", "cohere", "llama4_text", "olmoe", "falcon_h1", "jamba", "qwen3_5_text")
# Llama 4's experts are refused at insertion (modelopt's own wrapper, not implemented; the family
# matrix checks the refusal): its rules are checked on dense layers only.
FAMILY_OVERRIDES = {"llama4_text": dict(moe_layers=[])}


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_recipes_raise_no_rule_error_on_any_family(family):
    model = tiny_model(family, **FAMILY_OVERRIDES.get(family, {}))
    rq.insert_quantizers(model)
    for name in shipped_recipes():
        application = apply_recipe(model, load_recipe(name))
        notices = recipe_module.check_application(application, model)
        # only a K/V rule may find nothing: hybrid models whose 2 layers hold no attention
        assert all("*[kv]_bmm_quantizer" in notice for notice in notices), notices


@pytest.mark.parametrize("a, b, expected", [
    ("weight", "wieght", True), ("weight", "weights", True), ("weight", "eight", True), ("weight", "weighs", True),
    ("weight", "weight", False), ("weight", "wiehgt", False), ("mtp", "mlp", True), ("a", "ba", True), ("ab", "ba", True),
    ("abc", "cba", False), ("gate", "gate_proj", False),
])
def test_one_edit_apart_is_an_insertion_deletion_substitution_or_neighbour_swap(a, b, expected):
    assert recipe_module._one_edit_apart(a, b) is expected
    assert recipe_module._one_edit_apart(b, a) is expected


# --- imports: read once, nested at most recipe_module.MAX_IMPORT_DEPTH deep ------------------------------------


class ReadCounter:
    """Wraps the recipe module's file reader: counts reads per file and stops a run that reads far
    more than there are files (the uncached resolution reads the leaf 2^16 times)."""

    def __init__(self, monkeypatch, limit: int):
        self.reads: dict[Path, int] = {}
        self.original, self.limit = recipe_module._read_toml, limit
        monkeypatch.setattr(recipe_module, "_read_toml", self)

    def __call__(self, path, *args):
        self.reads[path] = self.reads.get(path, 0) + 1
        if sum(self.reads.values()) > self.limit:
            raise AssertionError(f"read {sum(self.reads.values())} files for {len(self.reads)} distinct ones")
        return self.original(path, *args)


def test_a_unit_imported_many_times_is_read_and_resolved_once(tmp_path, monkeypatch):
    """17 files, each importing the next twice: 2^16 copies of the leaf's rule, 17 reads."""
    levels = 17
    write(tmp_path, f"u{levels - 1}.toml", '[[quant_cfg]]\nquantizer_name = "*"\nenable = false\n')
    for level in range(levels - 1):
        write(tmp_path, f"u{level}.toml", f'quant_cfg = [{{ import = "u{level + 1}" }}, {{ import = "u{level + 1}" }}]\n')
    top = write(tmp_path, "top.toml", 'quant_cfg = [{ import = "u0" }]\n')
    counter = ReadCounter(monkeypatch, limit=100)
    recipe = load_recipe(top)
    assert len(recipe.quant_cfg) == 2 ** (levels - 1)
    assert len(counter.reads) == levels + 1 and set(counter.reads.values()) == {1}
    assert recipe.quant_cfg[0] is not recipe.quant_cfg[1]  # each splice its own rule objects


def test_a_numerics_unit_used_by_many_rules_is_read_once(tmp_path, monkeypatch):
    rules = "".join(f'[[quant_cfg]]\nquantizer_name = "*layers.{i}.*weight_quantizer"\ncfg = {{ import = "numerics/fp8" }}\n'
                    for i in range(5))
    counter = ReadCounter(monkeypatch, limit=100)
    load_recipe(write(tmp_path, "top.toml", rules))
    assert set(counter.reads.values()) == {1}


def test_imports_nested_deeper_than_the_limit_are_an_error_showing_the_chain(tmp_path):
    depth = recipe_module.MAX_IMPORT_DEPTH + 8
    write(tmp_path, f"c{depth}.toml", '[[quant_cfg]]\nquantizer_name = "*"\nenable = false\n')
    for level in range(depth):
        write(tmp_path, f"c{level}.toml", f'quant_cfg = [{{ import = "c{level + 1}" }}]\n')
    with pytest.raises(ValueError, match=rf"imports nest deeper than {recipe_module.MAX_IMPORT_DEPTH} files \(.*c0\.toml -> .*\.\.\. -> .*c{recipe_module.MAX_IMPORT_DEPTH}\.toml\)"):
        load_recipe(tmp_path / "c0.toml")
    assert len(load_recipe(tmp_path / f"c{depth - recipe_module.MAX_IMPORT_DEPTH + 1}.toml").quant_cfg) == 1  # the limit itself loads


# --- recipes show --toml loads back ---------------------------------------------------------------


def assert_loads_back(text: str, recipe: Recipe, folder: Path) -> None:
    path = folder / "shown.toml"
    path.write_text(text, encoding="utf-8")
    again = load_recipe(path)
    assert dataclasses.replace(again, name=recipe.name, source=recipe.source) == recipe


@settings(max_examples=200, deadline=None)
@given(description=st.text(), name=st.text(min_size=1))
def test_any_description_and_pattern_written_as_toml_load_back_to_an_equal_recipe(tmp_path_factory, description, name):
    recipe = dataclasses.replace(load_recipe("fp8_default-fp8_kv"), description=description)
    recipe.quant_cfg[1] = dataclasses.replace(recipe.quant_cfg[1], quantizer_name=name)
    assert_loads_back(recipe_to_toml(recipe), recipe, tmp_path_factory.mktemp("toml"))


def test_recipes_show_toml_of_a_description_with_an_emoji_and_escapes_loads_back(tmp_path, capsys):
    shipped = load_recipe("nvfp4_default-fp8_cast_kv")
    description = 'NVFP4 \U0001F680 "fast", tab\there, back\\slash, ü, DEL \x7f, bell \x07'
    path = tmp_path / "emoji.toml"
    path.write_text(recipe_to_toml(dataclasses.replace(shipped, description=description)), encoding="utf-8")
    assert main(["recipes", "show", str(path), "--toml"]) == 0
    assert_loads_back(capsys.readouterr().out, dataclasses.replace(shipped, description=description), tmp_path)


def test_a_lone_surrogate_cannot_be_written_as_toml():
    recipe = dataclasses.replace(load_recipe("fp8_default-fp8_kv"), description="half \ud83d of an emoji")
    with pytest.raises(ValueError, match=r"lone surrogate \(U\+D83D\)"):
        recipe_to_toml(recipe)
