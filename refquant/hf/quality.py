"""What quantization cost on one evaluation batch: the model's logits, next-token perplexity, and
the quantized logits against the original's (a QualityReport). The PTQ report's quality and the
sensitivity runs (refquant.hf.sensitivity) are both measured with these.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import batch_tokens, run_batch
from .report import QualityReport


def eval_logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's logits on `batch` in eval mode (no dropout), as fp32; the mode is restored."""
    was_training = model.training
    with torch.no_grad():
        output = run_batch(model.eval(), batch)
    model.train(was_training)
    logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
    return logits.detach().float()


def perplexity(logits: torch.Tensor, batch: Any) -> Optional[float]:
    """exp(mean next-token cross entropy); positions with attention_mask 0 are left out."""
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.shape[-1] < 2:
        return None
    targets = ids[..., 1:].to(logits.device)
    losses = F.cross_entropy(logits[..., :-1, :].flatten(0, -2), targets.flatten(), reduction="none")
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor):
        keep = mask[..., 1:].to(logits.device).flatten().bool()
        losses = losses[keep]
    return math.exp(float(losses.mean()))


def quality_report(original: torch.Tensor, quantized: torch.Tensor, batch: Any) -> QualityReport:
    """The `quantized` logits against the `original` ones (fp32, as eval_logits gives them) on
    `batch`: max and mean absolute error, top-1 agreement, and both perplexities."""
    error = (quantized - original).abs()
    return QualityReport(
        eval_tokens=batch_tokens(batch),
        max_abs_logit_error=float(error.max()),
        mean_abs_logit_error=float(error.mean()),
        top1_agreement=float((quantized.argmax(-1) == original.argmax(-1)).float().mean()),
        perplexity_original=perplexity(original, batch),
        perplexity_quantized=perplexity(quantized, batch),
    )
