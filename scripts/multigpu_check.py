"""Beyond one GPU, checked on the hardware: a model split over two GPUs by accelerate, an MoE model
loaded over them with --device-map auto, and data-parallel calibration over NCCL, each against one
GPU, bit for bit and byte for byte.

Split (one process, two GPUs):
    python3 scripts/multigpu_check.py --out OUT/split
  A Llama-shaped model (default 8 layers, hidden 2048, MLP 5632, 16 query / 4 KV heads of 128, vocab
  32000, bf16, seeded weights) is built on the CPU. Unquantized control: its logits on cuda:0 and
  dispatched over both GPUs (accelerate's infer_auto_device_map with
  no_split_module_classes=["LlamaDecoderLayer"] and a max_memory that forces a split, then
  dispatch_model). Then per recipe: one copy quantized on cuda:0, one dispatched over both GPUs,
  the same calibration batches; compared: every quantizer's enabled flag and amax (bits, dtype,
  shape), that each amax lives on its layer's execution device, the logits of an evaluation batch
  (bits), every file of the exported checkpoint (bytes), and the report's experts without tokens.

MoE split (one process, two GPUs):
    python3 scripts/multigpu_check.py --moe --layers 8 --out OUT/moe
  A Qwen3-MoE-shaped model (hidden 2048, 16 query / 4 KV heads of 128, 64 experts of 768, 8 a
  token, vocab 32000, --layers deep, bf16, seeded weights) is saved to OUT/moe/model and loaded from
  there as `python3 -m refquant quantize --model DIR` loads it: with --device cuda on cuda:0, and
  with --device-map auto (transformers' from_pretrained(device_map="auto"): accelerate spreads it
  over both GPUs). Quantized with --backend compiled (default here) and the CUDA flavor, each recipe
  (default nvfp4_default-fp8_kv) is compared as in the split check; and, where modelopt imports
  (--no-modelopt skips it), modelopt 0.47 quantizes the same folder on the same device map:
  every quantizer's enabled flag and amax, the logits (bits) and every exported tensor against
  refquant's split model (tests/modelopt_compare.py).

Data parallel (two processes, one GPU each, NCCL):
    python3 -m torch.distributed.run --nproc-per-node 2 scripts/multigpu_check.py --dp --out OUT/dp
  Rank 0 first calibrates over all batches alone (before the process group exists) and exports;
  then both ranks calibrate the same model on half the batches each (batches[rank::2]) and
  export (rank 0 writes). Compared: every amax on both ranks with the single-rank one, and the
  checkpoints' bytes.

The same logic runs on the CPU, for a check before the GPU run:
    python3 scripts/multigpu_check.py --device cpu --tiny --out OUT/split
    python3 scripts/multigpu_check.py --device cpu --moe --layers 2 --hidden 64 --heads 4 --kv-heads 2 \
        --experts 8 --experts-per-token 2 --moe-intermediate 32 --vocab 300 --out OUT/moe
    python3 -m torch.distributed.run --nproc-per-node 2 scripts/multigpu_check.py --dp --device cpu --tiny --out OUT/dp
(--tiny: refquant's built-in 4-layer model; the split is accelerate's hooks on one device. --moe on
the CPU: device_map="auto" with a max_memory that leaves the CPU room for about 90% of the model,
so the last layers go to disk, loaded by accelerate's offload hooks; modelopt's NVFP4 logits are
compared on a GPU only, as its CPU path is not its GPU kernel.)

Writes OUT/split.json, OUT/moe.json or OUT/dp.json (after every recipe, so a timeout keeps what was
done), prints a table, exits 1 on any difference or error. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, set before torch is imported): the device
forbids it.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(1, str(REPO / "tests"))  # modelopt_compare: the families' models, modelopt's side of a comparison
import modelopt_compare as mc  # noqa: E402
import refquant as rq  # noqa: E402
from refquant.hf.dispatch import execution_device  # noqa: E402
from refquant.quant.quantizer import named_quantizers  # noqa: E402

RECIPES = ("nvfp4_default-fp8_kv", "fp8_default-fp8_cast_kv", "nvfp4_default-nvfp4_kv")
MOE_RECIPES = ("nvfp4_default-fp8_kv",)
CPU_SHARE_OF_MOE = 0.9  # --moe on the CPU: max_memory for about 90% of the model, the rest on disk


# --- the model and the data -------------------------------------------------------------------
def build_model(args) -> torch.nn.Module:
    """The seeded bf16 model on the CPU, in eval mode."""
    if args.tiny:
        from refquant.hf.models import build_builtin_model

        return build_builtin_model(seed=args.seed)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def build_moe_model(args) -> torch.nn.Module:
    """The seeded bf16 Qwen3-MoE-shaped model on the CPU, in eval mode (every layer MoE)."""
    config = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        moe_intermediate_size=args.moe_intermediate, num_experts=args.experts, num_experts_per_tok=args.experts_per_token,
        norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    return mc.seeded_model(mc.Family("Qwen3MoeForCausalLM", "Qwen3MoeConfig", config), args.seed)


def load_on_one_device(folder: Path, device: torch.device) -> torch.nn.Module:
    """The saved model as `python3 -m refquant quantize --model DIR --device DEVICE` loads it."""
    from refquant.cli.quantize import load_model

    return load_model(str(folder), str(device))[0]


def load_split(folder: Path, args, offload: Path) -> tuple[torch.nn.Module, dict]:
    """The saved model as `--model DIR --device-map auto` loads it (from_pretrained(device_map="auto"):
    over the GPUs), or on the CPU with a max_memory that sends its last layers to disk, offloaded
    into `offload`. Returns (model, device map)."""
    if args.device == "cuda":
        from refquant.cli.quantize import load_model

        model = load_model(str(folder), "cpu", "auto")[0]
    else:
        model_size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
        model = load_on_device_map(folder, "auto", offload, max_memory={"cpu": int(model_size * CPU_SHARE_OF_MOE)})
    return model, dict(model.hf_device_map)


def load_on_device_map(folder: Path, device_map, offload: Path, **options) -> torch.nn.Module:
    """from_pretrained(folder, device_map=device_map), offloaded weights into `offload`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto", device_map=device_map,
                                                offload_folder=str(offload), **options).eval()


def batches(args, vocab: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    calib = [torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=generator) for _ in range(args.calib_batches)]
    return calib, torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=generator)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def split_over_two(model: torch.nn.Module, args) -> tuple[torch.nn.Module, dict]:
    """`model` dispatched by accelerate: over cuda:0 and cuda:1 (infer_auto_device_map with a
    max_memory that leaves cuda:0 room for about half of it), or on the CPU the same hooks with
    force_hooks. Returns (model, device map)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if args.device == "cpu":
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers)})
        return dispatch_model(model, device_map, force_hooks=True), device_map
    size = model_bytes(model)
    max_memory = {0: int(size * 0.55), 1: int(size * 2), "cpu": 0}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["LlamaDecoderLayer"])
    used = set(device_map.values())
    if used != {0, 1}:  # the heuristic left one GPU out or went to the CPU: split by hand, half the layers each
        layers = model.config.num_hidden_layers
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
        device_map.update({f"model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)})
    return dispatch_model(model, device_map), device_map


# --- what is compared -------------------------------------------------------------------------
def quantizer_state(model) -> dict[str, dict]:
    state = {}
    for name, quantizer in named_quantizers(model):
        amax = quantizer.amax if quantizer.is_calibrated else None
        state[name] = {"enabled": quantizer.is_enabled, "amax": None if amax is None else amax.detach().cpu().clone()}
    return state


def quantizer_layer(model, quantizer_name: str) -> torch.nn.Module:
    """The layer a quantizer belongs to: its parent module, or for an expert's quantizer in a
    ModuleList (`...experts.down_proj_weight_quantizers.3`) the experts module holding the list."""
    layer_name = quantizer_name.rpartition(".")[0]
    while isinstance(model.get_submodule(layer_name), torch.nn.ModuleList):
        layer_name = layer_name.rpartition(".")[0]
    return model.get_submodule(layer_name)


def amax_devices_wrong(model) -> list[str]:
    """Calibrated quantizers whose amax is not on their layer's execution device."""
    wrong = []
    for name, quantizer in named_quantizers(model):
        if quantizer.is_calibrated:
            layer = quantizer_layer(model, name)
            if quantizer.amax.device != execution_device(layer):
                wrong.append(f"{name}: {quantizer.amax.device} vs {execution_device(layer)}")
    return wrong


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def compare_quantizers(a: dict, b: dict) -> dict:
    """Counts over the enabled quantizers of `a`, and the first names that differ."""
    enabled = [n for n, s in a.items() if s["enabled"]]
    differing = []
    for name in enabled:
        x, y = a[name], b.get(name)
        if y is None or not y["enabled"] or (x["amax"] is None) != (y["amax"] is None):
            differing.append(name)
        elif x["amax"] is not None and not (
            x["amax"].dtype == y["amax"].dtype and x["amax"].shape == y["amax"].shape and torch.equal(bits(x["amax"]), bits(y["amax"]))
        ):
            differing.append(name)
    calibrated = sum(1 for n in enabled if a[n]["amax"] is not None)
    return {"enabled": len(enabled), "calibrated": calibrated, "equal": len(enabled) - len(differing),
            "differing": differing[:8], "same_names": sorted(a) == sorted(b)}


def logits(model, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.to(device)).logits.float().cpu()


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"bit_equal": bool(torch.equal(bits(a), bits(b))), "max_abs_diff": float((a - b).abs().max())}


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def compare_checkpoints(a: Path, b: Path) -> dict:
    x, y = file_hashes(a), file_hashes(b)
    return {"files": len(x), "equal": x == y, "differing": sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))}


def environment(args) -> dict:
    import accelerate
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "refquant": rq.__version__, "device": args.device,
            "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")}
    try:
        info["modelopt"] = importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        info["modelopt"] = None
    if args.device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def write_json(path: Path, document: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def compare_experts_without_tokens(a: list[str], b: list[str]) -> dict:
    """The report's experts without tokens of two runs: how many (in `a`), whether equal, a few."""
    return {"count": len(a), "equal": a == b, "first": a[:8]}


def quantize_options(args) -> dict:
    """quantize_model's backend and flavor: --moe quantizes with its device's flavor (what modelopt
    computes there), the Llama-shaped model with the default (modelopt-cpu)."""
    options = {"backend": args.backend}
    if args.moe:
        options["flavor"] = "modelopt-cuda" if args.device == "cuda" else "modelopt-cpu"
    return options


def model_summary(config) -> dict:
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
    return {key: getattr(config, key) for key in keys if hasattr(config, key)}


# --- split: one GPU against two ---------------------------------------------------------------
def run_split(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"--device cuda: the split check needs 2 GPUs, found {torch.cuda.device_count()}.")
    one = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    json_path = out / ("moe.json" if args.moe else "split.json")
    started = time.perf_counter()
    master = build_moe_model(args) if args.moe else build_model(args)
    calib, eval_batch = batches(args, master.config.vocab_size)
    document = {"check": "moe-split" if args.moe else "split", "environment": environment(args),
                "model_bytes": model_bytes(master), "model": model_summary(master.config),
                "quantize": quantize_options(args), "calibration": {"batches": len(calib), "shape": list(calib[0].shape)},
                "recipes": {}}
    print(f"model built in {time.perf_counter() - started:.1f} s: {document['model_bytes'] / 2**30:.2f} GiB", flush=True)
    if args.moe:  # loaded from a folder, as the command line loads a model
        folder = out / "model"
        master.save_pretrained(folder)
        del master

        def on_one_device():
            return load_on_one_device(folder, one)

        def spread(what: str):
            return load_split(folder, args, out / "offload" / what)
    else:
        def on_one_device():
            return copy.deepcopy(master).to(one)

        def spread(what: str):
            return split_over_two(copy.deepcopy(master), args)

    single = on_one_device()
    split, device_map = spread("control")
    document["device_map"] = {str(k): str(v) for k, v in device_map.items()}
    # on GPUs the check means something only if the map uses both ("auto" could keep a small model on one)
    document["split_uses_both_gpus"] = args.device != "cuda" or {"0", "1"} <= set(document["device_map"].values())
    document["control"] = compare_logits(logits(single, eval_batch, one), logits(split, eval_batch, one))
    print(f"unquantized control, one device vs split: logits bit-equal {document['control']['bit_equal']}; "
          f"device map over {sorted(set(document['device_map'].values()))}", flush=True)
    del single, split
    write_json(json_path, document)

    failed = not (document["control"]["bit_equal"] and document["split_uses_both_gpus"])
    for recipe in args.recipes:
        result: dict = {}
        document["recipes"][recipe] = result
        try:
            begun = time.perf_counter()
            single = on_one_device()
            single_report = rq.quantize_model(single, rq.load_recipe(recipe), calib, progress=False, **quantize_options(args))
            single_logits = logits(single, eval_batch, one)
            rq.export_checkpoint(single, out / "single" / recipe)
            single_state = quantizer_state(single)
            del single
            result["seconds_single"] = round(time.perf_counter() - begun, 1)

            begun = time.perf_counter()
            split, device_map = spread(recipe)
            split_report = rq.quantize_model(split, rq.load_recipe(recipe), calib, progress=False, **quantize_options(args))
            result["amax_off_device"] = amax_devices_wrong(split)[:8]
            result["logits"] = compare_logits(single_logits, logits(split, eval_batch, one))
            # the quantizers first: an export refuses a model whose calibration missed quantizers
            result["quantizers"] = compare_quantizers(single_state, quantizer_state(split))
            result["experts_without_tokens"] = compare_experts_without_tokens(single_report.experts_without_tokens,
                                                                              split_report.experts_without_tokens)
            rq.export_checkpoint(split, out / "split" / recipe)
            result["seconds_split"] = round(time.perf_counter() - begun, 1)
            result["checkpoint"] = compare_checkpoints(out / "single" / recipe, out / "split" / recipe)
            if args.moe:
                result["modelopt"] = compare_with_modelopt(split, recipe, folder, device_map, calib, eval_batch, args, one)
            del split
            result["ok"] = bool(
                result["quantizers"]["same_names"] and result["quantizers"]["equal"] == result["quantizers"]["enabled"]
                and result["logits"]["bit_equal"] and result["checkpoint"]["equal"] and not result["amax_off_device"]
                and result["experts_without_tokens"]["equal"] and result.get("modelopt", {"ok": True})["ok"]
            )
        except Exception as error:  # noqa: BLE001 - recorded, and the next recipe still runs
            result["error"] = f"{type(error).__name__}: {error}"
            result["traceback"] = traceback.format_exc()
            result["ok"] = False
            print(result["traceback"], file=sys.stderr, flush=True)
        failed |= not result["ok"]
        write_json(json_path, document)
        gc.collect()  # accelerate's hooks make reference cycles: free the dispatched copy now
        if args.device == "cuda":
            torch.cuda.empty_cache()

    print_split_table(document)
    document["ok"] = not failed
    document["seconds"] = round(time.perf_counter() - started, 1)
    write_json(json_path, document)
    return 1 if failed else 0


def compare_with_modelopt(split, recipe: str, folder: Path, device_map: dict, calib, eval_batch, args, one) -> dict:
    """modelopt 0.47 quantizes the saved model `folder` on `device_map` (the split's) with the same
    batches; compared with refquant's split model: every quantizer's enabled flag and amax, the
    logits (bits; not NVFP4 on the CPU), every exported tensor (refquant's is in OUT/split/RECIPE).
    Where modelopt does not import, or with --no-modelopt: {"skipped": why, "ok": True}."""
    if args.no_modelopt:
        return {"skipped": "--no-modelopt", "ok": True}
    try:
        import modelopt.torch.export  # noqa: F401
        import modelopt.torch.quantization  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means no comparison
        return {"skipped": f"modelopt does not import ({type(error).__name__}: {error})", "ok": True}
    out = Path(args.out)
    begun = time.perf_counter()
    theirs = load_on_device_map(folder, device_map, out / "offload" / f"{recipe}-modelopt")
    mc.quantize_with_modelopt(theirs, recipe, calib)
    result: dict = {"quantizers": mc.compare_quantizers(split, theirs)}
    if args.device == "cpu" and "nvfp4" in recipe:
        result["logits_skipped"] = "modelopt's NVFP4 fake quant on the CPU is not its GPU kernel"
    else:
        result["logits"] = mc.compare_logits(logits(split, eval_batch, one), logits(theirs, eval_batch, one))
    mc.export_with_modelopt(theirs, out / "modelopt" / recipe)
    result["export"] = mc.compare_exports(out / "split" / recipe, out / "modelopt" / recipe)
    result["seconds"] = round(time.perf_counter() - begun, 1)
    result["ok"] = bool(result["quantizers"]["ok"] and result["export"]["ok"] and result.get("logits", {"identical": True})["identical"])
    return result


def print_split_table(document: dict) -> None:
    gpus = document["environment"].get("gpus", ["cpu"])
    print(f"\nsplit model vs one device ({', '.join(gpus)}; device map: "
          f"{sorted(set(document['device_map'].values()))}); control logits bit-equal: {document['control']['bit_equal']}")
    print(f"{'recipe':<26} {'amax equal':>14} {'logits':>8} {'checkpoint':>12} {'amax on layer device':>22} "
          f"{'experts w/o tokens':>19}  ok")
    for recipe, r in document["recipes"].items():
        if "error" in r:
            print(f"{recipe:<26} error: {r['error']}")
            continue
        q, e = r["quantizers"], r["experts_without_tokens"]
        print(f"{recipe:<26} {q['equal']:>6}/{q['enabled']:<7} {('equal' if r['logits']['bit_equal'] else 'DIFFER'):>8} "
              f"{(str(r['checkpoint']['files']) + ' files ' + ('equal' if r['checkpoint']['equal'] else 'DIFFER')):>12} "
              f"{('yes' if not r['amax_off_device'] else 'NO'):>22} "
              f"{(str(e['count']) + (' equal' if e['equal'] else ' DIFFER')):>19}  {r['ok']}")
    with_modelopt = {recipe: r["modelopt"] for recipe, r in document["recipes"].items() if "modelopt" in r}
    if with_modelopt:
        print(f"\nrefquant's split model vs modelopt's on the same device map")
        print(f"{'recipe':<26} {'amax equal':>14} {'logits':>10} {'tensors equal':>15}  ok")
        for recipe, m in with_modelopt.items():
            if "skipped" in m:
                print(f"{recipe:<26} not compared: {m['skipped']}")
                continue
            q, x = m["quantizers"], m["export"]
            shown = "n/a" if "logits" not in m else "identical" if m["logits"]["identical"] else "DIFFER"
            print(f"{recipe:<26} {q['amax_compared'] - len(q['amax_mismatch']):>6}/{q['amax_compared']:<7} {shown:>10} "
                  f"{str(x['equal']) + '/' + str(x['tensors']):>15}  {m['ok']}")


# --- data parallel: two ranks against one -----------------------------------------------------
def run_dp(args) -> int:
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world < 2:
        raise SystemExit("--dp runs under torchrun: python3 -m torch.distributed.run --nproc-per-node 2 scripts/multigpu_check.py --dp ...")
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    master = build_model(args)
    calib, _ = batches(args, master.config.vocab_size)
    document = {"check": "dp", "world_size": world, "environment": environment(args),
                "model_bytes": model_bytes(master), "calibration": {"batches": len(calib), "shape": list(calib[0].shape)},
                "recipes": {}}

    reference: dict[str, dict] = {}
    if rank == 0:  # one rank over all the batches, before the process group exists (so no exchange)
        for recipe in args.recipes:
            begun = time.perf_counter()
            try:
                model = copy.deepcopy(master).to(device)
                rq.quantize_model(model, rq.load_recipe(recipe), calib, progress=False, **quantize_options(args))
                rq.export_checkpoint(model, out / "single" / recipe)
                reference[recipe] = quantizer_state(model)
                del model
            except Exception as error:  # noqa: BLE001
                document["recipes"][recipe] = {"error": f"single rank: {type(error).__name__}: {error}", "ok": False}
                traceback.print_exc()
            document["recipes"].setdefault(recipe, {})["seconds_single"] = round(time.perf_counter() - begun, 1)
        print(f"rank 0: single-rank references done in {time.perf_counter() - started:.1f} s", flush=True)

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timedelta(minutes=30))
    failed = False
    try:
        for recipe in args.recipes:
            result = document["recipes"].setdefault(recipe, {})
            begun = time.perf_counter()
            error = None
            try:
                model = copy.deepcopy(master).to(device)
                report = rq.quantize_model(model, rq.load_recipe(recipe), calib[rank::world], progress=False,
                                           **quantize_options(args))
                torch.save(quantizer_state(model), out / f"rank{rank}-{recipe}.pt")
                rq.export_checkpoint(model, out / "ranks" / recipe)  # every rank calls; rank 0 writes
                result.update(report_batches=report.calib_batches, report_world_size=report.world_size)
                del model
            except Exception as caught:  # noqa: BLE001
                error = f"{type(caught).__name__}: {caught}"
                traceback.print_exc()
            errors = [None] * world
            dist.all_gather_object(errors, error)  # also the barrier before rank 0 reads the ranks' files
            result["seconds_ranks"] = round(time.perf_counter() - begun, 1)
            if rank == 0:
                if any(errors):
                    result.update(error=[e for e in errors if e], ok=False)
                elif recipe in reference:
                    result["ranks"] = [compare_quantizers(reference[recipe], torch.load(out / f"rank{r}-{recipe}.pt"))
                                       for r in range(world)]
                    result["checkpoint"] = compare_checkpoints(out / "single" / recipe, out / "ranks" / recipe)
                    result["ok"] = bool(all(q["same_names"] and q["equal"] == q["enabled"] for q in result["ranks"])
                                        and result["checkpoint"]["equal"] and result.get("report_batches") == len(calib))
                failed |= not result.get("ok", False)
                write_json(out / "dp.json", document)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"\ndata-parallel calibration, {world} ranks x {len(calib) // world} batches vs 1 rank x {len(calib)} "
          f"({', '.join(document['environment'].get('gpus', ['cpu']))}, backend {'nccl' if args.device == 'cuda' else 'gloo'})")
    print(f"{'recipe':<26} {'amax equal (each rank)':>24} {'checkpoint':>16}  ok")
    for recipe, r in document["recipes"].items():
        if "ranks" not in r:
            print(f"{recipe:<26} error: {r.get('error')}")
            continue
        amax = ", ".join(f"{q['equal']}/{q['enabled']}" for q in r["ranks"])
        print(f"{recipe:<26} {amax:>24} {(str(r['checkpoint']['files']) + ' files ' + ('equal' if r['checkpoint']['equal'] else 'DIFFER')):>16}  {r['ok']}")
    document["ok"] = not failed
    document["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "dp.json", document)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON results and the checkpoints")
    parser.add_argument("--dp", action="store_true", help="data-parallel check (run under torchrun, 2 processes)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="refquant's built-in 4-layer model instead of the big one")
    parser.add_argument("--moe", action="store_true",
                        help="the Qwen3-MoE-shaped model, loaded with --device-map auto, also against modelopt")
    parser.add_argument("--recipes", nargs="+", help=f"default: {' '.join(RECIPES)}; with --moe {' '.join(MOE_RECIPES)}")
    parser.add_argument("--backend", choices=("reference", "compiled"), help="default: compiled with --moe, else reference")
    parser.add_argument("--no-modelopt", action="store_true", help="--moe: leave out the comparison with modelopt")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632, help="the dense MLP (--moe: unused, every layer is MoE)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=64, help="--moe: experts per layer")
    parser.add_argument("--experts-per-token", type=int, default=8, help="--moe: experts each token is routed to")
    parser.add_argument("--moe-intermediate", type=int, default=768, help="--moe: each expert's intermediate size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches (even, for 2 ranks)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; pass --device cpu (with --tiny) to check the logic.")
    if args.moe and (args.dp or args.tiny):
        raise SystemExit(f"--moe with {'--dp' if args.dp else '--tiny'}: --moe is a split check of its own model; "
                         "pass tiny sizes (--layers, --hidden, --experts, ...) for a small one.")
    args.recipes = args.recipes or list(MOE_RECIPES if args.moe else RECIPES)
    args.backend = args.backend or ("compiled" if args.moe else "reference")
    return run_dp(args) if args.dp else run_split(args)


if __name__ == "__main__":
    sys.exit(main())
