"""Advantage estimators, checked against numbers worked out by hand in each test."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grpoctl.config import AdvantageSettings
from grpoctl.advantages import (compute_advantages, group_advantages, pairwise_advantages,
                                population_std, rloo_advantages)
from grpoctl.errors import GrpoctlError
from grpoctl.records import RecordError, read_records

# --- pure functions ---------------------------------------------------------------


def test_group_binary_rewards_population_std():
    # mean 0.5; population std sqrt((4 * 0.25) / 4) = 0.5; (r - 0.5) / 0.5 = +-1
    assert group_advantages([1, 0, 0, 1], eps=0.0) == [1.0, -1.0, -1.0, 1.0]
    # with the default eps = 1e-6: +-0.5 / 0.500001
    a = 0.5 / (0.5 + 1e-6)
    assert group_advantages([1, 0, 0, 1]) == pytest.approx([a, -a, -a, a], abs=1e-15)
    assert a == pytest.approx(0.999998, abs=1e-9)


def test_group_three_rewards_by_hand():
    # r = 0.5, 0.2, 0.9: mean 8/15; deviations -1/30, -1/3, 11/30
    # variance (1 + 100 + 121) / 900 / 3 = 37/450; std = sqrt(37/450) = 0.28674...
    std = math.sqrt(37 / 450)
    assert population_std([0.5, 0.2, 0.9]) == pytest.approx(std, abs=1e-15)
    expected = [(-1 / 30) / std, (-1 / 3) / std, (11 / 30) / std]
    assert expected == pytest.approx([-0.116248, -1.162476, 1.278724], abs=1e-6)
    assert group_advantages([0.5, 0.2, 0.9], eps=0.0) == pytest.approx(expected, abs=1e-12)


def test_group_std_none_is_dr_grpo():
    assert group_advantages([1, 0, 0, 0], std="none") == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages([0.5, 0.2, 0.9], std="none") == pytest.approx(
        [-1 / 30, -1 / 3, 11 / 30], abs=1e-12)


def test_group_batch_std_uses_the_given_std():
    assert group_advantages([1, 0, 0, 0], std="batch", batch_std=0.5, eps=0.0) == [
        1.5, -0.5, -0.5, -0.5]  # (r - 0.25) / 0.5
    with pytest.raises(GrpoctlError, match="needs batch_std"):
        group_advantages([1, 0], std="batch")


def test_equal_rewards_give_exact_zeros():
    for std in ("group", "batch", "none"):
        assert group_advantages([0.1, 0.1, 0.1], std=std, batch_std=0.3, eps=0.0) == [0.0] * 3
    assert rloo_advantages([0.1, 0.1, 0.1]) == [0.0] * 3
    assert pairwise_advantages(0.7, 0.7) == (0.0, 0.0)


def test_rloo_by_hand():
    # 1 - mean(0, 0, 0) = 1;  0 - mean(1, 0, 0) = -1/3
    assert rloo_advantages([1, 0, 0, 0]) == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3], abs=1e-15)
    # 0.5 - (0.2 + 0.9)/2 = -0.05;  0.2 - 0.7 = -0.5;  0.9 - 0.35 = 0.55
    assert rloo_advantages([0.5, 0.2, 0.9]) == pytest.approx([-0.05, -0.5, 0.55], abs=1e-12)
    with pytest.raises(GrpoctlError, match="at least 2"):
        rloo_advantages([1.0])


@given(st.lists(st.floats(-10, 10), min_size=2, max_size=16))
def test_rloo_is_scaled_dr_grpo(rewards):
    g = len(rewards)
    expected = [g / (g - 1) * a for a in group_advantages(rewards, std="none")]
    assert rloo_advantages(rewards) == pytest.approx(expected, abs=1e-9)


def test_pairwise_by_hand():
    assert pairwise_advantages(1.0, 0.0) == (1.0, -1.0)
    assert pairwise_advantages(0.0, 1.0) == (-1.0, 1.0)
    assert pairwise_advantages(0.3, 0.2) == (1.0, -1.0)  # only the order matters
    assert pairwise_advantages(1.0, 1.0) == (0.0, 0.0)


@given(st.floats(-100, 100, allow_subnormal=False), st.floats(-100, 100, allow_subnormal=False))
def test_pairwise_equals_group_normalisation_at_g2(r1, r2):
    group = group_advantages([r1, r2], eps=0.0)
    assert list(pairwise_advantages(r1, r2)) == pytest.approx(group, abs=1e-6)


def test_pairwise_equals_group_with_eps_on_binary_rewards():
    # std of (1, 0) is 0.5, so eps shrinks +-1 to +-0.5/0.500001: within 2e-6 of +-1
    for r1, r2 in [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.0, 0.0)]:
        assert list(pairwise_advantages(r1, r2)) == pytest.approx(
            group_advantages([r1, r2]), abs=2.1e-6)


# --- records ----------------------------------------------------------------------


def _records(groups: list[tuple[str, list[float]]]) -> list[dict]:
    return [{"prompt_id": pid, "sample": s, "reward": r, "extra": f"{pid}/{s}"}
            for pid, rewards in groups for s, r in enumerate(rewards)]


def test_records_get_group_advantages_and_stats():
    records = _records([("a", [1, 0, 0, 1]), ("b", [1, 1, 1, 1]), ("c", [0, 0, 0, 1])])
    out, stats = compute_advantages(records, AdvantageSettings(adv_eps=0.0))
    # c: mean 0.25, population std sqrt((3 * 0.0625 + 0.5625) / 4) = sqrt(0.1875)
    s = math.sqrt(0.1875)
    expected = [1, -1, -1, 1, 0, 0, 0, 0, -0.25 / s, -0.25 / s, -0.25 / s, 0.75 / s]
    assert [r["advantage"] for r in out] == pytest.approx(expected, abs=1e-12)
    assert [r["extra"] for r in out] == [r["extra"] for r in records]  # order, fields kept
    assert "advantage" not in records[0]
    assert stats["groups"] == 3 and stats["group_size"] == 4 and stats["sizes"] == {4: 3}
    assert stats["zero_groups"] == 1 and stats["zero_fraction"] == pytest.approx(1 / 3)
    assert stats["dropped_groups"] == 0 and stats["kept"] == 12
    assert stats["reward_mean"] == pytest.approx(7 / 12)


def test_batch_std_over_the_whole_file():
    records = _records([("a", [1, 0, 0, 0]), ("b", [1, 1, 1, 0])])
    # 4 ones in 8 rewards: batch mean 0.5, population std 0.5
    out, stats = compute_advantages(records, AdvantageSettings(std="batch", adv_eps=0.0))
    # a: (r - 0.25) / 0.5;  b: (r - 0.75) / 0.5
    assert [r["advantage"] for r in out] == [1.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -1.5]
    assert stats["batch_std"] == 0.5


def test_rloo_records():
    out, _ = compute_advantages(_records([("a", [1, 0, 0, 0])]), AdvantageSettings(estimator="rloo"))
    assert [r["advantage"] for r in out] == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3])


def test_pairwise_records_and_zero_fraction():
    records = _records([("a", [1, 1]), ("b", [0, 0]), ("c", [1, 0]), ("d", [0, 1])])
    out, stats = compute_advantages(records, AdvantageSettings(estimator="pairwise"))
    assert [r["advantage"] for r in out] == [0, 0, 0, 0, 1, -1, -1, 1]
    assert stats["zero_fraction"] == 0.5 and stats["group_size"] == 2


def test_drop_zero_removes_groups_without_contrast():
    records = _records([("a", [1, 1]), ("b", [0, 0]), ("c", [1, 0]), ("d", [0, 1])])
    out, stats = compute_advantages(records, AdvantageSettings(estimator="pairwise", drop_zero=True))
    assert [(r["prompt_id"], r["advantage"]) for r in out] == [
        ("c", 1), ("c", -1), ("d", -1), ("d", 1)]
    assert (stats["dropped_groups"], stats["dropped_records"], stats["kept"]) == (2, 4, 4)
    assert stats["zero_fraction"] == 0.5


def test_interleaved_groups_keep_input_order():
    records = [{"prompt_id": "a", "sample": 0, "reward": 1.0},
               {"prompt_id": "b", "sample": 0, "reward": 0.0},
               {"prompt_id": "a", "sample": 1, "reward": 0.0},
               {"prompt_id": "b", "sample": 1, "reward": 0.5}]
    out, stats = compute_advantages(records, AdvantageSettings(adv_eps=0.0))
    assert [(r["prompt_id"], r["advantage"]) for r in out] == [
        ("a", 1.0), ("b", -1.0), ("a", -1.0), ("b", 1.0)]
    assert stats["groups"] == 2


def test_uneven_groups_are_an_error_unless_allowed():
    records = _records([("a", [1, 0]), ("b", [0, 1]), ("c", [1, 0, 0])])
    with pytest.raises(RecordError) as err:
        compute_advantages(records, source="adv.jsonl")
    assert str(err.value) == ("adv.jsonl:5: field 'prompt_id': group 'c' has 3 samples, "
                              "expected 2 (the most common size); pass --allow-uneven to "
                              "accept this")
    out, stats = compute_advantages(records, AdvantageSettings(adv_eps=0.0), allow_uneven=True)
    # c: mean 1/3, population std sqrt(2)/3: (2/3) / (sqrt(2)/3) = sqrt(2), -(1/3)/(sqrt(2)/3)
    c = [r["advantage"] for r in out if r["prompt_id"] == "c"]
    assert c == pytest.approx([math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)])
    assert stats["sizes"] == {2: 2, 3: 1} and stats["group_size"] == 2


@pytest.mark.parametrize("estimator", ["group", "pairwise", "rloo"])
def test_a_group_of_one_is_an_error_for_every_estimator(estimator):
    records = _records([("a", [1, 0]), ("b", [1])])
    with pytest.raises(RecordError) as err:
        compute_advantages(records, AdvantageSettings(estimator=estimator), allow_uneven=True, source="x.jsonl")
    assert str(err.value).startswith("x.jsonl:3: field 'prompt_id': group 'b' has 1 sample;")
    assert "--group-size 2 or more" in str(err.value)


def test_pairwise_needs_exactly_two():
    records = _records([("a", [1, 0, 1]), ("b", [0, 1, 1])])
    with pytest.raises(RecordError) as err:
        compute_advantages(records, AdvantageSettings(estimator="pairwise"), source="x.jsonl")
    assert str(err.value).startswith("x.jsonl:1: field 'prompt_id': group 'a' has 3 samples; "
                                     "the pairwise estimator needs exactly 2")


def test_bad_options_and_records():
    records = _records([("a", [1, 0])])
    with pytest.raises(GrpoctlError, match="--std batch applies to --estimator group only"):
        compute_advantages(records, AdvantageSettings(estimator="rloo", std="batch"))
    with pytest.raises(GrpoctlError, match="--estimator: expected one of group, pairwise, rloo"):
        compute_advantages(records, AdvantageSettings(estimator="ppo"))
    with pytest.raises(GrpoctlError, match="--adv-eps: expected a finite number >= 0"):
        compute_advantages(records, AdvantageSettings(adv_eps=-1.0))
    with pytest.raises(RecordError, match=r"^<records>:2: field 'reward': missing"):
        compute_advantages([records[0], {"prompt_id": "a", "sample": 1}])
    with pytest.raises(RecordError, match=r"^<records>:1: field 'reward': expected a finite"):
        compute_advantages([{"prompt_id": "a", "reward": float("nan")}, records[1]])


def test_errors_name_the_file_and_line_from_a_real_file(tmp_path):
    path = tmp_path / "scored.jsonl"
    rows = [{"prompt_id": "a", "sample": 0, "reward": 1.0},
            {"prompt_id": "a", "sample": 1, "reward": 0.0},
            {"prompt_id": "b", "sample": 0, "reward": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(str(path), require=("prompt_id", "sample", "reward"))
    with pytest.raises(RecordError, match=rf"^{path}:3: field 'prompt_id': group 'b' has 1"):
        compute_advantages(records, source=str(path))
