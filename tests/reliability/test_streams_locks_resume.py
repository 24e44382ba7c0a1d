"""What reaches stdout, what holds a run directory, and what --resume trusts.

- User reward functions: called by keyword (TRL's `def reward(completion, **kwargs)`),
  their prints kept off the record stream (in this process and in the scoring
  workers), and sys.exit() or a KeyboardInterrupt inside one a one-line error.
- stdout: on a full device (`> /dev/full`) one line and exit 2; a reader that goes
  away (`| head`) ends the command quietly; `-o /dev/full` and `-o /dev/null` write
  the device in place and never replace it with a file.
- Every message main() prints is one line, however many lines the error had.
- Two `loop`s on one run directory: the second stops at once (real processes); a
  killed holder leaves no stale lock.
- `loop --resume` of a run whose stage files, `done` files or final checkpoint were
  damaged or deleted: redoes what is incomplete (same files, same weights as the
  uninterrupted run), or refuses in one line; metrics.jsonl never ends in a cut line.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def records(n_prompts: int = 2, group: int = 2) -> list[dict]:
    return [{"prompt_id": f"p{i}", "sample": s, "prompt": f"What is {i} + {i}?",
             "completion": f"so \\boxed{{{2 * i + s}}}", "answer": str(2 * i)}
            for i in range(n_prompts) for s in range(group)]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in err, err
    return err


# --- user rewards ---------------------------------------------------------------------

REWARDS = '''
import os, sys

def trl_style(completion, **kwargs):
    assert set(kwargs) == {"answer", "record", "prompt"}, kwargs
    return float(kwargs["answer"] in completion)

def completion_and_prompt(completion, prompt):
    return float(prompt.startswith("What")) + len(completion) / 100

def answer_only(answer):
    return float(answer == "0")

def keyword_only(*, record, completion):
    return float(record["sample"])

def positional_names(text, gold, rec):
    return float(gold in text)

def defaults_ignored(completion, scale=2.0):
    return scale

def noisy(completion, answer, record):
    print("print from the reward")
    sys.stdout.write("write from the reward\\n")
    os.system("echo from a subprocess of the reward")
    os.write(1, b"os.write to fd 1\\n")
    return 1.0

def exits(completion, answer, record):
    sys.exit(0)
'''


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "r.py"
    path.write_text(REWARDS)
    return path


def test_user_rewards_are_called_by_keyword(reward_file):
    from grpoctl.config import ScoreSettings
    from grpoctl.rewards import score_records

    rows = records()
    specs = [f"{reward_file}:{name}" for name in
             ("trl_style", "completion_and_prompt", "answer_only", "keyword_only",
              "positional_names", "defaults_ignored")]
    out, _ = score_records(rows, ScoreSettings(specs), progress=False)
    for r in out:
        right = float(r["answer"] in r["completion"])
        assert r["rewards"] == {"trl_style": right,
                                "completion_and_prompt": 1.0 + len(r["completion"]) / 100,
                                "answer_only": float(r["answer"] == "0"),
                                "keyword_only": float(r["sample"]),
                                "positional_names": right, "defaults_ignored": 2.0}


def test_a_printing_reward_leaves_stdout_to_the_records(reward_file, tmp_path):
    """print, sys.stdout.write, a subprocess and os.write(1) inside the reward: all on
    stderr; stdout is exactly the records, so `grpoctl score | grpoctl advantage` works."""
    (tmp_path / "in.jsonl").write_bytes(jsonl(records()))
    proc = run_cli("score", "in.jsonl", "--reward", f"{reward_file}:noisy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [(r["prompt_id"], r["sample"], r["reward"]) for r in out] == [
        (r["prompt_id"], r["sample"], 1.0) for r in records()]
    err = proc.stderr.decode()
    for printed in ("print from the reward", "write from the reward",
                    "from a subprocess of the reward", "os.write to fd 1"):
        assert err.count(printed) == 4, err


def _print_and_double(x):
    print(f"worker prints {x}")
    os.system(f"echo worker subprocess {x}")
    return 2 * x


def test_scoring_workers_print_to_stderr(capfd):
    from grpoctl import scoring_pool

    capfd.readouterr()
    outcomes = scoring_pool.run_pool(_print_and_double, [1, 2, 3], workers=2, timeout=30)
    captured = capfd.readouterr()
    assert [o.value for o in outcomes] == [2, 4, 6]
    assert captured.out == ""
    assert "worker prints 2" in captured.err and "worker subprocess 3" in captured.err


def test_sys_exit_in_a_reward_is_one_line_naming_it(reward_file, tmp_path):
    """sys.exit(0) inside a reward used to end grpoctl silently with status 0 and no output."""
    (tmp_path / "in.jsonl").write_bytes(jsonl(records()))
    proc = run_cli("score", "in.jsonl", "--reward", f"{reward_file}:exits", "-o", "out.jsonl",
                   cwd=tmp_path)
    one_line_error(proc, "in.jsonl:1: field 'rewards.exits': reward "
                         f"'{reward_file}:exits' called sys.exit(0)")
    assert proc.stdout == b"" and not (tmp_path / "out.jsonl").exists()


# --- stdout and one-line messages ----------------------------------------------------

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")


def _run_to(stdout, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpoctl", *args], stdout=stdout,
                          stderr=subprocess.PIPE, cwd=cwd, env=ENV, timeout=120)


@needs_dev_full
@pytest.mark.parametrize("args", [
    ("score", "in.jsonl", "--reward", "format"),
    ("advantage", "scored.jsonl"),
    ("eval", "--scored", "scored.jsonl"),  # the summary is print()ed, flushed at exit
    ("--help",),
], ids=["score", "advantage", "eval", "help"])
def test_stdout_on_a_full_device_is_one_line(args, tmp_path):
    rows = records()
    (tmp_path / "in.jsonl").write_bytes(jsonl(rows))
    (tmp_path / "scored.jsonl").write_bytes(jsonl([dict(r, reward=float(r["sample"] == 0))
                                                   for r in rows]))
    with open("/dev/full", "wb") as full:
        proc = _run_to(full, *args, cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.splitlines()[-1] == "error: <stdout>: cannot write: No space left on device", err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "scored.jsonl"]


@needs_dev_full
def test_output_to_a_device_writes_it_and_never_replaces_it(tmp_path):
    """`-o /dev/full` is one line; `-o /dev/null` succeeds; both stay devices (as root,
    renaming a temporary file over them would have replaced /dev/null with a file)."""
    (tmp_path / "in.jsonl").write_bytes(jsonl(records()))
    proc = run_cli("score", "in.jsonl", "--reward", "format", "-o", "/dev/full", cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.splitlines()[-1] == (
        "error: /dev/full: cannot write: No space left on device"), err
    proc = run_cli("score", "in.jsonl", "--reward", "format", "-o", "/dev/null", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    for device in ("/dev/full", "/dev/null"):
        assert stat.S_ISCHR(os.stat(device).st_mode)
    assert not [p for p in os.listdir("/dev") if p.endswith(".tmp")]


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`grpoctl score big.jsonl | head -1`: no traceback, no message, status 1 (click's)."""
    (tmp_path / "big.jsonl").write_bytes(jsonl(records(n_prompts=10_000)))
    proc = subprocess.Popen([sys.executable, "-m", "grpoctl", "score", "big.jsonl", "--reward",
                             "format", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=ENV)
    assert json.loads(proc.stdout.readline())["prompt_id"] == "p0"
    proc.stdout.close()  # the pipe fills long before 20,000 records are written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


def test_a_multi_line_error_is_printed_on_one_line(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(jsonl(records()))
    (tmp_path / "bad.py").write_text('raise ValueError("first line\\n  second line\\n\\nthird")\n'
                                     "def fn(completion):\n    return 1.0\n")
    proc = run_cli("score", "in.jsonl", "--reward", "bad.py:fn", cwd=tmp_path)
    one_line_error(proc, "importing bad.py failed: ValueError: first line second line third")


# --- the run-directory lock ------------------------------------------------------------


def loop_args(model: Path, run: Path, *more: str) -> list[str]:
    return ["loop", "--model", str(model), "--prompts", "arith:train", "--eval-prompts", "none",
            "--prompts-per-step", "2", "--max-new-tokens", "4",
            "--quiet", "--run-dir", str(run), *more]


def test_a_second_loop_on_a_live_run_directory_stops_at_once(tiny_model, tmp_path):
    """Two real `loop` processes: while the first runs, a second on its directory (new or
    --resume) fails with one line naming the directory, before it touches a file. Once
    the first is SIGKILLed, the kernel has dropped its lock: nothing stale is left."""
    from grpoctl.runlock import lock_run_dir, release_run_dir

    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "grpoctl",
                              *loop_args(tiny_model, run, "--steps", "1000000")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not (run / "config.json").exists():  # written once it holds the lock, loaded
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = [["loop", "--resume", "--run-dir", str(run)], loop_args(tiny_model, run)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            procs = list(pool.map(lambda args: run_cli(*args), second))
        for proc in procs:
            err = proc.stderr.decode()
            assert proc.returncode == 2, err
            assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
            assert str(run) in err.splitlines()[-1]
        assert "another `grpoctl loop` is running in this run directory" in procs[0].stderr.decode()
        assert first.poll() is None  # the first run was never disturbed
    finally:
        first.kill()
        first.wait()
    lock_run_dir(run)  # no stale lock
    release_run_dir(run)
    assert not [p for p in run.iterdir() if p.name.endswith(".lock")]


# --- resume of a damaged run -------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    from grpoctl.loop import LoopConfig, run_loop

    run = tmp_path_factory.mktemp("finished") / "run"
    run_loop(LoopConfig(model=str(tiny_model), prompts="arith:train", group_size=2,
                        prompts_per_step=2, steps=2, max_new_tokens=4, eval_prompts=None,
                        save_every=1, keep_last=2, run_dir=str(run), score_workers=0))
    return run


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def _cut(path: Path, how: str) -> None:
    data = b"" if path.is_dir() else path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "last-line":  # cut at a line boundary: every line left is valid JSON
        path.write_bytes(b"".join(data.splitlines(keepends=True)[:-1]))
    elif how == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()


DAMAGE = {  # id: [(file, how)], what resume must redo or refuse
    "done-empty": [("step-000002/done", "empty")],
    "done-cut-in-half": [("step-000002/done", "half")],
    "first-done-empty": [("step-000001/done", "empty")],
    "rollouts-cut-at-a-line-boundary": [("step-000002/done", "delete"),
                                        ("step-000002/rollouts.jsonl", "last-line")],
    "scored-empty": [("step-000002/done", "empty"), ("step-000002/scored.jsonl", "empty")],
    "advantages-empty": [("step-000002/done", "delete"),
                         ("step-000002/advantages.jsonl", "empty")],
    "advantages-cut-in-half": [("step-000002/done", "half"),
                               ("step-000002/advantages.jsonl", "half")],
    "final-checkpoint-deleted": [("checkpoints/step-000002", "delete")],
    "metrics-cut": [("metrics.jsonl", "half")],
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_resume_redoes_what_is_damaged(name, finished_run, tmp_path, monkeypatch, capfd):
    """Every stage file, `done` file and the final checkpoint end as the uninterrupted
    run left them (weights torch.equal), and metrics.jsonl holds one whole line per step."""
    import torch

    from grpoctl.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for file, how in DAMAGE[name]:
        _cut(run / file, how)
    monkeypatch.setattr(sys, "argv", ["grpoctl", "loop", "--resume", "--run-dir", str(run)])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    err = capfd.readouterr().err
    assert exited.value.code == 0, err[-3000:]
    assert "Traceback" not in err and "error" not in err.lower()
    for step in (1, 2):
        for stage in ("rollouts.jsonl", "scored.jsonl", "advantages.jsonl"):
            file = f"step-{step:06d}/{stage}"
            assert (run / file).read_bytes() == (finished_run / file).read_bytes(), file
        done = json.loads((run / f"step-{step:06d}" / "done").read_text())
        assert done["step"] == step
    metrics = (run / "metrics.jsonl").read_text()
    assert metrics.endswith("\n")
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2]
    want, got = (_weights(r / "checkpoints" / "step-000002") for r in (finished_run, run))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_resume_refuses_to_replay_from_damaged_advantages(finished_run, tmp_path, monkeypatch,
                                                          capfd):
    """A finished step whose update must be replayed (its checkpoint is gone) and whose
    advantages file was emptied: replaying it would silently skip the update. One line."""
    from grpoctl.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _cut(run / "checkpoints" / "step-000002", "delete")
    _cut(run / "step-000002" / "advantages.jsonl", "empty")
    monkeypatch.setattr(sys, "argv", ["grpoctl", "loop", "--resume", "--run-dir", str(run)])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    err = capfd.readouterr().err.strip()
    assert exited.value.code == 2, err[-3000:]
    assert err.splitlines()[-1] == (f"error: {run}/step-000002/advantages.jsonl: 0 records, but "
                                    "the step trained on 4; the file is damaged and its update "
                                    "cannot be replayed"), err
    assert not (run / "checkpoints" / "step-000002").exists()


def _loop_in_process(argv: list[str], monkeypatch, capfd) -> tuple[int, str]:
    from grpoctl.cli import main

    monkeypatch.setattr(sys, "argv", ["grpoctl", *argv])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capfd.readouterr().err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_a_new_loop_never_writes_among_a_users_files(tiny_model, tmp_path, monkeypatch, capfd):
    users = tmp_path / "mine"
    (users / "checkpoints" / "step-0").mkdir(parents=True)
    (users / "notes.txt").write_text("notes\n")
    (users / "checkpoints" / "step-0" / "weights.bin").write_text("precious\n")
    before = _tree(users)
    code, err = _loop_in_process(loop_args(tiny_model, users, "--steps", "1"), monkeypatch, capfd)
    assert code == 2 and err.strip().endswith("a new run needs a new or empty --run-dir"), err
    assert _tree(users) == before


def test_resume_of_a_directory_that_is_not_a_run_touches_nothing(tmp_path, monkeypatch, capfd):
    model_like = tmp_path / "model"
    (model_like / "sub").mkdir(parents=True)
    (model_like / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model_like / ".session.tmp").write_text("keep\n")
    (model_like / "sub" / ".draft.tmp").write_text("keep\n")
    before = _tree(model_like)
    code, err = _loop_in_process(["loop", "--resume", "--run-dir", str(model_like)], monkeypatch,
                                 capfd)
    assert code == 2 and "cannot read the run's settings" in err, err
    assert _tree(model_like) == before


def test_resume_never_shortens_a_run(finished_run, tmp_path, monkeypatch, capfd):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _tree(run)
    code, err = _loop_in_process(["loop", "--resume", "--run-dir", str(run), "--steps", "1"],
                                 monkeypatch, capfd)
    assert code == 2 and "the run has finished 2 steps, and a run is not shortened" in err, err
    assert _tree(run) == before


def test_settings_that_fail_later_are_refused_before_the_run_directory(tiny_model, finished_run,
                                                                      tmp_path, monkeypatch, capfd):
    """Too many prompts per step, a reward file that does not load, --rollouts-from a run
    of another group size: refused before config.json, so the directory can be used again."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n' * 3)
    cases = [(["--prompts-per-step", "4", "--prompts", str(tmp_path / "prompts.jsonl")],
              "--prompts-per-step 4 is more than the 3 prompts"),
             (["--reward", str(tmp_path / "nosuch.py") + ":fn"], "no such file"),
             (["--rollouts-from", str(finished_run), "--group-size", "4"],
              "its --group-size is 2, this run's 4")]
    for more, message in cases:
        run = tmp_path / "run"
        code, err = _loop_in_process([*loop_args(tiny_model, run, "--steps", "1"), *more],
                                     monkeypatch, capfd)
        assert code == 2 and message in err, err
        assert not run.exists(), message
