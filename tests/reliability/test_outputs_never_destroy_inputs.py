"""No command replaces what it did not write, and no weights load into the wrong model.

`update --out DIR` replaces DIR whole (atomically). So an existing DIR may only be a
grpoctl checkpoint, and never one that holds an input: a directory of the user's own
files, the records file itself, `.`, or a parent of the records are refused with one
line, exit 2, before any model is loaded, and left byte for byte as they were.

A model directory whose weights do not fit the architecture its config.json names
(missing, unexpected or reshaped tensors) is refused with one line: transformers
would initialise what is missing at random and only log it, and `update --out` of
such a model onto its own directory would overwrite the real weights.

The commands run through the CLI's entry point in this process (a new interpreter
costs seconds with torch); the checkpoint round trip runs as real processes.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import policy_records, run_cli

from grpoctl.models import load_policy
from grpoctl.records import write_records


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path (or path itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file()}


@pytest.fixture
def workdir(tiny_model, tmp_path) -> Path:
    records = policy_records(load_policy(tiny_model))
    write_records(records, str(tmp_path / "adv.jsonl"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file\n")
    return tmp_path


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes


@pytest.fixture
def grpoctl(monkeypatch, capfd):
    """`grpoctl ARGS` through cli.main() in this process, in directory `cwd`."""
    from grpoctl.cli import main

    def run(*args: str, cwd: Path) -> Result:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["grpoctl", *args])
        capfd.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capfd.readouterr()
        return Result(exited.value.code, captured.out.encode(), captured.err.encode())
    return run


def one_line_refusal(proc, *needles: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and proc.stdout == b""
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("out", ["mine", "adv.jsonl", ".", "ckpt"],
                         ids=["own-directory", "the-records-file", "cwd", "checkpoint-holding-records"])
def test_update_out_never_replaces_a_users_path(tiny_model, workdir, out, grpoctl):
    if out == "ckpt":  # a real checkpoint, but the records were moved into it
        done = grpoctl("update", "adv.jsonl", "--policy", str(tiny_model), "--out", "ckpt",
                       cwd=workdir)
        assert done.returncode in (0, None), done.stderr
        shutil.move(workdir / "adv.jsonl", workdir / "ckpt" / "adv.jsonl")
    records = "ckpt/adv.jsonl" if out == "ckpt" else "adv.jsonl"
    before = snapshot(workdir)
    proc = grpoctl("update", records, "--policy", str(tiny_model), "--out", out, cwd=workdir)
    one_line_refusal(proc, "--out" if out != "ckpt" else "holds the input")
    assert snapshot(workdir) == before  # nothing replaced, nothing left behind
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]


def test_update_out_replaces_a_checkpoint_and_updates_in_place(tiny_model, workdir):
    run_cli("update", "adv.jsonl", "--policy", str(tiny_model), "--out", "ckpt", cwd=workdir,
            check=True)
    first = snapshot(workdir / "ckpt")
    run_cli("update", "adv.jsonl", "--policy", "ckpt", "--out", "ckpt", cwd=workdir, check=True)
    state = json.loads((workdir / "ckpt" / "trainer_state.json").read_text())
    assert state["step"] == 2  # the checkpoint took its next step, in place
    assert snapshot(workdir / "ckpt")["model.safetensors"] != first["model.safetensors"]


@pytest.mark.parametrize("change", [{"num_hidden_layers": 3}, {"num_hidden_layers": 1},
                                    {"intermediate_size": 128}],
                         ids=["missing-weights", "unexpected-weights", "other-shapes"])
def test_weights_that_do_not_fit_the_config_are_refused(tiny_model, workdir, change, grpoctl):
    model = workdir / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    before = snapshot(model)
    proc = grpoctl("rollout", "--model", str(model), "--prompts", "arith:test", "--limit", "1",
                   "-o", str(workdir / "r.jsonl"), cwd=workdir)
    one_line_refusal(proc, "do not match the architecture in config.json")
    assert not (workdir / "r.jsonl").exists()
    proc = grpoctl("update", "adv.jsonl", "--policy", "model", "--out", "model2", cwd=workdir)
    one_line_refusal(proc, "do not match the architecture in config.json")
    assert snapshot(model) == before and not (workdir / "model2").exists()


def test_update_metrics_into_a_missing_directory_writes_no_checkpoint(tiny_model, workdir,
                                                                      grpoctl):
    proc = grpoctl("update", "adv.jsonl", "--policy", str(tiny_model), "--out", "ckpt",
                   "--metrics", "nowhere/metrics.jsonl", cwd=workdir)
    one_line_refusal(proc, "nowhere/metrics.jsonl: cannot write metrics: no such directory")
    assert not (workdir / "ckpt").exists()  # refused before the step, not after the save


def test_update_metrics_never_appends_to_a_directory_or_an_input(tiny_model, workdir, grpoctl):
    before = snapshot(workdir)
    for metrics in ("mine", "adv.jsonl", str(tiny_model / "config.json")):
        proc = grpoctl("update", "adv.jsonl", "--policy", str(tiny_model), "--out", "ckpt",
                       "--metrics", metrics, cwd=workdir)
        one_line_refusal(proc, "cannot write metrics")
    assert snapshot(workdir) == before  # no checkpoint either: refused before the step


def test_an_in_place_update_keeps_the_users_files_in_the_checkpoint(tiny_model, workdir):
    run_cli("update", "adv.jsonl", "--policy", str(tiny_model), "--out", "ckpt", cwd=workdir,
            check=True)
    (workdir / "ckpt" / "NOTES.md").write_text("mine\n")
    before = snapshot(workdir / "ckpt")
    proc = run_cli("update", "adv.jsonl", "--policy", "ckpt", "--out", "ckpt", cwd=workdir)
    one_line_refusal(proc, "ckpt: also holds NOTES.md")
    assert snapshot(workdir / "ckpt") == before


def test_a_symlinked_out_replaces_the_checkpoint_it_points_to(tiny_model, workdir, grpoctl):
    assert grpoctl("update", "adv.jsonl", "--policy", str(tiny_model), "--out", "ckpt",
                   cwd=workdir).returncode == 0
    (workdir / "link").symlink_to("ckpt")
    proc = grpoctl("update", "adv.jsonl", "--policy", "link", "--out", "link", cwd=workdir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (workdir / "link").is_symlink()
    assert json.loads((workdir / "ckpt" / "trainer_state.json").read_text())["step"] == 2
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]


def test_sequences_past_the_models_positions(tiny_model, workdir, grpoctl):
    """update refuses a record longer than the model's positions, naming its line;
    rollout cuts the budget to what the longest prompt leaves, and says so."""
    positions = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    rows = [json.loads(line) for line in (workdir / "adv.jsonl").read_text().splitlines()]
    rows[1]["prompt_ids"] = rows[1]["prompt_ids"] * positions  # second record, line 3 below
    (workdir / "long.jsonl").write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    proc = grpoctl("update", "long.jsonl", "--policy", str(tiny_model), "--out", "ckpt",
                   cwd=workdir)
    one_line_refusal(proc, "long.jsonl:3: field 'completion_ids'", f"{positions} positions")
    assert not (workdir / "ckpt").exists()

    prompt = "x" * (positions - 8)  # byte tokenizer: a token a character
    (workdir / "p.jsonl").write_text(json.dumps({"prompt": prompt, "answer": "1"}) + "\n")
    proc = grpoctl("rollout", "--model", str(tiny_model), "--prompts", "p.jsonl",
                   "--no-chat-template", "-G", "1", "--max-new-tokens", "64", "--temperature",
                   "0", "-o", "r.jsonl", cwd=workdir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "--max-new-tokens 64 cut to 8" in proc.stderr.decode()
    record = json.loads((workdir / "r.jsonl").read_text())
    assert record["sampling"]["max_new_tokens"] == 8
    assert len(record["prompt_ids"]) + len(record["completion_ids"]) <= positions
    (workdir / "p.jsonl").write_text(json.dumps({"prompt": "x" * positions}) + "\n")
    proc = grpoctl("rollout", "--model", str(tiny_model), "--prompts", "p.jsonl",
                   "--no-chat-template", "-o", "r2.jsonl", cwd=workdir)
    one_line_refusal(proc, "no room for a completion")
    assert not (workdir / "r2.jsonl").exists()
