#!/usr/bin/env bash
# The full suite on the newest releases that setup.cfg's ranges resolve to today, in a fresh venv without the lock
# (torch stays at torch==2.13.0, the local CPU build: an unpinned torch would pull the CUDA wheels). Prints every
# version that differs from requirements-lock.txt; when the suite fails, names them, so a new release that breaks
# the project is found before users find it. Usage: bash scripts/test_newest.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
VENV="$WORK/venv"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
"$VENV/bin/python" -m pip freeze --exclude-editable > "$WORK/freeze.txt"
NEWER="$("$VENV/bin/python" - "$ROOT/requirements-lock.txt" "$WORK/freeze.txt" <<'EOF'
import sys
from packaging.utils import canonicalize_name


def pins(path):
    rows = (line.split("==") for line in open(path) if "==" in line and not line.startswith("#"))
    return {canonicalize_name(name): version.strip() for name, version in rows}


locked, newest = pins(sys.argv[1]), pins(sys.argv[2])
newest.pop("torch", None)
changed = [f"{name}=={newest.get(name, '(absent)')} (lock: {locked.get(name, '(absent)')})"
           for name in sorted(set(locked) | set(newest)) if locked.get(name) != newest.get(name)]
print(", ".join(changed))
EOF
)"
TRANSFORMERS="$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
if [ -n "$NEWER" ]; then
  echo "newest releases: transformers==$TRANSFORMERS; differing from the lock: $NEWER" >&2
else
  echo "newest releases: transformers==$TRANSFORMERS; every version equals requirements-lock.txt's" >&2
fi
cd "$ROOT"
if ! HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"; then
  echo "error: the suite fails on the newest releases${NEWER:+ (differing from the lock: $NEWER)}" >&2
  exit 1
fi
