"""Shared test fixtures: the test vectors (tests/vectors/, described in docs/test_vectors.md), and how
to load them."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the property tests on a fixed sequence of examples (reproducible, never flaky); a local
# run explores new random examples every time.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
# The outputs modelopt computed, each NAME.pt stored as NAME.pt.xz (lzma) with the sha256 of the
# original bytes in SHA256SUMS; scripts/pack_vectors.py adds files.
VECTORS = REPO / "tests" / "vectors"


def vector_sha256sums() -> dict[str, str]:
    """SHA256SUMS as {NAME.pt: sha256 of its original bytes}."""
    lines = (VECTORS / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def vector_bytes(name: str) -> bytes:
    """The original bytes of vector file `name` ("fp8_real.pt"), decompressed in memory from
    tests/vectors/NAME.xz; fails unless their sha256 is the one SHA256SUMS lists."""
    path = VECTORS / f"{name}.xz"
    if not path.exists():
        pytest.fail(f"vector file {path} is missing; pack {name} with scripts/pack_vectors.py")
    data = lzma.decompress(path.read_bytes())
    expected = vector_sha256sums().get(name)
    if hashlib.sha256(data).hexdigest() != expected:
        pytest.fail(f"{path} does not decompress to the bytes SHA256SUMS lists for {name} ({expected})")
    return data


@lru_cache(maxsize=None)
def load_vectors(name: str) -> dict:
    return torch.load(io.BytesIO(vector_bytes(name)), weights_only=True)


def vector_cases(name: str) -> list[dict]:
    return load_vectors(name)["cases"]


@lru_cache(maxsize=None)
def recipe_input(recipe: str, shape: tuple[int, ...], sha256: str) -> torch.Tensor:
    """An input a vector file names instead of storing (scripts/make_dialect_vectors.py
    recipe_input): "bf16_every_finite_pattern", the 65,280 finite bf16 patterns in bit order, or
    "bf16_every_pattern", all 65,536; reshaped to `shape`. Fails unless its bytes hash to `sha256`."""
    patterns = every_16_bit_pattern(torch.bfloat16)
    recipes = {"bf16_every_finite_pattern": lambda: patterns[torch.isfinite(patterns)],
               "bf16_every_pattern": lambda: patterns}
    if recipe not in recipes:
        pytest.fail(f"unknown input recipe {recipe!r}; the recipes are {', '.join(recipes)}")
    x = recipes[recipe]().reshape(shape)
    if hashlib.sha256(x.view(torch.int16).numpy().tobytes()).hexdigest() != sha256:
        pytest.fail(f"input recipe {recipe!r} does not give the bytes its vector file hashed ({sha256})")
    return x


def vector_input(case: dict) -> torch.Tensor:
    """A case's input x: stored, or rebuilt from its recipe (recipe_input)."""
    if "x" in case:
        return case["x"]
    return recipe_input(case["x_recipe"], tuple(case["x_shape"]), case["x_sha256"])


def find_case(name: str, case_name: str) -> dict:
    for case in vector_cases(name):
        if case["name"] == case_name:
            return case
    raise KeyError(f"{case_name} not in {name}")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Tests against modelopt itself need nvidia-modelopt 0.47 (scripts/setup.sh installs it from
# requirements-modelopt.txt). Without it they fail, so a broken install cannot pass as skips;
# REFQUANT_WITHOUT_MODELOPT=1 says it is left out on purpose, and then they skip.
WITHOUT_MODELOPT = "REFQUANT_WITHOUT_MODELOPT"


def require_modelopt() -> None:
    """Import modelopt's quantization and export; fail (or, with REFQUANT_WITHOUT_MODELOPT=1, skip)
    the calling test when that does not work."""
    try:
        import modelopt.torch.export  # noqa: F401
        import modelopt.torch.quantization  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means the comparison cannot run
        message = f"modelopt does not import ({type(error).__name__}: {error})"
        if os.environ.get(WITHOUT_MODELOPT) == "1":
            pytest.skip(f"{message}; {WITHOUT_MODELOPT}=1")
        pytest.fail(
            f"{message}. Install it with `python3 -m pip install --no-deps -r requirements-modelopt.txt` "
            f"(scripts/setup.sh does), or set {WITHOUT_MODELOPT}=1 to skip the tests against modelopt."
        )



@pytest.fixture(scope="session")
def modelopt():
    """For tests against modelopt itself: require_modelopt() once."""
    require_modelopt()


def every_16_bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All 65,536 values of a 16-bit dtype (bf16, fp16): element i has the bit pattern i, the
    order the vector files use."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)


def nvfp4_kernel_inputs() -> dict[str, torch.Tensor]:
    """CPU tensors for holding an NVFP4 Triton kernel to the reference (last dims multiples of 16
    except one view): every bf16 pattern in blocks, shuffled, exact ties on the E2M1 decision
    points, fp16, fp32, a transposed and a row-sliced view."""
    patterns = every_16_bit_pattern(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    return {
        "every bf16 pattern": patterns.reshape(-1, 16),
        "shuffled": patterns[torch.randperm(65536, generator=gen)].reshape(-1, 64),
        "ties": (torch.randint(-24, 25, (256, 64), generator=gen) * 0.125).to(torch.bfloat16),
        "fp16": (torch.randn(64, 256, generator=gen) * 7).half(),
        "fp32": torch.randn(3, 5, 64, generator=gen) * 1e-3,
        "transposed": torch.randn(256, 64, generator=gen).bfloat16().t(),
        "row-sliced": torch.randn(64, 96, generator=gen).bfloat16()[:, :48],
    }


def cuda_at_element_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x copied to CUDA as a contiguous view that starts `offset` elements into its storage (a
    pointer off 16-byte alignment, for the Triton kernels' layouts)."""
    storage = torch.zeros(x.numel() + offset, dtype=x.dtype, device="cuda")
    storage[offset:] = x.flatten().cuda()
    return storage[offset:].view(x.shape)


def tiny_llama():
    """A seeded 2-layer Llama (hidden 64, GQA 4/2 heads of 16, vocab 128), bf16, eval: small enough
    for the accelerate, sharding and multi-process tests to build many times."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def tiny_qwen3_moe():
    """A seeded 2-layer Qwen3-MoE, the family matrix's (tests/modelopt_compare.py) with 16 experts
    instead of 4, 2 a token, bf16, eval: from a few short batches some experts get no token and
    which ones depends on the batches, as the split and data-parallel tests of the experts need."""
    import dataclasses

    import modelopt_compare as mc

    family = mc.MOE_FAMILIES["qwen3_moe"]
    return mc.seeded_model(dataclasses.replace(family, config=dict(family.config, num_experts=16)))


def tiny_moe(family: str):
    """The MoE models of the split and data-parallel tests: "qwen3_moe" (tiny_qwen3_moe: fused
    experts) or "gpt_oss" (the family matrix's: transposed experts, with expert 3 of each layer out
    of the routers' reach)."""
    import modelopt_compare as mc

    if family == "qwen3_moe":
        return tiny_qwen3_moe()
    if family == "gpt_oss":
        return mc.never_route_to_expert_3("gpt_oss")
    raise ValueError(f"tiny_moe: unknown family {family!r}; pass 'qwen3_moe' or 'gpt_oss'")


def expert_token_counts(model) -> dict[str, list[int]]:
    """Each experts module's calibration token count per expert (None: nothing counted)."""
    from refquant.hf.experts import is_quant_experts

    return {name: module.calibration_tokens for name, module in model.named_modules() if is_quant_experts(module)}


def folder_files(folder) -> dict[str, bytes]:
    """{file name: bytes} of every file in a checkpoint folder, for byte-for-byte comparisons."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}
