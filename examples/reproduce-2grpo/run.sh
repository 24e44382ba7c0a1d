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
# Two more experiments of the paper's v3:
#   - 2-GRPO+RS: G=2 with the same prompts, steps and lr as 2-GRPO, plus --refill (tied pairs
#     replaced by pairs of fresh prompts until the step holds 64 contrastive pairs, at most
#     16-GRPO's rollouts per step); its rollouts count the discarded ones (runs g2rs-s*);
#   - the group-size ablation at a fixed ABLATION_PROMPTS (16) prompts per step: G = 2, 4,
#     8, 16 with the same steps and lr, so larger G spends more rollouts (runs ablation/*).
# And one of grpoctl's own (EXPERIMENTS=async, not run by default):
#   - the embedded default job, `grpoctl loop --group-size 2`, against the same with
#     `--async 1` (the sampler one thread, the trainer one), one run at a time so that the
#     seconds compare (runs async/sync-s*, async/async1-s*).
# Then `grpoctl report` writes the tables and plots to results/, results/ablation/ and
# results/async/.
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

ABLATION_PROMPTS=${ABLATION_PROMPTS:-16}
EXPERIMENTS=${EXPERIMENTS:-"paper rs ablation"}

mkdir -p "$out"

train() {  # train RUN_DIR ARGS...: a loop run, resumed if it was cut short, skipped when done
  local run=$1 steps=$2; shift 2
  if [ -f "$run/checkpoints/step-$(printf %06d "$steps")/trainer_state.json" ]; then
    echo "done already: $run" >&2; return
  fi
  local resume=(); [ -f "$run/config.json" ] && resume=(--resume)
  grpoctl loop --steps "$steps" --limit "$N_PROMPTS" --clip-eps 0.2 --clip-eps-high 0.28 \
    --eval-every $(( steps >= 4 ? steps / 4 : 1 )) --eval-samples 4 --eval-limit "${EVAL_LIMIT:-200}" \
    --save-every "$steps" --keep-last 1 --run-dir "$run" --quiet "$@" "${resume[@]}"
}

train_seed() {  # every run of one seed, one after the other
  local seed=$1 g prompts steps lr
  for g in $GROUP_SIZES; do
    prompts=$((ROLLOUTS_PER_STEP / g))
    steps=$((EPOCHS * N_PROMPTS / prompts))
    lr=$(python3 -c "print(${BASE_LR} * ${prompts} / 8)")
    if [[ " $EXPERIMENTS " == *" paper "* ]]; then
      echo "G=$g seed=$seed: $prompts prompts/step, $steps steps, lr $lr" >&2
      train "$out/g${g}-s${seed}" "$steps" -G "$g" --prompts-per-step "$prompts" --lr "$lr" --seed "$seed"
    fi
    if [ "$g" = 2 ] && [[ " $EXPERIMENTS " == *" rs "* ]]; then
      echo "2-GRPO+RS seed=$seed: $prompts contrastive pairs/step, $steps steps, lr $lr" >&2
      train "$out/g2rs-s${seed}" "$steps" -G 2 --prompts-per-step "$prompts" --lr "$lr" \
        --seed "$seed" --refill --max-rollouts-per-step $((16 * prompts))
    fi
  done
  if [[ " $EXPERIMENTS " == *" ablation "* ]]; then
    prompts=$ABLATION_PROMPTS
    steps=$((EPOCHS * N_PROMPTS * 2 / ROLLOUTS_PER_STEP))  # 2-GRPO's steps: 48
    lr=$(python3 -c "print(${BASE_LR} * ${prompts} / 8)")
    for g in $GROUP_SIZES; do
      echo "ablation G=$g seed=$seed: $prompts prompts/step, $steps steps, lr $lr" >&2
      train "$out/ablation/g${g}-s${seed}" "$steps" -G "$g" --prompts-per-step "$prompts" \
        --lr "$lr" --seed "$seed"
    done
  fi
}

if [ "${PARALLEL:-0}" = 1 ]; then  # the seeds side by side, one process (one thread) each
  pids=()
  for seed in $SEEDS; do train_seed "$seed" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid"; done  # fails if any seed failed
else
  for seed in $SEEDS; do train_seed "$seed"; done
fi

if [[ " $EXPERIMENTS " == *" async "* ]]; then  # the default job, sync and --async 1, in turn
  for seed in $SEEDS; do
    for mode in sync async1; do
      run="$out/async/$mode-s$seed"
      if [ -f "$run/checkpoints/step-000100/trainer_state.json" ]; then
        echo "done already: $run" >&2; continue
      fi
      flags=(); [ "$mode" = sync ] || flags=(--async 1 --sampler-threads 1)
      [ -f "$run/config.json" ] && flags+=(--resume)
      echo "default job, $mode, seed=$seed" >&2
      grpoctl loop --group-size 2 --seed "$seed" --run-dir "$run" --quiet "${flags[@]}"
    done
  done
  grpoctl report "$out"/async/*-s* --baseline "$out/async/sync-s${SEEDS%% *}" -o "$results/async"
fi
[ "$EXPERIMENTS" != async ] || exit 0  # no run of the paper's experiments to report

# the baseline of the ratios: the largest G, first seed (16-GRPO by default)
baseline="g$(printf '%s\n' $GROUP_SIZES | sort -n | tail -1)-s${SEEDS%% *}"
grpoctl report "$out"/g*-s* --baseline "$out/$baseline" -o "$results"
if [[ " $EXPERIMENTS " == *" ablation "* ]]; then
  grpoctl report "$out"/ablation/g*-s* --baseline "$out/ablation/$baseline" -o "$results/ablation"
fi
