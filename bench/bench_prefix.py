"""Seconds per update step on chat-template prompts: what sharing their tokens saves.

    python bench/bench_prefix.py [--model DIR] [--pairs 12] [--reps 3] [--threads 1]

A chat template puts the same tokens before every prompt (SmolLM2's system prompt is 27
of its ~48 prompt tokens on examples/smollm2's task), and a GRPO group's completions
share their prompt. Three ways of running the update's forward pass
(grpoctl/logprobs.py), the last grpoctl's:

  one pass per sequence   prompt + completion, each sequence in full (TRL's way)
  prompt once             each distinct prompt once, its KV cache shared by its group
  prefix once             besides, the prompts' common prefix once per micro-batch

Each step: --pairs prompts ("What is a + b?" in --template, through the model's chat
template), two completions each of 8-16 random tokens with advantages +1 and -1 (so
every sequence is trained), AdamW, --micro-batch-size 8 as in examples/smollm2. The
settings alternate, --reps times each after one warm-up step each; the table gives the
median seconds per step, the kernel's part of them (page faults, mostly) and the ratio
against the first.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_records(tokenizer, template: str, pairs: int, seed: int) -> list[dict]:
    from grpoctl.prompts import render_prompt
    from grpoctl.rollout import tokenize_prompts

    rng = random.Random(seed)
    texts = [f"What is {rng.randint(2, 20)} + {rng.randint(2, 20)}?" for _ in range(pairs)]
    prompt_ids = tokenize_prompts(tokenizer, [{"text": render_prompt(tokenizer, t, template)}
                                              for t in texts])
    records = []
    for ids in prompt_ids:
        for advantage in (1.0, -1.0):
            # (modulo the vocabulary: the embedded model's is smaller than 1,000)
            completion = [rng.randrange(100, 1000) % len(tokenizer)
                          for _ in range(rng.randint(8, 16))]
            records.append({"prompt_ids": ids, "completion_ids": completion,
                            "logprobs": [-1.0] * len(completion), "advantage": advantage})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: embedded)")
    parser.add_argument("--template", default="{prompt} Put the final answer in \\boxed{}.")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    import grpoctl.logprobs
    import grpoctl.padding
    from grpoctl.models import load_policy, load_tokenizer, resolve_model_dir
    from grpoctl.padding import common_prefix_length
    from grpoctl.update import UpdateConfig, make_optimizer, update_step

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model) if args.model else ROOT / "grpoctl/default_model"
    model, tokenizer = load_policy(model_dir), load_tokenizer(model_dir)
    records = make_records(tokenizer, args.template, args.pairs, seed=0)
    prompts = [r["prompt_ids"] for r in records]
    shared = common_prefix_length(prompts)
    cfg = UpdateConfig(lr=1e-6, micro_batch_size=args.micro_batch_size, loss_agg="token-mean")
    optimizer = make_optimizer(model, cfg)
    shared_pass = grpoctl.logprobs._shared_prompt_logits

    def no_shared_pass(*args):
        return None  # padded_completion_logprobs then runs one pass over every sequence

    settings = {"one pass per sequence": (10**9, no_shared_pass),
                "prompt once": (10**9, shared_pass),
                "prefix once": (grpoctl.padding.MIN_SHARED_PREFIX, shared_pass)}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    kernel: dict[str, list[float]] = {name: [] for name in settings}  # page faults, mostly
    for rep in range(args.reps + 1):
        for name, (minimum, pass_fn) in settings.items():
            grpoctl.padding.MIN_SHARED_PREFIX = minimum
            grpoctl.logprobs._shared_prompt_logits = pass_fn
            start, system = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
            update_step(model, optimizer, records, cfg)
            if rep:  # the first round warms up
                seconds[name].append(time.perf_counter() - start)
                kernel[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - system)
            print(f"rep {rep} {name}: {time.perf_counter() - start:.2f} s", file=sys.stderr)

    print(f"model {model_dir.name}, {len(records)} sequences a step, prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens of which {shared} common, "
          f"micro-batch {args.micro_batch_size}, {args.threads} thread(s)")
    print("| update | s/step (median) | in the kernel | speed-up |\n| --- | --- | --- | --- |")
    base = statistics.median(seconds["one pass per sequence"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {statistics.median(kernel[name]):.2f} | "
              f"{base / median:.2f}x |")


if __name__ == "__main__":
    main()
