"""export_checkpoint: the checkpoint's tensors, streamed a layer at a time into safetensors files
(sharded with an index past a size), and its JSON configs, written atomically into a new folder;
under torch.distributed by rank 0 alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
import warnings
from contextlib import nullcontext
from itertools import groupby
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from ...quant.distributed import rank_and_world
from ..dispatch import loaded_weights, require_loaded
from .configs import quantization_config
from .plan import ExportPlan, plan_export
from .state import STATE_FILE, state_document

MAX_SHARD_SIZE = "10GB"  # modelopt's default
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# huggingface_hub's size units (decimal), and the binary ones
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_shard_size(size: int | str) -> int:
    """Bytes from an int or a string with a unit as transformers takes them: "5GB" (5 * 10^9),
    "500MB", "2GiB" (2 * 2^30), "4096" or "4096B". Raises ValueError for anything else."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size={size!r}: give bytes as an int, or a string such as \"5GB\" or \"500MB\".")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if match is None or (unit and unit not in SIZE_UNITS):
        raise ValueError(
            f"max_shard_size={size!r} is not a size: give bytes, or a number with one of the units "
            f"{', '.join(u.replace('I', 'i') for u in SIZE_UNITS)} (e.g. \"5GB\")."
        )
    value = int(float(match.group(1)) * SIZE_UNITS[unit or "B"])
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} must be at least one byte.")
    return value


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def checkpoint_tensors(model: nn.Module, plan: ExportPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors one at a time, on the CPU: the model's own state in state_dict
    order with every quantizer buffer dropped, each quantized linear's weight replaced by its
    exported tensors (computed when it comes up, not before), tied aliases (lm_head tied to the
    embeddings) dropped as save_pretrained does, and the K/V scales last. A layer whose weights
    accelerate offloaded has them loaded while its tensors come up. A consumer that writes as it
    reads holds one linear's exported tensors at a time (an experts module's: one expert's
    projection's, not the module's)."""
    quantizer_prefixes = tuple(f"{name}." for name in plan.quantizers)
    state = model.state_dict()  # references to the model's tensors (meta where offloaded), no copies
    keys = [key for key in state if not key.startswith(quantizer_prefixes)]
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    present = set(keys)
    dropped = {alias for alias, canonical in tied.items() if alias in present and canonical in present}
    modules = dict(model.named_modules(remove_duplicate=False))
    rename = plan.names.tensor if plan.names is not None else (lambda key: key)
    written: set[str] = set()

    def checkpoint_key(key: str) -> str:
        renamed = rename(key)
        if renamed in written:
            raise ValueError(f"two checkpoint tensors would be named {renamed!r} (one from {key!r}).")
        written.add(renamed)
        return renamed

    for layer, layer_keys in groupby(keys, key=lambda key: key.rpartition(".")[0]):
        module = modules.get(layer)
        experts = plan.experts.get(layer)
        with loaded_weights(module) if module is not None else nullcontext():
            for key in layer_keys:
                if key in dropped:
                    continue
                suffix = key.rpartition(".")[2]
                if layer in plan.linears and suffix == "weight":
                    for tensor_suffix, tensor in plan.linears[layer].tensors().items():
                        yield checkpoint_key(f"{layer}.{tensor_suffix}"), _on_cpu(tensor)
                    continue
                if experts is not None and suffix in experts.parameters:
                    if suffix == experts.parameters[0]:  # all of the module's experts, a part at a time
                        for relative, tensor in experts.stream():
                            yield checkpoint_key(f"{layer}.{relative}"), _on_cpu(tensor)
                    continue
                value = state[key]
                if value.is_meta and module is not None:  # offloaded: now loaded on the module
                    value = getattr(module, suffix, value)
                yield checkpoint_key(key), _on_cpu(require_loaded(key, value))
    for key, value in plan.kv_scales.items():
        yield checkpoint_key(key), _on_cpu(value)


def checkpoint_state_dict(model: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at once (checkpoint_tensors), on the CPU."""
    return dict(checkpoint_tensors(model, plan))


class _ShardWriter:
    """Writes tensors, as they come, into safetensors files of at most `max_bytes` each, split as
    huggingface_hub's split_torch_state_dict_into_shards (which save_pretrained uses) splits a
    whole state dict: in order, a new shard when the next tensor would not fit, a tensor larger
    than max_bytes alone in a shard of its own. One shard: model.safetensors; more:
    model-0000i-of-0000N.safetensors and model.safetensors.index.json. Holds one shard in memory."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names of each written shard, in order
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.total_bytes += size
        if size > self.max_bytes:
            self._write({key: tensor})
            return
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._write(self.pending)
            self.pending, self.pending_bytes = {}, 0
        self.pending[key] = tensor
        self.pending_bytes += size

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards)}"
        try:
            save_file(tensors, str(path), metadata={"format": "pt"})
        except SafetensorError as error:  # safetensors reports a failed write (a full disk) as its own error
            code = re.search(r"os error (\d+)", str(error))
            raise OSError(int(code.group(1)) if code else None, str(error), str(path)) from error
        self.shards.append(list(tensors))

    def finish(self) -> None:
        if self.pending or not self.shards:
            self._write(self.pending)
            self.pending = {}
        count = len(self.shards)
        names = [SAFETENSORS_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for index, name in enumerate(names):
            os.rename(self.folder / f".shard-{index}", self.folder / name)
        if count > 1:
            weight_map = {key: name for name, keys in zip(names, self.shards) for key in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, max_bytes: int) -> None:
    writer = _ShardWriter(folder, max_bytes)
    for key, tensor in tensors:
        writer.add(key, tensor)
    writer.finish()


def _write_json(path: Path, document: dict) -> None:
    try:
        path.write_text(json.dumps(document, indent=4) + "\n")
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


def _write_configs(model: nn.Module, plan: ExportPlan, folder: Path) -> None:
    """config.json as save_pretrained writes it (architectures, dtype) plus quantization_config;
    generation_config.json when the model has one; hf_quant_config.json."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    weight = next(model.parameters())
    config.dtype = str(weight.dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    config_path = folder / "config.json"
    document = json.loads(config_path.read_text())
    document["quantization_config"] = quantization_config(plan.hf_quant_config)
    _write_json(config_path, document)
    _write_json(folder / "hf_quant_config.json", plan.hf_quant_config)


def _give_user_permissions(folder: Path) -> None:
    """The folder and every file in it get the mode a folder or file the user creates gets
    (0755 / 0644 under umask 022): safetensors writes its files 0600, which a serving process
    run by another user could not read."""
    umask = os.umask(0o022)  # os.umask sets and returns; set it straight back
    os.umask(umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        raise ValueError(
            f"output folder {str(out_dir)!r} already exists; refquant never writes into or over an "
            "existing checkpoint. Choose a new folder, or remove the old one first."
        )


def export_checkpoint(
    model: nn.Module, out_dir: str | os.PathLike, *, max_shard_size: int | str = MAX_SHARD_SIZE
) -> Path:
    """Write `model` (quantized and calibrated by rq.quantize_model) to the new folder `out_dir` as
    modelopt's unified Hugging Face checkpoint; returns its path. The model is not modified.

    The tensors are streamed a layer at a time into safetensors files of at most `max_shard_size`
    (bytes, or "5GB" / "500MB" / "2GiB"; modelopt's default 10GB): one file, model.safetensors,
    when they fit, else model-0000i-of-0000N.safetensors with model.safetensors.index.json.
    Memory beyond the model: one shard (host memory), plus one linear's or one expert projection's
    exported tensors (the layer's device).
    Atomic: everything is written into a temporary sibling folder, renamed to `out_dir` only once
    complete; on any error the temporary folder is removed and `out_dir` does not appear.
    Under torch.distributed (world size > 1) call it on every rank: rank 0 writes, the others wait
    for it and write nothing; an error on rank 0 is raised on every rank.
    Raises ValueError when `out_dir` exists, when the model is not a transformers model (no
    `config`), when nothing is quantized or a quantizer lacks its calibrated amax, for layer
    formats modelopt's export does not define, and for a bad max_shard_size.
    """
    out_dir = Path(out_dir)
    max_bytes = parse_shard_size(max_shard_size)
    rank, world = rank_and_world()
    if world == 1:
        return _export(model, out_dir, max_bytes)
    import torch.distributed as dist

    failure = None
    if rank == 0:
        try:
            _export(model, out_dir, max_bytes)
        except Exception as error:
            failure = error
    status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(status, src=0)  # the other ranks wait here until rank 0 is done
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise ValueError(f"rank 0 failed to write the checkpoint {str(out_dir)!r} ({status[0]}); nothing was written.")
    return out_dir


def _export(model: nn.Module, out_dir: Path, max_bytes: int) -> Path:
    _check_out_dir(out_dir)
    if getattr(model, "config", None) is None or not hasattr(model.config, "save_pretrained"):
        raise ValueError(
            f"{type(model).__name__} has no transformers config; export_checkpoint writes Hugging Face "
            "checkpoints of transformers models (e.g. AutoModelForCausalLM)."
        )
    plan = plan_export(model)
    state = state_document(model, plan)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partial_folders(out_dir.parent)
    staging = out_dir.parent / f".{out_dir.name}{PARTIAL_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_configs(model, plan, staging)
        _write_safetensors(checkpoint_tensors(model, plan), staging, max_bytes)
        _write_json(staging / STATE_FILE, state)
        _give_user_permissions(staging)
        _check_out_dir(out_dir)  # someone may have created it meanwhile
        os.rename(staging, out_dir)  # atomic on one filesystem: the folder appears complete or not at all
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise _write_failure(out_dir, staging, error) from error
        raise
    return out_dir


def _write_failure(out_dir: Path, staging: Path, error: OSError) -> OSError:
    """The OSError of a failed write (a full disk, no permission), saying which checkpoint and file,
    that nothing was left behind, and what to do."""
    where = f" ({error.filename or f'in {staging}'})"
    reason = error.strerror or str(error)
    return OSError(
        error.errno,
        f"writing the checkpoint {out_dir} failed: {reason}{where}. Nothing was written (the partial folder was "
        "removed). Free space or fix the permissions on that filesystem, or write to another folder.",
    )


# A checkpoint is written into ".<name>.partial-<host>-<pid>-<random>" beside it, renamed when complete.
PARTIAL_MARK = ".partial-"


def remove_stale_partial_folders(parent: Path) -> list[Path]:
    """Remove the partial folders that killed exports (SIGKILL, power loss: no cleanup ran) left in
    `parent`: those whose writer, named in the folder name, was a process of this host that no longer
    runs. A folder of a live process, of another host (a shared filesystem) or without a writer in
    its name is left alone and reported. Warns about each; returns the folders removed."""
    removed = []
    host = socket.gethostname()
    for folder in sorted(parent.glob(f".*{PARTIAL_MARK}*")):
        if not folder.is_dir():
            continue
        writer_host, _, rest = folder.name.rpartition(PARTIAL_MARK)[2].rpartition("-")[0].rpartition("-")
        pid = int(rest) if rest.isdigit() else None
        if writer_host == host and pid is not None and not _process_runs(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            warnings.warn(f"removed {folder}: a partial checkpoint left by an export that was killed (process {pid} "
                          "no longer runs).", stacklevel=3)
        elif writer_host != host or pid is None:
            warnings.warn(f"{folder} looks like a partial checkpoint of a killed export, but refquant cannot tell "
                          "whether its writer still runs (another host, or no process id in its name). Remove it "
                          "if no export is writing there.", stacklevel=3)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True
