"""LoRA through peft: wrapping, adapter and merged checkpoints, resuming, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import policy_records, run_cli
from grpoctl.checkpoint import OPTIMIZER_FILE, load_optimizer_state
from grpoctl.errors import GrpoctlError
from grpoctl.config import AdapterSettings, ModelSettings, PromptSettings, SamplingSettings
from grpoctl.lora import merged_state_dict
from grpoctl.models import load_policy, load_training_policy
from grpoctl.records import read_records, write_records
from grpoctl.update import UpdateConfig, make_optimizer, run_update, update_step

peft = pytest.importorskip("peft", reason="LoRA needs peft (the lora and test extras)")

R4 = AdapterSettings(lora_r=4)



def logits(model, ids=(5, 6, 7, 8, 9, 10)):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits


def test_wrap_trains_only_the_adapter_and_starts_at_the_base(tiny_model):
    base = load_policy(tiny_model)
    model = load_training_policy(tiny_model, lora=R4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear: q, k, v, o, gate, up, down of both layers, not the (tied) output head
    assert len(trainable) == 2 * 7 * 2
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)  # B = 0
    assert not model.training
    config = model.__dict__["peft_wrapper"].peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.0)  # alpha = 2r
    again = load_training_policy(tiny_model, lora=R4)  # the random A is seeded
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_a_step_moves_only_the_adapter(tiny_qwen2):
    model = load_training_policy(tiny_qwen2, lora=AdapterSettings(lora_r=2, lora_target_modules="q_proj,v_proj"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, UpdateConfig(lr=1e-2))
    assert len(optimizer.param_groups[0]["params"]) == 2 * 2 * 2  # q, v x A, B x 2 layers
    update_step(model, optimizer, policy_records(load_policy(tiny_qwen2)), UpdateConfig(lr=1e-2))
    for n, p in model.named_parameters():
        # The base is frozen; B starts at 0, so A's first gradient B^T(...) is 0 too:
        # after one step only B has moved.
        assert torch.equal(p, before[n]) == (".lora_B." not in n), n


# peft 0.21 itself calls transformers 5's deprecated is_gradient_checkpointing (see lora._quiet)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapter_checkpoint_resumes_exactly(tiny_model, tmp_path):
    """update base -> A -> B from files equals two steps in one process, bit for bit:
    the adapter and its optimizer state round-trip through the checkpoint."""
    base = load_policy(tiny_model)
    files = []
    for seed in (1, 2):
        path = tmp_path / f"adv{seed}.jsonl"
        write_records(policy_records(base, seed=seed), str(path))
        files.append(str(path))
    cfg = UpdateConfig(lr=1e-2)
    run_update(files[0], tiny_model, tmp_path / "a", cfg, adapter=R4)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert "model.safetensors" not in names and "merged" not in names
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model.resolve())
    state = json.loads((tmp_path / "a" / "trainer_state.json").read_text())
    assert state["lora"]["r"] == 4 and state["lora"]["alpha"] == 8.0
    metrics = run_update(files[1], tmp_path / "a", tmp_path / "b", cfg)  # no --lora-r: continues
    assert metrics["step"] == 2
    reloaded = load_policy(tmp_path / "b")
    fresh = make_optimizer(reloaded, cfg)
    assert load_optimizer_state(fresh, reloaded, tmp_path / "b")

    model = load_training_policy(tiny_model, lora=R4)
    optimizer = make_optimizer(model, cfg)
    for path in files:
        update_step(model, optimizer, read_records(path), cfg)
    for (n, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p, q), n
    saved = {n: s for n, s in zip([n for n, p in model.named_parameters() if p.requires_grad],
                                  optimizer.state.values())}
    for (n, p) in reloaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(fresh.state[p]["exp_avg_sq"], saved[n]["exp_avg_sq"]), n
    # peft itself reads the saved adapter: the same function as grpoctl's loading
    theirs = peft.PeftModel.from_pretrained(load_policy(tiny_model), str(tmp_path / "b"))
    torch.testing.assert_close(logits(theirs), logits(reloaded), rtol=0, atol=0)
    with pytest.raises(GrpoctlError, match="rank 4 but --lora-r is 8"):
        run_update(files[1], tmp_path / "b", tmp_path / "c", cfg, adapter=AdapterSettings(lora_r=8))


def test_merged_weights_are_base_plus_scaled_product(tiny_model, tmp_path):
    model = load_training_policy(tiny_model, lora=AdapterSettings(lora_r=2, lora_alpha=3.0))
    optimizer = make_optimizer(model, UpdateConfig(lr=1e-2))
    update_step(model, optimizer, policy_records(load_policy(tiny_model)), UpdateConfig(lr=1e-2))
    merged = merged_state_dict(model)
    assert set(merged) == set(load_policy(tiny_model).state_dict())  # the plain model's names
    q = model.model.layers[1].self_attn.q_proj
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    by_hand = q.base_layer.weight + (3.0 / 2) * b @ a  # W + α/r · B A
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"], by_hand)
    assert (b != 0).any()  # the step moved B, so the delta is not zero


def test_cli_lora_update_then_rollout_of_adapter_and_merged(tiny_qwen2, tmp_path):
    adv = tmp_path / "adv.jsonl"
    write_records(policy_records(load_policy(tiny_qwen2)), str(adv))
    run_cli("update", str(adv), "--policy", str(tiny_qwen2), "--out", str(tmp_path / "ck"),
            "--lr", "1e-2", "--lora-r", "4", "--save-lora", "merged", "--gradient-checkpointing",
            "--attn-implementation", "eager", "--is-cap", "2", check=True)
    ck = tmp_path / "ck"
    assert (ck / "adapter_model.safetensors").is_file() and (ck / OPTIMIZER_FILE).is_file()
    assert (ck / "merged" / "model.safetensors").is_file()
    assert not (ck / "merged" / "adapter_config.json").exists()  # plain transformers directory
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(ck / "merged"))
    adapter = load_policy(ck)
    torch.testing.assert_close(logits(plain), logits(adapter), rtol=0, atol=1e-5)
    assert (logits(adapter) - logits(load_policy(tiny_qwen2))).abs().max() > 1e-4  # it trained

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+3=", "answer": "5"}\n')
    from grpoctl.rollout import run_rollout

    from_adapter, from_merged = (
        run_rollout(PromptSettings(str(prompts)),
                    ModelSettings(str(model_dir), attn_implementation="sdpa"),
                    SamplingSettings(max_new_tokens=6), output=str(tmp_path / "r.jsonl"),
                    progress=False)
        for model_dir in (ck, ck / "merged"))
    assert len(from_adapter) == len(from_merged) == 4
    for a, m in zip(from_adapter, from_merged):
        assert a["policy"]["step"] == m["policy"]["step"] == 1
        assert a["completion_ids"] == m["completion_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], m["logprobs"])) < 1e-4


def test_float16_base_trains_a_float32_adapter(tiny_model):
    model = load_training_policy(tiny_model, dtype="float16", lora=R4)
    optimizer = make_optimizer(model, UpdateConfig(lr=1e-2))
    adapter = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in adapter)
    assert model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.float16
    update_step(model, optimizer, policy_records(load_policy(tiny_model)), UpdateConfig(lr=1e-2))
    assert all(torch.isfinite(p).all() for p in adapter)


def test_dropout_only_in_the_gradient_pass(tiny_model):
    model = load_training_policy(tiny_model, lora=AdapterSettings(lora_r=4, lora_dropout=0.5))
    with torch.no_grad():  # B = 0 at init; give the adapter an effect so dropout shows
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    first, second = logits(model), logits(model)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # sampling: no dropout
    records = policy_records(load_policy(tiny_model))
    optimizer = make_optimizer(model, UpdateConfig(lr=0.0))
    metrics = update_step(model, optimizer, records, UpdateConfig(lr=0.0, is_cap=2.0))
    # With dropout in the gradient pass the recomputed log-probs are noisy, while π_old
    # for TIS is a separate pass without dropout: the ratio is no longer exactly 1.
    assert metrics["ratio_max"] - metrics["ratio_min"] > 1e-3
    torch.testing.assert_close(logits(model), first, rtol=0, atol=0)  # dropout off again


def test_bad_adapter_directories_are_one_line_errors(tiny_model, tmp_path):
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tiny_model)}))
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(GrpoctlError, match="adapter_model.bin: pickle weights are not loaded"):
        load_policy(tmp_path / "pickle")
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    (tmp_path / "orphan" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(GrpoctlError, match="the adapter's base model: .*no such directory"):
        load_policy(tmp_path / "orphan")
    with pytest.raises(GrpoctlError, match="--lora-target-modules 'nope'"):
        load_training_policy(tiny_model, lora=AdapterSettings(lora_r=2, lora_target_modules="nope"))


def test_loop_with_lora_resumes_from_an_adapter_checkpoint(tmp_path):
    """A 3-step LoRA loop; then its last step is undone (checkpoint and `done` removed, as a
    crash would) and --resume redoes it from the step-2 adapter: the same step-3 adapter."""
    import shutil

    from safetensors.torch import load_file

    from grpoctl.loop import LoopConfig, run_loop

    run = tmp_path / "run"
    cfg = LoopConfig(steps=3, prompts_per_step=8, group_size=2, limit=24, eval_prompts=None,
                     save_every=1, keep_last=3, score_workers=1, lr=1e-2, seed=0, lora_r=4,
                     save_lora="merged", is_cap=2.0, gradient_checkpointing=True, run_dir=str(run))
    run_loop(cfg)
    last = run / "checkpoints" / "step-000003"
    assert (last / "adapter_model.safetensors").is_file() and (last / "merged").is_dir()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["tokens_forwarded"] > 0 for m in metrics)  # seed 0: every step trains
    assert all(abs(m["is_weight_mean"] - 1) < 1e-4 for m in metrics)  # hf sampler = trainer
    finished = load_file(str(last / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in finished.items() if "lora_B" in k)  # it trained

    shutil.rmtree(last)
    (run / "step-000003" / "done").unlink()
    run_loop(LoopConfig(run_dir=str(run)), resume=True)
    resumed = load_file(str(last / "adapter_model.safetensors"))
    assert finished.keys() == resumed.keys()
    for key in finished:
        assert torch.equal(finished[key], resumed[key]), key
