"""TensorQuantizer: where its amax comes from, max calibration, constant-amax KV cast, state_dict,
the shared input result (SharedInputResult) and the compiled backend's bound call.

docs/modelopt_behaviour.md §1.2 (amax priority), §5 (use_constant_amax), §6 (max calibration).
The amax tests' inputs are hand-made so the right amax is known without running the code under test.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import cuda, vector_cases

import refquant as rq
import refquant.compiled as rc
from refquant import QuantizerConfig, TensorQuantizer
from refquant.compiled import functions
from refquant.quant.quantizer import SharedInputResult, named_quantizers
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


def _counting_reductions(monkeypatch) -> list:
    """The tensors calibration takes max|x| of (refquant.numerics.checks.max_abs_one_kernel)."""
    from refquant.quant import quantizer as quantizer_module

    reduced = []
    original = quantizer_module.max_abs_one_kernel
    monkeypatch.setattr(quantizer_module, "max_abs_one_kernel", lambda x: (reduced.append(x), original(x))[1])
    return reduced


def test_calibration_takes_a_weights_max_once_and_again_only_after_the_weight_changed(monkeypatch):
    reduced = _counting_reductions(monkeypatch)
    weight = torch.nn.Parameter(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).bfloat16())
    q = TensorQuantizer(QuantizerConfig(format="fp8"))
    q.start_calibration()
    for _ in range(4):
        assert q(weight) is weight
    assert len(reduced) == 1
    with torch.no_grad():
        weight[3, 5] = 100.0  # in place: the version moves
    q(weight)
    q(weight)
    assert len(reduced) == 2
    q(weight[:4])  # a view of it is other memory: collected
    assert len(reduced) == 3
    q.finish_calibration()
    assert torch.equal(q.amax, torch.tensor(100.0, dtype=torch.bfloat16))


def test_calibration_and_a_forward_under_inference_mode_equal_those_under_no_grad():
    """Inference tensors have no version counter: the shared max, the shared result and the
    weight skip must not ask for one (they compute instead)."""
    from conftest import tiny_llama

    batches = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    recipe = rq.load_recipe("fp8_default-fp8_kv")
    model, inferred = tiny_llama(), tiny_llama()
    rq.quantize_model(model, recipe, batches, progress=False)
    with torch.inference_mode():
        rq.quantize_model(inferred, recipe, batches, progress=False)
        inferred_logits = inferred(input_ids=batches[0]).logits
    for (name, ours), (_, theirs) in zip(named_quantizers(model), named_quantizers(inferred)):
        if ours.is_calibrated:
            assert_bitexact(theirs.amax, ours.amax, name)
    with torch.no_grad():
        assert_bitexact(inferred_logits, model(input_ids=batches[0]).logits, "logits under inference_mode")


def test_a_hook_on_a_disabled_quantizer_of_a_linear_still_sees_each_call():
    """A disabled quantizer is not called (host time), unless something wants to see its calls."""
    from conftest import tiny_llama

    model = tiny_llama()
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), [torch.randint(0, 128, (1, 8))], progress=False)
    seen = []
    output_quantizer = model.model.layers[0].mlp.down_proj.output_quantizer
    assert not output_quantizer.is_enabled
    output_quantizer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 5)))
    assert seen == [torch.Size([1, 5, 64])]


@pytest.mark.parametrize("recipe", ["fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv"])
def test_calibration_reduces_each_weight_once_and_a_tensor_that_feeds_several_quantizers_once(monkeypatch, recipe):
    """Over a calibration, each weight's max is taken once (before the forwards), and in a forward
    the input q/k/v_proj share (and gate/up_proj) once; the amax are those of quantizers that each
    reduce every tensor they see."""
    from conftest import tiny_llama

    from refquant.quant import quantizer as quantizer_module

    batches = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    reduced = _counting_reductions(monkeypatch)
    model = tiny_llama()
    rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    layers = model.config.num_hidden_layers
    weights = sum(1 for name, q in named_quantizers(model) if q.is_enabled and name.endswith("weight_quantizer"))
    activations_per_layer = 4 + (2 if recipe.endswith("fp8_kv") and "cast" not in recipe else 0)
    assert len(reduced) == weights + len(batches) * layers * activations_per_layer

    # each quantizer reducing every tensor it is given: no shared max, no weight skipped
    monkeypatch.setattr(quantizer_module.SharedInputResult, "max_abs", lambda self, x: quantizer_module.max_abs_one_kernel(x))
    monkeypatch.setattr(quantizer_module, "memory_key", lambda x: object())
    separate = tiny_llama()
    rq.quantize_model(separate, rq.load_recipe(recipe), batches, progress=False)
    for (name, ours), (_, theirs) in zip(named_quantizers(model), named_quantizers(separate)):
        if ours.is_calibrated or theirs.is_calibrated:
            assert_bitexact(ours.amax, theirs.amax, name)


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_model_whose_weight_holds_nan_or_inf_fails_calibration_naming_that_quantizer(bad):
    """max_calibrate checks every collected amax at once; a bad one still raises, naming it."""
    from conftest import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 2] = bad
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight_quantizer saw (NaN|inf)"):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), [torch.randint(0, 128, (1, 8))], progress=False)


def test_the_batched_amax_reads_equal_the_one_by_one_reads():
    """refquant.numerics.checks.largest_values and all_finite (one read back a device) against
    float(t.float().max()) and isfinite(t).all() tensor by tensor, over seeded lists that mix 0-d,
    one-element and per-channel amaxes in bf16, fp16 and fp32 with NaN, inf and -inf sprinkled."""
    import math

    from refquant.numerics.checks import all_finite, largest_values

    generator = torch.Generator().manual_seed(0)
    specials = [float("nan"), float("inf"), float("-inf")]
    for trial in range(200):
        tensors = []
        for _ in range(1 + trial % 9):
            shape = [(), (1,), (4, 1), (1, 3, 1)][int(torch.randint(0, 4, (), generator=generator))]
            dtype = [torch.bfloat16, torch.float16, torch.float32][int(torch.randint(0, 3, (), generator=generator))]
            t = (torch.rand(shape, generator=generator) * 10).to(dtype)
            if torch.rand((), generator=generator) < 0.05:
                t.view(-1)[0] = specials[int(torch.randint(0, 3, (), generator=generator))]
            tensors.append(t)
        want = [float(t.float().max()) for t in tensors]
        got = largest_values(tensors)
        assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(got, want)), (got, want)
        assert all_finite(tensors) == all(bool(torch.isfinite(t).all()) for t in tensors)


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


# --- SharedInputResult: one tensor into quantizers of equal settings, quantized once ----------


def _calibrated(amax: float, fmt: str = "fp8", shared: SharedInputResult | None = None) -> TensorQuantizer:
    quantizer = TensorQuantizer(QuantizerConfig(format=fmt))
    quantizer.set_amax(torch.tensor(amax))
    quantizer.shared_input_result = shared
    return quantizer


def _counting(monkeypatch) -> list:
    computed = []
    original = TensorQuantizer._fake_quant

    def counted(self, x, amax_value):
        computed.append(self)
        return original(self, x, amax_value)

    monkeypatch.setattr(TensorQuantizer, "_fake_quant", counted)
    return computed


def _quantized_tiny_llama(recipe: str, seed: int, backend: str = "compiled", device: str = "cpu"):
    """conftest's tiny Llama on `device`, quantized with `recipe` on one batch of ids (the modelopt
    flavor of that device); (model, ids)."""
    from conftest import tiny_llama

    model = tiny_llama().to(device)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed)).to(device)
    flavor = "modelopt-cuda" if device == "cuda" else "modelopt-cpu"
    rq.quantize_model(model, rq.load_recipe(recipe), [ids], backend=backend, flavor=flavor, progress=False)
    return model, ids


def test_one_tensor_into_quantizers_of_equal_settings_is_quantized_once(monkeypatch):
    shared = SharedInputResult()
    q, k, v = (_calibrated(3.0, shared=shared) for _ in range(3))
    computed = _counting(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    outputs = [q(x), k(x), v(x)]
    assert computed == [q]
    assert outputs[1] is outputs[0] and outputs[2] is outputs[0]
    assert_bitexact(outputs[0], rq.fp8_fake_quant(x, torch.tensor(3.0)))


@pytest.mark.parametrize(
    "what, second",
    [
        ("another amax", lambda shared: _calibrated(2.0, shared=shared)),
        ("another format", lambda shared: _calibrated(3.0, "nvfp4", shared=shared)),
        ("no shared cache", lambda shared: _calibrated(3.0)),
    ],
)
def test_other_settings_compute_their_own_result(monkeypatch, what, second):
    shared = SharedInputResult()
    first, other = _calibrated(3.0, shared=shared), second(shared)
    computed = _counting(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    first(x)
    out = other(x)
    assert computed == [first, other], what
    assert_bitexact(out, other._fake_quant(x, other._amax_value_now()), what)


def test_a_changed_input_or_result_or_amax_is_computed_again(monkeypatch):
    shared = SharedInputResult()
    a, b = _calibrated(3.0, shared=shared), _calibrated(3.0, shared=shared)
    computed = _counting(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    a(x)
    x.mul_(2)  # in place: the input's version moves
    assert_bitexact(b(x), rq.fp8_fake_quant(x, torch.tensor(3.0)), "after x changed")
    result = a(x)  # b's result, shared
    result.add_(1)  # someone wrote into the shared result
    assert_bitexact(b(x), rq.fp8_fake_quant(x, torch.tensor(3.0)), "after the result changed")
    b._buffers["_amax"].fill_(2.0)  # amax changed in place: b's settings differ now
    assert_bitexact(b(x), rq.fp8_fake_quant(x, torch.tensor(2.0)), "after the amax changed")
    assert computed == [a, b, b, b], "a, then b after each change; a's second call shared b's result"


def test_weights_are_not_kept_and_a_freed_input_frees_the_entry():
    shared = SharedInputResult()
    quantizer = _calibrated(3.0, shared=shared)
    quantizer(torch.nn.Parameter(torch.randn(8, 64)))
    assert shared._entry is None, "a weight was kept"
    x = torch.randn(4, 64)
    quantizer(x)
    assert shared._entry is not None
    del x
    gc.collect()
    assert shared._entry is None, "the entry outlived its input"


def _per_channel(shared: SharedInputResult) -> TensorQuantizer:
    quantizer = TensorQuantizer(QuantizerConfig(format="fp8", axis=0))
    quantizer.set_amax(torch.full((4, 1), 3.0))
    quantizer.shared_input_result = shared
    return quantizer


@pytest.mark.parametrize(
    "unshared",
    [
        ("a per-channel amax", _per_channel),
        ("a call that records a gradient", lambda shared: _calibrated(2.0, shared=shared)),
    ],
    ids=lambda case: case[0],
)
def test_a_quantizer_that_does_not_share_ends_the_previous_result_whose_input_lives_on(unshared):
    """A V quantized under a constant amax and kept by the KV cache: its result is shared until
    the next quantizer's call on another activation (on a GPU, where a calibrated amax is not
    shared, the o_proj input's), then freed, not kept alive with V until the next shared call."""
    what, make = unshared
    shared = SharedInputResult()
    cast = TensorQuantizer(FP8_CAST)
    cast.shared_input_result = shared
    other = make(shared)
    kept = torch.randn(4, 64, dtype=torch.bfloat16)  # alive throughout, as the cache's V
    result = weakref.ref(cast(kept))
    assert result() is not None, "the cast result is not kept for the next quantizer given V"
    y = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=what.startswith("a call"))
    other(y)
    gc.collect()
    assert result() is None, f"after {what}, the constant-amax result of a live input is still kept"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_with_calibrated_amaxes_unshared_as_on_a_gpu_no_kv_result_outlives_its_attention(monkeypatch, device):
    """The cast KV recipe where a calibrated amax is not shared (on a GPU, reading it would sync;
    on the CPU made so here): only K and V's constant-amax results enter the shared entry. When the
    MLP starts, V's result (V itself stays in the KV cache) is gone: o_proj's input quantizer
    ended its turn."""
    import refquant.quant.quantizer as quantizer_module

    model, ids = _quantized_tiny_llama("nvfp4_default-fp8_cast_kv", 2, device=device)
    if device == "cpu":
        constant = quantizer_module.TensorQuantizer._amax_value_now
        monkeypatch.setattr(quantizer_module.TensorQuantizer, "_amax_value_now",
                            lambda self: constant(self) if self.config.use_constant_amax else quantizer_module._NOT_SHARED)
    shared = next(m for m in model.modules() if isinstance(m, TensorQuantizer)).shared_input_result
    seen = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda module, args: seen.append(shared._entry))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True)
    assert seen == [None] * len(model.model.layers), "a K/V result was still kept when the MLP started"


def test_a_weights_call_keeps_the_activation_result_for_the_next_input_quantizer(monkeypatch):
    """q_proj's weight quantizer runs between q_proj's and k_proj's input quantizers: it must not
    end the normed hidden states' result, or k_proj computes it again."""
    shared = SharedInputResult()
    q_input, k_input = _calibrated(3.0, shared=shared), _calibrated(3.0, shared=shared)
    weight = _per_channel(shared)
    computed = _counting(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    first = q_input(x)
    weight(torch.nn.Parameter(torch.randn(4, 64)))
    assert k_input(x) is first and computed == [q_input, weight]


def test_insert_quantizers_gives_a_models_quantizers_one_shared_cache_and_qkv_share_it(monkeypatch):
    model, ids = _quantized_tiny_llama("fp8_default-fp8_kv", 1, backend="reference")
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    assert len({id(q.shared_input_result) for q in quantizers}) == 1
    computed = _counting(monkeypatch)
    with torch.no_grad():
        shared_logits = model(input_ids=ids).logits
        for quantizer in quantizers:
            quantizer.shared_input_result = None
        computed_with_cache = len(computed)
        own_logits = model(input_ids=ids).logits
    # per layer: k_proj and v_proj reuse q_proj's input result, up_proj gate_proj's
    assert len(computed) - computed_with_cache - computed_with_cache == 3 * 2
    assert_bitexact(shared_logits, own_logits, "logits with and without the shared results")


# --- the compiled backend's bound call (refquant.compiled.bind_fake_quant) ----------------------
# On CUDA, a calibrated bf16 or fp16 quantizer's later calls are each one bound kernel launch; on
# the CPU, and wherever nothing binds, every call is the ordinary one. Both give the reference's bits.

DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def _compiled_quantizer(fmt: str, amax: float | None, device: str, flavor: str = "modelopt-cpu") -> TensorQuantizer:
    quantizer = TensorQuantizer(QuantizerConfig(format=fmt), backend="compiled", flavor=flavor)
    if amax is not None:
        quantizer.set_amax(torch.tensor(amax, device=device))
    return quantizer


def _expected(quantizer: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The CPU reference's result of the quantizer's fake quantization of x."""
    amax = None if quantizer.amax is None else quantizer.amax.cpu()
    if quantizer.config.format == "fp8":
        return rq.fp8_fake_quant(x.cpu(), amax, flavor=quantizer.flavor)
    return rq.nvfp4_fake_quant(x.cpu(), amax)


def _public_functions_refuse(monkeypatch):
    for name in ("fp8_fake_quant", "nvfp4_fake_quant"):
        monkeypatch.setattr(rc, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("the public function ran")))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, amax", [("fp8", 3.0), ("nvfp4", 3.0), ("nvfp4", None), ("fp8", None)])
def test_a_quantizers_later_calls_take_the_bound_launch_on_cuda_and_give_the_reference_bits(monkeypatch, fmt, amax, device):
    quantizer = _compiled_quantizer(fmt, amax, device)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        assert_bitexact(quantizer(x).cpu(), _expected(quantizer, x), "first call")
        if device == "cuda" and amax is not None:
            assert isinstance(quantizer._bound[0], functions.BoundKernelLaunch)
            _public_functions_refuse(monkeypatch)
        else:  # an amax from x, or the CPU: nothing to bind
            assert quantizer._bound is None
        for shape in ((3, 7, 64), (5, 64), (2, 2, 9, 64)):
            y = torch.randn(*shape, dtype=torch.bfloat16, device=device)
            assert_bitexact(quantizer(y).cpu(), _expected(quantizer, y), f"later call, {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "what, change",
    [
        ("the amax changed in place", lambda q: q._buffers["_amax"].fill_(0.5)),
        ("a new amax", lambda q: q.set_amax(torch.tensor(0.25, device=q.amax.device))),
        ("another format", lambda q: q.set_config(QuantizerConfig(format="nvfp4"))),
        ("another flavor", lambda q: setattr(q, "flavor", "modelopt-cuda")),
        ("the constant amax", lambda q: q.set_config(QuantizerConfig(format="fp8", use_constant_amax=True))),
        ("the reference backend", lambda q: setattr(q, "backend", "reference")),
    ],
)
def test_a_quantizer_whose_settings_changed_does_not_use_its_old_bound_call(what, change, device):
    quantizer = _compiled_quantizer("fp8", 3.0, device)
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device) * 2
    with torch.no_grad():
        quantizer(x)
        change(quantizer)
        assert_bitexact(quantizer(x).cpu(), _expected(quantizer, x), what)
        assert_bitexact(quantizer(x).cpu(), _expected(quantizer, x), f"{what}, again")


@pytest.mark.parametrize("device", DEVICES)
def test_a_tensor_the_bound_launch_does_not_take_gets_the_ordinary_call(device):
    quantizer = _compiled_quantizer("nvfp4", 3.0, device)
    with torch.no_grad():
        quantizer(torch.randn(4, 64, dtype=torch.bfloat16, device=device))
        refused = (torch.randn(4, 64, dtype=torch.float16), torch.randn(64, 4).t().contiguous().t(), torch.randn(1, 64),
                   torch.randn(0, 64))
        for x in refused:
            x = x.to(device)
            assert_bitexact(quantizer(x).cpu(), _expected(quantizer, x), f"{x.dtype} {tuple(x.shape)} {x.stride()}")


@pytest.mark.parametrize("device", DEVICES)
def test_a_quantized_model_with_bound_calls_deep_copies_and_its_quantizers_pickle(device):
    import copy
    import io

    model, ids = _quantized_tiny_llama("nvfp4_default-fp8_cast_kv", 2, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        if device == "cuda":
            assert any(q._bound is not None for q in model.modules() if isinstance(q, TensorQuantizer))
        copied = copy.deepcopy(model)
        shared = {id(q.shared_input_result) for q in copied.modules() if isinstance(q, TensorQuantizer)}
        assert len(shared) == 1 and shared != {id(model.model.layers[0].self_attn.q_proj.input_quantizer.shared_input_result)}
        assert_bitexact(copied(input_ids=ids).logits, logits, "the deep copy")
        quantizer = model.model.layers[0].self_attn.k_proj.weight_quantizer
        buffer = io.BytesIO()
        torch.save(quantizer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        weight = model.model.layers[0].self_attn.k_proj.weight
        assert_bitexact(loaded(weight), quantizer(weight), "a quantizer pickled after its bound call")


@cuda
@pytest.mark.parametrize("recipe", ["fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv", "nvfp4_default-fp8_kv"])
def test_the_first_forward_after_calibration_on_cuda_compiles_no_graph_and_gives_the_reference_bits(recipe):
    """Each quantizer's first call is already its bound launch: no graph to wait for (a compile a
    hidden size and dtype), and the reference backend's logits."""
    model, ids = _quantized_tiny_llama(recipe, 5, device="cuda")
    reference, _ = _quantized_tiny_llama(recipe, 5, backend="reference", device="cuda")
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    with pytest.MonkeyPatch.context() as monkeypatch, torch.no_grad():
        _public_functions_refuse(monkeypatch)  # a graph from an earlier test would compile nothing either
        logits = model(input_ids=ids).logits
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == graphs, "the first forward compiled a graph"
    with torch.no_grad():
        assert_bitexact(logits, reference(input_ids=ids).logits, "logits, compiled against the reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_kv_cache"])
@pytest.mark.parametrize("recipe", ["fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv", "nvfp4_default-fp8_kv"])
def test_a_steady_quantized_forward_compiles_nothing_and_on_cuda_binds_nothing_new(monkeypatch, recipe, use_cache, device):
    """After a warm-up forward, forwards of other lengths compile no graph; on CUDA every quantizer
    call is a bound launch or a shared result (a regression here would only show as lost speed).
    Without a KV cache the attention gets K and V as transposed views; a kernel launch that
    refused them would be bound and bound again on every call (docs/compiled.md, "Tried and
    rejected")."""
    model, ids = _quantized_tiny_llama(recipe, 3, device=device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=use_cache)
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        if device == "cuda":
            monkeypatch.setattr(TensorQuantizer, "_bind", lambda *a, **k: pytest.fail("a quantizer bound again"))
            _public_functions_refuse(monkeypatch)
        for length in (12, 7):
            model(input_ids=ids[:, :length], use_cache=use_cache)
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == graphs, "a steady forward compiled a graph"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_finishing_many_calibrations_at_once_stores_what_each_finish_stores(device):
    """finish_calibrations (max_calibrate's: the per-tensor amaxes copied out in one batched copy)
    against each quantizer's own finish_calibration: the same amax values and dtypes, each in a
    buffer whose memory is its own (none shares the collected tensor, another quantizer's buffer,
    or anything a later write could reach), quantization back on; per-channel, constant-amax, off
    and uncollected quantizers and a subclass take their own finish; one shared collected tensor
    (the q/k/v input quantizers' max) gives separate buffers."""
    from refquant.quant.quantizer import finish_calibrations

    class Subclass(TensorQuantizer):
        pass

    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(6, 32, generator=generator).to(device, dtype) * (1 + i)
            for i, dtype in enumerate([torch.bfloat16, torch.float32, torch.bfloat16, torch.float16, torch.bfloat16])]

    def quantizers() -> list[TensorQuantizer]:
        made = [TensorQuantizer(FP8), TensorQuantizer(FP8), TensorQuantizer(NVFP4), TensorQuantizer(FP8),
                TensorQuantizer(FP8), TensorQuantizer(QuantizerConfig(format="fp8", axis=0)), TensorQuantizer(FP8_CAST),
                TensorQuantizer(QuantizerConfig(format="fp8", enable=False)), TensorQuantizer(FP8), Subclass(FP8)]
        for q in made:
            q.start_calibration()
        for q, x in zip(made, data + data):
            q(x)
        shared = made[0]._calibrator.amax
        made[4]._calibrator.amax = shared  # one tensor collected for two quantizers
        return made

    each, together = quantizers(), quantizers()
    for q in each:
        q.finish_calibration(True)
    collected = [q.collected_amax for q in together]
    finish_calibrations(together)
    buffers = []
    for mine, theirs, seen in zip(together, each, collected):
        assert mine.is_quantizing and not mine.is_calibrating
        assert (mine.amax is None) == (theirs.amax is None)
        if mine.amax is not None and not mine.config.use_constant_amax:
            assert mine.amax.dtype == theirs.amax.dtype and mine.amax.shape == theirs.amax.shape
            assert torch.equal(mine.amax, theirs.amax)
            assert mine.amax.untyped_storage().data_ptr() != seen.untyped_storage().data_ptr()
            buffers.append(mine._buffers["_amax"])
    assert len(buffers) == 8
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == len(buffers)
    with torch.no_grad():
        buffers[0].fill_(7.0)  # a write to one buffer reaches no other
    assert torch.equal(together[4].amax, each[4].amax)
    bad = quantizers()
    bad[3]._calibrator.amax = torch.tensor(float("inf"), dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="inf"):
        finish_calibrations(bad)  # the quantizers before the bad one finish, as a loop of their own calls
    assert [q.is_calibrating for q in bad[:5]] == [False, False, False, True, True]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_finishing_many_calibrations_folds_each_ones_kept_maxima_to_its_own_amax(device):
    """finish_calibrations folds the maxima every calibrator kept over many calls (the same counts
    in one stack) to what each quantizer's own finish stores: calls counts 2, 3, 3 and 70 (past
    the fold every 64 calls), one quantizer seeing bf16 then fp32 (left to its own fold), a
    per-channel one; a NaN among one quantizer's calls raises naming it."""
    from refquant.quant.quantizer import finish_calibrations

    generator = torch.Generator().manual_seed(5)
    plan = [(2, [torch.bfloat16]), (3, [torch.bfloat16]), (3, [torch.float32]), (3, [torch.bfloat16]),
            (70, [torch.bfloat16]), (2, [torch.bfloat16, torch.float32]), (1, [torch.bfloat16])]
    batches = [[torch.randn(4, 16, generator=generator).to(device, dtypes[i % len(dtypes)]) * (1 + i % 7)
                for i in range(calls)] for calls, dtypes in plan]

    def quantizers(nan_in: int = -1) -> list[TensorQuantizer]:
        made = [TensorQuantizer(FP8) for _ in plan] + [TensorQuantizer(QuantizerConfig(format="fp8", axis=0))]
        for q in made:
            q.start_calibration()
        for index, (q, calls) in enumerate(zip(made, batches + [batches[1]])):
            for number, x in enumerate(calls):
                q(x if (index, number) != (nan_in, 1) else torch.full_like(x, float("nan")))
        return made

    each, together = quantizers(), quantizers()
    for q in each:
        q.finish_calibration()
    finish_calibrations(together)
    for mine, theirs in zip(together, each):
        assert mine.amax.dtype == theirs.amax.dtype and mine.amax.shape == theirs.amax.shape
        assert torch.equal(mine.amax, theirs.amax)
        assert not mine.is_calibrating
    expected = [max(float(x.float().abs().max()) for x in calls) for calls in batches]
    assert [float(q.amax.float()) for q in together[:len(plan)]] == pytest.approx(expected, rel=1e-2)
    bad = quantizers(nan_in=3)
    bad[3].name = "the third of three"
    with pytest.raises(ValueError, match="the third of three.*NaN"):
        finish_calibrations(bad)
