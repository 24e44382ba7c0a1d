"""Termination signals, closed standard streams, what `-o` may replace, and what a stage
may write (real `python -m grpoctl` processes; score and advantage load no model).

- SIGTERM and SIGHUP end a command as Ctrl-C does (nothing written, no temporary file,
  exit 128 + the signal); a signal the caller ignores (nohup) stays ignored.
- A standard stream closed by the caller: stdout keeps only records when stderr is
  closed, records to a closed stdout are a one-line error, a closed stdin reads empty.
- `-o` replaces a records file (a re-run), through a symlink and keeping its mode; it
  never replaces an input, a directory or a file that is not records, and a path in a
  missing directory is refused before any work.
- A stage never writes what the next one would refuse: a user reward gets a copy of
  the record (what it changes is not written), advantages beyond the schema's bound are
  refused before writing, and errors found after reading name the record's real line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
REWARDS = '''
import os, signal, sys

def stop_at_third(completion, record, **kwargs):
    if record["prompt_id"] == "p1" and record["sample"] == 0:
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_NAME"]))
    return 1.0

def changes_the_record(completion, record, **kwargs):
    record["sample"] = 0
    record["completion"] = 7
    record["logprobs"] = [5.0]
    return 1.0

def fails_on_p1(completion, record, **kwargs):
    if record["prompt_id"] == "p1":
        raise ValueError("bad record")
    return 1.0

def swallows_ctrl_c(completion, record, **kwargs):
    if record["prompt_id"] == "p1" and record["sample"] == 0:
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass
    return 1.0

def say_stderr(completion, **kwargs):
    print("to stderr", file=sys.stderr)
    os.write(2, b"to fd 2\\n")
    return 1.0
'''

NOISY_IMPORT = 'print("printed while importing")\ndef fn(completion, **kwargs):\n    return 1.0\n'
EXIT_AT_IMPORT = "import sys\nsys.exit(0)\ndef fn(completion, **kwargs):\n    return 1.0\n"


def records(n_prompts: int = 3, group: int = 2) -> list[dict]:
    return [{"prompt_id": f"p{i}", "sample": s, "prompt": f"What is {i} + {i}?",
             "completion": f"so \\boxed{{{2 * i + s}}}", "answer": str(2 * i)}
            for i in range(n_prompts) for s in range(group)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "r.jsonl").write_text(jsonl(records()))
    (tmp_path / "rewards.py").write_text(REWARDS)
    (tmp_path / "noisy.py").write_text(NOISY_IMPORT)
    (tmp_path / "exits.py").write_text(EXIT_AT_IMPORT)
    return tmp_path


def one_line_error(proc, *needles: str, code: int = 2) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("error: "), err[-3000:]
    assert proc.stdout == b""
    for needle in needles:
        assert needle in err, err
    return err


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def grpoctl(*args: str, cwd: Path, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """A real `python -m grpoctl ARGS`; stdout and stderr captured unless `popen` says."""
    if "stdout" not in popen and "stderr" not in popen:
        popen["capture_output"] = True
    return subprocess.run([sys.executable, "-m", "grpoctl", *args], cwd=cwd, timeout=120,
                          env={**os.environ, **(env or {})}, **popen)


# --- termination signals -----------------------------------------------------------


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_termination_signal_ends_the_command_as_ctrl_c_does(work, name):
    (work / "out.jsonl").write_text('{"prompt_id": "mine", "sample": 0}\n')
    before = (work / "out.jsonl").read_bytes()
    # The signal's default action, whatever this test runs under (nohup ignores SIGHUP,
    # and an ignored signal rightly stays ignored: the next test).
    signum = getattr(signal, name)
    proc = grpoctl("score", "r.jsonl", "-r", "rewards.py:stop_at_third", "-o", "out.jsonl",
                   cwd=work, env={"SIGNAL_NAME": name},
                   preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    assert proc.returncode == 128 + signum, proc.stderr.decode()
    assert "interrupted" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    assert (work / "out.jsonl").read_bytes() == before and leftovers(work) == []


def test_a_termination_signal_the_caller_ignores_stays_ignored(work):
    proc = grpoctl("score", "r.jsonl", "-r", "rewards.py:stop_at_third", "-o", "out.jsonl",
                   cwd=work, env={"SIGNAL_NAME": "SIGHUP"},  # as under nohup
                   preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert proc.returncode == 0, proc.stderr.decode()
    assert len((work / "out.jsonl").read_text().splitlines()) == 6


def test_a_reward_that_swallows_ctrl_c_does_not_swallow_it_for_grpoctl(work):
    proc = grpoctl("score", "r.jsonl", "-r", "rewards.py:swallows_ctrl_c", "-o", "out.jsonl",
                   cwd=work)
    assert proc.returncode == 130, proc.stderr.decode()
    assert not (work / "out.jsonl").exists() and leftovers(work) == []


# --- closed standard streams -------------------------------------------------------


def test_with_stderr_closed_stdout_holds_only_records(work):
    proc = grpoctl("score", "r.jsonl", "-r", "rewards.py:say_stderr", cwd=work,
                   stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert proc.returncode == 0
    lines = proc.stdout.decode().splitlines()
    assert [json.loads(line)["reward"] for line in lines] == [1.0] * 6


def test_with_stderr_closed_an_output_file_holds_only_records(work):
    proc = grpoctl("score", "r.jsonl", "-r", "rewards.py:say_stderr", "-o", "out.jsonl",
                   cwd=work, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert proc.returncode == 0
    lines = (work / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["reward"] for line in lines] == [1.0] * 6


def test_records_to_a_closed_stdout_are_an_error(work):
    scored = grpoctl("score", "r.jsonl", "-o", "s.jsonl", cwd=work)
    assert scored.returncode == 0, scored.stderr.decode()
    proc = grpoctl("advantage", "s.jsonl", cwd=work, stderr=subprocess.PIPE,
                   preexec_fn=lambda: os.close(1))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("error: <stdout>: cannot write"), err


def test_a_closed_stdin_reads_as_empty(work):
    proc = grpoctl("advantage", "-", cwd=work, preexec_fn=lambda: os.close(0))
    one_line_error(proc, "<stdin>: is empty")


# --- what -o may replace ---------------------------------------------------------------


def test_o_never_replaces_an_input_a_directory_or_a_file_that_is_not_records(work):
    (work / "notes.txt").write_text("MY PRECIOUS DATA\n")
    (work / "a_dir").mkdir()
    for command in (["score", "r.jsonl"], ["advantage", "r.jsonl"]):
        one_line_error(grpoctl(*command, "-o", "notes.txt", cwd=work),
                       "notes.txt: exists and is not a JSONL records file")
        one_line_error(grpoctl(*command, "-o", "r.jsonl", cwd=work),
                       "r.jsonl: is the input r.jsonl; an input is never replaced")
        one_line_error(grpoctl(*command, "-o", "a_dir", cwd=work), "a_dir: is a directory")
        one_line_error(grpoctl(*command, "-o", "missing/out.jsonl", cwd=work),
                       "no such directory")
    assert (work / "notes.txt").read_text() == "MY PRECIOUS DATA\n"
    assert (work / "r.jsonl").read_text() == jsonl(records())
    assert list((work / "a_dir").iterdir()) == [] and leftovers(work) == []


def test_o_replaces_a_records_file_through_a_symlink_keeping_its_mode(work):
    assert grpoctl("score", "r.jsonl", "-o", "s.jsonl", cwd=work).returncode == 0
    first = (work / "s.jsonl").read_bytes()
    (work / "s.jsonl").chmod(0o600)
    (work / "link.jsonl").symlink_to("s.jsonl")
    proc = grpoctl("score", "r.jsonl", "-r", "rewards.py:say_stderr", "-o", "link.jsonl",
                   cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (work / "link.jsonl").is_symlink()
    assert (work / "s.jsonl").read_bytes() != first  # the rewards changed
    assert (work / "s.jsonl").stat().st_mode & 0o777 == 0o600
    (work / "empty.jsonl").write_text("")
    assert grpoctl("score", "r.jsonl", "-o", "empty.jsonl", cwd=work).returncode == 0


# --- what a stage writes, the next can read ------------------------------------------


def test_a_reward_changing_its_record_changes_nothing_written(work):
    proc = grpoctl("score", "r.jsonl", "-r", "rewards.py:changes_the_record", "-o", "s.jsonl",
                   cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()
    written = [json.loads(line) for line in (work / "s.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("reward", "rewards")} for r in written] \
        == records()


def test_what_a_reward_file_does_as_it_is_imported_is_kept_in_bounds(work):
    proc = grpoctl("score", "r.jsonl", "-r", "noisy.py:fn", cwd=work)
    assert proc.returncode == 0 and b"printed while importing" in proc.stderr
    assert all(json.loads(line)["reward"] == 1.0 for line in proc.stdout.decode().splitlines())
    one_line_error(grpoctl("score", "r.jsonl", "-r", "exits.py:fn", "-o", "s.jsonl", cwd=work),
                   "importing exits.py called sys.exit(0)")
    assert not (work / "s.jsonl").exists()


def test_advantages_the_next_stage_would_refuse_are_not_written(work):
    rows = [dict(r, reward=1e100 if r["sample"] == 0 else -1e100) for r in records()]
    (work / "s.jsonl").write_text(jsonl(rows))
    one_line_error(grpoctl("advantage", "s.jsonl", "--estimator", "rloo", "-o", "a.jsonl",
                           cwd=work),
                   "a.jsonl: record 1: cannot write it: field 'advantage'", "too large")
    assert not (work / "a.jsonl").exists() and leftovers(work) == []


def test_errors_after_reading_name_the_records_real_line(work):
    (work / "blank.jsonl").write_text("\n\n\n" + jsonl(records()))  # p1's first on line 6
    one_line_error(grpoctl("score", "blank.jsonl", "-r", "rewards.py:fails_on_p1", cwd=work),
                   "blank.jsonl:6: field 'rewards.fails_on_p1'")
    lone = [dict(r, reward=0.0) for r in records()][:5]  # p2 has one sample, on line 8
    (work / "lone.jsonl").write_text("\n\n\n" + jsonl(lone))
    one_line_error(grpoctl("advantage", "lone.jsonl", cwd=work), "lone.jsonl:8: field 'prompt_id'")
