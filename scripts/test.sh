#!/usr/bin/env bash
# Set-up and the whole test suite (CPU; CUDA tests skip without a GPU). Extra args go to pytest.
# Then the pytest-benchmark suites once each, untimed (--benchmark-disable): they must keep
# working, and no time is ever asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q "$@"
python3 -m pytest -q benchmarks --benchmark-disable
