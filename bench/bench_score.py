"""How fast do the light stages start, and how fast is the `math` reward?

    python bench/bench_score.py [--data data/math500.jsonl] [--workers N]

First table, start-up (seconds, median of 5 runs, lower is better): `grpoctl --help`,
`score --help`, `advantage --help` and `loop --help` (the most options) as new
processes, against the baseline of a bare `python -c pass`, and of `import typer`
(what any typer CLI pays) and `import torch` run the same way. On a loaded machine
compare the ratios, not the seconds; target: the help answers in under 0.5 s on an
idle one, so pipelines can start these commands often.

Second table, the `math` reward on MATH-500 reference solutions, end to end.

Rows (samples per second, higher is better):
  baseline       plain math-verify in one process: verify(parse("$" + gold + "$"),
                 parse(solution)) for each record (500/500 correct, as the data README says)
  score_records  grpoctl.rewards.score_records on the same records, caches emptied first
Cases:
  reference      completion = the reference solution, gold = its answer (all correct)
  reference x4   the same 500 records four times (2,000 records: pool start-up amortised,
                 repeated (gold, answer) pairs deduplicated, as in a GRPO group)
  shifted gold   gold = the next problem's answer (almost all wrong): answers that the
                 fast path cannot decide go through sympy, the slow, realistic case
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpoctl import answers, rewards  # noqa: E402
from grpoctl.config import ScoreSettings  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children: unlike wall time,
    it hardly moves when other jobs share the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def baseline(records: list[dict]) -> tuple[float, float, float]:
    from math_verify import parse, verify

    start, cpu = time.perf_counter(), cpu_seconds()
    correct = sum(verify(parse("$" + r["answer"] + "$"), parse(r["completion"])) for r in records)
    return time.perf_counter() - start, cpu_seconds() - cpu, correct / len(records)


def ours(records: list[dict], workers: int | None) -> tuple[float, float, float, dict]:
    rewards._verdict_cache.clear()  # a fair start: nothing judged yet in this process
    rewards._gold_cache.clear()
    answers.normalize_answer.cache_clear()
    answers.parse_number.cache_clear()
    start, cpu = time.perf_counter(), cpu_seconds()
    score = ScoreSettings(score_workers=workers)
    out, stats = rewards.score_records(records, score, progress=False)
    return time.perf_counter() - start, cpu_seconds() - cpu, stats["reward_mean"], stats


def median_seconds(argv: list[str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def startup_table() -> None:
    """Wall time of a new process for each command, against bare Python, `import typer`
    and `import torch`."""
    grpoctl = [sys.executable, "-m", "grpoctl"]
    rows = (("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
            ('python -c "import typer"', [sys.executable, "-c", "import typer"]),
            ('python -c "import torch"', [sys.executable, "-c", "import torch"]),
            ("grpoctl --help", [*grpoctl, "--help"]),
            ("grpoctl score --help", [*grpoctl, "score", "--help"]),
            ("grpoctl advantage --help", [*grpoctl, "advantage", "--help"]),
            ("grpoctl loop --help", [*grpoctl, "loop", "--help"]))
    seconds = {name: median_seconds(argv) for name, argv in rows}
    base, typer_s = seconds[rows[0][0]], seconds[rows[1][0]]
    print(f"{'start-up (median of 5)':<32} {'seconds':>8} {'vs python -c pass':>18}"
          f" {'vs import typer':>16}")
    for name, s in seconds.items():
        print(f"{name:<32} {s:>8.3f} {s / base:>17.1f}x {s / typer_s:>15.1f}x")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "math500.jsonl"))
    parser.add_argument("--workers", type=int, default=None, help="default: os.cpu_count()")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)

    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    reference = [{"prompt_id": str(i), "sample": 0, "completion": r["solution"],
                  "answer": r["answer"]} for i, r in enumerate(rows)]
    shifted = [{**r, "answer": rows[(i + 1) % len(rows)]["answer"]}
               for i, r in enumerate(reference)]
    x4 = [{**r, "sample": k} for k in range(4) for r in reference]

    startup_table()
    rewards._load_math_verify()  # import + warm-up, outside every timing (about 1 s once)
    print(f"# {len(rows)} MATH-500 problems, {os.cpu_count()} CPU cores, "
          f"workers={args.workers or os.cpu_count()}")
    print(f"{'case':<14} {'records':>7} {'baseline/s':>11} {'score_records/s':>16} {'ratio':>6}"
          f" {'cpu ms/rec (base / ours)':>25}  {'mean reward (base / ours)':>26}"
          "  fast/verified/timeouts")
    base_ref = None
    for name, records in (("reference", reference), ("reference x4", x4),
                          ("shifted gold", shifted)):
        if name == "reference x4":  # no cache in the baseline: x4 costs it exactly 4x
            base_s, base_cpu, base_mean = base_ref[0] * 4, base_ref[1] * 4, base_ref[2]
        else:
            base_s, base_cpu, base_mean = baseline(records)
        if name == "reference":
            base_ref = (base_s, base_cpu, base_mean)
        our_s, our_cpu, our_mean, stats = ours(records, args.workers)
        n = len(records)
        base_rate, our_rate = n / base_s, n / our_s
        print(f"{name:<14} {n:>7} {base_rate:>11.0f} {our_rate:>16.0f} {our_rate / base_rate:>5.1f}x"
              f" {1000 * base_cpu / n:>12.2f} / {1000 * our_cpu / n:<10.2f}"
              f"  {base_mean:>12.3f} / {our_mean:<11.3f}"
              f"  {stats['fast_path']}/{stats['verified']}/{stats['timeouts']}")


if __name__ == "__main__":
    main()
