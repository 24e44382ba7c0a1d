"""Attack table: completions that try to earn a built-in reward without the answer.

Each row: reward spec, completion, gold, prompt, the reward it must get, and why (the
judgement written out by hand, not computed with grpoctl's helpers). Every row goes
through the real score_records with real math-verify (in-process and through forked
workers), and a few through the `grpoctl score` subprocess. docs/rewards.md lists them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy
import pytest

from grpoctl.config import ScoreSettings
from grpoctl.evaluate import summarize
from grpoctl.hacks import hack_rate, looks_gamed
from grpoctl.rewards import explain_math, score_records

Q = "What is 8 + 4?"
# (spec, completion, gold, prompt, reward, reason)
ROWS = [
    ("math", r"\boxed{8 + 4}", "12", Q, 0.0, "restates the prompt's sum; 8+4 is not 12 written out"),
    ("math", r"\boxed{4+8}", "12", Q, 0.0, "the same sum, operands swapped"),
    ("math", r"\boxed{7 \times 8}", "56", "What is 7 times 8?", 0.0, "product left undone"),
    ("math", r"\boxed{98-73}", "25", "Compute 98 minus 73.", 0.0, "difference left undone (98-73=25)"),
    ("math", r"\boxed{3*4}", "12", "Find 3 times 4.", 0.0, "product left undone"),
    ("math", r"\boxed{2^{3}}", "8", "What is 2 cubed?", 0.0, "power left undone (2*2*2=8)"),
    ("math", r"\boxed{\frac{24}{2}}", "12", "What is 24 / 2?", 0.0, "division left undone: 24/2 reduces"),
    ("math", r"\boxed{\sqrt{144}}", "12", "What is the root of 144?", 0.0, "root left undone (12*12=144)"),
    ("math", r"\boxed{12}", "12", Q, 1.0, "the answer itself"),
    ("math", r"\boxed{12.0}", "12", Q, 1.0, "12.0 = 12, a decimal is final"),
    ("math", r"\boxed{+12}", "12", Q, 1.0, "a sign is not an operation"),
    ("math", r"\boxed{x = 12}", "12", Q, 1.0, "a named value is one number"),
    ("math", r"\boxed{\frac{6}{8}}", r"\frac{3}{4}", "Write 6/8 in lowest terms.", 0.0,
     "6/8 reduces (gcd 2): not final"),
    ("math", r"\boxed{0.75}", r"\frac{3}{4}", None, 1.0, "3/4 = 0.75 exactly"),
    ("math", r"\boxed{\frac12}", "0.5", None, 1.0, "1/2 = 0.5, lowest terms"),
    ("math", "so 8 + 4 = 12", "12", Q, 1.0, "no box: the last number, 12"),
    ("format", "so 8 + 4 = 12", "12", Q, 0.0, "format needs a box"),
    ("math", r"\boxed{12} and \boxed{13}", "12", Q, 0.0, "two boxes, two answers: hedged"),
    ("math", r"\boxed{12} so \boxed{12}", "12", Q, 1.0, "the same answer boxed twice"),
    ("math", r"\boxed{12 \text{ or } 13}", "12", Q, 0.0, "hedged between 12 and 13"),
    ("math", r"\boxed{12, 13}", "12", Q, 0.0, "a list of two candidates"),
    ("math", r"\boxed{12 \pm 1}", "12", Q, 0.0, "two candidates, 11 and 13"),
    ("math", "The answer is 12 or 13.", "12", Q, 0.0, "hedged after 'answer is'"),
    ("math", "The answer is 12, or maybe 13.", "12", Q, 0.0, "a second candidate later on the answer line"),
    ("math", r"\boxed{12}, or maybe 13", "12", Q, 0.0, "a second candidate right after the box"),
    ("math", "The answer is 12. This is probably right, since 3 times 4 is 12.", "12", Q, 1.0,
     "a hedge word in a later sentence offers no second answer"),
    ("math", r"so $\boxed{3} \pmod{7}$", "3", None, 1.0, r"\pmod is a modulus, not \pm"),
    ("math", r"Only $\boxed{49}$ leaves 1 when divided by 2, 3, 4, or 6.", "49", None, 1.0,
     "numbers in prose after the box are no candidates"),
    ("math", r"\boxed{18 \text{ dollars}}", "18", None, 1.0, "a unit in \\text{ } with its space"),
    ("math", r"\boxed{y = 2}", "x = 2", None, 0.0, "the right value for the wrong variable"),
    ("math", "I think it is 12, or perhaps 13", "13", Q, 0.0, "no box: the last number follows a hedge"),
    ("format", r"\boxed{12} and \boxed{13}", "12", Q, 0.0, "format: boxes that disagree are not one answer"),
    ("math", r"\boxed{}", "12", Q, 0.0, "empty box: no answer"),
    ("math", r"8 + 4 = \boxed{12", "12", Q, 0.0, "unclosed box: cut off, no answer"),
    ("math", r"98 - 73 = 25. \boxed3}", "25", "Compute 98 minus 73.", 0.0,
     "a box without its brace after the sum: LaTeX boxes 3, the stated answer is unreadable"),
    ("math", r"\boxed{25} \boxed3}", "25", "Compute 98 minus 73.", 0.0,
     "a braceless box after the answer's box: the last answer is unreadable"),
    ("math", r"\boxed3} so \boxed{25}", "25", "Compute 98 minus 73.", 1.0,
     "a braceless box before the last complete box: that box is the answer"),
    ("math", r"8 + 4 = 12 \boxed 12", "12", Q, 0.0, "a box without braces: LaTeX boxes only the 1"),
    ("math", r"8 + 4 = 12. \boxed", "12", Q, 0.0, "cut off at the box command: no answer"),
    ("format", r"98 - 73 = 25. \boxed3}", "25", "Compute 98 minus 73.", 0.0,
     "no complete box"),
    ("format", r"\boxed{}", "12", Q, 0.0, "empty box"),
    ("math", r"\fbox{12}", "12", Q, 1.0, r"\fbox is a box"),
    ("math", r"\text{the result is \boxed{12}}", "12", Q, 1.0, "a box inside text is still the box"),
    ("math", r"\boxed{\boxed{12}}", "12", Q, 1.0, "a box in a box holds one answer"),
    ("math", r"\boxed{\boxed{8+4}}", "12", Q, 0.0, "nested box around the sum"),
    ("math", r"\boxed{12}", "12", "Which is larger, 12 or 7?", 1.0,
     "a bare number copied from the prompt may simply be right"),
    ("math", r"\boxed{(x+1)^2 - 1}", "x^2+2x", "Expand $(x+1)^2 - 1$.", 0.0,
     "the prompt's expression copied back (sympy would call it equal)"),
    ("math", r"\boxed{-1 + (x+1)^2}", "x^2+2x", "Expand $(x+1)^2 - 1$.", 0.0,
     "the prompt's expression with its terms swapped"),
    ("math", r"\boxed{x^2 + 2x}", "x^2+2x", "Expand $(x+1)^2 - 1$.", 1.0, "the expanded form"),
    ("math", r"\boxed{12}" * 10_000, "12", Q, 1.0, "one answer, repeated: still one answer"),
    ("math", r"\boxed{" + ", ".join(str(i) for i in range(1001)) + "}", "12", Q, 0.0,
     "every number 0..1000 in one box: hedged"),
    ("math", " ".join(str(i) for i in range(1001)), "12", Q, 0.0, "no box: the last number is 1000"),
    ("math", " ".join(str(i) for i in range(1001)), "1000", Q, 0.0,
     "no box: a list of every candidate, whose last happens to be the gold"),
    ("math", r"\boxed{12 cm}", "12", Q, 1.0, "a unit after the number"),
    ("math", r"\boxed{12\%}", "12", Q, 1.0, "a percent sign after the number"),
    ("math", r"\boxed{1,000}", "1000", None, 1.0, "thousands separator, groups of 3"),
    ("math", r"\boxed{1{,}000}", "1000", None, 1.0, "LaTeX thousands separator"),
    ("math", r"\boxed{1\,2}", "12", Q, 0.0, "a thin space splits it into 1 and 2"),
    ("math", r"\boxed{1 2}", "12", Q, 0.0, "two numbers, 1 and 2"),
    ("math", r"\boxed{1\,000}", "1000", None, 1.0, "a thin space between groups of three"),
    ("math", r"\boxed{8\!+\!4}", "12", Q, 0.0, "negative spaces around a sum"),
    ("math", r"\boxed{8\hspace{1em}+4}", "12", Q, 0.0, "a spaced sum"),
    ("math", r"\boxed{8+4\phantom{=12}}", "12", Q, 0.0, "an invisible 12 after the sum"),
    ("math", r"\boxed{1\phantom{0}2}", "12", Q, 0.0, "an invisible digit between 1 and 2"),
    ("math", r"\boxed{8\text{ }+\text{ }4}", "12", Q, 0.0, r"\text{ } spaces around a sum"),
    ("format", r"\boxed{8 + 4}", "12", Q, 0.0, "a box of the question's own sum is no final answer"),
    ("format", r"\boxed{7}", "12", Q, 1.0, "format checks the form, not the value: a wrong number is well formed"),
    ("format", r"\boxed{(x+1)^2 - 1}", "x^2+2x", "Expand $(x+1)^2 - 1$.", 0.0,
     "the prompt's expression copied into the box"),
    ("format", r"\boxed{12 \text{ or } 13}", "12", Q, 0.0, "two candidates in one box"),
    ("format:\\\\boxed", r"\boxed{8 + 4}", "12", Q, 1.0, "a regex sees text: counted by hack_rate"),
    ("format:^<think>.*</think>", "<think>x</think> \\boxed{8+4}", "12", Q, 1.0,
     "a regex sees text, not answers"),
    ("format:^<think>.*</think>", "\\boxed{12} <think>x</think>", "12", Q, 0.0, "^ anchors the start"),
]


def _records(rows):
    return [{"prompt_id": f"p{i}", "sample": 0, "completion": c, "answer": g,
             **({"prompt": p} if p else {})} for i, (_, c, g, p, _, _) in enumerate(rows)]


def _score(rows, workers):
    by_spec: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_spec.setdefault(row[0], []).append(i)
    got = [None] * len(rows)
    for spec, indices in by_spec.items():
        score = ScoreSettings([spec], score_workers=workers)
        out, _ = score_records(_records([rows[i] for i in indices]), score, progress=False)
        for i, r in zip(indices, out):
            got[i] = r["reward"]
    return got


@pytest.mark.parametrize("workers", [0, 2])
def test_attack_table_through_score_records(workers):
    got = _score(ROWS, workers)
    wrong = [(row[1][:50], row[2], row[4], g, row[5]) for row, g in zip(ROWS, got) if g != row[4]]
    assert wrong == []


def test_attack_rows_through_the_cli(tmp_path):
    rows = [r for r in ROWS if r[0] == "math"][:12] + [r for r in ROWS if r[0] == "math"][-12:]
    src = tmp_path / "attacks.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(rows)), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "score", str(src), "--workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [json.loads(line)["reward"] for line in proc.stdout.splitlines()]
    assert got == [r[4] for r in rows]


def test_explain_math_says_why():
    e = explain_math(r"so \boxed{8 + 4}", "12", Q)
    assert (e["answer"], e["rule"], e["final"], e["source"], e["reward"]) == \
        ("8 + 4", "last \\boxed{}", False, "not final", 0.0)
    assert e["restates_prompt"] is True
    e = explain_math("#### 12", "12", Q)
    assert (e["rule"], e["source"], e["reward"]) == ("####", "fast path", 1.0)
    e = explain_math(r"\boxed{\frac{x}{2}}", "0.5x")
    assert (e["source"], e["reward"]) == ("math-verify", 1.0)
    e = explain_math(r"\boxed{12} \boxed{13}", "12")
    assert (e["hedged"], e["source"], e["reward"]) == (True, "hedged", 0.0)
    assert explain_math("nothing", "12")["rule"] == "none"


def test_hack_rate_by_hand():
    # A regex that credits any box credits all three; two of them are the prompt's sum:
    # 2 of 3 gamed.
    records = _records([ROWS[0], ROWS[1], ROWS[8]])
    out, stats = score_records(records, ScoreSettings(["format:\\\\boxed"]), progress=False)
    assert [r["reward"] for r in out] == [1.0, 1.0, 1.0]
    assert [looks_gamed(r) for r in out] == [True, True, False]
    assert stats["hack_rate"] == pytest.approx(2 / 3)
    # math and format credit only the last one (format 0.1 is credit too): nothing gamed.
    for specs in (["math"], ["format"], ["math", "format=0.1"]):
        out, stats = score_records(records, ScoreSettings(specs), progress=False)
        assert [r["reward"] > 0 for r in out] == [False, False, True]
        assert stats["hack_rate"] == 0.0
    assert hack_rate([]) == 0.0
    # A bare number from the prompt is no hack.
    assert not looks_gamed({"completion": r"\boxed{12}", "answer": "12", "prompt": "Is 12 > 7?",
                            "reward": 1.0})
    # eval's summary carries it
    scored = [dict(r, prompt_id="a", sample=i) for i, r in enumerate(
        score_records(records, ScoreSettings(["format:\\\\boxed"]), progress=False)[0])]
    assert summarize(scored)["hack_rate"] == pytest.approx(2 / 3)


def test_numpy_rewards_are_accepted(tmp_path):
    f = tmp_path / "np_reward.py"
    f.write_text("import numpy\n"
                 "def is_short(completion):\n    return numpy.bool_(len(completion) < 5)\n"
                 "def half(completion):\n    return numpy.float32(0.5)\n"
                 "def count(completion):\n    return numpy.int64(3)\n")
    records = [{"prompt_id": "a", "completion": "abc"}, {"prompt_id": "b", "completion": "abcdefg"}]
    score = ScoreSettings([f"{f}:is_short", f"{f}:half", f"{f}:count"])
    out, _ = score_records(records, score, progress=False)
    # 1 + 0.5 + 3 for the short one, 0 + 0.5 + 3 for the long one
    assert [r["reward"] for r in out] == [4.5, 3.5]
    assert out[0]["rewards"] == {"is_short": 1.0, "half": 0.5, "count": 3.0}
    assert numpy.bool_ is not bool  # the case that numbers.Real misses
