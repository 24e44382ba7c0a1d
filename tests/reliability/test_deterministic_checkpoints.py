"""Checkpoints are byte-deterministic: the same run gives the same bytes in every file.

An independent check found two identical `loop` runs writing different checkpoint
bytes: optimizer.safetensors's metadata keys in either order (safetensors keeps them in
a hash map; 3 of 5 runs differed), tokenizer.json's `padding` field after some resumes
(the tokenizer's state from its last call), and trainer_state.json's wall-clock times.
Here a real `python -m grpoctl loop` process, the same run in this process, and runs
resumed after a lost final checkpoint or a lost step, must all write the very same
bytes in every file of every checkpoint (checkpoint.py: sorted safetensors headers,
the tokenizer saved from a clean state, no timings in trainer_state.json).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def loop_argv(model: Path) -> list[str]:
    # The run directory is the same relative path in each copy: its path is in the config.
    return ["loop", "--model", str(model), "--prompts", "arith:train", "--eval-prompts", "none",
            "-G", "2", "--prompts-per-step", "2", "--steps", "3", "--max-new-tokens", "4",
            "--save-every", "1", "--keep-last", "3", "--workers", "1", "--run-dir", "run", "-q"]


def run_here(argv: list[str], cwd: Path, monkeypatch) -> None:
    """`grpoctl ARGV` through the CLI's entry point in this process, in directory cwd."""
    from grpoctl.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["grpoctl", *argv])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code in (0, None)


def checkpoint_files(run: Path) -> dict[str, bytes]:
    root = run / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def differing(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def test_identical_runs_and_resumed_runs_write_identical_checkpoints(tiny_model, tmp_path,
                                                                     monkeypatch):
    for name in ("process", "here"):
        (tmp_path / name).mkdir()
    # A: a real process (its own hash seeds, Python's and safetensors'), started first ...
    proc = subprocess.Popen([sys.executable, "-m", "grpoctl", *loop_argv(tiny_model)],
                            cwd=tmp_path / "process", env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        # ... B: the same run in this process meanwhile.
        run_here(loop_argv(tiny_model), tmp_path / "here", monkeypatch)
    finally:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    reference = checkpoint_files(tmp_path / "here" / "run")
    assert len(reference) >= 3 * 7  # three checkpoints of weights, optimizer, tokenizer, state
    assert differing(checkpoint_files(tmp_path / "process" / "run"), reference) == []

    # C: the final checkpoint lost with its step (redone from step 2's checkpoint);
    # D: the last two checkpoints lost, the steps kept (replayed, the final one saved again).
    for name, lost in (("redone", ["checkpoints/step-000003", "step-000003/done"]),
                       ("replayed", ["checkpoints/step-000003", "checkpoints/step-000002"])):
        shutil.copytree(tmp_path / "here", tmp_path / name)
        for path in lost:
            target = tmp_path / name / "run" / path
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        run_here(["loop", "--resume", "--run-dir", "run", "-q"], tmp_path / name, monkeypatch)
        resumed = checkpoint_files(tmp_path / name / "run")
        if name == "replayed":  # step 2's checkpoint is not saved again (not the last one)
            reference = {k: v for k, v in reference.items() if not k.startswith("step-000002")}
        assert differing(resumed, reference) == [], name
