"""The experts loop's grouped matmul (refquant.hf.grouped_linear): used only where it is measured
to give each expert's F.linear bits, and the per-expert calls otherwise. On a GPU the family matrix
(tests/test_modelopt_families.py) runs it against modelopt; here it is let onto the CPU, where
grouped_mm exists too, and held to modelopt's order of work bit for bit."""

from __future__ import annotations

import copy
import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import refquant as rq
from refquant.hf import experts_loop, grouped_linear
from refquant.quant.backends import numerics
from refquant.quant.quantizer import TensorQuantizer

pytest.importorskip("transformers")

import modelopt_compare as mc  # noqa: E402  (tests/modelopt_compare.py)
from test_experts import calibrated_state, modelopts_order_of_work, same_state  # noqa: E402

if not hasattr(F, "grouped_mm"):
    pytest.skip("this torch has no torch.nn.functional.grouped_mm", allow_module_level=True)


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """The grouped matmul allowed for bf16 on any device, its measurements fresh, and its calls
    counted: returns the list of the group count of each grouped matmul the loop made (its
    checks' calls of grouped_mm not counted)."""
    grouped_linear.forget_checks()
    monkeypatch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: x.dtype == torch.bfloat16)
    calls = []
    real = experts_loop.grouped_linear

    def counted(x, weights, *args):
        out = real(x, weights, *args)
        if out is not None:
            calls.append(weights.shape[0])
        return out

    monkeypatch.setattr(experts_loop, "grouped_linear", counted)
    yield calls
    grouped_linear.forget_checks()


@pytest.mark.parametrize("family,recipe", [
    ("qwen3_moe_top4", "nvfp4_default-fp8_kv"), ("qwen3_moe_top4", "fp8_default-fp8_cast_kv"),
    ("mixtral", "fp8_default-fp8_kv"), ("deepseek_v3", "nvfp4_default-fp8_cast_kv"), ("olmoe", "fp8_default-fp8_kv"),
])
def test_grouped_matmul_calibrates_and_quantizes_with_the_per_expert_calls_bits(family, recipe, grouped_on_cpu, monkeypatch):
    """With the grouped matmul on (calibration collects each expert's weight and multiplies the
    group at once; the forward multiplies the group's quantized weights at once), amaxes, token
    counts and logits equal modelopt's order of work, bit for bit, and the grouped matmul ran."""
    batches, eval_batch = mc.default_batches()
    model = mc.build_model(family)
    per_expert = copy.deepcopy(model)
    rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    ours = (calibrated_state(model), mc.logits_of(model, eval_batch))
    assert len(grouped_on_cpu) > 2 and grouped_linear._checked_counts and not grouped_linear._failed
    modelopts_order_of_work(monkeypatch)
    monkeypatch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: False)
    rq.quantize_model(per_expert, rq.load_recipe(recipe), batches, progress=False)
    assert same_state(ours[0], calibrated_state(per_expert))
    assert torch.equal(ours[1], mc.logits_of(per_expert, eval_batch))


def test_grouped_matmul_on_folded_weights_gives_the_per_expert_calls_bits(grouped_on_cpu):
    batches, eval_batch = mc.default_batches()
    model = mc.build_model("qwen3_moe_top4")
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    unfolded = mc.logits_of(model, eval_batch)
    rq.fold_weights(model)
    grouped_on_cpu.clear()
    assert torch.equal(mc.logits_of(model, eval_batch), unfolded)
    assert grouped_on_cpu  # the folded weights' slices went to grouped_mm as they lie


def test_a_groups_budget_counts_quantized_copies_of_its_weights_never_slices_as_they_lie(grouped_on_cpu, monkeypatch):
    """GROUP_BYTES bounds what a group holds: its rows and, where its weights are quantized
    copies, those copies, one projection's at a time (the larger one's counted); calibrating or
    folded, the group's weights are the parameter's slices and cost nothing. Every group of
    several experts stays within the budget, and the bits are the same however the experts are
    grouped."""
    batches, eval_batch = mc.default_batches()
    model = mc.build_model("qwen3_moe_top4")
    experts = model.config.num_experts
    module = next(m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"))
    copy_bytes = experts_loop.projection_copy_bytes(module, "gate_up_proj")
    assert copy_bytes == 2 * experts_loop.projection_copy_bytes(module, "down_proj")  # gate_up's the larger
    budget = 3 * copy_bytes  # rows and at most three experts' copies a group
    monkeypatch.setattr(experts_loop, "GROUP_BYTES", budget)
    seen = []
    real = experts_loop.expert_groups

    def recorded(counts, per_row, per_expert, limit):
        groups = real(counts, per_row, per_expert, limit)
        seen.append((per_expert, limit))
        for group in groups:
            held = sum(counts[e] for e in group) * per_row + len(group) * per_expert
            assert len(group) == 1 or held <= limit
        return groups

    monkeypatch.setattr(experts_loop, "expert_groups", recorded)
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    assert seen and {per_expert for per_expert, _ in seen} == {0}  # calibrating: slices, no copies
    calibrating_groups = len(grouped_on_cpu)
    seen.clear()
    grouped_on_cpu.clear()
    unfolded = mc.logits_of(model, eval_batch)
    assert seen and {per_expert for per_expert, _ in seen} == {copy_bytes} and {l for _, l in seen} == {budget}
    assert max(grouped_on_cpu) <= 3 and len(grouped_on_cpu) > 2 * len(seen)  # the copies split the layers
    rq.fold_weights(model)
    seen.clear()
    grouped_on_cpu.clear()
    assert torch.equal(mc.logits_of(model, eval_batch), unfolded)
    assert {per_expert for per_expert, _ in seen} == {0}  # folded: the slices as they lie
    assert max(grouped_on_cpu) > 3 and calibrating_groups


def test_grouped_matmul_whose_bits_differ_is_not_used(grouped_on_cpu, monkeypatch):
    """A grouped_mm whose result differs from F.linear's in one bit fails the check: a warning
    names the weights, the per-expert calls give the bits, and the check is not made again."""
    real = F.grouped_mm

    def off_by_one_bit(a, b, *args, **kwargs):
        out = real(a, b, *args, **kwargs)
        out.view(torch.int16)[-1, -1] ^= 1
        return out

    batches, eval_batch = mc.default_batches()
    model = mc.build_model("qwen3_moe_top4")
    reference = copy.deepcopy(model)
    monkeypatch.setattr(F, "grouped_mm", off_by_one_bit)
    with pytest.warns(UserWarning, match="per-expert F.linear calls stay"):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    assert grouped_linear._failed and not grouped_linear._checked_counts
    monkeypatch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: False)
    rq.quantize_model(reference, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    monkeypatch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: x.dtype == torch.bfloat16)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second check, no second warning
        ours = mc.logits_of(model, eval_batch)
    assert torch.equal(ours, mc.logits_of(reference, eval_batch))


def test_grouped_matmul_that_raises_leaves_the_per_expert_calls(grouped_on_cpu, monkeypatch):
    batches, eval_batch = mc.default_batches()
    model = mc.build_model("mixtral")
    reference = copy.deepcopy(model)
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    rq.quantize_model(reference, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    grouped_linear.forget_checks()

    def refuses(*args, **kwargs):
        raise RuntimeError("no kernel for this layout")

    monkeypatch.setattr(F, "grouped_mm", refuses)
    with pytest.warns(UserWarning, match="grouped_mm raised RuntimeError"):
        ours = mc.logits_of(model, eval_batch)
    monkeypatch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: False)
    assert torch.equal(ours, mc.logits_of(reference, eval_batch))


def test_grouped_matmul_that_raises_after_its_check_warns_and_leaves_the_per_expert_calls(grouped_on_cpu, monkeypatch):
    """The check passed (an earlier forward used grouped_mm); a later grouped_mm that raises is
    named in a warning, and the per-expert calls give the bits."""
    batches, eval_batch = mc.default_batches()
    model = mc.build_model("qwen3_moe_top4")
    reference = copy.deepcopy(model)
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    assert grouped_linear._checked_counts and grouped_on_cpu
    checked = {key: set(range(1, 2**16)) for key in grouped_linear._checked_counts}  # no check left to run
    monkeypatch.setattr(grouped_linear, "_checked_counts", checked)

    def refuses(*args, **kwargs):
        raise RuntimeError("no kernel for this layout")

    monkeypatch.setattr(F, "grouped_mm", refuses)
    with pytest.warns(UserWarning, match="grouped_mm raised RuntimeError: no kernel"):
        ours = mc.logits_of(model, eval_batch)
    assert grouped_linear._failed
    monkeypatch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: False)
    rq.quantize_model(reference, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    assert torch.equal(ours, mc.logits_of(reference, eval_batch))


def test_the_check_covers_each_new_row_count_once(grouped_on_cpu, monkeypatch):
    """The check calls F.linear once for each row count a call brings that no earlier call of the
    key brought (an expert without rows brings none), on operands of as many rows as its largest
    count; the split into groups is checked again only when that is more rows than before; a key
    of other weights' shape is checked on its own."""
    monkeypatch.setenv(grouped_linear.THREADS_SETTING, "1")  # the calling thread: the counts in sorted order
    linear_rows, grouped_groups = [], []
    real_linear, real_grouped = F.linear, F.grouped_mm
    monkeypatch.setattr(grouped_linear.F, "linear", lambda a, w, *r: linear_rows.append(a.shape[0]) or real_linear(a, w, *r))

    def counted(a, b, *args, **kwargs):
        grouped_groups.append((a.shape[0], b.shape[0]))
        return real_grouped(a, b, *args, **kwargs)

    monkeypatch.setattr(grouped_linear.F, "grouped_mm", counted)
    x = torch.randn(12, 32, dtype=torch.bfloat16)
    weights = torch.randn(3, 16, 32, dtype=torch.bfloat16)
    out = grouped_linear.grouped_linear(x, weights, [5, 0, 7], torch.tensor([5, 5, 12], dtype=torch.int32))
    assert linear_rows == [5, 7]
    # the check's whole and split calls on 7 rows (split into groups of 1, 2, 3 and the last 1), then the groups'
    assert grouped_groups == [(7, 1), (7, 4), (12, 3)]
    assert torch.equal(out, torch.cat([F.linear(x[:5], weights[0]), F.linear(x[5:], weights[2])]))
    linear_rows.clear(), grouped_groups.clear()
    grouped_linear.grouped_linear(x, weights, [7, 0, 5], torch.tensor([7, 7, 12], dtype=torch.int32))
    assert linear_rows == [] and grouped_groups == [(12, 3)]  # both counts checked already
    grouped_groups.clear()
    grouped_linear.grouped_linear(x, weights, [2, 3, 7], torch.tensor([2, 5, 12], dtype=torch.int32))
    assert linear_rows == [2, 3] and grouped_groups == [(3, 1), (12, 3)]  # no more rows than before: no split
    linear_rows.clear(), grouped_groups.clear()
    grouped_linear.grouped_linear(torch.randn(20, 32, dtype=torch.bfloat16), weights, [2, 9, 9],
                                  torch.tensor([2, 11, 20], dtype=torch.int32))
    assert linear_rows == [9] and grouped_groups == [(9, 1), (9, 4), (20, 3)]  # 9 rows: the split again
    linear_rows.clear()
    grouped_linear.grouped_linear(x, torch.randn(3, 24, 32, dtype=torch.bfloat16), [5, 0, 7],
                                  torch.tensor([5, 5, 12], dtype=torch.int32))
    assert linear_rows == [5, 7]  # another out-features: another key
    assert grouped_linear._checked_counts[grouped_linear._key(x, weights)] == {2, 3, 5, 7, 9}


@pytest.mark.parametrize("threads", ["1", "3", "8"])
def test_a_checks_linear_calls_are_shared_over_worker_threads(threads, grouped_on_cpu, monkeypatch):
    """With REFQUANT_CHECK_THREADS=n, a check of many new counts makes each count's F.linear once,
    on the pool's worker threads (on the calling thread for 1), without grad; a count that
    differs fails the key whichever thread checked it."""
    monkeypatch.setenv(grouped_linear.THREADS_SETTING, threads)
    calls, real_linear = [], F.linear

    def recorded(a, w, *rest):
        calls.append((a.shape[0], threading.current_thread(), torch.is_grad_enabled()))
        return real_linear(a, w, *rest)

    monkeypatch.setattr(grouped_linear.F, "linear", recorded)
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    weights = torch.randn(5, 16, 32, dtype=torch.bfloat16)
    assert grouped_linear.check_row_counts(x, weights, [3, 9, 1, 17, 10])
    assert sorted(count for count, _, _ in calls) == [1, 3, 9, 10, 17]
    used = {thread for _, thread, _ in calls}
    if threads == "1":
        assert used == {threading.current_thread()}
    else:
        assert all(thread.name.startswith("refquant-check") for thread in used)  # the pool's, never the caller
    assert not any(grad for _, _, grad in calls)

    def off_at(rows):
        def linear(a, w, *rest):
            out = real_linear(a, w, *rest)
            if a.shape[0] == rows:
                out.view(torch.int16)[-1, -1] ^= 1
            return out
        return linear

    for rows in (21, 33):  # the first and the last count of the sorted list: two threads' shares
        grouped_linear.forget_checks()
        monkeypatch.setattr(grouped_linear.F, "linear", off_at(rows))
        with pytest.warns(UserWarning, match="grouped_mm's bits differ"):
            assert not grouped_linear.check_row_counts(x, weights, [21, 25, 29, 33])


def test_a_worker_that_raises_raises_for_the_check_after_every_share_ended(grouped_on_cpu, monkeypatch):
    """An error in one worker's F.linear reaches the caller (as the calling thread's would), once
    every share has ended."""
    monkeypatch.setenv(grouped_linear.THREADS_SETTING, "3")
    ended, real_linear = [], F.linear

    def fails_at_nine(a, w, *rest):
        if a.shape[0] == 9:
            raise RuntimeError("no kernel for 9 rows")
        out = real_linear(a, w, *rest)
        ended.append(a.shape[0])
        return out

    monkeypatch.setattr(grouped_linear.F, "linear", fails_at_nine)
    with pytest.raises(RuntimeError, match="no kernel for 9 rows"):
        grouped_linear.check_row_counts(torch.randn(40, 32, dtype=torch.bfloat16),
                                        torch.randn(5, 16, 32, dtype=torch.bfloat16), [3, 9, 1, 17, 10])
    assert sorted(ended) == [1, 3, 10, 17]  # the other shares ran to their end
    assert not grouped_linear._checked_counts


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_a_bad_number_of_check_threads_is_an_error_that_names_the_setting(text, grouped_on_cpu, monkeypatch):
    monkeypatch.setenv(grouped_linear.THREADS_SETTING, text)
    with pytest.raises(ValueError, match=f"REFQUANT_CHECK_THREADS={text!r}: give a whole number"):
        grouped_linear.check_row_counts(torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(2, 16, 32, dtype=torch.bfloat16), [2, 2])


def test_check_threads_on_cuda_only_where_the_workers_workspaces_can_be_given_back(monkeypatch):
    """The default: CHECK_THREADS, at most the CPUs; on CUDA one thread (the caller) where torch
    cannot give back the workers' cuBLAS workspaces, whatever the setting."""
    monkeypatch.delenv(grouped_linear.THREADS_SETTING, raising=False)
    monkeypatch.setattr(grouped_linear.os, "cpu_count", lambda: 64)
    releasable = []
    monkeypatch.setattr(grouped_linear, "can_release_blas_workspaces", lambda: bool(releasable))
    assert grouped_linear.check_threads(torch.device("cpu")) == grouped_linear.CHECK_THREADS
    assert grouped_linear.check_threads(torch.device("cuda")) == 1
    monkeypatch.setenv(grouped_linear.THREADS_SETTING, "6")
    assert grouped_linear.check_threads(torch.device("cuda")) == 1
    releasable.append(True)
    assert grouped_linear.check_threads(torch.device("cuda")) == 6
    monkeypatch.delenv(grouped_linear.THREADS_SETTING)
    monkeypatch.setattr(grouped_linear, "CHECK_THREADS", 4)
    monkeypatch.setattr(grouped_linear.os, "cpu_count", lambda: 2)
    assert grouped_linear.check_threads(torch.device("cuda")) == 2  # a default above the CPUs: the CPUs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_check_threads_work_on_the_callers_stream_and_give_its_verdict(monkeypatch):
    """On a side stream, the worker threads' F.linear calls run on that stream (after its
    operands), the check passes for grouped_mm on CUDA as on the calling thread alone, and the
    workers' cuBLAS workspaces are given back when it ends."""
    grouped_linear.forget_checks()
    monkeypatch.setenv(grouped_linear.THREADS_SETTING, "4")
    streams, real_linear = [], F.linear
    monkeypatch.setattr(grouped_linear.F, "linear",
                        lambda a, w, *rest: streams.append(torch.cuda.current_stream()) or real_linear(a, w, *rest))
    side = torch.cuda.Stream()
    x = torch.randn(600, 256, dtype=torch.bfloat16, device="cuda")
    weights = torch.randn(4, 128, 256, dtype=torch.bfloat16, device="cuda")
    real_linear(x, weights[0])  # the caller's workspace (not one of the check's calls)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    with torch.cuda.stream(side):
        assert grouped_linear.check_row_counts(x, weights, list(range(1, 600, 37)))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= held
    assert len(streams) == len(range(1, 600, 37)) and all(stream == side for stream in streams)
    assert not grouped_linear._failed
    grouped_linear.forget_checks()


def test_rows_or_weights_grouped_mm_does_not_take_are_neither_checked_nor_grouped(grouped_on_cpu, monkeypatch):
    """Rows that are not a multiple of 16 bytes, or weight slices that are not contiguous: no
    check, no warning, the per-expert calls (None)."""
    monkeypatch.setattr(grouped_linear, "_check", lambda *args: pytest.fail("nothing to check"))
    offsets = torch.tensor([2, 4], dtype=torch.int32)
    unaligned = torch.randn(4, 36, dtype=torch.bfloat16), torch.randn(2, 16, 36, dtype=torch.bfloat16)
    strided = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(2, 32, 16, dtype=torch.bfloat16).transpose(1, 2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, weights in (unaligned, strided):
            assert not grouped_linear.check_row_counts(x, weights, [2, 2])
            assert grouped_linear.grouped_linear(x, weights, [2, 2], offsets) is None
    assert not grouped_linear._failed and not grouped_linear._checked_counts


def test_a_failed_count_keeps_the_per_expert_calls_and_checks_nothing_more(grouped_on_cpu, monkeypatch):
    """A row count whose F.linear differs from grouped_mm's rows in one bit fails the key for the
    process, with a warning naming its weights; later calls of the key return None unchecked."""
    real_linear = F.linear

    def off_at_seven_rows(a, w, *rest):
        out = real_linear(a, w, *rest)
        if a.shape[0] == 7:
            out.view(torch.int16)[-1, -1] ^= 1
        return out

    monkeypatch.setattr(grouped_linear.F, "linear", off_at_seven_rows)
    x = torch.randn(12, 32, dtype=torch.bfloat16)
    weights = torch.randn(3, 16, 32, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="16 x 32 on cpu .grouped_mm's bits differ"):
        assert grouped_linear.grouped_linear(x, weights, [5, 0, 7], torch.tensor([5, 5, 12], dtype=torch.int32)) is None
    assert grouped_linear._key(x, weights) in grouped_linear._failed
    monkeypatch.setattr(grouped_linear, "_check", lambda *args: pytest.fail("a failed key is not checked again"))
    assert grouped_linear.grouped_linear(x, weights, [1, 1, 10], torch.tensor([1, 2, 12], dtype=torch.int32)) is None


def test_grouped_matmul_is_off_by_setting_and_off_the_gpu(monkeypatch):
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    assert not grouped_linear.grouped_matmul_allowed(x)  # CPU
    if torch.cuda.is_available():
        monkeypatch.setenv(grouped_linear.SETTING, "0")
        assert not grouped_linear.grouped_matmul_allowed(x.cuda())
        monkeypatch.setenv(grouped_linear.SETTING, "1")
        assert grouped_linear.grouped_matmul_allowed(x.cuda())
        assert not grouped_linear.grouped_matmul_allowed(x.cuda().half())


def test_a_watched_weight_quantizer_keeps_the_per_expert_calls(grouped_on_cpu):
    """A weight quantizer something watches is called expert by expert, once per expert with
    rows, and its group does not go to grouped_mm."""
    batches, eval_batch = mc.default_batches()
    model = mc.build_model("qwen3_moe")
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj_weight_quantizers"))
    seen = []
    quantizer: TensorQuantizer = experts.gate_up_proj_weight_quantizers[0]
    quantizer.register_forward_hook(lambda module, args, out: seen.append(1))
    grouped_on_cpu.clear()
    mc.logits_of(model, eval_batch)
    assert len(seen) == 1  # once: expert 0 of layer 0 gets rows from this batch


class _NewStorageBytes(TorchDispatchMode):
    """The bytes of the storages allocated under it and still alive, at their peak (op by op):
    storages alive when it starts (the parameters, the routing) are not counted."""

    def __init__(self):
        super().__init__()
        self.before = set()
        for o in gc.get_objects():
            if issubclass(type(o), torch.Tensor):  # (not isinstance: a dead weak proxy raises on it)
                try:
                    self.before.add(o.untyped_storage().data_ptr())
                except RuntimeError:
                    pass  # a fake tensor left by another test's tracing: no memory
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.before:
                storage = t.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {key: value for key, value in self.live.items() if not value[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def narrow_experts_model():
    """A tiny Qwen3-MoE whose experts are narrower than half the model (64 wide, experts of 16,
    as Qwen3-30B-A3B's 2048 and 768), seeded, bf16, eval: the second projection's rows then hold
    more than the first's unless the loop frees and multiplies in place."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=16,
                                  num_experts=8, num_experts_per_tok=4, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=320)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("family,recipe,folded", [
    ("narrow", "fp8_default-fp8_kv", True), ("narrow", "fp8_default-fp8_kv", False),
    ("narrow", "nvfp4_default-fp8_cast_kv", False), ("mixtral", "fp8_default-fp8_kv", True),
])
def test_a_group_holds_no_more_than_its_budget_counts(family, recipe, folded, grouped_on_cpu, monkeypatch):
    """What a group allocates and holds at once, op by op, is at most what GROUP_BYTES counts for
    it (row_bytes a row and, quantizing, one projection's quantized copies an expert) plus the
    int32 offsets of its grouped matmuls, and at least its rows' count: the fake quant modelled as
    the GPU's one kernel (one output the input's size). Experts narrower than half the model
    (narrow) and as wide as it (mixtral) hold the budget's words only with the in-place products."""
    batches, eval_batch = mc.default_batches()
    model = narrow_experts_model() if family == "narrow" else mc.build_model(family)
    rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    if folded:
        rq.fold_weights(model)
    reference = numerics("reference")
    monkeypatch.setattr(reference, "fp8_fake_quant", lambda x, amax, **kwargs: x.clone())
    monkeypatch.setattr(reference, "nvfp4_fake_quant", lambda x, amax, **kwargs: x.clone())
    module = next(m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"))
    copy_bytes = 0 if folded else experts_loop.projection_copy_bytes(module, "gate_up_proj")
    row_bytes = experts_loop.row_bytes(module, torch.empty(1, model.config.hidden_size, dtype=torch.bfloat16))
    monkeypatch.setattr(experts_loop, "GROUP_BYTES", 3 * copy_bytes + 12 * row_bytes)  # several groups a layer
    groups = []
    real = experts_loop._group

    def measured(module, routing, hidden_states, *args):
        group = args[-2]
        with _NewStorageBytes() as held:
            y = real(module, routing, hidden_states, *args)
        rows = sum(routing.counts[e] for e in group)
        groups.append((held.peak, rows * experts_loop.row_bytes(module, hidden_states, routing.weight), len(group) * copy_bytes,
                       4 * (len(group) + module.num_experts)))
        return y

    monkeypatch.setattr(experts_loop, "_group", measured)
    mc.logits_of(model, eval_batch)
    assert len(groups) > 2 * model.config.num_hidden_layers  # several groups a layer
    for peak, rows, copies, offsets in groups:
        assert rows <= peak <= rows + copies + offsets, (peak, rows, copies)


# --- the checks beside the calibration (grouped_linear.ChecksBeside, calibrate._run_batches) -----

from refquant.hf import calibrate as calibrate_module  # noqa: E402


def _lies_from(rows: int):
    """F.grouped_mm that adds 64 to the rows-th row of every group of at least `rows` rows: a
    grouped matmul wrong from that row count on, in the check's calls as in the forward's."""
    real = F.grouped_mm

    def lying(a, b, *args, offs=None, **kwargs):
        out = real(a, b, *args, offs=offs, **kwargs)
        begin = 0
        for end in offs.tolist():
            if end - begin >= rows:
                out[begin + rows - 1] += 64
            begin = end
        return out

    return lying


def _row_counts_by_batch(family: str, recipe: str, batches: list) -> list[set[int]]:
    """The row counts each batch's calibration forward brings to the experts' checks (a copy
    calibrated with the per-expert calls)."""
    seen: list[set[int]] = []
    real_run_batch = calibrate_module.run_batch

    real_read = experts_loop._Routing.read

    def read(routing):
        handled = real_read(routing)
        seen[-1].update(count for count in routing.counts if count)
        return handled

    def run_batch(model, batch, **extra):
        seen.append(set())
        return real_run_batch(model, batch, **extra)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experts_loop._Routing, "read", read)
        patch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: False)
        patch.setattr(calibrate_module, "run_batch", run_batch)
        rq.quantize_model(mc.build_model(family), rq.load_recipe(recipe), batches, progress=False)
    return seen


@pytest.fixture
def beside_on_cpu(grouped_on_cpu, monkeypatch):
    """The grouped matmul on the CPU (grouped_on_cpu) with the checks beside the calibration."""
    monkeypatch.setenv(grouped_linear.BESIDE_SETTING, "1")
    yield grouped_on_cpu


def _beside_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("refquant-check-beside")]


def test_checks_beside_the_calibration_run_on_their_worker_and_give_the_per_expert_calls_bits(beside_on_cpu, monkeypatch):
    """With the checks beside the calibration, every check of the calibration runs on the
    worker thread (none in the forward), the amaxes and token counts equal the per-expert calls',
    the counts end checked, and no worker is left."""
    batches = mc.calibration_batches(7, 4, 2, 16)
    model = mc.build_model("qwen3_moe_top4")
    reference = copy.deepcopy(model)
    threads, real_check = [], grouped_linear._check
    monkeypatch.setattr(grouped_linear, "_check", lambda *args, **kwargs: threads.append(
        threading.current_thread().name) or real_check(*args, **kwargs))
    rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_kv"), batches, progress=False)
    assert threads and all(name.startswith("refquant-check-beside") for name in threads)
    assert beside_on_cpu and grouped_linear._checked_counts and not grouped_linear._failed
    assert not _beside_threads()
    monkeypatch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: False)
    rq.quantize_model(reference, rq.load_recipe("nvfp4_default-fp8_kv"), batches, progress=False)
    assert same_state(calibrated_state(model), calibrated_state(reference))


@pytest.mark.parametrize("run_again", [True, False])
def test_a_check_that_fails_beside_the_calibration_runs_its_batch_and_those_after_it_again(run_again, beside_on_cpu, monkeypatch):
    """A grouped matmul wrong from a row count that first comes in a later batch: the check of
    that count fails beside the calibration, a warning names the weights, and the calibration puts
    back what it held before the batch that brought the count and runs that batch and those after
    it again with the per-expert calls (never an earlier one), from a one-shot iterator of
    batches: amaxes and token counts equal the per-expert calls'. Without the run again
    (run_again False) they would not: what this test holds is the run again's doing."""
    batches = mc.calibration_batches(11, 1, 1, 16) + mc.calibration_batches(12, 5, 2, 16)  # the first one smaller
    counts = _row_counts_by_batch("qwen3_moe_top4", "fp8_default-fp8_kv", batches)
    wrong_from = max(counts[0]) + 1
    first_wrong = next(index for index, seen in enumerate(counts) if max(seen) >= wrong_from)  # (a later batch's)
    grouped_linear.forget_checks()
    model = mc.build_model("qwen3_moe_top4")
    reference = copy.deepcopy(model)
    ran, real_run_batch = [], calibrate_module.run_batch
    monkeypatch.setattr(calibrate_module, "run_batch", lambda model, batch, **extra: ran.append(
        next(i for i, b in enumerate(batches) if torch.equal(b, batch))) or real_run_batch(model, batch, **extra))
    if not run_again:
        real_poll = grouped_linear.ChecksBeside.poll
        monkeypatch.setattr(grouped_linear.ChecksBeside, "poll", lambda self, wait_all=False: real_poll(self, wait_all) and None)
    monkeypatch.setattr(F, "grouped_mm", _lies_from(wrong_from))
    with pytest.warns(UserWarning, match="grouped_mm's bits differ"):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), iter(batches), progress=False)
    assert grouped_linear._failed and not _beside_threads()
    ours = list(ran)  # (not the reference's runs)
    monkeypatch.setattr(experts_loop, "grouped_matmul_allowed", lambda x: False)
    rq.quantize_model(reference, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    if run_again:
        first_repeat = next(index for position, index in enumerate(ours) if index in ours[:position])
        assert first_repeat == first_wrong and all(ours.count(i) == 1 for i in range(first_wrong))
        assert sorted(set(ours)) == list(range(len(batches)))
        assert same_state(calibrated_state(model), calibrated_state(reference))
    else:
        assert ours == list(range(len(batches)))
        assert not same_state(calibrated_state(model), calibrated_state(reference))


def test_a_calibration_that_raises_with_checks_open_waits_for_its_worker_and_raises(beside_on_cpu, monkeypatch):
    batches = mc.calibration_batches(7, 3, 2, 16)
    model = mc.build_model("qwen3_moe_top4")
    real_run_batch, ran = calibrate_module.run_batch, []

    def fails_at_the_second(model, batch, **extra):
        if ran:
            raise RuntimeError("the second batch fails")
        ran.append(batch)
        return real_run_batch(model, batch, **extra)

    monkeypatch.setattr(calibrate_module, "run_batch", fails_at_the_second)
    with pytest.raises(RuntimeError, match="the second batch fails"):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    assert not _beside_threads() and grouped_linear._beside is None


def test_an_error_in_the_worker_is_raised_by_the_calibration(beside_on_cpu, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("no kernel for these rows")

    monkeypatch.setattr(grouped_linear, "_check", fails)
    with pytest.raises(RuntimeError, match="no kernel for these rows"):
        rq.quantize_model(mc.build_model("qwen3_moe_top4"), rq.load_recipe("fp8_default-fp8_kv"),
                          mc.calibration_batches(7, 2, 2, 16), progress=False)
    assert not _beside_threads() and not grouped_linear._checked_counts


@pytest.mark.parametrize("text", ["2", "yes", ""])
def test_a_bad_checks_beside_setting_is_an_error_that_names_it(text, monkeypatch):
    monkeypatch.setenv(grouped_linear.BESIDE_SETTING, text)
    with pytest.raises(ValueError, match=f"REFQUANT_CHECKS_BESIDE={text!r}: give 0"):
        grouped_linear.ChecksBeside.wanted({"cuda"})


def test_checks_beside_by_default_only_on_cuda_where_the_workers_workspace_can_be_given_back(monkeypatch):
    monkeypatch.delenv(grouped_linear.BESIDE_SETTING, raising=False)
    releasable = []
    monkeypatch.setattr(grouped_linear, "can_release_blas_workspaces", lambda: bool(releasable))
    assert not grouped_linear.ChecksBeside.wanted({"cuda"})
    releasable.append(True)
    assert grouped_linear.ChecksBeside.wanted({"cuda"})
    assert not grouped_linear.ChecksBeside.wanted({"cpu"}) and not grouped_linear.ChecksBeside.wanted({"cuda", "meta"})
    monkeypatch.setenv(grouped_linear.BESIDE_SETTING, "0")
    assert not grouped_linear.ChecksBeside.wanted({"cuda"})
    monkeypatch.setenv(grouped_linear.BESIDE_SETTING, "1")
    assert grouped_linear.ChecksBeside.wanted({"cpu"})


def test_a_calibrators_state_put_back_gives_what_it_held_before():
    """_MaxCalibrator.state / restore: the collected maxima after restore are those before the
    batch, whatever the batch collected (kept maxima, a fold, a per-channel amax)."""
    from refquant.quant.quantizer import _MaxCalibrator

    for axis in (None, 0):
        calibrator = _MaxCalibrator(axis)
        calibrator.collect(torch.tensor([[1.0, -2.0], [0.5, 0.25]]), "q")
        before = calibrator.state()
        held = calibrator.amax.clone()
        for _ in range(70):  # past a fold
            calibrator.collect(torch.full((2, 2), 9.0), "q")
        assert not torch.equal(calibrator.amax, held)
        calibrator.restore(before)
        assert torch.equal(calibrator.amax, held)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checks_beside_run_on_the_workers_side_stream_and_give_back_its_workspace(monkeypatch):
    """On CUDA (the default where the workspace can be given back): the worker's F.linear calls
    run on a stream of its own, never the forward's, the verdicts pass, and once the block ends
    the memory is what it was before (its workspace given back)."""
    from refquant.quant.backends import can_release_blas_workspaces

    if not can_release_blas_workspaces():
        pytest.skip("this torch cannot give back cuBLAS workspaces: the checks stay in the forward")
    grouped_linear.forget_checks()
    monkeypatch.delenv(grouped_linear.BESIDE_SETTING, raising=False)
    streams, real_linear = [], F.linear
    monkeypatch.setattr(grouped_linear.F, "linear", lambda a, w, *rest: streams.append(
        (threading.current_thread().name, torch.cuda.current_stream())) or real_linear(a, w, *rest))
    x = torch.randn(600, 256, dtype=torch.bfloat16, device="cuda")
    weights = torch.randn(4, 128, 256, dtype=torch.bfloat16, device="cuda")
    real_linear(x, weights[0])  # the caller's workspace (not one of the check's calls)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    with grouped_linear.checks_beside({"cuda"}) as beside:
        assert beside is not None
        assert grouped_linear.check_row_counts(x, weights, list(range(1, 600, 37)))
        assert beside.poll(wait_all=True) is None
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= held
    assert len(streams) == len(range(1, 600, 37))
    assert all(name.startswith("refquant-check-beside") and stream != torch.cuda.current_stream() for name, stream in streams)
    assert not grouped_linear._failed and len(grouped_linear._checked_counts[grouped_linear._key(x, weights)]) == len(streams)
    grouped_linear.forget_checks()
