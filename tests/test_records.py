"""The record format: reading, validation errors (file:line: field), atomic writing."""

from __future__ import annotations

import json
import os

import pytest

from grpoctl.errors import GrpoctlError
from grpoctl.records import (NEEDS_ADVANTAGE, NEEDS_UPDATE, RecordError, atomic_open,
                             group_by_prompt, parse_records, read_records, write_records)

GOOD = {"prompt_id": "p1", "sample": 0, "completion": "x", "completion_ids": [5, 6],
        "logprobs": [-0.5, -1.25], "reward": 1.0, "advantage": 0.5, "prompt_ids": [3],
        "my_field": {"nested": [1, 2]}}


def lines(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_round_trip_keeps_unknown_fields(tmp_path):
    path = tmp_path / "r.jsonl"
    second = dict(GOOD, sample=1, completion="é ∑ \\boxed{1}")
    write_records([GOOD, second], str(path))
    assert read_records(str(path), NEEDS_UPDATE) == [GOOD, second]
    # one compact JSON object per line, UTF-8 kept as is (jq-friendly)
    text = path.read_text(encoding="utf-8").splitlines()
    assert len(text) == 2 and "é ∑" in text[1]


def test_blank_lines_are_skipped():
    assert len(parse_records(b"\n" + lines(GOOD) + b"\n\n", "f")) == 1


@pytest.mark.parametrize("data, require, expected", [
    (b"", (), "f: is empty: no records"),
    (b"\n\n", (), "f: is empty: no records"),
    (b'[{"a": 1}]\n', (), "f:1: looks like a JSON array"),
    (lines(GOOD) + b'{"prompt_id": "p1", "sam', (), "f:2: invalid JSON"),
    (lines(GOOD) + b'\xff{"a": 1}\n', (), "f:2: not valid UTF-8"),
    (b'3\n', (), "f:1: expected a JSON object, got int"),
    (lines({"sample": 0}), NEEDS_ADVANTAGE, "f:1: field 'prompt_id': missing"),
    (lines(dict(GOOD, sample="0")), (), "f:1: field 'sample': expected an integer >= 0"),
    (lines(dict(GOOD, sample=True)), (), "f:1: field 'sample': expected an integer >= 0"),
    (b'{"reward": NaN}\n', (), "f:1: field 'reward': expected a finite number, got nan"),
    (b'{"reward": Infinity}\n', (), "f:1: field 'reward': expected a finite number, got inf"),
    (lines(dict(GOOD, logprobs=[-1.0])), (), "f:1: field 'logprobs': has 1 values but completion_ids has 2"),
    (b'{"logprobs": [-1.0, NaN]}\n', (), "f:1: field 'logprobs': item 1 is nan"),
    (lines(dict(GOOD, logprobs=[-1.0, 0.5])), (), "f:1: field 'logprobs': item 1 is 0.5, a log-probability"),
    (lines(dict(GOOD, completion_ids=[1, -2])), (), "f:1: field 'completion_ids': item 1 is -2"),
    (lines(dict(GOOD, rewards={"math": "1"})), (), "f:1: field 'rewards': component 'math' is '1'"),
    (lines(dict(GOOD, finish_reason="eos")), (), "f:1: field 'finish_reason': expected 'stop' or 'length'"),
    (lines(GOOD, GOOD), (), "f:2: field 'sample': duplicate (prompt_id, sample) = ('p1', 0), first on line 1"),
])
def test_bad_input_names_file_line_and_field(data, require, expected):
    with pytest.raises(RecordError) as e:
        parse_records(data, "f", require)
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_groups_found_wherever_lines_stand():
    records = [{"prompt_id": p} for p in ["a", "b", "a", "c", "b"]]
    assert group_by_prompt(records) == {"a": [0, 2], "b": [1, 4], "c": [3]}


def test_write_refuses_nan_and_leaves_no_file(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(GrpoctlError, match=r"out.jsonl: record 2: cannot write it: "
                       r"field 'reward' is NaN or infinity"):
        write_records([GOOD, {"reward": float("nan")}], str(path))
    assert os.listdir(tmp_path) == []


def test_atomic_open_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half of the new")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["a.jsonl"]  # no temporary file left behind


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    # mkstemp makes 0600 files; a written file must be readable by whoever open() allows
    old = os.umask(0o022)
    try:
        write_records([{"prompt_id": "a", "sample": 0}], str(tmp_path / "r.jsonl"))
        assert (tmp_path / "r.jsonl").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_records([{"prompt_id": "a", "sample": 0}], str(tmp_path / "private.jsonl"))
        assert (tmp_path / "private.jsonl").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_what_can_be_read_can_be_written(tmp_path):
    """The limits at reading (nesting, number size) match what writing can hold."""
    def nested(levels: int):
        value: list = []
        for _ in range(levels - 1):
            value = [value]
        return value

    path = tmp_path / "out.jsonl"
    ok = dict(GOOD, meta=nested(99), big=10 ** 4000)  # the record is level 1: 100 in all
    write_records([ok], str(path))
    assert read_records(str(path)) == [ok]
    with pytest.raises(RecordError, match=r"out.jsonl:1: field 'meta': JSON nested too deeply"):
        parse_records(json.dumps(dict(GOOD, meta=nested(100))).encode(), "out.jsonl")
    with pytest.raises(GrpoctlError, match=r"x.jsonl: record 1: cannot write it: field 'meta' "
                       r"is nested more than 100 levels"):
        write_records([dict(GOOD, meta=nested(100))], str(tmp_path / "x.jsonl"))
    with pytest.raises(RecordError, match=r"in.jsonl:1: a number JSON cannot hold here"):
        parse_records(b'{"x": ' + b"9" * 4301 + b"}", "in.jsonl")
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_check_same_records():
    from grpoctl.records import check_same_records

    before = [dict(GOOD, sample=s, completion_ids=[1, 2]) for s in range(2)]
    after = [dict(r, reward=1.0, extra="kept") for r in before]
    check_same_records(before, after[::-1], "out")  # order and added fields are free
    for changed, message in [
        (after[:1], "1 of the 2 samples of its input are missing"),
        (after + [dict(after[0], sample=5)], "out:3: field 'prompt_id': (prompt_id, sample)"),
        ([after[0], dict(after[1], completion_ids=[1])], "out:2: field 'completion_ids': changed"),
        ([after[0], {k: v for k, v in after[1].items() if k != "completion"}],
         "out:2: field 'completion': missing"),
    ]:
        with pytest.raises(RecordError) as err:
            check_same_records(before, changed, "out")
        assert message in str(err.value)
