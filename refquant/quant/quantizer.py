"""The quantizer module: holds an amax, calibrates it, and calls the numerics. No math of its own.

Semantics are modelopt's TensorQuantizer (docs/modelopt_behaviour.md §1.2, §5, §6): an amax comes
from (1) use_constant_amax -> 448.0, (2) a calibrated `_amax` buffer, (3) otherwise the data of each
call. Max calibration records max|x| (per tensor, or per channel with `axis`) with quantization
switched off; a quantizer whose calibrator saw nothing keeps no amax.
"""

from __future__ import annotations

import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Literal, Optional, Union

import torch
from dataclasses_json import DataClassJsonMixin
from torch import nn

from ..numerics.checks import (FLAVORS, Flavor, all_finite, bad_amax_values, is_valid_amax_value, max_abs_one_kernel,
                               reduce_amax, vouch_checked)
from .backends import BACKENDS, numerics
from ..numerics.formats import E4M3_MAX

Format = Literal["fp8", "nvfp4", "disabled"]
FORMATS = ("fp8", "nvfp4", "disabled")
Axis = Union[int, list[int], None]


@dataclass(frozen=True)
class QuantizerConfig(DataClassJsonMixin):
    """What one quantizer does; modelopt's QuantizerAttributeConfig, reduced to FP8 and NVFP4.

    format:            "fp8" (E4M3, num_bits (4,3)), "nvfp4" (E2M1 in dynamic blocks of 16 with
                       E4M3 block scales), or "disabled" (no format: what a quantizer is before
                       any recipe rule gives it one).
    enable:            on or off; an off quantizer returns its input unchanged.
    axis:              per-channel FP8: the dim(s) that keep their own amax (None: per-tensor).
                       NVFP4 has one global amax; its per-block scales come from the data.
    use_constant_amax: amax is the constant 448.0 (the E4M3 max), never calibrated or stored
                       (the KV-cache "cast" modes).
    """

    format: Format = "disabled"
    enable: bool = True
    axis: Axis = None
    use_constant_amax: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not known; use one of {', '.join(FORMATS)}.")
        for flag in ("enable", "use_constant_amax"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False.")
        if not _is_axis(self.axis):
            raise ValueError(
                f"axis={self.axis!r} must be None (per-tensor), an int, or a list of ints (the dims "
                "that keep their own amax, as modelopt's `axis`)."
            )
        if self.format == "nvfp4" and self.axis is not None:
            raise ValueError(
                "NVFP4 takes no per-channel axis: it has one global amax and per-block scales along "
                "the last dim. Remove `axis`, or use format 'fp8' for per-channel scales."
            )
        if self.use_constant_amax and self.axis is not None:
            raise ValueError("use_constant_amax pins one amax of 448 for the whole tensor; remove `axis`.")
        if self.use_constant_amax and self.format == "disabled":
            raise ValueError("use_constant_amax needs a format to quantize to: set format to 'fp8' or 'nvfp4'.")
        if self.enable and self.format == "disabled":
            raise ValueError("an enabled quantizer needs a format: set format to 'fp8' or 'nvfp4', or enable = false.")


def _is_axis(axis: object) -> bool:
    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    return axis is None or is_int(axis) or (isinstance(axis, (list, tuple)) and all(map(is_int, axis)))


def memory_key(x: torch.Tensor) -> tuple:
    """Where x's values lie and whether they changed since: storage, offset, shape, strides,
    dtype, device and the version counter it shares with its base."""
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)


def slice_memory_keys(weight: torch.Tensor, indices: Iterable[int]) -> dict[int, tuple]:
    """{i: memory_key(weight[i])} for each i, without making the views."""
    key_of = _slice_key_maker(weight)
    return {i: key_of(i) for i in indices}


def _slice_key_maker(weight: torch.Tensor):
    """i -> memory_key(weight[i]), without making the view."""
    storage, offset, step = weight.untyped_storage().data_ptr(), weight.storage_offset(), weight.stride(0)
    shape, strides = tuple(weight.shape[1:]), weight.stride()[1:]
    dtype, device, version = weight.dtype, weight.device, weight._version
    return lambda i: (storage, offset + i * step, shape, strides, dtype, device, version)


_FOLD_EVERY = 64  # calls whose maxima a calibrator keeps before it folds them into one


class _MaxCalibrator:
    """modelopt's MaxCalibrator: running max of max|x| (keep-dims per channel), in x's dtype.

    Per tensor, a call costs one reduction kernel: each call's max|x| is kept, and they are
    folded into one max when the amax is read (a max does not depend on the order; torch.amax and
    torch.maximum propagate NaN alike), not by a launch a call."""

    def __init__(self, axis: Axis = None):
        self.axis = axis
        self._amax: Optional[torch.Tensor] = None
        self._unfolded: list[torch.Tensor] = []  # per-tensor maxima of calls since the last fold
        self.last: Optional[tuple] = None  # memory_key of the weight collected last (None: not a weight)

    @property
    def amax(self) -> Optional[torch.Tensor]:
        if self._unfolded:
            values = self.kept_maxima()
            self._amax = values[0] if len(values) == 1 else torch.stack(values).amax()
            self._unfolded = []
        return self._amax

    @amax.setter
    def amax(self, value: Optional[torch.Tensor]) -> None:
        self._amax, self._unfolded = value, []

    def state(self) -> tuple:
        """What a collect changes, to put back with restore() (its tensors are never written in
        place: a collect keeps a new max or replaces the amax)."""
        return self._amax, tuple(self._unfolded), self.last

    def restore(self, state: tuple) -> None:
        self._amax, unfolded, self.last = state
        self._unfolded = list(unfolded)

    def kept_maxima(self) -> list[torch.Tensor]:
        """What the amax property folds: the kept maxima and the amax folded before them."""
        return self._unfolded + ([self._amax] if self._unfolded and self._amax is not None else [])

    def keep_max(self, value: torch.Tensor) -> None:
        """Take one call's per-tensor max|x| (0-d, x's dtype) into the running max."""
        self._unfolded.append(value)
        if len(self._unfolded) >= _FOLD_EVERY:
            self.amax  # noqa: B018 - folds: the kept maxima stay few over a long calibration

    def collect(self, x: torch.Tensor, name: str, shared: Optional["SharedInputResult"] = None) -> None:
        """Take x's max|x| into the running max. The weight collected last, unchanged since, is
        skipped (the max of the same values again: every calibration batch passes each weight);
        `shared` gives the max of an activation another quantizer collected already. "Unchanged"
        is by version counter: a write through `.data` between two batches moves none and would go
        unseen (nothing in refquant writes a weight while it calibrates)."""
        if _parameter_data(x) and not x.is_inference():  # an inference tensor has no version counter
            key = memory_key(x)
            if key == self.last:
                return
            self.last = key
        else:
            self.last = None
        if self.axis is None:
            self.keep_max(max_abs_one_kernel(x.detach()) if shared is None else shared.max_abs(x))
            return
        local = reduce_amax(x.detach(), self.axis)
        if self.amax is not None and self.amax.shape != local.shape:
            raise ValueError(
                f"calibration of {name or 'a quantizer'}: per-channel amax shape changed from "
                f"{tuple(self.amax.shape)} to {tuple(local.shape)} between batches."
            )
        # torch.maximum propagates NaN and keeps inf, so check_finite sees any bad batch at the end;
        # checking here would read the device back on every call (a sync per quantizer per batch).
        self.amax = local if self.amax is None else torch.maximum(self.amax, local)

    def check_finite(self, name: str) -> None:
        """modelopt's MaxCalibrator asserts this too: an amax from NaN or inf data is meaningless."""
        if self.amax is None or bool(torch.isfinite(self.amax).all()):
            return
        bad = "NaN" if bool(torch.isnan(self.amax).any()) else "inf"
        raise ValueError(
            f"calibration of {name or 'a quantizer'} saw {bad} in the data of a calibration batch (amax "
            f"shape {tuple(self.amax.shape)}, {self.amax.dtype}); max calibration cannot take an amax from "
            "it. Find where the model produces it (e.g. an overflow in fp16), or drop that calibration batch."
        )


# _amax_value_now's answer where a call is neither bound nor shared (a per-channel amax, or one
# that cannot be read now); never equal to a bound call's value.
_NOT_SHARED = object()


@dataclass(frozen=True)
class _DeviceAmax:
    """_amax_value_now's answer for a one-element amax on a GPU: the value read when the buffer
    last changed version. Bound calls stay valid under it (they read the buffer at every call);
    SharedInputResult never shares under it (a write through `.data` would go unseen there)."""

    dtype: torch.dtype
    value: float


def _records_gradient(x: torch.Tensor) -> bool:
    """Whether a call on x records a gradient (autograd then needs the numerics' own path)."""
    return x.requires_grad and torch.is_grad_enabled()


def _is_parameter(x: torch.Tensor) -> bool:
    """isinstance(x, nn.Parameter), answered without Parameter's Python __instancecheck__ for the
    plain tensors a forward's activations are (host time on every quantizer call)."""
    return type(x) is not torch.Tensor and isinstance(x, nn.Parameter)


def _parameter_data(x: torch.Tensor) -> bool:
    """A parameter, or a view of one (an expert's slice of a 3-D weight), by _is_parameter."""
    return _is_parameter(x) or (x._base is not None and _is_parameter(x._base))


class SharedInputResult:
    """The last fake-quant result among a model's quantizers, for the next one given the same tensor.

    In a transformer block one tensor feeds several quantizers: q_proj, k_proj and v_proj's input
    quantizers all get the normed hidden states, gate_proj and up_proj's the same tensor again.
    Max calibration gives them the same amax (they saw the same data), so their outputs are equal,
    bit for bit. The first computes; the others get its result (one kernel and one call instead of
    three). In calibration they share max|x| the same way (SharedInputResult.max_abs). A hit
    needs the very same tensor object, unchanged since (`_version`), with the same
    settings (config, flavor, backend, the amax's value), and the result unchanged too. It holds
    the input by a weak reference: when the input is freed the entry goes, so nothing outlives
    the forward; and the next quantizer's call on another activation, sharing or not, ends it, so
    a result lives no longer than that call (an input the KV cache keeps does not keep its
    result). Weights (nn.Parameter) are not entered: each has one quantizer, and a weight would
    push out the activation the next layer's quantizer could reuse.
    """

    def __init__(self) -> None:
        self._entry: Optional[tuple] = None
        self._max_entry: Optional[tuple] = None

    def max_abs(self, x: torch.Tensor) -> torch.Tensor:
        """max|x| for calibration: computed for the first collecting quantizer given x, the same
        tensor for the next ones while x is the same object, unchanged (a max does not depend on
        who asks). Weights are not entered, as for results."""
        if x.is_inference():  # no version counter to tell whether it changed: not shared
            return max_abs_one_kernel(x)
        entry = self._max_entry
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            return entry[2]
        result = max_abs_one_kernel(x.detach())
        if not _is_parameter(x):
            self._max_entry = (weakref.ref(x, self._forget), x._version, result)
        return result

    def get(self, x: torch.Tensor, settings: tuple) -> Optional[torch.Tensor]:
        entry = self._entry
        if entry is None or x.is_inference():
            return None
        source, version, entry_settings, result, result_version = entry
        if source() is x and x._version == version and result._version == result_version and entry_settings == settings:
            return result
        return None

    def put(self, x: torch.Tensor, settings: tuple, result: torch.Tensor) -> None:
        # inference tensors (torch.inference_mode) have no version counter to key an entry by
        if _is_parameter(x) or x.is_inference() or result.is_inference():
            return
        self._entry = (weakref.ref(x, self._forget), x._version, settings, result, result._version)

    def forget_unless(self, x: torch.Tensor) -> None:
        """Drop the entry unless it is x's, where x is an activation: a quantizer that does not
        share its result (a calibrated amax on a GPU, a per-channel one) still ends the previous
        result's turn. Without this, a result outlives its turn while its input does: a V
        fake-quantized under the cast modes' constant amax stays alive with the V the KV cache
        holds, until the next shared call. A weight's call keeps it (q_proj's weight quantizer runs
        between q_proj's and k_proj's input quantizers); nothing changes under torch.compile's
        tracing."""
        if torch.compiler.is_compiling():  # asked first: the entry is not read under tracing
            return
        entry = self._entry
        if entry is not None and entry[0]() is not x and not _parameter_data(x):
            self._entry = None

    def _forget(self, source: weakref.ref) -> None:
        if self._entry is not None and self._entry[0] is source:
            self._entry = None
        if self._max_entry is not None and self._max_entry[0] is source:
            self._max_entry = None

    # A copy (copy.deepcopy of a model, pickling) starts empty: the entry is a cache of one forward.
    def __getstate__(self) -> dict:
        return {"_entry": None, "_max_entry": None}

    def __setstate__(self, state: dict) -> None:
        self._entry = self._max_entry = None


def amax_readable_now(device: torch.device) -> bool:
    """Whether the host may read an amax on `device` now: not under torch.compile's tracing, nor
    during a CUDA graph capture (a read there is not possible)."""
    if torch.compiler.is_compiling():
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


_NO_FORMAT = QuantizerConfig(enable=False)  # a new quantizer's config (configs are frozen: one serves all)


class TensorQuantizer(nn.Module):
    """Fake-quantizes the tensors that pass through it, per its QuantizerConfig.

    amax (property): the amax it uses (448.0 for a constant-amax quantizer; the calibrated one; or
    None, meaning "taken from each call's data"); every call computes with the value its buffer
    holds then, a write in place included, and checks it as docs/contract.md §9 says. `backend` picks
    the reference or compiled numerics, `flavor` which modelopt run FP8 reproduces
    (docs/contract.md §2). Its gradient is modelopt's straight-through one: the upstream gradient
    unchanged for the input, none for the amax (docs/contract.md §8).
    """

    def __init__(
        self,
        config: QuantizerConfig | None = None,
        *,
        backend: str = "reference",
        flavor: Flavor = "modelopt-cpu",
        name: str = "",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not known; use one of {', '.join(BACKENDS)}.")
        if flavor not in FLAVORS:
            raise ValueError(f"flavor={flavor!r} is not known; use one of {', '.join(FLAVORS)}.")
        # Plain values, written past nn.Module.__setattr__, whose checks cost a model with MoE
        # experts (thousands of quantizers) most of its quantizers' making.
        vars(self).update(
            backend=backend,
            flavor=flavor,
            name=name,
            config=_NO_FORMAT,
            _quantizing=True,
            _calibrator=None,  # _MaxCalibrator while calibrating
            shared_input_result=None,  # SharedInputResult, one a model, set by refquant.hf.insert.insert_quantizers
            _bound=None,  # (bound call, what it was bound for): see _call_bound
            _device_amax_read=None,  # (buffer, its version, _DeviceAmax): see _amax_value_now
            folded=False,  # its weight holds its output already (refquant.hf.fold): never on again
        )
        if config is not None:
            self.set_config(config)

    # --- configuration -------------------------------------------------------------------
    def set_config(self, config: QuantizerConfig) -> None:
        """Replace every attribute (modelopt's set_from_attribute_config); a stored amax stays."""
        if config.enable:
            self._refuse_if_folded()
        self.config = config
        if config.use_constant_amax and "_amax" in self._buffers:
            del self._buffers["_amax"]

    def set_enabled(self, enable: bool) -> None:
        """Flip on/off and keep every other attribute (modelopt's enable-only quant_cfg entry)."""
        if enable:
            self._refuse_if_folded()
        if enable and self.config.format == "disabled":
            raise ValueError(
                f"cannot enable {self.name or 'this quantizer'}: it has no format yet. Give it a "
                "cfg (format 'fp8' or 'nvfp4') in an earlier or the same rule."
            )
        self.config = replace(self.config, enable=enable)

    @property
    def is_enabled(self) -> bool:
        return self.config.enable

    def mark_folded(self) -> None:
        """Off for good: refquant.hf.fold.fold_weights stored this quantizer's output in its weight.
        The amax stays (reports show it)."""
        self.config = replace(self.config, enable=False)
        self.folded = True

    def _refuse_if_folded(self) -> None:
        if getattr(self, "folded", False):
            raise ValueError(
                f"{self.name or 'this quantizer'} was folded into its weight (rq.fold_weights): the weight holds "
                "its fake-quantized values, and switching it on would quantize them twice. Quantize a model "
                "that was not folded."
            )

    @property
    def amax(self) -> torch.Tensor | None:
        if self.config.use_constant_amax:
            return torch.tensor(E4M3_MAX, dtype=torch.float32)
        return self._buffers.get("_amax")

    @property
    def is_calibrated(self) -> bool:
        return "_amax" in self._buffers

    def set_amax(self, amax: torch.Tensor) -> None:
        """Store a calibrated amax: 0-d (per-tensor) or keep-dims (per-channel), any float dtype."""
        if self.config.use_constant_amax:
            raise ValueError(f"{self.name or 'this quantizer'} uses the constant amax 448; it stores none.")
        if not isinstance(amax, torch.Tensor) or not amax.is_floating_point():
            raise ValueError(
                f"amax for {self.name or 'this quantizer'} must be a floating-point tensor, got "
                f"{getattr(amax, 'dtype', type(amax).__name__)}; e.g. torch.tensor(2.5)."
            )
        self.register_buffer("_amax", amax.detach().clone())

    # --- calibration (modelopt's enable_stats_collection / finish_stats_collection) -------
    def _set_calibration_state(self, quantizing: bool, calibrator: Optional["_MaxCalibrator"]) -> None:
        # plain attributes, set past nn.Module.__setattr__'s checks for parameters, buffers and
        # submodules (neither value is one): a 64-expert model has ~1,200 quantizers to switch
        object.__setattr__(self, "_quantizing", quantizing)
        object.__setattr__(self, "_calibrator", calibrator)

    def start_calibration(self) -> None:
        """Quantization off; collect max|x| unless the amax is constant (then nothing collects)."""
        if not self.is_enabled:
            return
        self._set_calibration_state(False, None if self.config.use_constant_amax else _MaxCalibrator(self.config.axis))

    def finish_calibration(self, checked_finite: bool = False) -> None:
        """Store the collected amax (if any data came), switch quantization back on. Raises
        ValueError (and stores nothing) when the data held NaN or inf; `checked_finite`: the
        caller found the collected amax finite already (max_calibrate checks a model's at once)."""
        if self._calibrator is not None and self._calibrator.amax is not None:
            if not checked_finite:
                self._calibrator.check_finite(self.name)
            self.set_amax(self._calibrator.amax)
        self._set_calibration_state(True, None)

    def _finish_calibration_with(self, amax: torch.Tensor) -> None:
        """finish_calibration where the caller made `amax`, a copy of the collected amax that
        nothing else holds, and found it finite (finish_calibrations)."""
        self.register_buffer("_amax", amax)
        self._set_calibration_state(True, None)

    @property
    def is_calibrating(self) -> bool:
        return self._calibrator is not None

    @property
    def is_quantizing(self) -> bool:
        """False from start_calibration to finish_calibration (a constant-amax quantizer too,
        which collects nothing but passes its data through meanwhile)."""
        return self._quantizing

    @property
    def collected_amax(self) -> Optional[torch.Tensor]:
        """What this calibration collected so far (None: nothing yet, or not calibrating)."""
        return None if self._calibrator is None else self._calibrator.amax

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_enabled or x.numel() == 0:
            return x
        if self._calibrator is not None:
            self._calibrator.collect(x, self.name, self.shared_input_result)
        if not self._quantizing:
            return x
        amax_value = self._amax_value_now()
        shared = self.shared_input_result
        settings = None
        if (shared is not None and amax_value is not _NOT_SHARED and not isinstance(amax_value, _DeviceAmax)
                and not _is_parameter(x) and not _records_gradient(x)):
            settings = (self.config, self.flavor, self.backend, amax_value)
            result = shared.get(x, settings)
            if result is not None:
                return result
        elif shared is not None:
            shared.forget_unless(x)
        result = self._fake_quant(x, amax_value)
        if settings is not None:
            shared.put(x, settings, result)
        return result

    def _amax_value_now(self) -> Any:
        """This call's amax as the host sees it: None (taken from x), 448.0 (constant), (dtype,
        value) for a one-element amax on the CPU, a _DeviceAmax for one on a GPU, or _NOT_SHARED
        (a per-channel amax, or one not read now) where no call is bound or shared.

        An in-place write may move no version counter: modelopt's own amax setter writes
        `_amax.data.copy_(value)`, and `.data` is an alias with a counter of its own. Every path
        therefore computes with the amax the buffer holds when the call runs, in both backends:
        the numerics take the buffer itself, and a bound call (refquant.compiled.bind_fake_quant)
        holds the buffer, never values computed from it. What this method adds is the check
        (NaN, infinite or negative raises, naming the quantizer) and the value that bound calls
        and SharedInputResult are keyed by. On the CPU it reads the buffer at every call (about
        0.2 us), so any write is checked at the next call. On a GPU a read is a device sync, so
        it reads once per change of the buffer's version (set_amax, calibration, `copy_`); a
        write through `.data` is then used by the next call without being checked there (the call
        computes what the arithmetic gives under it, and the export refuses it), and
        SharedInputResult does not share such an amax. Not read under torch.compile's tracing or
        a CUDA graph capture, where a read is not possible."""
        if self.config.use_constant_amax:
            return E4M3_MAX
        amax = self._buffers.get("_amax")
        if amax is None:
            return None
        if not amax_readable_now(amax.device):
            return _NOT_SHARED
        return self._read_amax_value(amax)

    def _read_amax_value(self, amax: torch.Tensor) -> Any:
        """_amax_value_now's answer for its stored `amax`, where the host may read it now."""
        if amax.device.type != "cpu":
            read = getattr(self, "_device_amax_read", None)
            if read is None or read[0] is not amax or read[1] != amax._version:
                read = self._device_amax_read = (amax, amax._version, self._checked_amax_value(amax, _DeviceAmax))
            return read[2]
        return self._checked_amax_value(amax, lambda dtype, value: (dtype, value))

    def _checked_amax_value(self, amax: torch.Tensor, token) -> Any:
        """token(dtype, value) of a one-element amax, _NOT_SHARED for a per-channel one; raises
        ValueError when it holds NaN, an infinity or a negative value."""
        if amax.numel() == 1:
            value = amax.item()
            bad = [] if is_valid_amax_value(value) else [value]
        else:
            bad = bad_amax_values(amax)
        if bad:
            raise ValueError(
                f"{self.name or 'a quantizer'}: its stored amax holds {bad} ({amax.dtype}, shape "
                f"{tuple(amax.shape)}); an amax must be finite and >= 0 in fp32 (it is the largest "
                "|value| to represent). Recalibrate, or store a valid one with set_amax()."
            )
        return token(amax.dtype, value) if amax.numel() == 1 else _NOT_SHARED

    def _fake_quant(self, x: torch.Tensor, amax_value: Any) -> torch.Tensor:
        """x fake-quantized; amax_value: this call's _amax_value_now()."""
        # A bound call is one kernel launch under one per-tensor amax (stored or constant), made
        # for calls outside autograd: a call that records a gradient takes the numerics' path.
        # Bound before the first call too: that call then compiles no graph (the first forward
        # after calibration would otherwise wait for a compile a hidden size and dtype).
        bindable = amax_value is not None and amax_value is not _NOT_SHARED and not _records_gradient(x)
        if bindable:
            out = self._call_bound(x, amax_value)
            if out is not None:
                return out
        impl = numerics(self.backend)
        amax = self.amax_for(x)
        if bindable:
            self._bind(impl, x, amax, amax_value)
            out = self._call_bound(x, amax_value)
            if out is not None:
                return out
        if self.config.format == "fp8":
            axis = self.config.axis if amax is None else None
            out = impl.fp8_fake_quant(x, amax, axis=axis, flavor=self.flavor)
        else:
            if isinstance(amax, torch.Tensor) and amax.numel() != 1:
                # modelopt reduces a non-scalar NVFP4 amax with a plain max (docs/modelopt_behaviour.md §3.2)
                amax = amax.amax()
            out = impl.nvfp4_fake_quant(x, amax)
        return out

    def __getstate__(self) -> dict:
        """For copy.deepcopy and pickling: the bound call (compiled Triton kernels, which cannot be
        copied) is left out and made again on the next call."""
        state = self.__dict__.copy()
        state["_bound"] = None
        state["_device_amax_read"] = None
        return state

    # --- the compiled backend's fast path ---------------------------------------------------
    # A forward after calibration calls the same fake quantization with the same amax on tensors
    # of the same kind, over and over; refquant.compiled.bind_fake_quant does that call's
    # argument handling once, as one kernel launch (CUDA, bf16 or fp16, a per-tensor amax). The
    # bound call is used while the quantizer's config, flavor, backend, amax buffer (object) and
    # amax value (_amax_value_now) are those it was bound for, and while it takes x; otherwise the
    # ordinary call runs, and binds again where it can.

    def _call_bound(self, x: torch.Tensor, amax_value: Any) -> torch.Tensor | None:
        bound = self._bound
        if bound is None or torch.compiler.is_compiling():
            return None  # under someone's torch.compile: dynamo traces the ordinary call, not this
        call, config, flavor, backend, buffer, value = bound
        if config is not self.config or flavor != self.flavor or backend != self.backend:
            return None
        if self._buffers.get("_amax") is not buffer or amax_value != value:
            return None
        return call(x)

    def _bind(self, impl, x: torch.Tensor, amax, amax_value: Any) -> None:
        binder = getattr(impl, "bind_fake_quant", None)
        self._bound = None
        if binder is None or torch.compiler.is_compiling():
            return
        call = binder(self.config.format, x, amax, flavor=self.flavor)
        if call is not None:
            self._bound = (call, self.config, self.flavor, self.backend, self._buffers.get("_amax"), amax_value)

    def amax_for(self, x: torch.Tensor) -> torch.Tensor | float | None:
        """The amax this quantizer applies to x: the stored one on x's device, None (taken from x),
        or for a constant amax the number 448.0. A number, not self.amax: the numerics turn it into a
        tensor on x's device by a fill, where copying a CPU tensor to a GPU waits for the GPU."""
        if self.config.use_constant_amax:
            return E4M3_MAX
        amax = self.amax
        return None if amax is None else amax.to(x.device)

    # --- state_dict: the amax buffer exists only once calibrated; accept it on load --------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        amax = destination.get(prefix + "_amax")
        if amax is not None and amax._base is not None and not keep_vars:
            # a view of the tensor a SliceQuantizers binding reads: saved as a tensor of its own,
            # as set_amax stores one (safetensors refuses tensors that share a storage)
            destination[prefix + "_amax"] = amax.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "_amax"
        if key in state_dict:
            stored, current = state_dict[key], self._buffers.get("_amax")
            if self.config.use_constant_amax:
                error_msgs.append(f"{key}: a constant-amax quantizer stores no amax; drop it from the state dict.")
            elif current is None or current.shape != stored.shape or current.dtype != stored.dtype:
                # The saved amax decides shape and dtype (per-channel, bf16 from a bf16 model).
                self.register_buffer("_amax", torch.empty_like(stored))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        if not self.is_enabled:
            return "disabled"
        amax = self.amax
        if self.config.use_constant_amax:
            amax_text = "amax=448(const)"
        elif amax is None:
            amax_text = "amax=dynamic"
        elif amax.numel() == 1:
            amax_text = f"amax={float(amax):.4g}"
        else:
            amax_text = f"amax=per-channel{tuple(amax.shape)}"
        axis = f" axis={self.config.axis}" if self.config.axis is not None else ""
        return f"{self.config.format}{axis} {amax_text} backend={self.backend}"


def child_quantizer(module: nn.Module, name: str) -> Optional[TensorQuantizer]:
    """The TensorQuantizer at `module.<name>`, or None when there is none."""
    quantizer = getattr(module, name, None)
    return quantizer if isinstance(quantizer, TensorQuantizer) else None


def named_quantizers(model: nn.Module, named_modules: Optional[list[tuple[str, nn.Module]]] = None
                     ) -> list[tuple[str, TensorQuantizer]]:
    """Every TensorQuantizer in model.named_modules(), with its full dotted name, in module order.
    named_modules: model.named_modules() listed already, where the caller walked the tree."""
    listed = model.named_modules() if named_modules is None else named_modules
    return [(name, module) for name, module in listed if isinstance(module, TensorQuantizer)]


def is_weight_quantizer(name: str) -> bool:
    """A weight quantizer, by its full name: `...weight_quantizer`, or an expert's `...weight_quantizers.3`."""
    return name.endswith("weight_quantizer") or re.search(r"weight_quantizers\.\d+$", name) is not None


def refuse_folded(quantizers: Iterable[tuple[str, TensorQuantizer]], what: str) -> None:
    """Raise ValueError, naming `what`, when any of these (name, quantizer) pairs was folded into
    its weight (refquant.hf.fold.fold_weights): `what` needs the master weights, or would
    quantize the folded ones twice."""
    folded = [name for name, q in quantizers if getattr(q, "folded", False)]  # older pickles lack it
    if folded:
        raise ValueError(
            f"cannot {what}: the weights of {len(folded)} quantizers (e.g. {folded[0]}) were folded for "
            "evaluation (rq.fold_weights), so the master weights are gone. Do it before folding, or on a copy "
            "of the model made before folding."
        )


@contextmanager
def all_quantizers_off(model: nn.Module) -> Iterator[None]:
    """Within the block every quantizer of `model` is disabled; on exit each gets back the exact
    config object it had (so nothing else about it, a stored amax included, changes)."""
    saved = [(quantizer, quantizer.config) for _, quantizer in named_quantizers(model)]
    try:
        for quantizer, config in saved:
            if config.enable:
                quantizer.set_enabled(False)
        yield
    finally:
        for quantizer, config in saved:
            quantizer.config = config


# --- quantizers over the slices of one stacked tensor (MoE experts) --------------------------
def quantizes_with_fixed_amax(quantizer: TensorQuantizer) -> bool:
    """Whether `quantizer` fake-quantizes now (on, not calibrating) with one amax that does not
    depend on its input: the constant 448, or a stored per-tensor amax. Then quantizing rows of a
    tensor one subset at a time gives the bits of quantizing the whole tensor once (FP8 works
    element by element, NVFP4 block by block along the last dim)."""
    if not quantizer.is_enabled or not quantizer._quantizing or quantizer.is_calibrating:
        return False
    if quantizer.config.use_constant_amax:
        return True
    amax = quantizer._buffers.get("_amax")
    return amax is not None and amax.numel() == 1


def quantizer_sees_each_call(quantizer: nn.Module) -> bool:
    """Whether something wants to see each call of `quantizer`, so its calls must be made one by
    one as modelopt makes them: a subclass's forward, a forward hook of its own
    (refquant.quant.metrics measures through them), or a global module hook
    (nn.modules.module.register_module_forward_hook)."""
    return each_call_watched_locally(quantizer) or each_call_watched_globally()


def each_call_watched_locally(quantizer: nn.Module) -> bool:
    """quantizer_sees_each_call but for the global module hooks (a caller asking of many
    quantizers checks those once)."""
    return (
        not isinstance(quantizer, TensorQuantizer)
        or type(quantizer).forward is not TensorQuantizer.forward
        or bool(quantizer._forward_hooks or quantizer._forward_pre_hooks)
    )


def each_call_watched_globally() -> bool:
    """Whether a global module forward hook is registered (it sees every module's calls)."""
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def collect_slices(quantizers: nn.ModuleList | list, weight: torch.Tensor, indices: Iterable[int]) -> None:
    """quantizers[i](weight[i]) for each i of `indices` (slices of a parameter, e.g. experts'
    weights), as calibration calls them, with the max|x| of every slice that a call would only
    collect taken in one reduction over the slices: a plain TensorQuantizer, nothing watching,
    on, calibrating per tensor (modelopt's weights), the slice not collected already (the same
    key the call would skip by). A max does not depend on how the elements are split, so each
    quantizer keeps the value its own call would. An off quantizer's call does nothing and is
    skipped; any other quantizer is called."""
    listed = list(quantizers)  # one pass: a ModuleList's indexing costs more than its iteration
    if weight.numel() == 0 or weight.is_inference():
        for i in indices:
            listed[i](weight[i])
        return
    keys = slice_memory_keys(weight, indices)
    pending = []
    watched = each_call_watched_globally()
    for i, key in keys.items():
        quantizer = listed[i]
        if watched or each_call_watched_locally(quantizer):
            quantizer(weight[i])
        elif not quantizer.is_enabled:
            continue
        elif quantizer._calibrator is None or quantizer._calibrator.axis is not None or quantizer._quantizing:
            quantizer(weight[i])
        elif quantizer._calibrator.last != key:
            pending.append(i)
    _keep_slice_maxima(listed, weight, pending, keys)


def _keep_slice_maxima(listed: list, weight: torch.Tensor, pending: list[int], keys: dict[int, tuple]) -> None:
    """Each listed[i]'s calibrator (plain, per tensor) takes max|weight[i]| for i in `pending`,
    the maxima in one reduction, and remembers keys[i] as the slice it collected last."""
    if not pending:
        return
    low, high = min(pending), max(pending) + 1
    maxima = torch.linalg.vector_norm(weight[low:high].detach(), ord=float("inf"), dim=tuple(range(1, weight.ndim)))
    for i in pending:
        calibrator = listed[i]._calibrator
        calibrator.last = keys[i]
        calibrator.keep_max(maxima[i - low])


def collect_passing_slices(quantizers: nn.ModuleList | list, weight: torch.Tensor, wanted: list[int]) -> bool:
    """Where every quantizer of the list returns its input itself (off, folded, or only
    collecting while calibrating) and nothing watches one: the calls quantizers[i](weight[i]) for
    each i with wanted[i] made as collect_slices makes them (a slice collected already and
    unchanged since is skipped, the per-tensor maxima of the rest in one reduction), and True.
    Else False, and no call made. One pass over the list for both questions: the experts loop asks
    them of every projection at every calibrating or folded forward."""
    if each_call_watched_globally() or weight.numel() == 0 or weight.is_inference():
        return False  # (an inference weight has no version to tell a collected slice by)
    listed = list(quantizers)
    key_of = _slice_key_maker(weight)
    pending, called, keys = [], [], {}
    for i, quantizer in enumerate(listed):
        if each_call_watched_locally(quantizer):
            return False
        if not quantizer.config.enable:
            continue
        if quantizer._quantizing:
            return False
        calibrator = quantizer._calibrator
        if calibrator is None or not wanted[i]:
            continue  # (an unwatched call that neither quantizes nor collects does nothing)
        if calibrator.axis is not None:
            called.append(i)  # per channel: its own call collects
            continue
        key = key_of(i)
        if calibrator.last != key:
            pending.append(i)
            keys[i] = key
    for i in called:
        listed[i](weight[i])
    _keep_slice_maxima(listed, weight, pending, keys)
    return True


def _fold_kept_maxima(calibrators: list[_MaxCalibrator]) -> None:
    """Each calibrator's kept maxima folded into its amax, the value its amax property folds (a
    max of the same 0-d values), those of every calibrator with the same count, device and dtype
    in one stack and one reduction, not two launches each: a 64-expert model's calibration ends
    with hundreds to fold."""
    together: dict[tuple, list[tuple[_MaxCalibrator, list[torch.Tensor]]]] = {}
    for calibrator in calibrators:
        values = calibrator.kept_maxima()
        if len(values) < 2:
            continue  # nothing kept, or one value (a weight's one max), which the property takes as it is
        first = values[0]
        if all(v.ndim == 0 and v.dtype == first.dtype and v.device == first.device for v in values):
            together.setdefault((len(values), first.device, first.dtype), []).append((calibrator, values))
    for (count, _, _), pairs in together.items():
        folded = torch.stack([v for _, values in pairs for v in values]).view(len(pairs), count).amax(dim=1)
        for (calibrator, _), amax in zip(pairs, folded.unbind()):
            calibrator.amax = amax


def finish_calibrations(quantizers: Iterable[TensorQuantizer]) -> None:
    """finish_calibration of each quantizer, each storing what its own call stores: the maxima
    each calibrator kept folded together (_fold_kept_maxima), the per-tensor amaxes of each
    device and dtype stacked once, every collected amax checked finite at once on those stacks
    and the rest (all_finite: one read back a device, not one a quantizer), and the per-tensor
    ones copied out of their stack in one batched copy (torch.split_with_sizes_copy), each into a
    tensor of its own, not by a clone each: a 64-expert model stores over a thousand. Where one
    is not finite, each quantizer finishes in turn as its own call does: the first bad one
    raises, naming itself."""
    listed = list(quantizers)
    with torch.no_grad():
        _fold_kept_maxima([q._calibrator for q in listed if type(q._calibrator) is _MaxCalibrator])
        scalars: dict[tuple, list[tuple[TensorQuantizer, torch.Tensor]]] = {}
        others = []  # per-channel amaxes, and those of subclasses (their own finish stores them)
        for quantizer in listed:
            amax = quantizer.collected_amax
            if amax is None:
                continue
            if amax.ndim == 0 and type(quantizer) is TensorQuantizer:
                scalars.setdefault((amax.device, amax.dtype), []).append((quantizer, amax))
            else:
                others.append(amax)
        stacks = {key: torch.stack([amax for _, amax in pairs]) for key, pairs in scalars.items()}
        if not all_finite(list(stacks.values()) + others):
            for quantizer in listed:
                quantizer.finish_calibration()
            return
        for (device, dtype), pairs in scalars.items():
            copies = [torch.empty((), dtype=dtype, device=device) for _ in pairs]
            torch.split_with_sizes_copy(stacks[device, dtype], [1] * len(pairs), out=[c.view(1) for c in copies])
            for (quantizer, _), amax in zip(pairs, copies):
                quantizer._finish_calibration_with(amax)
    for quantizer in listed:
        if quantizer.is_calibrating or not quantizer.is_quantizing:
            quantizer.finish_calibration(checked_finite=True)


class SliceQuantizers:
    """quantizers[i] applied to x[i] for every slice of a stacked tensor x (dim 0), in one call of
    the numerics with one amax per slice, where that gives the bits of the separate calls.

    modelopt gives each expert of a fused MoE layer its own weight quantizer and calls it on that
    expert's slice of the 3-D weight. When every quantizer of the list is a plain TensorQuantizer
    with the same config, flavor and backend and a fixed per-tensor amax
    (quantizes_with_fixed_amax), one call with the amaxes stacked to (E, 1, ..., 1) gives each
    slice exactly what its own call gives (refquant.numerics: FP8 with a keep-dims amax, NVFP4
    with one global amax per slice; tests/test_experts.py checks it bit for bit). Otherwise
    (calibrating, a quantizer off or dynamic, a hook on one, mixed configs) __call__ returns None
    and the caller makes the per-slice calls.

    Every forward asks for the same binding again, so the whole list's binding is kept while it
    holds (_KeptBinding.holds: the same quantizers, settings, state and amax buffers, no buffer
    written since). Its amaxes are then no copy: where they are one-element buffers of one dtype
    on the slices' device, each quantizer's buffer becomes a view of the one (E,) tensor the
    binding reads, so a call computes with what the buffers hold when it runs, a write through
    `.data` included, as a single quantizer's call does.
    """

    def __init__(self, quantizers: nn.ModuleList):
        self.quantizers = quantizers
        self._kept: Optional[_KeptBinding] = None

    def __getstate__(self) -> dict:
        """For copy.deepcopy and pickling: the kept binding is made again on the next call."""
        state = self.__dict__.copy()
        state["_kept"] = None
        return state

    def __call__(self, x: torch.Tensor, first: int = 0) -> Optional[torch.Tensor]:
        """quantizers[first + i] applied to x[i] for every i, or None where one call would not be
        exact (the caller then makes the per-slice calls). `first`: where x's slices start in
        the list (a group of experts)."""
        call = self.bind(first, x.shape[0], x)
        return None if call is None else call(x, first)

    def bind(self, first: int, count: int, like: torch.Tensor) -> Optional["SliceCall"]:
        """quantizers[first:first + count], checked and their amaxes stacked, as a SliceCall for
        stacks of their slices like `like` (dtype, device), or None where one call would not be
        exact. The binding of the whole list serves any part of it and is kept while it holds;
        each quantizer's check (a bad amax raises, naming it) runs when its buffer is written, and
        on the CPU at every bind, as its own calls check it."""
        if each_call_watched_globally() or count <= 0 or first < 0:
            return None
        kept = self._kept
        if kept is not None and kept.holds(self.quantizers, like):
            call = kept.call
        else:
            listed = list(self.quantizers)
            call = self._bind_listed(listed, 0, like)
            self._kept = None if call is None else _KeptBinding.made(listed, call, like)
            if call is None:  # a part of the list may bind where the whole does not
                part = listed[first:first + count]
                whole = first == 0 and count == len(listed)
                return None if whole or len(part) != count else self._bind_listed(part, first, like)
        return call if first + count <= len(self.quantizers) else None

    @staticmethod
    def _bind_listed(quantizers: list, first: int, like: torch.Tensor) -> Optional["SliceCall"]:
        """The SliceCall of `quantizers` (the list's from `first` on), or None."""
        if not quantizers:
            return None
        leader = quantizers[0]
        if each_call_watched_locally(leader):
            return None  # (a module that is not a TensorQuantizer has no settings to compare)
        settings = (leader.config, leader.flavor, leader.backend)
        constant = leader.config.use_constant_amax
        buffers = []
        for quantizer in quantizers:
            if each_call_watched_locally(quantizer) or not quantizes_with_fixed_amax(quantizer):
                return None
            if (quantizer.config, quantizer.flavor, quantizer.backend) != settings:
                return None
            if not constant:
                buffers.append(quantizer._buffers["_amax"])  # one element (quantizes_with_fixed_amax)
        if constant:
            return SliceCall(leader, first, E4M3_MAX)
        amax = SliceQuantizers._stacked_amax(quantizers, buffers, like)
        return None if amax is None else SliceCall(leader, first, amax)

    @staticmethod
    def _stacked_amax(quantizers: list[TensorQuantizer], buffers: list[torch.Tensor],
                      like: torch.Tensor) -> Optional[torch.Tensor]:
        """The amaxes stacked to (E,), made from the buffers as they are now (each quantizer's
        check first)."""
        if len({b.dtype for b in buffers}) != 1:
            return None  # torch.stack would promote; the separate calls each keep their dtype
        devices = {b.device for b in buffers}
        if all(amax_readable_now(device) for device in devices):
            for quantizer, buffer in zip(quantizers, buffers):
                quantizer._read_amax_value(buffer)  # each one's check, as its own call makes it
        if devices != {like.device} or any(b.ndim for b in buffers):
            buffers = [b.reshape(()).to(like.device) for b in buffers]
        return torch.stack(buffers)


class _KeptBinding:
    """SliceQuantizers' binding of its whole list, kept from one forward to the next while nothing
    it was made from changed (holds). made() turns the quantizers' amax buffers into views of the
    stack the binding reads."""

    __slots__ = ("call", "device", "quantizers", "buffers", "configs", "flavor", "backend", "stack", "version")

    def __init__(self, call: "SliceCall", device: torch.device, quantizers: list, buffers: list,
                 stack: Optional[torch.Tensor]):
        self.call, self.device, self.quantizers, self.buffers = call, device, quantizers, buffers
        self.configs = [quantizer.config for quantizer in quantizers]  # equal values (bind); a config is frozen
        self.flavor, self.backend = quantizers[0].flavor, quantizers[0].backend
        self.stack = stack
        self.version = None if stack is None else stack._version

    @classmethod
    def made(cls, quantizers: list, call: "SliceCall", like: torch.Tensor) -> Optional["_KeptBinding"]:
        """The binding kept, or None where its amaxes are a copy the buffers would not follow (the
        buffers on another device than the slices): it is then made again at each bind."""
        stack = call._amax if isinstance(call._amax, torch.Tensor) else None
        if stack is None:
            return cls(call, like.device, quantizers, [None] * len(quantizers), None)
        buffers = [quantizer._buffers["_amax"] for quantizer in quantizers]
        if any(buffer.device != stack.device for buffer in buffers):
            return None
        views = []
        for index, (quantizer, buffer) in enumerate(zip(quantizers, buffers)):
            view = stack[index].view(buffer.shape)
            read = quantizer._device_amax_read
            quantizer._buffers["_amax"] = view
            if read is not None and read[0] is buffer and read[1] == buffer._version:
                quantizer._device_amax_read = (view, view._version, read[2])  # the same value, checked
            views.append(view)
        return cls(call, like.device, quantizers, views, stack)

    def holds(self, quantizers: nn.ModuleList, like: torch.Tensor) -> bool:
        """Whether the kept call is what binding `quantizers` for `like` gives now. A write to
        a buffer (other than through `.data`) moves the stack's version: the binding is made
        again, which checks the values. On the CPU each quantizer's check runs here, as its own
        call runs it at each call."""
        if like.device != self.device or len(quantizers) != len(self.quantizers):
            return False
        if self.stack is not None and self.stack._version != self.version:
            return False
        flavor, backend = self.flavor, self.backend
        for quantizer, kept, buffer, config in zip(quantizers, self.quantizers, self.buffers, self.configs):
            if (quantizer is not kept or quantizer.config is not config or quantizer._buffers.get("_amax") is not buffer
                    or not quantizer._quantizing or quantizer._calibrator is not None
                    or quantizer._forward_hooks or quantizer._forward_pre_hooks
                    or quantizer.flavor != flavor or quantizer.backend != backend):
                return False
        if self.stack is not None and self.stack.device.type == "cpu":
            for quantizer, buffer in zip(self.quantizers, self.buffers):
                quantizer._read_amax_value(buffer)
        return True


class SliceCall:
    """One numerics call over a stack of expert slices, each under its own quantizer's amax
    (SliceQuantizers.bind): quantizers first, first + 1, ... of the bound list. Where the
    backend binds such calls (refquant.compiled.bind_slice_fake_quant: a launch on CUDA), the
    first call binds one, and each call is that launch with its slices' part of the amaxes."""

    __slots__ = ("_leader", "_first", "_amax", "_launch")

    def __init__(self, leader: TensorQuantizer, first: int, amax: Any):
        self._leader, self._first, self._amax = leader, first, amax
        self._launch: Any = _UNBOUND

    def __call__(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """x[i] through quantizer first + i of the bound ones, for every i (x: (slices, ...))."""
        amax = self._amax
        if isinstance(amax, torch.Tensor):
            start = first - self._first
            if start < 0 or start + x.shape[0] > amax.shape[0]:
                raise ValueError(f"slices {first}..{first + x.shape[0] - 1} are not among the bound "
                                 f"{self._first}..{self._first + amax.shape[0] - 1}.")
            amax = amax[start:start + x.shape[0]]
            out = self._bound_call(x, amax)
            if out is not None:
                return out
            amax = amax.reshape(-1, *([1] * (x.ndim - 1)))
            vouch_checked(amax)  # each buffer was checked when bound: no second check (a sync on a GPU)
        impl = numerics(self._leader.backend)
        if self._leader.config.format == "fp8":
            return impl.fp8_fake_quant(x, amax, flavor=self._leader.flavor)
        return impl.nvfp4_fake_quant(x, amax, per_slice_amax=True)

    def _bound_call(self, x: torch.Tensor, amax: torch.Tensor) -> Optional[torch.Tensor]:
        """The bound launch's result for x under `amax` (one a slice), or None (nothing bound, or
        a launch that does not take x)."""
        launch = self._launch
        if launch is _UNBOUND:
            binder = getattr(numerics(self._leader.backend), "bind_slice_fake_quant", None)
            launch = None
            if binder is not None and not torch.compiler.is_compiling():
                launch = binder(self._leader.config.format, x, flavor=self._leader.flavor)
            self._launch = launch
        return None if launch is None else launch(x, amax)


_UNBOUND = object()  # a SliceCall's launch before its first call
