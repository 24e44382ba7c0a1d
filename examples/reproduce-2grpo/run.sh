#!/usr/bin/env bash
# The paper's experiment at CPU scale: G = 2, 4, 8, 16 on the embedded task, 3 seeds each.
#
# Protocol (paper, Section 6.1, scaled down):
#   - the same rollouts per step for every G: prompts_per_step x G = ROLLOUTS_PER_STEP (128),
#     so G=2 takes 64 prompts per step and G=16 takes 8;
#   - the same number of epochs over the same prompt set (the first N_PROMPTS of arith:train),
#     so 2-GRPO consumes 1/8 of 16-GRPO's rollouts and makes 1/8 of its steps;
#   - the learning rate scales with the prompts per step (paper: 1e-6 at 32 prompts for
#     16-GRPO, 8e-6 at 256 for 2-GRPO): lr = BASE_LR x prompts_per_step / 8, anchored so
#     that 2-GRPO (64 prompts) gets 1e-4, the embedded model's tested rate, and 16-GRPO 1.25e-5;
#   - clip 0.2 / 0.28 (DAPO clip-higher), training sampling at temperature 1, no KL;
#   - evaluation: Mean@4 and Pass@4 on the 200 held-out problems, the paper's evaluation
#     sampling (temperature 0.7, top-p 0.8, top-k 20).
# Then `grpoctl report` writes the table and plots to results/.
#
# Usage: examples/reproduce-2grpo/run.sh [OUT_DIR]
#   PARALLEL=1 trains the seeds side by side (24 minutes on 2 CPU cores, measured); one after
#   the other it takes about 50.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-runs/reproduce-2grpo}
results=${RESULTS:-$here/results}
N_PROMPTS=${N_PROMPTS:-512}
EPOCHS=${EPOCHS:-6}
ROLLOUTS_PER_STEP=${ROLLOUTS_PER_STEP:-128}
BASE_LR=${BASE_LR:-1.25e-5}
SEEDS=${SEEDS:-"0 1 2"}
GROUP_SIZES=${GROUP_SIZES:-"2 4 8 16"}

mkdir -p "$out"

train_seed() {  # every group size for one seed, one after the other
  local seed=$1 g prompts steps lr run resume
  for g in $GROUP_SIZES; do
    prompts=$((ROLLOUTS_PER_STEP / g))
    steps=$((EPOCHS * N_PROMPTS / prompts))
    lr=$(python3 -c "print(${BASE_LR} * ${prompts} / 8)")
    run="$out/g${g}-s${seed}"
    if [ -f "$run/checkpoints/step-$(printf %06d "$steps")/trainer_state.json" ]; then
      echo "done already: $run" >&2; continue
    fi
    resume=(); [ -f "$run/config.json" ] && resume=(--resume)
    echo "G=$g seed=$seed: $prompts prompts/step, $steps steps, lr $lr" >&2
    grpoctl loop --group-size "$g" --prompts-per-step "$prompts" --steps "$steps" --lr "$lr" \
      --limit "$N_PROMPTS" --clip-eps 0.2 --clip-eps-high 0.28 --seed "$seed" \
      --eval-every $(( steps >= 4 ? steps / 4 : 1 )) --eval-samples 4 --eval-limit "${EVAL_LIMIT:-200}" --save-every "$steps" --keep-last 1 \
      --run-dir "$run" --quiet "${resume[@]}"
  done
}

if [ "${PARALLEL:-0}" = 1 ]; then  # the seeds side by side, one process (one thread) each
  pids=()
  for seed in $SEEDS; do train_seed "$seed" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid"; done  # fails if any seed failed
else
  for seed in $SEEDS; do train_seed "$seed"; done
fi

grpoctl report "$out"/g*-s* --baseline "$out/g16-s0" -o "$results"
