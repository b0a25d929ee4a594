"""Recipes: the six shipped ones resolve to docs/modelopt_behaviour.md §7.5's tables; composition,
application, recipe-vs-flag selection, and every kind of bad input.

The expected tables below are copied from docs/modelopt_behaviour.md §7.3 / §7.5 in modelopt's terms
(num_bits, axis, block_sizes, use_constant_amax); only MODELOPT_NUMERICS, written here from §7.4,
translates our `format` names into them.
"""

from __future__ import annotations

import fnmatch
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

import refquant as rq
from refquant import QuantizerConfig, QuantRule, TensorQuantizer, apply_recipe, load_recipe, select_recipe
from refquant.quant.recipe import RECIPES_DIR, _glob, effective_config, recipe_to_toml

# docs/modelopt_behaviour.md §7.4: FP8 = {num_bits (4,3), axis None}; NVFP4 = {num_bits (2,1),
# block_sizes {-1: 16, type: dynamic, scale_bits: (4,3)}}.
NVFP4_BLOCKS = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
MODELOPT_NUMERICS = {"fp8": ((4, 3), None), "nvfp4": ((2, 1), NVFP4_BLOCKS)}

# docs/modelopt_behaviour.md §7.3, the 23 rows of DD: (pattern, parent_class); every one is
# `enable: false`.
DD = [
    ("*block_sparse_moe.gate*", None), ("*linear_attn.conv1d*", None), ("*linear_attn.in_proj_a*", None),
    ("*linear_attn.in_proj_b*", None), ("*lm_head*", None), ("*mixer.conv1d*", None), ("*mlp.gate.*", None),
    ("*mlp.shared_expert_gate.*", None), ("*output_layer*", None), ("*proj_out.*", None), ("*router*", None),
    ("mtp.*", None), ("output.*", None), ("*embed_vision*", None), ("*vision_tower*", None), ("*visual*", None),
    ("*vision_model*", None), ("*multi_modal_projector*", None), ("*", "nn.BatchNorm1d"),
    ("*", "nn.BatchNorm2d"), ("*", "nn.BatchNorm3d"), ("*", "nn.LeakyReLU"), ("*", "nn.Embedding"),
]

# docs/modelopt_behaviour.md §7.5 rows: (quantizer_name, parent_class, enable, num_bits, axis,
# block_sizes, use_constant_amax); "unchanged" marks an enable-only row (no cfg).
OFF = ("unchanged", None, None, None)
FP8_ROW = ((4, 3), None, None, False)
NVFP4_ROW = ((2, 1), None, NVFP4_BLOCKS, False)
FP8_CAST_ROW = ((4, 3), None, None, True)
NVFP4_CAST_ROW = ((2, 1), None, NVFP4_BLOCKS, True)


def spec_table(body: tuple, kv: tuple) -> list[tuple]:
    return (
        [("*", None, False, *OFF)]
        + [("*weight_quantizer", None, True, *body), ("*input_quantizer", None, True, *body)]
        + [("*[kv]_bmm_quantizer", None, True, *kv)]
        + [(pattern, parent, False, *OFF) for pattern, parent in DD]
    )


SPEC_TABLES = {
    "fp8_default-fp8_cast_kv": spec_table(FP8_ROW, FP8_CAST_ROW),
    "nvfp4_default-fp8_cast_kv": spec_table(NVFP4_ROW, FP8_CAST_ROW),
    "nvfp4_default-nvfp4_cast_kv": spec_table(NVFP4_ROW, NVFP4_CAST_ROW),
    "fp8_default-fp8_kv": spec_table(FP8_ROW, FP8_ROW),
    "nvfp4_default-fp8_kv": spec_table(NVFP4_ROW, FP8_ROW),
    "nvfp4_default-nvfp4_kv": spec_table(NVFP4_ROW, NVFP4_ROW),
}
CAST_RECIPES = ["fp8_default-fp8_cast_kv", "nvfp4_default-fp8_cast_kv", "nvfp4_default-nvfp4_cast_kv"]


def as_spec_row(rule: QuantRule) -> tuple:
    if rule.cfg is None:
        return (rule.quantizer_name, rule.parent_class, rule.enable, *OFF)
    num_bits, block_sizes = MODELOPT_NUMERICS[rule.cfg.format]
    enable = True if rule.enable is None else rule.enable
    return (rule.quantizer_name, rule.parent_class, enable, num_bits, rule.cfg.axis, block_sizes, rule.cfg.use_constant_amax)


# --- the shipped recipes --------------------------------------------------------------------


def test_exactly_the_six_recipes_are_shipped():
    assert sorted(p.stem for p in RECIPES_DIR.glob("*.toml")) == sorted(SPEC_TABLES)


@pytest.mark.parametrize("name", sorted(SPEC_TABLES))
def test_shipped_recipe_resolves_to_spec_table_entry_by_entry(name):
    recipe = load_recipe(name)
    expected = SPEC_TABLES[name]
    assert recipe.algorithm == "max" and recipe.name == name and recipe.description
    assert len(recipe.quant_cfg) == len(expected) == 27
    for number, (rule, row) in enumerate(zip(recipe.quant_cfg, expected), start=1):
        assert as_spec_row(rule) == row, f"{name} row {number} ({rule.origin})"


@pytest.mark.parametrize("name", sorted(SPEC_TABLES))
def test_use_constant_amax_is_true_on_exactly_the_kv_entries_of_the_cast_recipes(name):
    constant = [r.quantizer_name for r in load_recipe(name).quant_cfg if r.cfg is not None and r.cfg.use_constant_amax]
    assert constant == (["*[kv]_bmm_quantizer"] if name in CAST_RECIPES else [])


@pytest.mark.parametrize("name", sorted(SPEC_TABLES))
def test_shipped_recipes_compose_units_instead_of_copying_rules(name):
    import tomllib

    document = tomllib.loads((RECIPES_DIR / f"{name}.toml").read_text())
    imports = [item["import"] for item in document["quant_cfg"]]
    assert all(set(item) == {"import"} for item in document["quant_cfg"])
    assert imports[0] == "base_disable_all" and imports[-1] == "default_disabled_quantizers"
    assert imports[1] in ("w8a8_fp8_fp8", "w4a4_nvfp4_nvfp4") and imports[2].startswith("kv_")


@pytest.mark.parametrize("name", sorted(SPEC_TABLES))
def test_resolved_recipe_written_as_toml_loads_back_to_the_same_rules(name, tmp_path):
    recipe = load_recipe(name)
    path = tmp_path / f"{name}.toml"
    path.write_text(recipe_to_toml(recipe))
    again = load_recipe(path)
    assert again.quant_cfg == recipe.quant_cfg
    assert (again.description, again.algorithm) == (recipe.description, recipe.algorithm)


# --- a small Llama-shaped model with modelopt's quantizer names -----------------------------


class QuantLinear(nn.Linear):
    def __init__(self, n: int = 4):
        super().__init__(n, n, bias=False)
        self.input_quantizer, self.weight_quantizer, self.output_quantizer = (TensorQuantizer() for _ in range(3))

    def forward(self, x):
        return self.output_quantizer(nn.functional.linear(self.input_quantizer(x), self.weight_quantizer(self.weight)))


class QuantEmbedding(nn.Embedding):
    def __init__(self):
        super().__init__(8, 4)
        self.weight_quantizer = TensorQuantizer()


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            self.add_module(name, QuantLinear())
        for name in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "p_bmm_quantizer"):
            self.add_module(name, TensorQuantizer())

    def forward(self, x):
        k, v = self.k_bmm_quantizer(self.k_proj(x)), self.v_bmm_quantizer(self.v_proj(x))
        return self.o_proj(self.q_proj(x) * k + v)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = nn.Module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            self.mlp.add_module(name, QuantLinear())

    def forward(self, x):
        x = self.self_attn(x)
        return self.mlp.down_proj(self.mlp.gate_proj(x) * self.mlp.up_proj(x))


class TinyLlama(nn.Module):
    """model.embed_tokens, model.layers.{0,1}, lm_head, as transformers names a Llama."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = QuantEmbedding()
        self.model.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.lm_head = QuantLinear()

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    for q in quantizers(model).values():
        q.start_calibration()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for q in quantizers(model).values():
        q.finish_calibration()


def expected_enabled(layers: int = 2) -> set[str]:
    """docs/modelopt_behaviour.md §7.5 "effective state on a Llama-style model"."""
    names = set()
    for i in range(layers):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            names |= {f"model.layers.{i}.{proj}.input_quantizer", f"model.layers.{i}.{proj}.weight_quantizer"}
        names |= {f"model.layers.{i}.self_attn.k_bmm_quantizer", f"model.layers.{i}.self_attn.v_bmm_quantizer"}
    return names


@pytest.mark.parametrize("name", sorted(SPEC_TABLES))
def test_applied_recipe_enables_what_spec_says_on_a_llama_shaped_model(name):
    model = TinyLlama()
    application = apply_recipe(model, load_recipe(name))
    enabled = {n for n, q in quantizers(model).items() if q.is_enabled}
    assert enabled == expected_enabled()
    kv = quantizers(model)["model.layers.1.self_attn.v_bmm_quantizer"].config
    assert kv.use_constant_amax is (name in CAST_RECIPES)
    assert kv.format == ("nvfp4" if name.endswith("nvfp4_cast_kv") or name.endswith("nvfp4_kv") else "fp8")
    # embed_tokens is switched off by the nn.Embedding parent-class rule (DD 23), lm_head by *lm_head*
    assert "model.embed_tokens.weight_quantizer" not in enabled
    assert application.matches[26] == ["model.embed_tokens.weight_quantizer"]
    assert application.matches[8] == [f"lm_head.{q}_quantizer" for q in ("input", "weight", "output")]
    assert len(application.matches[0]) == len(quantizers(model))
    unmatched = {r.quantizer_name for r in application.unmatched_rules}
    assert "*router*" in unmatched and "*[kv]_bmm_quantizer" not in unmatched


@pytest.mark.parametrize("name", CAST_RECIPES)
def test_constant_amax_survives_apply_calibration_and_state_dict(name):
    model = TinyLlama()
    apply_recipe(model, load_recipe(name))
    calibrate(model, [torch.randn(3, 4, generator=torch.Generator().manual_seed(1))])
    state = model.state_dict()
    for i in range(2):
        for kv in ("k", "v"):
            quantizer = quantizers(model)[f"model.layers.{i}.self_attn.{kv}_bmm_quantizer"]
            assert not quantizer.is_calibrated and f"model.layers.{i}.self_attn.{kv}_bmm_quantizer._amax" not in state
            assert float(quantizer.amax) == 448.0
        assert f"model.layers.{i}.self_attn.q_proj.weight_quantizer._amax" in state
    reloaded = TinyLlama()
    apply_recipe(reloaded, load_recipe(name))
    reloaded.load_state_dict(state)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(reloaded(x), model(x))


def test_calibrated_kv_recipe_calibrates_k_and_v_to_their_max_magnitude():
    model = TinyLlama(layers=1)
    apply_recipe(model, load_recipe("fp8_default-fp8_kv"))
    batch = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    calibrate(model, [batch])
    attention = model.model.layers[0].self_attn
    with torch.no_grad():  # quantization was off everywhere while collecting: unquantized K
        k = nn.functional.linear(batch, attention.k_proj.weight)
    assert torch.equal(attention.k_bmm_quantizer.amax, k.abs().max())


# --- application semantics (docs/modelopt_behaviour.md §7.2) --------------------------------


def recipe_of(*rules: QuantRule) -> rq.Recipe:
    return rq.Recipe(name="test", description="", algorithm="max", quant_cfg=list(rules), source="<test>")


def test_later_rule_wins_and_cfg_is_a_full_replacement_while_enable_only_keeps_attributes():
    model = TinyLlama(layers=1)
    k = "model.layers.0.self_attn.k_bmm_quantizer"
    apply_recipe(model, recipe_of(
        QuantRule("*", enable=False),
        QuantRule("*[kv]_bmm_quantizer", cfg=QuantizerConfig("nvfp4", use_constant_amax=True)),
        QuantRule("*k_bmm*", enable=False),
        QuantRule("*k_bmm*", enable=True),
    ))
    assert quantizers(model)[k].config == QuantizerConfig("nvfp4", use_constant_amax=True)
    apply_recipe(model, recipe_of(QuantRule("*k_bmm*", cfg=QuantizerConfig("fp8"))))
    assert quantizers(model)[k].config == QuantizerConfig("fp8")  # use_constant_amax back to False


def test_cfg_rule_with_enable_false_configures_but_leaves_the_quantizer_off():
    model = TinyLlama(layers=1)
    apply_recipe(model, recipe_of(QuantRule("*weight_quantizer", cfg=QuantizerConfig("fp8"), enable=False)))
    quantizer = quantizers(model)["lm_head.weight_quantizer"]
    assert quantizer.config.format == "fp8" and not quantizer.is_enabled


def test_glob_is_case_sensitive_crosses_dots_and_matches_fused_expert_lists():
    model = nn.Module()
    model.experts = nn.Module()
    model.experts.gate_up_proj_weight_quantizers = nn.ModuleList(TensorQuantizer() for _ in range(2))
    model.Router_quantizer = TensorQuantizer()
    application = apply_recipe(model, recipe_of(
        QuantRule("*weight_quantizer", cfg=QuantizerConfig("fp8")),
        QuantRule("*router*", cfg=QuantizerConfig("fp8")),
    ))
    assert application.matches[0] == [f"experts.gate_up_proj_weight_quantizers.{i}" for i in range(2)]
    assert application.matches[1] == [] and application.unmatched_rules[0].quantizer_name == "*router*"


def test_glob_tests_agree_with_fnmatchcase_on_every_short_pattern_and_name():
    # every pattern of up to 4 characters over the glob's specials and two letters, against every
    # name of up to 3 characters (the string tests for "*x*", "*x", "x*", "x" and the regex alike)
    def words(alphabet, longest):
        return ["".join(letters) for length in range(longest + 1) for letters in itertools.product(alphabet, repeat=length)]

    names = words("ab.[", 3)
    differ = [(pattern, name) for pattern in words("ab*?[]!", 4) for name in names
              if bool(_glob(pattern)(name)) != fnmatch.fnmatchcase(name, pattern)]
    assert differ == []


def test_parent_class_rule_matches_only_under_that_class():
    model = nn.Sequential(nn.BatchNorm2d(3), QuantLinear())
    model[0].input_quantizer = TensorQuantizer(QuantizerConfig("fp8"))
    application = apply_recipe(model, recipe_of(
        QuantRule("*", cfg=QuantizerConfig("fp8")), QuantRule("*", parent_class="nn.BatchNorm2d", enable=False),
    ))
    assert application.matches[1] == ["0.input_quantizer"]
    assert not quantizers(model)["0.input_quantizer"].is_enabled and quantizers(model)["1.input_quantizer"].is_enabled


def test_enabling_a_quantizer_that_no_rule_gave_a_format_names_the_rule():
    with pytest.raises(ValueError, match=r"quant_cfg\[0\].*enables model.layers.0.self_attn.q_bmm_quantizer.*no format"):
        apply_recipe(TinyLlama(layers=1), recipe_of(QuantRule("*q_bmm_quantizer", enable=True)))


# --- recipe vs --kv-cache-qformat (docs/modelopt_behaviour.md §8.4) -------------------------


def test_recipe_with_calibrated_kv_stays_calibrated_despite_a_cast_flag_and_says_so():
    """The seed case: a calibrated-KV recipe plus the default cast flag."""
    recipe, notices = select_recipe("nvfp4_default-fp8_kv", kv_cache_qformat="fp8_cast")
    assert recipe.quant_cfg == load_recipe("nvfp4_default-fp8_kv").quant_cfg  # never merged
    assert len(notices) == 1 and "--kv-cache-qformat fp8_cast is ignored" in notices[0]
    assert "fp8, calibrated amax" in notices[0]
    model = TinyLlama(layers=1)
    apply_recipe(model, recipe)
    calibrate(model, [torch.randn(2, 4, generator=torch.Generator().manual_seed(4))])
    k = model.model.layers[0].self_attn.k_bmm_quantizer
    assert k.is_calibrated and not k.config.use_constant_amax


def test_cast_recipe_with_a_calibrated_flag_stays_cast():
    recipe, notices = select_recipe("fp8_default-fp8_cast_kv", kv_cache_qformat="fp8")
    assert effective_config(recipe, "model.layers.0.self_attn.v_bmm_quantizer").use_constant_amax
    assert "ignored" in notices[0]


def test_recipe_without_a_flag_gives_no_notice():
    assert select_recipe("fp8_default-fp8_kv")[1] == []


@pytest.mark.parametrize(
    "qformat, kv, body, kv_rule",
    [
        ("fp8", None, FP8_ROW, FP8_CAST_ROW),  # default: fp8_cast, as modelopt's hf_ptq
        ("fp8", "fp8", FP8_ROW, FP8_ROW),
        ("nvfp4", "nvfp4_cast", NVFP4_ROW, NVFP4_CAST_ROW),
        ("nvfp4", "nvfp4", NVFP4_ROW, NVFP4_ROW),
        ("nvfp4", "fp8_cast", NVFP4_ROW, FP8_CAST_ROW),
    ],
)
def test_without_a_recipe_the_flag_kv_rule_is_appended_after_the_disabled_block(qformat, kv, body, kv_rule):
    recipe, notices = select_recipe(None, qformat=qformat, kv_cache_qformat=kv)
    expected = spec_table(body, kv_rule)
    expected = expected[:3] + expected[4:] + [expected[3]]  # hf_ptq order: [base, body, DD, KV]
    assert [as_spec_row(r) for r in recipe.quant_cfg] == expected and notices == []


def test_without_a_recipe_kv_none_adds_no_kv_rule_and_the_order_matters_for_vision_towers():
    recipe, _ = select_recipe(None, qformat="fp8", kv_cache_qformat="none")
    assert len(recipe.quant_cfg) == 26 and effective_config(recipe, "a.self_attn.k_bmm_quantizer") is None
    name = "model.vision_tower.layers.0.self_attn.k_bmm_quantizer"
    appended, _ = select_recipe(None, qformat="fp8", kv_cache_qformat="fp8")
    assert effective_config(appended, name).enable  # KV after DD: the vision tower's KV is quantized
    assert not effective_config(load_recipe("fp8_default-fp8_kv"), name).enable  # recipe: DD wins


@pytest.mark.parametrize("kwargs, message", [
    ({"qformat": "int8"}, "qformat='int8' is not known"),
    ({"kv_cache_qformat": "fp8_affine"}, "kv_cache_qformat='fp8_affine' is not known"),
])
def test_unknown_cli_formats_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_recipe(None, **kwargs)


# --- user recipes and imports ---------------------------------------------------------------


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_user_recipe_imports_shipped_units_and_its_own_which_shadow_shipped_ones(tmp_path):
    write(tmp_path, "kv_fp8.toml", '[[quant_cfg]]\nquantizer_name = "*v_bmm_quantizer"\nenable = false\n')
    path = write(tmp_path, "mine.toml", """
description = "mine"
quant_cfg = [
    { import = "base_disable_all" },
    { import = "w8a8_fp8_fp8" },
    { import = "kv_fp8" },
    { quantizer_name = "*down_proj.weight_quantizer", cfg = { import = "numerics/fp8", axis = 0 } },
]
""")
    recipe = load_recipe(str(path)[:-len(".toml")])  # a path without .toml works too
    assert recipe.name == "mine" and recipe.algorithm == "max"
    assert recipe.quant_cfg[3] == QuantRule("*v_bmm_quantizer", enable=False)  # the local kv_fp8 won
    assert recipe.quant_cfg[4].cfg == QuantizerConfig("fp8", axis=0)


def test_algorithm_none_means_no_calibration(tmp_path):
    path = write(tmp_path, "r.toml", 'algorithm = "none"\n[[quant_cfg]]\nquantizer_name = "*"\nenable = false\n')
    assert load_recipe(path).algorithm is None



# --- a recipe importing a recipe (docs/recipes.md, "Importing a recipe") ----------------------

FIRST_MLP_OFF = '{ quantizer_name = "model.layers.0.mlp.*", enable = false }'


def recipe_importing(tmp_path: Path, shipped: str, *, before: str = "", after: str = FIRST_MLP_OFF, head: str = "") -> Path:
    rules = [r for r in (before, f'{{ import = "{shipped}" }}', after) if r]
    return write(tmp_path, "mine.toml", head + "quant_cfg = [\n    " + ",\n    ".join(rules) + ",\n]\n")


def test_a_recipe_importing_a_shipped_recipe_gets_its_rules_then_its_own(tmp_path):
    path = recipe_importing(tmp_path, "nvfp4_default-fp8_cast_kv", head='description = "mine"\n')
    shipped = load_recipe("nvfp4_default-fp8_cast_kv")
    recipe = load_recipe(path)
    assert (recipe.name, recipe.description, recipe.algorithm) == ("mine", "mine", "max")
    assert recipe.quant_cfg == shipped.quant_cfg + [QuantRule("model.layers.0.mlp.*", enable=False)]
    assert [rule.origin for rule in recipe.quant_cfg[:-1]] == [rule.origin for rule in shipped.quant_cfg]
    assert effective_config(recipe, "model.layers.0.mlp.down_proj.weight_quantizer").enable is False
    assert effective_config(recipe, "model.layers.1.mlp.down_proj.weight_quantizer") == QuantizerConfig("nvfp4")


def test_a_rule_before_an_imported_recipe_is_undone_by_it(tmp_path):
    recipe = load_recipe(recipe_importing(tmp_path, "nvfp4_default-fp8_cast_kv", before=FIRST_MLP_OFF, after=""))
    assert effective_config(recipe, "model.layers.0.mlp.down_proj.weight_quantizer") == QuantizerConfig("nvfp4")


def test_the_importing_files_algorithm_and_description_stand_not_the_imported_recipes(tmp_path):
    write(tmp_path, "uncalibrated.toml",
          'description = "theirs"\nalgorithm = "none"\nquant_cfg = [{ import = "fp8_default-fp8_kv" }]\n')
    recipe = load_recipe(recipe_importing(tmp_path, "uncalibrated"))
    assert (recipe.description, recipe.algorithm) == ("", "max")
    recipe = load_recipe(recipe_importing(tmp_path, "fp8_default-fp8_kv", head='algorithm = "none"\n'))
    assert recipe.algorithm is None and recipe.quant_cfg[:-1] == load_recipe("fp8_default-fp8_kv").quant_cfg


def test_a_misspelt_recipe_import_suggests_the_shipped_recipe(tmp_path):
    path = recipe_importing(tmp_path, "nvfp4_default-fp8_cast")
    with pytest.raises(ValueError, match=r"cannot find unit 'nvfp4_default-fp8_cast'.*Did you mean 'nvfp4_default-fp8_cast_kv'\?"):
        load_recipe(path)


def test_a_recipe_importing_a_shipped_recipe_quantizes_and_exports_the_overridden_layer_in_bf16(tmp_path):
    from safetensors.torch import load_file

    from conftest import tiny_llama

    model = tiny_llama()
    recipe = load_recipe(recipe_importing(tmp_path, "nvfp4_default-fp8_cast_kv"))
    batches = [torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rq.quantize_model(model, recipe, batches, progress=False)
    first, second = (model.model.layers[i].mlp for i in (0, 1))
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert not getattr(first, name).weight_quantizer.is_enabled and not getattr(first, name).input_quantizer.is_enabled
        assert getattr(second, name).weight_quantizer.is_enabled and getattr(second, name).input_quantizer.is_enabled
    rq.export_checkpoint(model, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj.weight_scale" not in tensors
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.uint8  # packed NVFP4
    assert "model.layers.1.mlp.down_proj.weight_scale" in tensors


# --- bad input: each names the file, the key and the fix ------------------------------------

RULE = '[[quant_cfg]]\nquantizer_name = "*weight_quantizer"\n'
BAD_RECIPES = {
    "unknown_top_key": ('quant_cgf = []\n', r"bad\.toml: quant_cgf: unknown key\. Did you mean 'quant_cfg'\?"),
    "unknown_rule_key": ('[[quant_cfg]]\nquantizer_nme = "*"\nenable = false\n',
                         r"quant_cfg\[0\]\.quantizer_nme: unknown key\. Did you mean 'quantizer_name'\?"),
    "unknown_cfg_key": (RULE + 'cfg = { format = "fp8", use_constant_amx = true }\n',
                        r"quant_cfg\[0\]\.cfg\.use_constant_amx: unknown key\. Did you mean 'use_constant_amax'\?"),
    "enable_inside_cfg": (RULE + 'cfg = { format = "fp8", enable = true }\n',
                          r"cfg\.enable: unknown key\. `enable` belongs on the rule"),
    "enable_as_string": (RULE + 'enable = "false"\n',
                         r"quant_cfg\[0\]\.enable: expected true or false, got a string 'false'"),
    "axis_as_string": (RULE + 'cfg = { format = "fp8", axis = "0" }\n', r"cfg\.axis: expected an int or a list of ints"),
    "axis_as_bool": (RULE + 'cfg = { format = "fp8", axis = true }\n', r"cfg\.axis: expected an int or a list of ints"),
    "constant_as_int": (RULE + 'cfg = { format = "fp8", use_constant_amax = 1 }\n',
                        r"cfg\.use_constant_amax: expected true or false, got an integer"),
    "name_as_int": ('[[quant_cfg]]\nquantizer_name = 3\nenable = false\n', r"quantizer_name: expected a string"),
    "rules_not_a_list": ('quant_cfg = "*"\n', r"quant_cfg: expected an array of tables"),
    "unknown_format": (RULE + 'cfg = { format = "fp9" }\n',
                       r"cfg\.format: unknown format 'fp9'\. Did you mean 'fp8'\? Use one of fp8, nvfp4"),
    "nvfp4_axis": (RULE + 'cfg = { import = "numerics/nvfp4", axis = 0 }\n',
                   r"cfg\.axis: NVFP4 takes no per-channel axis.*Remove axis"),
    "cfg_without_format": (RULE + 'cfg = { axis = 0 }\n', r"quant_cfg\[0\]\.cfg: cfg has no format\. Add format"),
    "empty_rule_list": ('quant_cfg = []\n', r"quant_cfg: the rule list is empty\. Add at least one rule"),
    "no_rule_list": ('description = "x"\n', r"quant_cfg: missing\. Add \[\[quant_cfg\]\]"),
    "neither_cfg_nor_enable": (RULE, r"quant_cfg\[0\]: rule has neither cfg nor enable\. Add cfg"),
    "no_quantizer_name": ('[[quant_cfg]]\nenable = false\n', r"quant_cfg\[0\]: rule has no quantizer_name"),
    "unknown_parent_class": ('[[quant_cfg]]\nquantizer_name = "*"\nparent_class = "nn.Linaer"\nenable = false\n',
                             r"parent_class: 'nn.Linaer' is not a torch.nn module class\. Did you mean 'nn.Linear'\?"),
    "missing_import": ('quant_cfg = [{ import = "kv_fp9_cast" }]\n',
                       r"quant_cfg\[0\]\.import: cannot find unit 'kv_fp9_cast'.*Did you mean 'kv_fp8_cast'\?"),
    "import_with_other_keys": ('quant_cfg = [{ import = "kv_fp8", enable = false }]\n',
                               r"quant_cfg\[0\]: an import item takes no other keys, found enable"),
    "cfg_unit_as_rules": ('quant_cfg = [{ import = "numerics/fp8" }]\n',
                          r"'numerics/fp8' .* is a numerics unit \(a cfg\)\. Use it inside a rule"),
    "rules_unit_as_cfg": (RULE + 'cfg = { import = "kv_fp8" }\n', r"cfg\.import: 'kv_fp8' .* is a rules unit, not a cfg"),
    "unknown_algorithm": ('algorithm = "awq"\n' + RULE + 'enable = false\n', r"algorithm: unknown algorithm 'awq'"),
    "bad_syntax": ('description = "x"\n[[quant_cfg]]\nquantizer_name = "*\n', r"bad\.toml: bad TOML syntax: .*line 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_an_error_naming_file_key_and_fix(case, tmp_path):
    text, message = BAD_RECIPES[case]
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(ValueError, match=message) as error:
        load_recipe(path)
    assert "bad.toml" in str(error.value)


def test_import_cycle_is_an_error_showing_the_chain(tmp_path):
    write(tmp_path, "a.toml", 'quant_cfg = [{ import = "b" }]\n')
    write(tmp_path, "b.toml", 'quant_cfg = [{ import = "a" }]\n')
    path = write(tmp_path, "top.toml", 'quant_cfg = [{ import = "a" }]\n')
    with pytest.raises(ValueError, match=r"b\.toml: quant_cfg\[0\]\.import: import cycle: .*top\.toml -> .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_recipe(path)


def test_cfg_import_cycle_is_an_error(tmp_path):
    write(tmp_path, "n1.toml", '[cfg]\nimport = "n2"\n')
    write(tmp_path, "n2.toml", '[cfg]\nimport = "n1"\n')
    path = write(tmp_path, "top.toml", RULE + 'cfg = { import = "n1" }\n')
    with pytest.raises(ValueError, match="import cycle"):
        load_recipe(path)


def test_error_in_an_imported_unit_names_that_unit(tmp_path):
    write(tmp_path, "unit.toml", '[[quant_cfg]]\nquantizer_name = "*"\nenabel = false\n')
    path = write(tmp_path, "top.toml", 'quant_cfg = [{ import = "unit" }]\n')
    with pytest.raises(ValueError, match=r"unit\.toml: quant_cfg\[0\]\.enabel: unknown key\. Did you mean 'enable'\?"):
        load_recipe(path)


def test_unknown_recipe_name_suggests_the_closest_shipped_one():
    with pytest.raises(ValueError, match=r"'fp8_default-fp8_cast' is neither.*Did you mean 'fp8_default-fp8_cast_kv'\?"):
        load_recipe("fp8_default-fp8_cast")


def test_a_numerics_unit_is_not_a_recipe():
    with pytest.raises(ValueError, match="numerics unit"):
        load_recipe(RECIPES_DIR / "units" / "numerics" / "fp8.toml")


def test_shipped_units_are_the_shared_building_blocks_of_spec_7_3_and_7_4():
    units = {str(p.relative_to(RECIPES_DIR / "units").with_suffix("")) for p in (RECIPES_DIR / "units").rglob("*.toml")}
    assert units == {
        "base_disable_all", "default_disabled_quantizers", "w8a8_fp8_fp8", "w4a4_nvfp4_nvfp4",
        "kv_fp8", "kv_fp8_cast", "kv_nvfp4", "kv_nvfp4_cast", "numerics/fp8", "numerics/nvfp4",
    }


def test_recipe_round_trips_through_json_as_typed_dataclasses():
    recipe = load_recipe("nvfp4_default-nvfp4_cast_kv")
    again = rq.Recipe.from_json(recipe.to_json())
    assert again.quant_cfg == recipe.quant_cfg and isinstance(again.quant_cfg[3].cfg, QuantizerConfig)
