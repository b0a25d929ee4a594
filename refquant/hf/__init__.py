"""The transformers flow, above the quantizer and recipes.

  attention.py   K/V quantizers inside Hugging Face attention modules
  ptq.py         insert quantizers, apply a recipe, calibrate, report
  sensitivity.py one decoder block (or layer) quantized at a time: which cost the most
  plots.py       PNGs of a report (matplotlib, optional)
  export/        modelopt's Hugging Face checkpoint: export, load, compress_weights
  models.py      the built-in small model, byte tokenizer and calibration text
"""
