"""What reproducing the kernel's division costs the CPU reference (its budget: at most 1.3x).

`ieee_form` is nvfp4_fake_quant with IEEE division instead of the kernel's approximate one
(IEEE block-scale division, |x| * rcp(S)), kept here only as the baseline of this measurement. Both run in one process on the same tensor; read the ratio, never gate on it.

    pytest benchmarks/test_bench_division_cost.py -p no:cacheprovider -o addopts="" --benchmark-group-by=param:shape
"""

from __future__ import annotations

import pytest
import torch

import refquant as rq
from refquant.numerics.formats import E2M1_MAX, E4M3_MAX, RCP_2688
from refquant.numerics.nvfp4 import e2m1_round_magnitude, to_blocks


def ieee_form(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    global_scale = amax.float() * RCP_2688
    blocks = to_blocks(x.float())
    magnitude = blocks.abs()
    block_amax = torch.where(torch.isnan(magnitude), 0.0, magnitude).amax(dim=-1, keepdim=True)
    g = torch.where(global_scale > 0, global_scale, torch.full_like(global_scale, 1e-12))
    scale = (block_amax / (g * E2M1_MAX)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float() * g
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    p = e2m1_round_magnitude(magnitude * (torch.ones_like(scale) / scale)) * scale
    return torch.where(blocks >= 0, p, 0.0 - p).to(x.dtype).flatten(-2)


FORMS = {"kernel_division": lambda x, a: rq.nvfp4_fake_quant(x, a), "ieee_form": ieee_form}


@pytest.mark.parametrize("shape", [(256, 4096), (4096, 4096)])
@pytest.mark.parametrize("form", list(FORMS))
def test_nvfp4_fake_quant_cpu_cost(benchmark, form, shape):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    amax = x.abs().amax().float()
    FORMS[form](x, amax)  # the reciprocal table is decoded outside the timed rounds
    benchmark(FORMS[form], x, amax)
