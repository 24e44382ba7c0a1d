"""The embedded arith task and the shipped default model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from grpoctl.errors import GrpoctlError
from grpoctl.task import TEMPLATES, careless_completion, load_split, reference_completion

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "grpoctl" / "default_model"


def triple(item: dict) -> tuple[int, str, int]:
    m = item["meta"]
    return m["a"], m["op"], m["b"]


def test_split_sizes_ids_and_shape():
    train, test = load_split("arith:train"), load_split("arith:test")
    assert len(train) == 4000 and len(test) == 200
    assert train[123]["prompt_id"] == "arith-train-000123"
    assert test[0]["prompt_id"] == "arith-test-000000"
    for item in train + test:
        assert set(item) == {"prompt_id", "text", "answer", "meta"}
        assert isinstance(item["answer"], str)
    # half additions, half subtractions in each split
    assert sum(it["meta"]["op"] == "+" for it in test) == 100
    assert sum(it["meta"]["op"] == "+" for it in train) == 2000


def test_splits_are_deterministic():
    assert load_split("arith:train") == load_split("arith:train")
    assert load_split("arith:test") == load_split("test")  # unprefixed name accepted


def test_splits_are_disjoint_and_have_no_repeats():
    train = {triple(it) for it in load_split("arith:train")}
    test = [triple(it) for it in load_split("arith:test")]
    assert len(set(test)) == 200          # no problem repeats inside a split
    assert len(train) == 4000
    assert not train & set(test)          # no test problem is a training problem
    assert len({it["text"] for it in load_split("arith:train")}) == 4000


def test_answers_are_the_right_integers():
    for item in load_split("arith:train")[:500] + load_split("arith:test"):
        a, op, b = triple(item)
        assert 10 <= a <= 99 and 10 <= b <= 99
        expected = a + b if op == "+" else a - b
        assert expected > 0
        assert item["answer"] == str(expected)
        # the numbers appear in the text in order, and the wording matches the operation
        assert re.findall(r"\d+", item["text"]) == [str(a), str(b)]
        # the text is the named template of this operation, filled with these numbers
        template = TEMPLATES[op][item["meta"]["template"]]
        pattern = re.escape(template).replace(r"\{n\}", r"[A-Z][a-z]+").replace(r"\{o\}", r"[a-z]+")
        pattern = pattern.replace(r"\{a\}", str(a)).replace(r"\{b\}", str(b))
        assert re.fullmatch(pattern, item["text"]), (pattern, item["text"])


def test_hand_worked_items():
    # Worked by hand: whatever the wording, 57 + 37 = 94 and 84 - 57 = 27.
    add = {"meta": {"a": 57, "op": "+", "b": 37}, "answer": "94"}
    sub = {"meta": {"a": 84, "op": "-", "b": 57}, "answer": "27"}
    assert reference_completion(add) == "57 + 37 = 94. \\boxed{94}"
    assert reference_completion(sub) == "84 - 57 = 27. \\boxed{27}"
    # the careless variant swaps the last two digits of the box only
    assert careless_completion(add) == "57 + 37 = 94. \\boxed{49}"
    assert careless_completion({"meta": {"a": 57, "op": "+", "b": 97}, "answer": "154"}) == \
        "57 + 97 = 154. \\boxed{145}"
    # nothing to swap: one digit, or two equal last digits
    assert careless_completion({"meta": {"a": 50, "op": "-", "b": 45}, "answer": "5"}).endswith("\\boxed{5}")
    assert careless_completion({"meta": {"a": 78, "op": "-", "b": 12}, "answer": "66"}).endswith("\\boxed{66}")


def test_reference_completion_is_short_and_ends_in_the_boxed_answer():
    for item in load_split("arith:test"):
        ref = reference_completion(item)
        assert ref.endswith("\\boxed{" + item["answer"] + "}")
        assert len(ref.encode()) <= 27  # byte tokenizer: 1 byte = 1 token, + EOS fits in 32


def test_unknown_split_is_a_one_line_error():
    with pytest.raises(GrpoctlError, match="arith:train or arith:test"):
        load_split("arith:validation")


# --- the shipped default model -------------------------------------------------


def test_default_model_files_are_small_and_safetensors():
    files = {f.name: f.stat().st_size for f in DEFAULT_MODEL.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert sum(files.values()) < 5_000_000


def test_default_model_loads_and_has_a_chat_template():
    from grpoctl.models import check_vocab, load_policy, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    model = load_policy(DEFAULT_MODEL)
    check_vocab(tok, model, "default model")
    assert model.config.model_type == "llama"
    assert tok.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "Mia has 2 cats."}],
                                       tokenize=False, add_generation_prompt=True)
    assert rendered == "Q: Mia has 2 cats.\nA: "
    plain = tok.apply_chat_template([{"role": "user", "content": "Mia has 2 cats."}],
                                    tokenize=False, add_generation_prompt=False)
    assert plain == "Q: Mia has 2 cats.\n"
    # byte-level: one token per character, round-trips exactly
    assert tok.decode(tok(rendered, add_special_tokens=False)["input_ids"]) == rendered
    assert len(tok(rendered, add_special_tokens=False)["input_ids"]) == len(rendered)


def test_default_model_was_warm_started():
    import torch

    from grpoctl.models import load_policy, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    model = load_policy(DEFAULT_MODEL)
    items = load_split("arith:test")[:8]
    prompts = [tok.apply_chat_template([{"role": "user", "content": it["text"]}], tokenize=False,
                                       add_generation_prompt=True) for it in items]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=32,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    for text, item in zip(texts, items):
        # the solution format was learned: the equation restates the problem, then a boxed number
        m = item["meta"]
        assert text.startswith(f"{m['a']} {m['op']} {m['b']} = "), text
        assert re.search(r"\\boxed\{\d+\}$", text), text
