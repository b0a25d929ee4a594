#!/usr/bin/env bash
# Set-up and the whole test suite (CPU; CUDA tests skip without a GPU). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q "$@"
