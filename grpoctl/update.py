"""The `update` stage: the policy-gradient step(s) of one file of records with advantages.

    records (prompt_ids, completion_ids, logprobs = the sampler's log π, advantage)
      → recompute log π_θ of every completion token          (logprobs.py)
      → π_old: the records' logprobs or the trainer's own      (--old-logprobs)
      → clipped surrogate (+ dual clip), optional k3 KL       (losses.py)
      → aggregate with weights computed over the WHOLE batch, backward per micro-batch
      → clip the gradient norm, one AdamW step                (update_step)
      → save policy + optimizer + trainer_state atomically   (checkpoint.py)

By default the file is one batch and one optimizer step. `--mini-batches M` and
`--update-epochs E` make it M × E optimizer steps (`update_batch`): E passes over
the file, each in M mini-batches of whole prompt groups, all with π_old fixed at the
behaviour policy, so the clipped ratio acts from the second optimizer step on.

Gradient accumulation is exact: each token's weight in the loss (1/total tokens,
1/(sequences × length), ...) is computed once over the whole (mini-)batch, so the
sum of the micro-batch losses IS its full loss, whatever the micro-batch size.

A step whose loss or gradient norm is not finite is refused with a GrpoctlError
before `optimizer.step()`: the parameters and optimizer state are unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from grpoctl import checkpoint, distributed, lora, process
from grpoctl.config import AdapterSettings, ModelSettings, UpdateConfig, default_old_logprobs
from grpoctl.errors import GrpoctlError, first_line
from grpoctl.logprobs import padded_completion_logprobs
from grpoctl.losses import (clipped_policy_loss, dual_clip, importance_ratio, kl_k3,
                            token_weights, truncated_is_weights)
from grpoctl.records import (NEEDS_UPDATE, STDIO, RecordError, dumps, line_of, read_records,
                             source_name)


def make_optimizer(model, cfg: UpdateConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (each tied weight once).

    torch's fused kernel where it has one (CPU, CUDA): one pass over each parameter
    instead of about six, 0.15 s instead of 0.5-0.65 s a step for a 135M model on two
    cores; elementwise, so deterministic run to run (a resumed run reproduces an
    uninterrupted one).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                 for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


# --- settings that come from the records --------------------------------------


def _one_value(records: list[dict], key: str, source: str):
    """records[*].sampling[key] when every record that has it agrees; None when none has it."""
    found = None
    for i, r in enumerate(records):
        value = (r.get("sampling") or {}).get(key)
        if value is None:
            continue
        if found is None:
            found = (value, i)
        elif value != found[0]:
            first, here = line_of(records, found[1]), line_of(records, i)
            raise RecordError(source, here, "sampling",
                              f"{key} is {value!r} but {found[0]!r} on line {first}: "
                              f"one update needs one {key}; pass it explicitly")
    return None if found is None else found[0]


def resolve_config(records: list[dict], cfg: UpdateConfig, source: str = "<records>"
                   ) -> UpdateConfig:
    """cfg, checked (`UpdateConfig.check`), with temperature (and max_tokens for "constant")
    filled in from the records, and old_logprobs None resolved (`default_old_logprobs`,
    the sampler's backend from the records' sampling.backend; run_update and the loop
    resolve it first, knowing the dtype)."""
    cfg.check()
    old_logprobs = default_old_logprobs(cfg, _one_value(records, "backend", source))
    temperature = cfg.temperature
    if temperature is None:
        temperature = _one_value(records, "temperature", source)
    temperature = 1.0 if not temperature else float(temperature)  # 0 = greedy, scored at 1
    max_tokens = cfg.max_tokens
    if cfg.loss_agg == "constant" and max_tokens is None:
        max_tokens = _one_value(records, "max_new_tokens", source)
        if not max_tokens:
            raise GrpoctlError("--loss-agg constant needs the generation budget: pass "
                               "--max-tokens or use records with sampling.max_new_tokens")
    return dataclasses.replace(cfg, temperature=temperature, max_tokens=max_tokens,
                               old_logprobs=old_logprobs)


# --- one optimizer step ---------------------------------------------------------


def _right_aligned(rows: list[list[float]], width: int) -> torch.Tensor:
    """Pack ragged rows into [B, width], each row in its last columns (the logprobs layout)."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.tensor(row, dtype=torch.float32)
    return out


def _describe(records: list[dict], indices: list[int]) -> str:
    shown = ", ".join(f"{records[i]['prompt_id']!r}/{records[i]['sample']}" for i in indices[:3])
    more = f" and {len(indices) - 3} more" if len(indices) > 3 else ""
    return f"record(s) (prompt_id/sample) {shown}{more}"


def _refuse(params, message: str):
    for p in params:
        p.grad = None  # leave no half-accumulated gradient behind
    raise GrpoctlError(f"update refused: {message}; no optimizer step was taken, "
                       f"parameters unchanged")


def _trainer_old_logprobs(model, logp, prompts, completions, cfg: UpdateConfig) -> torch.Tensor:
    """log π_old under the trainer (--old-logprobs trainer): π_θ at the start of the step,
    without gradient.

    The parameters do not change before optimizer.step(), so the gradient pass's own
    values, detached, ARE a no-grad forward of π_old (TRL does the same for one
    iteration) and cost nothing. Only LoRA dropout makes that pass noisy: then π_old
    is a separate no-grad forward without dropout.
    (Several optimizer steps per batch fix π_old once, before the first: `update_batch`.)
    """
    if not lora.has_dropout(model):
        return logp.detach()
    with torch.no_grad():
        old, _, _ = padded_completion_logprobs(model, prompts, completions, cfg.temperature,
                                               pad_id=0)
    return old


def scheduled_lr(cfg: UpdateConfig, step: int) -> float:
    """The learning rate of rollout step `step` (counted from 1): linear warm-up from 0.

        lr(s) = cfg.lr × (s - 1) / warmup_steps   while s - 1 < warmup_steps
              = cfg.lr                             after

    So the first step runs at lr 0 (AdamW still counts it and updates its moments) and
    step warmup_steps + 1 is the first at the full lr, as verl's
    get_constant_schedule_with_warmup, whose counter starts at 0. The schedule counts
    rollout steps, not optimizer steps: every optimizer step of one rollout batch
    (mini-batches, update epochs) uses the same lr, as verl steps its scheduler once per
    `update_actor` call.
    """
    if cfg.warmup_steps and step - 1 < cfg.warmup_steps:
        return cfg.lr * (step - 1) / cfg.warmup_steps
    return cfg.lr


def _sequences_to_forward(records: list[dict], lengths: list[int], cfg: UpdateConfig,
                          ref_model) -> list[int]:
    """The indices of the records whose tokens go through the model, in forward order.

    A sequence with advantage exactly 0 has policy loss and gradient exactly 0, so it is
    skipped (it still counts in the normalisers). Not when a reference policy is
    given: its KL term is not 0, and `kl` is then measured over every sequence, the
    same number that β multiplies in the loss.
    """
    skip = cfg.skip_zero_advantage and ref_model is None
    forward = [i for i, r in enumerate(records)
               if lengths[i] > 0 and not (skip and r["advantage"] == 0)]
    # A group's samples together (they share one prompt pass, logprobs.py), similar prompt
    # lengths together (less padding); the result does not depend on the order.
    forward.sort(key=lambda i: (len(records[i]["prompt_ids"]), records[i]["prompt_ids"]))
    return forward


@dataclass
class _MicroBatchLoss:
    """The per-token tensors of one micro-batch, [B, T] each (B sequences, T columns)."""

    logp: torch.Tensor  # log π_θ, carries the gradient
    old_logp: torch.Tensor  # the records' logprobs (the sampler's)
    mask: torch.Tensor
    entropy: torch.Tensor
    policy_tok: torch.Tensor  # the policy term of the loss (after dual clip and TIS weight)
    loss_tok: torch.Tensor  # policy_tok + β k3
    kl_tok: torch.Tensor | None  # k3 to the reference; None without one
    clipped: torch.Tensor
    dual_clipped: torch.Tensor | None  # None without --clip-ratio-c
    is_weight: torch.Tensor | None  # None without --is-cap
    is_capped: torch.Tensor | None


def _micro_batch_loss(model, records: list[dict], batch: list[int], cfg: UpdateConfig,
                      ref_model, trainer_old: list | None) -> _MicroBatchLoss:
    """The per-token GRPO loss of records[batch] (losses.py, symbol by symbol).

    ρ is taken against π_old (cfg.old_logprobs): the records' logprobs ("sampler") or
    the trainer's ("trainer"): `trainer_old` (one list per record, fixed for the whole
    rollout batch by update_batch) or, when None, this pass's own detached values.
    With --is-cap the policy term is also weighted by min(π_old_trainer/π_sampler, C).
    """
    device = model.get_input_embeddings().weight.device
    prompts = [records[i]["prompt_ids"] for i in batch]
    completions = [records[i]["completion_ids"] for i in batch]
    with lora.dropout_on(model):  # LoRA dropout, if any: in this gradient pass only
        logp, entropy, mask = padded_completion_logprobs(
            model, prompts, completions, cfg.temperature, pad_id=0, with_entropy=True)
    width = mask.shape[1]
    old_logp = _right_aligned([records[i]["logprobs"] for i in batch], width).to(device)
    advantages = torch.tensor([float(records[i]["advantage"]) for i in batch], device=device)

    is_weight = is_capped = None
    if cfg.old_logprobs == "sampler":  # the ratio against the sampler's log-probs
        ratio_against = old_logp
    elif trainer_old is None:  # the trainer's π_old: this pass's values, detached
        ratio_against = _trainer_old_logprobs(model, logp, prompts, completions, cfg)
    else:  # ... or fixed before the batch's first optimizer step
        ratio_against = _right_aligned([trainer_old[i] for i in batch], width).to(device)
    if cfg.is_cap is not None:  # TIS: times min(π_old_trainer/π_sampler, C)
        is_weight, is_capped = truncated_is_weights(ratio_against, old_logp, mask, cfg.is_cap)
    policy_tok, clipped = clipped_policy_loss(logp, ratio_against, advantages, mask,
                                              cfg.clip_eps, cfg.clip_eps_high)
    dual_clipped = None
    if cfg.clip_ratio_c is not None:
        policy_tok, dual_clipped = dual_clip(policy_tok, advantages, mask, cfg.clip_ratio_c)
    if is_weight is not None:
        policy_tok = policy_tok * is_weight

    loss_tok, kl_tok = policy_tok, None
    if ref_model is not None:
        with torch.no_grad():
            ref_logp, _, _ = padded_completion_logprobs(
                ref_model, prompts, completions, cfg.temperature, pad_id=0)
        kl_tok = torch.where(mask, kl_k3(logp, ref_logp.to(device)), torch.zeros_like(logp))
        if cfg.kl_coef:
            loss_tok = loss_tok + cfg.kl_coef * kl_tok
    return _MicroBatchLoss(logp, old_logp, mask, entropy, policy_tok, loss_tok, kl_tok,
                           clipped, dual_clipped, is_weight, is_capped)


class _StepStatistics:
    """Sums over a step's micro-batches (and, under torchrun, its ranks) → its metrics."""

    def __init__(self):
        self.totals = {"policy_loss": 0.0, "kl": 0.0, "clipped": 0, "entropy": 0.0,
                       "ratio": 0.0, "tokens": 0, "is_weight": 0.0, "is_capped": 0,
                       "dual_clipped": 0}
        self.mismatch_max = 0.0  # max |log π_trainer - log π_sampler| over the forwarded tokens
        self.ratio_min, self.ratio_max = math.inf, -math.inf

    @torch.no_grad()
    def add(self, mb: _MicroBatchLoss, w: torch.Tensor) -> None:
        """One micro-batch; w = its sequences' token weights (over the whole step)."""
        t, mask = self.totals, mb.mask
        ratio = importance_ratio(mb.logp, mb.old_logp)[mask]  # π_θ against the records' logprobs
        t["policy_loss"] += (mb.policy_tok.sum(-1) * w).sum().item()
        if mb.kl_tok is not None:
            t["kl"] += (mb.kl_tok.sum(-1) * w).sum().item()
        t["clipped"] += int(mb.clipped.sum().item())
        if mb.dual_clipped is not None:
            t["dual_clipped"] += int(mb.dual_clipped.sum().item())
        if mb.is_weight is not None:
            t["is_weight"] += mb.is_weight[mask].sum().item()
            t["is_capped"] += int(mb.is_capped.sum().item())
        t["entropy"] += mb.entropy[mask].sum().item()
        t["ratio"] += ratio.sum().item()
        t["tokens"] += int(mask.sum().item())
        self.ratio_min = min(self.ratio_min, ratio.min().item())
        self.ratio_max = max(self.ratio_max, ratio.max().item())
        if mask.any():
            mismatch = (mb.logp.detach() - mb.old_logp)[mask].abs().max().item()
            self.mismatch_max = max(self.mismatch_max, mismatch)

    def combine_ranks(self) -> None:
        """torchrun: each rank's sums of its share → the whole step's (no-op in one process)."""
        self.totals = distributed.reduce_metrics(self.totals, "sum")
        lows = distributed.reduce_metrics({"ratio_min": self.ratio_min}, "min")
        self.ratio_min = lows["ratio_min"]
        highs = distributed.reduce_metrics({"ratio_max": self.ratio_max,
                                            "mismatch_max": self.mismatch_max}, "max")
        self.ratio_max, self.mismatch_max = highs["ratio_max"], highs["mismatch_max"]

    def metrics(self, cfg: UpdateConfig, measured_kl: bool, grad_norm: float, lr: float,
                lengths: list[int], forwarded: int) -> dict:
        t = self.totals
        n = t["tokens"]
        kl = t["kl"] if measured_kl else None
        metrics = {
            "loss": t["policy_loss"] + cfg.kl_coef * (kl or 0.0),
            "policy_loss": t["policy_loss"],
            "kl": kl,
            "clip_fraction": t["clipped"] / n if n else 0.0,
            "entropy": t["entropy"] / n if n else None,
            "ratio_mean": t["ratio"] / n if n else None,
            "ratio_min": self.ratio_min if n else None,
            "ratio_max": self.ratio_max if n else None,
            "logp_mismatch_max": self.mismatch_max if n else None,
            "is_weight_mean": t["is_weight"] / n if n and cfg.is_cap is not None else None,
            "is_capped_fraction": (t["is_capped"] / n if n and cfg.is_cap is not None
                                   else None),
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": sum(lengths),
            "tokens_forwarded": n,
            "sequences": sum(1 for x in lengths if x > 0),
            "sequences_forwarded": forwarded,
        }
        if cfg.clip_ratio_c is not None:  # only then: the default's keys stay as they were
            metrics["dual_clip_fraction"] = t["dual_clipped"] / n if n else 0.0
        return metrics


def _optimizer_step(model, optimizer: torch.optim.Optimizer, params: list, cfg: UpdateConfig,
                    policy_loss: float) -> float:
    """Sum the ranks' gradients, clip their norm, one optimizer step; returns the norm
    before clipping. A non-finite norm, a failing step or non-finite weights after it
    are refused (GrpoctlError); the first two leave parameters and optimizer unchanged."""
    # No sequence forwarded (all advantages 0): zero gradients, so AdamW still
    # applies its momentum and weight decay exactly as if they had been computed.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # torchrun: the ranks' gradients are SUMMED (not averaged) into the full-batch gradient.
    distributed.sum_gradients(model, params)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf
    grad_norm = distributed.clip_grad_norm(params, max_norm)  # global norm, before clipping
    if not math.isfinite(grad_norm):
        _refuse(params, f"the gradient norm is {grad_norm} (the loss was finite: "
                        f"{policy_loss:.6g}); check the scale of the advantages")
    try:
        _check_step_size(optimizer)
        optimizer.step()
    except RuntimeError as e:
        _refuse(params, f"the optimizer step failed ({first_line(e)}) with lr "
                        f"{optimizer.param_groups[0]['lr']:g}")
    optimizer.zero_grad(set_to_none=True)
    # A sum is finite iff every element is (NaN and ±inf propagate), unless it overflows:
    # one pass over the weights; the exact test only where a sum is not finite.
    if not all(torch.isfinite(p.sum()) or torch.isfinite(p).all() for p in params):
        raise GrpoctlError(f"update refused: the optimizer step (lr "
                           f"{optimizer.param_groups[0]['lr']:g}, gradient norm {grad_norm:.3g}) "
                           f"made parameters infinite or NaN; nothing was saved")
    return grad_norm


def _check_step_size(optimizer: torch.optim.Optimizer) -> None:
    """RuntimeError when Adam's step size lr / (1 - β1^t) (or an lr) overflows a parameter's
    dtype, before the step touches anything (torch's per-parameter loop raises this
    itself, mid-step; its fused kernel writes infinities instead)."""
    for group in optimizer.param_groups:
        beta1 = group.get("betas", (0.0,))[0]
        for p in group["params"]:
            step = float(optimizer.state.get(p, {}).get("step", 0)) + 1
            size = group["lr"] / (1 - beta1 ** step)
            if size > torch.finfo(p.dtype).max:
                raise RuntimeError(f"the step size lr / (1 - beta1^{step:g}) = {size:.3g} "
                                   f"overflows {str(p.dtype).removeprefix('torch.')}")


def update_step(model, optimizer: torch.optim.Optimizer, records: list[dict],
                cfg: UpdateConfig, ref_model=None, step: int | None = None,
                trainer_old: list | None = None) -> dict:
    """One optimizer step on `records` (each with prompt_ids, completion_ids, logprobs,
    advantage); returns the step's metrics.

      1. token weights over ALL the records, so the micro-batch losses add up to the
         full-batch loss (`token_weights`);
      2. per micro-batch: the per-token loss (`_micro_batch_loss`), refused if not
         finite, backward; its sums go into the step statistics (`_StepStatistics`);
      3. the optimizer step with its refusals (`_optimizer_step`).

    ref_model: the reference policy for the KL penalty (needed when cfg.kl_coef > 0;
    when given with kl_coef 0 the KL is only measured).
    step: the rollout step's number (from 1), which sets the learning rate
    (`scheduled_lr`); None leaves the optimizer's lr as it is.
    trainer_old: with --old-logprobs trainer, log π_old under the trainer for each record
    (a list of floats, or None for one that is not forwarded), fixed by update_batch
    for the whole rollout batch; None = this step's own detached log-probs.
    The model's mode is left as is (load_policy gives eval mode: no dropout, so the
    log-probs match the sampler's).
    """
    start = time.perf_counter()
    cfg = resolve_config(records, cfg)
    if cfg.kl_coef > 0 and ref_model is None:
        raise GrpoctlError("--kl-coef > 0 needs a reference policy (--ref)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = model.get_input_embeddings().weight.device
    if step is not None:
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(cfg, step)

    # Token weights over all of `records` (the file, or one mini-batch of it): the
    # micro-batches add up to its full loss.
    lengths = [len(r["completion_ids"]) for r in records]
    weights = token_weights(torch.tensor(lengths), cfg.loss_agg, cfg.max_tokens)
    forward = _sequences_to_forward(records, lengths, cfg, ref_model)
    # Under torchrun each rank forwards only its share of the prompt groups; the weights
    # above are over all the records, so the ranks' gradients ADD UP to the full one.
    mine = distributed.my_share(records, forward)  # all of `forward` in one process

    optimizer.zero_grad(set_to_none=True)
    stats = _StepStatistics()
    for first in range(0, len(mine), cfg.micro_batch_size):
        batch = mine[first:first + cfg.micro_batch_size]
        mb = _micro_batch_loss(model, records, batch, cfg, ref_model, trainer_old)
        w = weights[batch].to(device)
        per_sequence = mb.loss_tok.sum(-1) * w  # this micro-batch's share of the full-batch loss
        bad = [batch[j] for j in torch.nonzero(~torch.isfinite(per_sequence)).flatten().tolist()]
        if bad:
            ratio = importance_ratio(mb.logp, mb.old_logp).detach()[mb.mask]
            _refuse(params, f"the loss is not finite ({per_sequence.sum().item()}) at "
                            f"{_describe(records, bad)}: the ratio π_θ/π_old reaches "
                            f"{ratio.max().item():.3g} (were the records' logprobs "
                            f"sampled from this policy?)")
        per_sequence.sum().backward()
        stats.add(mb, w)

    stats.combine_ranks()
    grad_norm = _optimizer_step(model, optimizer, params, cfg, stats.totals["policy_loss"])
    metrics = stats.metrics(cfg, ref_model is not None, grad_norm, optimizer.param_groups[0]["lr"],
                            lengths, len(forward))
    metrics["seconds"] = time.perf_counter() - start
    return _json_safe(metrics)


def _json_safe(metrics: dict) -> dict:
    """JSON has no inf/nan: an overflowing diagnostic (e.g. ratio_max) is reported as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in metrics.items()}


# --- several optimizer steps per rollout batch -----------------------------------


def split_mini_batches(records: list[dict], count: int) -> list[list[int]]:
    """The record indices of each mini-batch: whole prompt groups, in file order.

    The groups (records sharing a prompt_id, ordered by their first record in the file)
    are dealt into `count` contiguous runs as even as possible: with g groups the first
    g mod count runs get one group more than the others. Fewer groups than `count`:
    one group per mini-batch (fewer optimizer steps; `mini_batches` in the metrics says
    how many). Deterministic, so every torchrun rank, and a resumed run, splits alike.
    """
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["prompt_id"], []).append(i)
    ordered = list(groups.values())
    count = max(1, min(count, len(ordered)))  # no records at all: one (empty) step
    size, extra = divmod(len(ordered), count)
    out, first = [], 0
    for k in range(count):
        last = first + size + (1 if k < extra else 0)
        out.append(sorted(i for members in ordered[first:last] for i in members))
        first = last
    return out


def _fixed_trainer_old_logprobs(model, records: list[dict], mini_batches: list[list[int]],
                                cfg: UpdateConfig, ref_model) -> list[list[float] | None]:
    """The trainer's π_old for the whole rollout batch: log π_θ of every record this rank will
    forward in any mini-batch, taken once before the first optimizer step (no gradient,
    no LoRA dropout). The policy moves between optimizer steps; re-taking π_old per
    mini-batch would measure each ratio from a different policy and let the clip see
    only one step's movement. None for records not forwarded.
    """
    mine = []
    for indices in mini_batches:  # the shares update_step will forward, mini-batch by mini-batch
        part = [records[i] for i in indices]
        lengths = [len(r["completion_ids"]) for r in part]
        forward = _sequences_to_forward(part, lengths, cfg, ref_model)
        mine += [indices[j] for j in distributed.my_share(part, forward)]
    mine.sort(key=lambda i: (len(records[i]["prompt_ids"]), records[i]["prompt_ids"]))
    old: list[list[float] | None] = [None] * len(records)
    distributed.gather_weights(model)  # FSDP: gather on every rank at the same point
    with torch.no_grad():
        for first in range(0, len(mine), cfg.micro_batch_size):
            batch = mine[first:first + cfg.micro_batch_size]
            logp, _, mask = padded_completion_logprobs(
                model, [records[i]["prompt_ids"] for i in batch],
                [records[i]["completion_ids"] for i in batch], cfg.temperature, pad_id=0)
            width = mask.shape[1]
            for row, i in enumerate(batch):
                old[i] = logp[row, width - len(records[i]["completion_ids"]):].tolist()
    return old


def _rollout_step_metrics(steps: list[dict], records: list[dict], cfg: UpdateConfig) -> dict:
    """One rollout step's metrics from its optimizer steps' (docs/update.md, Metrics).

    Losses, KL and grad_norm: the mean over the optimizer steps (verl's convention).
    Per-token fractions and means: over every token forwarded in every optimizer step.
    ratio_min / ratio_max / logp_mismatch_max: the extremes over all of them.
    """
    def mean(key):
        values = [s[key] for s in steps if s[key] is not None]
        return sum(values) / len(values) if values else None

    def token_mean(key, empty=None):
        pairs = [(s[key], s["tokens_forwarded"]) for s in steps
                 if s[key] is not None and s["tokens_forwarded"]]
        n = sum(t for _, t in pairs)
        return sum(v * t for v, t in pairs) / n if n else empty

    def extreme(key, pick):
        values = [s[key] for s in steps if s[key] is not None]
        return pick(values) if values else None

    lengths = [len(r["completion_ids"]) for r in records]
    metrics = {
        "loss": mean("loss"),
        "policy_loss": mean("policy_loss"),
        "kl": mean("kl"),
        "clip_fraction": token_mean("clip_fraction", empty=0.0),
        "entropy": token_mean("entropy"),
        "ratio_mean": token_mean("ratio_mean"),
        "ratio_min": extreme("ratio_min", min),
        "ratio_max": extreme("ratio_max", max),
        "logp_mismatch_max": extreme("logp_mismatch_max", max),
        "is_weight_mean": token_mean("is_weight_mean"),
        "is_capped_fraction": token_mean("is_capped_fraction"),
        "grad_norm": mean("grad_norm"),
        "lr": steps[0]["lr"],
        "tokens": sum(lengths),
        "tokens_forwarded": sum(s["tokens_forwarded"] for s in steps),
        "sequences": sum(1 for x in lengths if x > 0),
        "sequences_forwarded": sum(s["sequences_forwarded"] for s in steps),
    }
    if cfg.clip_ratio_c is not None:
        metrics["dual_clip_fraction"] = token_mean("dual_clip_fraction", empty=0.0)
    return metrics


def update_batch(model, optimizer: torch.optim.Optimizer, records: list[dict],
                 cfg: UpdateConfig, ref_model=None, step: int | None = None) -> dict:
    """Every optimizer step of one rollout batch; returns the rollout step's metrics.

    cfg.update_epochs passes over the batch, each split into cfg.mini_batches
    mini-batches of whole prompt groups (`split_mini_batches`): M × E optimizer steps,
    each an `update_step` over its mini-batch alone (its own token weights, so each
    step's loss is exact under micro-batching). π_old stays the behaviour policy for
    the whole batch: the records' logprobs, or (--old-logprobs trainer, the default
    here) the trainer's log-probs taken once before the first step. So from the second optimizer step on ρ moves away
    from 1 and PPO's clip (and the dual clip) act. The learning rate is the rollout
    step's (`scheduled_lr(cfg, step)`) for all M × E steps.

    M = E = 1 is exactly `update_step` over the whole batch, and returns its metrics.
    Otherwise the metrics summarise the optimizer steps (`_rollout_step_metrics`) and
    add mini_batches, update_epochs, optimizer_steps and per_optimizer_step: one dict
    per optimizer step, in order, with `epoch` and `mini_batch` (both from 1) and that
    step's update_step metrics.

    A refused optimizer step raises GrpoctlError naming it; the steps before it have
    already changed the model and optimizer in memory (nothing is saved).
    """
    cfg = resolve_config(records, cfg)
    if cfg.mini_batches == 1 and cfg.update_epochs == 1:
        return update_step(model, optimizer, records, cfg, ref_model, step)
    start = time.perf_counter()
    if cfg.kl_coef > 0 and ref_model is None:
        raise GrpoctlError("--kl-coef > 0 needs a reference policy (--ref)")
    mini_batches = split_mini_batches(records, cfg.mini_batches)
    trainer_old = None
    if cfg.old_logprobs == "trainer":
        trainer_old = _fixed_trainer_old_logprobs(model, records, mini_batches, cfg, ref_model)

    steps: list[dict] = []
    total = len(mini_batches) * cfg.update_epochs
    for epoch in range(1, cfg.update_epochs + 1):
        for m, indices in enumerate(mini_batches, start=1):
            part = [records[i] for i in indices]
            old = None if trainer_old is None else [trainer_old[i] for i in indices]
            try:
                metrics = update_step(model, optimizer, part, cfg, ref_model, step, old)
            except GrpoctlError as e:
                before = len(steps)
                taken = (f"; the {before} optimizer step(s) before it changed the model in "
                         f"memory" if before else "")
                raise GrpoctlError(f"optimizer step {before + 1}/{total} (epoch {epoch}, "
                                   f"mini-batch {m}): {e}{taken}") from None
            steps.append({"epoch": epoch, "mini_batch": m, **metrics})

    metrics = _rollout_step_metrics(steps, records, cfg)
    metrics["seconds"] = time.perf_counter() - start
    metrics.update({"mini_batches": len(mini_batches), "update_epochs": cfg.update_epochs,
                    "optimizer_steps": len(steps), "per_optimizer_step": steps})
    return metrics


# --- the stage, end to end ------------------------------------------------------


def _check_metrics_path(path: str, inputs: list) -> None:
    """--metrics is appended to: a JSONL file of metrics or a new one, never a directory, an
    input, or a file inside the policy, reference or output directory."""
    where = Path(path).absolute()
    if where.is_dir():
        raise GrpoctlError(f"{path}: cannot write metrics: is a directory")
    if not where.parent.is_dir():
        raise GrpoctlError(f"{path}: cannot write metrics: no such directory {where.parent}")
    for given in inputs:
        if given is None or given == STDIO or not Path(given).exists():
            continue
        given = Path(given).resolve()
        if where.resolve() == given or where.resolve().is_relative_to(given):
            raise GrpoctlError(f"{path}: cannot write metrics there: it is (or is inside) "
                               f"{given}, which this command reads or writes")


def check_token_ids(records: list[dict], vocab_size: int, source: str,
                    positions: int | None = None) -> None:
    """Every prompt non-empty, every token id < vocab_size and every sequence within the
    model's `positions` (models.position_limit), or a RecordError naming the line."""
    for i, r in enumerate(records):
        line = line_of(records, i)
        if not r["prompt_ids"]:
            raise RecordError(source, line, "prompt_ids", "is empty: the first completion token "
                              "needs at least one prompt token before it")
        length = len(r["prompt_ids"]) + len(r["completion_ids"])
        if positions is not None and length > positions:
            raise RecordError(source, line, "completion_ids",
                              f"prompt and completion are {length} tokens, more than the "
                              f"model's {positions} positions (max_position_embeddings)")
        for field in ("prompt_ids", "completion_ids"):
            ids = r[field]
            if ids and max(ids) >= vocab_size:
                bad = next(t for t in ids if t >= vocab_size)
                raise RecordError(source, line, field, f"token id {bad} is out of range for a "
                                  f"model with {vocab_size} tokens (sampled with another "
                                  f"tokenizer?)")


def _vocab_size(model) -> int:
    rows = model.get_input_embeddings().num_embeddings
    head = model.get_output_embeddings()
    return min(rows, head.out_features) if head is not None else rows


def run_update(adv_path: str, policy_dir, out_dir, cfg: UpdateConfig,
               model_settings: ModelSettings | None = None, adapter: AdapterSettings | None = None,
               metrics_path: str | None = None) -> dict:
    """`grpoctl update`: read records, take the step's optimizer step(s) from policy_dir
    (`update_batch`: one, or cfg.mini_batches × cfg.update_epochs), save to out_dir.

    The optimizer state is resumed from policy_dir when it holds one (a checkpoint
    this function wrote), and the step count continues from its trainer_state.json.
    cfg.ref, when set, is the reference policy of the KL term. `model_settings` says how the
    policy loads (dtype, device, attention, gradient checkpointing; its `model` field is
    unused: policy_dir is the model); `adapter` the LoRA adapter to attach (lora_r 0:
    full fine-tuning; a policy_dir holding an adapter continues it) and how checkpoints
    save it. metrics_path, when given, gets the metrics appended as one JSON line.
    Under torchrun every rank runs this (distributed.py): each forwards its share, the
    gradients are summed, rank 0 writes; model_settings.fsdp shards the model with FSDP2 instead
    of keeping a whole replica per rank (DDP-style, the default).
    Returns the metrics (with "step").
    """
    from grpoctl.models import (check_model_dir, check_vocab, load_policy, load_tokenizer,
                                load_training_policy, position_limit, resolve_model_dir)

    loading, adapter = model_settings or ModelSettings(), adapter or AdapterSettings()
    for settings in (cfg, loading, adapter):
        settings.check()  # before any model is loaded or anything read
    dtype, device, trust_remote_code = loading.dtype, loading.device, loading.trust_remote_code
    attn_implementation, gradient_checkpointing = (loading.attn_implementation,
                                                   loading.gradient_checkpointing)

    policy_dir = resolve_model_dir(policy_dir)  # `default` = the embedded model
    ref_dir = None if cfg.ref is None else resolve_model_dir(cfg.ref)
    checkpoint.check_out_dir(out_dir, [None if adv_path == STDIO else adv_path, policy_dir,
                                       ref_dir])
    if metrics_path:  # checked now, not after the save
        _check_metrics_path(metrics_path, [adv_path, policy_dir, ref_dir, out_dir])
    source = source_name(adv_path)
    if adv_path == STDIO and distributed.launched():
        raise GrpoctlError("under torchrun every rank reads the whole file: give a path, not -")
    records = read_records(adv_path, NEEDS_UPDATE)
    cfg = dataclasses.replace(cfg, old_logprobs=default_old_logprobs(
        cfg, _one_value(records, "backend", source), (dtype,)))
    cfg = resolve_config(records, cfg, source)

    check_model_dir(policy_dir)  # "not a model directory" rather than a tokenizer error
    device = distributed.init_if_launched(device)  # torchrun: join; cuda = this rank's GPU
    tokenizer = load_tokenizer(policy_dir, trust_remote_code)
    model = load_training_policy(policy_dir, dtype, device, trust_remote_code,
                                 attn_implementation, gradient_checkpointing, adapter)
    check_vocab(tokenizer, model, str(policy_dir))
    check_token_ids(records, _vocab_size(model), source, position_limit(model))
    ref_model = None
    if ref_dir is not None:
        ref_model = load_policy(ref_dir, dtype, device, trust_remote_code,
                                attn_implementation).requires_grad_(False)
        check_token_ids(records, _vocab_size(ref_model), source,
                        position_limit(ref_model))

    model = distributed.wrap_model(model, "fsdp" if loading.fsdp else "ddp")  # before the optimizer
    optimizer = make_optimizer(model, cfg)
    resumed = distributed.load_optimizer_state(optimizer, model, policy_dir)
    step = checkpoint.read_trainer_state(policy_dir)["step"] + 1

    try:
        metrics = {"step": step, **update_batch(model, optimizer, records, cfg, ref_model, step)}
    except GrpoctlError as e:
        raise GrpoctlError(f"step {step} ({source}): {e}") from None
    trainer_state = {
        "step": step,
        "update": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "ref"},
        "optimizer": {"name": "AdamW", "resumed": resumed,
                      "param_groups": checkpoint.optimizer_hyperparameters(optimizer)},
        "dtype": dtype,
        "attn_implementation": attn_implementation,
        "gradient_checkpointing": gradient_checkpointing,
        "lora": ({**lora.describe(model), "save": adapter.save_lora} if lora.has_lora(model)
                 else None),
        "policy": str(policy_dir),
        "reference": None if ref_dir is None else str(ref_dir),
        "records": source,
        "metrics": metrics,
    }
    distributed.save_checkpoint(out_dir, model, tokenizer, optimizer, trainer_state,
                                adapter.save_lora)
    if metrics_path and distributed.is_main():
        try:
            with open(metrics_path, "a", encoding="utf-8") as f:
                # one whole line or none, and an interrupt after it names the file
                # (process.py); the open stays interruptible (a FIFO blocks in it)
                with process.committing(metrics_path):
                    f.write(dumps(metrics) + "\n")
                    f.flush()
        except OSError as e:
            raise GrpoctlError(f"{metrics_path}: cannot write metrics: {e.strerror}") from None
    return metrics
