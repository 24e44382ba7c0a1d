"""The math reward on real benchmark data: reference solutions must all score 1, and
the same solutions against someone else's answer must score 0 (checked against plain
math-verify on the whole solution, an independent path that shares no code with ours)."""

from __future__ import annotations

import json

from grpoctl.answers import extract_answer
from grpoctl.records import read_records
from grpoctl.rewards import score_records, verify_answer


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _gsm8k_gold(solution: str) -> str:
    return solution.split("#### ")[-1].strip()


def test_every_math500_reference_solution_scores_1(data_dir):
    rows = _jsonl(data_dir / "math500.jsonl")
    records = [{"prompt_id": f"math500-{i}", "sample": 0, "completion": r["solution"],
                "answer": r["answer"], "meta": {"level": r["level"]}} for i, r in enumerate(rows)]
    out, stats = score_records(records, progress=False, source="math500.jsonl")
    assert len(out) == 500
    failed = [(r["prompt_id"], r["answer"]) for r in out if r["reward"] != 1.0]
    assert failed == []
    assert stats["reward_mean"] == 1.0 and stats["timeouts"] == stats["errors"] == 0
    assert [r["meta"] for r in out] == [{"level": r["level"]} for r in rows]


def test_math_verify_path_alone_accepts_math500_answers(data_dir):
    """The reference answers reach the fast path; check the math-verify path on its own
    (every 4th problem), so answers written differently from the gold are judged right."""
    rows = _jsonl(data_dir / "math500.jsonl")[::4]
    rejected = [r["answer"] for r in rows
                if not verify_answer((r["answer"], extract_answer(r["solution"])))]
    assert rejected == []


def test_math500_solutions_against_the_next_problems_answer(data_dir):
    """Shift each gold by one problem: the solution is now (almost always) wrong."""
    import logging

    import math_verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    rows = _jsonl(data_dir / "math500.jsonl")[:40]
    records = [{"prompt_id": str(i), "completion": r["solution"],
                "answer": rows[(i + 1) % len(rows)]["answer"]} for i, r in enumerate(rows)]
    out, stats = score_records(records, progress=False)
    # Independent judge: math-verify on the whole solution and the $-wrapped gold.
    expected = [float(math_verify.verify(math_verify.parse("$" + r["answer"] + "$"),
                                         math_verify.parse(r["completion"])))
                for r in records]
    assert [r["reward"] for r in out] == expected
    assert sum(expected) <= 2  # a coincidence at most (e.g. gold "x=5", answer "5")
    # Numeric golds are decided by exact arithmetic (a final number, or refused as not
    # final); the symbolic ones really went through math-verify.
    assert stats["verified"] > 5 and stats["fast_path"] + stats["refused"] > 20


def test_every_gsm8k_reference_solution_scores_1(data_dir):
    records = read_records(str(data_dir / "gsm8k_test.jsonl"))
    records = [{"prompt_id": f"gsm8k-{i}", "completion": r["answer"],
                "answer": _gsm8k_gold(r["answer"])} for i, r in enumerate(records)]
    assert any("," in r["answer"] for r in records)  # golds like "2,125" are in the file
    out, stats = score_records(records, progress=False)
    assert len(out) == 1319
    assert [r["prompt_id"] for r in out if r["reward"] != 1.0] == []


def test_gsm8k_solutions_against_a_shifted_gold_score_0(data_dir):
    rows = _jsonl(data_dir / "gsm8k_test.jsonl")
    records = []
    for i, r in enumerate(rows):
        gold = int(_gsm8k_gold(r["answer"]).replace(",", ""))
        records.append({"prompt_id": str(i), "completion": r["answer"], "answer": str(gold + 1)})
    out, _ = score_records(records, progress=False)
    assert [r["prompt_id"] for r in out if r["reward"] != 0.0] == []


def test_gsm8k_style_completion_without_the_marker(data_dir):
    """A model that drops `#### ` still gets its last number judged."""
    rows = _jsonl(data_dir / "gsm8k_test.jsonl")[:50]
    records = [{"prompt_id": str(i), "completion": r["answer"].replace("#### ", "So the total is "),
                "answer": _gsm8k_gold(r["answer"])} for i, r in enumerate(rows)]
    out, _ = score_records(records, progress=False)
    assert [r["reward"] for r in out] == [1.0] * 50
