"""The transformers flow, above the quantizer and recipes.

  attention.py   K/V quantizers inside Hugging Face attention modules
  ptq.py         insert quantizers, apply a recipe, calibrate, report
  export/        modelopt's Hugging Face checkpoint: export, load, compress_weights
  models.py      the built-in small model, byte tokenizer and calibration text
"""
