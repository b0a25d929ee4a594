"""torch.compile without dynamo's per-call dispatch: a compiled graph called directly, behind the
same guards dynamo would check.

Why: in a PTQ forward every quantizer is one compiled call on a small tensor, and the host time of
a call, not the kernel, sets the pace (an 8-layer model runs ~130 of them a forward). Going through
dynamo costs the frame hook, the cache lookup and its Python wrappers on every call: a call of
ours took about twice the host time through dynamo (64 us on an H200's host) as called directly,
guards included (32 us).

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
- The dynamo and inductor internals this needs are in refquant.compiled.private_api (GRAPH_CALL):
  where the installed torch was not tested, REFQUANT_FAST_LAUNCH=0, or any of them fails, calls
  go through dynamo: slower, never different.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import private_api

_GRAPH_CALL = private_api.GRAPH_CALL


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
    check: Callable[[dict], bool]  # the guards' check of the function's locals
    compiled: Callable
    inputs: list[Callable[[dict], Any]]
    inference_code: Optional[Callable[[list], Any]] = None
    output_count: int = 1
    as_tuple: bool = False  # the function returns a tuple of the outputs, not the one tensor

    def outputs(self, frame: dict) -> torch.Tensor | tuple[torch.Tensor, ...]:
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
        if _GRAPH_CALL.decide():
            self.dynamo = torch.compile(fn, backend=self._backend, **compile_kwargs)
        else:  # the public path: torch.compile with inductor and our options, nothing kept
            self.dynamo = torch.compile(fn, options=options, **compile_kwargs)

    @property
    def direct_graphs(self) -> int:
        """How many of this function's graphs are called directly (for tests and reports)."""
        return len(self._direct) if _GRAPH_CALL.on else 0

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            # inside someone else's torch.compile: dynamo inlines this function into their graph
            # (no direct call, no marks: those are for graphs of our own)
            return self.dynamo(*args, **kwargs)
        if self._direct and _GRAPH_CALL.on and self._frame is not None:
            frame = self._frame(args, kwargs)
            outputs = self._call_fitting(frame)
            if outputs is not None:
                return outputs
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
        fits, a torch.compile is tracing us, or the direct graph call is off (the caller then
        makes an ordinary call)."""
        if torch.compiler.is_compiling() or not _GRAPH_CALL.on:
            return None
        return self._call_fitting(frame)

    def fits(self, frame: Optional[dict]) -> bool:
        """Whether a graph is called directly for `frame` (fn's locals, from frame_of)."""
        if frame is None or not _GRAPH_CALL.on:
            return False
        try:
            return self._fitting(frame) is not None
        except Exception as error:  # noqa: BLE001 - the guards' check raised: dynamo from now on
            _GRAPH_CALL.fail(error, "checking a compiled graph's guards")
            return False

    def _fitting(self, frame: dict) -> Optional[_DirectGraph]:
        for graph in self._direct:
            if graph.check(frame):
                return graph
        return None

    def _call_fitting(self, frame: dict) -> Optional[torch.Tensor | tuple[torch.Tensor, ...]]:
        """The outputs of the graph whose guards pass on `frame`, or None (none does, or the
        direct call failed, which turns it off: the caller goes through dynamo)."""
        try:
            graph = self._fitting(frame)
            return None if graph is None else graph.outputs(frame)
        except torch.OutOfMemoryError:
            raise  # the device's error, not the direct call's: dynamo's call would meet it too
        except Exception as error:  # noqa: BLE001 - a private API of another form: dynamo from now on
            _GRAPH_CALL.fail(error, "calling a compiled graph directly")
            return None

    # --- the backend: inductor, keeping what it compiled ------------------------------------
    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list):
        if not _GRAPH_CALL.on:  # turned off after this function was made: nothing to keep
            return private_api.inductor_compile(gm, example_inputs, self.options)
        compiled, made = private_api.inductor_compile_keeping_outputs(gm, example_inputs, self.options)
        try:
            compile_id = private_api.current_compile_id()
            graph_args = private_api.graph_input_args(gm)
            output = next(node for node in gm.graph.nodes if node.op == "output")
            results = output.args[0]
            output_count = len(results) if isinstance(results, (tuple, list)) else -1
            inference_code = None
            if len(made) == 1 and made[0][1]:
                inference_code = private_api.inference_callable(made[0][0])
            self._captured[compile_id] = _CompiledGraph(compiled, graph_args, output_count, inference_code)
        except Exception as error:  # noqa: BLE001 - dynamo internals moved: stay on dynamo's path
            _GRAPH_CALL.fail(error, "reading what inductor compiled")
        return compiled

    def _adopt_new_graphs(self, frame: dict, result: object) -> None:
        """After a dynamo call: make any graph compiled since the last look callable directly."""
        if not _GRAPH_CALL.on:
            return
        try:
            entries = private_api.cache_entries(self.fn.__code__)
            for guards, compile_id in entries:
                if guards is None or any(seen is guards for seen in self._guards_seen):
                    continue
                self._guards_seen.append(guards)
                graph = _direct_graph(guards, self._captured.pop(compile_id, None), result)
                if graph is None:
                    continue
                same = _same_result(graph, frame, result)
                if not same and graph.inference_code is not None:
                    graph.inference_code = None  # inductor's call alone did not do it: keep the wrappers
                    same = _same_result(graph, frame, result)
                if same:
                    self._direct.append(graph)
        except Exception as error:  # noqa: BLE001 - dynamo internals moved: stay on dynamo's path
            _GRAPH_CALL.fail(error, "reading dynamo's compiled graphs")


def _direct_graph(guards: Any, captured: Optional[_CompiledGraph], result: object) -> Optional[_DirectGraph]:
    """The graph as a direct call, if the function's result (`result`, from dynamo's call) can be
    its outputs: one tensor from one output, or a tuple of tensors from as many outputs."""
    check = private_api.guard_check(guards)
    if captured is None or check is None:
        return None
    if isinstance(result, torch.Tensor):
        as_tuple = False
    elif isinstance(result, tuple) and result and all(isinstance(t, torch.Tensor) for t in result):
        as_tuple = True
    else:
        return None
    if captured.output_count != (len(result) if as_tuple else 1):
        return None
    inputs = [private_api.graph_input_reader(graph_arg) for graph_arg in captured.graph_args]
    if any(read is None for read in inputs):
        return None
    return _DirectGraph(guards, check, captured.compiled, inputs, captured.inference_code, captured.output_count, as_tuple)


def _same_result(graph: _DirectGraph, frame: dict, result: object) -> bool:
    """The first direct call must give the dynamo call's result, bit for bit."""
    if not graph.check(frame):
        return False
    try:
        direct = graph.outputs(frame)
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
