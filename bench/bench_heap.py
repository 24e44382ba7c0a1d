"""Seconds and page faults per update step, with glibc's defaults and with the heap kept
(grpoctl/heap.py, what `loop` and its --async sampler process set), alone and beside a
sampler process.

    python bench/bench_heap.py [--model DIR] [--reps 4]

Each setting runs in fresh processes: the update (bench_prefix.py's records: 24
sequences a step, micro-batch 8, one thread) and, for "beside a sampler", a process that
samples 96 completions of 32 tokens over and over with `generate` on the other core, as
`loop --async 1 --sampler-threads 1` does. The table gives medians over --reps steps
after one warm-up step, and the ratio against glibc's defaults alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def load(model_arg: str | None, keep: bool):
    import torch

    from grpoctl.heap import keep_freed_memory
    from grpoctl.models import load_policy, load_tokenizer, resolve_model_dir

    if keep:
        keep_freed_memory()
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(model_arg) if model_arg else ROOT / "grpoctl/default_model"
    return load_policy(model_dir), load_tokenizer(model_dir)


def update_worker(args) -> None:
    """--reps + 1 update steps; prints one JSON line: seconds, faults, kernel seconds."""
    from bench_prefix import make_records

    from grpoctl.update import UpdateConfig, make_optimizer, update_step

    model, tokenizer = load(args.model, args.keep)
    records = make_records(tokenizer, "{prompt} Put the final answer in \\boxed{}.", 12, seed=0)
    cfg = UpdateConfig(lr=1e-6, micro_batch_size=8, loss_agg="token-mean")
    optimizer = make_optimizer(model, cfg)
    rows = []
    for _ in range(args.reps + 1):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        update_step(model, optimizer, records, cfg)
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append([time.perf_counter() - start, after.ru_minflt - before.ru_minflt,
                     after.ru_stime - before.ru_stime])
    print(json.dumps([statistics.median(column) for column in zip(*rows[1:])]))


def sample_worker(args) -> None:
    """Samples until killed; prints "ready" once the first batch is done."""
    import torch

    from grpoctl.prompts import render_prompt

    model, tokenizer = load(args.model, args.keep)
    texts = [render_prompt(tokenizer, f"What is {i} + {i + 3}?", "{prompt}") for i in range(48)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = (t.repeat_interleave(2, 0) for t in (batch.input_ids, batch.attention_mask))
    for n in range(10**9):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32,
                           do_sample=True, pad_token_id=tokenizer.pad_token_id)
        if n == 0:
            print("ready", flush=True)


def run_setting(args, keep: bool, beside: bool) -> list[float]:
    flags = [f"--reps={args.reps}"] + (["--keep"] if keep else []) + \
            ([f"--model={args.model}"] if args.model else [])
    sampler = None
    if beside:
        sampler = subprocess.Popen([sys.executable, __file__, "--worker=sample", *flags],
                                   stdout=subprocess.PIPE, text=True)
        sampler.stdout.readline()
    try:
        out = subprocess.run([sys.executable, __file__, "--worker=update", *flags],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
    finally:
        if sampler:
            sampler.kill()
            sampler.wait()
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: embedded)")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["update", "sample"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (update_worker if args.worker == "update" else sample_worker)(args)
        return

    results = {}
    for beside in (False, True):
        for keep in (False, True):
            name = f"{'heap kept' if keep else 'glibc defaults'}, " \
                   f"{'beside a sampler' if beside else 'alone'}"
            results[name] = run_setting(args, keep, beside)
            print(f"{name}: {results[name]}", file=sys.stderr)
    name = Path(args.model).name if args.model else "embedded"
    print(f"model {name}, 24 sequences a step, micro-batch 8, 1 thread, medians of "
          f"{args.reps} steps")
    print("| update | s/step | page faults/step | in the kernel (s) | speed-up |\n"
          "| --- | --- | --- | --- | --- |")
    base = results["glibc defaults, alone"][0]
    for name, (seconds, faults, kernel) in results.items():
        print(f"| {name} | {seconds:.2f} | {faults:,.0f} | {kernel:.2f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
