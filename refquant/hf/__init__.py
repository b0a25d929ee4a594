"""The transformers flow, above the quantizer and recipes.

  ptq.py          quantize_model: insert quantizers, apply a recipe, calibrate, report
  placement.py    which modules get quantizers (modelopt's registry of quantized module types)
  insert.py       insert_quantizers and the quantized linear, embedding and norm modules
  attention.py    K/V quantizers inside Hugging Face attention modules
  experts.py      quantizers in fused MoE experts
  dispatch.py     models spread by accelerate: its hooks call the quantized forwards
  calibrate.py    max calibration, and how a batch goes into the model
  quality.py      logits, perplexity, quantized against original on an evaluation batch
  coverage.py     how much of the weights a run quantized
  report.py       the report's types (PTQReport, QuantizerRow, ...), JSON in and out
  report_table.py the report as text
  sensitivity.py  one decoder block (or layer) quantized at a time: which cost the most
  plots.py        PNGs of a report (matplotlib, optional)
  export/         modelopt's Hugging Face checkpoint: export, load, compress_weights
  models.py       the built-in small model, byte tokenizer and calibration text
"""
