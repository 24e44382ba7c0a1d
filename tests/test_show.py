"""`grpoctl show`: a real tiny run, read as a person reads it, through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import TWO_STEPS_SAME_PROMPTS, finished_loop


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step run of the embedded model; --limit 8 makes both steps the same prompts."""
    return finished_loop(tmp_path_factory, "show", *TWO_STEPS_SAME_PROMPTS)


def show(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "show", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def headers(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("── ")]


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_a_run_shows_its_last_step_group_by_group_in_plain_text(run):
    rc, out, err = show(run, "--limit", "0")
    assert rc == 0, err
    recs = records(run / "step-000002" / "advantages.jsonl")
    assert len(headers(out)) == 8
    assert "\x1b[" not in out  # piped: no colour codes
    first = recs[0]
    assert f"── {first['prompt_id']}" in out and f"gold:   {first['answer']}" in out
    assert first["completion"] in out
    assert "adv " in out and " tok" in out and ("stop" in out or "cut at limit" in out)
    assert out.count("✓ right") + out.count("✗ wrong") == 16


def test_step_and_filters(run):
    recs = records(run / "step-000001" / "advantages.jsonl")
    by_group = {}
    for r in recs:
        by_group.setdefault(r["prompt_id"], []).append(r["reward"])
    tied = [p for p, v in by_group.items() if len(set(v)) == 1]
    rc, out, _ = show(run, "--step", "1", "--tied", "--limit", "0")
    assert rc == 0 and len(headers(out)) == len(tied)
    assert all(", tied" in h for h in headers(out))
    rc, out, _ = show(run, "--step", "1", "--contrastive", "--limit", "0")
    assert len(headers(out)) == 8 - len(tied) and all("contrastive" in h for h in headers(out))
    rc, out, _ = show(run, "--step", "1", "--limit", "1")
    assert len(headers(out)) == 1
    pid = recs[-1]["prompt_id"]
    rc, out, _ = show(run, "--step", "1", "--prompt-id", pid)
    assert [h.split()[1] for h in headers(out)] == [pid]
    rc, out, _ = show(run, "--step", "1", "--wrong", "--limit", "0")
    assert all("✗ wrong" in block for block in out.split("── ")[1:])
    rc, out, err = show(run, "--grep", "no such text anywhere")
    assert rc == 0 and out == "" and "no group" in err


def test_model_text_prints_literally_even_in_colour(tmp_path, run):
    recs = records(run / "step-000001" / "advantages.jsonl")[:2]
    recs[0]["completion"] = "[bold red]not bold[/bold red] <script>alert(1)</script> \\boxed{7}"
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for env in ({}, {"FORCE_COLOR": "1", "COLUMNS": "200"}):
        rc, out, err = show(path, env=env)
        assert rc == 0, err
        assert "[bold red]not bold[/bold red] <script>alert(1)</script>" in out
    assert "\x1b[" in out  # the forced terminal did get colour


def test_terminal_escapes_in_model_text_print_visibly_not_to_the_terminal(tmp_path, run):
    """ESC, BEL and the other controls of a completion, prompt or gold answer would set
    the terminal's title or clear its screen: they print as `\\x1b`-style escapes."""
    from grpoctl.show import token_line

    evil = "a\x1b]0;pwned\x07b\x1b[2Jc\x9b31m\x7fd"
    recs = records(run / "step-000001" / "advantages.jsonl")[:2]
    recs[0]["completion"] = f"{evil} \\boxed{{{evil}}}"
    for r in recs:
        r["prompt"], r["answer"] = f"prompt {evil}", f"gold {evil}"
    path = tmp_path / "escapes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rc, out, err = show(path, env={"FORCE_COLOR": "1", "COLUMNS": "200"})
    assert rc == 0, err
    assert "\x1b[" in out  # rich's own colour codes: a forced terminal
    for raw in ("\x1b]", "\x1b[2J", "\x07", "\x9b", "\x7f"):
        assert raw not in out
    shown = "a\\x1b]0;pwned\\x07b\\x1b[2Jc\\x9b31m\\x7fd"
    assert f"prompt {shown}" in out and f"gold {shown}" in out
    assert out.count(shown) >= 4  # prompt, gold, the completion (twice)
    # tokens decoded one by one go through the same helper, in colour and in plain text
    record = {"completion_ids": [5, 6], "logprobs": [-0.1, -2.0]}
    for colour in (True, False):
        line = token_line(record, {5: "\x1b[2J", 6: "x\ty\n"}, colour).plain
        assert "\x1b" not in line and "\\x1b[2J" in line and "x\ty\n" in line


def test_tokens_show_each_token_and_a_policy_adds_ratio_and_entropy(run):
    rc, out, err = show(run, "--tokens", "--limit", "1")
    assert rc == 0, err
    assert "|" in out  # tokens of the run's model, joined by |
    ckpt = run / "checkpoints" / "step-000002"
    rc, out, err = show(run, "--step", "1", "--tokens", "--policy", ckpt, "--limit", "1")
    assert rc == 0, err
    assert "mean entropy" in out and "⟨r " in out


def test_a_big_file_stops_reading_at_the_limit(tmp_path, run):
    """Groups are shown as soon as they are complete: a damaged line far down the file
    is never reached with --limit 2, and is reported without it."""
    recs = records(run / "step-000001" / "advantages.jsonl")
    lines = [json.dumps(dict(r, prompt_id=f"{r['prompt_id']}-{i}")) + "\n"
             for i in range(200) for r in recs]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(lines) + "{not json\n")
    rc, out, err = show(path, "--limit", "2")
    assert rc == 0 and len(headers(out)) == 2, err
    rc, out, err = show(path, "--limit", "0")
    assert rc == 2 and err.strip() == (f"error: {path}:{len(lines) + 1}: invalid JSON "
                                       "(Expecting property name enclosed in double quotes, "
                                       "column 2)")


def test_groups_split_across_nearby_lines_are_gathered(tmp_path, run):
    recs = records(run / "step-000001" / "advantages.jsonl")
    shuffled = recs[0::2] + recs[1::2]  # every group's two records 8 lines apart
    path = tmp_path / "spread.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in shuffled))
    rc, out, _ = show(path, "--limit", "0")
    assert rc == 0 and len(headers(out)) == 8
    assert all("2 completions" in h for h in headers(out))


@pytest.mark.parametrize("case", ["damaged", "bad field", "missing step", "old layout",
                                  "no such file"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, run, case):
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    step_file = target / "step-000002" / "advantages.jsonl"
    lines = step_file.read_text().splitlines(keepends=True)
    args, expected = [target], None
    if case == "damaged":
        lines[2] = lines[2][:40] + "\n"
        step_file.write_text("".join(lines))
        expected = f"{step_file}:3: invalid JSON"
    elif case == "bad field":
        lines[1] = json.dumps(dict(json.loads(lines[1]), advantage="high")) + "\n"
        step_file.write_text("".join(lines))
        expected = f"{step_file}:2: field 'advantage': expected a finite number"
    elif case == "missing step":
        args, expected = [target, "--step", "7"], f"{target / 'step-000007'}: missing"
    elif case == "old layout":
        for d in target.glob("step-*"):
            shutil.rmtree(d)
        expected = f"{target}: no step-NNNNNN/ directories"
    else:
        args, expected = [tmp_path / "nope.jsonl"], "nope.jsonl: no such file"
    rc, out, err = show(*args)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err, err
