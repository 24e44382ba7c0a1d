"""Rollout and update tokens/s against the machine's matmul GFLOP/s; `score` samples/s.

    python bench/bench_throughput.py [--threads 1] [--large 512x8] [--skip-score]

Rows:
  yardstick  fp32 torch.mm GFLOP/s with the same torch threads: a 1024^3 product, and
             one shaped like the tiny model's MLP ([rows x hidden] @ [hidden x 4 hidden]).
             Measured before and after the models; the larger of the two is used.
  rollout    grpoctl.rollout.generate (the hf backend, as `grpoctl loop` calls it):
             PROMPTS x G completions of up to --max-new-tokens tokens, temperature 1.
             tokens/s = completion tokens generated per second.
  update     grpoctl.update.update_step (AdamW, token-mean) on those completions with
             advantages +-1, so every sequence is trained. tokens/s = completion tokens
             trained per second.
  score      bench/bench_score.py, run as is (MATH-500 reference solutions).

FLOP counted (useful work only: padding and the tokens decoded after a row finished
are not counted), per layer of width d = heads x head_dim and per token:
  forward   2 x (weights of the layer's matmuls)  +  4 x d x (tokens it attends to)
            (QK^T and attention x V), plus 2 x hidden x vocab for each token whose
            logits are computed (the last prompt token and each completion token
            but the last).
  rollout   forward over each distinct prompt once (its G samples share the prefill)
            and over each generated token.
  update    3 x forward (backward = 2 x forward) over each distinct prompt once and
            every completion token (the samples of a prompt share its pass).
Achieved GFLOP/s = that FLOP / wall seconds; "of yardstick" = achieved / yardstick.

Two models: the embedded one (or --model), and a random --large HIDDENxLAYERS Llama
(default 512x8, about 31M parameters) with fewer rollouts (--large-prompts x
--large-group), to show how close the same code comes to the compute limit once the
matrices are big enough for per-call overhead not to dominate.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def usable_cores() -> int:
    """Cores this process may run on (taskset), not the machine's count."""
    return len(os.sched_getaffinity(0))


def matmul_gflops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """Best fp32 torch.mm GFLOP/s of [m x k] @ [k x n] over about `seconds` of repeats."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        torch.mm(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


# --- FLOP of the work done ----------------------------------------------------------


class FlopCounter:
    """Forward FLOP of a transformers decoder from its config (see the module docstring)."""

    def __init__(self, model):
        import torch

        cfg = model.config
        self.layers = cfg.num_hidden_layers
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.width = cfg.num_attention_heads * head_dim
        head = model.get_output_embeddings()
        self.head = head.weight.numel()
        # Every nn.Linear inside the layers (attention projections and MLP).
        self.body = sum(m.weight.numel() for m in model.model.layers.modules()
                        if isinstance(m, torch.nn.Linear))

    def forward(self, context_start: int, tokens: int, logits: int) -> float:
        """Forward FLOP of `tokens` new tokens after `context_start` cached ones, with
        `logits` of them projected on the vocabulary."""
        attended = tokens * context_start + tokens * (tokens + 1) // 2  # keys seen, summed
        return 2 * self.body * tokens + 4 * self.layers * self.width * attended \
            + 2 * self.head * logits

    def batch(self, records: list[dict], rollout: bool) -> float:
        """Forward FLOP of a rollout (or of one update's forward pass) over `records`."""
        prompts = {tuple(r["prompt_ids"]) for r in records}
        flop = sum(self.forward(0, len(p), 1) for p in prompts)  # one pass per distinct prompt
        for r in records:
            n = len(r["completion_ids"])
            # Rollout: each sampled token but the last is fed back (its logits sample the
            # next). Update: every completion token is fed, all but the last scored.
            fed = max(n - 1, 0)
            flop += self.forward(len(r["prompt_ids"]), fed, fed)
            if not rollout and n:
                flop += self.forward(len(r["prompt_ids"]) + fed, 1, 0)
        return flop


# --- the measurements ---------------------------------------------------------------


def measure(model_dir: str, prompts: int, group: int, args, reps: int) -> dict:
    """Wall seconds, tokens and FLOP of `reps` rollouts and updates (after one warm-up)."""
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.prompts import render_prompt
    from grpoctl.config import SamplingSettings
    from grpoctl.rollout import generate
    from grpoctl.task import load_split
    from grpoctl.update import UpdateConfig, make_optimizer, update_step

    model, tokenizer = load_policy(model_dir), load_tokenizer(model_dir)
    items = load_split("arith:train")
    rng = random.Random(0)
    cfg = UpdateConfig(lr=1e-6, micro_batch_size=prompts * group, loss_agg="token-mean")
    optimizer = make_optimizer(model, cfg)
    counter = FlopCounter(model)
    out = {"params": sum(p.numel() for p in model.parameters()), "rollout": [], "update": []}
    for rep in range(reps + 1):
        chosen = rng.sample(items, prompts)
        rendered = [dict(p, text=render_prompt(tokenizer, p["text"])) for p in chosen]
        sampling = SamplingSettings(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=rep)
        start = time.perf_counter()
        records = generate(model, tokenizer, rendered, group, sampling,
                           batch_size=prompts * group, progress=False)
        rollout_s = time.perf_counter() - start
        for i, r in enumerate(records):
            r["advantage"] = 1.0 if i % 2 else -1.0  # every sequence trained
        start = time.perf_counter()
        update_step(model, optimizer, records, cfg)
        update_s = time.perf_counter() - start
        if rep == 0:
            continue  # warm-up
        tokens = sum(len(r["completion_ids"]) for r in records)
        out["rollout"].append((rollout_s, tokens, counter.batch(records, rollout=True)))
        out["update"].append((update_s, tokens, 3 * counter.batch(records, rollout=False)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (default: the "
                        "embedded model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: "
                        "see bench/README.md)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step (default 64, "
                        "the loop's default for the embedded model)")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3, help="measured repeats (median)")
    parser.add_argument("--large", default="512x8", help="HIDDENxLAYERS of the random larger "
                        "Llama; 'none' to skip")
    parser.add_argument("--large-prompts", type=int, default=16)
    parser.add_argument("--large-group", type=int, default=4)
    parser.add_argument("--large-reps", type=int, default=1)
    parser.add_argument("--skip-score", action="store_true", help="do not run bench_score.py")
    parser.add_argument("--score-data", help="MATH-500 file for bench_score.py (default: its own)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from grpoctl.models import make_tiny_model, resolve_model_dir

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  CPU fp32, "
          f"{args.threads} torch thread(s), {usable_cores()} usable cores, load average "
          f"{load_average()}")
    yard_before = (matmul_gflops(1024, 1024, 1024), matmul_gflops(4096, 128, 512))
    runs = [("embedded" if args.model == "default" else Path(args.model).name,
             str(resolve_model_dir(args.model)), args.prompts, args.group_size, args.reps)]
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        if args.large != "none":
            hidden, layers = (int(x) for x in args.large.split("x"))
            large = make_tiny_model(Path(tmp) / "large", hidden=hidden, layers=layers,
                                    chat_template=(resolve_model_dir(args.model) /
                                                   "chat_template.jinja").read_text()
                                    if (resolve_model_dir(args.model) /
                                        "chat_template.jinja").is_file() else None)
            runs.append((f"random {args.large}", str(large), args.large_prompts, args.large_group,
                         args.large_reps))
        results = [(name, prompts, group, measure(path, prompts, group, args, reps))
                   for name, path, prompts, group, reps in runs]
    yard_after = (matmul_gflops(1024, 1024, 1024), matmul_gflops(4096, 128, 512))
    yardstick = max(yard_before[0], yard_after[0])
    shaped = max(yard_before[1], yard_after[1])

    print(f"yardstick: torch.mm fp32 1024x1024x1024 {yardstick:.1f} GFLOP/s "
          f"(before {yard_before[0]:.1f}, after {yard_after[0]:.1f}); "
          f"[4096x128]@[128x512] {shaped:.1f} GFLOP/s")
    print(f"{'model':<14} {'params':>7} {'batch':>8} {'stage':<8} {'s/batch':>8} {'tokens/s':>9}"
          f" {'GFLOP/batch':>11} {'GFLOP/s':>8} {'of yardstick':>12}")
    for name, prompts, group, res in results:
        for stage in ("rollout", "update"):
            seconds = statistics.median(x[0] for x in res[stage])
            tokens = statistics.median(x[1] for x in res[stage])
            flop = statistics.median(x[2] for x in res[stage])
            achieved = flop / seconds / 1e9
            print(f"{name:<14} {res['params'] / 1e6:>6.2f}M {f'{prompts}x{group}':>8} "
                  f"{stage:<8} {seconds:>8.3f} {tokens / seconds:>9.0f} {flop / 1e9:>11.2f} "
                  f"{achieved:>8.1f} {achieved / yardstick:>11.0%}")
    print(f"# target: rollout and update >= 50% of the yardstick; load average "
          f"{load_average()}")
    if not args.skip_score:
        print("score (bench/bench_score.py):", flush=True)
        command = [sys.executable, str(ROOT / "bench" / "bench_score.py"),
                   "--workers", str(usable_cores())]
        subprocess.run(command + (["--data", args.score_data] if args.score_data else []),
                       check=True)


if __name__ == "__main__":
    main()
