"""Full disks, read-only run directories, non-finite steps, and what may never run.

Disk. A 4-step run (checkpoints at steps 2 and 4) meets an obstacle at one moment
of steps 3-4: files may not grow past 64 kB (RLIMIT_FSIZE), the disk is full (a
small tmpfs filled to the last byte; needs root), or the run directory turns
read-only (`chattr +i` as root, `chmod` otherwise). Each time the loop must stop
with a one-line GrpoctlError naming the file and the reason, leave the step-2
checkpoint byte for byte as it was, and leave no temporary file; once the obstacle
is gone, `--resume` must end with the weights of a run that never met it. The
obstacle is placed by a display object, which `run_loop` tells about every stage
just before it runs.

Numbers. A step whose loss, gradient or update is not finite is refused: the
error names the step and the reason, and no checkpoint of that step is written.

Security. Weights are never unpickled; remote code needs --trust-remote-code;
user reward code runs only when named; paths inside records are never opened.
The markers below are files that the forbidden code would create.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpoctl.display import NullDisplay
from grpoctl.errors import GrpoctlError
from grpoctl.loop import LoopConfig, run_loop

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see test_kill_resume.py


def run_cli_here(argv: list[str], capfd) -> tuple[int, str]:
    """`grpoctl ARGV` through the CLI's entry point in this process: (exit status, stderr)."""
    from grpoctl.cli import main

    saved, code = sys.argv, 0
    sys.argv = ["grpoctl", *argv]
    capfd.readouterr()
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = saved
    return code, capfd.readouterr().err.strip()


# --- disk --------------------------------------------------------------------------------


def config(model: Path, run: Path) -> LoopConfig:
    return LoopConfig(model=str(model), prompts="arith:train", group_size=2, prompts_per_step=2,
                      steps=4, save_every=2, keep_last=2, max_new_tokens=4, lr=1e-3,
                      rewards=["format:[a-z]"], eval_prompts=None, score_workers=0,
                      run_dir=str(run))


@pytest.fixture(scope="module")
def reference_weights(tiny_model, tmp_path_factory) -> dict:
    run = run_loop(config(tiny_model, tmp_path_factory.mktemp("ref") / "run"))
    return load_file(run / "checkpoints" / "step-000004" / "model.safetensors")


class Obstacle(NullDisplay):
    """A display that runs `action` just before stage `name` of step `step`."""

    def __init__(self, step: int, name: str, action):
        self.at, self.action, self.happened = (step, name), action, False

    def stage(self, step: int, name: str) -> None:
        if (step, name) == self.at:
            self.happened = True
            self.action()


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _file_size_limit(run: Path):
    """Files may not grow past 64 kB (the weights are ~0.6 MB): EFBIG, as on a full quota."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill

    def block():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, limits[1]))

    def undo():
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    return block, undo, ("File too large",)


def _full_disk(run: Path):
    """The run lives on its own small tmpfs; the obstacle fills it to the last byte."""
    filler = run.parent / "filler"

    def block():
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
    return block, lambda: filler.unlink(missing_ok=True), ("No space left on device",)


def _read_only(run: Path):
    """Every file and directory of the run becomes read-only, even for root."""
    if os.geteuid() == 0:
        def block():
            subprocess.run(["chattr", "-R", "+i", str(run)], check=True)

        def undo():
            subprocess.run(["chattr", "-R", "-i", str(run)], check=True)
        return block, undo, ("Operation not permitted",)

    def block():
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    def undo():
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return block, undo, ("Permission denied",)


@pytest.fixture
def run_dir(request, tmp_path):
    """Where the run lives: a fresh tmpfs for the full-disk case, else tmp_path."""
    mechanism = request.node.callspec.params["mechanism"]
    if mechanism == "read-only" and os.geteuid() == 0:
        probe = tmp_path / "probe"
        probe.mkdir()
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    if mechanism != "full-disk":
        yield tmp_path / "run"
        return
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount / "run"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


MECHANISMS = {"file-size-limit": _file_size_limit, "full-disk": _full_disk, "read-only": _read_only}


@pytest.mark.parametrize("mechanism, step, stage, failing_file", [
    ("file-size-limit", 4, "checkpoint", "checkpoints/step-000004"),
    ("full-disk", 3, "rollout", "step-000003/rollouts.jsonl"),
    ("full-disk", 3, "update", "step-000003/done"),
    ("full-disk", 4, "checkpoint", "checkpoints/step-000004"),
    ("read-only", 3, "rollout", "step-000003/rollouts.jsonl"),
    ("read-only", 3, "update", "step-000003/done"),
    ("read-only", 4, "checkpoint", "checkpoints/step-000004"),
])
def test_disk_trouble_keeps_the_last_good_checkpoint(mechanism, step, stage, failing_file,
                                                      run_dir, tiny_model, reference_weights):
    run = run_dir
    block, undo, reasons = MECHANISMS[mechanism](run)
    kept = {}

    def obstacle():
        kept.update(_snapshot(run / "checkpoints" / "step-000002"))
        block()

    display = Obstacle(step, stage, obstacle)
    try:
        with pytest.raises(GrpoctlError) as caught:
            run_loop(config(tiny_model, run), display=display)
    finally:
        undo()
    assert display.happened
    message = str(caught.value)
    assert "\n" not in message and "cannot write" in message, message
    assert str(run / failing_file) in message and any(r in message for r in reasons), message
    # The last good checkpoint is intact, and nothing half-written is left anywhere.
    assert _snapshot(run / "checkpoints" / "step-000002") == kept
    assert not (run / "checkpoints" / "step-000004").exists()
    assert not (run / f"step-{step:06d}" / "done").exists()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]

    # The obstacle gone, --resume ends where an undisturbed run ends.
    run_loop(config(tiny_model, run), resume=True)
    got = load_file(run / "checkpoints" / "step-000004" / "model.safetensors")
    assert got.keys() == reference_weights.keys()
    assert all(torch.equal(got[k], reference_weights[k]) for k in got)


def test_unwritable_run_directory_is_one_line_through_the_cli(tmp_path, tiny_model, capfd):
    """A --run-dir that cannot be created (a file is in the way): exit 2, one line."""
    (tmp_path / "blocker").write_text("")
    code, err = run_cli_here(["loop", "--model", str(tiny_model), "--run-dir",
                              str(tmp_path / "blocker" / "run"), "--quiet"], capfd)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "cannot create run directory" in err, err


# --- numbers -------------------------------------------------------------------------------


LOOP = ["loop", "--prompts", "arith:train", "-G", "2", "--prompts-per-step", "4", "--steps", "3",
        "--save-every", "1", "--max-new-tokens", "8", "--reward", "format:[a-z]",
        "--eval-prompts", "none", "--quiet"]


@pytest.mark.parametrize("lr, bad_step, fragment", [
    # One step at lr 1e30 leaves weights near 1e30: the next step's gradient is NaN.
    ("1e30", 2, "update refused: the gradient norm is nan"),
    # At 1e38 the AdamW update itself overflows float32.
    ("1e38", 1, "update refused: the optimizer step failed"),
])
def test_a_non_finite_step_is_refused_and_not_saved(lr, bad_step, fragment, tiny_model, tmp_path,
                                                     capfd):
    run = tmp_path / "run"
    code, err = run_cli_here([*LOOP, "--model", str(tiny_model), "--lr", lr, "--run-dir", str(run)],
                             capfd)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: step {bad_step}: {fragment}"), err
    assert "parameters unchanged" in err
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*")) \
        if (run / "checkpoints").exists() else []
    assert saved == [f"step-{s:06d}" for s in range(1, bad_step)]  # none of the bad step
    assert not (run / f"step-{bad_step:06d}" / "done").exists()
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == list(range(1, bad_step))
    for s in range(1, bad_step):  # what was saved is finite
        weights = load_file(run / "checkpoints" / f"step-{s:06d}" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_update_refuses_an_overflowing_loss(tiny_model, tmp_path, capfd):
    records = [{"prompt_id": "p", "sample": s, "prompt_ids": [72, 101], "completion_ids": [40, 1],
                "logprobs": [-5.5, -5.5], "advantage": 1e100 * (1 - 2 * s)} for s in range(2)]
    # 1e100 is the largest advantage a record may hold (records.MAX_MAGNITUDE); in float32
    # the loss overflows all the same
    src = tmp_path / "adv.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, err = run_cli_here(["update", str(src), "--policy", str(tiny_model), "--out",
                              str(tmp_path / "out")], capfd)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"step 1 ({src}): update refused: the loss is not finite" in err, err
    assert sorted(os.listdir(tmp_path)) == ["adv.jsonl"]


# --- security ------------------------------------------------------------------------------


class _Marker:
    """Unpickling this creates `path`: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def _pickle_to(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Marker(marker)}, f)


def test_pickle_weights_are_refused_and_never_loaded(tiny_model, tmp_path, capfd):
    marker = tmp_path / "MARKER"
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").unlink()
    _pickle_to(model / "pytorch_model.bin", marker)
    # Prove the trap works: loading it the unsafe way would leave the marker.
    with open(model / "pytorch_model.bin", "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1 + 1 = ", "answer": "2"}\n')
    adv = tmp_path / "adv.jsonl"
    adv.write_text(json.dumps({"prompt_id": "p", "sample": 0, "prompt_ids": [72], "advantage": 1.0,
                               "completion_ids": [40], "logprobs": [-5.0]}) + "\n")
    for argv in (["rollout", "--model", str(model), "--prompts", str(prompts)],
                 ["update", str(adv), "--policy", str(model), "--out", str(tmp_path / "out")],
                 ["loop", "--model", str(model), "--prompts", str(prompts), "--eval-prompts",
                  "none", "--prompts-per-step", "1", "--run-dir", str(tmp_path / "run"),
                  "--quiet"],
                 ["eval", "--model", str(model), "--prompts", str(prompts)]):
        code, err = run_cli_here(argv, capfd)
        assert code == 2 and err == (f"error: {model}: no *.safetensors weights (found "
                                     "pytorch_model.bin: pickle weights are not loaded)"), err
        assert not marker.exists(), argv[0]


def test_pickles_beside_safetensors_are_ignored(tiny_model, tmp_path, capfd):
    """A checkpoint from another trainer: safetensors weights plus pickled extras."""
    marker = tmp_path / "MARKER"
    model = tmp_path / "mixed"
    shutil.copytree(tiny_model, model)
    for name in ("pytorch_model.bin", "optimizer.pt", "rng_state.pth", "training_args.bin",
                 "scheduler.pt"):
        _pickle_to(model / name, marker)
    adv = tmp_path / "adv.jsonl"
    adv.write_text("".join(json.dumps({"prompt_id": "p", "sample": s, "prompt_ids": [72],
                                       "completion_ids": [40 + s], "logprobs": [-5.5],
                                       "advantage": 1.0 - 2 * s}) + "\n" for s in range(2)))
    code, err = run_cli_here(["update", str(adv), "--policy", str(model), "--out",
                              str(tmp_path / "out")], capfd)
    assert code == 0, err
    assert not marker.exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _remote_code_model(tiny_model: Path, root: Path, marker: Path) -> Path:
    """A model whose config points at local code (auto_map) that would create `marker`."""
    model = root / "remote"
    shutil.copytree(tiny_model, model)
    (model / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="evil", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "evil.EvilConfig",
                         "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def test_remote_code_runs_only_with_trust_remote_code(tiny_model, tmp_path, capfd):
    marker = tmp_path / "MARKER"
    model = _remote_code_model(tiny_model, tmp_path, marker)
    argv = ["rollout", "--model", str(model), "--prompts", "arith:test", "--limit", "1",
            "--max-new-tokens", "2", "-G", "1"]
    code, err = run_cli_here(argv, capfd)
    assert code == 2 and "cannot load model" in err.splitlines()[-1], err
    assert not marker.exists()
    # The same directory with the flag: the code runs (so the check above could fail). In
    # a subprocess, to keep transformers' copy of the code out of ~/.cache.
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-m", "grpoctl", *argv, "--trust-remote-code"], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert marker.read_text() == "remote code ran"


USER_REWARD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n" \
              "def judge(completion, answer, record):\n    return 1.0\n"


def test_user_reward_code_runs_only_when_named(tmp_path, capfd):
    marker = tmp_path / "MARKER"
    judge = tmp_path / "judge.py"
    judge.write_text(USER_REWARD.format(marker=str(marker)))
    # A record may name code, a path, anything: it is data.
    records = [{"prompt_id": "p", "sample": 0, "completion": f"\\boxed{{{judge}:judge}}",
                "answer": f"{judge}:judge", "reward_fn": f"{judge}:judge",
                "rewards_from": str(judge)}]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, err = run_cli_here(["score", str(src), "-o", str(tmp_path / "scored.jsonl")], capfd)
    assert code == 0, err
    assert not marker.exists()
    code, err = run_cli_here(["score", str(src), "--reward", f"{judge}:judge", "-o",
                              str(tmp_path / "judged.jsonl")], capfd)
    assert code == 0, err
    assert marker.read_text() == "ran"


def test_a_module_in_the_working_directory_is_never_imported(tmp_path):
    """`python -m grpoctl` in a directory holding a math_verify.py uses the real one."""
    (tmp_path / "math_verify.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / 'MARKER')!r}).write_text('x')\n")
    (tmp_path / "r.jsonl").write_text(json.dumps(
        {"prompt_id": "p", "completion": "\\boxed{x^2}", "answer": "x \\cdot x"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "score", "r.jsonl", "--workers", "1"],
                          cwd=tmp_path, capture_output=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert json.loads(proc.stdout)["reward"] == 1.0  # judged by the real math-verify
    assert not (tmp_path / "MARKER").exists()


def test_paths_in_records_are_never_opened(tmp_path, tiny_model, capfd):
    """A record naming a FIFO: opening it would block forever, so every stage would hang."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    records = [{"prompt_id": str(fifo), "sample": s, "prompt": str(fifo), "completion":
                f"\\boxed{{{fifo}}}" if s == 0 else "\\boxed{/etc/passwd}", "answer": str(fifo),
                "prompt_ids": [72, 101], "completion_ids": [40 + s, 1], "logprobs": [-5.5, -5.5],
                "policy": {"path": str(fifo), "step": 0}, "meta": {"file": str(fifo)},
                "sampling": {"temperature": 1.0, "max_new_tokens": 2}} for s in range(2)]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    scored, adv = tmp_path / "scored.jsonl", tmp_path / "adv.jsonl"

    # A reader that opened the FIFO would block; this watcher then opens the other end
    # (which lets the reader go on, so the test fails rather than hangs) and records it.
    opened, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO: no reader
                opened.append(True)
            except OSError as e:
                assert e.errno == errno.ENXIO
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for argv in (["score", str(src), "-o", str(scored)],
                     ["advantage", str(scored), "-o", str(adv)],
                     ["eval", "--scored", str(scored)],
                     ["update", str(adv), "--policy", str(tiny_model), "--out",
                      str(tmp_path / "out")]):
            code, err = run_cli_here(argv, capfd)
            assert code == 0, (argv[0], err)
    finally:
        stop.set()
        watcher.join()
    assert not opened
    rewards = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    assert rewards == [1.0, 0.0]  # the path compared as text, nothing more
