"""The GRPO loss pieces against numbers worked out by hand in this file."""

from __future__ import annotations

import math

import pytest
import torch

from grpoctl.losses import aggregate, clipped_policy_loss, dual_clip, kl_k3, token_weights


def test_clipped_loss_and_its_gradient_by_hand():
    # Four tokens, ε_low = ε_high = 0.1: clip range [0.9, 1.1].
    #   token  π_old  π_θ   ρ = π_θ/π_old   A    ρA     clip(ρ)A   -min(...)   clipped?  d loss/d logp
    #   a      0.5    0.6   1.2            +1   1.2    1.1        -1.1        yes       0
    #   b      0.4    0.3   0.75           +1   0.75   0.9*1      -0.75       no        -ρA = -0.75
    #   c      0.4    0.3   0.75           -2   -1.5   0.9*-2     +1.8        yes       0
    #   d      0.5    0.6   1.2            -2   -2.4   1.1*-2     +2.4        no        -ρA = +2.4
    # (d loss/d logp = d(-ρA)/d logp = -ρA, since dρ/d logp = ρ; a clipped token's loss is a constant.)
    old = torch.tensor([[math.log(0.5), math.log(0.4)], [math.log(0.4), math.log(0.5)]])
    logp = torch.tensor([[math.log(0.6), math.log(0.3)], [math.log(0.3), math.log(0.6)]],
                        requires_grad=True)
    adv = torch.tensor([1.0, -2.0])  # one advantage per sequence: row 0 = tokens a, b; row 1 = c, d
    mask = torch.ones(2, 2, dtype=torch.bool)

    loss, clipped = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.1)

    expected_loss = torch.tensor([[-1.1, -0.75], [1.8, 2.4]])
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert clipped.tolist() == [[True, False], [True, False]]
    loss.sum().backward()
    expected_grad = torch.tensor([[0.0, -0.75], [0.0, 2.4]])
    assert torch.allclose(logp.grad, expected_grad, atol=1e-6)


def test_clip_higher_is_asymmetric():
    # ρ = 1.25 with A = +1: clipped at 1 + 0.2 = 1.2 (loss -1.2, no gradient) but inside
    # DAPO's 1 + 0.28 = 1.28 (loss -1.25, gradient -1.25).
    # ρ = 0.75 with A = -1: below 1 - 0.2 = 0.8 in both cases (ε_low stays 0.2): loss +0.8.
    old = torch.tensor([[0.0, 0.0]])
    logp = torch.tensor([[math.log(1.25), math.log(0.75)]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([[1.0, -1.0]])  # a per-token advantage tensor is accepted too

    sym, sym_clipped = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert torch.allclose(sym, torch.tensor([[-1.2, 0.8]]), atol=1e-6)
    assert sym_clipped.tolist() == [[True, True]]

    high, high_clipped = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert torch.allclose(high, torch.tensor([[-1.25, 0.8]]), atol=1e-6)
    assert high_clipped.tolist() == [[False, True]]
    high.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.25, 0.0]]), atol=1e-6)


def test_masked_tokens_give_no_loss_and_no_gradient():
    logp = torch.tensor([[-1.0, -50.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])  # the masked token has a wild ratio exp(-50)
    mask = torch.tensor([[True, False]])
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([-3.0]), mask)
    assert loss.tolist() == [[3.0, 0.0]]  # ρ = 1: -min(1 * -3, 1 * -3) = 3
    assert clipped.tolist() == [[False, False]]
    loss.sum().backward()
    assert logp.grad.tolist() == [[3.0, 0.0]]  # -ρA = 3 at the real token


def test_zero_advantage_gives_exactly_zero():
    logp = torch.tensor([[-0.3, -2.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, torch.tensor([[-1.0, -1.0]]), torch.tensor([0.0]),
                                  torch.ones(1, 2, dtype=torch.bool))
    loss.sum().backward()
    assert loss.abs().sum().item() == 0.0 and logp.grad.abs().sum().item() == 0.0


def test_kl_k3_by_hand():
    # π_θ = 0.5, π_ref = 0.25: r = log(0.25/0.5) = -ln 2; k3 = e^r - r - 1 = 0.5 + ln 2 - 1
    # π_θ = 0.2, π_ref = 0.4:  r = ln 2;                k3 = 2 - ln 2 - 1
    logp = torch.tensor([math.log(0.5), math.log(0.2), -1.7])
    ref = torch.tensor([math.log(0.25), math.log(0.4), -1.7])
    expected = torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0])
    assert torch.allclose(kl_k3(logp, ref), expected, atol=1e-6)


def test_dual_clip_by_hand():
    # ε = 0.2 (clip range [0.8, 1.2]), C = 3: for A < 0 the loss is capped at C·|A|.
    #   token  ρ     A    -min(ρA, clip(ρ)A)        dual: min(that, -C·A)   dual-clipped?  d loss/d logp
    #   a      5     -1   -min(-5, -1.2) = 5        min(5, 3) = 3            yes            0
    #   b      2     -1   -min(-2, -1.2) = 2        min(2, 3) = 2            no             -ρA = 2
    #   c      5     +1   -min(5, 1.2) = -1.2       A > 0: -1.2 unchanged    no             0 (PPO clip)
    #   d      4     -2   -min(-8, -2.4) = 8        min(8, 6) = 6            yes            0
    #   e      0.5   -2   -min(-1, -1.6) = 1.6      min(1.6, 6) = 1.6        no             0 (PPO clip)
    #   pad    9     -1   masked: 0                 0                        no             0
    ratios = [5.0, 2.0, 5.0, 4.0, 0.5, 9.0]
    logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 6)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -2.0, -2.0, -1.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])

    ppo, _ = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss, dual = dual_clip(ppo, adv, mask, clip_ratio_c=3.0)

    assert torch.allclose(ppo, torch.tensor([[5.0, 2.0, -1.2, 8.0, 1.6, 0.0]]), atol=1e-6)
    assert torch.allclose(loss, torch.tensor([[3.0, 2.0, -1.2, 6.0, 1.6, 0.0]]), atol=1e-6)
    assert dual.tolist() == [[True, False, False, True, False, False]]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0, 0.0]]), atol=1e-6)

    # one advantage per sequence works too, and C must be > 1 (verl asserts the same)
    seq_loss, seq_dual = dual_clip(ppo[:, :2].detach(), torch.tensor([-1.0]), mask[:, :2], 3.0)
    assert seq_loss.tolist() == [[3.0, pytest.approx(2.0)]] and seq_dual.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="> 1"):
        dual_clip(ppo, adv, mask, clip_ratio_c=1.0)


def test_kl_k3_is_clamped_as_verl():
    # r = log π_ref - log π_θ is clamped to [-20, 20] and k3 to [-10, 10]:
    #   r = 100:  exp(20) - 20 - 1 = 4.85e8    -> 10   (unclamped: exp(100) = inf in fp32)
    #   r = -100: exp(-20) + 20 - 1 = 19.0     -> 10
    #   r = 3:    exp(3) - 3 - 1 = 16.09       -> 10
    #   r = 1:    e - 2 = 0.71828              unchanged, gradient (1 - e^r)·dr/dlogp = e - 1
    logp = torch.tensor([-100.0, 0.0, -5.0, -2.0], requires_grad=True)
    ref = torch.tensor([0.0, -100.0, -2.0, -1.0])
    kl = kl_k3(logp, ref)
    assert torch.isfinite(kl).all()
    assert torch.allclose(kl, torch.tensor([10.0, 10.0, 10.0, math.e - 2]), atol=1e-6)
    kl.sum().backward()
    # d k3 / d logp = (exp(r) - 1) · (-1); clamped tokens give none
    assert torch.allclose(logp.grad, torch.tensor([0.0, 0.0, 0.0, 1 - math.e]), atol=1e-6)


# A ragged batch: sequence 1 has losses 1, 2, 3; sequence 2 has one token, loss 4.
# The padding column holds 100 to prove it is ignored.
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
MASK = torch.tensor([[True, True, True], [True, False, False]])


def test_token_mean_by_hand():
    # (1 + 2 + 3 + 4) / 4 tokens
    assert aggregate(PER_TOKEN, MASK, "token-mean").item() == pytest.approx(2.5)


def test_seq_mean_by_hand():
    # ((1 + 2 + 3) / 3 + 4 / 1) / 2 sequences = (2 + 4) / 2
    assert aggregate(PER_TOKEN, MASK, "seq-mean").item() == pytest.approx(3.0)


def test_constant_by_hand():
    # (1 + 2 + 3 + 4) / (2 sequences * 5 max tokens)
    assert aggregate(PER_TOKEN, MASK, "constant", max_tokens=5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, MASK, "constant")
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, MASK, "mean-of-something")


def test_weights_sliced_per_micro_batch_add_up_to_the_full_batch_loss():
    # Each sequence alone, with the weights of the whole batch, contributes its share.
    for mode in ("token-mean", "seq-mean", "constant"):
        w = token_weights(MASK.sum(-1), mode, max_tokens=5)
        parts = [(PER_TOKEN[i][MASK[i]].sum() * w[i]).item() for i in range(2)]
        assert sum(parts) == pytest.approx(aggregate(PER_TOKEN, MASK, mode, max_tokens=5).item())


def test_empty_sequences_are_not_counted():
    # A third, empty sequence changes no mode's value (it is not one of the N sequences).
    per_token = torch.cat([PER_TOKEN, torch.full((1, 3), 7.0)])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    assert aggregate(per_token, mask, "seq-mean").item() == pytest.approx(3.0)
    assert aggregate(per_token, mask, "constant", max_tokens=5).item() == pytest.approx(1.0)
    assert aggregate(per_token, mask, "token-mean").item() == pytest.approx(2.5)


def test_the_log_ratio_is_clamped_at_20_as_verl_does():
    """Hand-worked: log-ratio 100 → ρ = e^20 (4.85e8), not exp(100) = inf.
    A = +1: -min(e^20, clip(e^20, 0.8, 1.2)) = -1.2, gradient 0 (the clipped branch).
    A = -1: -min(-e^20, -1.2) = e^20, gradient 0 (the clamp is flat past 20).
    Log-ratio 0.1, A = +1: ρ = e^0.1 < 1.2, loss -e^0.1, d/dlogp = -e^0.1."""
    from grpoctl.losses import clipped_policy_loss, importance_ratio

    mask = torch.ones(1, 1, dtype=torch.bool)
    for log_ratio, advantage, loss_by_hand, grad_by_hand in [
            (100.0, 1.0, -1.2, 0.0), (100.0, -1.0, math.exp(20.0), 0.0),
            (0.1, 1.0, -math.exp(0.1), -math.exp(0.1)), (-100.0, -1.0, 0.8, 0.0)]:
        logp = torch.tensor([[log_ratio]], requires_grad=True)
        loss, _ = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), mask)
        loss.sum().backward()
        assert loss.item() == pytest.approx(loss_by_hand, rel=1e-6)
        assert math.isfinite(logp.grad.item()) and logp.grad.item() == pytest.approx(
            grad_by_hand, rel=1e-6, abs=1e-12)
    assert importance_ratio(torch.tensor(100.0), torch.tensor(0.0)).item() == \
        pytest.approx(math.exp(20.0), rel=1e-6)
    # Unclamped, the same A = +1 case had a finite loss and a NaN gradient
    logp = torch.tensor([100.0], requires_grad=True)
    ratio = torch.exp(logp)
    (-torch.minimum(ratio, torch.clamp(ratio, 0.8, 1.2))).sum().backward()
    assert math.isnan(logp.grad.item())


def test_the_k3_clamp_stops_the_gradient_past_2_61_and_minus_11():
    """k3 = clamp(e^r - r - 1, -10, 10), r = log π_ref - log π_θ (clamped to ±20).
    e^r - r - 1 = 10 at r ≈ 2.610 (r > 0) and r ≈ -11.000 (e^-11 + 11 - 1 = 10.0000167);
    past them the value is the bound 10 and the gradient 0 (docs/update.md)."""
    from grpoctl.losses import kl_k3

    def g(r):
        return math.exp(r) - r - 1

    assert g(2.61) < 10 < g(2.611) and g(-10.9999) < 10 < g(-11.0)
    for r, live in [(2.6, True), (2.62, False), (-10.99, True), (-11.01, False)]:
        logp = torch.tensor([0.0], requires_grad=True)
        kl_k3(logp, torch.tensor([r])).sum().backward()
        assert (logp.grad.item() != 0) == live, r
