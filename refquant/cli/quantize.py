"""`refquant quantize`: the main job. PTQ of a causal LM (the built-in small Llama-style model, or a
local Hugging Face folder), a printed report, and a deployable checkpoint.

    python3 -m refquant quantize                              # built-in model, text and recipe
    python3 -m refquant quantize --model ./my-llama --calib-text notes.txt --out ./my-llama-nvfp4
    python3 -m refquant quantize --model ./big-llama --device-map auto      # spread over the GPUs
    torchrun --nproc-per-node 2 -m refquant quantize --device cuda ...      # data-parallel calibration

Everything runs offline: a local model folder is loaded with local_files_only=True. Bad input
(a missing model folder, an unknown recipe, a model with nothing to quantize, an output folder
that exists) is reported before any file is written, and the checkpoint is written atomically
by refquant.hf.export, so a failed run leaves no output behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from ..hf import models
from ..quant.distributed import stop_together

DEFAULT_RECIPE = "nvfp4_default-fp8_cast_kv"
DEFAULT_OUT = "out/refquant-ckpt"
KV_CACHE_QFORMATS = ("fp8", "fp8_cast", "nvfp4", "nvfp4_cast", "none")
# A folder's tokenizer must split this into several ordinary tokens to count as usable.
TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog."
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' from_pretrained strategies
# Ranks wait in a collective while rank 0 writes a big checkpoint: longer than NCCL's 10-minute default.
DISTRIBUTED_TIMEOUT = timedelta(hours=2)


def choose_recipe(recipe: str | None, qformat: str | None, kv_cache_qformat: str | None):
    """(Recipe, notices) from the command-line choice.

    --recipe given: that recipe, authoritative (--qformat and --kv-cache-qformat are ignored, with a
    notice, as modelopt's hf_ptq does). Else --qformat / --kv-cache-qformat given: the built-in body
    for qformat (default nvfp4) with the KV entries appended (refquant.quant.recipe.select_recipe).
    Else the default recipe nvfp4_default-fp8_cast_kv.
    """
    from ..quant.recipe import select_recipe

    if recipe is not None:
        found, notices = select_recipe(recipe, kv_cache_qformat=kv_cache_qformat)
        if qformat is not None:
            ignored = f"--qformat {qformat} is ignored: the recipe {found.name!r} sets every quantizer's format."
            notices = [ignored, *notices]
        return found, notices
    if qformat is None and kv_cache_qformat is None:
        return select_recipe(DEFAULT_RECIPE)
    return select_recipe(None, qformat=qformat or "nvfp4", kv_cache_qformat=kv_cache_qformat)


def start_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL for --device cuda, with this
    rank on the GPU of its LOCAL_RANK; gloo on the CPU) and return (rank, world size, device).
    Else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(
                f"--device {device} under torchrun: pass --device cuda; each rank takes the GPU of its LOCAL_RANK."
            )
        device, backend = f"cuda:{local_rank}", "nccl"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=DISTRIBUTED_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


def check_device(device: str) -> None:
    """--device must name a torch device that exists here: a tensor can be made on it."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a torch device. Pass cpu, cuda or cuda:N (a GPU's index).") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}).")
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"--device {device}: torch cannot use it here ({error}). Pass cpu or cuda.") from None


def load_model(model_dir: str | None, device: str, device_map: str | None = None):
    """(model, tokenize, description). None: the built-in model with the byte tokenizer.
    device_map: transformers' from_pretrained(device_map=...) through accelerate, instead of device."""
    if model_dir is None:
        model = models.build_builtin_model().to(device)
        return model, models.byte_tokenize, "built-in Llama-style model (seeded)"
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model {model_dir}: no such folder. Pass a local Hugging Face model folder (with config.json)."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model_dir}: the folder has no config.json, so it is not a Hugging Face model folder."
        )
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from ..hf.export.validate import check_safetensors_file

    for weights in sorted(path.glob("*.safetensors")):
        try:
            check_safetensors_file(weights)  # a truncated file, named, before transformers reads it
        except ValueError as error:
            raise ValueError(f"--model {model_dir}: {error}") from None
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto", **placement)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise ValueError(f"--model {model_dir}: transformers could not load it as a causal LM: {error}") from error
    model = (model if device_map is not None else model.to(device)).eval()
    return model, folder_tokenize(path, model_dir, model.get_input_embeddings().num_embeddings), str(path)


def folder_tokenize(path: Path, model_dir: str, vocab_size: int):
    """text -> int64 ids: the folder's own tokenizer when it has a usable one, else the built-in
    byte tokenizer (a notice says so) when the model's vocabulary has room for its ids.

    A usable tokenizer encodes TOKENIZER_PROBE to at least two distinct non-special ids: from a
    folder without tokenizer files transformers may build an empty tokenizer from config.json
    (Qwen3, Gemma) instead of raising, and every text then has 0 or 1 tokens."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        problem = "has no tokenizer files"
    else:
        ids = tokenizer(TOKENIZER_PROBE)["input_ids"]
        if len(set(ids) - set(tokenizer.all_special_ids)) >= 2:
            return lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
        problem = (f"has no usable tokenizer (transformers built one that encodes the {len(TOKENIZER_PROBE)}-character "
                   f"sentence {TOKENIZER_PROBE!r} to {len(ids)} token(s): are its tokenizer files missing?)")
    if vocab_size < models.BYTE_VOCAB:
        raise ValueError(
            f"--model {model_dir} {problem}, and its vocabulary of {vocab_size} ids is too small for the built-in "
            f"byte tokenizer ({models.BYTE_VOCAB}). Add its tokenizer files (tokenizer.json, tokenizer_config.json)."
        )
    print(f"note: {model_dir} {problem}; using the built-in byte-level tokenizer.", file=sys.stderr)
    return models.byte_tokenize


def check_device_map(args, world: int) -> None:
    if args.device_map is None:
        return
    if args.model is None:
        raise ValueError("--device-map needs --model DIR: it spreads a local Hugging Face model over the devices.")
    if args.device != "cpu":
        raise ValueError(f"--device {args.device} with --device-map {args.device_map}: pass one of them, not both.")
    if world > 1:
        raise ValueError(
            f"--device-map {args.device_map} under torchrun: every rank would spread its copy over all the GPUs. "
            "Use --device-map in one process, or torchrun with --device cuda (one GPU a rank)."
        )
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError(
            f"--device-map {args.device_map} needs accelerate, which transformers uses to place the layers: "
            "pip install accelerate==1.15.0 (or refquant[multigpu])."
        )


def run(args) -> int:
    import torch.distributed as dist

    joined = not (dist.is_available() and dist.is_initialized())
    rank, world, args.device = start_distributed(args.device)
    try:
        status = _run(args, rank, world)
        if world > 1 and joined:
            # Every rank done before any tears its connections down: a rank that destroys its group
            # while rank 0 is still writing makes gloo on rank 0 abort the process at exit now and
            # then (SIGABRT, "terminate called without an active exception").
            dist.barrier()
        return status
    finally:
        if world > 1 and joined and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, rank: int, world: int) -> int:
    """The main job on this rank: every rank calibrates batches[rank::world]; rank 0 reports and writes.
    Under torchrun a rank that fails before calibration, or between calibration and the export,
    stops the others at once (stop_together) instead of leaving them in the next collective."""
    from ..hf.ptq import quantize_model

    with stop_together("before calibration"):
        out_dir, recipe, model, calib_batches, eval_batch, description = _prepare(args, rank, world)
    from ..hf.export import export_checkpoint

    report = quantize_model(
        model, recipe, calib_batches[rank::world], backend=args.backend, flavor=args.flavor,
        eval_batch=eval_batch, progress=not args.no_progress,
    )
    with stop_together("after calibration, before the export"):
        if args.sensitivity is not None:
            from ..hf.sensitivity import measure_sensitivity

            # every rank (the same calibrated model, the same batch), so all reach the export together
            report.sensitivity = measure_sensitivity(
                model, eval_batch, granularity=args.sensitivity, progress=not args.no_progress and rank == 0
            )
        if rank == 0:
            print(report.to_table(show_disabled=args.show_disabled, sort_by=None if args.sort == "module" else args.sort))
    export_checkpoint(model, out_dir, max_shard_size=args.max_shard_size)  # every rank calls it; rank 0 writes
    if rank != 0:
        return 0
    print(f"\ncheckpoint written to {out_dir}")
    if args.report_json is not None:
        _write_atomically(Path(args.report_json), report.to_json(indent=2))
        print(f"report written to {args.report_json}")
    if args.plot is not None:
        from ..hf.plots import plot_report

        for path in plot_report(report, args.plot, model_name=description):
            print(f"plot written to {path}")
    return 0


def _prepare(args, rank: int, world: int):
    """Every check of the arguments (before any work), then the recipe, the model and the batches:
    (out_dir, recipe, model, calib_batches, eval_batch, description)."""
    out_dir = Path(args.out)
    if out_dir.exists():
        raise FileExistsError(
            f"--out {out_dir} exists; refquant never overwrites a checkpoint. Remove it or pass another --out."
        )
    if args.report_json is not None and not Path(args.report_json).resolve().parent.is_dir():
        raise FileNotFoundError(f"--report-json {args.report_json}: its folder does not exist.")
    if args.calib_text is not None and not Path(args.calib_text).is_file():
        raise FileNotFoundError(f"--calib-text {args.calib_text}: no such file.")
    if args.plot is not None:
        _check_plot_folder(args.plot)
    check_device(args.device)
    check_device_map(args, world)
    try:
        from ..hf.export import parse_shard_size
    except ImportError as error:
        raise ValueError(f"cannot write a checkpoint: refquant.hf.export is not available ({error}).") from error

    try:
        parse_shard_size(args.max_shard_size)
    except ValueError as error:
        raise ValueError(f"--max-shard-size {args.max_shard_size}: {error}") from None
    recipe, notices = choose_recipe(args.recipe, args.qformat, args.kv_cache_qformat)
    for notice in notices if rank == 0 else ():
        print(f"note: {notice}", file=sys.stderr)
    model, tokenize, description = load_model(args.model, args.device, args.device_map)
    if args.calib_text is None:
        text = models.CALIBRATION_TEXT
    else:
        text = Path(args.calib_text).read_text(encoding="utf-8")
    calib_batches, eval_batch = models.token_batches(
        tokenize(text), num_batches=args.calib_batches, seq_len=args.seq_len
    )
    where = args.calib_text or "built-in"
    if rank == 0:
        ranks = f"; {world} ranks (data parallel: each calibrates 1 batch in {world})" if world > 1 else ""
        print(f"model: {description}; recipe: {recipe.name}; calibration text: {where}{ranks}", file=sys.stderr)
    return out_dir, recipe, model, calib_batches, eval_batch, description


def _check_plot_folder(folder: str) -> None:
    """--plot needs matplotlib and a folder (or a path to create one): checked before any work."""
    from ..hf.plots import MissingPlotDependency, require_matplotlib

    try:
        require_matplotlib()
    except MissingPlotDependency as error:
        raise ValueError(f"--plot {folder}: {error}") from None
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--plot {folder}: exists and is not a folder. Pass a folder for the PNGs.")


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="PTQ of a causal LM: calibrate, print the report, write a deployable checkpoint",
        description=(
            "Quantize a causal LM as modelopt's PTQ does: insert quantizers, apply a recipe, run max "
            "calibration, print a per-quantizer report with the quality cost (logit error and "
            "perplexity against the original model), and write a Hugging Face checkpoint in "
            "modelopt's format. With no arguments it runs offline on a built-in Llama-style model "
            "(4 layers, hidden 256, GQA, seeded weights) with built-in calibration text and the "
            f"recipe {DEFAULT_RECIPE}. Under torchrun each rank calibrates its share of the batches "
            "(data parallel) and rank 0 reports and writes; --device-map spreads one model over the GPUs."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", metavar="DIR",
        help="local Hugging Face model folder (loaded offline); default: the built-in model")
    add("--calib-text", metavar="FILE",
        help="UTF-8 text file to calibrate on; default: built-in paragraphs. Its last --seq-len tokens "
        "are the evaluation batch")
    add("--recipe", metavar="NAME_OR_PATH",
        help=f"a shipped recipe name (see `refquant recipes list`) or a recipe file; default {DEFAULT_RECIPE} "
        "when neither --qformat nor --kv-cache-qformat is given. A recipe is authoritative: it ignores both")
    add("--qformat", choices=("fp8", "nvfp4"),
        help="no recipe: weights and inputs in this format (nvfp4 when only --kv-cache-qformat is given)")
    add("--kv-cache-qformat", choices=KV_CACHE_QFORMATS,
        help="no recipe: the K/V format (the *_cast ones use the constant amax 448; default fp8_cast); "
        "ignored with --recipe")
    add("--device", default="cpu",
        help="torch device to quantize on, e.g. cpu or cuda (under torchrun: cuda, each rank its LOCAL_RANK's GPU)")
    add("--device-map", choices=DEVICE_MAPS,
        help="with --model: spread the model over the visible GPUs (and CPU / disk when they are full) with "
        "transformers' from_pretrained(device_map=...) and accelerate, instead of --device")
    add("--backend", choices=("reference", "compiled"), default="reference",
        help="numerics: the eager reference or refquant.compiled")
    add("--flavor", choices=("modelopt-cpu", "modelopt-cuda"), default="modelopt-cpu",
        help="which modelopt run the FP8 numerics reproduce (refquant's docs/contract.md §2)")
    add("--out", default=DEFAULT_OUT, metavar="DIR", help="checkpoint folder to create (must not exist)")
    add("--max-shard-size", default="10GB", metavar="SIZE",
        help="largest safetensors file, in bytes or with a unit (5GB, 500MB, 2GiB); past it the checkpoint is "
        "sharded with model.safetensors.index.json")
    add("--report-json", metavar="FILE", help="also write the report as JSON to FILE")
    add("--calib-batches", type=int, default=16, metavar="N", help="calibration batches")
    add("--seq-len", type=int, default=128, metavar="N", help="tokens per batch")
    add("--show-disabled", action="store_true", help="list disabled quantizers one per line")
    add("--no-progress", action="store_true", help="no calibration progress bar")
    add("--sort", choices=("module", "sqnr", "rel_error", "clipped", "zeroed"), default="module",
        help="order of the per-quantizer table: module order, or the worst first by that error column")
    add("--sensitivity", nargs="?", const="block", choices=("block", "layer"), metavar="{block,layer}",
        help="also quantize one decoder block (default) or one layer at a time and rank them by logit "
        "error; the report suggests recipe rules that keep the worst unquantized (bf16)")
    add("--plot", metavar="DIR",
        help="write PNGs to DIR: SQNR and amax per quantizer by depth, and the sensitivity ranking "
        "(needs matplotlib: pip install matplotlib, or the 'plot' extra)")
    parser.set_defaults(func=run)
