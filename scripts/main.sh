#!/usr/bin/env bash
# Set-up, then the main job: PTQ of the built-in small Llama-style model, offline. Extra args go
# to `python3 -m refquant quantize` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m refquant quantize "$@"
