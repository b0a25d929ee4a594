"""How refquant puts its quantized forwards into a model without copying it: a module's class is
changed for its quantized class (quant_class: the quantizing mixin in front of the original class,
so weights, names and isinstance checks stay as they were), and a function the original forward
calls is replaced for the duration of one forward (swapped)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

_QUANT_CLASSES: dict[tuple[type, type], type] = {}


def quant_class(mixin: type, cls: type, **attributes: Any) -> type:
    """The class `Quant<cls>` with bases (mixin, cls) and `attributes` as class attributes (those
    of the first call), made once per (mixin, cls); it belongs to the mixin's module."""
    key = (mixin, cls)
    if key not in _QUANT_CLASSES:
        namespace = {"__module__": mixin.__module__, **attributes}
        _QUANT_CLASSES[key] = type(f"Quant{cls.__name__}", (mixin, cls), namespace)
    return _QUANT_CLASSES[key]


@contextmanager
def swapped(owner: object, attribute: str, replacement: Callable) -> Iterator[None]:
    """Within the block `owner.<attribute>` is `replacement`; the original is put back on exit,
    whether the block raised or not."""
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)
