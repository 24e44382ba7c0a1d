"""--threads on every command that runs a model (rollout, update, eval, loop): the same
flag and the same default as `loop` (config.resolve_threads): 1 for the embedded model,
0 = torch's own choice for any other. Each case is a real subprocess that runs the CLI's
entry point (`grpoctl.cli.main`, argv as given) and then reports the number of threads
torch was left with, the number the command's model ran on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli

# grpoctl ARGS in this interpreter, then "torch threads: N" on stderr, exiting with the
# command's status.
PROBE = """\
import sys
from grpoctl.cli import main
try:
    main()
except SystemExit as e:
    status = e.code
import torch
print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
sys.exit(status)
"""

# torch's own choice depends on these; left out, it is the machine's
ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def threads_after(*args: str) -> int:
    """The thread count torch had after `grpoctl ARGS` ran (which must succeed)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0, f"grpoctl {' '.join(args)}: {proc.stderr[-3000:]}"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("torch threads: "), proc.stderr[-3000:]
    return int(last.split(": ")[1])


@pytest.fixture(scope="module")
def torch_default() -> int:
    """torch's own thread count in a fresh process with the same environment."""
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                          capture_output=True, text=True, env=ENV, check=True)
    return int(proc.stdout)


@pytest.fixture(scope="module")
def asked(torch_default) -> int:
    """A thread count to ask for that is neither torch's choice nor the embedded default."""
    return max(torch_default, 1) + 1


ROLLOUT = ["rollout", "--prompts", "arith:test", "--limit", "1", "-G", "2", "--max-new-tokens",
           "2", "-q", "-o", os.devnull]


@pytest.fixture(scope="module")
def adv_file(tmp_path_factory):
    """The embedded model's own rollouts with advantages, for `update`."""
    path = tmp_path_factory.mktemp("threads") / "adv.jsonl"
    proc = run_cli(*ROLLOUT[:-2], check=True)
    records = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    for r in records:
        r["advantage"] = 1.0 if r["sample"] == 0 else -1.0
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_rollout_threads_given_default_and_zero(asked, torch_default, tiny_model):
    assert threads_after(*ROLLOUT, "--threads", str(asked)) == asked
    assert threads_after(*ROLLOUT) == 1  # the embedded model's default, as `loop`
    assert threads_after(*ROLLOUT, "--threads", "0") == torch_default
    # any other model: torch's choice by default
    assert threads_after(*ROLLOUT, "--model", str(tiny_model)) == torch_default


def test_update_threads(asked, adv_file, tmp_path):
    assert threads_after("update", str(adv_file), "--policy", "default", "--lr", "1e-4",
                         "--out", str(tmp_path / "c1"), "--threads", str(asked)) == asked
    assert threads_after("update", str(adv_file), "--policy", "default", "--lr", "1e-4",
                         "--out", str(tmp_path / "c2")) == 1


def test_eval_threads(asked):
    args = ["eval", "-m", "default", "--prompts", "arith:test", "--limit", "1", "-k", "1",
            "--max-new-tokens", "2", "-q"]
    assert threads_after(*args, "--threads", str(asked)) == asked
    assert threads_after(*args) == 1


def test_loop_threads(asked, tmp_path):
    assert threads_after("loop", "--prompts", "arith:train", "--limit", "2", "--prompts-per-step",
                         "2", "-G", "2", "--steps", "1", "--max-new-tokens", "2",
                         "--eval-prompts", "none", "--workers", "0", "--run-dir",
                         str(tmp_path / "run"), "-q", "--threads", str(asked)) == asked


def test_every_model_command_takes_the_same_threads_option():
    import typer

    from grpoctl.cli import app

    commands = typer.main.get_command(app).commands
    helps = set()
    for command in ("rollout", "update", "eval", "loop"):
        assert "--threads" in run_cli(command, "--help", check=True).stdout.decode()
        param = next(p for p in commands[command].params if p.name == "threads")
        helps.add(param.help)
        proc = run_cli(command, "--threads", "-1")
        assert proc.returncode == 2 and b"Invalid value for '--threads'" in proc.stderr
    assert len(helps) == 1  # one definition, one default rule
