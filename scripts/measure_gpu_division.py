"""Measure the GPU's approximate fp32 reciprocal and division, the arithmetic of modelopt's NVFP4
fake-quant kernel, and compare them with the table refquant ships.

modelopt's Triton kernel divides with Triton's fp32 `/`, which is PTX `div.full.f32`. On sm_90 that
is `fl(a * r(b))` with r = `rcp.approx.ftz.f32`, and r(b) is a fixed function of b's 23 mantissa
bits (the exponent only shifts it): the correctly rounded 1/b plus -1, 0 or +1 ulp. refquant ships
those deltas for every mantissa of [1, 2) (2 bits each) and computes the kernel's quotients from
them on any device (refquant.numerics.gpu_division).

    python3 scripts/measure_gpu_division.py             # does this GPU give the shipped table?
    python3 scripts/measure_gpu_division.py --write T   # measure and write a table file to T
    python3 scripts/measure_gpu_division.py --probe P   # also save div.full.f32 on special operands

Needs a CUDA GPU and Triton (inline PTX). Prints a summary and writes it as JSON with --json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from refquant.numerics.gpu_division import (  # noqa: E402
    MANTISSA_BITS,
    TABLE_PATH,
    decode_deltas,
    reciprocal_bits_from_deltas,
)

MANTISSAS = 1 << MANTISSA_BITS


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rcp_kernel(b_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        b = tl.load(b_ptr + offsets, mask=mask, other=1.0)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [b], dtype=tl.float32, is_pure=True, pack=1)
        tl.store(out_ptr + offsets, r, mask=mask)

    @triton.jit
    def div_full_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        a = tl.load(a_ptr + offsets, mask=mask, other=1.0)
        b = tl.load(b_ptr + offsets, mask=mask, other=1.0)
        q = tl.inline_asm_elementwise("div.full.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)
        tl.store(out_ptr + offsets, q, mask=mask)

    @triton.jit
    def triton_div_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        a = tl.load(a_ptr + offsets, mask=mask, other=1.0)
        b = tl.load(b_ptr + offsets, mask=mask, other=1.0)
        tl.store(out_ptr + offsets, a / b, mask=mask)  # what modelopt's kernel writes: Triton's fp32 `/`

    block = 1024

    def grid(n):
        return (triton.cdiv(n, block),)

    def rcp(b):
        out = torch.empty_like(b)
        rcp_kernel[grid(b.numel())](b, out, b.numel(), BLOCK=block)
        return out

    def div_full(a, b):
        out = torch.empty_like(a)
        div_full_kernel[grid(a.numel())](a, b, out, a.numel(), BLOCK=block)
        return out

    def triton_div(a, b):
        out = torch.empty_like(a)
        triton_div_kernel[grid(a.numel())](a, b, out, a.numel(), BLOCK=block)
        return out

    return rcp, div_full, triton_div


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def measure_deltas(rcp) -> torch.Tensor:
    """delta[m] = bits(rcp.approx(1.m)) - bits(RN(1 / 1.m)) for every mantissa m (int8, CPU);
    RN(1 / 1.m) as refquant forms it (reciprocal_bits_from_deltas with every delta 0)."""
    nearest = reciprocal_bits_from_deltas(torch.zeros(MANTISSAS, dtype=torch.int8))
    b = (torch.arange(MANTISSAS, dtype=torch.int32) | (127 << MANTISSA_BITS)).view(torch.float32)  # 1.m
    measured = rcp(b.cuda()).cpu()
    delta = bits(measured) - nearest
    if delta.abs().max() > 1:
        worst = int(delta.abs().argmax())
        raise RuntimeError(f"rcp.approx of 1.m differs from RN(1/1.m) by {int(delta[worst])} ulp at m={worst}: "
                           "this GPU's reciprocal is not the one refquant models (|delta| <= 1).")
    return delta.to(torch.int8)


def encode(delta: torch.Tensor) -> bytes:
    """2 bits a mantissa (delta + 1), four a byte, m = 4i in bits 0-1 of byte i; zlib level 9."""
    code = (delta.to(torch.int32) + 1).reshape(-1, 4)
    packed = code[:, 0] | (code[:, 1] << 2) | (code[:, 2] << 4) | (code[:, 3] << 6)
    return zlib.compress(packed.to(torch.uint8).numpy().tobytes(), 9)


def check_exponent_shift(rcp, r_one: torch.Tensor) -> dict:
    """rcp.approx(1.m * 2^k) against r(1.m) * 2^-k for every biased exponent 1..254 and every m
    (results below the normal range flushed to zero, as .ftz does)."""
    mantissa = torch.arange(MANTISSAS, dtype=torch.int32, device="cuda")
    r_one = r_one.cuda()
    mismatches = {}
    for exponent in range(1, 255):
        b = (mantissa | (exponent << 23)).view(torch.float32)
        shifted = r_one - ((exponent - 127) << 23)
        expected = torch.where((shifted >> 23) >= 1, shifted, torch.zeros_like(shifted))  # ftz
        differ = int((bits(rcp(b)) != expected).sum())
        if differ:
            mismatches[exponent] = differ
    return mismatches


def emulate(a: torch.Tensor, b: torch.Tensor, r_one: torch.Tensor) -> torch.Tensor:
    """fl(a * r(b)) for positive normal b below 2^126 (the random-pair check's domain)."""
    b_bits = bits(b)
    r_bits = r_one.to(b.device)[(b_bits & 0x7FFFFF).long()] - ((((b_bits >> 23) & 0xFF) - 127) << 23)
    r_bits = r_bits | (b_bits & torch.tensor(-(1 << 31), dtype=torch.int32, device=b.device))
    return a * r_bits.view(torch.float32)


def check_random_pairs(div_full, triton_div, r_one: torch.Tensor, count: int, seed: int) -> dict:
    """div.full.f32 against Triton's `/` and against fl(a * r(b)), a: N(0,1) 2^[-30,30),
    b: U(0,1) 2^[-60,60) (both signs)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(count, device="cuda", generator=generator) * torch.exp2(
        torch.randint(-30, 30, (count,), device="cuda", generator=generator).float())
    b = torch.rand(count, device="cuda", generator=generator) * torch.exp2(
        torch.randint(-60, 60, (count,), device="cuda", generator=generator).float())
    b = torch.where(torch.rand(count, device="cuda", generator=generator) < 0.5, b, -b)
    b = torch.where(b == 0, torch.ones_like(b), b)
    q_full = div_full(a, b)
    return {
        "pairs": count,
        "triton_div_vs_div_full": int((bits(triton_div(a, b)) != bits(q_full)).sum()),
        "div_full_vs_a_times_table_rcp": int((bits(q_full) != bits(emulate(a, b, r_one))).sum()),
        "div_full_vs_ieee": int((bits(q_full) != bits(a / b)).sum()),
    }


def special_operands() -> torch.Tensor:
    """Operands the table does not cover, and their neighbours: zeros, subnormals, the edges of
    the normal range, inf and NaN, both signs."""
    f = torch.finfo(torch.float32)
    magnitudes = [0.0, 2.0**-149, 2.0**-140, 2.0**-127, 2.0**-126 - 2.0**-149, 2.0**-126, 1.5 * 2.0**-126,
                  1e-30, 0.3, 1.0, 1.5, 3.0, 1e30, 2.0**125, 1.75 * 2.0**125, 2.0**126 - 2.0**102, 2.0**126,
                  1.5 * 2.0**126, 2.0**127, 1.75 * 2.0**127, f.max, float("inf")]
    values = torch.tensor(magnitudes, dtype=torch.float32)
    return torch.cat([values, -values, torch.tensor([float("nan")])])


def probe(rcp, div_full, triton_div, seed: int) -> dict:
    """Raw bits of div.full.f32, Triton's `/` and rcp.approx on special operands (every pair) and on
    random operands in the regions the table does not cover."""
    specials = special_operands()
    a = specials.repeat_interleave(specials.numel())
    b = specials.repeat(specials.numel())
    generator = torch.Generator().manual_seed(seed)
    count = 1 << 16
    random_a = torch.randn(count, generator=generator)
    mantissa = torch.randint(0, MANTISSAS, (count,), generator=generator, dtype=torch.int32)
    regions = {
        # |b| in [2^126, 2^128): 1/b is below the normal range
        "huge_b": (random_a * 2.0**100, (mantissa | (torch.randint(253, 255, (count,), generator=generator, dtype=torch.int32) << 23)).view(torch.float32)),
        # b subnormal
        "subnormal_b": (random_a * 2.0**-120, (mantissa | 0).view(torch.float32)),
        # quotient below the normal range, b normal
        "subnormal_quotient": (random_a * 2.0**-130, torch.rand(count, generator=generator) * 2.0**10 + 1.0),
        # a subnormal, b near 1
        "subnormal_a": ((mantissa & 0x7FFFFF).view(torch.float32), torch.rand(count, generator=generator) + 0.5),
    }
    out = {"specials": {"a": a, "b": b}}
    for name, (ra, rb) in regions.items():
        out[name] = {"a": ra, "b": rb}
    for entry in out.values():
        cuda_a, cuda_b = entry["a"].cuda(), entry["b"].cuda()
        entry["div_full"] = div_full(cuda_a, cuda_b).cpu()
        entry["triton_div"] = triton_div(cuda_a, cuda_b).cpu()
        entry["rcp_b"] = rcp(cuda_b).cpu()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=None, help="the shipped table to compare with (default: refquant's)")
    parser.add_argument("--write", type=Path, help="write the measured table to this file")
    parser.add_argument("--probe", type=Path, help="save div.full.f32 on special operands (torch.save) to this file")
    parser.add_argument("--pairs", type=int, default=1 << 26, help="random pairs for the division check")
    parser.add_argument("--json", type=Path, help="write the summary as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: this measures the GPU's own reciprocal instruction", file=sys.stderr)
        return 2
    rcp, div_full, triton_div = _kernels()
    props = torch.cuda.get_device_properties(0)
    summary: dict = {"gpu": props.name, "capability": f"sm_{props.major}{props.minor}", "torch": torch.__version__}
    delta = measure_deltas(rcp)
    blob = encode(delta)
    summary["deltas"] = {str(d): int((delta == d).sum()) for d in (-1, 0, 1)}
    summary["table_sha256_compressed"] = hashlib.sha256(blob).hexdigest()
    summary["table_sha256_raw"] = hashlib.sha256(zlib.decompress(blob)).hexdigest()
    summary["table_bytes"] = len(blob)
    if args.write:
        args.write.write_bytes(blob)
    shipped_path = args.table or TABLE_PATH
    if Path(shipped_path).exists():
        shipped = decode_deltas(Path(shipped_path).read_bytes())
        differ = int((shipped != delta).sum())
        summary["shipped_table"] = {"path": str(shipped_path), "mantissas_differing": differ}
        verdict = "the same table as refquant ships" if differ == 0 else f"a DIFFERENT table ({differ} mantissas)"
        print(f"{props.name}: rcp.approx.ftz.f32 gives {verdict}")
    r_one = reciprocal_bits_from_deltas(delta)
    summary["exponent_shift_mismatches"] = check_exponent_shift(rcp, r_one)
    summary["random_pairs"] = check_random_pairs(div_full, triton_div, r_one, args.pairs, seed=0)
    if args.probe:
        torch.save(probe(rcp, div_full, triton_div, seed=1), args.probe)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
