"""The hf backend's rollout on a real model: where the time goes, and what its two CPU
speed-ups gain (the KV cache appended in place, the linear layers' weights packed).

    .venv/bin/python bench/bench_hf_rollout.py --model SMOLLM2_DIR [--threads 2]

Rows, all in this process, same prompts and seeds, in turn for --rounds rounds:
  baseline   grpoctl.rollout.generate with transformers' own KV cache (torch.cat per
             token: rollout.kvcache.preallocate switched off) and torch's own GEMM
             (rollout.packed.can_pack switched off)
  cache      the cache appended in place only
  grpoctl    generate as it is: the cache appended in place and packed linear weights
The ratio is each row's best seconds over the baseline's best (the script checks that
the rows sample the same tokens; packed weights round differently, so a token may differ).

Then, for a grpoctl run under torch.profiler, the share of each kind of op:
  matmul     aten::mm/addmm and the packed mkldnn::_linear_pointwise (every linear
             layer, the LM head included)
  attention  scaled_dot_product_attention's kernels
  cache      aten::cat (what the in-place cache removes)
  other      norms, rotary embeddings, activations, the sampler, Python dispatch

Ceilings put the GFLOP/s into perspective: `yardstick` (fp32 torch.mm 1024^3 on
--threads threads, the best before and after, as bench_throughput.py) and `matmuls alone`:
the model's own linear-layer shapes at the decode batch (--prompts x --group-size rows),
each run in a loop by itself, i.e. the rate of a decoder whose every other op were free,
with torch's GEMM (the ceiling of the baseline and cache rows) and packed (grpoctl's).
FLOP are counted as bench_throughput.FlopCounter does (useful work only).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_throughput import FlopCounter, load_average, matmul_gflops  # noqa: E402
from bench_vllm import arith_prompts  # noqa: E402

KINDS = {"aten::mm": "matmul", "aten::addmm": "matmul", "mkldnn::_linear_pointwise": "matmul",
         "aten::cat": "cache",
         "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
         "aten::_scaled_dot_product_attention_math": "attention"}


def linear_shapes_gflops(model, rows: int, packed: bool, seconds: float = 0.3) -> float:
    """GFLOP/s of the model's linear layers at `rows` rows: each distinct shape timed alone
    (best of about `seconds` of repeats), weighted by how many layers have it; with torch's
    GEMM (F.linear) or with the weight packed (rollout/packed.py)."""
    import torch

    from grpoctl.rollout.packed import PackedLinear

    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    flop = elapsed = 0.0
    for (n_in, n_out), count in shapes.items():
        x, linear = torch.randn(rows, n_in), torch.nn.Linear(n_in, n_out, bias=False)
        product = PackedLinear(linear, rows) if packed else linear
        with torch.inference_mode():
            product(x)
            best, end = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                product(x)
                best = min(best, time.perf_counter() - start)
        flop += count * 2 * rows * n_in * n_out
        elapsed += count * best
    return flop / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory (e.g. SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import grpoctl.rollout.hf as hf
    import grpoctl.rollout.packed as packed
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.rollout import SamplingParams, generate

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}, {os.cpu_count()} "
          f"cores, {args.threads} threads, load average {load_average()}; {args.prompts} "
          f"prompts x {args.group_size}, <= {args.max_new_tokens} new tokens, fp32")
    yard = matmul_gflops(1024, 1024, 1024)
    model, tokenizer = load_policy(args.model), load_tokenizer(args.model)
    counter = FlopCounter(model)
    prompts = arith_prompts(tokenizer, args.prompts)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, seed=0)
    in_place, can_pack = hf.preallocate, packed.can_pack
    variants = ("baseline", "cache", "grpoctl")

    def rollout(variant: str) -> tuple[float, list[dict]]:
        if variant == "baseline":
            hf.preallocate = lambda cache, capacity: None
        if variant != "grpoctl":
            packed.can_pack = lambda model: False
        try:
            start = time.perf_counter()
            records = generate(model, tokenizer, prompts, args.group_size, sampling,
                               batch_size=len(prompts) * args.group_size, progress=False)
            return time.perf_counter() - start, records
        finally:
            hf.preallocate, packed.can_pack = in_place, can_pack

    generate(model, tokenizer, prompts[:2], 1, sampling, progress=False)  # warm-up
    best: dict[str, tuple[float, list[dict]]] = {}
    for r in range(args.rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            print(f"# round {r + 1}: {variant} ...", file=sys.stderr, flush=True)
            seconds, records = rollout(variant)
            if variant not in best or seconds < best[variant][0]:
                best[variant] = (seconds, records)
    tokens_of = {v: [r["completion_ids"] for r in best[v][1]] for v in variants}

    print("# profiling one grpoctl run ...", file=sys.stderr, flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rollout("grpoctl")
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        kind = KINDS.get(event.key, "other")
        shares[kind] = shares.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    rows = args.prompts * args.group_size
    alone = {False: linear_shapes_gflops(model, rows, packed=False),
             True: linear_shapes_gflops(model, rows, packed=True)}
    yard = max(yard, matmul_gflops(1024, 1024, 1024))

    print(f"yardstick: torch.mm fp32 1024^3 {yard:.1f} GFLOP/s on {args.threads} threads; "
          f"the model's matmuls alone at {rows} rows: {alone[False]:.1f} with torch's GEMM "
          f"({alone[False] / yard:.0%} of the yardstick), {alone[True]:.1f} packed "
          f"({alone[True] / yard:.0%})")
    print(f"{'rollout':<10} {'best s':>7} {'tokens':>7} {'tokens/s':>9} {'GFLOP/s':>8} "
          f"{'of yardstick':>12} {'of matmuls alone':>16} {'ratio':>6}")
    for variant in variants:
        seconds, records = best[variant]
        tokens = sum(len(r["completion_ids"]) for r in records)
        achieved = counter.batch(records, rollout=True) / seconds / 1e9
        print(f"{variant:<10} {seconds:>7.1f} {tokens:>7} {tokens / seconds:>9.0f} "
              f"{achieved:>8.1f} {achieved / yard:>12.0%} "
              f"{achieved / alone[variant == 'grpoctl']:>16.0%} "
              f"{seconds / best['baseline'][0]:>5.2f}x")
    for variant in variants[1:]:
        same = sum(a == b for a, b in zip(tokens_of[variant], tokens_of["baseline"]))
        print(f"{variant}: {same} of {len(tokens_of[variant])} completions as the baseline's")
    print("grpoctl's time by kind of op (torch.profiler, self CPU time): " + ", ".join(
        f"{kind} {shares.get(kind, 0.0) / total:.0%}"
        for kind in ("matmul", "attention", "cache", "other")))
    print(f"# load average {load_average()}")


if __name__ == "__main__":
    main()
