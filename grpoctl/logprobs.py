"""Log-probabilities of completion tokens under a policy, in one forward pass.

The update recomputes log π_θ(o_t | q, o_<t) for every completion token and
compares it with the sampler's log π_old (the records' `logprobs`). The two
only agree (to ~1e-6 in fp32) when the forward pass sees the sequences exactly
as the sampler did: LEFT padding and explicit position ids that count real
tokens only, so padding shifts neither the attention nor the rotary positions.
Both build their batches with grpoctl/padding.py, which states the rule once.

Layout of one batch (P = prompt, C = completion, . = pad), left padded:

    . . P P P C C C        completion tokens end at the last column, so the
    . P P P P P C C        last Tc columns of every row hold its completion
    P P P P C C C C        (Tc = the longest completion), right-aligned.

The logits at column j predict the token at column j + 1, so the completion
tokens (the last Tc columns) are scored by the logits of the Tc columns before
them. The model is asked for those logits only (`logits_to_keep`), which skips
the vocabulary projection over the prompt.

A GRPO batch holds G completions of each prompt. When prompts repeat, each
distinct prompt is run once and its KV cache is shared by its completions
(`_shared_prompt_logits`): two passes, prompts then completions (each opened by
its prompt's last token, so all the logits come from that pass), with gradients
flowing back through the shared cache. Same numbers up to float rounding
(~1e-6), G times less work on the prompt tokens, which at G = 16 are most of
the tokens. The prompts' common prefix (a chat template's system prompt) is run
once the same way, in a pass before theirs.
"""

from __future__ import annotations

import inspect

import torch

from grpoctl.distributed import is_fsdp
from grpoctl.models import is_gradient_checkpointing
from grpoctl.padding import (after_prefix, cache_argument, distinct_rows, left_pad,
                             next_positions, positions, returned_cache, right_pad,
                             select_cache_rows, shared_prefix_length)


def _keep_logits(model, n: int) -> dict:
    """Ask for the last n columns' logits only, where the model supports it (standard
    transformers models do; remote code may not: it then returns every column)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": n}
    return {}


def _embedded(model, id_tensors: list[torch.Tensor], device) -> list[dict]:
    """The forward inputs of several passes, embedded in one lookup: a lookup of its own
    per pass would give the backward one more dense [vocab, hidden] embedding gradient
    each (113 MB on SmolLM2, written afresh). Not under FSDP: its weights are gathered
    by the model's own forward, not by a lookup from outside it."""
    if is_fsdp(model) or "inputs_embeds" not in inspect.signature(model.forward).parameters:
        return [{"input_ids": t.to(device)} for t in id_tensors]
    flat = model.get_input_embeddings()(torch.cat([t.flatten() for t in id_tensors]).to(device))
    pieces = flat.split([t.numel() for t in id_tensors])
    return [{"inputs_embeds": e.view(*t.shape, flat.shape[-1])}
            for t, e in zip(id_tensors, pieces)]


def _shared_prompt_logits(model, prompts: list[list[int]], prompt_of_row: list[int],
                          completion_ids: list[list[int]], pad_id: int, tc: int, device):
    """Logits [B, Tc, V] scoring each completion token, LEFT-aligned (column j scores
    completion token j), with each distinct prompt run once.

    0. The distinct prompts' common prefix (a chat template's system prompt, often
       half of each prompt), when it is long enough: run once, its cache copied to
       every prompt, which continues from it.
    1. The distinct prompts but their last token, left padded: their KV cache.
    2. The cache rows repeated for the rows that share a prompt (an indexing op, so the
       gradient of every copy flows back to the one prompt pass).
    3. Each row's last prompt token then its completion, right padded, after the cache:
       the attention mask is the prompt's mask then the completion's, positions
       continue from the cache's length. The logits at column j score completion token
       j, so they all come from this pass and the output layer's weight gets its
       gradient from one matmul (with a tied embedding, 113 MB on SmolLM2).
    Returns None when the model's cache cannot be indexed by row (some remote code), or
    a prompt is a single token.
    """
    if min(len(p) for p in prompts) < 2:
        return None
    prompts_but_last = [p[:-1] for p in prompts]
    shared = shared_prefix_length(prompts_but_last)
    ids, prompt_mask, prompt_positions = after_prefix(prompts_but_last, shared, pad_id)
    completions, completion_mask = right_pad(
        [[prompts[r][-1]] + list(c) for r, c in zip(prompt_of_row, completion_ids)], pad_id,
        tc + 1)
    prefix_input, prompt_input, completion_input = _embedded(
        model, [torch.tensor([prompts[0][:shared]], dtype=torch.long), ids, completions], device)
    past = {}
    if shared:  # 0. the common prefix, its cache copied to every prompt
        out = model(**prefix_input, position_ids=torch.arange(shared, device=device)[None],
                    use_cache=True, **_keep_logits(model, 1))
        prefix_cache = returned_cache(out)
        if not select_cache_rows(prefix_cache, torch.zeros(len(prompts), dtype=torch.long,
                                                           device=device)):
            return None
        past = {cache_argument(model): prefix_cache}
    prompt_mask = prompt_mask.to(device)  # over the prefix too, the padding after it
    out = model(**prompt_input, attention_mask=prompt_mask,
                position_ids=prompt_positions.to(device),
                use_cache=True, **_keep_logits(model, 1), **past)  # (its logits go unused)
    rows = torch.tensor(prompt_of_row, device=device)
    cache = returned_cache(out)
    if not select_cache_rows(cache, rows):  # now cache[i] = the cache of row i's prompt
        return None

    start = next_positions(prompt_mask)[rows]  # each row's prompt length less one
    out = model(**completion_input, attention_mask=torch.cat(
                [prompt_mask[rows], completion_mask.to(device)], dim=1),
                position_ids=start + torch.arange(tc + 1, device=device),
                use_cache=True, **{cache_argument(model): cache})
    return out.logits[:, :-1]


class _TargetLogProbs(torch.autograd.Function):
    """log softmax(z)[target] and (no gradient) the entropy of softmax(z), z = [B, T, V]
    logits, with the softmax computed once and kept for the gradient,

        d log p_t / d z_v = [v = t] - p_v,

    instead of autograd's logsumexp, gather and their backward: each is a pass over
    [B, T, V] into a fresh buffer, and those passes were a tenth of an update step
    on SmolLM2 (49k-token vocabulary) on a CPU."""

    @staticmethod
    def forward(ctx, logits, targets, with_entropy: bool):
        lse = torch.logsumexp(logits, -1)
        logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        entropy = None
        if with_entropy or ctx.needs_input_grad[0]:
            logp_all = torch.sub(logits, lse.unsqueeze(-1))
            probs = logp_all.exp()
            if with_entropy:  # H = -Σ p log p  (einsum: no [B, T, V] product)
                entropy = -torch.einsum("btv,btv->bt", probs, logp_all)
                ctx.mark_non_differentiable(entropy)
            del logp_all
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(probs, targets)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        probs, targets = ctx.saved_tensors
        grad = probs * -grad_logp.unsqueeze(-1)
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1))
        return grad, None, None


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     with_entropy: bool):
    """log softmax(logits / T) at each target, and (no gradient) each row's entropy."""
    logits = logits.float()  # fp32 for the softmax
    if temperature != 1.0:
        logits = logits / temperature
    return _TargetLogProbs.apply(logits, targets, with_entropy)


def padded_completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                               temperature: float | None = 1.0, pad_id: int = 0,
                               with_entropy: bool = False):
    """Like `completion_logprobs`, but as right-aligned [B, Tc] tensors plus their mask.

    Returns (logprobs, entropies or None, mask): row i holds completion i in its
    last len(completion_ids[i]) columns; mask is True there. Masked entries are 0.
    Gradients flow through `logprobs`; entropies are computed without them.
    """
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (nothing predicts the first "
                         "completion token otherwise)")
    temperature = 1.0 if not temperature else float(temperature)  # 0 = greedy: scored at T = 1
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = left_pad([list(p) + list(c) for p, c in zip(prompt_ids,
                                                                           completion_ids)], pad_id)
    position_ids = positions(attention_mask)
    tc = max(len(c) for c in completion_ids)  # the longest completion
    lengths = torch.tensor([len(c) for c in completion_ids])
    mask = torch.arange(tc).unsqueeze(0) >= (tc - lengths).unsqueeze(1)  # [B, Tc]
    if tc == 0:
        empty = torch.zeros((len(completion_ids), 0), device=device)
        return empty, (empty.clone() if with_entropy else None), mask.to(device)

    distinct, prompt_of_row = distinct_rows(prompt_ids)
    logits = None  # [B, Tc, V]
    right_aligned = True
    # A prompt repeats: run it once, share its cache. Not under gradient checkpointing
    # (models.py): a layer that writes a cache cannot be replayed, so it would keep
    # its activations and the memory saving would be lost.
    if len(distinct) < len(prompt_ids) and not (torch.is_grad_enabled()
                                               and is_gradient_checkpointing(model)):
        logits = _shared_prompt_logits(model, distinct, prompt_of_row, completion_ids, pad_id,
                                       tc, device)
    if logits is not None:
        targets, right_aligned = right_pad(completion_ids, pad_id, tc)[0], False
    else:  # one pass over prompt + completion
        input_ids, attention_mask, position_ids = (
            t.to(device) for t in (input_ids, attention_mask, position_ids))
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=False, **_keep_logits(model, tc + 1))
        logits = out.logits[:, -(tc + 1):-1, :]  # the Tc columns before each completion token
        targets = input_ids[:, -tc:]
    logprobs, entropies = _target_logprobs(logits, targets.to(device), temperature, with_entropy)
    mask = mask.to(device)
    if not right_aligned:
        # Column c of row i takes its token c - (Tc - length_i), on [B, Tc] values rather
        # than on the [B, Tc, V] logits; columns before the completion are masked below.
        source = (torch.arange(tc) - (tc - lengths).unsqueeze(1)).clamp(min=0).to(device)
        logprobs = logprobs.gather(1, source)
        entropies = None if entropies is None else entropies.gather(1, source)
    logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    if entropies is not None:
        entropies = torch.where(mask, entropies, torch.zeros_like(entropies))
    return logprobs, entropies, mask


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        temperature: float | None = 1.0, pad_id: int = 0,
                        with_entropy: bool = False):
    """Per-token log π(o_t | q, o_<t) of each completion, from one batched forward pass.

    Args:
        model: a causal LM (transformers); its mode (eval/train) is left as is.
        prompt_ids, completion_ids: token ids per sequence; every prompt non-empty.
        temperature: logits are divided by it before the softmax, as the sampler
            did (default 1.0; 0 or None mean greedy sampling, scored at 1.0, like
            the records' `logprobs`).
        pad_id: id written into padding columns (masked out; any valid id works).
        with_entropy: also return each token's entropy of the full distribution
            (computed under no_grad).

    Returns (logprobs, entropies): lists of 1-D fp32 tensors, one per sequence,
    of length len(completion_ids[i]); entropies is None unless asked for.
    """
    logprobs, entropies, mask = padded_completion_logprobs(
        model, prompt_ids, completion_ids, temperature, pad_id, with_entropy)
    lengths = mask.sum(-1).tolist()
    tc = mask.shape[1]
    per_seq = [logprobs[i, tc - n:] for i, n in enumerate(lengths)]
    per_seq_entropy = None
    if entropies is not None:
        per_seq_entropy = [entropies[i, tc - n:] for i, n in enumerate(lengths)]
    return per_seq, per_seq_entropy
