"""The quantizer and its configuration, above the numerics.

  quantizer.py   TensorQuantizer (nn.Module): amax, max calibration, constant amax
  backends.py    which numerics a quantizer calls: refquant.numerics or refquant.compiled
  recipe.py      TOML recipes -> typed dataclasses; which quantizer gets which format
  metrics.py     what a quantizer did to its tensors: SQNR, clipped and zeroed shares (beside it)
"""
