"""Mean@k and Pass@k, overall and per `--by` value, against counts worked out by hand."""

from __future__ import annotations

import pytest

from grpoctl.errors import GrpoctlError
from grpoctl.evaluate import pass_at_k, summarize


def test_pass_at_k_by_hand():
    # n = 4 samples, c = 1 correct, k = 2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # c = 2, k = 2: 1 - C(2, 2) / C(4, 2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 3, 1) == pytest.approx(0.75)  # k = 1 is the fraction correct
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def scored(prompt_id: str, rewards: list[float], subject: str | None) -> list[dict]:
    meta = {} if subject is None else {"subject": subject}
    return [{"prompt_id": prompt_id, "sample": i, "reward": r, "rewards": {"math": r},
             "meta": meta} for i, r in enumerate(rewards)]


def test_summary_and_breakdown_by_hand():
    records = (scored("a", [1, 0, 0, 0], "algebra") + scored("b", [1, 1, 0, 0], "algebra")
               + scored("c", [0, 0, 0, 0], "geometry") + scored("d", [1, 1, 1, 1], None))
    summary = summarize(records, k=2, by="subject")
    # Mean@2 per prompt: 1/4, 2/4, 0, 1; Pass@2: 1/2, 5/6, 0, 1
    assert summary["mean_at_k"] == pytest.approx((0.25 + 0.5 + 0 + 1) / 4)
    assert summary["pass_at_k"] == pytest.approx((0.5 + 5 / 6 + 0 + 1) / 4)
    assert (summary["k"], summary["prompts"], summary["samples"]) == (2, 4, 16)
    by = summary["by"]["subject"]
    assert set(by) == {"algebra", "geometry", "None"}
    assert by["algebra"]["mean_at_k"] == pytest.approx(0.375)
    assert by["algebra"]["pass_at_k"] == pytest.approx((0.5 + 5 / 6) / 2)
    assert by["geometry"] == {"mean_at_k": 0.0, "pass_at_k": 0.0, "prompts": 1}
    assert by["None"]["prompts"] == 1


def test_a_by_column_no_record_has_is_an_error():
    records = scored("a", [1, 0], "algebra") + scored("b", [0, 0], "geometry")
    with pytest.raises(GrpoctlError, match=r"--by level: no record has meta.level \(the prompt "
                                           r"file's columns are: subject\)"):
        summarize(records, by="level")
