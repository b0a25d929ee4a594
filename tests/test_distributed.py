"""Data-parallel calibration and export over torch.distributed: two gloo processes on the CPU.

Each rank calibrates its half of the batches; after the forward loop one all_reduce(MAX) gives
every rank the amax one process gets from all the batches (refquant.quant.distributed), and rank 0
alone writes the checkpoint. Checked against one process over all batches, bit for bit and byte for
byte; and what goes wrong on one rank (an error, another recipe, other weights, no data at all)
ends every rank with an error that says what, instead of a hang or a silent difference. The same
for MoE models, whose experts also count the tokens each expert receives: summed over the ranks,
the counts and the report's experts without tokens are the single process's.
"""

from __future__ import annotations

import math
import os
import re
import socket
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import refquant as rq
from refquant.hf.models import CALIBRATION_TEXT, build_builtin_model, byte_tokenize, token_batches
from refquant.quant.distributed import synchronize_calibration
from refquant.quant.quantizer import QuantizerConfig, TensorQuantizer, named_quantizers
from conftest import expert_token_counts, folder_files, tiny_moe

pytest.importorskip("transformers")
import modelopt_compare as mc  # noqa: E402  (tests/modelopt_compare.py: calibration batches of the families' vocabulary)

WORLD = 2
RECIPES = ("fp8_default-fp8_kv", "nvfp4_default-nvfp4_kv")
MOE_CASES = [(family, recipe) for family in ("qwen3_moe", "gpt_oss") for recipe in RECIPES]
THREADS = 1  # the same in every process, so the forward computes the same bits everywhere


def calibration_batches() -> list[torch.Tensor]:
    return token_batches(byte_tokenize(CALIBRATION_TEXT), num_batches=6, seq_len=48)[0]


def moe_calibration_batches() -> list[torch.Tensor]:
    """4 batches of 8 tokens: few enough that each half leaves experts of tiny_qwen3_moe without a
    token that the other half reaches."""
    return mc.calibration_batches(1, 4, 1, 8)


def amaxes(model) -> dict[str, torch.Tensor]:
    return {name: q.amax.clone() for name, q in named_quantizers(model) if q.is_calibrated}


def quantized(recipe: str, batches, seed: int = 0, family: str = "builtin"):
    """(model, report): refquant's built-in model with weights from `seed`, or tiny_moe(family),
    quantized with `recipe` on `batches`."""
    model = build_builtin_model(seed=seed) if family == "builtin" else tiny_moe(family)
    report = rq.quantize_model(model, rq.load_recipe(recipe), batches, progress=False)
    return model, report


def moe_result(model, report) -> dict:
    """What the MoE tests compare: every amax, the expert token counts, the experts without tokens."""
    return {"amax": amaxes(model), "counts": expert_token_counts(model), "without_tokens": report.experts_without_tokens}


def _error(call) -> str:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
    return "no error"


def _nan_and_missing_data(rank: int) -> dict[str, torch.Tensor]:
    """synchronize_calibration on hand-set amaxes: a NaN on rank 1 only, a per-channel amax, and
    one only rank 1 collected."""
    quantizers = [(f"q{i}", TensorQuantizer(QuantizerConfig(format="fp8", axis=axis), name=f"q{i}"))
                  for i, axis in enumerate((None, 0, None))]
    for _, quantizer in quantizers:
        quantizer.start_calibration()
    quantizers[0][1]._calibrator.amax = torch.tensor(math.nan if rank == 1 else 2.0, dtype=torch.bfloat16)
    quantizers[1][1]._calibrator.amax = torch.tensor([[1.0 + rank], [5.0 - rank]])
    quantizers[2][1]._calibrator.amax = torch.tensor(3.5) if rank == 1 else None
    synchronize_calibration(quantizers, batches=1, tokens=1, error=None, weight_quantizers=(),
                            fallback_device=lambda name: torch.device("cpu"))
    reduced = {name: q._calibrator.amax for name, q in quantizers}
    for _, quantizer in quantizers[1:]:
        quantizer.finish_calibration()
    # A NaN amax is refused when calibration finishes, on every rank, as in one process.
    reduced["q0 finish"] = _error(quantizers[0][1].finish_calibration)
    return reduced


def _join_group(rank: int, port: int, timeout: timedelta = timedelta(seconds=120)) -> None:
    """This process as rank `rank` of a gloo group of WORLD on 127.0.0.1:`port`; a hang becomes
    an error after `timeout`, not a stuck CI."""
    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timeout)


def _rank(rank: int, port: int, folder: Path) -> None:
    _join_group(rank, port)
    results: dict = {}
    try:
        batches = calibration_batches()
        for recipe in RECIPES:
            model, report = quantized(recipe, batches[rank::WORLD])
            results[recipe] = {"amax": amaxes(model), "batches": report.calib_batches,
                               "tokens": report.calib_tokens, "world_size": report.world_size}
            rq.export_checkpoint(model, folder / "out" / recipe)
        # rank 0 sees no batch at all (rank 1 all of them); rank 0 still writes the checkpoint
        model, _ = quantized(RECIPES[1], batches if rank == 1 else [])
        results["rank 0 without data"] = amaxes(model)
        rq.export_checkpoint(model, folder / "out" / "rank-0-without-data")
        results["nan"] = _nan_and_missing_data(rank)
        results["errors"] = {
            "a bad batch on rank 1": _error(lambda: quantized(RECIPES[0], ["not a batch"] if rank == 1 else batches[:1])),
            "another recipe on rank 1": _error(lambda: quantized(RECIPES[rank], batches[:1])),
            "other weights on rank 1": _error(lambda: quantized(RECIPES[0], batches[:1], seed=rank)),
            "no batch on any rank": _error(lambda: quantized(RECIPES[0], [])),
            "rank 0 cannot write": _error(lambda: rq.export_checkpoint(model, folder / "out" / RECIPES[0])),
        }
        results["moe"] = _moe_runs(rank, folder / "out-moe")
    finally:
        torch.save(results, folder / f"rank{rank}.pt")
        dist.destroy_process_group()
    _exit_now()


def _exit_now() -> None:
    """End a rank's process once its results are saved and its process group destroyed, skipping
    the interpreter's teardown: after a rank's injected failure, torch's C++ teardown at exit
    sometimes aborts ("terminate called without an active exception", SIGABRT), after all the
    work these tests check. Only a rank that returned normally gets here; one that raised exits
    through mp.spawn with its traceback."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(rank_function, folder: Path, results_name: str) -> list:
    """Run rank_function(rank, port, folder) in WORLD processes; each saves its results as
    folder/{results_name}{rank}.pt. Returns them, rank by rank."""
    mp.spawn(rank_function, args=(_free_port(), folder), nprocs=WORLD, join=True)
    return [torch.load(folder / f"{results_name}{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two ranks once; their results, rank by rank, and the folder they wrote into."""
    folder = tmp_path_factory.mktemp("dp")
    return run_ranks(_rank, folder, "rank"), folder


@contextmanager
def threads_of_a_rank() -> Iterator[None]:
    """Within the block torch computes with THREADS threads, as each rank does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process over all the batches: recipe -> (amaxes, report, checkpoint folder)."""
    folder = tmp_path_factory.mktemp("single")
    results = {}
    with threads_of_a_rank():
        for recipe in RECIPES:
            model, report = quantized(recipe, calibration_batches())
            results[recipe] = (amaxes(model), report, rq.export_checkpoint(model, folder / recipe))
    return results


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_same_amaxes(got: dict, expected: dict, what: str) -> None:
    assert list(got) == list(expected), what
    for name, amax in expected.items():
        assert got[name].dtype == amax.dtype and got[name].shape == amax.shape, f"{what}: {name}"
        assert torch.equal(bits(got[name]), bits(amax)), f"{what}: {name}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_ranks_on_halves_give_every_rank_the_single_process_amax_bit_for_bit(ranks, single, recipe):
    results, _ = ranks
    expected, report, _ = single[recipe]
    assert len(expected) > 0
    for rank, result in enumerate(results):
        assert_same_amaxes(result[recipe]["amax"], expected, f"rank {rank}")
        assert (result[recipe]["batches"], result[recipe]["tokens"]) == (report.calib_batches, report.calib_tokens)
        assert result[recipe]["world_size"] == WORLD


@pytest.mark.parametrize("recipe", RECIPES)
def test_rank_0_writes_the_single_process_checkpoint_byte_for_byte_and_alone(ranks, single, recipe):
    _, folder = ranks
    assert folder_files(folder / "out" / recipe) == folder_files(single[recipe][2])
    written = sorted(path.name for path in (folder / "out").iterdir())
    assert written == sorted([*RECIPES, "rank-0-without-data"])  # no partial folder, nothing twice


def test_a_rank_whose_quantizers_saw_no_data_ends_with_the_amax_of_the_others(ranks, single, tmp_path):
    results, folder = ranks
    expected, _, checkpoint = single[RECIPES[1]]
    for rank, result in enumerate(results):
        assert_same_amaxes(result["rank 0 without data"], expected, f"rank {rank}")
    assert folder_files(folder / "out" / "rank-0-without-data") == folder_files(checkpoint)


def test_a_nan_on_any_rank_gives_nan_and_data_from_one_rank_reaches_all(ranks):
    results, _ = ranks
    for result in results:
        nan = result["nan"]
        assert nan["q0"].dtype == torch.bfloat16 and torch.isnan(nan["q0"])  # MAX reductions alone may drop NaN
        assert nan["q0 finish"].startswith("ValueError: calibration of q0 saw NaN")
        assert torch.equal(nan["q1"], torch.tensor([[2.0], [5.0]]))
        assert torch.equal(nan["q2"], torch.tensor(3.5))


@pytest.mark.parametrize(
    "scenario, rank_0, rank_1",
    [
        ("a bad batch on rank 1", r"ValueError: calibration failed on rank 1 of 2 \(ValueError: a calibration / evaluation batch",
         r"ValueError: a calibration / evaluation batch must be a dict"),
        ("another recipe on rank 1", r"ranks \[1\] run a different model or recipe than rank 0",
         r"ranks \[1\] run a different model or recipe than rank 0"),
        ("other weights on rank 1", r"the ranks hold different weights: the amax of model\.layers\.0\.self_attn\.q_proj\.weight_quantizer",
         r"the ranks hold different weights"),
        ("no batch on any rank", r"calib_batches gave no batch", r"calib_batches gave no batch"),
        ("rank 0 cannot write", r"ValueError: output folder .* already exists",
         r"rank 0 failed to write the checkpoint .*already exists.*nothing was written"),
    ],
)
def test_what_goes_wrong_on_one_rank_stops_every_rank_with_a_clear_error(ranks, scenario, rank_0, rank_1):
    results, _ = ranks
    assert re.search(rank_0, results[0]["errors"][scenario]), results[0]["errors"][scenario]
    assert re.search(rank_1, results[1]["errors"][scenario]), results[1]["errors"][scenario]


# --- a rank that fails outside calibration's own exchange ------------------------------------------
EARLY_TIMEOUT = timedelta(seconds=60)  # what a rank waiting for a failed one would hit; the exchange takes far less


def _cli_on_rank(rank: int, argv: list[str]) -> tuple[int, str, float]:
    import contextlib
    import io
    import time

    from refquant.cli import main

    err = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except Exception as error:  # noqa: BLE001 - an unexpected error leaves main as a traceback would
            print(f"{type(error).__name__}: {error}", file=err)
            code = 1
    return code, err.getvalue(), time.perf_counter() - started


def _raising_on_rank_1(function, error: Exception):
    def call(*args, **kwargs):
        if dist.get_rank() == 1:
            raise error
        return function(*args, **kwargs)

    return call


def _early_failure_rank(rank: int, port: int, folder: Path) -> None:
    import time

    from refquant.cli import quantize as quantize_cli
    from refquant.hf import sensitivity

    for name, value in (("WORLD_SIZE", str(WORLD)), ("RANK", str(rank)), ("LOCAL_RANK", str(rank))):
        os.environ[name] = value
    _join_group(rank, port, EARLY_TIMEOUT)
    results: dict = {}
    argv = ["quantize", "--no-progress", "--calib-batches", "2", "--seq-len", "16"]
    try:
        load_model, measure = quantize_cli.load_model, sensitivity.measure_sensitivity
        quantize_cli.load_model = _raising_on_rank_1(load_model, ValueError("rank 1 cannot read its model (injected)"))
        results["loading the model"] = _cli_on_rank(rank, [*argv, "--out", str(folder / "a")])
        quantize_cli.load_model = load_model
        sensitivity.measure_sensitivity = _raising_on_rank_1(measure, RuntimeError("rank 1 ran out of memory (injected)"))
        results["the sensitivity run"] = _cli_on_rank(rank, [*argv, "--sensitivity", "--out", str(folder / "b")])
        sensitivity.measure_sensitivity = measure

        started = time.perf_counter()
        eval_batch = "not a batch" if rank == 1 else calibration_batches()[0]
        error = _error(lambda: rq.quantize_model(build_builtin_model(), rq.load_recipe(RECIPES[0]), calibration_batches()[rank::WORLD],
                                                 eval_batch=eval_batch, progress=False))
        results["the evaluation forward"] = (error, time.perf_counter() - started)
    finally:
        torch.save(results, folder / f"early{rank}.pt")
        dist.destroy_process_group()
    _exit_now()


@pytest.fixture(scope="module")
def early_failures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("early")
    return run_ranks(_early_failure_rank, folder, "early"), folder


@pytest.mark.parametrize("stage, injected", [("loading the model", "rank 1 cannot read its model"),
                                             ("the sensitivity run", "rank 1 ran out of memory")])
def test_a_rank_failing_outside_calibration_stops_the_cli_on_every_rank_within_seconds(early_failures, stage, injected):
    results, folder = early_failures
    code, err, seconds = results[0][stage]
    assert code == 2 and f"rank 1 of 2 failed" in err and injected in err and "rank 0 stops with it" in err, err
    assert "Traceback" not in err
    assert seconds < EARLY_TIMEOUT.total_seconds() / 2  # the exchange, not the process group's timeout
    code, err, _ = results[1][stage]
    assert code != 0 and injected in err
    assert not any(path.name in ("a", "b") for path in folder.iterdir())  # nothing written


def test_a_rank_failing_in_the_evaluation_forward_stops_every_rank_before_calibration(early_failures):
    results, _ = early_failures
    error, seconds = results[0]["the evaluation forward"]
    assert re.search(r"ValueError: rank 1 of 2 failed before calibration \(ValueError: a calibration / evaluation batch", error), error
    assert seconds < EARLY_TIMEOUT.total_seconds() / 2
    assert results[1]["the evaluation forward"][0].startswith("ValueError: a calibration / evaluation batch must be")


# --- MoE: the experts' token counts summed over the ranks ------------------------------------------
def _moe_runs(rank: int, out: Path) -> dict:
    """This rank's share of the MoE cases (run by _rank in the same process group): each case's
    results, its checkpoint written into out/{family}-{recipe}."""
    results: dict = {}
    batches = moe_calibration_batches()
    for family, recipe in MOE_CASES:
        model, report = quantized(recipe, batches[rank::WORLD], family=family)
        results[family, recipe] = moe_result(model, report)
        rq.export_checkpoint(model, out / f"{family}-{recipe}")
    # rank 0 sees no batch: its experts count nothing, and still end with the others' counts
    model, report = quantized(RECIPES[1], batches if rank == 1 else [], family="qwen3_moe")
    results["rank 0 without data"] = moe_result(model, report)
    return results


@pytest.fixture(scope="module")
def moe_single(tmp_path_factory):
    """One process over all the MoE batches: (family, recipe) -> (results, checkpoint folder)."""
    folder = tmp_path_factory.mktemp("single-moe")
    results = {}
    with threads_of_a_rank():
        for family, recipe in MOE_CASES:
            model, report = quantized(recipe, moe_calibration_batches(), family=family)
            results[family, recipe] = (moe_result(model, report), rq.export_checkpoint(model, folder / f"{family}-{recipe}"))
    return results


def assert_same_moe_results(got: dict, expected: dict, what: str) -> None:
    assert_same_amaxes(got["amax"], expected["amax"], what)
    assert got["counts"] == expected["counts"], what
    assert got["without_tokens"] == expected["without_tokens"], what


@pytest.mark.parametrize("family, recipe", MOE_CASES)
def test_two_ranks_on_halves_give_every_rank_the_single_process_amax_and_expert_token_counts(ranks, moe_single, family, recipe):
    results, _ = ranks
    expected, _ = moe_single[family, recipe]
    assert len(expected["counts"]) == 2 and all(counts is not None for counts in expected["counts"].values())
    for rank, result in enumerate(results):
        assert_same_moe_results(result["moe"][family, recipe], expected, f"rank {rank}")


@pytest.mark.parametrize("family, recipe", MOE_CASES)
def test_rank_0_writes_the_single_process_moe_checkpoint_byte_for_byte(ranks, moe_single, family, recipe):
    _, folder = ranks
    assert folder_files(folder / "out-moe" / f"{family}-{recipe}") == folder_files(moe_single[family, recipe][1])


def test_a_rank_whose_experts_saw_no_token_ends_with_the_counts_of_the_others(ranks, moe_single):
    results, _ = ranks
    expected, _ = moe_single["qwen3_moe", RECIPES[1]]
    for rank, result in enumerate(results):
        assert_same_moe_results(result["moe"]["rank 0 without data"], expected, f"rank {rank}")


def test_each_half_of_the_moe_batches_leaves_experts_without_tokens_that_the_other_half_reaches(moe_single):
    """What makes the MoE tests above able to fail: the experts without tokens of one rank's half
    are not those of all the batches, so each rank's own counts would give another list."""
    batches = moe_calibration_batches()
    everything = set(moe_single["qwen3_moe", RECIPES[0]][0]["without_tokens"])
    assert everything, "some expert should get no token of all the batches"
    for rank in range(WORLD):
        _, report = quantized(RECIPES[0], batches[rank::WORLD], family="qwen3_moe")
        assert set(report.experts_without_tokens) > everything, f"rank {rank}'s half"
    assert moe_single["gpt_oss", RECIPES[0]][0]["without_tokens"] == ["model.layers.0.mlp.experts.3", "model.layers.1.mlp.experts.3"]
