"""MoE experts quantized as modelopt 0.47 quantizes them (refquant.hf.experts,
docs/modelopt_behaviour.md §11), beyond the family matrix (tests/test_modelopt_families.py, which
holds every MoE family to modelopt under every recipe): the quantizers' names, an expert no
calibration token reaches, experts implementations that would bypass the quantizers, the one-call
fake quant of all experts' weights and the quantization of the hidden states before routing (bit
for bit what the per-expert calls give), the compiled backend, the checkpoint names and round trip,
weight coverage in the report, and the CLI on a local MoE folder."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import refquant as rq
from refquant.hf import experts as experts_module
from refquant.hf import experts_loop
from refquant.hf.export import read_checkpoint_tensors
from refquant.quant.quantizer import QuantizerConfig, SliceQuantizers, TensorQuantizer, all_quantizers_off
from conftest import REPO

pytest.importorskip("transformers")

import modelopt_compare as mc  # noqa: E402  (tests/modelopt_compare.py)


def quantizer_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, TensorQuantizer)]


def test_fused_experts_get_modelopts_quantizer_names():
    model = mc.build_model("qwen3_moe")
    rq.insert_quantizers(model)
    experts = "model.layers.0.mlp.experts"
    names = [name for name in quantizer_names(model) if name.startswith(experts + ".")]
    assert names == (
        [f"{experts}.gate_up_proj_input_quantizer"]
        + [f"{experts}.gate_up_proj_weight_quantizers.{i}" for i in range(4)]
        + [f"{experts}.down_proj_input_quantizer"]
        + [f"{experts}.down_proj_weight_quantizers.{i}" for i in range(4)]
    )
    gpt_oss = mc.build_model("gpt_oss")
    rq.insert_quantizers(gpt_oss)
    experts_names = {n for n in quantizer_names(gpt_oss) if n.startswith("model.layers.0.mlp.experts.")}
    assert experts_names == {f"model.layers.0.mlp.experts.{p}_{kind}_quantizer"
                             for p in ("gate_up_proj", "down_proj") for kind in ("input", "weight")}


# --- an expert no calibration token reaches ---------------------------------------------------
@pytest.mark.parametrize("family,moe_layers", [("deepseek_v3", (1,)), ("gpt_oss", (0, 1))])
def test_expert_without_calibration_tokens_is_reported_and_exported_as_modelopt_does(modelopt, family, moe_layers, tmp_path):
    batches, _ = mc.default_batches()
    model = mc.never_route_to_expert_3(family)
    report = rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_kv"), batches, progress=False)
    assert report.experts_without_tokens == [f"model.layers.{i}.mlp.experts.3" for i in moe_layers]
    assert "experts no calibration token reached (%d" % len(moe_layers) in report.to_table()
    for recipe in ("fp8_default-fp8_kv", "nvfp4_default-fp8_kv"):
        result = mc.compare_family(family, recipe, build=lambda: mc.never_route_to_expert_3(family), workdir=tmp_path)
        assert result.ok, result.summary()
    if family == "deepseek_v3":  # the expert still has every scale, its input scale the layer's
        tensors = read_checkpoint_tensors(tmp_path / f"{family}-nvfp4_default-fp8_kv-refquant")
        prefix = "model.layers.1.mlp.experts"
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert {f"{prefix}.3.{part}.{s}" for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")} <= set(tensors)
            assert torch.equal(tensors[f"{prefix}.3.{part}.input_scale"], tensors[f"{prefix}.0.{part}.input_scale"])


# --- experts implementations that would bypass the quantizers --------------------------------
def test_insert_quantizers_forces_the_eager_experts_implementation_as_modelopt():
    model = mc.build_model("qwen3_moe")
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default
    rq.insert_quantizers(model)
    assert model.config._experts_implementation == "eager"


def test_inserted_quantizers_take_their_parents_mode_so_an_eval_model_calibrates_without_a_mode_switch(monkeypatch):
    """A new nn.Module starts in training mode; the quantizers (and the experts' lists of them) take
    their parent's flag instead, as model.eval() / model.train() would set it, so max calibration
    of a model in eval mode (from_pretrained's) leaves every module as it is without walking the
    model twice (~1,300 modules each in the MoE benchmark's)."""
    from conftest import tiny_qwen3_moe

    for mode in ("eval", "train", "mixed"):
        model = tiny_qwen3_moe()
        if mode == "train":
            model.train()
        elif mode == "mixed":
            model.model.layers[1].train()
        before = {id(m) for m in model.modules()}
        rq.insert_quantizers(model)
        parents = dict(model.named_modules())
        added = [(name, m) for name, m in model.named_modules() if id(m) not in before]
        assert any(isinstance(m, TensorQuantizer) for _, m in added) and any(isinstance(m, nn.ModuleList) for _, m in added)
        for name, module in added:
            assert module.training == parents[name.rpartition(".")[0]].training, (mode, name)
        assert any(m.training for _, m in added) == (mode != "eval"), mode
    model = tiny_qwen3_moe()
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    switches = []
    monkeypatch.setattr(nn.Module, "train", lambda self, flag=True: switches.append(flag) or self)
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), [batch], progress=False)
    assert switches == [] and not any(m.training for m in model.modules())


def test_experts_implementation_changed_after_quantization_raises():
    batches, eval_batch = mc.default_batches()
    model = mc.build_model("qwen3_moe")
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    model.config._experts_implementation = "grouped_mm"
    with pytest.raises(ValueError, match=r"experts_implementation='grouped_mm'.*set_experts_implementation\('eager'\)"):
        model(input_ids=eval_batch)


class BatchedExperts(nn.Module):
    """transformers' fused experts layout (num_experts, 3-D gate_up_proj / down_proj) whose forward
    multiplies all experts at once with torch.bmm, as the grouped / batched implementations do;
    `per_expert=True` takes the F.linear path instead."""

    def __init__(self, experts: int = 4, hidden: int = 16, intermediate: int = 8):
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, intermediate))

    def forward(self, hidden_states, per_expert: bool = False):
        if per_expert:
            return sum(F.linear(F.linear(hidden_states, self.gate_up_proj[i]).chunk(2, -1)[0], self.down_proj[i])
                       for i in range(self.num_experts))
        gate_up = torch.bmm(hidden_states.expand(self.num_experts, -1, -1), self.gate_up_proj.transpose(1, 2))
        return torch.bmm(gate_up.chunk(2, -1)[0], self.down_proj.transpose(1, 2)).sum(0)


class WithExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.experts = BatchedExperts()


def test_experts_forward_that_bypasses_the_quantizers_raises():
    torch.manual_seed(0)
    model = WithExperts()
    rq.insert_quantizers(model)
    for quantizer in model.experts.expert_quantizers():
        quantizer.set_config(QuantizerConfig(format="fp8"))
    tokens = torch.randn(5, 16)
    assert model.experts(tokens, per_expert=True).shape == (5, 16)  # through F.linear: quantized
    with pytest.raises(ValueError, match=r"without the per-expert F.linear calls its quantizers sit on"):
        model.experts(tokens)


def test_experts_forward_without_per_expert_calls_is_refused_at_insertion():
    class EinsumExperts(BatchedExperts):
        def forward(self, hidden_states):
            return torch.einsum("th,eih->ti", hidden_states, self.gate_up_proj)

    model = WithExperts()
    model.experts = EinsumExperts()
    with pytest.raises(ValueError, match=r"does not call F.linear per expert"):
        rq.insert_quantizers(model)


def test_experts_modelopt_wraps_otherwise_are_a_clear_error():
    Llama4TextExperts = type("Llama4TextExperts", (BatchedExperts,), {"__module__": "transformers.models.llama4.modeling_llama4"})
    model = WithExperts()
    model.experts = Llama4TextExperts()
    with pytest.raises(ValueError, match=r"quantize experts \(Llama4TextExperts\).*Llama 4"):
        rq.insert_quantizers(model)


# --- all experts' weights in one call, the hidden states before routing ------------------------
def expert_weights(seed: int = 0, shape: tuple[int, int] = (32, 48)) -> tuple[torch.Tensor, torch.Tensor]:
    """An (E, N, K) bf16 weight whose experts span scales, with per-expert amaxes: its own max,
    half of it (clipping), a zero expert, a tiny one (FP8's amax floor)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1e-2, 1.0, 30.0, 1e-8, 3.0]).view(-1, 1, 1)
    weight = (torch.randn(5, *shape, generator=generator) * scales).bfloat16()
    weight[3] = 0
    amax = weight.abs().amax(dim=(1, 2)).clone()
    amax[1] = amax[1] / 2
    amax[3] = 0
    amax[4] = 1e-9
    return weight, amax


@pytest.mark.parametrize("fmt,flavor,backend", [
    ("fp8", "modelopt-cpu", "reference"), ("fp8", "modelopt-cuda", "reference"), ("nvfp4", "modelopt-cpu", "reference"),
    ("nvfp4", "modelopt-cpu", "compiled"),  # the compiled reference with one global amax per expert
])
def test_one_call_over_all_experts_equals_each_experts_own_quantizer_bit_for_bit(fmt, flavor, backend):
    weight, amax = expert_weights()
    quantizers = nn.ModuleList(TensorQuantizer(QuantizerConfig(format=fmt), backend=backend, flavor=flavor) for _ in amax)
    for quantizer, value in zip(quantizers, amax):
        quantizer.set_amax(value.reshape(()))
    stacked = SliceQuantizers(quantizers)(weight)
    assert stacked is not None
    for index, quantizer in enumerate(quantizers):
        expected = quantizer(weight[index])
        assert torch.equal(stacked[index].view(torch.int16), expected.view(torch.int16)), f"expert {index}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("shape", [(32, 48), (64, 128)], ids=["a launch a slice", "one launch"])
def test_one_call_over_all_experts_on_cuda_equals_each_experts_own_quantizer(fmt, backend, shape):
    """(64, 128) slices are whole numbers of the compiled kernels' programs: one launch for all."""
    weight, amax = (t.cuda() for t in expert_weights(shape=shape))
    quantizers = nn.ModuleList(TensorQuantizer(QuantizerConfig(format=fmt), backend=backend, flavor="modelopt-cuda")
                               for _ in amax)
    for quantizer, value in zip(quantizers, amax):
        quantizer.set_amax(value.reshape(()))
    stacked = SliceQuantizers(quantizers)(weight)
    for index, quantizer in enumerate(quantizers):
        assert torch.equal(stacked[index].view(torch.int16), quantizer(weight[index]).view(torch.int16)), f"expert {index}"
        # and the reference numerics of that expert alone (the compiled backend launches a kernel a slice)
        alone = (rq.fp8_fake_quant(weight[index], amax[index], flavor="modelopt-cuda") if fmt == "fp8"
                 else rq.nvfp4_fake_quant(weight[index], amax[index]))
        assert torch.equal(stacked[index].view(torch.int16), alone.view(torch.int16)), f"expert {index} vs reference"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_a_kept_binding_on_cuda_launches_its_bound_kernel_for_any_group_and_reads_amax_writes(fmt):
    from refquant.compiled.functions import BoundSliceLaunch

    weight, amax = (t.cuda() for t in expert_weights(shape=(64, 128)))
    quantizers = nn.ModuleList(TensorQuantizer(QuantizerConfig(format=fmt), backend="compiled", flavor="modelopt-cuda")
                               for _ in amax)
    for quantizer, value in zip(quantizers, amax):
        quantizer.set_amax(value.reshape(()))
    slices = SliceQuantizers(quantizers)
    for first, count in ((0, 5), (1, 3), (3, 2), (0, 5)):
        group = weight[first:first + count]
        got = slices(group, first=first)
        for index in range(count):
            assert _same_bits(got[index], quantizers[first + index](group[index])), f"group {first}+{count}, expert {index}"
    call = slices.bind(0, len(amax), weight)
    assert isinstance(call._launch, BoundSliceLaunch)  # one launch a group, bound once
    quantizers[2].amax.data.copy_(quantizers[2].amax * 3)  # moves no version: read by the launch all the same
    assert slices.bind(0, len(amax), weight) is call
    assert _same_bits(slices(weight)[2], quantizers[2](weight[2]))


def _slice_quantizer_states() -> nn.ModuleList:
    """Weight quantizers of every state collect_slices must tell apart: collecting per tensor
    (two), off, collecting per channel, watched by a hook, a constant amax, quantizing."""
    configs = [QuantizerConfig(format="fp8"), QuantizerConfig(format="nvfp4"), QuantizerConfig(format="fp8", enable=False),
               QuantizerConfig(format="fp8", axis=0), QuantizerConfig(format="fp8"), QuantizerConfig(format="fp8", use_constant_amax=True),
               QuantizerConfig(format="fp8")]
    quantizers = nn.ModuleList(TensorQuantizer(config) for config in configs)
    for index, quantizer in enumerate(quantizers):
        quantizer.name = f"experts.{index}"
        if index != 6:
            quantizer.start_calibration()
        else:
            quantizer.set_amax(torch.tensor(2.0))
    return quantizers


def test_collect_slices_keeps_what_each_slice_call_keeps():
    """collect_slices (one reduction for the slices whose calls only collect) against a call per
    slice: the same collected maxima (a NaN slice included), the watched quantizer called once a
    slice, a second pass over unchanged slices collecting nothing, a changed weight collected again."""
    from refquant.quant.quantizer import collect_slices, memory_key, slice_memory_keys

    generator = torch.Generator().manual_seed(11)
    weight = nn.Parameter((torch.randn(7, 16, 32, generator=generator) * torch.arange(1, 8).view(-1, 1, 1)).bfloat16())
    with torch.no_grad():
        weight[1, 3, 5] = float("nan")
    assert slice_memory_keys(weight, [0, 3, 6]) == {i: memory_key(weight[i]) for i in (0, 3, 6)}
    called, batched = _slice_quantizer_states(), _slice_quantizer_states()
    seen = {id(q): 0 for q in (called[4], batched[4])}
    for quantizers in (called, batched):
        quantizers[4].register_forward_hook(lambda module, args, out: seen.__setitem__(id(module), seen[id(module)] + 1))
    with torch.no_grad():
        for _ in range(2):
            for index in range(7):
                called[index](weight[index])
            collect_slices(batched, weight, range(7))
    assert seen[id(called[4])] == seen[id(batched[4])] == 2
    for index in range(7):
        mine, theirs = batched[index].collected_amax, called[index].collected_amax
        assert (mine is None) == (theirs is None), index
        if mine is not None:
            assert mine.dtype == theirs.dtype and torch.equal(mine.view(torch.int16), theirs.view(torch.int16)), index
    kept = [len(q._calibrator._unfolded) if q._calibrator is not None else None for q in batched]
    collect_slices(batched, weight, range(7))  # unchanged: nothing new
    assert [len(q._calibrator._unfolded) if q._calibrator is not None else None for q in batched] == kept
    assert torch.isnan(batched[1].collected_amax)  # the NaN slice's max, as its own call takes it
    with torch.no_grad():
        weight[2].mul_(4)  # the version moves: the slices asked for are collected again
    collect_slices(batched, weight, [0, 1])
    assert [len(q._calibrator._unfolded) for q in batched[:2]] == [kept[0] + 1, kept[1] + 1]


def test_collecting_passing_slices_makes_the_calls_of_the_wanted_slices_or_none():
    """collect_passing_slices against a call per wanted slice: where every quantizer returns its
    input (collecting per tensor or per channel, off, a constant amax) and nothing watches one,
    the same collected maxima for the wanted slices and nothing for the others, then nothing new
    for unchanged slices; where one quantizes, a hook watches one or a global hook watches all,
    False and no call made (the caller calls each quantizer itself)."""
    from refquant.quant.quantizer import collect_passing_slices

    generator = torch.Generator().manual_seed(12)
    weight = nn.Parameter((torch.randn(7, 16, 32, generator=generator) * torch.arange(1, 8).view(-1, 1, 1)).bfloat16())
    wanted = [1, 0, 3, 1, 1, 1, 0]
    called, batched = _slice_quantizer_states(), _slice_quantizer_states()
    for quantizers in (called, batched):
        quantizers[6] = TensorQuantizer(QuantizerConfig(format="fp8"))  # collecting, not quantizing
        quantizers[6].start_calibration()
    with torch.no_grad():
        handle = batched[4].register_forward_hook(lambda *args: None)
        assert not collect_passing_slices(batched, weight, wanted)  # a hook watches quantizer 4
        assert all(q._calibrator is None or q.collected_amax is None for q in batched)  # no call made
        handle.remove()
        for index in range(7):
            if wanted[index]:
                called[index](weight[index])
        assert collect_passing_slices(batched, weight, wanted)
    for index in range(7):
        mine, theirs = batched[index].collected_amax, called[index].collected_amax
        assert (mine is None) == (theirs is None), index
        if mine is not None:
            assert mine.dtype == theirs.dtype and torch.equal(mine.view(torch.int16), theirs.view(torch.int16)), index
    assert batched[1].collected_amax is None and batched[6].collected_amax is None  # not wanted
    kept = [len(q._calibrator._unfolded) if q._calibrator is not None else None for q in batched]
    assert collect_passing_slices(batched, weight, wanted)  # unchanged: nothing new
    assert [len(q._calibrator._unfolded) if q._calibrator is not None else None for q in batched] == kept
    batched[0].finish_calibration()  # quantizes now
    assert not collect_passing_slices(batched, weight, [1] * 7)
    assert batched[6].collected_amax is None  # declined before any call
    batched[0].set_enabled(False)
    assert collect_passing_slices(batched, weight, [1] * 7)
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not collect_passing_slices(batched, weight, [1] * 7)
    finally:
        handle.remove()


def test_nvfp4_takes_one_amax_per_slice_only_when_asked():
    weight, amax = expert_weights()
    per_slice = amax.reshape(-1, 1, 1)
    with pytest.raises(ValueError, match=r"one global amax per tensor, got shape \(5, 1, 1\).*per_slice_amax=True"):
        rq.nvfp4_fake_quant(weight, per_slice)
    with pytest.raises(ValueError, match=r"one global amax per tensor, got shape \(5, 32, 2\)"):
        rq.nvfp4_fake_quant(weight, weight.abs().amax(dim=-1, keepdim=True).repeat(1, 1, 2), per_slice_amax=True)
    assert rq.nvfp4_fake_quant(weight, per_slice, per_slice_amax=True).shape == weight.shape


def test_one_call_over_all_experts_declines_where_it_would_not_be_exact():
    weight, amax = expert_weights()
    quantizers = nn.ModuleList(TensorQuantizer(QuantizerConfig(format="fp8")) for _ in amax)
    assert SliceQuantizers(quantizers)(weight) is None  # no amax yet: each call's own data
    for quantizer, value in zip(quantizers, amax):
        quantizer.set_amax(value.reshape(()))
    call = SliceQuantizers(quantizers)
    assert call(weight) is not None
    quantizers[2].start_calibration()
    assert call(weight) is None  # calibrating: each expert collects its own amax
    quantizers[2].finish_calibration()
    quantizers[1].set_config(QuantizerConfig(format="nvfp4"))
    assert call(weight) is None  # mixed formats
    quantizers[1].set_config(QuantizerConfig(format="fp8"))
    handle = quantizers[0].register_forward_hook(lambda *args: None)
    assert call(weight) is None  # a hook (the report's error meter) sees every expert's call
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert call(weight) is None  # so does a global module hook
    handle.remove()
    assert call(weight) is not None
    leader = quantizers[0]
    quantizers[0] = nn.Identity()  # not a TensorQuantizer: its own call, whatever it does
    assert call(weight) is None
    quantizers[0] = leader
    quantizers[4].set_enabled(False)
    assert call(weight) is None
    quantizers[4].set_enabled(True)
    assert call(weight) is not None
    saved = quantizers[3].amax
    quantizers[3].set_amax(saved.reshape(1, 1).repeat(2, 1))
    assert call(weight) is None  # an amax of more than one element
    quantizers[3].set_amax(saved.double())
    assert call(weight) is None  # amaxes of mixed dtypes: a stack would promote
    quantizers[3].set_amax(saved)
    quantizers[2].flavor = "modelopt-cuda"
    assert call(weight) is None  # mixed flavors
    quantizers[2].flavor = quantizers[0].flavor

    class Quiet(TensorQuantizer):
        pass

    class Loud(TensorQuantizer):
        def forward(self, x):
            return super().forward(x)

    for cls, binds in ((Quiet, True), (Loud, False)):
        other = cls(quantizers[1].config)
        other.set_amax(quantizers[1].amax)
        original, quantizers[1] = quantizers[1], other
        assert (call(weight) is not None) == binds  # a subclass with its own forward is called itself
        quantizers[1] = original
    for quantizer in quantizers:
        quantizer.set_config(QuantizerConfig(format="fp8", use_constant_amax=True))
    assert torch.equal(call(weight), rq.fp8_fake_quant(weight, 448.0))  # every amax the constant


def _named_bound_quantizers(weight_amax: torch.Tensor) -> nn.ModuleList:
    quantizers = nn.ModuleList(TensorQuantizer(QuantizerConfig(format="fp8")) for _ in weight_amax)
    for index, (quantizer, value) in enumerate(zip(quantizers, weight_amax)):
        quantizer.name = f"experts.{index}"
        quantizer.set_amax(value.reshape(()))
    return quantizers


def _each_own_call(quantizers: nn.ModuleList, weight: torch.Tensor) -> torch.Tensor:
    return torch.stack([quantizer(weight[index]) for index, quantizer in enumerate(quantizers)])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_the_binding_of_all_experts_is_kept_and_computes_with_what_the_buffers_hold_now(monkeypatch):
    weight, amax = expert_weights()
    quantizers = _named_bound_quantizers(amax)
    slices = SliceQuantizers(quantizers)
    stacks = []
    stacked_amax = SliceQuantizers._stacked_amax
    monkeypatch.setattr(SliceQuantizers, "_stacked_amax", staticmethod(lambda *args: stacks.append(1) or stacked_amax(*args)))
    bound = slices.bind(0, len(amax), weight)
    assert slices.bind(0, len(amax), weight) is bound and slices.bind(2, 3, weight) is bound  # a part of the list too
    assert slices.bind(3, 3, weight) is None  # past the list's end
    assert len(stacks) == 1
    base = quantizers[0].amax._base
    assert base is not None and all(quantizer.amax._base is base for quantizer in quantizers)  # one tensor, read by the call
    assert _same_bits(slices(weight), _each_own_call(quantizers, weight))
    assert len(stacks) == 1
    # a write through .data moves no version counter: the kept call reads the buffer all the same
    quantizers[1].amax.data.copy_(torch.tensor(0.25))
    assert slices.bind(0, len(amax), weight) is bound
    assert _same_bits(slices(weight), _each_own_call(quantizers, weight))
    assert float(quantizers[1].amax) == 0.25
    # a write in place moves it: bound again, each amax checked again
    quantizers[2].amax.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"experts\.2: its stored amax holds \[nan\]"):
        slices(weight)
    quantizers[2].set_amax(torch.tensor(3.0, dtype=amax.dtype))  # a new buffer: bound again
    assert _same_bits(slices(weight), _each_own_call(quantizers, weight))
    assert len(stacks) == 3
    quantizers[3].set_config(QuantizerConfig(format="fp8"))  # an equal config, a new object: bound again, same bits
    assert _same_bits(slices(weight), _each_own_call(quantizers, weight))
    assert len(stacks) == 4


def test_amaxes_read_by_a_kept_binding_save_load_and_copy_as_separate_buffers():
    import io

    weight, amax = expert_weights()
    quantizers = _named_bound_quantizers(amax)
    slices = SliceQuantizers(quantizers)
    expected = slices(weight)
    state = quantizers.state_dict()
    assert quantizers[0].amax._base is not None and all(value._base is None for value in state.values())
    safetensors = pytest.importorskip("safetensors.torch")
    assert safetensors.load(safetensors.save(state)).keys() == state.keys()  # no shared storage to refuse
    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    fresh = _named_bound_quantizers(torch.ones_like(amax))
    fresh.load_state_dict(torch.load(saved))
    assert _same_bits(SliceQuantizers(fresh)(weight), expected)
    # loading into the kept binding's buffers writes the tensor it reads (and moves its version)
    quantizers.load_state_dict(_named_bound_quantizers(amax * 2).state_dict())
    assert _same_bits(slices(weight), _each_own_call(quantizers, weight))
    assert not _same_bits(slices(weight), expected)
    copied = copy.deepcopy(slices)  # the kept binding is made again for the copy's quantizers
    assert copied._kept is None
    assert _same_bits(copied(weight), slices(weight))
    copied.quantizers[0].set_amax(torch.tensor(1e-3, dtype=amax.dtype))
    assert _same_bits(slices(weight), _each_own_call(quantizers, weight))  # the original's own


def modelopts_order_of_work(monkeypatch) -> None:
    """From here on, the experts run as modelopt runs them: transformers' own eager loop, every
    expert's input and weight through its quantizers at its own F.linear call."""
    monkeypatch.setattr(experts_module, "runs_eager_forward", lambda cls: False)
    monkeypatch.setattr(experts_module, "quantizes_with_fixed_amax", lambda quantizer: False)
    monkeypatch.setattr(SliceQuantizers, "__call__", lambda self, x, first=0: None)


def calibrated_state(model) -> dict:
    """Every quantizer's amax and every experts module's calibration token counts."""
    state = {name: q.amax.clone() for name, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.amax is not None}
    state |= {name: list(m.calibration_tokens) for name, m in model.named_modules() if experts_module.is_quant_experts(m)}
    return state


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_transformers_eager_experts_forward_is_the_one_refquants_loop_reproduces(family):
    model = mc.build_model(family)
    classes = {type(m) for m in model.modules() if experts_module.experts_layout("", m) is not None}
    assert classes and all(experts_loop.runs_eager_forward(cls) for cls in classes), classes


@pytest.mark.parametrize("family,recipe,group_rows,sum_bytes", [
    ("qwen3_moe_top4", "nvfp4_default-fp8_kv", 10**9, experts_loop.SUM_BYTES), ("qwen3_moe_top4", "fp8_default-fp8_cast_kv", 40, 0),
    ("qwen3_moe_top4", "nvfp4_default-fp8_cast_kv", 7, experts_loop.SUM_BYTES), ("qwen3_moe_top4", "fp8_default-fp8_kv", 10**9, 0),
    ("mixtral", "fp8_default-fp8_kv", 10**9, experts_loop.SUM_BYTES), ("deepseek_v3", "nvfp4_default-fp8_kv", 1, 0),
    ("olmoe", "fp8_default-fp8_kv", 40, experts_loop.SUM_BYTES),
])
def test_experts_loop_calibrates_and_quantizes_with_the_per_expert_calls_bits(family, recipe, group_rows, sum_bytes, monkeypatch):
    """refquant's experts loop (tokens found by one sort, elementwise steps and the shared input
    quantizers over a group of experts' rows, groups of at most group_rows rows: one group, some,
    every expert alone; outputs summed token by token, or, sum_bytes 0, by an index_add_ per
    expert) against modelopt's order of work: the same amaxes and token counts after calibration,
    the same logits quantized, and the same logits with every quantizer off, bit for bit."""
    batches, eval_batch = mc.default_batches()
    monkeypatch.setattr(experts_loop, "row_bytes", lambda *args: 1)  # the budget counts rows
    monkeypatch.setattr(experts_loop, "GROUP_BYTES", group_rows)
    monkeypatch.setattr(experts_loop, "SUM_BYTES", sum_bytes)
    model = mc.build_model(family)
    per_expert = copy.deepcopy(model)
    rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    ours = (calibrated_state(model), mc.logits_of(model, eval_batch))
    with all_quantizers_off(model):
        ours_off = mc.logits_of(model, eval_batch)
    modelopts_order_of_work(monkeypatch)
    rq.quantize_model(per_expert, rq.load_recipe(recipe), batches, progress=False)
    assert same_state(ours[0], calibrated_state(per_expert))
    assert torch.equal(ours[1], mc.logits_of(per_expert, eval_batch))
    assert torch.equal(ours[1], mc.logits_of(model, eval_batch))  # the calibrated model, run modelopt's way
    with all_quantizers_off(per_expert):
        assert torch.equal(ours_off, mc.logits_of(per_expert, eval_batch))


@pytest.mark.parametrize("family,recipe,experts_per_group", [
    ("qwen3_moe_top4", "nvfp4_default-fp8_kv", 3), ("qwen3_moe_top4", "fp8_default-fp8_cast_kv", 1),
    ("mixtral", "nvfp4_default-fp8_cast_kv", 8), ("olmoe", "fp8_default-fp8_kv", 5),
])
def test_swapped_experts_forward_quantizes_a_group_of_experts_at_a_time_with_the_per_expert_calls_bits(
        family, recipe, experts_per_group, monkeypatch):
    """An experts class whose forward is not transformers' eager text runs its own forward with
    F.linear swapped: each expert's weight comes from a group of at most experts_per_group
    experts quantized in one call when first asked for, not from all experts at once, and gives
    the per-expert calls' bits."""
    batches, eval_batch = mc.default_batches()
    model = mc.build_model(family)
    rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    monkeypatch.setattr(experts_module, "runs_eager_forward", lambda cls: False)  # the swapped forward
    monkeypatch.setattr(experts_module, "loop_forward", lambda *a, **k: pytest.fail("the loop ran"))
    monkeypatch.setattr(experts_loop, "experts_per_group", lambda module: experts_per_group)
    groups = []
    call = SliceQuantizers.__call__

    def recorded(self, x, first=0):
        result = call(self, x, first)
        groups.append((id(self.quantizers), first, x.shape[0], result is not None))
        return result

    monkeypatch.setattr(SliceQuantizers, "__call__", recorded)
    swapped = mc.logits_of(model, eval_batch)  # one forward
    assert groups and all(stacked for *_, stacked in groups)  # the grouped results are what the forward used
    assert max(size for _, _, size, _ in groups) <= experts_per_group
    assert len({(quantizers, first) for quantizers, first, _, _ in groups}) == len(groups)  # each group quantized once
    modelopts_order_of_work(monkeypatch)
    assert torch.equal(swapped, mc.logits_of(model, eval_batch))


def test_swapped_experts_forward_gives_a_part_of_an_experts_slice_to_that_experts_quantizer():
    """A forward that hands F.linear part of an expert's slice (rows of gate_up_proj) gets that
    part through the expert's own quantizer, as modelopt's call on that view, not the group's
    quantized slice."""
    batches, _ = mc.default_batches()
    model = mc.build_model("qwen3_moe")
    rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_kv"), batches, progress=False)
    experts = next(m for m in model.modules() if experts_module.is_quant_experts(m))
    parameters = {p: getattr(experts, p) for p in experts._refquant_layout.projections}
    expert_weight = experts._grouped_expert_weights(parameters)
    quantizer = experts.gate_up_proj_weight_quantizers[2]
    with torch.no_grad():
        whole, part = experts.gate_up_proj[2], experts.gate_up_proj[2][:16]
        assert torch.equal(expert_weight("gate_up_proj", 2, whole), quantizer(whole))
        assert torch.equal(expert_weight("gate_up_proj", 2, part), quantizer(part))


def test_experts_loop_calls_a_watched_or_dynamic_quantizer_once_per_expert_as_modelopt():
    """An input quantizer whose calls something watches (a hook), or whose amax comes from each
    call's data, is called on each expert's rows, as the eager loop calls it."""
    model = mc.build_model("qwen3_moe")
    rq.insert_quantizers(model)
    rq.apply_recipe(model, rq.load_recipe("fp8_default-fp8_kv"))  # no calibration: amax from each call
    experts = next(m for m in model.modules() if experts_module.is_quant_experts(m))
    seen = []
    experts.down_proj_input_quantizer.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    tokens = torch.tensor([[0, 1], [1, 2], [0, 3]])
    weights = torch.full((3, 2), 0.5, dtype=torch.bfloat16)
    hidden = torch.randn(3, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        experts(hidden, tokens, weights)
    assert seen == [2, 2, 1, 1]  # experts 0..3 received 2, 2, 1 and 1 rows


def test_swapped_forward_groups_as_many_experts_as_the_byte_budget_holds():
    model = mc.build_model("qwen3_moe")
    experts = next(m for m in model.modules() if experts_module.experts_layout("", m) is not None)
    per_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 2  # bf16
    assert experts_loop.expert_copy_bytes(experts) == per_expert
    assert experts_loop.experts_per_group(experts) == experts_loop.COPY_BYTES // per_expert
    with torch.no_grad():
        big = nn.Parameter(torch.empty(2, experts_loop.COPY_BYTES, 1, dtype=torch.bfloat16), requires_grad=False)
    experts.gate_up_proj = big
    assert experts_loop.experts_per_group(experts) == 1  # never fewer than one


def test_experts_loop_groups_consecutive_experts_within_the_byte_budget():
    model = mc.build_model("qwen3_moe")
    experts = next(m for m in model.modules() if experts_module.experts_layout("", m) is not None)
    hidden = torch.empty(3, model.config.hidden_size, dtype=torch.bfloat16)
    inner = experts.down_proj.shape[-1]
    row_bytes = max(model.config.hidden_size + 2 * inner, 3 * inner) * 2  # input and gate_up, or gate_up and activation: bf16
    assert experts_loop.row_bytes(experts, hidden) == row_bytes
    assert experts_loop.row_bytes(experts, hidden.float()) == 2 * row_bytes
    assert experts_loop.row_bytes(experts, hidden[:, :8]) == 3 * inner * 2  # experts wider than the model
    assert experts_loop.row_bytes(experts, hidden, torch.ones(3, 2, dtype=torch.bfloat16)) == row_bytes
    wide = torch.empty(3, 8 * inner, dtype=torch.bfloat16)  # fp32 routing weights: the product and y, 2 + 4 bytes
    assert experts_loop.row_bytes(experts, wide, torch.ones(3, 2)) == 8 * inner * 6
    groups = experts_loop.expert_groups
    assert groups([3, 0, 2, 5, 1, 0], 1, 0, 5) == [range(0, 3), range(3, 4), range(4, 6)]
    assert groups([9, 1, 1], 1, 0, 5) == [range(0, 1), range(1, 3)]  # an expert over the budget: alone
    assert groups([0, 0, 0], 1, 0, 5) == [range(0, 3)]
    assert groups([0, 0, 0], 1, 2, 5) == [range(0, 2), range(2, 3)]  # copies cost without rows
    assert groups([2, 2, 2], 3, 0, 5) == [range(0, 1), range(1, 2), range(2, 3)]
    assert groups([1, 1, 1, 1], 2, 3, 10) == [range(0, 2), range(2, 4)]  # rows and copies together
    assert groups([4, 1, 1, 1, 1, 1, 1], 1, 0, 8) == [range(0, 2), range(2, 7)]  # 5 and 5, not 8 and 2
    assert groups([], 1, 0, 8) == [range(0, 0)]

    def fewest_groups(costs: list[int], cap: int) -> int:
        """Groups of consecutive experts, each taking experts in turn while it holds at most cap
        (an expert over it alone): the fewest any split under that cap can have."""
        count, held = 1, 0
        for index, cost in enumerate(costs):
            if index and held + cost > cap:
                count, held = count + 1, 0
            held += cost
        return count

    counts = [int(c) for c in torch.randint(0, 9, (50,), generator=torch.Generator().manual_seed(0))]
    for per_row in (1, 3):
        for per_expert in (0, 1, 7):
            costs = [c * per_row + per_expert for c in counts]
            for budget in (1, 4, 9, 30, 100, 1000, 10**6):
                found = groups(counts, per_row, per_expert, budget)
                held = [sum(costs[e] for e in g) for g in found]
                assert [e for g in found for e in g] == list(range(50))  # every expert once, in order
                assert all(h <= budget or len(g) == 1 for g, h in zip(found, held))
                assert len(found) == fewest_groups(costs, budget)
                largest = max(range(len(found)), key=held.__getitem__)
                if len(found[largest]) > 1:  # (one expert alone is the largest group of any split)
                    # no split into as few groups has a largest group smaller by more than budget / 256
                    assert fewest_groups(costs, held[largest] - max(1, budget >> 8) - 1) > len(found)


def test_experts_loop_of_no_tokens_is_the_eager_loops_empty_result(monkeypatch):
    model = mc.build_model("qwen3_moe")
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), mc.default_batches()[0], progress=False)
    experts = next(m for m in model.modules() if experts_module.is_quant_experts(m))
    hidden = torch.empty(0, model.config.hidden_size, dtype=torch.bfloat16)
    args = (hidden, torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2, dtype=torch.bfloat16))
    with torch.no_grad():
        ours = experts(*args)
        modelopts_order_of_work(monkeypatch)
        theirs = experts(*args)
    assert ours.shape == theirs.shape == hidden.shape and ours.dtype == theirs.dtype


def test_experts_loop_leaves_an_index_outside_the_experts_to_the_modules_own_forward():
    model = mc.build_model("qwen3_moe")
    rq.insert_quantizers(model)
    rq.apply_recipe(model, rq.load_recipe("fp8_default-fp8_kv"))
    experts = next(m for m in model.modules() if experts_module.is_quant_experts(m))
    hidden = torch.randn(2, model.config.hidden_size, dtype=torch.bfloat16)
    weights = torch.ones(2, 2, dtype=torch.bfloat16)
    for outside in (torch.tensor([[0, experts.num_experts], [1, 2]]), torch.tensor([[0, 1], [-1, 2]]),
                    torch.tensor([[0, 1], [2**16 + 1, 2]]), torch.tensor([[0, 1], [-2**16, 2]]),
                    torch.tensor([[0, 1], [2**31 - 1, 2]], dtype=torch.int32)):  # none wraps onto an expert
        assert experts_loop.loop_forward(experts, hidden, outside, weights, None) is None
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):  # the routing's counts, any integer ids
        routing = experts_loop._Routing(torch.tensor([[0, 3], [3, 1]], dtype=dtype), weights, experts.num_experts)
        assert routing.read() and routing.counts[:4] == [1, 1, 0, 2] and routing.starts[:5] == [0, 1, 2, 2, 4]
        assert routing.token.tolist() == [0, 1, 1, 0]  # by expert, then by top-k position, then token


def test_compiled_backend_quantizes_moe_as_modelopt(modelopt):
    result = mc.compare_family("qwen3_moe", "fp8_default-fp8_kv", backend="compiled")
    assert result.ok, result.summary()


# --- the checkpoint round trip ----------------------------------------------------------------
@pytest.mark.parametrize("family,recipe", [("qwen3_moe", "nvfp4_default-fp8_kv"), ("mixtral", "fp8_default-fp8_kv"),
                                           ("gpt_oss", "nvfp4_default-fp8_kv"), ("gpt_oss", "fp8_default-fp8_kv")])
def test_load_checkpoint_of_moe_equals_compress_weights(family, recipe, tmp_path):
    batches, eval_batch = mc.default_batches()
    model = mc.build_model(family)
    rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    rq.export_checkpoint(model, tmp_path / "ckpt")
    compressed = copy.deepcopy(model)
    rq.compress_weights(compressed)
    reloaded = rq.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(mc.logits_of(reloaded, eval_batch), mc.logits_of(compressed, eval_batch))
    rq.export_checkpoint(compressed, tmp_path / "again")  # a compressed model exports the same bytes
    first, again = read_checkpoint_tensors(tmp_path / "ckpt"), read_checkpoint_tensors(tmp_path / "again")
    assert set(first) == set(again) and all(mc.same_bits(first[k], again[k]) for k in first)


def test_mixtral_checkpoint_uses_the_hub_names():
    model = mc.build_model("mixtral")
    batches, _ = mc.default_batches()
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    from refquant.hf.export import plan_export
    from refquant.hf.export.write import checkpoint_state_dict

    plan = plan_export(model)
    keys = set(checkpoint_state_dict(model, plan))
    assert {f"model.layers.0.block_sparse_moe.experts.2.{w}.weight" for w in ("w1", "w2", "w3")} <= keys
    assert not any(".mlp." in key for key in keys)
    assert "model.layers.1.block_sparse_moe.gate" in plan.hf_quant_config["quantization"]["exclude_modules"]


@pytest.mark.parametrize("family, recipe", [("qwen3_moe", "nvfp4_default-fp8_cast_kv"), ("qwen3_moe", "fp8_default-fp8_kv"),
                                            ("gpt_oss", "fp8_default-fp8_kv")])
def test_the_export_holds_one_expert_projections_tensors_at_a_time(family, recipe, monkeypatch):
    """checkpoint_tensors computes an experts module's tensors as they are asked for: while the
    consumer takes one, the tensors computed before it that it let go of are freed, so the
    layer's device holds one expert's projection (gpt-oss: one projection) at a time, not the
    module's. The streamed tensors are the module's tensors() exactly."""
    import weakref

    from refquant.hf.export import experts as experts_export
    from refquant.hf.export import plan_export
    from refquant.hf.export.write import checkpoint_tensors

    model = mc.build_model(family)
    batches, _ = mc.default_batches()
    rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    plan = plan_export(model)
    assert plan.experts
    computed: list[weakref.ref] = []  # every tensor the experts' export computed, in order
    for name in ("export_linear_tensors", "_transposed_tensors"):
        real = getattr(experts_export, name)

        def recording(*args, _real=real, **kwargs):
            tensors = _real(*args, **kwargs)
            computed.extend(weakref.ref(t) for t in tensors.values())
            return tensors

        monkeypatch.setattr(experts_export, name, recording)
    most_alive = 0
    for key, tensor in checkpoint_tensors(model, plan):
        del tensor  # the consumer writes it and lets it go (freed by reference count: no cycle holds it)
        most_alive = max(most_alive, sum(ref() is not None for ref in computed))
    parts = sum(len(e.projections) for e in plan.experts.values())
    per_part = len(computed) // parts
    assert computed and len(computed) == parts * per_part
    assert most_alive <= per_part, f"{most_alive} exported tensors alive at once, one part has {per_part}"
    for experts in plan.experts.values():
        streamed = dict(experts.stream())
        whole = experts.tensors()
        assert list(streamed) == list(whole) and all(mc.same_bits(streamed[k], whole[k]) for k in whole)


def test_renames_that_cannot_be_reversed_keep_the_in_memory_names_as_modelopt(modelopt):
    """gpt-oss keeps its experts 3-D; under an experts converter (here Qwen3-MoE's, as if
    from_pretrained had applied it) modelopt cannot rename them per expert and keeps every
    in-memory name, with a warning; so does refquant."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    def build():
        model = mc.build_model("gpt_oss")
        model._weight_conversions = get_model_conversion_mapping(mc.build_model("qwen3_moe"), add_legacy=False)
        return model

    with pytest.warns(UserWarning, match=r"cannot be reversed \(experts not expanded \(model.layers.0.mlp.experts.gate_up_proj"):
        result = mc.compare_family("gpt_oss", "fp8_default-fp8_kv", build=build)
    assert result.ok, result.summary()


def test_dense_fused_weights_modelopt_would_split_back_raise():
    from transformers.core_model_loading import Concatenate, WeightConverter

    from refquant.hf.export.names import checkpoint_names

    model = mc.build_model("qwen3_moe")
    model._weight_conversions = [WeightConverter(source_patterns=["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                                                 target_patterns="mlp.gate_up_proj.weight", operations=[Concatenate(dim=0)])]
    with pytest.raises(ValueError, match=r"splits the quantized tensor back; refquant does not implement that split"):
        checkpoint_names(model)


# --- weight coverage in the report ------------------------------------------------------------
def test_report_counts_linear_and_expert_weight_parameters():
    batches, _ = mc.default_batches()
    model = mc.build_model("qwen3_moe")
    report = rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    experts = 2 * 4 * (2 * 32 * 64 + 64 * 32)  # layers x experts x (gate_up + down)
    attention = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64)  # q (4 x 16), k and v (2 x 16), o
    lm_head = mc.VOCAB * 64
    totals = report.totals
    assert (totals["expert_weight_params"], totals["expert_weight_params_quantized"]) == (experts, experts)
    assert (totals["linear_weight_params"], totals["linear_weight_params_quantized"]) == (attention + lm_head, attention)
    assert f"100.0% of expert weight parameters ({experts:,} of {experts:,})" in report.to_table()
    assert report.warnings == []


def test_recipe_that_leaves_most_weights_unquantized_warns(tmp_path):
    recipe = tmp_path / "no_experts.toml"
    recipe.write_text(
        'description = "FP8, experts left out"\nalgorithm = "max"\n'
        'quant_cfg = [{ import = "base_disable_all" }, { import = "w8a8_fp8_fp8" }, '
        '{ import = "default_disabled_quantizers" }, { quantizer_name = "*experts*", enable = false }]\n'
    )
    batches, _ = mc.default_batches()
    model = mc.build_model("qwen3_moe")
    with pytest.warns(UserWarning, match=r"asks for quantized weights, but only 26\.4% .*model\.layers\.\*\.mlp\.experts"):
        report = rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    assert report.totals["expert_weight_params_quantized"] == 0
    assert report.experts_without_tokens == []  # experts off: nothing was counted, nothing to report
    assert "warning: recipe no_experts asks for quantized weights" in report.to_table()


# --- the command line on a local MoE folder ---------------------------------------------------
def test_cli_quantize_of_a_local_qwen3_moe_folder_writes_modelopts_checkpoint(modelopt, tmp_path):
    from transformers import AutoModelForCausalLM

    from refquant.hf import models

    folder = tmp_path / "qwen3-moe"
    mc.build_model("qwen3_moe").save_pretrained(folder)  # no tokenizer files: the byte tokenizer
    out = tmp_path / "refquant-ckpt"
    command = [sys.executable, "-m", "refquant", "quantize", "--model", str(folder), "--recipe", "fp8_default-fp8_kv",
               "--out", str(out), "--calib-batches", "2", "--seq-len", "16", "--no-progress"]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "using the built-in byte-level tokenizer" in completed.stderr

    calib, _ = models.token_batches(models.byte_tokenize(models.CALIBRATION_TEXT), num_batches=2, seq_len=16)
    theirs = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto").eval()
    mc.quantize_with_modelopt(theirs, "fp8_default-fp8_kv", calib)
    mc.export_with_modelopt(theirs, tmp_path / "modelopt-ckpt")
    comparison = mc.compare_exports(out, tmp_path / "modelopt-ckpt")
    assert comparison["ok"], comparison
    assert comparison["tensors"] == len(read_checkpoint_tensors(out))
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"] == [
        "lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_experts_loop_collects_each_expert_weight_once_per_calibration(monkeypatch):
    """Each weight slice's max is taken once, when the slices pass through their quantizers before
    the forwards (one reduction a projection); the loop's later calls on the same slice take
    nothing new (the same max, at a launch per expert and batch)."""
    from refquant.quant import quantizer as quantizer_module

    names = {}  # calibrator -> its quantizer's name
    collected = []  # the quantizers whose calibrator took a max, one entry a max
    start, keep_max = TensorQuantizer.start_calibration, quantizer_module._MaxCalibrator.keep_max

    def started(self):
        start(self)
        if self._calibrator is not None:
            names[id(self._calibrator)] = self.name

    def counted(self, value):
        keep_max(self, value)
        collected.append(names[id(self)])

    monkeypatch.setattr(TensorQuantizer, "start_calibration", started)
    monkeypatch.setattr(quantizer_module._MaxCalibrator, "keep_max", counted)
    reductions = []
    norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda x, *a, **k: reductions.append(x) or norm(x, *a, **k))
    batches, _ = mc.default_batches()
    model = mc.build_model("qwen3_moe_top4")
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    expert_weights = [n for n in collected if ".experts." in n and "weight_quantizers." in n]
    assert expert_weights and len(expert_weights) == len(set(expert_weights))
    experts = [m for m in model.modules() if experts_module.is_fused_experts(m)]
    assert len(expert_weights) == sum(2 * m.num_experts for m in experts)  # every expert of both projections
    weights = [getattr(m, p) for m in experts for p in ("gate_up_proj", "down_proj")]
    of_weights = [r for r in reductions if any(r.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for w in weights)]
    assert sorted(tuple(r.shape) for r in of_weights) == sorted(tuple(w.shape) for w in weights)  # each 3-D weight once, no slice
    shared_inputs = [n for n in collected if n.endswith("experts.down_proj_input_quantizer")]
    assert len(shared_inputs) == len(batches) * model.config.num_hidden_layers
