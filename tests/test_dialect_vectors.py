"""refquant.dialects against each stack's own outputs, bit for bit (NaN == NaN): the vector files
scripts/make_dialect_vectors.py made by running torchao 0.18, compressed-tensors 0.19 with
llm-compressor 0.14's observers, TransformerEngine 2.20's PyTorch reference, microxcaling (the OCP
MX reference code) and modelopt 0.47's MX tensors on fixed inputs (docs/dialects.md). CI has none
of these stacks installed (modelopt aside): the tests read the vectors only."""

from __future__ import annotations

import pytest
import torch
from conftest import vector_cases, vector_input

from refquant.dialects import compressed_tensors, from_swizzled, microxcaling, modelopt, to_swizzled, torchao
from refquant.dialects import transformer_engine
from refquant.dialects.mx import mx_element
from refquant.testing import assert_bitexact

FILES = {
    "dialect_torchao.pt": torchao,
    "dialect_compressed_tensors.pt": compressed_tensors,
    "dialect_transformer_engine.pt": transformer_engine,
    "dialect_microxcaling.pt": microxcaling,
    "dialect_modelopt.pt": modelopt,
}


def cases_of(kind: str) -> list:
    return [pytest.param(name, case, id=f"{name.removesuffix('.pt')}-{case['name']}")
            for name in FILES for case in vector_cases(name) if case["format"] == kind]


def e4m3(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("name, case", cases_of("nvfp4"))
def test_nvfp4_dialect_gives_the_stacks_scales_codes_and_dequantized_values(name, case):
    options = {"tile_rows": case["tile_rows"]} if "tile_rows" in case else {}
    steps = FILES[name].nvfp4_steps(vector_input(case), case["global_amax"], **options)
    assert_bitexact(steps.global_scale.reshape(()), case["global_scale"].reshape(()).float(), "global scale")
    assert_bitexact(steps.block_scale.reshape(-1), e4m3(case["block_scale"]).reshape(-1), "block scales")
    assert_bitexact(steps.packed.reshape(-1), case["packed"].reshape(-1), "packed codes")
    if "dequantized" in case:
        assert_bitexact(steps.dequantized, case["dequantized"], "dequantized")


@pytest.mark.parametrize("name, case", cases_of("fp8"))
def test_fp8_dialect_gives_the_stacks_scale_data_and_dequantized_values(name, case):
    options = {key: True for key in ("per_row", "per_channel") if case.get(key)}
    steps = FILES[name].fp8_steps(vector_input(case), None, **options)
    assert_bitexact(steps.scale.reshape(-1).to(case["scale"].dtype), case["scale"].reshape(-1), "scale")
    assert_bitexact(steps.data, e4m3(case["data"]), "data")
    if "dequantized" in case:
        assert_bitexact(steps.dequantized, case["dequantized"], "dequantized")


def mx_steps_for(name: str, case: dict):
    x = vector_input(case)
    if name == "dialect_torchao.pt":
        return torchao.mx_steps(x, case["element"], case["scaling_mode"])
    if name == "dialect_microxcaling.pt":
        return microxcaling.mx_steps(x, case["element"], axis=case["axis"], rounding=case["rounding"])
    return modelopt.mxfp4_qtensor_steps(x) if case["element"] == "e2m1" else modelopt.mxfp8_qtensor_steps(x)


@pytest.mark.parametrize("name, case", cases_of("mx"))
def test_mx_dialect_gives_the_stacks_e8m0_scales_elements_and_dequantized_values(name, case):
    steps = mx_steps_for(name, case)
    if "scale" in case:
        assert_bitexact(steps.scale.reshape(-1), case["scale"].reshape(-1), "E8M0 scale bytes")
    if "stored" in case:
        element = mx_element(case["element"])
        stored = case["stored"] if element.dtype is None else case["stored"].view(element.dtype)
        assert_bitexact(steps.stored.reshape(-1), stored.reshape(-1), "stored elements")
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
    assert kinds == {"dialect_torchao.pt": {"nvfp4", "fp8", "mx", "layout"},
                     "dialect_compressed_tensors.pt": {"nvfp4", "fp8"},
                     "dialect_transformer_engine.pt": {"nvfp4", "fp8", "layout"},
                     "dialect_microxcaling.pt": {"mx"},
                     "dialect_modelopt.pt": {"mx"}}


def test_mx_vectors_cover_every_element_format_and_mode_of_each_stack():
    def seen(name, key):
        return {(case["element"], case.get(key)) for case in vector_cases(name) if case["format"] == "mx"}

    elements = {"e4m3", "e5m2", "e2m1"}
    assert seen("dialect_torchao.pt", "scaling_mode") == {(e, m) for e in elements for m in torchao.SCALING_MODES}
    assert seen("dialect_microxcaling.pt", "rounding") == {(e, r) for e in elements for r in ("nearest", "even")}
    assert seen("dialect_modelopt.pt", "element") == {("e4m3", "e4m3"), ("e2m1", "e2m1")}
    every_case_checks_an_output = all("dequantized" in case or "stored" in case
                                      for name in FILES for case in vector_cases(name) if case["format"] == "mx")
    assert every_case_checks_an_output
