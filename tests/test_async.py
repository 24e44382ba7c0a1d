"""`loop --async N` (sampler_worker.py): the sampler in a process of its own, N steps ahead.

Real processes on the embedded model. Nothing here waits on the clock: each test
synchronises on files and process ids (a step's file appearing, a pid leaving the
process table), so a faster or slower side changes nothing that is checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from grpoctl.checkpoint import is_timing_key
from grpoctl.config import LoopConfig
from grpoctl.errors import GrpoctlError

# 24 new tokens: the embedded model's answers then differ within groups, so the weights move
BASE = {"steps": 4, "prompts_per_step": 4, "max_new_tokens": 24, "eval_prompts": None,
        "lr": 1e-3, "seed": 3, "save_every": 2}

# The loop as `grpoctl loop` runs it (signals as KeyboardInterrupt, one-line errors),
# from a LoopConfig given as JSON; "kill" makes the process SIGKILL itself at an event
# of its own run: {"at": "update"|"keep_policy"|"save_policy", "step": k, "after": FILE}
# (the kill waits until FILE exists: the sampler is then ahead of the trainer).
DRIVER = r"""
import json, os, signal, sys, time
from pathlib import Path
from grpoctl import loop as loop_module, process, sampler_worker
from grpoctl.config import LoopConfig
from grpoctl.errors import GrpoctlError

settings = json.loads(sys.argv[1])
resume, kill, pidfile, full_at = (settings.pop(k, None)
                                   for k in ("resume", "kill", "pidfile", "disk_full_at"))
if full_at:  # the disk fills up while the weights of step full_at are written
    save = sampler_worker.save_policy
    def save_policy(weights, path):
        if path.name == f"policy-step-{full_at:06d}.safetensors":
            raise OSError(28, "No space left on device")
        save(weights, path)
    sampler_worker.save_policy = save_policy

def killer(name, original, owner):
    def wrapped(*args, **kwargs):
        step = args[1] if name != "save_policy" else int(Path(args[1]).stem.split("-")[-1])
        if step == kill["step"]:
            if kill.get("after"):
                while not Path(kill["after"]).exists():  # the sampler's file: it is ahead
                    time.sleep(0.01)
            if pidfile:  # the sampler's pid, for the test to see it go
                Path(pidfile).write_text(str(sampler_worker._running[-1].worker.proc.pid))
            if name == "save_policy":  # a kill inside the write: its temporary is left
                Path(args[1]).parent.mkdir(exist_ok=True)
                (Path(args[1]).parent / f".{Path(args[1]).name}.killed.tmp").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(owner, name, wrapped)

if kill:
    owner = {"update": loop_module.Loop, "keep_policy": sampler_worker,
             "save_policy": sampler_worker}[kill["at"]]
    name = {"update": "update_stage"}.get(kill["at"], kill["at"])
    killer(name, getattr(owner, name), owner)
try:
    with process.interrupt_on_termination_signals():
        loop_module.run_loop(LoopConfig(**settings), resume=bool(resume))
except GrpoctlError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(process.exit_status(130))
"""


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start(run: Path, **settings) -> subprocess.Popen:
    args = {**BASE, "run_dir": str(run), **settings}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def loop(run: Path, **settings) -> subprocess.CompletedProcess:
    proc = start(run, **settings)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(run: Path, **settings) -> None:
    result = loop(run, **settings)
    assert result.returncode == 0, result.stderr


def stage_files(run: Path) -> dict[str, bytes]:
    """Every file, byte for byte, but the timings (done, metrics.jsonl), config.json
    (its run_dir) and the checkpoints (compared as weights)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in ("done", "metrics.jsonl", "config.json", ".lock")
            and "checkpoints" not in p.parts}


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


def assert_same_run(a: Path, b: Path, step: int) -> None:
    assert stage_files(a) == stage_files(b)
    wa, wb = weights(a, step), weights(b, step)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    metrics = [[{k: v for k, v in json.loads(line).items() if not is_timing_key(k)}
                for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]
    assert metrics[0] == metrics[1]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def in_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def gone(pid: int, timeout: float = 60) -> bool:
    """`pid` has left the process table (or is a zombie), waiting up to `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)


def sampler_pid(proc: subprocess.Popen) -> int:
    while True:
        for child in children(proc.pid):
            if b"grpoctl.sampler_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp")]


def policy_steps(run: Path, steps: int) -> list[set[int]]:
    return [{json.loads(line)["policy_step"] for line in
             (run / f"step-{s:06d}" / "rollouts.jsonl").read_text().splitlines()}
            for s in range(1, steps + 1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted --async 1 run."""
    run = tmp_path_factory.mktemp("async") / "reference"
    ok(run, async_steps=1)
    return run


def test_async_runs_are_deterministic_and_sampled_by_older_weights(reference, tmp_path):
    ok(tmp_path / "again", async_steps=1)
    assert_same_run(reference, tmp_path / "again", 4)
    # step t sampled by the weights after step t - 2 (the initial model for steps 1, 2)
    assert policy_steps(reference, 4) == [{0}, {0}, {1}, {2}]
    metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [(m["policy_step"], m["policy_lag"]) for m in metrics] == [(0, 0), (0, 1), (1, 1), (2, 1)]
    # the sampler's own time: sampling every step, loading weights when they change
    assert all(m["sampler_sample_s"] > 0 for m in metrics)
    assert ["sampler_load_s" in m for m in metrics] == [False, False, True, True]
    assert all(m["sampler_wait_s"] >= 0 for m in metrics[2:])
    assert any(m["zero_adv_frac"] < 1 for m in metrics[:3])  # the weights moved
    assert metrics[2]["ratio_min"] < 0.99  # π_θ against a policy one update old
    assert all("dual_clip_fraction" in m for m in metrics)  # --clip-ratio-c 3, --async's default
    assert [r["policy"]["step"] for s in (1, 3) for r in map(json.loads, (
        reference / f"step-{s:06d}" / "rollouts.jsonl").read_text().splitlines())][::8] == [0, 1]
    # the weights the next N + 1 steps would sample with (a --resume --steps extension)
    assert sorted(p.name for p in (reference / "sampler").iterdir()) == [
        "policy-step-000003.safetensors", "policy-step-000004.safetensors"]
    assert not temporaries(reference)
    handed = load_file(reference / "sampler" / "policy-step-000004.safetensors")
    final = weights(reference, 4)  # the weights handed over are the trained ones, exactly
    common = handed.keys() & final.keys()  # tied embeddings: stored under one name or the other
    assert len(common) >= len(final) - 1 and all(torch.equal(handed[k], final[k]) for k in common)


def test_async_with_is_cap_is_decoupled_ppo(tmp_path):
    ok(tmp_path / "run", async_steps=1, is_cap=2.0, steps=3, save_every=3)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["old_logprobs"] == "trainer"
    assert all("is_weight_mean" in m for m in metrics) and metrics[2]["policy_lag"] == 1


SCORE_CMD = (f"{sys.executable} -c \"import sys, json; [print(json.dumps(dict(r, reward="
             f"float(len(r['completion']) % 2)))) for r in map(json.loads, sys.stdin)]\"")


def test_async_with_lora_eval_and_a_score_command(tmp_path):
    run = tmp_path / "run"
    ok(run, async_steps=1, steps=3, save_every=3, lora_r=4, score_cmd=SCORE_CMD,
       eval_prompts="arith:test", eval_limit=2, eval_samples=2, eval_every=2)
    assert policy_steps(run, 3) == [{0}, {0}, {1}]
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] \
        == [0, 2, 3]
    assert (run / "checkpoints" / "step-000003" / "adapter_config.json").is_file()


def eval_figures(run: Path) -> list[tuple]:
    return [(e["step"], e["mean_at_k"], e["pass_at_k"]) for e in
            map(json.loads, (run / "eval.jsonl").read_text().splitlines())]


def test_async_evaluations_are_sampled_by_the_weights_of_their_step(tmp_path):
    """The sampler process evaluates (with its backend): at step 0 what a run without
    --async finds, at step 3 what the checkpoint of step 3 samples in this process."""
    from grpoctl.display import NullDisplay
    from grpoctl.evaluate import evaluate_records
    from grpoctl.loop import Loop

    evals = {"eval_prompts": "arith:test", "eval_limit": 6, "eval_samples": 2, "eval_every": 3,
             "steps": 3, "save_every": 3}
    ok(tmp_path / "async", async_steps=1, **evals)
    ok(tmp_path / "sync", **{**evals, "steps": 1, "save_every": 1})
    got = eval_figures(tmp_path / "async")
    assert [e[0] for e in got] == [0, 3] and got[0] == eval_figures(tmp_path / "sync")[0]

    cfg = LoopConfig(**json.loads((tmp_path / "async" / "config.json").read_text()))
    here = Loop(cfg, tmp_path / "async", NullDisplay())
    here.load(3)
    records = here.sample_evaluation(3, here.load_prompts(cfg.eval_prompts, cfg.eval_limit))
    _, summary = evaluate_records(records, k=2)
    assert got[1] == (3, summary["mean_at_k"], summary["pass_at_k"])
    # the weights of the last N + 1 steps, and no copy the evaluations made
    assert sorted(p.name for p in (tmp_path / "async" / "sampler").iterdir()) == [
        "policy-step-000002.safetensors", "policy-step-000003.safetensors"]


def test_sampler_device_gives_the_sampler_one_gpu(monkeypatch):
    from grpoctl.sampler_worker import gpu_env, sampler_device

    assert sampler_device(None, "cuda:1") == "cuda:1" and sampler_device("cpu", "cuda") == "cpu"
    assert sampler_device("cuda:1", "cuda:0") == "cuda" and gpu_env("cpu") == gpu_env(None) == {}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert gpu_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "6"}
    with pytest.raises(GrpoctlError, match="--sampler-device cuda:2: CUDA_VISIBLE_DEVICES=4,6"):
        gpu_env("cuda:2")


def test_sync_records_carry_policy_step_and_no_lag(tmp_path):
    ok(tmp_path / "sync", steps=2)
    assert policy_steps(tmp_path / "sync", 2) == [{0}, {1}]
    metrics = json.loads((tmp_path / "sync" / "metrics.jsonl").read_text().splitlines()[0])
    assert "policy_lag" not in metrics and not (tmp_path / "sync" / "sampler").exists()


def test_async_2_samples_by_the_weights_three_steps_back(tmp_path):
    ok(tmp_path / "a2", async_steps=2, steps=5, save_every=5)
    assert policy_steps(tmp_path / "a2", 5) == [{0}, {0}, {0}, {1}, {2}]


@pytest.mark.parametrize("kill", [
    {"at": "update", "step": 2, "after": "step-000003/rollouts.jsonl"},  # sampler ahead
    {"at": "update", "step": 3},  # save_every 2: resumes from step 2's checkpoint
    {"at": "keep_policy", "step": 3},  # updated, its weights not yet handed over
    {"at": "save_policy", "step": 2},  # inside the weights' write
])
def test_sigkill_then_resume_gives_the_uninterrupted_run(reference, tmp_path, kill):
    run = tmp_path / "run"
    kill = dict(kill, after=str(run / kill["after"]) if "after" in kill else None)
    pidfile = tmp_path / "sampler.pid"
    result = loop(run, async_steps=1, kill=kill, pidfile=str(pidfile))
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert gone(int(pidfile.read_text()))  # the sampler died with the trainer
    ok(run, async_steps=1, resume=True)
    assert_same_run(reference, run, 4)
    assert not temporaries(run)


REFILL = {"async_steps": 1, "refill": True, "steps": 3, "save_every": 3}


def test_async_with_refill_draws_each_refill_with_the_steps_weights(tmp_path):
    """--refill --async 1: the next step's prompts follow this step's refills, each
    attempt sampled by the weights of the step's own rollouts; a kill while the sampler
    is ahead, then --resume, gives the uninterrupted run."""
    ok(tmp_path / "a", **REFILL)
    refills = sorted((tmp_path / "a").glob("step-*/refill-*/rollouts.jsonl"))
    assert refills  # most groups tie, so the steps draw refills
    for path in (tmp_path / "a").glob("step-*/**/rollouts.jsonl"):
        step = int(next(p for p in path.parts if p.startswith("step-"))[5:])
        assert {json.loads(line)["policy_step"] for line in path.read_text().splitlines()} \
            == {max(0, step - 2)}, path
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text()
               .splitlines()]
    cursors = [m["prompt_cursor"] for m in metrics]
    assert cursors == sorted(cursors) and cursors[0] > 4  # refills drew from the stream

    run = tmp_path / "b"
    kill = {"at": "update", "step": 2, "after": str(run / "step-000003" / "rollouts.jsonl")}
    assert loop(run, kill=kill, **REFILL).returncode == -signal.SIGKILL
    ok(run, resume=True, **REFILL)
    assert_same_run(tmp_path / "a", run, 3)
    assert not temporaries(run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_both_sides(tmp_path, signum):
    run = tmp_path / "run"
    proc = start(run, async_steps=1, steps=200)
    pid = sampler_pid(proc)
    wait_for(run / "step-000002" / "done", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum if signum != signal.SIGINT else 130, err
    assert gone(pid, timeout=5) and not in_group(pid) and not children(proc.pid)
    assert not temporaries(run)
    ok(run, async_steps=1, steps=4, resume=True)  # and it resumes


def test_a_sampler_that_dies_stops_the_loop_in_one_line(tmp_path):
    run = tmp_path / "run"
    proc = start(run, async_steps=1, steps=200)
    pid = sampler_pid(proc)
    wait_for(run / "step-000001" / "done", proc)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: the --async sampler process") and "SIGKILL" in lines[-1]
    assert not temporaries(run) and not children(proc.pid)


def test_a_failed_write_of_the_weights_stops_the_loop_in_one_line(tmp_path):
    """The weights are written while the trainer goes on (PolicySave): a write that
    fails stops the loop at the next step's hand-over, in one line naming the file."""
    run = tmp_path / "run"
    result = loop(run, async_steps=1, disk_full_at=2)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "policy-step-000002.safetensors" in last \
        and "No space left on device" in last, last
    # found at the hand-over after step 3's update: step 2 done, step 3 not
    assert (run / "step-000002" / "done").is_file()
    assert not (run / "step-000003" / "done").exists()
    assert not temporaries(run)
    ok(run, async_steps=1, resume=True)  # and, the disk freed, it resumes


def test_stray_output_on_fd_1_stays_off_the_answer_pipe():
    """What C code or a child process writes to the sampler's fd 1 goes to stderr: only
    the answers reach the trainer's pipe."""
    code = ("import os, subprocess, sys; from grpoctl.sampler_worker import answer_pipe; "
            "answer = answer_pipe(); print('a print'); sys.stdout.flush(); "
            "os.write(1, b'C code\\n'); subprocess.run(['echo', 'a child']); "
            "answer.write(b'{\"step\": 1}\\n'); answer.flush()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b'{"step": 1}\n'
    assert proc.stderr.split() == b"a print C code a child".split()


@pytest.mark.parametrize("line", [b"some library's banner\n", b"\n", b"42\n", b"{}\n"])
def test_a_line_that_is_not_an_answer_is_one_line_error(line):
    from grpoctl.sampler_worker import SamplerWorker

    worker = SamplerWorker.__new__(SamplerWorker)  # its pipe only: no model, no sampler
    worker.run, worker.pending, worker.answered = Path("/nonexistent"), [("rollouts", 1, 0)], {}
    worker.proc = subprocess.Popen([sys.executable, "-c", f"import sys; "
                                    f"sys.stdout.buffer.write({line!r})"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        with pytest.raises(GrpoctlError) as raised:
            worker.result(("rollouts", 1, 0))
    finally:
        worker.proc.wait()
        worker.proc.stdout.close()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(
        f"the --async sampler process (pid {worker.proc.pid}) failed while sampling the rollouts of step 1: "
        "it wrote a line that is not an answer: ")
    assert repr(line.decode().rstrip("\n")) in message


def test_the_readme_overlap_by_hand(tmp_path):
    """README, "By hand": step 3 sampled by the checkpoint of step 1 while step 2's
    update runs in another process; step 3's update then sees samples one update old."""
    def rollout(model: str, step: int) -> Path:
        out = tmp_path / f"step-{step}"
        out.mkdir()
        run_cli("rollout", "--model", model, "--prompts", "arith:train", "--limit", "4",
                "-G", "2", "--seed", str(step), "--threads", "1", "-o",
                str(out / "rollouts.jsonl"), check=True)
        scored = run_cli("score", str(out / "rollouts.jsonl"), check=True).stdout
        (out / "adv.jsonl").write_bytes(run_cli("advantage", "-", input=scored, check=True).stdout)
        return out / "adv.jsonl"

    def update(adv: Path, policy: str, step: int, *flags: str) -> list[str]:
        return [sys.executable, "-m", "grpoctl", "update", str(adv), "--policy", policy,
                "--out", str(tmp_path / f"ckpt-{step}"), "--lr", "1e-3", "--threads", "1",
                "--metrics", str(tmp_path / f"metrics-{step}.jsonl"), *flags]

    subprocess.run(update(rollout("default", 1), "default", 1), check=True, capture_output=True)
    adv2 = rollout("default", 2)
    training = subprocess.Popen(update(adv2, str(tmp_path / "ckpt-1"), 2),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    adv3 = rollout(str(tmp_path / "ckpt-1"), 3)  # while step 2 trains
    assert training.wait(timeout=300) == 0, training.stderr.read().decode()[-2000:]
    subprocess.run(update(adv3, str(tmp_path / "ckpt-2"), 3, "--clip-ratio-c", "3"),
                   check=True, capture_output=True)
    records = [json.loads(line) for line in adv3.read_text().splitlines()]
    assert {r["policy"]["step"] for r in records} == {1}  # sampled by ckpt-1, trained from ckpt-2
    metrics = json.loads((tmp_path / "metrics-3.jsonl").read_text().splitlines()[-1])
    assert metrics["ratio_min"] < 0.99 or metrics["ratio_max"] > 1.01  # π_θ ≠ the sampler's
    assert "dual_clip_fraction" in metrics


def test_async_dual_clips_stale_ratios_unless_told_otherwise():
    assert LoopConfig(async_steps=1).resolved().clip_ratio_c == 3.0  # verl's clip_ratio_c
    assert LoopConfig(async_steps=2, clip_ratio_c=10.0).resolved().clip_ratio_c == 10.0
    assert LoopConfig().resolved().clip_ratio_c is None  # on-policy: nothing to cap


def test_refused_combinations_name_the_flag():
    for n, settings in ((1, {"backend": "vllm", "vllm_sleep": True}), (2, {"refill": True}),
                        (1, {"rollouts_from": "x"})):
        with pytest.raises(GrpoctlError, match=f"--async {n} cannot run with"):
            LoopConfig(async_steps=n, **settings).resolved()
    for settings in ({"sampler_threads": 1}, {"sampler_device": "cpu"}):
        with pytest.raises(GrpoctlError, match="--sampler-device apply to --async only"):
            LoopConfig(**settings).resolved()
    with pytest.raises(GrpoctlError, match="--sampler-device cuda:x: expected a device"):
        LoopConfig(async_steps=1, sampler_device="cuda:x").resolved()
    with pytest.raises(GrpoctlError, match="--async"):
        LoopConfig(async_steps=-1).resolved()
    with pytest.raises(GrpoctlError, match="--old-logprobs trainer needs --is-cap"):
        LoopConfig(async_steps=1, mini_batches=2).resolved()
