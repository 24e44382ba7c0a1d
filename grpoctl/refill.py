"""2-GRPO+RS (dynamic sampling): tied groups are replaced by groups of fresh prompts.

A group whose rewards all tie has advantage 0 on every sample: no gradient. With
G = 2 at per-prompt accuracy p that happens to a fraction p² + (1 - p)² of the
pairs, so most of a 2-GRPO step can be dead weight. The paper's v3 ("2-GRPO+RS")
discards tied pairs and samples pairs for new prompts until the step holds its
full number of contrastive pairs, with the rollouts capped at what 16-GRPO spends
on the same prompts; DAPO's dynamic sampling (Yu et al., 2025) is the same rule for
any G. `grpoctl loop --refill` runs it:

    attempt 0   the step's own prompts: the next prompts_per_step of the prompt stream
    attempt k   the next `refill_size` prompts of the stream, while fewer than
                prompts_per_step contrastive groups are kept and the step's rollouts
                stay within --max-rollouts-per-step (config.refill_cap)

The prompt stream (`take_prompts`) is epoch 0's shuffled order, then epoch 1's, and so
on, as DAPO's (and verl's DAPO recipe's) dataloader: refills take the NEXT unused
prompts of the epoch, so no prompt is drawn twice in an epoch, and an epoch ends when
its prompts are consumed, discarded ones included. A step that reaches the end of an
epoch goes on into the next epoch's order (verl's recipe does the same); a prompt the
step already holds from the old epoch is passed over there (consumed for the new epoch:
the step's group trains on it once). The stream position after a step, its
`prompt_cursor`, is in the step's metrics, so a resumed run draws what the uninterrupted
run drew.

Contrastive groups are kept in attempt order up to prompts_per_step; the others
(tied, or beyond the count) are discarded but still count as rollouts and prompts
consumed. Everything here is a pure function of the cursor and the step's files, so a
resumed step repeats the same attempts.
"""

from __future__ import annotations

import math
import random

from grpoctl.records import group_by_prompt


def contrastive_prompts(scored: list[dict]) -> list[str]:
    """The prompt ids whose group has rewards that differ, in order of first appearance."""
    return [pid for pid, rows in group_by_prompt(scored).items()
            if len({scored[i]["reward"] for i in rows}) > 1]


def refill_size(missing: int, kept: int, sampled: int, budget_groups: int) -> int:
    """How many fresh prompts to sample for `missing` more contrastive groups.

    missing / (the step's keep rate so far), rounded up: one attempt usually fills
    the step. The rate is floored at 1/4, so a step where every group tied asks for
    at most 4x what it misses; `budget_groups` (the groups the rollout cap still
    allows) bounds it.
    """
    rate = max(kept / sampled if sampled else 0.0, 0.25)
    return max(0, min(budget_groups, math.ceil(missing / rate)))


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """Epoch `epoch`'s shuffled order of `count` prompts (the one loop.prompts_for_step cuts)."""
    order = list(range(count))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def take_prompts(prompts: list[dict], cursor: int, count: int, seed: int,
                 held: set[str] = frozenset()) -> tuple[list[dict], int]:
    """The next `count` prompts of the stream from position `cursor`, and the position after.

    Position c is prompt epoch_order(N, seed, c // N)[c % N] (N = len(prompts)). A prompt
    whose id is in `held` (the step's, met again past an epoch's end) or already taken
    here is passed over, its position consumed. Fewer than `count` come back only when
    every prompt is already in the step.
    """
    n, taken, ids = len(prompts), [], set(held)
    orders: dict[int, list[int]] = {}
    while len(taken) < count and len(ids) < n:
        epoch, k = divmod(cursor, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        prompt = prompts[orders[epoch][k]]
        cursor += 1
        if prompt["prompt_id"] not in ids:
            ids.add(prompt["prompt_id"])
            taken.append(prompt)
    return taken, cursor
