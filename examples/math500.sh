#!/usr/bin/env bash
# 2-GRPO on MATH-style data with a real checkpoint: the same commands as the tiny model.
# Usage: examples/math500.sh MODEL_DIR [DATA_DIR]
#   MODEL_DIR  a transformers causal LM directory with safetensors weights and a chat template,
#              e.g. a local copy of Qwen2.5-Math-1.5B (grpoctl downloads nothing).
#   DATA_DIR   holds math500.jsonl (default: data, shipped with the repository).
# Train on a GPU (--device cuda, or --backend vllm for rollouts); on a CPU this is a smoke test.
set -euo pipefail
model=${1:?usage: math500.sh MODEL_DIR [DATA_DIR]}
data=${2:-data}
device=${DEVICE:-cpu}
steps=${STEPS:-2}

# The model's answer format: reason step by step, final answer in \boxed{} (what `math` grades).
template='{prompt}
Please reason step by step, and put your final answer within \boxed{}.'

# Before: Mean@4 and Pass@4 on the first 50 problems, by subject.
grpoctl eval --model "$model" --prompts "$data/math500.jsonl" --limit 50 --template "$template" \
  --samples 4 --max-new-tokens 1024 --by subject --device "$device"

# 2-GRPO with the paper's 2-GRPO settings, scaled to this run: two rollouts per prompt,
# 8x the prompts of 16-GRPO (256 vs 32), lr 8e-6, clip 0.2 / 0.28 (DAPO clip-higher),
# temperature 1, token-mean within a response then over responses (seq-mean).
# Training on the test set only shows the mechanics: use a training split for real work.
grpoctl loop --model "$model" --prompts "$data/math500.jsonl" --template "$template" \
  --group-size 2 --estimator pairwise --prompts-per-step "${PROMPTS:-256}" --steps "$steps" \
  --lr 8e-6 --clip-eps 0.2 --clip-eps-high 0.28 --loss-agg seq-mean \
  --max-new-tokens "${MAX_NEW_TOKENS:-4096}" --micro-batch-size 4 --device "$device" \
  --eval-prompts "$data/aime2024.jsonl" --eval-samples 4 --eval-every 50 \
  --run-dir "${RUN_DIR:-runs/math500-g2}"
