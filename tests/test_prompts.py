"""Prompt loading (real benchmark files, small hand-written files) and rendering."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from grpoctl.errors import GrpoctlError
from grpoctl.prompts import final_answer, load_prompts, parse_shard, render_prompt


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --- the reference data --------------------------------------------------------


def test_math500_loads_with_defaults(data_dir):
    prompts = load_prompts(str(data_dir / "math500.jsonl"))
    rows = [json.loads(line) for line in (data_dir / "math500.jsonl").open(encoding="utf-8")]
    assert len(prompts) == len(rows) == 500
    # `problem` is picked as the prompt field and `answer` as the answer field.
    assert [p["text"] for p in prompts] == [r["problem"] for r in rows]
    assert [p["answer"] for p in prompts] == [r["answer"] for r in rows]
    assert prompts[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    # The other columns travel as meta, so eval can break results down by them.
    assert prompts[0]["meta"] == {k: rows[0][k] for k in ("solution", "subject", "level")}


def test_gsm8k_loads_with_answer_after(data_dir):
    path = str(data_dir / "gsm8k_test.jsonl")
    prompts = load_prompts(path, answer_after="#### ")
    assert len(prompts) == 1319
    assert prompts[0]["text"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert prompts[0]["answer"] == "18"
    assert all(p["answer"] and "#" not in p["answer"] and "," not in p["answer"] for p in prompts)
    # Without the flag the answer is the whole worked solution.
    raw = load_prompts(path, limit=1)
    assert raw[0]["answer"].endswith("#### 18") and "<<16-3-4=9>>" in raw[0]["answer"]


def test_prompt_ids_are_stable_text_hashes(data_dir):
    path = str(data_dir / "math500.jsonl")
    first, second = load_prompts(path), load_prompts(path)
    assert [p["prompt_id"] for p in first] == [p["prompt_id"] for p in second]
    # Independent computation: sha1 of the UTF-8 prompt text, first 12 hex digits.
    assert first[0]["prompt_id"] == hashlib.sha1(first[0]["text"].encode()).hexdigest()[:12]
    assert len({p["prompt_id"] for p in first}) == 500
    # An id does not depend on where the prompt sits: --limit keeps them.
    limited = load_prompts(path, limit=5)
    assert [p["prompt_id"] for p in limited] == [p["prompt_id"] for p in first[:5]]


def test_shards_partition_the_prompts(data_dir):
    path = str(data_dir / "gsm8k_test.jsonl")
    everything = load_prompts(path, limit=100)
    shards = [load_prompts(path, limit=100, shard=f"{i}/3") for i in range(3)]
    assert [len(s) for s in shards] == [34, 33, 33]
    assert shards[1][0] == everything[1] and shards[2][-1] == everything[98]
    ids = [p["prompt_id"] for s in shards for p in s]
    assert sorted(ids) == sorted(p["prompt_id"] for p in everything)  # each prompt exactly once


def test_embedded_task_is_delegated():
    prompts = load_prompts("arith:test", limit=10, shard="1/2")
    assert len(prompts) == 5
    assert prompts[0]["prompt_id"] == "arith-test-000001"
    assert set(prompts[0]) == {"prompt_id", "text", "answer", "meta"}
    m = prompts[0]["meta"]
    assert str(m["a"] + m["b"] if m["op"] == "+" else m["a"] - m["b"]) == prompts[0]["answer"]


# --- hand-written files -------------------------------------------------------


def test_field_defaults_and_flags(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "Q1", "answer": 7, "src": "a"},
        {"question": "Q2", "answer": None, "src": "b"},
    ])
    prompts = load_prompts(path)
    assert [(p["text"], p["answer"], p["meta"]) for p in prompts] == [
        ("Q1", "7", {"src": "a"}), ("Q2", None, {"src": "b"})]
    # Explicit fields: another prompt column, another answer column, an id column.
    path = write_jsonl(tmp_path / "q.jsonl", [{"x": "hi", "gold": "1", "uid": 5}])
    [p] = load_prompts(path, prompt_field="x", answer_field="gold", id_field="uid")
    assert p == {"prompt_id": "5", "text": "hi", "answer": "1", "meta": {}}


def test_no_answer_column_gives_null_answers(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    assert load_prompts(path)[0]["answer"] is None


def test_duplicate_texts_get_suffixes(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "same"}, {"prompt": "other"},
                                              {"prompt": "same"}, {"prompt": "same"}])
    h = hashlib.sha1(b"same").hexdigest()[:12]
    assert [p["prompt_id"] for p in load_prompts(path)][::2] == [h, f"{h}-2"]
    assert load_prompts(path)[3]["prompt_id"] == f"{h}-3"


def test_csv_keeps_answers_as_written(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('problem,answer\n"two\nlines",007\nsecond,"1,000"\n', encoding="utf-8")
    prompts = load_prompts(str(path))
    assert [(p["text"], p["answer"]) for p in prompts] == [("two\nlines", "007"),
                                                          ("second", "1,000")]
    path.write_text('problem,answer\n"two\nlines",1\n,2\n', encoding="utf-8")
    with pytest.raises(GrpoctlError, match=r"p\.csv:4: field 'problem': empty prompt"):
        load_prompts(str(path))


def test_json_list_and_parquet(tmp_path):
    rows = [{"prompt": "a", "answer": "1", "level": 3}, {"prompt": "b", "answer": "2", "level": 4}]
    (tmp_path / "p.json").write_text(json.dumps(rows), encoding="utf-8")
    from_json = load_prompts(str(tmp_path / "p.json"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    before = set(tmp_path.iterdir())
    from_parquet = load_prompts(str(tmp_path / "p.parquet"))
    assert from_json == from_parquet
    assert from_json[1] == {"prompt_id": hashlib.sha1(b"b").hexdigest()[:12], "text": "b",
                            "answer": "2", "meta": {"level": 4}}
    assert set(tmp_path.iterdir()) == before  # no datasets cache beside the data


def test_stdin(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"prompt": "from stdin"}\n'))
    assert load_prompts("-")[0]["text"] == "from stdin"


@pytest.mark.parametrize("rows, kwargs, message", [
    ([{"prompt": "a"}, {"text": "b"}], {}, r"p\.jsonl:2: field 'prompt': missing"),
    ([{"text": "a"}], {}, r"p\.jsonl:1: no prompt field: none of prompt, problem, question"),
    ([{"prompt": "a"}, {"prompt": ["x"]}], {}, r"p\.jsonl:2: field 'prompt': expected a string"),
    ([{"prompt": "a", "answer": "no marker"}], {"answer_after": "#### "},
     r"p\.jsonl:1: field 'answer': no '#### ' in the answer"),
    ([{"prompt": "a"}], {"answer_field": "gold"}, r"p\.jsonl:1: field 'gold': missing"),
    ([{"prompt": "a", "k": 1}, {"prompt": "b", "k": 1}], {"id_field": "k"},
     r"p\.jsonl:2: field 'k': duplicate id '1', first at .*p\.jsonl:1"),
    ([{"prompt": "a"}], {"shard": "2/2"}, r"--shard: expected I/N"),
    ([{"prompt": "a"}, {"prompt": "b"}], {"shard": "1/4", "limit": 1}, r"shard 1 is empty"),
])
def test_bad_input_names_line_and_field(tmp_path, rows, kwargs, message):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(GrpoctlError, match=message):
        load_prompts(path, **kwargs)


def test_bad_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(GrpoctlError, match=r"p\.jsonl:2: invalid JSON"):
        load_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(GrpoctlError, match="no prompts"):
        load_prompts(str(tmp_path / "e.jsonl"))
    with pytest.raises(GrpoctlError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_final_answer_hand_cases():
    assert final_answer("5 + 5 = 10\n#### 1,234", "#### ") == "1234"
    assert final_answer("a #### b #### -3 ", "#### ") == "-3"  # the LAST marker
    assert final_answer("#### 1,234,567.5", "#### ") == "1234567.5"
    assert final_answer("#### (1, 2)", "#### ") == "(1, 2)"  # not a thousands comma
    assert final_answer("no marker", "#### ") is None
    assert parse_shard("3/8") == (3, 8)


# --- rendering -------------------------------------------------------------------


def test_render_with_chat_template(tiny_qwen2):
    from grpoctl.models import load_tokenizer

    tok = load_tokenizer(tiny_qwen2)
    text = render_prompt(tok, "2+2?", template="Solve: {prompt} Put it in \\boxed{}.")
    assert text == "<user>Solve: 2+2? Put it in \\boxed{}.<assistant>"
    with_system = render_prompt(tok, "2+2?", system="Be brief.")
    assert with_system == "<system>Be brief.<user>2+2?<assistant>"
    assert render_prompt(tok, "2+2?", use_chat_template=False) == "2+2?"
    with pytest.raises(GrpoctlError, match="--system needs a chat template"):
        render_prompt(tok, "2+2?", use_chat_template=False, system="Be brief.")
    with pytest.raises(GrpoctlError, match=r"--template: must contain \{prompt\}"):
        render_prompt(tok, "2+2?", template="no placeholder")


def test_render_without_chat_template_adds_bos_like_the_tokenizer(tiny_model):
    from tokenizers.processors import TemplateProcessing

    from grpoctl.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    assert render_prompt(tok, "hi") == "hi"  # the byte tokenizer adds no BOS
    # A Llama-style tokenizer that puts BOS in front of every text.
    tok.bos_token = "<|endoftext|>"
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)])
    text = render_prompt(tok, "hi")
    assert text == "<|endoftext|>hi"
    # What the model reads (add_special_tokens=False) equals what the tokenizer would make.
    assert tok(text, add_special_tokens=False)["input_ids"] == tok("hi")["input_ids"]


def test_only_newline_ends_a_row(tmp_path):
    """U+2028, U+2029 and U+0085 are ordinary characters inside JSON strings and quoted
    CSV fields; str.splitlines would cut rows there."""
    text = "a\u2028b\u2029c\u0085d"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": text, "answer": "1"}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert [p["text"] for p in load_prompts(str(jsonl))] == [text]
    table = tmp_path / "p.csv"
    table.write_text(f'prompt,answer\n"{text}",1\r\nsecond,2\n', encoding="utf-8")
    assert [(p["text"], p["answer"]) for p in load_prompts(str(table))] == \
        [(text, "1"), ("second", "2")]


def test_a_csv_quote_left_open_is_an_error_not_a_swallowed_file(tmp_path):
    table = tmp_path / "p.csv"
    table.write_text('prompt,answer\nfirst,1\n"second,2\nthird,3\nfourth,4\n', encoding="utf-8")
    with pytest.raises(GrpoctlError, match=r"p\.csv:3: bad CSV row: unexpected end of data"):
        load_prompts(str(table))


@pytest.mark.parametrize("row, fields", [("second", 1), ("second,2,extra", 3)])
def test_a_csv_row_with_more_or_fewer_fields_than_the_header_is_an_error(tmp_path, row, fields):
    table = tmp_path / "p.csv"
    table.write_text(f'prompt,answer\nfirst,1\n\n{row}\n', encoding="utf-8")  # line 4
    with pytest.raises(GrpoctlError, match=rf"p\.csv:4: bad CSV row: {fields} fields, the "
                                           r"header has 2"):
        load_prompts(str(table))
    table.write_text('prompt,answer\nfirst,1\n"two\nlines",2\n', encoding="utf-8")
    assert [(p["text"], p["answer"]) for p in load_prompts(str(table))] == \
        [("first", "1"), ("two\nlines", "2")]
