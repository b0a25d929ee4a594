"""PTQ of Llama-shaped models on one GPU: refquant (compiled, reference) against modelopt, side by side.

For each shape and recipe, a model built from a config with seeded weights (bf16) is quantized as
a user would: calibration over the same batches, a forward of an evaluation batch, an export.
Measured per variant (plain bf16, modelopt, refquant compiled, refquant reference):

    calibration s    wall time of rq.quantize_model / mtq.quantize (the forward loop included; the
                     recipe is loaded, and modelopt's config made from it, before the clock starts);
                     for refquant, after a ";", its max calibration alone (weight pass, forwards,
                     amaxes stored; not the quantizers' insertion, the recipe's rules, the report).
                     The plain row's calibration comes after one untimed warm-up forward; with
                     --warm-up-calibration every quantizing variant's comes after the same
                     quantization of a copy on --warm-up-batches batches of other tokens (the
                     process's compiles and first calls out of the time, as plain's warm-up takes
                     them out of its own; more batches: nearer a long calibration's pace, where
                     fewer of the grouped experts' row counts are new); the JSON keeps each
                     warm-up's time (warm_up_s) and, for refquant, how many row counts the timed
                     calibration checked (row_counts_checked: refquant.hf.grouped_linear's one-time
                     check of each count a process meets). "[paired x]": the calibration (for
                     refquant its max calibration alone) over the mean of a plain copy's forwards
                     over the same batches right before and right after it (paired_calibration
                     in the JSON; the copy's memory kept out of the peak)
    forward ms       median of timed forwards of the evaluation batch (CUDA events, after warm-up);
                     the JSON keeps every forward's time and host time, in order, and the two
                     warm-up forwards' (the first is the first forward after calibration)
    export s         rq.export_checkpoint / modelopt's export_hf_checkpoint
    peak GiB         torch.cuda.max_memory_allocated over calibration + forward + export; the
                     pristine weights wait on the CPU, so the GPU holds the working model only. The
                     JSON's stage_peak_gib has each stage's own: calibration, the timed forwards,
                     the logits comparison (logits_of) and the export
    paired x plain   before the export, a plain copy of the model joins it on the device (its memory
                     kept out of the peak) and the two run turn about (plain, quantized, plain, ...): the median of each
                     pair's ratio. On a host whose speed changes from one moment to the next, the
                     forward column's ratio to the plain row compares two moments; a pair shares
                     one (benchmarks/README.md, "Reading the timings")
    vs modelopt      every quantizer's amax, the evaluation logits and every exported tensor,
                     bit for bit (refquant compiled and reference against modelopt's run)
    vs compiled      the same, for compiled_fallback against compiled

The plain row is the model as transformers runs it by default (MoE experts: grouped_mm where
torch has it), its calibration the same forwards after one warm-up forward. For an MoE shape a
plain_eager row adds the experts' eager loop (an F.linear per expert), the computation modelopt
quantizes and whose bits refquant reproduces; ratios are to the plain row.

Variants: plain (bf16, no quantizers), modelopt, compiled, reference, and compiled_fallback: the
compiled backend with its fast kernel launch off (REFQUANT_FAST_LAUNCH=0: Triton's
kernel[grid](...); refquant.compiled.private_api), to measure what it buys in the same run; and
compiled_folded: the compiled run with its weights folded after calibration (rq.fold_weights: each
fake-quantized weight computed once; its fold_s is recorded apart, and it exports nothing).
--fast-launch off (or on) sets REFQUANT_FAST_LAUNCH for every variant instead; each row records
whether the fast launch was on.

    python3 benchmarks/ptq_gpu.py --out DIR [--shapes small,large] [--recipes R ...]
        [--variants plain modelopt compiled compiled_fallback] [--fast-launch auto|on|off]

Writes DIR/ptq_gpu.json and prints a table last. No time is asserted: this is a report.
modelopt is optional (its columns stay empty when it does not import).
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import refquant as rq  # noqa: E402
from refquant.hf import grouped_linear  # noqa: E402
from compare_modelopt import logits_of  # noqa: E402

# Llama-shaped configs: "small" (0.6B) and "large" (Llama-2-7B's 6.7B); "moe" is Qwen3-MoE-shaped
# (Qwen3-30B-A3B's layer with 64 experts of 768, top-8, 8 layers: 2.7B parameters).
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320),
    "small": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "large": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny_moe": dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                     num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=320),
    "moe": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=64,
                num_experts_per_tok=8, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=32000),
}
DEFAULT_RECIPES = ("fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv", "nvfp4_default-fp8_kv")
VARIANTS = ("plain", "plain_eager", "modelopt", "compiled", "compiled_fallback", "compiled_folded", "reference")
DEFAULT_VARIANTS = ("plain", "plain_eager", "modelopt", "compiled", "reference")
PLAIN_VARIANTS = ("plain", "plain_eager")  # no quantizers: one row a shape
FAST_LAUNCH_SETTINGS = {"auto": None, "on": "1", "off": "0"}  # --fast-launch: REFQUANT_FAST_LAUNCH for the run


@contextlib.contextmanager
def fast_launch_setting(value: str | None):
    """REFQUANT_FAST_LAUNCH=value within the block (None: as it was), the fast launch deciding
    again on its next use, and again after the block."""
    if value is None:
        yield
        return
    from refquant.compiled import private_api

    before = os.environ.get(private_api.SETTING)
    os.environ[private_api.SETTING] = value
    private_api.forget_decisions()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(private_api.SETTING, None)
        else:
            os.environ[private_api.SETTING] = before
        private_api.forget_decisions()


def fast_paths_on() -> dict:
    """Whether refquant.compiled's fast kernel launch was on (None: not used) after a variant ran."""
    from refquant.compiled import private_api

    return {"kernel_launch": private_api.KERNEL_LAUNCH.on}


def build_model(shape: str, seed: int, device: torch.device):
    """The causal LM of SHAPES[shape] (Llama unless it names a model_type), transformers' own init
    under `seed`, bf16, eval, on device, with transformers' default experts implementation
    (modelopt and refquant switch a model with fused experts to the eager loop themselves)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(SHAPES[shape])
    model_type = settings.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, max_position_embeddings=4096, tie_word_embeddings=False, **settings)
    config._attn_implementation = "sdpa"
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]  # modelopt's export reads it
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # init straight in bf16: no fp32 copy of a 6.7B model
        try:
            with device:
                model = AutoModelForCausalLM.from_config(config)
        finally:
            torch.set_default_dtype(default)
    return model.eval()


def has_fused_experts(model) -> bool:
    return getattr(model.config, "_experts_implementation", None) is not None


def batches_for(shape: str, count: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, SHAPES[shape]["vocab_size"], (batch, seq), generator=generator) for _ in range(count)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot (Linux /proc/stat), or None: steal is time a
    hypervisor gave this machine's virtual CPUs to others."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])  # guest time is inside user time already


def timed_forward_ms(model, batch: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Median and spread of `repeats` forwards after two warm-ups (CUDA events on a GPU), and on
    a GPU the median host time: from the call until the forward returns, before waiting for the
    GPU. A host time near the forward's time means the host sets the pace (host-bound). Also, in
    order, each forward's time, host time and CPU time of this thread while it issued (host time
    well above it: the thread waited or was not running), and the machine's share of stolen CPU
    time over the timed forwards."""
    batch = batch.to(device)
    times, host, host_cpu, warm_up = [], [], [], []
    ticks_before = None
    with torch.no_grad():
        for step in range(repeats + 2):
            synchronize(device)
            if step == 2:
                ticks_before = machine_cpu_ticks()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                began, began_cpu = time.perf_counter(), time.thread_time()
                model(input_ids=batch)
                issued, issued_cpu = (time.perf_counter() - began) * 1e3, (time.thread_time() - began_cpu) * 1e3
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                began = time.perf_counter()
                model(input_ids=batch)
                elapsed = (time.perf_counter() - began) * 1e3
            if step < 2:
                warm_up.append(elapsed)
            else:
                times.append(elapsed)
                if device.type == "cuda":
                    host.append(issued)
                    host_cpu.append(issued_cpu)
    timing = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "each_ms": times,
              "warm_up_each_ms": warm_up}
    if host:
        timing["host_ms"] = statistics.median(host)
        timing["host_each_ms"] = host  # in order: a host that slows down or speeds up shows here
        timing["host_cpu_each_ms"] = host_cpu
    ticks_after = machine_cpu_ticks()
    if ticks_before and ticks_after and ticks_after[1] > ticks_before[1]:
        timing["machine_steal_share"] = (ticks_after[0] - ticks_before[0]) / (ticks_after[1] - ticks_before[1])
    return timing


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def run_variant(variant: str, recipe: str, pristine, shape: str, args, batches, eval_batch, workdir: Path,
                on_calibrated=None) -> dict:
    """One variant of one recipe on a fresh copy of the model; returns timings and what to compare.
    on_calibrated(model, eval_batch, device), when given, is called once the model is calibrated,
    before anything else runs on it (the pytest-benchmark suite times its forwards there)."""
    setting = "0" if variant == "compiled_fallback" else FAST_LAUNCH_SETTINGS[getattr(args, "fast_launch", "auto")]
    with fast_launch_setting(setting):
        result = _run_variant(variant, recipe, pristine, shape, args, batches, eval_batch, workdir, on_calibrated)
        if variant.startswith("compiled"):
            result["fast_paths"] = fast_paths_on()
    return result


@contextlib.contextmanager
def timed_forward_loop(device: torch.device, around=contextlib.nullcontext):
    """Within the block, refquant's max calibration (the weight pass, the forwards over the
    batches, the amaxes stored) is timed apart: {"s": seconds} once the block ends. The rest of
    rq.quantize_model is the quantizers' insertion, the recipe's rules and the report. around():
    a context the max calibration runs in (a profiler), its value kept as timing["around"]."""
    import refquant.hf.ptq as ptq_module

    timing = {"s": None, "around": None}
    calibrate = ptq_module.max_calibrate

    def timed(*args, **kwargs):
        synchronize(device)
        began = time.perf_counter()
        with around() as timing["around"]:
            out = calibrate(*args, **kwargs)
            synchronize(device)
        timing["s"] = time.perf_counter() - began
        return out

    ptq_module.max_calibrate = timed
    try:
        yield timing
    finally:
        ptq_module.max_calibrate = calibrate


def _run_variant(variant: str, recipe: str, pristine, shape: str, args, batches, eval_batch, workdir: Path,
                 on_calibrated=None) -> dict:
    device = torch.device(args.device)
    if variant == "modelopt":
        from compare_modelopt import modelopt_quant_cfg

        config = modelopt_quant_cfg(recipe)
    elif variant not in PLAIN_VARIANTS:
        loaded = rq.load_recipe(recipe)
    result: dict = {"variant": variant, "recipe": recipe}

    def quantize(model, calibration_batches) -> Optional[float]:
        """The variant's quantization of `model` on `calibration_batches`; refquant's max
        calibration alone, seconds (None for modelopt)."""
        if variant == "modelopt":
            quantize_with_modelopt(model, config, calibration_batches, device)
            return None
        flavor = "modelopt-cuda" if device.type == "cuda" else "modelopt-cpu"
        backend = "compiled" if variant.startswith("compiled") else variant
        with timed_forward_loop(device) as loop:
            rq.quantize_model(model, loaded, calibration_batches, backend=backend, flavor=flavor, progress=False)
        return loop["s"]

    if variant not in PLAIN_VARIANTS and getattr(args, "warm_up_calibration", False):
        # as the plain row's warm-up forward: the process's first-use costs (compiles, launcher
        # builds, the first cuDNN call) paid on a copy calibrated on other batches, timed apart
        warm = copy.deepcopy(pristine).to(device)
        warm_up_batches = batches_for(shape, args.warm_up_batches, batches[0].shape[0], batches[0].shape[1], args.seed + 3)
        synchronize(device)
        began = time.perf_counter()
        quantize(warm, warm_up_batches)
        synchronize(device)
        result["warm_up_s"] = time.perf_counter() - began
        del warm
    model = copy.deepcopy(pristine).to(device)
    plain, plain_gib = None, 0.0
    if variant not in PLAIN_VARIANTS and args.paired:
        # the calibration's own moment on the host: the same forwards of a plain copy right
        # before and right after it; the copy's memory is kept out of the peak
        held = allocated_gib(device)
        plain = copy.deepcopy(pristine).to(device)
        plain_gib = allocated_gib(device) - held
        plain_before_s = plain_forwards_s(plain, batches, device)
    reset_peak(device)
    if variant in PLAIN_VARIANTS:
        if variant == "plain_eager":
            model.set_experts_implementation("eager")
        synchronize(device)
        began = time.perf_counter()
        with torch.no_grad():
            model(input_ids=batches[0].to(device))  # warm-up: first-use costs out of the baseline
        synchronize(device)
        result["warm_up_s"] = time.perf_counter() - began
        result["calibration_s"] = plain_forwards_s(model, batches, device)
    else:
        checked = grouped_linear.row_counts_checked()
        synchronize(device)
        began = time.perf_counter()
        forwards_s = quantize(model, batches)
        if forwards_s is not None:
            result["calibration_forwards_s"] = forwards_s
        synchronize(device)
        result["calibration_s"] = time.perf_counter() - began
        if variant != "modelopt":
            result["row_counts_checked"] = grouped_linear.row_counts_checked() - checked
    calibration_peak = peak_gib(device)
    if plain is not None:
        calibration_peak = None if calibration_peak is None else calibration_peak - plain_gib
        plain_after_s = plain_forwards_s(plain, batches, device)
        result["paired_calibration"] = paired_calibration_ratio(result, plain_before_s, plain_after_s)
        del plain
        reset_peak(device)
    amax = amax_table(model) if variant not in PLAIN_VARIANTS and args.compare else None  # before any fold
    if variant == "compiled_folded":
        began = time.perf_counter()
        rq.fold_weights(model)
        synchronize(device)
        result["fold_s"] = time.perf_counter() - began
    known = [p for p in (calibration_peak, peak_gib(device)) if p is not None]
    stage_peaks = {"calibration": max(known) if known else None}  # each stage's peak apart (the whole run's: peak_gib)
    reset_peak(device)
    if on_calibrated is not None:
        on_calibrated(model, eval_batch, device)
    result["forward"] = timed_forward_ms(model, eval_batch, device, args.repeats)
    stage_peaks["forwards"] = peak_gib(device)
    reset_peak(device)
    logits = logits_of(model, eval_batch)
    stage_peaks["logits"] = peak_gib(device)
    reset_peak(device)
    if variant not in PLAIN_VARIANTS and args.paired:
        # before the export, which leaves modelopt's model holding exported weights (no longer a
        # fake-quant model); the plain copy's memory is kept out of the peak
        plain = copy.deepcopy(pristine).to(device)
        result["paired"] = paired_forward_ratio(model, plain, eval_batch, device, args.repeats)
        del plain
        reset_peak(device)
    if variant not in PLAIN_VARIANTS and variant != "compiled_folded" and not args.no_export:  # folded: no masters
        out = workdir / f"{recipe}-{variant}"
        began = time.perf_counter()
        if variant == "modelopt":
            from modelopt.torch.export import export_hf_checkpoint

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_hf_checkpoint(model, export_dir=out)
        else:
            rq.export_checkpoint(model, out)
        synchronize(device)
        result["export_s"] = time.perf_counter() - began
        result["export_dir"] = str(out)
    stage_peaks["export"] = peak_gib(device) if "export_s" in result else None
    known = [p for p in stage_peaks.values() if p is not None]
    result["peak_gib"] = max(known) if known else None
    result["stage_peak_gib"] = stage_peaks
    del model
    reset_peak(device)
    return result | {"_logits": logits, "_amax": amax}


def quantize_with_modelopt(model, config: dict, batches: list[torch.Tensor], device: torch.device) -> None:
    """mtq.quantize of `model` under a recipe's modelopt config (compare_modelopt.modelopt_quant_cfg),
    calibrated on `batches` (the batches refquant's calibration gets), as a modelopt user's forward
    loop would."""
    import modelopt.torch.quantization as mtq

    def forward_loop(m):
        for batch in batches:
            m(input_ids=batch.to(device))

    mtq.quantize(model, config, forward_loop)


def plain_forwards_s(model, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds of `model`'s forwards over `batches`, in order (the plain calibration's forwards)."""
    synchronize(device)
    began = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.to(device))
    synchronize(device)
    return time.perf_counter() - began


def paired_calibration_ratio(result: dict, plain_before_s: float, plain_after_s: float) -> dict:
    """The calibration against a plain copy's forwards over the same batches right before and
    right after it: their mean is the baseline; `ratio` for the whole calibration, and for
    refquant `forwards_ratio` for its max calibration alone."""
    baseline = (plain_before_s + plain_after_s) / 2
    paired = {"plain_before_s": plain_before_s, "plain_after_s": plain_after_s,
              "ratio": result["calibration_s"] / baseline}
    if result.get("calibration_forwards_s"):
        paired["forwards_ratio"] = result["calibration_forwards_s"] / baseline
    return paired


def paired_forward_ratio(model, plain, batch: torch.Tensor, device: torch.device, pairs: int) -> dict:
    """`pairs` pairs of forwards, plain first then `model`, each timed alone (CUDA events on a GPU)
    after one untimed pair: every forward's time in order, and the median of model / plain over
    the pairs."""
    batch = batch.to(device)

    def one_forward_ms(m) -> float:
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            m(input_ids=batch)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        began = time.perf_counter()
        m(input_ids=batch)
        return (time.perf_counter() - began) * 1e3

    plain_ms, model_ms = [], []
    with torch.no_grad():
        for step in range(pairs + 1):
            p, q = one_forward_ms(plain), one_forward_ms(model)
            if step:
                plain_ms.append(p)
                model_ms.append(q)
    ratios = [q / p for p, q in zip(plain_ms, model_ms)]
    return {"ratio_median": statistics.median(ratios), "plain_each_ms": plain_ms, "each_ms": model_ms}


def amax_table(model) -> dict:
    from compare_modelopt import quantizer_table

    return {name: amax for name, (enabled, amax) in quantizer_table(model).items() if enabled}


def compare_to_modelopt(ours: dict, theirs: dict) -> dict:
    """Every amax, the logits and the export of one run against another's (modelopt's, or for
    compiled_fallback the compiled run's), bit for bit."""
    from compare_modelopt import compare_exports, same_bits

    amax_a, amax_b = ours["_amax"], theirs["_amax"]
    names = set(amax_a) | set(amax_b)
    amax_same = sum(
        1 for n in names
        if n in amax_a and n in amax_b and (amax_a[n] is None) == (amax_b[n] is None)
        and (amax_a[n] is None or same_bits(amax_a[n], amax_b[n]))
    )
    logits_differ = int((ours["_logits"] != theirs["_logits"]).sum())
    result = {"amax_same": amax_same, "amax_compared": len(names), "logits_differing": logits_differ,
              "logits": ours["_logits"].numel()}
    if "export_dir" in ours and "export_dir" in theirs:
        exports = compare_exports(Path(ours["export_dir"]), Path(theirs["export_dir"]))
        result["export_ok"] = exports["ok"]
        result["export_mismatched"] = exports["mismatched"][:4] + exports["only_refquant"][:2] + exports["only_modelopt"][:2]
    return result


def modelopt_fp8_extension_loaded() -> bool | None:
    """Whether modelopt's FP8 CUDA extension is built and loads (None off CUDA). Without it
    modelopt's FP8 fake quant falls back to a slower eager path: its times are then not its best."""
    if not torch.cuda.is_available():
        return None
    try:
        from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

        return get_cuda_ext_fp8() is not None
    except Exception:  # noqa: BLE001 - no modelopt, or no extension: either way not loaded
        return False


def modelopt_available() -> bool:
    try:
        import pulp  # noqa: F401  (modelopt imports it at start-up; never used for quantization)
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "stand_ins"))
    try:
        import modelopt.torch.quantization  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no modelopt columns"
        return False
    return True


def prepare_shape(shape: str, args):
    """(pristine model on the CPU, calibration batches, evaluation batch, parameter count) of a shape."""
    device = torch.device(args.device)
    pristine = build_model(shape, args.seed, device).to("cpu")  # the GPU holds one model at a time
    reset_peak(device)
    batches = batches_for(shape, args.batches, args.batch_size, args.seq, args.seed + 1)
    eval_batch = batches_for(shape, 1, args.batch_size, args.seq, args.seed + 2)[0]
    return pristine, batches, eval_batch, sum(t.numel() for t in pristine.parameters())


def run_shape(shape: str, args, modelopt_ok: bool, rows: list[dict], save=lambda: None) -> None:
    """Every variant of every recipe on `shape`, appended to `rows`; save() after each recipe (a
    run cut short keeps what it measured)."""
    pristine, batches, eval_batch, parameters = prepare_shape(shape, args)
    recipes = args.recipes
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        plain = run_variant("plain", "-", pristine, shape, args, batches, eval_batch, Path(tmp))
        rows.append(table_row(shape, parameters, plain, plain))
        if "plain_eager" in args.variants and has_fused_experts(pristine):
            rows.append(table_row(shape, parameters, run_variant("plain_eager", "-", pristine, shape, args, batches,
                                                                 eval_batch, Path(tmp)), plain))
        for recipe in recipes:
            results = {}
            for variant in args.variants:
                if variant in PLAIN_VARIANTS or (variant == "modelopt" and not modelopt_ok):
                    continue
                try:
                    results[variant] = run_variant(variant, recipe, pristine, shape, args, batches, eval_batch, Path(tmp))
                except Exception as error:  # noqa: BLE001 - report and go on
                    import traceback

                    traceback.print_exc()
                    results[variant] = {"variant": variant, "recipe": recipe, "error": f"{type(error).__name__}: {error}"}
            for variant, result in results.items():
                if variant != "modelopt" and "modelopt" in results and "error" not in result and "error" not in results["modelopt"]:
                    result["vs_modelopt"] = compare_to_modelopt(result, results["modelopt"])
                if variant == "compiled_fallback" and "error" not in result and "error" not in results.get("compiled", {"error": ""}):
                    result["vs_compiled"] = compare_to_modelopt(result, results["compiled"])
                rows.append(table_row(shape, parameters, result, plain))
            for result in results.values():
                if "export_dir" in result:
                    shutil.rmtree(result["export_dir"], ignore_errors=True)
            print(format_table(rows[-len(results):]), flush=True)
            save()


def table_row(shape: str, parameters: int, result: dict, plain: dict) -> dict:
    """run_variant's result as a row of the table (and the JSON): what it compares left out, the
    shape, the model's parameter count, and the calibration and forward as ratios to plain's."""
    row = {k: v for k, v in result.items() if not k.startswith("_")}
    row["shape"] = shape
    row["parameters"] = parameters
    if "forward" in result and "forward" in plain:
        row["forward_over_plain"] = result["forward"]["median_ms"] / plain["forward"]["median_ms"]
        row["calibration_over_plain"] = result["calibration_s"] / plain["calibration_s"]
        if result.get("calibration_forwards_s"):
            row["calibration_forwards_over_plain"] = result["calibration_forwards_s"] / plain["calibration_s"]
    return row


def format_table(rows: list[dict]) -> str:
    lines = [
        "| shape | recipe | variant | calibration s (x plain) | forward ms (x plain) [min-max] | paired x plain | host ms | export s | peak GiB | vs modelopt: amax, logits, export |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['recipe']} | {r['variant']} | ERROR {r['error'][:80]} | | | | | | |")
            continue
        f = r["forward"]
        cal = f"{r['calibration_s']:.2f} ({r.get('calibration_over_plain', 1):.2f})"
        if r.get("calibration_forwards_s"):  # refquant: max calibration alone, then its ratio
            cal += f"; {r['calibration_forwards_s']:.2f} ({r['calibration_forwards_over_plain']:.2f})"
        if r["variant"] not in PLAIN_VARIANTS and "warm_up_s" in r:  # --warm-up-calibration
            cal += f" [warm-up {r['warm_up_s']:.2f}]"
        if r.get("row_counts_checked"):  # the grouped experts' one-time checks made in the timed calibration
            cal += f" [{r['row_counts_checked']} counts checked]"
        if "paired_calibration" in r:
            paired_calibration = r["paired_calibration"]
            cal += f" [paired {paired_calibration.get('forwards_ratio', paired_calibration['ratio']):.2f}]"
        fwd = f"{f['median_ms']:.1f} ({r.get('forward_over_plain', 1):.2f}) [{f['min_ms']:.1f}-{f['max_ms']:.1f}]"
        paired = f"{r['paired']['ratio_median']:.2f}" if "paired" in r else "-"
        host = f"{f['host_ms']:.1f}" if "host_ms" in f else "-"
        exp = f"{r['export_s']:.1f}" if "export_s" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        vs = "; ".join(f"{against}{comparison_text(r[key])}" for key, against in (("vs_modelopt", ""), ("vs_compiled", "vs compiled: "))
                       if key in r) or "-"
        lines.append(f"| {r['shape']} | {r['recipe']} | {r['variant']} | {cal} | {fwd} | {paired} | {host} | {exp} | {peak} | {vs} |")
    return "\n".join(lines)


def comparison_text(v: dict) -> str:
    return (f"{v['amax_same']}/{v['amax_compared']} same, "
            + ("logits same" if v["logits_differing"] == 0 else f"logits {v['logits_differing']}/{v['logits']} differ")
            + ("" if "export_ok" not in v else (", export same" if v["export_ok"] else ", export DIFF")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for ptq_gpu.json")
    parser.add_argument("--shapes", default="small,large", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--recipes", nargs="*", default=list(DEFAULT_RECIPES))
    parser.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                        help="compiled_fallback: the compiled backend with its fast kernel launch off, beside compiled")
    parser.add_argument("--fast-launch", choices=list(FAST_LAUNCH_SETTINGS), default="auto",
                        help="REFQUANT_FAST_LAUNCH for every variant: off (0), on (1), or auto (as set, else on where tested)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--warm-up-calibration", action="store_true",
                        help="before each quantizing variant's timed calibration, the same quantization of a copy on "
                             "--warm-up-batches batches of other tokens (its time: warm_up_s), as the plain row's warm-up "
                             "forward: calibration timed warm")
    parser.add_argument("--warm-up-batches", type=int, default=1,
                        help="batches of the warm-up calibration (other tokens than the timed batches'; default 1)")
    parser.add_argument("--no-paired", dest="paired", action="store_false",
                        help="skip the paired plain / quantized forwards and the plain forwards around each "
                             "calibration (they need room for a second model)")
    parser.add_argument("--workdir", default=None, help="where the exports go (deleted after comparing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; use {', '.join(SHAPES)}")
    warnings.filterwarnings("ignore", module="modelopt")
    modelopt_ok = "modelopt" in args.variants and modelopt_available()
    # the amax tables are read only to compare with modelopt's, or the fallback's with compiled's
    args.compare = modelopt_ok or ("compiled" in args.variants and "compiled_fallback" in args.variants)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"device": device_name, "torch": torch.__version__, "modelopt": modelopt_ok,
                "modelopt_fp8_extension": modelopt_fp8_extension_loaded() if modelopt_ok else None,
                "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "compare")}, "rows": rows}

    def save() -> None:
        (args.out / "ptq_gpu.json").write_text(json.dumps(document, indent=1, default=str) + "\n")

    for shape in shapes:
        run_shape(shape, args, modelopt_ok, rows, save)
    save()
    print(f"\n{device_name}, torch {torch.__version__}; {args.batches} calibration batches of {args.batch_size} x {args.seq} tokens")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
