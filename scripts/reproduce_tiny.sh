#!/usr/bin/env bash
# Train florence-vl-tiny again from its seed (the bundled model's recipe, 1 torch thread as it was trained) and
# check the result tensor by tensor against the bundled model. Several hours on a CPU; rerun to resume.
# Argument: the work folder (default ./tiny-reproduction).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
WORK="${1:-$ROOT/tiny-reproduction}"
"$VENV/bin/florence-vl" train-tiny "$WORK/model" --work-dir "$WORK" --threads 1 --checkpoint-steps 500 --overwrite
exec "$VENV/bin/florence-vl" bundle-tiny "$WORK/model" --check
