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
from conftest import run_cli
from safetensors.torch import load_file

from grpoctl.refill import contrastive_prompts, fresh_prompts, refill_size

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


def test_fresh_prompts_skip_the_used_ones_and_repeat_for_a_seed():
    prompts = [{"prompt_id": str(i)} for i in range(20)]
    used = {str(i) for i in range(0, 20, 2)}
    drawn = fresh_prompts(prompts, used, 4, seed=7)
    assert len(drawn) == 4 and not {p["prompt_id"] for p in drawn} & used
    assert drawn == fresh_prompts(prompts, used, 4, seed=7)
    assert len(fresh_prompts(prompts, used, 50, seed=7)) == 10  # only what is left


@pytest.fixture(scope="module")
def refill_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("refill") / "run"
    run_cli("loop", *ARGS, "--run-dir", str(run), check=True)
    return run


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


def test_the_cap_stops_refilling(tmp_path):
    run = tmp_path / "run"
    run_cli("loop", *ARGS, "--steps", "1", "--max-rollouts-per-step", str(P * G),
            "--run-dir", str(run), check=True)
    (m,) = read(run / "metrics.jsonl")
    assert m["refill_attempts"] == 0 and m["rollouts"] == P * G
    assert not list((run / "step-000001").glob("refill-*"))
    assert m["groups_kept"] == len({r["prompt_id"] for r in read(run / "step-000001" / "kept.jsonl")})


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
