#!/bin/sh
# The GPU check in one call from the checkout (README, "GPU check"): the project's venv, figures to $OUT or here.
cd "$(dirname "$0")/.." && exec "$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)" benchmarks/gpu_check.py --json "${OUT:-.}/gpu-check.json" "$@"
