"""`update` and `loop` on 2 CPU ranks (torchrun, gloo) against one process.

The distributed runs are real `torchrun --nproc-per-node 2 -m grpoctl ...`
subprocesses; the single-process references run the same library functions in
this process. Equal up to float rounding: the ranks' micro-batches differ from one
process's, so sums are taken in another order (measured at lr 1e-4: weights within
6e-7 after one update step, 2.4e-7 after a 2-step loop; at the lr 1e-5 used here, 10x less).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpoctl.distributed import shard_groups
from grpoctl.logprobs import completion_logprobs
from grpoctl.models import load_policy
from grpoctl.records import write_records
from grpoctl.update import UpdateConfig, run_update

# Weights. Ranks sum their gradients in another order than one process does, so the
# gradients differ by float rounding. AdamW's step is lr · m̂ / (√v̂ + eps): where √v̂ is far
# above eps a rounding difference stays a rounding difference (ATOL below), but where a
# gradient entry is near eps (1e-8) the ratio swings with it, up to the whole step (the
# same happens in one process when only the micro-batch size changes). So the tolerance
# comes from the optimizer state: up to 2 · lr per step where √v̂ < SMALL_GRAD, ATOL elsewhere.
ATOL = 1e-7
SMALL_GRAD = 1e-6  # 100 × AdamW's eps


def torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m grpoctl ARGS` (a free port, one machine)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "grpoctl", *args],
                          capture_output=True, env=env, cwd=cwd, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun grpoctl {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')[-4000:]}")
    return proc


def assert_same_checkpoint(a: Path, b: Path) -> float:
    """Same weights (within the AdamW tolerance above, from a's optimizer state and lr) and
    optimizer state (same names, within 0.1%); returns the largest weight difference."""
    x, y = load_file(str(a / "optimizer.safetensors")), load_file(str(b / "optimizer.safetensors"))
    assert sorted(x) == sorted(y)
    for key in x:
        assert torch.allclose(x[key].float(), y[key].float(), rtol=1e-3, atol=1e-9), key
    lr = json.loads((a / "trainer_state.json").read_text())["metrics"]["lr"]  # no warm-up here
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    worst = 0.0
    for name in wa:
        diff = (wa[name] - wb[name]).abs()
        moment = x.get(f"{name}.exp_avg_sq")
        if moment is None:  # tied to another parameter (its state is under that name)
            tol = torch.full_like(diff, ATOL)
        else:
            steps = x[f"{name}.step"].item()
            root = (moment / (1 - 0.999 ** steps)).sqrt()
            tol = torch.where(root < SMALL_GRAD, torch.full_like(diff, 2 * lr * steps),
                              torch.full_like(diff, ATOL))
        assert bool((diff <= tol).all()), (name, diff.max().item())
        worst = max(worst, diff.max().item())
    return worst


# --- sharding a file by prompt groups ------------------------------------------------


def test_shard_groups_deals_whole_groups_largest_first():
    # Group costs (prompt once + completions): A 10, B 7, C 4, D 3. Largest first to the
    # least loaded rank: A→0 (10), B→1 (7), C→1 (11), D→0 (13).
    def rec(pid, prompt, completion):
        return {"prompt_id": pid, "prompt_ids": [5] * prompt, "completion_ids": [6] * completion}

    records = [rec("C", 2, 1), rec("A", 4, 3), rec("B", 3, 4), rec("A", 4, 3), rec("D", 1, 2),
               rec("C", 2, 1)]
    assert shard_groups(records, 0, 2) == [1, 3, 4]
    assert shard_groups(records, 1, 2) == [0, 2, 5]
    assert shard_groups(records, 0, 1) == list(range(6))
    # a subset of the indices (what update_step forwards), its order kept: A 7 and B 7
    # (a tie: the earlier one first) → 0 and 1, then C 3 → rank 0 (a tie in load: rank 0)
    assert shard_groups(records, 0, 2, indices=[5, 2, 1]) == [5, 1]
    assert shard_groups(records, 1, 2, indices=[5, 2, 1]) == [2]
    # more ranks than groups: some ranks get nothing, every record exactly once
    parts = [shard_groups(records, r, 5) for r in range(5)]
    assert sorted(i for p in parts for i in p) == list(range(6))
    assert sum(1 for p in parts if not p) == 1


# --- one update step ------------------------------------------------------------------


@pytest.fixture(scope="module")
def adv_file(tiny_model, tmp_path_factory) -> Path:
    """5 groups of 3 with uneven lengths, some zero advantages (skipped), logprobs from the
    policy itself, as the advantage stage would write them."""
    rng = random.Random(3)
    records = []
    for q in range(5):
        prompt = [rng.randrange(2, 258) for _ in range(rng.randint(2, 12))]
        for s in range(3):
            completion = [rng.randrange(2, 258) for _ in range(rng.randint(1, 10))]
            records.append({"prompt_id": f"q{q}", "sample": s, "prompt_ids": prompt,
                            "completion_ids": completion,
                            "advantage": rng.choice([-1.0, -0.5, 0.0, 1.0]),
                            "sampling": {"temperature": 1.0, "max_new_tokens": 10}})
    model = load_policy(tiny_model, "float32", "cpu")
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, [r["prompt_ids"] for r in records],
                                          [r["completion_ids"] for r in records])
    for r, lp in zip(records, logprobs):
        r["logprobs"] = [min(x, 0.0) for x in lp.tolist()]
    path = tmp_path_factory.mktemp("dist") / "adv.jsonl"
    write_records(records, str(path))
    return path


FLAGS = ["--lr", "1e-5", "--micro-batch-size", "2", "--max-grad-norm", "0.5"]
CONFIG = UpdateConfig(lr=1e-5, micro_batch_size=2, max_grad_norm=0.5)


@pytest.fixture(scope="module")
def one_process(adv_file, tiny_model) -> dict[str, Path]:
    """Two single-process steps on the file: policy -> step-1 -> step-2."""
    root = adv_file.parent
    run_update(str(adv_file), tiny_model, root / "single-1", CONFIG)
    run_update(str(adv_file), root / "single-1", root / "single-2", CONFIG)
    return {"step-1": root / "single-1", "step-2": root / "single-2"}


def test_ddp_update_equals_one_process(adv_file, tiny_model, one_process):
    out = adv_file.parent / "ddp-1"
    torchrun("update", str(adv_file), "--policy", str(tiny_model), "--out", str(out), *FLAGS)

    worst = assert_same_checkpoint(one_process["step-1"], out)
    print(f"DDP update: max weight difference {worst:.2g}")
    single = json.loads((one_process["step-1"] / "trainer_state.json").read_text())["metrics"]
    ranks = json.loads((out / "trainer_state.json").read_text())["metrics"]
    assert single["grad_norm"] > 0.5  # clipped: with a per-rank norm the weights would differ
    for key in ("loss", "grad_norm", "entropy", "ratio_mean", "ratio_min", "ratio_max"):
        assert ranks[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    for key in ("tokens", "tokens_forwarded", "sequences_forwarded", "clip_fraction"):
        assert ranks[key] == single[key], key  # each rank counted its share; summed
    assert 0 < single["sequences_forwarded"] < 15  # zero advantages were skipped

    # the checkpoint is an ordinary one: one process takes the next step from it
    run_update(str(adv_file), out, adv_file.parent / "ddp-then-single-2", CONFIG)
    assert_same_checkpoint(one_process["step-2"], adv_file.parent / "ddp-then-single-2")


def test_fsdp_update_resumes_and_equals_one_process(adv_file, one_process):
    # step 2 on FSDP from the single-process step-1 checkpoint: its optimizer state is
    # loaded as shards, and gathered back into the single-process layout when saved
    out = adv_file.parent / "fsdp-2"
    torchrun("update", str(adv_file), "--policy", str(one_process["step-1"]), "--out", str(out),
             "--fsdp", *FLAGS)

    worst = assert_same_checkpoint(one_process["step-2"], out)
    print(f"FSDP update: max weight difference {worst:.2g}")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["optimizer"]["resumed"] is True
    # clipping hides the gradient's scale from the weights: the norm shows a sum (not a mean)
    single = json.loads((one_process["step-2"] / "trainer_state.json").read_text())["metrics"]
    assert single["grad_norm"] > 0.5
    for key in ("loss", "grad_norm", "entropy", "ratio_max"):
        assert state["metrics"][key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    assert (out / "config.json").read_text() == (one_process["step-2"] / "config.json").read_text()
    assert load_policy(out, "float32", "cpu") is not None  # transformers loads it as is


# --- the loop -----------------------------------------------------------------------------


REWARD = """
def spread(completion, answer, record):
    # a deterministic reward that varies within groups, so the advantages are not all 0
    return (sum(record["completion_ids"]) % 5) / 4
"""


def test_fsdp_loop_equals_one_process(tiny_model, tmp_path):
    from grpoctl.loop import LoopConfig, run_loop

    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    settings = dict(model=str(tiny_model), prompts="arith:train", limit=8, prompts_per_step=4,
                    steps=2, group_size=2, max_new_tokens=4, eval_prompts=None,
                    rewards=[f"{reward}:spread"], score_workers=1, lr=1e-5, micro_batch_size=2,
                    save_every=1, threads=1)
    single = run_loop(LoopConfig(**settings, run_dir=str(tmp_path / "single")))
    ranks = tmp_path / "ranks"
    torchrun("loop", "--model", str(tiny_model), "--prompts", "arith:train", "--limit", "8",
             "--prompts-per-step", "4", "--steps", "2", "-G", "2", "--max-new-tokens", "4",
             "--eval-prompts", "none", "--reward", f"{reward}:spread", "--workers", "1",
             "--lr", "1e-5", "--micro-batch-size", "2", "--save-every", "1", "--threads", "1",
             "--run-dir", str(ranks), "--fsdp", "-q")

    # the same files, each record the same and in the same order (logprobs: float rounding
    # of other batches); only rank 0 wrote (one metrics line per step)
    files = sorted(str(p.relative_to(single)) for p in single.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(ranks)) for p in ranks.rglob("*") if p.is_file())
    assert len((ranks / "metrics.jsonl").read_text().splitlines()) == 2
    advantages = []
    for step in ("step-000001", "step-000002"):
        for name in ("rollouts.jsonl", "scored.jsonl", "advantages.jsonl"):
            one = [json.loads(x) for x in (single / step / name).read_text().splitlines()]
            two = [json.loads(x) for x in (ranks / step / name).read_text().splitlines()]
            assert len(one) == len(two) == 8
            for a, b in zip(one, two):
                assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
                assert {**a, "logprobs": None} == {**b, "logprobs": None}
            advantages += [r.get("advantage") for r in one]
    assert any(advantages)  # the updates had something to learn

    for step in ("step-000001", "step-000002"):
        worst = assert_same_checkpoint(single / "checkpoints" / step, ranks / "checkpoints" / step)
        print(f"FSDP loop, {step}: max weight difference {worst:.2g}")
