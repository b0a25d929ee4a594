"""refquant_quantizers.json: the exact quantizer state of a checkpoint (runtimes ignore it), which
load_checkpoint reads to rebuild the compressed model."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..._version import __version__
from .configs import MODELOPT_FORMAT_VERSION
from .plan import ExportPlan

STATE_FILE = "refquant_quantizers.json"
STATE_FORMAT = "refquant-quantizers"
STATE_VERSION = 1


def encode_amax(amax: Optional[torch.Tensor]) -> Optional[dict]:
    """An amax as JSON, exactly: dtype, shape and each value as a hex float (float.hex)."""
    if amax is None:
        return None
    values = amax.detach().cpu().double().flatten().tolist()
    return {"dtype": str(amax.dtype).removeprefix("torch."), "shape": list(amax.shape), "values": [v.hex() for v in values]}


def decode_amax(encoded: Optional[dict]) -> Optional[torch.Tensor]:
    if encoded is None:
        return None
    dtype = getattr(torch, encoded["dtype"])
    values = torch.tensor([float.fromhex(v) for v in encoded["values"]], dtype=torch.float64)
    return values.to(dtype).reshape(encoded["shape"])


def _non_persistent_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    persistent = set(model.state_dict())
    return {
        name: str(buffer.dtype).removeprefix("torch.")
        for name, buffer in model.named_buffers()
        if name not in persistent and buffer.is_floating_point()
    }


def restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Cast each non-persistent floating buffer named in `dtypes` (the state document's
    buffer_dtypes: name -> dtype name) back to the dtype it had at export, in place."""
    for name, dtype in dtypes.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        buffer = owner._buffers.get(attr)
        if buffer is not None and str(buffer.dtype).removeprefix("torch.") != dtype:
            owner._buffers[attr] = buffer.to(getattr(torch, dtype))


def state_document(model: nn.Module, plan: ExportPlan) -> dict:
    """What load_checkpoint needs to rebuild the compressed model: every quantizer's config and
    amax (after fusion, i.e. as compress_weights leaves it) and each layer's format."""
    quantizers = {}
    for name, quantizer in plan.quantizers.items():
        amax = quantizer.amax if quantizer.is_calibrated else None
        layer, _, attr = name.rpartition(".")
        linear = plan.linears.get(layer)
        if linear is not None and quantizer.is_calibrated:
            if attr == "weight_quantizer":
                amax = linear.weight_amax
            elif attr == "input_quantizer" and linear.input_amax is not None:
                amax = linear.input_amax
        quantizers[name] = {"config": quantizer.config.to_dict(), "amax": encode_amax(amax)}
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "writer": f"refquant {__version__}",
        "modelopt_format": MODELOPT_FORMAT_VERSION,
        "backend": plan.backend,
        "flavor": plan.flavor,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "layers": {name: linear.layer_format for name, linear in plan.linears.items()},
        # Non-persistent buffers (RoPE's inv_freq) are in no checkpoint; a model cast with
        # .to(bfloat16) holds them in bf16, one built with dtype= in fp32. Keep the exported one's.
        "buffer_dtypes": _non_persistent_buffer_dtypes(model),
        "fused_groups": plan.fused_groups,
        "quantizers": quantizers,
    }
