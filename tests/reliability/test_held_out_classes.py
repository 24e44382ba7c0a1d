"""Classes of faults an outside review found, each checked with real processes and files.

1. A signal just after an output is committed (renamed into place): the message says
   the output was written, never "nothing was written" over a replaced checkpoint.
2. Every command a stage starts dies with it: a shell's grandchild included.
3. Bad input that used to end in a traceback: one line, exit 2, nothing written.
4. Runs `--resume` could never finish, or would cut short.
5. Errors that contradicted the docs (a .json array's syntax error; eval --by's file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import finished_loop, run_cli

SMALL = ["--steps", "1", "--prompts-per-step", "2", "-G", "2", "--max-new-tokens", "8",
         "--eval-limit", "2", "--quiet"]


def one_line_error(proc, *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until `path` exists (synchronisation by file, not by time); fails if proc ends first."""
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {path} appeared: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """The process ended (a zombie left for init to reap counts as ended)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return True
    return "Z" in state.split()[1]


def wait_gone(pid: int, limit: float = 20) -> bool:
    """SIGKILL is delivered at once, but the exit itself is asynchronous: poll a while."""
    end = time.monotonic() + limit
    while not gone(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return gone(pid)


def with_positions(model: Path, where: Path, positions: int) -> Path:
    """A copy of `model` whose config says it has `positions` positions."""
    shutil.copytree(model, where)
    config = json.loads((where / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (where / "config.json").write_text(json.dumps(config))
    return where


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> Path:
    return finished_loop(tmp_path_factory, "held-out", *SMALL)


# --- 1. signals at the commit point ---------------------------------------------------


def test_a_signal_during_a_commit_is_raised_after_it_and_the_output_is_named(tmp_path):
    """A SIGTERM that arrives while the output is being renamed into place is held until
    the rename is done; the message then names the output as written."""
    script = textwrap.dedent("""
        import os, signal, sys
        from grpoctl import process
        out, tmp = sys.argv[1], sys.argv[2]
        with process.interrupt_on_termination_signals():
            try:
                with process.committing(out):
                    os.kill(os.getpid(), signal.SIGTERM)
                    os.replace(tmp, out)
                    print("renamed", flush=True)
            except KeyboardInterrupt:
                print(process.interrupt_message(), process.terminated_by, flush=True)
        """)
    out, tmp = tmp_path / "out.jsonl", tmp_path / ".out.jsonl.x.tmp"
    tmp.write_text("new\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp)],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert lines[0] == "renamed", proc.stdout + proc.stderr
    assert lines[1].startswith(f"interrupted after writing {out}")
    assert lines[1].endswith(str(int(signal.SIGTERM)))
    assert out.read_text() == "new\n"


def test_sigterm_after_update_replaced_its_checkpoint_says_so(one_step_run, tmp_path):
    """`update --out ck` in place, then --metrics into a FIFO nobody reads: the command
    blocks after the new checkpoint is in place. SIGTERM there must not say "nothing
    was written": ck/ is the new checkpoint (its step is 2), and the message says so."""
    ck = tmp_path / "ck"
    shutil.copytree(one_step_run / "checkpoints" / "step-000001", ck)
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    argv = [sys.executable, "-m", "grpoctl", "update",
            str(one_step_run / "step-000001" / "advantages.jsonl"), "--policy", str(ck),
            "--out", str(ck), "--metrics", str(fifo)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = ck / "trainer_state.json"
    while json.loads(state.read_text())["step"] != 2:  # the commit happened
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    last = err.decode().strip().splitlines()[-1]
    assert "nothing was written" not in last and f"after writing {ck}" in last, last
    assert json.loads(state.read_text())["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- 2. children die with the stage ---------------------------------------------------


SLEEPER = textwrap.dedent("""
    import os, subprocess, sys, time
    # a child of its own, so the stage command is a real tree: shell > this > child
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
    """)


def test_sigterm_to_loop_kills_the_whole_stage_command_tree(tmp_path):
    (tmp_path / "judge.py").write_text(SLEEPER)
    pids = tmp_path / "pids"
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "grpoctl", "loop", *SMALL, "--run-dir", str(run),
            "--score-cmd", f"{sys.executable} {tmp_path / 'judge.py'} {pids}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(pids, proc)
    judge, grandchild = map(int, pids.read_text().split())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert wait_gone(judge) and wait_gone(grandchild)


def test_what_a_finished_stage_command_left_running_is_killed(tmp_path):
    """A command whose shell returns while a background process holds its stdout: the
    runner neither waits for it forever nor leaves it behind."""
    from grpoctl.process import run_command

    (tmp_path / "bg.py").write_text(SLEEPER)
    pids = tmp_path / "pids"
    (tmp_path / "in").write_text("hello\n")
    command = (f"{sys.executable} {tmp_path / 'bg.py'} {pids} & "
               f"while [ ! -e {pids} ]; do sleep 0.05; done; cat")
    with open(tmp_path / "in", "rb") as stdin:
        status, out, _ = run_command(command, stdin)
    assert status == 0 and out == b"hello\n"
    assert all(wait_gone(int(pid)) for pid in pids.read_text().split())


# --- 3. tracebacks that are one-line errors -------------------------------------------


def test_loop_refuses_a_reference_with_fewer_positions_before_writing(tiny_model, tmp_path):
    ref = with_positions(tiny_model, tmp_path / "ref", 8)
    run = tmp_path / "run"
    proc = run_cli("loop", *SMALL, "--model", str(tiny_model), "--kl-coef", "0.1",
                   "--ref", str(ref), "--run-dir", str(run))
    one_line_error(proc, "--ref", "8 positions")
    assert not run.exists()


def test_resume_with_a_config_field_of_the_wrong_type_is_one_line(tmp_path):
    from grpoctl.config import LoopConfig

    run = tmp_path / "run"
    run.mkdir()
    for field, value in (("group_size", "2"), ("temperature", [1]), ("backend", 3),
                         ("quiet_does_not_exist", 1)):
        config = dataclasses.asdict(LoopConfig().resolved())
        config[field] = value
        (run / "config.json").write_text(json.dumps(config))
        before = sorted(p.name for p in run.iterdir())
        proc = run_cli("loop", "--resume", "--run-dir", str(run))
        one_line_error(proc, "config.json", field)
        assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_resume_on_a_read_only_run_with_a_killed_write_is_one_line(one_step_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    (run / ".metrics.jsonl.abcd1234.tmp").write_text("half")
    run.chmod(0o555)
    try:
        proc = run_cli("loop", "--resume", "--run-dir", str(run))
    finally:
        run.chmod(0o755)
    one_line_error(proc, ".metrics.jsonl.abcd1234.tmp")


# --- 4. runs that resume could not finish, or would cut short -------------------------


def test_a_prompt_too_long_for_the_model_is_refused_before_step_1(tiny_model, tmp_path):
    small = with_positions(tiny_model, tmp_path / "small", 24)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n"
                               for p in ("1+0?", "0+1?", "x" * 40, "1*1?")))
    run = tmp_path / "run"
    proc = run_cli("loop", *SMALL, "--model", str(small), "--prompts", str(prompts),
                   "--eval-prompts", str(prompts), "--run-dir", str(run))
    one_line_error(proc, f"{prompts}:3", "positions")
    assert not run.exists()


def test_resume_with_fewer_epochs_than_done_is_refused_and_keeps_metrics(tmp_path):
    run = tmp_path / "run"
    args = ["--prompts-per-step", "2", "-G", "2", "--max-new-tokens", "8", "--limit", "4",
            "--eval-limit", "2", "--quiet", "--run-dir", str(run)]
    run_cli("loop", *args, "--epochs", "1", check=True)  # 2 steps
    metrics = (run / "metrics.jsonl").read_bytes()
    config = (run / "config.json").read_bytes()
    proc = run_cli("loop", "--resume", "--run-dir", str(run), "--epochs", "0.5")
    one_line_error(proc, "--epochs", "not shortened")
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "config.json").read_bytes() == config


def test_a_directory_holding_only_a_killed_starts_temporary_config_is_empty(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.json.k1ll3d00.tmp").write_text('{"half": ')
    proc = run_cli("loop", "--resume", "--run-dir", str(run))
    one_line_error(proc, "nothing to resume", "without --resume")
    run_cli("loop", *SMALL, "--run-dir", str(run), check=True)
    assert (run / "config.json").is_file()
    assert not list(run.glob(".*.tmp"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / ".notes.tmp").write_text("the user's")
    proc = run_cli("loop", *SMALL, "--run-dir", str(tmp_path / "mine"))
    one_line_error(proc, "not empty")
    assert (tmp_path / "mine" / ".notes.tmp").read_text() == "the user's"


# --- 5. errors as the docs say -------------------------------------------------------


def test_a_json_array_with_a_trailing_comma_names_its_line(tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text('[\n  {"prompt": "1+1?", "answer": "2"},\n  {"prompt": "2+2?"},\n]\n')
    proc = run_cli("rollout", "--prompts", str(prompts), "-o", str(tmp_path / "out.jsonl"))
    line = one_line_error(proc, f"{prompts}:4")
    assert "JSON array" not in line
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_by_a_list_column_names_the_prompt_file_and_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1?", "answer": "2", "level": 1}) + "\n"
                       + json.dumps({"prompt": "2+2?", "answer": "4", "level": [1, 2]}) + "\n")
    save = tmp_path / "samples.jsonl"
    proc = run_cli("eval", "--model", "default", "--prompts", str(prompts), "--by", "level",
                   "--samples", "1", "--max-new-tokens", "4", "--save", str(save))
    one_line_error(proc, f"{prompts}:2", "level")
    assert not save.exists()
