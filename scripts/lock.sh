#!/usr/bin/env bash
# Refresh requirements-lock.txt: a fresh venv takes the newest releases setup.cfg's ranges allow, and the
# lock records them (torch excluded: scripts/env.sh pins it). Review the diff, run the suite, commit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
"$WORK/venv/bin/python" -m pip install -q "torch==2.13.0"
"$WORK/venv/bin/python" -m pip install -q -e "$ROOT[test]"
{
  echo "# Exact versions for the README's set-up (scripts/env.sh installs with this file as pip constraints)."
  echo "# torch is pinned by scripts/env.sh itself (torch==2.13.0: the local CPU build here; another machine takes its own)."
  echo "# Refresh: bash scripts/lock.sh"
  "$WORK/venv/bin/python" -m pip freeze --exclude-editable | grep -v -e "^torch==" -e "^#"
} > "$ROOT/requirements-lock.txt.tmp"
mv "$ROOT/requirements-lock.txt.tmp" "$ROOT/requirements-lock.txt"
echo "wrote $ROOT/requirements-lock.txt"
