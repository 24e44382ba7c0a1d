"""`grpoctl loop` end to end on the embedded model, through real subprocesses.

The resume test kills a real run with SIGKILL in the middle of a step and checks
that `--resume` ends with the very weights and metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import finished_loop, run_cli
from safetensors.torch import load_file

from grpoctl.loop import group_stats

# A short run: 3 steps of 8 prompts x 2 samples, a checkpoint only at the end, so a
# resume must replay finished updates from their saved advantages files.
SHORT = ["--group-size", "2", "--steps", "3", "--prompts-per-step", "8", "--eval-limit", "8",
         "--eval-every", "2", "--save-every", "10", "--seed", "3", "--quiet"]
TIMING_KEYS = ("_s", "seconds")


def metrics_without_timings(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith(TIMING_KEYS)} for m in lines]


def evals_without_timings(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "elapsed_s"} for e in lines]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return finished_loop(tmp_path_factory, "loop", *SHORT)


def test_run_directory_layout(finished_run):
    run = finished_run
    config = json.loads((run / "config.json").read_text())
    assert config["group_size"] == 2 and config["steps"] == 3 and config["lr"] == 1e-4
    for step in (1, 2, 3):
        d = run / f"step-{step:06d}"
        assert {p.name for p in d.iterdir()} == {"rollouts.jsonl", "scored.jsonl", "advantages.jsonl",
                                                 "done"}
        rollouts = [json.loads(line) for line in (d / "rollouts.jsonl").read_text().splitlines()]
        assert len(rollouts) == 16 and len({r["prompt_id"] for r in rollouts}) == 8
        assert all(r["policy"]["step"] == step - 1 for r in rollouts)
        advantages = [json.loads(line) for line in (d / "advantages.jsonl").read_text().splitlines()]
        # group estimator at G = 2 with population std: +-1 (up to eps) or 0 on a tie
        assert all(a["advantage"] == 0.0 or abs(abs(a["advantage"]) - 1) < 1e-5 for a in advantages)
    ckpt = run / "checkpoints" / "step-000003"
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json",
            "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3


def test_metrics_agree_with_the_step_files(finished_run):
    run = finished_run
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        d = run / f"step-{m['step']:06d}"
        scored = [json.loads(line) for line in (d / "scored.jsonl").read_text().splitlines()]
        rewards = [r["reward"] for r in scored]
        assert m["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
        by_prompt = {}
        for r in scored:
            by_prompt.setdefault(r["prompt_id"], []).append(r["reward"])
        tied = sum(1 for v in by_prompt.values() if v[0] == v[1])
        assert m["zero_adv_frac"] == pytest.approx(tied / len(by_prompt))
        assert m["rollouts"] == 16 * m["step"]
        for key in ("loss", "clip_fraction", "tokens", "rollout_s", "score_s", "update_s", "elapsed_s"):
            assert key in m
        # The embedded model boxes a bare number: nothing credited looks gamed.
        credited = [r["completion"] for r in scored if r["rewards"]["math"] == 1.0]
        assert all(re.search(r"\\boxed\{\d+\}", c) for c in credited)
        assert m["hack_rate"] == 0.0
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 3]
    assert all(0.0 <= e["mean_at_k"] <= e["pass_at_k"] <= 1.0 for e in evals)
    assert all(e["hack_rate"] == 0.0 for e in evals)


def test_step_hack_rate_is_the_share_of_credited_completions_that_look_gamed():
    # Four completions of "What is 8 + 4?" scored by `format` alone, which credits any box:
    # three are credited, one of them (the sum copied into the box) is gamed: 1/3.
    prompt = "What is 8 + 4?"
    scored = [{"prompt_id": "a", "sample": 0, "completion": r"\boxed{8 + 4}", "reward": 1.0},
              {"prompt_id": "a", "sample": 1, "completion": r"\boxed{12}", "reward": 1.0},
              {"prompt_id": "b", "sample": 0, "completion": r"\boxed{13}", "reward": 1.0},
              {"prompt_id": "b", "sample": 1, "completion": "twelve", "reward": 0.0}]
    for r in scored:
        r.update(prompt=prompt, answer="12", rewards={"format": r["reward"]})
    assert group_stats(scored, [])["hack_rate"] == pytest.approx(1 / 3)


def test_existing_run_directory_needs_resume(finished_run):
    proc = run_cli("loop", *SHORT, "--run-dir", str(finished_run))
    assert proc.returncode == 2 and "--resume" in proc.stderr.decode()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_then_resume_gives_the_same_weights(finished_run, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "grpoctl", "loop", *SHORT, "--run-dir", str(run)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill in the middle of step 3, after its rollouts are on disk but before its update.
    _wait_for(run / "step-000003" / "rollouts.jsonl", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "step-000003" / "done").exists()

    run_cli("loop", "--resume", "--run-dir", str(run), "--quiet", check=True)

    final = "checkpoints/step-000003/model.safetensors"
    expected, got = load_file(finished_run / final), load_file(run / final)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name
    assert metrics_without_timings(run) == metrics_without_timings(finished_run)
    assert evals_without_timings(run) == evals_without_timings(finished_run)
    for step in (1, 2, 3):
        for name in ("rollouts.jsonl", "advantages.jsonl"):
            a = (finished_run / f"step-{step:06d}" / name).read_bytes()
            assert (run / f"step-{step:06d}" / name).read_bytes() == a, (step, name)


def test_interrupt_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "grpoctl", "loop", *SHORT, "--run-dir", str(run)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(run / "step-000001" / "rollouts.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert out == b""
    assert "--resume" in err.decode().strip().splitlines()[-1]


def test_step_batches_never_repeat_a_prompt_and_cover_each_epoch():
    from grpoctl.loop import prompts_for_step

    prompts = [{"prompt_id": f"p{i}"} for i in range(10)]
    # 10 prompts, 4 per step: 2 steps per epoch (2 prompts dropped per epoch), reshuffled.
    batches = [[p["prompt_id"] for p in prompts_for_step(prompts, s, 4, seed=0)] for s in range(1, 7)]
    for b in batches:
        assert len(b) == len(set(b)) == 4
    assert len(set(batches[0]) | set(batches[1])) == 8  # one epoch: 8 distinct prompts
    assert batches[0] != batches[2]  # the next epoch is shuffled differently
    assert batches == [[p["prompt_id"] for p in prompts_for_step(prompts, s, 4, seed=0)]
                       for s in range(1, 7)]  # a function of (seed, step) alone


def test_mini_batches_and_update_epochs_take_m_times_e_optimizer_steps_and_the_clip_acts(tmp_path):
    """--mini-batches 2 --update-epochs 2: four AdamW steps per rollout step, all against the
    sampler's log-probs, so the later ones see ρ away from 1 and PPO's clip cuts in."""
    from safetensors import safe_open

    run = tmp_path / "run"
    run_cli("loop", "-G", "2", "--prompts-per-step", "8", "--steps", "2", "--lr", "1e-3",
            "--mini-batches", "2", "--update-epochs", "2", "--eval-prompts", "none",
            "--seed", "0", "--quiet", "--run-dir", str(run), check=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["optimizer_steps"] == 4 and len(m["per_optimizer_step"]) == 4
        assert [(s["epoch"], s["mini_batch"]) for s in m["per_optimizer_step"]] == \
            [(1, 1), (1, 2), (2, 1), (2, 2)]
        assert m["per_optimizer_step"][0]["clip_fraction"] == 0.0  # ρ = 1 before any step
    assert metrics[0]["clip_fraction"] > 0  # seed 0: later mini-batches are clipped
    with safe_open(run / "checkpoints" / "step-000002" / "optimizer.safetensors", "pt") as f:
        steps = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".step")}
    assert steps == {8.0}  # 2 rollout steps x 4


def test_resume_refuses_changed_settings_and_records_the_allowed_ones(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = (run / "config.json").read_bytes()
    proc = run_cli("loop", "--resume", "--run-dir", str(run), "--steps", "4", "--lr", "5",
                   "--group-size", "4", "--seed", "3")  # seed 3 is the run's own: no change
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "--lr (0.0001 in the run, 5.0 given)" in err and "--group-size (2 in the run, 4 given)" in err
    assert "--seed" not in err.split("only")[0] and "--steps" not in err.split("only")[0]
    assert (run / "config.json").read_bytes() == config and not (run / "resumes.jsonl").exists()

    run_cli("loop", "--resume", "--run-dir", str(run), "--steps", "4", "--keep-last", "3",
            "--reward", "math", check=True)  # the run's own reward, given again: no change
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 4 and saved["keep_last"] == 3
    (record,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert record["changed"] == {"steps": [3, 4], "keep_last": [2, 3]}
    assert [m["step"] for m in metrics_without_timings(run)] == [1, 2, 3, 4]
    assert metrics_without_timings(run)[:3] == metrics_without_timings(finished_run)
