"""The per-quantizer error metrics (refquant.quant.metrics): hand-made tensors whose SQNR, clipped,
zeroed and NVFP4 block shares are known, the definitions at their edges, and the report's columns.
Measuring never changes a quantized bit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import refquant as rq
from refquant.numerics.formats import E4M3_DTYPE
from refquant.quant.metrics import (
    QuantizerError,
    collect_quantizer_errors,
    error_sums,
    summarize,
)
from refquant.quant.quantizer import QuantizerConfig, TensorQuantizer


def measure(x: torch.Tensor, format: str, amax=None, axis=None, calls: int = 1) -> QuantizerError:
    """Run x through a quantizer `calls` times with the metrics on; its QuantizerError."""
    quantizer = TensorQuantizer(QuantizerConfig(format=format, axis=axis), name="q")
    if amax is not None:
        quantizer.set_amax(torch.as_tensor(amax, dtype=torch.float32))
    model = nn.Sequential()
    model.add_module("q", quantizer)
    with collect_quantizer_errors(model) as meter:
        for _ in range(calls):
            quantizer(x)
    return meter.results()["q"]


def sqnr_db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise)


# --- FP8 -------------------------------------------------------------------------------------
def test_fp8_tensor_on_the_grid_has_infinite_sqnr_and_no_error():
    every_e4m3 = torch.arange(0, 0x7F, dtype=torch.uint8).view(E4M3_DTYPE).float()  # 0 .. 448
    x = torch.cat([every_e4m3, -every_e4m3])
    error = measure(x, "fp8", amax=448.0)  # scale exactly 1: every value is its own quantization
    assert error.sqnr_db == math.inf and error.rel_error == 0.0
    assert error.clipped == 0.0 and error.zeroed == 0.0 and error.nonfinite == 0
    assert error.elements == x.numel() and error.calls == 1 and error.blocks is None


def test_fp8_clipped_elements_are_those_saturation_decided():
    # amax 448 (scale 1): 448 is the top, 464 the half step above it (E4M3 steps by 32 there)
    x = torch.tensor([500.0, -1000.0, 464.0, 460.0, 1.0, 2.0, 0.0, 3.0])
    error = measure(x, "fp8", amax=448.0)
    # 500 and -1000 saturate; 464 and 460 round to 448 anyway (rounding, not clipping)
    assert error.clipped == 2 / 8
    noise = 52.0**2 + 552.0**2 + 16.0**2 + 12.0**2  # 1, 2, 0, 3 are on the grid
    signal = float((x.double() ** 2).sum())
    assert error.sqnr_db == pytest.approx(sqnr_db(signal, noise), rel=1e-12)
    assert error.rel_error == pytest.approx(math.sqrt(noise / signal), rel=1e-12)


def test_fp8_per_channel_amax_clips_per_channel():
    x = torch.tensor([[1.5, 0.5, -0.25, 1.0], [1.5, 90.0, -120.0, 3.0]])
    amax = torch.tensor([[1.0], [100.0]])  # 1.5 is beyond row 0's range, inside row 1's; -120 beyond row 1's
    error = measure(x, "fp8", amax=amax)
    assert error.clipped == 2 / 8
    assert measure(x, "fp8", axis=0).clipped == 0.0  # an amax taken from the data never clips


def test_fp8_zero_share_counts_nonzero_inputs_that_became_zero():
    # scale 1: the smallest subnormal is 2^-9; below half of it (2^-10) everything rounds to 0
    x = torch.tensor([2.0**-11, -(2.0**-11), 2.0**-10, 2.0**-9, 0.0, 0.0, 1.0, -3.0])
    error = measure(x, "fp8", amax=448.0)
    assert error.zeroed == 3 / 6  # 2^-11, -2^-11 and the tie 2^-10 (to even: 0) of the 6 nonzero inputs
    assert error.clipped == 0.0


def test_nan_and_inf_inputs_are_counted_and_left_out_of_every_other_number():
    clean = torch.tensor([500.0, 1.0, 2.0**-11, 3.0])
    dirty = torch.cat([clean, torch.tensor([float("nan"), float("inf"), -float("inf")])])
    a, b = measure(clean, "fp8", amax=448.0), measure(dirty, "fp8", amax=448.0)
    assert b.nonfinite == 3 and b.elements == 7 and a.nonfinite == 0
    assert (b.sqnr_db, b.rel_error, b.clipped, b.zeroed) == (a.sqnr_db, a.rel_error, a.clipped, a.zeroed)


def test_all_zero_input_has_no_sqnr():
    error = measure(torch.zeros(4, 32), "nvfp4", amax=1.0)
    assert error.sqnr_db is None and error.rel_error is None
    assert error.zeroed == 0.0 and error.clipped == 0.0
    assert error.blocks == 0 and error.block_scale_fallback == 0.0  # all-zero blocks hold no data


def test_sums_accumulate_over_calls():
    x = torch.tensor([500.0, 1.0, 2.0**-11, 3.0])
    once, twice = measure(x, "fp8", amax=448.0), measure(x, "fp8", amax=448.0, calls=2)
    assert twice.calls == 2 and twice.elements == 8
    assert (twice.sqnr_db, twice.clipped, twice.zeroed) == pytest.approx((once.sqnr_db, once.clipped, once.zeroed))


# --- NVFP4 -----------------------------------------------------------------------------------
def test_nvfp4_block_of_tiny_values_falls_back_to_scale_one_and_flushes():
    # G = 1: g = 1/2688; a block max of 1e-7 gives an E4M3 scale of 0, S = 0 < 1e-5 -> 1.0
    x = torch.full((1, 16), 1e-7)
    error = measure(x, "nvfp4", amax=1.0)
    assert error.blocks == 1 and error.block_scale_fallback == 1.0 and error.block_scale_saturated == 0.0
    assert error.zeroed == 1.0 and error.sqnr_db == pytest.approx(0.0, abs=1e-12)  # all noise: 0 dB
    assert torch.equal(rq.nvfp4_fake_quant(x, 1.0), torch.zeros_like(x))


def test_nvfp4_block_beyond_the_global_amax_saturates_its_scale_and_clips():
    # G = 1 allows block maxima up to 1 (scale 448); a block max of 10 wants 4480 -> saturated
    saturated = torch.tensor([10.0, 1.0, -0.5, 0.25] + [0.0] * 12)
    ordinary = torch.linspace(-0.9, 0.9, 16)  # max 0.9: ideal scale 403, no saturation
    x = torch.stack([saturated, ordinary])
    error = measure(x, "nvfp4", amax=1.0)
    assert error.blocks == 2 and error.block_scale_saturated == 0.5 and error.block_scale_fallback == 0.0
    # S = 448 / 2688 = 1/6, so 7 S = 1.1667: only the 10 is clipped (it becomes 6 S = 1)
    assert error.clipped == 1 / 32
    assert float(rq.nvfp4_fake_quant(x, 1.0)[0, 0]) == pytest.approx(1.0)


def test_nvfp4_block_max_above_six_s_by_scale_rounding_is_not_clipped():
    # G = 2688 (g = 1): a block max of 6 * 262 wants a scale of 262, which E4M3 rounds down to 256,
    # so the max lies above 6 S = 1536 by 2.3%: rounding (to 6 S), not clipping (7 S = 1792)
    x = torch.tensor([6.0 * 262, 100.0] + [0.0] * 14)
    y = rq.nvfp4_fake_quant(x, 2688.0)
    assert float(y[0]) == 6 * 256.0 < float(x[0])
    error = measure(x, "nvfp4", amax=2688.0)
    assert error.clipped == 0.0 and error.block_scale_saturated == 0.0


def test_nvfp4_padding_of_a_short_last_dim_is_not_counted():
    x = torch.tensor([[3.0, -1.0, 0.5, 2.0, 0.2]])  # one block, 11 zeros of padding
    error = measure(x, "nvfp4", amax=3.0)
    assert error.elements == 5 and error.blocks == 1
    y = rq.nvfp4_fake_quant(x, 3.0)
    assert error.zeroed == float(((y == 0) & (x != 0)).sum()) / 5


def test_error_sums_agree_with_a_direct_float64_computation():
    torch.manual_seed(0)
    x = (torch.randn(8, 64) * torch.logspace(-3, 1, 64)).to(torch.bfloat16)
    config = QuantizerConfig(format="nvfp4")
    y = rq.nvfp4_fake_quant(x, torch.tensor(4.0))
    error = summarize(error_sums(x, y, config, torch.tensor(4.0)), 1, x.numel(), nvfp4=True)
    noise = float(((x.double() - y.double()) ** 2).sum())
    signal = float((x.double() ** 2).sum())
    assert error.sqnr_db == pytest.approx(sqnr_db(signal, noise), rel=1e-12)
    assert error.zeroed == float(((y == 0) & (x != 0)).sum()) / float((x != 0).sum())


# --- in a model ------------------------------------------------------------------------------
def tiny_llama(layers: int = 2):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


def token_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_measuring_changes_no_output_bit_and_leaves_no_hook():
    model = tiny_llama()
    rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_cast_kv"), [token_ids(2, 16)], progress=False)
    ids = token_ids(1, 24, seed=5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with collect_quantizer_errors(model) as meter:
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert len(meter.results()) == 2 * 16  # every enabled quantizer quantized something
    assert all(not q._forward_hooks for _, q in rq.hf.ptq.named_quantizers(model))


def test_report_rows_carry_the_errors_of_the_eval_forward():
    model = tiny_llama()
    eval_batch = token_ids(1, 32, seed=7)
    report = rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_cast_kv"), [token_ids(2, 16)],
                               eval_batch=eval_batch, progress=False)
    enabled = [r for r in report.quantizers if r.enabled]
    assert enabled and all(r.error is not None and r.error.calls == 1 for r in enabled)
    assert all(r.error is None for r in report.quantizers if not r.enabled)
    weight = report.row("model.layers.0.mlp.up_proj.weight_quantizer")
    assert weight.error.elements == 128 * 64 and weight.error.blocks == 128 * 4
    # the weight's error equals the one computed from the weight and its fake quant directly
    w = model.model.layers[0].mlp.up_proj.weight
    direct = summarize(error_sums(w, rq.nvfp4_fake_quant(w, model.model.layers[0].mlp.up_proj.weight_quantizer.amax),
                                  QuantizerConfig(format="nvfp4"), None), 1, w.numel(), nvfp4=True)
    assert weight.error == direct
    kv = report.row("model.layers.1.self_attn.k_bmm_quantizer").error
    assert kv.blocks is None and kv.elements == 1 * 2 * 32 * 16  # [batch, kv_heads, seq, head_dim]

    data = json.loads(report.to_json())
    row = next(r for r in data["quantizers"] if r["name"] == "model.layers.0.mlp.up_proj.input_quantizer")
    assert {"sqnr_db", "rel_error", "clipped", "zeroed", "block_scale_fallback", "block_scale_saturated"} <= set(row["error"])
    assert rq.PTQReport.from_json(report.to_json()) == report

    table = report.to_table()
    assert "SQNR dB" in table and "clip %" in table and "lowest SQNR (worst first)" in table
    by_sqnr = report.to_table(sort_by="sqnr").splitlines()
    listed = [line.split()[0] for line in by_sqnr if line.startswith(("model.", "lm_head"))]
    sqnrs = [report.row(name).error.sqnr_db for name in listed]
    assert sqnrs == sorted(sqnrs) and len(listed) == len(enabled)  # the worst (lowest) first
    with pytest.raises(ValueError, match="sort_by='loudness' is not known"):
        report.to_table(sort_by="loudness")


def test_without_an_eval_batch_nothing_is_measured():
    model = tiny_llama(layers=1)
    report = rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_cast_kv"), [token_ids(1, 8)], progress=False)
    assert all(r.error is None for r in report.quantizers)
    assert "lowest SQNR" not in report.to_table()
