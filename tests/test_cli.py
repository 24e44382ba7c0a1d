"""The command line through real subprocesses: the stage pipeline, stdin/stdout, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_help_lists_every_command_with_examples():
    proc = run_cli("--help", check=True)
    text = proc.stdout.decode()
    for command in ("rollout", "score", "advantage", "update", "loop", "eval"):
        assert command in text
        sub = run_cli(command, "--help", check=True).stdout.decode()
        assert "Examples" in sub and f"grpoctl {command}" in sub, command


@pytest.mark.parametrize("command", ["--help", "score --help", "advantage --help"])
def test_light_commands_do_not_import_torch(command):
    # Pipelines start these often: torch and transformers take seconds to import.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "grpoctl", *command.split()],
                          capture_output=True, text=True, check=True)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
    assert "torch" not in imported and "transformers" not in imported


def test_score_and_advantage_do_not_import_torch_on_real_input(tmp_path):
    records = [{"prompt_id": "p", "sample": s, "completion": f"\\boxed{{{s}}}", "answer": "1"}
               for s in range(2)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for argv, src in ((["score", str(path)], None), (["advantage", "-", "--estimator", "pairwise"], "score")):
        stdin = run_cli("score", str(path), check=True).stdout if src else None
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "grpoctl", *argv],
                              input=stdin, capture_output=True, check=True)
        imported = {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines()}
        assert "torch" not in imported, argv


def test_the_pipeline_from_the_issue(tiny_model, tmp_path):
    """rollout | score | advantage > adv.jsonl && update adv.jsonl --out M2, as a shell runs it."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                               for a in range(3)))
    out = tmp_path / "M2"
    grpoctl = f"{sys.executable} -m grpoctl"
    script = (f"set -o pipefail; {grpoctl} rollout --model {tiny_model} --prompts {prompts} "
              f"--group-size 2 --max-new-tokens 8 | {grpoctl} score | "
              f"{grpoctl} advantage --estimator pairwise > {tmp_path}/adv.jsonl && "
              f"{grpoctl} update {tmp_path}/adv.jsonl --policy {tiny_model} --out {out} --lr 1e-3")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    adv = read_jsonl(tmp_path / "adv.jsonl")
    assert len(adv) == 6 and {r["sample"] for r in adv} == {0, 1}
    for r in adv:
        assert set(r) >= {"prompt_id", "prompt", "completion", "answer", "prompt_ids", "completion_ids",
                          "logprobs", "finish_reason", "policy", "reward", "rewards", "advantage"}
        assert r["advantage"] in (-1.0, 0.0, 1.0)
    # The update's metrics go to stderr as one JSON line; stdout of the pipeline stayed clean.
    metrics = json.loads(proc.stderr.strip().splitlines()[-1])
    assert metrics["tokens"] == sum(len(r["completion_ids"]) for r in adv)
    assert (out / "model.safetensors").is_file() and (out / "optimizer.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 1
    # The updated policy is a model directory the next rollout can use: its records say step 1.
    proc = run_cli("rollout", "--model", str(out), "--prompts", str(prompts), "--limit", "1",
                   "--max-new-tokens", "4", check=True)
    assert json.loads(proc.stdout.splitlines()[0])["policy"]["step"] == 1


def test_stdout_only_carries_records(tiny_model, tmp_path):
    proc = run_cli("rollout", "--model", str(tiny_model), "--prompts", "arith:test", "--limit", "2",
                   "-G", "2", "--max-new-tokens", "4", check=True)
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["prompt_id"] for line in lines)


@pytest.mark.parametrize("command, content, fragment", [
    (["score"], '{"prompt_id": "a", "completion": "x", "answer": "1"}\n{"prompt_id": "b", "compl',
     ":2: invalid JSON"),
    (["score"], "", ": is empty"),
    (["advantage"], '{"prompt_id": "a", "sample": 0, "reward": 1}\n{"prompt_id": "a", "sample": 1}\n',
     ":2: field 'reward': missing"),
    (["advantage", "--estimator", "pairwise"],
     "".join(json.dumps({"prompt_id": "a", "sample": s, "reward": s}) + "\n" for s in range(3)),
     "pairwise"),
    (["update", "--policy", "default"],
     '{"prompt_id": "a", "sample": 0, "prompt_ids": [1], "completion_ids": [2, 3], '
     '"logprobs": [-1.0], "advantage": 1.0}\n', ":1: field 'logprobs'"),
])
def test_bad_input_one_line_exit_2_no_output(tmp_path, command, content, fragment):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content.encode())
    out = tmp_path / ("out-dir" if command[0] == "update" else "out.jsonl")
    proc = run_cli(*command, str(src), "-o", str(out))  # update's -o is its --out
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment in err and (str(src) in err or "<stdin>" in err), err
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no temporary file left either


def test_ctrl_c_in_a_stage_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "rollouts.jsonl"
    argv = [sys.executable, "-m", "grpoctl", "rollout", "--model", "default", "--prompts",
            "arith:train", "-G", "2", "--max-new-tokens", "64", "-o", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    # Once it says it has started generating (4,000 training prompts take minutes):
    assert proc.stderr.readline().startswith(b"rollout: 4000 prompts x 2 samples")
    proc.send_signal(signal.SIGINT)
    out_bytes, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert out_bytes == b""
    assert err.decode().strip().splitlines()[-1].startswith("interrupted: nothing was written")
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary file


def test_version():
    from grpoctl import __version__

    proc = run_cli("--version", check=True)
    assert proc.stdout.decode() == f"grpoctl {__version__}\n"
    assert __version__ == (ROOT / "pyproject.toml").read_text().split('version = "')[1].split('"')[0]


def test_an_unknown_command_is_one_line():
    # Flag errors of each stage are rows of tests/reliability/test_bad_input.py.
    proc = run_cli("advantag")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b""
    assert err == ("error: grpoctl: No such command 'advantag'. Did you mean 'advantage'? "
                   "(see `grpoctl --help`)\n")


def test_no_command_shows_the_help_with_status_2():
    proc = run_cli()
    text = (proc.stdout + proc.stderr).decode()  # typer 0.28 shows it on stdout, 0.29 on stderr
    assert proc.returncode == 2 and "Usage: grpoctl" in text and "rollout" in text


def test_only_public_apis_of_typer():
    # typer's private modules (typer._click.*) move between releases: 0.29 has no
    # typer._click.types, and every command failed with `ModuleNotFoundError` there.
    # scripts/newest-deps-smoke.sh (CI) runs the CLI with the newest typer allowed.
    import re

    for path in sorted((ROOT / "grpoctl").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\b(typer|click)\._|\b_click\b|^\s*(from|import) click\b", text,
                             re.M), path


def test_score_workers_0_scores_in_process(tmp_path):
    # docs/rewards.md: `--workers 0` judges in the calling process (for debugging)
    records = [{"prompt_id": "p", "sample": s, "completion": f"\\boxed{{{s}}}", "answer": "1"}
               for s in range(2)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    in_process = run_cli("score", str(path), "--workers", "0", check=True)
    forked = run_cli("score", str(path), "--workers", "1", check=True)
    assert in_process.stdout == forked.stdout
    assert [json.loads(x)["reward"] for x in in_process.stdout.decode().splitlines()] == [0.0, 1.0]
    stats = json.loads(next(line for line in in_process.stderr.decode().splitlines()
                            if line.startswith("score: "))[len("score: "):])
    assert stats["workers"] == 0
    assert run_cli("score", str(path), "--workers", "-1").returncode == 2


def test_not_a_model_directory(tmp_path):
    proc = run_cli("rollout", "--model", str(tmp_path), "--prompts", "arith:test", "--limit", "1")
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == f"error: {tmp_path}: not a model directory (no config.json)"


def test_readme_first_lines_are_the_two_fresh_machine_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```bash") + 3]
    assert "pip install" in block[0] and "grpoctl loop --group-size 2" in block[0]
    assert block[1].startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' -c constraints.txt" in block[0] and \
        "pip install -q -e '.[test]' -c constraints.txt" in ci and block[1] in ci
