"""torch.compile without dynamo's per-call dispatch: a compiled graph called directly, behind the
same guards dynamo would check.

Why: in a PTQ forward every quantizer is one compiled call on a small tensor, and the host time of
a call, not the kernel, sets the pace (an 8-layer model runs ~130 of them a forward). Going through
dynamo costs the frame hook, the cache lookup and its Python wrappers on every call: a call of
ours took 64 us through dynamo on the H200 machines' host against 32 us called directly, guards
included (docs/compiled.md, "The H200, and the PTQ forward").

How (`DirectCompiled`):
- The function is torch.compile'd with a backend that is inductor with refquant's options, and
  that also keeps what inductor returned for each graph and where each graph input comes from
  (dynamo's sources: an argument, a size or stride of one, or a tensor read from a global).
- dynamo's cache entry for a graph holds its guard manager: the checks dynamo itself runs before it
  uses the graph (every tensor's dtype, device, sizes, strides and requires_grad, the arguments'
  values that were specialized, the global state: grad mode, autocast, ...). A call binds its
  arguments as the function's frame would, evaluates those guards, and when a graph's pass calls
  inductor's function with that graph's inputs. No guard passing (a new signature), a call made
  while someone else's torch.compile is tracing us, or a graph we cannot call directly all go
  through dynamo, which compiles or runs as it always did.
- A graph is called directly only if the function's whole result is its tensor outputs, in order:
  one tensor, or a tuple of tensors (NVFP4 real quant's packed bytes, scales and global scale).
  That is checked when it is first compiled: the direct call's outputs must equal the dynamo
  call's result on that first input, bit for bit, shape, dtype, device and strides. For an
  inference graph the call goes to inductor's generated `call(args)` itself, past the autograd
  wrappers (which do nothing for it), under the same check; AOTAutograd's cache is off for these
  compiles, since a hit there would hide that function (inductor's own graph cache still works).
- Anything this relies on that the installed torch lacks (these are dynamo internals) leaves the
  function on dynamo's path: slower, never different.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass
class _CompiledGraph:
    """What the backend kept for one graph: inductor's callable and the graph's input sources."""

    compiled: Callable
    graph_args: list
    output_count: int  # the graph's outputs (-1: not a flat list of them)
    inference_code: Optional[Callable[[list], Any]]  # inductor's own call(args) for an inference graph


@dataclass
class _DirectGraph:
    """A graph callable without dynamo: its guards, inductor's callable, how to build its inputs."""

    guards: Any
    compiled: Callable
    inputs: list[Callable[[dict], Any]]
    inference_code: Optional[Callable[[list], Any]] = None
    output_count: int = 1
    as_tuple: bool = False  # the function returns a tuple of the outputs, not the one tensor

    def __post_init__(self) -> None:
        self.check = getattr(self.guards, "root", self.guards).check  # the C++ check, one frame less

    def run(self, frame: dict) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = [read(frame) for read in self.inputs]
        if self.inference_code is not None:
            # inductor's generated call(args): what the autograd wrappers around it end up calling
            # for an inference graph without aliasing or mutation (checked when adopted)
            outputs = self.inference_code(values)
        else:  # dynamo calls a backend's result with the graph inputs as positional arguments
            outputs = self.compiled(*values)
        return tuple(outputs[: self.output_count]) if self.as_tuple else outputs[0]


class DirectCompiled:
    """torch.compile(fn, fullgraph=True, ...) whose calls skip dynamo's dispatch once a graph that
    fits exists (see the module docstring). Call it as fn."""

    def __init__(self, fn: Callable, options: dict, compile_kwargs: dict, prepare: Optional[Callable[[tuple], tuple]] = None):
        """prepare(args): the positional arguments as dynamo should trace them (refquant marks
        their dynamic dims); only calls that go through dynamo pay for it."""
        self.fn = fn
        self.options = options
        self.prepare = prepare
        self._captured: dict[str, _CompiledGraph] = {}
        self._direct: list[_DirectGraph] = []
        self._guards_seen: list = []  # the guard managers already looked at (kept: ids get reused)
        self._frame = _frame_binder(fn)
        self.calls_through_dynamo = 0  # for tests and reports: how often the direct call did not apply
        self.dynamo = torch.compile(fn, backend=self._backend, **compile_kwargs)

    @property
    def direct_graphs(self) -> int:
        """How many of this function's graphs are called directly (for tests and reports)."""
        return len(self._direct)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            # inside someone else's torch.compile: dynamo inlines this function into their graph
            # (no direct call, no marks: those are for graphs of our own)
            return self.dynamo(*args, **kwargs)
        if self._direct and self._frame is not None:
            frame = self._frame(args, kwargs)
            graph = self._fitting(frame)
            if graph is not None:
                return graph.run(frame)
        self.calls_through_dynamo += 1
        result = self.dynamo(*(self.prepare(args) if self.prepare is not None else args), **kwargs)
        if self._frame is not None:
            self._adopt_new_graphs(self._frame(args, kwargs), result)
        return result

    def frame_of(self, *args, **kwargs) -> Optional[dict]:
        """fn's locals for these arguments (what the guards read), for call_direct; None where
        this function's calls cannot be bound (see _frame_binder)."""
        return None if self._frame is None else self._frame(args, kwargs)

    def call_direct(self, frame: dict) -> Optional[torch.Tensor | tuple[torch.Tensor, ...]]:
        """The result of the graph whose guards pass on `frame` (fn's locals), or None: no graph
        fits, or a torch.compile is tracing us (the caller then makes an ordinary call)."""
        if torch.compiler.is_compiling():
            return None
        graph = self._fitting(frame)
        return None if graph is None else graph.run(frame)

    def fits(self, frame: Optional[dict]) -> bool:
        """Whether a graph is called directly for `frame` (fn's locals, from frame_of)."""
        return frame is not None and self._fitting(frame) is not None

    def _fitting(self, frame: dict) -> Optional[_DirectGraph]:
        for graph in self._direct:
            if graph.check(frame):
                return graph
        return None

    # --- the backend: inductor, keeping what it compiled ------------------------------------
    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list):
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        inner_results = []

        def inner_compile(*args, **kwargs):
            output_code = compile_fx_inner(*args, **kwargs)
            inner_results.append((output_code, kwargs.get("is_inference", False)))
            return output_code

        # AOTAutograd's own cache would hand back a stored wrapper and skip inner_compile, leaving
        # nothing to call directly; inductor's graph cache (inside compile_fx_inner) still applies.
        with _no_autograd_cache():
            compiled = compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=self.options)
        try:
            compile_id = str(torch._guards.CompileContext.current_compile_id())
            graph_args = [node.meta.get("grapharg") for node in gm.graph.nodes if node.op == "placeholder"]
            output = next(node for node in gm.graph.nodes if node.op == "output")
            results = output.args[0]
            output_count = len(results) if isinstance(results, (tuple, list)) else -1
            inference_code = None
            if len(inner_results) == 1 and inner_results[0][1]:
                inference_code = getattr(inner_results[0][0], "current_callable", None)
            self._captured[compile_id] = _CompiledGraph(compiled, graph_args, output_count, inference_code)
        except Exception as error:  # dynamo internals moved: stay on dynamo's path
            _give_up(error)
        return compiled

    def _adopt_new_graphs(self, frame: dict, result: object) -> None:
        """After a dynamo call: make any graph compiled since the last look callable directly."""
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list

            entries = _debug_get_cache_entry_list(self.fn.__code__)
        except Exception as error:
            _give_up(error)
            self._frame = None
            return
        for entry in entries:
            guards = getattr(entry, "guard_manager", None)
            if guards is None or any(seen is guards for seen in self._guards_seen):
                continue
            self._guards_seen.append(guards)
            captured = self._captured.pop(str(getattr(entry, "compile_id", None)), None)
            graph = _direct_graph(guards, captured, result)
            if graph is None:
                continue
            same = _same_result(graph, frame, result)
            if not same and graph.inference_code is not None:
                graph.inference_code = None  # inductor's call alone did not do it: keep the wrappers
                same = _same_result(graph, frame, result)
            if same:
                self._direct.append(graph)


def _no_autograd_cache():
    import contextlib

    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "enable_autograd_cache"):
        return functorch_config.patch(enable_autograd_cache=False)
    return contextlib.nullcontext()


def _direct_graph(guards: Any, captured: Optional[_CompiledGraph], result: object) -> Optional[_DirectGraph]:
    """The graph as a direct call, if the function's result (`result`, from dynamo's call) can be
    its outputs: one tensor from one output, or a tuple of tensors from as many outputs."""
    if captured is None or not hasattr(guards, "check"):
        return None
    if isinstance(result, torch.Tensor):
        as_tuple = False
    elif isinstance(result, tuple) and result and all(isinstance(t, torch.Tensor) for t in result):
        as_tuple = True
    else:
        return None
    if captured.output_count != (len(result) if as_tuple else 1):
        return None
    inputs = [_input_reader(graph_arg) for graph_arg in captured.graph_args]
    if any(read is None for read in inputs):
        return None
    return _DirectGraph(guards, captured.compiled, inputs, captured.inference_code, captured.output_count, as_tuple)


def _same_result(graph: _DirectGraph, frame: dict, result: object) -> bool:
    """The first direct call must give the dynamo call's result, bit for bit."""
    if not graph.check(frame):
        return False
    try:
        direct = graph.run(frame)
    except Exception:  # noqa: BLE001 - a calling convention we got wrong: not called directly
        return False
    if graph.as_tuple:
        return isinstance(direct, tuple) and len(direct) == len(result) and all(map(_same_tensor, direct, result))
    return _same_tensor(direct, result)


def _same_tensor(direct: object, result: torch.Tensor) -> bool:
    if not isinstance(direct, torch.Tensor) or direct.shape != result.shape or direct.dtype != result.dtype:
        return False
    if direct.device != result.device or _layout(direct) != _layout(result):
        return False
    return bool(torch.equal(_bits(direct), _bits(result)))


def _layout(t: torch.Tensor) -> list[int]:
    """The strides that matter: those of dims longer than 1."""
    return [stride for size, stride in zip(t.shape, t.stride()) if size > 1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point and t.element_size() in (1, 2, 4, 8):
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _input_reader(graph_arg: Any) -> Optional[Callable[[dict], Any]]:
    """How to get one graph input from the bound arguments (None: a source we do not rebuild)."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource

    if graph_arg is None or getattr(graph_arg, "pass_arg_as_tensor", False):
        return None
    source = graph_arg.source
    if isinstance(source, LocalSource):
        name = source.local_name
        return lambda frame: frame[name]
    if isinstance(source, TensorPropertySource) and isinstance(source.base, LocalSource):
        name, index = source.base.local_name, source.idx
        if source.prop == TensorProperty.SIZE:
            return lambda frame: frame[name].size(index)
        if source.prop == TensorProperty.STRIDE:
            return lambda frame: frame[name].stride(index)
        if source.prop == TensorProperty.STORAGE_OFFSET:
            return lambda frame: frame[name].storage_offset()
        return None
    # A tensor the function reads from a global (refquant's per-device reciprocal table): dynamo
    # passes it as an input; it is the same object on every call, so the one seen here is kept.
    example = getattr(graph_arg, "example", None)
    if isinstance(example, torch.Tensor):
        return lambda frame: example
    return None


def _frame_binder(fn: Callable) -> Optional[Callable[[tuple, dict], dict]]:
    """(args, kwargs) -> fn's locals at entry, which is what dynamo's guards read; None for a
    signature with *args or **kwargs (not bound here: such a function stays on dynamo's path)."""
    parameters = list(inspect.signature(fn).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return None
    names = [p.name for p in parameters]
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}

    def bind(args: tuple, kwargs: dict) -> dict:
        frame = dict(defaults)
        frame.update(zip(names, args))
        frame.update(kwargs)
        return frame

    return bind


_warned = False


def _give_up(error: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"refquant.compiled: calling compiled graphs directly is not possible with torch {torch.__version__} "
            f"({type(error).__name__}: {error}); every call goes through dynamo (same bits, more host time).",
            stacklevel=3,
        )
