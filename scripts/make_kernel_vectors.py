"""Make test vectors from modelopt's own NVFP4 fake-quant kernel, on data where ties are common.

Runs on a GPU with nvidia-modelopt 0.47 importable (its Triton kernel `fp4_fake_quant_block`,
reached through TensorQuantizer as PTQ reaches it). Writes one torch.save file:

    meta   versions, device, seed, what the file holds
    cases  name, group, entry_point, x, global_amax (fp32 0-d, or None: max|x| of the tensor),
           y (the kernel's output: x's dtype and shape)

Groups:
  weights         bf16 and fp16 casts of linear weights of refquant's built-in seeded model,
                  global amax computed, 0.5x, 1.37x the max, and 448 (the KV constant)
  bf16_patterns   all 65,536 bf16 bit patterns (in order, and in a seeded shuffle that mixes
                  magnitudes within a block) under several global amax, NaN and inf included
  fp32_near_ties  fp32 elements within 3 ulp of S * p for every E2M1 decision point p

    python3 scripts/make_kernel_vectors.py --out nvfp4_fake_kernel_ties.pt

modelopt imports `pulp` at start-up for a search feature that quantization never calls; where
pulp is not installed, scripts/stand_ins/pulp stands in for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

E2M1_DECISION_POINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
BLOCK = 16
SEED = 0


def _stand_in_pulp() -> None:
    """Put scripts/stand_ins (a placeholder pulp) on the path when pulp is not installed."""
    try:
        import pulp  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "stand_ins"))


def modelopt_fake_quant(x: torch.Tensor, global_amax: torch.Tensor | None) -> torch.Tensor:
    """modelopt's TensorQuantizer(num_bits=(2,1), dynamic 16-blocks, E4M3 scales).forward(x) on CUDA."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizer = TensorQuantizer(
        QuantizerAttributeConfig(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    ).cuda()
    if global_amax is not None:
        quantizer.amax = global_amax.float().cuda()
    with torch.no_grad():
        return quantizer(x.cuda()).cpu()


def modelopt_kernel(x: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """modelopt's Triton fp4_fake_quant_block, called directly (a cross-check of the entry point)."""
    from modelopt.torch.kernels.quantization.gemm import fp4_fake_quant_block

    return fp4_fake_quant_block(x.cuda(), global_amax.float().cuda()).cpu()


def weight_inputs() -> dict[str, torch.Tensor]:
    """A few linear weights of the built-in model (fp32, seeded; at most 256 rows each), by short name."""
    from refquant.hf.models import build_builtin_model

    model = build_builtin_model(dtype=torch.float32)
    names = {
        "q_proj0": "model.layers.0.self_attn.q_proj.weight",
        "k_proj3": "model.layers.3.self_attn.k_proj.weight",
        "up_proj2_rows0_255": "model.layers.2.mlp.up_proj.weight",
    }
    params = dict(model.named_parameters())
    return {short: params[full].detach()[:256].clone() for short, full in names.items()}


def near_tie_input(global_amax: float, rows: int, generator: torch.Generator) -> torch.Tensor:
    """fp32 blocks of 16: element 0 sets the block max (log-uniform in [amax/1e4, amax]); the
    others are fl(p * S) moved by -3..3 ulp, S the block scale an IEEE reference gives (equal to
    the kernel's except near E4M3 ties), p the E2M1 decision points (two of them twice)."""
    block_max = global_amax * torch.exp(-torch.rand(rows, 1, generator=generator) * 9.2)
    g = torch.tensor(global_amax, dtype=torch.float32) * torch.tensor(1 / 2688, dtype=torch.float32)
    e4m3 = (block_max / (g * 6.0)).clamp(max=448.0).to(torch.float8_e4m3fn).float()
    scale = e4m3 * g
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    points = torch.tensor(E2M1_DECISION_POINTS + E2M1_DECISION_POINTS + (0.25,), dtype=torch.float32)
    target = points[torch.argsort(torch.rand(rows, 15, generator=generator), dim=1)] * scale
    ulps = torch.randint(-3, 4, (rows, 15), generator=generator, dtype=torch.int32)
    nudged = (target.view(torch.int32) + ulps).view(torch.float32)
    signs = torch.where(torch.rand(rows, 16, generator=generator) < 0.5, -1.0, 1.0)
    return torch.cat([block_max, nudged], dim=1) * signs


def build_cases() -> list[dict]:
    generator = torch.Generator().manual_seed(SEED)
    cases: list[dict] = []

    def add(name: str, group: str, x: torch.Tensor, amax: float | torch.Tensor | None) -> None:
        amax_t = None if amax is None else torch.as_tensor(amax, dtype=torch.float32).reshape(())
        cases.append({"name": name, "group": group, "x": x, "global_amax": amax_t})

    for short, weight in weight_inputs().items():
        for dtype in (torch.bfloat16, torch.float16):
            x = weight.to(dtype)
            peak = float(x.abs().max().float())
            tag = f"{short}_{str(dtype).removeprefix('torch.')}"
            add(f"{tag}_amax_computed", "weights", x, None)
            add(f"{tag}_amax_0.5max", "weights", x, 0.5 * peak)
            add(f"{tag}_amax_1.37max", "weights", x, 1.37 * peak)
            add(f"{tag}_amax_448", "weights", x, 448.0)

    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(-1, 64)
    shuffled = patterns.reshape(-1)[torch.randperm(65536, generator=generator)].reshape(-1, 64)
    finite = patterns.reshape(-1)[~torch.isnan(patterns.reshape(-1))]
    finite = finite[: finite.numel() // 64 * 64].reshape(-1, 64)  # max|x| = inf: an inf global amax
    for order, x in (("ordered", patterns), ("shuffled", shuffled)):
        for amax in (None, 0.0, 1e-3, 1.0, 3.140625, 448.0, 6.0e4, 1e30, 3.0e38):
            add(f"bf16_patterns_{order}_amax_{'computed' if amax is None else amax}", "bf16_patterns", x, amax)
    add("bf16_finite_and_inf_patterns_amax_computed", "bf16_patterns", finite, None)
    add("bf16_finite_and_inf_patterns_amax_inf", "bf16_patterns", finite, float("inf"))

    for amax in (1.0, 448.0, 3.0e5, 2.5e-3):
        x = near_tie_input(amax, 2048, generator)
        add(f"fp32_near_ties_amax_{amax}", "fp32_near_ties", x, amax)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cases = build_cases()  # before modelopt is imported: it changes nothing here, but keep it apart
    _stand_in_pulp()
    import modelopt
    import triton

    entry = ("TensorQuantizer(QuantizerAttributeConfig(num_bits=(2,1), block_sizes={-1:16,'type':'dynamic',"
             "'scale_bits':(4,3)})).forward(x) on CUDA -> Triton fp4_fake_quant_block")
    for case in cases:
        case["y"] = modelopt_fake_quant(case["x"], case["global_amax"])
        case["entry_point"] = entry + (" (amax computed from x)" if case["global_amax"] is None else " (amax buffer = global_amax)")
        if case["global_amax"] is not None:
            direct = modelopt_kernel(case["x"], case["global_amax"])
            same = torch.equal(direct.view(torch.int16 if direct.element_size() == 2 else torch.int32),
                               case["y"].view(torch.int16 if direct.element_size() == 2 else torch.int32))
            if not same:
                raise RuntimeError(f"{case['name']}: TensorQuantizer and fp4_fake_quant_block disagree")
    meta = {
        "kind": "nvfp4_fake_kernel",
        "description": __doc__.split("\n\n")[1],
        "modelopt_version": str(modelopt.__version__),
        "torch_version": str(torch.__version__),
        "triton_version": str(triton.__version__),
        "device": torch.cuda.get_device_name(0),
        "seed": str(SEED),
    }
    torch.save({"meta": meta, "cases": cases}, args.out)
    print(f"{len(cases)} cases, {sum(c['x'].numel() for c in cases)} elements -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
