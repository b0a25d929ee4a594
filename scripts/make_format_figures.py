"""Draw the figures of docs/numerics.md from refquant's own functions, so they cannot drift from them.

    python3 scripts/make_format_figures.py              # writes docs/figures/fp8_e4m3_grid.png, nvfp4_block_grid.png
    python3 scripts/make_format_figures.py --out DIR    # somewhere else

Every value drawn is an output of rq.fp8_fake_quant or rq.nvfp4_fake_quant on fp32 inputs; the
grid points and scales in the titles are read back from the same calls. Needs matplotlib
(pip install matplotlib, or the `plot` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import refquant as rq  # noqa: E402
from refquant.hf.plots import DPI, require_matplotlib, save_png  # noqa: E402
from refquant.numerics.formats import E2M1_MAGNITUDES, E4M3_DTYPE, E4M3_MAX  # noqa: E402
from refquant.numerics.nvfp4 import global_scale_from_amax, nvfp4_fake_block_scale, to_blocks  # noqa: E402


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def e4m3_positive_values() -> torch.Tensor:
    """Every finite positive E4M3 value, read from the 8-bit patterns (0x01 .. 0x7E)."""
    return torch.arange(1, 0x7F, dtype=torch.uint8).view(E4M3_DTYPE).float()


def fp8_figure(path: Path) -> Path:
    """FP8 E4M3 fake quant with amax 448 (scale exactly 1): the grid near 1, the grid at the top
    with saturation, and the relative error over the whole range."""
    fig = _figure(9, 7.2)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.15])
    near_one, top, error = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    values = e4m3_positive_values()

    for ax, (low, high), steps in (
        (near_one, (0.4, 2.6), "steps of 1/32 in [0.25, 0.5), 1/16 in [0.5, 1), 1/8 in [1, 2), 1/4 in [2, 4)"),
        (top, (200.0, 520.0), "steps of 16 below 256, 32 up to 448; beyond, 448 (saturation)"),
    ):
        x = torch.linspace(low, high, 8001)
        ax.plot(x, rq.fp8_fake_quant(x, E4M3_MAX), color="C0", linewidth=1.4, label="fp8_fake_quant(x, 448)")
        ax.plot([low, high], [low, high], color="gray", linestyle=":", linewidth=1, label="y = x")
        shown = values[(values >= low) & (values <= high)]
        ax.plot(shown, shown, "o", color="C1", markersize=3, label="E4M3 values")
        ax.set_title(steps, fontsize=8, loc="left", wrap=True)
        ax.set_xlabel("input x")
        ax.set_ylabel("fake-quantized value")
        ax.grid(True, alpha=0.3)
    top.axvline(464, color="C3", linestyle="--", linewidth=1)
    top.text(210, 470, "dashed, 464 = 448 + half a step:\nbeyond it the value is clipped", fontsize=8, color="C3")
    near_one.legend(fontsize=8, loc="upper left")

    x = torch.logspace(-12, 10, 40001, base=2.0)
    relative = ((rq.fp8_fake_quant(x, E4M3_MAX) - x).abs() / x).clamp_min(1e-6)
    error.plot(x, 100 * relative, color="C0", linewidth=0.6)
    error.set_xscale("log", base=2)
    error.set_yscale("log")
    error.set_ylim(1e-2, 200)
    error.axhline(100 / 17, color="C1", linestyle="--", linewidth=1)
    error.axvspan(2.0**-12, 2.0**-6, color="C2", alpha=0.12)
    error.axvspan(E4M3_MAX, 2.0**10, color="C3", alpha=0.12)
    error.text(2.0**-11.9, 0.02, "subnormals (below 2^-6):\none fixed step of 2^-9;\nbelow 2^-10 flushed to 0", fontsize=8, color="C2")
    error.text(2.0**-5.5, 7.2, "1/17 = 5.9%: the most rounding costs a normal value (at (1 + 1/16) · 2^k)",
               fontsize=8, color="C1")
    error.text(2.0**8.65, 0.05, "saturated\nat 448", fontsize=8, color="C3")
    error.set_xlabel("input x (log scale, base 2)")
    error.set_ylabel("|q(x) - x| / x  (%)")
    error.set_title("relative error over the whole range (dips to 0 at the grid points are cut at 0.01%)", fontsize=8, loc="left")
    error.grid(True, alpha=0.3, which="both")
    from matplotlib.ticker import FuncFormatter

    error.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    fig.suptitle("FP8 E4M3 fake quant, amax = 448 (scale 448 / amax = 1): the grid and the error\n"
                 "1 sign, 4 exponent, 3 mantissa bits; 126 positive values from 2^-9 to 448; no infinity", fontsize=11)
    return save_png(fig, path)


def nvfp4_figure(path: Path) -> Path:
    """One NVFP4 block of 16 under a global amax G = 8 whose largest element is 5 (the worked block
    of docs/numerics.md): element 1 swept over [-5, 5], the rest 0."""
    global_amax, block_max = 8.0, 5.0
    x = torch.linspace(-block_max, block_max, 4001)
    blocks = torch.zeros(x.numel(), 16)
    blocks[:, 0] = block_max  # holds the block max, so the block scale stays put
    blocks[:, 1] = x
    y = rq.nvfp4_fake_quant(blocks, global_amax)[:, 1]
    global_scale = global_scale_from_amax(torch.tensor(global_amax), "modelopt-cuda")
    scale = float(nvfp4_fake_block_scale(to_blocks(blocks[:1]).abs().amax(-1, keepdim=True), global_scale))
    e4m3 = scale / float(global_scale)

    fig = _figure(9, 7.2)
    grid_ax, error_ax = fig.subplots(2, 1, sharex=True)
    levels = sorted({sign * m * scale for m in E2M1_MAGNITUDES for sign in (1, -1)})
    for level in levels:
        grid_ax.axhline(level, color="C1", linewidth=0.5, alpha=0.6)
    grid_ax.plot(x, y, color="C0", linewidth=1.4, label="nvfp4_fake_quant: element 1 of the block")
    grid_ax.plot(x, x, color="gray", linestyle=":", linewidth=1, label="y = x")
    grid_ax.plot([], [], color="C1", linewidth=0.5, label="the block's grid: E2M1 value x S")
    grid_ax.set_yticks(levels, [f"{m:g}S" if m else "0" for m in [v / scale for v in levels]], fontsize=7)
    grid_ax.set_ylabel("fake-quantized value (S = %.4f)" % scale)
    grid_ax.legend(fontsize=8, loc="upper left")
    grid_ax.grid(True, axis="x", alpha=0.3)
    grid_ax.set_title("E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 times S: steps of S/2 up to 2S, S up to 4S, 2S up to 6S; "
                      "ties to the even code", fontsize=8, loc="left")

    error_ax.plot(x, y - x, color="C0", linewidth=1)
    for bound, (low, high) in ((scale / 4, (0, 2 * scale)), (scale / 2, (2 * scale, 4 * scale)), (scale, (4 * scale, block_max))):
        for sign in (1, -1):
            error_ax.plot([sign * low, sign * high], [bound, bound], color="C3", linestyle="--", linewidth=0.8)
            error_ax.plot([sign * low, sign * high], [-bound, -bound], color="C3", linestyle="--", linewidth=0.8)
    error_ax.plot([], [], color="C3", linestyle="--", linewidth=0.8, label="± half a step: S/4, S/2, S")
    error_ax.set_xlabel("input x (element 1; element 0 = 5 holds the block max, the other 14 are 0)")
    error_ax.set_ylabel("q(x) - x")
    error_ax.legend(fontsize=8, loc="upper left")
    error_ax.grid(True, alpha=0.3)
    error_ax.set_title("error: the absolute error grows with |x| in three steps; "
                       "the block max 5 itself becomes 6S = %.4f" % (6 * scale), fontsize=8, loc="left")
    fig.suptitle(
        f"NVFP4 fake quant of one block of 16: global amax G = {global_amax:g}, block max {block_max:g}\n"
        f"E4M3 block scale e = E4M3({block_max:g} / (6 G / 2688)) = {e4m3:.0f}, S = e G / 2688 = {scale:.6g}", fontsize=11)
    return save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "figures"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    require_matplotlib()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (fp8_figure(out / "fp8_e4m3_grid.png"), nvfp4_figure(out / "nvfp4_block_grid.png")):
        print(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
