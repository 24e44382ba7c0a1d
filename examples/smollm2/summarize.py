"""Held-out Mean@k before and after, per run and averaged over seeds, as JSON on stdout.

    python examples/smollm2/summarize.py RUN_DIR [RUN_DIR ...] > summary.json

The standard error of a Mean@k over N prompts is bounded without per-prompt data:
each prompt's Mean@k lies in [0, 1], so its variance is at most p(1-p), and
se <= sqrt(p(1-p)/N). The rise's bound treats the two evaluations as independent;
they share their prompts, which only makes the true error smaller.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def se_bound(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(run: Path) -> dict:
    evals = read_jsonl(run / "eval.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    first, last = evals[0], evals[-1]
    n, k = first["prompts"], first["k"]
    se_start, se_end = se_bound(first["mean_at_k"], n), se_bound(last["mean_at_k"], n)
    rise = last["mean_at_k"] - first["mean_at_k"]
    return {
        "run": run.name,
        "seed": json.loads((run / "config.json").read_text())["seed"],
        "steps": metrics[-1]["step"],
        "rollouts": metrics[-1]["rollouts"],
        "train_seconds": round(metrics[-1]["elapsed_s"], 1),
        "eval_prompts": n,
        "k": k,
        "mean_at_k_start": round(first["mean_at_k"], 4),
        "mean_at_k_end": round(last["mean_at_k"], 4),
        "pass_at_k_start": round(first["pass_at_k"], 4),
        "pass_at_k_end": round(last["pass_at_k"], 4),
        "rise": round(rise, 4),
        "se_bound_start": round(se_start, 4),
        "se_bound_end": round(se_end, 4),
        "se_bound_rise": round(math.hypot(se_start, se_end), 4),
        "train_accuracy_first_step": round(metrics[0]["accuracy"], 4),
        "train_accuracy_last_step": round(metrics[-1]["accuracy"], 4),
        "response_length_first_step": round(metrics[0]["response_length"], 2),
        "response_length_last_step": round(metrics[-1]["response_length"], 2),
        "zero_adv_frac_last_step": round(metrics[-1]["zero_adv_frac"], 4),
    }


def main(runs: list[str]) -> None:
    rows = [summarize(Path(r)) for r in runs]
    mean = {key: round(sum(r[key] for r in rows) / len(rows), 4)
            for key in ("mean_at_k_start", "mean_at_k_end", "rise", "train_seconds")}
    json.dump({"runs": rows, "mean_over_seeds": mean}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python examples/smollm2/summarize.py RUN_DIR [RUN_DIR ...]")
    main(sys.argv[1:])
