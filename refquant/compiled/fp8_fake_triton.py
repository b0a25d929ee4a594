"""FP8 fake quantization's element step as one Triton kernel (CUDA only), for a bound quantizer
and for refquant.compiled.fp8_fake_quant with a given per-tensor amax.

Why a kernel of our own, when inductor's kernel for the reference's element step already runs at
0.98 of a device copy: host time. A calibrated FP8 quantizer's call is this one kernel, and
through its compiled graph a call costs dynamo's guards, inductor's wrapper and its launcher
chain, about twice the host time of a bound quantizer launching its own kernel (measured on an
H200's host in a 0.6B forward: about 62 us against 30). This kernel is launched that way
(refquant.compiled.triton_launch).

It is refquant.numerics.fp8.fp8_fake_quant step for step. Each program reads the amax from the
device (the quantizer's own buffer, so a write to it in place, `.data` included, is used by the
next launch as by the reference) and forms the scales as fp8_fake_quant_scales does: fp32(amax),
1.0 at or below 2**-24, then 448 * (1 / amax) (modelopt-cpu: two roundings) or 448 / amax
(modelopt-cuda: one), and the inverse 1 / scale, every division div.rn (IEEE) and every product
mul.rn. Then v = fl(fp32(x) * scale), clamped to +-448 (NaN stays NaN: both comparisons are false
for it), rounded to E4M3 (nearest, ties to even: cvt.rn.satfinite), times the inverse scale in
fp32, rounded to x's dtype. A NaN or infinite amax gives what the reference computes from it.
tests/test_fp8_fake_kernel.py holds it to the reference bit for bit on CUDA: every bf16 and fp16
pattern, under every amax regime, both flavors (it is launched for bf16 and fp16 only; fp32
keeps inductor's kernel).

One amax per slice (a stack of expert weights, each under its own quantizer's amax): with
PROGRAMS_PER_SLICE > 0 each slice is that many programs' elements, and a program reads the amax of
its slice, amax_ptr[program // PROGRAMS_PER_SLICE]; the rest is the same step, so each slice gets
what a launch on it alone under its amax gives.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from ..numerics.formats import E4M3_MAX, FP8_AMAX_FLOOR
from .nvfp4_fake_triton import mul_rn  # fl(a * b) as PTX mul.rn.f32, never contracted into an FMA
from .triton_launch import FakeQuantKernel

# Elements a program and warps: 8 bf16 (16 bytes) a thread for each of 4 warps, 4 such rows.
ELEMENTS_PER_PROGRAM = 4096
NUM_WARPS = 4


@triton.jit
def _fp8_fake_kernel(x_ptr, amax_ptr, y_ptr, n, E4M3_MAX_: tl.constexpr, AMAX_FLOOR: tl.constexpr,
                     RECIPROCAL_THEN_MULTIPLY: tl.constexpr, ELEMENTS: tl.constexpr,
                     PROGRAMS_PER_SLICE: tl.constexpr):
    program = tl.program_id(0)
    if PROGRAMS_PER_SLICE:  # one amax per slice: this program's slice's
        amax = tl.load(amax_ptr + program // PROGRAMS_PER_SLICE).to(tl.float32)
    else:
        amax = tl.load(amax_ptr).to(tl.float32)
    amax = tl.where(amax <= AMAX_FLOOR, 1.0, amax)
    if RECIPROCAL_THEN_MULTIPLY:  # modelopt-cpu: Python's `448.0 / tensor` is a reciprocal, then a product
        scale = tl.div_rn(1.0, amax) * E4M3_MAX_
    else:  # modelopt-cuda: one correctly rounded division
        scale = tl.div_rn(E4M3_MAX_, amax)
    inv_scale = tl.div_rn(1.0, scale)
    offsets = program.to(tl.int64) * ELEMENTS + tl.arange(0, ELEMENTS)
    in_range = offsets < n
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0)
    v = mul_rn(x.to(tl.float32), scale)
    v = tl.where(v < -E4M3_MAX_, -E4M3_MAX_, v)
    v = tl.where(v > E4M3_MAX_, E4M3_MAX_, v)
    on_grid = v.to(tl.float8e4nv).to(tl.float32)
    y = mul_rn(on_grid, inv_scale)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=in_range)


def kernel_constants(flavor: str, programs_per_slice: int = 0) -> dict[str, float | int | bool]:
    return {"E4M3_MAX_": E4M3_MAX, "AMAX_FLOOR": FP8_AMAX_FLOOR,
            "RECIPROCAL_THEN_MULTIPLY": flavor == "modelopt-cpu", "ELEMENTS": ELEMENTS_PER_PROGRAM,
            "PROGRAMS_PER_SLICE": programs_per_slice}


@functools.cache
def fake_quant_kernel(flavor: str, programs_per_slice: int = 0) -> FakeQuantKernel:
    """The kernel of one flavor as a bound launch calls it: params (amax,), a count per element;
    with programs_per_slice > 0, amax holds one value per slice of that many programs' elements."""
    return FakeQuantKernel.of(_fp8_fake_kernel, kernel_constants(flavor, programs_per_slice), NUM_WARPS, unit=1,
                              per_program=ELEMENTS_PER_PROGRAM)
