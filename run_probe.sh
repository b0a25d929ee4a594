#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scripts/stand_ins PYTHONUNBUFFERED=1
s=$(date +%s)
timeout 100 python3 -m pytest -q -p no:cacheprovider -n 6 --tb=short -rf \
  "tests/test_compiled_parity.py::test_nvfp4_quantize_on_cuda_runs_the_triton_block_step_bit_for_bit" \
  "tests/test_compiled_parity.py::test_triton_block_step_on_cuda_matches_the_division_next_to_every_threshold" \
  "tests/test_compiled_parity.py::test_compiled_nvfp4_matches_reference_on_every_bf16_pattern" \
  "tests/test_compiled_parity.py::test_compiled_matches_reference_on_every_vector_case" \
  tests/test_direct_call.py -k "cuda and not fp8" 2>&1 | tee $OUT/real_tests.log | tail -5
echo "tests $(( $(date +%s) - s )) s"
timeout 90 python3 benchmarks/gpu_report.py --out /tmp/rep --shapes main --no-finding --no-eager --no-parity --no-modelopt-fp8 > $OUT/gpu_report.log 2>&1; cp /tmp/rep/gpu_report.json $OUT/ 2>/dev/null; tail -8 $OUT/gpu_report.log
echo "report $(( $(date +%s) - s )) s"
timeout $(( 235 - ($(date +%s) - s) )) python3 benchmarks/nvfp4_tiles.py --real --shapes main,"6.7B mlp weight" --out $OUT 2>&1 | grep -o '"real": {.*' | head -3
