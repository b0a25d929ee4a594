"""The experts loop's sum of each token's rows (refquant.hf.experts_loop.add_rows_in_order, on a
GPU the kernel of refquant.compiled.ordered_sum_triton, and the slabs of _Routing.add_slabs): each
adds what the eager loop's index_add_ per expert in ascending order adds, rounding for rounding."""

from __future__ import annotations

import copy

import pytest
import torch

import refquant as rq
from refquant.hf import experts_loop

from conftest import cuda
from triton_interpreter import mismatches_in_interpreter

pytest.importorskip("transformers")

import modelopt_compare as mc  # noqa: E402  (tests/modelopt_compare.py)
from test_experts import modelopts_order_of_work  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def routed_rows(top_k: int, dtype: torch.dtype, *, tokens: int = 37, experts: int = 9, width: int = 24, seed: int = 5,
                repeats: bool = False):
    """(routing, rows): a read _Routing of top_k distinct experts a token (with `repeats`, any
    experts: a token may name one twice), and one row a routed row of every magnitude (sums that
    round, cancel and pass the largest value), -0.0, inf and NaN."""
    generator = torch.Generator().manual_seed(seed + top_k)
    if repeats:
        index = torch.randint(0, experts, (tokens, top_k), generator=generator)
        assert any(len(set(row)) < top_k for row in index.tolist())
    else:
        index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    routing = experts_loop._Routing(index, torch.ones(tokens, top_k), experts)
    assert routing.read()
    scale = 2.0 ** torch.randint(-30, 30, (routing.rows, 1), generator=generator).float()
    rows = (torch.randn(routing.rows, width, generator=generator) * scale).to(dtype)
    rows[::7, 0] = -0.0
    rows[3, 1], rows[5, 2], rows[8, 3] = float("inf"), float("-inf"), float("nan")
    rows[:, 4] = torch.finfo(dtype).max
    return routing, rows


def eager_sum(routing, rows: torch.Tensor) -> torch.Tensor:
    """The eager loop's sum: an index_add_ per expert in ascending order onto zeros."""
    out = torch.zeros(routing._tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    for expert in range(len(routing.counts)):
        begin, end = routing.starts[expert], routing.starts[expert + 1]
        if end > begin:
            out.index_add_(0, routing.token[begin:end].to(rows.device), rows[begin:end])
    return out


def sum_by_groups(add, routing, rows: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """add(sums, group's rows, table, first expert, end expert) over groups of consecutive
    experts ending at `ends` (expert numbers), in order."""
    out = torch.zeros(routing._tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    table = routing.row_table().to(rows.device)
    first = 0
    for end in ends:
        out = add(out, rows[routing.starts[first]:routing.starts[end]], table, first, end)
        first = end
    return out


def reference_add(routing):
    return lambda sums, rows, table, first, end: experts_loop.add_rows_in_order(sums, rows, table, routing.starts[first])


def kernel_add(routing):
    from refquant.compiled import ordered_sum_triton

    def add(sums, rows, table, first, end):
        span = torch.tensor([routing.starts[first], routing.starts[end]], device=sums.device)
        return ordered_sum_triton.add_rows_in_order(sums, rows, table, span)

    return add


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


GROUPINGS = ([9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 9], [0, 2, 2, 7, 9])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2, 5, 8])
def test_rows_added_group_by_group_give_the_index_add_per_experts_bits(dtype, top_k):
    """Every grouping of the experts (one group, each expert alone, uneven groups, empty ones)."""
    routing, rows = routed_rows(top_k, dtype)
    expected = bits(eager_sum(routing, rows))
    for ends in GROUPINGS:
        ours = sum_by_groups(reference_add(routing), routing, rows, ends)
        assert torch.equal(bits(ours), expected), ends


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2, 5, 8])
def test_the_slabs_add_what_an_index_add_per_expert_adds(dtype, top_k):
    """The loop's sum without the kernel: each row placed by _Routing.sum_positions (as the loop's
    index_copy_ places it), then _Routing.add_slabs, one addition a top-k slot over all tokens."""
    routing, rows = routed_rows(top_k, dtype)
    ours = torch.zeros(routing._tokens, rows.shape[1], dtype=dtype)
    routing.add_slabs(torch.empty_like(rows).index_copy_(0, routing.sum_positions(), rows), ours)
    assert torch.equal(bits(ours), bits(eager_sum(routing, rows)))


@pytest.mark.parametrize("top_k", [2, 5, 8])
def test_a_token_that_names_an_expert_twice_gets_its_rows_in_top_k_order_each_way(top_k):
    """The eager loop's torch.where lists a repeated expert's rows by top-k position, and its
    index_add_ (on the CPU, in index order) adds them in that order: the slabs and the groups too."""
    routing, rows = routed_rows(top_k, torch.float32, repeats=True)
    expected = bits(eager_sum(routing, rows))
    slabs = torch.zeros(routing._tokens, rows.shape[1])
    routing.add_slabs(torch.empty_like(rows).index_copy_(0, routing.sum_positions(), rows), slabs)
    assert torch.equal(bits(slabs), expected)
    for ends in GROUPINGS:
        assert torch.equal(bits(sum_by_groups(reference_add(routing), routing, rows, ends)), expected), ends


def test_the_row_table_lists_each_tokens_rows_in_ascending_expert_order():
    routing, _ = routed_rows(5, torch.float32)
    table = routing.row_table()
    assert table.shape == (5, routing._tokens)
    expert_of_row = torch.repeat_interleave(torch.arange(len(routing.counts)), torch.tensor(routing.counts))
    assert torch.equal(routing.token[table], torch.arange(routing._tokens).expand(5, -1))  # each entry is the token's
    assert (expert_of_row[table].diff(dim=0) > 0).all()  # ascending experts
    assert sorted(table.reshape(-1).tolist()) == list(range(routing.rows))  # every row once


def test_the_kernel_is_used_only_on_cuda_with_the_compiled_backend():
    from refquant.quant.quantizer import QuantizerConfig, TensorQuantizer

    compiled = TensorQuantizer(QuantizerConfig(format="fp8"), backend="compiled")
    reference = TensorQuantizer(QuantizerConfig(format="fp8"), backend="reference")
    assert experts_loop._ordered_sum_kernel(torch.zeros(2, 4), compiled) is None  # CPU: slabs or index_add_
    if torch.cuda.is_available():
        assert experts_loop._ordered_sum_kernel(torch.zeros(2, 4, device="cuda"), reference) is None
        assert experts_loop._ordered_sum_kernel(torch.zeros(2, 4, device="cuda"), compiled) is not None
        assert experts_loop._ordered_sum_kernel(torch.zeros(2, 4, device="cuda", dtype=torch.float64), compiled) is None


def kernel_mismatches(device: str, dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[str]:
    """Where the kernel's sums differ from add_rows_in_order's and the eager loop's on `device`,
    over `dtypes`, several top_k and widths (one block of columns and several), each grouping."""
    wrong = []
    for dtype in dtypes:
        for top_k, width in ((1, 24), (2, 24), (8, 24), (8, 1000), (4, 2048), (3, 2500)):
            routing, rows = routed_rows(top_k, dtype, width=width)
            rows = rows.to(device)
            expected = bits(eager_sum(routing, rows))
            for ends in GROUPINGS:
                ours = bits(sum_by_groups(kernel_add(routing), routing, rows, ends))
                if not (torch.equal(ours, bits(sum_by_groups(reference_add(routing), routing, rows, ends)))
                        and torch.equal(ours, expected)):
                    wrong.append(f"{dtype}, top_k {top_k}, width {width}, groups ending {ends}")
    return wrong


@cuda
def test_the_cuda_kernel_gives_add_rows_in_orders_bits():
    pytest.importorskip("triton")
    assert kernel_mismatches("cuda") == []


def interpreter_kernel_mismatches(device: str) -> list[str]:
    """kernel_mismatches in fp16 and fp32: Triton's interpreter rounds fp32 to bf16 toward zero,
    where a GPU rounds to nearest, so the bf16 sums are checked on CUDA only."""
    return kernel_mismatches(device, (torch.float16, torch.float32))


def test_the_kernel_gives_add_rows_in_orders_bits_in_tritons_interpreter():
    assert mismatches_in_interpreter("test_experts_ordered_sum", "interpreter_kernel_mismatches") == []


@cuda
def test_the_cuda_kernel_launches_directly_whatever_rows_its_groups_hold(monkeypatch):
    """The group's first and end rows reach the kernel through a device pair, not as ints of the
    launch: once the kernel's first launch was made (and checked), sums over other groupings
    make no public launch, and give the same bits. Each group's rows are a tensor of their own,
    as the loop's are (a view into one tensor starts at other alignments: other keys)."""
    from refquant.compiled import ordered_sum_triton, private_api, triton_launch

    if not private_api.KERNEL_LAUNCH.decide():
        pytest.skip("the fast launch is off for these versions")
    routing, rows = routed_rows(8, torch.bfloat16, width=1000)
    rows = rows.cuda()
    expected = bits(eager_sum(routing, rows))
    add = kernel_add(routing)
    own_rows = lambda sums, group_rows, *args: add(sums, group_rows.clone(), *args)  # noqa: E731
    # The key's first launch (public), then the launch's first fast launch (checked against a
    # public one), whether or not an earlier test in this process made them
    for _ in range(2):
        assert torch.equal(bits(sum_by_groups(own_rows, routing, rows, [9])), expected)
    assert ordered_sum_triton._launch(8, 1024).checked
    public = []
    real = triton_launch.DirectLaunch.launch_public
    monkeypatch.setattr(triton_launch.DirectLaunch, "launch_public", lambda self, *a: public.append(self.name) or real(self, *a))
    for ends in GROUPINGS:
        assert torch.equal(bits(sum_by_groups(own_rows, routing, rows, ends)), expected), ends
    assert public == [] and private_api.KERNEL_LAUNCH.on


def test_the_cuda_kernel_refuses_a_span_it_cannot_read():
    pytest.importorskip("triton")
    from refquant.compiled import ordered_sum_triton

    sums, rows, table = torch.zeros(3, 4), torch.ones(2, 4), torch.zeros(1, 3, dtype=torch.int64)
    for span in (torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 2, 4]), torch.tensor([0, 0, 2, 2])[::2]):
        with pytest.raises(ValueError, match="span must be a contiguous int64 pair"):
            ordered_sum_triton.add_rows_in_order(sums, rows, table, span)


@cuda
@pytest.mark.parametrize("recipe", ["nvfp4_default-fp8_cast_kv", "fp8_default-fp8_kv"])
def test_the_loop_on_cuda_sums_with_the_kernel_and_gives_modelopts_order_of_works_bits(recipe, monkeypatch):
    """The compiled backend on a GPU: the loop's groups are summed by the kernel (no rows kept to
    the layer's end), and the logits equal the eager loop's with the quantizers at each F.linear."""
    from refquant.compiled import ordered_sum_triton

    batches, eval_batch = mc.default_batches()
    model = mc.build_model("qwen3_moe_top4", device="cuda")
    per_expert = copy.deepcopy(model)
    launches = []
    real = ordered_sum_triton.add_rows_in_order
    monkeypatch.setattr(ordered_sum_triton, "add_rows_in_order", lambda *a: launches.append(1) or real(*a))
    monkeypatch.setattr(experts_loop, "row_bytes", lambda *args: 1)  # groups of at most 7 rows
    monkeypatch.setattr(experts_loop, "GROUP_BYTES", 7)
    rq.quantize_model(model, rq.load_recipe(recipe), batches, backend="compiled", flavor="modelopt-cuda", progress=False)
    launches.clear()
    ours = mc.logits_of(model, eval_batch)
    assert len(launches) > 2
    modelopts_order_of_work(monkeypatch)
    rq.quantize_model(per_expert, rq.load_recipe(recipe), batches, backend="compiled", flavor="modelopt-cuda", progress=False)
    assert torch.equal(ours, mc.logits_of(per_expert, eval_batch))
