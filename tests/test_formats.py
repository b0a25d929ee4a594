"""The format constants and code tables (refquant.numerics.formats), as tables, and docs/numerics.md's numbers.

The worked NVFP4 block and the examples of the docs' two tables are recomputed here, so the guide
cannot drift from the code. To refresh the worked block after a deliberate change, run
`python tests/test_formats.py` and paste its output into docs/numerics.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import every_16_bit_pattern

import refquant as rq
from refquant import formats
from refquant.numerics.formats import fp32_bits
from refquant.numerics.nvfp4 import e2m1_magnitude_index

DOC = Path(__file__).resolve().parent.parent / "docs" / "numerics.md"

# --- constants (docs/modelopt_behaviour.md §0) ---------------------------------------------------

CONSTANT_ROWS = [
    # (what, value as refquant computes it in fp32, fp32 bits)
    ("rcp(2688) = formats.RCP_2688", formats.RCP_2688, 0x39C30C31),
    ("rcp(448)", float(torch.reciprocal(torch.tensor(448.0))), 0x3B124925),
    ("rcp(448) = formats.RCP_448", formats.RCP_448, 0x3B124925),
    ("fl(448 * rcp(2688)) = fp32(1/6)", float(torch.tensor(448.0) * formats.RCP_2688), 0x3E2AAAAB),
    ("1e-5 = NVFP4_BLOCK_SCALE_FLOOR", formats.NVFP4_BLOCK_SCALE_FLOOR, 0x3727C5AC),
    ("1e-12 = NVFP4_GLOBAL_SCALE_FLOOR", formats.NVFP4_GLOBAL_SCALE_FLOOR, 0x2B8CBCCC),
    ("2**-24 = FP8_AMAX_FLOOR", formats.FP8_AMAX_FLOOR, 0x33800000),
    ("448 = E4M3_MAX", formats.E4M3_MAX, 0x43E00000),
    ("2**-9 = E4M3_MIN_SUBNORMAL", formats.E4M3_MIN_SUBNORMAL, 0x3B000000),
    ("2688 = NVFP4_SCALE_DENOMINATOR", formats.NVFP4_SCALE_DENOMINATOR, 0x45280000),
]


@pytest.mark.parametrize("what, value, bits", CONSTANT_ROWS, ids=[row[0].split(" ")[0] for row in CONSTANT_ROWS])
def test_constant_has_the_fp32_bits_of_the_spec(what, value, bits):
    actual = fp32_bits(value)
    assert actual == bits, f"{what}: 0x{actual:08X}, docs/modelopt_behaviour.md §0 says 0x{bits:08X}"


def test_rcp_2688_is_what_a_cuda_tensor_divided_by_2688_multiplies_by():
    """docs/modelopt_behaviour.md P2: on CUDA `t / 2688.0` is `t * fp32(1/2688)`; our constant is
    that fp32 value."""
    assert torch.tensor(formats.RCP_2688, dtype=torch.float32).item() == formats.RCP_2688  # exactly fp32
    assert fp32_bits(formats.RCP_2688) == fp32_bits(float(torch.reciprocal(torch.tensor(2688.0))))


def test_rcp_448_is_what_a_cuda_tensor_divided_by_448_multiplies_by():
    """docs/modelopt_behaviour.md P2, FP8QTensor's `amax / 448.0` on CUDA: our constant is exactly
    fp32(1/448)."""
    assert torch.tensor(formats.RCP_448, dtype=torch.float32).item() == formats.RCP_448  # exactly fp32
    assert fp32_bits(formats.RCP_448) == fp32_bits(float(torch.reciprocal(torch.tensor(448.0))))


def _fp32_sweep() -> torch.Tensor:
    """Every bf16 pattern as fp32, plus 4M random fp32 bit patterns (normal and subnormal)."""
    bf16 = every_16_bit_pattern(torch.bfloat16).float()
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (4_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    return torch.cat([bf16, bits.view(torch.float32)])


@pytest.mark.parametrize("constant", [formats.E4M3_MAX, formats.NVFP4_SCALE_DENOMINATOR])
def test_divide_by_constant_is_the_ieee_fp32_quotient_however_the_backend_divides(constant):
    from refquant.numerics.fp8 import divide_by_constant

    v = _fp32_sweep()
    ieee = v / torch.tensor(constant)  # fp32 / fp32 tensor on the CPU: one IEEE division
    finite = torch.isfinite(v)
    bits = lambda t: t[finite].view(torch.int32)  # noqa: E731 - bit for bit, the sign of zero too
    assert torch.equal(bits(divide_by_constant(v, constant)), bits(ieee))
    # What inductor on CUDA (and eager CUDA) computes instead: a multiply by the float64
    # reciprocal. Rounded to fp32 it must give the same bits.
    by_reciprocal = (v.double() * (1.0 / constant)).float()
    assert torch.equal(bits(by_reciprocal), bits(ieee))
    assert torch.isnan(divide_by_constant(torch.tensor([float("nan")]), constant)).all()


def test_e4m3_limits_are_those_of_float8_e4m3fn():
    info = torch.finfo(formats.E4M3_DTYPE)
    assert info.max == formats.E4M3_MAX
    smallest = torch.tensor([0x01], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
    assert smallest == formats.E4M3_MIN_SUBNORMAL


@pytest.mark.parametrize("dtype, largest, emax", [
    (formats.E4M3_DTYPE, formats.E4M3_MAX, formats.E4M3_EMAX),
    (formats.E5M2_DTYPE, formats.E5M2_MAX, formats.E5M2_EMAX),
])
def test_fp8_element_limits_and_largest_power_of_two_are_those_of_torchs_dtypes(dtype, largest, emax):
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    finite = values[torch.isfinite(values)]
    assert finite.max().item() == largest == torch.finfo(dtype).max
    assert 2.0**emax <= largest < 2.0 ** (emax + 1)


def test_e2m1_largest_power_of_two_is_the_largest_power_of_two_among_its_magnitudes():
    powers = [m for m in formats.E2M1_MAGNITUDES if m > 0 and math.log2(m).is_integer()]
    assert max(powers) == 2.0**formats.E2M1_EMAX


def test_e8m0_bytes_are_powers_of_two_with_bias_127_and_0xff_is_nan():
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(formats.E8M0_DTYPE).float()
    expected = [2.0 ** (b - formats.E8M0_BIAS) for b in range(255)]
    assert values[:255].tolist() == expected
    assert math.isnan(values[formats.E8M0_NAN].item())


# --- E2M1 code table (docs/modelopt_behaviour.md §4.4) --------------------------------------------

E2M1_CODE_ROWS = [
    # code, value, note
    (0b0000, 0.0, ""),
    (0b0001, 0.5, ""),
    (0b0010, 1.0, ""),
    (0b0011, 1.5, ""),
    (0b0100, 2.0, ""),
    (0b0101, 3.0, ""),
    (0b0110, 4.0, ""),
    (0b0111, 6.0, "largest magnitude"),
    (0b1000, 0.0, "'negative zero' dequantizes to +0.0"),
    (0b1001, -0.5, ""),
    (0b1010, -1.0, ""),
    (0b1011, -1.5, ""),
    (0b1100, -2.0, ""),
    (0b1101, -3.0, ""),
    (0b1110, -4.0, ""),
    (0b1111, -6.0, ""),
]


@pytest.mark.parametrize("code, value, note", E2M1_CODE_ROWS, ids=[f"code{r[0]}" for r in E2M1_CODE_ROWS])
def test_e2m1_code_table(code, value, note):
    decoded = formats.e2m1_code_table()[code]
    assert decoded.dtype == torch.float32
    assert fp32_bits(decoded.item()) == fp32_bits(value), note  # +0.0 for both zeros, by bits


# --- E2M1 rounding (docs/modelopt_behaviour.md §3.4): magnitude -> code, one row per value ---------

E2M1_ROUNDING_ROWS = [
    # u (magnitude), expected magnitude index (= code), note
    (0.0, 0, ""),
    (0.25, 0, "# tie to even (0)"),
    (0.2500001, 1, "just above the tie"),
    (0.5, 1, "exact"),
    (0.7499999, 1, "just below the tie"),
    (0.75, 2, "# tie to even (2: value 1.0)"),
    (1.0, 2, "exact"),
    (1.25, 2, "# tie to even (2)"),
    (1.2500001, 3, ""),
    (1.75, 4, "# tie to even (4: value 2.0)"),
    (2.5, 4, "# tie to even (4)"),
    (2.5000002, 5, ""),
    (3.0, 5, "exact"),
    (3.5, 6, "# tie to even (6: value 4.0)"),
    (3.4999998, 5, ""),
    (5.0, 6, "# tie to even (6)"),
    (5.0000005, 7, ""),
    (6.0, 7, "exact, largest"),
    (7.0, 7, "saturates"),
    (1e30, 7, "saturates"),
    (float("inf"), 7, "saturates"),
    (float("nan"), 7, "NaN passes every point, as modelopt's ladder does"),
]


@pytest.mark.parametrize("u, index, note", E2M1_ROUNDING_ROWS, ids=[f"{r[0]!r}" for r in E2M1_ROUNDING_ROWS])
def test_e2m1_rounding_row(u, index, note):
    got = int(e2m1_magnitude_index(torch.tensor([u], dtype=torch.float32))[0])
    assert got == index, f"|u| = {u!r}: index {got}, expected {index} {note}"


def test_e2m1_decision_points_are_the_midpoints_of_the_magnitudes():
    magnitudes = formats.E2M1_MAGNITUDES
    midpoints = tuple((a + b) / 2 for a, b in zip(magnitudes, magnitudes[1:]))
    assert formats.E2M1_DECISION_POINTS == midpoints
    # Round half to even on the 3-bit index: a tie goes up exactly when the upper index is even.
    assert formats.E2M1_TIE_ROUNDS_UP == tuple((i + 1) % 2 == 0 for i in range(len(midpoints)))


# --- docs/numerics.md: the worked NVFP4 block ---------------------------------------------------------

WORKED_X = [1.0, -0.3, 2.5, 0.05, -4.2, 3.3, 0.0, -0.02, 5.0, 1.6, -2.2, 0.7, 3.9, -1.1, 0.4, 2.9]
WORKED_GLOBAL_AMAX = 8.0


def _e4m3_fields(byte: int) -> str:
    return f"s={byte >> 7} e={(byte >> 3) & 0xF} m={byte & 0x7}"


def _row(values, fmt) -> str:
    return " ".join(fmt(v) for v in values)


def render_worked_example() -> str:
    """The worked block of docs/numerics.md, computed by refquant (default flavor)."""
    x = torch.tensor(WORKED_X, dtype=torch.float32)
    qtensor = rq.nvfp4_quantize(x, WORKED_GLOBAL_AMAX)
    g = qtensor.global_scale
    block_amax = x.abs().amax()
    ideal = block_amax / (g * formats.E2M1_MAX)
    scale_byte = int(qtensor.block_scale.view(torch.uint8)[0])
    block_scale = qtensor.block_scale.float()[0]
    S = block_scale * g
    codes = qtensor.codes().tolist()
    values = formats.e2m1_code_table()[qtensor.codes().long()]
    dequantized = qtensor.dequantize()
    fake = rq.nvfp4_fake_quant(x, WORKED_GLOBAL_AMAX)
    same = "the same 16 values" if torch.equal(fake, dequantized) else "DIFFERENT values"
    lines = [
        "x (fp32, one block of 16 along the last dim):",
        "  " + _row(WORKED_X, repr),
        f"global amax G                 = {WORKED_GLOBAL_AMAX!r}",
        f"global scale g = G / 2688     = {g.item():.9g} (fp32 0x{fp32_bits(g.item()):08X})",
        f"block amax m = max|x|         = {block_amax.item()!r}",
        f"m / fl(6 * g)                 = {ideal.item():.9g}",
        f"E4M3 block scale e            = {block_scale.item()!r} (byte 0x{scale_byte:02X}: {_e4m3_fields(scale_byte)})",
        f"S = fl(e * g)                 = {S.item():.9g} (fp32 0x{fp32_bits(S.item()):08X})",
        "x / S:",
        "  " + _row((x / S).tolist(), lambda v: f"{v:.4f}"),
        "E2M1 codes (bit 3 = sign):",
        "  " + _row(codes, lambda c: f"{c}"),
        "E2M1 values:",
        "  " + _row(values.tolist(), lambda v: f"{v:g}"),
        "packed bytes (element 2j in the low nibble of byte j):",
        "  " + _row(qtensor.packed.tolist(), lambda b: f"0x{b:02X}"),
        "dequantize() = value * S, rounded to fp32:",
        "  " + _row(dequantized.tolist(), lambda v: f"{v:.9g}"),
        f"nvfp4_fake_quant(x, {WORKED_GLOBAL_AMAX!r}) gives {same} for this block.",
    ]
    return "\n".join(lines)


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


README = DOC.parent.parent / "README.md"


@pytest.mark.parametrize("page", [DOC, README], ids=["docs/numerics.md", "README.md"])
def test_docs_worked_nvfp4_block_is_what_the_code_computes(page):
    assert render_worked_example() in page.read_text(encoding="utf-8"), (
        f"{page.name}'s worked NVFP4 block is stale; run `python tests/test_formats.py` and paste it"
    )


def test_worked_block_exercises_sign_rounding_to_zero_and_saturation_to_six():
    codes = rq.nvfp4_quantize(torch.tensor(WORKED_X), WORKED_GLOBAL_AMAX).codes().tolist()
    assert 8 in codes, "a small negative value that rounds to zero (code 8)"
    assert 7 in codes, "the block max at code 7 (value 6)"


# --- docs/numerics.md: one example per row of the two tables --------------------------------------


def _block(*values: float) -> torch.Tensor:
    x = torch.zeros(16)
    x[: len(values)] = torch.tensor(values)
    return x


def _first(t: torch.Tensor, n: int) -> list[float]:
    return t.flatten()[:n].tolist()


def _bits(t: torch.Tensor) -> list[int]:
    return [fp32_bits(v) for v in t.flatten().tolist()]


def _tiny_block() -> None:
    x = _block(0.001)
    assert _first(rq.nvfp4_fake_quant(x, 2688.0), 1) == [0.0]
    assert _first(rq.nvfp4_quantize(x, 2688.0).dequantize(), 1) == [0.0009765625]


def _tiny_block_large_amax() -> None:
    x = _block(0.4, 0.3, -0.26, 0.1)
    assert _first(rq.nvfp4_fake_quant(x, 2e5), 4) == [0.5, 0.5, -0.5, 0.0]
    real = rq.nvfp4_quantize(x, 2e5)
    assert real.block_scale.float().item() == 2.0**-9
    assert [round(v, 3) for v in _first(real.dequantize(), 4)] == [0.436, 0.291, -0.291, 0.073]


def _zero_block() -> None:
    x = torch.cat([_block(1.0, -2.0), torch.zeros(16)])
    qtensor = rq.nvfp4_quantize(x, 4.0)
    assert int(qtensor.block_scale.view(torch.uint8)[1]) == 0x38
    assert _bits(qtensor.dequantize()[16:]) == [0] * 16 == _bits(rq.nvfp4_fake_quant(x, 4.0)[16:])


def _zero_global_amax() -> None:
    x = _block(0.3, 7.0, -2.2)
    assert _first(rq.nvfp4_fake_quant(x, 0.0), 3) == [0.5, 6.0, -2.0]
    assert [abs(v) for v in _first(rq.nvfp4_quantize(x, 0.0).dequantize(), 3)] == [0.0, 0.0, 0.0]


def _nan_global_amax() -> None:
    x = _block(0.3, float("nan"), -2.2)
    assert _first(rq.nvfp4_fake_quant(x), 3) == [0.5, -6.0, -2.0]
    assert torch.isnan(rq.nvfp4_quantize(x).dequantize()).all()


def _all_zero_tensor() -> None:
    qtensor = rq.nvfp4_quantize(torch.zeros(2, 32))
    assert qtensor.block_scale.float().eq(1.0).all() and _bits(qtensor.dequantize()) == [0] * 64


def _padded_last_dim() -> None:
    qtensor = rq.nvfp4_quantize(torch.arange(1.0, 21.0).reshape(1, 20))
    assert tuple(qtensor.packed.shape) == (1, 16) and tuple(qtensor.dequantize().shape) == (1, 20)


def _negative_zero() -> None:
    x = _block(-0.0, -0.01, 1.0)
    qtensor = rq.nvfp4_quantize(x, 6.0)
    assert qtensor.codes()[:3].tolist() == [0, 8, 7]
    assert _bits(qtensor.dequantize()[:2]) == [0, 0] == _bits(rq.nvfp4_fake_quant(x, 6.0)[:2])


def _nan_element() -> None:
    x = _block(float("nan"), -0.3, 2.0)
    fake = rq.nvfp4_fake_quant(x, 6.0)
    # The block max ignores the NaN (2.0 sets S); the NaN itself comes out as -6 * S.
    assert fake[0].item() == -fake[2].item() == -1.9285715818405151
    assert torch.isnan(rq.nvfp4_quantize(x, 6.0).dequantize()[:16]).all()


def _fp8_fake_scale() -> None:
    x = torch.tensor([3.0])
    assert rq.fp8_fake_quant(x, 3.0).item() == 2.999999761581421
    assert rq.fp8_fake_quant(x, 3.0, flavor="modelopt-cuda").item() == 3.0
    xb = torch.tensor([-2.25], dtype=torch.bfloat16)
    assert rq.fp8_fake_quant(xb, 3.0).item() == -2.359375
    assert rq.fp8_fake_quant(xb, 3.0, flavor="modelopt-cuda").item() == -2.140625


def _fp8_real_scale() -> None:
    amax = torch.tensor(1.7)
    cpu = rq.fp8_quantize(torch.ones(1), amax=amax).scale
    gpu = rq.fp8_quantize(torch.ones(1), amax=amax, flavor="modelopt-cuda").scale
    assert (cpu.item(), gpu.item()) == (0.0037946428637951612, 0.003794643096625805)


def _fp8_real_bf16_given_scale() -> None:
    x = torch.tensor([0.6171875], dtype=torch.bfloat16)
    assert rq.fp8_quantize(x, scale=0.0123).data.float().item() == 52.0
    assert rq.fp8_quantize(x, scale=0.0123, flavor="modelopt-cuda").data.float().item() == 48.0


def _nvfp4_global_scale() -> None:
    x = torch.ones(16)
    cpu = rq.nvfp4_quantize(x, 3.3).global_scale
    gpu = rq.nvfp4_quantize(x, 3.3, flavor="modelopt-cuda").global_scale
    assert (fp32_bits(cpu.item()), fp32_bits(gpu.item())) == (0x3AA0EA0E, 0x3AA0EA0F)


DOC_EXAMPLES = [
    # (substring that the docs' table row must contain, check of that example)
    ("`[0.001, 0, …]`, G = 2688", _tiny_block),
    ("`[0.4, 0.3, -0.26, 0.1, 0, …]`, G = 2e5", _tiny_block_large_amax),
    ("G = 4, second block all zeros", _zero_block),
    ("`[0.3, 7, -2.2, 0, …]`, G = 0", _zero_global_amax),
    ("`[0.3, nan, -2.2, 0, …]`, G computed", _nan_global_amax),
    ("`torch.zeros(2, 32)`, G computed", _all_zero_tensor),
    ("shape (1, 20)", _padded_last_dim),
    ("`[-0.0, -0.01, 1.0, 0, …]`, G = 6", _negative_zero),
    ("`[nan, -0.3, 2.0, 0, …]`, G = 6", _nan_element),
    ("amax = 3.0, x = 3.0", _fp8_fake_scale),
    ("amax = 1.7", _fp8_real_scale),
    ("bf16 x = 0.6171875, scale = 0.0123", _fp8_real_bf16_given_scale),
    ("G = 3.3", _nvfp4_global_scale),
]


@pytest.mark.parametrize("text, check", DOC_EXAMPLES, ids=[c.__name__.strip("_") for _, c in DOC_EXAMPLES])
def test_docs_table_example_holds(text, check):
    assert text in _doc(), f"docs/numerics.md lost the example {text!r}"
    check()


if __name__ == "__main__":
    print(render_worked_example())
