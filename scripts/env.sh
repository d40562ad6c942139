# Sourced by scripts/demo.sh and scripts/test.sh: create .venv and install the project into it (idempotent).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLORENCE_VL_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.florence-vl-installed"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/requirements-lock.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing florence_vl_hf and its dependencies into $VENV ..." >&2
  "$PY" -m pip install -q --upgrade pip >&2
  # torch first, pinned: this machine's local CPU build. An unpinned torch would pull gigabytes of CUDA wheels.
  "$PY" -m pip install -q "torch==2.13.0" >&2
  # Everything else at the exact versions of requirements-lock.txt (refresh: scripts/lock.sh).
  "$PY" -m pip install -q -c "$ROOT/requirements-lock.txt" -e "$ROOT[test]" >&2
  echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1
