"""The GRPO objective as plain tensor functions, symbol for symbol.

The paper (and DeepSeekMath) write GRPO as a loss to minimise:

    L(θ) = - 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1-ε_low, 1+ε_high) A_i) - β KL_it ]

    ρ_it   = π_θ(o_it | q, o_i,<t) / π_old(o_it | q, o_i,<t) = exp(logp - old_logp)
    A_i    = the advantage of completion i, the same for each of its tokens
    KL_it  = the k3 estimator of KL(π_θ || π_ref) at token t (Schulman, 2020)
    ε_low = ε_high = 0.2 in PPO/GRPO; DAPO's "clip-higher" raises ε_high to 0.28.

Shapes: per-token tensors are [B, T] (B sequences, T token columns); `mask` is
a bool [B, T] that is True at real completion tokens. The 1/G Σ_i 1/|o_i| Σ_t
part is one of three aggregations (see `token_weights`), because the papers
after GRPO disagree on it.
"""

from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "constant")


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
    with A < 0, or ρ > 1+ε_high with A > 0.
    """
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # one A_i for every token of sequence i
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    is_clipped = (((ratio < 1.0 - eps_low) & (advantages < 0))
                  | ((ratio > 1.0 + eps_high) & (advantages > 0)))
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss, is_clipped & mask


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref): exp(r) - r - 1 with r = ref_logp - logp.

    Non-negative, zero when the two agree, unbiased for samples from π_θ
    (Schulman, "Approximating KL divergence", 2020; used by GRPO and TRL).
    """
    r = ref_logp - logp
    return torch.exp(r) - r - 1.0


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
