"""2-GRPO+RS (`loop --refill`, grpoctl/refill.py): tied groups replaced by fresh prompts.

The pure rules are checked on hand-made records; the loop on the embedded model in a
real subprocess: what each step kept, what it discarded, the rollouts it counted, and
that a step cut short in the middle of its refills resumes to the same files and weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import finished_loop, run_cli
from safetensors.torch import load_file

from grpoctl.refill import contrastive_prompts, epoch_order, refill_size, take_prompts

P, G = 8, 2
ARGS = ["--refill", "-G", str(G), "--prompts-per-step", str(P), "--steps", "2",
        "--save-every", "1", "--keep-last", "5", "--eval-prompts", "none", "--seed", "5",
        "--quiet"]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_contrastive_prompts_are_the_groups_whose_rewards_differ_in_order():
    scored = [{"prompt_id": "a", "reward": 1.0}, {"prompt_id": "b", "reward": 0.0},
              {"prompt_id": "a", "reward": 1.0}, {"prompt_id": "c", "reward": 0.0},
              {"prompt_id": "b", "reward": 1.0}, {"prompt_id": "c", "reward": 0.5}]
    assert contrastive_prompts(scored) == ["b", "c"]  # a tied at 1.0


def test_refill_size_divides_by_the_keep_rate_floored_and_bounded_by_the_budget():
    assert refill_size(missing=3, kept=5, sampled=8, budget_groups=100) == math.ceil(3 / (5 / 8))
    assert refill_size(missing=3, kept=0, sampled=8, budget_groups=100) == 12  # rate floor 1/4
    assert refill_size(missing=3, kept=1, sampled=8, budget_groups=100) == 12  # 1/8 -> 1/4
    assert refill_size(missing=3, kept=5, sampled=8, budget_groups=2) == 2
    assert refill_size(missing=3, kept=5, sampled=8, budget_groups=0) == 0


def test_take_prompts_walks_the_epochs_orders_and_passes_over_the_step_s_prompts():
    prompts = [{"prompt_id": str(i)} for i in range(6)]
    e0, e1 = epoch_order(6, 7, 0), epoch_order(6, 7, 1)
    ids = lambda taken: [p["prompt_id"] for p in taken]  # noqa: E731
    taken, cursor = take_prompts(prompts, 0, 4, seed=7)
    assert ids(taken) == [str(i) for i in e0[:4]] and cursor == 4
    # Past the epoch's end: epoch 1's order, minus the prompts the step already holds
    # A step holding epoch 0's 5th prompt goes on past the epoch's end into epoch 1's
    # order, passing over the prompts it holds (their positions consumed)
    held = {str(e0[4])}
    more, after = take_prompts(prompts, 5, 3, seed=7, held=held)
    stream = [str(i) for i in e0[5:] + e1]
    expected = [p for p in stream if p not in held and p != str(e0[5])][:2]
    assert ids(more) == [str(e0[5])] + expected
    assert after == 5 + stream.index(expected[-1]) + 1
    assert len(set(ids(more)) | held) == 4  # no prompt twice in the step
    # Every prompt in the step: nothing left to take
    assert take_prompts(prompts, 6, 3, seed=7, held={str(i) for i in range(6)}) == ([], 6)


def test_the_stream_starts_with_the_batch_of_a_run_without_refill():
    from grpoctl.loop import prompts_for_step, refill_batch
    prompts = [{"prompt_id": str(i)} for i in range(10)]
    assert refill_batch(prompts, 0, 4, 3)[0] == prompts_for_step(prompts, 1, 4, 3)


@pytest.fixture(scope="module")
def refill_run(tmp_path_factory) -> Path:
    return finished_loop(tmp_path_factory, "refill", *ARGS)


def test_each_step_trains_on_prompts_per_step_contrastive_groups(refill_run):
    metrics = read(refill_run / "metrics.jsonl")
    for m in metrics:
        d = refill_run / f"step-{m['step']:06d}"
        attempts = [d] + sorted(d.glob("refill-*"))
        assert len(attempts) == m["refill_attempts"] + 1
        rollouts = [r for a in attempts for r in read(a / "rollouts.jsonl")]
        scored = [r for a in attempts for r in read(a / "scored.jsonl")]
        # every rollout sampled counts, the discarded ones too
        consumed = len(rollouts)
        assert [r["prompt_id"] for r in scored] == [r["prompt_id"] for r in rollouts]
        # no prompt twice in one step, so no group is doubled
        assert m["groups_sampled"] == len({r["prompt_id"] for r in rollouts}) == consumed // G
        kept, advantages = read(d / "kept.jsonl"), read(d / "advantages.jsonl")
        groups: dict[str, set] = {}
        for r in kept:
            groups.setdefault(r["prompt_id"], set()).add(r["reward"])
        assert len(groups) == m["groups_kept"] == P  # the step is full (the cap is far)
        assert all(len(rewards) > 1 for rewards in groups.values())
        assert [(r["prompt_id"], r["sample"]) for r in advantages] == \
            [(r["prompt_id"], r["sample"]) for r in kept]
        assert all(abs(abs(a["advantage"]) - 1) < 1e-5 for a in advantages)  # G=2: +-1
        assert m["trained_sequences"] == P * G
        assert m["discard_rate"] == pytest.approx(1 - P / m["groups_sampled"])
    assert [m["rollouts"] for m in metrics] == \
        [sum(m2["groups_sampled"] * G for m2 in metrics[:i + 1]) for i in range(len(metrics))]
    assert any(m["refill_attempts"] > 0 for m in metrics)  # the embedded model ties often


def test_the_cap_stops_refilling_and_a_short_step_says_so(tmp_path):
    run = tmp_path / "run"
    result = run_cli("loop", *ARGS, "--steps", "1", "--max-rollouts-per-step", str(P * G + G),
                     "--run-dir", str(run), check=True)
    (m,) = read(run / "metrics.jsonl")
    assert m["refill_attempts"] == 1 and m["rollouts"] == P * G + G  # room for one group
    assert m["groups_kept"] == len({r["prompt_id"] for r in read(run / "step-000001" / "kept.jsonl")})
    assert m["groups_kept"] < P and m["refill_short"] == P - m["groups_kept"]
    assert f"kept {m['groups_kept']} of {P}" in result.stderr.decode()  # also with --quiet


def test_a_cap_with_no_room_to_refill_is_refused_before_anything_is_written(tmp_path):
    for flags in (["--max-rollouts-per-step", str(P * G)], []):
        run = tmp_path / "run"
        extra = ["-G", "16", "--max-rollouts-per-step", str(P * 16)] if not flags else flags
        result = run_cli("loop", *ARGS, *extra, "--run-dir", str(run))
        err = result.stderr.decode().strip()
        assert result.returncode == 2 and len(err.splitlines()) == 1, err
        assert "leaves no room" in err and not run.exists()
    # The default cap leaves room at any G: -G 16 with the default refills (config.refill_cap)
    from grpoctl.config import LoopConfig
    cfg = LoopConfig(group_size=16, prompts_per_step=P, refill=True).resolved()
    from grpoctl.config import refill_cap
    assert refill_cap(cfg) == 8 * 16 * P


def test_one_epoch_of_refill_draws_each_prompt_once(tmp_path):
    """The issue's run: 32 prompts, 8 a step, --epochs 1: every prompt once, then stop."""
    run = tmp_path / "run"
    run_cli("loop", "-G", "2", "--refill", "--prompts", "arith:train", "--limit", "32",
            "--prompts-per-step", "8", "--epochs", "1", "--max-new-tokens", "16",
            "--eval-prompts", "none", "--seed", "5", "--quiet", "--run-dir", str(run), check=True)
    drawn = [json.loads(line)["prompt_id"] for f in sorted(run.rglob("rollouts.jsonl"))
             for line in f.read_text().splitlines() if json.loads(line)["sample"] == 0]
    assert len(drawn) == len(set(drawn)) == 32
    metrics = read(run / "metrics.jsonl")
    assert metrics[-1]["prompt_cursor"] == 32 and metrics[-1]["epochs_consumed"] == 1.0
    assert all(m["prompt_cursor"] < 32 for m in metrics[:-1])


def test_a_step_whose_groups_all_tie_replays_after_a_kill(tmp_path):
    """Every group tied (a reward of 0 for all): kept.jsonl and advantages.jsonl are
    empty files, and --resume replays the step instead of refusing it."""
    reward = tmp_path / "zero.py"
    reward.write_text("def zero(completion, **kwargs):\n    return 0.0\n")
    run = tmp_path / "run"
    flags = [*ARGS, "--steps", "2", "--reward", f"{reward}:zero", "--save-every", "5"]
    run_cli("loop", *flags, "--run-dir", str(run), check=True)
    step1 = run / "step-000001"
    assert (step1 / "advantages.jsonl").read_bytes() == b""
    m = read(run / "metrics.jsonl")[0]
    assert m["groups_kept"] == 0 and m["trained_sequences"] == 0 and m["refill_short"] == P
    # killed after step 1: no checkpoint of step 1, so --resume replays its update
    (run / "step-000002" / "done").unlink()
    run_cli("loop", "--resume", "--run-dir", str(run), check=True)
    assert len(read(run / "metrics.jsonl")) == 2


def test_a_cut_refill_attempt_file_is_made_again_on_resume(refill_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(refill_run, run)
    cut = run / "step-000002"
    for name in ("kept.jsonl", "advantages.jsonl", "done"):
        (cut / name).unlink()
    shutil.rmtree(run / "checkpoints" / "step-000002")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")
    rollouts = cut / "refill-01" / "rollouts.jsonl"
    text = rollouts.read_text()
    rollouts.write_text(text[: len(text) // 2])  # cut mid-line, as a copy by hand could
    scored = cut / "refill-01" / "scored.jsonl"
    scored.write_text("\n".join(scored.read_text().splitlines()[:-2]) + "\n")
    run_cli("loop", "--resume", "--run-dir", str(run), check=True)
    step2 = refill_run / "step-000002"
    for path in sorted(p for p in step2.rglob("*") if p.is_file() and p.name != "done"):
        assert path.read_bytes() == (cut / path.relative_to(step2)).read_bytes(), path


def test_a_step_cut_short_between_refills_resumes_to_the_same_files_and_weights(refill_run,
                                                                                tmp_path):
    step2 = refill_run / "step-000002"
    assert (step2 / "refill-01").is_dir()  # seed 5: step 2 needs refills (deterministic)
    run = tmp_path / "run"
    shutil.copytree(refill_run, run)
    # As if killed after step 2's first refill attempt had been scored.
    cut = run / "step-000002"
    for name in ("kept.jsonl", "advantages.jsonl", "done"):
        (cut / name).unlink()
    for later in sorted(cut.glob("refill-*"))[1:]:
        shutil.rmtree(later)
    shutil.rmtree(run / "checkpoints" / "step-000002")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")

    run_cli("loop", "--resume", "--run-dir", str(run), check=True)
    for path in sorted(p for p in step2.rglob("*") if p.is_file() and p.name != "done"):
        assert path.read_bytes() == (cut / path.relative_to(step2)).read_bytes(), path
    a = load_file(refill_run / "checkpoints" / "step-000002" / "model.safetensors")
    b = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_refill_refuses_reused_rollouts(tmp_path, refill_run):
    result = run_cli("loop", "--refill", "--rollouts-from", str(refill_run), "--steps", "1",
                     "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "--refill" in result.stderr.decode()
    assert not (tmp_path / "r").exists()


def test_resume_with_fewer_epochs_than_the_finished_steps_consumed_is_refused(tmp_path):
    """A --refill step consumes more than prompts_per_step prompts, so fewer --epochs can
    end the prompt stream before a finished step began while still counting enough steps:
    refused (one line, nothing written or removed), not the finished steps discarded."""
    n, per_step = 48, 4
    run = tmp_path / "run"
    run_cli("loop", "-G", "2", "--refill", "--prompts", "arith:train", "--limit", str(n),
            "--prompts-per-step", str(per_step), "--epochs", "1", "--max-new-tokens", "16",
            "--eval-prompts", "none", "--seed", "5", "--quiet", "--run-dir", str(run), check=True)
    metrics = read(run / "metrics.jsonl")
    finished = len(metrics)
    began = metrics[-2]["prompt_cursor"]  # where the last finished step began
    # seed 5 refills: counted in steps (prompts_per_step each) the stream's end is far
    assert finished >= 2 and -(-began // per_step) >= finished
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    result = run_cli("loop", "--resume", "--run-dir", str(run), "--epochs", repr(began / n))
    err = result.stderr.decode().strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1, err
    assert "--epochs" in err and "not shortened" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    assert all((run / f"step-{s:06d}" / "done").is_file() for s in range(1, finished + 1))
    # One prompt past where the last step began: the run is already over, nothing dropped
    run_cli("loop", "--resume", "--run-dir", str(run), "--epochs", repr((began + 1) / n),
            check=True)
    assert read(run / "metrics.jsonl") == metrics
    assert all((run / f"step-{s:06d}" / "done").is_file() for s in range(1, finished + 1))
