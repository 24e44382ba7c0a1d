"""Write the SmolLM2 example's task: one-step arithmetic, as train.jsonl and test.jsonl.

    python examples/smollm2/make_task.py OUT_DIR

One problem per (a, op, b): a + b and a - b with a, b in 1..20 (a > b, so
answers stay positive) and a × b with a, b in 1..12, asked as "What is 7 × 8?".
The built-in `arith` task (two-digit word problems) is too hard for
SmolLM2-135M (about 2-5% Mean@2); here it starts at roughly 25-45%.

The held-out split never shares a problem with training: each triple goes to
test or train by a sha256 of the triple alone (about 1 in 4 to test), so the
files are the same on every machine, and a row's `op` column allows
`grpoctl eval --by op`.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

SEED = 0
TEST_EVERY = 4
SYMBOLS = {"+": "+", "-": "-", "*": "×"}


def triples() -> list[tuple[int, str, int]]:
    out = [(a, "+", b) for a in range(1, 21) for b in range(1, 21)]
    out += [(a, "-", b) for a in range(1, 21) for b in range(1, 21) if a > b]
    out += [(a, "*", b) for a in range(1, 13) for b in range(1, 13)]
    return out


def in_test(a: int, op: str, b: int) -> bool:
    digest = hashlib.sha256(f"smollm2:{a}{op}{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % TEST_EVERY == 0


def row(a: int, op: str, b: int) -> dict:
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return {"prompt": f"What is {a} {SYMBOLS[op]} {b}?", "answer": str(answer), "op": op}


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "test": []}
    for a, op, b in triples():
        rows["test" if in_test(a, op, b) else "train"].append(row(a, op, b))
    for split, items in rows.items():
        # Shuffled with a fixed seed so that `--limit N` takes a mix of operations.
        random.Random(f"{SEED}:{split}").shuffle(items)
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in items))
        tmp.replace(out / f"{split}.jsonl")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/smollm2/make_task.py OUT_DIR")
    write(Path(sys.argv[1]))
    print(sys.argv[1])
