"""Truncated importance sampling (TIS) between the sampler's and the trainer's log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import policy_records
from grpoctl.errors import GrpoctlError
from grpoctl.logprobs import completion_logprobs, padded_completion_logprobs
from grpoctl.losses import truncated_is_weights
from grpoctl.models import load_policy
from grpoctl.update import UpdateConfig, update_step


def test_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5],
                            [-3.0, -1.0, 0.0]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -3.0, -0.1],
                            [-1.0, -1.2, -9.0]])
    mask = torch.tensor([[True, True, True],
                         [True, True, False]])
    weights, capped = truncated_is_weights(trainer, sampler, mask, cap=2.0)
    # trainer - sampler:     0,    1.0,  -0.4  |  -2.0,  0.2,  (masked: 9.0)
    # exp:                   1, 2.71828, 0.67032 | 0.13534, 1.22140, (8103)
    # min(., 2), 0 outside the mask:
    expected = torch.tensor([[1.0, 2.0, 0.6703200460356393],
                             [0.1353352832366127, 1.2214027581601699, 0.0]])
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-7)
    assert capped.tolist() == [[False, True, False], [False, False, False]]  # masked 8103: not counted
    assert not weights.requires_grad  # a constant factor: no gradient through the weight



def perturb(records):
    """The sampler's log-probs off by -1.0, +0.5, 0 in turn: IS weights e (capped at 2), e^-0.5, 1."""
    shifts = (-1.0, 0.5, 0.0)
    out = []
    for r in records:
        lp = [x + shifts[t % 3] for t, x in enumerate(r["logprobs"])]
        out.append(dict(r, logprobs=lp))
    return out


def test_update_step_weights_match_an_independent_computation(tiny_model):
    cap = 2.0
    model = load_policy(tiny_model)
    records = perturb(policy_records(model))
    # Independently: the trainer's log-probs before the step (no-grad forward, one record
    # at a time), and the weights written out token by token.
    trainer_logps = []
    with torch.no_grad():
        for r in records:
            lp, _ = completion_logprobs(model, [r["prompt_ids"]], [r["completion_ids"]])
            trainer_logps.append(lp[0].tolist())
    raw_per_record = [[math.exp(t - s) for t, s in zip(tl, r["logprobs"])]
                      for r, tl in zip(records, trainer_logps)]
    raw = [x for row in raw_per_record for x in row]
    weights = [min(x, cap) for x in raw]
    mismatch = max(abs(t - s) for r, tl in zip(records, trainer_logps)
                   for t, s in zip(tl, r["logprobs"]))

    # The expected gradient: token-mean of -A_i * w_t * ratio_t, ratio = π_θ/π_old = 1 in value.
    reference = load_policy(tiny_model)
    logp, _, mask = padded_completion_logprobs(reference, [r["prompt_ids"] for r in records],
                                               [r["completion_ids"] for r in records])
    w = torch.zeros_like(logp)  # right-aligned, like logp
    for i, row in enumerate(raw_per_record):
        w[i, -len(row):] = torch.tensor([min(x, cap) for x in row])
    advantages = torch.tensor([r["advantage"] for r in records]).unsqueeze(1)
    loss = (-(advantages * w * torch.exp(logp - logp.detach()))[mask]).sum() / mask.sum()
    loss.backward()

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the weight change IS -gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = update_step(model, optimizer, records,
                          UpdateConfig(is_cap=cap, max_grad_norm=0.0, micro_batch_size=4))

    assert metrics["is_weight_mean"] == pytest.approx(sum(weights) / len(weights), abs=1e-5)
    assert metrics["is_capped_fraction"] == pytest.approx(sum(x > cap for x in raw) / len(raw))
    assert 0 < metrics["is_capped_fraction"] < 1  # the example exercises the cap
    assert metrics["logp_mismatch_max"] == pytest.approx(mismatch, abs=1e-5)
    assert mismatch == pytest.approx(1.0, abs=1e-5)
    assert metrics["clip_fraction"] == 0.0  # ratio against the trainer's own π_old: 1
    assert metrics["policy_loss"] == pytest.approx(loss.item(), abs=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(before[name] - p, q.grad, rtol=0, atol=1e-6, msg=name)


def test_without_a_cap_the_ratio_is_against_the_records(tiny_model):
    model = load_policy(tiny_model)
    records = perturb(policy_records(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = update_step(model, optimizer, records, UpdateConfig())
    assert metrics["is_weight_mean"] is None and metrics["is_capped_fraction"] is None
    assert metrics["clip_fraction"] > 0  # ratios e and e^-0.5 are outside [0.8, 1.2]
    assert metrics["logp_mismatch_max"] == pytest.approx(1.0, abs=1e-5)


def test_on_policy_records_get_weight_one(tiny_model):
    model = load_policy(tiny_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = update_step(model, optimizer, policy_records(model), UpdateConfig(is_cap=2.0))
    assert metrics["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["is_capped_fraction"] == 0.0
    assert metrics["logp_mismatch_max"] < 1e-5


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_cap_is_refused(tiny_model, cap):
    model = load_policy(tiny_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(GrpoctlError, match="--is-cap"):
        update_step(model, optimizer, policy_records(model), UpdateConfig(is_cap=cap))


def test_trainer_old_logprobs_take_the_ratio_against_the_trainer(tiny_model):
    """--old-logprobs trainer without --is-cap: ρ = π_θ / π_old_trainer = 1 in value at the
    first step, so the sampler's mismatch (here e, e^-0.5, 1) clips nothing and the
    gradient is the token mean of -A ∇log π_θ, written out by hand."""
    model = load_policy(tiny_model)
    records = perturb(policy_records(model))
    reference = load_policy(tiny_model)
    logp, _, mask = padded_completion_logprobs(reference, [r["prompt_ids"] for r in records],
                                               [r["completion_ids"] for r in records])
    advantages = torch.tensor([r["advantage"] for r in records]).unsqueeze(1)
    loss = (-(advantages * torch.exp(logp - logp.detach()))[mask]).sum() / mask.sum()
    loss.backward()

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = update_step(model, optimizer, records,
                          UpdateConfig(old_logprobs="trainer", max_grad_norm=0.0))
    assert metrics["clip_fraction"] == 0.0 and metrics["is_weight_mean"] is None
    assert metrics["logp_mismatch_max"] == pytest.approx(1.0, abs=1e-5)  # still measured
    assert metrics["policy_loss"] == pytest.approx(loss.item(), abs=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(before[name] - p, q.grad, rtol=0, atol=1e-6, msg=name)

    # The sampler's log-probs as π_old: the same records clip (ratios e and e^-0.5)
    sampler = update_step(load_policy(tiny_model), torch.optim.SGD(model.parameters(), lr=0.0),
                          records, UpdateConfig(old_logprobs="sampler"))
    assert sampler["clip_fraction"] > 0


def test_old_logprobs_default_follows_the_records_backend(tiny_model):
    """update's None: trainer for records a vLLM sampler wrote, sampler for hf float32."""
    from grpoctl.update import resolve_config

    records = policy_records(load_policy(tiny_model))
    assert resolve_config(records, UpdateConfig()).old_logprobs == "sampler"
    vllm = [dict(r, sampling={**r.get("sampling", {}), "backend": "vllm"}) for r in records]
    assert resolve_config(vllm, UpdateConfig()).old_logprobs == "trainer"
    assert resolve_config(records, UpdateConfig(mini_batches=2)).old_logprobs == "trainer"
    with pytest.raises(GrpoctlError, match="--old-logprobs trainer"):
        resolve_config(records, UpdateConfig(is_cap=2.0, old_logprobs="sampler"))
