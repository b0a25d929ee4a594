#!/usr/bin/env bash
# CUDA check of the tree, for the device tool's H200 (torch + Triton there, no network):
# the vector / exhaustive / property / bad-input tests on `cuda`, compiled-vs-reference parity on
# CUDA, and the benchmark-marked speedup tests. Logs go to $OUT (or ./out/gpu_check).
# Before the call, here:  put the dataclasses-json and marshmallow wheels (py3-none-any) into
#   .whlmin/ and pass carry [".whlmin"] (the test vectors are in the tree, tests/vectors/). For the
#   speedup tests against modelopt, also carry ".whl" (nvidia-modelopt 0.47 and its pure-Python
#   needs, see README of the device tool); without it those tests skip.
set -u
OUT=${OUT:-out/gpu_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlmin/*.whl || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# modelopt imports pulp at start-up (for a feature quantization never calls); stand in where it is missing
python3 -c "import pulp" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/scripts/stand_ins
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_fp8_vectors.py tests/test_nvfp4_vectors.py tests/test_kv_cast_vectors.py tests/test_exhaustive_bf16.py \
  tests/test_properties.py tests/test_bad_input.py tests/test_fp8_real_deviations.py \
  tests/test_gpu_division.py tests/test_nvfp4_kernel_vectors.py 2>&1 | tee "$OUT/vectors_cuda.log" | tail -4
# ~150 graphs to compile: spread over 8 pytest-xdist workers (the device image has xdist).
timeout 420 python3 -m pytest -q -p no:cacheprovider -n 8 -k cuda --tb=short -rf tests/test_compiled_parity.py tests/test_direct_call.py tests/test_nvfp4_fake_kernel.py 2>&1 | tee "$OUT/compiled_cuda.log" | tail -12
# every test here is CUDA-only (its names do not say so, so no -k filter)
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 --tb=short -rf tests/test_triton_launch.py 2>&1 | tee "$OUT/triton_launch_cuda.log" | tail -6
timeout 200 python3 -m pytest -q -p no:cacheprovider -m benchmark -k "not cpu" -rA tests/test_benchmarks_speedup.py 2>&1 | tee "$OUT/speedup_cuda.log" | tail -6
