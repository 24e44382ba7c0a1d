"""2-GRPO+RS (dynamic sampling): tied groups are replaced by groups of fresh prompts.

A group whose rewards all tie has advantage 0 on every sample: no gradient. With
G = 2 at per-prompt accuracy p that happens to a fraction p² + (1 - p)² of the
pairs, so most of a 2-GRPO step can be dead weight. The paper's v3 ("2-GRPO+RS")
discards tied pairs and samples pairs for new prompts until the step holds its
full number of contrastive pairs, with the rollouts capped at what 16-GRPO spends
on the same prompts; DAPO's dynamic sampling (Yu et al., 2025) is the same rule for
any G. `grpoctl loop --refill` runs it:

    attempt 0   the step's own prompts (what the step samples without --refill)
    attempt k   `refill_size` prompts the step has not used yet (`fresh_prompts`),
                while fewer than prompts_per_step contrastive groups are kept and
                the step's rollouts stay within --max-rollouts-per-step

Contrastive groups are kept in attempt order up to prompts_per_step; the others
(tied, or beyond the count) are discarded but still count as rollouts consumed.
Everything here is a pure function of the step's files, so a resumed step repeats
the same attempts.
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


def fresh_prompts(prompts: list[dict], used: set[str], count: int, seed: int) -> list[dict]:
    """`count` prompts (or all that are left) whose ids are not in `used`, drawn with `seed`."""
    unused = [p for p in prompts if p["prompt_id"] not in used]
    return random.Random(seed).sample(unused, min(count, len(unused)))
