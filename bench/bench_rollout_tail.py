"""Rollout when completion lengths spread out: finished rows leave the batch, or not.

    python bench/bench_rollout_tail.py [--rows 64] [--max-new-tokens 256] [--reps 3]

GRPO completions on real tasks end anywhere between a few and max-new-tokens
tokens. `rollout.hf.sample_batch` drops finished rows from the batch and its KV
cache at the step they finish (the last rows move into their places); the baseline
(`drop_finished=False`, run in the same process, alternating with it) keeps decoding
padding for them until the last row ends. Both must sample the very same tokens
(checked).

The model is a random Llama (hidden 256, 4 layers, byte vocabulary) whose EOS
logit is pinned to 0, so each token ends the completion with a probability of
about 1/260: lengths spread from 1 to max-new-tokens, a long tail like real ones.
Times are the best of --reps runs, one torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpoctl.models import load_policy, load_tokenizer, make_tiny_model  # noqa: E402
from grpoctl.rollout.hf import sample_batch, sequence_seed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="completions in the batch (G = 2)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model_dir = make_tiny_model(tempfile.mkdtemp(), seed=0, hidden=256, layers=4)
    model, tok = load_policy(model_dir), load_tokenizer(model_dir)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0.0  # EOS logit 0: a constant stop chance
    prompts = [tok(f"Question {i}: what is {i} + {i}?", add_special_tokens=False)["input_ids"]
               for i in range(args.rows // 2)]
    prompt_ids = [p for p in prompts for _ in range(2)]
    seeds = [sequence_seed(0, str(i // 2), i % 2) for i in range(len(prompt_ids))]

    def run(drop_finished: bool) -> tuple[float, list]:
        start = time.perf_counter()
        out = sample_batch(model, prompt_ids, seeds, args.max_new_tokens, 1.0, 1.0, 0,
                           {tok.eos_token_id}, tok.pad_token_id, drop_finished=drop_finished)
        return time.perf_counter() - start, out

    run(True)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.reps):
        kept_seconds, kept = run(False)
        dropped_seconds, dropped = run(True)
        times[False].append(kept_seconds)
        times[True].append(dropped_seconds)
        # The same tokens; log-probs equal up to float rounding.
        assert [r[0] for r in dropped] == [r[0] for r in kept]
        assert max(abs(a - b) for r, q in zip(dropped, kept) for a, b in zip(r[1], q[1])) < 1e-5
    lengths = [len(ids) for ids, _, _ in kept]
    tokens = sum(lengths)
    print(f"# {args.rows} completions, max {args.max_new_tokens} new tokens; lengths: min "
          f"{min(lengths)}, median {statistics.median(lengths):.0f}, max {max(lengths)}")
    print(f"{'finished rows':<22} {'seconds':>8} {'tokens/s':>9} {'ratio':>6}")
    base = min(times[False])
    for drop, label in ((False, "kept (baseline)"), (True, "dropped (grpoctl)")):
        best = min(times[drop])
        print(f"{label:<22} {best:>8.3f} {tokens / best:>9.0f} {best / base:>5.2f}x")


if __name__ == "__main__":
    main()
