"""Build grpoctl's embedded default model: a tiny Llama warm-started on the arith task.

Two supervised phases, two commands (docs/default-model.md has the figures):

    python scripts/train_default_model.py --out /tmp/arith-clean
    python scripts/train_default_model.py --init /tmp/arith-clean --careless 0.5 \
        --lr 1e-3 --warmup 10 --decay-steps 150 --max-steps 150 --target 1.0

Phase 1 trains from scratch on the train split's reference solutions ("23 + 45 =
68. \\boxed{68}") until held-out accuracy, sampled at temperature 1, first reaches
--target (45%). Stopping at a target rather than after a fixed time matters: the
accuracy of a model this small jumps sharply, at different steps from run to run.

Phase 2 continues briefly on solutions of which half carry a copying slip (the
equation right, the boxed answer's last two digits swapped: task.careless_completion),
the way human-written solutions carry careless mistakes. The model picks up the
habit, its sampled accuracy halves, and the reward never pays for the slip, so
GRPO has something to remove within the default run's few minutes. (A model
whose only errors are confident arithmetic mistakes improves under RL too, but
several times more slowly: the first version of the default model did.)

The prompt is rendered exactly as rollout renders it (the tokenizer's chat
template with add_generation_prompt=True); the loss covers only the completion
tokens and the EOS that ends them. Plain torch loop, AdamW, seeded; on CPU
with the same torch version and thread count a run repeats exactly
(different thread counts can change float summation order and so the run).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from grpoctl.models import byte_level_tokenizer, tiny_config
from grpoctl.task import careless_completion, load_split, reference_completion

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "grpoctl" / "default_model"

# "Q: ...\nA: " -- a chat template like a real instruct model's, so the
# chat-template code path in rollout is exercised by the default model. Short,
# because with a byte-level tokenizer every character is a token to compute.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}A: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)
KEEP = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "training.json"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def boxed_answer(text: str) -> str | None:
    """Contents of the last \\boxed{...} (no nested braces: answers here are integers)."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else None


def is_correct(completion: str, answer: str) -> bool:
    """The integer fast path of the `math` reward: last boxed value equals the gold integer."""
    got = boxed_answer(completion)
    try:
        return got is not None and int(got) == int(answer)
    except ValueError:
        return False


def render_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def encode_examples(tokenizer, items: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, reference completion ids + EOS, careless completion ids + EOS) for each item."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [tokenizer.eos_token_id]
    return [(ids(render_prompt(tokenizer, it["text"])), ids(reference_completion(it)) + eos,
             ids(careless_completion(it)) + eos) for it in items]


def make_batch(examples, pad_id: int):
    """Right-padded inputs, positions 0..n-1, labels -100 everywhere but the completion."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p):n] = torch.tensor(c)
        mask[i, :n] = 1
    return ids, mask, labels


@torch.no_grad()
def accuracy(model, tokenizer, items: list[dict], temperature: float, max_new_tokens: int,
             batch_size: int = 100) -> float:
    """Fraction of items whose completion's last \\boxed{} equals the answer (temperature 0 = greedy)."""
    model.eval()
    right = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        enc = tokenizer([render_prompt(tokenizer, it["text"]) for it in chunk], return_tensors="pt",
                        padding=True, add_special_tokens=False)
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
            if temperature > 0 else {"do_sample": False}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **kwargs)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(is_correct(t, it["answer"]) for t, it in zip(texts, chunk))
    model.train()
    return right / len(items)


def lr_factor(step: int, warmup: int, decay_steps: int) -> float:
    """Linear warm-up, then cosine decay to 0.1 at `decay_steps` (nanoGPT's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50, help="linear lr warm-up steps")
    ap.add_argument("--decay-steps", type=int, default=1200,
                    help="cosine decay of the lr to 10%% over this many steps (then held there)")
    ap.add_argument("--target", type=float, default=0.45,
                    help="stop once held-out accuracy sampled at temperature 1 reaches this")
    ap.add_argument("--careless", type=float, default=0.0,
                    help="share of training solutions whose boxed answer has its last two digits swapped")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from this model directory instead of a random initialisation")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; fixed because the thread count changes float summation order")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = tiny_config("llama", hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2,
                         max_positions=256)
    model = AutoModelForCausalLM.from_pretrained(str(args.init)) if args.init \
        else AutoModelForCausalLM.from_config(config)
    earlier_record = args.init / "training.json" if args.init else None  # the earlier phase's
    earlier = json.loads(earlier_record.read_text()) if earlier_record and earlier_record.is_file() else None
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny llama: {n_params:,} parameters")

    train = encode_examples(tokenizer, load_split("arith:train"))
    test = load_split("arith:test")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.decay_steps))
    order = torch.Generator().manual_seed(args.seed)

    model.train()
    t0, step, history = time.time(), 0, []
    sampled = greedy = 0.0
    while step < args.max_steps:
        perm = torch.randperm(len(train), generator=order).tolist()
        for start in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            # each time an example is drawn, its solution carries the copying slip with probability --careless
            slip = torch.rand(args.batch_size, generator=order) < args.careless
            batch = [(train[i][0], train[i][2] if s else train[i][1])
                     for i, s in zip(perm[start:start + args.batch_size], slip.tolist())]
            ids, mask, labels = make_batch(batch, tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % args.eval_every == 0:
                sampled = accuracy(model, tokenizer, test, 1.0, args.max_new_tokens)
                greedy = accuracy(model, tokenizer, test, 0.0, args.max_new_tokens)
                history.append({"step": step, "seconds": round(time.time() - t0, 1),
                                "loss": round(loss.item(), 4), "sampled": sampled, "greedy": greedy})
                log(f"step {step:5d}  {time.time() - t0:6.1f}s  loss {loss.item():.4f}  "
                    f"held-out acc: sampled(T=1) {sampled:.1%}  greedy {greedy:.1%}")
                if sampled >= args.target:
                    break
            elif step % 10 == 0:
                log(f"step {step:5d}  {time.time() - t0:6.1f}s  loss {loss.item():.4f}")
            if step >= args.max_steps:
                break
        if sampled >= args.target:
            break
    seconds = time.time() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    for f in args.out.iterdir():  # start clean: only what from_pretrained needs
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    info = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "parameters": n_params, "steps": step, "seconds": round(seconds, 1),
            "heldout_accuracy": {"sampled_t1": sampled, "greedy": greedy, "n": len(test)},
            "history": history, "torch": torch.__version__}
    if earlier:
        info["init"] = earlier
    (args.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    # Name the class every transformers version knows (5.x writes "TokenizersBackend", which 4.x lacks).
    tok_config = json.loads((args.out / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    for f in args.out.iterdir():
        if f.name not in KEEP:
            f.unlink()
        else:
            f.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    size = sum(f.stat().st_size for f in args.out.iterdir())
    log(f"saved {args.out} ({size:,} bytes) after {step} steps, {seconds:.0f}s: "
        f"sampled {sampled:.1%}, greedy {greedy:.1%}")


if __name__ == "__main__":
    main()
