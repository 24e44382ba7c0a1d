"""The "real checkpoint" features on a GPU: dtype, gradient checkpointing, LoRA, attention
implementation and IS correction, on a random Qwen2 model of a few hundred million parameters.

    python bench/gpu_scale_check.py                       # CUDA, ~216M parameters
    OMP_NUM_THREADS=1 python bench/gpu_scale_check.py --device cpu --hidden 64 --layers 2 \
        --vocab 512 --seqs 4 --prompt-len 8 --completion-len 8     # smoke test, seconds

What it does (everything through grpoctl's own functions):
  model     models.make_tiny_model: a randomly initialised Qwen2 (--hidden, --layers, --heads,
            --kv-heads, --vocab; MLP 4 x hidden, tied embeddings) saved to a temp dir, then
            loaded by models.load_training_policy, as `grpoctl update` loads a checkpoint.
  records   --seqs sequences (--group per prompt; 1 = every prompt distinct, so every
            configuration runs the same single pass), random token ids, prompt and completion
            lengths drawn in [3/4 L, L] (so rows are padded), advantages +-1 (every sequence is
            trained), logprobs from the fp32 model itself (the bf16 model's for the IS check).
  timing    per configuration: one warm-up update_step (AdamW, lr --lr), then the mean of
            --steps timed steps (torch.cuda.synchronize around each) and the peak of
            torch.cuda.max_memory_allocated over them (weights, gradients, AdamW state and
            activations: everything resident during a step).
  checks    log-prob max |eager - sdpa| in fp32 and bf16; gradient checkpointing against
            none (fp32, SGD lr 1, no clipping: the weight change IS the gradient; a rerun of
            the plain step gives the GPU's own run-to-run noise floor); IS correction
            (records' logprobs from the bf16 model as the "engine", fp32 trainer, --is-cap).

stdout: one markdown table and the checks; stderr: progress. Each section is guarded: a
failure is reported in its row and the rest still runs; past --deadline seconds the
remaining sections are skipped, so a time-limited run still prints its table.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from grpoctl.logprobs import completion_logprobs  # noqa: E402
from grpoctl.config import AdapterSettings  # noqa: E402
from grpoctl.models import load_policy, load_training_policy, make_tiny_model  # noqa: E402
from grpoctl.update import UpdateConfig, make_optimizer, update_step  # noqa: E402

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    """Drop the last configuration's tensors so the next one's peak is its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def make_records(vocab: int, seqs: int, group: int, prompt_len: int, completion_len: int,
                 seed: int) -> list[dict]:
    """`seqs` records, `group` per prompt, random ids in [2, vocab), advantages +-1 and no
    logprobs yet. Lengths are drawn in [3/4 L, L] so batches are padded."""
    rng = random.Random(seed)
    records = []
    for i in range(seqs):
        if i % group == 0:
            prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(max(1, prompt_len * 3 // 4),
                                                                         prompt_len))]
        n = rng.randint(max(1, completion_len * 3 // 4), completion_len)
        records.append({"prompt_id": f"q{i // group}", "sample": i % group, "prompt_ids": prompt,
                        "completion_ids": [rng.randrange(2, vocab) for _ in range(n)],
                        "advantage": 1.0 if (i // group + i % group) % 2 == 0 else -1.0,
                        "sampling": {"temperature": 1.0, "max_new_tokens": completion_len}})
    return records


def model_logprobs(model, records: list[dict], batch: int) -> list[torch.Tensor]:
    """Each record's completion log-probs under `model` (no gradient), on the CPU."""
    out = []
    with torch.no_grad():
        for first in range(0, len(records), batch):
            chunk = records[first:first + batch]
            logps, _ = completion_logprobs(model, [r["prompt_ids"] for r in chunk],
                                           [r["completion_ids"] for r in chunk])
            out += [lp.float().cpu() for lp in logps]
    return out


def with_logprobs(records: list[dict], logps: list[torch.Tensor]) -> list[dict]:
    return [dict(r, logprobs=lp.tolist()) for r, lp in zip(records, logps)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def time_config(path, records, args, dtype: str, attn: str, checkpointing: bool,
                lora_r: int) -> dict:
    """One warm-up update_step, then --steps timed ones: seconds/step and peak GiB."""
    lora = AdapterSettings(lora_r=lora_r) if lora_r else None
    model = load_training_policy(path, dtype, args.device, attn_implementation=attn,
                                 gradient_checkpointing=checkpointing, lora=lora)
    cfg = UpdateConfig(lr=args.lr, micro_batch_size=args.micro_batch_size)
    optimizer = make_optimizer(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    update_step(model, optimizer, records, cfg)  # warm-up: kernels, allocator, AdamW state
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps):
        sync(args.device)
        start = time.perf_counter()
        metrics = update_step(model, optimizer, records, cfg)
        sync(args.device)
        seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda")
            else None)
    del model, optimizer
    free(args.device)
    return {"seconds": sum(seconds) / len(seconds), "peak_gib": peak, "trainable": trainable,
            "grad_norm": metrics["grad_norm"]}


def sgd_weights_after(path, records, args, checkpointing: bool) -> dict:
    """The fp32 weights after one update_step with SGD lr 1 and no clipping (= w - grad)."""
    model = load_training_policy(path, "float32", args.device, attn_implementation="sdpa",
                                 gradient_checkpointing=checkpointing)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    update_step(model, optimizer, records, UpdateConfig(max_grad_norm=0.0,
                                                        micro_batch_size=args.micro_batch_size))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    del model, optimizer
    free(args.device)
    return weights


def weights_max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def guarded(results: dict, name: str, args, fn):
    """Run one section; a failure or a passed deadline is recorded, not raised."""
    if time.perf_counter() - START > args.deadline:
        results[name] = "skipped (--deadline reached)"
        log(f"{name}: skipped, past the deadline")
        return None
    log(f"{name} ...")
    try:
        value = fn()
    except Exception as e:  # one broken section must not cost the others' numbers
        traceback.print_exc(file=sys.stderr)
        results[name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        free(args.device)
        return None
    log(f"{name}: {value}")
    return value


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--group", type=int, default=1, help="completions per prompt (1 = distinct)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--completion-len", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--is-cap", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=170.0,
                    help="seconds after which remaining sections are skipped")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available (use --device cpu for a smoke test)", file=sys.stderr)
        return 1

    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "missing"
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"cpu ({torch.get_num_threads()} threads)")
    log(f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft_version}")

    transformers.utils.logging.disable_progress_bar()  # stderr stays one line per section
    tmp = tempfile.TemporaryDirectory(prefix="grpoctl-gpu-scale-")
    path = Path(tmp.name) / "model"
    make_tiny_model(path, "qwen2", seed=args.seed, vocab_size=args.vocab, hidden=args.hidden,
                    layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                    max_positions=max(2048, args.prompt_len + args.completion_len))
    base = make_records(args.vocab, args.seqs, args.group, args.prompt_len, args.completion_len,
                        args.seed)
    completion_tokens = sum(len(r["completion_ids"]) for r in base)
    prompt_tokens = sum(len(r["prompt_ids"]) for r in base)
    log(f"model saved ({time.perf_counter() - START:.1f}s); {len(base)} records, "
        f"{prompt_tokens} prompt + {completion_tokens} completion tokens")

    checks: dict[str, object] = {}
    logps: dict[tuple[str, str], list[torch.Tensor]] = {}
    n_params = None

    # Log-probs under each dtype x attention: the records' logprobs and the eager/sdpa check.
    for dtype in ("float32", "bfloat16"):
        for attn in ("sdpa", "eager"):
            def run(dtype=dtype, attn=attn):
                nonlocal n_params
                model = load_policy(path, dtype, args.device, attn_implementation=attn)
                n_params = sum(p.numel() for p in model.parameters())
                logps[dtype, attn] = model_logprobs(model, base, args.micro_batch_size)
                del model
                free(args.device)
                return f"{sum(len(x) for x in logps[dtype, attn])} log-probs"
            guarded(checks, f"logprobs {dtype} {attn}", args, run)
    for dtype in ("float32", "bfloat16"):
        if (dtype, "sdpa") in logps and (dtype, "eager") in logps:
            checks[f"{dtype}: log-prob max |eager - sdpa|"] = (
                f"{max_diff(logps[dtype, 'sdpa'], logps[dtype, 'eager']):.3e}")
    if ("float32", "sdpa") in logps and ("bfloat16", "sdpa") in logps:
        checks["log-prob max |bf16 - fp32| (sdpa)"] = (
            f"{max_diff(logps['bfloat16', 'sdpa'], logps['float32', 'sdpa']):.3e}")
    records = None  # without the fp32 log-probs nothing below can run; the report still prints
    if ("float32", "sdpa") in logps:
        records = with_logprobs(base, logps["float32", "sdpa"])

    configs = [  # (name, dtype, attention, gradient checkpointing, LoRA rank)
        ("full fp32", "float32", "sdpa", False, 0),
        ("full fp32 + gradient checkpointing", "float32", "sdpa", True, 0),
        ("full bf16", "bfloat16", "sdpa", False, 0),
        ("full bf16 + gradient checkpointing", "bfloat16", "sdpa", True, 0),
        (f"bf16 + LoRA r={args.lora_r} (all-linear)", "bfloat16", "sdpa", False, args.lora_r),
        ("full bf16, eager attention", "bfloat16", "eager", False, 0),
    ]
    rows: dict[str, object] = {}
    for name, dtype, attn, ckpt, r in configs:
        if records is None:
            rows[name] = "skipped: no records' log-probs"
            continue
        value = guarded(rows, name, args,
                        lambda: time_config(path, records, args, dtype, attn, ckpt, r))
        if value is not None:
            rows[name] = value

    def checkpointing_check():
        plain = sgd_weights_after(path, records, args, checkpointing=False)
        checkpointed = sgd_weights_after(path, records, args, checkpointing=True)
        diff = weights_max_diff(plain, checkpointed)
        del checkpointed
        rerun = sgd_weights_after(path, records, args, checkpointing=False)
        noise = weights_max_diff(plain, rerun)
        del rerun
        start = load_policy(path, "float32", args.device)
        moved = max((plain[n] - p.detach()).abs().max().item()
                    for n, p in start.named_parameters())
        del start, plain
        free(args.device)
        return (f"max |Δw(ckpt) - Δw(plain)| = {diff:.3e}; plain rerun (noise floor) "
                f"{noise:.3e}; largest |Δw| {moved:.3e}")
    value = None
    if records is not None:
        value = guarded(checks, "gradient checkpointing vs none (fp32, SGD lr 1)", args,
                        checkpointing_check)
    if value is not None:
        checks["gradient checkpointing vs none (fp32, SGD lr 1)"] = value

    def is_check():
        engine_records = with_logprobs(base, logps["bfloat16", "sdpa"])
        model = load_training_policy(path, "float32", args.device, attn_implementation="sdpa")
        cfg = UpdateConfig(lr=args.lr, micro_batch_size=args.micro_batch_size,
                           is_cap=args.is_cap)
        m = update_step(model, make_optimizer(model, cfg), engine_records, cfg)
        del model
        free(args.device)
        return (f"logp_mismatch_max {fmt(m['logp_mismatch_max'], '.3e')}, is_weight_mean "
                f"{fmt(m['is_weight_mean'], '.6f')}, is_capped_fraction "
                f"{fmt(m['is_capped_fraction'], '.2e')}, ratio_mean {fmt(m['ratio_mean'], '.6f')}, "
                f"clip_fraction {m['clip_fraction']:.2e}")
    name = f"IS correction (bf16 engine log-probs, fp32 trainer, --is-cap {args.is_cap:g})"
    if ("bfloat16", "sdpa") in logps and records is not None:
        value = guarded(checks, name, args, is_check)
        if value is not None:
            checks[name] = value
    else:
        checks[name] = "skipped: no log-probs"

    # --- the report ---------------------------------------------------------------
    print(f"device: {device_name}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft_version}")
    print(f"model: random Qwen2, {fmt(n_params and n_params / 1e6, '.1f')}M parameters (hidden "
          f"{args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab "
          f"{args.vocab}, tied embeddings); update: {len(base)} sequences ({args.group} per "
          f"prompt), {prompt_tokens} prompt + {completion_tokens} completion tokens, "
          f"micro-batch {args.micro_batch_size}, AdamW lr {args.lr:g}; mean of {args.steps} "
          f"step(s) after 1 warm-up")
    print()
    print("| config | s/step | completion tok/s | peak GiB | trainable params | time vs full fp32 "
          "| memory vs full fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    def ratio(x):
        return "n/a" if x is None else f"{x:.2f}x"

    ref = rows.get("full fp32")
    for name, *_ in configs:
        row = rows.get(name)
        if not isinstance(row, dict):
            print(f"| {name} | {row} | | | | | |")  # the failure or skip
            continue
        time_ratio = mem_ratio = None
        if isinstance(ref, dict):
            time_ratio = row["seconds"] / ref["seconds"]
            if row["peak_gib"] is not None and ref["peak_gib"]:
                mem_ratio = row["peak_gib"] / ref["peak_gib"]
        print(f"| {name} | {row['seconds']:.3f} | {completion_tokens / row['seconds']:.0f} | "
              f"{fmt(row['peak_gib'], '.2f')} | {row['trainable'] / 1e6:.2f}M | "
              f"{ratio(time_ratio)} | {ratio(mem_ratio)} |")
    print()
    for key, value in checks.items():
        if not key.startswith("logprobs ") or str(value).startswith(("FAILED", "skipped")):
            print(f"- {key}: {value}")
    log(f"done in {time.perf_counter() - START:.1f}s")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
