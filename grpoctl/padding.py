"""Token sequences as one batch for a forward pass: the layout sampler and trainer share.

Why one module: the update compares its recomputed log π_θ(o_t | q, o_<t) with the
sampler's log π_old (the records' `logprobs`), and the two agree (to ~1e-6 in fp32,
an importance ratio of 1 at the first update) only when both forward passes see
each sequence the same way, whatever else is in the batch. The rule:

1. LEFT padding: every row is right-aligned, so the last column holds each row's
   last real token (the sampler appends the next token there for all rows at once,
   and a completion's tokens end at the same column in every row).
2. An attention mask that hides the padding.
3. Explicit position ids that count real tokens only (0, 1, 2, ... from each row's
   first real token), so padding shifts neither rotary nor absolute positions. A
   model left to count positions from the first column gives a padded row other
   numbers (GPT-2, with one learned embedding per position, shows it at once;
   rotary models only a little, which is why the rule is kept explicit).

Both the sampler (rollout/hf.py) and the trainer's log-probs (logprobs.py) build
their batches with the functions below, so the rule lives in one place.

A GRPO batch holds G completions of each prompt. Both run each distinct prompt
once (`distinct_rows`) and give every row that shares it a copy of its KV cache
(`select_cache_rows`); the cache helpers sit here because they follow
transformers' cache API, which both use the same way.

Everything is built on the CPU as torch.long; callers move it to their device.
"""

from __future__ import annotations

import inspect

import torch


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, L] (L = the longest sequence), each row right-aligned:
    row i holds sequences[i] in its last len(sequences[i]) columns, pad_id and mask 0 before.
    pad_id may be any valid token id: masked columns never reach a real token's numbers."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1
    return input_ids, attention_mask


def right_pad(sequences: list[list[int]], pad_id: int,
              length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, length] (default: the longest), each row left-aligned.
    For tokens that continue left-padded rows through a KV cache (logprobs.py): their
    mask is appended to the rows' mask and their positions continue from `next_positions`."""
    length = max(len(s) for s in sequences) if length is None else length
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] of a left-padded batch: each real token's index among its row's
    real tokens (0, 1, 2, ...); padding columns get 0 (masked, never attended to)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def next_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the position of the token that follows each left-padded row, i.e. its number
    of real tokens (one more than the last column's `positions`)."""
    return attention_mask.sum(-1, keepdim=True)


def distinct_rows(sequences: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """(the distinct sequences in first-seen order, the index among them of each row):
    a group's G rows share one prompt, which then runs once."""
    distinct: dict[tuple, int] = {}
    row_of = [distinct.setdefault(tuple(s), len(distinct)) for s in sequences]
    return [list(s) for s in distinct], row_of


# The shortest common prefix worth a pass of its own (a guess, not measured: a chat
# template's system prompt is far longer; the embedded model's "Q: " is not).
MIN_SHARED_PREFIX = 8


def common_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence shares (a chat template's system prompt),
    at most the shortest length minus one: each keeps a token of its own after it."""
    length = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for other in sequences[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return max(length, 0)


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """common_prefix_length where it is worth a pass of its own (MIN_SHARED_PREFIX
    tokens or more, and more than one sequence to share it), else 0."""
    shared = common_prefix_length(sequences) if len(sequences) > 1 else 0
    return shared if shared >= MIN_SHARED_PREFIX else 0


def after_prefix(sequences: list[list[int]], shared: int, pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position ids of the sequences but their first
    `shared` tokens (a common prefix already in the KV cache): the rests left padded,
    the mask over prefix and rest [B, shared + L] (the padding sits between them), the
    positions continuing from the prefix."""
    input_ids, rest_mask = left_pad([s[shared:] for s in sequences], pad_id)
    mask = torch.cat([rest_mask.new_ones((len(sequences), shared)), rest_mask], dim=1)
    return input_ids, mask, shared + positions(rest_mask)


# --- the KV cache shared by the rows of one prompt ---------------------------------


def cache_argument(model) -> str:
    """The name of the forward argument that takes a KV cache: transformers 5.2x renamed
    `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward pass returned (under either name)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def select_cache_rows(cache, rows: torch.Tensor) -> bool:
    """Make row i of the cache a copy of row rows[i], in place (a GRPO group's samples share
    their prompt's cache). False when this cache type cannot do it (some remote code)."""
    if not hasattr(cache, "batch_select_indices"):
        return False
    cache.batch_select_indices(rows)
    return True
