"""Model-loading knobs of update/loop: gradient checkpointing, attention implementation, dtype.

Gradient checkpointing must (1) give the same step as without it, (2) really recompute
(the policy stays in eval mode, where transformers' own checkpointing does nothing) and
(3) really keep fewer activations.
"""

from __future__ import annotations

import pytest
import torch

from conftest import policy_records, run_cli
from grpoctl.errors import GrpoctlError
from grpoctl.logprobs import completion_logprobs, padded_completion_logprobs
from grpoctl.models import (enable_gradient_checkpointing, is_gradient_checkpointing,
                            load_policy, load_training_policy)
from grpoctl.update import UpdateConfig, update_step


def sgd_step(model, records, **cfg):
    """One update_step with SGD lr 1 and no gradient clipping: the weight change IS -grad."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    return update_step(model, optimizer, records,
                       UpdateConfig(max_grad_norm=0.0, micro_batch_size=4, **cfg))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_qwen2"])
def test_same_step_with_and_without_checkpointing(fixture, request):
    path = request.getfixturevalue(fixture)
    plain = load_training_policy(path)
    checkpointed = load_training_policy(path, gradient_checkpointing=True)
    assert is_gradient_checkpointing(checkpointed) and not is_gradient_checkpointing(plain)
    assert not checkpointed.training  # eval mode (no dropout) is kept
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    records = policy_records(plain)

    m1 = sgd_step(plain, records)
    m2 = sgd_step(checkpointed, records)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-7)
    moved = 0.0
    for (name, p1), (_, p2) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (p1 - before[name]).abs().max().item())
    assert moved > 1e-3  # the step did something: equal weights are not trivially equal


def _count_mlp_calls(model):
    # A pre-hook: torch stops a replay as soon as it has recomputed the last saved tensor
    # (early stop), so the MLP's forward never returns there and a post-hook would not fire.
    calls = []
    layer_mlps = [m.mlp for m in model.model.layers]
    handles = [mlp.register_forward_pre_hook(lambda *_: calls.append(1)) for mlp in layer_mlps]
    return calls, handles


def test_checkpointing_recomputes_in_eval_mode(tiny_model):
    """Each decoder layer runs twice per gradient pass (forward, then the replay in
    backward) with checkpointing, once without; under no_grad (sampling) once."""
    records = policy_records(load_policy(tiny_model))
    counts = {}
    for on in (False, True):
        model = load_training_policy(tiny_model, gradient_checkpointing=on)
        layers = model.config.num_hidden_layers
        calls, handles = _count_mlp_calls(model)
        sgd_step(model, records, skip_zero_advantage=False)
        counts[on] = len(calls) / layers
        calls.clear()
        with torch.no_grad():
            completion_logprobs(model, [records[0]["prompt_ids"]], [records[0]["completion_ids"]])
        assert len(calls) == layers  # no replay without gradients
        for h in handles:
            h.remove()
    # 6 records, micro-batch 4 -> 2 micro-batches. Without checkpointing, each runs the
    # shared prompt pass + the completion pass = 4 layer calls; with it, one plain
    # pass per micro-batch (the cache path is off) and its replay = 4.
    assert counts[False] == 4
    assert counts[True] == 4
    # Same micro-batches without repeated prompts: 2 forwards vs 2 forwards + 2 replays.
    distinct = [dict(r, prompt_ids=r["prompt_ids"] + [i + 2]) for i, r in enumerate(records)]
    for on, expected in ((False, 2), (True, 4)):
        model = load_training_policy(tiny_model, gradient_checkpointing=on)
        calls, _ = _count_mlp_calls(model)
        sgd_step(model, distinct, skip_zero_advantage=False)
        assert len(calls) / model.config.num_hidden_layers == expected


def _saved_bytes(model, records) -> int:
    """Bytes of the tensors autograd keeps for the backward of one gradient pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _, mask = padded_completion_logprobs(
            model, [r["prompt_ids"] for r in records], [r["completion_ids"] for r in records])
    logp[mask].sum().backward()
    return total


def test_checkpointing_keeps_fewer_activations(tmp_path):
    from grpoctl.models import make_tiny_model

    path = make_tiny_model(tmp_path / "m", "llama", layers=4)
    records = [dict(r, prompt_ids=r["prompt_ids"] * 8, completion_ids=r["completion_ids"] * 4)
               for r in policy_records(load_policy(path), n_prompts=4, group=1)]
    plain = _saved_bytes(load_training_policy(path), records)
    checkpointed = _saved_bytes(load_training_policy(path, gradient_checkpointing=True), records)
    # Measured: 1.13 MB against 15.3 MB (4 layers, hidden 64, MLP 256).
    assert checkpointed < 0.25 * plain, (checkpointed, plain)


def test_checkpointing_refuses_a_model_without_decoder_layers():
    with pytest.raises(GrpoctlError, match="gradient-checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# --- attention implementation and dtype ------------------------------------------------


def test_attention_implementations_agree(tiny_qwen2):
    records = policy_records(load_policy(tiny_qwen2), n_prompts=2)
    prompts = [r["prompt_ids"] for r in records]
    completions = [r["completion_ids"] for r in records]
    results = {}
    for attn in ("eager", "sdpa"):
        model = load_policy(tiny_qwen2, attn_implementation=attn)
        assert model.config._attn_implementation == attn
        with torch.no_grad():
            results[attn], _, mask = padded_completion_logprobs(model, prompts, completions)
    torch.testing.assert_close(results["eager"], results["sdpa"], rtol=0, atol=1e-5)


def test_unknown_attention_implementation_is_one_line(tiny_model):
    with pytest.raises(GrpoctlError, match="cannot load model.*--attn-implementation nonsense"):
        load_policy(tiny_model, attn_implementation="nonsense")


@pytest.mark.parametrize("command", ["rollout", "eval"])
def test_cli_passes_the_attention_implementation(command, tiny_model):
    proc = run_cli(command, "--model", str(tiny_model), "--prompts", "arith:test", "--limit", "1",
                   "--max-new-tokens", "2", "--attn-implementation", "nonsense")
    assert proc.returncode == 2
    assert "--attn-implementation nonsense" in proc.stderr.decode()


def test_bfloat16_update_on_cpu(tiny_model):
    model = load_training_policy(tiny_model, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    records = policy_records(load_policy(tiny_model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    metrics = update_step(model, optimizer, records, UpdateConfig(lr=1e-2))
    after = model.model.layers[0].mlp.up_proj.weight
    assert after.dtype == torch.bfloat16 and torch.isfinite(after).all()
    assert (after != before).float().mean() > 0.5  # lr 1e-2 moves bf16 weights
    # fp32 records against a bf16 policy: the ratio is near 1, not exactly 1
    assert 0.9 < metrics["ratio_mean"] < 1.1 and metrics["logp_mismatch_max"] > 1e-4


def test_float16_full_training_is_refused(tiny_model):
    with pytest.raises(GrpoctlError, match="float16 cannot train every parameter"):
        load_training_policy(tiny_model, dtype="float16")
