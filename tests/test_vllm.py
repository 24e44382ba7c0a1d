"""vLLM in `loop`: one engine per run, the trainer's weights pushed into it after each update.

The pure parts (names, buckets, the mismatch statistic) run everywhere; the engine
itself needs vllm and a CUDA GPU and is skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from grpoctl.errors import GrpoctlError
from grpoctl.rollout.vllm import (check_mismatch, completion_prompt_logprobs, engine_weight_name,
                                  logprob_mismatch, trainer_weights, weight_buckets)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GPU = pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()),
                         reason="needs vllm and a CUDA GPU (vllm is a CUDA-only optional extra)")


# --- names: trainer parameters -> the checkpoint names vLLM's load_weights reads ------


def test_engine_weight_name_strips_wrappers_and_peft():
    q = "model.layers.0.self_attn.q_proj.weight"
    assert engine_weight_name(q) == q
    assert engine_weight_name("module." + q) == q  # DDP
    assert engine_weight_name("_orig_mod." + q) == q  # torch.compile
    assert engine_weight_name(
        "model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight") == q
    assert engine_weight_name("_fsdp_wrapped_module.model.layers.0.self_attn.q_proj.weight") == q
    # PEFT: the base layer is the model's weight; adapters and kept originals are not sent
    peft_q = "base_model.model.model.layers.0.self_attn.q_proj."
    assert engine_weight_name(peft_q + "base_layer.weight") == q
    assert engine_weight_name(peft_q + "lora_A.default.weight") is None
    head = "base_model.model.lm_head."
    assert engine_weight_name(head + "modules_to_save.default.weight") == "lm_head.weight"
    assert engine_weight_name(head + "original_module.weight") is None
    # a name that merely contains "module" or "lora" as a word is left alone
    assert engine_weight_name("model.module_norm.weight") == "model.module_norm.weight"


def test_trainer_weights_are_the_checkpoints_tensors_under_wrappers(tiny_model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing)

    from grpoctl.models import load_policy

    saved = load_file(str(tiny_model / "model.safetensors"))  # what vLLM would read from disk
    model = load_policy(tiny_model)
    sent = dict(trainer_weights(model))
    assert sent.keys() == saved.keys()
    assert all(torch.equal(sent[k], saved[k]) for k in saved)
    # views of the trainer's parameters: no copy is made in this process
    assert sent["model.embed_tokens.weight"].data_ptr() == \
        model.model.embed_tokens.weight.data_ptr()

    # Real wrappers add levels to the names; the mapping takes them out again.
    layer_type = type(model.model.layers[0])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_type))
    compiled = torch.compile(model)  # wraps as `_orig_mod.`; nothing compiles until called
    names = [n for n, _ in compiled.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in names)
    assert names[0].startswith("_orig_mod.")
    assert dict(trainer_weights(compiled)).keys() == saved.keys()


def test_trainer_weights_of_a_lora_model_carry_the_adapter(tiny_model):
    pytest.importorskip("peft", reason="LoRA needs the lora extra (peft)")
    from grpoctl.lora import LoraSettings, wrap_with_lora
    from grpoctl.models import load_policy

    saved = load_file(str(tiny_model / "model.safetensors"))
    model = wrap_with_lora(load_policy(tiny_model), LoraSettings(r=4, alpha=8.0,
                                                                 target_modules="q_proj"))
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts B at zero; give the adapter a real delta
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    sent = dict(trainer_weights(model))
    assert set(saved) <= set(sent) and set(sent) - set(saved) <= {"lm_head.weight"}  # tied head
    q = model.model.layers[0].self_attn.q_proj
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    expected = saved["model.layers.0.self_attn.q_proj.weight"] + (8.0 / 4) * (b @ a)  # W + α/r·BA
    assert torch.allclose(sent["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert not torch.allclose(expected, saved["model.layers.0.self_attn.q_proj.weight"])
    k = "model.layers.0.self_attn.k_proj.weight"  # no adapter there: unchanged
    assert torch.equal(sent[k], saved[k])


def test_weight_buckets_hold_at_most_max_bytes():
    a, b, c, d = (torch.zeros(n) for n in (4, 4, 8, 2))  # 16, 16, 32, 8 bytes (fp32)
    groups = list(weight_buckets([("a", a), ("b", b), ("c", c), ("d", d)], max_bytes=40))
    assert [[n for n, _ in g] for g in groups] == [["a", "b"], ["c", "d"]]  # 32 | 32 + 8 = 40
    big = torch.zeros(100)  # 400 bytes: alone in its bucket, never dropped
    groups = list(weight_buckets([("a", a), ("big", big), ("d", d)], max_bytes=40))
    assert [[n for n, _ in g] for g in groups] == [["a"], ["big"], ["d"]]
    assert list(weight_buckets([], max_bytes=40)) == []


# --- the sync check's arithmetic --------------------------------------------------------


def test_completion_logprobs_out_of_prompt_logprobs():
    # prompt [5, 6], completion [7, 8]: positions 2 and 3 of prompt + completion
    rows = [None, {6: -0.1, 9: -3.0}, {7: -0.7, 1: -0.2}, {8: -1.25}]
    assert completion_prompt_logprobs(rows, 2, [7, 8]) == [-0.7, -1.25]
    with pytest.raises(RuntimeError, match="3 tokens"):
        completion_prompt_logprobs(rows, 2, [7, 8, 9])


def test_logprob_mismatch_by_hand():
    engine = [[-1.0, -2.0], [-0.5]]
    trainer = [[-1.5, -2.0], [-0.25]]
    # |diffs| = 0.5, 0.0, 0.25 -> max 0.5, mean 0.75 / 3 = 0.25
    assert logprob_mismatch(engine, trainer) == {"max_abs": 0.5, "mean_abs": 0.25, "tokens": 3}
    assert logprob_mismatch([], []) == {"max_abs": 0.0, "mean_abs": 0.0, "tokens": 0}
    with pytest.raises(ValueError, match="sequence 1: 1 engine log-probs, 2 trainer"):
        logprob_mismatch(engine, [[-1.0, -2.0], [-0.5, -0.5]])


def test_check_mismatch_stops_on_unsynced_weights():
    check_mismatch({"max_abs": 3.0, "mean_abs": 0.02, "tokens": 40})  # one odd token: fine
    with pytest.raises(GrpoctlError, match=r"did not sync.*differ by 2\.500 on average"):
        check_mismatch({"max_abs": 9.0, "mean_abs": 2.5, "tokens": 40})
    with pytest.raises(GrpoctlError, match="allowed mean 0.1"):
        check_mismatch({"max_abs": 0.3, "mean_abs": 0.2, "tokens": 4}, tolerance=0.1)


# --- the loop's flags, without vllm ---------------------------------------------------------


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: the missing-extra message cannot show")
def test_loop_backend_vllm_without_vllm_fails_before_anything(tiny_model, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("loop", "--model", str(tiny_model), "--backend", "vllm",
                   "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.3",
                   "--vllm-dtype", "bfloat16", "--vllm-sleep", "--steps", "1",
                   "--prompts-per-step", "2", "--eval-prompts", "none", "--run-dir", str(run),
                   "--quiet")
    assert proc.returncode == 2
    assert "needs the vllm extra: pip install 'grpoctl[vllm]'" in proc.stderr.decode()
    assert not (run / "config.json").exists()  # so the same command works once vllm is installed


def test_vllm_under_torchrun_is_refused_with_a_reason():
    from grpoctl.rollout.vllm import require_vllm

    with pytest.raises(GrpoctlError, match=r"under torchrun \(2 ranks\) it is not supported yet"):
        require_vllm(world_size=2)


# --- on a GPU with vllm -----------------------------------------------------------------------


def naive_logprobs(model, prompt_ids, completion_ids):
    """log_softmax(logits) at temperature 1 of one unpadded sequence, at its completion tokens."""
    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids):, None])[:, 0].cpu()


@pytest.fixture(scope="module")
def tiny_llama64(tmp_path_factory):
    """A tiny Llama whose head size (64) every vLLM attention backend supports."""
    from grpoctl.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama64"), arch="llama", seed=2,
                           hidden=128, heads=2, kv_heads=2)


@GPU
def test_engine_sync_sleep_and_a_check_that_can_fail(tiny_llama64):  # pragma: no cover - GPU only
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.rollout import SamplingParams, generate
    from grpoctl.rollout.vllm import VllmEngine

    sampling = SamplingParams(max_new_tokens=12, seed=1)
    prompts = [{"prompt_id": f"p{i}", "text": t, "answer": None, "meta": {}}
               for i, t in enumerate(["What is 2+2?", "Mia has 23 marbles.", "x"])]
    tok = load_tokenizer(tiny_llama64)
    model = load_policy(tiny_llama64, device="cuda")
    engine = VllmEngine(tiny_llama64, sampling, dtype="float32", gpu_memory_utilization=0.2,
                        sleep_mode=True, enforce_eager=True)
    try:
        records = generate(engine.llm, tok, prompts, 2, sampling, backend="vllm", progress=False)
        same = engine.check_sync(model, records)  # same weights on both sides
        assert same["tokens"] > 0 and same["mean_abs"] < 1e-3

        torch.manual_seed(0)
        with torch.no_grad():  # a large "update" the engine has not been given yet
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        with pytest.raises(GrpoctlError, match="did not sync"):
            engine.check_sync(model, records)

        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] - free_awake > 2**30  # the KV cache went back

        metrics = engine.sync_weights(model, records)  # wakes, loads, resets the cache, checks
        assert not engine.asleep
        assert metrics["vllm_sync_mean_abs_logprob_diff"] < 1e-3
        assert metrics["vllm_sync_max_abs_logprob_diff"] < 1e-2
        # and sampling now comes from the new weights: recorded log-probs = a plain forward
        after = generate(engine.llm, tok, prompts, 2, sampling, backend="vllm", progress=False)
        for r in after:
            expected = naive_logprobs(model, r["prompt_ids"], r["completion_ids"])
            assert torch.allclose(torch.tensor(r["logprobs"]), expected, atol=1e-4, rtol=0)
    finally:
        engine.close()


@GPU
@pytest.mark.parametrize("sleep", [False, True], ids=["awake", "sleep"])
def test_loop_with_vllm_samples_from_the_updated_weights(tiny_llama64, tmp_path, sleep
                                                         ):  # pragma: no cover - GPU only
    from grpoctl.models import load_policy

    run = tmp_path / "run"
    # A lowercase letter anywhere earns reward 1: about half the random completions, so
    # groups differ, advantages are non-zero and lr 1e-2 moves the weights a lot.
    run_cli("loop", "--model", str(tiny_llama64), "--prompts", "arith:train", "--backend", "vllm",
            "--device", "cuda", "--dtype", "float32", "--gpu-memory-utilization", "0.2",
            *(["--vllm-sleep"] if sleep else []), "--reward", "format:[a-z]", "--lr", "1e-2",
            "--group-size", "2", "--prompts-per-step", "8", "--steps", "2",
            "--max-new-tokens", "8", "--eval-prompts", "none", "--save-every", "1",
            "--run-dir", str(run), "--quiet", check=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:  # fp32 engine and trainer: rounding only
        assert m["vllm_sync_tokens"] > 0
        assert m["vllm_sync_mean_abs_logprob_diff"] < 1e-3
        assert m["vllm_sync_max_abs_logprob_diff"] < 1e-2

    # Step 2 was sampled after update 1: its log-probs are those of checkpoint 1, not of
    # the base model the engine was built from.
    step1 = load_policy(run / "checkpoints" / "step-000001", device="cuda")
    base = load_policy(tiny_llama64, device="cuda")
    records = [json.loads(line) for line in
               (run / "step-000002" / "rollouts.jsonl").read_text().splitlines()]
    stale = 0.0
    for r in records:
        got = torch.tensor(r["logprobs"])
        assert torch.allclose(got, naive_logprobs(step1, r["prompt_ids"], r["completion_ids"]),
                              atol=1e-4, rtol=0)
        stale = max(stale, (got - naive_logprobs(base, r["prompt_ids"],
                                                 r["completion_ids"])).abs().max().item())
    assert stale > 1e-2  # the update moved them: the match above is not a coincidence
