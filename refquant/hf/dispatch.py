"""Models that accelerate spreads over devices (`from_pretrained(device_map=...)`, `dispatch_model`,
`cpu_offload`, `disk_offload`): what refquant must know about accelerate's hooks to quantize such a
model exactly as it quantizes the same model on one device.

accelerate's `add_hook_to_module` keeps the module's bound forward as `module._old_forward` and
sets an instance attribute `module.forward` that runs the hook around `_old_forward`. A model
dispatched over several devices has such a hook on every submodule that holds tensors
(`attach_execution_device_hook`): every nn.Linear and attention module. `insert_quantizers` turns
a module into a QuantLinear / Quant*Attention by changing its class; the hook would still call the
old class's bound forward and bypass the quantizers (the weights, calibrated in a pass of their
own, would be the only ones to get an amax). So where the class changes, `_old_forward` is rebound
to the new class's forward (`rebind_forward`); any other instance-level forward is refused before
anything changes (`check_forward_rebindable`).

Offloaded weights (device_map entries "cpu" or "disk" next to a GPU, `cpu_offload`, `disk_offload`)
sit on the meta device and are loaded by the module's own hook around its forward. The weight
calibration pass and the export read weights outside any forward; `loaded_weights(module)` loads
them the same way, and `require_loaded` refuses a meta tensor no hook can load.

No import of accelerate here: a module carries a hook only if accelerate put it there.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from itertools import chain
from types import MethodType
from typing import Iterator, Optional

import torch
from torch import nn

HOOK_ATTRIBUTE = "_hf_hook"  # accelerate's ModelHook on the module
OLD_FORWARD_ATTRIBUTE = "_old_forward"  # the forward accelerate's hook calls


def _bound_function(method: object, module: nn.Module) -> Optional[object]:
    """The function behind `method` if it is a method bound to `module`, else None."""
    if inspect.ismethod(method) and method.__self__ is module:
        return method.__func__
    return None


def check_forward_rebindable(name: str, module: nn.Module) -> None:
    """Raise ValueError if an instance-level forward of `module` would bypass the forward of the
    quantized class it is about to get (or has).

    Accepted: no instance-level forward; accelerate's hook whose `_old_forward` is the module's
    class forward bound to it (insert_quantizers rebinds it); the class forward bound to the
    module (what accelerate's remove_hook_from_module leaves behind).
    """
    own = vars(module)
    class_forward = type(module).forward
    if "forward" not in own and OLD_FORWARD_ATTRIBUTE not in own:
        return
    if OLD_FORWARD_ATTRIBUTE in own and HOOK_ATTRIBUTE in own:
        if _bound_function(own[OLD_FORWARD_ATTRIBUTE], module) is class_forward:
            return
        what = (
            f"accelerate's hook on it calls {own[OLD_FORWARD_ATTRIBUTE]!r}, not "
            f"{type(module).__name__}.forward bound to the module"
        )
    elif "forward" in own and _bound_function(own["forward"], module) is class_forward:
        return
    else:
        what = f"its forward is replaced on the instance by {own.get('forward', own.get(OLD_FORWARD_ATTRIBUTE))!r}"
    raise ValueError(
        f"cannot quantize {name or type(module).__name__} ({type(module).__name__}): {what}, so the "
        "quantized forward refquant gives it would never run. Remove the wrapper before "
        "rq.insert_quantizers / rq.quantize_model (for accelerate: "
        "accelerate.hooks.remove_hook_from_module(model, recurse=True)), or insert the quantizers "
        "first and wrap the forward afterwards. accelerate's own hooks (device_map, dispatch_model, "
        "cpu_offload) are handled."
    )


def rebind_forward(module: nn.Module) -> None:
    """After `module.__class__` changed: make accelerate's hook call the new class's forward, and
    drop a leftover bound forward of the old class. Call check_forward_rebindable first."""
    own = vars(module)
    if OLD_FORWARD_ATTRIBUTE in own and HOOK_ATTRIBUTE in own:
        own[OLD_FORWARD_ATTRIBUTE] = MethodType(type(module).forward, module)
    elif "forward" in own:
        del own["forward"]


def _offloads(module: nn.Module) -> bool:
    """Whether the module's own accelerate hook loads offloaded tensors around its forward."""
    hook = getattr(module, HOOK_ATTRIBUTE, None)
    hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook chains several
    return any(getattr(h, "offload", False) for h in hooks)


@contextmanager
def loaded_weights(module: nn.Module) -> Iterator[None]:
    """Within the block the module's offloaded tensors are loaded on its execution device, as its
    accelerate hook loads them around a forward (pre_forward / post_forward); a no-op for a module
    whose tensors are in memory. Nested use loads once."""
    if not _offloads(module) or not any(t.is_meta for t in _direct_tensors(module)):
        yield
        return
    hook = getattr(module, HOOK_ATTRIBUTE)
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


def _direct_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from (p for p in module._parameters.values() if p is not None)
    yield from (b for b in module._buffers.values() if b is not None)


def require_loaded(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a ValueError naming it when it is still on the meta device."""
    if tensor.is_meta:
        raise ValueError(
            f"{name} is on the meta device and no accelerate hook of its own layer loads it (an "
            "offload with preload_module_classes, or a model created without weights). refquant "
            "reads every weight to calibrate and export it: dispatch without preload_module_classes, "
            "or give the devices enough max_memory that nothing is offloaded."
        )
    return tensor


def has_offloaded_weights(module: nn.Module) -> bool:
    return any(t.is_meta for t in _direct_tensors(module))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else the device of its first
    tensor not on the meta device (parameters, then buffers), else the CPU. For a whole model this
    is where a batch goes (accelerate's hooks move it on from there)."""
    hook = getattr(module, HOOK_ATTRIBUTE, None)
    for h in getattr(hook, "hooks", (hook,)):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for tensor in chain(module.parameters(), module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")
