#!/usr/bin/env bash
# 2-GRPO and 16-GRPO on Qwen2.5-Math-1.5B and MATH train: the paper's "Qwen-1.5B, MATH" row
# (arXiv 2510.00977, Section 6.1 and Appendix C.1). README.md beside this file gives the
# settings, where each comes from, the GPU memory and the time it expects.
#
# Usage: examples/qwen-math/run.sh MODEL_DIR MATH_TRAIN [g2|g16|both]
#   MODEL_DIR   a local copy of Qwen2.5-Math-1.5B (safetensors; grpoctl downloads nothing)
#   MATH_TRAIN  MATH's 7,500 training problems as JSONL or parquet with `problem` and
#               `solution` columns (e.g. hendrycks/competition_math, train split); the gold
#               answer is taken from the last \boxed{} of each solution
# Environment: OUT (runs/qwen-math), DATA (data: math500.jsonl, aime2024.jsonl),
#   SEED (0), EPOCHS (10), MAX_NEW_TOKENS (3072), EVAL_SAMPLES (32), GPU_MEM (0.3),
#   MICRO_BATCH (2), SLEEP (0; 1 adds --vllm-sleep).
# Runs on ONE 80 GB GPU (H100/A100) with the vllm extra: pip install -e '.[vllm]'.
# Re-running the same command resumes an interrupted run.
set -euo pipefail
model=${1:?usage: run.sh MODEL_DIR MATH_TRAIN [g2|g16|both]}
train_src=${2:?usage: run.sh MODEL_DIR MATH_TRAIN [g2|g16|both]}
which=${3:-both}
out=${OUT:-runs/qwen-math}
data=${DATA:-data}
seed=${SEED:-0}
mkdir -p "$out"

# MATH train -> prompts JSONL with a short gold `answer` (what the `math` reward compares).
train="$out/math_train.jsonl"
if [ ! -f "$train" ]; then
  python - "$train_src" "$train" <<'EOF'
import json, sys
from datasets import load_dataset
from grpoctl.answers import last_boxed

src, dst = sys.argv[1], sys.argv[2]
kind = "parquet" if src.endswith(".parquet") else "json"
rows = load_dataset(kind, data_files=src, split="train")
kept = 0
with open(dst, "w", encoding="utf-8") as f:
    for row in rows:
        answer = last_boxed(row["solution"])
        if answer is None:  # a handful of solutions box nothing: no gold, no reward signal
            continue
        f.write(json.dumps({"problem": row["problem"], "answer": answer,
                            "level": row.get("level"), "type": row.get("type")}) + "\n")
        kept += 1
print(f"{dst}: {kept} of {len(rows)} problems", file=sys.stderr)
EOF
fi

# verl's MATH preprocessing (examples/data_preprocess/math_dataset.py), inside the model's
# chat template (on by default): the paper ran verl and states no prompt of its own.
template="{prompt} Let's think step by step and output the final answer within \\boxed{}."

# TF32 matmuls for the fp32 trainer (10-bit mantissa, fp32 accumulation): several times
# faster than strict fp32 on an H100. PyTorch's own switch; unset it for strict fp32.
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=${TORCH_ALLOW_TF32_CUBLAS_OVERRIDE:-1}

# Settings both runs share; the paper's unless a comment says otherwise.
common=(
  --model "$model" --prompts "$train" --template "$template" --reward math
  --epochs "${EPOCHS:-10}"                            # 10 epochs over MATH's 7.5k problems
  --warmup-steps 10                                   # 10-step linear lr warm-up
  --clip-eps 0.2 --clip-eps-high 0.28                 # clip low / high (DAPO clip-higher)
  --loss-agg seq-mean                                 # token mean in a response, then mean
  --kl-coef 0                                         # no KL term
  --max-grad-norm 1.0 --weight-decay 0.01             # verl's defaults (the paper states none)
  --temperature 1 --top-p 1 --top-k 0                 # training sampling
  --max-new-tokens "${MAX_NEW_TOKENS:-3072}"          # paper 4096; the model's context is 4096
  --eval-prompts "$data/math500.jsonl" --eval-samples "${EVAL_SAMPLES:-32}"  # Mean@32, Pass@32
  --backend vllm --vllm-dtype bfloat16 --dtype float32 --device cuda
  --gpu-memory-utilization "${GPU_MEM:-0.3}" --micro-batch-size "${MICRO_BATCH:-2}"
  --save-every 50 --keep-last 2 --seed "$seed"
)
if [ "${SLEEP:-0}" = 1 ]; then common+=(--vllm-sleep); fi
# Recompute activations in the backward pass (README: ≈ 45 GB less at full length).
common+=(--gradient-checkpointing)

train_run() {  # NAME, then the run's own flags
  local run="$out/$1"; shift
  local resume=(); [ -f "$run/config.json" ] && resume=(--resume)
  grpoctl loop "${common[@]}" "$@" --run-dir "$run" "${resume[@]}"
}

# 512 rollouts per step in both runs. With 7,500 prompts: 2-GRPO makes 29 steps an epoch
# (290 in all, 148k rollouts), 16-GRPO 234 (2,340 in all, 1.2M rollouts). One evaluation
# an epoch for each.
if [ "$which" = g2 ] || [ "$which" = both ]; then
  train_run "g2-s$seed" --group-size 2 --estimator pairwise --prompts-per-step 256 --lr 8e-6 \
    --eval-every 29
fi
if [ "$which" = g16 ] || [ "$which" = both ]; then
  train_run "g16-s$seed" --group-size 16 --estimator group --std group --prompts-per-step 32 \
    --lr 1e-6 --eval-every 234
fi

# Accuracy against steps, rollouts and seconds, side by side.
runs=(); for r in "$out"/g2-s* "$out"/g16-s*; do [ -f "$r/config.json" ] && runs+=("$r"); done
if [ "${#runs[@]}" -gt 0 ]; then grpoctl report "${runs[@]}" -o "$out/report"; fi
