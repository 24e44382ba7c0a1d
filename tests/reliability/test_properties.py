"""Property-based: any valid record file survives the rollout-free stages.

Hypothesis draws record files (groups of any size, interleaved in any order, blank
lines and CRLF endings, unknown fields holding any JSON value, any Unicode text,
lone surrogates included) and runs them through score then advantage exactly as
the CLI does: read_records, the stage function, write_records, and back. After
both stages every record is still there, in its place, with every field it came
with unchanged, and the groups (prompt_id -> samples) are the same groups.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from conftest import run_in_process
from hypothesis import strategies as st

from grpoctl.config import AdvantageSettings, ScoreSettings
from grpoctl.advantages import compute_advantages
from grpoctl.records import (FIELD_CHECKS, NEEDS_ADVANTAGE, NEEDS_SCORE, group_by_prompt,
                             read_records, write_records)
from grpoctl.rewards import score_records

# Any Unicode code point, with lone surrogates (JSON can carry them as \ud800) and the
# characters JSON must escape made common.
ANY_CHAR = st.characters(codec=None, categories=None) | st.characters(
    min_codepoint=0xD800, max_codepoint=0xDFFF) | st.sampled_from('\x00\n\r\t"\\{}\u2028')
TEXT = st.text(ANY_CHAR, max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12)
KNOWN = set(FIELD_CHECKS)
UNKNOWN_FIELDS = st.dictionaries(TEXT.filter(lambda k: k not in KNOWN), JSON_VALUES, max_size=3)
COMPLETIONS = st.one_of(TEXT, st.integers(-50, 50).map(lambda n: f"so \\boxed{{{n}}}"),
                        st.integers(0, 9).map(lambda n: f"the answer is {n}"))


@st.composite
def record_files(draw):
    """(records, file bytes): complete groups, shuffled, with odd but valid formatting."""
    group_size = draw(st.integers(2, 4))
    prompt_ids = draw(st.lists(TEXT, min_size=1, max_size=5, unique=True))
    records = []
    for pid in prompt_ids:
        answer = str(draw(st.integers(-50, 50)))
        for sample in draw(st.permutations(range(group_size))):
            records.append({"prompt_id": pid, "sample": sample, "completion": draw(COMPLETIONS),
                            "answer": answer, **draw(UNKNOWN_FIELDS)})
    records = draw(st.permutations(records))
    lines = []
    for r in records:
        lines += [""] * draw(st.integers(0, 1))  # blank lines are skipped
        line = json.dumps(r, ensure_ascii=draw(st.booleans()))
        if has_surrogate(line):
            line = json.dumps(r)  # a lone surrogate has no UTF-8 form: only \ud800 spells it
        lines.append(line)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    data = newline.join(lines) + draw(st.sampled_from(["", newline]))
    return list(records), data.encode("utf-8")


def has_surrogate(value) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    return False


def groups(records: list[dict]) -> dict[str, list[int]]:
    return {pid: sorted(records[i]["sample"] for i in ix)
            for pid, ix in group_by_prompt(records).items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=record_files(), estimator=st.sampled_from(["group", "rloo", "pairwise"]),
       drop_zero=st.booleans())
def test_score_then_advantage_keep_every_field_and_every_group(case, estimator, drop_zero,
                                                                tmp_path_factory):
    records, data = case
    if estimator == "pairwise" and len(groups(records)[records[0]["prompt_id"]]) != 2:
        estimator = "group"  # pairwise is for G = 2 only
    tmp = tmp_path_factory.mktemp("prop")
    (tmp / "rollouts.jsonl").write_bytes(data)

    # score, as `grpoctl score rollouts.jsonl -o scored.jsonl` runs it
    rows = read_records(str(tmp / "rollouts.jsonl"), NEEDS_SCORE)
    assert rows == records
    score = ScoreSettings(["math", "format=0.25"], score_workers=0, score_timeout=1.0)
    scored, stats = score_records(rows, score, progress=False)
    write_records(scored, str(tmp / "scored.jsonl"))
    scored = read_records(str(tmp / "scored.jsonl"), NEEDS_ADVANTAGE)
    assert len(scored) == len(records) and stats["n"] == len(records)
    for before, after in zip(records, scored):
        assert {k: v for k, v in after.items() if k not in ("reward", "rewards")} == before
        assert set(after["rewards"]) == {"math", "format"}
        assert after["reward"] == after["rewards"]["math"] + 0.25 * after["rewards"]["format"]

    # advantage, as `grpoctl advantage scored.jsonl -o advantages.jsonl` runs it
    out, _ = compute_advantages(scored, AdvantageSettings(estimator=estimator, drop_zero=drop_zero))
    write_records(out, str(tmp / "advantages.jsonl"))
    out = read_records(str(tmp / "advantages.jsonl")) if out else []
    by_group = group_by_prompt(scored)
    tied = {pid for pid, ix in by_group.items() if len({scored[i]["reward"] for i in ix}) == 1}
    kept = [r for r in scored if not (drop_zero and r["prompt_id"] in tied)]
    assert [{k: v for k, v in r.items() if k != "advantage"} for r in out] == kept
    assert groups(out) == {pid: s for pid, s in groups(scored).items() if pid in
                           {r["prompt_id"] for r in kept}}
    for pid, ix in group_by_prompt(out).items():
        advantages = [out[i]["advantage"] for i in ix]
        assert all(math.isfinite(a) for a in advantages)
        assert abs(sum(advantages)) < 1e-6 * len(advantages)  # every estimator centres a group
        if pid in tied:
            assert advantages == [0.0] * len(advantages)
        if estimator == "pairwise":
            assert sorted(advantages) in ([-1.0, 1.0], [0.0, 0.0])


def test_the_strategy_reaches_the_odd_cases():
    """The generator does produce the cases the property is about (else it proves little)."""
    seen = dict.fromkeys(["surrogate", "crlf", "blank", "nested", "interleaved"], False)

    @settings(max_examples=50, deadline=None, database=None, derandomize=True)  # stable
    @given(record_files())
    def look(case):
        records, data = case
        seen["surrogate"] |= any(has_surrogate(r) for r in records)
        seen["crlf"] |= b"\r\n" in data
        seen["blank"] |= b"\n\n" in data or b"\r\n\r\n" in data
        seen["nested"] |= any(isinstance(v, (dict, list)) and bool(v)
                              for r in records for v in r.values())
        pids = [r["prompt_id"] for r in records]
        seen["interleaved"] |= any(pids[i] != pids[i + 1] and pids[i] in pids[i + 2:]
                                   for i in range(len(pids) - 2))

    look()
    assert all(seen.values()), seen


# --- any bytes at all: exit 0, or exit 2 with one line; never a traceback ----------------

VALID_LINE = json.dumps({"prompt_id": "p", "sample": 0, "completion": "so \\boxed{4}",
                         "answer": "4", "reward": 1.0}).encode()
LINES = st.one_of(
    st.binary(max_size=60),
    st.builds(lambda b: VALID_LINE[:len(VALID_LINE) // 2] + b, st.binary(max_size=8)),  # cut
    st.sampled_from([b"[]", b"{}", b"null", b'{"prompt_id": 1}', b"\xef\xbb\xbf{}", b"\xff",
                     b'{"a": ' * 200, b'{"sample": 1e999}', b"1" * 5000]))


def run_stage(argv: list[str], data: bytes, tmp_path, monkeypatch, capfd) -> tuple[int, str]:
    """`grpoctl ARGV` in this process with `data` on stdin: (status, stderr)."""
    code, _, err = run_in_process(argv, tmp_path, monkeypatch, capfd, stdin=data)
    return code, err


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES, min_size=1, max_size=3), valid_first=st.booleans(),
       stage=st.sampled_from([["score", "--workers", "1"], ["advantage"],
                              ["eval", "--scored", "-"]]))
def test_any_bytes_as_record_lines_exit_0_or_2_with_one_line(lines, valid_first, stage,
                                                             tmp_path, monkeypatch, capfd):
    data = b"\n".join(([VALID_LINE] if valid_first else []) + lines) + b"\n"
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)  # hypothesis runs every example in the same tmp_path
    argv = [*stage, "-"] if stage[0] != "eval" else stage
    if stage[0] != "eval":
        argv += ["-o", str(out)]
    code, err = run_stage(argv, data, tmp_path, monkeypatch, capfd)
    assert code in (0, 2), err
    assert "Traceback" not in err, err
    if code == 2:
        errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
        assert not out.exists()


def test_the_any_bytes_runner_passes_valid_records(tmp_path, monkeypatch, capfd):
    """The runner above is not an always-exit-2 machine: valid records go through."""
    pair = VALID_LINE + b"\n" + VALID_LINE.replace(b'"sample": 0', b'"sample": 1') + b"\n"
    for stage in (["score", "--workers", "1", "-"], ["advantage", "-"]):
        code, err = run_stage([*stage, "-o", str(tmp_path / "out.jsonl")], pair, tmp_path,
                              monkeypatch, capfd)
        assert code == 0, err
    code, err = run_stage(["eval", "--scored", "-"], pair, tmp_path, monkeypatch, capfd)
    assert code == 0, err
