"""The advantage stage: one number per completion, from the rewards of its group.

A group is the G completions sampled for one prompt (same prompt_id). Every token
of completion i gets the same advantage A_i (the paper's A_{i,t} = A_i).

Estimators (pure functions on lists of floats, then `compute_advantages` for records):

group (GRPO)      A_i = (r_i - mean(r)) / (std(r) + eps)
    std="group"   the group's own std (DeepSeekMath's GRPO, the paper's formula).
    std="batch"   one std over all rewards in the batch (group mean, batch std: "Lite PPO"
                  in Liu et al. 2025, "Tricks or Traps?"; REINFORCE++-style normalisation).
    std="none"    A_i = r_i - mean(r), no division (Dr. GRPO, Liu et al. 2025: dividing by
                  the std over-weights prompts that are almost always right or wrong).
    std is the POPULATION std (divide by G, not G - 1). Then at G = 2 the advantages are
    exactly +-1 (up to eps), as the paper writes them. TRL and verl use the sample std
    (torch.std), which gives +-1/sqrt(2) at G = 2 and in general scales every advantage by
    sqrt((G - 1) / G): a constant per G, absorbed by the learning rate.

pairwise (2-GRPO) exactly two completions per prompt: winner +1, loser -1, tie 0 and 0.
    This IS group normalisation at G = 2: for r_1 > r_2, mean = (r_1 + r_2)/2 and the
    population std = (r_1 - r_2)/2, so A_1 = ((r_1 - r_2)/2) / ((r_1 - r_2)/2) = +1 and
    A_2 = -1 (exactly, without eps). It is also a DPO pair: the winner is the "chosen"
    completion pushed up, the loser the "rejected" one pushed down, with equal weight;
    a tie (both right or both wrong) carries no preference and gives no gradient.

rloo (RLOO)       A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline (Ahmadian et
    al. 2024; Kool et al. 2019). Equal to G/(G-1) x (r_i - mean(r)): Dr. GRPO's estimator,
    scaled. G >= 2.

Estimators live in a registry, `ESTIMATORS` (name -> function), filled by
`@register_estimator(name)` as verl's core_algos does; --estimator's choices, its help
and the docs read it. A new estimator is its function and that one line:

    @register_estimator("mine")
    def mine(rewards, settings, batch_std):   # settings: config.AdvantageSettings
        return [...]                          # one advantage per reward, in order

Every estimator gives exactly 0 to all members of a group whose rewards are all equal:
such a group has no contrast and contributes no gradient. `drop_zero` removes those
groups (DAPO's dynamic sampling filter; the paper's 2-GRPO+RS discards tied pairs).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from collections.abc import Callable

from grpoctl.config import STD_MODES, AdvantageSettings
from grpoctl.errors import GrpoctlError
from grpoctl.records import (NEEDS_ADVANTAGE, RecordError, check_output, group_by_prompt,
                             line_of, read_records, source_name, write_records)

DEFAULT_EPS = AdvantageSettings.adv_eps  # verl's GRPO 1e-6; TRL's GRPOTrainer adds 1e-4

# name -> function(rewards of one group, AdvantageSettings, batch std or None) -> advantages
ESTIMATORS: dict[str, Callable] = {}


def register_estimator(name: str, group_size: int | None = None):
    """Decorator: make the function the estimator `name` (--estimator NAME). group_size:
    the one group size it accepts (pairwise: 2), checked on the records and by `loop`."""
    def register(fn: Callable) -> Callable:
        fn.group_size = group_size
        ESTIMATORS[name] = fn
        return fn
    return register


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean of a non-empty list."""
    return sum(xs) / len(xs)


def population_std(xs: Sequence[float]) -> float:
    """sqrt(mean((x - mean)^2)): divides by n, not n - 1 (see the module docstring)."""
    m = mean(xs)
    deviations = [x - m for x in xs]
    # Scaled by the largest deviation, so squaring tiny differences cannot underflow to 0.
    scale = max(abs(d) for d in deviations)
    if scale == 0:
        return 0.0
    return scale * math.sqrt(sum((d / scale) ** 2 for d in deviations) / len(xs))


def _no_contrast(rewards: Sequence[float]) -> bool:
    return max(rewards) == min(rewards)


def group_advantages(rewards: Sequence[float], std: str = "group", eps: float = DEFAULT_EPS,
                     batch_std: float | None = None) -> list[float]:
    """GRPO advantages of one group: (r - mean) / (std + eps).

    std: "group" (this group's population std, default), "batch" (`batch_std`, the
    population std of all rewards in the batch, required), "none" (Dr. GRPO: r - mean).
    eps: added to the std (default 1e-6, verl's value); ignored for std="none".
    """
    if std not in STD_MODES:
        raise GrpoctlError(f"std must be one of {', '.join(STD_MODES)}; got {std!r}")
    if len(rewards) < 2:
        raise GrpoctlError(f"a group needs at least 2 rewards to compare, got {len(rewards)}")
    if _no_contrast(rewards):
        return [0.0] * len(rewards)
    m = mean(rewards)
    if std == "none":
        return [r - m for r in rewards]
    if std == "batch":
        if batch_std is None:
            raise GrpoctlError("std='batch' needs batch_std, the std of all rewards in the batch")
        scale = batch_std
    else:
        scale = population_std(rewards)
    return [(r - m) / (scale + eps) for r in rewards]


def pairwise_advantages(r1: float, r2: float) -> tuple[float, float]:
    """2-GRPO: (+1, -1) if r1 > r2, (-1, +1) if r1 < r2, (0, 0) on a tie."""
    if r1 > r2:
        return 1.0, -1.0
    if r1 < r2:
        return -1.0, 1.0
    return 0.0, 0.0


def rloo_advantages(rewards: Sequence[float]) -> list[float]:
    """RLOO: r_i minus the mean of the group's other rewards (G >= 2)."""
    g = len(rewards)
    if g < 2:
        raise GrpoctlError(f"RLOO needs at least 2 rewards per group, got {g}")
    if _no_contrast(rewards):
        return [0.0] * g
    total = sum(rewards)
    return [r - (total - r) / (g - 1) for r in rewards]


@register_estimator("group")
def _group(rewards: Sequence[float], settings: AdvantageSettings, batch_std) -> list[float]:
    return group_advantages(rewards, settings.std, settings.adv_eps, batch_std)


@register_estimator("pairwise", group_size=2)
def _pairwise(rewards: Sequence[float], settings: AdvantageSettings, batch_std) -> list[float]:
    return list(pairwise_advantages(*rewards))


@register_estimator("rloo")
def _rloo(rewards: Sequence[float], settings: AdvantageSettings, batch_std) -> list[float]:
    return rloo_advantages(rewards)


# --- records ----------------------------------------------------------------------


def _check_inputs(records: Sequence[dict], source: str) -> None:
    for i, r in enumerate(records):
        line = line_of(records, i)
        if not isinstance(r.get("prompt_id"), str):
            raise RecordError(source, line, "prompt_id", "missing or not a string")
        reward = r.get("reward")
        if reward is None:
            raise RecordError(source, line, "reward", "missing (run `grpoctl score` first)")
        is_number = isinstance(reward, (int, float)) and not isinstance(reward, bool)
        if not (is_number and math.isfinite(reward)):
            raise RecordError(source, line, "reward", f"expected a finite number, got {reward!r}")


def compute_advantages(records: Sequence[dict], settings: AdvantageSettings | None = None,
                       allow_uneven: bool = False,
                       source: str = "<records>") -> tuple[list[dict], dict]:
    """Give every record an `advantage`; return (records in input order, stats).

    settings: estimator (a name in ESTIMATORS), std and adv_eps (for "group"), drop_zero
        (leave out groups whose advantages are all zero: DAPO dynamic sampling); checked.
    allow_uneven: accept groups whose size differs from the most common size (default:
        an error, since it usually means a truncated or concatenated rollout file).
    source: file name for errors (lines as records.line_of finds them).
    Groups are found by prompt_id wherever their records stand (interleaving is fine).
    stats: n, groups, group_size (the most common), sizes {size: groups}, zero_groups,
        zero_fraction, dropped_groups, dropped_records, kept, reward_mean,
        advantage_abs_mean, batch_std (std="batch"), estimator, std.
    """
    settings = settings or AdvantageSettings()
    settings.check()
    estimator, std = settings.estimator, settings.std
    estimate = ESTIMATORS[estimator]
    if not records:
        raise RecordError(source, None, None, "is empty: no records")
    _check_inputs(records, source)

    groups = group_by_prompt(list(records))
    sizes = Counter(len(rows) for rows in groups.values())
    expected = max(sizes, key=lambda s: (sizes[s], s))  # most common; ties -> larger
    for prompt_id, rows in groups.items():
        line = line_of(records, rows[0])
        if len(rows) == 1:
            raise RecordError(source, line, "prompt_id",
                              f"group {prompt_id!r} has 1 sample; advantages compare samples of "
                              "the same prompt, so each needs at least 2 (rollout with "
                              "--group-size 2 or more)")
        if estimate.group_size not in (None, len(rows)):
            raise RecordError(source, line, "prompt_id",
                              f"group {prompt_id!r} has {len(rows)} samples; the {estimator} "
                              f"estimator needs exactly {estimate.group_size} (use another "
                              "--estimator)")
        if len(rows) != expected and not allow_uneven:
            raise RecordError(source, line, "prompt_id",
                              f"group {prompt_id!r} has {len(rows)} samples, expected {expected} "
                              "(the most common size); pass --allow-uneven to accept this")

    rewards = [float(r["reward"]) for r in records]
    batch_std = population_std(rewards) if std == "batch" else None
    advantages = [0.0] * len(records)
    zero_groups: set[str] = set()
    for prompt_id, rows in groups.items():
        group_rewards = [rewards[i] for i in rows]
        values = estimate(group_rewards, settings, batch_std)
        for i, a in zip(rows, values):
            advantages[i] = a
        if all(a == 0.0 for a in values):
            zero_groups.add(prompt_id)

    out = [{**r, "advantage": a} for r, a in zip(records, advantages)
           if not (settings.drop_zero and r["prompt_id"] in zero_groups)]
    stats = {
        "n": len(records),
        "estimator": estimator,
        "std": std if estimator == "group" else None,
        "groups": len(groups),
        "group_size": expected,
        "sizes": dict(sorted(sizes.items())),
        "zero_groups": len(zero_groups),
        "zero_fraction": len(zero_groups) / len(groups),
        "dropped_groups": len(zero_groups) if settings.drop_zero else 0,
        "dropped_records": len(records) - len(out),
        "kept": len(out),
        "reward_mean": mean(rewards),
        "advantage_abs_mean": mean([abs(a) for a in advantages]),
    }
    if batch_std is not None:
        stats["batch_std"] = batch_std
    return out, stats


def advantage_file(records: str, output: str, settings: AdvantageSettings | None = None, *,
                   allow_uneven: bool = False) -> dict:
    """`grpoctl advantage`: the records of the file `records` (`-` = stdin) given their
    advantages into `output` (`-` = stdout), as compute_advantages; return its stats."""
    check_output(output, [records])
    out, stats = compute_advantages(read_records(records, NEEDS_ADVANTAGE), settings,
                                    allow_uneven=allow_uneven, source=source_name(records))
    write_records(out, output)
    return stats
