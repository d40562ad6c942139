#!/usr/bin/env bash
# The main job on the embedded default: build, save Hub-ready, reload with trust_remote_code, run the pipeline.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV/bin/florence-vl" demo --output-dir "${1:-$ROOT/demo-output}" --overwrite
