"""The GPU's approximate fp32 division, bit for bit, on any device.

modelopt's NVFP4 fake-quant kernel divides with Triton's fp32 `/`, which is PTX `div.full.f32`, not
the IEEE division. Measured on an NVIDIA H200 (sm_90; scripts/measure_gpu_division.py, which also
tells whether another GPU agrees):

    div.full.f32(a, b) = RN(a * R(b))     exactly, for every fp32 a and b

where RN is one rounding to nearest-even of the exact product, and R(b) is the reciprocal that
`rcp.approx.f32` computes, without its flush of tiny results:

    R(1.m * 2^E) = r(1.m) * 2^-E          the exponent only shifts it (subnormal b: normalized)
    r(1.m)       = RN(1 / 1.m) + delta[m] ulp,   delta[m] in {-1, 0, +1}, a fixed table of 2^23
    R(+-0) = +-inf,  R(+-inf) = +-0,  R(NaN) = NaN     (so a/0, a/inf, 0/0 ... are IEEE's)

delta is shipped in data/ (2 bits a mantissa, 151,348 bytes zlib) and decoded on first use.
Evidence (docs/numerics.md has the numbers): every mantissa at every exponent for the reciprocal,
67 million random pairs, every pair of 45 special operands (zeros, subnormals, the edges of the
normal range, inf, NaN) and 65,536 random pairs in each region the table alone does not cover
(subnormal or huge divisors, subnormal dividends and quotients): 0 differences.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from .formats import FP32_SMALLEST_NORMAL

TABLE_PATH = Path(__file__).resolve().parent / "data" / "rcp_approx_sm90.bin.zlib"
MANTISSA_BITS = 23
_MANTISSA_MASK = (1 << MANTISSA_BITS) - 1
_ONE_BITS = 0x3F800000  # fp32 1.0
_EXPONENT_MASK = 0x7F800000
_SIGN_MASK = -(1 << 31)  # bit 31 of an int32
# Scales a subnormal divisor into the normal range exactly (its reciprocal is scaled back in float64).
_SUBNORMAL_SHIFT = 64

# Decoded tables, one per device: int32 bits of r(1.m) for m = 0 .. 2^23 - 1 (32 MiB each).
_TABLES: dict[torch.device, torch.Tensor] = {}


def decode_deltas(blob: bytes) -> torch.Tensor:
    """The shipped file's bytes -> delta[m] (int8, 2^23 entries). Four 2-bit codes a byte (delta + 1),
    mantissa 4i in bits 0-1 of byte i."""
    try:
        raw = zlib.decompress(blob)
    except zlib.error as error:
        raise ValueError(f"the reciprocal table is not a zlib stream ({error}); reinstall refquant or re-measure it "
                         "with scripts/measure_gpu_division.py --write") from error
    if len(raw) * 4 != 1 << MANTISSA_BITS:
        raise ValueError(f"a reciprocal table holds 2^23 2-bit entries (2 MiB unpacked), got {len(raw)} bytes")
    packed = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int32)
    codes = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).reshape(-1)
    if bool((codes == 3).any()):
        raise ValueError("a reciprocal table entry is outside {-1, 0, +1}: the file is damaged; re-measure it")
    return (codes - 1).to(torch.int8)


def reciprocal_bits_from_deltas(delta: torch.Tensor) -> torch.Tensor:
    """int32 bits of r(1.m) = RN(1 / 1.m) + delta[m] ulp for every mantissa m.

    RN(1 / 1.m) is taken in float64 and rounded to fp32: 1/b for a 24-bit b is never within 2^-53
    (relative) of an fp32 rounding midpoint, so rounding twice gives the correctly rounded value.
    """
    mantissa = torch.arange(1 << MANTISSA_BITS, dtype=torch.int32)
    nearest = (1.0 / (mantissa | _ONE_BITS).view(torch.float32).double()).float()
    return nearest.view(torch.int32) + delta.to(torch.int32)


def reciprocal_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 bits of r(1.m) for every mantissa m, on `device` (decoded once per device).

    refquant.compiled loads it before tracing, so compiled code reads it as a constant.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table = _TABLES.get(device)
    if table is None:
        if not _TABLES:
            _TABLES[torch.device("cpu")] = reciprocal_bits_from_deltas(decode_deltas(TABLE_PATH.read_bytes()))
        table = _TABLES[torch.device("cpu")].to(device)
        _TABLES[device] = table
    return table


def _reciprocal_bits_of_mantissa(bits: torch.Tensor) -> torch.Tensor:
    """int32 bits of r(1.m) for the mantissa of every fp32 bit pattern in `bits` (same shape)."""
    mantissa = (bits & _MANTISSA_MASK).long()
    # Indexed flat: a 0-d index tensor would be read back as a Python int (a host sync, and a
    # data-dependent value that torch.compile cannot trace).
    return reciprocal_table(bits.device)[mantissa.reshape(-1)].reshape(mantissa.shape)


def approx_reciprocal(b: torch.Tensor) -> torch.Tensor:
    """R(b) of every fp32 b, exactly, as float64 (it can lie outside fp32's range: 1/subnormal).

    The mantissa picks r(1.m) from the table, the exponent scales it by a power of two; a
    subnormal b is first scaled by 2^64 (exact) into the normal range.
    """
    b = b.float()
    tiny = b.abs() < FP32_SMALLEST_NORMAL
    normalized = torch.where(tiny, b * 2.0**_SUBNORMAL_SHIFT, b)  # exact: a power-of-two scaling
    bits = normalized.view(torch.int32)
    r_one = _reciprocal_bits_of_mantissa(bits).view(torch.float32).double()
    exponent = ((bits >> MANTISSA_BITS) & 0xFF).to(torch.int64) - 127 - torch.where(tiny, _SUBNORMAL_SHIFT, 0)
    # 2^-exponent as float64, built from its bits (exponent is within [-190, 127]: a normal double).
    power = ((1023 - exponent) << 52).view(torch.float64)
    magnitude = r_one * power
    magnitude = torch.where(b == 0, float("inf"), torch.where(torch.isinf(b), 0.0, magnitude))
    magnitude = torch.where(torch.isnan(b), float("nan"), magnitude)
    return torch.where(bits < 0, -magnitude, magnitude)


def approx_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """div.full.f32(a, b) as sm_90 computes it (Triton's fp32 `/`): RN(a * R(b)), fp32.

    a and b broadcast; both are taken as fp32. The product of two 24-bit significands is exact in
    float64, so its one rounding to fp32 is the instruction's.
    """
    return (a.float().double() * approx_reciprocal(b)).float()


def approx_reciprocal_fp32(b: torch.Tensor) -> torch.Tensor:
    """R(b) as fp32, for divisors whose R(b) is a normal fp32 (2^-126 <= |b| < 2^126) or +-inf.

    There `a * approx_reciprocal_fp32(b)` in fp32 is exactly approx_divide(a, b) (R(b) is an fp32
    number, and an fp32 multiply rounds the exact product once) and costs no float64 work: the
    fake-quant element step uses it. It is approx_reciprocal done in 32-bit integers, the exponent
    subtracted from r(1.m)'s bits; tests check the two agree for every mantissa. Outside that range
    R(b) does not fit fp32 and the result is meaningless: use approx_divide there.
    """
    bits = b.float().view(torch.int32)
    r_one = _reciprocal_bits_of_mantissa(bits)
    # r(1.m) * 2^-E: subtract E from the biased exponent field; the sign bit is b's.
    r_bits = (r_one - (bits & _EXPONENT_MASK) + _ONE_BITS) | (bits & _SIGN_MASK)
    reciprocal = r_bits.view(torch.float32)
    return torch.where(torch.isinf(b), 0.0 * b.sign(), torch.where(torch.isnan(b), b, reciprocal))
