"""The update stage on real tiny models, checked against independent computations."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from grpoctl.errors import GrpoctlError
from grpoctl.logprobs import completion_logprobs
from grpoctl.models import load_policy, make_tiny_model
from grpoctl.padding import MIN_SHARED_PREFIX, common_prefix_length
from conftest import run_cli
from grpoctl.records import write_records
from grpoctl.update import (UpdateConfig, make_optimizer, run_update, split_mini_batches,
                            update_batch, update_step)

VOCAB = 258  # the tiny models' byte-level vocabulary


def make_records(model, n_prompts=3, group=2, seed=0, temperature=1.0, max_new_tokens=16):
    """Records as the advantage stage would write them: random token ids, logprobs from the
    model itself (so ρ = 1 at the first step), alternating-sign advantages."""
    rng = random.Random(seed)
    records = []
    for q in range(n_prompts):
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 12))]
        for s in range(group):
            completion = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, max_new_tokens))]
            records.append({"prompt_id": f"q{q}", "sample": s, "prompt_ids": prompt,
                            "completion_ids": completion, "advantage": rng.choice([-1.0, 1.0]),
                            "sampling": {"temperature": temperature,
                                         "max_new_tokens": max_new_tokens}})
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, [r["prompt_ids"] for r in records],
                                          [r["completion_ids"] for r in records], temperature)
    for r, lp in zip(records, logprobs):
        r["logprobs"] = [min(x, 0.0) for x in lp.tolist()]
    return records


def naive_logprobs(model, prompt, completion, temperature=1.0):
    """One unpadded sequence, no attention mask, no position ids: log-probs and entropies."""
    logits = model(torch.tensor([prompt + completion])).logits[0].float() / temperature
    scoring = logits[len(prompt) - 1: len(prompt) + len(completion) - 1]  # row j predicts token j+1
    logp_all = torch.log_softmax(scoring, dim=-1)
    logp = logp_all[torch.arange(len(completion)), torch.tensor(completion)]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- (1) log-probs ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_model", "tiny_qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_logprobs_match_unpadded_forward_passes(which, temperature, request):
    model = load_policy(request.getfixturevalue(which))
    rng = random.Random(1)
    # ragged on both sides: short/long prompts with long/short completions
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 9, 4, 15)]
    completions = [[rng.randrange(VOCAB) for _ in range(n)] for n in (12, 1, 7, 3)]
    logprobs, entropies = completion_logprobs(model, prompts, completions, temperature,
                                              with_entropy=True)
    with torch.no_grad():
        for p, c, lp, ent in zip(prompts, completions, logprobs, entropies):
            expected_lp, expected_ent = naive_logprobs(model, p, c, temperature)
            assert lp.shape == (len(c),) and lp.dtype == torch.float32
            assert torch.allclose(lp, expected_lp, atol=1e-5, rtol=0)
            assert torch.allclose(ent, expected_ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["tiny_model", "tiny_qwen2"])
def test_shared_prompt_pass_matches_unpadded_forward_passes(which, request):
    # A GRPO batch: each prompt G times. Each distinct prompt is run once and its cache
    # shared by its completions; every number must still be a plain forward pass's,
    # and so must the gradient (summed over the copies of the shared prompt).
    model = load_policy(request.getfixturevalue(which))
    rng = random.Random(2)
    distinct = [[rng.randrange(VOCAB) for _ in range(n)] for n in (2, 9, 4)]
    prompts = [p for p in distinct for _ in range(3)] + [[7, 8, 9]]  # and one alone
    completions = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 8))] for _ in prompts]
    completions[0] = []  # an empty completion beside non-empty ones
    logprobs, entropies = completion_logprobs(model, prompts, completions, 0.8, with_entropy=True)
    total = sum(lp.sum() for lp in logprobs)
    total.backward()
    shared_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected_total = 0.0
    for p, c, lp, ent in zip(prompts, completions, logprobs, entropies):
        assert lp.shape == (len(c),)
        if c:
            expected_lp, expected_ent = naive_logprobs(model, p, c, 0.8)
            assert torch.allclose(lp, expected_lp, atol=1e-5, rtol=0)
            assert torch.allclose(ent, expected_ent.detach(), atol=1e-5, rtol=0)
            expected_total = expected_total + expected_lp.sum()
    expected_total.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(shared_grad[name], p.grad, atol=1e-5, rtol=1e-4), name
    assert any(p.grad.abs().max() > 1e-3 for p in model.parameters())  # a real gradient
    # A one-token prompt leaves the prompt pass nothing: one plain pass, same numbers.
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, [[5], [5]], completions[1:3])
        for c, lp in zip(completions[1:3], logprobs):
            assert torch.allclose(lp, naive_logprobs(model, [5], c)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["tiny_model", "tiny_qwen2"])
def test_common_prefix_pass_matches_unpadded_forward_passes(which, request):
    # Prompts that open alike (a chat template's system prompt): the common prefix runs
    # once, then each distinct prompt's rest, then the completions: three passes per
    # layer, and still every log-prob and the gradient of a plain forward pass.
    model = load_policy(request.getfixturevalue(which))
    rng = random.Random(3)
    system = [rng.randrange(VOCAB) for _ in range(12)]
    assert len(system) >= MIN_SHARED_PREFIX
    distinct = [system + [rng.randrange(VOCAB) for _ in range(n)] for n in (1, 9, 4)]
    prompts = [p for p in distinct for _ in range(2)]
    completions = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))] for _ in prompts]
    layer_calls = []
    hook = model.model.layers[0].register_forward_hook(
        lambda _m, args, _out: layer_calls.append(args[0].shape[:2]))
    logprobs, _ = completion_logprobs(model, prompts, completions)
    hook.remove()
    # The prompts' last tokens start the completion pass, whose logits score every
    # completion token: the prefix pass takes what the prompts but their last token
    # share (system[:11]: the shortest prompt is system + 1 token), the prompt pass the
    # rest but the last token (longest: system[11] + 8), the completion pass 1 + Tc.
    assert [tuple(s) for s in layer_calls] == [
        (1, len(system) - 1), (3, 9), (6, 1 + max(len(c) for c in completions))]
    sum(lp.sum() for lp in logprobs).backward()
    shared_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected_total = 0.0
    for p, c, lp in zip(prompts, completions, logprobs):
        expected_lp, _ = naive_logprobs(model, p, c)
        assert torch.allclose(lp, expected_lp, atol=1e-5, rtol=0)
        expected_total = expected_total + expected_lp.sum()
    expected_total.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(shared_grad[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_common_prefix_length_leaves_each_sequence_a_token_of_its_own():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # not the whole of one
    assert common_prefix_length([[5, 1], [6, 1]]) == 0
    assert common_prefix_length([[1], [1]]) == 0


def test_target_logprobs_values_entropy_and_gradient_match_log_softmax():
    # The hand-written softmax backward (d log p_t / d z_v = [v = t] - p_v) against
    # autograd through log_softmax, with uneven weights on the tokens.
    from grpoctl.logprobs import _target_logprobs

    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 40) * 4).requires_grad_()
    targets = torch.randint(0, 40, (3, 5))
    weights = torch.randn(3, 5)
    logp, entropy = _target_logprobs(logits, targets, 0.7, with_entropy=True)
    (logp * weights).sum().backward()
    grad = logits.grad.clone()

    logits.grad = None
    logp_all = torch.log_softmax(logits / 0.7, -1)
    expected = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (expected * weights).sum().backward()
    assert torch.allclose(logp, expected, atol=1e-5)
    assert torch.allclose(entropy, -(logp_all.exp() * logp_all).sum(-1), atol=1e-5)
    assert not entropy.requires_grad
    assert torch.allclose(grad, logits.grad, atol=1e-5) and grad.abs().max() > 0.1
    with torch.no_grad():
        again, none = _target_logprobs(logits, targets, 0.7, with_entropy=False)
    assert none is None and torch.equal(again, logp.detach())


def test_logprobs_carry_gradients_and_temperature_zero_means_one(tiny_model):
    model = load_policy(tiny_model)
    lp, ent = completion_logprobs(model, [[5, 6]], [[7, 8]], temperature=0)
    assert ent is None and lp[0].requires_grad
    lp1, _ = completion_logprobs(model, [[5, 6]], [[7, 8]], temperature=1.0)
    assert torch.equal(lp[0], lp1[0])


# --- (2) the step's gradient is the gradient of the written-out objective ------------


def reference_loss(model, records, mode, clip_eps, max_tokens, clip_ratio_c=None):
    """The GRPO loss written plainly, one unpadded sequence at a time (with the dual clip
    min(loss, -C·A) for A < 0 when clip_ratio_c is given)."""
    per_sequence_sums, lengths = [], []
    for r in records:
        logp, _ = naive_logprobs(model, r["prompt_ids"], r["completion_ids"])
        ratio = torch.exp(logp - torch.tensor(r["logprobs"]))
        a = r["advantage"]
        token_loss = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
        if clip_ratio_c is not None and a < 0:
            token_loss = torch.clamp(token_loss, max=-clip_ratio_c * a)
        per_sequence_sums.append(token_loss.sum())
        lengths.append(len(r["completion_ids"]))
    if mode == "token-mean":
        return sum(per_sequence_sums) / sum(lengths)
    if mode == "seq-mean":
        return sum(s / n for s, n in zip(per_sequence_sums, lengths)) / len(records)
    return sum(per_sequence_sums) / (len(records) * max_tokens)  # constant


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean", "constant"])
def test_accumulated_gradient_equals_full_batch_gradient(tiny_model, mode):
    base = load_policy(tiny_model)
    records = make_records(base, n_prompts=4, group=2, seed=2)
    rng = random.Random(3)
    for r in records:  # move π_old away from π_θ so that some tokens are clipped
        r["logprobs"] = [min(x + rng.uniform(-0.4, 0.4), 0.0) for x in r["logprobs"]]
        r["advantage"] = rng.uniform(-2, 2)

    # Plain SGD with lr 1 and no clipping: parameter change = -gradient, exactly readable.
    deltas, clip_fractions = {}, {}
    for micro in (1, len(records)):
        model = load_policy(tiny_model)
        before = params_of(model)
        cfg = UpdateConfig(loss_agg=mode, micro_batch_size=micro, max_grad_norm=0.0)
        metrics = update_step(model, torch.optim.SGD(model.parameters(), lr=1.0), records, cfg)
        deltas[micro] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        clip_fractions[micro] = metrics["clip_fraction"]
    assert 0 < clip_fractions[1] < 1  # the example does exercise both branches
    assert clip_fractions[1] == clip_fractions[len(records)]

    reference = load_policy(tiny_model)
    reference_loss(reference, records, mode, 0.2, max_tokens=16).backward()
    for name, p in reference.named_parameters():
        for micro, delta in deltas.items():
            assert torch.allclose(-delta[name], p.grad, atol=2e-7, rtol=1e-4), (name, micro)
    flat_ref = torch.cat([p.grad.flatten() for p in reference.parameters()])
    flat_step = torch.cat([-deltas[1][n].flatten() for n, _ in reference.named_parameters()])
    assert flat_ref.norm() > 1e-3  # a real gradient, not zeros compared with zeros
    assert (flat_step - flat_ref).norm() / flat_ref.norm() < 1e-4


def test_skipping_zero_advantage_sequences_changes_nothing(tiny_model):
    base = load_policy(tiny_model)
    records = make_records(base, n_prompts=4, group=2, seed=4)
    for r in records[:4]:
        r["advantage"] = 0.0  # two tied pairs
    results = {}
    for skip in (True, False):
        model = load_policy(tiny_model)
        before = params_of(model)
        cfg = UpdateConfig(micro_batch_size=3, max_grad_norm=0.0, skip_zero_advantage=skip)
        metrics = update_step(model, torch.optim.SGD(model.parameters(), lr=1.0), records, cfg)
        results[skip] = ({n: p.detach() - before[n] for n, p in model.named_parameters()}, metrics)
    assert results[True][1]["sequences_forwarded"] == 4
    assert results[False][1]["sequences_forwarded"] == 8
    assert results[True][1]["loss"] == pytest.approx(results[False][1]["loss"], abs=1e-7)
    for name, delta in results[False][0].items():  # SGD, lr 1: delta = -gradient
        assert delta.abs().max() > 0, name
        # Other micro-batches group the prompts differently (one shared prompt pass or
        # not, logprobs.py): equal up to float rounding, ~1e-7 on entries of ~0.1.
        assert torch.allclose(results[True][0][name], delta, atol=1e-7, rtol=1e-5), name


def test_all_zero_advantages_still_step_the_optimizer(tiny_model):
    # AdamW's momentum and weight decay keep moving the weights even with a zero gradient,
    # exactly as they would have had the (zero) gradient been computed.
    base = load_policy(tiny_model)
    records = make_records(base, seed=5)
    cfg = UpdateConfig(lr=1e-3, weight_decay=0.1)
    model = load_policy(tiny_model)
    optimizer = make_optimizer(model, cfg)
    before = params_of(model)
    metrics = update_step(model, optimizer, [dict(r, advantage=0.0) for r in records], cfg)
    assert metrics["sequences_forwarded"] == 0 and metrics["grad_norm"] == 0.0
    name, p = next(iter(model.named_parameters()))
    assert torch.allclose(p, before[name] * (1 - 1e-3 * 0.1))  # decoupled decay only


# --- (3) direction of the update ------------------------------------------------------


def test_positive_advantage_raises_and_negative_lowers_log_prob(tiny_model):
    model = load_policy(tiny_model)
    records = make_records(model, n_prompts=1, group=2, seed=6)
    records[0]["advantage"], records[1]["advantage"] = 1.0, -1.0
    cfg = UpdateConfig(lr=1e-3)
    metrics = update_step(model, make_optimizer(model, cfg), records, cfg)
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-5)  # logprobs came from this policy
    with torch.no_grad():
        after, _ = completion_logprobs(model, [r["prompt_ids"] for r in records],
                                       [r["completion_ids"] for r in records])
    assert after[0].sum().item() > sum(records[0]["logprobs"]) + 1e-3
    assert after[1].sum().item() < sum(records[1]["logprobs"]) - 1e-3


def test_records_temperature_is_used(tiny_model):
    model = load_policy(tiny_model)
    records = make_records(model, seed=7, temperature=0.8)
    cfg = UpdateConfig(lr=0.0)
    same = update_step(model, make_optimizer(model, cfg), records, cfg)
    assert abs(same["ratio_max"] - 1) < 1e-5 and abs(same["ratio_min"] - 1) < 1e-5
    forced = UpdateConfig(lr=0.0, temperature=1.0)
    other = update_step(model, make_optimizer(model, forced), records, forced)
    assert abs(other["ratio_max"] - 1) > 1e-3


def test_kl_to_the_reference_policy(tiny_model):
    model, reference = load_policy(tiny_model), load_policy(tiny_model)
    records = make_records(model, seed=8)
    with pytest.raises(GrpoctlError, match="--ref"):
        update_step(model, make_optimizer(model, UpdateConfig()), records, UpdateConfig(kl_coef=0.1))
    cfg = UpdateConfig(lr=1e-2, kl_coef=0.1, ref=str(tiny_model))  # the reference: its path
    optimizer = make_optimizer(model, cfg)
    first = update_step(model, optimizer, records, cfg, ref_model=reference)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    assert first["loss"] == pytest.approx(first["policy_loss"], abs=1e-7)
    second = update_step(model, optimizer, records, cfg, ref_model=reference)
    assert second["kl"] > 1e-6
    assert second["loss"] == pytest.approx(second["policy_loss"] + 0.1 * second["kl"], rel=1e-6)


def test_kl_metric_with_reference_and_no_penalty_covers_every_sequence(tiny_model, tmp_path):
    # --ref with --kl-coef 0: zero-advantage sequences have no policy gradient, but their KL
    # counts. Written out: token-mean k3 over every completion token of the file.
    model = load_policy(tiny_model)
    reference = load_policy(make_tiny_model(tmp_path / "ref", arch="llama", seed=7))
    records = make_records(model, n_prompts=4, group=2, seed=24)
    for r in records[:4]:
        r["advantage"] = 0.0  # two tied pairs
    cfg = UpdateConfig(lr=0.0)
    metrics = update_step(model, make_optimizer(model, cfg), records, cfg, ref_model=reference)

    k3_sum, tokens = 0.0, 0
    with torch.no_grad():
        for r in records:
            logp, _ = naive_logprobs(model, r["prompt_ids"], r["completion_ids"])
            ref_logp, _ = naive_logprobs(reference, r["prompt_ids"], r["completion_ids"])
            log_ratio = ref_logp - logp
            k3_sum += (torch.exp(log_ratio) - log_ratio - 1).sum().item()
            tokens += len(r["completion_ids"])
    assert metrics["sequences_forwarded"] == 8
    assert metrics["kl"] == pytest.approx(k3_sum / tokens, rel=1e-5)
    assert metrics["kl"] > 1e-3  # two different random models
    assert metrics["loss"] == metrics["policy_loss"]  # β = 0: measured only


# --- (4) resuming from a checkpoint is bit-exact -----------------------------------------


def test_two_run_updates_equal_two_steps_in_one_process(tiny_model, tmp_path):
    base = load_policy(tiny_model)
    first, second = make_records(base, seed=9), make_records(base, seed=10)
    write_records(first, str(tmp_path / "adv1.jsonl"))
    write_records(second, str(tmp_path / "adv2.jsonl"))
    cfg = UpdateConfig(lr=1e-3, weight_decay=0.01, micro_batch_size=4)

    model = load_policy(tiny_model)
    optimizer = make_optimizer(model, cfg)
    update_step(model, optimizer, first, cfg)
    update_step(model, optimizer, second, cfg)

    metrics_file = tmp_path / "metrics.jsonl"
    run_update(str(tmp_path / "adv1.jsonl"), tiny_model, tmp_path / "A", cfg,
               metrics_path=str(metrics_file))
    m2 = run_update(str(tmp_path / "adv2.jsonl"), tmp_path / "A", tmp_path / "B", cfg,
                    metrics_path=str(metrics_file))
    assert m2["step"] == 2

    resumed = load_policy(tmp_path / "B")
    in_process = dict(model.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, in_process[name]), name
    resumed_opt = make_optimizer(resumed, cfg)
    from grpoctl.checkpoint import load_optimizer_state, read_trainer_state
    assert load_optimizer_state(resumed_opt, resumed, tmp_path / "B")
    for (name, p), q in zip(resumed.named_parameters(), model.parameters()):
        for key, value in optimizer.state[q].items():
            assert torch.equal(resumed_opt.state[p][key], value), (name, key)

    state = read_trainer_state(tmp_path / "B")
    assert state["step"] == 2 and state["optimizer"]["resumed"] is True
    assert state["update"]["lr"] == 1e-3 and state["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    lines = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[1] == m2


def test_warmup_scales_the_learning_rate_linearly(tiny_model, tmp_path):
    from grpoctl.update import scheduled_lr

    cfg = UpdateConfig(lr=1e-4, warmup_steps=4)
    # written out: step 1 at 0 (verl's counter starts at 0), steps 2..5 climb by lr/4,
    # then the lr holds
    assert [scheduled_lr(cfg, s) for s in (1, 2, 3, 4, 5, 6, 9)] == \
        pytest.approx([0.0, 2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4], rel=1e-12)
    assert scheduled_lr(cfg, 1) == 0.0
    assert scheduled_lr(UpdateConfig(lr=1e-4), 1) == 1e-4  # 0 = no warm-up

    # Through the stage: two chained `update`s report (and use) the step's lr, and the
    # second resumes from the first's step count.
    base = load_policy(tiny_model)
    for i in (1, 2):
        write_records(make_records(base, seed=20 + i), str(tmp_path / f"adv{i}.jsonl"))
    cfg = UpdateConfig(lr=1e-3, warmup_steps=4)
    m1 = run_update(str(tmp_path / "adv1.jsonl"), tiny_model, tmp_path / "A", cfg)
    m2 = run_update(str(tmp_path / "adv2.jsonl"), tmp_path / "A", tmp_path / "B", cfg)
    assert (m1["lr"], m2["lr"]) == (0.0, pytest.approx(2.5e-4))
    # Step 1 at lr 0 leaves every weight as it was (AdamW: no step, no decay), but the
    # optimizer has counted it and holds its moments, as in verl.
    original = dict(load_policy(tiny_model).named_parameters())
    assert all(torch.equal(p, original[n]) for n, p in load_policy(tmp_path / "A").named_parameters())
    from grpoctl.checkpoint import load_optimizer_state
    first = load_policy(tmp_path / "A")
    optimizer = make_optimizer(first, cfg)
    assert load_optimizer_state(optimizer, first, tmp_path / "A")
    assert all(optimizer.state[p]["step"].item() == 1 for p in first.parameters())

    # SGD makes the lr visible in the weights: step 2 at lr/4 moves them a quarter as far.
    records = make_records(base, seed=5)
    moved = []
    for c, step in ((UpdateConfig(lr=1.0, max_grad_norm=0), 1),
                    (UpdateConfig(lr=1.0, warmup_steps=4, max_grad_norm=0), 2)):
        model = load_policy(tiny_model)
        before = params_of(model)
        update_step(model, torch.optim.SGD(model.parameters(), lr=1.0), records, c, step=step)
        moved.append(torch.cat([(p.detach() - before[n]).flatten()
                                for n, p in model.named_parameters()]))
    assert moved[0].abs().max() > 1e-3
    assert torch.allclose(moved[1], moved[0] / 4, atol=1e-7)


# --- (5) non-finite steps are refused -------------------------------------------------------


def test_non_finite_loss_is_refused_and_nothing_changes(tiny_model, tmp_path):
    model = load_policy(tiny_model)
    records = make_records(model, seed=11)
    # π_old said this token had probability e^-200: ρ = e^20 after the log-ratio clamp
    # (losses.importance_ratio), and with A = -1e38 the loss -min(ρA, clip(ρ)A) = e^20 ·
    # 1e38 overflows fp32 to +inf.
    records[2]["logprobs"][0] = -200.0
    records[2]["advantage"] = -1e38
    cfg = UpdateConfig(lr=1e-3)
    optimizer = make_optimizer(model, cfg)
    before = params_of(model)
    with pytest.raises(GrpoctlError, match=r"loss is not finite.*'q1'/0"):
        update_step(model, optimizer, records, cfg)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())

    write_records(records, str(tmp_path / "adv.jsonl"))
    with pytest.raises(GrpoctlError, match="update refused"):
        run_update(str(tmp_path / "adv.jsonl"), tiny_model, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_non_finite_gradient_norm_is_refused(tiny_model):
    model = load_policy(tiny_model)
    records = make_records(model, seed=12)
    for r in records:  # finite loss (about 1e37), but squared gradients overflow fp32
        r["advantage"] = 1e37
    cfg = UpdateConfig(lr=1e-3)
    optimizer = make_optimizer(model, cfg)
    before = params_of(model)
    with pytest.raises(GrpoctlError, match="gradient norm is inf"):
        update_step(model, optimizer, records, cfg)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not optimizer.state


# --- (6) ids that do not fit the model ----------------------------------------------------------


def test_token_id_out_of_range_names_the_line(tiny_model, tmp_path):
    records = make_records(load_policy(tiny_model), seed=13)
    records[2]["completion_ids"][-1] = VOCAB  # one past the last id
    path = tmp_path / "adv.jsonl"
    lines = [json.dumps(r) for r in records]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line 2
    with pytest.raises(GrpoctlError, match=rf"{path}:4: field 'completion_ids'.*{VOCAB}"):
        run_update(str(path), tiny_model, tmp_path / "out", UpdateConfig())
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_model_is_refused(tiny_model, tmp_path):
    small = make_tiny_model(tmp_path / "small", vocab_size=200)  # byte tokenizer has 258
    records = make_records(load_policy(tiny_model), seed=14)
    write_records(records, str(tmp_path / "adv.jsonl"))
    with pytest.raises(GrpoctlError, match="tokenizer has 258 tokens"):
        run_update(str(tmp_path / "adv.jsonl"), small, tmp_path / "out", UpdateConfig())


def test_constant_aggregation_needs_a_budget(tiny_model, tmp_path):
    records = make_records(load_policy(tiny_model), seed=15)
    for r in records:
        del r["sampling"]
    write_records(records, str(tmp_path / "adv.jsonl"))
    with pytest.raises(GrpoctlError, match="--max-tokens"):
        run_update(str(tmp_path / "adv.jsonl"), tiny_model, tmp_path / "out",
                   UpdateConfig(loss_agg="constant"))


# --- (7) the saved directory --------------------------------------------------------------------


def test_saved_checkpoint_loads_with_transformers_and_holds_no_pickle(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    records = make_records(load_policy(tiny_qwen2), seed=16)
    write_records(records, str(tmp_path / "adv.jsonl"))
    cfg = UpdateConfig(lr=1e-3, clip_eps_high=0.28, loss_agg="seq-mean")
    metrics = run_update(str(tmp_path / "adv.jsonl"), tiny_qwen2, tmp_path / "out", cfg)
    for key in ("loss", "policy_loss", "clip_fraction", "entropy", "grad_norm", "tokens",
                "sequences", "seconds"):
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), key
    assert metrics["tokens"] == sum(len(r["completion_ids"]) for r in records)

    out = Path(tmp_path / "out")
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.safetensors",
            "trainer_state.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    for f in out.glob("*.safetensors"):  # safetensors: 8-byte header length, then a JSON header
        raw = f.read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        json.loads(raw[8:8 + header_len])

    loaded = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    reloaded = load_policy(out)
    for (name, p), (_, q) in zip(loaded.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p, q), name
    original = dict(load_policy(tiny_qwen2).named_parameters())
    assert any(not torch.equal(p, original[n]) for n, p in loaded.named_parameters())
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["update"]["clip_eps_high"] == 0.28
    assert state["update"]["temperature"] == 1.0 and state["metrics"]["step"] == 1


def test_update_in_place(tiny_model, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    records = make_records(load_policy(tiny_model), seed=17)
    write_records(records, str(tmp_path / "adv.jsonl"))
    cfg = UpdateConfig(lr=1e-3)
    # a model directory grpoctl did not write is never replaced, not even by its own update
    with pytest.raises(GrpoctlError, match="not a grpoctl checkpoint"):
        run_update(str(tmp_path / "adv.jsonl"), base, base, cfg)
    ck = tmp_path / "ck"
    run_update(str(tmp_path / "adv.jsonl"), base, ck, cfg)
    metrics = run_update(str(tmp_path / "adv.jsonl"), ck, ck, cfg)  # a checkpoint: in place
    assert metrics["step"] == 2 and metrics["ratio_max"] != pytest.approx(1.0, abs=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adv.jsonl", "base", "ck"]


# --- (8) several optimizer steps per rollout batch (mini-batches, update epochs) -----------

DEFAULT_KEYS = ["loss", "policy_loss", "kl", "clip_fraction", "entropy", "ratio_mean",
                "ratio_min", "ratio_max", "logp_mismatch_max", "is_weight_mean",
                "is_capped_fraction", "grad_norm", "lr", "tokens", "tokens_forwarded",
                "sequences", "sequences_forwarded", "seconds"]


def optimizer_state(optimizer, model) -> list[dict]:
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]


@pytest.mark.parametrize("settings", [
    {},
    {"is_cap": 2.0, "loss_agg": "seq-mean", "micro_batch_size": 3},
    {"kl_coef": 0.05, "ref": "default", "warmup_steps": 2},
    {"clip_ratio_c": 3.0, "clip_eps_high": 0.28},
])
def test_one_mini_batch_one_epoch_is_exactly_the_single_step(tiny_model, settings):
    # M = E = 1 (the default) must be today's update_step: same weights, same optimizer
    # state, same metrics, bit for bit, over two rollout steps.
    base = load_policy(tiny_model)
    batches = [make_records(base, n_prompts=3, group=2, seed=s) for s in (40, 41)]
    cfg = UpdateConfig(lr=1e-3, **settings)
    reference = base if cfg.kl_coef else None
    runs = []
    for fn in (update_step, update_batch):
        model = load_policy(tiny_model)
        optimizer = make_optimizer(model, cfg)
        metrics = [fn(model, optimizer, records, cfg, reference, step)
                   for step, records in enumerate(batches, start=1)]
        runs.append((model, optimizer, metrics))
    (m1, o1, metrics1), (m2, o2, metrics2) = runs
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), name
    for s1, s2 in zip(optimizer_state(o1, m1), optimizer_state(o2, m2)):
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    for a, b in zip(metrics1, metrics2):
        assert list(a) == list(b)
        assert {k: v for k, v in a.items() if k != "seconds"} == \
            {k: v for k, v in b.items() if k != "seconds"}
    expected_keys = DEFAULT_KEYS[:-1] + (["dual_clip_fraction"] if cfg.clip_ratio_c else []) + ["seconds"]
    assert list(metrics2[0]) == expected_keys  # no per-optimizer-step keys for one step


def test_mini_batches_keep_prompt_groups_whole():
    # Groups in order of first appearance: a (0, 1), b (2, 4), c (3, 5), d (6), e (7, 8).
    records = [{"prompt_id": q} for q in "aabcbcdee"]
    assert split_mini_batches(records, 1) == [list(range(9))]
    # 5 groups into 2: the first mini-batch gets the extra group, a b c | d e
    assert split_mini_batches(records, 2) == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]
    # into 3: a b | c d | e
    assert split_mini_batches(records, 3) == [[0, 1, 2, 4], [3, 5, 6], [7, 8]]
    # more mini-batches than groups: one group each
    assert split_mini_batches(records, 9) == [[0, 1], [2, 4], [3, 5], [6], [7, 8]]
    assert split_mini_batches([], 4) == [[]]  # nothing at all: one empty step, as update_step
    for m in (2, 3, 4):
        for part in split_mini_batches(records, m):
            ids = {records[i]["prompt_id"] for i in part}
            assert sorted(part) == [i for i, r in enumerate(records) if r["prompt_id"] in ids]


def reference_clip_counts(model, records, clip_eps, clip_ratio_c=None) -> tuple[int, int, int]:
    """(PPO-clipped tokens, dual-clipped tokens, tokens) of `records` under `model`,
    against the records' logprobs, one unpadded sequence at a time."""
    clipped = dual = tokens = 0
    with torch.no_grad():
        for r in records:
            logp, _ = naive_logprobs(model, r["prompt_ids"], r["completion_ids"])
            ratio = torch.exp(logp - torch.tensor(r["logprobs"]))
            a = r["advantage"]
            clipped += int(((ratio < 1 - clip_eps) & (a < 0) | (ratio > 1 + clip_eps) & (a > 0)).sum())
            if clip_ratio_c is not None and a < 0:
                dual += int((ratio > clip_ratio_c).sum())
            tokens += len(r["completion_ids"])
    return clipped, dual, tokens


@pytest.mark.parametrize("clip_ratio_c", [None, 1.5])
def test_two_mini_batches_equal_two_written_out_sgd_steps(tiny_model, clip_ratio_c):
    # The crafted batch: logprobs from the policy itself (ρ = 1 at the first optimizer
    # step) and SGD at lr 1, so the first mini-batch's step moves the ratio of the second
    # past 1 ± ε. Written out: mini-batch 1 = q0, q1, then mini-batch 2 = q2, q3, each its
    # own token-mean loss against the records' logprobs, w ← w - ∇L.
    base = load_policy(tiny_model)
    records = make_records(base, n_prompts=4, group=2, seed=30)
    model = load_policy(tiny_model)
    cfg = UpdateConfig(mini_batches=2, max_grad_norm=0.0, clip_ratio_c=clip_ratio_c)
    metrics = update_batch(model, torch.optim.SGD(model.parameters(), lr=1.0), records, cfg)

    reference = load_policy(tiny_model)
    counts = []
    for part in (records[:4], records[4:]):
        counts.append(reference_clip_counts(reference, part, 0.2, clip_ratio_c))
        reference.zero_grad()
        loss = reference_loss(reference, part, "token-mean", 0.2, max_tokens=None,
                              clip_ratio_c=clip_ratio_c)
        loss.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= p.grad
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=2e-6, rtol=1e-4), name

    first, second = metrics["per_optimizer_step"]
    assert (first["mini_batch"], second["mini_batch"]) == (1, 2)
    assert first["sequences"] == second["sequences"] == 4  # two whole groups each
    assert first["clip_fraction"] == 0.0 and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert second["clip_fraction"] == counts[1][0] / counts[1][2] > 0
    assert second["ratio_min"] < 0.8 or second["ratio_max"] > 1.2
    assert metrics["clip_fraction"] == pytest.approx(counts[1][0] / (counts[0][2] + counts[1][2]))
    if clip_ratio_c is None:
        assert "dual_clip_fraction" not in metrics
    else:
        assert second["dual_clip_fraction"] == counts[1][1] / counts[1][2] > 0
        assert first["dual_clip_fraction"] == 0.0


def test_update_epochs_and_mini_batches_make_m_times_e_optimizer_steps(tiny_model):
    base = load_policy(tiny_model)
    records = make_records(base, n_prompts=3, group=2, seed=31)  # 3 groups: 2 + 1
    model = load_policy(tiny_model)
    cfg = UpdateConfig(lr=1e-2, mini_batches=2, update_epochs=2, warmup_steps=3)
    optimizer = make_optimizer(model, cfg)
    metrics = update_batch(model, optimizer, records, cfg, step=2)

    assert all(optimizer.state[p]["step"].item() == 4 for p in model.parameters())
    steps = metrics["per_optimizer_step"]
    assert [(s["epoch"], s["mini_batch"], s["sequences"]) for s in steps] == \
        [(1, 1, 4), (1, 2, 2), (2, 1, 4), (2, 2, 2)]
    assert (metrics["mini_batches"], metrics["update_epochs"], metrics["optimizer_steps"]) == (2, 2, 4)
    assert list(metrics)[-4:] == ["mini_batches", "update_epochs", "optimizer_steps",
                                  "per_optimizer_step"]
    for s in steps:
        assert set(DEFAULT_KEYS) | {"epoch", "mini_batch"} == set(s)
    # The schedule counts rollout steps: all four at rollout step 2's lr, 1e-2 × 1/3.
    assert [s["lr"] for s in steps] == [pytest.approx(1e-2 / 3)] * 4 and metrics["lr"] == steps[0]["lr"]
    # The second epoch sees the policy its first epoch moved: ρ is no longer 1.
    assert steps[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert max(abs(steps[2]["ratio_max"] - 1), abs(steps[2]["ratio_min"] - 1)) > 1e-2

    # The rollout step's summary, recomputed from the per-step metrics.
    tokens = [s["tokens_forwarded"] for s in steps]
    assert metrics["tokens"] == sum(len(r["completion_ids"]) for r in records)
    assert metrics["tokens_forwarded"] == sum(tokens) == 2 * metrics["tokens"]
    assert metrics["sequences"] == 6 and metrics["sequences_forwarded"] == 12
    for key in ("loss", "policy_loss", "grad_norm"):
        assert metrics[key] == pytest.approx(sum(s[key] for s in steps) / 4, rel=1e-12)
    for key in ("clip_fraction", "entropy", "ratio_mean"):
        expected = sum(s[key] * t for s, t in zip(steps, tokens)) / sum(tokens)
        assert metrics[key] == pytest.approx(expected, rel=1e-12)
    assert metrics["ratio_min"] == min(s["ratio_min"] for s in steps)
    assert metrics["ratio_max"] == max(s["ratio_max"] for s in steps)

    # E = 2 alone: two optimizer steps over the whole batch.
    model = load_policy(tiny_model)
    cfg = UpdateConfig(lr=1e-2, update_epochs=2)
    optimizer = make_optimizer(model, cfg)
    metrics = update_batch(model, optimizer, records, cfg)
    assert all(optimizer.state[p]["step"].item() == 2 for p in model.parameters())
    assert [(s["epoch"], s["mini_batch"], s["sequences"]) for s in metrics["per_optimizer_step"]] == \
        [(1, 1, 6), (2, 1, 6)]


def test_tis_old_logprobs_are_fixed_for_the_whole_batch(tiny_model):
    # With --is-cap, π_old is the trainer's log-probs taken ONCE before the first optimizer
    # step. Here they equal the records' logprobs (same model), so the run is the plain
    # one: the second mini-batch's ratio is measured from the policy before step 1 and
    # clips. Re-taken per mini-batch, π_old would be the moved policy: ρ = 1, no clipping.
    base = load_policy(tiny_model)
    records = make_records(base, n_prompts=4, group=2, seed=30)
    results = []
    for is_cap in (None, 2.0):
        model = load_policy(tiny_model)
        cfg = UpdateConfig(mini_batches=2, max_grad_norm=0.0, is_cap=is_cap)
        metrics = update_batch(model, torch.optim.SGD(model.parameters(), lr=1.0), records, cfg)
        results.append((model, metrics["per_optimizer_step"][1]))
    (plain_model, plain), (tis_model, tis) = results
    assert tis["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert tis["clip_fraction"] == plain["clip_fraction"] > 0
    for (name, p), q in zip(plain_model.named_parameters(), tis_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name


def without_timings(value):
    """value without its "seconds" and "*_s" keys, at any depth."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if k != "seconds" and not k.endswith("_s")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_update_command_with_mini_batches(tiny_model, tmp_path):
    records = make_records(load_policy(tiny_model), n_prompts=4, group=2, seed=32)
    write_records(records, str(tmp_path / "adv.jsonl"))
    out, metrics_file = tmp_path / "out", tmp_path / "metrics.jsonl"
    proc = run_cli("update", str(tmp_path / "adv.jsonl"), "--policy", str(tiny_model),
                   "-o", str(out), "--lr", "1e-2", "--mini-batches", "2",
                   "--clip-ratio-c", "3", "--metrics", str(metrics_file), check=True)
    printed = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["update"]["mini_batches"] == 2 and state["update"]["update_epochs"] == 1
    assert state["update"]["clip_ratio_c"] == 3.0
    assert printed["optimizer_steps"] == 2 and len(printed["per_optimizer_step"]) == 2
    assert printed == json.loads(metrics_file.read_text())
    # the checkpoint keeps no wall-clock times (checkpoint.without_timings): same run, same bytes
    assert state["metrics"] == without_timings(printed)  # trainer_state.json keeps no timings
    assert printed["per_optimizer_step"][1]["clip_fraction"] > 0

    # Bad values: one line, exit status 2, before any model is loaded, nothing written.
    for flag, value, message in (("--mini-batches", "0", "'--mini-batches': 0 is not in the range x>=1"),
                                 ("--update-epochs", "-1", "'--update-epochs': -1 is not in"),
                                 ("--clip-ratio-c", "1", "--clip-ratio-c: expected a finite number > 1")):
        bad = run_cli("update", str(tmp_path / "adv.jsonl"), "--policy", str(tmp_path / "no-model"),
                      "--out", str(tmp_path / "bad"), flag, value)
        err = bad.stderr.decode()
        assert bad.returncode == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert message in err, err
        assert not (tmp_path / "bad").exists()



def test_a_log_ratio_of_100_gives_a_finite_loss_and_gradient(tiny_model):
    """π_old 100 nats below π_θ on one token: exp(100) = inf in fp32, whose gradient was
    0 · inf = NaN (the step refused); clamped at 20 as verl does, that token's loss is
    the constant -clip(e^20)·A = -1.2·A (A > 0) with no gradient, and the step goes on
    with the gradient of the other tokens."""
    model = load_policy(tiny_model)
    records = make_records(model, seed=14)
    records[0]["logprobs"][0] -= 100.0
    records[0]["advantage"] = 1.0
    cfg = UpdateConfig(lr=1e-3, old_logprobs="sampler")
    # The same step with that token's π_old at π_θ (ρ = 1) differs only by that token's
    # gradient -A·w·∇log π, which the clamp removes: compare against the written-out sum.
    metrics = update_step(model, make_optimizer(model, cfg), records, cfg)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert metrics["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)
    assert metrics["clip_fraction"] > 0
