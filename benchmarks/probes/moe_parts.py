"""Where an MoE layer's time goes, and which batched matmuls give the per-expert F.linear bits
that modelopt's eager experts loop computes: layer 0 of benchmarks/ptq_gpu.py's "moe" shape, its
experts module's own inputs (hooked from a forward), unquantized bf16.

    python3 benchmarks/probes/moe_parts.py --out DIR [--repeats 20]

Timings (host: until the calls return; device: CUDA events), medians over the repeats:
  grouped_mm / eager      the experts module's forward with transformers' two implementations
                          (grouped_mm sums each token's top-k outputs in fp32: other bits than eager)
  linear_each             the two projections' F.linear per expert that got rows (the GEMMs alone)
  mm_out_each             the same GEMMs as torch.mm into slices of one output
  index_add_each          one index_add_ per expert in ascending order (the eager loop's sum)
  ordered_sum             the same sum as top_k in-place adds over rows ordered by expert per token
Bits (counts of elements that differ from F.linear on each expert's rows):
  mm_out, grouped_mm, bmm over experts padded to the largest count, and F.linear over a
  prefix of one expert's rows (does a row's result depend on how many rows the call has).
The JSON goes to DIR/moe_parts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptq_gpu  # noqa: E402
from probe_output import write_json  # noqa: E402


def timed(fn, repeats: int) -> dict:
    """Median host and device ms of fn() after two warm-up calls (device: host on a CPU)."""
    cuda = torch.cuda.is_available()
    host, device = [], []
    for step in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        fn()
        issued = (time.perf_counter() - began) * 1e3
        if cuda:
            end.record()
            end.synchronize()
        if step >= 2:
            host.append(issued)
            device.append(start.elapsed_time(end) if cuda else issued)
    return {"host_ms": statistics.median(host), "device_ms": statistics.median(device)}


def experts_inputs(model, batch):
    """(experts module, hidden_states, top_k_index, top_k_weights) of layer 0's experts."""
    experts = model.model.layers[0].mlp.experts
    seen = {}

    def hook(module, args, kwargs):
        seen["args"] = [a.detach().clone() for a in args]
        raise StopIteration  # one layer is enough

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=batch)
    except StopIteration:
        pass
    finally:
        handle.remove()
    return (experts, *seen["args"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shape", default="moe")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = ptq_gpu.build_model(args.shape, 0, device)
    batch = ptq_gpu.batches_for(args.shape, 1, 4, 1024 if args.shape == "moe" else 64, 1)[0].to(device)
    experts, hidden, top_k_index, top_k_weights = experts_inputs(model, batch)
    E, tokens, top_k = experts.num_experts, hidden.shape[0], top_k_index.shape[1]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "experts": E, "tokens": tokens, "top_k": top_k}

    # each expert's rows, in torch.where's order over the eager loop's mask (position, then token)
    routed = top_k_index.transpose(0, 1).reshape(-1)
    order = torch.sort(routed, stable=True).indices
    counts = torch.bincount(routed, minlength=E).tolist()
    token = order % tokens
    weight = top_k_weights[token, order // tokens]
    rows = hidden[token]
    result["counts"] = counts
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    inter = down.shape[-1]

    def linear_each():
        outs = [F.linear(x, gate_up[e]) for e, x in enumerate(rows.split(counts)) if counts[e]]
        h = torch.cat(outs)
        h = F.silu(h[:, :inter]) * h[:, inter:]
        return torch.cat([F.linear(x, down[e]) for e, x in enumerate(h.split(counts)) if counts[e]])

    gu_out = torch.empty(rows.shape[0], gate_up.shape[1], dtype=rows.dtype, device=device)
    dn_out = torch.empty(rows.shape[0], down.shape[1], dtype=rows.dtype, device=device)

    def mm_out_each():
        for e, (x, o) in enumerate(zip(rows.split(counts), gu_out.split(counts))):
            if counts[e]:
                torch.mm(x, gate_up[e].t(), out=o)
        h = F.silu(gu_out[:, :inter]) * gu_out[:, inter:]
        for e, (x, o) in enumerate(zip(h.split(counts), dn_out.split(counts))):
            if counts[e]:
                torch.mm(x, down[e].t(), out=o)
        return dn_out

    y = (linear_each() * weight[:, None]).to(hidden.dtype)

    def index_add_each():
        out = torch.zeros_like(hidden)
        for t, r, c in zip(token.split(counts), y.split(counts), counts):
            if c:
                out.index_add_(0, t, r)
        return out

    # each token's rows by ascending expert: sort the sorted rows by token, stably
    by_token = torch.sort(token, stable=True).indices

    def ordered_sum():
        grouped = y[by_token].view(tokens, top_k, -1)
        out = torch.zeros_like(hidden)
        for j in range(top_k):
            out.add_(grouped[:, j])
        return out

    with torch.no_grad():
        from transformers.integrations.moe import grouped_mm_experts_forward

        implementation = experts.config._experts_implementation

        def eager_forward(module, *inputs):  # the class's forward dispatches on the config's implementation
            module.config._experts_implementation = "eager"
            try:
                return type(module).forward(module, *inputs)
            finally:
                module.config._experts_implementation = implementation

        result["time"] = {
            "grouped_mm": timed(lambda: grouped_mm_experts_forward(experts, hidden, top_k_index, top_k_weights), args.repeats),
            "eager": timed(lambda: eager_forward(experts, hidden, top_k_index, top_k_weights), args.repeats),
            "linear_each": timed(linear_each, args.repeats),
            "mm_out_each": timed(mm_out_each, args.repeats),
            "index_add_each": timed(index_add_each, args.repeats),
            "ordered_sum": timed(ordered_sum, args.repeats),
        }
        single = rows.split(counts)[0]
        result["time"]["one_linear"] = timed(lambda: F.linear(single, gate_up[0]), args.repeats)
        bits = {}
        bits["ordered_sum_vs_index_add"] = int((ordered_sum().view(torch.int16) != index_add_each().view(torch.int16)).sum())
        eager = eager_forward(experts, hidden, top_k_index, top_k_weights)
        bits["index_add_vs_eager_forward"] = int((index_add_each().view(torch.int16) != eager.view(torch.int16)).sum())
        reference = [F.linear(x, gate_up[e]) for e, x in enumerate(rows.split(counts))]
        mm_out_each()
        bits["mm_out_vs_linear"] = sum(int((a != b).sum()) for a, b in zip(reference, gu_out.split(counts)))
        offsets = torch.cumsum(torch.tensor(counts, device=device), 0).to(torch.int32)
        grouped = torch._grouped_mm(rows, gate_up.transpose(-2, -1), offs=offsets)
        bits["grouped_mm_vs_linear"] = sum(int((a != b).sum()) for a, b in zip(reference, grouped.split(counts)))
        bits["grouped_mm_experts_differing"] = sum(int(bool((a != b).any())) for a, b in zip(reference, grouped.split(counts)))
        biggest = max(counts)
        padded = torch.zeros(E, biggest, rows.shape[1], dtype=rows.dtype, device=device)
        for e, x in enumerate(rows.split(counts)):
            padded[e, :counts[e]] = x
        batched = torch.bmm(padded, gate_up.transpose(-2, -1))
        bits["bmm_vs_linear"] = sum(int((batched[e, :counts[e]] != reference[e]).sum()) for e in range(E))
        # a row's result against the number of rows in the call (cuBLAS picks kernels by shape)
        full = F.linear(rows, gate_up[0])
        prefix = {}
        for m in list(range(1, 65)) + [96, 128, 192, 256, 384, 512, 640, 768, 1024, 2048, 4096]:
            if m > rows.shape[0]:
                break
            prefix[m] = int((F.linear(rows[:m], gate_up[0]) != full[:m]).sum())
        bits["prefix_rows_vs_all_rows"] = prefix
        result["bits"] = bits
    write_json(args.out, "moe_parts.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "counts"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
