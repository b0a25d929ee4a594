#!/usr/bin/env bash
# The CUDA checks of the tree, for a GPU machine without network (torch + Triton installed there):
#   bash scripts/gpu_check.sh tests     the CUDA tests of the numerics and the compiled backend
#                                       (kernels, bound launches, gradients, the amax written in place);
#                                       ~6 min on an H100 with 16 workers
#   bash scripts/gpu_check.sh families  the family matrix against modelopt with every recipe's logits,
#                                       the experts' and the quantizer's CUDA tests; ~4 min
#   bash scripts/gpu_check.sh bench     the MoE shape (also its plain eager loop) and the 0.6B shape (48 calibration
#                                       batches, also folded and with the fast launch off) against
#                                       modelopt (benchmarks/ptq_gpu.py); ~6 min
#   bash scripts/gpu_check.sh moe       the MoE shape alone against modelopt (both recipes, compiled and
#                                       folded, 10 timed forwards, each quantized forward also in turn with
#                                       a plain copy's (paired), calibration timed after a warm-up
#                                       calibration on 8 batches of other tokens (compiles done, the row
#                                       counts those batches bring checked) and between a
#                                       plain copy's same forwards), then where the MoE shape holds memory
#                                       (benchmarks/probes/moe_memory.py): the MoE targets and bits in one
#                                       call; ~8 min (a call cut short keeps what ran first). With
#                                       `families` in a second call: every MoE check.
#   bash scripts/gpu_check.sh beside    the grouped experts' CUDA tests, the row-count checks in the forward
#                                       against beside it (benchmarks/probes/background_checks.py), max calibration's
#                                       own steps with no count left to check (calibration_ab.py), then the
#                                       MoE shape against modelopt as in `moe` (not the memory probe); ~9.5 min
#   bash scripts/gpu_check.sh moe_families   the MoE shape's ptq_gpu run as in `moe` (not the memory probe),
#                                       then `families` in the time left of the call's 600 s (~9.5 min):
#                                       every MoE check on one machine start
#   bash scripts/gpu_check.sh nvfp4_families   whether the grouped experts' row-count checks gain from worker
#                                       threads (benchmarks/probes/parallel_checks.py), quantize_model's host time
#                                       outside calibration (placement_time.py), the MoE shape's NVFP4
#                                       cast-KV run against modelopt as in `moe` with the checks on 4 threads
#                                       (REFQUANT_CHECK_THREADS, unless set), then `families` in the time
#                                       left of the call's 600 s
#   bash scripts/gpu_check.sh checks    the parallel-checks probe, the grouped experts' CUDA tests, quantize_model's
#                                       host time outside calibration (benchmarks/probes/placement_time.py) and the
#                                       MoE shape's NVFP4 cast-KV run, plain and compiled only (no modelopt); ~4 min
#   bash scripts/gpu_check.sh moe_after_modelopt   the MoE shape's quantized forward right after modelopt's
#                                       calibration in the same process, each recipe, timed in turn with a
#                                       plain copy from the first forward (benchmarks/probes/moe_host_bound.py
#                                       --modelopt-first --pairs 16): whether a slow stretch there is the
#                                       host's or refquant's; ~4 min
#   bash scripts/gpu_check.sh moe_profile   where the MoE shape's first calibration of the process and its
#                                       quantized forward spend host and device time (benchmarks/probes/
#                                       moe_profile.py), the forward with parts taken away (moe_host_parts.py)
#                                       and whether it is set by the host (moe_host_bound.py); ~7 min
#   bash scripts/gpu_check.sh groups    the MoE experts loop's group budgets against time and memory
#                                       (benchmarks/probes/moe_groups.py, FP8 and NVFP4, folded too); ~2 min
#   bash scripts/gpu_check.sh large     the 6.7B shape (48 calibration batches, also folded) and the kernel
#                                       table (benchmarks/gpu_report.py); ~4 min
#   bash scripts/gpu_check.sh targets   the compiled backend's speed targets: the 0.6B shape against modelopt
#                                       (compiled, folded, fast launch off; cold compile caches) and the kernel
#                                       table, then benchmarks/targets.py's table; ~5 min
#   bash scripts/gpu_check.sh targets_large   the same for the 6.7B shape; ~4 min. Then, here:
#                                       python3 benchmarks/targets.py FOLDER_OF_CALL_1 FOLDER_OF_CALL_2
# Logs and JSON go to $OUT (default out/gpu_check). Before the call, on a machine with network:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl nvidia-modelopt==0.47.0 pydantic pydantic-core annotated-types typing-inspection \
#     typing-extensions omegaconf antlr4-python3-runtime dataclasses-json "marshmallow<4" \
#     typing-inspect mypy-extensions
# and carry `.whl` (ignored by git). modelopt imports pulp at start-up for a feature quantization
# never calls: scripts/stand_ins/pulp stands in where it is missing.
set -u
phase=${1:-tests}
OUT=${OUT:-out/gpu_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import pulp" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/scripts/stand_ins
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device_$phase.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device_$phase.txt"
# modelopt's FP8 CUDA extension builds itself on first use (~70 s): once, before parallel workers
build_modelopt_fp8() {
  python3 -c "from modelopt.torch.quantization.extensions import get_cuda_ext_fp8; get_cuda_ext_fp8(raise_if_failed=True)" >/dev/null 2>&1 \
    || echo "modelopt's FP8 extension did not build" | tee -a "$OUT/device_$phase.txt"
}
# the family matrix and the experts' CUDA tests, within $1 seconds
family_tests() {
  timeout "$1" python3 -m pytest -q -p no:cacheprovider -n 16 --tb=short -rf -k cuda tests/test_modelopt_families.py \
    tests/test_experts.py tests/test_experts_ordered_sum.py tests/test_grouped_experts.py tests/test_routing_kernel.py tests/test_quantizer.py 2>&1 \
    | tee "$OUT/families_cuda.log" | tail -15
}
# the family tests in what is left of a call's 600 s
family_tests_in_time_left() {
  local left=$((585 - SECONDS))  # (timeout 0 would mean no limit)
  if [ "$left" -gt 30 ]; then family_tests "$left"; else echo "no time left in the call for the family tests"; fi
}
# the MoE shape against modelopt: both recipes, compiled and folded, calibration after a warm-up on 8 other batches
moe_targets() {
  timeout 320 python3 benchmarks/ptq_gpu.py --out "$OUT/moe" --shapes moe --recipes nvfp4_default-fp8_cast_kv fp8_default-fp8_kv \
    --variants plain modelopt compiled compiled_folded --batches 4 --repeats 10 --warm-up-calibration --warm-up-batches 8 2>&1 \
    | tee "$OUT/ptq_moe.log" | tail -8
}
case "$phase" in
tests)
  timeout 480 python3 -m pytest -q -p no:cacheprovider -n 16 --tb=short -rf -k "cuda or launch or bound or kernel" \
    tests/test_fp8_fake_kernel.py tests/test_nvfp4_fake_kernel.py tests/test_triton_launch.py tests/test_amax_in_place.py \
    tests/test_gradients.py tests/test_quantizer.py tests/test_compiled_parity.py tests/test_fast_launch.py \
    tests/test_nvfp4_kernel_vectors.py 2>&1 | tee "$OUT/compiled_cuda.log" | tail -15
  ;;
families)
  build_modelopt_fp8
  family_tests 400
  ;;
bench)
  build_modelopt_fp8
  timeout 300 python3 benchmarks/ptq_gpu.py --out "$OUT/moe" --shapes moe --recipes nvfp4_default-fp8_cast_kv fp8_default-fp8_kv \
    --variants plain plain_eager modelopt compiled compiled_folded --batches 4 --repeats 5 --no-paired 2>&1 | tee "$OUT/ptq_moe.log" | tail -12
  timeout 280 python3 benchmarks/ptq_gpu.py --out "$OUT/small" --shapes small --recipes fp8_default-fp8_kv nvfp4_default-fp8_cast_kv \
    --variants plain modelopt compiled compiled_folded compiled_fallback --batches 48 --repeats 10 --no-export 2>&1 | tee "$OUT/ptq_small.log" | tail -12
  ;;
moe)
  build_modelopt_fp8
  moe_targets
  timeout 150 python3 benchmarks/probes/moe_memory.py --out "$OUT/memory" --modelopt > "$OUT/moe_memory.log" 2>&1
  grep -E "^(plain|modelopt|compiled|folded)" "$OUT/moe_memory.log" | cut -c1-160
  ;;
beside)
  build_modelopt_fp8
  timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/test_grouped_experts.py -k cuda 2>&1 | tail -4
  timeout 150 python3 benchmarks/probes/background_checks.py --out "$OUT/beside" --rounds 2 2>&1 | grep -v Warn | tail -8
  timeout 120 python3 benchmarks/probes/calibration_ab.py --out "$OUT/beside" 2>&1 | grep -v Warn | tail -2
  moe_targets
  ;;
moe_families)
  build_modelopt_fp8
  moe_targets
  family_tests_in_time_left
  ;;
nvfp4_families|checks)
  timeout 60 python3 benchmarks/probes/parallel_checks.py --out "$OUT/checks" 2>&1 | grep -v Warn | tail -20
  timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short -rf -k cuda tests/test_grouped_experts.py 2>&1 | tail -4
  timeout 60 python3 benchmarks/probes/placement_time.py --out "$OUT/placement" --device cuda 2>&1 | grep median
  variants="plain compiled"
  if [ "$phase" = nvfp4_families ]; then build_modelopt_fp8; variants="plain modelopt compiled"; fi
  REFQUANT_CHECK_THREADS=${REFQUANT_CHECK_THREADS:-4} timeout 220 python3 benchmarks/ptq_gpu.py --out "$OUT/moe" \
    --shapes moe --recipes nvfp4_default-fp8_cast_kv --variants $variants --batches 4 --repeats 10 --warm-up-calibration --warm-up-batches 8 2>&1 \
    | tee "$OUT/ptq_moe.log" | tail -8
  [ "$phase" = checks ] && exit 0
  family_tests_in_time_left
  ;;
moe_after_modelopt)
  build_modelopt_fp8
  timeout 400 python3 benchmarks/probes/moe_host_bound.py --out "$OUT/host_bound" --modelopt-first --pairs 16 2>&1 \
    | grep -v Warn | cut -c1-300
  ;;
moe_profile)
  timeout 150 python3 benchmarks/probes/moe_profile.py --out "$OUT/profile" --recipe nvfp4_default-fp8_cast_kv --calibration --first \
    > "$OUT/moe_calibration_profile.log" 2>&1
  timeout 90 python3 benchmarks/probes/moe_profile.py --out "$OUT/profile" --recipe fp8_default-fp8_kv > "$OUT/moe_profile.log" 2>&1
  grep -hE "calibration|plain forwards|forwards before" "$OUT"/profile/*.txt
  timeout 120 python3 benchmarks/probes/moe_host_parts.py --out "$OUT/parts" 2>&1 | grep -v Warn | tail -7
  timeout 150 python3 benchmarks/probes/moe_host_bound.py --out "$OUT/host_bound" 2>&1 | grep -v Warn | cut -c1-300
  ;;
groups)
  for recipe in fp8_default-fp8_kv nvfp4_default-fp8_cast_kv; do
    timeout 150 python3 benchmarks/probes/moe_groups.py --out "$OUT/groups" --recipe $recipe --folded --repeats 10 2>&1 \
      | tee -a "$OUT/moe_groups.log" | grep -v Warning | tail -6
  done
  ;;
large)
  build_modelopt_fp8
  timeout 200 python3 benchmarks/ptq_gpu.py --out "$OUT/large" --shapes large --recipes fp8_default-fp8_kv nvfp4_default-fp8_cast_kv \
    --variants plain compiled compiled_folded --batches 48 --repeats 10 --no-export --no-paired 2>&1 | tee "$OUT/ptq_large.log" | tail -8
  timeout 200 python3 benchmarks/gpu_report.py --out "$OUT/kernels" --shapes main --no-parity --no-finding --no-eager 2>&1 \
    | tee "$OUT/kernels.log" | tail -12
  ;;
targets|targets_large)
  # two calls (each must end within a device command's 600 s): targets = the 0.6B shape and the kernel
  # table, targets_large = the 6.7B shape; benchmarks/targets.py reads both calls' folders together.
  # Triton's and inductor's caches start empty for each process: the first forward after calibration
  # is timed with cold caches.
  build_modelopt_fp8
  shape=small; [ "$phase" = targets_large ] && shape=large
  paired=""; [ "$shape" = large ] && paired="--no-paired"
  TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 300 python3 benchmarks/ptq_gpu.py \
    --out "$OUT/$shape" --shapes $shape --recipes fp8_default-fp8_kv nvfp4_default-fp8_cast_kv \
    --variants plain modelopt compiled compiled_folded compiled_fallback --batches 48 --repeats 10 --no-export $paired \
    2>&1 | tee "$OUT/ptq_$shape.log" | tail -8
  if [ "$phase" = targets ]; then
    timeout 120 python3 benchmarks/gpu_report.py --out "$OUT/kernels" --shapes main --no-parity --no-finding --no-eager 2>&1 \
      | tee "$OUT/kernels.log" | tail -3
  fi
  python3 benchmarks/targets.py "$OUT" --json "$OUT/targets.json"
  ;;
*) echo "unknown phase $phase: use tests, families, bench, moe, moe_families, nvfp4_families, checks, moe_after_modelopt, moe_profile, groups, large, targets or targets_large"; exit 2 ;;
esac
