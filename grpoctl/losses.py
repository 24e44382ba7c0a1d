"""The GRPO objective as plain tensor functions, symbol for symbol.

The paper (and DeepSeekMath) write GRPO as a loss to minimise:

    L(θ) = - 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1-ε_low, 1+ε_high) A_i) - β KL_it ]

    ρ_it   = π_θ(o_it | q, o_i,<t) / π_old(o_it | q, o_i,<t)
           = exp(clamp(logp - old_logp, -20, 20))  (`importance_ratio`, verl's clamp)
    A_i    = the advantage of completion i, the same for each of its tokens
    KL_it  = the k3 estimate of KL(π_θ || π_ref) at token t (Schulman, 2020); as a loss its
             expected gradient is that of KL(π_ref || π_θ) (see `kl_k3`)
    ε_low = ε_high = 0.2 in PPO/GRPO; DAPO's "clip-higher" raises ε_high to 0.28.

Optionally, for A_i < 0, the dual clip caps the policy term at C·|A_i| (`dual_clip`).

Shapes: per-token tensors are [B, T] (B sequences, T token columns); `mask` is
a bool [B, T] that is True at real completion tokens. The 1/G Σ_i 1/|o_i| Σ_t
part is one of three aggregations (see `token_weights`), because the papers
after GRPO disagree on it.
"""

from __future__ import annotations

import torch

from grpoctl.config import LOSS_AGGREGATIONS


# verl's clamp of the PPO log-ratio before exp (verl/trainer/ppo/core_algos.py,
# compute_policy_loss_vanilla: `torch.clamp(negative_approx_kl, min=-20.0, max=20.0)`).
RATIO_LOG_CLAMP = 20.0


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """ρ = exp(clamp(log π_θ - log π_old, -20, 20)), as verl computes it.

    Without the clamp a log-ratio above ~88.7 gives exp = inf in fp32: the clipped loss
    can still be finite (min(ρA, 1.2A) = 1.2A for A > 0) while its gradient is
    0 · inf = NaN, and the step is refused. With it, ρ ≤ e^20 ≈ 4.85e8, and a token
    whose log-ratio is outside [-20, 20] gets no gradient through ρ (the clamp is flat
    there): its loss is a finite constant.
    """
    return torch.exp(torch.clamp(logp - old_logp, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_eps: float = 0.2,
                        clip_eps_high: float | None = None):
    """Per-token clipped surrogate loss -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A).

    Args:
        logp: log π_θ of each token [B, T] (carries the gradient).
        old_logp: log π_old, the behaviour policy's log-probs [B, T] (records' `logprobs`).
        advantages: A_i per sequence [B] (or per token [B, T]).
        mask: True at real tokens [B, T]; other entries give loss 0.
        clip_eps: ε_low, default 0.2 (PPO, GRPO).
        clip_eps_high: ε_high; None = clip_eps (symmetric). DAPO uses 0.28.

    Returns (loss [B, T], clipped [B, T] bool): `clipped` marks tokens where the
    clipped term is the smaller one, so the token gives no gradient: ρ < 1-ε_low
    with A < 0, or ρ > 1+ε_high with A > 0. ρ is `importance_ratio` (log-ratio
    clamped to ±20, as verl).
    """
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # one A_i for every token of sequence i
    ratio = importance_ratio(logp, old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    is_clipped = (((ratio < 1.0 - eps_low) & (advantages < 0))
                  | ((ratio > 1.0 + eps_high) & (advantages > 0)))
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss, is_clipped & mask


def dual_clip(policy_loss: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_ratio_c: float = 3.0):
    """Dual-clip PPO: for A < 0, cap the per-token policy loss at -C·A = C·|A|.

        loss_dual = min(max(-ρA, -clip(ρ, 1-ε_low, 1+ε_high)A), -C·A)   where A < 0
                  = the clipped loss unchanged                          where A >= 0

    (max(-ρA, -clip(ρ)A) is `clipped_policy_loss`'s -min(ρA, clip(ρ)A).) With A < 0 the
    ordinary clipped loss is ρ|A| for every ρ > 1 - ε_low, so one token whose ratio
    has grown large (stale or off-policy samples) can dominate the batch; the dual clip
    bounds it by C|A| and gives such a token no gradient (a constant). It acts only
    where ρ > C (for C > 1 + ε_high). Ye et al. 2020, "Mastering Complex Control in
    MOBA Games with Deep Reinforcement Learning" (arXiv 1912.09729); verl's
    `clip_ratio_c` (default 3.0 there; it asserts C > 1), `compute_policy_loss_vanilla`.

    Args:
        policy_loss: the per-token loss of `clipped_policy_loss` [B, T].
        advantages: A_i per sequence [B] (or per token [B, T]).
        mask: True at real tokens [B, T].
        clip_ratio_c: C > 1.

    Returns (loss [B, T], dual_clipped [B, T] bool): `dual_clipped` marks the tokens
    where the cap -C·A is the smaller value (verl's `pg_clipfrac_lower`).
    """
    if not clip_ratio_c > 1.0:
        raise ValueError(f"dual clip needs clip_ratio_c > 1, got {clip_ratio_c}")
    if advantages.dim() == policy_loss.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # one A_i for every token of sequence i
    cap = -clip_ratio_c * advantages
    negative = advantages < 0
    loss = torch.where(negative, torch.minimum(policy_loss, cap), policy_loss)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss, negative & (policy_loss > cap) & mask


# verl's clamps for its "low_var_kl" (= k3) estimator (verl/trainer/ppo/core_algos.py
# `kl_penalty`, commit 012be9d): the log-ratio to [-20, 20], the estimate to [-10, 10].
KL_LOG_RATIO_CLAMP = 20.0
KL_VALUE_CLAMP = 10.0


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref), clamped as verl clamps it:

        r  = clamp(log π_ref - log π_θ, -20, 20)
        k3 = clamp(exp(r) - r - 1, -10, 10)

    The value: for tokens drawn from π_θ, E[exp(r) - r - 1] = KL(π_θ || π_ref); each
    term is >= 0 and 0 where the two agree (Schulman, "Approximating KL divergence", 2020;
    GRPO, TRL, verl's "low_var_kl").

    The gradient is another matter. Differentiated as a loss with the sampled tokens
    held fixed, ∇k3 = (1 - π_ref/π_θ) ∇log π_θ, whose expectation over o ~ π_θ is
    -Σ_o π_ref(o) ∇log π_θ(o) = ∇ KL(π_ref || π_θ): the gradient of the other direction,
    KL(π_ref || π_θ), not of KL(π_θ || π_ref) (Tang & Munos 2025, "On a few
    pitfalls in KL divergence gradient estimation for RL", arXiv 2506.09477). It is also
    taken token by token, so it ignores how a token changes the later tokens'
    distributions (the same note's second point). Both pull π_θ towards π_ref, which is
    what the penalty is for; neither is the exact gradient of the sequence KL. Off-policy
    (tokens from π_old ≠ π_θ, e.g. mini-batches after the first) the expectation is
    under π_old, which is neither of the two.

    The clamps: without them a log-ratio of 100 gives exp(100) = inf in fp32, so one
    token whose probability the reference gives as ~0 would make the loss infinite. A
    token outside either clamp contributes the bound and no gradient.
    """
    r = torch.clamp(ref_logp - logp, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(r) - r - 1.0, -KL_VALUE_CLAMP, KL_VALUE_CLAMP)


def token_weights(lengths: torch.Tensor, mode: str = "token-mean",
                  max_tokens: int | None = None) -> torch.Tensor:
    """The weight w_i of each token of sequence i, so that the loss is Σ_i w_i Σ_t loss_it.

    With N sequences (those with at least one token) of lengths |o_i|:
        "token-mean": w_i = 1 / Σ_j |o_j|         every token counts the same (DAPO, TRL's default)
        "seq-mean":   w_i = 1 / (N |o_i|)          mean per sequence, then over sequences
                                                   (the GRPO paper's 1/G Σ_i 1/|o_i| Σ_t)
        "constant":   w_i = 1 / (N max_tokens)     a fixed normaliser, max_tokens = the
                                                   generation budget (Dr. GRPO)
    Sequences of length 0 get weight 0 and are not counted in N.

    The weights depend on the whole batch, so computing them once over the whole
    file and slicing them per micro-batch makes gradient accumulation give exactly
    the full-batch loss.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    nonempty = lengths > 0
    n_seq = nonempty.sum().clamp(min=1)
    if mode == "token-mean":
        w = torch.full_like(lengths, 1.0) / lengths.sum().clamp(min=1)
    elif mode == "seq-mean":
        w = 1.0 / (n_seq * lengths.clamp(min=1))
    elif mode == "constant":
        if not max_tokens or max_tokens <= 0:
            raise ValueError("loss aggregation 'constant' needs max_tokens > 0")
        w = torch.full_like(lengths, 1.0) / (n_seq * max_tokens)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of "
                         f"{', '.join(LOSS_AGGREGATIONS)}")
    return torch.where(nonempty, w, torch.zeros_like(w))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar over a whole batch (see `token_weights`).

    mode: "token-mean" (default; DAPO), "seq-mean" (GRPO paper) or "constant"
    (Dr. GRPO; max_tokens = the generation budget, required).
    """
    weights = token_weights(mask.sum(-1), mode, max_tokens).to(per_token.device)
    per_sequence = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
    return (per_sequence * weights).sum()


def truncated_is_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor,
                         mask: torch.Tensor, cap: float = 2.0):
    """Per-token truncated importance-sampling weights between trainer and sampler (TIS).

        w_t = min(exp(log π_trainer_old(o_t) - log π_sampler(o_t)), C)

    The sampler (vLLM, or another dtype/kernel) draws tokens from a slightly different
    distribution than the trainer computes, so the "on-policy" gradient is really
    off-policy; multiplying each token's policy loss by w_t corrects it, and the cap
    C bounds the variance (Yao et al., 2025, "Your Efficient RL Framework Secretly
    Brings You Off-Policy RL Training"; verl `tis_imp_ratio_cap`, TRL
    `vllm_importance_sampling_cap`; C = 2 is the common value).

    Args:
        trainer_logp: log π_old under the trainer [B, T] (its gradient is not used).
        sampler_logp: the sampler's log-probs of the same tokens [B, T] (records' `logprobs`).
        mask: True at real tokens [B, T].
        cap: C > 0.
    Returns (weights [B, T], capped [B, T] bool): weights are detached and 0 outside
    the mask; `capped` marks tokens where the cap applied.
    """
    raw = torch.exp(trainer_logp.detach() - sampler_logp.detach())
    weights = torch.where(mask, torch.clamp(raw, max=cap), torch.zeros_like(raw))
    return weights, (raw > cap) & mask
