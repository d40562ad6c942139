#!/usr/bin/env bash
# The test suite (slow tests included; add -m "not slow" to skip them).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$PY" -m pytest "$@"
