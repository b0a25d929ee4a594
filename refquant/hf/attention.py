"""K/V quantization inside Hugging Face attention, at the point modelopt quantizes
(docs/modelopt_behaviour.md §9).

A transformers attention module (LlamaAttention, MistralAttention, Qwen2Attention, Qwen3Attention,
...) projects q/k/v, applies RoPE, updates the KV cache, and then calls its attention kernel
through transformers' attention interface:

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask, ...)

modelopt (`plugins/huggingface.py`, `_QuantAttention.forward`) swaps that function for the
duration of the module's forward with a wrapper that runs `q_bmm_quantizer(query)`,
`k_bmm_quantizer(key)`, `v_bmm_quantizer(value)` and then calls the original kernel. We do the
same, so the quantizers see the states the kernel reads: after the projections, the reshape to
[batch, kv_heads, seq, head_dim], RoPE (keys) and the cache update, and before GQA repetition.
Which function is swapped follows the model's attention implementation:
  - "eager" (or None): the `eager_attention_forward` of the module's own modeling file;
  - anything else ("sdpa", "flex_attention", ...): the entry ALL_ATTENTION_FUNCTIONS[impl].
The swap is undone in a `finally`, so the model config and transformers' registries are unchanged
outside the forward. A forward that never reached the attention function while a q/k/v quantizer
is on raises instead of silently leaving K and V unquantized.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from types import ModuleType
from typing import Callable, Iterator

from torch import nn

from ..quant.quantizer import TensorQuantizer
from .swap import quant_class, swapped

BMM_QUANTIZER_NAMES = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "p_bmm_quantizer")


def is_attention_module(module: nn.Module) -> bool:
    """modelopt's rule: the class name ends in "Attention" and no child is itself an *Attention
    (a wrapper such as BertAttention holds the real one, which gets the quantizers)."""
    if not type(module).__name__.endswith("Attention"):
        return False
    return not any(type(child).__name__.endswith("Attention") for child in module.children())


class QuantAttentionMixin:
    """Adds q/k/v/p_bmm_quantizer to a transformers attention module and routes its attention
    function through them. Mixed in front of the original class (QuantLlamaAttention is a
    LlamaAttention), so weights, names and isinstance checks stay as they were."""

    _refquant_original_class: type

    def _setup_bmm_quantizers(self, backend: str, flavor: str) -> None:
        for name in BMM_QUANTIZER_NAMES:
            self.add_module(name, TensorQuantizer(backend=backend, flavor=flavor))

    def _bmm_quantizers_active(self) -> bool:
        return any(getattr(self, name).is_enabled for name in BMM_QUANTIZER_NAMES)

    def forward(self, *args, **kwargs):
        if not self._bmm_quantizers_active():
            return super().forward(*args, **kwargs)
        if self.p_bmm_quantizer.is_enabled:
            raise ValueError(
                f"{self.p_bmm_quantizer.name or 'p_bmm_quantizer'} is enabled, but refquant does not quantize "
                "the softmax probabilities (modelopt runs them through a Triton attention kernel). "
                "Disable it in the recipe."
            )
        calls = 0

        def quantized_attention(original: Callable, module, query, key, value, *rest, **kw):
            # query/key/value: [batch, heads, seq, head_dim], post-RoPE and post-cache-update,
            # before GQA repetition (docs/modelopt_behaviour.md §9)
            nonlocal calls
            calls += 1
            query = module.q_bmm_quantizer(query)
            key = module.k_bmm_quantizer(key)
            value = module.v_bmm_quantizer(value)
            return original(module, query, key, value, *rest, **kw)

        with _swapped_attention_function(self, quantized_attention):
            output = super().forward(*args, **kwargs)
        if calls == 0:
            raise ValueError(
                f"{type(self).__name__} ran its forward without calling transformers' attention "
                f"function (attention implementation {_attention_implementation(self)!r}), so its K/V "
                "quantizers were bypassed. Use attn_implementation='eager' or 'sdpa', or disable the "
                "*_bmm_quantizer rules for this model."
            )
        return output


def _attention_implementation(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


def _modeling_module(module: nn.Module) -> ModuleType:
    return inspect.getmodule(getattr(module, "_refquant_original_class", type(module)))


@contextmanager
def _swapped_attention_function(module: nn.Module, wrapper: Callable) -> Iterator[None]:
    """Within the block, the attention function `module` calls is `wrapper(original, ...)`."""
    impl = _attention_implementation(module)
    modeling = _modeling_module(module)
    if impl is None or impl == "eager":
        original = modeling.eager_attention_forward
        with swapped(modeling, "eager_attention_forward", lambda *a, **kw: wrapper(original, *a, **kw)):
            yield
        return
    registry = modeling.ALL_ATTENTION_FUNCTIONS
    original = registry[impl]
    had_local = impl in registry._local_mapping
    registry[impl] = lambda *a, **kw: wrapper(original, *a, **kw)
    try:
        yield
    finally:
        if had_local:
            registry[impl] = original
        else:
            del registry[impl]


def check_attention_hookable(name: str, module: nn.Module) -> None:
    """Raise ValueError unless `module`'s forward calls transformers' attention interface.

    Hookable means: its modeling file defines `eager_attention_forward` and `ALL_ATTENTION_FUNCTIONS`
    and its forward's source refers to them (transformers >= 4.48 models do). Otherwise the K/V
    quantizers could not be placed where modelopt places them.
    """
    cls = type(module)
    modeling = inspect.getmodule(cls)
    missing = [attr for attr in ("eager_attention_forward", "ALL_ATTENTION_FUNCTIONS") if not hasattr(modeling, attr)]
    if missing or not _forward_calls_interface(cls):
        why = (
            f"its module {getattr(modeling, '__name__', '?')} lacks {' and '.join(missing)}"
            if missing
            else "its forward does not call transformers' attention interface "
            "(ALL_ATTENTION_FUNCTIONS / eager_attention_forward)"
        )
        raise ValueError(
            f"cannot place K/V quantizers in {name} ({cls.__module__}.{cls.__name__}): {why}. refquant "
            "quantizes K and V where modelopt does, on the states passed to that interface (refquant's "
            "docs/modelopt_behaviour.md §9). Use a transformers model class that dispatches through the "
            "attention interface (transformers >= 4.48: Llama, Mistral, Qwen2, Qwen3, ...)."
        )


@functools.lru_cache(maxsize=None)
def _forward_calls_interface(cls: type) -> bool:
    """Whether cls.forward's source names transformers' attention interface (read once a class:
    a model has one attention class and many layers)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source or "eager_attention_forward" in source


def quant_attention_class(cls: type) -> type:
    """QuantAttentionMixin + cls, made once per attention class (QuantLlamaAttention, ...)."""
    return quant_class(QuantAttentionMixin, cls, _refquant_original_class=cls)
