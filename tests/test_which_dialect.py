"""refquant.testing.which_dialect names the stack an output came from: for the outputs in every
shipped vector file of a quantizer (modelopt's, and the stacks' of tests/vectors/dialect_*.pt) and
for outputs each dialect produces, the right dialect reproduces every element and ranks first (or
ties for first with dialects that give the same bits there); where it is not the best, the
differing elements are named with the step where they part."""

from __future__ import annotations

import pytest
import torch
from conftest import find_case, vector_cases, vector_input

from refquant.dialects import FP8_DIALECTS, MX_DIALECTS, NVFP4_DIALECTS, fp8_steps, mx_steps, nvfp4_steps
from refquant.dialects.mx import MX_FORMATS, mx_element
from refquant.testing import which_dialect

EVERY_FINITE_BF16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
EVERY_FINITE_BF16 = EVERY_FINITE_BF16[torch.isfinite(EVERY_FINITE_BF16)].reshape(-1, 16)


def assert_named(report, expected: str) -> None:
    assert expected in report.tied and report.ranking[0].differing == 0, str(report)


def amax_of(case, key="global_amax"):
    return case[key] if case.get(key) is not None else None


# (file, case name, how to call which_dialect, expected dialect). A few cases a file keep CI short;
# those chosen are where dialects disagree most (bit patterns, ties, edges).
def modelopt_cases():
    rows = []
    for name in ("random_bf16_4x64_amax_computed", "zero_blocks_bf16_tiny_amax_given"):
        rows.append(("nvfp4_fake.pt", name, "fake", "modelopt-qtensor"))
    rows += [("nvfp4_fake_kernel_ties.pt", name, "fake", "modelopt-kernel")
             for name in ("bf16_patterns_shuffled_amax_computed", "fp32_near_ties_amax_1.0", "q_proj0_bfloat16_amax_0.5max")]
    rows += [("nvfp4_real.pt", case["name"], "codes", "modelopt-qtensor") for case in vector_cases("nvfp4_real.pt")[:6]]
    rows += [("nvfp4_fake_sweep.pt", case["name"], "fake", "modelopt-qtensor") for case in vector_cases("nvfp4_fake_sweep.pt")]
    return rows


def existing_names(rows):
    kept = []
    for file, name, form, expected in rows:
        names = {case["name"] for case in vector_cases(file)}
        if name in names:
            kept.append(pytest.param(file, name, form, expected, id=f"{file}-{name}"))
    return kept


@pytest.mark.parametrize("file, name, form, expected", existing_names(modelopt_cases()))
def test_which_dialect_names_modelopt_for_its_nvfp4_vectors(file, name, form, expected):
    case = find_case(file, name)
    x = case["x"]
    if form == "codes":
        report = which_dialect(case["packed"], x, global_amax=amax_of(case), block_scale=case["block_scale_bits"].view(torch.float8_e4m3fn))
    else:
        report = which_dialect(case["y"], x, global_amax=amax_of(case))
    assert_named(report, expected)


def test_which_dialect_names_the_kernel_for_the_cuda_nvfp4_vectors():
    cases = [case for case in vector_cases("nvfp4_fake_cuda.pt") if case["source_file"] == "nvfp4_fake.pt"][:4]
    for case in cases:
        source = find_case("nvfp4_fake.pt", case["name"])
        if source["observed_only"]:
            continue
        assert_named(which_dialect(case["y_cuda_tensorquantizer"], source["x"], global_amax=amax_of(source)),
                     "modelopt-kernel")


@pytest.mark.parametrize("file, name, key, expected", [
    ("fp8_fake_exhaustive.pt", "bf16_all_patterns_amax_3.140625", "y", "modelopt"),
    ("fp8_fake_random.pt", "bf16_4x64_std100_explicit_clip", "y", "modelopt"),
    ("fp8_fake_per_channel.pt", "bf16_16x64_axis0_explicit", "y", "modelopt"),
    ("kv_cast.pt", "fp8_key_2x4x16x64_std1", "y", "modelopt"),
])
def test_which_dialect_names_modelopt_for_its_fp8_vectors(file, name, key, expected):
    case = find_case(file, name)
    amax = case.get("amax", case.get("amax_used"))
    assert_named(which_dialect(case[key], case["x"], global_amax=amax, format="fp8"), expected)


def test_which_dialect_names_modelopt_cuda_for_the_cuda_fp8_vectors():
    case = next(c for c in vector_cases("fp8_fake_cuda.pt") if c["source_file"] == "fp8_fake_random.pt")
    source = find_case("fp8_fake_random.pt", case["name"])
    report = which_dialect(case["y_cuda"], source["x"], global_amax=source["amax"], format="fp8")
    assert_named(report, "modelopt-cuda")


def test_which_dialect_names_modelopt_qtensor_for_fp8_real_data():
    case = find_case("fp8_real.pt", "bf16_4x64_per_tensor_auto")
    report = which_dialect(case["q_bits"].view(torch.float8_e4m3fn), case["x"], format="fp8")
    assert_named(report, "modelopt-qtensor")


STACK_FILES = {"dialect_torchao.pt": "torchao", "dialect_compressed_tensors.pt": "compressed-tensors",
               "dialect_transformer_engine.pt": "transformer-engine", "dialect_microxcaling.pt": "microxcaling",
               "dialect_modelopt.pt": "modelopt-qtensor"}
MX_FORMAT_OF = {element: mx_format for mx_format, element in MX_FORMATS.items()}


def mx_dialect_of(file: str, case: dict) -> str | None:
    """The MX dialect a stack's case was computed as; None for options no dialect stands for
    (microxcaling's "even" rounding and column blocks are function options, not dialects)."""
    if file == "dialect_torchao.pt":
        return f"torchao-{case['scaling_mode']}"
    if file == "dialect_microxcaling.pt":
        return "microxcaling" if case["rounding"] == "nearest" and case["axis"] == -1 else None
    return "modelopt-qtensor"


@pytest.mark.parametrize("file", list(STACK_FILES))
def test_which_dialect_names_the_stack_for_its_vectors(file):
    named = 0
    for case in vector_cases(file):
        x = vector_input(case) if case["format"] != "layout" else None
        if case["format"] == "nvfp4" and case.get("tile_rows", 1) == 1:
            report = which_dialect(case["packed"], x, global_amax=case["global_amax"],
                                   block_scale=case["block_scale"].view(torch.float8_e4m3fn))
            assert_named(report, STACK_FILES[file])
            if "dequantized" in case:
                assert_named(which_dialect(case["dequantized"], x, global_amax=case["global_amax"]), STACK_FILES[file])
            named += 1
        elif case["format"] == "fp8" and not (case.get("per_row") or case.get("per_channel")):
            report = which_dialect(case["data"].view(torch.float8_e4m3fn), x, format="fp8")
            assert_named(report, STACK_FILES[file])
            named += 1
        elif case["format"] == "mx" and mx_dialect_of(file, case) is not None:
            mx_format, expected = MX_FORMAT_OF[case["element"]], mx_dialect_of(file, case)
            if "stored" in case:
                element = mx_element(case["element"])
                stored = case["stored"] if element.dtype is None else case["stored"].view(element.dtype)
                assert_named(which_dialect(stored, x, block_scale=case["scale"], format=mx_format), expected)
            if "dequantized" in case:
                assert_named(which_dialect(case["dequantized"], x, format=mx_format), expected)
            named += 1
    assert named > 0


@pytest.mark.parametrize("dialect", list(NVFP4_DIALECTS))
def test_which_dialect_names_each_nvfp4_dialect_alone_for_its_own_output_on_every_bf16_pattern(dialect):
    steps = nvfp4_steps(EVERY_FINITE_BF16, dialect)
    for report in (which_dialect(steps.dequantized, EVERY_FINITE_BF16),
                   which_dialect(steps.packed, EVERY_FINITE_BF16, block_scale=steps.block_scale)):
        assert report.tied == [dialect], str(report)
        assert report.ranking[1].differing > 0


@pytest.mark.parametrize("dialect", list(FP8_DIALECTS))
def test_which_dialect_names_each_fp8_dialect_for_its_own_output(dialect):
    x = EVERY_FINITE_BF16
    report = which_dialect(fp8_steps(x, dialect).dequantized, x, format="fp8")
    assert_named(report, dialect)


MX_PAIRS = [(mx_format, name) for mx_format, table in MX_DIALECTS.items() for name in table]


@pytest.mark.parametrize("mx_format, dialect", MX_PAIRS, ids=[f"{f}-{d}" for f, d in MX_PAIRS])
def test_which_dialect_names_each_mx_dialect_alone_for_its_own_output_on_every_bf16_pattern(mx_format, dialect):
    x = EVERY_FINITE_BF16.reshape(-1, 32)
    steps = mx_steps(x, dialect, mx_format)
    for report in (which_dialect(steps.dequantized, x, format=mx_format),
                   which_dialect(steps.stored, x, block_scale=steps.scale_e8m0)):
        assert report.format == mx_format and report.tied == [dialect], str(report)
        assert report.ranking[1].differing > 0


def test_which_dialect_explains_where_the_best_mx_dialect_parts_from_the_output():
    x = EVERY_FINITE_BF16.reshape(-1, 32)
    output = mx_steps(x, "microxcaling", "mxfp4")
    others = ["torchao-ceil", "modelopt-qtensor"]
    from_values = which_dialect(output.dequantized, x, format="mxfp4", dialects=others)
    from_codes = which_dialect(output.stored, x, block_scale=output.scale, format="mxfp4", dialects=others)
    for report in (from_values, from_codes):
        assert report.ranking[0].differing > 0
        assert sum(report.differing_by_step.values()) == report.ranking[0].differing
        assert "element tie" in report.differing_by_step, report.differing_by_step
        assert "E8M0 scale 0x" in str(report)
    # Codes come with their scale bytes, so a block scaled otherwise is seen as such; fake-quant
    # values only show it where they fall off the best dialect's grid.
    assert "shared exponent" in from_codes.differing_by_step


def test_which_dialect_rejects_mx_elements_without_scales_and_an_mx_global_amax():
    x = EVERY_FINITE_BF16[:64].reshape(-1, 32)
    steps = mx_steps(x, "torchao-floor", "mxfp8_e5m2")
    with pytest.raises(ValueError, match="E8M0 scales"):
        which_dialect(steps.stored, x)
    with pytest.raises(ValueError, match="drop global_amax"):
        which_dialect(steps.dequantized, x, format="mxfp8_e5m2", global_amax=1.0)


def test_which_dialect_explains_where_the_best_parts_from_the_output():
    x = EVERY_FINITE_BF16
    output = nvfp4_steps(x, "trtllm").dequantized
    report = which_dialect(output, x, dialects=["transformer-engine", "torchao", "compressed-tensors"])
    assert report.best == "transformer-engine" and report.ranking[0].differing > 0
    assert sum(report.differing_by_step.values()) == report.ranking[0].differing
    text = str(report)
    assert "differing elements part at" in text and "at [" in text


def test_which_dialect_refuses_fp8_data_of_another_shape_than_x():
    """E4M3 data of another shape would broadcast against each dialect's data and be counted."""
    x = EVERY_FINITE_BF16[:4]
    data = fp8_steps(x, "torchao").data
    with pytest.raises(ValueError, match="E4M3 data of x's shape"):
        which_dialect(data[:1], x, format="fp8")


def test_which_dialect_rejects_packed_codes_without_block_scales():
    x = EVERY_FINITE_BF16[:4]
    with pytest.raises(ValueError, match="block_scale"):
        which_dialect(nvfp4_steps(x, "torchao").packed, x)


def test_cli_which_names_the_dialect_from_pt_and_safetensors_files(tmp_path, capsys):
    from safetensors.torch import save_file

    from refquant.cli import main

    x = EVERY_FINITE_BF16[:512]
    steps = nvfp4_steps(x, "compressed-tensors")
    torch.save({"x": x, "y": steps.dequantized}, tmp_path / "run.pt")
    save_file({"weight_packed": steps.packed, "weight_scale": steps.block_scale}, tmp_path / "q.safetensors")
    assert main(["which", "--x", f"{tmp_path}/run.pt:x", "--output", f"{tmp_path}/run.pt:y"]) == 0
    assert "best: compressed-tensors" in capsys.readouterr().out
    assert main(["which", "--x", f"{tmp_path}/run.pt:x", "--output", f"{tmp_path}/q.safetensors:weight_packed",
                 "--block-scale", f"{tmp_path}/q.safetensors:weight_scale"]) == 0
    assert "best: compressed-tensors" in capsys.readouterr().out
    assert main(["which", "--x", f"{tmp_path}/run.pt", "--output", f"{tmp_path}/run.pt:y"]) == 2
    assert "name one as" in capsys.readouterr().err
    mx = mx_steps(x.reshape(-1, 32), "modelopt-qtensor", "mxfp8_e4m3")
    torch.save({"x": x.reshape(-1, 32), "y": mx.dequantized, "data": mx.stored, "scale": mx.scale}, tmp_path / "mx.pt")
    assert main(["which", "--x", f"{tmp_path}/mx.pt:x", "--output", f"{tmp_path}/mx.pt:y", "--format", "mxfp8_e4m3"]) == 0
    assert "best: modelopt-qtensor" in capsys.readouterr().out
    assert main(["which", "--x", f"{tmp_path}/mx.pt:x", "--output", f"{tmp_path}/mx.pt:data",
                 "--block-scale", f"{tmp_path}/mx.pt:scale", "--format", "mxfp8_e4m3"]) == 0
    assert "best: modelopt-qtensor" in capsys.readouterr().out


def test_a_block_scale_of_the_wrong_size_is_a_clear_error():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    steps = nvfp4_steps(x, "torchao")
    with pytest.raises(ValueError, match="block_scale has 64 elements for 128 NVFP4 blocks"):
        which_dialect(steps.packed, x, block_scale=steps.block_scale[:, :2])
