"""The hf backend's rollout on a real model: where the time goes, and what its CPU speed-ups
gain (the KV cache appended in place, the linear layers' weights packed, decode attention,
the prompts' common prefix run once).

    .venv/bin/python bench/bench_hf_rollout.py --model SMOLLM2_DIR [--threads 2]

Rows, all in this process, same prompts and seeds, in turn for --rounds rounds:
  baseline   grpoctl.rollout.generate with transformers' own KV cache (torch.cat per
             token: rollout.kvcache.preallocate switched off), torch's own GEMM
             (rollout.packed.can_pack switched off) and sdpa at every step
             (rollout.attention switched off)
  cache      the cache appended in place only
  packed     and packed linear weights
  attention  and decode steps attend by rollout/attention.py
  grpoctl    generate as it is: and the prompts' common prefix (the chat template's
             system prompt) runs once for all of them (padding.MIN_SHARED_PREFIX
             raised past any prompt for the rows before)
The ratio is each row's best seconds over the baseline's best. Each change rounds
differently (to fp32 rounding), so a few completions differ from the baseline's.

Then, for a grpoctl run under torch.profiler, the share of each kind of op:
  matmul     aten::mm/addmm and the packed mkldnn::_linear_pointwise (every linear
             layer, the LM head included)
  attention  scaled_dot_product_attention's kernels, and aten::bmm (the products of
             rollout/attention.py's decode steps; their small softmax counts as other)
  cache      aten::cat (what the in-place cache removes)
  other      norms, rotary embeddings, activations, the sampler, Python dispatch

Ceilings put the GFLOP/s into perspective: `yardstick` (fp32 torch.mm 1024^3 on
--threads threads as bench_throughput.py, the best of readings at the start, before every
rollout and at the end: on a shared machine it moves by +-20%) and `matmuls
alone`: every linear layer of the model, in the model's order, on --prompts x
--group-size rows and nothing else, i.e. a decode step whose every other op were free
(best of a few such steps), with torch's GEMM (the ceiling of the baseline and cache
rows) and packed (the packed and grpoctl rows).
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
         "aten::_scaled_dot_product_attention_math": "attention",
         "aten::bmm": "attention"}


def decode_matmuls_gflops(model, rows: int, packed: bool, steps: int = 5) -> float:
    """GFLOP/s of a decode step's linear layers alone: each of the model's, in its order,
    on `rows` rows (so each weight comes from memory, as in a step); the best of `steps`,
    with torch's GEMM (F.linear) or with the weights packed (rollout/packed.py)."""
    import torch

    from grpoctl.rollout.packed import PackedLinear

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    products = [PackedLinear(m, rows) if packed else m for m in linears]
    inputs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
    flop = sum(2 * rows * m.in_features * m.out_features for m in linears)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(steps + 1):  # the first one warms up
            start = time.perf_counter()
            for product, linear in zip(products, linears):
                product(inputs[linear.in_features])
            best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


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

    import grpoctl.padding as padding
    import grpoctl.rollout.attention as attention
    import grpoctl.rollout.hf as hf
    import grpoctl.rollout.packed as packed
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.config import SamplingSettings
    from grpoctl.rollout import generate

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
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, seed=0)
    in_place, can_pack, switchable = hf.preallocate, packed.can_pack, attention._switchable_config
    min_shared = padding.MIN_SHARED_PREFIX
    variants = ("baseline", "cache", "packed", "attention", "grpoctl")

    def rollout(variant: str) -> tuple[float, list[dict]]:
        if variant == "baseline":
            hf.preallocate = lambda cache, capacity: False
        if variant in ("baseline", "cache"):
            packed.can_pack = lambda model: False
        if variant in ("baseline", "cache", "packed"):
            attention._switchable_config = lambda model: None
        if variant != "grpoctl":
            padding.MIN_SHARED_PREFIX = sys.maxsize
        try:
            start = time.perf_counter()
            records = generate(model, tokenizer, prompts, args.group_size, sampling,
                               batch_size=len(prompts) * args.group_size, progress=False)
            return time.perf_counter() - start, records
        finally:
            hf.preallocate, packed.can_pack, attention._switchable_config = (
                in_place, can_pack, switchable)
            padding.MIN_SHARED_PREFIX = min_shared

    generate(model, tokenizer, prompts[:2], 1, sampling, progress=False)  # warm-up
    best: dict[str, tuple[float, list[dict]]] = {}
    for r in range(args.rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            print(f"# round {r + 1}: {variant} ...", file=sys.stderr, flush=True)
            yard = max(yard, matmul_gflops(1024, 1024, 1024))  # the machine's best, all along
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
    alone = {False: decode_matmuls_gflops(model, rows, packed=False),
             True: decode_matmuls_gflops(model, rows, packed=True)}
    yard = max(yard, matmul_gflops(1024, 1024, 1024))

    print(f"yardstick: torch.mm fp32 1024^3 {yard:.1f} GFLOP/s on {args.threads} threads; "
          f"a decode step's matmuls alone at {rows} rows: {alone[False]:.1f} with torch's GEMM "
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
              f"{achieved / alone[variant not in ('baseline', 'cache')]:>16.0%} "
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
