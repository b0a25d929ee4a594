"""The quantized fused experts' forward in refquant's own loop: transformers' eager experts
forward, computed with the same operations on the same operands, with fewer launches and one
device sync a layer instead of two an expert.

transformers 5 gives most MoE families one eager experts forward (EAGER_FORWARD below: Qwen2/3-MoE,
Mixtral, OLMoE, DeepSeek-V2/V3, GLM-4-MoE, Ernie-4.5-MoE, GraniteMoE, ...). It loops over the
experts that received tokens; each iteration finds its tokens with torch.where (a sync), gathers
their hidden states, runs F.linear, the activation, F.linear, scales by the routing weights and
index_adds into the output. modelopt quantizes it by putting each expert's input and weight
through its quantizers at each F.linear call (refquant.hf.experts does the same for any other
forward). On a GPU that loop is bound by the host.

What stays as the eager loop has it, so the bits do:
- each expert's two matmuls are F.linear on operands of the same shape and values: the expert's
  token rows in torch.where's order (by top-k position, then token), and its weight slice after
  its own quantizer; or, where refquant.hf.grouped_linear measured that it gives those bits (on a
  GPU, bf16), one grouped_mm over a group of experts on the same operands;
- each token's outputs are added in ascending expert order onto zeros, each addition rounded
  to the output's dtype: the eager loop's index_add_ per expert (within one expert no token
  repeats, so each index_add_ is deterministic, and the order across experts is ascending).
What changes:
- every expert's tokens come from one stable sort of the routed expert ids and one read of the
  counts (on a GPU with the compiled backend and at most 1024 experts, a counting sort in four
  Triton launches, refquant.compiled.routing_triton: the same integers, fewer launches, no torch
  sort);
- elementwise steps (activation, product with up, routing weights, dtype cast) run once over the
  rows of a group of experts: an elementwise function gives each element what it gives it in a
  smaller tensor;
- an input quantizer runs once over all of its rows where its result does not depend on how the
  rows are split (ROWS_INDEPENDENT): a fixed per-tensor amax quantizes row by row (FP8 by element,
  NVFP4 by blocks along the row), and max calibration's max is the same over any split. Otherwise
  it is called on each expert's rows, as the eager loop calls it;
- for the grouped matmul, a group's weights are fake-quantized in one call with one amax per
  expert (refquant.quant.quantizer.SliceQuantizers, its binding of the quantizers kept from
  forward to forward while they stay as they are) where that is exact; while calibrating, or
  folded or off, the
  parameter's slices are used as they lie, and of the quantizers of the experts with rows those
  that collect take their slices' maxima once a forward (collect_passing_slices: one reduction;
  an off quantizer's call does nothing and is not made);
- otherwise each expert's weight slice goes through its own quantizer just before its F.linear,
  and only for experts that received rows (one expert's quantized weight at a time; while
  calibrating, its calibrator skips a slice it collected already, unchanged since);
- groups are consecutive experts holding at most GROUP_BYTES: their rows through the two
  projections and, where the group's weights are quantized copies, those copies (one expert alone
  may hold more), which bounds the memory; as few groups as that takes, split as evenly as
  consecutive experts allow; the products with up and with the routing weights are
  written over their first operand where that is the same computation (_multiply);
- each token's rows are added in ascending expert order, as the eager loop's index_add_ per
  expert adds them (add_rows_in_order states the sum): on a GPU with the compiled backend, each
  group's rows as soon as the group has them, one launch a group
  (refquant.compiled.ordered_sum_triton); otherwise, where a layer's row outputs fit SUM_BYTES,
  they are kept, each written where the token's sum takes it (slab j: every token's row of its
  j-th expert in ascending order), and summed one addition a slab over all tokens (top_k
  launches); else by an index_add_ per expert. The same additions in the same order each way (an
  addition of two values rounds its exact sum once either way).
tests/test_experts.py and tests/test_grouped_experts.py hold it to the eager loop with the quantizers
at each F.linear bit for bit, tests/test_experts_ordered_sum.py each way of summing to the eager loop's
index_add_s, and tests/test_grouped_experts.py a group's allocations to GROUP_BYTES' count.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import itertools
import textwrap
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.backends import ordered_sum_kernel, routing_kernel
from ..quant.quantizer import (SliceCall, TensorQuantizer, collect_passing_slices, quantizer_sees_each_call,
                               quantizes_with_fixed_amax)
from .grouped_linear import check_row_counts, grouped_linear, grouped_matmul_allowed

# The eager experts forward this loop reproduces, as transformers 5 writes it. A class whose
# forward reads otherwise runs its own forward with the quantizers at each F.linear call.
EAGER_FORWARD = '''
def forward(
    self,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

    return final_hidden_states
'''

# What a group of experts may hold at once in the loop: its rows (row_bytes each, the most a
# routed row holds at once) and, where the group's weights are quantized copies (a forward that
# quantizes them in one call for the grouped matmul), one projection's copies (projection_copy_bytes
# an expert, the larger projection's: the first's copies are freed before the second's are made);
# slices of the parameter used as they lie (calibrating, folded, off) are not copies and take none
# of it. tests/test_grouped_experts.py measures a group's allocations against this count. Each
# group costs the host about ten launches and their Python, so few groups keep a GPU busy, and
# expert_groups shares a layer's bytes evenly between them: the MoE benchmark shape's layer (4096
# tokens at top-8 of 64 experts of 768, Qwen3-30B-A3B's) takes two groups of ~112 MiB calibrating
# or folded and four of ~152 MiB quantizing its weights, and with the layer's own tensors stays
# under what its logits take (so the loop does not set the forward's peak there). One expert over
# the budget is a group of its own.
GROUP_BYTES = 192 * 2**20

# The quantized weights refquant.hf.experts' swapped F.linear forward holds at once (a group of
# consecutive experts quantized in one call): 8 experts of a Qwen3-30B-A3B-sized layer, one of
# DeepSeek-V3's (modelopt holds one expert's at a time).
COPY_BYTES = 80 * 2**20


def expert_copy_bytes(module: nn.Module) -> int:
    """One expert's weights of every projection, bytes: what a quantized copy of them holds."""
    return sum(projection_copy_bytes(module, name) for name in ("gate_up_proj", "up_proj", "down_proj")
               if isinstance(getattr(module, name, None), torch.Tensor))  # the fused layouts' 3-D weights, gated or not


def experts_per_group(module: nn.Module) -> int:
    """How many consecutive experts' quantized weights the swapped F.linear forward holds at once:
    as many as COPY_BYTES holds, at least one."""
    return max(1, COPY_BYTES // max(expert_copy_bytes(module), 1))


def projection_copy_bytes(module: nn.Module, projection: str) -> int:
    """One expert's weight of `projection`, bytes: what a quantized copy of it holds."""
    parameter = getattr(module, projection)
    return parameter.numel() // max(parameter.shape[0], 1) * parameter.element_size()


def row_bytes(module: nn.Module, hidden_states: torch.Tensor, routing_weights: Optional[torch.Tensor] = None) -> int:
    """The most a routed row holds at once in the group: its input and the first projection's
    output, or, where the experts are wider than the model, that output and the activation; or,
    where the routing weights are of a wider dtype (fp32), the second projection's output and
    its product with them (then the product and its cast). (The product with up is written over
    the activation, the first projection's output is freed before the second projection, whose
    input and output are no larger, and routing weights of the output's dtype are multiplied in
    place: all outside autograd, as calibration and evaluation run.)"""
    size = hidden_states.element_size()
    hidden, inner = hidden_states.shape[-1], module.down_proj.shape[-1]  # gated: gate_up_proj gives 2 * inner
    most = max(hidden + 2 * inner, 3 * inner) * size
    if routing_weights is not None:
        product = torch.promote_types(hidden_states.dtype, routing_weights.dtype).itemsize
        if product != size:
            most = max(most, hidden * (size + product))
    return most


def expert_groups(counts: list[int], bytes_per_row: int, bytes_per_expert: int, budget: int) -> list[range]:
    """Consecutive experts in as few groups as hold at most `budget` bytes each (counts[e] rows of
    bytes_per_row for expert e, and bytes_per_expert for each expert of the group: its quantized
    weights, 0 where none are copied), split so that the largest group holds as little as any
    split into that many groups can, to within 1/256 of the budget: the layer's peak, at the same
    host cost. An expert over the budget alone is a group of its own."""
    ends = list(itertools.accumulate(count * bytes_per_row + bytes_per_expert for count in counts))
    fewest = len(_fill_groups(ends, budget))
    if fewest <= 1:
        return [range(len(counts))]
    # the smallest cap under which filling in turn still takes that many groups, searched from the
    # even share (below it only an expert alone over the cap could fit, and that expert is then
    # the largest group whatever the split) up to the budget (which does)
    fails, holds = -(-ends[-1] // fewest) - 1, budget
    while holds - fails > max(1, budget >> 8):
        cap = (fails + holds) // 2
        if len(_fill_groups(ends, cap)) <= fewest:
            holds = cap
        else:
            fails = cap
    bounds = _fill_groups(ends, holds)
    return [range(first, end) for first, end in zip([0] + bounds[:-1], bounds)]


def _fill_groups(ends: list[int], cap: int) -> list[int]:
    """Where each group ends when each takes experts in turn while it holds at most `cap` bytes
    (ends: the running total of the experts' bytes), an expert over it alone."""
    bounds, first, before = [], 0, 0
    while first < len(ends):
        end = max(bisect.bisect_right(ends, before + cap, lo=first), first + 1)
        bounds.append(end)
        first, before = end, ends[end - 1]
    return bounds


# The outputs of every row of a layer (a token's top_k rows) kept to be summed token by token in
# top_k additions (_Routing.add_slabs) instead of an index_add_ per expert, where the GPU kernel
# does not sum each group as it comes: 4096 tokens at top-8 of a 2048-wide layer (Qwen3-30B-A3B's).
# Larger layers or batches take the index_add_s.
SUM_BYTES = 128 * 2**20


@functools.lru_cache(maxsize=None)
def runs_eager_forward(cls: type) -> bool:
    """Whether `cls.forward` is transformers' eager experts forward, EAGER_FORWARD, word for word."""
    try:
        source = inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):
        return False
    return textwrap.dedent(source).strip() == EAGER_FORWARD.strip()


def rows_independent(quantizer: TensorQuantizer) -> bool:
    """Whether one call of `quantizer` on a tensor gives what calls on any split of its rows give
    (and nothing watches the calls): off; fake-quantizing with a fixed per-tensor amax; or
    collecting a per-tensor max."""
    if quantizer_sees_each_call(quantizer):
        return False
    if not quantizer.is_enabled or quantizes_with_fixed_amax(quantizer):
        return True
    return quantizer.is_calibrating and not quantizer._quantizing and quantizer.config.axis is None


def _sort_keys(top_k_index: torch.Tensor, experts: int) -> torch.Tensor:
    """The routed ids position-major, as torch.where walks the eager loop's (top-k position, token)
    mask, in int16 where -1..experts fit it (a radix sort's passes, so its launches, go by the
    key's bits: two for int16, eight for int64), else int64. An id the key could not hold is
    clamped to -1 or `experts` first: outside the experts it stays outside, never wrapped onto
    one. (_Routing's searchsorted boundaries, 0..experts, are of the key's dtype.)"""
    key = torch.int16 if experts < torch.iinfo(torch.int16).max else torch.int64
    ids, held = top_k_index, torch.iinfo(key)
    if torch.iinfo(ids.dtype).min < held.min or torch.iinfo(ids.dtype).max > held.max:
        ids = ids.clamp(-1, experts)
    tokens, top_k = ids.shape
    return torch.empty(top_k, tokens, dtype=key, device=ids.device).copy_(ids.transpose(0, 1)).view(-1)


class _Routing:
    """Which rows each expert gets, in the eager loop's order, once read(): `token` and `weight`
    per row, the rows of expert e being starts[e]:starts[e + 1]. `handled`: False where an id lies
    outside 0..experts - 1 (the eager loop skips or refuses it; the module's own forward then runs).
    With `kernel` (refquant.compiled.routing_triton, from refquant.quant.backends.routing_kernel)
    the same values come from its four launches instead of torch's sorts."""

    def __init__(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts: int, kernel=None):
        tokens = top_k_index.shape[0]
        self._routed = top_k_index.numel()
        self._top_k_weights, self._tokens, self._top_k_index = top_k_weights, tokens, top_k_index
        self._ends: Optional[torch.Tensor] = None
        self._positions: Optional[torch.Tensor] = None
        self._table: Optional[torch.Tensor] = None
        self._placed: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the kernel's token and weight a row
        if kernel is not None:
            self._bounds, token, weight, self._table = kernel.route(top_k_index, top_k_weights, experts)
            self._placed = (token, weight)
            return
        routed = _sort_keys(top_k_index, experts)
        ids, order = torch.sort(routed, stable=True)
        # bounds[e]: how many rows have an id below e; expert e's rows are bounds[e]:bounds[e + 1]
        # (no bincount: on a GPU it reads its input's extremes back, two syncs more)
        self._bounds = torch.searchsorted(ids, torch.arange(experts + 1, device=ids.device, dtype=ids.dtype))
        self._order = order

    def read(self) -> bool:
        """Read the counts back (the one device sync; what the host does between the constructor
        and this overlaps the device's sort) and find each row's token and routing weight.
        Returns `handled`."""
        self.starts: list[int] = self._bounds.tolist()
        self.handled = self.starts[0] == 0 and self.starts[-1] == self._routed
        self.counts = [end - begin for begin, end in zip(self.starts, self.starts[1:])]
        self.rows = self.starts[-1]
        if self.handled and self._placed is not None:
            self.token, self.weight = self._placed
        elif self.handled:
            self.token, self._slot = self._order % self._tokens, self._order // self._tokens
            self.weight = self._top_k_weights[self.token, self._slot]
        return self.handled

    def group_offsets(self, group: range) -> torch.Tensor:
        """The int32 running row counts of `group`'s experts, from 0 at its first row, on the
        device (grouped_mm's offsets; no copy from the host)."""
        if self._ends is None:
            self._ends = self._bounds[1:].to(torch.int32)
        ends, first_row = self._ends[group.start:group.stop], self.starts[group.start]
        return ends - first_row if first_row else ends  # (a group from row 0: the counts as they are, no launch)

    def row_table(self) -> torch.Tensor:
        """(top_k, tokens): entry [j, t] is the row (in this routing's row order) of token t's
        j-th expert in ascending expert order (a repeated expert's rows in top-k position order,
        as the eager loop's torch.where gives them). The rows ascend by (expert, top-k position,
        token), so a token's rows ascend with its experts: its j-th expert's row is its j-th
        smallest row (a sort of top_k values a token, one launch; no segmented sort)."""
        if self._table is None:
            tokens, top_k = self._top_k_index.shape
            rows = torch.arange(self.rows, device=self._order.device)
            row_of_slot = torch.empty_like(self._order).scatter_(0, self._order, rows)  # _order: slot * tokens + token
            self._table = row_of_slot.view(top_k, tokens).sort(dim=0).values
        return self._table

    def sum_positions(self) -> torch.Tensor:
        """Where each row (in this routing's row order) goes among top_k slabs of `tokens` rows:
        slab j holds each token's row of its j-th expert in ascending expert order (row_table
        turned around)."""
        if self._positions is None:
            table = self.row_table().reshape(-1).long()  # (the kernel's table is int32; scatter_ indexes by int64)
            places = torch.arange(table.numel(), device=table.device)
            self._positions = torch.empty_like(table).scatter_(0, table, places)
        return self._positions

    def add_slabs(self, slabs: torch.Tensor, output: torch.Tensor) -> None:
        """output (zeros) plus slab 0, then slab 1, ... (rows placed by sum_positions): each token's
        rows in ascending expert order, one addition a top-k slot over all tokens, which is what
        an index_add_ per expert in ascending order adds, rounding for rounding."""
        for slab in slabs.view(-1, *output.shape):
            output.add_(slab)


def loop_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, count_tokens: Optional[list[int]]) -> Optional[torch.Tensor]:
    """EAGER_FORWARD of a quantized fused experts module (refquant.hf.experts), with its
    quantizers where modelopt puts them, bit for bit; None where the routing holds an index the
    loop does not handle (the module's own forward then runs). count_tokens: per-expert counts to
    add the routed tokens to (calibration), or None."""
    experts = module.num_experts
    if hidden_states.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden_states.shape[0]:
        return None
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        return None
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)  # the eager loop's result: no expert is hit
    first_input_q, _ = module.projection_quantizers("gate_up_proj")
    routing = _Routing(top_k_index, top_k_weights, experts, routing_kernel(first_input_q.backend, top_k_index, experts))
    down_input_q, _ = module.projection_quantizers("down_proj")
    # every token is routed to top_k experts, so the first projection's rows are all the tokens
    first_once, down_per_expert = rows_independent(first_input_q), not rows_independent(down_input_q)
    weights = {projection: _ProjectionWeights(module, projection) for projection in ("gate_up_proj", "down_proj")}
    copies = 0  # a group's quantized copies' bytes an expert, at most one projection's at a time (GROUP_BYTES)
    grouped = [projection for projection, once in (("gate_up_proj", first_once), ("down_proj", not down_per_expert))
               if once] if grouped_matmul_allowed(hidden_states) else []  # input quantized over a group's rows at once
    for projection in grouped:  # bound now, while the device sorts the routing
        if weights[projection].bind() is not None:
            copies = max(copies, projection_copy_bytes(module, projection))
    if not routing.read():
        return None  # an id < 0 or >= num_experts: the eager loop skips or fails on it
    for projection in grouped:  # the grouped matmul's check of new row counts, before any group holds rows
        check_row_counts(hidden_states, weights[projection].parameter, routing.counts)
    if count_tokens is not None:
        for index, count in enumerate(routing.counts):
            count_tokens[index] += count
    if first_once:
        hidden_states, first_input_q = first_input_q(hidden_states), None
    output = torch.zeros_like(hidden_states)
    add_in_order = _ordered_sum_kernel(output, down_input_q)
    rows_out = None
    if add_in_order is None and routing.rows * hidden_states.shape[-1] * output.element_size() <= SUM_BYTES:
        rows_out = output.new_empty(routing.rows, hidden_states.shape[-1])
    groups = expert_groups(routing.counts, row_bytes(module, hidden_states, top_k_weights), copies, GROUP_BYTES)
    if add_in_order is not None:  # each group's (first row, end row) on the device, one copy a layer
        spans = torch.tensor([[routing.starts[group.start], routing.starts[group.stop]] for group in groups],
                             dtype=torch.int64, device=output.device).unbind(0)
    for index, group in enumerate(groups):
        y = _group(module, routing, hidden_states, first_input_q, down_input_q, down_per_expert, group, weights)
        if y is None:
            continue
        begin, end = routing.starts[group.start], routing.starts[group.stop]
        if add_in_order is not None:
            output = add_in_order(output, y, routing, spans[index])
        elif rows_out is not None:
            rows_out.index_copy_(0, routing.sum_positions()[begin:end], y)
        else:
            counts = routing.counts[group.start:group.stop]
            for expert_tokens, rows, count in zip(routing.token[begin:end].split(counts), y.split(counts), counts):
                if count:
                    output.index_add_(0, expert_tokens, rows)
        del y  # before the next group's rows
    if rows_out is not None:
        routing.add_slabs(rows_out, output)
    return output


def add_rows_in_order(sums: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, first_row: int) -> torch.Tensor:
    """sums (tokens, width) plus, for each token t and j = 0, 1, ..., top_k - 1 in that order, the
    row table[j, t] of the layer's routed rows where it is one of `rows` (rows[r - first_row] for
    first_row <= r < first_row + len(rows)), each addition rounded to sums' dtype; a new tensor.
    table (top_k, tokens): _Routing.row_table, each token's rows in ascending expert order, so
    groups of consecutive experts added in ascending order add each token's rows as the eager
    loop's index_add_ per expert does. refquant.compiled.ordered_sum_triton computes it in one
    launch on a GPU; the loop otherwise sums by slabs or by index_add_ (the same additions)."""
    out = sums.clone()
    if rows.shape[0] == 0:
        return out
    for row in table:
        taken = (row >= first_row) & (row < first_row + rows.shape[0])
        picked = rows[(row - first_row).clamp(0, rows.shape[0] - 1)]
        out = torch.where(taken[:, None], out + picked, out)
    return out


def _ordered_sum_kernel(output: torch.Tensor, quantizer: TensorQuantizer):
    """Where the loop sums each group's rows as soon as it has them, with the quantizers'
    backend's kernel (refquant.quant.backends.ordered_sum_kernel: the compiled backend on CUDA):
    add(sums, rows, routing, span), the group's rows added onto sums, a new tensor (span: the
    group's first and end row, an int64 pair on the device). Else None."""
    kernel = ordered_sum_kernel(quantizer.backend, output)
    if kernel is None:
        return None

    def add(sums: torch.Tensor, rows: torch.Tensor, routing: _Routing, span: torch.Tensor) -> torch.Tensor:
        return kernel.add_rows_in_order(sums, rows, routing.row_table(), span)

    return add


def _group(module: nn.Module, routing: _Routing, hidden_states: torch.Tensor, first_input_q: Optional[TensorQuantizer],
           down_input_q: TensorQuantizer, down_per_expert: bool, group: range,
           weights: dict[str, "_ProjectionWeights"]) -> Optional[torch.Tensor]:
    """The eager loop's iterations for the experts in `group` up to the sum: each of the
    group's rows' output (times its routing weight, in the output's dtype), in the routing's row
    order; None where the group has no rows. first_input_q: None when hidden_states are quantized
    already; down_per_expert: whether down_input_q is called on each expert's rows (else once on
    the group's); weights: each projection's, for this forward."""
    begin, end = routing.starts[group.start], routing.starts[group.stop]
    if begin == end:
        return None
    counts = routing.counts[group.start:group.stop]
    tokens = routing.token[begin:end]
    offsets = None  # grouped_mm's, made once a group when a projection takes the grouped matmul

    def project(projection: str, x: torch.Tensor, input_q: Optional[TensorQuantizer]) -> torch.Tensor:
        nonlocal offsets
        stacked = weights[projection].of_group(group, routing.counts) if input_q is None and grouped_matmul_allowed(x) else None
        if stacked is not None:
            if offsets is None:
                offsets = routing.group_offsets(group)
            out = grouped_linear(x, stacked, counts, offsets)
            if out is not None:
                return out
            return _per_expert(x, counts, lambda index, expert: stacked[index], group)
        return _per_expert(x, counts, weights[projection].quantized, group, input_q)

    # the eager loop's hidden_states[token_idx]: the same rows gathered (index_select: less host
    # work than advanced indexing's general path)
    gate_up = project("gate_up_proj", hidden_states.index_select(0, tokens), first_input_q)
    gate, up = gate_up.chunk(2, dim=-1)
    h = _multiply(module.act_fn(gate), up)
    del gate_up, gate, up
    if not down_per_expert:
        h = down_input_q(h)
    y = project("down_proj", h, down_input_q if down_per_expert else None)
    del h  # before the routing weights' product: the group's rows hold one tensor at a time
    y = _multiply(y, routing.weight[begin:end, None])  # (of wider routing weights: a product in their dtype)
    return y.to(hidden_states.dtype)  # (y of the projection freed before the cast)


def _multiply(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh * other, written over `fresh` where that gives the same tensor: the product keeps
    fresh's dtype and shape, no gradient is recorded (autograd keeps a product's operands), and
    fresh is no view (an activation that returns its input gives a view of the projection's
    output). An in-place product and an out-of-place one are the same kernel, so the same bits;
    the group's rows then hold one tensor, not two."""
    in_place = (not torch.is_grad_enabled() and fresh._base is None and torch.result_type(fresh, other) == fresh.dtype
                and _broadcasts_to(other.shape, fresh.shape))
    return fresh.mul_(other) if in_place else fresh * other


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether `shape` broadcasts to `target` without growing it (torch.broadcast_shapes(shape,
    target) == target, without its host time: the loop asks twice a group)."""
    return len(shape) <= len(target) and all(
        size == 1 or size == wanted for size, wanted in zip(reversed(shape), reversed(target)))


def _per_expert(x: torch.Tensor, counts: list[int], weight_of, group: range,
                input_q: Optional[TensorQuantizer] = None) -> torch.Tensor:
    """One F.linear per expert with rows: its rows (through input_q when given), then
    weight_of(index in group, expert), as modelopt's F.linear calls the two quantizers. An expert
    without rows is skipped, its quantizers not called, as in the eager loop."""
    pieces = []
    for index, (expert, rows) in enumerate(zip(group, x.split(counts))):
        if rows.shape[0]:
            rows = rows if input_q is None else input_q(rows)
            pieces.append(F.linear(rows, weight_of(index, expert)))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


_UNBOUND = object()


class _ProjectionWeights:
    """A projection's 3-D weight and its per-expert weight quantizers, for one forward of the
    loop: what is asked of all of them (bound calls, checks) is asked once a forward."""

    def __init__(self, module: nn.Module, projection: str):
        self.parameter = getattr(module, projection)
        self.quantizers = list(module.projection_quantizers(projection)[1])
        self._slice_quantizers = module.slice_quantizers(projection)
        self._call = _UNBOUND
        self._passing: Optional[bool] = None  # whether every quantizer passes its slice through (asked once)

    def bind(self) -> Optional["SliceCall"]:
        """The projection's weight quantizers bound for this forward (SliceQuantizers.bind, asked
        at the first ask: the kept binding where it holds), or None where one call over a group
        would not be exact."""
        if self._call is _UNBOUND:
            self._call = self._slice_quantizers.bind(0, self.parameter.shape[0], self.parameter)
        return self._call

    def quantized(self, index: int, expert: int) -> torch.Tensor:
        """Expert `expert`'s slice through its own quantizer (the eager loop's call)."""
        return self.quantizers[expert](self.parameter[expert])

    def of_group(self, group: range, counts: list[int]) -> Optional[torch.Tensor]:
        """The group's weights after their quantizers as one (experts, out, in) tensor, where that
        needs no separate call of a quantizer that quantizes: one call over the group's slices
        with one amax per expert (SliceQuantizers, asked once a forward); or, when every
        quantizer passes its input through (off, folded, or only collecting while calibrating)
        and nothing watches one, the parameter's slices
        themselves, the calls of every expert with rows (`counts`: the layer's, one per expert)
        that collect made at the first group (the eager loop's calls; their order does not change
        a max; collect_passing_slices: the maxima in one reduction). Else None."""
        slices = self.parameter[group.start:group.stop]
        call = self.bind()
        if call is not None:
            return call(slices, group.start)
        if self._passing is None:  # at the first group: the calls of every expert with rows
            self._passing = collect_passing_slices(self.quantizers, self.parameter, counts)
        return slices if self._passing else None
