"""What quantization did to the tensors a quantizer saw: SQNR, relative error, clipped and zeroed
shares, and NVFP4's block-scale guards. Measured beside the quantizer, never inside it.

    with collect_quantizer_errors(model) as meter:   # forward hooks on the enabled quantizers
        model(**eval_batch)
    errors = meter.results()                         # {quantizer name: QuantizerError}

The hooks read each call's input x and output q(x); they change no output bit. Per call the sums
stay on x's device (no host sync); `results()` reads them once. Outside the `with` block no hook
is installed, so calibration and normal use pay nothing. Definitions, over every element a
quantizer saw while collecting (docs/ptq.md "Error metrics"); NaN and +-inf inputs are counted in
`nonfinite` and left out of everything else:

  sqnr_db        10 log10(sum x^2 / sum (x - q(x))^2); +inf when nothing changed, None when x is all 0
  rel_error      ||x - q(x)|| / ||x|| (2-norms over all the elements); None when x is all 0
  clipped        share of elements the format's maximum, not rounding, decided: |x| more than half
                 a grid step above the largest output at its scale (FP8: |x| > fl(464 * inv_scale)
                 for its tensor or channel, about 1.036 amax; NVFP4: |x| > fl(7 * S) for its block,
                 S the block scale). An NVFP4 block max just above 6 * S (its E4M3 scale rounded
                 down, about half the blocks) is rounding and does not count.
  zeroed         share of the nonzero elements that quantized to (+-)0
  NVFP4, over the blocks of 16 that hold a nonzero value:
  block_scale_fallback   blocks whose scale fl(e * g) fell below 1e-5 and was replaced by 1.0
  block_scale_saturated  blocks whose ideal E4M3 scale t = max|block| / (6 g) exceeded 464, so
                         the clamp to 448 (not the E4M3 rounding) decided the scale; such a block's
                         max is clipped (the data exceeds the global amax by more than 3.6%)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from dataclasses_json import DataClassJsonMixin
from torch import nn

from ..numerics.checks import as_amax_tensor, max_abs, reduce_amax
from ..numerics.fp8 import fp8_fake_quant_scales
from ..numerics.formats import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK_SIZE
from ..numerics.nvfp4 import global_scale_from_amax, nan_ignoring_block_max, nvfp4_fake_block_scale_detail, to_blocks
from .quantizer import QuantizerConfig, TensorQuantizer, named_quantizers

# The sums one call adds, in this order (float64 on x's device; counts are exact up to 2**53).
SUMS = ("finite", "signal", "noise", "clipped", "nonzero", "zeroed", "blocks", "fallback_blocks", "saturated_blocks")


@dataclass
class QuantizerError(DataClassJsonMixin):
    """What one quantizer did to the tensors it saw (module docstring: the exact definitions).
    Shares are fractions in [0, 1]; the block fields are None for FP8."""

    calls: int
    elements: int
    nonfinite: int
    sqnr_db: Optional[float]
    rel_error: Optional[float]
    clipped: float
    zeroed: float
    blocks: Optional[int] = None
    block_scale_fallback: Optional[float] = None
    block_scale_saturated: Optional[float] = None


# Where saturation, not rounding, decides a value: the largest magnitude plus half the step below
# it, i.e. where a grid that went on past the maximum would round to its next value.
FP8_CLIP_POINT = E4M3_MAX + 16.0  # 464: E4M3 steps by 32 between 256 and 448
E2M1_CLIP_POINT = E2M1_MAX + 1.0  # 7: E2M1 steps by 2 from 4 to 6


def clip_limit(x: torch.Tensor, config: QuantizerConfig, amax: Optional[torch.Tensor | float], flavor: str):
    """The magnitude above which an element of x counts as clipped, fp32 and broadcastable to x,
    and for NVFP4 its blocks: (limit, None) or (limit, (block max |x|, FakeBlockScale)).

    FP8: fl(464 * inv_scale), per tensor or channel, with the amax the quantizer uses (its own, or
    max|x| per `axis` when it has none). NVFP4: fl(7 * S) for each element's block, S by the
    reference's own nvfp4_fake_block_scale steps.
    """
    if amax is not None:
        amax = as_amax_tensor(amax, x)  # as the numerics take it: a number is filled on x's device
    if config.format == "fp8":
        if amax is None:
            amax = reduce_amax(x, config.axis)
        _, inv_scale = fp8_fake_quant_scales(amax, flavor)
        if amax.numel() == 1:
            inv_scale = inv_scale.reshape(())
        return FP8_CLIP_POINT * inv_scale, None
    # NVFP4: the global amax as TensorQuantizer.forward and nvfp4_fake_quant pick it
    global_amax = max_abs(x).float() if amax is None else amax.amax().float()
    global_scale = global_scale_from_amax(global_amax, "modelopt-cuda")
    block_max = nan_ignoring_block_max(to_blocks(x.float()).abs())
    detail = nvfp4_fake_block_scale_detail(block_max, global_scale)
    per_block = E2M1_CLIP_POINT * detail.scale
    limit = per_block.expand(*per_block.shape[:-1], NVFP4_BLOCK_SIZE).flatten(-2)[..., : x.shape[-1]]
    return limit, (block_max, detail)


def error_sums(x: torch.Tensor, y: torch.Tensor, config: QuantizerConfig, amax: Optional[torch.Tensor | float],
               flavor: str = "modelopt-cpu") -> torch.Tensor:
    """One call's sums (SUMS order), float64 on x's device, from x, its fake quant y = q(x), and the
    quantizer's config, amax (None: taken from x) and flavor. No host sync."""
    x, y = x.detach(), y.detach()
    limit, blocks = clip_limit(x, config, amax, flavor)
    finite = torch.isfinite(x)
    x64 = torch.where(finite, x.double(), 0.0)
    noise = torch.where(finite, x64 - y.double(), 0.0)
    nonzero = x64 != 0
    sums = [
        finite.sum(), (x64 * x64).sum(), (noise * noise).sum(),
        (x64.abs() > limit).sum(),  # a non-finite x is 0 here, never above the limit
        nonzero.sum(), (nonzero & (y == 0)).sum(),
    ]
    if blocks is None:
        sums += [torch.zeros((), device=x.device)] * 3
    else:
        block_max, detail = blocks
        holds_data = block_max > 0  # an all-NaN block's max is NaN: not counted
        sums += [holds_data.sum(), (holds_data & detail.fell_back).sum(), (holds_data & (detail.ideal > FP8_CLIP_POINT)).sum()]
    return torch.stack([s.to(torch.float64) for s in sums])


def summarize(sums: torch.Tensor | list[float], calls: int, elements: int, nvfp4: bool) -> QuantizerError:
    """QuantizerError from accumulated SUMS (a tensor is read to the host here, once)."""
    values = dict(zip(SUMS, sums.tolist() if isinstance(sums, torch.Tensor) else sums))
    signal, noise = values["signal"], values["noise"]
    if signal > 0:
        sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if math.isfinite(noise) else -math.inf
        rel_error = math.sqrt(noise / signal)
    else:
        sqnr = rel_error = None
    finite, nonzero, blocks = values["finite"], values["nonzero"], values["blocks"]
    return QuantizerError(
        calls=calls,
        elements=elements,
        nonfinite=elements - int(finite),
        sqnr_db=sqnr,
        rel_error=rel_error,
        clipped=values["clipped"] / finite if finite else 0.0,
        zeroed=values["zeroed"] / nonzero if nonzero else 0.0,
        blocks=int(blocks) if nvfp4 else None,
        block_scale_fallback=(values["fallback_blocks"] / blocks if blocks else 0.0) if nvfp4 else None,
        block_scale_saturated=(values["saturated_blocks"] / blocks if blocks else 0.0) if nvfp4 else None,
    )


class ErrorMeter:
    """Accumulates error_sums per quantizer; filled by the hooks of collect_quantizer_errors."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._elements: dict[str, int] = {}
        self._nvfp4: dict[str, bool] = {}

    def add(self, name: str, x: torch.Tensor, y: torch.Tensor, quantizer: TensorQuantizer) -> None:
        sums = error_sums(x, y, quantizer.config, quantizer.amax_for(x), quantizer.flavor)
        previous = self._sums.get(name)
        self._sums[name] = sums if previous is None else previous + sums.to(previous.device)
        self._calls[name] = self._calls.get(name, 0) + 1
        self._elements[name] = self._elements.get(name, 0) + x.numel()
        self._nvfp4[name] = quantizer.config.format == "nvfp4"

    def results(self) -> dict[str, QuantizerError]:
        """{name: QuantizerError} for every quantizer that quantized something; one host read."""
        if not self._sums:
            return {}
        names = list(self._sums)
        device = self._sums[names[0]].device
        table = torch.stack([self._sums[n].to(device) for n in names]).cpu().tolist()
        return {n: summarize(row, self._calls[n], self._elements[n], self._nvfp4[n]) for n, row in zip(names, table)}


@contextmanager
def collect_quantizer_errors(model: nn.Module) -> Iterator[ErrorMeter]:
    """Within the block, every call of an enabled, quantizing quantizer of `model` adds its error
    sums to the meter it yields; the hooks are removed on exit."""
    meter = ErrorMeter()

    def hook(quantizer: TensorQuantizer, args, output, name: str) -> None:
        x = args[0] if args else None
        # a quantizer that is off, calibrating or passing data through returns x itself
        if isinstance(x, torch.Tensor) and output is not x and quantizer.is_enabled and not quantizer.is_calibrating:
            with torch.no_grad():
                meter.add(name, x, output, quantizer)

    handles = [
        quantizer.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
        for name, quantizer in named_quantizers(model)
    ]
    try:
        yield meter
    finally:
        for handle in handles:
            handle.remove()
