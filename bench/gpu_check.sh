#!/usr/bin/env bash
# GPU smoke check and CPU-vs-GPU step time of `grpoctl loop` on the embedded model.
# Runs on a CUDA machine with torch and transformers installed; needs no network when
# the pure-Python wheels of math-verify and its two dependencies are in WHEELS
# (pip download --no-deps -d WHEELS math-verify latex2sympy2_extended antlr4-python3-runtime).
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# Prints, per device (and with --async 1 on the GPU): seconds per step and the held-out
# Mean@4 before/after; then the largest |rollout log-prob - update log-prob| in float32
# and bfloat16 on the GPU (the trainer/engine mismatch that the PPO ratio sees at step 0).
set -euo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
if [ -d "${WHEELS:-.gpu_wheels}" ]; then
  python -m pip install -q --no-deps --no-index --target .gpu_site "${WHEELS:-.gpu_wheels}"/*.whl
  export PYTHONPATH=$PWD/.gpu_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import math_verify" || { echo "math-verify is missing: see WHEELS above" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

steps=${STEPS:-30}
# cuda-async1: `--async 1` on the one GPU, the sampler process beside the trainer
for device in cuda cuda-async1 cpu; do
  flags=(--device "${device%-async1}")
  [ "$device" = cuda-async1 ] && flags+=(--async 1)
  python -m grpoctl loop --group-size 2 --steps "$steps" --eval-every "$steps" "${flags[@]}" \
    --run-dir "$out/run-$device" --quiet
  python - "$out/run-$device" "$device" <<'PY'
import json, sys
run, device = sys.argv[1], sys.argv[2]
m = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
e = [json.loads(l) for l in open(f"{run}/eval.jsonl")]
later = m[2:] or m
print(f"{device}: {sum(x['step_s'] for x in later) / len(later):.3f} s/step "
      f"(rollout {sum(x['rollout_s'] for x in later) / len(later):.3f}, update "
      f"{sum(x['update_s'] for x in later) / len(later):.3f}); "
      f"mean@4 {e[0]['mean_at_k']:.3f} -> {e[-1]['mean_at_k']:.3f}")
PY
done

python - <<'PY'
import torch
from grpoctl.logprobs import completion_logprobs
from grpoctl.models import load_policy, load_tokenizer
from grpoctl.prompts import load_prompts, render_prompt
from grpoctl.config import SamplingSettings
from grpoctl.rollout import generate

tok = load_tokenizer("default")
prompts = [dict(p, text=render_prompt(tok, p["text"])) for p in load_prompts("arith:test", limit=64)]
for dtype in ("float32", "bfloat16"):
    model = load_policy("default", dtype=dtype, device="cuda")
    records = generate(model, tok, prompts, 2, SamplingSettings(max_new_tokens=32, seed=0), progress=False)
    with torch.no_grad():
        new, _ = completion_logprobs(model, [r["prompt_ids"] for r in records],
                                     [r["completion_ids"] for r in records], temperature=1.0,
                                     pad_id=tok.pad_token_id)
    diff = max((n.float().cpu() - torch.tensor(r["logprobs"])).abs().max().item()
               for n, r in zip(new, records))
    print(f"cuda {dtype}: max |rollout - update| log-prob = {diff:.2e} over "
          f"{sum(len(r['completion_ids']) for r in records)} tokens")
PY
