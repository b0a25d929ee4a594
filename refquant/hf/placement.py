"""Which modules get quantizers: modelopt's registry of quantized module types
(`QuantModuleRegistry`), read for the module types refquant meets in transformers models
(docs/modelopt_behaviour.md §12 lists the registry and what refquant does with each entry).

modelopt gives a module of class C quantizers when a registered class R has `issubclass(C, R)` and
`C.forward is R.forward` (modelopt/torch/opt/dynamic.py, `_DMRegistryCls._get_registered_nn_class`):
a subclass that overrides `forward` is left alone. So `nn.Embedding` gets quantizers, and Gemma's
`Gemma3TextScaledWordEmbedding`, whose forward multiplies by `embed_scale`, gets none.

  "linear"       nn.Linear: input, weight and output quantizers (QuantLinear).
  "embedding"    nn.Embedding: weight and output quantizers, an input quantizer that stays off.
  "input"        the norms, activations and poolings modelopt registers with `QuantInputBase`:
                 an input quantizer on the first argument and an output quantizer on the output.
                 A recipe's `*input_quantizer` rule turns on a LayerNorm's (GPT-2, Phi-2, ...).
  "conv1d"       transformers' Conv1D (GPT-2): modelopt transposes its weight in place to
                 [out, in] and turns the module into its quantized nn.Linear (plugins/huggingface.py,
                 `_QuantConv1D.convert`); so does refquant, and from then on it is a QuantLinear.
  "unsupported"  types modelopt quantizes with rules refquant does not implement (convolutions,
                 Falcon's FalconLinear): they get modelopt's quantizer names, and a recipe that
                 leaves one on raises (refquant.hf.insert.UnsupportedQuantizer). An RNN (modelopt's
                 QuantRNN) makes insert_quantizers raise.

Quantizers are named as modelopt names them (QUANTIZER_NAMES); is_weight_quantizer
(refquant.quant.quantizer) tells a weight quantizer by its name.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..quant.quantizer import is_weight_quantizer  # noqa: F401  (placement's names: imported from here too)

LINEAR, EMBEDDING, INPUT, CONV1D, UNSUPPORTED = "linear", "embedding", "input", "conv1d", "unsupported"

# modelopt/torch/quantization/nn/modules/: quant_activations.py, quant_batchnorm.py,
# quant_instancenorm.py, quant_layernorm.py, quant_pooling.py register these with QuantInputBase.
INPUT_QUANTIZED_TYPES: tuple[type, ...] = (
    nn.LeakyReLU,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
# quant_conv.py: weights and inputs quantized with their own forwards (input, weight and output
# quantizers, as a linear's).
UNSUPPORTED_TORCH_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
# quant_rnn.py: per-layer quantizer names of their own; insert_quantizers refuses a model with one.
RNN_TYPES: tuple[type, ...] = (nn.RNN, nn.LSTM, nn.GRU)
# plugins/huggingface.py registers these transformers classes; refquant does not implement them.
UNSUPPORTED_TRANSFORMERS_TYPES = {
    "transformers.models.falcon.modeling_falcon.FalconLinear": "Falcon's FalconLinear (its own forward, quantized by modelopt)",
}
CONV1D_TYPE = "transformers.pytorch_utils.Conv1D"
# quantizer slots per kind, in modelopt's names
QUANTIZER_NAMES = {
    LINEAR: ("input_quantizer", "weight_quantizer", "output_quantizer"),
    EMBEDDING: ("input_quantizer", "weight_quantizer", "output_quantizer"),
    INPUT: ("input_quantizer", "output_quantizer"),
}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _shares_forward(cls: type, registered: type) -> bool:
    return issubclass(cls, registered) and cls.forward is registered.forward


def _registered_transformers_type(cls: type, qualified_names) -> Optional[type]:
    """The class of cls.__mro__ named in `qualified_names` whose forward cls shares, if any."""
    for klass in cls.__mro__:
        if _qualified_name(klass) in qualified_names and cls.forward is klass.forward:
            return klass
    return None


def _unsupported_transformers_type(cls: type) -> Optional[str]:
    klass = _registered_transformers_type(cls, UNSUPPORTED_TRANSFORMERS_TYPES)
    return None if klass is None else UNSUPPORTED_TRANSFORMERS_TYPES[_qualified_name(klass)]


def placement_kind(module: nn.Module) -> Optional[str]:
    """The kind of quantizers modelopt gives `module` ("linear", "embedding", "input", "conv1d",
    "unsupported"), or None: no quantizers (an unregistered type, or a registered type's subclass
    with its own forward). Attention modules are placed by refquant.hf.attention."""
    cls = type(module)
    if _shares_forward(cls, nn.Linear):
        return LINEAR
    if _shares_forward(cls, nn.Embedding):
        return EMBEDDING
    if any(_shares_forward(cls, registered) for registered in INPUT_QUANTIZED_TYPES):
        return INPUT
    if _registered_transformers_type(cls, (CONV1D_TYPE,)) is not None:
        return CONV1D
    if any(_shares_forward(cls, registered) for registered in UNSUPPORTED_TORCH_TYPES):
        return UNSUPPORTED
    if _unsupported_transformers_type(cls) is not None:
        return UNSUPPORTED
    return None


def unsupported_reason(module: nn.Module) -> str:
    """Why refquant cannot quantize `module` as modelopt would, for an error message."""
    cls = type(module)
    description = _unsupported_transformers_type(cls)
    if description is None:
        description = f"{cls.__name__}, which modelopt quantizes with its own forward (quant_conv.py / quant_rnn.py)"
    return description
