"""Bad input gets a ValueError that names the bad value and says what to do
(docs/contract.md).

One row per mistake: the call, and words the message must contain (what is wrong, and the fix).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import refquant as rq

X = torch.linspace(-3, 3, 128).reshape(4, 32)

# (id, call, fragments the message must contain)
BAD_CALLS = [
    # --- non-float input: every entry point, several kinds of "not a float tensor" ---
    ("fp8_fake_int_tensor", lambda: rq.fp8_fake_quant(torch.ones(4, dtype=torch.int32), 1.0), ["torch.int32", "x.to(torch.float32)"]),
    ("fp8_fake_float64", lambda: rq.fp8_fake_quant(torch.ones(4, dtype=torch.float64), 1.0), ["torch.float64", "float32, bfloat16 and float16"]),
    ("fp8_fake_float8_input", lambda: rq.fp8_fake_quant(torch.ones(4).to(torch.float8_e4m3fn), 1.0), ["torch.float8_e4m3fn"]),
    ("fp8_fake_python_list", lambda: rq.fp8_fake_quant([1.0, 2.0], 1.0), ["torch.Tensor", "list"]),
    ("fp8_fake_numpy_array", lambda: rq.fp8_fake_quant(np.ones(4, dtype=np.float32), 1.0), ["torch.Tensor", "ndarray"]),
    ("fp8_quantize_int8", lambda: rq.fp8_quantize(torch.ones(4, dtype=torch.int8)), ["torch.int8", "Convert it first"]),
    ("nvfp4_fake_int64", lambda: rq.nvfp4_fake_quant(torch.ones(16, dtype=torch.int64)), ["torch.int64", "Convert it first"]),
    ("nvfp4_quantize_uint8", lambda: rq.nvfp4_quantize(torch.ones(16, dtype=torch.uint8)), ["torch.uint8", "Convert it first"]),
    ("nvfp4_quantize_bool", lambda: rq.nvfp4_quantize(torch.ones(16, dtype=torch.bool)), ["torch.bool"]),
    # --- negative, NaN or infinite amax (modelopt would silently treat it as 1.0 or make NaN) ---
    ("fp8_fake_negative_amax", lambda: rq.fp8_fake_quant(X, -1.0), ["amax", "-1.0", ">= 0", "amax=None"]),
    ("fp8_fake_negative_amax_tensor", lambda: rq.fp8_fake_quant(X, torch.tensor(-2.0)), ["amax", "-2.0"]),
    ("fp8_fake_nan_amax", lambda: rq.fp8_fake_quant(X, float("nan")), ["amax", "nan", "finite"]),
    ("fp8_fake_inf_amax", lambda: rq.fp8_fake_quant(X, float("inf")), ["amax", "inf", "finite"]),
    ("fp8_fake_one_negative_channel", lambda: rq.fp8_fake_quant(X, torch.tensor([[1.0], [-0.5], [1.0], [1.0]])), ["amax", "-0.5"]),
    ("fp8_quantize_negative_amax", lambda: rq.fp8_quantize(X, amax=-1.0), ["amax", "-1.0"]),
    ("fp8_quantize_negative_scale", lambda: rq.fp8_quantize(X, scale=-1.0), ["scale", "-1.0", "scale=None"]),
    ("nvfp4_fake_negative_amax", lambda: rq.nvfp4_fake_quant(X, -3.0), ["amax", "-3.0", "amax=None"]),
    ("nvfp4_quantize_negative_amax", lambda: rq.nvfp4_quantize(X, torch.tensor(-1.0)), ["amax", "-1.0"]),
    ("nvfp4_quantize_nan_amax", lambda: rq.nvfp4_quantize(X, float("nan")), ["amax", "nan"]),
    ("fp8_fake_inf_amax_tensor", lambda: rq.fp8_fake_quant(X, torch.tensor(float("inf"))), ["amax", "inf", "finite"]),
    ("nvfp4_fake_nan_amax_tensor", lambda: rq.nvfp4_fake_quant(X, torch.tensor(float("nan"))), ["amax", "nan", "finite"]),
    # --- an amax or scale that fp32 cannot hold (the numerics compute in fp32: 1e300 became inf) ---
    ("fp8_fake_amax_beyond_fp32", lambda: rq.fp8_fake_quant(X, 1e300), ["amax", "1e+300", "fp32", "3.4028234"]),
    ("fp8_fake_float64_amax_beyond_fp32", lambda: rq.fp8_fake_quant(X, torch.tensor(1e300, dtype=torch.float64)), ["amax", "1e+300", "fp32"]),
    ("fp8_fake_float64_amax_just_beyond_fp32", lambda: rq.fp8_fake_quant(X, torch.tensor(3.5e38, dtype=torch.float64)), ["amax", "3.5e+38", "fp32"]),
    ("nvfp4_fake_float64_amax_beyond_fp32", lambda: rq.nvfp4_fake_quant(X, torch.tensor(1e300, dtype=torch.float64)), ["amax", "fp32"]),
    ("nvfp4_quantize_amax_beyond_fp32", lambda: rq.nvfp4_quantize(X, 1e39), ["amax", "1e+39", "fp32"]),
    ("fp8_quantize_amax_beyond_fp32", lambda: rq.fp8_quantize(X, amax=torch.tensor(-1e300, dtype=torch.float64).abs()), ["amax", "fp32"]),
    ("fp8_quantize_scale_beyond_fp32", lambda: rq.fp8_quantize(X, scale=1e40), ["scale", "fp32"]),
    ("fp8_quantize_scale_zero_in_fp32", lambda: rq.fp8_quantize(X, scale=torch.tensor(1e-300, dtype=torch.float64)), ["scale", "> 0", "fp32"]),
    ("fp8_quantize_scale_number_zero_in_fp32", lambda: rq.fp8_quantize(X, scale=1e-60), ["scale", "> 0", "fp32"]),
    # --- amax that is neither per-tensor nor a keep-dims per-channel shape ---
    ("fp8_fake_amax_without_keepdim", lambda: rq.fp8_fake_quant(X, torch.ones(4)), ["(4,)", "(4, 32)", "keepdim=True", "(4, 1)"]),
    ("fp8_fake_amax_wrong_channel_count", lambda: rq.fp8_fake_quant(X, torch.ones(32, 1)), ["(32, 1)", "(4, 32)", "Reshape it"]),
    ("fp8_fake_amax_extra_dim", lambda: rq.fp8_fake_quant(X, torch.ones(1, 4, 1)), ["(1, 4, 1)", "(4, 32)"]),
    ("fp8_quantize_amax_wrong_shape", lambda: rq.fp8_quantize(X, amax=torch.ones(5, 1)), ["(5, 1)", "(4, 32)"]),
    ("nvfp4_fake_per_channel_amax", lambda: rq.nvfp4_fake_quant(X, torch.ones(4, 1)), ["one global amax", "(4, 1)", "0-d tensor"]),
    ("nvfp4_quantize_per_channel_amax", lambda: rq.nvfp4_quantize(X, torch.ones(4, 2)), ["one global amax", "(4, 2)"]),
    # --- amax of the wrong type ---
    ("fp8_fake_integer_amax_tensor", lambda: rq.fp8_fake_quant(X, torch.tensor(3)), ["torch.int64", "floating-point"]),
    ("fp8_fake_string_amax", lambda: rq.fp8_fake_quant(X, "1.0"), ["float or a tensor", "str"]),
    ("fp8_fake_bool_amax", lambda: rq.fp8_fake_quant(X, True), ["float or a tensor", "bool"]),
    # --- other arguments ---
    ("fp8_fake_unknown_flavor", lambda: rq.fp8_fake_quant(X, 1.0, flavor="cuda"), ["'cuda'", "modelopt-cpu", "modelopt-cuda"]),
    ("nvfp4_quantize_unknown_flavor", lambda: rq.nvfp4_quantize(X, flavor="gpu"), ["'gpu'", "modelopt-cpu"]),
    ("fp8_fake_amax_and_axis", lambda: rq.fp8_fake_quant(X, 1.0, axis=0), ["amax", "axis"]),
    ("fp8_fake_axis_out_of_range", lambda: rq.fp8_fake_quant(X, None, axis=2), ["axis 2", "[-2, 1]"]),
    ("fp8_quantize_amax_and_scale", lambda: rq.fp8_quantize(X, amax=1.0, scale=1.0), ["amax", "scale"]),
    ("fp8_quantize_zero_block_size", lambda: rq.fp8_quantize(X, block_size=0), ["block_size", "0"]),
    ("fp8_quantize_axis_and_block_size", lambda: rq.fp8_quantize(X, axis=0, block_size=16), ["axis", "block_size"]),
    ("nvfp4_fake_0d_input", lambda: rq.nvfp4_fake_quant(torch.tensor(1.0)), ["0-d", "(1,)"]),
    ("nvfp4_quantize_0d_input", lambda: rq.nvfp4_quantize(torch.tensor(1.0)), ["0-d"]),
    ("fp8_quantize_zero_scale", lambda: rq.fp8_quantize(X, scale=0.0), ["scale", "> 0", "scale=None"]),
    ("fp8_quantize_zero_scale_tensor", lambda: rq.fp8_quantize(X, scale=torch.zeros(4, 1)), ["scale", "> 0"]),
    ("fp8_quantize_empty_input", lambda: rq.fp8_quantize(torch.ones(0, 8)), ["(0, 8)", "empty"]),
    ("nvfp4_quantize_empty_input", lambda: rq.nvfp4_quantize(torch.ones(3, 0)), ["(3, 0)", "empty"]),
    ("nvfp4_fake_unknown_flavor", lambda: rq.nvfp4_fake_quant(X, 1.0, flavor="triton"), ["'triton'", "modelopt-cpu"]),
]


@pytest.mark.parametrize("call, fragments", [pytest.param(c, f, id=i) for i, c, f in BAD_CALLS])
def test_bad_input_raises_value_error_that_names_the_problem(call, fragments):
    with pytest.raises(ValueError) as raised:
        call()
    message = str(raised.value)
    missing = [fragment for fragment in fragments if fragment not in message]
    assert not missing, f"message {message!r} lacks {missing}"


@pytest.mark.parametrize(
    "amax",
    [0.0, 2.0**-30, torch.tensor(0.0), torch.tensor(1.0, dtype=torch.bfloat16), torch.ones(1), torch.ones(4, 1), torch.ones(1, 32)],
    ids=["zero", "tiny", "zero_tensor", "bf16_tensor", "shape_1", "per_row", "per_column"],
)
def test_fp8_fake_quant_accepts_every_valid_amax_form(amax):
    """Edge values that are valid: amax 0 and tiny amax act as 1.0 (docs/modelopt_behaviour.md
    §1.5), keep-dims shapes."""
    y = rq.fp8_fake_quant(X, amax)
    assert y.shape == X.shape and y.dtype == X.dtype


def test_nvfp4_accepts_zero_global_amax():
    """G = 0 (calibrated on zeros) is valid: defined outputs, docs/modelopt_behaviour.md §3.5 and
    docs/contract.md §5."""
    assert torch.isfinite(rq.nvfp4_fake_quant(X, 0.0)).all()
    assert torch.isfinite(rq.nvfp4_quantize(torch.zeros(2, 16), 0.0).dequantize()).all()
