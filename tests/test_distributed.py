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

# Equal up to float32 rounding, with tolerances grounded in that rounding. Ranks sum their
# gradients in another order than one process does:
# - Gradients. An entry is a sum over every token of the batch, rounded in each process's
#   own order; its rounding error scales with the size of the terms summed, which the
#   tensor's largest entry stands for, not with the sum itself (an entry that cancels to
#   near 0 keeps the error of its terms: e.g. 3.5e-9 on an entry of 2.4e-6 in a tensor whose
#   largest is 1.2e-2). So δg = GRAD_ULPS ulps of the tensor's largest entry (measured:
#   AdamW's moments differed by up to 14 such ulps over 3 runs of the FSDP loop; 64 leaves
#   room for other batches). The saved moments are compared with that tolerance (or 0.1%).
# - Weights, per AdamW step:
#   * the step lr · r, r = m̂ / (√v̂ + eps): a gradient moved by δg moves r by about δg / √v̂
#     (m̂ by δg, √v̂ by at most δg, and |m̂| <~ √v̂), so by up to 4 δg / √v̂ (a factor 4
#     for the bias corrections), and never by more than 2 (r from one sign to the other):
#     where a gradient entry is tiny against the tensor's largest the whole step may swing
#     (as in one process when only the micro-batch size changes);
#   * ULPS_PER_STEP ulps of the weight itself: a float32 w is stored to within half an ulp,
#     ulp(w) <= eps32 · |w| (1.2e-7 near 1: one ulp there already exceeds a flat 1e-7); a
#     step rounds each weight twice (the decay w · (1 - lr · wd), then w - lr · r), so each
#     run is within 1 ulp of the exact step and two runs within 2.
#   Each step's part comes from the optimizer state saved at that step (an entry whose
#   gradient was near 0 at step 1 may swing its whole step 1, and have a large √v̂ after
#   step 2); a difference left by one step is carried into the next: a comparison after
#   step 2 adds the tolerance of step 1's (`carried`).
EPS32 = torch.finfo(torch.float32).eps
GRAD_ULPS = 64
ULPS_PER_STEP = 2


def torchrun(*args: str, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m grpoctl ARGS` (a free port, one machine)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "grpoctl", *args],
                          capture_output=True, env=env, cwd=cwd, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun grpoctl {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')[-4000:]}")
    return proc


def assert_same_checkpoint(a: Path, b: Path, carried: dict | None = None) -> tuple[float, dict]:
    """Same optimizer state (same names) and weights, within the tolerances above: those of
    the step that wrote a (from a's optimizer state and lr) plus `carried`, the tolerances of
    the steps before it (None: a and b started from the same weights). Returns the largest
    weight difference and the tolerances, to carry into the next step's comparison."""
    x, y = load_file(str(a / "optimizer.safetensors")), load_file(str(b / "optimizer.safetensors"))
    assert sorted(x) == sorted(y)
    for key in x:
        want, got = x[key].float(), y[key].float()
        atol = GRAD_ULPS * EPS32 * want.abs().max().item()  # exp_avg_sq: of the squares
        assert torch.allclose(want, got, rtol=1e-3, atol=atol), \
            (key, (want - got).abs().max().item(), atol)
    lr = json.loads((a / "trainer_state.json").read_text())["metrics"]["lr"]  # no warm-up here
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    worst, tolerances = 0.0, {}
    for name in wa:
        owner = name
        if f"{name}.exp_avg_sq" not in x:  # tied to another parameter, which holds the state
            owner = next(n for n in wa if f"{n}.exp_avg_sq" in x and torch.equal(wa[n], wa[name]))
        steps = x[f"{owner}.step"].item()
        root = (x[f"{owner}.exp_avg_sq"].float() / (1 - 0.999 ** steps)).sqrt()  # √v̂
        grad_rounding = GRAD_ULPS * EPS32 * root.max().item()  # δg (√v̂ ~ |g|)
        swing = torch.clamp(4 * grad_rounding / root, max=2.0)  # of r, this step
        tol = lr * swing + ULPS_PER_STEP * EPS32 * wa[name].float().abs()
        if carried is not None:
            tol = tol + carried[name]
        diff = (wa[name] - wb[name]).abs()
        assert bool((diff <= tol).all()), (name, diff.max().item(), (diff - tol).max().item())
        worst, tolerances[name] = max(worst, diff.max().item()), tol
    return worst, tolerances


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

    worst, step_1 = assert_same_checkpoint(one_process["step-1"], out)
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
    assert_same_checkpoint(one_process["step-2"], adv_file.parent / "ddp-then-single-2",
                           carried=step_1)


def test_an_error_on_every_rank_ends_each_rank_cleanly(adv_file, tiny_model):
    # A token id beyond the vocabulary is found after the ranks joined their process group:
    # a rank prints the one-line error, leaves the group (distributed.left_at_end) and exits
    # with grpoctl's status 2, not aborting at interpreter exit (SIGABRT). torchrun then
    # stops the others (SIGTERM: 143), whether or not they printed the error yet.
    bad = adv_file.parent / "bad-token.jsonl"
    lines = adv_file.read_text().splitlines()
    record = json.loads(lines[0])
    record["completion_ids"][0] = 10**6
    bad.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    proc = torchrun("update", str(bad), "--policy", str(tiny_model), "--out",
                    str(adv_file.parent / "never"), *FLAGS, check=False)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "error: " in err and "token id 1000000 is out of range" in err, err[-3000:]
    assert "exitcode  : 2" in err or "exitcode: 2" in err, err[-3000:]
    assert "terminate called" not in err and "SIGABRT" not in err, err[-3000:]
    assert "exitcode  : -6" not in err and "exitcode: -6" not in err, err[-3000:]
    assert not (adv_file.parent / "never").exists()


def test_fsdp_update_resumes_and_equals_one_process(adv_file, one_process):
    # step 2 on FSDP from the single-process step-1 checkpoint: its optimizer state is
    # loaded as shards, and gathered back into the single-process layout when saved
    out = adv_file.parent / "fsdp-2"
    torchrun("update", str(adv_file), "--policy", str(one_process["step-1"]), "--out", str(out),
             "--fsdp", *FLAGS)

    worst, _ = assert_same_checkpoint(one_process["step-2"], out)  # both from step-1
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

    carried = None  # step 1 starts from the same weights
    for step in ("step-000001", "step-000002"):
        worst, carried = assert_same_checkpoint(single / "checkpoints" / step,
                                                ranks / "checkpoints" / step, carried)
        print(f"FSDP loop, {step}: max weight difference {worst:.2g}")
