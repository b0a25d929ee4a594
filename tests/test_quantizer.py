"""TensorQuantizer: where its amax comes from, max calibration, constant-amax KV cast, state_dict.

docs/modelopt_behaviour.md §1.2 (amax priority), §5 (use_constant_amax), §6 (max calibration).
Inputs are hand-made so the right amax is known without running the code under test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import vector_cases

import refquant as rq
from refquant import QuantizerConfig, TensorQuantizer
from refquant.testing import assert_bitexact

FP8 = QuantizerConfig(format="fp8")
NVFP4 = QuantizerConfig(format="nvfp4")
FP8_CAST = QuantizerConfig(format="fp8", use_constant_amax=True)
NVFP4_CAST = QuantizerConfig(format="nvfp4", use_constant_amax=True)


def calibrate(quantizer: TensorQuantizer, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    quantizer.start_calibration()
    outputs = [quantizer(batch) for batch in batches]
    quantizer.finish_calibration()
    return outputs


# --- constant amax: the KV-cache "cast" modes (docs/modelopt_behaviour.md §5) ------------------


@pytest.mark.parametrize("case", [c for c in vector_cases("kv_cast.pt") if c["format"] == "fp8"], ids=lambda c: c["name"])
def test_fp8_cast_quantizer_output_equals_kv_cast_vectors_bit_for_bit(case):
    quantizer = TensorQuantizer(FP8_CAST)
    assert_bitexact(quantizer(case["x"]), case["y"], case["name"])
    assert_bitexact(quantizer.amax, case["amax_used"], "amax")
    assert quantizer.is_calibrated is case["has_amax_buffer"] is False


@pytest.mark.parametrize("case", [c for c in vector_cases("kv_cast.pt") if c["format"] == "nvfp4"], ids=lambda c: c["name"])
def test_nvfp4_cast_quantizer_output_equals_nvfp4_fake_quant_with_amax_448(case):
    # kv_cast.pt's nvfp4 `y` is modelopt's CPU stand-in (real quant); the fake-quant kernel's own
    # outputs are checked against nvfp4_fake_quant in test_nvfp4_vectors.py.
    quantizer = TensorQuantizer(NVFP4_CAST)
    assert_bitexact(quantizer(case["x"]), rq.nvfp4_fake_quant(case["x"], 448.0), case["name"])
    assert "_amax" not in quantizer.state_dict()


@pytest.mark.parametrize("config", [FP8_CAST, NVFP4_CAST], ids=["fp8", "nvfp4"])
def test_constant_amax_is_untouched_by_calibration_and_data_passes_through_while_collecting(config):
    quantizer = TensorQuantizer(config)
    batch = torch.tensor([[1000.0, -3.0, 0.1, 7.0] * 4])
    outputs = calibrate(quantizer, [batch, batch * 2])
    for output, expected in zip(outputs, [batch, batch * 2]):
        assert_bitexact(output, expected, "calibration forward is the identity")
    assert not quantizer.is_calibrated and "_amax" not in quantizer.state_dict()
    assert_bitexact(quantizer.amax, torch.tensor(448.0), "amax")
    expected = rq.fp8_fake_quant(batch, 448.0) if config.format == "fp8" else rq.nvfp4_fake_quant(batch, 448.0)
    assert_bitexact(quantizer(batch), expected, "after calibration")


def test_constant_amax_quantizer_refuses_a_stored_amax():
    quantizer = TensorQuantizer(FP8_CAST)
    with pytest.raises(ValueError, match="constant amax 448"):
        quantizer.set_amax(torch.tensor(3.0))
    with pytest.raises(RuntimeError, match="constant-amax quantizer stores no amax"):
        quantizer.load_state_dict({"_amax": torch.tensor(3.0)})


def test_switching_to_constant_amax_drops_an_earlier_calibrated_amax():
    quantizer = TensorQuantizer(FP8)
    calibrate(quantizer, [torch.tensor([2.0, -5.0])])
    quantizer.set_config(FP8_CAST)
    assert not quantizer.is_calibrated
    assert_bitexact(quantizer.amax, torch.tensor(448.0), "amax")


# --- max calibration (docs/modelopt_behaviour.md §6) ---------------------------------------


def test_per_tensor_amax_is_the_largest_magnitude_over_all_batches_in_the_input_dtype():
    batches = [
        torch.tensor([[0.5, -1.25], [2.0, 0.0]], dtype=torch.bfloat16),
        torch.tensor([[-6.5, 3.0], [1.0, 1.0]], dtype=torch.bfloat16),  # largest |x| is negative
        torch.tensor([[4.0, -0.25], [0.0, 5.0]], dtype=torch.bfloat16),
    ]
    quantizer = TensorQuantizer(FP8)
    calibrate(quantizer, batches)
    assert_bitexact(quantizer.amax, torch.tensor(6.5, dtype=torch.bfloat16), "amax")
    assert quantizer.amax.shape == () and quantizer.is_calibrated


def test_a_long_calibration_folds_its_per_call_maxima_into_the_max_of_every_call():
    """Per-tensor collection keeps one max|x| a call and folds them now and then; the stored amax
    is the max over every call whatever the folds (and NaN in any call wins, as torch.maximum's)."""
    from refquant.quant import quantizer as quantizer_module

    calls = 3 * quantizer_module._FOLD_EVERY + 5
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 32, generator=generator).bfloat16() * (1 + i % 7) for i in range(calls)]
    q = TensorQuantizer(QuantizerConfig(format="fp8"))
    q.start_calibration()
    for x in batches:
        q(x)
    q.finish_calibration()
    assert torch.equal(q.amax, torch.stack([x.abs().amax() for x in batches]).amax())
    assert q.amax.dtype == torch.bfloat16
    q.start_calibration()
    for index, x in enumerate(batches):
        q(x if index != quantizer_module._FOLD_EVERY + 1 else torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="saw NaN"):
        q.finish_calibration()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_kernel_max_abs_is_max_abs_for_every_pattern_of_the_dtype(dtype):
    """The calibration's one-reduction max|x| against the numerics' max_abs, over every bit
    pattern (NaN, inf, zeros of both signs, subnormals), in chunks so each maximum is exercised."""
    from refquant.numerics.checks import max_abs, max_abs_one_kernel

    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for chunk in patterns.to(device).reshape(-1, 64, 16).unbind(0):
            expected, got = max_abs(chunk), max_abs_one_kernel(chunk)
            assert got.dtype == dtype
            assert torch.equal(got.view(torch.int16), expected.view(torch.int16)) or (got.isnan() and expected.isnan()), chunk


def test_per_channel_amax_keeps_dims_and_takes_each_channels_max_over_batches():
    first = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-9.0, 1.0, 1.0]])
    second = torch.tensor([[3.0, 0.0, 0.0], [0.0, -0.25, 0.0], [1.0, 1.0, 1.0]])
    quantizer = TensorQuantizer(QuantizerConfig(format="fp8", axis=0))
    calibrate(quantizer, [first, second])
    assert_bitexact(quantizer.amax, torch.tensor([[3.0], [0.25], [9.0]]), "amax (3, 1)")
    # and the forward uses that per-channel amax
    assert_bitexact(quantizer(first), rq.fp8_fake_quant(first, torch.tensor([[3.0], [0.25], [9.0]])), "y")


def test_per_channel_amax_along_the_last_axis_of_a_3d_activation():
    x = torch.zeros(2, 3, 4)
    x[1, 2, 0], x[0, 0, 3], x[1, 1, 1], x[0, 1, 2] = -7.0, 2.0, 0.5, 1.5
    quantizer = TensorQuantizer(QuantizerConfig(format="fp8", axis=-1))
    calibrate(quantizer, [x])
    assert_bitexact(quantizer.amax, torch.tensor([[[7.0, 0.5, 1.5, 2.0]]]), "amax (1, 1, 4)")


def test_calibration_forward_returns_the_input_unchanged():
    x = torch.tensor([0.1, 1.0 / 3.0, 100.0, -2.7182817])  # none of these is on the FP8 grid
    quantizer = TensorQuantizer(FP8)
    quantizer.set_amax(torch.tensor(1.0))  # even a quantizer holding an amax stops quantizing
    quantizer.start_calibration()
    assert_bitexact(quantizer(x), x, "quantization is off while collecting")
    quantizer.finish_calibration()
    assert_bitexact(quantizer.amax, torch.tensor(100.0), "recalibrated amax")
    assert_bitexact(quantizer(x), rq.fp8_fake_quant(x, 100.0), "quantizing again afterwards")


def test_quantizer_that_saw_no_data_keeps_no_amax_and_uses_each_calls_own_amax():
    quantizer = TensorQuantizer(FP8)
    calibrate(quantizer, [])
    calibrate(quantizer, [torch.empty(0, 4)])  # empty tensors never reach the calibrator
    assert quantizer.amax is None and not quantizer.is_calibrated
    x = torch.tensor([3.0, -0.7, 0.01])
    assert_bitexact(quantizer(x), rq.fp8_fake_quant(x), "dynamic amax = max|x| of this call")


def test_disabled_quantizer_neither_collects_nor_quantizes():
    quantizer = TensorQuantizer(QuantizerConfig(format="fp8", enable=False))
    x = torch.tensor([0.1, 3.3])
    calibrate(quantizer, [x])
    assert not quantizer.is_calibrated
    assert_bitexact(quantizer(x), x, "pass-through")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_activation_during_calibration_is_a_clear_error(bad):
    quantizer = TensorQuantizer(FP8, name="model.layers.0.mlp.up_proj.input_quantizer")
    quantizer.start_calibration()
    quantizer(torch.tensor([1.0, bad, 2.0]))  # checked once at the end: no device read-back per call
    quantizer(torch.tensor([3.0, 2.0]))  # a later good batch does not hide it
    with pytest.raises(ValueError, match=r"up_proj\.input_quantizer saw (NaN|inf)"):
        quantizer.finish_calibration()
    assert not quantizer.is_calibrated


def test_nvfp4_calibration_records_one_global_amax_used_by_the_forward():
    x = torch.arange(-16.0, 16.0).reshape(2, 16) / 4
    quantizer = TensorQuantizer(NVFP4)
    calibrate(quantizer, [x, x / 2])
    assert_bitexact(quantizer.amax, torch.tensor(4.0), "global amax")
    assert_bitexact(quantizer(x), rq.nvfp4_fake_quant(x, 4.0), "y")


@pytest.mark.parametrize("flavor", ["modelopt-cpu", "modelopt-cuda"])
def test_calibrated_fp8_forward_is_fp8_fake_quant_with_the_calibrated_amax(flavor):
    x = torch.linspace(-3.3, 2.9, 64, dtype=torch.float32)
    quantizer = TensorQuantizer(FP8, flavor=flavor)
    calibrate(quantizer, [x])
    assert_bitexact(quantizer(x), rq.fp8_fake_quant(x, 3.3, flavor=flavor), "y")


# --- state_dict -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, dtype",
    [(FP8, torch.bfloat16), (QuantizerConfig(format="fp8", axis=0), torch.float32), (NVFP4, torch.float16)],
    ids=["fp8-per-tensor-bf16", "fp8-per-channel", "nvfp4-fp16"],
)
def test_state_dict_round_trip_gives_the_same_amax_and_outputs(config, dtype):
    x = (torch.randn(8, 32, generator=torch.Generator().manual_seed(7)) * 3).to(dtype)
    saved = TensorQuantizer(config)
    calibrate(saved, [x])
    state = saved.state_dict()
    loaded = TensorQuantizer(config)
    loaded.load_state_dict(state)
    assert_bitexact(loaded.amax, saved.amax, "amax (value, shape and dtype)")
    assert_bitexact(loaded(x * 0.5), saved(x * 0.5), "outputs")


def test_state_dict_of_a_constant_amax_quantizer_is_empty_and_loads_back():
    saved = TensorQuantizer(FP8_CAST)
    assert saved.state_dict() == {}
    loaded = TensorQuantizer(FP8_CAST)
    loaded.load_state_dict(saved.state_dict())
    assert_bitexact(loaded.amax, torch.tensor(448.0), "amax")


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "int8"}, "format='int8' is not known"),
        ({"format": "nvfp4", "axis": 0}, "NVFP4 takes no per-channel axis"),
        ({"format": "fp8", "axis": "0"}, "axis='0' must be None"),
        ({"format": "fp8", "axis": 0, "use_constant_amax": True}, "remove `axis`"),
        ({"format": "fp8", "enable": "yes"}, "enable='yes' must be True or False"),
        ({"format": "disabled"}, "an enabled quantizer needs a format"),
    ],
)
def test_bad_quantizer_config_is_rejected_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizerConfig(**kwargs)


def test_enabling_a_quantizer_without_a_format_is_an_error():
    quantizer = TensorQuantizer(name="q")
    assert not quantizer.is_enabled
    with pytest.raises(ValueError, match="cannot enable q: it has no format"):
        quantizer.set_enabled(True)


def test_set_enabled_keeps_every_other_attribute():
    quantizer = TensorQuantizer(FP8_CAST)
    quantizer.set_enabled(False)
    quantizer.set_enabled(True)
    assert quantizer.config == FP8_CAST
