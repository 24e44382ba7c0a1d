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
from grpoctl.records import write_records
from grpoctl.update import UpdateConfig, make_optimizer, run_update, update_step

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
    distinct = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 9, 4)]
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


def test_logprobs_carry_gradients_and_temperature_zero_means_one(tiny_model):
    model = load_policy(tiny_model)
    lp, ent = completion_logprobs(model, [[5, 6]], [[7, 8]], temperature=0)
    assert ent is None and lp[0].requires_grad
    lp1, _ = completion_logprobs(model, [[5, 6]], [[7, 8]], temperature=1.0)
    assert torch.equal(lp[0], lp1[0])


# --- (2) the step's gradient is the gradient of the written-out objective ------------


def reference_loss(model, records, mode, clip_eps, max_tokens):
    """The GRPO loss written plainly, one unpadded sequence at a time."""
    per_sequence_sums, lengths = [], []
    for r in records:
        logp, _ = naive_logprobs(model, r["prompt_ids"], r["completion_ids"])
        ratio = torch.exp(logp - torch.tensor(r["logprobs"]))
        a = r["advantage"]
        token_loss = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
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
    cfg = UpdateConfig(lr=1e-2, kl_coef=0.1)
    optimizer = make_optimizer(model, cfg)
    first = update_step(model, optimizer, records, cfg, ref_model=reference)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    assert first["loss"] == pytest.approx(first["policy_loss"], abs=1e-7)
    second = update_step(model, optimizer, records, cfg, ref_model=reference)
    assert second["kl"] > 1e-6
    assert second["loss"] == pytest.approx(second["policy_loss"] + 0.1 * second["kl"], rel=1e-6)


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
    # written out: steps 1..4 climb by lr/4, then the lr holds
    assert [scheduled_lr(cfg, s) for s in (1, 2, 3, 4, 5, 9)] == \
        pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4], rel=1e-12)
    assert scheduled_lr(UpdateConfig(lr=1e-4), 1) == 1e-4  # 0 = no warm-up

    # Through the stage: two chained `update`s report (and use) the step's lr, and the
    # second resumes from the first's step count.
    base = load_policy(tiny_model)
    for i in (1, 2):
        write_records(make_records(base, seed=20 + i), str(tmp_path / f"adv{i}.jsonl"))
    cfg = UpdateConfig(lr=1e-3, warmup_steps=4)
    m1 = run_update(str(tmp_path / "adv1.jsonl"), tiny_model, tmp_path / "A", cfg)
    m2 = run_update(str(tmp_path / "adv2.jsonl"), tmp_path / "A", tmp_path / "B", cfg)
    assert (m1["lr"], m2["lr"]) == (pytest.approx(2.5e-4), pytest.approx(5e-4))

    # SGD makes the lr visible in the weights: the step at lr/4 moves them a quarter as far.
    records = make_records(base, seed=5)
    moved = []
    for c in (UpdateConfig(lr=1.0, max_grad_norm=0), UpdateConfig(lr=1.0, warmup_steps=4, max_grad_norm=0)):
        model = load_policy(tiny_model)
        before = params_of(model)
        update_step(model, torch.optim.SGD(model.parameters(), lr=1.0), records, c, step=1)
        moved.append(torch.cat([(p.detach() - before[n]).flatten()
                                for n, p in model.named_parameters()]))
    assert moved[0].abs().max() > 1e-3
    assert torch.allclose(moved[1], moved[0] / 4, atol=1e-7)


# --- (5) non-finite steps are refused -------------------------------------------------------


def test_non_finite_loss_is_refused_and_nothing_changes(tiny_model, tmp_path):
    model = load_policy(tiny_model)
    records = make_records(model, seed=11)
    # π_old said this token had probability e^-200: ρ = e^(~200) overflows, and with A < 0
    # the loss -min(ρA, clip(ρ)A) = +inf.
    records[2]["logprobs"][0] = -200.0
    records[2]["advantage"] = -1.0
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
