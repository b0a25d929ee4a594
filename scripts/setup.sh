#!/usr/bin/env bash
# Installs refquant and everything it needs on a fresh machine (Python 3.11 + pip, no torch), and
# modelopt 0.47 for the tests that compare with it (requirements-modelopt.txt).
# torch is pinned to the CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check torch==2.13.0
python3 -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# modelopt itself, for the tests against it (--no-deps: its requirements would replace the CPU torch)
python3 -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-modelopt.txt
python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
