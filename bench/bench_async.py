"""Seconds per `grpoctl loop` step: sampling and updating in turn against `--async 1`.

Runs the embedded model's default loop (`--group-size 2`, 64 prompts a step, 32 new
tokens, no evaluation) for a few steps, once per setting and round, each run a fresh
process like the CLI:

    sync  --threads 1              one core busy at a time (the loop's default)
    sync  --threads 2              both cores on each stage in turn
    async --threads 1, sampler 1   --async 1: the sampler process on one core, the
                                   trainer on the other

and prints one table: the mean seconds per step after the first (the first includes
loading; with --async also the sampler process's start), the sampling and update
seconds of the sync loop, the whole run's wall time, and each setting's speed-up over
the sync loop with one thread. Rounds alternate the settings, so a busy machine slows
them alike.

    .venv/bin/python bench/bench_async.py [--steps 6] [--rounds 2] [--prompts-per-step 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = r"""
import json, sys
from grpoctl.config import LoopConfig
from grpoctl.loop import run_loop
run_loop(LoopConfig(**json.loads(sys.argv[1])))
"""

SETTINGS = {
    "sync, --threads 1": {"threads": 1},
    "sync, --threads 2": {"threads": 2},
    "--async 1, threads 1 + sampler 1": {"threads": 1, "async_steps": 1, "sampler_threads": 1},
}


def one_run(directory: Path, settings: dict, args) -> dict:
    config = {"run_dir": str(directory), "group_size": 2, "steps": args.steps,
              "prompts_per_step": args.prompts_per_step, "eval_prompts": None,
              "save_every": 1000, "seed": args.seed, **settings}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN, json.dumps(config)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(settings["threads"])})
    wall = time.perf_counter() - start
    steps = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    later = steps[1:] or steps
    return {"step_s": statistics.mean(m["step_s"] for m in later),
            "rollout_s": statistics.mean(m["rollout_s"] for m in later),
            "update_s": statistics.mean(m["update_s"] for m in later), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, settings in SETTINGS.items():
                print(f"round {r + 1}: {name}", file=sys.stderr, flush=True)
                results[name].append(one_run(Path(tmp) / f"{r}-{len(results[name])}-"
                                             f"{list(SETTINGS).index(name)}", settings, args))
    mean = {name: {k: statistics.mean(x[k] for x in runs) for k in runs[0]}
            for name, runs in results.items()}
    base = mean["sync, --threads 1"]["step_s"]
    print(f"{args.steps} steps x {args.prompts_per_step} prompts x G 2, 32 new tokens, "
          f"{args.rounds} rounds; s/step = mean of steps 2..{args.steps}")
    print("| setting | s/step | rollout wait s | update s | run wall s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in mean.items():
        print(f"| {name} | {m['step_s']:.2f} | {m['rollout_s']:.2f} | {m['update_s']:.2f} | "
              f"{m['wall_s']:.1f} | {base / m['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
