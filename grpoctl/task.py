"""The embedded task: two-digit arithmetic word problems with integer answers.

grpoctl ships a task it can generate itself, so `grpoctl loop` has something to
train on with no download. A problem adds or subtracts two numbers between 10
and 99, dressed in a short sentence:

    Mia has 23 marbles and finds 45 more. How many marbles now?

and its reference solution (what the default model is warm-started on) is one
line ending in the answer in `\\boxed{}`, which the built-in `math` reward reads:

    23 + 45 = 68. \\boxed{68}

The held-out split never shares a problem with the training split: every
(a, op, b) triple is sent to "train" or "test" by a hash of the triple alone,
so no wording, name or object can leak a test problem into training. Everything
is deterministic (fixed seed, sha256 rather than Python's salted `hash`).
No torch here: the CLI imports this to list prompts.
"""

from __future__ import annotations

import hashlib
import random

from grpoctl.errors import GrpoctlError

SEED = 0
TRAIN_SIZE = 4000   # half additions, half subtractions
TEST_SIZE = 200     # fixed; 100 of each
TEST_EVERY = 10     # about 1 triple in 10 is reserved for the test split
LOW, HIGH = 10, 99  # both operands are two-digit numbers

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Lily", "Omar"]
OBJECTS = ["marbles", "apples", "stickers", "coins", "books", "shells", "cards", "pencils"]

# {n} name, {o} object, {a} first number, {b} second number.
TEMPLATES = {
    "+": [
        "{n} has {a} {o} and finds {b} more. How many {o} now?",
        "{n} had {a} {o} and got {b} more. How many {o} in all?",
        "A box has {a} {o}. {n} adds {b}. How many {o} now?",
    ],
    "-": [
        "{n} has {a} {o} and gives away {b}. How many {o} left?",
        "{n} had {a} {o} and lost {b}. How many {o} now?",
        "A box has {a} {o}. {n} takes {b}. How many {o} left?",
    ],
}

SPLITS = ("train", "test")


def in_test_split(a: int, op: str, b: int) -> bool:
    """Whether the triple (a, op, b) belongs to the held-out split (a fixed hash, ~1 in 10)."""
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % TEST_EVERY == 0


def _triples(op: str, split: str) -> list[tuple[int, str, int]]:
    # Subtraction keeps a > b so every answer is a positive integer.
    out = []
    for a in range(LOW, HIGH + 1):
        for b in range(LOW, HIGH + 1):
            if op == "-" and a <= b:
                continue
            if in_test_split(a, op, b) == (split == "test"):
                out.append((a, op, b))
    return out


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def make_split(split: str, size: int, seed: int = SEED) -> list[dict]:
    """`size` distinct problems of `split` ("train" or "test"), half "+" and half "-".

    Deterministic in (split, size, seed); the same triple never appears in both splits.
    """
    rng = random.Random(f"{seed}-{split}")
    items = []
    for op, count in (("+", size - size // 2), ("-", size // 2)):
        pool = _triples(op, split)
        if count > len(pool):
            raise GrpoctlError(f"arith:{split}: asked for {count} '{op}' problems, only {len(pool)} exist")
        for a, _, b in rng.sample(pool, count):
            name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
            template = rng.randrange(len(TEMPLATES[op]))
            text = TEMPLATES[op][template].format(n=name, o=obj, a=a, b=b)
            items.append({"text": text, "answer": str(_solve(a, op, b)),
                          "meta": {"op": op, "a": a, "b": b, "template": template}})
    rng.shuffle(items)  # interleave the two operations
    for i, item in enumerate(items):
        item["prompt_id"] = f"arith-{split}-{i:06d}"
    return [{"prompt_id": it["prompt_id"], "text": it["text"], "answer": it["answer"],
             "meta": it["meta"]} for it in items]


def load_split(name: str) -> list[dict]:
    """The embedded task's split `name`: "arith:train" (4000 problems) or "arith:test" (200).

    "train" and "test" without the prefix are accepted too. Each item is
    {"prompt_id": "arith-train-000123", "text": problem, "answer": "68", "meta": {"op", "a", "b", "template"}}.
    """
    split = name.split(":", 1)[1] if name.startswith("arith:") else name
    if split not in SPLITS:
        raise GrpoctlError(f"unknown embedded split {name!r}: expected arith:train or arith:test")
    return make_split(split, TRAIN_SIZE if split == "train" else TEST_SIZE)


def reference_completion(item: dict) -> str:
    """The worked solution: the equation, then the boxed answer: "23 + 45 = 68. \\boxed{68}"."""
    m = item["meta"]
    return f"{m['a']} {m['op']} {m['b']} = {item['answer']}. \\boxed{{{item['answer']}}}"


def careless_completion(item: dict) -> str:
    """The worked solution with a copying slip: the last two digits of the boxed answer swapped.

    "23 + 45 = 68. \\boxed{86}": the equation is right, the box is not. The
    default model's warm-start data has this slip in a share of its solutions
    (like human-written solutions with careless mistakes), so the model learns
    the habit by imitation; the reward never pays for it, so RL removes it.
    Answers whose last two digits are equal (or that have one digit) cannot slip.
    """
    m, ans = item["meta"], item["answer"]
    boxed = ans[:-2] + ans[-1] + ans[-2] if len(ans) >= 2 else ans
    return f"{m['a']} {m['op']} {m['b']} = {ans}. \\boxed{{{boxed}}}"
