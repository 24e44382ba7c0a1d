"""`grpoctl diff`: two steps of a real run, and a copy of a step with rewards changed by hand."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TWO_STEPS_SAME_PROMPTS, finished_loop, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step run; --limit 8 with 8 prompts per step: both steps ask the same prompts."""
    return finished_loop(tmp_path_factory, "diff", *TWO_STEPS_SAME_PROMPTS)


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def diff_json(*args) -> dict:
    proc = run_cli("diff", *map(str, args), "--json", check=True)
    return json.loads(proc.stdout)


def by_hand(path) -> dict:
    """prompt_id -> (share right, mean tokens), the definition in docs: rewards.math == 1."""
    groups: dict[str, list] = {}
    for r in records(path):
        groups.setdefault(r["prompt_id"], []).append(r)
    return {p: (sum(r["rewards"]["math"] == 1 for r in rs) / len(rs),
                sum(len(r["completion_ids"]) for r in rs) / len(rs)) for p, rs in groups.items()}


def test_two_steps_of_a_run_prompt_by_prompt(run):
    result = diff_json(f"{run}:1", f"{run}:2")
    a = by_hand(run / "step-000001" / "advantages.jsonl")
    b = by_hand(run / "step-000002" / "advantages.jsonl")
    s = result["summary"]
    assert s["common"] == 8 and s["prompts_a"] == s["prompts_b"] == 8
    assert s["accuracy_a"] == pytest.approx(sum(v[0] for v in a.values()) / 8)
    assert s["accuracy_b"] == pytest.approx(sum(v[0] for v in b.values()) / 8)
    for row in result["prompts"]:
        pid = row["prompt_id"]
        assert row["accuracy_a"] == a[pid][0] and row["accuracy_b"] == b[pid][0]
        assert row["length_change"] == pytest.approx(b[pid][1] - a[pid][1])
        solved_a, solved_b = a[pid][0] >= 0.5, b[pid][0] >= 0.5
        assert row["flip"] == (None if solved_a == solved_b else
                               "wrong→right" if solved_b else "right→wrong")
    assert s["wrong_to_right"] == sum(r["flip"] == "wrong→right" for r in result["prompts"])
    # the same comparison, spelled with --step
    assert diff_json(run, "--step", "1", "--step", "2") == result


def test_flips_are_counted_and_printed(run, tmp_path):
    source = run / "step-000001" / "advantages.jsonl"
    recs = records(source)
    pid = recs[0]["prompt_id"]
    before = by_hand(source)[pid][0]
    for r in recs:  # this prompt: every completion right if it was not solved, else wrong
        if r["prompt_id"] == pid:
            r["rewards"]["math"] = r["reward"] = 0.0 if before >= 0.5 else 1.0
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = diff_json(source, changed)["summary"]
    assert (s["wrong_to_right"], s["right_to_wrong"]) == ((0, 1) if before >= 0.5 else (1, 0))
    proc = run_cli("diff", str(source), str(changed), check=True)
    text = proc.stdout.decode()
    assert "8 in common" in text and pid in text
    assert ("right→wrong" if before >= 0.5 else "wrong→right") in text.split(pid)[1].splitlines()[0]


def test_same_step_of_two_runs(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints"))
    s = diff_json(run, other, "--step", "2")["summary"]
    assert s["common"] == 8 and s["accuracy_a"] == s["accuracy_b"]
    assert s["wrong_to_right"] == s["right_to_wrong"] == 0 and s["length_change"] == 0


@pytest.mark.parametrize("args, expected", [
    (["{run}", "--step", "1"], "one run directory needs two steps"),
    (["{run}:1", "{run}:9"], "step-000009: missing"),
    (["{run}:1", "{run}:2", "--step", "1"], "either as RUN:STEP or with --step"),
    (["{run}:1", "nope.jsonl"], "nope.jsonl: no such file"),
])
def test_bad_arguments_are_one_line_and_exit_2(run, args, expected):
    proc = run_cli("diff", *[a.format(run=run) for a in args])
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b""
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_a_damaged_line_names_the_file_and_line(run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (run / "step-000001" / "scored.jsonl").read_text().splitlines(keepends=True)
    bad.write_text("".join(lines[:3]) + '{"prompt_id": 1}\n')
    proc = run_cli("diff", str(run / "step-000001" / "scored.jsonl"), str(bad))
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == (f"error: {bad}:4: field 'prompt_id': expected a "
                                            "string, got int")
