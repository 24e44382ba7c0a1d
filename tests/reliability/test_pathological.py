"""Completions from a model that emits anything: `grpoctl score` on a file where
pathological completions sit between ordinary ones.

Every pathological completion must score 0 within the per-item time limit (the
soft limit, or the hard kill just after it), be counted on stderr, and leave the
ordinary records scored exactly as they would be alone, with every field of every
record written back unchanged. The score process tree must stay small.
"""

from __future__ import annotations

import json
import subprocess
import sys


TIMEOUT_S = 2.0  # the default

# (completion, gold answer): each must score 0. Those marked slow go to math-verify
# and make sympy run for longer than the limit (or forever); their gold is symbolic
# ("2y"): against a number they are refused at once as not final (docs/rewards.md).
PATHOLOGICAL = [
    ("{" * 50_000 + "}" * 50_000, "2", False),                        # 100 kB of nested braces
    ("\\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}", "2", False),  # ... inside a box
    ("\\boxed{" * 30_000, "2", False),                                # 30,000 unclosed boxes
    ("\\boxed{9^{9^{9^{9^{9}}}}}", "2y", True),                         # a power tower
    ("\\boxed{10^{10^{9}}}", "2y", True),                              # a billion-digit number
    ("\\boxed{" + "\\sqrt{" * 2000 + "2" + "}" * 2000 + "}", "2y", True),  # deep LaTeX nesting
    ("\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}", "2y", True),
    ("\\boxed{" + "7" * 10_000 + "}", "2", False),                    # 10,000 digits
    ("\\boxed{" + "7" * 10_000 + "+1}", "2", False),                  # ... that sympy must parse
    ("\\boxed{1" + "+1" * 20_000 + "}", "2", False),
    ("\x00\x01\x07\x08\x1b[31m\x7f \\boxed{1\x00}\u202e", "2", False),  # control characters
    ("\\boxed{\ud800}", "2", False),                                  # a lone surrogate
    ("a" * 1_000_000 + " \\boxed{3}", "2", False),                    # 1 MB
]
# (completion, gold answer, expected reward): scored as usual around them.
ORDINARY = [("so the answer is \\boxed{4}", "4", 1.0), ("\\boxed{5}", "4", 0.0),
            ("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
            ("#### 72", "72", 1.0), ("\\boxed{\\sqrt{4}}", "2", 0.0),  # not final
            ("no answer here", "3", 0.0), ("\\boxed{1{,}000}", "1000", 1.0)]

# Runs `grpoctl score` and reports the peak memory of its whole process tree.
MEASURE = ("import resource, subprocess, sys\n"
           "code = subprocess.run(sys.argv[1:]).returncode\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
           "sys.exit(code)\n")


def test_pathological_completions_score_zero_in_time_and_the_rest_normally(tmp_path):
    records = []
    for i, (completion, answer, _) in enumerate(PATHOLOGICAL):
        records.append({"prompt_id": f"bad-{i}", "sample": 0, "completion": completion,
                        "answer": answer, "origin": {"bad": i}})
        ordinary = ORDINARY[i % len(ORDINARY)]
        records.append({"prompt_id": f"ok-{i}", "sample": 0, "completion": ordinary[0],
                        "answer": ordinary[1], "origin": {"expect": ordinary[2]}})
    src = tmp_path / "rollouts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "scored.jsonl"

    proc = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "grpoctl", "score",
                           str(src), "--timeout", str(TIMEOUT_S), "--workers", "2", "-o", str(out)],
                          capture_output=True, timeout=120)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]

    scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(scored) == len(records)
    for before, after in zip(records, scored):
        # Every field comes back unchanged, the odd characters included.
        assert {k: v for k, v in after.items() if k not in ("reward", "rewards")} == before
        expected = after["origin"].get("expect", 0.0)
        assert after["reward"] == expected and after["rewards"] == {"math": expected}, \
            (before["completion"][:60], after["reward"])

    # Counted on stderr: the stats line, and one warning per item over the limit.
    stats = json.loads(err.strip().splitlines()[-1].removeprefix("score: "))
    slow = [i for i, item in enumerate(PATHOLOGICAL) if item[2]]
    assert stats["n"] == len(records)
    assert stats["timeouts"] + stats["errors"] >= len(slow), stats
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == stats["timeouts"] + stats["errors"]
    for i in slow:  # record 2i + 1 of the file is PATHOLOGICAL[i]
        assert any(f"rollouts.jsonl:{2 * i + 1}: math reward" in w for w in warnings), (i, warnings)
    # Each slow item was stopped by its limit (the warnings above; test_time_limits.py
    # checks the limits themselves, in CPU time): no wall-clock bound here, which a loaded
    # or slow machine would break. Memory: the largest process stays small.
    peak_mb = int(proc.stdout.decode().strip()) / 1024
    assert peak_mb < 1024, peak_mb


def test_the_per_item_limit_holds_for_a_worker_stuck_in_c_code(tmp_path):
    """One worker, two items that hang sympy: each is stopped at the hard limit at the
    latest, and the worker is replaced, so the item after them is still scored."""
    # Symbolic golds: against a number these completions are refused without sympy.
    records = [{"prompt_id": "a", "sample": 0, "completion": "\\boxed{9^{9^{9^{9^{9}}}}}",
                "answer": "3y"},
               {"prompt_id": "b", "sample": 0, "completion": "\\boxed{10^{10^{9}}}", "answer": "3y"},
               {"prompt_id": "c", "sample": 0, "completion": "\\boxed{\\frac{6y}{2}}",
                "answer": "3y"}]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "score", str(src), "--timeout", "0.5",
                           "--workers", "1"], capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err[-2000:]
    rewards = [json.loads(line)["reward"] for line in proc.stdout.decode().splitlines()]
    assert rewards == [0.0, 0.0, 1.0]
    # Both stopped by the limit (not by finishing), each named by its line; no wall-clock
    # bound, which a loaded machine would break (the subprocess timeout catches a hang).
    stopped = [line for line in err.splitlines() if "math reward" in line]
    assert sorted(line.split("r.jsonl:")[1].split(":")[0] for line in stopped) == ["1", "2"]
