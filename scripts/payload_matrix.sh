#!/usr/bin/env bash
# The trust_remote_code payload on every transformers minor release of the supported range, each in a fresh venv
# with only torch, transformers and Pillow, against the package's own answers (scripts/payload_matrix.py); and the
# minor release just below the range, which must refuse the payload with the version error.
# Usage: bash scripts/payload_matrix.sh [MINOR ...]   (default: every minor from the range's minimum to the newest
# that pip can install here). Exits non-zero, naming the release, if one fails.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" "$ROOT/scripts/payload_matrix.py" prepare "$WORK/folders"
REQUIREMENT="$("$PY" -c 'from florence_vl_hf.modeling.configuration_florence_vl import TRANSFORMERS_REQUIREMENT as r; print(r)')"
if [ "$#" -gt 0 ]; then
  MINORS=("$@")
else
  LISTED="$("$PY" -m pip index versions transformers 2>/dev/null | sed -n 's/^Available versions: //p')"
  MINORS=($("$PY" -c '
import sys
from packaging.requirements import Requirement
from packaging.version import Version
spec = Requirement(sys.argv[1]).specifier
versions = [Version(v.strip()) for v in sys.argv[2].split(",")]
print(" ".join(sorted({f"{v.major}.{v.minor}" for v in versions if not v.is_prerelease and v in spec}, key=Version)))
' "$REQUIREMENT" "$LISTED"))
  [ "${#MINORS[@]}" -gt 0 ] || { echo "no transformers release found in $REQUIREMENT" >&2; exit 1; }
fi
FAILED=()
CHECKED=()
SKIPPED=()
check() {  # MINOR [--expect-refusal]
  local venv="$WORK/venv-$1"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0" 2>/dev/null
  if ! "$venv/bin/pip" install -q "transformers==$1.*" pillow 2>"$venv.err"; then
    echo "transformers $1.*: not installable here ($(grep -m1 "satisfies the requirement" "$venv.err" || true)); skipped" >&2
    SKIPPED+=("$1")
    return 0
  fi
  [ "$#" -gt 1 ] || CHECKED+=("$1")
  HF_MODULES_CACHE="$venv/modules" "$venv/bin/python" "$ROOT/scripts/payload_matrix.py" check "$WORK/folders" "${@:2}" \
    || FAILED+=("$1")
  rm -rf "$venv"
}
for minor in "${MINORS[@]}"; do check "$minor"; done
BELOW="$("$PY" -c "
from packaging.requirements import Requirement
low = [s.version for s in Requirement('$REQUIREMENT').specifier if s.operator == '>='][0].split('.')
print(f'{low[0]}.{int(low[1]) - 1}')")"
check "$BELOW" --expect-refusal
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "payload matrix FAILED on transformers ${FAILED[*]}" >&2
  exit 1
fi
echo "payload matrix: ok on transformers ${CHECKED[*]}; $BELOW refused; not installable here: ${SKIPPED[*]:-none}"
