#!/usr/bin/env bash
# One GRPO step by hand, stage by stage, on the embedded tiny model.
# Every arrow is a file you can open: jq . work/rollouts.jsonl | less
set -euo pipefail
work=${1:-work}
mkdir -p "$work"

# 1. Two completions for each of 32 training prompts (2-GRPO), with token ids and log-probs.
grpoctl rollout --model default --prompts arith:train --limit 32 --group-size 2 \
  --max-new-tokens 32 --seed 1 -o "$work/rollouts.jsonl"

# 2. Verifier rewards: math-verify on the last \boxed{} answer.
grpoctl score "$work/rollouts.jsonl" --reward math -o "$work/scored.jsonl"

# 3. Pairwise advantages: winner +1, loser -1, tie 0 (the stderr line gives the tied fraction).
grpoctl advantage "$work/scored.jsonl" --estimator pairwise -o "$work/advantages.jsonl"

# 4. One clipped policy-gradient step; the checkpoint holds weights, tokenizer and optimizer state.
grpoctl update "$work/advantages.jsonl" --policy default --out "$work/ckpt-1" --lr 1e-4

# The new checkpoint is an ordinary model directory: sample from it, or update it again.
grpoctl eval --model "$work/ckpt-1" --prompts arith:test --samples 4 --max-new-tokens 32
