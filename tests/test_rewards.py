"""The score stage: answer extraction, reward specs, user rewards, the time-limited pool.

Everything here is real: real math-verify, real forked workers, user rewards written
to real files. Expected values are worked out by hand in each test.
"""

from __future__ import annotations

import math
import os
import signal

import pytest

from grpoctl import scoring_pool
from grpoctl.answers import MAX_SCAN_CHARS, extract_answer, last_boxed, match_without_sympy
from grpoctl.config import ScoreSettings
from grpoctl.errors import GrpoctlError
from grpoctl.records import RecordError
from grpoctl.rewards import (format_reward, math_reward, parse_reward_spec, parse_reward_specs,
                             score_records)

# --- extraction ---------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),                  # nested braces
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{1}, then \boxed{ 2 }", "2"),                                    # last box wins
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),                                               # escaped braces
    (r"\boxed{\boxed{5}}", "5"),                                                    # box in a box
    (r"\fbox{7}", "7"),
    (r"\boxed {8}", "8"),
    (r"\boxed{3} and then \boxed{12", "3"),                          # unclosed last box skipped
    (r"so 17 + 18 = \boxed{3", None),                                # cut off inside its only box:
    (r"x = 4 \boxed{\frac{1}{", None),                               # no number fallback
    ("The answer is 3. Check: \\fbox{35", None),
    (r"\boxed{}", None),                                             # empty last box: no answer
    ("9 * 2 = $18.\n#### 18", "18"),                                 # GSM8K marker
    ("costs 1,000 + 1,125\n#### 2,125", "2125"),                     # thousands commas dropped
    ("#### -7 apples", "-7"),
    (r"The answer is $\frac{3}{4}$.", r"\frac{3}{4}"),               # "answer is" + inline math
    ("Final answer: 42 cookies", "42"),
    ("The answer is Evelyn.", "Evelyn"),
    ("x = 3, so y = -4", "-4"),                                      # last number
    ("5-3 = 2.5", "2.5"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extraction_only_reads_the_tail_of_huge_text():
    # A box opened before the scanned tail is invisible; the tail's own box is found.
    huge = r"\boxed{" + "x" * (MAX_SCAN_CHARS + 10) + "}"
    assert last_boxed(huge) is None
    assert extract_answer("y" * 1_000_000 + r" \boxed{42}") == "42"
    assert extract_answer("{" * 500_000 + "}" * 500_000) is None  # 1 MB of braces, no answer


@pytest.mark.parametrize("gold, pred, expected", [
    ("5", "5", True),
    ("2,125", "2125", True),                       # thousands separators
    ("1{,}000", "1000", True),
    ("7", "007", True),
    ("-0", "0", True),
    ("5", "6", False),                             # two plain integers: certain
    ("5", "7" * 10_000, False),                    # no int() on 10,000 digits
    ("0.5", ".50", True),
    ("0.5", "0.6", None),                          # unequal decimals: math-verify rounds
    (r"\frac{1}{2}", r"\dfrac{1}{2}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
    (r"\pi r", r"\pir", None),                     # a space that separates commands stays
    (r"\text{New York}", r"\text{NewYork}", None),  # spaces inside \text are words
    ("5", r"\frac{10}{2}", None),                  # equal, but only sympy can tell
])
def test_match_without_sympy(gold, pred, expected):
    assert match_without_sympy(gold, pred) is expected


# --- single rewards -----------------------------------------------------------------


def test_math_reward_uses_math_verify_beyond_the_fast_path():
    assert math_reward(r"so \boxed{\frac{10}{2}}", "5") == 0.0       # a division left undone
    assert math_reward(r"so \boxed{\frac{x}{2}}", r"0.5x") == 1.0      # math-verify: x/2 = 0.5x
    assert math_reward(r"so \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert math_reward(r"so \boxed{\frac{1}{3}}", "0.5") == 0.0
    assert math_reward("no answer at all", "5") == 0.0


def test_format_reward():
    assert format_reward(r"... \boxed{3}") == 1.0
    assert format_reward(r"... \boxed{}") == 0.0
    assert format_reward("3") == 0.0
    spec = parse_reward_spec("format:^<think>.*</think>")
    assert format_reward("<think>a\nb</think> 3", spec.pattern) == 1.0  # DOTALL: . crosses lines
    assert format_reward("x <think>a</think>", spec.pattern) == 0.0      # ^ anchors the start


# --- specs ------------------------------------------------------------------------


def test_parse_reward_specs_names_and_weights(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def brevity(completion, answer, record):\n    return 1.0\n")
    specs = parse_reward_specs(["math=1", "format=0.1", f"{path}:brevity=-0.5"])
    assert [(s.name, s.weight, s.kind) for s in specs] == [
        ("math", 1.0, "math"), ("format", 0.1, "format"), ("brevity", -0.5, "user")]
    assert [s.name for s in parse_reward_specs(None)] == ["math"]
    assert [s.name for s in parse_reward_specs([])] == ["math"]
    # "=" inside a regex is part of the target unless followed by a number
    assert parse_reward_spec("format:a=b").pattern.pattern == "a=b"
    assert parse_reward_spec("format:x=1=2").pattern.pattern == "x=1"
    assert parse_reward_spec("format:x=1=2").weight == 2.0


def test_user_reward_from_an_importable_module():
    spec = parse_reward_spec("os.path:join=2")  # any importable callable of 3 arguments
    assert (spec.kind, spec.name, spec.weight) == ("user", "join", 2.0)


@pytest.mark.parametrize("text, message", [
    ("accuracy", "unknown reward 'accuracy'"),
    ("math=abc", "unknown reward 'math=abc'"),
    ("math=inf", "weight must be a finite number"),
    ("format:(", "invalid regular expression"),
    ("no/such/file.py:fn", "no such file no/such/file.py"),
    ("no_such_module_xyz:fn", "importing no_such_module_xyz failed: ModuleNotFoundError"),
    ("os.path:no_such_fn", "has no function 'no_such_fn'"),
    ("os.path:exists", "must accept (completion, answer, record)"),
])
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(GrpoctlError) as err:
        parse_reward_specs([text])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_duplicate_component_names_are_refused():
    with pytest.raises(GrpoctlError, match="both write the component 'format'"):
        parse_reward_specs(["format", "format:x"])


# --- scoring records --------------------------------------------------------------


def _records(*pairs):
    return [{"prompt_id": f"p{i}", "sample": 0, "completion": c, "answer": a, "keep": [i]}
            for i, (c, a) in enumerate(pairs)]


def test_weighted_combination_with_a_user_reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def brevity(completion, answer, record):\n"
        "    return 1.0 if len(completion) < 20 else 0.0\n"
        "\n"
        "def parts(completion, answer, record):\n"
        "    return {'has_think': float('<think>' in completion), 'sample': record['sample']}\n")
    records = _records((r"short \boxed{4}", "4"),                         # right, boxed, short
                       (r"<think>long enough text</think> \boxed{5}", "4"),  # wrong, boxed, long
                       ("the answer is 4", "4"))                          # right, no box, short
    score = ScoreSettings(["math=1", "format=0.1", f"{path}:brevity=0.5", f"{path}:parts=2"])
    out, stats = score_records(records, score, progress=False)
    assert [r["rewards"] for r in out] == [
        {"math": 1.0, "format": 1.0, "brevity": 1.0, "has_think": 0.0, "sample": 0.0},
        {"math": 0.0, "format": 1.0, "brevity": 0.0, "has_think": 1.0, "sample": 0.0},
        {"math": 1.0, "format": 0.0, "brevity": 1.0, "has_think": 0.0, "sample": 0.0},
    ]
    # reward = 1*math + 0.1*format + 0.5*brevity + 2*(has_think + sample)
    assert [r["reward"] for r in out] == pytest.approx([1.6, 2.1, 1.5])
    assert [r["keep"] for r in out] == [[0], [1], [2]]          # unknown fields kept
    assert "rewards" not in records[0]                             # inputs not modified
    assert stats["n"] == 3
    assert stats["reward_mean"] == pytest.approx((1.6 + 2.1 + 1.5) / 3)
    assert stats["component_means"]["math"] == pytest.approx(2 / 3)


def test_sympy_path_is_taken_and_counted():
    # golds used by no other test, so nothing is in the process-wide verdict cache yet
    records = _records((r"\boxed{\frac{14y}{2}}", "7y"),  # math-verify: equal
                       (r"\boxed{\frac{14y}{3}}", "7y"),  # math-verify: not equal
                       (r"\boxed{\frac{14y}{2}}", "7y"),  # same pair again: verified once
                       (r"\boxed{7y}", "7y"),             # fast path
                       ("nothing", "7y"),                 # no answer
                       (r"\boxed{\frac{14}{2}}", "7"))    # refused: a division left undone
    out, stats = score_records(records, progress=False)
    assert [r["reward"] for r in out] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert (stats["fast_path"], stats["no_answer"], stats["refused"]) == (1, 1, 1)
    assert (stats["verified"], stats["cached"]) == (2, 0)   # 2 distinct pairs
    assert (stats["timeouts"], stats["errors"]) == (0, 0)
    out, stats = score_records(records[:2], progress=False)  # a second call: from the cache
    assert [r["reward"] for r in out] == [1.0, 0.0]
    assert (stats["verified"], stats["cached"]) == (0, 2)


def test_in_process_scoring_gives_the_same_rewards():
    records = _records((r"\boxed{\frac{20z}{4}}", "5z"), (r"\boxed{\sqrt{2}}", r"\frac{2}{\sqrt{2}}"),
                       (r"\boxed{x^2}", "x^3"))
    out, _ = score_records(records, ScoreSettings(score_workers=0), progress=False)
    assert [r["reward"] for r in out] == [1.0, 1.0, 0.0]


def test_gold_answer_must_be_present_for_math():
    records = _records((r"\boxed{1}", "1"), (r"\boxed{1}", None))
    with pytest.raises(RecordError) as err:
        score_records(records, progress=False, source="rollouts.jsonl")
    assert str(err.value).startswith("rollouts.jsonl:2: field 'answer': is missing or null")
    # ... but other rewards do not need it
    out, _ = score_records(records, ScoreSettings(["format"]), progress=False)
    assert [r["reward"] for r in out] == [1.0, 1.0]


def test_nan_from_a_user_reward_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def fn(completion, answer, record):\n"
                    "    return float('nan') if record['prompt_id'] == 'p1' else 1.0\n")
    with pytest.raises(RecordError) as err:
        score_records(_records(("a", "1"), ("b", "1")), ScoreSettings([f"{path}:fn"]),
                      progress=False, source="scored.jsonl")
    assert str(err.value) == (f"scored.jsonl:2: field 'rewards.fn': reward '{path}:fn' "
                              "returned nan; a reward must be a finite number")


@pytest.mark.parametrize("body, shown", [
    ("return float('inf')", "returned inf"),
    ("return 'high'", "returned 'high'"),
    ("return {'a': None}", "returned {'a': None}"),
    ("raise KeyError('solution')", "raised KeyError: 'solution'"),
])
def test_bad_user_reward_values(tmp_path, body, shown):
    path = tmp_path / "bad.py"
    path.write_text(f"def fn(completion, answer, record):\n    {body}\n")
    with pytest.raises(RecordError) as err:
        score_records(_records(("a", "1")), ScoreSettings([f"{path}:fn"]), progress=False)
    assert shown in str(err.value) and "<records>:1: field 'rewards.fn'" in str(err.value)
    assert "\n" not in str(err.value)


# --- pathological completions and the pool's limits -----------------------------------

PATHOLOGICAL = {
    "100 kB of nested braces": r"\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}",
    "nested braces in the tail": r"\boxed{" + "{" * 9_000 + "1" + "}" * 9_000 + "}",
    "power tower": r"\boxed{9^{9^{9^{9}}}}",
    "tower of twos": r"\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "huge factorial": r"\boxed{(10^{10})!}",
    "10,000 digits": r"\boxed{" + "7" * 10_000 + "}",
    "control characters": "\\boxed{\x00\x01\x1b[31m5\x07}",
    "big symbolic matrix": r"\boxed{\begin{pmatrix}" + r"\\".join(["&".join(["x"] * 30)] * 30)
                           + r"\end{pmatrix}}",
}


def test_pathological_completions_score_zero_within_the_limit(capsys):
    normal = [(r"so \boxed{\frac{10x}{2}}", "5x"), (r"\boxed{5}", "5"), (r"\boxed{6}", "5"),
              ("#### 5", "5")]
    # A symbolic gold, so that the towers reach math-verify (against a number they are
    # refused at once as no number, see test_reward_attacks.py).
    records = _records(*normal[:2], *[(c, "5x") for c in PATHOLOGICAL.values()], *normal[2:])
    score = ScoreSettings(score_workers=2, score_timeout=1.0)
    out, stats = score_records(records, score, progress=False, source="bad.jsonl")
    rewards = [r["reward"] for r in out]
    assert rewards[:2] == [1.0, 1.0] and rewards[-2:] == [0.0, 1.0]
    assert rewards[2:-2] == [0.0] * len(PATHOLOGICAL)
    assert stats["timeouts"] >= 2           # the towers at least run into the limit
    # No wall-clock bound (a loaded machine would break it): the limits are CPU time,
    # checked in tests/reliability/test_time_limits.py.
    err = capsys.readouterr().err
    assert err.count("math reward timed out") == stats["timeouts"]
    assert "bad.jsonl:5: math reward timed out" in err  # the power tower, 5th record


def _stuck_or_crashing(x):
    """A real function that misbehaves the ways sympy can: computes while ignoring the
    limit's signals (like C code), kills its process, or allocates without bound."""
    if x == 3:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPROF, signal.SIGALRM})
        while True:
            pass
    if x == 5:
        os._exit(3)
    if x == 7:
        bytearray(16 * 2**30)
    return x * 10


def test_pool_hard_limit_crash_and_memory_cap():
    outcomes = scoring_pool.run_pool(_stuck_or_crashing, list(range(10)), workers=2,
                                     timeout=0.3, chunk_size=3, memory_mb=256)
    assert [o.status for o in outcomes] == ["ok"] * 3 + ["timeout", "ok", "error", "ok",
                                                         "error", "ok", "ok"]
    assert [o.value for o in outcomes if o.status == "ok"] == [0, 10, 20, 40, 60, 80, 90]
    assert outcomes[3].message == "used 1.3 s of CPU time without answering; worker killed"
    assert outcomes[5].message == "worker died (exit code 3)"
    assert outcomes[7].message == "ran out of memory"


def test_pool_soft_limit_interrupts_python_code():
    def slow(x):
        if x == 1:
            while True:
                pass
        return x

    outcomes = scoring_pool.run_pool(slow, [0, 1, 2], workers=1, timeout=0.2)
    assert [(o.status, o.value) for o in outcomes] == [("ok", 0), ("timeout", None), ("ok", 2)]
    assert outcomes[1].message == "used more than 0.2 s of CPU time"


def test_pool_keeps_item_order_and_handles_empty_input():
    assert scoring_pool.run_pool(math.sqrt, []) == []
    values = [o.value for o in scoring_pool.run_pool(math.sqrt, [float(i * i) for i in range(200)],
                                                     workers=2)]
    assert values == [float(i) for i in range(200)]
