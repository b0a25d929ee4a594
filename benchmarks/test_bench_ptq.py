"""The PTQ table as a pytest-benchmark suite: benchmarks/ptq_gpu.py's runs of a Llama-shaped or
Qwen3-MoE-shaped model (seeded bf16 weights) per shape and recipe, by variant: plain bf16, modelopt when it imports,
refquant's reference and compiled backends. One benchmark group per shape.

pytest-benchmark times the calibrated model's forward of the evaluation batch (synchronized on a
GPU). extra_info holds ptq_gpu.py's row for the run: calibration and export seconds, peak GPU
memory, the forward's own timing with its ratio to plain's and the paired ratio, and for refquant's
rows `vs_modelopt`, every amax, the logits and every exported tensor compared with modelopt's bit
for bit. On a CPU it runs the tiny shapes with few, short batches; modelopt's NVFP4 fake quant runs
on CUDA only, so its NVFP4 rows skip there.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

import ptq_gpu
import pytest
import torch

import refquant as rq

ON_CUDA = torch.cuda.is_available()
CPU_RECIPES = ("fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv")
CPU_ARGS = "--batches 2 --batch-size 1 --seq 32 --repeats 2"
REFQUANT_VARIANTS = ("reference", "compiled")


def pytest_generate_tests(metafunc) -> None:
    if "ptq_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    shapes = [s for s in config.getoption("--ptq-shapes").split(",") if s]
    unknown = sorted(set(shapes) - set(ptq_gpu.SHAPES))
    if unknown:
        raise pytest.UsageError(f"--ptq-shapes: unknown {unknown}; use {', '.join(ptq_gpu.SHAPES)}")
    recipes = config.getoption("--ptq-recipes")
    recipes = recipes.split(",") if recipes else (ptq_gpu.DEFAULT_RECIPES if ON_CUDA else CPU_RECIPES)
    # In run order: a shape's plain model first, then per recipe modelopt before refquant's variants,
    # which are compared with it.
    cases = []
    for shape in shapes:
        cases.append((shape, "-", "plain"))
        cases += [(shape, recipe, variant) for recipe in recipes for variant in ("modelopt", *REFQUANT_VARIANTS)]
    metafunc.parametrize("ptq_case", cases, ids=["-".join(case) for case in cases])


class PTQRuns:
    """ptq_gpu.py's runs shared by the suite's tests, each made once: a shape's model and batches
    and its plain run, and the modelopt run of the recipe under test, kept (with its export) until
    another recipe comes."""

    def __init__(self, args, workdir: Path):
        self.args, self.workdir = args, workdir
        self.modelopt_ok = ptq_gpu.modelopt_available()
        args.compare = self.modelopt_ok  # ptq_gpu reads the amax tables only to compare with modelopt's
        self.shape_name = None
        self.plain_result = None
        self.modelopt_key, self.modelopt_result = None, None

    def prepare(self, shape: str) -> None:
        if shape != self.shape_name:
            self.shape_name, self.plain_result = shape, None
            self.pristine, self.batches, self.eval_batch, self.parameters = ptq_gpu.prepare_shape(shape, self.args)

    def run(self, variant: str, recipe: str, shape: str, on_calibrated=None) -> dict:
        self.prepare(shape)
        return ptq_gpu.run_variant(variant, recipe, self.pristine, shape, self.args, self.batches, self.eval_batch,
                                   self.workdir, on_calibrated=on_calibrated)

    def plain(self, shape: str, on_calibrated=None) -> dict:
        self.prepare(shape)
        if self.plain_result is None or on_calibrated is not None:
            self.plain_result = self.run("plain", "-", shape, on_calibrated)
        return self.plain_result

    def modelopt(self, shape: str, recipe: str, on_calibrated=None) -> dict:
        if (shape, recipe) != self.modelopt_key or on_calibrated is not None:
            self.forget_modelopt()
            self.modelopt_result = self.run("modelopt", recipe, shape, on_calibrated)
            self.modelopt_key = (shape, recipe)
        return self.modelopt_result

    def forget_modelopt(self) -> None:
        if self.modelopt_result is not None and "export_dir" in self.modelopt_result:
            shutil.rmtree(self.modelopt_result["export_dir"], ignore_errors=True)
        self.modelopt_key, self.modelopt_result = None, None


@pytest.fixture(scope="module")
def runs(request):
    options = request.config.getoption("--ptq-args")
    options = shlex.split(options if options is not None else ("" if ON_CUDA else CPU_ARGS))
    with tempfile.TemporaryDirectory(prefix="refquant-ptq-bench-") as workdir:
        args = ptq_gpu.build_parser().parse_args(["--out", workdir, *options])
        found = PTQRuns(args, Path(workdir))
        yield found
        found.forget_modelopt()


def uses_nvfp4(recipe: str) -> bool:
    return any(rule.cfg is not None and rule.cfg.format == "nvfp4" for rule in rq.load_recipe(recipe).quant_cfg)


def test_ptq(benchmark, ptq_case, runs, tables):
    shape, recipe, variant = ptq_case
    if variant == "modelopt" and not runs.modelopt_ok:
        pytest.skip("modelopt does not import here (pip install refquant[modelopt])")
    if variant == "modelopt" and runs.args.device == "cpu" and uses_nvfp4(recipe):
        pytest.skip("modelopt's NVFP4 fake quant runs on CUDA only")
    device = torch.device(runs.args.device)

    def time_forwards(model, eval_batch, device):
        batch = eval_batch.to(device)

        def forward():
            with torch.no_grad():
                model(input_ids=batch)
            ptq_gpu.synchronize(device)

        benchmark.pedantic(forward, rounds=max(runs.args.repeats, 1), warmup_rounds=2, iterations=1)

    benchmark.group = f"ptq {shape} ({runs.args.batches} batches of {runs.args.batch_size} x {runs.args.seq} tokens)"
    if variant == "plain":
        result = runs.plain(shape, time_forwards)
    elif variant == "modelopt":
        result = runs.modelopt(shape, recipe, time_forwards)
    else:
        result = runs.run(variant, recipe, shape, time_forwards)
        if runs.modelopt_ok and not (device.type == "cpu" and uses_nvfp4(recipe)):
            result["vs_modelopt"] = ptq_gpu.compare_to_modelopt(result, runs.modelopt(shape, recipe))
        if "export_dir" in result:
            shutil.rmtree(result["export_dir"], ignore_errors=True)
    row = ptq_gpu.table_row(shape, runs.parameters, result, runs.plain(shape))
    tables["ptq"].append(row)
    benchmark.extra_info.update(row, device=str(device))
