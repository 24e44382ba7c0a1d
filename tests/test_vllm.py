"""vLLM's pure parts: weight names, buckets, the sync check's arithmetic, the missing extra.

They run everywhere, vllm installed or not; test_vllm_engine.py runs the real engine.
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
                                  logprob_mismatch, sync_tolerance, trainer_weights,
                                  weight_buckets)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


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
    from grpoctl.config import AdapterSettings
    from grpoctl.lora import wrap_with_lora
    from grpoctl.models import load_policy

    saved = load_file(str(tiny_model / "model.safetensors"))
    model = wrap_with_lora(load_policy(tiny_model), AdapterSettings(
        lora_r=4, lora_alpha=8.0, lora_target_modules="q_proj"))
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
    check_mismatch({"max_abs": 3.0, "mean_abs": 0.02, "tokens": 40}, 0.1)  # one odd token: fine
    with pytest.raises(GrpoctlError, match=r"did not sync.*differ by 2\.500 on average"):
        check_mismatch({"max_abs": 9.0, "mean_abs": 2.5, "tokens": 40}, 0.1)
    with pytest.raises(GrpoctlError, match="allowed mean 0.1"):
        check_mismatch({"max_abs": 0.3, "mean_abs": 0.2, "tokens": 4}, tolerance=0.1)


def test_sync_tolerance_follows_the_coarser_dtype():
    # fp32 on both sides agree to ~1e-5: a skipped push (0.02+ apart) must exceed the bound
    assert sync_tolerance(torch.float32, torch.float32) == 1e-3
    assert sync_tolerance("float32", torch.bfloat16) == 0.1
    assert sync_tolerance(torch.float16, "float32") == 0.05
    assert sync_tolerance(None, torch.float32) == 1e-3  # an engine that does not say its dtype
    check_mismatch({"max_abs": 2e-5, "mean_abs": 4e-6, "tokens": 40}, sync_tolerance("float32"))
    with pytest.raises(GrpoctlError, match="did not sync"):
        check_mismatch({"max_abs": 0.2, "mean_abs": 0.02, "tokens": 40},
                       sync_tolerance("float32"))


def test_head_size_read_from_the_config(tmp_path):
    from grpoctl.rollout.vllm import head_size

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576,
                                                      "num_attention_heads": 9}))
    assert head_size(tmp_path) == 64
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "head_dim": 128,
                                                      "num_attention_heads": 4}))
    assert head_size(tmp_path) == 128  # an explicit head_dim wins (Qwen3, Gemma)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {
        "hidden_size": 256, "num_attention_heads": 8}}))
    assert head_size(tmp_path) == 32
    (tmp_path / "config.json").write_text("{}")
    assert head_size(tmp_path) is None


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
