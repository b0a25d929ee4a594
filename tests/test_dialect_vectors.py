"""refquant.dialects against each stack's own outputs, bit for bit (NaN == NaN): the vector files
scripts/make_dialect_vectors.py made by running torchao 0.18, compressed-tensors 0.19 with
llm-compressor 0.14's observers, and TransformerEngine 2.20's PyTorch reference on fixed inputs
(docs/dialects.md). CI has none of these stacks installed: the tests read the vectors only."""

from __future__ import annotations

import pytest
import torch
from conftest import vector_cases

from refquant.dialects import compressed_tensors, from_swizzled, to_swizzled, torchao, transformer_engine
from refquant.testing import assert_bitexact

FILES = {
    "dialect_torchao.pt": torchao,
    "dialect_compressed_tensors.pt": compressed_tensors,
    "dialect_transformer_engine.pt": transformer_engine,
}


def cases_of(kind: str) -> list:
    return [pytest.param(name, case, id=f"{name.removesuffix('.pt')}-{case['name']}")
            for name in FILES for case in vector_cases(name) if case["format"] == kind]


def e4m3(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("name, case", cases_of("nvfp4"))
def test_nvfp4_dialect_gives_the_stacks_scales_codes_and_dequantized_values(name, case):
    options = {"tile_rows": case["tile_rows"]} if "tile_rows" in case else {}
    steps = FILES[name].nvfp4_steps(case["x"], case["global_amax"], **options)
    assert_bitexact(steps.global_scale.reshape(()), case["global_scale"].reshape(()).float(), "global scale")
    assert_bitexact(steps.block_scale.reshape(-1), e4m3(case["block_scale"]).reshape(-1), "block scales")
    assert_bitexact(steps.packed.reshape(-1), case["packed"].reshape(-1), "packed codes")
    if "dequantized" in case:
        assert_bitexact(steps.dequantized, case["dequantized"], "dequantized")


@pytest.mark.parametrize("name, case", cases_of("fp8"))
def test_fp8_dialect_gives_the_stacks_scale_data_and_dequantized_values(name, case):
    options = {key: True for key in ("per_row", "per_channel") if case.get(key)}
    steps = FILES[name].fp8_steps(case["x"], None, **options)
    assert_bitexact(steps.scale.reshape(-1).to(case["scale"].dtype), case["scale"].reshape(-1), "scale")
    assert_bitexact(steps.data, e4m3(case["data"]), "data")
    if "dequantized" in case:
        assert_bitexact(steps.dequantized, case["dequantized"], "dequantized")


@pytest.mark.parametrize("name, case", cases_of("layout"))
def test_swizzled_scale_layout_matches_the_stacks_own(name, case):
    linear, swizzled = case["linear"], case["swizzled"].reshape(-1)
    assert_bitexact(from_swizzled(swizzled, *linear.shape), linear, "linear scales")
    if name == "dialect_torchao.pt":  # torchao's to_blocked pads with zeros, as to_swizzled does
        assert_bitexact(to_swizzled(linear), swizzled, "swizzled scales")


def test_every_dialect_vector_file_holds_cases_of_each_kind():
    kinds = {name: {case["format"] for case in vector_cases(name)} for name in FILES}
    assert kinds == {"dialect_torchao.pt": {"nvfp4", "fp8", "layout"},
                     "dialect_compressed_tensors.pt": {"nvfp4", "fp8"},
                     "dialect_transformer_engine.pt": {"nvfp4", "fp8", "layout"}}
