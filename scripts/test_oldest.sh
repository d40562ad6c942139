#!/usr/bin/env bash
# The full suite on the oldest transformers minor release of the supported range (its newest patch), everything
# else at requirements-lock.txt, in a fresh venv: the floor that setup.cfg declares is tested, not assumed.
# Usage: bash scripts/test_oldest.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
VENV="$WORK/venv"
# The package's range (setup.cfg); the Hub payload's wider range is covered by scripts/payload_matrix.sh.
REQUIREMENT="$(sed -n 's/^ *\(transformers[<>=].*\)$/\1/p' "$ROOT/setup.cfg" | head -1)"
OLDEST="$(echo "$REQUIREMENT" | sed -n 's/.*>=\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
[ -n "$OLDEST" ] || { echo "error: no '>=MAJOR.MINOR' floor in $REQUIREMENT" >&2; exit 1; }
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
grep -v -i "^transformers==" "$ROOT/requirements-lock.txt" > "$WORK/constraints.txt"
"$VENV/bin/python" -m pip install -q -c "$WORK/constraints.txt" "transformers==$OLDEST.*" -e "$ROOT[test]"
TRANSFORMERS="$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
echo "oldest supported release: transformers==$TRANSFORMERS (range $REQUIREMENT); everything else at the lock" >&2
cd "$ROOT"
if ! HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"; then
  echo "error: the suite fails on transformers==$TRANSFORMERS, the oldest release that $REQUIREMENT admits" >&2
  exit 1
fi
