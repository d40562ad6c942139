#!/usr/bin/env bash
# The main job: the bundled florence-vl-tiny answers questions about a ShapesVQA image through
# pipeline("image-text-to-text"). Arguments pass through (--image PATH, --question TEXT).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV/bin/florence-vl" demo-tiny "$@"
