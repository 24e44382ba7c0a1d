"""Sampling with transformers: a small decode loop over the model's KV cache.

Why not `model.generate`? Three things the update stage depends on are easier
to see (and to test) in twenty lines than through generate's options:

1. Log-probs. Each sampled token's log-prob is log_softmax(logits / T) in fp32,
   taken BEFORE top-p/top-k truncation: exactly what the update recomputes
   (grpoctl/logprobs.py), so the first update's importance ratio is 1.
2. Left padding. Prompts in a batch are left padded; the attention mask hides
   the padding and explicit position ids count real tokens only, so a prompt
   gets the same numbers alone or beside a longer one (grpoctl/padding.py, the
   layout logprobs.py uses too).
3. Randomness per sequence. Every (prompt, sample) draws from its own random
   stream, seeded by (seed, prompt_id, sample). Output is byte-identical for the
   same seed, and does not depend on the batch size, the other prompts in the
   batch, --limit or --shard (up to float rounding in the logits).

Sampling uses the inverse CDF: one uniform number u per sequence and step, and
the token is the one whose slice of the cumulative probability u falls in (a draw
from the truncated distribution, exact to fp32 rounding: inverse_cdf). It was also
measured against `model.generate` on the tiny test model (see docs/rollout.md).
"""

from __future__ import annotations

import hashlib

import torch

from grpoctl.padding import (after_prefix, cache_argument, distinct_rows, left_pad,
                             next_positions, positions, returned_cache, select_cache_rows,
                             shared_prefix_length)
from grpoctl.rollout.kvcache import preallocate


def sequence_seed(seed: int, prompt_id: str, sample: int) -> int:
    """A 63-bit seed for one (prompt, sample), stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """[len(seeds), steps] float64 numbers in (0, 1], row i drawn from its own generator (on
    CPU). float64: a float32 u has 2^24 values, too coarse to land on the many tokens of a
    150k vocabulary whose probability is below 6e-8."""
    rows = [1.0 - torch.rand(steps, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows)


def truncate(probs: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Zero every token outside the top-k, then outside the nucleus of mass top_p.

    top-k keeps the k most likely tokens (ties at the k-th value are kept too).
    top-p keeps the most likely tokens until their mass reaches top_p: a token
    stays when the mass of the tokens ranked above it is < top_p (so the most
    likely token always stays). Order as in HF and vLLM: top-k, then top-p on
    what top-k left. The result is not renormalised (sampling does not need it).
    """
    if 0 < top_k < probs.shape[-1]:
        values, order = probs.topk(top_k, dim=-1)  # sorted, descending
        kth = values[:, -1:]
        if top_p < 1.0 and bool(((probs >= kth).sum(-1) == top_k).all()):
            # No ties at the k-th value, so the k values are all that top-p needs (sorting
            # the whole vocabulary: the paper's evaluation sampling took 253 ms a step at
            # 128 x 49,152 on 2 cores, 95 ms this way).
            kept = values.masked_fill(~nucleus(values, top_p), 0.0)
            return torch.zeros_like(probs).scatter(-1, order, kept)
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        kept = sorted_probs.masked_fill(~nucleus(sorted_probs, top_p), 0.0)
        probs = probs.scatter(-1, order, kept)
    return probs


def nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where a token of rows sorted in descending order is in the nucleus: the mass of
    the tokens ranked above it is < top_p of the row's mass."""
    mass_above = sorted_probs.cumsum(-1) - sorted_probs
    return mass_above < top_p * sorted_probs.sum(-1, keepdim=True)


def next_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float = 1.0,
                top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens [B], their log-probs [B]).

    logits: [B, V] in fp32. u: [B] uniform numbers in (0, 1].
    temperature 0 is greedy (argmax; log-probs then use temperature 1).
    The log-prob is log_softmax(logits / T) at the token, before top-p/top-k: taken as
    the log of the token's softmax probability (one pass over the vocabulary fewer),
    which is log_softmax's value to fp32 rounding for any token with a chance above
    1e-38 of being drawn (below, fp32's subnormals round it).
    """
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    probs = (logits if temperature == 1 else logits / temperature).softmax(-1)
    tokens = inverse_cdf(truncate(probs, top_p, top_k), u)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """[B]: per row, the token where u * total mass falls in the cumulative probabilities.
    As u > 0, that token has a non-zero probability (a zero one never raises the sum).

    The sums must not be one fp32 cumsum: it stops rising once it nears 1, and every later
    token below fp32's step there (6e-8) could never be drawn (37,640 of a 151,936-token
    vocabulary under random logits). A float64 copy of the row costs more than the rest of
    the sampler (the write alone), so the draw has two levels: fp32 sums of blocks of 256
    tokens, cumulated in float64, pick the block where u falls; then that one block is
    summed token by token in float64, and u's share of the block's mass picks the token.
    A block sum is within ~3e-7 of its own mass (not of the row's): each token's chance
    is its probability to that relative error, however small it is. (Block sums in
    float64: 33 of 74 ms per step at 128 x 49,152 on 2 cores; now 19 ms in all.)
    """
    rows, vocab = probs.shape
    if vocab % block:
        probs = torch.nn.functional.pad(probs, (0, block - vocab % block))
    blocks = probs.view(rows, -1, block)
    sums = blocks.sum(-1).double()  # [B, blocks]
    cumulative = sums.cumsum(-1)
    target = u.double().unsqueeze(-1) * cumulative[:, -1:]
    # the first block whose cumulative sum reaches the target: its sum is > 0
    index = torch.searchsorted(cumulative, target).clamp(max=blocks.shape[1] - 1)
    before = torch.where(index > 0, cumulative.gather(-1, (index - 1).clamp(min=0)), 0.0)
    share = ((target - before) / sums.gather(-1, index)).clamp(0.0, 1.0)  # of the block
    within = blocks.gather(1, index.unsqueeze(-1).expand(rows, 1, block)).squeeze(1)
    within = within.double().cumsum(-1)  # [B, block]
    offset = torch.searchsorted(within, share * within[:, -1:]).squeeze(-1).clamp(max=block - 1)
    return (index.squeeze(-1) * block + offset).clamp(max=vocab - 1)


def rows_kept(done: torch.Tensor) -> torch.Tensor:
    """The rows not done, as indices into the batch: those at the end fill the places of the
    done rows before them, and every other row keeps its place (so a cache that moves rows
    in place copies one row per done row: kvcache.AppendInPlaceLayer.batch_select_indices)."""
    kept = int((~done).sum())
    keep = torch.arange(kept, device=done.device)
    keep[done[:kept].nonzero()[:, 0]] = (~done[kept:]).nonzero()[:, 0] + kept
    return keep


@torch.inference_mode()
def sample_batch(model, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, stop_ids: set[int],
                 pad_id: int, drop_finished: bool = True, share_prefix: bool = True
                 ) -> list[tuple[list[int], list[float], str]]:
    """Generate one completion per prompt; return (completion_ids, logprobs, finish_reason) each.

    A completion ends at its first stop token (included, finish "stop") or after
    max_new_tokens tokens ("length"). Rows with the same prompt (a group's samples)
    share one prefill of that prompt, and with share_prefix (default) the prompts' common
    prefix, when long enough (padding.shared_prefix_length), runs once for all of them
    (bench/bench_hf_rollout.py). With drop_finished (default), finished rows
    leave the batch and its KV cache, so the long tail of a few long completions does
    not pay for the short ones (bench/bench_rollout_tail.py): at once where the cache is
    kvcache's in-place one (a row's copy each), else whenever they make up a quarter of
    the batch (the cache is copied whole). False keeps the batch whole until every row
    is done, the baseline there.
    """
    device = model.get_input_embeddings().weight.device
    u = uniforms(seeds, max_new_tokens).to(device)
    distinct, row_of = distinct_rows(prompt_ids)
    rows = torch.tensor(row_of, device=device)  # row i's prompt is distinct prompt rows[i]
    stop = torch.tensor(sorted(stop_ids), device=device)
    cache_arg = cache_argument(model)

    # The distinct prompts' common prefix (a chat template's system prompt), run once and
    # its cache copied to every prompt, which continues from it: the left padding then
    # sits between the prefix and each prompt's rest (the update's layout, logprobs.py).
    shared = shared_prefix_length(distinct) if share_prefix else 0
    past = {}
    if shared:
        out = model(input_ids=torch.tensor([distinct[0][:shared]], device=device),
                    position_ids=torch.arange(shared, device=device)[None],
                    use_cache=True, logits_to_keep=1)
        prefix_cache = returned_cache(out)
        if select_cache_rows(prefix_cache, torch.zeros(len(distinct), dtype=torch.long,
                                                       device=device)):
            past = {cache_arg: prefix_cache}
    input_ids, mask, position_ids = after_prefix(distinct, shared if past else 0, pad_id)
    input_ids, mask, position_ids = input_ids.to(device), mask.to(device), position_ids.to(device)

    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **past)
    cache, logits = returned_cache(out), out.logits[:, -1][rows]
    if len(distinct) < len(prompt_ids) and not select_cache_rows(cache, rows):
        input_ids, mask = left_pad(prompt_ids, pad_id)  # prefill every row, whole
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions(mask).to(device), use_cache=True, logits_to_keep=1)
        cache, mask = returned_cache(out), mask.to(device)
    else:
        mask = mask[rows]
    can_drop_rows = hasattr(cache, "batch_select_indices")
    # Rows leave an in-place cache at the cost of a row each; any other copies all it holds.
    cheap_drops = preallocate(cache, mask.shape[1] + max_new_tokens)
    next_position = next_positions(mask)  # the first completion token's position

    n = len(prompt_ids)
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
    live = torch.arange(n, device=device)  # the original row of each row in the batch
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        tok, lp = next_tokens(logits.float(), u[live, t], temperature, top_p, top_k)
        tok = tok.masked_fill(done, pad_id)  # rows that finished earlier decode padding
        tokens[live, t], logprobs[live, t] = tok, lp
        done |= torch.isin(tok, stop)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        finished = int(done.sum())
        if drop_finished and can_drop_rows and finished and (
                cheap_drops or finished * 4 >= len(live)):
            keep = rows_kept(done)
            cache.batch_select_indices(keep)
            live, tok, done = live[keep], tok[keep], done[keep]
            mask, next_position = mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=mask,
                    position_ids=next_position + t, use_cache=True, **{cache_arg: cache})
        cache, logits = returned_cache(out), out.logits[:, -1]

    results = []
    for ids, lps in zip(tokens[:, :t + 1].tolist(), logprobs[:, :t + 1].tolist()):
        end = next((i + 1 for i, tok in enumerate(ids) if tok in stop_ids), None)
        if end is None:
            results.append((ids, lps, "length"))
        else:
            results.append((ids[:end], lps[:end], "stop"))
    return results
