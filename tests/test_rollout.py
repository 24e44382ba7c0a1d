"""The rollout stage on real tiny models: records, log-probs, padding, seeds, stops."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil

import pytest
import torch

from grpoctl.errors import GrpoctlError
from grpoctl.models import make_tiny_model
from grpoctl.records import check_record, read_records, write_records
from grpoctl.config import ModelSettings, PromptSettings, SamplingSettings
from grpoctl.rollout import generate, policy_step, run_rollout
from grpoctl.rollout.hf import next_tokens, truncate

ROLLOUT_FIELDS = ("prompt_id", "sample", "prompt", "completion", "answer", "prompt_ids",
                  "completion_ids", "logprobs", "finish_reason", "policy", "sampling", "meta")


@pytest.fixture(scope="module")
def llama(tiny_model):
    from grpoctl.models import load_policy, load_tokenizer

    torch.manual_seed(0)
    return load_policy(tiny_model), load_tokenizer(tiny_model)


def prompts_of(texts, answers=None):
    return [{"prompt_id": f"p{i}", "text": t, "answer": (answers or [None] * len(texts))[i],
             "meta": {"i": i}} for i, t in enumerate(texts)]


PROMPTS = prompts_of(["What is 2+2?", "Mia has 23 marbles and finds 45 more.", "x"],
                     ["4", "68", None])


def naive_logprobs(model, prompt_ids, completion_ids, temperature):
    """log_softmax(logits / T) of one unpadded sequence, gathered at the completion tokens."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    rows = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return logp[rows, torch.tensor(completion_ids)]


# --- the sampler on hand-worked distributions -------------------------------------


def test_truncate_hand_worked():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])

    def kept(**kw):
        out = truncate(probs, **kw)
        assert torch.equal(out[out > 0], probs[out > 0])  # kept values are untouched
        return (out > 0).int().tolist()[0]

    # Ranked 0.5, 0.3, 0.15, 0.05; a token stays while the mass ranked above it < top_p.
    assert kept(top_p=0.75) == [0, 1, 0, 1]  # above 0.3: 0.5 < 0.75; above 0.15: 0.8
    assert kept(top_p=0.85) == [0, 1, 1, 1]  # above 0.15: 0.8 < 0.85
    assert kept(top_p=0.1) == [0, 1, 0, 0]  # the most likely token always stays
    assert kept(top_p=1.0) == [1, 1, 1, 1]
    assert kept(top_k=2) == [0, 1, 0, 1]
    # top-k first, then top-p on what is left: {0.5, 0.3, 0.15}, mass 0.95; with
    # p = 0.6, 0.3 stays (0.5 < 0.6 * 0.95 = 0.57) and 0.15 goes (0.8 >= 0.57).
    assert kept(top_k=3, top_p=0.6) == [0, 1, 0, 1]
    assert kept(top_k=3, top_p=0.5) == [0, 1, 0, 0]  # 0.5 >= 0.475: 0.3 goes too
    # ties at the k-th value are kept: top-2 of three 0.3s keeps all three (mass 0.9)
    probs = torch.tensor([[0.3, 0.1, 0.3, 0.3]])
    assert kept(top_k=2) == [1, 0, 1, 1] and kept(top_k=2, top_p=0.9) == [1, 0, 1, 1]
    assert sum(kept(top_k=2, top_p=0.5)) == 2  # 0.6 above the third: >= 0.45


def test_truncate_top_k_then_top_p_on_a_large_vocabulary():
    """top-k with top-p (the paper's evaluation sampling) on 49,152-token rows, against the
    definition written out here: zero below the k-th value, sort the whole row, keep a
    token while the mass ranked above it is < top_p of what top-k left."""
    gen = torch.Generator().manual_seed(0)
    probs = (torch.randn(16, 49_152, generator=gen) * 3).softmax(-1)
    for top_k, top_p in [(20, 0.8), (20, 0.3), (1000, 0.95), (5, 1.0)]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        left = probs.masked_fill(probs < kth, 0.0)
        expected = torch.zeros_like(probs)
        for row in range(len(probs)):
            mass, kept_mass = 0.0, float(left[row].sum())
            for token in left[row].argsort(descending=True)[:top_k].tolist():
                if mass < top_p * kept_mass:
                    expected[row, token] = left[row, token]
                mass += float(left[row, token])
        assert torch.equal(truncate(probs, top_p=top_p, top_k=top_k), expected), (top_k, top_p)


def test_next_tokens_inverse_cdf_and_logprob_before_truncation():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(5, 1)
    u = torch.tensor([0.5, 0.51, 0.8001, 1.0, 0.2])
    tokens, logprobs = next_tokens(logits, u, temperature=1.0)
    # cdf = [0.5, 0.8, 1.0]: the first token whose cdf reaches u.
    assert tokens.tolist() == [0, 1, 2, 2, 0]
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.5, 0.3, 0.2, 0.2, 0.5])))
    # top-k 2 leaves [0.5, 0.3] (mass 0.8): u = 0.9 -> 0.72 -> token 1; its log-prob is
    # still log 0.3, the probability before truncation.
    tokens, logprobs = next_tokens(logits[:1], torch.tensor([0.9]), 1.0, top_k=2)
    assert tokens.tolist() == [1] and math.isclose(logprobs.item(), math.log(0.3), rel_tol=1e-6)
    # Temperature 2: p ∝ sqrt([0.5, 0.3, 0.2]); greedy (T = 0) scores at T = 1.
    _, logprobs = next_tokens(logits[:1], torch.tensor([1e-6]), 2.0)
    q = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    assert math.isclose(logprobs.item(), math.log(q[0] / q.sum()), rel_tol=1e-6)
    tokens, logprobs = next_tokens(logits[:1], torch.tensor([0.99]), 0.0)
    assert tokens.tolist() == [0] and math.isclose(logprobs.item(), math.log(0.5), rel_tol=1e-6)


def test_every_token_of_a_large_vocabulary_can_be_drawn():
    """Qwen's 151,936 tokens under random logits: tokens far down the cumulative sum with
    probability below fp32's step near 1 (6e-8) must still own their slice of (0, 1]."""
    vocab = 151_936
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 4
    probs = logits.softmax(-1)  # as next_tokens computes them
    cdf32 = probs.cumsum(-1)  # what a float32 sum gives: flat where later tokens vanish
    assert int(((cdf32[0, 1:] == cdf32[0, :-1]) & (probs[0, 1:] > 0)).sum()) > 10_000
    # Ten tokens of the second half with probability 1e-11..6e-8 (slices far wider than
    # float64's rounding, far narrower than float32's), each hit by a u in the middle of
    # its slice. The slices, worked out here: blocks of 256 tokens own their fp32 sum,
    # laid end to end in float64; inside a block each token owns its float64 share.
    p = probs[0].tolist()
    # (summed as [rows, blocks, 256], zero-padded, so the fp32 rounding is inverse_cdf's)
    padded = torch.nn.functional.pad(probs, (0, -vocab % 256))
    block_sums = padded.view(1, -1, 256).sum(-1)[0].tolist()
    total = math.fsum(block_sums)
    late = torch.arange(vocab // 2, vocab)
    rare = late[(probs[0, late] > 1e-11) & (probs[0, late] < 6e-8)]
    assert len(rare) >= 10
    for token in rare[:: len(rare) // 10][:10].tolist():
        b, first = token // 256, token // 256 * 256
        block_mass = math.fsum(p[first:first + 256])
        scale = block_sums[b] / block_mass  # the block's sum over its float64 sum
        start = math.fsum(block_sums[:b]) + math.fsum(p[first:token]) * scale
        u = (start + p[token] * scale / 2) / total
        assert abs(p[token] * scale - p[token]) < 1e-6 * p[token]  # its chance, to 1e-6
        drawn, _ = uniform_draw(logits, torch.tensor(u, dtype=torch.float64))
        assert drawn == token


def test_inverse_cdf_is_the_plain_float64_cumsum_draw():
    """The two-level draw (block sums, then one block) against the one-level float64 cumsum
    written out here, on a vocabulary that is not a multiple of the block, with zeros. (The
    two could differ only for a u within fp32 rounding of a block's boundary; none here.)"""
    from grpoctl.rollout.hf import inverse_cdf

    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 1000, generator=gen) ** 8
    probs[probs < 0.05] = 0.0  # about 70% of the tokens can never be drawn
    u = 1.0 - torch.rand(64, dtype=torch.float64, generator=gen)
    u[:4] = 1.0  # the top of the range: the last token with a non-zero probability
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    drawn = inverse_cdf(probs, u, block=64)
    assert torch.equal(drawn, expected)
    assert bool((probs.gather(-1, drawn.unsqueeze(-1)) > 0).all())
    last_nonzero = [max(i for i in range(1000) if probs[r, i] > 0) for r in range(4)]
    assert drawn[:4].tolist() == last_nonzero
    # the block size changes the summation order only
    assert torch.equal(inverse_cdf(probs, u, block=256), expected)


def uniform_draw(logits: torch.Tensor, u: torch.Tensor) -> tuple[int, float]:
    tokens, logprobs = next_tokens(logits, u.reshape(1).to(torch.float64), 1.0)
    return tokens.item(), logprobs.item()


def test_uniforms_are_float64_in_0_1():
    from grpoctl.rollout.hf import uniforms

    u = uniforms([1, 2], 1000)
    assert u.dtype == torch.float64 and u.shape == (2, 1000)
    assert bool(((u > 0) & (u <= 1)).all()) and torch.equal(u, uniforms([1, 2], 1000))
    assert len(set(u.flatten().tolist())) == 2000  # not float32 values in disguise
    assert any(x != float(torch.tensor(x, dtype=torch.float32)) for x in u[0, :10].tolist())


def test_sampling_frequencies_match_the_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    n = 40000
    u = 1.0 - torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens, _ = next_tokens(probs.log().repeat(n, 1), u, 1.0, top_p=0.9)
    freq = torch.bincount(tokens, minlength=4).float() / n
    expected = torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95  # top-p 0.9 drops the 0.05 token
    assert (freq - expected).abs().max() < 0.01
    assert freq[0] == 0


# --- records ----------------------------------------------------------------------


def test_records_have_every_field(llama):
    model, tok = llama
    sampling = SamplingSettings(max_new_tokens=12, seed=3)
    records = generate(model, tok, PROMPTS, 3, sampling, batch_size=4,
                       policy={"path": "m", "step": 5}, progress=False)
    assert [(r["prompt_id"], r["sample"]) for r in records] == [
        (f"p{i}", s) for i in range(3) for s in range(3)]
    for r in records:
        check_record(r, require=ROLLOUT_FIELDS)
        assert set(r) == set(ROLLOUT_FIELDS)
        p = PROMPTS[int(r["prompt_id"][1:])]
        assert r["prompt"] == p["text"] and r["answer"] == p["answer"] and r["meta"] == p["meta"]
        assert r["prompt_ids"] == tok(p["text"], add_special_tokens=False)["input_ids"]
        assert 1 <= len(r["completion_ids"]) == len(r["logprobs"]) <= 12
        assert all(isinstance(x, float) and x <= 0 for x in r["logprobs"])
        assert r["completion"] == tok.decode(r["completion_ids"], skip_special_tokens=True)
        assert r["policy"] == {"path": "m", "step": 5}
        assert r["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                 "max_new_tokens": 12, "seed": 3, "backend": "hf"}
    # The G samples of a prompt are drawn independently.
    assert len({tuple(r["completion_ids"]) for r in records[:3]}) == 3


@pytest.mark.parametrize("temperature, top_p, top_k",
                         [(1.0, 1.0, 0), (0.7, 0.8, 20), (0.0, 1.0, 0)])
def test_logprobs_equal_a_naive_forward_pass(llama, temperature, top_p, top_k):
    model, tok = llama
    sampling = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=16)
    records = generate(model, tok, PROMPTS, 2, sampling, batch_size=6, progress=False)
    for r in records:
        # Greedy sampling records log-probs at temperature 1.
        expected = naive_logprobs(model, r["prompt_ids"], r["completion_ids"], temperature or 1.0)
        assert torch.allclose(torch.tensor(r["logprobs"]), expected, atol=1e-5, rtol=0)


def test_the_batch_layout_by_hand():
    # grpoctl/padding.py, shared by the sampler and the update's log-probs: rows
    # right-aligned, the mask over real tokens, positions counting real tokens only.
    from grpoctl.padding import distinct_rows, left_pad, next_positions, positions, right_pad

    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert next_positions(mask).tolist() == [[3], [1], [2]]
    ids, mask = right_pad([[4], [], [6, 7]], pad_id=1, length=3)
    assert ids.tolist() == [[4, 1, 1], [1, 1, 1], [6, 7, 1]]
    assert mask.tolist() == [[1, 0, 0], [0, 0, 0], [1, 1, 0]]
    assert distinct_rows([[1, 2], [3], [1, 2], [3], [4]]) == ([[1, 2], [3], [4]], [0, 1, 0, 1, 2])


def test_left_padding_does_not_change_the_numbers(llama):
    model, tok = llama
    short = "Hi"
    batch = prompts_of(["a much longer prompt, " * 6, short, "another long one " * 4, "?"])
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=20)
    alone = generate(model, tok, prompts_of([short]), 1, greedy, progress=False)[0]
    together = generate(model, tok, batch, 1, greedy, batch_size=4, progress=False)[1]
    assert together["prompt"] == short
    assert together["completion_ids"] == alone["completion_ids"]
    assert max(abs(a - b) for a, b in zip(alone["logprobs"], together["logprobs"])) < 1e-5


def test_left_padding_with_absolute_positions():
    # Rotary models (Llama, Qwen) hardly notice shifted positions; GPT-2 learns one
    # embedding per absolute position, so it shows whether each row's positions
    # start at 0 on its first real token, as they must.
    from transformers import GPT2Config, GPT2LMHeadModel

    from grpoctl.models import byte_level_tokenizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=256, n_embd=32, n_layer=2,
                                       n_head=2, bos_token_id=1, eos_token_id=1))
    tok = byte_level_tokenizer()
    batch = prompts_of(["a much longer prompt, " * 5, "Hi", "?"])
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=12)
    # Left in train mode (GPT-2 has dropout 0.1), as a trainer may leave it: sampling
    # runs in eval mode anyway, and the mode is given back.
    model.train()
    alone = generate(model, tok, batch[1:2], 1, sampling, progress=False)[0]
    together = generate(model, tok, batch, 1, sampling, batch_size=3, progress=False)
    assert model.training
    model.eval()
    assert together[1]["completion_ids"] == alone["completion_ids"]
    for r in together:
        expected = naive_logprobs(model, r["prompt_ids"], r["completion_ids"], 1.0)
        assert torch.allclose(torch.tensor(r["logprobs"]), expected, atol=1e-5, rtol=0)


def test_same_seed_same_bytes_other_seed_other_bytes(llama, tmp_path):
    model, tok = llama

    def run(seed, name):
        records = generate(model, tok, PROMPTS, 2, SamplingSettings(max_new_tokens=10, seed=seed),
                           progress=False)
        write_records(records, str(tmp_path / name))
        return (tmp_path / name).read_bytes()

    assert run(0, "a.jsonl") == run(0, "b.jsonl")
    assert run(1, "c.jsonl") != run(0, "a.jsonl")


def test_samples_do_not_depend_on_batch_size(llama):
    # Each (prompt, sample) has its own random stream, so batching changes nothing but
    # float rounding in the logits.
    model, tok = llama
    sampling = SamplingSettings(temperature=0.9, top_p=0.95, max_new_tokens=12)
    one = generate(model, tok, PROMPTS, 2, sampling, batch_size=1, progress=False)
    six = generate(model, tok, PROMPTS, 2, sampling, batch_size=6, progress=False)
    assert [r["completion_ids"] for r in one] == [r["completion_ids"] for r in six]
    diffs = [abs(a - b) for x, y in zip(one, six) for a, b in zip(x["logprobs"], y["logprobs"])]
    assert max(diffs) < 1e-5


def test_a_common_prefix_runs_once_without_changing_any_sample(llama):
    # A chat template's system prompt opens every prompt: sample_batch runs it once as a
    # batch of one, copies its cache to every prompt, then each prompt's rest (left padded
    # after the prefix). The samples are those of each prompt alone, where nothing is
    # shared, and the log-probs those of a plain forward pass.
    from grpoctl.padding import MIN_SHARED_PREFIX

    model, tok = llama
    system = "System: answer with one number.\nUser: "
    batch = prompts_of([system + q for q in ("2+2?", "What is 17 + 25, exactly?", "9*9?")])
    prefix = tok(system, add_special_tokens=False)["input_ids"]
    assert len(prefix) >= MIN_SHARED_PREFIX
    sampling = SamplingSettings(temperature=0.8, max_new_tokens=12, seed=4)
    layer_calls = []
    hook = model.model.layers[0].register_forward_hook(
        lambda _m, args, _out: layer_calls.append(tuple(args[0].shape[:2])))
    together = generate(model, tok, batch, 2, sampling, batch_size=6, progress=False)
    hook.remove()
    rests = [len(r["prompt_ids"]) - len(prefix) for r in together[::2]]
    assert layer_calls[:2] == [(1, len(prefix)), (3, max(rests))]  # prefix, then the rests
    alone = [generate(model, tok, [p], 2, sampling, progress=False) for p in batch]
    assert [r["completion_ids"] for r in together] == [
        r["completion_ids"] for pair in alone for r in pair]
    for r in together:
        expected = naive_logprobs(model, r["prompt_ids"], r["completion_ids"], 0.8)
        assert torch.allclose(torch.tensor(r["logprobs"]), expected, atol=1e-5, rtol=0)


def test_finished_rows_leave_the_batch_without_changing_any_sample():
    # The embedded model ends its answers after 15-32 tokens, so in a batch of 48 rows
    # the first quarter finishes long before the last row: sample_batch drops finished
    # rows from the batch (and its KV cache) several times. Every sample must be what
    # it is alone (batch of one, nothing dropped), its log-probs those of a plain
    # forward pass.
    from grpoctl.models import load_policy, load_tokenizer, resolve_model_dir
    from grpoctl.prompts import load_prompts, render_prompt

    model_dir = resolve_model_dir("default")
    model, tok = load_policy(model_dir), load_tokenizer(model_dir)
    prompts = [dict(p, text=render_prompt(tok, p["text"], "{prompt}", True, None))
               for p in load_prompts("arith:test", limit=24)]
    sampling = SamplingSettings(max_new_tokens=32, seed=1)
    batched = generate(model, tok, prompts, 2, sampling, batch_size=48, progress=False)
    lengths = sorted(len(r["completion_ids"]) for r in batched)
    assert sum(n < lengths[-1] for n in lengths) >= len(lengths) // 4  # rows were dropped
    alone = generate(model, tok, prompts[:6], 2, sampling, batch_size=1, progress=False)
    assert [r["completion_ids"] for r in alone] == [r["completion_ids"] for r in batched[:12]]
    for r in batched:  # fp32 rounding of this trained model's larger logits: up to 2.5e-5
        expected = naive_logprobs(model, r["prompt_ids"], r["completion_ids"], 1.0)
        assert torch.allclose(torch.tensor(r["logprobs"]), expected, atol=1e-4, rtol=0)


def test_kv_cache_appends_in_place():
    """rollout/kvcache.py: after `preallocate`, appending a token writes into the layer's
    buffer (same storage, no copy of the cache) and the keys/values are those torch.cat
    would give, through a growth past the capacity and a row selection."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    from grpoctl.rollout.kvcache import AppendInPlaceLayer, preallocate

    gen = torch.Generator().manual_seed(0)
    step = lambda: (torch.randn(3, 2, 1, 4, generator=gen), torch.randn(3, 2, 1, 4, generator=gen))
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4)]
    k0, v0 = torch.randn(3, 2, 5, 4, generator=gen), torch.randn(3, 2, 5, 4, generator=gen)
    for layer in cache.layers:
        layer.update(k0, v0)
    preallocate(cache, capacity=7)
    layer = cache.layers[0]
    assert type(layer) is AppendInPlaceLayer
    assert type(cache.layers[1]) is DynamicSlidingWindowLayer  # left as it is
    keys, values = k0, v0
    storage = layer.keys.untyped_storage().data_ptr()
    for t in range(4):  # 5 + 4 > 7: the buffer grows once
        k, v = step()
        out_k, out_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], -2), torch.cat([values, v], -2)
        assert torch.equal(out_k, keys) and torch.equal(out_v, values)
        if t < 2:
            assert layer.keys.untyped_storage().data_ptr() == storage  # written in place
    assert layer.get_seq_length() == 9
    storage = layer.keys.untyped_storage().data_ptr()
    layer.batch_select_indices(torch.tensor([2, 0]))  # rows move within the buffer
    assert layer.keys.untyped_storage().data_ptr() == storage
    k, v = step()
    out_k, _ = layer.update(k[:2], v[:2])
    assert torch.equal(out_k, torch.cat([keys[[2, 0]], k[:2]], -2))
    layer.batch_select_indices(torch.tensor([1, 0, 1]))  # more rows than it holds: gathered
    assert torch.equal(layer.keys, torch.cat([keys[[0, 2, 0]], k[[1, 0, 1]]], -2))


def test_rows_kept_fill_the_done_rows_places_from_the_end():
    from grpoctl.rollout.hf import rows_kept

    done = torch.tensor([False, True, False, True, False, False])
    # 4 rows stay: rows 4 and 5 take the places of rows 1 and 3; rows 0 and 2 stay put
    assert rows_kept(done).tolist() == [0, 4, 2, 5]
    assert rows_kept(torch.tensor([False, False, True])).tolist() == [0, 1]
    assert rows_kept(torch.tensor([True, False, False])).tolist() == [2, 1]


def test_the_sampler_uses_the_in_place_cache(llama, monkeypatch):
    from grpoctl.rollout import kvcache

    calls = []
    update = kvcache.AppendInPlaceLayer.update
    monkeypatch.setattr(kvcache.AppendInPlaceLayer, "update",
                        lambda self, *a, **kw: calls.append(1) or update(self, *a, **kw))
    model, tok = llama
    generate(model, tok, PROMPTS, 2, SamplingSettings(max_new_tokens=4), progress=False)
    assert len(calls) >= model.config.num_hidden_layers


def test_packed_linears_same_numbers_and_the_model_given_back(llama):
    """rollout/packed.py: inside the block every nn.Linear (the LM head too) is packed and
    the logits are the plain model's to fp32 rounding; after it, even when the block
    raises, the model holds its own modules again, its weights untouched."""
    from grpoctl.rollout.packed import PackedLinear, can_pack, packed_linears

    model, _ = llama
    ids = torch.tensor([[5, 17, 33, 2, 90, 41]])
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    weights = {name: p.clone() for name, p in model.named_parameters()}
    with torch.inference_mode():
        plain = model(ids).logits
        assert can_pack(model)
        with packed_linears(model, rows_hint=4):
            inside = {name: m for name, m in model.named_modules() if name in linears}
            assert all(type(m) is PackedLinear for m in inside.values())
            assert type(model.get_output_embeddings()) is PackedLinear
            packed = model(ids).logits
        with pytest.raises(ValueError), packed_linears(model, rows_hint=4):
            raise ValueError("a failure while sampling")
    assert (packed - plain).abs().max() < 1e-5
    assert all(dict(model.named_modules())[name] is m for name, m in linears.items())
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    half = copy.deepcopy(model).to(torch.bfloat16)
    with packed_linears(half, rows_hint=4):  # fp32 weights only
        assert not any(type(m) is PackedLinear for m in half.modules())


def test_decode_attention_by_hand():
    """rollout/attention.py at a decode step (one query token) against attention written
    out head by head: query head h attends with key/value head h // (heads / kv_heads),
    masked keys get no weight."""
    from grpoctl.rollout.attention import decode_attention_forward

    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, keys, dim = 3, 6, 2, 7, 8
    query = torch.randn(batch, heads, 1, dim, generator=gen)
    key = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    value = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    seen = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    seen[0, ..., :3] = False  # left padding of row 0
    seen[2, ..., :1] = False
    expected = torch.zeros(batch, 1, heads, dim)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = [float(query[b, h, 0] @ key[b, kv, j]) / math.sqrt(dim) for j in range(keys)]
            weights = [math.exp(x) if seen[b, 0, 0, j] else 0.0 for j, x in enumerate(scores)]
            for j, w in enumerate(weights):
                expected[b, 0, h] += w / sum(weights) * value[b, kv, j]
    out, _ = decode_attention_forward(None, query, key, value, seen)
    assert out.shape == (batch, 1, heads, dim)
    assert (out - expected).abs().max() < 1e-5
    additive = torch.zeros(seen.shape).masked_fill(~seen, float("-inf"))
    out, _ = decode_attention_forward(None, query, key, value, additive)
    assert (out - expected).abs().max() < 1e-5


def test_decode_attention_same_logits_and_the_setting_given_back(llama, monkeypatch):
    """Inside the block the model's decode steps go through decode_attention_forward and
    give sdpa's logits to fp32 rounding (left padding, several steps); after it, even
    when the block raises, the model is on sdpa again. A model on eager is left alone."""
    from grpoctl.padding import cache_argument, left_pad, positions, returned_cache
    from grpoctl.rollout import attention

    calls = []
    forward = attention.decode_attention_forward
    monkeypatch.setattr(attention, "decode_attention_forward", lambda module, q, *args, **kw:
                        calls.append(q.shape[2]) or forward(module, q, *args, **kw))
    model, _ = llama
    ids, mask = left_pad([[5, 17, 33, 2, 90], [41, 7]], 0)

    def decode(tokens):  # the prompts, then one token per row and step
        logits, cache, m, pos, step_ids = [], None, mask, positions(mask), ids
        with torch.inference_mode():
            for next_ids in tokens:
                out = model(input_ids=step_ids, attention_mask=m, position_ids=pos,
                            use_cache=True, **{cache_argument(model): cache})
                cache, step_ids = returned_cache(out), next_ids
                logits.append(out.logits[:, -1])
                m, pos = torch.cat([m, m.new_ones(2, 1)], -1), pos[:, -1:] + 1
        return torch.stack(logits)

    tokens = torch.tensor([[[7], [90]], [[33], [5]], [[2], [2]], [[41], [17]]])
    plain = decode(tokens)
    assert calls == []
    with attention.decode_attention(model):
        assert model.config._attn_implementation == attention.NAME
        routed = decode(tokens)
    assert 1 in calls and (routed - plain).abs().max() < 1e-5
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError), attention.decode_attention(model):
        raise ValueError("a failure while sampling")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    try:
        with attention.decode_attention(model):
            assert model.config._attn_implementation == "eager"
    finally:
        model.config._attn_implementation = "sdpa"


def test_the_sampler_uses_packed_linears(llama, monkeypatch):
    from grpoctl.rollout import packed

    calls = []
    forward = packed.PackedLinear.forward
    monkeypatch.setattr(packed.PackedLinear, "forward",
                        lambda self, x: calls.append(1) or forward(self, x))
    model, tok = llama
    generate(model, tok, PROMPTS, 2, SamplingSettings(max_new_tokens=4), progress=False)
    assert len(calls) > 0
    assert not any(type(m) is packed.PackedLinear for m in model.modules())


def test_stop_and_length(llama):
    model, tok = llama
    prompts = prompts_of([f"{a} + {a} = " for a in range(32)])
    records = generate(model, tok, prompts, 2, SamplingSettings(max_new_tokens=32), progress=False)
    stopped = [r for r in records if r["finish_reason"] == "stop"]
    capped = [r for r in records if r["finish_reason"] == "length"]
    assert stopped and capped  # this seed gives both (a random model stops ~1 in 258 tokens)
    for r in stopped:  # EOS included, nothing after it
        assert r["completion_ids"][-1] == tok.eos_token_id
        assert tok.eos_token_id not in r["completion_ids"][:-1]
        assert len(r["logprobs"]) == len(r["completion_ids"]) <= 32
    for r in capped:
        assert len(r["completion_ids"]) == 32 and tok.eos_token_id not in r["completion_ids"]
    short = generate(model, tok, prompts[:4], 2, SamplingSettings(max_new_tokens=2), progress=False)
    assert all(r["finish_reason"] == "length" and len(r["completion_ids"]) == 2 for r in short
               if tok.eos_token_id not in r["completion_ids"])


def test_bad_settings_are_refused(llama):
    model, tok = llama
    with pytest.raises(GrpoctlError, match="--backend: expected one of hf, vllm"):
        generate(model, tok, PROMPTS, 2, SamplingSettings(), backend="tgi")
    with pytest.raises(GrpoctlError, match="--top-p"):
        generate(model, tok, PROMPTS, 2, SamplingSettings(top_p=0.0))
    with pytest.raises(GrpoctlError, match="--group-size"):
        generate(model, tok, PROMPTS, 0, SamplingSettings())


# --- the command's function ------------------------------------------------------


def test_run_rollout_chat_template_and_files(tiny_qwen2, data_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    source = str(data_dir / "gsm8k_test.jsonl")
    records = run_rollout(PromptSettings(source, limit=3, answer_after="#### ",
                                         template="Q: {prompt}"),
                          ModelSettings(str(tiny_qwen2)), SamplingSettings(max_new_tokens=8),
                          output=str(out), progress=True)
    assert capsys.readouterr().out == ""  # progress and logs go to stderr only
    assert read_records(str(out), require=ROLLOUT_FIELDS) == records
    assert len(records) == 6 and records[0]["answer"] == "18"
    assert records[0]["prompt"].startswith("<user>Q: Janet")
    assert records[0]["prompt"].endswith("<assistant>")
    assert records[0]["policy"] == {"path": str(tiny_qwen2), "step": 0}

    plain = run_rollout(PromptSettings(source, limit=1, use_chat_template=False),
                        ModelSettings(str(tiny_qwen2)),
                        SamplingSettings(group_size=1, max_new_tokens=4), output=str(out),
                        progress=False)
    assert plain[0]["prompt"].startswith("Janet") and "<user>" not in plain[0]["prompt"]


def test_shards_concatenate_to_the_whole_run(data_dir, tmp_path):
    source = str(data_dir / "math500.jsonl")
    # MATH-500's prompts run to ~1,000 bytes: a byte-level model needs the positions
    tiny_model = make_tiny_model(tmp_path / "model", max_positions=2048)
    sampling = SamplingSettings(max_new_tokens=6, seed=7)
    prompts, model = PromptSettings(source, limit=5), ModelSettings(str(tiny_model))
    whole = run_rollout(prompts, model, sampling, output=str(tmp_path / "all.jsonl"),
                        progress=False)
    parts = [run_rollout(prompts, model, sampling, output=str(tmp_path / f"{i}.jsonl"),
                         shard=f"{i}/2", progress=False) for i in range(2)]
    key = lambda r: (r["prompt_id"], r["sample"])  # noqa: E731
    merged = sorted(parts[0] + parts[1], key=key)
    assert [(key(r), r["completion_ids"]) for r in merged] == \
        [(key(r), r["completion_ids"]) for r in sorted(whole, key=key)]
    assert whole[0]["meta"]["subject"] == "Precalculus"


def test_policy_step_from_trainer_state(tiny_model, tmp_path):
    assert policy_step(tiny_model) == 0
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model, ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 12}), encoding="utf-8")
    assert policy_step(ckpt) == 12
    records = run_rollout(PromptSettings("arith:test", limit=1), ModelSettings(str(ckpt)),
                          SamplingSettings(group_size=1, max_new_tokens=2),
                          output=str(tmp_path / "r.jsonl"), progress=False)
    assert records[0]["policy"] == {"path": str(ckpt), "step": 12}


# --- vLLM --------------------------------------------------------------------------

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: the missing-extra message cannot show")
def test_vllm_backend_without_vllm_says_how_to_install(tiny_model, tmp_path):
    with pytest.raises(GrpoctlError, match=r"needs the vllm extra: pip install 'grpoctl\[vllm\]'"):
        run_rollout(PromptSettings("arith:test", limit=1), ModelSettings(str(tiny_model)),
                    SamplingSettings(backend="vllm"), output=str(tmp_path / "r.jsonl"),
                    progress=False)
    assert not (tmp_path / "r.jsonl").exists()  # and no silent fallback to hf


def test_vllm_logprobs_mode_matches_our_definition():
    from grpoctl.rollout.vllm import logprobs_mode

    assert logprobs_mode(SamplingSettings(temperature=1.0, top_p=0.8, top_k=20)) == "raw_logprobs"
    assert logprobs_mode(SamplingSettings(temperature=0.0, top_p=0.8)) == "raw_logprobs"
    assert logprobs_mode(SamplingSettings(temperature=0.7)) == "processed_logprobs"
    with pytest.raises(GrpoctlError, match="--backend vllm cannot record log-probs"):
        logprobs_mode(SamplingSettings(temperature=0.7, top_p=0.8, top_k=20))
